//! Bounded waiting for Tandem's tests: every wait has a limit, and a wait
//! that runs out says what it waited for and how long.
//!
//! These poll a condition. Poll only for what cannot be awaited directly
//! (another process's state, a file, a status answer); within one process
//! prefer a channel, a condition variable, or a counter the code under test
//! exposes. Never sleep as a stand-in for "the other thread is now
//! waiting": wait until something observable says so.
//!
//! - [`wait_until`]: until a condition holds, or panic.
//! - [`wait_for`]: until a value is there, or panic.
//! - [`poll`], [`poll_every`]: the same without the panic, for callers that
//!   fail in their own way (with a log tail, after killing a child).
//! - [`wait_child`], [`run_with_timeout`]: a child process's exit, bounded.
#![forbid(unsafe_code)]

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The first pause between two looks; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(1);
/// The longest pause between two looks.
pub const MAX_PAUSE: Duration = Duration::from_millis(50);

/// Waits until `cond` holds. Panics, naming `what` and `timeout`, if it
/// still does not hold once `timeout` has passed.
///
/// `cond` is evaluated at least once, and once more at the limit.
#[track_caller]
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(timeout, what, || cond().then_some(()));
}

/// Waits until `f` returns a value, and returns it. Panics, naming `what`
/// and `timeout`, if it returned none by the time `timeout` has passed.
#[track_caller]
pub fn wait_for<T>(timeout: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    match poll(timeout, f) {
        Some(value) => value,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Calls `f` until it returns a value, for at most `timeout`; `None` if it
/// never did. Pauses between calls grow from 1 ms to [`MAX_PAUSE`].
pub fn poll<T>(timeout: Duration, f: impl FnMut() -> Option<T>) -> Option<T> {
    poll_paced(timeout, FIRST_PAUSE, MAX_PAUSE, f)
}

/// [`poll`] with a fixed pause between calls, for the rare wait whose
/// reaction time matters (acting a moment after a state is reached), on a
/// condition cheap enough to look at that often.
pub fn poll_every<T>(
    pause: Duration,
    timeout: Duration,
    f: impl FnMut() -> Option<T>,
) -> Option<T> {
    poll_paced(timeout, pause, pause, f)
}

fn poll_paced<T>(
    timeout: Duration,
    first: Duration,
    max: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = first;
    loop {
        if let Some(value) = f() {
            return Some(value);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(max);
    }
}

/// Waits for `child` to exit and returns its status; after `timeout` it
/// is killed and the test fails.
#[track_caller]
pub fn wait_child(child: &mut Child, timeout: Duration) -> ExitStatus {
    match poll(timeout, || child.try_wait().expect("wait for a child")) {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process {} did not exit within {timeout:?}", child.id());
        }
    }
}

/// Runs `cmd` to completion within `timeout` (stdin empty; stdout and
/// stderr collected as it runs, so a talkative command cannot block on a
/// full pipe) and returns its output; after `timeout` it is killed and the
/// test fails, naming the command.
#[track_caller]
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let description = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {description}: {e}"));
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let Some(status) = poll(timeout, || child.try_wait().expect("wait for a child")) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{description} did not finish within {timeout:?}");
    };
    Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn returns_as_soon_as_the_condition_holds() {
        let calls = Cell::new(0);
        let t = Instant::now();
        let got = wait_for(Duration::from_secs(10), "the third call", || {
            calls.set(calls.get() + 1);
            (calls.get() == 3).then_some("third")
        });
        assert_eq!(got, "third");
        assert_eq!(calls.get(), 3);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }

    #[test]
    fn looks_once_more_at_the_limit_and_gives_up_then() {
        let calls = Cell::new(0);
        let t = Instant::now();
        let got: Option<()> = poll(Duration::from_millis(100), || {
            calls.set(calls.get() + 1);
            None
        });
        let took = t.elapsed();
        assert!(got.is_none());
        assert!(took >= Duration::from_millis(100), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert!(calls.get() >= 2);
    }

    #[test]
    fn a_zero_timeout_still_looks_once() {
        assert_eq!(poll(Duration::ZERO, || Some(7)), Some(7));
        assert_eq!(
            poll_every(Duration::from_millis(1), Duration::ZERO, || None::<u8>),
            None
        );
    }

    #[test]
    fn a_timeout_names_what_was_awaited_and_how_long() {
        let panic = std::panic::catch_unwind(|| {
            wait_until(Duration::from_millis(20), "the moon to turn blue", || false)
        })
        .expect_err("must panic");
        let msg = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("the moon to turn blue"), "{msg}");
        assert!(msg.contains("20ms"), "{msg}");
    }

    #[test]
    fn a_command_runs_to_its_end_with_its_output() {
        let out = run_with_timeout(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(30),
        );
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
    }

    #[test]
    fn a_command_over_its_time_is_killed_and_named() {
        let t = Instant::now();
        let panic = std::panic::catch_unwind(|| {
            run_with_timeout(Command::new("sleep").arg("30"), Duration::from_millis(200))
        })
        .expect_err("must panic");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        let msg = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("sleep") && msg.contains("200ms"), "{msg}");
    }
}
