//! The machine's one libvirt daemon, started without systemd.

use std::path::Path;
use std::process::Command;
use std::sync::Once;
use std::time::Duration;

use crate::cmd::{self, run, run_ok};
use crate::lock::FileLock;
use crate::{Error, DOMAIN_PREFIX};

/// The connection URI every test uses.
pub const URI: &str = "qemu:///system";

/// libvirt's QEMU driver configuration file.
pub const QEMU_CONF: &str = "/etc/libvirt/qemu.conf";

/// Where libvirtd's own log goes (warnings and errors), for diagnosis.
pub const LIBVIRTD_LOG: &str = "/var/log/libvirt/libvirtd.log";

/// Serialises [`Libvirt::ensure`] across processes (several test binaries
/// run at once under `cargo test`).
const LOCK: &str = "/run/tandem-vmkit-libvirt.lock";

/// The settings `qemu.conf` must have, as (key, value) pairs: QEMU runs as
/// root (so it can open root-owned NBD sockets and files anywhere), with
/// no security driver, no cgroups (else libvirt moves QEMU out of the
/// machine's memory cgroup) and no private namespaces.
pub(crate) const QEMU_SETTINGS: [(&str, &str); 5] = [
    ("user", "\"root\""),
    ("group", "\"root\""),
    ("security_driver", "\"none\""),
    ("cgroup_controllers", "[ ]"),
    ("namespaces", "[ ]"),
];

const MARK: &str = "# tandem-vmkit";

/// How long a `virsh` call may take.
pub(crate) const VIRSH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a starting daemon may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long another process may hold the setup lock.
const LOCK_TIMEOUT: Duration = Duration::from_secs(180);

/// The system libvirt daemon (`qemu:///system`), running and configured for
/// TCG guests. All tests on a machine share it; see the crate docs.
#[derive(Debug, Clone)]
pub struct Libvirt {
    uri: String,
}

impl Libvirt {
    /// Makes sure `virtlogd` and `libvirtd` run with the configuration the
    /// tests need, starting (or, after a configuration change, restarting)
    /// them, and returns a handle once `virsh version` answers.
    ///
    /// Idempotent and safe to call from many tests and processes at once
    /// (a file lock in `/run` serialises it); when everything already
    /// runs it costs one `virsh version`. The first call in a process
    /// also removes leftover `tandem-test-*` domains whose test process is
    /// gone.
    pub fn ensure() -> Result<Libvirt, Error> {
        let libvirt = Libvirt {
            uri: URI.to_string(),
        };
        {
            let _lock = FileLock::acquire(Path::new(LOCK), LOCK_TIMEOUT)?;
            let changed = configure_qemu_conf()?;
            if !running("virtlogd") {
                start_daemon("virtlogd")?;
            }
            if changed && running("libvirtd") {
                stop_libvirtd()?;
            }
            if !running("libvirtd") {
                start_daemon("libvirtd")?;
            }
            libvirt.wait_answering(START_TIMEOUT, || format!("; see {LIBVIRTD_LOG}"))?;
        }
        static SWEEP: Once = Once::new();
        SWEEP.call_once(|| libvirt.remove_stale_domains());
        Ok(libvirt)
    }

    /// A handle on the daemon at `uri` (for example a
    /// [`crate::SiteLibvirt`]'s, `qemu+unix:///system?socket=...`), without
    /// starting or checking anything.
    pub fn with_uri(uri: &str) -> Libvirt {
        Libvirt {
            uri: uri.to_string(),
        }
    }

