//! `tandem test start --boot` with real libvirt daemons and a real TCG
//! guest (docs/HISTORY.md, "Test views"): ny runs web01 (the group's VM,
//! writing numbered, fsync()ed files), dr is the replica. A test at dr
//! with `--boot` runs a copy of web01 on the test view, on dr's own
//! libvirt, named `web01-test-1`, without a network interface; it boots
//! from the recovery point (its console says `RESUME <N>` for at least
//! every file ny acknowledged before the point) while web01 keeps running
//! at ny. `tandem test stop` leaves no domain behind. A group without a VM
//! refuses `--boot` (crates/tandem/tests/testview.rs).
//! web01 has a network interface (user-mode networking); the copy has
//! none. A copy does not outlive its agent (removed when the agent starts
//! again after a SIGKILL) nor a promotion of the replica (removed before
//! the group's VM starts there).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use tandem_vmkit::{ext4, Disk, GuestConfig, GuestImage, SiteLibvirt, Workload};

const VOLUME: &str = "web-vda";
const VOLUME_BYTES: u64 = 64 << 20;
const VM: &str = "web01";
const COPY: &str = "web01-test-1";
/// A boot under TCG takes 6-17 s on the two cores (crates/vmkit docs).
const BOOT: Duration = Duration::from_secs(120);

#[track_caller]
fn ok<T>(r: Result<T, tandem_vmkit::Error>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// The console lines of a file (the guest's serial port).
fn lines(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&bytes)
        .lines()
        .map(|l| l.replace('\r', ""))
        .collect()
}

/// Waits until the console `path` satisfies `f`; fails at once on a guest
/// error.
fn wait_console<T>(path: &Path, what: &str, mut f: impl FnMut(&[String]) -> Option<T>) -> T {
    let mut last = Vec::new();
    poll(BOOT, || {
        last = lines(path);
        if let Some(bad) = last.iter().find(|l| {
            l.contains("TANDEM-ERROR") || l.contains("I/O error") || l.contains("Kernel panic")
        }) {
            panic!(
                "{}: the guest failed: {bad}\n{}",
                path.display(),
                last.join("\n")
            );
        }
        let got = f(&last);
        if got.is_none() {
            std::thread::sleep(Duration::from_millis(100));
        }
        got
    })
    .unwrap_or_else(|| {
        panic!(
            "no {what} on {} after {BOOT:?}:\n{}",
            path.display(),
            last.join("\n")
        )
    })
}

fn last_ack(lines: &[String]) -> Option<u64> {
    lines.iter().rev().find_map(|l| tandem_vmkit::parse_ack(l))
}

