//! A Jepsen-style randomized fault test of failover (SPEC G3, G4, G6).
//!
//! Three sites (ny primary; chicago priority 1; seattle priority 2), each
//! agent in its own network namespace, and a `tandem witness` in a fourth,
//! all on one bridge (in a fifth, "hub" namespace), talking mutual TLS. One
//! client process (`/usr/bin/python3` with Debian's libnbd bindings) runs
//! one writer per site socket: each writes 4 KiB blocks with FUA, stamped
//! with (site, epoch, counter), through whichever site serves the group,
//! and logs every write it issues and every acknowledgement it receives
//! with one monotonic clock. The epoch of a connection comes from its
//! export description ("Tandem volume v of group g, epoch N").
//!
//! Faults, drawn from a printed seed (`TANDEM_JEPSEN_SEED` replays the
//! same schedule; targets named "the serving site" resolve at run time):
//! SIGKILL of an agent and restart after a random delay, SIGKILL and
//! restart of the witness, and `nft` partitions inside a site's namespace
//! (cut from the coordinator only, from its peers only, or from both),
//! the witness killed while a site is partitioned (failsafe ownership
//! must then fence the owner if the cut site is one of the group's), then
//! healed; sometimes two at once. After every round the test waits
//! (bounded) for a write acknowledged after the heal.
//!
//! Checks:
//! 1. never two sites acknowledging writes in the same epoch, and every
//!    acknowledgement of an epoch received before the first of any later
//!    epoch (G6), after every round;
//! 2. at the end (faults healed, writer stopped, every replica streaming
//!    with nothing owed): every replica image equals the owner's, every
//!    block holds zeroes or the untorn stamp of a write issued to that
//!    block, and the image is the result of one history made of a
//!    *prefix* of each epoch's writes, in epoch order (G3) — acknowledged
//!    writes may be lost at a failover in async mode, but not in the final
//!    epoch;
//! 3. in sync mode (`sync_replicas = 2`, `on_sync_loss = "suspend"`),
//!    additionally no acknowledged write is lost (G4): its block holds it
//!    or a later write to the same block;
//! 4. failsafe ownership: a round that only kills the witness, started
//!    with every replica caught up, never pauses writes for more than
//!    [`FAILSAFE_PAUSE`].
//!
//! `TANDEM_JEPSEN_ROUNDS` / `TANDEM_JEPSEN_SYNC_ROUNDS` change the number
//! of rounds (for longer soaks); `TANDEM_JEPSEN_KEEP=1` keeps the
//! temporary directory (logs, images, the write log) of a passing run; a
//! failing run always keeps it and prints where.

#![allow(clippy::unwrap_used)]
#![allow(clippy::cast_possible_truncation)] // small images, site and block numbers; a seed keeps the low bits on purpose

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
use rustix::time::{clock_gettime, ClockId};

const SITES: [&str; 3] = ["ny", "chicago", "seattle"];
const VOLUME: &str = "v";
const BLOCK: usize = 4096;
/// 8 MiB: small enough that blocks are overwritten often.
const BLOCKS: u64 = 2048;
const LEASE_TTL: &str = "2s";
const PYTHON: &str = "/usr/bin/python3";
const MAGIC: &[u8; 8] = b"TNDMJEP1";
/// A stamp: magic, site, block, epoch, counter (little endian), repeated
/// to fill the block.
const STAMP: usize = 32;

/// The longest write pause allowed while only the witness is down and
/// every site is healthy (failsafe; the target is one lease renewal, 1 s,
/// with room for a loaded 2-core machine).
const FAILSAFE_PAUSE: f64 = 2.0;

const ASYNC_ROUNDS: usize = 40;
const SYNC_ROUNDS: usize = 15;

#[test]
fn jepsen_async_randomized_faults_keep_one_writer_per_epoch_and_prefix_consistent_images() {
    let rounds = env_usize("TANDEM_JEPSEN_ROUNDS", ASYNC_ROUNDS);
    run(Mode::Async, rounds, 'a');
}

#[test]
fn jepsen_sync_randomized_faults_lose_no_acknowledged_write() {
    let rounds = env_usize("TANDEM_JEPSEN_SYNC_ROUNDS", SYNC_ROUNDS);
    run(Mode::Sync, rounds, 's');
}

