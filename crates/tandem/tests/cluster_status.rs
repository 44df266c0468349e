//! `tandem status` as one cluster view (issue 11, part 5), with real
//! agents: a replica site shows every replica as the group's owner sees
//! it, unreachable sites are marked within a bounded time, and `--watch`
//! is a live view until Ctrl-C.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rustix::process::{kill_process, Pid, Signal};

fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut c = Command::new(tool("qemu-io"));
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(c.arg(uri), Duration::from_secs(60));
    assert!(!out.contains("failed"), "qemu-io: {out}");
}

/// `tandem status --json` (the cluster view, the default) of a site, and
/// how long it took.
fn cluster_status(c: &Cluster, site: &str) -> (serde_json::Value, Duration) {
    let started = Instant::now();
    let out = run_ok(
        Command::new(TANDEM)
            .args(["status", "--json", "--config"])
            .arg(&c.site(site).config),
        Duration::from_secs(20),
    );
    (serde_json::from_str(&out).unwrap(), started.elapsed())
}

fn bandwidth(c: &Cluster, site: &str, peer: &str, value: &str) {
    run_ok(
        Command::new(TANDEM)
            .args(["bandwidth", "--config"])
            .arg(&c.site(site).config)
            .args([peer, value]),
        Duration::from_secs(15),
    );
}

fn replica<'a>(group: &'a serde_json::Value, site: &str) -> &'a serde_json::Value {
    group["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["site"] == site)
        .unwrap_or_else(|| panic!("no replica {site} in {group:#}"))
}

fn site_entry<'a>(status: &'a serde_json::Value, site: &str) -> &'a serde_json::Value {
    status["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == site)
        .unwrap_or_else(|| panic!("no site {site} in {status:#}"))
}

#[test]
fn a_replica_shows_the_cluster_as_the_owner_sees_it() {
    let mut c = Cluster::new("a", &["b", "c"], &[vol("v0", "16MiB")], "");
    c.start("b");
    c.start("c");
    c.start("a");
    c.wait_replicated(Duration::from_secs(60));

    // Everything streams: b's cluster view lists the group with owner a
    // and both replicas, every site reachable.
    let (s, _) = cluster_status(&c, "b");
    assert_eq!(s["site"], "b");
    let g = &s["groups"][0];
    assert_eq!(g["name"], "g");
    assert_eq!(g["role"], "replica", "role is b's own: {s:#}");
    assert_eq!(g["owner"], "a");
    assert_eq!(g["primary"], "a");
    assert!(g["epoch"].as_u64().is_some());
    for site in ["b", "c"] {
        let r = replica(g, site);
        assert_eq!(r["state"], "streaming", "{s:#}");
        assert_eq!(r["reported_by"], "a");
        assert!(r["since"].as_str().unwrap().ends_with('Z'), "{r}");
        assert!(r["lag_seconds"].as_f64().is_some() && r["lag_bytes"].as_u64().is_some());
        assert!(r["rpo_seconds"].as_f64().is_some(), "{r}");
    }
    for site in ["a", "b", "c"] {
        assert_eq!(site_entry(&s, site)["reachable"], true, "{s:#}");
    }

    // The bug of the issue: a pauses b and writes; b's own view says
    // streaming, its cluster view says what a knows: paused, behind.
    bandwidth(&c, "a", "b", "paused");
    qemu_io(&c.uri("a", "v0"), &["write -P 0x44 0 2M", "flush"]);
    let (s, _) = cluster_status(&c, "b");
    let b = replica(&s["groups"][0], "b");
    assert_eq!(b["state"], "paused", "{s:#}");
    assert!(b["lag_bytes"].as_u64().unwrap() >= 2 << 20, "{b}");
    let local = status_json(&c.site("b").config).unwrap();
    assert_eq!(local["groups"][0]["replicas"][0]["state"], "streaming");
    assert!(local.get("sites").is_none(), "--local: this site only");
    // The table says so too.
    let table = run_ok(
        Command::new(TANDEM)
            .args(["status", "--config"])
            .arg(&c.site("b").config),
        Duration::from_secs(20),
    );
    eprintln!("{table}");
    assert!(table.contains("owner a"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.trim_start().starts_with("b ") && l.contains("paused")),
        "{table}"
    );
    bandwidth(&c, "a", "b", "auto");
    c.wait_replicated(Duration::from_secs(60));

    // c stops answering (SIGSTOP: its port accepts, nothing answers): b
    // marks it unreachable within the bound and still shows the group.
    let c_pid = c.site("c").pid().unwrap();
    let c_pid = Pid::from_raw(i32::try_from(c_pid).unwrap()).unwrap();
    kill_process(c_pid, Signal::STOP).unwrap();
    let (s, took) = cluster_status(&c, "b");
    kill_process(c_pid, Signal::CONT).unwrap();
    assert!(took < Duration::from_secs(6), "took {took:?}");
    let cs = site_entry(&s, "c");
    assert_eq!(cs["reachable"], false, "{s:#}");
    assert!(!cs["error"].as_str().unwrap().is_empty());
    assert_eq!(site_entry(&s, "a")["reachable"], true);
    assert_eq!(s["groups"][0]["owner"], "a");
    assert_eq!(s["groups"][0]["replicas"].as_array().unwrap().len(), 2);

    // c dies: refused at once; a's view of c (disconnected, soon) shows.
    c.kill("c");
    let seen = poll(Duration::from_secs(30), || {
        let (s, took) = cluster_status(&c, "b");
        assert!(took < Duration::from_secs(6), "took {took:?}");
        let g = &s["groups"][0];
        (site_entry(&s, "c")["reachable"] == false && replica(g, "c")["state"] == "disconnected")
            .then_some(s)
    });
    let s = seen.expect("b's view of c: unreachable, disconnected as a sees it");
    assert_eq!(s["groups"][0]["owner"], "a");
    let table = run_ok(
        Command::new(TANDEM)
            .args(["status", "--config"])
            .arg(&c.site("b").config),
        Duration::from_secs(20),
    );
    eprintln!("{table}");
    assert!(table.contains("c UNREACHABLE"), "{table}");
}