    /// The connection URI (`qemu:///system` for [`Libvirt::ensure`]'s).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// A `virsh -c URI` command with `args`, not yet run.
    pub fn virsh_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("virsh");
        c.arg("-c").arg(&self.uri).args(args);
        c
    }

    /// Runs `virsh -c URI ARGS...` and returns its stdout; an error names
    /// the command and its output.
    pub fn virsh(&self, args: &[&str]) -> Result<String, Error> {
        let out = run_ok(&mut self.virsh_command(args), VIRSH_TIMEOUT)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The names of all defined or running domains.
    pub fn domains(&self) -> Result<Vec<String>, Error> {
        Ok(self
            .virsh(&["list", "--all", "--name"])?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// A domain's state in libvirt's words (`running`, `shut off`, ...),
    /// or `None` when no such domain is defined.
    pub fn domain_state(&self, name: &str) -> Result<Option<String>, Error> {
        let mut c = self.virsh_command(&["domstate", name]);
        let out = run(&mut c, VIRSH_TIMEOUT)?;
        if out.status.success() {
            return Ok(Some(
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
            ));
        }
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("failed to get domain") || err.contains("Domain not found") {
            return Ok(None);
        }
        Err(cmd::failed(&c, &out))
    }

    /// Stops a domain at once (`virsh destroy`: the QEMU process is
    /// killed, as in a host crash) and removes its definition. A domain
    /// that is not running, or not defined, is fine.
    pub fn destroy_and_undefine(&self, name: &str) -> Result<(), Error> {
        self.destroy(name)?;
        let mut c = self.virsh_command(&["undefine", name]);
        let out = run(&mut c, VIRSH_TIMEOUT)?;
        if out.status.success() || self.domain_state(name)?.is_none() {
            Ok(())
        } else {
            Err(cmd::failed(&c, &out))
        }
    }

    /// `virsh destroy`: kills a running domain's QEMU; a domain that is not
    /// running (or not defined) is fine.
    pub fn destroy(&self, name: &str) -> Result<(), Error> {
        let mut c = self.virsh_command(&["destroy", name]);
        let out = run(&mut c, VIRSH_TIMEOUT)?;
        if out.status.success() {
            return Ok(());
        }
        match self.domain_state(name)? {
            None => Ok(()),
            Some(state) if state != "running" && state != "paused" => Ok(()),
            Some(_) => Err(cmd::failed(&c, &out)),
        }
    }

    /// Waits until `virsh -c URI version` answers; after `timeout` the
    /// error names the last answer and what `detail` says (where to look).
    pub(crate) fn wait_answering(
        &self,
        timeout: Duration,
        detail: impl FnOnce() -> String,
    ) -> Result<(), Error> {
        self.wait_answering_while(timeout, || None, detail)
    }

    /// [`Libvirt::wait_answering`] that gives up as soon as `gave_up`
    /// returns a reason (the daemon died, say).
    pub(crate) fn wait_answering_while(
        &self,
        timeout: Duration,
        mut gave_up: impl FnMut() -> Option<String>,
        detail: impl FnOnce() -> String,
    ) -> Result<(), Error> {
        let mut last = String::new();
        let mut reason = None;
        let answered = tandem_testkit::poll(timeout, || {
            if let Some(r) = gave_up() {
                reason = Some(r);
                return Some(false);
            }
            let mut c = self.virsh_command(&["version"]);
            match run(&mut c, Duration::from_secs(10)) {
                Ok(out) if out.status.success() => Some(true),
                Ok(out) => {
                    last = String::from_utf8_lossy(&out.stderr).trim().to_string();
                    std::thread::sleep(Duration::from_millis(200));
                    None
                }
                Err(e) => {
                    last = e.to_string();
                    None
                }
            }
        });
        match answered {
            Some(true) => Ok(()),
            Some(false) => Err(Error::Daemon {
                uri: self.uri.clone(),
                message: format!(
                    "{}; last answer of `virsh version`: {last}{}",
                    reason.unwrap_or_default(),
                    detail()
                ),
            }),
            None => Err(Error::Timeout {
                what: format!("`virsh -c {} version` to answer", self.uri),
                timeout,
                detail: format!("; last answer: {last}{}", detail()),
            }),
        }
    }

    /// Destroys and undefines `tandem-test-PID-...` domains whose process
    /// PID no longer exists (left by a test run that was killed).
    fn remove_stale_domains(&self) {
        let Ok(domains) = self.domains() else { return };
        for name in domains {
            let Some(rest) = name.strip_prefix(DOMAIN_PREFIX) else {
                continue;
            };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = self.destroy_and_undefine(&name);
            }
        }
    }
}

/// Brings `qemu.conf` to [`QEMU_SETTINGS`]; true if it changed the file.
/// Lines that set one of those keys otherwise are commented out, and the
/// settings are appended in one marked block.
fn configure_qemu_conf() -> Result<bool, Error> {
    let path = Path::new(QEMU_CONF);
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        what: format!("cannot read {QEMU_CONF} (is libvirt-daemon-system installed?)"),
        source,
    })?;
    let (new, changed) = rewrite_qemu_conf(&text);
    if !changed {
        return Ok(false);
    }
    write_replacing(path, &new)?;
    Ok(true)
}

