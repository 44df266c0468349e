//! Failover between real agents and a real `tandem witness`: losing the
//! primary promotes the first replica in priority order, the old primary
//! comes back as a replica without a full copy, and a migration moves the
//! group home with nothing lost.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const VOLUME: &str = "v";

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

fn group(c: &Cluster, site: &str) -> serde_json::Value {
    c.status(site)["groups"][0].clone()
}

/// Waits until `site` serves the group as primary in `epoch`.
fn wait_primary(c: &Cluster, site: &str, epoch: u64, timeout: Duration) {
    wait_until(timeout, &format!("{site} primary in epoch {epoch}"), || {
        let g = group(c, site);
        g["role"] == "primary" && g["epoch"] == epoch
    });
}

/// Waits until `site` is a consistent replica streaming from `owner`.
fn wait_streaming(c: &Cluster, site: &str, owner: &str, timeout: Duration) {
    wait_until(timeout, &format!("{site} streaming from {owner}"), || {
        let g = group(c, site);
        g["role"] == "replica" && g["primary"] == owner && g["replicas"][0]["state"] == "streaming"
    });
}

/// Waits until the owner reports every replica streaming with nothing
/// owed.
fn wait_caught_up(c: &Cluster, owner: &str, timeout: Duration) {
    wait_until(timeout, &format!("{owner}'s replicas caught up"), || {
        let g = group(c, owner);
        let next = g["next_seq"].as_u64().unwrap_or(0);
        g["replicas"].as_array().is_some_and(|rs| {
            !rs.is_empty()
                && rs.iter().all(|r| {
                    r["state"] == "streaming"
                        && r["lag_bytes"] == 0
                        && r["applied_seq"].as_u64().unwrap_or(0) + 1 >= next
                })
        })
    });
}

#[test]
fn losing_the_primary_promotes_by_priority_and_the_old_primary_rejoins_then_migrates_home() {
    let mut c = Cluster::new("ny", &["chicago", "seattle"], &[vol(VOLUME, "32MiB")], "");
    let witness = Witness::start(c.dir.path());
    c.set_coordinator(&witness.section("3s"));
    for s in ["ny", "chicago", "seattle"] {
        c.start_any(s);
    }
    wait_primary(&c, "ny", 1, Duration::from_secs(20));
    qemu_io(
        &c.uri("ny", VOLUME),
        &["write -P 0x11 0 4M", "write -P 0x22 8M 1M", "flush"],
    );
    wait_caught_up(&c, "ny", Duration::from_secs(60));

    // SIGKILL of the primary: Chicago (priority 1) takes over in epoch 2.
    c.kill("ny");
    let killed = Instant::now();
    wait_until(
        Duration::from_secs(15),
        "a write acknowledged by chicago",
        || {
            std::os::unix::net::UnixStream::connect(c.socket("chicago", VOLUME)).is_ok()
                && Command::new(tool("qemu-io"))
                    .args(["-f", "raw", "-c", "write -P 0x33 12M 64k"])
                    .arg(c.uri("chicago", VOLUME))
                    .output()
                    .is_ok_and(|o| {
                        o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("failed")
                    })
        },
    );
    let rto = killed.elapsed();
    eprintln!("failover: first write acknowledged by chicago {rto:?} after SIGKILL of ny");
    assert!(rto < Duration::from_secs(10), "failover took {rto:?}");
    let g = group(&c, "chicago");
    assert_eq!(
        (g["role"].as_str(), g["epoch"].as_u64()),
        (Some("primary"), Some(2)),
        "{g:#}"
    );
    // Everything ny acknowledged before the kill was replicated: nothing lost.
    qemu_io(
        &c.uri("chicago", VOLUME),
        &[
            "read -P 0x11 0 4M",
            "read -P 0x22 8M 1M",
            "read -P 0x33 12M 64k",
        ],
    );
    wait_streaming(&c, "seattle", "chicago", Duration::from_secs(30));

    // The old primary comes back as Chicago's replica, without a full copy.
    c.start_any("ny");
    wait_streaming(&c, "ny", "chicago", Duration::from_secs(60));
    qemu_io(
        &c.uri("chicago", VOLUME),
        &["write -P 0x44 16M 1M", "flush"],
    );
    wait_caught_up(&c, "chicago", Duration::from_secs(60));
    assert!(
        !c.socket("ny", VOLUME).exists(),
        "a replica must not serve NBD"
    );

    // Planned migration home: zero loss, no resync of anyone.
    let out = run_ok(
        Command::new(TANDEM)
            .args(["migrate", "g", "--to", "ny", "--config"])
            .arg(&c.site("chicago").config),
        Duration::from_secs(60),
    );
    assert!(out.contains("owned by ny in epoch 3"), "{out}");
    wait_primary(&c, "ny", 3, Duration::from_secs(20));
    wait_streaming(&c, "chicago", "ny", Duration::from_secs(30));
    qemu_io(
        &c.uri("ny", VOLUME),
        &[
            "read -P 0x11 0 4M",
            "read -P 0x22 8M 1M",
            "read -P 0x33 12M 64k",
            "read -P 0x44 16M 1M",
            "write -P 0x55 20M 1M",
            "flush",
        ],
    );
    wait_caught_up(&c, "ny", Duration::from_secs(60));
    for s in ["chicago", "seattle"] {
        assert!(
            files_equal(&c.image("ny", VOLUME), &c.image(s, VOLUME)),
            "{s} differs from ny after the migration"
        );
    }
    // Chicago stepped down exactly at the hand-over point: nothing to
    // roll back.
    assert!(!c.site("chicago").data_dir.join("rollback").exists());
    drop(witness);
}