/// The checkers themselves catch what they are meant to catch (no
/// cluster: hand-made write logs and images).
#[test]
fn jepsen_checkers_catch_overlapping_epochs_lost_writes_and_non_prefix_images() {
    let log_of = |lines: &[&str]| {
        let mut log = WriteLog::default();
        for l in lines {
            log.parse(l);
        }
        log
    };
    // (block, Some((site, epoch, counter)) or zeroes)
    type Content = (u64, Option<(usize, u64, u64)>);
    let image_of = |blocks: &[Content]| {
        let mut image = vec![0u8; BLOCKS as usize * BLOCK];
        for &(b, stamp) in blocks {
            if let Some((site, epoch, ctr)) = stamp {
                let mut head = Vec::with_capacity(STAMP);
                head.extend_from_slice(MAGIC);
                head.extend_from_slice(&(site as u32).to_le_bytes());
                head.extend_from_slice(&(b as u32).to_le_bytes());
                head.extend_from_slice(&epoch.to_le_bytes());
                head.extend_from_slice(&ctr.to_le_bytes());
                let at = b as usize * BLOCK;
                for k in 0..BLOCK / STAMP {
                    image[at + k * STAMP..at + (k + 1) * STAMP].copy_from_slice(&head);
                }
            }
        }
        image
    };
    let nowhere = |_: f64| String::from("-");

    // G6: epochs that overlap, and two sites in one epoch.
    let ok = log_of(&[
        "I 0 1 1 5 1.0",
        "A 0 1 1 5 1.1",
        "I 1 2 1 6 2.0",
        "A 1 2 1 6 2.1",
    ]);
    assert!(check_epochs(&ok, &nowhere).is_ok());
    let overlap = log_of(&[
        "I 0 1 1 5 1.0",
        "A 0 1 1 5 1.1",
        "I 1 2 1 6 2.0",
        "A 1 2 1 6 2.1",
        "I 0 1 2 7 2.0",
        "A 0 1 2 7 2.2",
    ]);
    let e = check_epochs(&overlap, &nowhere).unwrap_err();
    assert!(e.contains("overlapping epochs"), "{e}");
    let twice = log_of(&[
        "I 0 1 1 5 1.0",
        "A 0 1 1 5 1.1",
        "I 1 1 1 6 2.0",
        "A 1 1 1 6 2.1",
    ]);
    let e = check_epochs(&twice, &nowhere).unwrap_err();
    assert!(
        e.contains("two sites acknowledged writes in epoch 1"),
        "{e}"
    );

    // ny (epoch 1) writes blocks 0, 1, 0, 2; chicago takes over (epoch 2)
    // from ny's second write and writes block 2.
    let history = log_of(&[
        "I 0 1 1 0 1.0",
        "A 0 1 1 0 1.1",
        "I 0 1 2 1 1.2",
        "A 0 1 2 1 1.3",
        "I 0 1 3 0 1.4",
        "A 0 1 3 0 1.5",
        "I 0 1 4 2 1.6",
        "A 0 1 4 2 1.7",
        "I 1 2 1 2 3.0",
        "A 1 2 1 2 3.1",
        "I 1 2 2 3 3.2",
    ]);
    let forked = image_of(&[
        (0, Some((0, 1, 1))),
        (1, Some((0, 1, 2))),
        (2, Some((1, 2, 1))),
    ]);
    // Async: ny's third write was lost at the failover, which is allowed.
    let r = check_image(&forked, &history, (2, 1), Mode::Async, &nowhere).unwrap();
    assert_eq!((r.blocks_written, r.lost_acked), (3, 1));
    // The never-acknowledged write may have taken effect too.
    let with_in_flight = image_of(&[
        (0, Some((0, 1, 1))),
        (1, Some((0, 1, 2))),
        (2, Some((1, 2, 1))),
        (3, Some((1, 2, 2))),
    ]);
    assert!(check_image(&with_in_flight, &history, (2, 1), Mode::Async, &nowhere).is_ok());
    // Sync: that loss is a violation.
    let e = check_image(&forked, &history, (2, 1), Mode::Sync, &nowhere).unwrap_err();
    assert!(e.contains("lost") && e.contains("ny write #3"), "{e}");
    // Async, but a write of the final epoch lost.
    let e = check_image(
        &image_of(&[(0, Some((0, 1, 1))), (1, Some((0, 1, 2)))]),
        &history,
        (2, 1),
        Mode::Async,
        &nowhere,
    )
    .unwrap_err();
    assert!(e.contains("chicago write #1"), "{e}");
    // Not a prefix: ny's fourth write took effect, its third did not
    // (seattle owns epoch 3 at the end, having written nothing).
    let holes = image_of(&[
        (0, Some((0, 1, 1))),
        (1, Some((0, 1, 2))),
        (2, Some((0, 1, 4))),
    ]);
    let e = check_image(&holes, &history, (3, 2), Mode::Async, &nowhere).unwrap_err();
    assert!(e.contains("not a prefix"), "{e}");
    // A write found in the wrong block, a torn block, an unknown stamp.
    let mut misplaced = forked.clone();
    misplaced.copy_within(0..BLOCK, 5 * BLOCK);
    assert!(check_image(&misplaced, &history, (2, 1), Mode::Async, &nowhere).is_err());
    let mut torn = forked.clone();
    torn[BLOCK + 100] ^= 1;
    let e = check_image(&torn, &history, (2, 1), Mode::Async, &nowhere).unwrap_err();
    assert!(e.contains("torn"), "{e}");
    let unknown = image_of(&[(0, Some((2, 1, 1)))]);
    assert!(check_image(&unknown, &history, (2, 1), Mode::Async, &nowhere).is_err());
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Async,
    Sync,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Async => "async",
            Mode::Sync => "sync",
        }
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
        })
        .unwrap_or(default)
}

/// Seconds on CLOCK_MONOTONIC: the clock Python's `time.monotonic()`
/// reads, so the test's times and the write log's compare.
fn mono() -> f64 {
    let ts = clock_gettime(ClockId::Monotonic);
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// splitmix64: the fault schedule, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

// ---------------------------------------------------------------------------
// Network: a hub namespace holding a bridge; sites 0..3 and the witness (3)
// each in their own namespace on it, 10.77.0.(i+1)/24.

struct Net {
    hub: String,
    names: Vec<String>,
    dir: PathBuf,
}

const WITNESS: usize = 3;

impl Net {
    fn new(tag: char, dir: &Path) -> Net {
        let ip = tool("ip");
        let tc = tool("tc");
        tool("nft");
        let id = std::process::id() % 1000;
        let hub = format!("tj{id}{tag}h");
        let names: Vec<String> = (0..4).map(|i| format!("tj{id}{tag}{i}")).collect();
        let net = Net {
            hub: hub.clone(),
            names: names.clone(),
            dir: dir.to_path_buf(),
        };
        let sh = |args: &[&str]| {
            run_ok(Command::new(&ip).args(args), Duration::from_secs(10));
        };
        for n in std::iter::once(&hub).chain(&names) {
            let _ = run_with_timeout(
                Command::new(&ip).args(["netns", "del", n]),
                Duration::from_secs(10),
            );
            sh(&["netns", "add", n]);
            sh(&["-n", n, "link", "set", "lo", "up"]);
        }
        sh(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        sh(&["-n", &hub, "link", "set", "br0", "up"]);
        for (i, n) in names.iter().enumerate() {
            let (h, s) = (format!("tj{id}{tag}{i}h"), format!("tj{id}{tag}{i}s"));
            sh(&[
                "link", "add", &h, "netns", &hub, "type", "veth", "peer", "name", &s, "netns", n,
            ]);
            sh(&["-n", &hub, "link", "set", &h, "master", "br0"]);
            sh(&["-n", &hub, "link", "set", &h, "up"]);
            sh(&[
                "-n",
                n,
                "addr",
                "add",
                &format!("{}/24", Net::addr(i)),
                "dev",
                &s,
            ]);
            sh(&["-n", n, "link", "set", &s, "up"]);
            // A WAN-ish link: every site's egress shaped.
            run_ok(
                Command::new(&tc).args([
                    "-n", n, "qdisc", "add", "dev", &s, "root", "tbf", "rate", "200mbit", "burst",
                    "256kb", "latency", "50ms",
                ]),
                Duration::from_secs(10),
            );
        }
        net
    }

    fn addr(i: usize) -> String {
        format!("10.77.0.{}", i + 1)
    }

    /// Drops every packet between site `site` and the addresses of `cut`.
    fn partition(&self, site: usize, cut: Cut) {
        let mut addrs = Vec::new();
        if matches!(cut, Cut::Coordinator | Cut::Both) {
            addrs.push(Net::addr(WITNESS));
        }
        if matches!(cut, Cut::Peers | Cut::Both) {
            addrs.extend((0..3).filter(|&i| i != site).map(Net::addr));
        }
        let set = addrs.join(", ");
        let rules = format!(
            "table inet jepsen {{\n\
             \tchain input {{ type filter hook input priority 0; policy accept; ip saddr {{ {set} }} drop; }}\n\
             \tchain output {{ type filter hook output priority 0; policy accept; ip daddr {{ {set} }} drop; }}\n\
             }}\n"
        );
        let file = self.dir.join(format!("nft-{site}.rules"));
        std::fs::write(&file, rules).unwrap();
        run_ok(
            Command::new(tool("ip"))
                .args(["netns", "exec", &self.names[site]])
                .arg(tool("nft"))
                .arg("-f")
                .arg(&file),
            Duration::from_secs(10),
        );
    }

    fn heal(&self, site: usize) {
        run_ok(
            Command::new(tool("ip"))
                .args(["netns", "exec", &self.names[site]])
                .arg(tool("nft"))
                .args(["delete", "table", "inet", "jepsen"]),
            Duration::from_secs(10),
        );
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in self.names.iter().chain(std::iter::once(&self.hub)) {
            let _ = Command::new("ip")
                .args(["netns", "del", n])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Runs `f` on a thread that joined network namespace `ns`.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // setns(2) moves this thread only.
        move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network))
            .unwrap_or_else(|e| panic!("setns {path}: {e}"));
        f()
    })
    .join()
    .unwrap()
}

