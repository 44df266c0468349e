//! Progress of long work (SPEC §4.3): a bar redrawn in place on a
//! terminal, plain lines otherwise (one per 10 % or 10 s, whichever comes
//! first), so logs of scripted runs stay readable. Small enough not to
//! need a crate: the line mode is the part a bar crate does not do.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    label: String,
    terminal: bool,
    last_line: Option<(Instant, u64)>,
    drawn: bool,
}

impl Progress {
    pub fn new(label: impl Into<String>) -> Progress {
        Progress {
            label: label.into(),
            terminal: std::io::stderr().is_terminal(),
            last_line: None,
            drawn: false,
        }
    }

    /// `done` of `total` bytes.
    pub fn set(&mut self, done: u64, total: u64) {
        let pct = if total == 0 {
            0
        } else {
            u64::try_from(u128::from(done.min(total)) * 100 / u128::from(total)).unwrap_or(100)
        };
        let text = format!(
            "{} {pct:>3}% {} of {}",
            self.label,
            tandem_config::format_size_approx(done),
            tandem_config::format_size_approx(total)
        );
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
