//! The VM benchmark's driver (`bench/vms.sh` builds and runs it; see
//! bench/README.md): real libvirt daemons per simulated site
//! ([`SiteLibvirt`]), real TCG guests, real `tandem agent` processes. Not a
//! test: it prints figures beside a baseline from the same run, and ratios.
//!
//! Parts (`PARTS`, default all three):
//!
//! - `pivot`: `TRIALS` x (for each mode of `PIVOT_MODES`) a guest writing
//!   fsync()ed files on a local raw file at ny is protected with `tandem
//!   protect web01 --replica chicago --mode MODE`; the agent's pivot
//!   (`vm.onboarding.disks[0].pivot_ms`) and the guest's longest time
//!   between two `ACK` lines across the protect command, beside its usual
//!   spacing before.
//! - `throughput`: a guest running `dd bs=1M oflag=direct conv=fsync` of
//!   `DD_MIB` MiB, `DD_ROUNDS` times, on a local raw file, then on a Tandem
//!   volume (the disk in Tandem's form on the primary's NBD socket) with
//!   one async replica, then one sync replica.
//! - `failover`: `FO_TRIALS` x a fresh cluster of ny, chicago, seattle with
//!   a witness; web01 boots at ny on a local file (the plain boot
//!   baseline: QEMU running -> first write), is protected with `tandem
//!   protect web01 --replica chicago --replica seattle --mode FO_MODE`;
//!   then ny's agent is SIGKILLed and ny's host lost
//!   ([`SiteLibvirt::crash_host`]): kill -> web01's QEMU running at another
//!   site -> its first write there.
//!
//! Environment: `TANDEM_BIN` (required), `WORK` (required: an empty work
//! directory on a disk file system), `OUT` (JSON result), and the knobs
//! above (see bench/vms.sh -h). `vms_bench --sweep` removes site daemons
//! (and their QEMUs) left by a killed run. SIGINT/SIGTERM end the run
//! cleanly (everything started is stopped); the exit status is then 130.
#![forbid(unsafe_code)]

use std::fmt::Display;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tandem_vmkit::{
    domain_xml, ext4, parse_ack, parse_rate, Disk, Guest, GuestConfig, GuestImage, SiteLibvirt,
    Workload,
};

type R<T> = Result<T, String>;

fn err<E: Display>(what: impl Display) -> impl FnOnce(E) -> String {
    move |e| format!("{what}: {e}")
}

// ---------------------------------------------------------------------------
// interrupts

static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();
const INTERRUPTED: &str = "interrupted";

fn interrupted() -> bool {
    STOP.get().is_some_and(|s| s.load(Ordering::Relaxed))
}

fn check() -> R<()> {
    if interrupted() {
        Err(INTERRUPTED.into())
    } else {
        Ok(())
    }
}

