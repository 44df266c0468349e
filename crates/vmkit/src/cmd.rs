//! Running outside commands with a time limit, as `Result`s.

use std::fmt::Write as _;
use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::Error;

/// Runs `cmd` (stdin empty; stdout and stderr collected while it runs) to
/// its end within `timeout`, whatever its exit status. After `timeout` it
/// is killed and the result is [`Error::CommandTimeout`].
pub(crate) fn run(cmd: &mut Command, timeout: Duration) -> Result<Output, Error> {
    let command = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Io {
            what: format!("cannot run {command}"),
            source,
        })?;
    let out_reader = child.stdout.take().map(|mut pipe| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = pipe.read_to_end(&mut v);
            v
        })
    });
    let err_reader = child.stderr.take().map(|mut pipe| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = pipe.read_to_end(&mut v);
            v
        })
    });
    let mut wait_error = None;
    let status = tandem_testkit::poll(timeout, || match child.try_wait() {
        Ok(status) => status,
        Err(e) => {
            wait_error.get_or_insert(e);
            None
        }
    });
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        if let Some(source) = wait_error {
            return Err(Error::Io {
                what: format!("waiting for {command}"),
                source,
            });
        }
        return Err(Error::CommandTimeout { command, timeout });
    };
    let stdout = out_reader.and_then(|h| h.join().ok()).unwrap_or_default();
    let stderr = err_reader.and_then(|h| h.join().ok()).unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// [`run`], and an [`Error::CommandFailed`] unless it exits with status 0.
pub(crate) fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<Output, Error> {
    let out = run(cmd, timeout)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(failed(cmd, &out))
    }
}

/// The [`Error::CommandFailed`] for `cmd`, which gave `out`.
pub(crate) fn failed(cmd: &Command, out: &Output) -> Error {
    Error::CommandFailed {
        command: describe(cmd),
        status: out.status.to_string(),
        output: tail(&out.stdout, &out.stderr),
    }
}

/// `cmd` as a shell-like line, for messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        let _ = write!(s, " {}", arg.to_string_lossy());
    }
    s
}

/// The last lines of a command's stdout and stderr, for an error message.
fn tail(stdout: &[u8], stderr: &[u8]) -> String {
    const MAX: usize = 2000;
    let mut s = String::new();
    for (name, bytes) in [("stdout", stdout), ("stderr", stderr)] {
        let text = String::from_utf8_lossy(bytes);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let start = text.len().saturating_sub(MAX);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        let _ = write!(s, "\n--- {name}:\n{}", &text[start..]);
    }
    s
}
