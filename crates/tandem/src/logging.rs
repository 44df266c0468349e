//! Logging of every command (agent, witness and the tools): `tracing` to
//! stderr, filtered by `TANDEM_LOG` / `RUST_LOG`, as text or JSON
//! (`--log-format`, `TANDEM_LOG_FORMAT`), in colour only on a terminal,
//! with repeated lines rate-limited (`Repeats`: the first of identical
//! lines goes out, the others within [`WINDOW`] are counted and said in
//! one line, "... (repeated N times in the last Ns)"). docs/CONFIG.md,
//! "Logs".

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Identical lines within this window of the first are counted, not
/// written.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Distinct lines tracked at once; past this new ones are not limited.
const MAX_TRACKED: usize = 4096;
/// The target of the "(repeated N times ...)" lines.
const REPEATED_TARGET: &str = "tandem::repeated";

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event (in colour on a terminal)
    Text,
    /// One JSON object per line
    Json,
}

/// A bad `TANDEM_LOG_FORMAT`.
#[derive(Debug, thiserror::Error)]
#[error("TANDEM_LOG_FORMAT={0:?}: expected \"text\" or \"json\"")]
pub struct BadFormat(String);

impl LogFormat {
    /// `--log-format` if given, else `TANDEM_LOG_FORMAT`, else text.
    pub fn choose(flag: Option<LogFormat>) -> Result<LogFormat, BadFormat> {
        if let Some(f) = flag {
            return Ok(f);
        }
        match std::env::var("TANDEM_LOG_FORMAT") {
            Err(_) => Ok(LogFormat::Text),
            Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
                "" | "text" => Ok(LogFormat::Text),
                "json" => Ok(LogFormat::Json),
                _ => Err(BadFormat(v)),
            },
        }
    }
}

/// Holds the logging set up; dropped at the end of `main`, it writes the
/// counts of lines still being suppressed.
pub struct Guard {
    repeats: Arc<Shared>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.repeats.flush(Instant::now(), true);
    }
}

/// Sets up logging for the process.
pub fn init(format: LogFormat) -> Guard {
    let filter = std::env::var("TANDEM_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let shared = Arc::new(Shared::default());
    let repeats = Repeats {
        shared: Arc::clone(&shared),
    };
    let registry = tracing_subscriber::registry().with(filter).with(repeats);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => registry.with(fmt.with_ansi(colour)).try_init(),
        LogFormat::Json => registry
            .with(fmt.json().flatten_event(true).with_ansi(false))
            .try_init(),
    };
    Guard { repeats: shared }
}

/// A log line as the suppressor tells identical ones apart.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub level: Level,
    pub target: &'static str,
    /// The message and every field, as written.
    pub text: String,
}

/// Identical lines seen within the window of their first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repeated<K> {
    pub key: K,
    /// Lines not written.
    pub count: u64,
    /// From the first line to the report.
    pub over: Duration,
}

/// Whether a line goes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Write,
    Suppress,
}

#[derive(Debug)]
struct Seen {
    first: Instant,
    suppressed: u64,
}

/// The rate limiter's decisions, without I/O or clock: the time comes
/// with each call.
#[derive(Debug)]
pub struct Suppressor<K> {
    window: Duration,
    cap: usize,
    seen: HashMap<K, Seen>,
    /// Counts of windows that ended by a new line before [`expire`].
    ///
    /// [`expire`]: Suppressor::expire
    ended: Vec<Repeated<K>>,
}

impl<K: Clone + Eq + std::hash::Hash> Suppressor<K> {
    pub fn new(window: Duration, cap: usize) -> Self {
        Suppressor {
            window,
            cap,
            seen: HashMap::new(),
            ended: Vec::new(),
        }
    }

    /// A line `key` at `now`: the first in a window is written, those
    /// after it within the window counted.
    pub fn line(&mut self, key: &K, now: Instant) -> Verdict {
        match self.seen.get_mut(key) {
            Some(s) if now.saturating_duration_since(s.first) < self.window => {
                s.suppressed += 1;
                Verdict::Suppress
            }
            Some(s) => {
                if s.suppressed > 0 {
                    self.ended.push(Repeated {
                        key: key.clone(),
                        count: s.suppressed,
                        over: now.saturating_duration_since(s.first),
                    });
                }
                *s = Seen {
                    first: now,
                    suppressed: 0,
                };
                Verdict::Write
            }
            None => {
                if self.seen.len() < self.cap {
                    self.seen.insert(
                        key.clone(),
                        Seen {
                            first: now,
                            suppressed: 0,
                        },
                    );
                }
                Verdict::Write
            }
        }
    }

    /// The counts to say now: of windows ended by `now` (or of every
    /// window, with `all`), which are forgotten.
    pub fn expire(&mut self, now: Instant, all: bool) -> Vec<Repeated<K>> {
        let mut out = std::mem::take(&mut self.ended);
        let window = self.window;
        self.seen.retain(|key, s| {
            let over = now.saturating_duration_since(s.first);
            if !all && over < window {
                return true;
            }
            if s.suppressed > 0 {
                out.push(Repeated {
                    key: key.clone(),
                    count: s.suppressed,
                    over,
                });
            }
            false
        });
        out
    }

    /// Whether anything is tracked or owed.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty() && self.ended.is_empty()
    }

    /// When the earliest window ends.
    pub fn next_end(&self) -> Option<Instant> {
        self.seen.values().map(|s| s.first + self.window).min()
    }
}

/// The suppressor and its flusher, shared by the layer and the guard.
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

struct State {
    suppressor: Suppressor<Key>,
    /// A `log-repeats` thread runs (only while lines are suppressed).
    flusher: bool,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            state: Mutex::new(State {
                suppressor: Suppressor::new(WINDOW, MAX_TRACKED),
                flusher: false,
            }),
            wake: Condvar::new(),
        }
    }
}

