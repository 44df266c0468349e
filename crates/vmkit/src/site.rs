//! A private libvirt daemon per simulated site: its own `libvirtd` and
//! `virtlogd` in a private mount namespace, with their own state, so two
//! sites on one machine can both have a domain `web01`, and one site's
//! libvirt can be down, or its host crash, while the others run.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;
use std::time::Duration;

use rustix::process::{kill_process, Pid, Signal};

use crate::libvirt::{rewrite_qemu_conf_with, spawn_detached, write_replacing, QEMU_SETTINGS};
use crate::{Error, Libvirt, QEMU_CONF};

/// Where [`SiteLibvirt::start`] puts each site's root:
/// `<SITES_DIR>/<test pid>-<n>-<label>/`. The first site started by a
/// process removes the roots here whose process is gone (killing what
/// still runs of them).
pub const SITES_DIR: &str = "/run/tandem-vmkit-sites";

/// The settings a site's `qemu.conf` gets: those [`Libvirt::ensure`]
/// enforces, and `stdio_handler = "file"`. With the default (`"logd"`)
/// QEMU's serial console file is written through virtlogd, so a guest's
/// console falls silent for good once virtlogd is killed (measured: no
/// ACK line after [`SiteLibvirt::stop_daemon`]); with `"file"` QEMU
/// writes it itself.
const SITE_QEMU_SETTINGS: [(&str, &str); 6] = [
    QEMU_SETTINGS[0],
    QEMU_SETTINGS[1],
    QEMU_SETTINGS[2],
    QEMU_SETTINGS[3],
    QEMU_SETTINGS[4],
    ("stdio_handler", "\"file\""),
];

