//! `tandem test start|stop` with real agents (docs/HISTORY.md, "Test
//! views"): a replica's volumes at a recovery point, served writable over
//! NBD while replication goes on; discarded without a trace.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new(tool("qemu-io"));
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(c.arg(uri), Duration::from_secs(120));
    assert!(!out.contains("failed"), "qemu-io: {out}");
    out
}

fn unix_uri(volume: &str, socket: &Path) -> String {
    format!("nbd+unix:///{volume}?socket={}", socket.display())
}

/// The whole export behind `socket`, read with nbdcopy.
fn read_all(dir: &Path, volume: &str, socket: &Path) -> Vec<u8> {
    let out = dir.join(format!("{volume}.copy"));
    let _ = std::fs::remove_file(&out);
    run_ok(
        Command::new(tool("nbdcopy"))
            .arg(unix_uri(volume, socket))
            .arg(&out),
        Duration::from_secs(120),
    );
    std::fs::read(&out).expect("read the copy")
}

/// Starts a test and returns the agent's answer.
fn start_test(config: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["start", "g", "--json"];
    args.extend_from_slice(extra);
    let (code, out, err) = tandem_test(config, &args);
    assert_eq!(code, 0, "tandem test start failed: {out}{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn socket_of(test: &serde_json::Value, volume: &str) -> PathBuf {
    let exports = test["exports"].as_array().expect("exports");
    let e = exports
        .iter()
        .find(|e| e["volume"] == volume)
        .unwrap_or_else(|| panic!("no export of {volume}: {test:#}"));
    PathBuf::from(e["socket"].as_str().expect("socket"))
}

/// Waits until the replica has a point at or after `seq` (the primary's
/// flush made one) by starting tests of the latest point.
fn wait_point(config: &Path, seq: u64) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let got = poll(Duration::from_secs(20), || {
        let (code, out, err) = tandem_test(config, &["start", "g", "--json", "--at", "latest"]);
        if code != 0 {
            // Until the first point reached the replica.
            assert!(err.contains("no recovery point"), "{out}{err}");
            return None;
        }
        let test: serde_json::Value = serde_json::from_str(&out).expect("json");
        if test["point"]["seq"].as_u64().unwrap_or(0) >= seq {
            return Some(test);
        }
        let id = test["id"].as_u64().expect("id").to_string();
        let (code, out, err) = tandem_test(config, &["stop", "g", "--id", &id]);
        assert_eq!(code, 0, "{out}{err}");
        last = test;
        None
    });
    got.unwrap_or_else(|| panic!("no point at seq >= {seq}: {last:#}"))
}

fn primary_seq(c: &Cluster) -> u64 {
    c.status("ny")["groups"][0]["next_seq"]
        .as_u64()
        .expect("next_seq")
        - 1
}