#[test]
fn boot_runs_a_copy_of_the_vm_on_the_test_view_without_network_and_nothing_outlives_it() {
    let image = ok(GuestImage::ensure(), "guest image");
    let ny_host = ok(SiteLibvirt::start("ny"), "ny libvirt");
    let dr_host = ok(SiteLibvirt::start("dr"), "dr libvirt");
    let mut c = Cluster::new(
        "ny",
        &["dr"],
        &[vol(VOLUME, "64MiB")],
        "mode = \"sync\"\nvm = \"libvirt:web01\"\nvm_shutdown_timeout = \"3s\"",
    );
    for (s, host) in [("ny", &ny_host), ("dr", &dr_host)] {
        let config = c.site(s).config.clone();
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(&format!("\n[libvirt]\nuri = \"{}\"\n", host.uri()));
        std::fs::write(&config, text).unwrap();
    }
    // The agents start the VM where ownership is confirmed: a witness.
    let witness = Witness::start(c.dir.path());
    c.set_coordinator(&witness.section("3s"));
    let seed = c.dir.path().join("seed.img");
    ok(ext4::make_ext4(&seed, VOLUME_BYTES), "mkfs");
    for s in ["ny", "dr"] {
        let to = c.image(s, VOLUME);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&seed, &to).unwrap();
    }
    // web01 defined at ny.
    let work = c.dir.path().join("guest");
    std::fs::create_dir_all(&work).unwrap();
    let console = work.join("web01.console");
    let config = GuestConfig::new(
        VM,
        Disk::TandemNbd {
            socket: c.socket("ny", VOLUME),
            export: VOLUME.into(),
            reconnect_delay_secs: 30,
        },
        Workload::Write,
        &work,
    )
    .with_name(VM)
    .with_console(&console);
    // web01 has a network interface (user-mode networking: no host
    // bridge needed); the copy must come without it.
    let xml = tandem_vmkit::domain_xml(VM, &image, &config, &console).replacen(
        "</devices>",
        "<interface type='user'><mac address='52:54:00:7a:6e:01'/><model type='virtio'/></interface>\n</devices>",
        1,
    );
    assert!(xml.contains("<interface"), "{xml}");
    let xml_path = work.join("web01.xml");
    std::fs::write(&xml_path, &xml).unwrap();
    ok(
        ny_host
            .libvirt()
            .virsh(&["define", &xml_path.to_string_lossy()]),
        "define web01 at ny",
    );
    c.start("dr");
    c.start("ny");

    // web01 runs at ny and acknowledges files; its definition reached dr.
    if poll(BOOT, || {
        std::thread::sleep(Duration::from_millis(100));
        ny_host.qemu_pid(VM)
    })
    .is_none()
    {
        let log = std::fs::read_to_string(ny_host.libvirtd_log()).unwrap_or_default();
        let qemu_logs = run_with_timeout(
            Command::new("sh").arg("-c").arg(format!(
                "tail -n 20 $(find {} -name '*.log')",
                ny_host.root().display()
            )),
            Duration::from_secs(10),
        );
        panic!(
            "web01 does not run at ny; libvirtd:\n{}\nlogs:\n{}",
            log.lines().rev().take(30).collect::<Vec<_>>().join("\n"),
            String::from_utf8_lossy(&qemu_logs.stdout)
        );
    }
    let acked = wait_console(&console, "ACK 3", |l| last_ack(l).filter(|n| *n >= 3));
    let ny_pid = ny_host.qemu_pid(VM).expect("web01 runs at ny");
    let dr_definition: PathBuf = c.site("dr").data_dir.join("vms").join("g.xml");
    poll(Duration::from_secs(30), || {
        dr_definition.exists().then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the VM definition did not reach dr: {}",
            dr_definition.display()
        )
    });
    c.wait_replicated(Duration::from_secs(30));

    // The test with --boot.
    let dr = c.site("dr").config.clone();
    let (code, out, err) = tandem_test(&dr, &["start", "g", "--boot", "--json"]);
    assert_eq!(code, 0, "tandem test start --boot failed: {out}{err}");
    let test: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(test["vm"]["name"], COPY, "{test:#}");
    assert_eq!(test["vm"]["state"], "running", "{test:#}");

    // The copy runs at dr under its own name, without an interface, on
    // the test view's socket; web01 itself does not run at dr.
    assert!(
        dr_host.qemu_pid(COPY).is_some(),
        "the copy does not run at dr"
    );
    assert_eq!(dr_host.qemu_pid(VM), None, "web01 must not run at dr");
    let live = ok(dr_host.libvirt().virsh(&["dumpxml", COPY]), "dumpxml");
    assert!(
        !live.contains("<interface"),
        "the copy has a network: {live}"
    );
    let socket = test["exports"][0]["socket"].as_str().unwrap();
    assert!(socket.contains("/nbd/test/"), "{test:#}");
    assert!(
        live.contains(socket),
        "the copy does not read the view: {live}"
    );
    // It boots from the point: every file acknowledged before it is there.
    let copy_console = PathBuf::from(format!("{}.{COPY}", console.display()));
    let resumed = wait_console(&copy_console, "RESUME", |l| {
        l.iter()
            .find_map(|l| l.strip_prefix("RESUME ")?.trim().parse::<u64>().ok())
    });
    assert!(
        resumed >= acked,
        "the copy resumed at {resumed}, ny had acknowledged {acked}"
    );
    wait_console(&copy_console, "an ACK of the copy", |l| {
        last_ack(l).filter(|n| *n > resumed)
    });
    // Status shows the copy.
    let status = c.status("dr");
    let tests = &status["groups"][0]["tests"];
    assert_eq!(tests[0]["vm"]["name"], COPY, "{status:#}");
    assert_eq!(tests[0]["vm"]["state"], "running", "{status:#}");

    // The real VM goes on at ny, the same process.
    let before = last_ack(&lines(&console)).unwrap_or(0);
    wait_console(&console, "a new ACK at ny", |l| {
        last_ack(l).filter(|n| *n > before)
    });
    assert_eq!(
        ny_host.qemu_pid(VM),
        Some(ny_pid),
        "web01's QEMU at ny changed"
    );

    // Stop: no domain left at dr.
    let (code, out, err) = tandem_test(&dr, &["stop", "g"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(dr_host.qemu_pid(COPY), None);
    let domains = ok(dr_host.libvirt().domains(), "domains");
    assert!(domains.is_empty(), "domains left at dr: {domains:?}");
    assert_eq!(ny_host.qemu_pid(VM), Some(ny_pid));

    // A killed agent's copy does not outlive it: the agent removes it
    // when it starts again (tests do not survive a restart).
    let boot = |what: &str| -> String {
        let (code, out, err) = tandem_test(&dr, &["start", "g", "--boot", "--json"]);
        assert_eq!(
            code, 0,
            "{what}: tandem test start --boot failed: {out}{err}"
        );
        let test: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        let name = test["vm"]["name"].as_str().unwrap().to_owned();
        assert!(
            dr_host.qemu_pid(&name).is_some(),
            "{what}: the copy {name} does not run at dr"
        );
        name
    };
    let copy = boot("before the kill");
    c.kill("dr");
    assert!(
        dr_host.qemu_pid(&copy).is_some(),
        "the copy runs on without its agent (libvirt's child)"
    );
    c.start("dr");
    wait_until(BOOT, "dr's agent to remove the copy at start", || {
        ok(dr_host.libvirt().domains(), "domains").is_empty()
    });
    assert_eq!(dr_host.qemu_pid(&copy), None);
    c.wait_replicated(Duration::from_secs(60));

    // A promotion removes the copies before the group's VM starts there.
    let copy = boot("before the migration");
    run_ok(
        Command::new(TANDEM)
            .args(["migrate", "g", "--to", "dr", "--config"])
            .arg(&c.site("ny").config),
        Duration::from_secs(180),
    );
    wait_until(BOOT, "web01 running at dr", || {
        dr_host.qemu_pid(VM).is_some()
    });
    assert_eq!(
        dr_host.qemu_pid(&copy),
        None,
        "the copy outlived the promotion"
    );
    let domains = ok(dr_host.libvirt().domains(), "domains");
    assert_eq!(
        domains,
        vec![VM.to_owned()],
        "domains at dr after the promotion"
    );
    assert_eq!(ny_host.qemu_pid(VM), None, "web01 still runs at ny");

    c.stop("ny");
    c.stop("dr");
    ok(
        dr_host.libvirt().destroy_and_undefine(VM),
        "remove web01 at dr",
    );
    let _ = ny_host.libvirt().destroy_and_undefine(VM);
}
