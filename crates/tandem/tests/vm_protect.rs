//! `tandem protect` of a real, running libvirt guest (docs/VMS.md,
//! "Onboarding"): one libvirt daemon per site (tandem-vmkit's
//! `SiteLibvirt`), a TCG guest writing fsync'd numbered files to an ext4
//! disk on a raw file, two agents (ny, chicago).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use tandem_vmkit::{ext4, Disk, Guest, GuestConfig, GuestImage, SiteLibvirt, Workload};

const BOOT: Duration = Duration::from_secs(120);
const DISK: u64 = 64 << 20;

#[track_caller]
fn ok<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Appends `[libvirt] uri` for a site's own daemon to its configuration.
fn use_libvirt(config: &Path, site: &SiteLibvirt) {
    let mut text = std::fs::read_to_string(config).unwrap();
    text.push_str(&format!("\n[libvirt]\nuri = \"{}\"\n", site.uri()));
    std::fs::write(config, text).unwrap();
}

fn group<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["groups"]
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

fn console_errors(guest: &Guest) -> Vec<String> {
    ok(guest.console_lines(), "console")
        .into_iter()
        .filter(|l| l.contains("I/O error") || l.contains("EXT4-fs error") || l.contains("FAIL"))
        .collect()
}

#[test]
fn a_running_guest_is_protected_and_unprotected_without_stopping() {
    let image = ok(GuestImage::ensure(), "guest image");
    let ny_lv = ok(SiteLibvirt::start("p-ny"), "ny's libvirt");
    let chicago_lv = ok(SiteLibvirt::start("p-chi"), "chicago's libvirt");
    let mut cluster = Cluster::new("ny", &["chicago"], &[vol("seed", "1MiB")], "");
    use_libvirt(&cluster.site("ny").config.clone(), &ny_lv);
    use_libvirt(&cluster.site("chicago").config.clone(), &chicago_lv);
    cluster.start("chicago");
    cluster.start("ny");

    // web01 runs at ny on a plain raw file and writes.
    let dir = tempfile::Builder::new()
        .prefix("tandem-protect-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let disk = dir.path().join("web01.img");
    ok(ext4::make_ext4(&disk, DISK), "mkfs");
    let config = GuestConfig::new(
        "protect",
        Disk::File(disk.clone()),
        Workload::Write,
        dir.path(),
    )
    .with_name("web01")
    .with_console(&dir.path().join("web01.console"));
    let guest = ok(
        Guest::start(ny_lv.libvirt(), &image, &config),
        "start web01",
    );
    ok(guest.wait_for_acks(3, BOOT), "the guest writes");
    let pid = ny_lv.qemu_pid("web01").expect("web01's QEMU");

    // A domain that does not exist, and a replica that is no peer, are
    // refused with a clear message and change nothing.
    let protect = |args: &[&str]| {
        run_with_timeout(
            Command::new(TANDEM)
                .arg("protect")
                .args(args)
                .arg("--config")
                .arg(&cluster.site("ny").config),
            Duration::from_secs(600),
        )
    };
    let out = protect(&["web99", "--replica", "chicago"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no domain named \"web99\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = protect(&["web01", "--replica", "boston"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("boston"), "{err}");
    assert!(group(&cluster.status("ny"), "web01").is_null());

    // Protect it while it writes.
    let acks_before = ok(guest.acks(), "console").len();
    let started = Instant::now();
    let out = protect(&["web01", "--replica", "chicago", "--mode", "sync"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tandem protect failed: {err}\n{}",
        cluster.site("ny").log()
    );
    eprintln!("tandem protect took {:?}:\n{err}", started.elapsed());
    assert!(err.contains("ms at the pivot"), "{err}");
    assert!(err.contains("every replica streams"), "{err}");

    // The guest never stopped: the same QEMU, still writing, no I/O error.
    assert_eq!(
        ny_lv.qemu_pid("web01"),
        Some(pid),
        "the guest was restarted"
    );
    let now = ok(guest.acks(), "console").len() as u64;
    assert!(now > acks_before as u64, "no write during the protect");
    ok(
        guest.wait_for_acks(now + 3, BOOT),
        "writes after the protect",
    );
    assert!(
        console_errors(&guest).is_empty(),
        "{:?}",
        console_errors(&guest)
    );

    // Its persistent definition is in Tandem's form on ny's socket; the
    // group shows it, its pivot and the VM running.
    let persistent = ok(
        ny_lv.libvirt().virsh(&["dumpxml", "--inactive", "web01"]),
        "dumpxml",
    );
    let socket = cluster.socket("ny", "web01-vda");
    assert!(persistent.contains("tandem-vda"), "{persistent}");
    assert!(
        persistent.contains(&socket.display().to_string()),
        "{persistent}"
    );
    let status = cluster.status("ny");
    let g = group(&status, "web01");
    assert_eq!(g["role"], "primary", "{status:#}");
    assert_eq!(g["mode"], "sync");
    assert_eq!(g["vm"]["state"], "running", "{status:#}");
    let onboarding = &g["vm"]["onboarding"];
    assert_eq!(onboarding["stage"], "done", "{status:#}");
    let pivot = onboarding["disks"][0]["pivot_ms"].as_f64().expect("pivot");
    eprintln!("pivot pause: {pivot:.1} ms");
    // The group and its VM's definition reached chicago; the VM does not
    // run there.
    let definition = cluster.site("chicago").data_dir.join("vms/web01.xml");
    wait_until(Duration::from_secs(30), "the definition at chicago", || {
        definition.exists()
    });
    assert!(group(&cluster.status("chicago"), "web01")["role"] == "replica");
    assert_eq!(
        ok(
            chicago_lv.libvirt().domain_state("web01"),
            "chicago's web01"
        ),
        None
    );
    let vms = run_with_timeout(
        Command::new(TANDEM)
            .args(["vms", "--json", "--config"])
            .arg(&cluster.site("ny").config),
        Duration::from_secs(60),
    );
    let vms: serde_json::Value = serde_json::from_slice(&vms.stdout).unwrap();
    assert_eq!(vms["vms"][0]["group"], "web01", "{vms:#}");

    // Stopped still (suspended), the replica catches up and holds exactly
    // ny's volume, a clean file system with every file written.
    ok(ny_lv.libvirt().virsh(&["suspend", "web01"]), "suspend");
    let acks = ok(guest.acks(), "console");
    let caught_up = poll(Duration::from_secs(120), || {
        let s = cluster.status("ny");
        let g = group(&s, "web01");
        let next = g["next_seq"].as_u64()?;
        let r = &g["replicas"][0];
        (r["state"] == "streaming"
            && r["applied_seq"].as_u64()? + 1 >= next
            && r["durable_seq"].as_u64()? + 1 >= next)
            .then_some(())
    });
    assert!(caught_up.is_some(), "{:#}", cluster.status("ny"));
    let primary = cluster.image("ny", "web01-vda");
    let replica = cluster.image("chicago", "web01-vda");
    assert!(files_equal(&primary, &replica), "the replica differs");
    let copy = dir.path().join("replica-copy.img");
    std::fs::copy(&replica, &copy).unwrap();
    ok(ext4::replay_journal(&copy), "journal replay");
    ok(ext4::fsck(&copy), "e2fsck -n");
    let files = ok(ext4::verify_numbered_files(&copy), "files");
    for n in &acks {
        assert!(
            matches!(files.get(n), Some(Ok(()))),
            "f{n}, written before the suspend, is not intact at chicago"
        );
    }
    ok(ny_lv.libvirt().virsh(&["resume", "web01"]), "resume");

    // A second protect of the same domain is refused.
    let out = protect(&["web01", "--replica", "chicago"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("protected by group web01"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Unprotect: the VM keeps running, now on a plain local raw file, and
    // the group is gone from both sites with its volumes.
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let out = run_with_timeout(
        Command::new(TANDEM)
            .args(["unprotect", "web01", "--to"])
            .arg(&home)
            .arg("--config")
            .arg(&cluster.site("ny").config),
        Duration::from_secs(600),
    );
    assert!(
        out.status.success(),
        "unprotect: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.site("ny").log()
    );
    let file = home.join("web01-vda.raw");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&file.display().to_string()));
    assert_eq!(
        ny_lv.qemu_pid("web01"),
        Some(pid),
        "the guest was restarted"
    );
    let now = ok(guest.acks(), "console").len() as u64;
    ok(
        guest.wait_for_acks(now + 3, BOOT),
        "writes after the unprotect",
    );
    assert!(
        console_errors(&guest).is_empty(),
        "{:?}",
        console_errors(&guest)
    );
    let persistent = ok(
        ny_lv.libvirt().virsh(&["dumpxml", "--inactive", "web01"]),
        "dumpxml",
    );
    assert!(!persistent.contains("tandem-vda"), "{persistent}");
    assert!(
        persistent.contains(&format!("file='{}'", file.display())),
        "{persistent}"
    );
    for site in ["ny", "chicago"] {
        let site_dir = &cluster.site(site).data_dir;
        wait_until(Duration::from_secs(30), "the group gone", || {
            group(&cluster.status(site), "web01").is_null()
                && !site_dir.join("volumes/web01-vda.img").exists()
        });
        assert!(!site_dir.join("groups/web01.toml").exists());
        // Nothing of the group is left to hinder protecting it again.
        for leftover in [
            "vms/web01.xml",
            "vms/web01.onboarding",
            "vms/web01.unprotecting",
        ] {
            assert!(!site_dir.join(leftover).exists(), "{site}: {leftover} left");
        }
    }
    // The local file holds the file system the guest goes on writing.
    ok(ny_lv.libvirt().virsh(&["suspend", "web01"]), "suspend");
    let acks = ok(guest.acks(), "console");
    let copy = dir.path().join("local-copy.img");
    std::fs::copy(&file, &copy).unwrap();
    ok(ext4::replay_journal(&copy), "journal replay");
    ok(ext4::fsck(&copy), "e2fsck -n");
    let files = ok(ext4::verify_numbered_files(&copy), "files");
    for n in &acks {
        assert!(
            matches!(files.get(n), Some(Ok(()))),
            "f{n} is not intact in the local file"
        );
    }
    drop(guest);
}

#[test]
fn a_shut_off_qcow2_guest_is_imported_with_its_holes_and_starts_on_its_volume() {
    let image = ok(GuestImage::ensure(), "guest image");
    let ny_lv = ok(SiteLibvirt::start("i-ny"), "ny's libvirt");
    let mut cluster = Cluster::new("ny", &["chicago"], &[vol("seed", "1MiB")], "");
    use_libvirt(&cluster.site("ny").config.clone(), &ny_lv);
    cluster.start("chicago");
    cluster.start("ny");

    // web02 writes five files, unmounts and powers off: shut off, defined.
    let dir = tempfile::Builder::new()
        .prefix("tandem-import-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let disk = dir.path().join("web02.img");
    ok(ext4::make_ext4(&disk, DISK), "mkfs");
    let console = dir.path().join("web02.console");
    let config = GuestConfig::new(
        "import",
        Disk::File(disk.clone()),
        Workload::WriteCount(5),
        dir.path(),
    )
    .with_name("web02")
    .with_console(&console);
    let guest = ok(
        Guest::start(ny_lv.libvirt(), &image, &config),
        "start web02",
    );
    ok(
        guest.wait_for_line("DONE", BOOT, |l| l.starts_with("DONE")),
        "DONE",
    );
    ok(guest.wait_shut_off(BOOT), "web02 shuts off");
    let original = ok(ext4::numbered_files(&disk), "files on the original");
    assert_eq!(original.len(), 5);
    // Its disk becomes a qcow2 image: what is imported is the guest's
    // view of it, not the qcow2 file.
    let qcow2 = dir.path().join("web02.qcow2");
    let out = run_with_timeout(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&disk)
            .arg(&qcow2),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let xml = ok(
        ny_lv.libvirt().virsh(&["dumpxml", "--inactive", "web02"]),
        "dumpxml",
    )
    .replace("type='raw'", "type='qcow2'")
    .replace(&disk.display().to_string(), &qcow2.display().to_string());
    let xml_path = dir.path().join("web02-qcow2.xml");
    std::fs::write(&xml_path, &xml).unwrap();
    ok(
        ny_lv
            .libvirt()
            .virsh(&["define", &xml_path.display().to_string()]),
        "define on qcow2",
    );
    std::fs::remove_file(&disk).unwrap();

    let out = run_with_timeout(
        Command::new(TANDEM)
            .args(["protect", "web02", "--replica", "chicago", "--config"])
            .arg(&cluster.site("ny").config),
        Duration::from_secs(600),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "protect: {err}");
    assert!(err.contains("copying vda"), "{err}");

    // The volume holds the disk's data, its holes kept.
    let volume = cluster.image("ny", "web02-vda");
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&volume).unwrap().blocks() * 512
    };
    assert!(
        allocated < DISK / 2,
        "the volume has {allocated} bytes allocated of {DISK}: holes were filled"
    );
    // Protected means running at the owner: it starts on its volume.
    wait_until(BOOT, "web02 running again", || {
        ny_lv
            .libvirt()
            .domain_state("web02")
            .ok()
            .flatten()
            .as_deref()
            == Some("running")
    });
    ok(
        guest.wait_for_line("MOUNTED", BOOT, |l| l == "MOUNTED"),
        "web02 mounts its volume",
    );
    let persistent = ok(
        ny_lv.libvirt().virsh(&["dumpxml", "--inactive", "web02"]),
        "dumpxml",
    );
    assert!(persistent.contains("tandem-vda"), "{persistent}");
    ok(guest.wait_shut_off(BOOT), "web02 done again");
    // The five imported files, and five more written on the volume (the
    // workload goes on from the highest file).
    let files = ok(ext4::verify_numbered_files(&volume), "files on the volume");
    assert_eq!(
        files.keys().copied().collect::<Vec<_>>(),
        (1..=10).collect::<Vec<u64>>(),
        "{files:?}"
    );
    assert!(files.values().all(Result::is_ok), "{files:?}");
    let imported = ok(ext4::numbered_files(&volume), "sizes on the volume");
    for (n, len) in &original {
        assert_eq!(imported.get(n), Some(len), "f{n} changed in the import");
    }
    ok(ext4::fsck(&volume), "e2fsck -n");
    drop(guest);
}
