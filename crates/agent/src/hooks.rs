//! `on_promote` / `on_demote`: the operator's commands, run with the
//! group's facts in the environment, bounded in time, output logged.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// How long a hook may run before it is killed and reported failed.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(120);

/// What a hook is told.
pub struct HookEnv<'a> {
    pub group: &'a str,
    pub site: &'a str,
    pub epoch: u64,
    pub nbd_sockets: Vec<String>,
    pub files_dir: String,
}

/// Runs `command` with `sh -c`. Ok when it exits 0 in time.
pub fn run(which: &str, command: &str, env: &HookEnv<'_>, timeout: Duration) -> Result<(), String> {
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
        .spawn()
        .map_err(|e| format!("{which} hook {command:?}: cannot start: {e}"))?;
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let readers = [
        std::thread::spawn(move || drain(out.as_mut())),
        std::thread::spawn(move || drain(err.as_mut())),
    ];
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if started.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("{which} hook {command:?} killed after {timeout:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => break Err(format!("{which} hook {command:?}: {e}")),
        }
    };
    let [out, err] = readers.map(|r| r.join().unwrap_or_default());
    for line in out.lines().chain(err.lines()) {
        info!(group = env.group, hook = which, "{line}");
    }
    let status = status?;
    if status.success() {
        info!(
            group = env.group,
            hook = which,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "hook succeeded"
        );
        Ok(())
    } else {
        let e = format!("{which} hook {command:?} failed: {status}");
        warn!(group = env.group, "{e}");
        Err(e)
    }
}

fn drain<R: Read>(r: Option<&mut R>) -> String {
    let mut s = String::new();
    if let Some(r) = r {
        let mut bytes = Vec::new();
        let _ = r.take(1 << 20).read_to_end(&mut bytes);
        s = String::from_utf8_lossy(&bytes).into_owned();
    }
    s
}