#[test]
fn a_test_view_is_the_point_writable_isolated_and_leaves_nothing() {
    let mut c = Cluster::new("ny", &["dr"], &[vol("a", "16MiB"), vol("b", "8MiB")], "");
    c.start("dr");
    c.start("ny");
    let work = c.dir.path().to_owned();
    // What the point holds: a pattern in a, another in b.
    qemu_io(&c.uri("ny", "a"), &["write -P 0x41 0 1M", "flush"]);
    qemu_io(&c.uri("ny", "b"), &["write -P 0x42 1M 64k", "flush"]);
    c.wait_replicated(Duration::from_secs(30));
    let seq = primary_seq(&c);
    let dr = c.site("dr").config.clone();
    let data_dir = c.site("dr").data_dir.clone();
    let test = wait_point(&dr, seq);
    // --boot wants a group with a VM (crates/tandem/tests/vm_testboot.rs).
    let (code, out, err) = tandem_test(&dr, &["start", "g", "--boot"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("group g has no VM"), "{err}");
    let id = test["id"].as_u64().expect("id");
    let a = socket_of(&test, "a");
    let b = socket_of(&test, "b");
    // The first test of the group has the pinned paths (SPEC §4.2).
    assert_eq!(a, data_dir.join("nbd/test/g/a.sock"));
    assert_eq!(b, data_dir.join("nbd/test/g/b.sock"));
    let mut want_a = vec![0u8; 16 << 20];
    want_a[..1 << 20].fill(0x41);
    let mut want_b = vec![0u8; 8 << 20];
    want_b[1 << 20..(1 << 20) + (64 << 10)].fill(0x42);
    assert!(
        read_all(&work, "a", &a) == want_a,
        "view of a differs from the point"
    );
    assert!(
        read_all(&work, "b", &b) == want_b,
        "view of b differs from the point"
    );

    // The primary goes on writing: replication streams, the view does
    // not move.
    qemu_io(&c.uri("ny", "a"), &["write -P 0x61 0 2M", "flush"]);
    c.wait_replicated(Duration::from_secs(30));
    assert!(
        read_all(&work, "a", &a) == want_a,
        "the view moved with replication"
    );

    // The test writes: it reads its own writes, the replica never sees them.
    qemu_io(
        &unix_uri("a", &a),
        &["write -P 0x5a 4096 12288", "write -z 1M 4096", "flush"],
    );
    qemu_io(
        &unix_uri("a", &a),
        &[
            "read -P 0x5a 4096 12288",
            "read -P 0 1M 4096",
            "read -P 0x41 0 4096",
        ],
    );
    let replica_a = std::fs::read(c.image("dr", "a")).expect("replica image");
    assert!(
        replica_a[..2 << 20].iter().all(|x| *x == 0x61),
        "the test's writes reached the replica"
    );
    let status = c.status("dr");
    let tests = status["groups"][0]["tests"]
        .as_array()
        .expect("tests in status")
        .clone();
    assert_eq!(tests.len(), 1, "{status:#}");
    assert_eq!(tests[0]["state"], "running");
    assert!(
        tests[0]["scratch_bytes"].as_u64().unwrap_or(0) >= 12288,
        "{status:#}"
    );
    assert_eq!(status["groups"][0]["replicas"][0]["state"], "streaming");
    let human = run_ok(
        Command::new(TANDEM)
            .args(["status", "--local", "--config"])
            .arg(&dr),
        Duration::from_secs(15),
    );
    assert!(
        human.contains(&format!(
            "test {id}  point {}",
            test["point"]["time"].as_str().unwrap_or("?")
        )) && human.contains(&a.display().to_string()),
        "{human}"
    );

    // A second test of the group at the same time gets its own sockets.
    let second = start_test(&dr, &["--at", "latest"]);
    let second_id = second["id"].as_u64().expect("id");
    assert_ne!(second_id, id);
    let a2 = socket_of(&second, "a");
    assert_eq!(a2, data_dir.join(format!("nbd/test/g@{second_id}/a.sock")));
    qemu_io(&unix_uri("a", &a2), &["read -P 0x61 0 2M"]);
    // The first is unchanged by it.
    qemu_io(&unix_uri("a", &a), &["read -P 0x5a 4096 12288"]);

    // Stop: every socket, scratch file and directory goes.
    let (code, out, err) = tandem_test(&dr, &["stop", "g"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("test {id} of g stopped")), "{out}");
    assert!(!a.exists() && !a2.exists());
    let left: Vec<_> = std::fs::read_dir(data_dir.join("nbd/test"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(
        !data_dir.join("tests/g").exists(),
        "scratch left behind: {:?}",
        std::fs::read_dir(data_dir.join("tests"))
            .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
    );
    assert!(c.status("dr")["groups"][0]["tests"].is_null());
    // Replication carried on all along.
    qemu_io(&c.uri("ny", "a"), &["write -P 0x62 0 64k", "flush"]);
    c.wait_replicated(Duration::from_secs(30));
}

#[test]
fn tests_do_not_survive_a_killed_agent() {
    let mut c = Cluster::new("ny", &["dr"], &[vol("a", "8MiB")], "");
    c.start("dr");
    c.start("ny");
    qemu_io(&c.uri("ny", "a"), &["write -P 0x41 0 64k", "flush"]);
    c.wait_replicated(Duration::from_secs(30));
    let seq = primary_seq(&c);
    let dr = c.site("dr").config.clone();
    let data_dir = c.site("dr").data_dir.clone();
    let test = wait_point(&dr, seq);
    let a = socket_of(&test, "a");
    qemu_io(&unix_uri("a", &a), &["write -P 0x5a 0 64k", "flush"]);
    assert!(data_dir.join("tests/g").exists());
    c.kill("dr");
    c.start("dr");
    assert!(
        !data_dir.join("nbd/test").exists(),
        "test sockets survived a restart"
    );
    assert!(
        !data_dir.join("tests").exists(),
        "test scratch survived a restart"
    );
    assert!(c.status("dr")["groups"][0]["tests"].is_null());
    assert!(
        c.site("dr")
            .log()
            .contains("test views of a previous run removed"),
        "{}",
        c.site("dr").log()
    );
    c.wait_replicated(Duration::from_secs(30));
}

#[test]
fn test_start_refuses_what_it_cannot_do() {
    let mut c = Cluster::new("ny", &["dr"], &[vol("a", "8MiB")], "");
    c.start("dr");
    c.start("ny");
    let ny = c.site("ny").config.clone();
    let dr = c.site("dr").config.clone();
    let refused = |config: &Path, args: &[&str], says: &str| {
        let (code, out, err) = tandem_test(config, args);
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(err.contains(says), "{args:?}: {err}");
    };
    refused(&ny, &["start", "g"], "not a replica");
    // --boot needs the group's VM (vm_testboot.rs boots one).
    refused(&dr, &["start", "g", "--boot"], "group g has no VM");
    // Asked of the primary through --site: forwarded there, refused there.
    refused(&dr, &["start", "g", "--site", "ny"], "not a replica");
    refused(&dr, &["start", "g", "--at", "yesterday"], "is not a time");
    refused(&dr, &["start", "nosuch"], "not defined on this site");
    refused(&dr, &["stop", "g", "--id", "7"], "no test 7");
    // Before the oldest point: none to give.
    refused(
        &dr,
        &["start", "g", "--at", "2000-01-01T00:00:00Z"],
        "no recovery point at or before",
    );
    assert!(!c.site("dr").data_dir.join("nbd/test/g").exists());
}

#[test]
fn a_full_scratch_fails_the_test_and_replication_streams_on() {
    let mut c = Cluster::new(
        "ny",
        &["dr"],
        &[vol("a", "16MiB")],
        "test_scratch_max = \"1MiB\"",
    );
    c.start("dr");
    c.start("ny");
    qemu_io(&c.uri("ny", "a"), &["write -P 0x41 0 64k", "flush"]);
    c.wait_replicated(Duration::from_secs(30));
    let seq = primary_seq(&c);
    let dr = c.site("dr").config.clone();
    let test = wait_point(&dr, seq);
    assert_eq!(test["scratch_max"], 1 << 20, "{test:#}");
    let a = socket_of(&test, "a");
    // Within the cap: written.
    qemu_io(&unix_uri("a", &a), &["write -P 0x5a 0 512k", "flush"]);
    // Past it: the write fails with ENOSPC and the test is failed.
    let out = run_with_timeout(
        Command::new(tool("qemu-io"))
            .args(["-f", "raw", "-c", "write -P 0x5b 1M 1M"])
            .arg(unix_uri("a", &a)),
        Duration::from_secs(60),
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("No space left on device"), "{said}");
    let status = c.status("dr");
    let t = &status["groups"][0]["tests"][0];
    assert_eq!(t["state"], "failed", "{status:#}");
    let error = t["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("scratch full") && error.contains("test_scratch_max"),
        "{error}"
    );
    assert!(c.site("dr").log().contains("test view FAILED"));
    // Its writes are refused from now on; what it wrote reads back.
    qemu_io(
        &unix_uri("a", &a),
        &["read -P 0x5a 0 512k", "read -P 0 1M 4k"],
    );
    // Replication never noticed.
    qemu_io(&c.uri("ny", "a"), &["write -P 0x61 0 4M", "flush"]);
    let s = c.wait_replicated(Duration::from_secs(30));
    assert_eq!(s["groups"][0]["replicas"][0]["state"], "streaming", "{s:#}");
    assert_eq!(
        c.status("dr")["groups"][0]["replicas"][0]["state"],
        "streaming"
    );
    let (code, out, err) = tandem_test(&dr, &["stop", "g"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!c.site("dr").data_dir.join("tests/g").exists());
}

#[test]
fn a_test_runs_on_another_site_with_site() {
    let mut c = Cluster::new("ny", &["dr"], &[vol("a", "8MiB")], "");
    c.start("dr");
    c.start("ny");
    qemu_io(&c.uri("ny", "a"), &["write -P 0x41 0 64k", "flush"]);
    c.wait_replicated(Duration::from_secs(30));
    let ny = c.site("ny").config.clone();
    let dr_data = c.site("dr").data_dir.clone();
    // From the primary's host: the test runs on dr, its sockets are dr's.
    let mut last = String::new();
    let test = poll(Duration::from_secs(20), || {
        let (code, out, err) = tandem_test(&ny, &["start", "g", "--json", "--site", "dr"]);
        if code == 0 {
            return Some(serde_json::from_str::<serde_json::Value>(&out).expect("json"));
        }
        // Until the flush's point reached dr.
        assert!(err.contains("no recovery point"), "{err}");
        last = err;
        None
    })
    .unwrap_or_else(|| panic!("no test on dr: {last}"));
    let a = socket_of(&test, "a");
    assert_eq!(a, dr_data.join("nbd/test/g/a.sock"));
    qemu_io(&unix_uri("a", &a), &["read -P 0x41 0 64k"]);
    assert_eq!(c.status("dr")["groups"][0]["tests"][0]["id"], test["id"]);
    let (code, out, err) = tandem_test(&ny, &["stop", "g", "--site", "dr"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!a.exists());
    assert!(c.status("dr")["groups"][0]["tests"].is_null());
}

#[test]
fn a_promoted_replica_stops_its_tests_first() {
    let mut c = Cluster::new("ny", &["dr"], &[vol("a", "8MiB")], "");
    let witness = Witness::start(c.dir.path());
    c.set_coordinator(&witness.section("2s"));
    c.start_any("dr");
    c.start_any("ny");
    wait_until(Duration::from_secs(30), "ny serving", || {
        c.status("ny")["groups"][0]["role"] == "primary"
            && std::os::unix::net::UnixStream::connect(c.socket("ny", "a")).is_ok()
    });
    qemu_io(&c.uri("ny", "a"), &["write -P 0x41 0 64k", "flush"]);
    c.wait_replicated(Duration::from_secs(30));
    // A flush once the replica streams (not resyncs) makes a point.
    qemu_io(&c.uri("ny", "a"), &["write -P 0x41 64k 4k", "flush"]);
    c.wait_replicated(Duration::from_secs(30));
    let seq = primary_seq(&c);
    let dr = c.site("dr").config.clone();
    let data_dir = c.site("dr").data_dir.clone();
    let test = wait_point(&dr, seq);
    let a = socket_of(&test, "a");
    run_ok(
        Command::new(TANDEM)
            .args(["migrate", "g", "--to", "dr", "--config"])
            .arg(c.site("ny").config.clone()),
        Duration::from_secs(120),
    );
    wait_until(Duration::from_secs(30), "dr serving", || {
        c.status("dr")["groups"][0]["role"] == "primary"
    });
    assert!(!a.exists(), "the test's socket outlived the promotion");
    assert!(
        !data_dir.join("tests/g").exists(),
        "the test's scratch outlived the promotion"
    );
    let log = c.site("dr").log();
    assert!(
        log.contains("stopping the group's test views: this replica is being promoted"),
        "{log}"
    );
    qemu_io(&c.uri("dr", "a"), &["read -P 0x41 0 64k"]);
}
