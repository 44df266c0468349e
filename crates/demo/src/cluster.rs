//! The demo's processes: one `tandem witness` and one `tandem agent` per
//! site, all children of the demo, on loopback ports, in one directory;
//! their logs go to files there. Every wait is bounded and names what did
//! not happen, with the tail of the relevant logs.

use std::ffi::OsStr;
use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use tandem_agent::status::{GroupStatus, SiteStatus};

use crate::api::{self, ApiError};
use crate::error::{DemoError, Wait};

/// The demo's one group and its volume.
pub const GROUP: &str = "web01";
pub const VOLUME: &str = "web01-root";
pub const VOLUME_SIZE: u64 = 256 << 20;
/// Lines of a log shown when something goes wrong.
const TAIL_LINES: usize = 15;
/// How the demo asks the processes it starts to die with it: its own
/// process id (see [`bind_to_demo`]).
const PARENT_ENV: &str = "TANDEM_DEMO_PARENT";

/// The demo's three sites.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SiteName {
    Ny,
    Chicago,
    Seattle,
}

impl SiteName {
    /// In the group's failover order: primary, then replicas by priority.
    pub const ALL: [SiteName; 3] = [SiteName::Ny, SiteName::Chicago, SiteName::Seattle];

    pub fn as_str(self) -> &'static str {
        match self {
            SiteName::Ny => "ny",
            SiteName::Chicago => "chicago",
            SiteName::Seattle => "seattle",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for SiteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One of the demo's processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcName {
    Witness,
    Agent(SiteName),
}

impl fmt::Display for ProcName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProcName::Witness => write!(f, "the witness"),
            ProcName::Agent(site) => write!(f, "{site}'s agent"),
        }
    }
}

/// First thing in the `tandem` executable's `main`, before any other
/// thread starts (it changes the process's environment): when a demo
/// started this process to live only as long as the demo (no `--keep`),
/// asks the kernel to SIGKILL it when the demo ends, whatever ends it.
/// Returns `false` if the demo has already ended: then exit at once.
pub fn bind_to_demo() -> io::Result<bool> {
    let Some(value) = std::env::var_os(PARENT_ENV) else {
        return Ok(true);
    };
    // Not for this process's own children (hooks and the tools they run).
    std::env::remove_var(PARENT_ENV);
    let Some(demo) = value.to_str().and_then(|v| v.parse::<u32>().ok()) else {
        return Ok(true);
    };
    rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
    // A demo that ended before the line above sends nothing: this process
    // has been handed to another parent by then.
    Ok(std::os::unix::process::parent_id() == demo)
}

/// One running (or stopped) child process with its log file.
pub struct Proc {
    pub name: ProcName,
    pub log: PathBuf,
    child: Option<Child>,
    /// Expected to be running: its exit is a failure.
    expected: bool,
}

impl Proc {
    fn new(name: ProcName, log: PathBuf) -> Proc {
        Proc {
            name,
            log,
            child: None,
            expected: false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last lines of its log.
    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(TAIL_LINES);
        let mut out = format!(
            "--- last lines of {} ({}) ---\n",
            self.name,
            self.log.display()
        );
        for l in &lines[from..] {
            out.push_str(l);
            out.push('\n');
        }
        out
    }
}

/// A site: its configuration and agent.
pub struct Site {
    pub name: SiteName,
    pub config_path: PathBuf,
    pub config: tandem_config::Config,
    pub data_dir: PathBuf,
    /// The agent's API address (host:port).
    pub api: String,
    pub proc: Proc,
}

impl Site {
    /// The volume's NBD socket.
    pub fn socket(&self) -> PathBuf {
        self.config.nbd_socket_path(VOLUME)
    }

    /// The volume's raw image.
    pub fn image(&self) -> PathBuf {
        self.config.volume_image_path(VOLUME)
    }

    /// The agent's status.
    pub fn status(&self) -> Result<SiteStatus, ApiError> {
        api::status(&self.config)
    }

