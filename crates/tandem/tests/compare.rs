//! After an outage only what may differ is compared (docs/PEER.md,
//! "Divergence"), measured in bytes hashed on both sides
//! (`compare_bytes_read` in `tandem status --json`): a new replica is
//! compared in full; a replica killed in the middle of its initial sync
//! resumes with the part that was not confirmed; an old primary returning
//! after a forced failover compares only the regions it wrote that the new
//! owner never got and those the new owner wrote since — its unreplicated
//! writes saved to rollback first — and ends byte-identical.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use common::*;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

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

/// `compare_bytes_read` of the first replica entry of `site`'s status.
fn compared(c: &Cluster, site: &str) -> u64 {
    let s = c.status(site);
    s["groups"][0]["replicas"][0]["compare_bytes_read"]
        .as_u64()
        .unwrap_or_else(|| panic!("no compare_bytes_read in {s:#}"))
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

fn same_images(a: &std::path::Path, b: &std::path::Path) {
    let out = run_ok(
        Command::new(tool("qemu-img"))
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(a)
            .arg(b),
        Duration::from_secs(300),
    );
    assert!(out.contains("Images are identical"), "{out}");
}

#[test]
fn a_new_replica_is_compared_in_full_and_one_killed_mid_sync_resumes_where_it_was() {
    // 4 GiB, sparse: the initial sync comes in four 1 GiB parts; the last
    // one carries 16 MiB of data, slowed down by the link's bandwidth.
    let mut c = Cluster::new("ny", &["dr"], &[vol("v0", "4GiB")], "");
    let image = c.image("ny", "v0");
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(4 * GIB).unwrap();
    f.write_all_at(&pattern(5, 16 << 20), 3 * GIB + 512 * MIB)
        .unwrap();
    drop(f);
    c.start("ny");
    bandwidth(&c, "ny", "dr", "16Mbit");
    c.start("dr");
    // Into the last part: the first three are confirmed.
    wait_until(Duration::from_secs(120), "the resync's last part", || {
        let s = c.status("ny");
        let r = &s["groups"][0]["replicas"][0];
        r["resync"]["compared_bytes"].as_u64().unwrap_or(0) > 3 * GIB + 64 * MIB
            && r["resync"]["sent_bytes"].as_u64().unwrap_or(0) > 0
    });
    let at_kill = compared(&c, "ny");
    c.kill("dr");
    c.start("dr");
    bandwidth(&c, "ny", "dr", "auto");
    c.wait_replicated(Duration::from_secs(180));
    let primary = compared(&c, "ny");
    let replica = compared(&c, "dr");
    eprintln!("initial sync: {at_kill} bytes hashed by ny before dr was killed; after its restart ny hashed {} more, dr {replica}", primary - at_kill);
    // A new replica: everything is compared once.
    assert!(at_kill >= 3 * GIB, "{at_kill}");
    // After the kill, only the part that was not confirmed (1 GiB), not
    // the whole volume again.
    assert!(
        primary - at_kill <= GIB + 64 * MIB,
        "the primary hashed {} bytes after the replica's restart",
        primary - at_kill
    );
    assert!(replica <= GIB + 64 * MIB, "the replica hashed {replica}");
    assert!(c.stop("ny").success());
    assert!(c.stop("dr").success());
    same_images(&c.image("ny", "v0"), &c.image("dr", "v0"));
}

/// Regions marked in a site's dirty map of volume `v` of group `g`.
fn marked_regions(c: &Cluster, site: &str) -> u32 {
    let path = c
        .site(site)
        .data_dir
        .join("capture")
        .join("g")
        .join("v.dirty");
    let bytes = std::fs::read(path).unwrap_or_default();
    bytes
        .get(4096..)
        .unwrap_or_default()
        .iter()
        .map(|b| b.count_ones())
        .sum()
}

#[test]
fn a_failback_compares_only_what_either_side_wrote_and_keeps_the_rollback() {
    let mut c = Cluster::new("ny", &["chicago"], &[vol("v", "1GiB")], "");
    let witness = Witness::start(c.dir.path());
    c.set_coordinator(&witness.section("3s"));
    c.start_any("ny");
    c.start_any("chicago");
    wait_until(Duration::from_secs(20), "ny primary", || {
        c.status("ny")["groups"][0]["role"] == "primary"
    });
    qemu_io(&c.uri("ny", "v"), &["write -P 0x11 0 4M", "flush"]);
    c.wait_replicated(Duration::from_secs(120));
    assert!(
        compared(&c, "ny") >= GIB,
        "a new replica is compared in full"
    );
    // The initial sync's marks go once the replica holds everything: the
    // map then marks at most what was written lately.
    wait_until(Duration::from_secs(30), "ny's dirty map cleared", || {
        marked_regions(&c, "ny") <= 1
    });
    // Writes chicago never gets: replication paused, then ny dies.
    bandwidth(&c, "ny", "chicago", "paused");
    qemu_io(&c.uri("ny", "v"), &["write -P 0x22 64M 8M", "flush"]);
    c.kill("ny");
    wait_until(
        Duration::from_secs(30),
        "chicago primary in epoch 2",
        || {
            let g = &c.status("chicago")["groups"][0];
            g["role"] == "primary" && g["epoch"] == 2
        },
    );
    qemu_io(&c.uri("chicago", "v"), &["write -P 0x33 512M 8M", "flush"]);
    // ny returns: it learns it was replaced, saves its unreplicated writes
    // and becomes chicago's replica.
    c.start_any("ny");
    wait_until(Duration::from_secs(90), "ny streaming from chicago", || {
        let g = &c.status("ny")["groups"][0];
        g["role"] == "replica" && g["replicas"][0]["state"] == "streaming"
    });
    wait_until(
        Duration::from_secs(60),
        "chicago's replica caught up",
        || {
            let g = &c.status("chicago")["groups"][0];
            let next = g["next_seq"].as_u64().unwrap_or(0);
            let r = &g["replicas"][0];
            r["state"] == "streaming"
                && r["lag_bytes"] == 0
                && r["applied_seq"].as_u64().unwrap_or(0) + 1 >= next
        },
    );
    let owner = compared(&c, "chicago");
    let old = compared(&c, "ny");
    eprintln!("failback: chicago hashed {owner} bytes, ny {old}");
    // ny's 8 MiB and chicago's 8 MiB (2 regions each), plus ny's recent
    // 4 MiB: far from the 1 GiB volume.
    for (who, bytes) in [("chicago", owner), ("ny", old)] {
        assert!(bytes > 0, "{who} compared nothing");
        assert!(bytes <= 32 * MIB, "{who} hashed {bytes} bytes");
    }
    // The rolled-back writes were saved first.
    let rollback = c.site("ny").data_dir.join("rollback");
    let index = std::fs::read_dir(&rollback)
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| e.path().extension().is_some_and(|x| x == "index"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .unwrap_or_else(|| panic!("no rollback index in {}", rollback.display()));
    assert!(
        index.contains(&format!("\t{}\t", 64 * MIB)),
        "the unreplicated region is not in the rollback index:\n{index}"
    );
    // Chicago's history everywhere: its write, ny's first one, not ny's
    // rolled-back one.
    qemu_io(
        &c.uri("chicago", "v"),
        &[
            "read -P 0x33 512M 8M",
            "read -P 0x11 0 4M",
            "read -P 0 64M 8M",
        ],
    );
    c.stop("chicago");
    c.stop("ny");
    same_images(&c.image("ny", "v"), &c.image("chicago", "v"));
    drop(witness);
}
