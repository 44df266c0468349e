//! Operator commands against real agents and a real `tandem witness`:
//! `tandem failover --force` run on the primary moves the group to the
//! priority-1 replica (never to the owner itself), `migrate` to the owner
//! changes nothing, and the rollback data a forced failover leaves is
//! listed, shown, exported and discarded with `tandem rollback`.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

const VOLUME: &str = "v";
const MIB: usize = 1 << 20;

fn qemu_io(uri: &str, args: &[&str], cmds: &[&str]) -> String {
    let mut c = Command::new(tool("qemu-io"));
    c.args(["-f", "raw"]).args(args);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(c.arg(uri), Duration::from_secs(120));
    assert!(!out.contains("failed"), "qemu-io: {out}");
    out
}

fn group(c: &Cluster, site: &str) -> serde_json::Value {
    c.status(site)["groups"][0].clone()
}

fn wait_primary(c: &Cluster, site: &str, epoch: u64) {
    wait_until(
        Duration::from_secs(30),
        &format!("{site} primary in epoch {epoch}"),
        || {
            let g = group(c, site);
            g["role"] == "primary" && g["epoch"] == epoch
        },
    );
}

fn wait_streaming(c: &Cluster, site: &str, owner: &str) {
    wait_until(
        Duration::from_secs(60),
        &format!("{site} streaming from {owner}"),
        || {
            let g = group(c, site);
            g["role"] == "replica"
                && g["primary"] == owner
                && g["replicas"][0]["state"] == "streaming"
        },
    );
}