    /// The demo group's status on this site.
    pub fn group(&self) -> Result<GroupStatus, ApiError> {
        self.status()?
            .groups
            .into_iter()
            .find(|g| g.name == GROUP)
            .ok_or(ApiError::NoGroup { group: GROUP })
    }
}

/// The witness and the three sites.
pub struct Cluster {
    dir: PathBuf,
    witness_addr: String,
    witness: Proc,
    /// In the order of [`SiteName::ALL`].
    sites: Vec<Site>,
    exe: PathBuf,
    keep: bool,
    interrupted: Arc<AtomicBool>,
}

fn site_config(
    name: SiteName,
    data_dir: &Path,
    listen: u16,
    api: u16,
    witness: &str,
    peers: &str,
    libvirt: Option<&str>,
) -> String {
    let mut text = format!(
        r#"# Written by `tandem demo`.
[site]
name = "{name}"
data_dir = "{data}"
listen = "127.0.0.1:{listen}"
api = "127.0.0.1:{api}"

[tls]
mode = "off"            # every address is loopback

[coordinator]
kind = "witness"
endpoints = ["{witness}"]
lease_ttl = "3s"

{peers}"#,
        data = data_dir.display(),
    );
    match libvirt {
        // `tandem demo --vm`: no group yet (`tandem protect` makes one),
        // and this site's own libvirt daemon.
        Some(uri) => text.push_str(&format!(
            "[libvirt]\nuri = \"{uri}\"   # this site's own libvirt daemon\n"
        )),
        None => text.push_str(&format!(
            r#"[[group]]
name = "{GROUP}"
primary = "ny"
replicas = [ {{ site = "chicago", priority = 1 }}, {{ site = "seattle", priority = 2 }} ]
mode = "async"
failover = "automatic"
volumes = [ {{ name = "{VOLUME}", size = "256MiB" }} ]
"#
        )),
    }
    text
}

impl Cluster {
    /// Writes the witness's and the sites' configuration in `dir`; starts
    /// nothing yet. `exe` is the `tandem` executable to run them with.
    /// Unless `keep`, every process dies with this one. The user's request
    /// to stop (`interrupted`) ends every wait.
    pub fn new(
        dir: &Path,
        exe: PathBuf,
        keep: bool,
        interrupted: Arc<AtomicBool>,
    ) -> Result<Cluster, DemoError> {
        Cluster::build(dir, exe, keep, interrupted, None)
    }

    /// [`Cluster::new`] for `tandem demo --vm`: no group (the demo's
    /// `tandem protect` defines one), and each site's `[libvirt] uri` the
    /// one given for it, in the order of [`SiteName::ALL`].
    pub fn with_libvirt(
        dir: &Path,
        exe: PathBuf,
        keep: bool,
        interrupted: Arc<AtomicBool>,
        uris: [&str; 3],
    ) -> Result<Cluster, DemoError> {
        Cluster::build(dir, exe, keep, interrupted, Some(uris))
    }

    fn build(
        dir: &Path,
        exe: PathBuf,
        keep: bool,
        interrupted: Arc<AtomicBool>,
        uris: Option<[&str; 3]>,
    ) -> Result<Cluster, DemoError> {
        // Outside the ephemeral range, so that a site restarted after its
        // SIGKILL gets its ports back.
        let ports =
            tandem_ports::loopback_ports(1 + 2 * SiteName::ALL.len()).map_err(DemoError::Ports)?;
        let witness_addr = format!("127.0.0.1:{}", ports[0]);
        let peers: String = SiteName::ALL
            .iter()
            .enumerate()
            .map(|(i, n)| {
                format!(
                    "[[peer]]\nname = \"{n}\"\naddress = \"127.0.0.1:{}\"\n\n",
                    ports[1 + 2 * i]
                )
            })
            .collect();
        let mut sites = Vec::new();
        for (i, name) in SiteName::ALL.into_iter().enumerate() {
            let (listen, api) = (ports[1 + 2 * i], ports[2 + 2 * i]);
            let data_dir = dir.join(name.as_str());
            let config_path = dir.join(format!("{name}.toml"));
            let libvirt = uris.map(|u| u[i]);
            let text = site_config(name, &data_dir, listen, api, &witness_addr, &peers, libvirt);
            std::fs::write(&config_path, text).map_err(|source| DemoError::WriteConfig {
                path: config_path.clone(),
                source,
            })?;
            let config = tandem_config::load(&config_path)
                .map_err(|source| DemoError::Config { site: name, source })?;
            sites.push(Site {
                name,
                config_path,
                config,
                data_dir,
                api: format!("127.0.0.1:{api}"),
                proc: Proc::new(ProcName::Agent(name), dir.join(format!("{name}.log"))),
            });
        }
        Ok(Cluster {
            dir: dir.to_path_buf(),
            witness_addr,
            witness: Proc::new(ProcName::Witness, dir.join("witness.log")),
            sites,
            exe,
            keep,
            interrupted,
        })
    }