// ---------------------------------------------------------------------------
// Processes: agents and the witness, each inside its namespace (`ip netns
// exec` execs the program, so the child's pid is the program's).

struct Proc {
    ns: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{:?} already running", self.args);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(tool("ip"))
            .args(["netns", "exec", &self.ns, TANDEM])
            .args(&self.args)
            .env("TANDEM_LOG", "debug,ureq=info,rustls=info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and the exit status within a bound.
    fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        sigterm(&child);
        wait_child(&mut child, Duration::from_secs(40))
    }

    /// Some(status) if it exited by itself.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Agent {
    name: &'static str,
    config: PathBuf,
    data_dir: PathBuf,
    proc: Proc,
}

impl Agent {
    fn status(&self) -> Option<serde_json::Value> {
        let out = run_with_timeout(
            Command::new(tool("ip"))
                .args(["netns", "exec", &self.proc.ns, TANDEM])
                .args(["status", "--json", "--local", "--config"])
                .arg(&self.config),
            Duration::from_secs(15),
        );
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    fn group(&self) -> Option<serde_json::Value> {
        self.status().map(|s| s["groups"][0].clone())
    }

    fn socket(&self) -> PathBuf {
        self.data_dir.join("nbd").join(format!("{VOLUME}.sock"))
    }

    fn image(&self) -> PathBuf {
        self.data_dir.join("volumes").join(format!("{VOLUME}.img"))
    }
}

// ---------------------------------------------------------------------------
// The client: one Python process, one writer thread per site socket.

const WRITER_PY: &str = r#"
import os, random, re, struct, sys, threading, time
import nbd

BLOCKS = int(os.environ["JEP_BLOCKS"])
SEED = int(os.environ["JEP_SEED"])
PAUSE = float(os.environ["JEP_PAUSE"])
paths = sys.argv[1:]
lock = threading.Lock()
stop = threading.Event()
out = os.fdopen(1, "w", buffering=1)
DESC = re.compile(r"Tandem volume \S+ of group \S+, epoch (\d+)")

def emit(line):
    with lock:
        out.write(line + "\n")

def writer(site, path):
    rng = random.Random(SEED * 7919 + site)
    ctr = 0
    while not stop.is_set():
        h = nbd.NBD()
        try:
            h.set_full_info(True)
            h.connect_unix(path)
        except nbd.Error:
            del h
            time.sleep(0.02)
            continue
        try:
            desc = h.get_export_description()
        except nbd.Error as e:
            emit("X %d no export description: %s" % (site, e))
            del h
            time.sleep(0.2)
            continue
        m = DESC.fullmatch(desc or "")
        if not m:
            emit("X %d bad export description %r" % (site, desc))
            del h
            time.sleep(0.2)
            continue
        epoch = int(m.group(1))
        emit("C %d %d %.6f" % (site, epoch, time.monotonic()))
        try:
            while not stop.is_set():
                ctr += 1
                block = rng.randrange(BLOCKS)
                buf = struct.pack("<8sIIQQ", b"TNDMJEP1", site, block, epoch, ctr) * 128
                emit("I %d %d %d %d %.6f" % (site, epoch, ctr, block, time.monotonic()))
                h.pwrite(buf, block * 4096, nbd.CMD_FLAG_FUA)
                t = time.monotonic()
                emit("A %d %d %d %d %.6f" % (site, epoch, ctr, block, t))
                if PAUSE > 0:
                    time.sleep(PAUSE)
        except nbd.Error as e:
            emit("E %d %d %d %.6f %s" % (site, epoch, ctr, time.monotonic(),
                                         str(e).replace("\n", " ")))
        except Exception as e:
            emit("X %d %r" % (site, e))
        del h
        # A fenced owner with on_lost_lease = "error" fails every write at
        # once: do not spin.
        time.sleep(0.01)

threads = [threading.Thread(target=writer, args=(i, p), daemon=True)
           for i, p in enumerate(paths)]
for t in threads:
    t.start()
sys.stdin.read()
stop.set()
deadline = time.monotonic() + 10
for t in threads:
    t.join(max(0.0, deadline - time.monotonic()))
emit("D %.6f" % time.monotonic())
out.flush()
os._exit(0)
"#;

#[derive(Clone, Debug)]
struct Wr {
    site: usize,
    epoch: u64,
    ctr: u64,
    block: u64,
    issued: f64,
    acked: Option<f64>,
}

#[derive(Default)]
struct WriteLog {
    /// Every write issued, by (site, counter).
    writes: HashMap<(usize, u64), Wr>,
    /// (received, site, counter), in the order received.
    acks: Vec<(f64, usize, u64)>,
    /// (time, site, epoch) of every connection.
    conns: Vec<(f64, usize, u64)>,
    errors: u64,
    problems: Vec<String>,
    last_ack: f64,
    done: bool,
}

impl WriteLog {
    fn parse(&mut self, line: &str) {
        let f: Vec<&str> = line.split(' ').collect();
        let num =
            |i: usize| -> u64 { f[i].parse().unwrap_or_else(|_| panic!("write log: {line}")) };
        let time =
            |i: usize| -> f64 { f[i].parse().unwrap_or_else(|_| panic!("write log: {line}")) };
        match f[0] {
            "I" => {
                let w = Wr {
                    site: num(1) as usize,
                    epoch: num(2),
                    ctr: num(3),
                    block: num(4),
                    issued: time(5),
                    acked: None,
                };
                self.writes.insert((w.site, w.ctr), w);
            }
            "A" => {
                let (site, ctr, t) = (num(1) as usize, num(3), time(5));
                let w = self
                    .writes
                    .get_mut(&(site, ctr))
                    .unwrap_or_else(|| panic!("write log: ack of a write never issued: {line}"));
                w.acked = Some(t);
                self.acks.push((t, site, ctr));
                self.last_ack = self.last_ack.max(t);
            }
            "C" => self.conns.push((time(3), num(1) as usize, num(2))),
            "E" => self.errors += 1,
            "D" => self.done = true,
            _ => self.problems.push(line.to_string()),
        }
    }
}

struct Writer {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    reader: Option<JoinHandle<()>>,
    log: Arc<Mutex<WriteLog>>,
}

impl Writer {
    fn start(dir: &Path, sockets: &[PathBuf], seed: u64) -> Writer {
        let script = dir.join("writer.py");
        std::fs::write(&script, WRITER_PY).unwrap();
        let mut child = Command::new(PYTHON)
            .arg(&script)
            .args(sockets)
            .env("JEP_BLOCKS", BLOCKS.to_string())
            .env("JEP_SEED", (seed % 1_000_000_007).to_string())
            .env("JEP_PAUSE", "0.002")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("writer.err")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {PYTHON}: {e}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let log = Arc::new(Mutex::new(WriteLog::default()));
        let reader = {
            let log = Arc::clone(&log);
            let mut file =
                std::io::BufWriter::new(std::fs::File::create(dir.join("writes.log")).unwrap());
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(file, "{line}");
                    log.lock().unwrap().parse(&line);
                }
                let _ = file.flush();
            })
        };
        Writer {
            child: Some(child),
            stdin,
            reader: Some(reader),
            log,
        }
    }

    fn last_ack(&self) -> f64 {
        self.log.lock().unwrap().last_ack
    }

    /// The longest time without an acknowledgement within [from, to].
    fn longest_pause(&self, from: f64, to: f64) -> f64 {
        let log = self.log.lock().unwrap();
        let mut times: Vec<f64> = log
            .acks
            .iter()
            .map(|a| a.0)
            .filter(|t| *t >= from && *t <= to)
            .collect();
        times.sort_by(f64::total_cmp);
        let mut last = from;
        let mut pause: f64 = 0.0;
        for t in times {
            pause = pause.max(t - last);
            last = t;
        }
        pause.max(to - last)
    }

    /// The site of the newest acknowledgement.
    fn serving(&self) -> Option<usize> {
        let log = self.log.lock().unwrap();
        log.acks
            .iter()
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|a| a.1)
    }

    /// Stops the writers (bounded): writes still held count as in flight.
    fn stop(&mut self) {
        drop(self.stdin.take());
        if let Some(mut child) = self.child.take() {
            wait_child(&mut child, Duration::from_secs(30));
        }
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Faults.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cut {
    Coordinator,
    Peers,
    Both,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Kill(usize),
    KillWitness,
    Partition(usize, Cut),
    /// The witness killed and a site cut from its peers (and so from
    /// everything).
    WitnessAndPartition(usize),
}

impl Fault {
    fn target(self) -> Option<usize> {
        match self {
            Fault::Kill(s) | Fault::Partition(s, _) | Fault::WitnessAndPartition(s) => Some(s),
            Fault::KillWitness => None,
        }
    }

    fn describe(self) -> String {
        match self {
            Fault::Kill(s) => format!("SIGKILL {}", SITES[s]),
            Fault::KillWitness => "SIGKILL the witness".into(),
            Fault::Partition(s, Cut::Coordinator) => {
                format!("cut {} from the coordinator", SITES[s])
            }
            Fault::Partition(s, Cut::Peers) => format!("cut {} from its peers", SITES[s]),
            Fault::Partition(s, Cut::Both) => {
                format!("cut {} from the coordinator and its peers", SITES[s])
            }
            Fault::WitnessAndPartition(s) => {
                format!("SIGKILL the witness and cut {} from its peers", SITES[s])
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The cluster under test.

struct Harness {
    mode: Mode,
    seed: u64,
    agents: Vec<Agent>,
    witness: Proc,
    writer: Option<Writer>,
    /// (start, description) of every round, on the monotonic clock.
    rounds: Vec<(f64, String)>,
    net: Net,
    dir: Option<tempfile::TempDir>,
}

impl Harness {
    fn new(mode: Mode, seed: u64, tag: char, on_lost_lease: &str) -> Harness {
        // Every tool first: a missing one fails here, with its name.
        for t in ["ip", "tc", "nft", "qemu-img"] {
            tool(t);
        }
        let probe = run_with_timeout(
            Command::new(PYTHON).args(["-c", "import nbd; nbd.NBD().set_full_info(True)"]),
            Duration::from_secs(30),
        );
        assert!(
            probe.status.success(),
            "{PYTHON} cannot import libnbd's Python bindings (Debian package python3-libnbd; run scripts/test, which installs it): {probe:?}"
        );
        let dir = tempfile::Builder::new()
            .prefix("tj")
            .tempdir_in("/tmp")
            .unwrap();
        let net = Net::new(tag, dir.path());
        let pki = dir.path().join("pki");
        run_ok(
            Command::new(TANDEM)
                .args(["certs", "create", "--out"])
                .arg(&pki)
                .args(SITES),
            Duration::from_secs(30),
        );
        let peers: String = SITES
            .iter()
            .enumerate()
            .map(|(i, n)| {
                format!(
                    "[[peer]]\nname = \"{n}\"\naddress = \"{}:7450\"\n\n",
                    Net::addr(i)
                )
            })
            .collect();
        let mode_keys = match mode {
            Mode::Async => "mode = \"async\"\n".to_string(),
            Mode::Sync => {
                "mode = \"sync\"\nsync_replicas = 2\non_sync_loss = \"suspend\"\n".to_string()
            }
        };
        let agents = SITES
            .iter()
            .enumerate()
            .map(|(i, &name)| {
                let data_dir = dir.path().join(name);
                let text = format!(
                    "[site]\nname = \"{name}\"\ndata_dir = \"{data}\"\nlisten = \"{addr}:7450\"\napi = \"127.0.0.1:7451\"\n\n\
                     [tls]\nca = \"{pki}/ca.pem\"\ncert = \"{pki}/{name}.pem\"\nkey = \"{pki}/{name}.key\"\n\n\
                     [coordinator]\nkind = \"witness\"\nendpoints = [\"{witness}:7460\"]\nlease_ttl = \"{LEASE_TTL}\"\n\n\
                     {peers}\
                     [[group]]\nname = \"g\"\nprimary = \"ny\"\n\
                     replicas = [ {{ site = \"chicago\", priority = 1 }}, {{ site = \"seattle\", priority = 2 }} ]\n\
                     {mode_keys}on_lost_lease = \"{on_lost_lease}\"\n\
                     volumes = [ {{ name = \"{VOLUME}\", size = \"{size}KiB\" }} ]\n",
                    data = data_dir.display(),
                    addr = Net::addr(i),
                    pki = pki.display(),
                    witness = Net::addr(WITNESS),
                    size = BLOCKS * BLOCK as u64 / 1024,
                );
                let config = dir.path().join(format!("{name}.toml"));
                std::fs::write(&config, text).unwrap();
                Agent {
                    name,
                    proc: Proc {
                        ns: net.names[i].clone(),
                        args: vec![
                            "agent".into(),
                            "--config".into(),
                            config.display().to_string(),
                        ],
                        log: dir.path().join(format!("{name}.log")),
                        child: None,
                    },
                    config,
                    data_dir,
                }
            })
            .collect();
        let witness = Proc {
            ns: net.names[WITNESS].clone(),
            args: vec![
                "witness".into(),
                "--listen".into(),
                format!("{}:7460", Net::addr(WITNESS)),
                "--data-dir".into(),
                dir.path().join("witness").display().to_string(),
                // HTTPS with the witness's certificate from the same
                // `certs create`: the sites prove their names to it.
                "--ca".into(),
                pki.join("ca.pem").display().to_string(),
                "--cert".into(),
                pki.join("witness.pem").display().to_string(),
                "--key".into(),
                pki.join("witness.key").display().to_string(),
            ],
            log: dir.path().join("witness.log"),
            child: None,
        };
        Harness {
            mode,
            seed,
            agents,
            witness,
            writer: None,
            rounds: Vec::new(),
            net,
            dir: Some(dir),
        }
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    fn tag(&self) -> String {
        format!("[{}] seed {}", self.mode.label(), self.seed)
    }

    fn writer(&self) -> &Writer {
        self.writer.as_ref().unwrap()
    }

    fn start_witness(&mut self) {
        self.witness.spawn();
        let (ns, addr) = (
            self.witness.ns.clone(),
            format!("{}:7460", Net::addr(WITNESS)),
        );
        let ok = holds_within(Duration::from_secs(15), || {
            let (ns, addr) = (ns.clone(), addr.clone());
            in_netns(&ns, move || {
                std::net::TcpStream::connect_timeout(
                    &addr.parse().unwrap(),
                    Duration::from_millis(500),
                )
                .is_ok()
            })
        });
        assert!(
            ok,
            "{}: the witness does not listen:\n{}",
            self.tag(),
            self.witness.tail(50)
        );
    }

    fn start_agent(&mut self, i: usize) {
        self.agents[i].proc.spawn();
        let ok = holds_within(Duration::from_secs(30), || {
            self.agents[i].proc.exited().is_some() || self.agents[i].status().is_some()
        });
        if let Some(status) = self.agents[i].proc.exited() {
            panic!(
                "{}: {} exited during start ({status}):\n{}",
                self.tag(),
                SITES[i],
                self.agents[i].proc.tail(50)
            );
        }
        assert!(ok, "{}: {}'s API does not answer", self.tag(), SITES[i]);
    }

    /// Which round a moment belongs to, for messages.
    fn round_at(&self, t: f64) -> String {
        match self.rounds.iter().rposition(|(start, _)| *start <= t) {
            Some(i) => format!("round {} ({})", i + 1, self.rounds[i].1),
            None => "setup (before any fault)".into(),
        }
    }

    /// What every site says, for failure messages.
    fn describe(&mut self) -> String {
        let mut s = String::new();
        for a in &mut self.agents {
            let alive = a.proc.child.is_some() && a.proc.exited().is_none();
            let g = if alive {
                a.group().map_or("no answer".into(), |g| g.to_string())
            } else {
                "not running".into()
            };
            s.push_str(&format!("\n  {}: {g}", a.name));
        }
        s
    }

    fn fail(&mut self, msg: String) -> ! {
        let state = self.describe();
        panic!("{}: {msg}\nsites now:{state}", self.tag());
    }

    fn inject(&mut self, f: Fault) {
        match f {
            Fault::Kill(s) => self.agents[s].proc.kill(),
            Fault::KillWitness => self.witness.kill(),
            Fault::Partition(s, cut) => self.net.partition(s, cut),
            Fault::WitnessAndPartition(s) => {
                self.witness.kill();
                self.net.partition(s, Cut::Peers);
            }
        }
    }

    fn heal(&mut self, f: Fault) {
        match f {
            Fault::Kill(s) => self.agents[s].proc.spawn(),
            Fault::KillWitness => self.start_witness(),
            Fault::Partition(s, _) => self.net.heal(s),
            Fault::WitnessAndPartition(s) => {
                self.net.heal(s);
                self.start_witness();
            }
        }
    }

    /// Fails if a process exited by itself.
    fn check_alive(&mut self) {
        let writer_exit = self
            .writer
            .as_mut()
            .and_then(|w| w.child.as_mut())
            .and_then(|c| c.try_wait().ok().flatten());
        if let Some(status) = writer_exit {
            let err = std::fs::read_to_string(self.dir().join("writer.err")).unwrap_or_default();
            self.fail(format!(
                "the NBD writer exited by itself ({status}):\n{err}"
            ));
        }
        let exited = self
            .agents
            .iter_mut()
            .find_map(|a| a.proc.exited().map(|s| (a.name, s, a.proc.tail(80))));
        if let Some((name, status, tail)) = exited {
            self.fail(format!("{name} exited by itself ({status}):\n{tail}"));
        }
        if let Some(status) = self.witness.exited() {
            let tail = self.witness.tail(80);
            self.fail(format!("the witness exited by itself ({status}):\n{tail}"));
        }
    }

    /// Whether writes were acknowledged in more than one epoch so far.
    fn failed_over(&self) -> bool {
        let log = self.writer().log.lock().unwrap();
        let first = log
            .writes
            .values()
            .find(|w| w.acked.is_some())
            .map(|w| w.epoch);
        log.writes
            .values()
            .any(|w| w.acked.is_some() && Some(w.epoch) != first)
    }

    /// Waits (bounded) until a write is acknowledged after `since`.
    fn wait_available(&mut self, since: f64, what: &str) -> f64 {
        let recovery = poll(Duration::from_secs(60), || {
            let last = self.writer().last_ack();
            if last > since {
                return Some(last - since);
            }
            self.check_alive();
            None
        });
        recovery.unwrap_or_else(|| {
            self.fail(format!(
                "no write acknowledged within 60 s after {what} (liveness)"
            ))
        })
    }

    /// Check 1 on everything logged so far; the closest hand-over.
    fn check_epochs(&mut self, when: &str) -> Option<(f64, u64)> {
        let result = {
            let log = self.writer().log.lock().unwrap();
            check_epochs(&log, &|t| self.round_at(t))
        };
        match result {
            Ok(closest) => closest,
            Err(e) => self.fail(format!("G6 violated (checked after {when}): {e}")),
        }
    }

    /// The one primary, with both replicas streaming from it and nothing
    /// owed, every site agreeing: (owner, epoch).
    fn settled(&self) -> Option<(usize, u64)> {
        let groups: Vec<Option<serde_json::Value>> =
            self.agents.iter().map(|a| a.group()).collect();
        let primaries: Vec<usize> = (0..3)
            .filter(|&i| groups[i].as_ref().is_some_and(|g| g["role"] == "primary"))
            .collect();
        let [owner] = primaries[..] else { return None };
        let g = groups[owner].as_ref()?;
        let epoch = g["epoch"].as_u64()?;
        let next = g["next_seq"].as_u64()?;
        let replicas = g["replicas"].as_array()?;
        let caught_up = replicas.len() == 2
            && replicas.iter().all(|r| {
                r["state"] == "streaming"
                    && r["lag_bytes"] == 0
                    && r["applied_seq"].as_u64().unwrap_or(0) + 1 >= next
                    && r["durable_seq"].as_u64().unwrap_or(0) + 1 >= next
            });
        let followers = (0..3).filter(|&i| i != owner).all(|i| {
            groups[i]
                .as_ref()
                .is_some_and(|g| g["role"] == "replica" && g["primary"] == SITES[owner])
        });
        (caught_up && followers).then_some((owner, epoch))
    }

    fn draw_fault(&self, rng: &mut Rng, exclude: &[Fault]) -> Fault {
        let serving = self.writer().serving().unwrap_or(0);
        let busy: Vec<usize> = exclude.iter().filter_map(|f| f.target()).collect();
        let witness_busy = exclude
            .iter()
            .any(|f| matches!(f, Fault::KillWitness | Fault::WitnessAndPartition(_)));
        loop {
            let kind = rng.below(100);
            let site = if rng.chance(0.55) {
                serving
            } else {
                rng.below(3) as usize
            };
            let f = if kind < 27 {
                Fault::Kill(site)
            } else if kind < 42 {
                Fault::KillWitness
            } else if kind < 52 {
                Fault::WitnessAndPartition(site)
            } else {
                let cut = match rng.below(3) {
                    0 => Cut::Coordinator,
                    1 => Cut::Peers,
                    _ => Cut::Both,
                };
                Fault::Partition(site, cut)
            };
            let clash = match f {
                Fault::WitnessAndPartition(s) => witness_busy || busy.contains(&s),
                _ => match f.target() {
                    Some(s) => busy.contains(&s),
                    None => witness_busy,
                },
            };
            if !clash {
                return f;
            }
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(w) = self.writer.as_mut() {
            drop(w.stdin.take());
            if let Some(mut c) = w.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for a in &mut self.agents {
            a.proc.kill();
        }
        self.witness.kill();
        let keep = std::thread::panicking() || std::env::var_os("TANDEM_JEPSEN_KEEP").is_some();
        if std::thread::panicking() {
            for a in &self.agents {
                eprintln!("--- {} log (last lines) ---\n{}", a.name, a.proc.tail(120));
            }
            eprintln!(
                "--- witness log (last lines) ---\n{}",
                self.witness.tail(40)
            );
        }
        if keep {
            if let Some(dir) = self.dir.take() {
                let path = dir.keep();
                eprintln!(
                    "jepsen [{}] seed {}: logs, images and the write log (writes.log) kept in {}",
                    self.mode.label(),
                    self.seed,
                    path.display()
                );
            }
        }
    }
}

/// Whether `cond` comes to hold within `timeout` (the harness then fails
/// with its own report of every site).
fn holds_within(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    poll(timeout, || cond().then_some(())).is_some()
}

// ---------------------------------------------------------------------------
// The run.

fn run(mode: Mode, rounds: usize, tag: char) {
    let seed = std::env::var("TANDEM_JEPSEN_SEED")
        .ok()
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("TANDEM_JEPSEN_SEED={s:?} is not a number"))
        })
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            (t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)) % 1_000_000_000
        });
    let mut rng = Rng(seed ^ 0x6A65_7073_656E);
    // Both fencing behaviours (G6), one per run.
    let on_lost_lease = if rng.chance(0.5) { "suspend" } else { "error" };
    eprintln!(
        "jepsen [{}]: seed {seed} ({rounds} rounds, on_lost_lease = \"{on_lost_lease}\"; replay with TANDEM_JEPSEN_SEED={seed})",
        mode.label()
    );
    let started = Instant::now();
    let mut h = Harness::new(mode, seed, tag, on_lost_lease);

    h.start_witness();
    for i in 0..3 {
        h.start_agent(i);
    }
    let ok = holds_within(Duration::from_secs(30), || {
        h.agents[0]
            .group()
            .is_some_and(|g| g["role"] == "primary" && g["epoch"] == 1)
    });
    if !ok {
        h.fail("ny never became primary in epoch 1".into());
    }
    let sockets: Vec<PathBuf> = h.agents.iter().map(Agent::socket).collect();
    h.writer = Some(Writer::start(h.dir(), &sockets, seed));
    let t0 = mono();
    h.wait_available(t0, "the writer started");
    if !holds_within(Duration::from_secs(60), || h.settled().is_some()) {
        h.fail("the replicas never caught up before the first fault".into());
    }

    let mut max_recovery = (0.0f64, 0usize);
    for round in 1..=rounds {
        let mut faults = vec![h.draw_fault(&mut rng, &[])];
        if rng.chance(0.25) {
            let second = h.draw_fault(&mut rng, &faults);
            faults.push(second);
        }
        let mut hold = rng.millis(300, 5000);
        if round == rounds && !h.failed_over() {
            // Failsafe keeps an owner cut from the coordinator alone (and
            // a short kill keeps its lease): a run whose draws made no
            // failover ends with one that does, so every run exercises one.
            let serving = h.writer().serving().unwrap_or(0);
            faults = vec![Fault::Kill(serving)];
            hold = Duration::from_millis(4500);
        }
        let gap = rng.millis(0, 800);
        let steady = rng.millis(200, 1500);
        let heal_second_first = rng.chance(0.5);
        let what: Vec<String> = faults.iter().map(|f| f.describe()).collect();
        let what = what.join(" + ");
        eprintln!(
            "jepsen [{}] round {round}/{rounds}: {what} for {:.1} s",
            mode.label(),
            hold.as_secs_f64()
        );
        h.rounds.push((mono(), what.clone()));
        // Failsafe (check 4): the witness alone dies while every replica
        // is caught up: writes must not stop.
        let failsafe_round = faults == [Fault::KillWitness] && h.settled().is_some();
        let injected = mono();
        // The fault schedule: these sleeps are the faults' durations and
        // gaps drawn from the seed (bounded by the draws' ranges), which
        // is what the round tests; nothing is synchronised by them.
        h.inject(faults[0]);
        if faults.len() > 1 {
            std::thread::sleep(gap);
            h.inject(faults[1]);
        }
        std::thread::sleep(hold);
        let mut order = faults.clone();
        if heal_second_first {
            order.reverse();
        }
        if failsafe_round {
            let pause = h.writer().longest_pause(injected, mono());
            eprintln!("jepsen: failsafe round: longest write pause {pause:.3} s");
            if pause > FAILSAFE_PAUSE {
                h.fail(format!(
                    "round {round} ({what}): writes paused {pause:.3} s with only the witness down and every site healthy (failsafe allows {FAILSAFE_PAUSE} s)"
                ));
            }
        }
        for (k, f) in order.iter().enumerate() {
            if k > 0 {
                std::thread::sleep(gap);
            }
            h.heal(*f);
        }
        let healed = mono();
        let recovery = h.wait_available(healed, &format!("round {round} ({what}) healed"));
        if recovery > max_recovery.0 {
            max_recovery = (recovery, round);
        }
        h.check_epochs(&format!("round {round}"));
        // Fault-free time before the next round, also from the schedule.
        std::thread::sleep(steady);
    }

    // The end: all healed; stop the writer once a write went through, then
    // wait for the replicas to hold everything.
    let t = mono();
    h.wait_available(t, "the last round");
    h.writer.as_mut().unwrap().stop();
    let closest = h.check_epochs("the writer stopped");
    let mut settled = None;
    let ok = holds_within(Duration::from_secs(120), || {
        settled = h.settled();
        settled.is_some()
    });
    if !ok {
        h.fail("the replicas did not catch up within 120 s after the last round".into());
    }
    let (owner, epoch) = settled.unwrap();
    for i in (0..3).filter(|&i| i != owner) {
        let out = run_with_timeout(
            Command::new(tool("qemu-img"))
                .args(["compare", "-U", "-f", "raw", "-F", "raw"])
                .arg(h.agents[owner].image())
                .arg(h.agents[i].image()),
            Duration::from_secs(60),
        );
        if !out.status.success() {
            h.fail(format!(
                "{}'s image differs from the owner {}'s although it reports itself caught up: {}{}",
                SITES[i],
                SITES[owner],
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    // Stopped, the images are what stock tools would use (G3 at rest).
    for i in (0..3).filter(|&i| i != owner).chain([owner]) {
        let status = h.agents[i].proc.stop();
        assert!(
            status.success(),
            "{}: {} exited with {status} on SIGTERM:\n{}",
            h.tag(),
            SITES[i],
            h.agents[i].proc.tail(50)
        );
    }
    h.witness.kill();
    let image = std::fs::read(h.agents[owner].image()).unwrap();
    assert_eq!(image.len() as u64, BLOCKS * BLOCK as u64);
    for i in (0..3).filter(|&i| i != owner) {
        let other = std::fs::read(h.agents[i].image()).unwrap();
        if let Some(at) = first_difference(&image, &other) {
            panic!(
                "{}: after stopping, {}'s image differs from the owner {}'s at byte {at}",
                h.tag(),
                SITES[i],
                SITES[owner]
            );
        }
    }

    let log = h.writer.as_ref().unwrap().log.lock().unwrap();
    assert!(
        log.problems.is_empty(),
        "{}: the writer reported problems: {:?}",
        h.tag(),
        log.problems
    );
    assert!(log.done, "{}: the writer did not stop cleanly", h.tag());
    let report = check_image(&image, &log, (epoch, owner), mode, &|t| h.round_at(t));
    let report = match report {
        Ok(r) => r,
        Err(e) => panic!(
            "{}: {} violated by the final image of {} (epoch {epoch}): {e}",
            h.tag(),
            if mode == Mode::Sync { "G3/G4" } else { "G3" },
            SITES[owner]
        ),
    };

    let epochs: BTreeSet<u64> = log
        .writes
        .values()
        .filter(|w| w.acked.is_some())
        .map(|w| w.epoch)
        .collect();
    let served: BTreeSet<u64> = log.conns.iter().map(|c| c.2).collect();
    let mut times: Vec<f64> = log.acks.iter().map(|a| a.0).collect();
    times.sort_by(f64::total_cmp);
    let gap = times
        .windows(2)
        .map(|w| (w[1] - w[0], w[1]))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .unwrap_or((0.0, 0.0));
    let in_flight = log.writes.values().filter(|w| w.acked.is_none()).count();
    eprintln!(
        "jepsen [{}] seed {seed}: {rounds} rounds in {:.0} s; failovers observed: {} \
         (epochs with acknowledged writes {:?}, epochs served {:?}); acknowledged writes: {} \
         (issued {}, never acknowledged {in_flight}, connection errors {}); max unavailability \
         (gap between acknowledgements): {:.2} s, ending in {}; slowest recovery after a heal: \
         {:.2} s (round {}); closest hand-over (last acknowledgement of older epochs to the \
         first of a newer one): {}; final owner {} in epoch {epoch}; blocks written {}; \
         acknowledged writes lost at failovers (allowed in async): {}",
        mode.label(),
        started.elapsed().as_secs_f64(),
        epochs.len().saturating_sub(1),
        epochs,
        served,
        log.acks.len(),
        log.writes.len(),
        log.errors,
        gap.0,
        h.round_at(gap.1),
        max_recovery.0,
        max_recovery.1,
        closest.map_or("none".into(), |(g, e)| format!("{g:.3} s, into epoch {e}")),
        SITES[owner],
        report.blocks_written,
        report.lost_acked,
    );
    assert!(
        !log.acks.is_empty() && epochs.len() >= 2,
        "{}: the run observed no failover at all (epochs {epochs:?}): the faults did not bite",
        h.tag()
    );
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

// ---------------------------------------------------------------------------
// Checkers.

/// Check 1 (G6): one site per epoch; every acknowledgement of an epoch
/// received before the first of any later epoch. Returns the closest
/// hand-over seen: (seconds from the last acknowledgement of the earlier
/// epochs to the first of the next, that next epoch).
fn check_epochs(
    log: &WriteLog,
    round_at: &dyn Fn(f64) -> String,
) -> Result<Option<(f64, u64)>, String> {
    struct Span {
        sites: BTreeSet<usize>,
        first: (f64, usize, u64),
        last: (f64, usize, u64),
    }
    let mut epochs: BTreeMap<u64, Span> = BTreeMap::new();
    for &(t, site, ctr) in &log.acks {
        let epoch = log.writes[&(site, ctr)].epoch;
        let span = epochs.entry(epoch).or_insert(Span {
            sites: BTreeSet::new(),
            first: (t, site, ctr),
            last: (t, site, ctr),
        });
        span.sites.insert(site);
        if t < span.first.0 {
            span.first = (t, site, ctr);
        }
        if t > span.last.0 {
            span.last = (t, site, ctr);
        }
    }
    for (epoch, span) in &epochs {
        if span.sites.len() > 1 {
            let names: Vec<&str> = span.sites.iter().map(|&s| SITES[s]).collect();
            let firsts: Vec<String> = span
                .sites
                .iter()
                .map(|&s| {
                    let (t, _, ctr) = log
                        .acks
                        .iter()
                        .find(|a| a.1 == s && log.writes[&(a.1, a.2)].epoch == *epoch)
                        .copied()
                        .unwrap();
                    format!(
                        "{} write #{ctr} acknowledged at {t:.6} in {}",
                        SITES[s],
                        round_at(t)
                    )
                })
                .collect();
            return Err(format!(
                "two sites acknowledged writes in epoch {epoch}: {names:?} ({})",
                firsts.join("; ")
            ));
        }
    }
    let mut latest: Option<(u64, (f64, usize, u64))> = None;
    let mut closest: Option<(f64, u64)> = None;
    for (epoch, span) in &epochs {
        if let Some((pe, last)) = latest {
            let gap = span.first.0 - last.0;
            if closest.is_none_or(|(g, _)| gap < g) {
                closest = Some((gap, *epoch));
            }
            if last.0 >= span.first.0 {
                return Err(format!(
                    "overlapping epochs: {} acknowledged write #{} of epoch {pe} at {:.6} ({}), \
                     after {} had acknowledged write #{} of epoch {epoch} at {:.6} ({})",
                    SITES[last.1],
                    last.2,
                    last.0,
                    round_at(last.0),
                    SITES[span.first.1],
                    span.first.2,
                    span.first.0,
                    round_at(span.first.0)
                ));
            }
        }
        if latest.is_none_or(|(_, l)| span.last.0 > l.0) {
            latest = Some((*epoch, span.last));
        }
    }
    Ok(closest)
}

#[derive(Debug)]
struct ImageReport {
    blocks_written: usize,
    lost_acked: usize,
}

/// One stamp read back: (site, block, epoch, counter), or None for zeroes.
fn read_stamp(data: &[u8]) -> Result<Option<(usize, u64, u64, u64)>, String> {
    if data.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let head = &data[..STAMP];
    if &head[..8] != MAGIC {
        return Err(format!("foreign data (starts {:02x?})", &head[..16]));
    }
    if let Some(k) = data.chunks(STAMP).position(|c| c != head) {
        return Err(format!(
            "torn block: copy {k} of the stamp differs from the first"
        ));
    }
    let u32_at = |o: usize| u32::from_le_bytes(head[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(head[o..o + 8].try_into().unwrap());
    Ok(Some((
        u32_at(8) as usize,
        u64::from(u32_at(12)),
        u64_at(16),
        u64_at(24),
    )))
}

/// Checks 2 and 3 on the final image.
///
/// Model: the final image is the result of applying, epoch after epoch,
/// a prefix of each epoch's write sequence (one writer thread per site, so
/// a site's writes in an epoch are applied in counter order). For every
/// (epoch, site) the number of its writes included, `n`, is bounded below
/// by every write found in the image (it and everything before it are
/// included) and above by every acknowledged write that should have
/// overwritten what is found. Writes never acknowledged may or may not
/// have taken effect, so they only ever bound from below (when found).
/// Durability adds lower bounds: in the final epoch every acknowledged
/// write (nothing failed over after it), in sync mode every acknowledged
/// write of every epoch.
fn check_image(
    image: &[u8],
    log: &WriteLog,
    final_key: (u64, usize),
    mode: Mode,
    round_at: &dyn Fn(f64) -> String,
) -> Result<ImageReport, String> {
    type Key = (u64, usize); // (epoch, site)
    let mut seqs: BTreeMap<Key, Vec<u64>> = BTreeMap::new();
    for w in log.writes.values() {
        seqs.entry((w.epoch, w.site)).or_default().push(w.ctr);
    }
    let mut index: HashMap<(usize, u64), usize> = HashMap::new();
    for ((_, site), ctrs) in seqs.iter_mut() {
        ctrs.sort_unstable();
        for (i, c) in ctrs.iter().enumerate() {
            index.insert((*site, *c), i);
        }
    }
    // Writes to each block, in history order: (key, index, write).
    let mut by_block: HashMap<u64, Vec<(Key, usize, &Wr)>> = HashMap::new();
    for w in log.writes.values() {
        by_block
            .entry(w.block)
            .or_default()
            .push(((w.epoch, w.site), index[&(w.site, w.ctr)], w));
    }
    for v in by_block.values_mut() {
        v.sort_by_key(|(k, i, _)| (*k, *i));
    }
    let describe = |w: &Wr| {
        format!(
            "{} write #{} (epoch {}, block {}, issued at {:.6} in {}, {})",
            SITES[w.site],
            w.ctr,
            w.epoch,
            w.block,
            w.issued,
            round_at(w.issued),
            match w.acked {
                Some(t) => format!("acknowledged at {t:.6}"),
                None => "never acknowledged".into(),
            }
        )
    };
    let mut lo: BTreeMap<Key, (usize, String)> = BTreeMap::new();
    let mut hi: BTreeMap<Key, (usize, String)> = BTreeMap::new();
    let mut lost_durable = Vec::new();
    let mut lost_acked = 0;
    let mut blocks_written = 0;
    let empty = Vec::new();
    for b in 0..BLOCKS {
        let data = &image[b as usize * BLOCK..(b as usize + 1) * BLOCK];
        let stamp = read_stamp(data).map_err(|e| format!("block {b}: {e}"))?;
        let writes = by_block.get(&b).unwrap_or(&empty);
        let found = match stamp {
            None => None,
            Some((site, block, epoch, ctr)) => {
                blocks_written += 1;
                let w = log
                    .writes
                    .get(&(site, ctr))
                    .filter(|w| w.site < 3 && w.epoch == epoch && w.block == block);
                let Some(w) = w else {
                    return Err(format!(
                        "block {b} holds a stamp no write was issued with: site {site}, epoch {epoch}, counter {ctr}, block {block}"
                    ));
                };
                if block != b {
                    return Err(format!("block {b} holds the data of {}", describe(w)));
                }
                let key = (w.epoch, w.site);
                let i = index[&(w.site, w.ctr)];
                let bound = lo.entry(key).or_insert((0, String::new()));
                if i + 1 > bound.0 {
                    *bound = (i + 1, format!("block {b} holds {}", describe(w)));
                }
                Some((key, i, w))
            }
        };
        for (key, i, w) in writes {
            let after = found.is_none_or(|(fk, fi, _)| (*key, *i) > (fk, fi));
            if !after || w.acked.is_none() {
                continue;
            }
            lost_acked += 1;
            let bound = hi.entry(*key).or_insert((usize::MAX, String::new()));
            if *i < bound.0 {
                let holds = found.map_or("zeroes".into(), |(_, _, f)| describe(f));
                *bound = (
                    *i,
                    format!("block {b} holds {holds}, not the later {}", describe(w)),
                );
            }
            let durable = match mode {
                Mode::Sync => true,
                Mode::Async => *key == final_key,
            };
            if durable {
                let holds = found.map_or("zeroes".into(), |(_, _, f)| describe(f));
                lost_durable.push(format!("{} is lost: block {b} holds {holds}", describe(w)));
            }
        }
    }
    if !lost_durable.is_empty() {
        let why = match mode {
            Mode::Sync => "in sync mode no acknowledged write may be lost (G4)",
            Mode::Async => "writes acknowledged in the final epoch, after which nothing failed over, may not be lost (G2/G7)",
        };
        return Err(format!(
            "{} acknowledged writes lost; {why}; first ones:\n  {}",
            lost_durable.len(),
            lost_durable[..lost_durable.len().min(10)].join("\n  ")
        ));
    }
    // Durability lower bounds.
    for (key, ctrs) in &seqs {
        let durable = match mode {
            Mode::Sync => true,
            Mode::Async => *key == final_key,
        };
        if !durable {
            continue;
        }
        let last_acked = ctrs
            .iter()
            .rposition(|c| log.writes[&(key.1, *c)].acked.is_some());
        if let Some(i) = last_acked {
            let bound = lo.entry(*key).or_insert((0, String::new()));
            if i + 1 > bound.0 {
                let w = &log.writes[&(key.1, ctrs[i])];
                *bound = (i + 1, format!("{} must survive", describe(w)));
            }
        }
    }
    for (key, (low, why_low)) in &lo {
        if key.0 > final_key.0 {
            return Err(format!(
                "the image holds writes of epoch {} after the final epoch {}: {why_low}",
                key.0, final_key.0
            ));
        }
        if let Some((high, why_high)) = hi.get(key) {
            if low > high {
                return Err(format!(
                    "not a prefix of {}'s writes in epoch {}: {why_low} (so its first {low} writes \
                     took effect), but {why_high} (so at most its first {high} did)",
                    SITES[key.1], key.0
                ));
            }
        }
    }
    Ok(ImageReport {
        blocks_written,
        lost_acked,
    })
}