/// The directories of a site's root bind-mounted over the system's in the
/// site's mount namespace: (directory under the root, mount point).
const BINDS: [(&str, &str); 5] = [
    ("run", "/run/libvirt"),
    ("etc", "/etc/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
];

/// The system's QEMU capabilities cache; copied into a new site (probing
/// QEMU anew costs a site daemon ~8 s before it answers, with the copy
/// ~0.2 s). libvirt checks each entry against the binary and host and
/// probes again when one is stale.
const CAPS_CACHE: &str = "/var/cache/libvirt/qemu/capabilities";

/// How long the daemons may take to start and answer `virsh version`
/// (probing QEMU without a cache takes ~8 s alone; several sites may
/// start at once on two cores).
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a daemon has to exit after SIGTERM before it gets SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(10);
/// How long processes have to vanish after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(20);
/// The longest Unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// One site's own libvirt daemon (`libvirtd` and `virtlogd`), running in a
/// private mount namespace over a root directory of its own; see the crate
/// docs (*One libvirt daemon per site*). Domains, QEMU processes, logs and
/// state of one site are invisible to the others and to the system daemon.
///
/// Dropping it kills (SIGKILL) every process of the site, its QEMUs
/// included (which is what `virsh destroy` does to them), and removes the
/// root, with every wait bounded; [`SiteLibvirt::remove`] does the same
/// and reports errors.
#[derive(Debug)]
pub struct SiteLibvirt {
    root: PathBuf,
    libvirt: Libvirt,
    /// Identity of `<root>/run`, which the site's processes see as
    /// `/run/libvirt`: how its processes are told from everyone else's.
    run_id: DirId,
    removed: bool,
}

impl SiteLibvirt {
    /// Starts a site daemon under a new root `<SITES_DIR>/<pid>-<n>-<label>`
    /// (see [`SiteLibvirt::start_at`]). The first call in a process first
    /// removes roots under [`SITES_DIR`] left by test processes that are
    /// gone, killing their daemons and QEMUs.
    pub fn start(label: &str) -> Result<SiteLibvirt, Error> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        remove_stale_sites_once();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let label: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(24)
            .collect();
        let root = Path::new(SITES_DIR).join(format!("{}-{seq}-{label}", std::process::id()));
        SiteLibvirt::start_at(&root)
    }

    /// Starts a site daemon whose state lives under `root` (which must not
    /// exist, or be empty; made absolute; its path must be short enough
    /// for the socket `<root>/run/libvirt-sock`, 107 bytes, and spelt with
    /// letters, digits and `/._-+` only, as it goes into the URI). Creates `run`, `etc`, `lib`,
    /// `log`, `cache` there; copies the top-level files of `/etc/libvirt`
    /// (the `*.conf`; no domain, network or hook definitions) into `etc`,
    /// with `qemu.conf` brought to the settings [`Libvirt::ensure`] needs
    /// plus `stdio_handler = "file"`; copies the system's QEMU
    /// capabilities cache; writes `owner` (this process's pid and start
    /// time) and starts the daemons ([`SiteLibvirt::restart_daemon`]).
    /// Returns once `virsh -c URI version` answers.
    ///
    /// A root outside [`SITES_DIR`] is not swept after a killed test run.
    pub fn start_at(root: &Path) -> Result<SiteLibvirt, Error> {
        let root = &std::path::absolute(root).map_err(|source| Error::Io {
            what: format!("cannot make {} absolute", root.display()),
            source,
        })?;
        let uri = uri_of(root);
        let socket = socket_of(root);
        let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+".contains(c);
        if !root.to_string_lossy().chars().all(plain) {
            return Err(Error::Daemon {
                uri,
                message: format!(
                    "the root {} has characters a URI would need escaped: \
                     use letters, digits and / . _ - + only",
                    root.display()
                ),
            });
        }
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(Error::Daemon {
                uri,
                message: format!(
                    "the socket path {} is longer than {MAX_SOCKET_PATH} bytes: choose a shorter root",
                    socket.display()
                ),
            });
        }
        match fs::read_dir(root) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(Error::Daemon {
                        uri,
                        message: format!("the root {} exists and is not empty", root.display()),
                    });
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Error::Io {
                    what: format!("cannot read {}", root.display()),
                    source,
                })
            }
        }
        for (dir, _) in BINDS {
            create_dir(&root.join(dir))?;
        }
        let run_id = dir_id(&root.join("run"))?;
        let site = SiteLibvirt {
            root: root.to_path_buf(),
            libvirt: Libvirt::with_uri(&uri),
            run_id,
            removed: false,
        };
        // From here on, dropping `site` on an error cleans up.
        write(&root.join("owner"), &owner_line(std::process::id()))?;
        site.populate_etc()?;
        copy_caps_cache(&root.join("cache/qemu/capabilities"));
        site.restart_daemon()?;
        Ok(site)
    }

    /// The site's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `qemu+unix:///system?socket=<root>/run/libvirt-sock`.
    pub fn uri(&self) -> &str {
        self.libvirt.uri()
    }

    /// A handle on this site's daemon, for [`crate::Guest::start`] and
    /// friends, `virsh` calls and domain states.
    pub fn libvirt(&self) -> &Libvirt {
        &self.libvirt
    }

    /// The daemon's socket, `<root>/run/libvirt-sock`.
    pub fn socket(&self) -> PathBuf {
        socket_of(&self.root)
    }

    /// libvirtd's log (warnings and errors), `<root>/log/libvirtd.log`.
    /// QEMU's own logs are in `<root>/log/qemu/<domain>.log`.
    pub fn libvirtd_log(&self) -> PathBuf {
        self.root.join("log/libvirtd.log")
    }

    /// Whether this site's libvirtd process exists.
    pub fn daemon_running(&self) -> Result<bool, Error> {
        Ok(self.processes()?.iter().any(|p| p.comm == "libvirtd"))
    }

    /// The pid of the QEMU running domain `name` on this site (from the
    /// pid file libvirt has QEMU write, `<root>/run/qemu/<name>.pid`),
    /// if that process is alive and this site's.
    pub fn qemu_pid(&self, name: &str) -> Option<u32> {
        let text = fs::read_to_string(self.root.join(format!("run/qemu/{name}.pid"))).ok()?;
        let pid: u32 = text.trim().parse().ok()?;
        let p = site_process(pid, self.run_id)?;
        p.comm.starts_with("qemu").then_some(pid)
    }

    /// The pids of this site's QEMU processes.
    pub fn qemu_pids(&self) -> Result<Vec<u32>, Error> {
        Ok(self
            .processes()?
            .into_iter()
            .filter(|p| p.comm.starts_with("qemu"))
            .map(|p| p.pid)
            .collect())
    }

    /// "libvirt is down on this host": stops this site's libvirtd and
    /// virtlogd (SIGTERM; SIGKILL after 10 s) and waits until they are
    /// gone. Running QEMUs go on (their consoles too: QEMU writes them
    /// itself). Fine if the daemons are not running.
    pub fn stop_daemon(&self) -> Result<(), Error> {
        let daemons: Vec<u32> = self
            .processes()?
            .into_iter()
            .filter(|p| p.comm == "libvirtd" || p.comm == "virtlogd")
            .map(|p| p.pid)
            .collect();
        if daemons.is_empty() {
            return Ok(());
        }
        signal(&daemons, Signal::TERM);
        if self.wait_gone(&daemons, TERM_GRACE)?.is_empty() {
            return Ok(());
        }
        signal(&daemons, Signal::KILL);
        let left = self.wait_gone(&daemons, KILL_WAIT)?;
        if left.is_empty() {
            Ok(())
        } else {
            Err(Error::Daemon {
                uri: self.uri().to_string(),
                message: format!("processes {left:?} outlived SIGTERM and SIGKILL"),
            })
        }
    }

    /// Starts this site's daemons again (stopping them first if they run)
    /// and returns once `virsh version` answers. Each start is a new mount
    /// namespace over the same root; libvirtd finds the QEMUs still
    /// running (their pid files and monitor sockets are in the root) and
    /// lists their domains as running; domains whose QEMU is gone (after
    /// [`SiteLibvirt::crash_host`]) are shut off.
    pub fn restart_daemon(&self) -> Result<(), Error> {
        self.stop_daemon()?;
        let script = site_script();
        let root = self.root.to_string_lossy().into_owned();
        spawn_detached(
            &[
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "bash",
                "-c",
                &script,
                "tandem-vmkit-site",
                &root,
            ],
            &[],
            START_TIMEOUT,
        )
        .map_err(|e| Error::Daemon {
            uri: self.uri().to_string(),
            message: format!("starting the daemons: {e}{}", self.log_tails()),
        })?;
        self.libvirt.wait_answering_while(
            START_TIMEOUT,
            || match self.daemon_running() {
                Ok(true) => None,
                Ok(false) => Some("libvirtd exited".to_string()),
                Err(e) => Some(e.to_string()),
            },
            || self.log_tails(),
        )
    }

    /// "The host lost power": SIGKILLs every process of this site, the
    /// daemons first (so libvirtd records nothing), then its QEMUs, waits
    /// until they are gone, and empties `<root>/run` (on a real host a
    /// tmpfs: pid files, domain status, sockets are gone after a reboot).
    /// Guests stop at once, mid-write. The daemons stay down; after
    /// [`SiteLibvirt::restart_daemon`] ("the host came back") the site's
    /// defined domains are shut off, and those marked autostart start.
    pub fn crash_host(&self) -> Result<(), Error> {
        self.kill_everything()?;
        let run = self.root.join("run");
        let entries = fs::read_dir(&run).map_err(|source| Error::Io {
            what: format!("cannot read {}", run.display()),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.map_err(|source| Error::Io {
                what: format!("cannot remove {}", path.display()),
                source,
            })?;
        }
        Ok(())
    }

    /// SIGKILLs every process of this site, daemons first, until none is
    /// left (bounded).
    fn kill_everything(&self) -> Result<(), Error> {
        let mut last = Vec::new();
        let mut error = None;
        let gone = tandem_testkit::poll(KILL_WAIT, || {
            let procs = match self.processes() {
                Ok(p) => p,
                Err(e) => {
                    error = Some(e);
                    return Some(());
                }
            };
            if procs.is_empty() {
                return Some(());
            }
            let (daemons, others): (Vec<_>, Vec<_>) = procs
                .iter()
                .partition(|p| p.comm == "libvirtd" || p.comm == "virtlogd");
            let daemons: Vec<u32> = daemons.iter().map(|p| p.pid).collect();
            let others: Vec<u32> = others.iter().map(|p| p.pid).collect();
            signal(&daemons, Signal::KILL);
            signal(&others, Signal::KILL);
            last = procs;
            None
        });
        if let Some(e) = error {
            return Err(e);
        }
        gone.ok_or_else(|| Error::Daemon {
            uri: self.uri().to_string(),
            message: format!("processes outlived SIGKILL for {KILL_WAIT:?}: {last:?}"),
        })
    }

    /// Kills every process of this site (as [`SiteLibvirt::crash_host`]) and
    /// removes its root: what dropping it does, with errors reported.
    pub fn remove(mut self) -> Result<(), Error> {
        self.removed = true;
        self.teardown()
    }

    /// Leaves the site running when this handle goes (`tandem demo --vm
    /// --keep`): its daemons and QEMUs go on, and its root stays, until
    /// someone kills them, or until the first [`SiteLibvirt::start`] of
    /// another process sweeps the root once this process is gone
    /// ([`SiteLibvirt::remove_stale_sites`]). Returns the root.
    pub fn leave_running(mut self) -> PathBuf {
        self.removed = true;
        std::mem::take(&mut self.root)
    }

    /// Removes the roots under [`SITES_DIR`] whose test process is gone,
    /// after killing what still runs of them (daemons, QEMUs). Done once
    /// per process by the first [`SiteLibvirt::start`]; errors are ignored
    /// (it is a sweep).
    pub fn remove_stale_sites() {
        let Ok(entries) = fs::read_dir(SITES_DIR) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if owner_alive(&path) {
                continue;
            }
            if let Ok(id) = dir_id(&path.join("run")) {
                let _ = kill_all(id, KILL_WAIT);
            }
            let _ = fs::remove_dir_all(&path);
        }
    }

    fn teardown(&mut self) -> Result<(), Error> {
        self.kill_everything()?;
        fs::remove_dir_all(&self.root).map_err(|source| Error::Io {
            what: format!("cannot remove {}", self.root.display()),
            source,
        })
    }

    fn processes(&self) -> Result<Vec<SiteProcess>, Error> {
        site_processes(self.run_id)
    }

    /// Waits until none of `pids` is a process of this site; returns those
    /// still there after `timeout`.
    fn wait_gone(&self, pids: &[u32], timeout: Duration) -> Result<Vec<u32>, Error> {
        let mut left = pids.to_vec();
        let mut error = None;
        tandem_testkit::poll(timeout, || match self.processes() {
            Ok(procs) => {
                left.retain(|pid| procs.iter().any(|p| p.pid == *pid));
                left.is_empty().then_some(())
            }
            Err(e) => {
                error = Some(e);
                Some(())
            }
        });
        match error {
            Some(e) => Err(e),
            None => Ok(left),
        }
    }

    /// `etc/`: the top-level files of `/etc/libvirt` (the `*.conf`) and a
    /// `qemu.conf` with [`SITE_QEMU_SETTINGS`].
    fn populate_etc(&self) -> Result<(), Error> {
        let etc = self.root.join("etc");
        let system = Path::new("/etc/libvirt");
        let entries = fs::read_dir(system).map_err(|source| Error::Io {
            what: "cannot read /etc/libvirt (is libvirt-daemon-system installed?)".into(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| Error::Io {
                what: "cannot read /etc/libvirt".into(),
                source,
            })?;
            let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
            if !is_file {
                continue;
            }
            let to = etc.join(entry.file_name());
            fs::copy(entry.path(), &to).map_err(|source| Error::Io {
                what: format!("cannot copy {} to {}", entry.path().display(), to.display()),
                source,
            })?;
        }
        let conf = etc.join("qemu.conf");
        let text = match fs::read_to_string(&conf) {
            Ok(t) => t,
            Err(e) if e.kind() == ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(Error::Io {
                    what: format!("cannot read {} (a copy of {QEMU_CONF})", conf.display()),
                    source,
                })
            }
        };
        let (text, _) = rewrite_qemu_conf_with(&text, &SITE_QEMU_SETTINGS);
        write_replacing(&conf, &text)
    }

    /// The last lines of the daemons' logs, for error messages.
    fn log_tails(&self) -> String {
        let mut s = String::new();
        for name in ["start.log", "libvirtd.log", "virtlogd.log"] {
            let path = self.root.join("log").join(name);
            let Ok(text) = fs::read_to_string(&path) else {
                continue;
            };
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(15);
            if lines.is_empty() {
                continue;
            }
            s.push_str(&format!(
                "\n--- {} (last lines):\n{}",
                path.display(),
                lines[start..].join("\n")
            ));
        }
        s
    }
}