    /// The directory holding configurations, data and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The witness's address (host:port).
    pub fn witness_addr(&self) -> &str {
        &self.witness_addr
    }

    pub fn witness(&self) -> &Proc {
        &self.witness
    }

    /// The three sites, in the order of [`SiteName::ALL`].
    pub fn sites(&self) -> &[Site] {
        &self.sites
    }

    pub fn site(&self, name: SiteName) -> &Site {
        &self.sites[name.index()]
    }

    fn command(&self, args: &[&OsStr], log: &Path) -> Result<Command, DemoError> {
        let open_log = |source| DemoError::OpenLog {
            path: log.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(open_log)?;
        let stdout = file.try_clone().map_err(open_log)?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(file)
            // Its own process group: a Ctrl-C at the terminal reaches the
            // demo, which stops its children itself.
            .process_group(0);
        if std::env::var_os("TANDEM_LOG").is_none() && std::env::var_os("RUST_LOG").is_none() {
            cmd.env("TANDEM_LOG", "info");
        }
        if self.keep {
            cmd.env_remove(PARENT_ENV);
        } else {
            // Children die with the demo, whatever ends it (bind_to_demo).
            cmd.env(PARENT_ENV, std::process::id().to_string());
        }
        Ok(cmd)
    }

    fn spawn(&self, proc: ProcName, args: &[&OsStr], log: &Path) -> Result<Child, DemoError> {
        self.command(args, log)?
            .spawn()
            .map_err(|source| DemoError::Spawn {
                proc,
                exe: self.exe.clone(),
                source,
            })
    }

    /// Starts the witness and waits until it listens.
    pub fn start_witness(&mut self) -> Result<(), DemoError> {
        let data = self.dir.join("witness");
        // Every address is loopback and the sites run with TLS off.
        let args: [&OsStr; 7] = [
            "witness".as_ref(),
            "--listen".as_ref(),
            self.witness_addr.as_ref(),
            "--data-dir".as_ref(),
            data.as_os_str(),
            "--tls".as_ref(),
            "off".as_ref(),
        ];
        let child = self.spawn(ProcName::Witness, &args, &self.witness.log)?;
        self.witness.child = Some(child);
        self.witness.expected = true;
        let addr = self.witness_addr.clone();
        self.wait_for(Wait::WitnessListening, Duration::from_secs(10), &[], |_| {
            std::net::TcpStream::connect(&addr).is_ok().then_some(())
        })
    }

    /// Starts (or restarts) a site's agent and waits until its API answers.
    pub fn start_site(&mut self, name: SiteName) -> Result<(), DemoError> {
        let i = name.index();
        let config = self.sites[i].config_path.clone();
        let args: [&OsStr; 3] = ["agent".as_ref(), "--config".as_ref(), config.as_os_str()];
        let child = self.spawn(ProcName::Agent(name), &args, &self.sites[i].proc.log)?;
        self.sites[i].proc.child = Some(child);
        self.sites[i].proc.expected = true;
        self.wait_for(
            Wait::ApiAnswers(name),
            Duration::from_secs(20),
            &[name],
            |c| c.sites[i].status().ok().map(|_| ()),
        )
    }

    /// SIGKILL of a site's agent, as a crash.
    pub fn kill_site(&mut self, name: SiteName) -> Result<(), DemoError> {
        let proc = &mut self.sites[name.index()].proc;
        proc.expected = false;
        if let Some(mut child) = proc.child.take() {
            child.kill().map_err(|source| DemoError::Kill {
                proc: proc.name,
                source,
            })?;
            let _ = child.wait();
        }
        Ok(())
    }

    /// Whether the user asked the demo to stop.
    pub fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::Acquire)
    }

