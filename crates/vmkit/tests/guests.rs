//! The harness itself, with a real libvirt and real TCG guests: a guest
//! boots from a local raw ext4 disk and from the same kind of disk on an
//! NBD Unix socket served by qemu-nbd (no Tandem involved), writes fsync()ed
//! files, and what it acknowledged is in the image afterwards.

use std::path::Path;
use std::time::{Duration, Instant};

use tandem_vmkit::{ext4, Disk, Error, Guest, GuestConfig, GuestImage, Libvirt, QemuNbd, Workload};

/// Boot takes about 6 s under TCG on an idle machine; other tests may be
/// running on the same two cores.
const BOOT: Duration = Duration::from_secs(120);
const DISK_SIZE: u64 = 64 << 20;

#[track_caller]
fn ok<T>(r: Result<T, Error>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn setup() -> (Libvirt, GuestImage) {
    let t = Instant::now();
    let libvirt = ok(Libvirt::ensure(), "libvirt");
    eprintln!("libvirt ready in {:?}", t.elapsed());
    let t = Instant::now();
    let image = ok(GuestImage::ensure(), "guest image");
    eprintln!(
        "guest image {} ready in {:?}",
        image.dir().display(),
        t.elapsed()
    );
    (libvirt, image)
}

fn work_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tandem-vmkit-test-")
        .tempdir_in("/var/tmp")
        .expect("a temporary directory")
}

/// Boots, waits for `MOUNTED` and then `acks` ACK lines; reports timings.
fn boot_and_write(guest: &Guest, acks: u64) -> Vec<u64> {
    let line = ok(
        guest.wait_for_line("MOUNTED", BOOT, |l| l == "MOUNTED"),
        "boot",
    );
    let booted = guest.started_at().elapsed();
    eprintln!("{}: {line} {booted:?} after virsh start", guest.name());
    let got = ok(guest.wait_for_acks(acks, BOOT), "ACKs");
    eprintln!(
        "{}: {} ACKs {:?} after virsh start",
        guest.name(),
        got.len(),
        guest.started_at().elapsed()
    );
    got
}

/// After a crash (destroy) of a guest running the write workload on
/// `image`: the journal replays, e2fsck -n -f is clean, every ACKed file
/// is there and intact, and nothing but the one file being written when
/// it was killed is missing or torn.
fn check_after_crash(image: &Path, acks: &[u64]) {
    assert!(!acks.is_empty());
    let expected: Vec<u64> = (1..=acks.len() as u64).collect();
    assert_eq!(acks, &expected[..], "ACKs are 1, 2, 3, ... in order");
    let last = *acks.last().expect("an ACK");
    ok(ext4::replay_journal(image), "journal replay");
    ok(ext4::fsck(image), "e2fsck -n -f");
    let files = ok(ext4::verify_numbered_files(image), "reading the files");
    for n in acks {
        match files.get(n) {
            Some(Ok(())) => {}
            Some(Err(e)) => panic!("ACKed file f{n} is damaged: {e}"),
            None => panic!("ACKed file f{n} is missing (files: {:?})", files.keys()),
        }
    }
    for (n, verdict) in &files {
        assert!(
            *n <= last + 1,
            "f{n} exists although the guest was killed while writing f{} at the latest",
            last + 1
        );
        if *n <= last {
            assert!(verdict.is_ok(), "f{n}: {verdict:?}");
        }
    }
    eprintln!(
        "{}: {} files, {} ACKed, all ACKed intact",
        image.display(),
        files.len(),
        acks.len()
    );
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
