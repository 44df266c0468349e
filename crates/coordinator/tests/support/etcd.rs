//! Real etcd processes for tests of Tandem's etcd coordinator backend
//! (SPEC §5): a single member or a cluster of several, on free loopback
//! ports with temporary data directories, members killed (SIGKILL) and
//! restarted one by one, everything killed on drop.
//!
//! Standard library, `tandem-ports` and `tandem-testkit` only, so any
//! test crate of the workspace can include it (with those two as
//! dev-dependencies):
//!
//! ```ignore
//! #[path = "../../coordinator/tests/support/etcd.rs"]
//! mod etcd_cluster;
//! use etcd_cluster::EtcdCluster;
//!
//! let etcd = EtcdCluster::three();
//! let endpoints = etcd.endpoints(); // ["127.0.0.1:port", ...]
//! etcd.kill(0);
//! etcd.restart(0);
//! ```
//!
//! The binary is `$TANDEM_ETCD` if set, else `/usr/bin/etcd` (Debian
//! `etcd-server`), else `etcd` on `PATH`. A missing binary fails the test
//! with a message saying what to install; it never skips.
//! Data lives under `/dev/shm` when it exists (fast fsync), else the
//! system temporary directory; `$TANDEM_ETCD_DIR` overrides.
#![allow(dead_code)]

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a member (or a whole new cluster) may take to become healthy.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Raft timing of the members; etcd's defaults unless changed.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// `--heartbeat-interval`, milliseconds.
    pub heartbeat_ms: u64,
    /// `--election-timeout`, milliseconds. etcd's smallest lease TTL is
    /// 1.5 times this, rounded up to whole seconds.
    pub election_ms: u64,
    /// Client URLs over TLS (`https://`), requiring client certificates
    /// signed by `ca`; health is then read from a plain metrics URL.
    pub tls: Option<EtcdTlsFiles>,
    /// `--auth-token-ttl`, seconds (etcd's default 300).
    pub auth_token_ttl: Option<u64>,
}

/// The server side of TLS: etcd's certificate and key, and the CA its
/// clients' certificates must chain to (`--client-cert-auth`).
#[derive(Clone, Debug)]
pub struct EtcdTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            heartbeat_ms: 100,
            election_ms: 1000,
            tls: None,
            auth_token_ttl: None,
        }
    }
}

/// One member of an [`EtcdCluster`].
pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    /// Plain `/health` and `/metrics` (with TLS on the client URL).
    pub metrics_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster of one or more members.
pub struct EtcdCluster {
    members: Vec<Member>,
    root: PathBuf,
    token: String,
    binary: PathBuf,
    options: EtcdOptions,
}

static CLUSTERS: AtomicUsize = AtomicUsize::new(0);

/// Finds the etcd binary or panics saying how to get it.
pub fn etcd_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("TANDEM_ETCD") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "TANDEM_ETCD={} is not a file", p.display());
        return p;
    }
    let debian = Path::new("/usr/bin/etcd");
    if debian.is_file() {
        return debian.to_path_buf();
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("etcd");
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "etcd binary not found (looked at $TANDEM_ETCD, /usr/bin/etcd and PATH): \
         install the Debian package etcd-server (apt-get install -y etcd-server)"
    );
}

impl EtcdCluster {
    /// One member.
    pub fn single() -> EtcdCluster {
        EtcdCluster::start(1)
    }

    /// Three members.
    pub fn three() -> EtcdCluster {
        EtcdCluster::start(3)
    }

    /// `size` members with etcd's default timing, all healthy on return.
    pub fn start(size: usize) -> EtcdCluster {
        EtcdCluster::start_with(size, EtcdOptions::default())
    }

