//! One live agent per site name (SPEC G6, G11; docs/FAILOVER.md, "One
//! agent per site name"), with real `tandem agent` processes and both
//! coordinator backends (a `tandem witness` process; a real etcd):
//!
//! * a second agent with the first one's site name — its data directory
//!   copied (a cloned host), or a fresh one (a copied configuration) —
//!   waits for the name, says who holds it, acknowledges nothing, and
//!   exits non-zero naming the other agent, while the first keeps
//!   acknowledging writes as the group's only primary;
//! * the first, SIGKILLed and restarted on its host, is primary again at
//!   once, in the same epoch (a crashed run on the same host is known to
//!   be gone); started again in another pid namespace (as on another
//!   host, where the old run cannot be looked up) it waits for the old
//!   run's lease to end, then holds the name (witness run);
//! * a running agent whose name is taken over fences and exits non-zero.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../coordinator/tests/support/etcd.rs"]
mod etcd_cluster;

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;

const VOLUME: &str = "v";
/// Bound on a refused agent's life: its wait for the name (3 s lease + 2 s
/// margin), start and stop, with room for a loaded machine.
const REFUSAL_WAIT: Duration = Duration::from_secs(40);

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new(tool("qemu-io"));
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(c.arg(uri), Duration::from_secs(60));
    assert!(!out.contains("failed"), "qemu-io: {out}");
    out
}

fn group(status: &serde_json::Value) -> serde_json::Value {
    status["groups"][0].clone()
}

fn wait_primary(c: &Cluster, site: &str, epoch: u64, timeout: Duration) {
    wait_until(timeout, &format!("{site} primary in epoch {epoch}"), || {
        let g = group(&c.status(site));
        g["role"] == "primary" && g["epoch"] == epoch
    });
}

/// A second agent of site "ny": ny's configuration with its own data
/// directory and ports.
struct Clone {
    config: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    child: Child,
}

impl Clone {
    /// Starts it; `copy`: with a copy of ny's data directory.
    fn start(c: &Cluster, name: &str, copy: bool) -> Clone {
        let ny = c.site("ny");
        let data_dir = c.dir.path().join(name);
        if copy {
            let out = Command::new("cp")
                .arg("-a")
                .arg(&ny.data_dir)
                .arg(&data_dir)
                .output()
                .unwrap();
            assert!(out.status.success(), "cp: {out:?}");
        }
        let text = std::fs::read_to_string(&ny.config).unwrap();
        let text = text.replace(
            &format!("data_dir = \"{}\"", ny.data_dir.display()),
            &format!("data_dir = \"{}\"", data_dir.display()),
        );
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        for l in &mut lines {
            if l.starts_with("listen = ") || l.starts_with("api = ") {
                let key = l.split(' ').next().unwrap().to_owned();
                *l = format!("{key} = \"127.0.0.1:{}\"", free_port());
            }
        }
        let config = c.dir.path().join(format!("{name}.toml"));
        std::fs::write(&config, lines.join("\n")).unwrap();
        let log = c.dir.path().join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(TANDEM)
            .args(["agent", "--config"])
            .arg(&config)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Clone {
            config,
            data_dir,
            log,
            child,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) for it to exit.
    fn exit(&mut self, timeout: Duration) -> ExitStatus {
        let status = poll(timeout, || self.child.try_wait().unwrap());
        status.unwrap_or_else(|| {
            let _ = self.child.kill();
            panic!(
                "the second agent did not exit within {timeout:?}:\n{}",
                self.log()
            )
        })
    }
}

impl Drop for Clone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A second agent of ny (`copy`: a cloned host) is refused: while it waits
/// its status names ny's running agent, it offers no NBD export (nothing
/// can be written to it), and it exits non-zero naming ny's agent; ny goes on
/// acknowledging writes, as the only primary.
fn second_agent_is_refused(c: &Cluster, name: &str, copy: bool) {
    let ny_status = c.status("ny");
    let ny_instance = ny_status["instance"].clone();
    assert_eq!(ny_instance["state"], "held", "{ny_status:#}");
    let ny_pid = ny_instance["pid"].as_u64().unwrap();
    let ny_id = ny_instance["id"].as_str().unwrap().to_owned();

    let started = Instant::now();
    let mut clone = Clone::start(c, name, copy);
    // While it waits for the name, its status says who holds it.
    let waiting = poll(Duration::from_secs(20), || {
        if clone.child.try_wait().unwrap().is_some() {
            return Some(None);
        }
        let s = status_json(&clone.config)?;
        (s["instance"]["state"] == "waiting").then_some(Some(s))
    })
    .flatten()
    .unwrap_or_else(|| panic!("the second agent never said it waits:\n{}", clone.log()));
    assert_eq!(waiting["instance"]["other"]["pid"], ny_pid, "{waiting:#}");
    assert_eq!(waiting["instance"]["other"]["id"], ny_id.as_str());
    assert_ne!(waiting["instance"]["id"], ny_id.as_str());
    // The clone never offers its NBD export: no coordinator confirmed it
    // as owner (no client can even send it a write).
    let socket = clone.data_dir.join("nbd").join(format!("{VOLUME}.sock"));
    let offered = || std::os::unix::net::UnixStream::connect(&socket).is_ok();
    assert!(!offered(), "the waiting clone offers its NBD export");
    // ny acknowledges writes all along.
    qemu_io(&c.uri("ny", VOLUME), &["write -P 0x5a 1M 64k", "flush"]);

    let status = clone.exit(REFUSAL_WAIT);
    let lived = started.elapsed();
    let log = clone.log();
    assert!(!status.success(), "the second agent exited 0:\n{log}");
    for needle in [
        "another agent is running with site name \"ny\"".to_owned(),
        format!("instance {ny_id}"),
        format!("pid {ny_pid}"),
        "refuses ownership and exits".to_owned(),
    ] {
        assert!(log.contains(&needle), "{needle:?} not in the log:\n{log}");
    }
    assert!(
        log.contains("waiting up to"),
        "the wait was not logged:\n{log}"
    );
    assert!(!log.contains("ownership claimed"), "{log}");
    assert!(!log.contains("acknowledging writes"), "{log}");
    eprintln!("{name}: refused after {lived:?}");
    assert!(!offered(), "the refused clone offered its NBD export");

    // ny is the only primary and still acknowledges writes.
    let s = c.status("ny");
    assert_eq!(group(&s)["role"], "primary", "{s:#}");
    assert_eq!(s["instance"]["state"], "held");
    assert_eq!(s["instance"]["id"], ny_id.as_str());
    qemu_io(
        &c.uri("ny", VOLUME),
        &["read -P 0x5a 1M 64k", "write -P 0x5b 2M 4k", "flush"],
    );
    assert_eq!(group(&c.status("chicago"))["role"], "replica");
}

/// ny SIGKILLed and started again in another pid namespace (as on
/// another host: the old run cannot be looked up): it waits for the old
/// run's lease to end, says so, then holds the name; the group has one
/// primary (chicago, if it failed over meanwhile).
fn moved_host_waits_for_the_old_lease(c: &mut Cluster) {
    c.kill("ny");
    let ny = c.site("ny");
    let log = c.dir.path().join("ny-moved.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child", "--"])
        .arg(TANDEM)
        .args(["agent", "--config"])
        .arg(&ny.config)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    struct Guard(Child);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Guard(child);
    let started = Instant::now();
    let config = ny.config.clone();
    wait_until(
        Duration::from_secs(30),
        "the moved ny to hold its name",
        || status_json(&config).is_some_and(|s| s["instance"]["state"] == "held"),
    );
    eprintln!("moved ny held its name after {:?}", started.elapsed());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("waiting up to"), "{text}");
    assert!(!text.contains("taking the name over at once"), "{text}");
    // One primary: ny again, or chicago after a failover.
    wait_until(Duration::from_secs(30), "one primary", || {
        let (n, ch) = (
            group(&status_json(&config).unwrap_or_default()),
            group(&c.status("chicago")),
        );
        (n["role"] == "primary") != (ch["role"] == "primary")
            && (n["role"] == "replica" || ch["role"] == "replica")
    });
}

