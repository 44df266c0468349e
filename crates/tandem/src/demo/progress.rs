//! Progress output: a bar redrawn in place on a terminal, plain lines at
//! most once a second otherwise (SPEC §4.3).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    tty: bool,
    last: Option<Instant>,
    drawn: bool,
}

const EVERY: Duration = Duration::from_secs(1);
const WIDTH: usize = 30;

impl Progress {
    pub fn new() -> Progress {
        Progress {
            tty: std::io::stdout().is_terminal(),
            last: None,
            drawn: false,
        }
    }

    /// Shows `text`, with a bar when `fraction` is known and stdout is a
    /// terminal.
    pub fn update(&mut self, fraction: Option<f64>, text: &str) {
        if self.tty {
            let bar = fraction.map(bar).unwrap_or_default();
            print!("\r  {bar}{text}\x1b[K");
            let _ = std::io::stdout().flush();
            self.drawn = true;
        } else if self.last.is_none_or(|t| t.elapsed() >= EVERY) {
            println!("  {text}");
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