    /// `size` members, all healthy on return. Panics (with the members'
    /// log tails) if they do not get healthy within [`START_TIMEOUT`].
    pub fn start_with(size: usize, options: EtcdOptions) -> EtcdCluster {
        assert!(size > 0, "an etcd cluster needs at least one member");
        let binary = etcd_binary();
        let mut last_error = String::new();
        // Free ports are picked by binding and releasing them; another
        // test may grab one in between, so a start that fails on a port
        // already in use is tried again with new ports.
        for _ in 0..3 {
            let mut cluster = EtcdCluster::prepare(size, options.clone(), binary.clone());
            match cluster.launch_all() {
                Ok(()) => return cluster,
                Err(e) => {
                    let port_clash =
                        (0..size).any(|i| cluster.log_tail(i).contains("address already in use"));
                    last_error = e;
                    if !port_clash {
                        break;
                    }
                }
            }
        }
        panic!("could not start an etcd cluster of {size}: {last_error}");
    }

    fn prepare(size: usize, options: EtcdOptions, binary: PathBuf) -> EtcdCluster {
        let base = match std::env::var_os("TANDEM_ETCD_DIR") {
            Some(d) => PathBuf::from(d),
            None if Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
            None => std::env::temp_dir(),
        };
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let token = format!(
            "tandem-etcd-{}-{}-{nanos}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::SeqCst)
        );
        let root = base.join(&token);
        fs::create_dir_all(&root)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", root.display()));
        let ports = free_ports(3 * size);
        let members = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[3 * i],
                peer_port: ports[3 * i + 1],
                metrics_port: ports[3 * i + 2],
                data_dir: root.join(format!("m{i}")),
                log: root.join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        EtcdCluster {
            members,
            root,
            token,
            binary,
            options,
        }
    }

    fn launch_all(&mut self) -> Result<(), String> {
        for i in 0..self.members.len() {
            self.spawn(i)?;
        }
        let deadline = Instant::now() + START_TIMEOUT;
        for i in 0..self.members.len() {
            self.wait_healthy_until(i, deadline)?;
        }
        Ok(())
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize) -> Result<(), String> {
        let initial_cluster = self.initial_cluster();
        let m = &self.members[i];
        let log = File::options()
            .create(true)
            .append(true)
            .open(&m.log)
            .map_err(|e| format!("cannot open {}: {e}", m.log.display()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", m.log.display()))?;
        let scheme = if self.options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let client = format!("{scheme}://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let mut cmd = Command::new(&self.binary);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD_")
                && k.to_string_lossy() != "ETCD_UNSUPPORTED_ARCH"
            {
                cmd.env_remove(k);
            }
        }
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(&initial_cluster)
            // Ignored once the data directory exists (a restart).
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(&self.token)
            .arg("--heartbeat-interval")
            .arg(self.options.heartbeat_ms.to_string())
            .arg("--election-timeout")
            .arg(self.options.election_ms.to_string())
            .arg("--listen-metrics-urls")
            .arg(format!("http://127.0.0.1:{}", m.metrics_port))
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        if let Some(tls) = &self.options.tls {
            cmd.arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key);
        }
        if let Some(ttl) = self.options.auth_token_ttl {
            cmd.arg("--auth-token-ttl").arg(ttl.to_string());
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn member(&self, i: usize) -> &Member {
        &self.members[i]
    }

    /// Member `i`'s client address, `127.0.0.1:port`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.members[i].client_port)
    }

    /// Every member's client address, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Member `i`'s client URL, `http://127.0.0.1:port` (`https://` with
    /// TLS).
    pub fn client_url(&self, i: usize) -> String {
        let scheme = if self.options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.endpoint(i))
    }

    /// Whether member `i`'s process is alive.
    pub fn is_running(&mut self, i: usize) -> bool {
        match self.members[i].child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILLs member `i` and reaps it. Its data stays for a restart.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data and ports and waits until it is
    /// healthy (which needs a quorum of the cluster to be up).
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        let deadline = Instant::now() + START_TIMEOUT;
        let result = self
            .spawn(i)
            .and_then(|()| self.wait_healthy_until(i, deadline));
        if let Err(e) = result {
            panic!("restarting etcd member {i}: {e}");
        }
    }

