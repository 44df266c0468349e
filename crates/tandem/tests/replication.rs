//! Replication between real agents on loopback: data written through NBD
//! with real clients arrives byte-identical on every replica, one slow or
//! absent replica does not hold back the others, and outages cost only
//! the delta.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let mut c = Command::new(tool("qemu-io"));
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(c.arg(uri), Duration::from_secs(120));
    assert!(!out.contains("failed"), "qemu-io: {out}");
    out
}

fn fio_randwrite(uri: &str, size: &str, seed: u32) {
    run_ok(
        Command::new(tool("fio"))
            .args([
                "--name=w",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bssplit=4k/60:64k/40",
                "--iodepth=16",
            ])
            .arg(format!("--size={size}"))
            .arg(format!("--uri={uri}"))
            .arg(format!("--randseed={seed}"))
            .args(["--output=/dev/null"]),
        Duration::from_secs(300),
    );
}

fn assert_same(c: &Cluster, a: &str, b: &str) {
    for v in &c.volumes {
        assert!(
            files_equal(&c.image(a, v.name), &c.image(b, v.name)),
            "volume {} differs between {a} and {b}",
            v.name
        );
    }
}

#[test]
fn nbd_writes_reach_the_replica_byte_identical() {
    let mut c = Cluster::new("ny", &["dr"], &[vol("v0", "64MiB"), vol("v1", "16MiB")], "");
    c.start("dr");
    c.start("ny");
    // nbdcopy 32 MiB of data into v0, qemu-io patterns, zeroes and trims into v1.
    let src = c.dir.path().join("src.bin");
    std::fs::write(&src, pattern(5, 32 << 20)).unwrap();
    run_ok(
        Command::new(tool("nbdcopy"))
            .arg(&src)
            .arg(c.uri("ny", "v0")),
        Duration::from_secs(120),
    );
    qemu_io(
        &c.uri("ny", "v1"),
        &[
            "write -P 0x5a 0 4M".into(),
            "write -z 1M 512k".into(),
            "discard 2M 256k".into(),
            "write -P 0x33 15M 1M".into(),
            "flush".into(),
        ],
    );
    let s = c.wait_replicated(Duration::from_secs(60));
    assert_eq!(s["groups"][0]["role"], "primary");
    // The replica site reports itself.
    let r = c.status("dr");
    assert_eq!(r["groups"][0]["role"], "replica");
    assert_eq!(r["groups"][0]["replicas"][0]["site"], "dr");
    assert_eq!(r["groups"][0]["replicas"][0]["state"], "streaming");
    assert!(c.stop("ny").success());
    assert!(c.stop("dr").success());
    assert_same(&c, "ny", "dr");
    // Everything was replicated: nothing is left to compare after a restart.
    for v in ["v0", "v1"] {
        let dirty = run_ok(
            Command::new(TANDEM)
                .args(["dirty", "--config"])
                .arg(&c.site("ny").config)
                .arg(v),
            Duration::from_secs(15),
        );
        assert!(dirty.contains(": 0 bytes in 0 range(s)"), "{dirty}");
    }
}

#[test]
fn one_primary_feeds_two_replicas_and_a_dead_one_holds_back_nobody() {
    let mut c = Cluster::new("ny", &["chicago", "seattle"], &[vol("v0", "64MiB")], "");
    c.start("chicago");
    c.start("ny");
    // seattle is down: chicago still gets everything.
    fio_randwrite(&c.uri("ny", "v0"), "32M", 1);
    let mut last = serde_json::Value::Null;
    let caught_up = poll(Duration::from_secs(60), || {
        let s = c.status("ny");
        let reps = s["groups"][0]["replicas"].as_array().unwrap().clone();
        let chicago = reps.iter().find(|r| r["site"] == "chicago").unwrap();
        let seattle = reps.iter().find(|r| r["site"] == "seattle").unwrap();
        if chicago["state"] == "streaming" && chicago["lag_bytes"] == 0 {
            assert_eq!(seattle["state"], "disconnected");
            assert!(seattle["lag_bytes"].as_u64().unwrap() > 0, "{seattle}");
            return Some(());
        }
        last = s;
        None
    });
    assert!(caught_up.is_some(), "chicago did not catch up: {last:#}");
    c.start("seattle");
    c.wait_replicated(Duration::from_secs(90));
    for s in ["ny", "chicago", "seattle"] {
        assert!(c.stop(s).success(), "{s} did not stop cleanly");
    }
    assert_same(&c, "ny", "chicago");
    assert_same(&c, "ny", "seattle");
}

