//! Test harness: runs real `tandem agent` processes in temporary data
//! directories, and real NBD clients against them. A missing tool fails the
//! test (scripts/test installs them); every wait is bounded.
#![allow(dead_code)]
#![allow(clippy::cast_possible_truncation)] // pattern bytes keep the low bits on purpose

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use rustix::process::{kill_process, Pid, Signal};
pub use tandem_testkit::{poll, run_with_timeout, wait_child, wait_until};

pub const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

/// Path of an external tool, or a failing test that says how to get it.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("required tool `{name}` is not installed; run scripts/test, which installs every test dependency");
}

/// `tandem test ARGS --config CONFIG` (docs/HISTORY.md, "Test views"),
/// bounded by 120 s: (exit code, stdout, stderr).
pub fn tandem_test(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = run_with_timeout(
        Command::new(TANDEM)
            .arg("test")
            .args(args)
            .arg("--config")
            .arg(config),
        Duration::from_secs(120),
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a command and asserts it succeeded; returns stdout.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> String {
    let description = format!("{cmd:?}");
    let out = run_with_timeout(cmd, timeout);
    assert!(
        out.status.success(),
        "{description} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A volume of a test site: name and size ("64MiB").
#[derive(Clone, Debug)]
pub struct Vol {
    pub name: &'static str,
    pub size: &'static str,
}

pub fn vol(name: &'static str, size: &'static str) -> Vol {
    Vol { name, size }
}

/// One site ("ny") running `tandem agent`, primary for group "g" whose
/// replica site "dr" is configured but not running (so changes are
/// captured and tracked as they would be in production).
pub struct Site {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    pub volumes: Vec<Vol>,
    child: Option<Child>,
    log: PathBuf,
    starts: u32,
}

impl Site {
    pub fn new(volumes: &[Vol]) -> Site {
        Site::with_extra(volumes, "", "")
    }

    /// `site_extra` is appended to `[site]`, `group_extra` to `[[group]]`.
    pub fn with_extra(volumes: &[Vol], site_extra: &str, group_extra: &str) -> Site {
        // Short paths: Unix socket paths are limited to 107 bytes.
        let dir = tempfile::Builder::new()
            .prefix("td")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let data_dir = dir.path().join("d");
        let (listen, api) = (free_port(), free_port());
        let vols: Vec<String> = volumes
            .iter()
            .map(|v| format!("{{ name = \"{}\", size = \"{}\" }}", v.name, v.size))
            .collect();
        let text = format!(
            r#"[site]
name = "ny"
data_dir = "{data}"
listen = "127.0.0.1:{listen}"
api = "127.0.0.1:{api}"
{site_extra}

[tls]
mode = "off"

[coordinator]
kind = "none"

[[peer]]
name = "ny"
address = "127.0.0.1:{listen}"

[[peer]]
name = "dr"
address = "127.0.0.1:3"

[[group]]
name = "g"
primary = "ny"
replicas = [ {{ site = "dr", priority = 1 }} ]
volumes = [ {vols} ]
{group_extra}
"#,
            data = data_dir.display(),
            vols = vols.join(", "),
        );
        let config = dir.path().join("tandem.toml");
        std::fs::write(&config, text).expect("write config");
        let log = dir.path().join("agent.log");
        Site {
            dir,
            config,
            data_dir,
            volumes: volumes.to_vec(),
            child: None,
            log,
            starts: 0,
        }
    }

    pub fn socket(&self, volume: &str) -> PathBuf {
        self.data_dir.join("nbd").join(format!("{volume}.sock"))
    }

    pub fn image(&self, volume: &str) -> PathBuf {
        self.data_dir.join("volumes").join(format!("{volume}.img"))
    }

    /// NBD URI of a volume for libnbd tools, fio and qemu.
    pub fn uri(&self, volume: &str) -> String {
        format!(
            "nbd+unix:///{volume}?socket={}",
            self.socket(volume).display()
        )
    }

    /// Starts the agent and waits until every volume answers NBD.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(TANDEM)
            .args(["agent", "--config"])
            .arg(&self.config)
            .env("TANDEM_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn tandem agent");
        self.child = Some(child);
        for v in self.volumes.clone() {
            let socket = self.socket(v.name);
            wait_until(
                Duration::from_secs(20),
                &format!("socket {}", socket.display()),
                || {
                    if let Some(status) = self
                        .child
                        .as_mut()
                        .and_then(|c| c.try_wait().ok().flatten())
                    {
                        panic!("agent exited during start ({status}):\n{}", self.log());
                    }
                    std::os::unix::net::UnixStream::connect(&socket).is_ok()
                },
            );
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGTERM, then waits (bounded) for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("agent running");
        sigterm(&child);
        wait_child(&mut child, Duration::from_secs(40))
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- agent log ({}) ---\n{}", self.log.display(), self.log());
        }
    }
}

/// Sends SIGTERM to our own child. A child that already exited is left
/// alone (the error is ignored): the caller collects its status.
pub fn sigterm(child: &Child) {
    let _ = kill_process(Pid::from_child(child), Signal::TERM);
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn files_equal(a: &Path, b: &Path) -> bool {
    std::fs::read(a).expect("read a") == std::fs::read(b).expect("read b")
}

/// A TCP port free on 127.0.0.1 right now, outside the ephemeral range so
/// that no outgoing connection takes it while its agent restarts.
pub fn free_port() -> u16 {
    tandem_ports::loopback_port().expect("free loopback port")
}

/// Several sites on loopback, each a real `tandem agent` process with its
/// own data directory and configuration (the `[[peer]]` and `[[group]]`
/// tables shared, as in production).
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub sites: Vec<ClusterSite>,
    pub volumes: Vec<Vol>,
    pub primary: String,
}

pub struct ClusterSite {
    pub name: String,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Cluster {
    /// Group "g": `primary`, then `replicas` in priority order; `extra`
    /// is appended to the `[[group]]` table.
    pub fn new(primary: &str, replicas: &[&str], volumes: &[Vol], extra: &str) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("tc")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let names: Vec<&str> = std::iter::once(primary)
            .chain(replicas.iter().copied())
            .collect();
        let ports: Vec<(u16, u16)> = names.iter().map(|_| (free_port(), free_port())).collect();
        let peers: String = names
            .iter()
            .zip(&ports)
            .map(|(n, (listen, _))| {
                format!("[[peer]]\nname = \"{n}\"\naddress = \"127.0.0.1:{listen}\"\n\n")
            })
            .collect();
        let reps: Vec<String> = replicas
            .iter()
            .enumerate()
            .map(|(i, r)| format!("{{ site = \"{r}\", priority = {} }}", i + 1))
            .collect();
        let vols: Vec<String> = volumes
            .iter()
            .map(|v| format!("{{ name = \"{}\", size = \"{}\" }}", v.name, v.size))
            .collect();
        let group = format!(
            "[[group]]\nname = \"g\"\nprimary = \"{primary}\"\nreplicas = [ {} ]\nvolumes = [ {} ]\n{extra}\n",
            reps.join(", "),
            vols.join(", ")
        );
        let sites = names
            .iter()
            .zip(&ports)
            .map(|(name, (listen, api))| {
                let data_dir = dir.path().join(name);
                let config = dir.path().join(format!("{name}.toml"));
                let text = format!(
                    "[site]\nname = \"{name}\"\ndata_dir = \"{}\"\nlisten = \"127.0.0.1:{listen}\"\napi = \"127.0.0.1:{api}\"\n\n[tls]\nmode = \"off\"\n\n[coordinator]\nkind = \"none\"\n\n{peers}{group}",
                    data_dir.display()
                );
                std::fs::write(&config, text).expect("write config");
                ClusterSite {
                    name: name.to_string(),
                    log: dir.path().join(format!("{name}.log")),
                    config,
                    data_dir,
                    child: None,
                }
            })
            .collect();
        Cluster {
            dir,
            sites,
            volumes: volumes.to_vec(),
            primary: primary.to_string(),
        }
    }

    /// Replaces every site's `[coordinator]` section (`kind = "none"` by
    /// default) with `section`, e.g. a witness's address.
    pub fn set_coordinator(&mut self, section: &str) {
        for s in &self.sites {
            let text = std::fs::read_to_string(&s.config).expect("read config");
            let text = text.replace(
                "[coordinator]\nkind = \"none\"\n",
                &format!("[coordinator]\n{section}\n"),
            );
            std::fs::write(&s.config, text).expect("write config");
        }
    }

    /// Starts a site's agent and waits until its API answers (whatever
    /// role it takes).
    pub fn start_any(&mut self, name: &str) {
        self.spawn(name);
        let config = self.site(name).config.clone();
        wait_until(Duration::from_secs(20), &format!("{name}'s API"), || {
            if let Some(status) = self
                .site_mut(name)
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{name} exited during start ({status}):\n{}",
                    self.site(name).log()
                );
            }
            status_json(&config).is_some()
        });
    }

    pub fn site(&self, name: &str) -> &ClusterSite {
        self.sites
            .iter()
            .find(|s| s.name == name)
            .expect("no such site")
    }

    fn site_mut(&mut self, name: &str) -> &mut ClusterSite {
        self.sites
            .iter_mut()
            .find(|s| s.name == name)
            .expect("no such site")
    }

    pub fn socket(&self, site: &str, volume: &str) -> PathBuf {
        self.site(site)
            .data_dir
            .join("nbd")
            .join(format!("{volume}.sock"))
    }

    pub fn uri(&self, site: &str, volume: &str) -> String {
        format!(
            "nbd+unix:///{volume}?socket={}",
            self.socket(site, volume).display()
        )
    }

    pub fn image(&self, site: &str, volume: &str) -> PathBuf {
        self.site(site)
            .data_dir
            .join("volumes")
            .join(format!("{volume}.img"))
    }

    /// Starts a site's agent and waits until its API answers (and, on the
    /// primary, its NBD sockets).
    pub fn start(&mut self, name: &str) {
        let volumes = self.volumes.clone();
        let is_primary = name == self.primary;
        self.start_any(name);
        if is_primary {
            for v in volumes {
                let socket = self.socket(name, v.name);
                wait_until(
                    Duration::from_secs(20),
                    &format!("socket {}", socket.display()),
                    || std::os::unix::net::UnixStream::connect(&socket).is_ok(),
                );
            }
        }
    }

    /// SIGTERM; returns the exit status.
    pub fn stop(&mut self, name: &str) -> ExitStatus {
        let mut child = self.site_mut(name).child.take().expect("running");
        sigterm(&child);
        wait_child(&mut child, Duration::from_secs(40))
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self, name: &str) {
        if let Some(mut child) = self.site_mut(name).child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `tandem status --json` of a site.
    pub fn status(&self, name: &str) -> serde_json::Value {
        status_json(&self.site(name).config)
            .unwrap_or_else(|| panic!("no status from {name}:\n{}", self.site(name).log()))
    }

    /// Waits until every replica of the primary's group is streaming with
    /// nothing owed and holds every change made so far.
    pub fn wait_replicated(&self, timeout: Duration) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        let replicated = poll(timeout, || {
            let s = self.status(&self.primary);
            let g = &s["groups"][0];
            let next = g["next_seq"].as_u64().unwrap_or(0);
            let done = g["replicas"].as_array().is_some_and(|rs| {
                rs.iter().all(|r| {
                    r["state"] == "streaming"
                        && r["lag_bytes"] == 0
                        && r["durable_seq"].as_u64().unwrap_or(0) + 1 >= next
                        && r["applied_seq"].as_u64().unwrap_or(0) + 1 >= next
                })
            });
            if done {
                return Some(s);
            }
            last = s;
            None
        });
        replicated.unwrap_or_else(|| panic!("not replicated after {timeout:?}: {last:#}"))
    }
}

impl ClusterSite {
    /// The process id of the site's agent, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let names: Vec<String> = self.sites.iter().map(|s| s.name.clone()).collect();
        for n in &names {
            self.kill(n);
        }
        if std::thread::panicking() {
            for s in &self.sites {
                eprintln!("--- {} log ---\n{}", s.name, s.log());
            }
        }
    }
}

