//! Failover between real agents and a real `tandem witness`: losing the
//! primary promotes the first replica in priority order, the old primary
//! comes back as a replica without a full copy, and a migration moves the
//! group home with nothing lost.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../coordinator/tests/support/etcd.rs"]
mod etcd_cluster;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const VOLUME: &str = "v";
/// Bound on one qemu-io write of [`try_write`].
const WRITE_WAIT: Duration = Duration::from_secs(30);

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
    let hooks = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(
        "ny",
        &["chicago", "seattle"],
        &[vol(VOLUME, "32MiB")],
        &format!(
            "on_promote = \"env | grep ^TANDEM_ | sort > {0}/promoted-$TANDEM_SITE-$TANDEM_EPOCH\"\non_demote = \"touch {0}/demoted-$TANDEM_SITE-$TANDEM_EPOCH\"",
            hooks.path().display()
        ),
    );
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
                && try_write(&c.uri("chicago", VOLUME), "write -P 0x33 12M 64k")
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
    // on_promote ran on chicago with the group's facts.
    let env = std::fs::read_to_string(hooks.path().join("promoted-chicago-2")).unwrap();
    for want in [
        "TANDEM_GROUP=g".to_string(),
        "TANDEM_SITE=chicago".into(),
        "TANDEM_EPOCH=2".into(),
        format!(
            "TANDEM_NBD_SOCKETS={}",
            c.socket("chicago", VOLUME).display()
        ),
        format!(
            "TANDEM_FILES_DIR={}",
            c.site("chicago").data_dir.join("files").join("g").display()
        ),
    ] {
        assert!(env.lines().any(|l| l == want), "missing {want} in:\n{env}");
    }

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
    // roll back; on_demote ran there and on_promote on ny.
    assert!(!c.site("chicago").data_dir.join("rollback").exists());
    assert!(hooks.path().join("demoted-chicago-2").exists());
    assert!(hooks.path().join("promoted-ny-3").exists());
    witness.assert_no_refusals();
    drop(witness);
}

/// A write through qemu-io; whether it was acknowledged within
/// [`WRITE_WAIT`] (a write still held then is killed and counts as not
/// acknowledged).
fn try_write(uri: &str, cmd: &str) -> bool {
    let Ok(mut child) = Command::new(tool("qemu-io"))
        .args(["-f", "raw", "-c", cmd])
        .arg(uri)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let Some(status) = poll(WRITE_WAIT, || child.try_wait().expect("wait for qemu-io")) else {
        let _ = child.kill();
        let _ = child.wait();
        return false;
    };
    // One command: a few lines of output, read once it exited.
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    status.success() && !out.contains("failed")
}

#[test]
fn with_etcd_one_lost_member_still_fails_over_and_two_lost_fence_the_owner() {
    let mut etcd = etcd_cluster::EtcdCluster::three();
    let mut c = Cluster::new(
        "ny",
        &["chicago", "seattle"],
        &[vol(VOLUME, "16MiB")],
        "on_lost_lease = \"error\"",
    );
    let endpoints: Vec<String> = etcd
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    c.set_coordinator(&format!(
        "kind = \"etcd\"\nendpoints = [{}]\nlease_ttl = \"3s\"\nprefix = \"/failover-test\"",
        endpoints.join(", ")
    ));
    for s in ["ny", "chicago", "seattle"] {
        c.start_any(s);
    }
    wait_primary(&c, "ny", 1, Duration::from_secs(20));
    qemu_io(&c.uri("ny", VOLUME), &["write -P 0x61 0 1M", "flush"]);
    wait_caught_up(&c, "ny", Duration::from_secs(60));

    // One of three etcd members lost: failover still works.
    etcd.kill(2);
    c.kill("ny");
    let killed = Instant::now();
    wait_until(
        Duration::from_secs(20),
        "a write acknowledged by chicago",
        || {
            c.socket("chicago", VOLUME).exists()
                && try_write(&c.uri("chicago", VOLUME), "write -P 0x62 1M 64k")
        },
    );
    eprintln!("etcd failover: {:?}", killed.elapsed());
    assert_eq!(group(&c, "chicago")["epoch"], 2);
    qemu_io(&c.uri("chicago", VOLUME), &["read -P 0x61 0 1M"]);

    // Two of three lost: no quorum. The owner fences itself within the
    // lease and nobody is promoted.
    etcd.kill(1);
    let lost = Instant::now();
    wait_until(Duration::from_secs(10), "chicago fenced", || {
        group(&c, "chicago")["role"] == "fenced"
    });
    // The last etcd leader keeps renewing leases until it notices it lost
    // quorum (about an election timeout); the owner's deadline follows
    // its last granted renewal by TTL - TTL/6 = 2.5 s.
    assert!(
        lost.elapsed() < Duration::from_secs(6),
        "fenced after {:?}",
        lost.elapsed()
    );
    assert!(
        !try_write(&c.uri("chicago", VOLUME), "write -P 0x63 2M 4k"),
        "a fenced owner acknowledged a write"
    );
    // A negative claim over time: longer than the 3 s lease, nobody is
    // promoted without quorum. The wait is the point of the check.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(group(&c, "seattle")["role"], "replica");

    // Quorum back: chicago takes its epoch back; writes flow again.
    etcd.restart(1);
    wait_until(Duration::from_secs(30), "chicago serving again", || {
        group(&c, "chicago")["role"] == "primary"
    });
    assert_eq!(
        group(&c, "chicago")["epoch"],
        2,
        "a coordinator outage must not bump the epoch"
    );
    // The restarted member may still be settling (an election): the lease
    // can lapse once more, and with on_lost_lease = "error" a write then
    // fails. Writes must flow again within a bound.
    wait_until(
        Duration::from_secs(30),
        "a write acknowledged by chicago with quorum back",
        || try_write(&c.uri("chicago", VOLUME), "write -P 0x64 3M 64k"),
    );
    qemu_io(&c.uri("chicago", VOLUME), &["read -P 0x64 3M 64k"]);
}