#[test]
fn a_replica_back_from_an_outage_gets_only_the_delta() {
    let mut c = Cluster::new("ny", &["dr"], &[vol("v0", "256MiB")], "");
    c.start("dr");
    c.start("ny");
    // A full first copy of 128 MiB of data.
    let src = c.dir.path().join("src.bin");
    std::fs::write(&src, pattern(9, 128 << 20)).unwrap();
    run_ok(
        Command::new(tool("nbdcopy"))
            .arg(&src)
            .arg(c.uri("ny", "v0")),
        Duration::from_secs(120),
    );
    let before = c.wait_replicated(Duration::from_secs(120));
    // Counted across reconnects; includes resync chunks and hashes' answers.
    let wire_before = before["groups"][0]["replicas"][0]["wire_bytes"]
        .as_u64()
        .unwrap();
    // The replica goes away (crash); 4 MiB change meanwhile.
    c.kill("dr");
    qemu_io(
        &c.uri("ny", "v0"),
        &[
            "write -P 0x77 8M 2M".into(),
            "write -P 0x78 200M 2M".into(),
            "flush".into(),
        ],
    );
    c.start("dr");
    let after = c.wait_replicated(Duration::from_secs(120));
    let rep = &after["groups"][0]["replicas"][0];
    let moved = rep["wire_bytes"].as_u64().unwrap() - wire_before;
    // 4 MiB changed: far from the 256 MiB volume or the 128 MiB of data.
    assert!(
        moved < 16 << 20,
        "{moved} bytes moved for 4 MiB of changes: {rep:#}"
    );
    assert!(c.stop("ny").success());
    assert!(c.stop("dr").success());
    assert_same(&c, "ny", "dr");
}

#[test]
fn a_primary_killed_and_restarted_still_converges() {
    let mut c = Cluster::new("ny", &["dr"], &[vol("v0", "64MiB")], "");
    c.start("dr");
    c.start("ny");
    fio_randwrite(&c.uri("ny", "v0"), "32M", 3);
    c.kill("ny");
    c.start("ny");
    qemu_io(
        &c.uri("ny", "v0"),
        &["write -P 0x42 0 1M".into(), "flush".into()],
    );
    c.wait_replicated(Duration::from_secs(90));
    assert!(c.stop("ny").success());
    assert!(c.stop("dr").success());
    assert_same(&c, "ny", "dr");
}

