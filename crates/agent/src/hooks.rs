//! `on_promote` / `on_demote`: the operator's commands, run with the
//! group's facts in the environment, bounded in time, output logged.
//!
//! A hook runs in a process group of its own: at its timeout, or when the
//! agent stops, the whole group is killed — a `sh -c` that started a
//! `sleep` or a VM tool leaves nothing behind.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt;

use tracing::{info, warn};

/// How long a hook may run before it is killed and reported failed.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(120);

/// How often a running hook is looked at.
const POLL: Duration = Duration::from_millis(10);

/// Output kept per stream and logged.
const OUTPUT_MAX: u64 = 1 << 20;

/// A group's hook commands now: the configuration's at start, a
/// reload's after one (docs/CONFIG.md, "Reload").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupHooks {
    pub on_promote: Option<String>,
    pub on_demote: Option<String>,
}

impl GroupHooks {
    pub fn of(group: &tandem_config::Group) -> GroupHooks {
        GroupHooks {
            on_promote: group.on_promote.clone(),
            on_demote: group.on_demote.clone(),
        }
    }
}

/// What a hook is told.
pub struct HookEnv<'a> {
    pub group: &'a str,
    pub site: &'a str,
    pub epoch: u64,
    pub nbd_sockets: Vec<String>,
    pub files_dir: String,
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{hook} hook {command:?}: cannot start: {source}")]
    Start {
        hook: &'static str,
        command: String,
        source: std::io::Error,
    },
    #[error("{hook} hook {command:?}: {source}")]
    Wait {
        hook: &'static str,
        command: String,
        source: std::io::Error,
    },
    #[error("{hook} hook {command:?} killed after {timeout:?}")]
    TimedOut {
        hook: &'static str,
        command: String,
        timeout: Duration,
    },
    #[error("{hook} hook {command:?} killed: the agent is stopping")]
    Stopped { hook: &'static str, command: String },
    #[error("{hook} hook {command:?} failed: {status}")]
    Failed {
        hook: &'static str,
        command: String,
        status: ExitStatus,
    },
}

/// Runs `command` with `sh -c` in a process group of its own. Ok when it
/// exits 0 within `timeout`; killed (the whole group) at the timeout or
/// once `stop` is set.
pub fn run(
    hook: &'static str,
    command: &str,
    env: &HookEnv<'_>,
    timeout: Duration,
    stop: &AtomicBool,
) -> Result<(), HookError> {
    let started = Instant::now();
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .env("TANDEM_GROUP", env.group)
        .env("TANDEM_SITE", env.site)
        .env("TANDEM_EPOCH", env.epoch.to_string())
        .env("TANDEM_NBD_SOCKETS", env.nbd_sockets.join(" "))
        .env("TANDEM_FILES_DIR", &env.files_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|source| HookError::Start {
            hook,
            command: command.to_owned(),
            source,
        })?;
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let readers = [
        std::thread::spawn(move || drain(out.as_mut())),
        std::thread::spawn(move || drain(err.as_mut())),
    ];
    let waited = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if started.elapsed() >= timeout => {
                kill_group(&mut child);
                break Err(HookError::TimedOut {
                    hook,
                    command: command.to_owned(),
                    timeout,
                });
            }
            Ok(None) if stop.load(Ordering::Acquire) => {
                kill_group(&mut child);
                break Err(HookError::Stopped {
                    hook,
                    command: command.to_owned(),
                });
            }
            Ok(None) => std::thread::sleep(POLL),
            Err(source) => {
                kill_group(&mut child);
                break Err(HookError::Wait {
                    hook,
                    command: command.to_owned(),
                    source,
                });
            }
        }
    };
    // The group is gone (or exited): the pipes close, the readers end.
    let [out, err] = readers.map(|r| r.join().unwrap_or_default());
    for line in out.lines().chain(err.lines()) {
        info!(group = env.group, hook, "{line}");
    }
    let status = waited?;
    if status.success() {
        info!(
            group = env.group,
            hook,
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "hook succeeded"
        );
        Ok(())
    } else {
        let e = HookError::Failed {
            hook,
            command: command.to_owned(),
            status,
        };
        warn!(group = env.group, "{e}");
        Err(e)
    }
}

/// Kills the hook's whole process group, then reaps the shell.
fn kill_group(child: &mut Child) {
    let pgid = rustix::process::Pid::from_child(child);
    if let Err(e) = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL) {
        // Already gone: the shell exited and took its group with it.
        tracing::debug!("kill hook process group {pgid:?}: {e}");
        let _ = child.kill();
    }
    let _ = child.wait();
}

fn drain<R: Read>(r: Option<&mut R>) -> String {
    let mut s = String::new();
    if let Some(r) = r {
        let mut bytes = Vec::new();
        let _ = r.take(OUTPUT_MAX).read_to_end(&mut bytes);
        s = String::from_utf8_lossy(&bytes).into_owned();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> HookEnv<'static> {
        HookEnv {
            group: "g",
            site: "ny",
            epoch: 3,
            nbd_sockets: vec!["/a.sock".into(), "/b.sock".into()],
            files_dir: "/files".into(),
        }
    }

    #[test]
    fn a_hook_sees_the_groups_facts_and_its_exit_status_counts() {
        let stop = AtomicBool::new(false);
        let ok = "test \"$TANDEM_GROUP $TANDEM_SITE $TANDEM_EPOCH $TANDEM_NBD_SOCKETS $TANDEM_FILES_DIR\" = \"g ny 3 /a.sock /b.sock /files\"";
        assert!(run("on_promote", ok, &env(), Duration::from_secs(10), &stop).is_ok());
        assert!(matches!(
            run(
                "on_promote",
                "exit 3",
                &env(),
                Duration::from_secs(10),
                &stop
            ),
            Err(HookError::Failed { .. })
        ));
    }

    /// Whether a process with this pid exists (a zombie counts as gone).
    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
    }

    #[test]
    fn a_hook_that_times_out_is_killed_with_everything_it_started() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("pid");
        // The shell starts a background sleep that would outlive it.
        let command = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
        let stop = AtomicBool::new(false);
        let started = Instant::now();
        let result = run(
            "on_promote",
            &command,
            &env(),
            Duration::from_millis(500),
            &stop,
        );
        assert!(
            matches!(result, Err(HookError::TimedOut { .. })),
            "{result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .expect("the hook wrote its child's pid")
            .trim()
            .parse()
            .expect("a pid");
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) {
            assert!(
                Instant::now() < deadline,
                "the hook's child {pid} outlived the timeout"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_stopping_agent_kills_a_running_hook() {
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let runner = {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || run("on_promote", "sleep 300", &env(), HOOK_TIMEOUT, &stop))
        };
        stop.store(true, Ordering::Release);
        let result = runner.join().expect("runner");
        assert!(
            matches!(result, Err(HookError::Stopped { .. })),
            "{result:?}"
        );
    }
}
