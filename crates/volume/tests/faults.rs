//! Storage faults: a failed fsync latches the volume (later writes and
//! flushes fail, nothing is retried into silent corruption); a full disk
//! is reported as such.
#![allow(clippy::unwrap_used)]

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tandem_volume::{BlockFile, OsFile, RawImage, VolumeError};

/// A real file whose fsync and writes can be made to fail.
struct Faulty {
    inner: OsFile,
    fail_sync: Arc<AtomicBool>,
    full: Arc<AtomicBool>,
}

impl BlockFile for Faulty {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn read_cached_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_cached_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        if self.full.load(Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.inner.write_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        if self.fail_sync.load(Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.sync_data()
    }
    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        self.inner.fallocate(mode, offset, len)
    }
    fn seek(&self, offset: u64, whence: i32) -> io::Result<Option<u64>> {
        self.inner.seek(offset, whence)
    }
    fn advise_willneed(&self, offset: u64, len: u64) {
        self.inner.advise_willneed(offset, len)
    }
    fn byte_len(&self) -> io::Result<u64> {
        self.inner.byte_len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}

fn faulty_image() -> (
    tempfile::TempDir,
    RawImage,
    Arc<AtomicBool>,
    Arc<AtomicBool>,
) {
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
    let (fail_sync, full) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let image = RawImage::with_file(
        Box::new(Faulty {
            inner: OsFile(file),
            fail_sync: Arc::clone(&fail_sync),
            full: Arc::clone(&full),
        }),
        path,
        1 << 20,
    );
    (dir, image, fail_sync, full)
}

#[test]
fn a_failed_fsync_latches_the_volume_even_after_the_device_recovers() {
    let (_dir, image, fail_sync, _) = faulty_image();
    image.write(0, &[1; 4096]).unwrap();
    image.sync().unwrap();
    fail_sync.store(true, Ordering::Relaxed);
    image.write(4096, &[2; 4096]).unwrap();
    let err = image.sync().unwrap_err();
    assert!(matches!(err, VolumeError::Io { op: "fsync", .. }), "{err}");
    // The device "recovers": the latch must still refuse, because the
    // kernel may have dropped the pages the failed fsync was writing.
    fail_sync.store(false, Ordering::Relaxed);
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
    let (_dir, image, _, full) = faulty_image();
    full.store(true, Ordering::Relaxed);
    let err = image.write(0, &[1; 4096]).unwrap_err();
    assert!(matches!(err, VolumeError::NoSpace { .. }), "{err}");
    assert!(err.to_string().contains("no space"), "{err}");
    full.store(false, Ordering::Relaxed);
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