impl Drop for SiteLibvirt {
    fn drop(&mut self) {
        if !self.removed {
            self.removed = true;
            let _ = self.teardown();
        }
    }
}

/// The connection URI of a site daemon with root `root`.
fn uri_of(root: &Path) -> String {
    format!("qemu+unix:///system?socket={}", socket_of(root).display())
}

fn socket_of(root: &Path) -> PathBuf {
    root.join("run/libvirt-sock")
}

/// The script run (by `bash`) in the site's new mount namespace: bind
/// the root's directories over the system's, then start virtlogd and
/// `exec` libvirtd (both fork into the background, with their pid files
/// and logs in the root; the namespace lives as long as they or their
/// QEMUs do). Its own errors go to `<root>/log/start.log`.
fn site_script() -> String {
    let mut s =
        String::from("set -e\nR=$1\nexec 2>>\"$R/log/start.log\" >&2\nmount --make-rprivate /\n");
    for (dir, mount_point) in BINDS {
        // A fresh machine may lack a mount point (/run/libvirt exists
        // only once a system libvirtd ran).
        s.push_str(&format!(
            "mkdir -p {mount_point}\nmount --bind \"$R/{dir}\" {mount_point}\n"
        ));
    }
    s.push_str(
        "LIBVIRT_LOG_OUTPUTS=\"3:file:$R/log/virtlogd.log\" virtlogd -d -p \"$R/virtlogd.pid\"\n\
         LIBVIRT_LOG_OUTPUTS=\"3:file:$R/log/libvirtd.log\" exec libvirtd -d -p \"$R/libvirtd.pid\"\n",
    );
    s
}

