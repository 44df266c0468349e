//! Failsafe ownership with real agents and a real `tandem witness`
//! (docs/FAILOVER.md, "Failsafe"): the witness dies while every site is
//! healthy and connected, and the owner keeps acknowledging writes on the
//! peer leases its replicas grant; a replica that stops answering as well
//! fences the owner within the lease; the witness's return costs no pause
//! and no new epoch. The writer is `bench/nbd_writer.py` (Debian's
//! python3-libnbd): 4 KiB writes with FUA, one at a time, every
//! acknowledgement logged with CLOCK_MONOTONIC.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use common::*;
use rustix::process::{kill_process, Pid, Signal};
use rustix::time::{clock_gettime, ClockId};

const VOLUME: &str = "v";
const TTL: f64 = 3.0;

fn mono() -> f64 {
    let t = clock_gettime(ClockId::Monotonic);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// The stamped writer of the failover benchmark, writing to `socket`.
struct Writer {
    child: Child,
    stdin: ChildStdin,
    log: PathBuf,
}

impl Writer {
    fn start(dir: &Path, socket: &Path) -> Writer {
        let log = dir.join("writes.log");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/nbd_writer.py");
        let mut child = Command::new("/usr/bin/python3")
            .arg(script)
            .arg("--log")
            .arg(&log)
            .args(["--export", VOLUME, "--timeout", "30"])
            .arg(format!("ny={}", socket.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("/usr/bin/python3 bench/nbd_writer.py (python3-libnbd)");
        let stdin = child.stdin.take().unwrap();
        Writer { child, stdin, log }
    }

    /// Monotonic times of every acknowledged write so far.
    fn acks(&self) -> Vec<f64> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some("A"))
                    .then(|| f.next())
                    .flatten()
                    .and_then(|ns| ns.parse::<f64>().ok())
                    .map(|ns| ns / 1e9)
            })
            .collect()
    }

    /// The longest time without an acknowledgement within [from, to].
    fn longest_pause(&self, from: f64, to: f64) -> f64 {
        let mut last = from;
        let mut pause: f64 = 0.0;
        for t in self.acks().into_iter().filter(|t| *t >= from && *t <= to) {
            pause = pause.max(t - last);
            last = t;
        }
        pause.max(to - last)
    }

    fn last_ack(&self) -> f64 {
        self.acks().last().copied().unwrap_or(0.0)
    }

    fn stop(mut self) {
        let _ = writeln!(self.stdin, "quit");
        drop(self.stdin);
        let status = wait_child(&mut self.child, Duration::from_secs(60));
        assert!(status.success(), "the writer failed: {status}");
    }
}

fn group(c: &Cluster, site: &str) -> serde_json::Value {
    c.status(site)["groups"][0].clone()
}

