//! Storage faults: a failed fsync latches the volume (later writes and
//! flushes fail, nothing is retried into silent corruption); a full disk
//! is reported as such.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use tandem_volume::fault::{Faults, FaultyFile};
use tandem_volume::{RawImage, VolumeError};

fn faulty_image() -> (tempfile::TempDir, RawImage, Faults) {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("v.img");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.set_len(1 << 20).unwrap();
    let faults = Faults::default();
    let image = RawImage::with_file(
        Box::new(FaultyFile::new(file, faults.clone())),
        path,
        1 << 20,
    );
    (dir, image, faults)
}

#[test]
fn a_failed_fsync_latches_the_volume_even_after_the_device_recovers() {
    let (_dir, image, faults) = faulty_image();
    image.write(0, &[1; 4096]).unwrap();
    image.sync().unwrap();
    faults.set_fail_sync(true);
    image.write(4096, &[2; 4096]).unwrap();
    let err = image.sync().unwrap_err();
    assert!(matches!(err, VolumeError::Io { op: "fsync", .. }), "{err}");
    // The device "recovers": the latch must still refuse, because the
    // kernel may have dropped the pages the failed fsync was writing.
    faults.set_fail_sync(false);
    for result in [
        image.sync(),
        image.write(0, &[3; 512]),
        image.punch_hole(0, 4096),
    ] {
        let err = result.unwrap_err();
        assert!(matches!(err, VolumeError::Failed { .. }), "{err}");
        assert!(err.to_string().contains("failed earlier"), "{err}");
    }
    assert!(image.failure().is_some());
    // Reads still work: the data that is there can be copied off.
    let mut buf = [0u8; 4096];
    image.read(0, &mut buf).unwrap();
    assert_eq!(buf, [1; 4096]);
}

#[test]
fn a_full_disk_is_reported_as_no_space_and_does_not_latch() {
    let (_dir, image, faults) = faulty_image();
    faults.set_disk_full(true);
    let err = image.write(0, &[1; 4096]).unwrap_err();
    assert!(matches!(err, VolumeError::NoSpace { .. }), "{err}");
    assert!(err.to_string().contains("no space"), "{err}");
    faults.set_disk_full(false);
    image.write(0, &[1; 4096]).unwrap();
    image.sync().unwrap();
}

#[test]
fn an_image_of_another_size_is_refused_not_resized() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.img");
    std::fs::write(&path, vec![7u8; 8192]).unwrap();
    let err = RawImage::open_or_create(&path, 1 << 20).unwrap_err();
    assert!(
        matches!(
            err,
            VolumeError::SizeMismatch {
                actual: 8192,
                configured: 1048576,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 8192]);
}

#[test]
fn holes_and_data_are_reported_by_extents() {
    let dir = tempfile::tempdir().unwrap();
    let image = RawImage::open_or_create(&dir.path().join("v.img"), 4 << 20).unwrap();
    image.write(1 << 20, &[9; 65536]).unwrap();
    let runs = image.extents(0, 4 << 20, 64).unwrap();
    let total: u64 = runs.iter().map(|r| r.0).sum();
    assert_eq!(total, 4 << 20);
    assert_eq!(runs[0], (1 << 20, true));
    assert!(!runs[1].1, "{runs:?}");
    image.punch_hole(1 << 20, 65536).unwrap();
    assert_eq!(
        image.extents(0, 4 << 20, 64).unwrap(),
        vec![(4 << 20, true)]
    );
    let mut buf = vec![1u8; 65536];
    image.read(1 << 20, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0));
}