fn create_dir(path: &Path) -> Result<(), Error> {
    fs::create_dir_all(path).map_err(|source| Error::Io {
        what: format!("cannot create {}", path.display()),
        source,
    })
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    fs::write(path, text).map_err(|source| Error::Io {
        what: format!("cannot write {}", path.display()),
        source,
    })
}

/// Copies the system's QEMU capabilities cache into `to` (best effort: it
/// only saves time).
fn copy_caps_cache(to: &Path) {
    let Ok(entries) = fs::read_dir(CAPS_CACHE) else {
        return;
    };
    if fs::create_dir_all(to).is_err() {
        return;
    }
    for entry in entries.flatten() {
        let _ = fs::copy(entry.path(), to.join(entry.file_name()));
    }
}

fn remove_stale_sites_once() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(SiteLibvirt::remove_stale_sites);
}

/// `<pid> <start time>` of process `pid`, for a root's `owner` file.
fn owner_line(pid: u32) -> String {
    format!("{pid} {}\n", start_time(pid).unwrap_or(0))
}

/// Whether the test process that made the site root `path` still runs:
/// the pid and start time in its `owner` file (or, without one, the pid
/// its name begins with) name a live process. This process counts as
/// alive, so its own sites are never swept.
fn owner_alive(path: &Path) -> bool {
    let text = fs::read_to_string(path.join("owner")).unwrap_or_default();
    let mut words = text.split_whitespace();
    let mut pid = words.next().and_then(|w| w.parse::<u32>().ok());
    let mut started = words.next().and_then(|w| w.parse::<u64>().ok());
    if pid.is_none() {
        // No owner file yet (or one being written): the pid in the name.
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        pid = name.and_then(|n| n.split('-').next().and_then(|p| p.parse::<u32>().ok()));
        started = None;
    }
    let Some(pid) = pid else {
        return false;
    };
    if pid == std::process::id() {
        return true;
    }
    match (start_time(pid), started) {
        (None, _) => false,
        (Some(now), Some(then)) if then != 0 => now == then,
        (Some(_), _) => true,
    }
}

