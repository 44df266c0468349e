//! Where the demo tells its story: lines, and progress that is a bar
//! redrawn in place on a terminal; otherwise plain lines, one when the
//! state shown changes and at most one every few seconds while it does not
//! (SPEC §4.3).
//!
//! Output that cannot be written (a closed pipe) is latched: later output
//! is dropped and the demo stops at its next step with
//! [`DemoError::Output`].

use std::fmt;
use std::io::{self, IsTerminal, Write};
use std::time::{Duration, Instant};

use crate::DemoError;

/// Without a terminal, an unchanged state is repeated this often.
const EVERY: Duration = Duration::from_secs(3);
const WIDTH: usize = 30;

/// The demo's output: its story (`out`), its failure note (`err`), and
/// the progress display's state.
pub struct Console {
    out: Box<dyn Write>,
    err: Box<dyn Write>,
    /// Draw bars in place (`out` is a terminal).
    tty: bool,
    /// A write failed: nothing more is written.
    broken: bool,
    /// The first write that failed, until [`Console::check`] reports it.
    failed: Option<io::Error>,
    last: Option<Instant>,
    key: String,
    drawn: bool,
}

/// Writes a line of the story: `say!(console, "format", args...)`.
macro_rules! say {
    ($console:expr) => {
        $console.line(format_args!(""))
    };
    ($console:expr, $($arg:tt)*) => {
        $console.line(format_args!($($arg)*))
    };
}
pub(crate) use say;

impl Console {
    /// Standard output and standard error; bars when stdout is a terminal.
    pub fn stdio() -> Console {
        Console::new(io::stdout(), io::stderr(), io::stdout().is_terminal())
    }

    /// Any two sinks (buffers in tests); `tty` draws progress in place.
    pub fn new(out: impl Write + 'static, err: impl Write + 'static, tty: bool) -> Console {
        Console {
            out: Box::new(out),
            err: Box::new(err),
            tty,
            broken: false,
            failed: None,
            last: None,
            key: String::new(),
            drawn: false,
        }
    }

    /// One line of the story.
    pub(crate) fn line(&mut self, args: fmt::Arguments<'_>) {
        self.write(args, true);
    }

    /// One line on the error stream.
    pub(crate) fn error_line(&mut self, args: fmt::Arguments<'_>) {
        if self.broken {
            return;
        }
        if let Err(e) = writeln!(self.err, "{args}").and_then(|()| self.err.flush()) {
            self.fail(e);
        }
    }

    fn fail(&mut self, e: io::Error) {
        self.broken = true;
        self.failed.get_or_insert(e);
    }

    fn write(&mut self, args: fmt::Arguments<'_>, newline: bool) {
        if self.broken {
            return;
        }
        let result = if newline {
            writeln!(self.out, "{args}")
        } else {
            write!(self.out, "{args}").and_then(|()| self.out.flush())
        };
        if let Err(e) = result {
            self.fail(e);
        }
    }

    /// Reports (once) that output could not be written.
    pub(crate) fn check(&mut self) -> Result<(), DemoError> {
        match self.failed.take() {
            Some(e) => Err(DemoError::Output(e)),
            None => Ok(()),
        }
    }

    /// Shows `text`, with a bar when `fraction` is known and the output is
    /// a terminal. `key` is the part of the state that matters: without a
    /// terminal, a line is printed when it changes (or every few seconds).
    pub(crate) fn progress(&mut self, fraction: Option<f64>, key: &str, text: &str) {
        if self.tty {
            let bar = fraction.map(bar).unwrap_or_default();
            self.write(format_args!("\r  {bar}{text}\x1b[K"), false);
            self.drawn = true;
        } else if key != self.key || self.last.is_none_or(|t| t.elapsed() >= EVERY) {
            self.line(format_args!("  {text}"));
            key.clone_into(&mut self.key);
            self.last = Some(Instant::now());
        }
    }

    /// Ends the progress display with a final line.
    pub(crate) fn done(&mut self, text: &str) {
        if self.tty && self.drawn {
            self.line(format_args!("\r  {text}\x1b[K"));
        } else {
            self.line(format_args!("  {text}"));
        }
        self.drawn = false;
        self.last = None;
        self.key.clear();
    }
}

fn bar(fraction: f64) -> String {
    let f = fraction.clamp(0.0, 1.0);
    // f is in [0, 1]: at most WIDTH.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let filled = ((f * WIDTH as f64).round() as usize).min(WIDTH);
    format!(
        "[{}{}] {:3.0}%  ",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        f * 100.0
    )
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;

    /// A sink the test can read afterwards.
    #[derive(Clone, Default)]
    struct Shared(Rc<RefCell<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.borrow_mut().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.borrow()).into_owned()
        }
    }

    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn without_a_terminal_progress_prints_a_line_per_change() {
        let out = Shared::default();
        let mut c = Console::new(out.clone(), io::sink(), false);
        c.progress(Some(0.5), "a", "first");
        c.progress(Some(0.6), "a", "same state");
        c.progress(None, "b", "second");
        c.done("finished");
        say!(c, "[{}/7] {}", 1, "next");
        assert_eq!(out.text(), "  first\n  second\n  finished\n[1/7] next\n");
    }

    #[test]
    fn on_a_terminal_progress_is_redrawn_in_place() {
        let out = Shared::default();
        let mut c = Console::new(out.clone(), io::sink(), true);
        c.progress(Some(0.5), "a", "half");
        c.done("whole");
        assert_eq!(
            out.text(),
            format!(
                "\r  [{}{}]  50%  half\x1b[K\r  whole\x1b[K\n",
                "#".repeat(15),
                ".".repeat(15)
            )
        );
    }

    #[test]
    fn a_failed_write_is_latched() {
        let mut c = Console::new(Broken, io::sink(), false);
        say!(c, "lost");
        say!(c, "not even tried");
        assert!(matches!(c.check(), Err(DemoError::Output(_))));
        assert!(c.check().is_ok(), "reported once");
    }
}
