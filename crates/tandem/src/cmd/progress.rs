//! Progress of long work (SPEC §4.3): a bar redrawn in place on a
//! terminal, plain lines otherwise (one per 10 % or 10 s, whichever comes
//! first), so logs of scripted runs stay readable; each with the rate
//! over the last seconds and the time left at it
//! ([`tandem_agent::rate`]). Small enough not to need a crate: the line
//! mode is the part a bar crate does not do.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use tandem_agent::rate::{format_eta, RateWindow, WINDOW};

pub struct Progress {
    label: String,
    rate: RateWindow,
    terminal: bool,
    last_line: Option<(Instant, u64)>,
    drawn: bool,
}

impl Progress {
    pub fn new(label: impl Into<String>) -> Progress {
        Progress {
            label: label.into(),
            rate: RateWindow::new(WINDOW),
            terminal: std::io::stderr().is_terminal(),
            last_line: None,
            drawn: false,
        }
    }

    /// `done` of `total` bytes.
    pub fn set(&mut self, done: u64, total: u64) {
        self.rate.observe(Instant::now(), done);
        let text = line(
            &self.label,
            done,
            total,
            self.rate.rate(),
            self.rate.eta(total),
        );
        let pct = percent(done, total);
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let filled = usize::try_from(pct / 4).unwrap_or(25).min(25);
            let _ = write!(
                err,
                "\r[{}{}] {text}\x1b[K",
                "#".repeat(filled),
                " ".repeat(25 - filled)
            );
            self.drawn = true;
        } else {
            let due = match self.last_line {
                None => true,
                Some((at, p)) => pct >= p + 10 || at.elapsed() >= Duration::from_secs(10),
            };
            if due && self.last_line.map(|(_, p)| p) != Some(pct) {
                let _ = writeln!(err, "{text}");
                self.last_line = Some((Instant::now(), pct));
            }
        }
        let _ = err.flush();
    }

    /// Ends the bar with a last line.
    pub fn finish(self, line: &str) {
        let mut err = std::io::stderr().lock();
        if self.drawn {
            let _ = write!(err, "\r\x1b[K");
        }
        let _ = writeln!(err, "{line}");
    }
}

fn percent(done: u64, total: u64) -> u64 {
    if total == 0 {
        0
    } else {
        u64::try_from(u128::from(done.min(total)) * 100 / u128::from(total)).unwrap_or(100)
    }
}

/// `LABEL  42% 1.2 GiB of 3.0 GiB, 85.3 MiB/s, ETA 21s`.
fn line(label: &str, done: u64, total: u64, rate: Option<f64>, eta: Option<f64>) -> String {
    let mut text = format!(
        "{label} {:>3}% {} of {}",
        percent(done, total),
        tandem_config::format_size_approx(done),
        tandem_config::format_size_approx(total)
    );
    if let Some(r) = rate {
        text += &format!(", {}", tandem_agent::rate::format_rate(r));
        match eta {
            Some(e) if done < total => text += &format!(", ETA {}", format_eta(e)),
            Some(_) => {}
            None => text += ", ETA ?",
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_rate_and_eta() {
        assert_eq!(line("copy", 0, 100, None, None), "copy   0% 0B of 100B");
        let l = line(
            "copy",
            1 << 30,
            3 << 30,
            Some(f64::from(100u32 << 20)),
            Some(20.48),
        );
        assert!(l.starts_with("copy  33% "), "{l}");
        assert!(l.ends_with("/s, ETA 20s"), "{l}");
        assert!(l.contains("100"), "{l}");
        let stalled = line("copy", 10, 100, Some(0.0), None);
        assert!(stalled.ends_with(", ETA ?"), "{stalled}");
        let done = line("copy", 100, 100, Some(5.0), Some(0.0));
        assert!(!done.contains("ETA"), "{done}");
    }
}
