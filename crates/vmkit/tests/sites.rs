//! Site daemons ([`SiteLibvirt`]): each simulated site has its own
//! libvirtd, so sites can have domains of the same name, libvirt can be
//! down on one site while its guests run, and a site's host can crash;
//! and the disk form Tandem uses (an NBD `-blockdev` with
//! `reconnect-delay` on the QEMU command line) rides out a killed and
//! restarted NBD server.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{boot_and_write, check_after_crash, ok, work_dir, BOOT, DISK_SIZE};
use tandem_vmkit::{
    ext4, Disk, Guest, GuestConfig, GuestImage, Libvirt, QemuNbd, SiteLibvirt, Workload,
};

fn site(label: &str) -> SiteLibvirt {
    let t = Instant::now();
    let site = ok(SiteLibvirt::start(label), "site daemon");
    eprintln!("site {label} ({}) ready in {:?}", site.uri(), t.elapsed());
    site
}

/// A guest named `web01` running the write workload on a fresh ext4 image
/// `<dir>/<prefix>.img`, its console at `<dir>/<prefix>.console`.
fn web01(site: &SiteLibvirt, image: &GuestImage, dir: &Path, prefix: &str) -> Guest {
    let disk = dir.join(format!("{prefix}.img"));
    ok(ext4::make_ext4(&disk, DISK_SIZE), "mkfs");
    let config = GuestConfig::new(prefix, Disk::File(disk), Workload::Write, dir)
        .with_name("web01")
        .with_console(&dir.join(format!("{prefix}.console")));
    ok(Guest::start(site.libvirt(), image, &config), "start web01")
}

/// Whether `pid` is a QEMU process that is not a zombie (a killed QEMU
/// whose parent died with it is one until init reaps it).
fn qemu_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return false;
    };
    let comm = &stat[open + 1..close];
    let state = stat[close + 1..].split_whitespace().next().unwrap_or("");
    comm.starts_with("qemu") && state != "Z"
}

/// Waits for `more` ACKs beyond those printed so far.
fn more_acks(guest: &Guest, more: u64, timeout: Duration) -> Vec<u64> {
    let now = ok(guest.acks(), "console").len() as u64;
    ok(guest.wait_for_acks(now + more, timeout), "more ACKs")
}

#[test]
fn sites_have_their_own_daemons_and_each_its_own_web01() {
    let image = common::image();
    let system = ok(Libvirt::ensure(), "system libvirt");
    let a = site("a");
    let b = site("b");
    let c = site("c");
    assert_ne!(a.uri(), b.uri());
    let dir = work_dir();
    let guest_a = web01(&a, &image, dir.path(), "a");
    let guest_b = web01(&b, &image, dir.path(), "b");
    boot_and_write(&guest_a, 3);
    boot_and_write(&guest_b, 3);

    // Each site sees its own web01, the third none, the system daemon none.
    assert_eq!(ok(a.libvirt().domains(), "a's domains"), vec!["web01"]);
    assert_eq!(ok(b.libvirt().domains(), "b's domains"), vec!["web01"]);
    assert!(ok(c.libvirt().domains(), "c's domains").is_empty());
    assert_eq!(ok(system.domain_state("web01"), "system's web01"), None);
    let pid_a = a.qemu_pid("web01").expect("a's QEMU");
    let pid_b = b.qemu_pid("web01").expect("b's QEMU");
    assert_ne!(pid_a, pid_b);
    assert_eq!(ok(a.qemu_pids(), "a's QEMUs"), vec![pid_a]);
    assert_eq!(ok(b.qemu_pids(), "b's QEMUs"), vec![pid_b]);
    assert!(ok(c.qemu_pids(), "c's QEMUs").is_empty());

    // Destroying web01 on a leaves b's running and writing.
    ok(guest_a.destroy(), "destroy a's web01");
    assert_eq!(ok(guest_a.state(), "a's state"), "shut off");
    assert_eq!(a.qemu_pid("web01"), None);
    assert_eq!(ok(guest_b.state(), "b's state"), "running");
    more_acks(&guest_b, 5, BOOT);
    assert_eq!(b.qemu_pid("web01"), Some(pid_b));

    // Removing a site kills what runs there and removes its root.
    let root_c = c.root().to_path_buf();
    ok(c.remove(), "remove c");
    assert!(!root_c.exists());
    let root_b = b.root().to_path_buf();
    drop(guest_b);
    drop(b);
    assert!(!root_b.exists());
    assert!(!qemu_alive(pid_b), "b's QEMU outlived the site");
}