/// Bytes of a raw image at `offset`.
fn read_at(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

#[test]
fn sync_mode_acknowledged_writes_survive_the_primary_dying() {
    let mut c = Cluster::new(
        "ny",
        &["dr"],
        &[vol("v0", "32MiB")],
        "mode = \"sync\"\nsync_replicas = 1",
    );
    c.start("dr");
    c.start("ny");
    c.wait_replicated(Duration::from_secs(30));
    // qemu-io returns only after its writes and the flush are acknowledged.
    qemu_io(
        &c.uri("ny", "v0"),
        &[
            "write -P 0x61 1M 1M".into(),
            "write -P 0x62 20M 64k".into(),
            "flush".into(),
        ],
    );
    c.kill("ny");
    assert!(c.stop("dr").success());
    assert!(read_at(&c.image("dr", "v0"), 1 << 20, 1 << 20)
        .iter()
        .all(|b| *b == 0x61));
    assert!(read_at(&c.image("dr", "v0"), 20 << 20, 64 << 10)
        .iter()
        .all(|b| *b == 0x62));
}

#[test]
fn sync_mode_suspends_writes_until_a_replica_is_back() {
    let mut c = Cluster::new(
        "ny",
        &["dr"],
        &[vol("v0", "32MiB")],
        "mode = \"sync\"\nsync_replicas = 1\non_sync_loss = \"suspend\"",
    );
    c.start("ny");
    let before = c.status("ny")["groups"][0]["next_seq"].as_u64().unwrap();
    let mut writer = Command::new(tool("qemu-io"))
        .args(["-f", "raw", "-c", "write -P 0x71 0 64k", "-c", "flush"])
        .arg(c.uri("ny", "v0"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The write reached the primary and was captured (it has a sequence
    // number): from here on it waits for a replica.
    wait_until(Duration::from_secs(20), "ny to capture the write", || {
        c.status("ny")["groups"][0]["next_seq"].as_u64().unwrap() > before
    });
    // No replica: the write must not be acknowledged. A negative claim
    // needs a window of time; it starts once the write is held, not when
    // qemu-io was started.
    std::thread::sleep(Duration::from_secs(1));
    if let Some(status) = writer.try_wait().unwrap() {
        let out = writer.wait_with_output().unwrap();
        panic!(
            "qemu-io finished ({status}) with no replica: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let s = c.status("ny");
    assert_eq!(s["groups"][0]["sync_degraded"], true, "{s:#}");
    c.start("dr");
    let status = wait_child(&mut writer, Duration::from_secs(60));
    assert!(status.success());
    c.wait_replicated(Duration::from_secs(30));
    assert!(c.stop("ny").success());
    assert!(c.stop("dr").success());
    assert!(read_at(&c.image("dr", "v0"), 0, 64 << 10)
        .iter()
        .all(|b| *b == 0x71));
}

#[test]
fn sync_mode_degrades_when_configured_and_says_so() {
    let mut c = Cluster::new(
        "ny",
        &["dr"],
        &[vol("v0", "32MiB")],
        "mode = \"sync\"\nsync_replicas = 1\non_sync_loss = \"degrade\"",
    );
    c.start("ny");
    qemu_io(
        &c.uri("ny", "v0"),
        &["write -P 0x72 0 64k".into(), "flush".into()],
    );
    let s = c.status("ny");
    assert_eq!(s["groups"][0]["sync_degraded"], true, "{s:#}");
    assert!(c.site("ny").log().contains("DEGRADED"));
    c.start("dr");
    c.wait_replicated(Duration::from_secs(30));
    assert_eq!(c.status("ny")["groups"][0]["sync_degraded"], false);
}

#[test]
fn configuration_files_reach_the_replica_within_about_a_second() {
    let src_dir = tempfile::Builder::new()
        .prefix("tf")
        .tempdir_in("/tmp")
        .unwrap();
    let xml = src_dir.path().join("web01.xml");
    std::fs::write(&xml, "<domain>one</domain>").unwrap();
    let extra = format!("files = [\"{}\"]", xml.display());
    let mut c = Cluster::new("ny", &["dr"], &[vol("v0", "8MiB")], &extra);
    c.start("dr");
    c.start("ny");
    let copy = c
        .site("dr")
        .data_dir
        .join("files/g")
        .join(xml.strip_prefix("/").unwrap());
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    wait_until(Duration::from_secs(10), "the first copy", || {
        read(&copy) == "<domain>one</domain>"
    });
    // An edit in place, then an editor's write-and-rename.
    std::fs::write(&xml, "<domain>two</domain>").unwrap();
    wait_until(Duration::from_secs(3), "the edit", || {
        read(&copy) == "<domain>two</domain>"
    });
    let tmp = src_dir.path().join("web01.xml.new");
    std::fs::write(&tmp, "<domain>three</domain>").unwrap();
    std::fs::rename(&tmp, &xml).unwrap();
    wait_until(Duration::from_secs(3), "the replaced file", || {
        read(&copy) == "<domain>three</domain>"
    });
    // Written atomically: no temporary file left beside it.
    let leftovers: Vec<_> = std::fs::read_dir(copy.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("tandem-tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn bandwidth_changes_at_runtime_pause_and_resume_replication() {
    let mut c = Cluster::new("ny", &["dr"], &[vol("v0", "16MiB")], "");
    c.start("dr");
    c.start("ny");
    c.wait_replicated(Duration::from_secs(30));
    let bw = |value: &str| {
        run_ok(
            Command::new(TANDEM)
                .args(["bandwidth", "--config"])
                .arg(&c.site("ny").config)
                .args(["dr", value]),
            Duration::from_secs(15),
        )
    };
    assert!(bw("paused").contains("paused"));
    qemu_io(
        &c.uri("ny", "v0"),
        &["write -P 0x44 0 2M".into(), "flush".into()],
    );
    let s = c.status("ny");
    let rep = &s["groups"][0]["replicas"][0];
    assert_eq!(rep["state"], "paused", "{s:#}");
    assert!(rep["lag_bytes"].as_u64().unwrap() > 0);
    assert!(bw("20Mbit").contains("20Mbit"));
    c.wait_replicated(Duration::from_secs(30));
    assert!(bw("auto").contains("unlimited"));
    // A bad value is refused with a clear error.
    let out = run_with_timeout(
        Command::new(TANDEM)
            .args(["bandwidth", "--config"])
            .arg(&c.site("ny").config)
            .args(["dr", "fast"]),
        Duration::from_secs(15),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid rate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(c.stop("ny").success());
    assert!(c.stop("dr").success());
    assert_same(&c, "ny", "dr");
}

#[test]
fn verify_finds_replicas_identical_and_reports_a_damaged_one() {
    let mut c = Cluster::new("ny", &["dr"], &[vol("v0", "16MiB"), vol("v1", "8MiB")], "");
    c.start("dr");
    c.start("ny");
    qemu_io(
        &c.uri("ny", "v0"),
        &["write -P 0x51 0 8M".into(), "flush".into()],
    );
    c.wait_replicated(Duration::from_secs(30));
    let verify = || {
        run_with_timeout(
            Command::new(TANDEM)
                .args(["verify", "--config"])
                .arg(&c.site("ny").config)
                .arg("g"),
            Duration::from_secs(120),
        )
    };
    let asked = std::time::Instant::now();
    let ok = verify();
    // A settled shipper sleeps until something wakes it (30 s at most):
    // the request does, so a small verify answers at once.
    assert!(
        asked.elapsed() < Duration::from_secs(20),
        "verify of 24 MiB took {:?}: the idle shipper was not woken",
        asked.elapsed()
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("dr: identical"));
    // Damage the replica's image behind Tandem's back (as a bad disk would).
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(c.image("dr", "v1"))
            .unwrap();
        f.write_all_at(&[0xEE; 100], (3 << 20) + 7).unwrap();
    }
    let bad = verify();
    let out = String::from_utf8_lossy(&bad.stdout).into_owned();
    assert_eq!(bad.status.code(), Some(1), "{out}");
    assert!(
        out.contains("DIFFER") && out.contains("v1\toffset 3145728\tlength 65536"),
        "{out}"
    );
}