/// Sleeps `d`, in steps, returning early (an error) on an interrupt.
fn sleep(d: Duration) -> R<()> {
    let end = Instant::now() + d;
    loop {
        check()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}

/// Polls `f` every `every` until it returns a value, for at most `timeout`.
fn wait<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> R<Option<T>>,
) -> R<T> {
    let end = Instant::now() + timeout;
    loop {
        check()?;
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() >= end {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(every);
    }
}

// ---------------------------------------------------------------------------
// settings

struct Opts {
    tandem: PathBuf,
    work: PathBuf,
    out: PathBuf,
    parts: Vec<String>,
    trials: usize,
    pivot_modes: Vec<String>,
    dd_mib: u32,
    dd_rounds: u32,
    fo_trials: usize,
    fo_mode: String,
    lease_ttl: String,
    disk_mib: u64,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

fn env_num<T: std::str::FromStr>(name: &str, default: &str) -> R<T> {
    let v = env_or(name, default);
    v.parse()
        .map_err(|_| format!("{name} must be a whole number (got {v:?})"))
}

fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

impl Opts {
    fn from_env() -> R<Opts> {
        let need = |name: &str| {
            std::env::var_os(name)
                .map(PathBuf::from)
                .ok_or_else(|| format!("{name} is not set (run bench/vms.sh)"))
        };
        let parts = list(&env_or("PARTS", "pivot,throughput,failover"));
        for p in &parts {
            if !["pivot", "throughput", "failover"].contains(&p.as_str()) {
                return Err(format!(
                    "unknown part {p:?} (parts: pivot, throughput, failover)"
                ));
            }
        }
        let pivot_modes = list(&env_or("PIVOT_MODES", "async,sync"));
        let fo_mode = env_or("FO_MODE", "sync");
        for m in pivot_modes.iter().chain([&fo_mode]) {
            if m != "async" && m != "sync" {
                return Err(format!("mode {m:?}: use async or sync"));
            }
        }
        Ok(Opts {
            tandem: need("TANDEM_BIN")?,
            work: need("WORK")?,
            out: need("OUT")?,
            parts,
            trials: env_num("TRIALS", "5")?,
            pivot_modes,
            dd_mib: env_num("DD_MIB", "128")?,
            dd_rounds: env_num("DD_ROUNDS", "5")?,
            fo_trials: env_num("FO_TRIALS", "5")?,
            fo_mode,
            lease_ttl: env_or("LEASE_TTL", "3s"),
            disk_mib: env_num("DISK_MIB", "64")?,
        })
    }
}

/// A boot under TCG takes 6-17 s on two cores (tandem-vmkit's docs).
const BOOT: Duration = Duration::from_secs(120);
/// How long `tandem protect` and an agent's start may take.
const PROTECT: Duration = Duration::from_secs(300);
const AGENT_UP: Duration = Duration::from_secs(30);
/// From the kill to the VM's QEMU elsewhere, and to its first write.
const FAILOVER: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------
// agents, witness

fn free_port() -> R<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(err("bind a free port"))?;
    Ok(l.local_addr().map_err(err("local address"))?.port())
}

struct Agent {
    name: String,
    config: PathBuf,
    data: PathBuf,
    log: PathBuf,
    tandem: PathBuf,
    child: Option<Child>,
}

impl Agent {
    fn start(&mut self) -> R<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(err(self.log.display()))?;
        let child = Command::new(&self.tandem)
            .args(["agent", "--config"])
            .arg(&self.config)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(err("log"))?)
            .stderr(log)
            .spawn()
            .map_err(err("spawn tandem agent"))?;
        self.child = Some(child);
        wait(
            &format!("{}'s API", self.name),
            AGENT_UP,
            Duration::from_millis(100),
            || {
                if let Some(c) = self.child.as_mut() {
                    if let Ok(Some(st)) = c.try_wait() {
                        return Err(format!(
                            "agent {} exited at start ({st}):\n{}",
                            self.name,
                            self.log_tail(20)
                        ));
                    }
                }
                Ok(self.status().map(|_| ()))
            },
        )
    }

    /// SIGKILL, as a crash.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then SIGKILL after 20 s.
    fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    fn tandem(&self, args: &[&str], timeout: Duration) -> std::process::Output {
        tandem_testkit::run_with_timeout(
            Command::new(&self.tandem)
                .args(args)
                .arg("--config")
                .arg(&self.config)
                .env("NO_COLOR", "1"),
            timeout,
        )
    }

    fn status(&self) -> Option<Value> {
        let out = self.tandem(&["status", "--json"], Duration::from_secs(15));
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    fn group(&self, name: &str) -> Value {
        self.status()
            .and_then(|s| {
                s["groups"]
                    .as_array()
                    .and_then(|gs| gs.iter().find(|g| g["name"] == name).cloned())
            })
            .unwrap_or(Value::Null)
    }

    fn socket(&self, volume: &str) -> PathBuf {
        self.data.join("nbd").join(format!("{volume}.sock"))
    }

    fn image(&self, volume: &str) -> PathBuf {
        self.data.join("volumes").join(format!("{volume}.img"))
    }

    fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Witness {
    addr: String,
    child: Child,
}

impl Witness {
    fn start(tandem: &Path, dir: &Path) -> R<Witness> {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let log = fs::File::create(dir.join("witness.log")).map_err(err("witness log"))?;
        let child = Command::new(tandem)
            .args(["witness", "--listen", &addr, "--data-dir"])
            .arg(dir.join("witness"))
            .args(["--tls", "off"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(err("log"))?)
            .stderr(log)
            .spawn()
            .map_err(err("spawn tandem witness"))?;
        let w = Witness { addr, child };
        wait(
            "the witness to listen",
            AGENT_UP,
            Duration::from_millis(50),
            || Ok(std::net::TcpStream::connect(&w.addr).ok().map(|_| ())),
        )?;
        Ok(w)
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sites on loopback, TLS off, each with its own libvirt daemon.
struct Cluster {
    agents: Vec<Agent>,
    // Dropped after the agents (fields drop in order).
    _witness: Option<Witness>,
}

impl Cluster {
    /// Writes one configuration per site in `dir`: `coordinator` is the
    /// `[coordinator]` body, `groups` the `[[group]]` tables (may be
    /// empty), `sites` the names with their libvirt URIs.
    fn new(
        tandem: &Path,
        dir: &Path,
        sites: &[(&str, &str)],
        coordinator: &str,
        groups: &str,
        witness: Option<Witness>,
    ) -> R<Cluster> {
        fs::create_dir_all(dir).map_err(err(dir.display()))?;
        let mut ports = Vec::new();
        for _ in sites {
            ports.push((free_port()?, free_port()?));
        }
        let peers: String = sites
            .iter()
            .zip(&ports)
            .map(|((n, _), (l, _))| {
                format!("[[peer]]\nname = \"{n}\"\naddress = \"127.0.0.1:{l}\"\n\n")
            })
            .collect();
        let mut agents = Vec::new();
        for ((name, uri), (listen, api)) in sites.iter().zip(&ports) {
            let data = dir.join(name);
            let config = dir.join(format!("{name}.toml"));
            let text = format!(
                "[site]\nname = \"{name}\"\ndata_dir = \"{}\"\nlisten = \"127.0.0.1:{listen}\"\n\
                 api = \"127.0.0.1:{api}\"\n\n[tls]\nmode = \"off\"\n\n[coordinator]\n{coordinator}\n\n\
                 {peers}{groups}\n[libvirt]\nuri = \"{uri}\"\n",
                data.display()
            );
            fs::write(&config, text).map_err(err(config.display()))?;
            agents.push(Agent {
                name: name.to_string(),
                config,
                log: dir.join(format!("{name}.log")),
                data,
                tandem: tandem.to_path_buf(),
                child: None,
            });
        }
        Ok(Cluster {
            agents,
            _witness: witness,
        })
    }

    fn site(&self, name: &str) -> &Agent {
        self.agents
            .iter()
            .find(|a| a.name == name)
            .expect("a site of the cluster")
    }

    fn site_mut(&mut self, name: &str) -> &mut Agent {
        self.agents
            .iter_mut()
            .find(|a| a.name == name)
            .expect("a site of the cluster")
    }

    fn log_tails(&self, n: usize) -> String {
        self.agents
            .iter()
            .map(|a| format!("--- {} ({}):\n{}", a.name, a.log.display(), a.log_tail(n)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Waits until `site`'s group `group` is primary and every replica streams
/// with nothing owed.
fn wait_replicated(c: &Cluster, site: &str, group: &str, timeout: Duration) -> R<()> {
    let mut last = Value::Null;
    wait(
        &format!("{group} replicated from {site}"),
        timeout,
        Duration::from_millis(200),
        || {
            last = c.site(site).group(group);
            let next = last["next_seq"].as_u64().unwrap_or(0);
            let done = last["role"] == "primary"
                && last["replicas"].as_array().is_some_and(|rs| {
                    !rs.is_empty()
                        && rs.iter().all(|r| {
                            r["state"] == "streaming"
                                && r["lag_bytes"] == 0
                                && r["durable_seq"].as_u64().unwrap_or(0) + 1 >= next
                        })
                });
            Ok(done.then_some(()))
        },
    )
    .map_err(|e| format!("{e}; last status: {last}"))
}

// ---------------------------------------------------------------------------
// console

/// Follows a console file, stamping each complete line with the time this
/// process saw it (polled every 5 ms).
struct Tail {
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Tail {
    fn start(path: &Path) -> Tail {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s, p) = (lines.clone(), stop.clone(), path.to_path_buf());
        let handle = std::thread::spawn(move || {
            let mut offset = 0u64;
            let mut partial = Vec::new();
            while !s.load(Ordering::Relaxed) {
                if let Ok(mut f) = fs::File::open(&p) {
                    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                    if len < offset {
                        offset = 0; // truncated: a new QEMU started on it
                        partial.clear();
                    }
                    let mut buf = Vec::new();
                    if f.seek(SeekFrom::Start(offset)).is_ok() && f.read_to_end(&mut buf).is_ok() {
                        offset += buf.len() as u64;
                        let now = Instant::now();
                        partial.extend_from_slice(&buf);
                        while let Some(i) = partial.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = partial.drain(..=i).collect();
                            let text = String::from_utf8_lossy(&line).replace(['\r', '\n'], "");
                            if let Ok(mut v) = l.lock() {
                                v.push((now, text));
                            }
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Tail {
            lines,
            stop,
            handle: Some(handle),
        }
    }

    fn lines(&self) -> Vec<(Instant, String)> {
        self.lines.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Times of the `ACK` lines.
    fn acks(&self) -> Vec<Instant> {
        self.lines()
            .into_iter()
            .filter(|(_, l)| parse_ack(l).is_some())
            .map(|(t, _)| t)
            .collect()
    }

    /// Waits for a line after `from` (a time) matching `f`; fails at once
    /// on a line showing a failure.
    fn wait_line(
        &self,
        what: &str,
        from: Instant,
        timeout: Duration,
        f: impl Fn(&str) -> bool,
    ) -> R<Instant> {
        wait(what, timeout, Duration::from_millis(5), || {
            for (t, l) in self.lines() {
                if t < from {
                    continue;
                }
                if f(&l) {
                    return Ok(Some(t));
                }
                if is_failure(&l) {
                    return Err(format!("the guest failed while waiting for {what}: {l}"));
                }
            }
            Ok(None)
        })
        .map_err(|e| format!("{e}; console tail:\n{}", self.tail(15)))
    }

    fn tail(&self, n: usize) -> String {
        let lines = self.lines();
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn is_failure(l: &str) -> bool {
    l.starts_with("TANDEM-ERROR") || l.contains("Kernel panic")
}

fn is_io_error(l: &str) -> bool {
    l.contains("I/O error")
        || l.contains("EXT4-fs error")
        || l.contains("Buffer I/O")
        || l.contains("Remounting filesystem read-only")
}

/// The domain XML of `config` with the console appended to rather than
/// truncated (one console file for every site's QEMU).
fn xml_appending(name: &str, image: &GuestImage, config: &GuestConfig, console: &Path) -> String {
    let xml = domain_xml(name, image, config, console);
    let plain = format!("<source path='{}'/>", console.display());
    xml.replace(
        &plain,
        &format!("<source path='{}' append='on'/>", console.display()),
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn max(v: &[f64]) -> Option<f64> {
    v.iter().copied().filter(|x| x.is_finite()).reduce(f64::max)
}

fn fmt(v: Option<f64>, unit: &str) -> String {
    match v {
        Some(x) if unit == "s" => format!("{:.2} s", x / 1e3),
        Some(x) if unit == "ms" => format!("{x:.0} ms"),
        Some(x) if unit.is_empty() => format!("{x:.1}"),
        Some(x) => format!("{x:.1} {unit}"),
        None => "-".into(),
    }
}

fn say(s: impl Display) {
    eprintln!("[vms] {s}");
}

fn protect(agent: &Agent, args: &[&str]) -> R<(Duration, String)> {
    let mut all = vec!["protect"];
    all.extend_from_slice(args);
    let t = Instant::now();
    let out = agent.tandem(&all, PROTECT);
    let took = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(format!(
            "tandem {} failed ({}): {stderr}\n{}",
            all.join(" "),
            out.status,
            agent.log_tail(20)
        ));
    }
    Ok((took, stderr))
}

// ---------------------------------------------------------------------------
// part 1: the pause at the pivot

fn pivot_trial(o: &Opts, image: &GuestImage, mode: &str, n: usize) -> R<Value> {
    let dir = o.work.join(format!("pivot-{mode}-{n}"));
    fs::create_dir_all(&dir).map_err(err(dir.display()))?;
    let ny_lv = SiteLibvirt::start("vb-ny").map_err(err("ny's libvirt"))?;
    let chi_lv = SiteLibvirt::start("vb-chi").map_err(err("chicago's libvirt"))?;
    let mut c = Cluster::new(
        &o.tandem,
        &dir.join("c"),
        &[("ny", ny_lv.uri()), ("chicago", chi_lv.uri())],
        "kind = \"none\"",
        "",
        None,
    )?;
    c.site_mut("chicago").start()?;
    c.site_mut("ny").start()?;

    let disk = dir.join("web01.img");
    ext4::make_ext4(&disk, o.disk_mib << 20).map_err(err("mkfs"))?;
    let console = dir.join("web01.console");
    let config = GuestConfig::new("pivot", Disk::File(disk), Workload::Write, &dir)
        .with_name("web01")
        .with_console(&console);
    let tail = Tail::start(&console);
    let guest = Guest::start(ny_lv.libvirt(), image, &config).map_err(err("start web01"))?;
    let booted = tail.wait_line("the first ACK", guest.started_at(), BOOT, |l| {
        parse_ack(l).is_some()
    })?;
    // The usual spacing: 4 s of writes.
    sleep(Duration::from_secs(4))?;
    let pid = ny_lv.qemu_pid("web01");
    let t0 = Instant::now();
    let (took, stderr) = protect(
        c.site("ny"),
        &["web01", "--replica", "chicago", "--mode", mode],
    )?;
    let t1 = t0 + took;
    sleep(Duration::from_secs(2))?;
    let acks = tail.acks();
    // Gaps before: every pair after the first two ACKs, up to t0.
    let before: Vec<f64> = acks
        .windows(2)
        .filter(|w| w[0] > booted && w[1] <= t0)
        .map(|w| ms(w[1] - w[0]))
        .collect();
    // Across the protect: pairs overlapping [t0, t1].
    let across: Vec<f64> = acks
        .windows(2)
        .filter(|w| w[1] > t0 && w[0] < t1)
        .map(|w| ms(w[1] - w[0]))
        .collect();
    let acks_during = acks.iter().filter(|t| **t > t0 && **t < t1).count();
    let g = c.site("ny").group("web01");
    let pivot = g["vm"]["onboarding"]["disks"][0]["pivot_ms"].as_f64();
    let same_qemu = pid.is_some() && ny_lv.qemu_pid("web01") == pid;
    let io_errors: Vec<String> = tail
        .lines()
        .into_iter()
        .filter(|(_, l)| is_io_error(l))
        .map(|(_, l)| l)
        .collect();
    let r = json!({
        "mode": mode,
        "pivot_ms": pivot,
        "gap_max_across_ms": max(&across),
        "gap_median_before_ms": median(&before),
        "gap_max_before_ms": max(&before),
        "acks_before": before.len(),
        "acks_during_protect": acks_during,
        "protect_s": took.as_secs_f64(),
        "same_qemu": same_qemu,
        "vm_state": g["vm"]["state"],
        "stage": g["vm"]["onboarding"]["stage"],
        "io_errors": io_errors,
        "protect_stderr": stderr.lines().filter(|l| l.contains("pivot")).collect::<Vec<_>>(),
    });
    say(format!(
        "pivot {mode} #{n}: agent {} | guest longest gap across the protect {} (usual {}, max before {}) | protect {:.1} s",
        fmt(pivot, "ms"),
        fmt(max(&across), "ms"),
        fmt(median(&before), "ms"),
        fmt(max(&before), "ms"),
        took.as_secs_f64()
    ));
    drop(tail);
    drop(guest);
    drop(c);
    Ok(r)
}

// ---------------------------------------------------------------------------
// part 2: throughput

fn dd_guest(
    o: &Opts,
    image: &GuestImage,
    lv: &SiteLibvirt,
    dir: &Path,
    disk: Disk,
) -> R<(Vec<f64>, Vec<String>)> {
    let console = dir.join("dd.console");
    let mut config = GuestConfig::new(
        "dd",
        disk,
        Workload::Dd {
            mib: o.dd_mib,
            rounds: o.dd_rounds,
        },
        dir,
    )
    .with_name("dd01")
    .with_console(&console);
    config.memory_mib = 256 + 2 * o.dd_mib;
    let tail = Tail::start(&console);
    let guest = Guest::start(lv.libvirt(), image, &config).map_err(err("start dd01"))?;
    let limit = BOOT + Duration::from_secs(u64::from(o.dd_rounds) * u64::from(o.dd_mib) * 2 + 60);
    tail.wait_line("DONE", guest.started_at(), limit, |l| {
        l.starts_with("DONE ")
    })?;
    let lines = tail.lines();
    let rates: Vec<f64> = lines
        .iter()
        .filter_map(|(_, l)| parse_rate(l))
        .map(|(b, ns)| b as f64 / (ns.max(1) as f64 / 1e9) / 1e6)
        .collect();
    let errors = lines
        .into_iter()
        .filter(|(_, l)| is_io_error(l))
        .map(|(_, l)| l)
        .collect();
    let _ = guest.wait_shut_off(Duration::from_secs(30));
    Ok((rates, errors))
}

fn throughput_case(o: &Opts, image: &GuestImage, case: &str) -> R<Value> {
    let dir = o.work.join(format!("tp-{case}"));
    fs::create_dir_all(&dir).map_err(err(dir.display()))?;
    let disk_bytes = (u64::from(o.dd_mib) * 2 + 64).max(128) << 20;
    let lv = SiteLibvirt::start("vb-tp").map_err(err("libvirt"))?;
    let (rates, errors, replica) = if case == "local" {
        let disk = dir.join("local.img");
        ext4::make_ext4(&disk, disk_bytes).map_err(err("mkfs"))?;
        let (r, e) = dd_guest(o, image, &lv, &dir, Disk::File(disk))?;
        (r, e, Value::Null)
    } else {
        let chi_lv = SiteLibvirt::start("vb-tp-chi").map_err(err("chicago's libvirt"))?;
        let volume = "tp-vda";
        let groups = format!(
            "[[group]]\nname = \"tp\"\nprimary = \"ny\"\nreplicas = [ {{ site = \"chicago\", priority = 1 }} ]\n\
             mode = \"{case}\"\nvolumes = [ {{ name = \"{volume}\", size = \"{}MiB\" }} ]\n",
            disk_bytes >> 20
        );
        let mut c = Cluster::new(
            &o.tandem,
            &dir.join("c"),
            &[("ny", lv.uri()), ("chicago", chi_lv.uri())],
            "kind = \"none\"",
            &groups,
            None,
        )?;
        // The same empty file system at both sites before the first start.
        let seed = dir.join("seed.img");
        ext4::make_ext4(&seed, disk_bytes).map_err(err("mkfs"))?;
        for a in &c.agents {
            let to = a.image(volume);
            fs::create_dir_all(to.parent().expect("a parent")).map_err(err("mkdir"))?;
            fs::copy(&seed, &to).map_err(err(to.display()))?;
        }
        fs::remove_file(&seed).map_err(err("rm seed"))?;
        c.site_mut("chicago").start()?;
        c.site_mut("ny").start()?;
        wait_replicated(&c, "ny", "tp", Duration::from_secs(120))?;
        let disk = Disk::TandemNbd {
            socket: c.site("ny").socket(volume),
            export: volume.into(),
            reconnect_delay_secs: 30,
        };
        let (r, e) = dd_guest(o, image, &lv, &dir, disk)?;
        let g = c.site("ny").group("tp");
        let replica = json!({
            "state": g["replicas"][0]["state"],
            "lag_bytes": g["replicas"][0]["lag_bytes"],
        });
        drop(c);
        drop(chi_lv);
        (r, e, replica)
    };
    say(format!(
        "throughput {case}: {} (rounds, MB/s: {})",
        fmt(median(&rates), "MB/s"),
        rates
            .iter()
            .map(|r| format!("{r:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    drop(lv);
    Ok(json!({
        "case": case,
        "rounds_mb_s": rates,
        "median_mb_s": median(&rates),
        "io_errors": errors,
        "replica_after": replica,
    }))
}

// ---------------------------------------------------------------------------
// part 3: failover

const FO_SITES: [&str; 3] = ["ny", "chicago", "seattle"];

fn failover_trial(o: &Opts, image: &GuestImage, n: usize) -> R<Value> {
    let dir = o.work.join(format!("fo-{n}"));
    fs::create_dir_all(&dir).map_err(err(dir.display()))?;
    let mut hosts = Vec::new();
    for s in FO_SITES {
        hosts.push(SiteLibvirt::start(&format!("vb-{s}")).map_err(err(format!("{s}'s libvirt")))?);
    }
    let host = |s: &str| &hosts[FO_SITES.iter().position(|x| *x == s).expect("a site")];
    let witness = Witness::start(&o.tandem, &dir)?;
    let section = format!(
        "kind = \"witness\"\nendpoints = [\"{}\"]\nlease_ttl = \"{}\"",
        witness.addr, o.lease_ttl
    );
    let sites: Vec<(&str, &str)> = FO_SITES.iter().map(|s| (*s, host(s).uri())).collect();
    let mut c = Cluster::new(
        &o.tandem,
        &dir.join("c"),
        &sites,
        &section,
        "",
        Some(witness),
    )?;
    for s in FO_SITES.iter().rev() {
        c.site_mut(s).start()?;
    }

    // web01 at ny on a plain raw file: the plain boot baseline.
    let disk = dir.join("web01.img");
    ext4::make_ext4(&disk, o.disk_mib << 20).map_err(err("mkfs"))?;
    let console = dir.join("web01.console");
    let config = GuestConfig::new("fo", Disk::File(disk), Workload::Write, &dir)
        .with_name("web01")
        .with_console(&console);
    let xml = xml_appending("web01", image, &config, &console);
    let tail = Tail::start(&console);
    let guest = Guest::start_xml(host("ny").libvirt(), "web01", &xml, &console)
        .map_err(err("start web01"))?;
    let running = Instant::now(); // `virsh start` returned: QEMU runs
    let first = tail.wait_line("the first ACK", guest.started_at(), BOOT, |l| {
        parse_ack(l).is_some()
    })?;
    let plain_start_to_write = ms(first - guest.started_at());
    let plain_running_to_write = ms(first - running);
    let plain_mounted = tail
        .lines()
        .iter()
        .find(|(_, l)| l == "MOUNTED")
        .map(|(t, _)| ms(*t - running));

    let (took, _) = protect(
        c.site("ny"),
        &[
            "web01",
            "--replica",
            "chicago",
            "--replica",
            "seattle",
            "--mode",
            &o.fo_mode,
        ],
    )?;
    let pivot = c.site("ny").group("web01")["vm"]["onboarding"]["disks"][0]["pivot_ms"].as_f64();
    // The definition reached the replicas, which stream with nothing owed.
    for s in ["chicago", "seattle"] {
        let def = c.site(s).data.join("vms/web01.xml");
        wait(
            &format!("web01's definition at {s}"),
            Duration::from_secs(60),
            Duration::from_millis(100),
            || Ok(def.exists().then_some(())),
        )?;
    }
    wait_replicated(&c, "ny", "web01", Duration::from_secs(120))?;
    sleep(Duration::from_secs(2))?;
    let acks_before = tail.acks().len();

    // ny is lost: its agent SIGKILLed, then its host (libvirtd, QEMU).
    let t0 = Instant::now();
    c.site_mut("ny").kill();
    host("ny").crash_host().map_err(err("crash ny's host"))?;
    let crashed = ms(t0.elapsed());
    let mut last_seen = Vec::new();
    let (site, t_qemu) = wait(
        "web01's QEMU at another site",
        FAILOVER,
        Duration::from_millis(10),
        || {
            for s in ["chicago", "seattle"] {
                if host(s).qemu_pid("web01").is_some() {
                    return Ok(Some((s, Instant::now())));
                }
            }
            Ok(None)
        },
    )
    .map_err(|e| {
        for s in ["chicago", "seattle"] {
            last_seen.push(format!("{s}: {}", c.site(s).group("web01")));
        }
        format!("{e}\nstatus: {}\n{}", last_seen.join("\n"), c.log_tails(25))
    })?;
    let t_init = tail.wait_line("the new boot", t0, FAILOVER, |l| {
        l.starts_with("TANDEM-INIT")
    });
    let t_write = t_init.and_then(|ti| {
        tail.wait_line("the first write at the new site", ti, FAILOVER, |l| {
            parse_ack(l).is_some()
        })
    });
    let mounted = tail
        .lines()
        .into_iter()
        .find(|(t, l)| *t > t0 && l == "MOUNTED")
        .map(|(t, _)| t);
    let io_errors: Vec<String> = tail
        .lines()
        .into_iter()
        .filter(|(t, l)| *t > t0 && is_io_error(l))
        .map(|(_, l)| l)
        .collect();
    // Files acknowledged at ny and missing after the failover: the new
    // boot's `RESUME <M>` names the highest file it found.
    let last_ack = tail
        .lines()
        .iter()
        .filter(|(t, _)| *t < t0)
        .filter_map(|(_, l)| parse_ack(l))
        .max();
    let resume = tail
        .lines()
        .iter()
        .filter(|(t, _)| *t > t0)
        .find_map(|(_, l)| l.strip_prefix("RESUME ")?.trim().parse::<u64>().ok());
    let lost = match (last_ack, resume) {
        (Some(a), Some(r)) => Some(a.saturating_sub(r)),
        (Some(a), None) if t_write.is_ok() => Some(a), // started from f1
        _ => None,
    };
    let others: Vec<&str> = ["chicago", "seattle"]
        .into_iter()
        .filter(|s| host(s).qemu_pid("web01").is_some())
        .collect();
    let g = c.site(site).group("web01");
    let kill_to_qemu = ms(t_qemu - t0);
    let (kill_to_write, write_error) = match &t_write {
        Ok(t) => (Some(ms(*t - t0)), Value::Null),
        Err(e) => (None, json!(e)),
    };
    say(format!(
        "failover #{n}: kill -> QEMU at {site} {} -> first write {} (QEMU running -> write {}; plain boot QEMU running -> write {}); last ACK before the kill {last_ack:?}, RESUME {resume:?}",
        fmt(Some(kill_to_qemu), "s"),
        fmt(kill_to_write, "s"),
        fmt(kill_to_write.map(|w| w - kill_to_qemu), "s"),
        fmt(Some(plain_running_to_write), "s"),
    ));
    if let Err(e) = &t_write {
        say(format!("failover #{n}: no write at the new site: {e}"));
    }
    let r = json!({
        "new_site": site,
        "kill_to_qemu_ms": kill_to_qemu,
        "kill_to_first_write_ms": kill_to_write,
        "qemu_to_first_write_ms": kill_to_write.map(|w| w - kill_to_qemu),
        "qemu_to_mounted_ms": mounted.map(|m| ms(m - t_qemu)),
        "first_write_error": write_error,
        "crash_ms": crashed,
        "running_at": others,
        "new_primary": {"role": g["role"], "epoch": g["epoch"], "vm": g["vm"]},
        "acks_before_kill": acks_before,
        "last_ack_before_kill": last_ack,
        "resume_after": resume,
        "acked_files_lost": lost,
        "io_errors_after_kill": io_errors,
        "protect_s": took.as_secs_f64(),
        "pivot_ms": pivot,
        "plain_boot": {
            "start_to_first_write_ms": plain_start_to_write,
            "running_to_first_write_ms": plain_running_to_write,
            "running_to_mounted_ms": plain_mounted,
        },
    });
    drop(tail);
    drop(guest);
    drop(c);
    drop(hosts);
    Ok(r)
}

// ---------------------------------------------------------------------------
// report

/// The 1-minute load average.
fn loadavg() -> Option<f64> {
    fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn col(v: &[Value], key: &str) -> Vec<f64> {
    v.iter().filter_map(|t| t[key].as_f64()).collect()
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--sweep") {
        SiteLibvirt::remove_stale_sites();
        return;
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("[vms] cannot handle signal {sig}: {e}");
        }
    }
    let _ = STOP.set(stop);
    let code = match run() {
        Ok(failed) => i32::from(failed),
        Err(e) if e == INTERRUPTED || interrupted() => {
            say("interrupted; everything started was stopped");
            130
        }
        Err(e) => {
            say(format!("error: {e}"));
            1
        }
    };
    std::process::exit(code);
}

/// Runs the parts; Ok(true) when a trial failed.
fn run() -> R<bool> {
    let o = Opts::from_env()?;
    let image = GuestImage::ensure().map_err(err("guest image"))?;
    let load_start = loadavg();
    if load_start.is_some_and(|l| l > 1.0) {
        say(format!(
            "warning: load average {:.1} at the start: other work on this machine skews the figures",
            load_start.unwrap_or_default()
        ));
    }
    let mut failed = false;
    let mut result = json!({
        "bench": "vms",
        "settings": {
            "trials": o.trials, "pivot_modes": o.pivot_modes, "dd_mib": o.dd_mib,
            "dd_rounds": o.dd_rounds, "fo_trials": o.fo_trials, "fo_mode": o.fo_mode,
            "lease_ttl": o.lease_ttl, "disk_mib": o.disk_mib,
        },
    });
    let mut report = Vec::new();
    let mut errors = Vec::new();
    let mut trial = |what: String, r: R<Value>, into: &mut Vec<Value>| -> R<()> {
        match r {
            Ok(v) => into.push(v),
            Err(e) if e == INTERRUPTED || interrupted() => return Err(INTERRUPTED.into()),
            Err(e) => {
                say(format!("{what} FAILED: {e}"));
                errors.push(json!({"trial": what, "error": e}));
                failed = true;
            }
        }
        Ok(())
    };

    if o.parts.iter().any(|p| p == "pivot") {
        let mut by_mode = serde_json::Map::new();
        for mode in &o.pivot_modes {
            let mut trials = Vec::new();
            for n in 1..=o.trials {
                say(format!("pivot ({mode}): trial {n}/{}", o.trials));
                trial(
                    format!("pivot {mode} #{n}"),
                    pivot_trial(&o, &image, mode, n),
                    &mut trials,
                )?;
            }
            let (p, g, b) = (
                col(&trials, "pivot_ms"),
                col(&trials, "gap_max_across_ms"),
                col(&trials, "gap_median_before_ms"),
            );
            report.push(format!(
                "onboarding pivot, --mode {mode} ({} trials)\n  agent's pivot          median {:>8}  max {:>8}   (target <= 1000 ms)\n  guest: longest ACK gap median {:>8}  max {:>8}   across the whole protect\n  guest: usual ACK gap   median {:>8}  max {:>8}   before it; ratio of medians {}",
                trials.len(),
                fmt(median(&p), "ms"), fmt(max(&p), "ms"),
                fmt(median(&g), "ms"), fmt(max(&g), "ms"),
                fmt(median(&b), "ms"), fmt(max(&col(&trials, "gap_max_before_ms")), "ms"),
                match (median(&g), median(&b)) { (Some(g), Some(b)) if b > 0.0 => format!("{:.1}x", g / b), _ => "-".into() },
            ));
            by_mode.insert(
                mode.clone(),
                json!({
                    "trials": trials,
                    "pivot_ms": {"median": median(&p), "max": max(&p)},
                    "gap_max_across_ms": {"median": median(&g), "max": max(&g)},
                    "gap_median_before_ms": {"median": median(&b)},
                }),
            );
        }
        result["pivot"] = Value::Object(by_mode);
    }

    if o.parts.iter().any(|p| p == "throughput") {
        let mut cases = Vec::new();
        for case in ["local", "async", "sync"] {
            say(format!("throughput: {case}"));
            trial(
                format!("throughput {case}"),
                throughput_case(&o, &image, case),
                &mut cases,
            )?;
        }
        let get = |case: &str| {
            cases
                .iter()
                .find(|c| c["case"] == case)
                .and_then(|c| c["median_mb_s"].as_f64())
        };
        let local = get("local");
        let mut s = format!(
            "guest write throughput, dd bs=1M oflag=direct conv=fsync, {} MiB x {} rounds (median MB/s)\n  local raw file        {:>10}",
            o.dd_mib, o.dd_rounds, fmt(local, "MB/s")
        );
        for case in ["async", "sync"] {
            let v = get(case);
            let ratio = match (v, local) {
                (Some(v), Some(l)) if l > 0.0 => format!("{:.2}x local", v / l),
                _ => "-".into(),
            };
            s.push_str(&format!(
                "\n  tandem, 1 {case:<5} replica {:>10}   {ratio}",
                fmt(v, "MB/s")
            ));
        }
        report.push(s);
        result["throughput"] = json!(cases);
    }

    if o.parts.iter().any(|p| p == "failover") {
        let mut trials = Vec::new();
        for n in 1..=o.fo_trials {
            say(format!("failover: trial {n}/{}", o.fo_trials));
            trial(
                format!("failover #{n}"),
                failover_trial(&o, &image, n),
                &mut trials,
            )?;
        }
        let q = col(&trials, "kill_to_qemu_ms");
        let w = col(&trials, "kill_to_first_write_ms");
        let qw = col(&trials, "qemu_to_first_write_ms");
        let plain: Vec<f64> = trials
            .iter()
            .filter_map(|t| t["plain_boot"]["running_to_first_write_ms"].as_f64())
            .collect();
        let lost: Vec<u64> = trials
            .iter()
            .filter_map(|t| t["acked_files_lost"].as_u64())
            .collect();
        let no_write = trials
            .iter()
            .filter(|t| t["kill_to_first_write_ms"].is_null())
            .count();
        report.push(format!(
            "protected VM failover (SIGKILL of ny's agent + ny's host lost; witness, lease {}; --mode {}; {} trials)\n  kill -> QEMU running at the new site    median {:>8}  max {:>8}   (target: median <= 5 s)\n  kill -> first guest write there        median {:>8}  max {:>8}{}\n    of which QEMU running -> first write  median {:>8}  max {:>8}\n  plain boot, QEMU running -> first write median {:>8}  max {:>8}   (TCG boot; the same guest's first boot at ny, local file)\n  acknowledged files missing after the failover: {} (of {} trials checked)\n  new site: {}",
            o.lease_ttl, o.fo_mode, trials.len(),
            fmt(median(&q), "s"), fmt(max(&q), "s"),
            fmt(median(&w), "s"), fmt(max(&w), "s"),
            if no_write > 0 { format!("   ({no_write} trials without a write)") } else { String::new() },
            fmt(median(&qw), "s"), fmt(max(&qw), "s"),
            fmt(median(&plain), "s"), fmt(max(&plain), "s"),
            lost.iter().sum::<u64>(), lost.len(),
            trials.iter().filter_map(|t| t["new_site"].as_str()).collect::<Vec<_>>().join(", "),
        ));
        result["failover"] = json!({
            "trials": trials,
            "kill_to_qemu_ms": {"median": median(&q), "max": max(&q)},
            "kill_to_first_write_ms": {"median": median(&w), "max": max(&w)},
            "qemu_to_first_write_ms": {"median": median(&qw), "max": max(&qw)},
            "plain_running_to_first_write_ms": {"median": median(&plain), "max": max(&plain)},
        });
    }

    result["errors"] = json!(errors);
    result["loadavg_1m"] = json!({"start": load_start, "end": loadavg()});
    println!("\n==== bench/vms.sh results ====");
    for r in &report {
        println!("\n{r}");
    }
    if let Some(errs) = result["errors"].as_array().filter(|e| !e.is_empty()) {
        println!("\nFAILED trials ({}):", errs.len());
        for e in errs {
            let text = e["error"].as_str().unwrap_or_default();
            println!("  {}: {}", e["trial"], text.lines().next().unwrap_or(""));
        }
    }
    let text = serde_json::to_string_pretty(&result).map_err(err("JSON"))?;
    fs::write(&o.out, text).map_err(err(o.out.display()))?;
    println!(
        "\nload average (1 min) at the start {}, at the end {}",
        fmt(load_start, ""),
        fmt(loadavg(), "")
    );
    println!("\nJSON: {}", o.out.display());
    Ok(failed)
}