#[test]
fn a_guest_writes_on_while_its_site_daemon_is_down_and_runs_after_the_restart() {
    let image = common::image();
    let site = site("down");
    let dir = work_dir();
    let disk = dir.path().join("down.img");
    ok(ext4::make_ext4(&disk, DISK_SIZE), "mkfs");

    // Something else (Tandem's agent, say) defines and starts web01 with
    // plain virsh on the site's URI; the test attaches to it by name and
    // console file.
    let console = dir.path().join("web01.console");
    let config = GuestConfig::new(
        "down",
        Disk::File(disk.clone()),
        Workload::Write,
        dir.path(),
    );
    let xml_path = dir.path().join("web01.xml");
    std::fs::write(
        &xml_path,
        tandem_vmkit::domain_xml("web01", &image, &config, &console),
    )
    .expect("write the XML");
    let agent = Libvirt::with_uri(site.uri());
    let xml_arg = xml_path.to_string_lossy().into_owned();
    ok(agent.virsh(&["define", &xml_arg]), "define");
    ok(agent.virsh(&["start", "web01"]), "start");
    let guest = Guest::attach(&Libvirt::with_uri(site.uri()), "web01", &console);
    ok(guest.wait_running(Duration::from_secs(30)), "running");
    boot_and_write(&guest, 5);
    let pid = site.qemu_pid("web01").expect("QEMU");

    let t = Instant::now();
    ok(site.stop_daemon(), "stop the daemon");
    eprintln!("daemons stopped in {:?}", t.elapsed());
    assert!(!ok(site.daemon_running(), "daemon running?"));
    assert!(site.libvirt().domains().is_err(), "libvirt still answers");
    more_acks(&guest, 10, Duration::from_secs(60));
    assert_eq!(site.qemu_pid("web01"), Some(pid));

    let t = Instant::now();
    ok(site.restart_daemon(), "restart the daemon");
    eprintln!("daemons restarted in {:?}", t.elapsed());
    assert_eq!(ok(guest.state(), "state after the restart"), "running");
    assert_eq!(site.qemu_pid("web01"), Some(pid));
    more_acks(&guest, 5, Duration::from_secs(60));

    // Dropping a guest attached to leaves the domain alone.
    drop(Guest::attach(site.libvirt(), "web01", &console));
    assert_eq!(ok(guest.state(), "state"), "running");

    // The daemon commands the QEMU it found again.
    ok(guest.destroy(), "destroy after the restart");
    assert_eq!(ok(guest.state(), "state"), "shut off");
    assert_eq!(site.qemu_pid("web01"), None);
    let acks = ok(guest.acks(), "console");
    ok(guest.remove(), "undefine");
    assert!(ok(site.libvirt().domains(), "domains").is_empty());
    check_after_crash(&disk, &acks);
}

#[test]
fn a_crashed_site_host_takes_its_guest_down_and_its_acked_files_survive() {
    let image = common::image();
    let site = site("crash");
    let dir = work_dir();
    let guest = web01(&site, &image, dir.path(), "crash");
    boot_and_write(&guest, 5);

    let t = Instant::now();
    ok(site.crash_host(), "crash the host");
    eprintln!("host crashed in {:?}", t.elapsed());
    assert!(ok(site.qemu_pids(), "QEMUs").is_empty());
    assert!(!ok(site.daemon_running(), "daemon running?"));
    let run = std::fs::read_dir(site.root().join("run")).expect("run dir");
    assert_eq!(run.count(), 0, "run/ survived the power loss");
    let acks = ok(guest.acks(), "console");

    ok(site.restart_daemon(), "restart the daemon");
    assert_eq!(ok(guest.state(), "state after the crash"), "shut off");
    assert_eq!(ok(guest.acks(), "console"), acks, "ACKs after the crash");
    ok(guest.remove(), "undefine");
    check_after_crash(&dir.path().join("crash.img"), &acks);
}