/// A process's start time (clock ticks after boot; field 22 of
/// `/proc/PID/stat`), if it exists and is not a zombie.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain
    // anything; count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// A directory's identity (device and inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DirId {
    dev: u64,
    ino: u64,
}

fn dir_id(path: &Path) -> Result<DirId, Error> {
    let m = fs::metadata(path).map_err(|source| Error::Io {
        what: format!("cannot stat {}", path.display()),
        source,
    })?;
    Ok(DirId {
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// A process of a site.
#[derive(Debug, Clone)]
struct SiteProcess {
    pid: u32,
    comm: String,
}

/// Process `pid`, if it is one of the site whose `run` directory is `id`:
/// its `/run/libvirt`, looked up through its own root and mount namespace
/// (`/proc/PID/root/run/libvirt`), is that directory. This finds the
/// daemons and every QEMU they started, in whichever of the site's
/// namespaces (one per daemon start), and nothing else: zombies and
/// other processes do not match.
fn site_process(pid: u32, id: DirId) -> Option<SiteProcess> {
    let m = fs::metadata(format!("/proc/{pid}/root/run/libvirt")).ok()?;
    if m.dev() != id.dev || m.ino() != id.ino {
        return None;
    }
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(SiteProcess {
        pid,
        comm: comm.trim().to_string(),
    })
}

/// Every process of the site whose `run` directory is `id`.
fn site_processes(id: DirId) -> Result<Vec<SiteProcess>, Error> {
    let entries = fs::read_dir("/proc").map_err(|source| Error::Io {
        what: "cannot read /proc".into(),
        source,
    })?;
    Ok(entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter_map(|pid| site_process(pid, id))
        .collect())
}

/// Sends `sig` to each of `pids` (a process already gone is fine).
fn signal(pids: &[u32], sig: Signal) {
    for &pid in pids {
        if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
            let _ = kill_process(pid, sig);
        }
    }
}

/// SIGKILLs every process of the site whose `run` directory is `id` until
/// none is left, for at most `timeout`; true if none is.
fn kill_all(id: DirId, timeout: Duration) -> Result<bool, Error> {
    let mut error = None;
    let done = tandem_testkit::poll(timeout, || match site_processes(id) {
        Ok(procs) if procs.is_empty() => Some(()),
        Ok(procs) => {
            let pids: Vec<u32> = procs.iter().map(|p| p.pid).collect();
            signal(&pids, Signal::KILL);
            None
        }
        Err(e) => {
            error = Some(e);
            Some(())
        }
    });
    match error {
        Some(e) => Err(e),
        None => Ok(done.is_some()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_binds_every_directory_and_starts_both_daemons() {
        let s = site_script();
        for (dir, mount_point) in BINDS {
            assert!(
                s.contains(&format!("mount --bind \"$R/{dir}\" {mount_point}\n")),
                "{s}"
            );
        }
        assert!(s.contains("virtlogd -d -p \"$R/virtlogd.pid\""), "{s}");
        assert!(s.contains("exec libvirtd -d -p \"$R/libvirtd.pid\""), "{s}");
    }

    #[test]
    fn roots_that_cannot_make_a_uri_or_socket_are_refused() {
        let long = format!("/var/tmp/{}", "x".repeat(100));
        for root in ["/var/tmp/a b", "/var/tmp/a?b", long.as_str()] {
            match SiteLibvirt::start_at(Path::new(root)) {
                Err(Error::Daemon { message, .. }) => {
                    assert!(!Path::new(root).exists(), "{root} was created: {message}")
                }
                other => panic!("{root}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_uri_names_the_socket_in_the_root() {
        assert_eq!(
            uri_of(Path::new("/run/x/1-0-a")),
            "qemu+unix:///system?socket=/run/x/1-0-a/run/libvirt-sock"
        );
    }

    #[test]
    fn site_qemu_conf_has_the_system_settings_and_file_stdio() {
        let (text, changed) = rewrite_qemu_conf_with("#user = \"x\"\n", &SITE_QEMU_SETTINGS);
        assert!(changed);
        for line in [
            "user = \"root\"",
            "group = \"root\"",
            "security_driver = \"none\"",
            "cgroup_controllers = [ ]",
            "namespaces = [ ]",
            "stdio_handler = \"file\"",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }

    #[test]
    fn without_an_owner_file_the_pid_in_the_name_counts() {
        let parent =
            std::env::temp_dir().join(format!("tandem-vmkit-names-{}", std::process::id()));
        let mine = parent.join(format!("{}-0-x", std::process::id()));
        let gone = parent.join(format!("{}-0-x", u32::MAX));
        let unnamed = parent.join("x");
        for d in [&mine, &gone, &unnamed] {
            fs::create_dir_all(d).expect("dir");
        }
        fs::write(mine.join("owner"), "").expect("an owner file being written");
        assert!(owner_alive(&mine));
        assert!(!owner_alive(&gone));
        assert!(!owner_alive(&unnamed));
        fs::remove_dir_all(&parent).expect("cleanup");
    }

    #[test]
    fn this_process_owns_its_roots_and_a_dead_pid_does_not() {
        let dir = std::env::temp_dir().join(format!("tandem-vmkit-owner-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("dir");
        fs::write(dir.join("owner"), owner_line(std::process::id())).expect("owner");
        assert!(owner_alive(&dir));
        // Pid 1 exists but did not start at this time.
        fs::write(dir.join("owner"), "1 12345678901\n").expect("owner");
        assert!(!owner_alive(&dir));
        fs::write(dir.join("owner"), format!("{} 0\n", u32::MAX)).expect("owner");
        assert!(!owner_alive(&dir));
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