    /// Fails if the user interrupted the demo or a child that should be
    /// running has exited.
    pub fn check(&mut self) -> Result<(), DemoError> {
        if self.interrupted() {
            return Err(DemoError::Interrupted);
        }
        for p in self.procs_mut() {
            if !p.expected {
                continue;
            }
            if let Some(child) = p.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    p.expected = false;
                    return Err(DemoError::Exited {
                        proc: p.name,
                        status,
                        tail: p.tail(),
                    });
                }
            }
        }
        Ok(())
    }

    fn procs(&self) -> impl Iterator<Item = &Proc> {
        std::iter::once(&self.witness).chain(self.sites.iter().map(|s| &s.proc))
    }

    fn procs_mut(&mut self) -> impl Iterator<Item = &mut Proc> {
        std::iter::once(&mut self.witness).chain(self.sites.iter_mut().map(|s| &mut s.proc))
    }

    /// The tails of the logs of `sites` (and of the witness when empty).
    pub fn tails(&self, sites: &[SiteName]) -> String {
        if sites.is_empty() {
            return self.witness.tail();
        }
        sites.iter().map(|s| self.site(*s).proc.tail()).collect()
    }

    /// Polls `probe` until it gives a value; fails after `timeout` naming
    /// `what` and showing the logs of `logs`, or as soon as [`check`]
    /// fails.
    ///
    /// [`check`]: Cluster::check
    pub fn wait_for<T>(
        &mut self,
        what: Wait,
        timeout: Duration,
        logs: &[SiteName],
        mut probe: impl FnMut(&Cluster) -> Option<T>,
    ) -> Result<T, DemoError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check()?;
            if let Some(v) = probe(self) {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(DemoError::Timeout {
                    what,
                    timeout,
                    logs: self.tails(logs),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The running children and their process ids.
    pub fn pids(&self) -> Vec<(ProcName, u32)> {
        self.procs()
            .filter_map(|p| p.pid().map(|pid| (p.name, pid)))
            .collect()
    }

    /// SIGTERM to every agent, then the witness; waits up to `timeout`
    /// for each group, then SIGKILLs stragglers. Returns those that had
    /// to be killed.
    pub fn stop_all(&mut self, timeout: Duration) -> Vec<ProcName> {
        let mut killed = Vec::new();
        let agents: Vec<&mut Proc> = self.sites.iter_mut().map(|s| &mut s.proc).collect();
        stop_procs(agents, timeout, &mut killed);
        stop_procs(vec![&mut self.witness], timeout, &mut killed);
        killed
    }

    /// Leaves the children running: forgets them.
    pub fn detach(&mut self) {
        for p in self.procs_mut() {
            p.expected = false;
            p.child = None;
        }
    }
}

fn stop_procs(mut procs: Vec<&mut Proc>, timeout: Duration, killed: &mut Vec<ProcName>) {
    for p in procs.iter_mut() {
        p.expected = false;
        if let Some(child) = p.child.as_ref() {
            // Our own child, not yet reaped: the id is still its own. One
            // that has exited already cannot be signalled, which is fine.
            let _ = rustix::process::kill_process(Pid::from_child(child), Signal::TERM);
        }
    }
    let deadline = Instant::now() + timeout;
    loop {
        let mut running = false;
        for p in procs.iter_mut() {
            if let Some(child) = p.child.as_mut() {
                match child.try_wait() {
                    Ok(None) => running = true,
                    _ => p.child = None,
                }
            }
        }
        if !running {
            return;
        }
        if Instant::now() >= deadline {
            for p in procs.iter_mut() {
                if let Some(mut child) = p.child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                    killed.push(p.name);
                }
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Whatever path ends the demo, no child is left behind unless
        // it was detached (--keep).
        let _ = self.stop_all(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_are_indexed_in_failover_order() {
        for (i, site) in SiteName::ALL.into_iter().enumerate() {
            assert_eq!(site.index(), i, "{site}");
        }
        assert_eq!(format!("[{:<8}]", SiteName::Ny), "[ny      ]");
        assert_eq!(
            ProcName::Agent(SiteName::Chicago).to_string(),
            "chicago's agent"
        );
    }
}
