//! Progress output: a bar redrawn in place on a terminal; otherwise plain
//! lines, one when the state shown changes and at most one every few
//! seconds while it does not (SPEC §4.3).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    tty: bool,
    last: Option<Instant>,
    key: String,
    drawn: bool,
}

/// Without a terminal, an unchanged state is repeated this often.
const EVERY: Duration = Duration::from_secs(3);
const WIDTH: usize = 30;

impl Progress {
    pub fn new() -> Progress {
        Progress {
            tty: std::io::stdout().is_terminal(),
            last: None,
            key: String::new(),
            drawn: false,
        }
    }

    /// Shows `text`, with a bar when `fraction` is known and stdout is a
    /// terminal. `key` is the part of the state that matters: without a
    /// terminal, a line is printed when it changes (or every few seconds).
    pub fn update(&mut self, fraction: Option<f64>, key: &str, text: &str) {
        if self.tty {
            let bar = fraction.map(bar).unwrap_or_default();
            print!("\r  {bar}{text}\x1b[K");
            let _ = std::io::stdout().flush();
            self.drawn = true;
        } else if key != self.key || self.last.is_none_or(|t| t.elapsed() >= EVERY) {
            println!("  {text}");
            key.clone_into(&mut self.key);
            self.last = Some(Instant::now());
        }
    }

    /// Ends the progress display with a final line.
    pub fn done(&mut self, text: &str) {
        if self.tty && self.drawn {
            println!("\r  {text}\x1b[K");
        } else {
            println!("  {text}");
        }
        self.drawn = false;
        self.last = None;
        self.key.clear();
    }
}

fn bar(fraction: f64) -> String {
    let f = fraction.clamp(0.0, 1.0);
    let filled = (f * WIDTH as f64).round() as usize;
    format!(
        "[{}{}] {:3.0}%  ",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        f * 100.0
    )
}