#[test]
fn manual_failover_is_refused_while_the_owner_is_healthy_and_forced_otherwise() {
    let mut c = Cluster::new("ny", &["chicago", "seattle"], &[vol(VOLUME, "16MiB")], "");
    let mut witness = Witness::start(c.dir.path());
    c.set_coordinator(&witness.section("2s"));
    for s in ["ny", "chicago", "seattle"] {
        c.start_any(s);
    }
    wait_primary(&c, "ny", 1, Duration::from_secs(20));
    qemu_io(&c.uri("ny", VOLUME), &["write -P 0x71 0 1M", "flush"]);
    wait_caught_up(&c, "ny", Duration::from_secs(60));

    let failover = |force: bool| {
        let mut cmd = Command::new(TANDEM);
        cmd.args(["failover", "g", "--to", "seattle", "--config"])
            .arg(&c.site("seattle").config);
        if force {
            cmd.arg("--force");
        }
        run_with_timeout(&mut cmd, Duration::from_secs(60))
    };
    let refused = failover(false);
    assert_eq!(refused.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&refused.stderr);
    assert!(
        msg.contains("holds its lease") && msg.contains("--force"),
        "{msg}"
    );
    assert_eq!(group(&c, "ny")["role"], "primary");

    let forced = failover(true);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    wait_primary(&c, "seattle", 2, Duration::from_secs(20));
    wait_until(Duration::from_secs(20), "ny demoted", || {
        group(&c, "ny")["role"] == "replica"
    });
    assert!(!try_write(&c.uri("ny", VOLUME), "write -P 0x72 0 4k"));
    qemu_io(
        &c.uri("seattle", VOLUME),
        &["read -P 0x71 0 1M", "write -P 0x73 1M 4k"],
    );

    // The witness restarted (SIGKILL) keeps the group where it is.
    witness.kill();
    witness.restart();
    // A negative claim over time: for longer than the 2 s lease after the
    // restart, nobody takes the group. The wait is the point of the check.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(group(&c, "seattle")["epoch"], 2);
    wait_until(
        Duration::from_secs(20),
        "seattle serving after the witness restart",
        || group(&c, "seattle")["role"] == "primary",
    );
    qemu_io(&c.uri("seattle", VOLUME), &["write -P 0x74 2M 4k", "flush"]);
    witness.assert_no_refusals();
}

#[test]
fn a_forced_failover_to_a_site_that_cannot_take_over_is_refused_and_the_owner_keeps_serving() {
    let mut c = Cluster::new("ny", &["chicago", "seattle"], &[vol(VOLUME, "16MiB")], "");
    let witness = Witness::start(c.dir.path());
    c.set_coordinator(&witness.section("2s"));
    // seattle is configured but its agent never runs: no report.
    for s in ["ny", "chicago"] {
        c.start_any(s);
    }
    wait_primary(&c, "ny", 1, Duration::from_secs(20));
    qemu_io(&c.uri("ny", VOLUME), &["write -P 0x81 0 1M", "flush"]);
    let mut cmd = Command::new(TANDEM);
    cmd.args(["failover", "g", "--to", "seattle", "--force", "--config"])
        .arg(&c.site("chicago").config);
    let refused = run_with_timeout(&mut cmd, Duration::from_secs(60));
    assert_eq!(refused.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&refused.stderr);
    assert!(
        msg.contains("seattle cannot take g over") && msg.contains("no report"),
        "{msg}"
    );
    // Nothing changed: ny still owns epoch 1 and acknowledges writes.
    let g = group(&c, "ny");
    assert_eq!(
        (g["role"].as_str(), g["epoch"].as_u64()),
        (Some("primary"), Some(1))
    );
    qemu_io(&c.uri("ny", VOLUME), &["write -P 0x82 1M 4k", "flush"]);
    witness.assert_no_refusals();
}