#[test]
fn a_guest_on_a_tandem_nbd_disk_rides_out_a_killed_and_restarted_nbd_server() {
    let image = common::image();
    let site = site("nbd");
    let dir = work_dir();
    let disk = dir.path().join("data.img");
    let socket = dir.path().join("data.sock");
    ok(ext4::make_ext4(&disk, DISK_SIZE), "mkfs");
    let server = ok(QemuNbd::serve(&disk, &socket, "web01-vda"), "qemu-nbd");
    let console = dir.path().join("web01.console");
    let config = GuestConfig::new("nbd", server.tandem_disk(30), Workload::Write, dir.path())
        .with_name("web01")
        .with_console(&console);
    let xml = tandem_vmkit::domain_xml("web01", &image, &config, &console);
    assert!(xml.contains("<qemu:commandline>"), "{xml}");
    assert!(!xml.contains("<disk"), "{xml}");
    let guest = ok(
        Guest::start_xml(site.libvirt(), "web01", &xml, &console),
        "start",
    );
    boot_and_write(&guest, 5);

    // The agent crashes: qemu-nbd gets SIGKILL and comes back on the same
    // socket after a 3 s outage (the sleep is the outage, not a wait).
    ok(server.stop(), "kill qemu-nbd");
    let killed = Instant::now();
    let at_kill = ok(guest.acks(), "console").len();
    std::thread::sleep(Duration::from_secs(3));
    let during = ok(guest.acks(), "console").len();
    let server = ok(
        QemuNbd::serve(&disk, &socket, "web01-vda"),
        "restart qemu-nbd",
    );
    let restarted = Instant::now();
    eprintln!(
        "qemu-nbd down for {:?}; ACKs {at_kill} at the kill, {during} at the restart",
        restarted - killed
    );
    let acks = ok(
        guest.wait_for_acks(during as u64 + 10, Duration::from_secs(60)),
        "ACKs after the restart",
    );
    eprintln!("10 more ACKs {:?} after the restart", restarted.elapsed());
    let lines = ok(guest.console_lines(), "console");
    let bad: Vec<&String> = lines
        .iter()
        .filter(|l| {
            l.contains("TANDEM-ERROR")
                || l.contains("I/O error")
                || l.contains("EXT4-fs error")
                || l.contains("Buffer I/O")
        })
        .collect();
    assert!(bad.is_empty(), "errors on the console: {bad:?}");
    assert!(acks.len() > during);

    ok(guest.destroy(), "destroy");
    let acks = ok(guest.acks(), "console");
    ok(guest.remove(), "undefine");
    ok(server.stop(), "stop qemu-nbd");
    check_after_crash(&disk, &acks);
}

#[test]
fn a_site_left_by_a_dead_test_process_is_swept_with_its_qemus() {
    let image = common::image();
    let site = site("stale");
    let dir = work_dir();
    let disk = dir.path().join("stale.img");
    ok(ext4::make_ext4(&disk, DISK_SIZE), "mkfs");
    let config = GuestConfig::new("stale", Disk::File(disk), Workload::Idle, dir.path());
    let guest = ok(Guest::start(site.libvirt(), &image, &config), "start");
    let pid = ok(site.qemu_pids(), "QEMUs");
    assert_eq!(pid.len(), 1, "{pid:?}");

    // Make the site look like a dead test process's.
    let mut dead = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let dead_pid = dead.id();
    dead.wait().expect("wait for true");
    std::fs::write(site.root().join("owner"), format!("{dead_pid} 1\n")).expect("owner");

    let t = Instant::now();
    SiteLibvirt::remove_stale_sites();
    eprintln!("swept in {:?}", t.elapsed());
    assert!(!site.root().exists(), "the stale root is still there");
    assert!(
        !qemu_alive(pid[0]),
        "the stale site's QEMU survived the sweep"
    );
    // Both know they are gone; dropping them must not hang.
    drop(guest);
    drop(site);
}