/// `tandem status --json --local --config FILE` (the site's own view),
/// parsed; None if the agent does not answer.
pub fn status_json(config: &Path) -> Option<serde_json::Value> {
    let out = run_with_timeout(
        Command::new(TANDEM)
            .args(["status", "--json", "--local", "--config"])
            .arg(config),
        Duration::from_secs(15),
    );
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

// ---------------------------------------------------------------------------
// Appended for crash_prefix.rs: starting an agent without waiting for it.

impl Cluster {
    /// Starts a site's agent and returns at once, without waiting for its
    /// API or sockets: for tests that must act in its first moments (for
    /// example, kill it while the resync that its start triggers runs).
    /// [`Cluster::kill`] and [`Cluster::stop`] work on it as after `start`.
    pub fn spawn(&mut self, name: &str) {
        let site = self.site_mut(name);
        assert!(site.child.is_none(), "{name} already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&site.log)
            .expect("log file");
        let child = Command::new(TANDEM)
            .args(["agent", "--config"])
            .arg(&site.config)
            .env("TANDEM_LOG", "debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn tandem agent");
        site.child = Some(child);
    }

    /// Whether a site's agent process is running (false if it was never
    /// started, was stopped, or exited by itself).
    pub fn is_running(&mut self, name: &str) -> bool {
        matches!(
            self.site_mut(name).child.as_mut().map(|c| c.try_wait()),
            Some(Ok(None))
        )
    }
}

/// A `tandem witness` process on a free loopback port.
pub struct Witness {
    pub addr: String,
    pub data_dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    /// Where `tandem certs create` wrote the witness's certificate, when
    /// it speaks TLS (the sites then run with `[tls]` on).
    pki: Option<PathBuf>,
}

impl Witness {
    /// A plain witness (`--tls off`), for sites with `[tls] mode = "off"`.
    pub fn start(dir: &Path) -> Witness {
        Witness::start_with(dir, None)
    }

    /// A witness speaking mutual TLS with the certificates `tandem certs
    /// create` wrote to `pki` (`ca.pem`, `witness.pem`, `witness.key`).
    pub fn start_tls(dir: &Path, pki: &Path) -> Witness {
        Witness::start_with(dir, Some(pki.to_path_buf()))
    }

    fn start_with(dir: &Path, pki: Option<PathBuf>) -> Witness {
        let mut w = Witness {
            addr: format!("127.0.0.1:{}", free_port()),
            data_dir: dir.join("witness"),
            child: None,
            log: dir.join("witness.log"),
            pki,
        };
        w.restart();
        w
    }

    /// Starts the process again on the same address and data.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "witness already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut command = Command::new(TANDEM);
        command
            .args(["witness", "--listen", &self.addr, "--data-dir"])
            .arg(&self.data_dir);
        match &self.pki {
            Some(pki) => command
                .arg("--ca")
                .arg(pki.join("ca.pem"))
                .arg("--cert")
                .arg(pki.join("witness.pem"))
                .arg("--key")
                .arg(pki.join("witness.key")),
            // The sites run with `[tls] mode = "off"` on loopback.
            None => command.args(["--tls", "off"]),
        };
        let child = command
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn tandem witness");
        self.child = Some(child);
        let addr = self.addr.clone();
        wait_until(Duration::from_secs(10), "the witness to listen", || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The `[coordinator]` section for the sites.
    pub fn section(&self, lease_ttl: &str) -> String {
        format!(
            "kind = \"witness\"\nendpoints = [\"{}\"]\nlease_ttl = \"{lease_ttl}\"",
            self.addr
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The failover logic's own requests are never refused by the
    /// witness's policy (docs/WITNESS.md): asserts its log has no refusal.
    pub fn assert_no_refusals(&self) {
        let log = self.log();
        let refused: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("witness: refused:"))
            .collect();
        assert!(
            refused.is_empty(),
            "the witness refused a site:\n{}",
            refused.join("\n")
        );
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------
// The agent's REST API.

/// How long a test waits on one API connection.
pub const API_IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A site whose agent's API a test calls.
pub trait ApiSite {
    fn config_path(&self) -> &Path;
    fn data_path(&self) -> &Path;
}

impl ApiSite for Site {
    fn config_path(&self) -> &Path {
        &self.config
    }
    fn data_path(&self) -> &Path {
        &self.data_dir
    }
}

impl ApiSite for ClusterSite {
    fn config_path(&self) -> &Path {
        &self.config
    }
    fn data_path(&self) -> &Path {
        &self.data_dir
    }
}

/// `site.api` of the site's configuration.
pub fn api_addr(site: &impl ApiSite) -> String {
    let config = std::fs::read_to_string(site.config_path()).expect("read config");
    config
        .lines()
        .find_map(|l| l.strip_prefix("api = "))
        .expect("api line")
        .trim_matches('"')
        .to_owned()
}

/// The API's bearer token, once the API listens: `Site::start` waits for
/// the NBD exports only, the API comes up after them, and its token file
/// is written (not atomically) before it listens.
pub fn api_token(site: &impl ApiSite) -> String {
    let addr = api_addr(site);
    wait_until(Duration::from_secs(20), "the agent's API to listen", || {
        std::net::TcpStream::connect(&addr).is_ok()
    });
    std::fs::read_to_string(site.data_path().join("api.token"))
        .expect("read api.token")
        .trim()
        .to_owned()
}

/// Sends `head` then `body` (write errors ignored: the agent may refuse
/// before reading it all) and returns the status and the whole answer.
pub fn api_raw(site: &impl ApiSite, head: &str, body: &[u8]) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(api_addr(site)).expect("connect to the API");
    s.set_read_timeout(Some(API_IO_TIMEOUT))
        .expect("read timeout");
    s.set_write_timeout(Some(API_IO_TIMEOUT))
        .expect("write timeout");
    let _ = std::io::Write::write_all(&mut s, head.as_bytes())
        .and_then(|()| std::io::Write::write_all(&mut s, body));
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match std::io::Read::read(&mut s, &mut chunk) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("reading the API answer to {head:?}: {e}"),
        }
        assert!(answer.len() < 1 << 20, "the API keeps sending data");
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// One API request with the bearer token: (status, body).
pub fn api_call(site: &impl ApiSite, method: &str, path: &str, body: &str) -> (u16, String) {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        api_token(site),
        body.len()
    );
    let (status, text) = api_raw(site, &head, body.as_bytes());
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

// ---------------------------------------------------------------------------
// Appended for scale.rs.

impl Cluster {
    /// The process id of a site's running agent.
    pub fn pid(&self, name: &str) -> u32 {
        self.site(name).child.as_ref().expect("running").id()
    }
}

// ---------------------------------------------------------------------------
// Appended for instance.rs: an agent that exits by itself.

impl Cluster {
    /// Waits (bounded) until a site's agent exits by itself; its exit
    /// status. Panics with its log if it is still running after `timeout`.
    pub fn wait_exit(&mut self, name: &str, timeout: Duration) -> ExitStatus {
        let site = self.site_mut(name);
        let child = site.child.as_mut().expect("running");
        let status = poll(timeout, || child.try_wait().ok().flatten());
        match status {
            Some(s) => {
                site.child = None;
                s
            }
            None => panic!("{name} still running after {timeout:?}:\n{}", site.log()),
        }
    }
}

/// `promtool check metrics` on `text`: must pass, lint warnings included.
pub fn promtool(text: &str) {
    use std::io::Write;
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    child
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("promtool did not finish")
        .expect("promtool output");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}\n--- metrics ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
