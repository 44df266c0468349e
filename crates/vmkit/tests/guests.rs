//! The harness itself, with a real libvirt and real TCG guests: a guest
//! boots from a local raw ext4 disk and from the same kind of disk on an
//! NBD Unix socket served by qemu-nbd (no Tandem involved), writes fsync()ed
//! files, and what it acknowledged is in the image afterwards.

mod common;

use std::time::{Duration, Instant};

use common::{boot_and_write, check_after_crash, ok, work_dir, BOOT, DISK_SIZE};
use tandem_vmkit::{ext4, Disk, Guest, GuestConfig, GuestImage, Libvirt, QemuNbd, Workload};

fn setup() -> (Libvirt, GuestImage) {
    let t = Instant::now();
    let libvirt = ok(Libvirt::ensure(), "libvirt");
    eprintln!("libvirt ready in {:?}", t.elapsed());
    (libvirt, common::image())
}

#[test]
fn a_guest_on_a_local_raw_disk_writes_and_its_acks_survive_a_crash() {
    let (libvirt, image) = setup();
    let dir = work_dir();
    let disk = dir.path().join("data.img");
    ok(ext4::make_ext4(&disk, DISK_SIZE), "mkfs");
    let config = GuestConfig::new(
        "local-write",
        Disk::File(disk.clone()),
        Workload::Write,
        dir.path(),
    );
    let guest = ok(Guest::start(&libvirt, &image, &config), "start");
    boot_and_write(&guest, 20);
    ok(guest.destroy(), "destroy");
    assert_eq!(ok(guest.state(), "state"), "shut off");
    let acks = ok(guest.acks(), "console");
    ok(guest.remove(), "undefine");
    check_after_crash(&disk, &acks);
}

#[test]
fn a_guest_on_an_nbd_socket_served_by_qemu_nbd_writes_and_its_acks_survive_a_crash() {
    let (libvirt, image) = setup();
    let dir = work_dir();
    let disk = dir.path().join("data.img");
    ok(ext4::make_ext4(&disk, DISK_SIZE), "mkfs");
    let server = ok(
        QemuNbd::serve(&disk, &dir.path().join("data.sock"), "data"),
        "qemu-nbd",
    );
    let config = GuestConfig::new("nbd-write", server.disk(), Workload::Write, dir.path());
    let guest = ok(Guest::start(&libvirt, &image, &config), "start");
    assert!(
        guest.domain_xml().contains("protocol='nbd'"),
        "{}",
        guest.domain_xml()
    );
    boot_and_write(&guest, 20);
    ok(guest.destroy(), "destroy");
    let acks = ok(guest.acks(), "console");
    ok(guest.remove(), "undefine");
    ok(server.stop(), "stop qemu-nbd");
    check_after_crash(&disk, &acks);
}

#[test]
fn a_guest_that_writes_a_set_count_powers_off_cleanly_and_a_check_guest_verifies_the_files() {
    let (libvirt, image) = setup();
    let dir = work_dir();
    let disk = dir.path().join("data.img");
    ok(ext4::make_ext4(&disk, DISK_SIZE), "mkfs");

    let config = GuestConfig::new(
        "count",
        Disk::File(disk.clone()),
        Workload::WriteCount(5),
        dir.path(),
    );
    let guest = ok(Guest::start(&libvirt, &image, &config), "start");
    ok(
        guest.wait_for_line("DONE 5", BOOT, |l| l == "DONE 5"),
        "writing 5 files",
    );
    // ACPI: poweroff -f turns the domain off (on_poweroff destroy).
    ok(guest.wait_shut_off(Duration::from_secs(60)), "power off");
    assert_eq!(ok(guest.acks(), "console"), vec![1, 2, 3, 4, 5]);
    ok(guest.remove(), "undefine");

    // Unmounted cleanly: clean without a journal replay.
    ok(ext4::fsck(&disk), "e2fsck -n -f");
    let files = ok(ext4::verify_numbered_files(&disk), "reading the files");
    assert_eq!(
        files.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert!(files.values().all(Result::is_ok), "{files:?}");

    // The guest's own check agrees.
    let config = GuestConfig::new(
        "check",
        Disk::File(disk.clone()),
        Workload::Check,
        dir.path(),
    );
    let guest = ok(Guest::start(&libvirt, &image, &config), "start check");
    let line = ok(
        guest.wait_for_line("CHECKED", BOOT, |l| l.starts_with("CHECKED ")),
        "check",
    );
    assert_eq!(line, "CHECKED 5 0", "{}", guest.console_tail());
    ok(
        guest.wait_shut_off(Duration::from_secs(60)),
        "power off after check",
    );
    ok(guest.remove(), "undefine");
    ok(ext4::fsck(&disk), "e2fsck -n -f after the check guest");
}