/// The whole story on one coordinator (`section`).
fn one_agent_per_site_name(section: &str, take_over: Option<&dyn Fn()>) {
    let mut c = Cluster::new("ny", &["chicago"], &[vol(VOLUME, "16MiB")], "");
    c.set_coordinator(section);
    for s in ["ny", "chicago"] {
        c.start_any(s);
    }
    wait_primary(&c, "ny", 1, Duration::from_secs(30));
    qemu_io(&c.uri("ny", VOLUME), &["write -P 0xa1 0 1M", "flush"]);

    second_agent_is_refused(&c, "ny-cloned-host", true);
    second_agent_is_refused(&c, "ny-copied-config", false);

    // A crash and a restart on the same host: the old run is known to be
    // gone, so ny takes its name and its group back at once (same epoch,
    // no failover).
    let killed = Instant::now();
    c.kill("ny");
    c.start_any("ny");
    wait_primary(&c, "ny", 1, Duration::from_secs(10));
    eprintln!("ny primary again {:?} after SIGKILL", killed.elapsed());
    assert!(c.site("ny").log().contains("taking the name over at once"));
    qemu_io(
        &c.uri("ny", VOLUME),
        &[
            "read -P 0xa1 0 1M",
            "read -P 0x5b 2M 4k",
            "write -P 0xa2 3M 4k",
            "flush",
        ],
    );
    assert_eq!(group(&c.status("chicago"))["role"], "replica");

    if take_over.is_none() {
        moved_host_waits_for_the_old_lease(&mut c);
    }
    if let Some(take_over) = take_over {
        // Someone else's record replaces ny's: ny fences and exits.
        take_over();
        let status = c.wait_exit("ny", Duration::from_secs(30));
        let log = c.site("ny").log();
        assert!(
            log.contains("was taken over by") && log.contains("stops acknowledging writes"),
            "{log}"
        );
        assert!(!status.success(), "ny exited 0 after losing its name");
    }
}

#[test]
fn with_a_witness_a_second_agent_of_a_site_is_refused_and_the_first_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let witness = Witness::start(dir.path());
    one_agent_per_site_name(&witness.section("3s"), None);
}

#[test]
fn with_etcd_a_second_agent_of_a_site_is_refused_and_one_whose_name_is_taken_exits() {
    let etcd = etcd_cluster::EtcdCluster::single();
    let section = format!(
        "kind = \"etcd\"\nendpoints = [\"{}\"]\nlease_ttl = \"3s\"",
        etcd.endpoint(0)
    );
    // Puts `{"id":"mallory"}` (not ny's record) at /tandem/sites/ny/instance.
    let take_over = || {
        let (status, body) = etcd
            .post(
                0,
                "/v3/kv/put",
                r#"{"key":"L3RhbmRlbS9zaXRlcy9ueS9pbnN0YW5jZQ==","value":"eyJpZCI6Im1hbGxvcnkifQ=="}"#,
            )
            .unwrap();
        assert_eq!(status, 200, "{body}");
    };
    one_agent_per_site_name(&section, Some(&take_over));
}