    /// Waits until member `i` answers `/health` with true.
    pub fn wait_healthy(&mut self, i: usize, timeout: Duration) -> Result<(), String> {
        self.wait_healthy_until(i, Instant::now() + timeout)
    }

    fn wait_healthy_until(&mut self, i: usize, deadline: Instant) -> Result<(), String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.members[i].metrics_port));
        let left = deadline.saturating_duration_since(Instant::now());
        let answer = tandem_testkit::poll(left, || {
            if !self.is_running(i) {
                return Some(Err(format!(
                    "etcd member {i} exited; log tail:\n{}",
                    self.log_tail(i)
                )));
            }
            match http(addr, "GET", "/health", "", Duration::from_secs(2)) {
                Ok((200, body)) if body.contains("\"health\":\"true\"") => Some(Ok(())),
                _ => None,
            }
        });
        answer.unwrap_or_else(|| {
            Err(format!(
                "etcd member {i} not healthy in time; log tail:\n{}",
                self.log_tail(i)
            ))
        })
    }

    fn addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.members[i].client_port))
    }

    /// The index of the member that is the cluster's leader, as the
    /// running members report it.
    pub fn leader(&mut self) -> Option<usize> {
        for i in 0..self.members.len() {
            if !self.is_running(i) {
                continue;
            }
            let Ok((200, body)) = self.post(i, "/v3/maintenance/status", "{}") else {
                continue;
            };
            let (Some(me), Some(leader)) = (
                json_string_field(&body, "member_id"),
                json_string_field(&body, "leader"),
            ) else {
                continue;
            };
            if me == leader {
                return Some(i);
            }
        }
        None
    }

    /// Waits until some member reports itself leader.
    pub fn wait_leader(&mut self, timeout: Duration) -> Option<usize> {
        tandem_testkit::poll(timeout, || self.leader())
    }

    /// How many watches member `i` holds now (its
    /// `etcd_debugging_mvcc_watcher_total` gauge); `None` if it does not
    /// answer. A test waits for a watch to be in place before making the
    /// change that must end it.
    pub fn watchers(&self, i: usize) -> Option<u64> {
        let (status, body) =
            http(self.addr(i), "GET", "/metrics", "", Duration::from_secs(5)).ok()?;
        if status != 200 {
            return None;
        }
        body.lines()
            .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_watcher_total "))
            // A gauge printed as a float ("1" or "1e+00"): a small count.
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0 && *v < 1e15)
            .map(|v| {
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let n = v.round() as u64;
                n
            })
    }

    /// A raw call of the v3 JSON gateway on member `i` (for what the
    /// product's client does not do, e.g. `/v3/kv/compaction`).
    pub fn post(&self, i: usize, path: &str, json: &str) -> Result<(u16, String), String> {
        http(self.addr(i), "POST", path, json, Duration::from_secs(5))
    }

    /// The last lines of member `i`'s log.
    pub fn log_tail(&self, i: usize) -> String {
        let text = fs::read(&self.members[i].log).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// `n` distinct free loopback ports, outside the ephemeral range so that a
/// member restarted on its old ports gets them back.
fn free_ports(n: usize) -> Vec<u16> {
    tandem_ports::loopback_ports(n).unwrap_or_else(|e| panic!("{e}"))
}

/// A minimal HTTP/1.0 request; returns the status and body.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    s.take(16 << 20)
        .read_to_end(&mut resp)
        .map_err(|e| e.to_string())?;
    let resp = String::from_utf8_lossy(&resp);
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header in {resp:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// The string value of `"field":"..."` in a flat JSON text.
fn json_string_field(text: &str, field: &str) -> Option<String> {
    let pat = format!("\"{field}\":\"");
    let start = text.find(&pat)? + pat.len();
    let end = text[start..].find('"')? + start;
    Some(text[start..end].to_string())
}