#[test]
fn a_site_answers_status_only_to_its_peer_sites() {
    let mut c = Cluster::new("a", &["b"], &[vol("v0", "8MiB")], "");
    c.start("b");
    c.start("a");
    // A stranger speaks the peer protocol to a's port.
    let config = std::fs::read_to_string(&c.site("a").config).unwrap();
    let listen = config
        .lines()
        .find_map(|l| l.strip_prefix("listen = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_owned();
    let mut tcp = std::net::TcpStream::connect(&listen).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut scratch = Vec::new();
    tandem_peer::write_message(
        &mut tcp,
        &tandem_peer::Message::StatusRequest {
            site: "mallory".into(),
        },
        &mut scratch,
    )
    .unwrap();
    match tandem_peer::read_message(&mut tcp, &mut scratch).unwrap() {
        tandem_peer::Message::Refuse { reason } => {
            assert!(reason.contains("not a peer site"), "{reason}")
        }
        other => panic!("answered {other:?}"),
    }
    // b is a peer: answered with a's status.
    let mut tcp = std::net::TcpStream::connect(&listen).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tandem_peer::write_message(
        &mut tcp,
        &tandem_peer::Message::StatusRequest { site: "b".into() },
        &mut scratch,
    )
    .unwrap();
    match tandem_peer::read_message(&mut tcp, &mut scratch).unwrap() {
        tandem_peer::Message::StatusReport { report } => {
            let s: serde_json::Value = serde_json::from_slice(&report.decode().unwrap()).unwrap();
            assert_eq!(s["site"], "a");
            assert_eq!(s["groups"][0]["role"], "primary");
        }
        other => panic!("answered {other:?}"),
    }
}

#[test]
fn watch_is_a_live_view_until_ctrl_c() {
    let mut c = Cluster::new("a", &["b"], &[vol("v0", "8MiB")], "");
    c.start("b");
    c.start("a");
    c.wait_replicated(Duration::from_secs(60));
    // No resync runs: --watch keeps refreshing all the same.
    let mut watch = Command::new(TANDEM)
        .args(["status", "--watch", "--config"])
        .arg(&c.site("b").config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut refreshes = 0;
    let mut saw_group = false;
    while refreshes < 4 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("--watch: {refreshes} refreshes, then {e}"));
        if line.contains("Ctrl-C to stop") {
            refreshes += 1;
        }
        saw_group |= line.contains("group g") && line.contains("owner a");
    }
    assert!(saw_group, "the view shows the group and its owner");
    assert!(
        watch.try_wait().unwrap().is_none(),
        "--watch still runs after {refreshes} refreshes"
    );
    kill_process(Pid::from_child(&watch), Signal::INT).unwrap();
    let status = wait_child(&mut watch, Duration::from_secs(5));
    assert!(status.success(), "--watch ends cleanly on Ctrl-C: {status}");
}

#[test]
fn a_resync_shows_its_rate_and_time_left() {
    // A small queue: what b misses is tracked as dirty regions and
    // resynced.
    let mut c = Cluster::new(
        "a",
        &["b"],
        &[vol("v0", "32MiB")],
        "max_queue = \"1MiB\"\nqueue_memory = \"1MiB\"",
    );
    c.start("b");
    c.start("a");
    c.wait_replicated(Duration::from_secs(60));
    // b misses 16 MiB of writes, then comes back over a slow link: the
    // resync takes seconds, and status says how fast and how long.
    assert!(c.stop("b").success());
    let src = c.dir.path().join("src");
    std::fs::write(&src, pattern(7, 16 << 20)).unwrap();
    run_ok(
        Command::new(tool("nbdcopy"))
            .arg(&src)
            .arg(c.uri("a", "v0")),
        Duration::from_secs(60),
    );
    bandwidth(&c, "a", "b", "24Mbit");
    c.start("b");
    let mut seen = Vec::new();
    let progress = poll(Duration::from_secs(60), || {
        let (s, _) = cluster_status(&c, "b");
        let r = replica(&s["groups"][0], "b").clone();
        seen.push(r.clone());
        let p = &r["resync"];
        // Resyncing (`inconsistent` while a replica without an undo log
        // is mid-resync).
        (r["resyncing"] == true
            && p["rate_bytes_per_second"].as_f64().is_some_and(|x| x > 0.0)
            && p["eta_seconds"].as_f64().is_some())
        .then_some(r)
    });
    let r = progress.unwrap_or_else(|| panic!("no resync rate seen: {seen:#?}"));
    let p = &r["resync"];
    assert!(p["total_bytes"].as_u64().unwrap() > 0, "{r}");
    assert!(p["compared_bytes"].as_u64().unwrap() <= p["total_bytes"].as_u64().unwrap());
    bandwidth(&c, "a", "b", "auto");
    c.wait_replicated(Duration::from_secs(60));
}
