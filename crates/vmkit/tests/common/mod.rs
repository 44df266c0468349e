//! Helpers shared by the harness's own tests.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use tandem_vmkit::{ext4, Error, Guest, GuestImage};

/// Boot takes about 6 s under TCG on an idle machine; other tests may be
/// running on the same two cores.
pub const BOOT: Duration = Duration::from_secs(120);
pub const DISK_SIZE: u64 = 64 << 20;

#[track_caller]
pub fn ok<T>(r: Result<T, Error>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

pub fn image() -> GuestImage {
    let t = Instant::now();
    let image = ok(GuestImage::ensure(), "guest image");
    eprintln!(
        "guest image {} ready in {:?}",
        image.dir().display(),
        t.elapsed()
    );
    image
}

pub fn work_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tandem-vmkit-test-")
        .tempdir_in("/var/tmp")
        .expect("a temporary directory")
}

/// Waits for `MOUNTED` and then `acks` ACK lines; reports timings.
pub fn boot_and_write(guest: &Guest, acks: u64) -> Vec<u64> {
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
pub fn check_after_crash(image: &Path, acks: &[u64]) {
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