#[test]
fn a_failing_on_promote_hands_the_group_to_the_next_site_when_configured() {
    let mut c = Cluster::new(
        "ny",
        &["chicago", "seattle"],
        &[vol(VOLUME, "16MiB")],
        "on_promote = \"test $TANDEM_SITE != chicago\"\non_promote_failure = \"next\"",
    );
    let witness = Witness::start(c.dir.path());
    c.set_coordinator(&witness.section("2s"));
    for s in ["ny", "chicago", "seattle"] {
        c.start_any(s);
    }
    wait_primary(&c, "ny", 1, Duration::from_secs(20));
    qemu_io(&c.uri("ny", VOLUME), &["write -P 0x81 0 1M", "flush"]);
    wait_caught_up(&c, "ny", Duration::from_secs(60));
    c.kill("ny");
    // Chicago is promoted (epoch 2), its hook fails, Seattle takes over.
    wait_primary(&c, "seattle", 3, Duration::from_secs(30));
    assert_eq!(group(&c, "chicago")["role"], "replica");
    assert!(c
        .site("chicago")
        .log()
        .contains("on_promote failed: handing the group to the next site"));
    qemu_io(
        &c.uri("seattle", VOLUME),
        &["read -P 0x81 0 1M", "write -P 0x82 1M 4k"],
    );
    witness.assert_no_refusals();
}

#[test]
fn with_a_single_etcd_sigkill_fails_over_and_migration_brings_the_group_home() {
    let etcd = etcd_cluster::EtcdCluster::single();
    let mut c = Cluster::new("ny", &["chicago", "seattle"], &[vol(VOLUME, "16MiB")], "");
    c.set_coordinator(&format!(
        "kind = \"etcd\"\nendpoints = [\"{}\"]\nlease_ttl = \"3s\"",
        etcd.endpoint(0)
    ));
    for s in ["ny", "chicago", "seattle"] {
        c.start_any(s);
    }
    wait_primary(&c, "ny", 1, Duration::from_secs(20));
    qemu_io(&c.uri("ny", VOLUME), &["write -P 0x91 0 2M", "flush"]);
    wait_caught_up(&c, "ny", Duration::from_secs(60));
    c.kill("ny");
    wait_primary(&c, "chicago", 2, Duration::from_secs(20));
    qemu_io(
        &c.uri("chicago", VOLUME),
        &["read -P 0x91 0 2M", "write -P 0x92 2M 1M", "flush"],
    );
    c.start_any("ny");
    wait_streaming(&c, "ny", "chicago", Duration::from_secs(60));
    wait_caught_up(&c, "chicago", Duration::from_secs(60));
    let out = run_ok(
        Command::new(TANDEM)
            .args(["migrate", "g", "--to", "ny", "--config"])
            .arg(&c.site("seattle").config),
        Duration::from_secs(60),
    );
    assert!(out.contains("owned by ny in epoch 3"), "{out}");
    wait_primary(&c, "ny", 3, Duration::from_secs(20));
    qemu_io(
        &c.uri("ny", VOLUME),
        &["read -P 0x91 0 2M", "read -P 0x92 2M 1M"],
    );
}

#[test]
fn an_owner_restarted_within_its_lease_keeps_the_group_and_its_epoch() {
    let mut c = Cluster::new("ny", &["chicago"], &[vol(VOLUME, "16MiB")], "");
    let witness = Witness::start(c.dir.path());
    c.set_coordinator(&witness.section("5s"));
    for s in ["ny", "chicago"] {
        c.start_any(s);
    }
    wait_primary(&c, "ny", 1, Duration::from_secs(20));
    qemu_io(&c.uri("ny", VOLUME), &["write -P 0xa1 0 1M", "flush"]);
    // SIGTERM then SIGKILL, each followed by an immediate restart: the
    // lease outlives the restart, so nobody takes over and the epoch stays.
    assert!(c.stop("ny").success());
    c.start_any("ny");
    wait_primary(&c, "ny", 1, Duration::from_secs(10));
    c.kill("ny");
    c.start_any("ny");
    wait_primary(&c, "ny", 1, Duration::from_secs(10));
    qemu_io(
        &c.uri("ny", VOLUME),
        &["read -P 0xa1 0 1M", "write -P 0xa2 1M 4k", "flush"],
    );
    assert_eq!(group(&c, "chicago")["role"], "replica");
    assert!(c.site("ny").log().matches("ownership claimed").count() <= 1);
    witness.assert_no_refusals();
}
