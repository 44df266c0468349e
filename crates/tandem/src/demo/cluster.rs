//! The demo's processes: one `tandem witness` and one `tandem agent` per
//! site, all children of the demo, on loopback ports, in one temporary
//! directory; their logs go to files there. Every wait is bounded and
//! names what did not happen, with the tail of the relevant logs.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tandem_agent::status::{GroupStatus, SiteStatus};

/// The demo's one group and its volume.
pub const GROUP: &str = "web01";
pub const VOLUME: &str = "web01-root";
pub const VOLUME_SIZE: u64 = 256 << 20;
pub const SITES: [&str; 3] = ["ny", "chicago", "seattle"];
/// Lines of a log shown when something goes wrong.
const TAIL_LINES: usize = 15;

/// One running (or stopped) child process with its log file.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
    /// Expected to be running: its exit is a failure.
    expected: bool,
}

impl Proc {
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
    pub name: String,
    pub config_path: PathBuf,
    pub config: tandem_config::Config,
    pub data_dir: PathBuf,
    pub api: String,
    pub proc: Proc,
}

impl Site {
    pub fn socket(&self) -> PathBuf {
        self.config.nbd_socket_path(VOLUME)
    }

    pub fn image(&self) -> PathBuf {
        self.config.volume_image_path(VOLUME)
    }

    /// The agent's status, or why there is none.
    pub fn status(&self) -> Result<SiteStatus> {
        let body = crate::cmd::status::api_get(&self.config, "/api/v1/status")?;
        serde_json::from_str(&body).context("the agent's status is not valid JSON")
    }

    /// The demo group's status on this site, if the agent answers.
    pub fn group(&self) -> Option<GroupStatus> {
        self.status()
            .ok()?
            .groups
            .into_iter()
            .find(|g| g.name == GROUP)
    }
}

pub struct Cluster {
    pub dir: PathBuf,
    pub witness_addr: String,
    pub witness: Proc,
    pub sites: Vec<Site>,
    exe: PathBuf,
    keep: bool,
    interrupted: Arc<AtomicBool>,
}

/// `n` distinct free loopback ports, outside the ephemeral range so that a
/// site restarted after its SIGKILL gets its ports back.
fn free_ports(n: usize) -> Result<Vec<u16>> {
    tandem_ports::loopback_ports(n).context("cannot find free loopback ports")
}

fn site_config(
    name: &str,
    data_dir: &Path,
    listen: u16,
    api: u16,
    witness: &str,
    peers: &str,
) -> String {
    format!(
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

{peers}
[[group]]
name = "{GROUP}"
primary = "ny"
replicas = [ {{ site = "chicago", priority = 1 }}, {{ site = "seattle", priority = 2 }} ]
mode = "async"
failover = "automatic"
volumes = [ {{ name = "{VOLUME}", size = "256MiB" }} ]
"#,
        data = data_dir.display(),
    )
}

impl Cluster {
    /// Writes the witness's and the sites' configuration in `dir`; starts
    /// nothing yet.
    pub fn new(dir: &Path, keep: bool, interrupted: Arc<AtomicBool>) -> Result<Cluster> {
        let exe = std::env::current_exe().context("cannot find the tandem binary itself")?;
        let ports = free_ports(1 + 2 * SITES.len())?;
        let witness_addr = format!("127.0.0.1:{}", ports[0]);
        let peers: String = SITES
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
        for (i, name) in SITES.iter().enumerate() {
            let (listen, api) = (ports[1 + 2 * i], ports[2 + 2 * i]);
            let data_dir = dir.join(name);
            let config_path = dir.join(format!("{name}.toml"));
            let text = site_config(name, &data_dir, listen, api, &witness_addr, &peers);
            std::fs::write(&config_path, text)
                .with_context(|| format!("cannot write {}", config_path.display()))?;
            let config = tandem_config::load(&config_path)
                .with_context(|| format!("the demo's own configuration for {name} is invalid"))?;
            sites.push(Site {
                name: name.to_string(),
                config_path,
                config,
                data_dir,
                api: format!("127.0.0.1:{api}"),
                proc: Proc {
                    name: format!("{name}'s agent"),
                    log: dir.join(format!("{name}.log")),
                    child: None,
                    expected: false,
                },
            });
        }
        Ok(Cluster {
            dir: dir.to_path_buf(),
            witness_addr,
            witness: Proc {
                name: "the witness".into(),
                log: dir.join("witness.log"),
                child: None,
                expected: false,
            },
            sites,
            exe,
            keep,
            interrupted,
        })
    }

    pub fn site(&self, name: &str) -> &Site {
        // Names come from SITES only.
        self.sites
            .iter()
            .find(|s| s.name == name)
            .unwrap_or(&self.sites[0])
    }

    fn site_index(&self, name: &str) -> usize {
        self.sites.iter().position(|s| s.name == name).unwrap_or(0)
    }