impl Shared {
    /// Writes the counts of ended windows (of all, with `all`).
    fn flush(&self, now: Instant, all: bool) {
        let due = self.state.lock().suppressor.expire(now, all);
        for r in due {
            say(&r);
        }
    }

    /// Runs while lines are being suppressed: says each count when its
    /// window ends.
    fn run_flusher(self: Arc<Self>) {
        loop {
            let due = {
                let mut state = self.state.lock();
                if state.suppressor.is_empty() {
                    state.flusher = false;
                    return;
                }
                let until = state
                    .suppressor
                    .next_end()
                    .unwrap_or_else(|| Instant::now() + Duration::from_millis(100));
                if until > Instant::now() {
                    self.wake.wait_until(&mut state, until);
                }
                state.suppressor.expire(Instant::now(), false)
            };
            for r in due {
                say(&r);
            }
        }
    }
}

/// One line for `count` lines not written.
fn say(r: &Repeated<Key>) {
    let secs = r.over.as_secs_f64().ceil().max(1.0);
    let times = match r.count {
        1 => "once".to_owned(),
        n => format!("{n} times"),
    };
    let text = format!("{} (repeated {times} in the last {secs:.0}s)", r.key.text);
    let from = r.key.target;
    let n = r.count;
    match r.key.level {
        Level::ERROR => tracing::error!(target: REPEATED_TARGET, from, repeated = n, "{text}"),
        Level::WARN => tracing::warn!(target: REPEATED_TARGET, from, repeated = n, "{text}"),
        Level::INFO => tracing::info!(target: REPEATED_TARGET, from, repeated = n, "{text}"),
        Level::DEBUG => tracing::debug!(target: REPEATED_TARGET, from, repeated = n, "{text}"),
        _ => tracing::trace!(target: REPEATED_TARGET, from, repeated = n, "{text}"),
    }
}

/// The layer that lets an event through or counts it.
struct Repeats {
    shared: Arc<Shared>,
}

/// An event's message and fields as one string.
#[derive(Default)]
struct Text(String);

impl Visit for Text {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.insert_str(0, value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.insert_str(0, &format!("{value:?}"));
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl<S: Subscriber> Layer<S> for Repeats {
    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        let meta = event.metadata();
        if meta.target() == REPEATED_TARGET {
            return true;
        }
        let mut text = Text::default();
        event.record(&mut text);
        let key = Key {
            level: *meta.level(),
            target: meta.target(),
            text: text.0,
        };
        let mut state = self.shared.state.lock();
        match state.suppressor.line(&key, Instant::now()) {
            Verdict::Write => true,
            Verdict::Suppress => {
                if !state.flusher {
                    let shared = Arc::clone(&self.shared);
                    let started = std::thread::Builder::new()
                        .name("log-repeats".into())
                        .spawn(move || shared.run_flusher());
                    // Without the thread the counts are said at exit.
                    state.flusher = started.is_ok();
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(10);

    #[test]
    fn a_flood_is_one_line_and_one_count() {
        let t0 = Instant::now();
        let mut s = Suppressor::new(W, 100);
        let key = "cannot reach the witness";
        assert_eq!(s.line(&key, t0), Verdict::Write);
        for i in 1..=738u64 {
            let at = t0 + Duration::from_millis(i * 1300 / 738);
            assert_eq!(s.line(&key, at), Verdict::Suppress);
        }
        assert_eq!(s.line(&"another line", t0), Verdict::Write);
        assert!(s.expire(t0 + Duration::from_secs(5), false).is_empty());
        assert_eq!(s.next_end(), Some(t0 + W));
        let said = s.expire(t0 + W, false);
        assert_eq!(
            said,
            vec![Repeated {
                key,
                count: 738,
                over: W
            }],
            "the other line was alone: nothing to say of it"
        );
        assert!(s.is_empty());
        assert_eq!(
            s.line(&key, t0 + W + Duration::from_secs(1)),
            Verdict::Write,
            "a new window"
        );
    }

    #[test]
    fn a_line_after_its_window_is_written_and_the_count_kept() {
        let t0 = Instant::now();
        let mut s = Suppressor::new(W, 100);
        let key = 1;
        assert_eq!(s.line(&key, t0), Verdict::Write);
        assert_eq!(s.line(&key, t0 + Duration::from_secs(1)), Verdict::Suppress);
        assert_eq!(s.line(&key, t0 + Duration::from_secs(12)), Verdict::Write);
        assert_eq!(
            s.line(&key, t0 + Duration::from_secs(13)),
            Verdict::Suppress
        );
        let said = s.expire(t0 + Duration::from_secs(13), false);
        assert_eq!(said.len(), 1, "the first window's count");
        assert_eq!((said[0].count, said[0].over), (1, Duration::from_secs(12)));
        let rest = s.expire(t0 + Duration::from_secs(14), true);
        assert_eq!(rest.len(), 1, "at exit, the running window's count");
        assert_eq!(rest[0].count, 1);
    }

    #[test]
    fn distinct_lines_are_not_limited_and_tracking_is_bounded() {
        let t0 = Instant::now();
        let mut s = Suppressor::new(W, 3);
        for k in 0..10 {
            assert_eq!(s.line(&k, t0), Verdict::Write);
        }
        assert_eq!(s.line(&0, t0), Verdict::Suppress, "tracked");
        assert_eq!(s.line(&9, t0), Verdict::Write, "past the cap: not tracked");
    }

    #[test]
    fn the_format_comes_from_the_flag_then_the_environment() {
        assert_eq!(
            LogFormat::choose(Some(LogFormat::Json)).ok(),
            Some(LogFormat::Json)
        );
    }
}