/// ny's own status (GET /api/v1/status).
fn ny_status(c: &Cluster) -> serde_json::Value {
    let (code, body) = api_call(c.site("ny"), "GET", "/api/v1/status", "");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Lets `seconds` of the fault pass (the fault's duration is what is
/// tested; nothing is synchronised by it).
fn hold(seconds: f64) {
    std::thread::sleep(Duration::from_secs_f64(seconds));
}

fn signal(c: &Cluster, site: &str, sig: Signal) {
    let pid = c.site(site).pid().expect("running");
    kill_process(Pid::from_raw(pid as i32).unwrap(), sig).unwrap();
}

#[test]
fn failsafe_keeps_writes_going_while_the_witness_is_down_and_fences_when_a_site_is_lost_too() {
    let mut c = Cluster::new("ny", &["chicago", "seattle"], &[vol(VOLUME, "64MiB")], "");
    let mut witness = Witness::start(c.dir.path());
    c.set_coordinator(&witness.section("3s"));
    for s in ["ny", "chicago", "seattle"] {
        c.start(s);
    }
    wait_until(Duration::from_secs(30), "ny primary in epoch 1", || {
        let g = group(&c, "ny");
        g["role"] == "primary" && g["epoch"] == 1
    });
    c.wait_replicated(Duration::from_secs(60));
    let writer = Writer::start(c.dir.path(), &c.socket("ny", VOLUME));
    let started = mono();
    wait_until(Duration::from_secs(30), "the writer's first write", || {
        writer.last_ack() > started
    });

    // 1. The witness dies; every site is healthy and connected. Writes go
    //    on through three lease times and more.
    let down = mono();
    witness.kill();
    hold(4.0 * TTL);
    let pause = writer.longest_pause(down, mono());
    eprintln!("failsafe: longest write pause with the witness down: {pause:.3} s");
    assert!(
        pause <= 1.0,
        "writes paused {pause:.3} s while the witness was down (failsafe: at most one lease renewal, 1 s)"
    );
    let g = group(&c, "ny");
    assert_eq!(g["role"], "primary");
    assert_eq!(g["epoch"], 1);
    for s in ["chicago", "seattle"] {
        assert_eq!(group(&c, s)["role"], "replica", "{s} must not take over");
    }
    assert!(
        c.site("ny")
            .log()
            .contains("writes continue on peer leases"),
        "ny says it runs on peer leases"
    );
    // Status and metrics say so: acknowledging on the peer leases of
    // chicago and seattle, the coordinator unreachable.
    let local = ny_status(&c);
    let g = &local["groups"][0];
    assert_eq!(
        g["failsafe"]["peers"],
        serde_json::json!(["chicago", "seattle"]),
        "{g}"
    );
    assert!(g["failsafe"]["since"].is_string(), "{g}");
    assert!(g.get("fenced").is_none(), "{g}");
    assert_eq!(local["coordinator"]["reachable"], false, "{local}");
    let (code, metrics) = api_call(c.site("ny"), "GET", "/metrics", "");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("tandem_group_failsafe{group=\"g\"} 1"),
        "{metrics}"
    );

    // 2. The witness still down, seattle stops answering (a site lost):
    //    ny stops acknowledging within its last peer lease.
    let cut = mono();
    signal(&c, "seattle", Signal::STOP);
    wait_until(
        Duration::from_secs_f64(2.0 * TTL),
        "ny to stop acknowledging",
        || mono() - writer.last_ack() > 1.0,
    );
    let last = writer.last_ack();
    // ny says why: fenced, the coordinator unreachable.
    wait_until(Duration::from_secs(5), "ny's status to say fenced", || {
        ny_status(&c)["groups"][0]["fenced"]["reason"] == "coordinator_unreachable"
    });
    assert!(
        last - cut <= TTL,
        "ny acknowledged a write {:.3} s after seattle was lost (lease {TTL} s)",
        last - cut
    );
    hold(TTL);
    assert!(
        writer.last_ack() <= last,
        "no write may be acknowledged while a site of the group withholds its peer lease"
    );

    // 3. seattle answers again: its peer lease comes back, and with it the
    //    writes (no other site could have claimed the group: no witness).
    signal(&c, "seattle", Signal::CONT);
    let back = mono();
    wait_until(
        Duration::from_secs(15),
        "writes again once seattle answers",
        || writer.last_ack() > back,
    );

    // 4. The witness returns (the leases lapsed meanwhile): ny takes its
    //    group back in the same epoch, with no pause.
    let returned = mono();
    witness.restart();
    hold(2.0 * TTL);
    let pause = writer.longest_pause(returned, mono());
    assert!(
        pause <= 1.0,
        "writes paused {pause:.3} s when the witness returned"
    );
    wait_until(Duration::from_secs(15), "ny owner in epoch 1 again", || {
        let g = group(&c, "ny");
        g["role"] == "primary" && g["epoch"] == 1
    });
    writer.stop();
    c.wait_replicated(Duration::from_secs(60));
    witness.assert_no_refusals();
}

#[test]
fn without_failsafe_an_owner_cut_from_the_witness_fences_within_the_lease() {
    let mut c = Cluster::new("ny", &["chicago"], &[vol(VOLUME, "16MiB")], "");
    let mut witness = Witness::start(c.dir.path());
    c.set_coordinator(&format!("{}\nfailsafe = false", witness.section("3s")));
    c.start("ny");
    c.start("chicago");
    wait_until(Duration::from_secs(30), "ny primary in epoch 1", || {
        let g = group(&c, "ny");
        g["role"] == "primary" && g["epoch"] == 1
    });
    let writer = Writer::start(c.dir.path(), &c.socket("ny", VOLUME));
    let started = mono();
    wait_until(Duration::from_secs(30), "the writer's first write", || {
        writer.last_ack() > started
    });
    let down = mono();
    witness.kill();
    wait_until(
        Duration::from_secs_f64(2.0 * TTL),
        "ny to stop acknowledging",
        || mono() - writer.last_ack() > 1.0,
    );
    assert!(writer.last_ack() - down <= TTL);
    witness.restart();
    let back = mono();
    wait_until(
        Duration::from_secs(20),
        "writes once the witness is back",
        || writer.last_ack() > back,
    );
    writer.stop();
}