    fn command(&self, args: &[&std::ffi::OsStr], log: &Path) -> Result<Command> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open the log {}", log.display()))?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            // Its own process group: a Ctrl-C at the terminal reaches the
            // demo, which stops its children itself.
            .process_group(0);
        if std::env::var_os("TANDEM_LOG").is_none() && std::env::var_os("RUST_LOG").is_none() {
            cmd.env("TANDEM_LOG", "info");
        }
        if !self.keep {
            // SAFETY: prctl is async-signal-safe; nothing else runs here.
            unsafe {
                cmd.pre_exec(|| {
                    // Children die with the demo, whatever ends it.
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        Ok(cmd)
    }

    pub fn start_witness(&mut self) -> Result<()> {
        let data = self.dir.join("witness");
        let mut cmd = self.command(
            &[
                "witness".as_ref(),
                "--listen".as_ref(),
                self.witness_addr.as_ref(),
                "--data-dir".as_ref(),
                data.as_os_str(),
            ],
            &self.witness.log,
        )?;
        let child = cmd.spawn().context("cannot start the witness")?;
        self.witness.child = Some(child);
        self.witness.expected = true;
        let addr = self.witness_addr.clone();
        self.wait_for(
            "the witness to listen",
            Duration::from_secs(10),
            &[],
            |_| std::net::TcpStream::connect(&addr).is_ok().then_some(()),
        )
    }

    /// Starts a site's agent and waits until its API answers.
    pub fn start_site(&mut self, name: &str) -> Result<()> {
        let i = self.site_index(name);
        let config = self.sites[i].config_path.clone();
        let log = self.sites[i].proc.log.clone();
        let mut cmd = self.command(
            &["agent".as_ref(), "--config".as_ref(), config.as_os_str()],
            &log,
        )?;
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}'s agent"))?;
        self.sites[i].proc.child = Some(child);
        self.sites[i].proc.expected = true;
        self.wait_for(
            &format!("{name}'s API to answer"),
            Duration::from_secs(20),
            &[name],
            |c| c.sites[i].status().ok().map(|_| ()),
        )
    }

    /// SIGKILL of a site's agent, as a crash.
    pub fn kill_site(&mut self, name: &str) -> Result<()> {
        let i = self.site_index(name);
        let proc = &mut self.sites[i].proc;
        proc.expected = false;
        if let Some(mut child) = proc.child.take() {
            child
                .kill()
                .with_context(|| format!("cannot SIGKILL {name}'s agent"))?;
            let _ = child.wait();
        }
        Ok(())
    }

    pub fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::Acquire)
    }

    /// Fails if the user interrupted the demo or a child that should be
    /// running has exited.
    pub fn check(&mut self) -> Result<()> {
        if self.interrupted() {
            bail!("interrupted");
        }
        let procs =
            std::iter::once(&mut self.witness).chain(self.sites.iter_mut().map(|s| &mut s.proc));
        for p in procs {
            if !p.expected {
                continue;
            }
            if let Some(child) = p.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    p.expected = false;
                    bail!("{} exited unexpectedly ({status})\n{}", p.name, p.tail());
                }
            }
        }
        Ok(())
    }

    /// The tails of the logs of `sites` (and of the witness when empty).
    pub fn tails(&self, sites: &[&str]) -> String {
        if sites.is_empty() {
            return self.witness.tail();
        }
        sites.iter().map(|s| self.site(s).proc.tail()).collect()
    }

    /// Polls `probe` until it gives a value; fails after `timeout` naming
    /// `what` and showing the logs of `logs`.
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        logs: &[&str],
        mut probe: impl FnMut(&Cluster) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check()?;
            if let Some(v) = probe(self) {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(anyhow!(
                    "timed out after {} s waiting for {what}\n{}",
                    timeout.as_secs(),
                    self.tails(logs)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether any child is running.
    pub fn pids(&self) -> Vec<(String, u32)> {
        std::iter::once(&self.witness)
            .chain(self.sites.iter().map(|s| &s.proc))
            .filter_map(|p| p.pid().map(|pid| (p.name.clone(), pid)))
            .collect()
    }

    /// SIGTERM to every agent, then the witness; waits up to `timeout`
    /// for each group, then SIGKILLs stragglers. Returns the names of
    /// those that had to be killed.
    pub fn stop_all(&mut self, timeout: Duration) -> Vec<String> {
        let mut killed = Vec::new();
        let agents: Vec<&mut Proc> = self.sites.iter_mut().map(|s| &mut s.proc).collect();
        stop_procs(agents, timeout, &mut killed);
        stop_procs(vec![&mut self.witness], timeout, &mut killed);
        killed
    }

    /// Leaves the children running: forget them.
    pub fn detach(&mut self) {
        for p in
            std::iter::once(&mut self.witness).chain(self.sites.iter_mut().map(|s| &mut s.proc))
        {
            p.expected = false;
            p.child = None;
        }
    }
}

fn stop_procs(mut procs: Vec<&mut Proc>, timeout: Duration, killed: &mut Vec<String>) {
    for p in procs.iter_mut() {
        p.expected = false;
        if let Some(child) = p.child.as_ref() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: signalling our own child process, not yet reaped.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
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
                    killed.push(p.name.clone());
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