/// `tandem ARGS --config <site's config>`.
fn tandem(c: &Cluster, site: &str, args: &[&str]) -> Output {
    run_with_timeout(
        Command::new(TANDEM)
            .args(args)
            .arg("--config")
            .arg(&c.site(site).config),
        Duration::from_secs(90),
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn start(c: &mut Cluster, sites: &[&str]) {
    for s in sites {
        c.start_any(s);
    }
    wait_primary(c, "ny", 1);
}

#[test]
fn a_forced_failover_run_on_the_primary_moves_the_group_to_the_priority_1_replica() {
    let mut c = Cluster::new("ny", &["chicago", "seattle"], &[vol(VOLUME, "16MiB")], "");
    let witness = Witness::start(c.dir.path());
    c.set_coordinator(&witness.section("2s"));
    start(&mut c, &["ny", "chicago", "seattle"]);
    qemu_io(&c.uri("ny", VOLUME), &[], &["write -P 0x21 0 2M", "flush"]);
    c.wait_replicated(Duration::from_secs(60));

    // A failover to the owner itself is refused, forced or not, and
    // nothing happens.
    for force in [&["--force"][..], &[]] {
        let args = [&["failover", "g", "--to", "ny"][..], force].concat();
        let out = tandem(&c, "ny", &args);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
        let err = text(&out.stderr);
        assert!(
            err.contains("ny already owns g (epoch 1)") && err.contains("--to"),
            "{err}"
        );
    }
    // A migration to the owner says so and changes nothing.
    let out = ok(&tandem(&c, "ny", &["migrate", "g", "--to", "ny"]));
    assert!(
        out.contains("group g is already at ny (epoch 1): nothing to do"),
        "{out}"
    );
    let g = group(&c, "ny");
    assert_eq!(
        (g["role"].as_str(), g["epoch"].as_u64()),
        (Some("primary"), Some(1))
    );
    assert!(c.socket("ny", VOLUME).exists());
    assert!(!c.site("ny").log().contains("forced failover"));

    // `failover --force` without --to, run on the primary: the group goes
    // to chicago (priority 1) in epoch 2.
    let out = ok(&tandem(&c, "ny", &["failover", "g", "--force"]));
    assert!(
        out.contains("group g: owned by chicago in epoch 2"),
        "{out}"
    );
    wait_primary(&c, "chicago", 2);
    wait_streaming(&c, "ny", "chicago");
    wait_streaming(&c, "seattle", "chicago");
    assert!(
        !c.socket("ny", VOLUME).exists(),
        "the old primary still exports the volume"
    );
    assert!(c.socket("chicago", VOLUME).exists());
    qemu_io(
        &c.uri("chicago", VOLUME),
        &[],
        &["read -P 0x21 0 2M", "write -P 0x22 2M 1M", "flush"],
    );
    // Nobody took epoch 3 (the old owner did not claim the group back).
    let g = group(&c, "chicago");
    assert_eq!(
        (g["role"].as_str(), g["epoch"].as_u64()),
        (Some("primary"), Some(2))
    );
    assert_eq!(group(&c, "ny")["epoch"], 2);
    witness.assert_no_refusals();
}

#[test]
fn the_rollback_data_of_a_forced_failover_is_private_listed_exported_and_discarded() {
    // Lag up to an hour is acceptable for this group: its replica is held
    // back on purpose.
    let mut c = Cluster::new(
        "ny",
        &["chicago"],
        &[vol(VOLUME, "16MiB")],
        "max_lag_on_failover = \"1h\"",
    );
    let witness = Witness::start(c.dir.path());
    c.set_coordinator(&witness.section("2s"));
    start(&mut c, &["ny", "chicago"]);
    qemu_io(&c.uri("ny", VOLUME), &[], &["write -P 0x31 0 4M", "flush"]);
    c.wait_replicated(Duration::from_secs(60));
    let list = |site: &str| -> serde_json::Value {
        serde_json::from_str(&ok(&tandem(&c, site, &["rollback", "list", "--json"]))).unwrap()
    };
    assert_eq!(list("ny")["rollbacks"], serde_json::json!([]));

    // Replication to chicago paused: ny acknowledges writes chicago never
    // gets. Then chicago is forced to take over.
    assert!(ok(&tandem(&c, "ny", &["bandwidth", "chicago", "paused"])).contains("paused"));
    qemu_io(
        &c.uri("ny", VOLUME),
        &[],
        &["write -P 0x5a 8M 1M", "write -P 0x5b 12M 64k", "flush"],
    );
    // What ny holds now (its image after the flush).
    let before = std::fs::read(c.image("ny", VOLUME)).unwrap();
    assert!(before[8 * MIB..9 * MIB].iter().all(|b| *b == 0x5a));
    let out = ok(&tandem(&c, "ny", &["failover", "g", "--force"]));
    assert!(out.contains("owned by chicago in epoch 2"), "{out}");
    wait_primary(&c, "chicago", 2);
    // chicago never got them: they are gone from the group.
    qemu_io(&c.uri("chicago", VOLUME), &[], &["read -P 0 8M 1M"]);

    // ny saved them before its resync overwrote them.
    wait_until(Duration::from_secs(30), "ny's rollback data", || {
        list("ny")["rollbacks"]
            .as_array()
            .is_some_and(|a| a.len() == 1 && a[0]["complete"] == true)
    });
    wait_streaming(&c, "ny", "chicago");
    let entry = list("ny")["rollbacks"][0].clone();
    let id = entry["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("g-e1-s"), "{entry:#}");
    assert_eq!(
        (entry["group"].as_str(), entry["epoch"].as_u64()),
        (Some("g"), Some(1))
    );
    assert!(
        entry["created"].as_str().unwrap().ends_with('Z'),
        "{entry:#}"
    );
    let rb = c.site("ny").data_dir.join("rollback");
    let img = rb.join(format!("{id}.img"));
    assert_eq!(entry["path"].as_str(), Some(img.to_str().unwrap()));
    // Private: 0600 files in a 0700 directory.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&rb), 0o700);
    assert_eq!(mode(&img), 0o600);
    assert_eq!(mode(&rb.join(format!("{id}.index"))), 0o600);

    // The index (its ranges, as `show` prints them) covers both writes,
    // and the sizes add up to the data file.
    let index = std::fs::read_to_string(rb.join(format!("{id}.index"))).unwrap();
    let ranges: Vec<(u64, u64)> = index
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f[0], VOLUME, "{index}");
            (f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect();
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    assert_eq!(entry["ranges"].as_u64(), Some(ranges.len() as u64));
    assert_eq!(entry["bytes"].as_u64(), Some(total));
    assert_eq!(std::fs::metadata(&img).unwrap().len(), total);
    let covers = |at: u64, len: u64| ranges.iter().any(|(o, l)| *o <= at && at + len <= o + l);
    assert!(
        covers(8 << 20, 1 << 20) && covers(12 << 20, 64 << 10),
        "{index}"
    );
    let shown = ok(&tandem(&c, "ny", &["rollback", "show", &id]));
    for (o, l) in &ranges {
        assert!(
            shown.lines().any(|line| {
                let w: Vec<&str> = line.split_whitespace().collect();
                w.len() == 4 && w[0] == VOLUME && w[1] == o.to_string() && w[2] == l.to_string()
            }),
            "range {o}+{l} missing:\n{shown}"
        );
    }
    assert!(shown.contains("total: "), "{shown}");
    let table = ok(&tandem(&c, "ny", &["rollback", "list"]));
    assert!(table.contains(&id) && table.contains("complete"), "{table}");

    // The export: a raw image of the volume's size holding exactly what ny
    // had in the saved ranges, zeros elsewhere; qemu-io reads it.
    let out_file = c.dir.path().join("rolled-back.raw");
    let out_arg = out_file.to_str().unwrap();
    ok(&tandem(
        &c,
        "ny",
        &[
            "rollback", "export", &id, "--volume", VOLUME, "--out", out_arg,
        ],
    ));
    let exported = std::fs::read(&out_file).unwrap();
    assert_eq!(exported.len(), 16 * MIB);
    let mut expected = vec![0u8; 16 * MIB];
    for (o, l) in &ranges {
        let (o, l) = (usize::try_from(*o).unwrap(), usize::try_from(*l).unwrap());
        expected[o..o + l].copy_from_slice(&before[o..o + l]);
    }
    assert!(exported == expected, "the export differs from ny's data");
    qemu_io(
        out_arg,
        &["-r"],
        &["read -P 0x5a 8M 1M", "read -P 0x5b 12M 64k"],
    );
    // The same view served read-only over NBD: qemu-img finds it
    // identical to the file; a write is refused.
    let sock = c.dir.path().join("rollback-view.sock");
    let mut server = Command::new(TANDEM)
        .args(["rollback", "export", &id, "--volume", VOLUME, "--nbd"])
        .arg(&sock)
        .arg("--config")
        .arg(&c.site("ny").config)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        Duration::from_secs(20),
        "the rollback view's socket",
        || std::os::unix::net::UnixStream::connect(&sock).is_ok(),
    );
    let view_uri = format!("nbd+unix:///{VOLUME}?socket={}", sock.display());
    let same = run_ok(
        Command::new(tool("qemu-img"))
            .args(["compare", "-f", "raw", "-F", "raw", out_arg])
            .arg(&view_uri),
        Duration::from_secs(60),
    );
    assert!(same.contains("Images are identical"), "{same}");
    let write = run_with_timeout(
        Command::new(tool("qemu-io"))
            .args(["-f", "raw", "-c", "write 0 4k"])
            .arg(&view_uri),
        Duration::from_secs(60),
    );
    let said = format!("{}{}", text(&write.stdout), text(&write.stderr));
    assert!(
        !write.status.success() || said.contains("failed"),
        "a write to the read-only view: {said}"
    );
    sigterm(&server);
    assert!(wait_child(&mut server, Duration::from_secs(20)).success());
    assert!(!sock.exists());

    // An existing file is never overwritten; an unknown ID or volume is a
    // clear error.
    let again = tandem(
        &c,
        "ny",
        &[
            "rollback", "export", &id, "--volume", VOLUME, "--out", out_arg,
        ],
    );
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("exists already"),
        "{}",
        text(&again.stderr)
    );
    let bad = tandem(&c, "ny", &["rollback", "show", "g-e9-s9"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stderr).contains("no rollback data \"g-e9-s9\""),
        "{}",
        text(&bad.stderr)
    );
    let bad = tandem(
        &c,
        "ny",
        &[
            "rollback",
            "export",
            &id,
            "--volume",
            "nope",
            "--out",
            "/tmp/never",
        ],
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stderr).contains("no range of volume \"nope\""),
        "{}",
        text(&bad.stderr)
    );

    // A save cut short by a crash (data, no index) is listed as
    // incomplete, next to the good one, and can be discarded.
    std::fs::write(rb.join("g-e7-s70.img"), vec![7u8; 4096]).unwrap();
    let both = list("ny")["rollbacks"].clone();
    assert_eq!(both.as_array().unwrap().len(), 2, "{both:#}");
    let cut = &both[1];
    assert_eq!(
        (cut["id"].as_str(), cut["complete"].as_bool()),
        (Some("g-e7-s70"), Some(false))
    );
    assert!(
        cut["problem"].as_str().unwrap().contains("no index"),
        "{cut:#}"
    );
    assert_eq!(cut["bytes"].as_u64(), Some(4096));
    let table = ok(&tandem(&c, "ny", &["rollback", "list"]));
    assert!(table.contains("incomplete: no index"), "{table}");
    ok(&tandem(&c, "ny", &["rollback", "discard", "g-e7-s70"]));
    assert!(!rb.join("g-e7-s70.img").exists());

    // Discard: both files gone, the list empty (the agent runs on).
    let out = ok(&tandem(&c, "ny", &["rollback", "discard", &id]));
    assert!(out.contains(&format!("discarded {id}")), "{out}");
    assert!(!img.exists() && !rb.join(format!("{id}.index")).exists());
    assert_eq!(list("ny")["rollbacks"], serde_json::json!([]));
    assert!(c.is_running("ny"));
    witness.assert_no_refusals();
}