/// Writes `text` to `path` through a temporary file renamed over it.
pub(crate) fn write_replacing(path: &Path, text: &str) -> Result<(), Error> {
    let tmp = path.with_extension("conf.tandem-vmkit.tmp");
    std::fs::write(&tmp, text).map_err(|source| Error::Io {
        what: format!("cannot write {}", tmp.display()),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| Error::Io {
        what: format!("cannot replace {}", path.display()),
        source,
    })
}

/// The key and (whitespace-free) value an uncommented `key = value` line sets.
fn setting(line: &str) -> Option<(&str, String)> {
    let line = line.trim();
    if line.starts_with('#') {
        return None;
    }
    let (key, value) = line.split_once('=')?;
    let value: String = value.chars().filter(|c| !c.is_whitespace()).collect();
    Some((key.trim(), value))
}

/// `text` with [`QEMU_SETTINGS`] in force, and whether that changed it.
fn rewrite_qemu_conf(text: &str) -> (String, bool) {
    rewrite_qemu_conf_with(text, &QEMU_SETTINGS)
}

/// `text` with `settings` (key, value) in force, and whether that changed
/// it: lines setting one of those keys otherwise are commented out and the
/// settings appended in one marked block.
pub(crate) fn rewrite_qemu_conf_with(text: &str, settings: &[(&str, &str)]) -> (String, bool) {
    let wanted = |key: &str| settings.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let squash = |v: &str| v.chars().filter(|c| !c.is_whitespace()).collect::<String>();
    // The last setting of a key wins; check what is in force now.
    let mut current: Vec<(&str, String)> = Vec::new();
    for line in text.lines() {
        if let Some((key, value)) = setting(line) {
            if wanted(key).is_some() {
                current.retain(|(k, _)| *k != key);
                current.push((key, value));
            }
        }
    }
    let all_good = settings
        .iter()
        .all(|(key, value)| current.iter().any(|(k, v)| k == key && *v == squash(value)))
        && current
            .iter()
            .all(|(k, v)| wanted(k).is_some_and(|w| squash(w) == *v));
    if all_good {
        return (text.to_string(), false);
    }
    let mut out = String::with_capacity(text.len() + 256);
    for line in text.lines() {
        match setting(line) {
            Some((key, _)) if wanted(key).is_some() => {
                out.push_str("# (commented out by tandem-vmkit) ");
                out.push_str(line);
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out.push_str(MARK);
    out.push_str(": QEMU as root, no security driver, cgroups or namespaces (crates/vmkit)\n");
    for (key, value) in settings {
        out.push_str(&format!("{key} = {value}\n"));
    }
    (out, true)
}

/// The pid in `/run/NAME.pid`, if that process exists and is NAME.
fn daemon_pid(name: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(format!("/run/{name}.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == name).then_some(pid)
}

fn running(name: &str) -> bool {
    daemon_pid(name).is_some()
}

/// Starts `NAME -d` in its own session, with stdin/stdout/stderr on
/// /dev/null and every other inherited file descriptor closed (see
/// [`spawn_detached`]).
fn start_daemon(name: &str) -> Result<(), Error> {
    spawn_detached(
        &[name, "-d"],
        &[("LIBVIRT_LOG_OUTPUTS", &format!("3:file:{LIBVIRTD_LOG}"))],
        START_TIMEOUT,
    )?;
    let started = tandem_testkit::poll(START_TIMEOUT, || daemon_pid(name));
    match started {
        Some(_) => Ok(()),
        None => Err(Error::Timeout {
            what: format!("{name} to write /run/{name}.pid"),
            timeout: START_TIMEOUT,
            detail: format!("; see {LIBVIRTD_LOG}"),
        }),
    }
}

/// Runs `args` (a daemon that forks into the background, or a script
/// `exec`ing one) through `setsid` in a new session, from `/`, with
/// stdin/stdout/stderr on /dev/null and every other inherited file
/// descriptor closed, and waits (at most `timeout`) for that foreground
/// process to exit, successfully. A daemon that kept, say, the test
/// runner's pipe open would make it wait forever. (`Command::pre_exec`
/// would need `unsafe`; a shell does the closing.)
pub(crate) fn spawn_detached(
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<(), Error> {
    const CLOSE_FDS_AND_EXEC: &str = r#"
cd / || exit 1
for p in /proc/$$/fd/*; do
    fd=${p##*/}
    case $fd in 0|1|2) ;; *) eval "exec $fd>&-" ;; esac
done
exec setsid "$@" </dev/null >/dev/null 2>&1
"#;
    let mut c = Command::new("bash");
    c.arg("-c")
        .arg(CLOSE_FDS_AND_EXEC)
        .arg("tandem-vmkit")
        .args(args)
        .envs(env.iter().copied());
    run_ok(&mut c, timeout).map(|_| ())
}

/// Stops the running libvirtd (SIGTERM; running guests keep running and
/// are picked up again by the next libvirtd) and waits for it to exit.
fn stop_libvirtd() -> Result<(), Error> {
    let Some(pid) = daemon_pid("libvirtd") else {
        return Ok(());
    };
    run_ok(
        Command::new("kill").args(["-TERM", &pid.to_string()]),
        Duration::from_secs(10),
    )?;
    let gone = tandem_testkit::poll(START_TIMEOUT, || {
        (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    });
    gone.ok_or_else(|| Error::Timeout {
        what: format!("libvirtd (pid {pid}) to exit after SIGTERM"),
        timeout: START_TIMEOUT,
        detail: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_default_qemu_conf_gets_the_block_once() {
        let original = "# a comment\n#user = \"libvirt-qemu\"\n#cgroup_controllers = [ \"cpu\" ]\n";
        let (once, changed) = rewrite_qemu_conf(original);
        assert!(changed);
        assert!(once.starts_with(original));
        assert!(once.contains("user = \"root\"\n"));
        assert!(once.contains("cgroup_controllers = [ ]\n"));
        let (twice, changed) = rewrite_qemu_conf(&once);
        assert!(!changed, "{twice}");
        assert_eq!(once, twice);
    }

    #[test]
    fn a_conflicting_setting_is_commented_out() {
        let original = "user = \"qemu\"\nsecurity_driver=\"none\"\nother = 1\n";
        let (new, changed) = rewrite_qemu_conf(original);
        assert!(changed);
        assert!(new.contains("# (commented out by tandem-vmkit) user = \"qemu\""));
        assert!(new.contains("\nother = 1\n"));
        let (_, changed) = rewrite_qemu_conf(&new);
        assert!(!changed);
    }

    #[test]
    fn settings_already_in_force_leave_the_file_alone() {
        let original = "user=\"root\"\ngroup = \"root\"\nsecurity_driver = \"none\"\n\
                        cgroup_controllers = []\nnamespaces = [ ]\n";
        assert!(!rewrite_qemu_conf(original).1);
    }
}
