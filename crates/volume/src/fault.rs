//! A real file whose fsync and writes can be made to fail on demand: the
//! storage faults tests inject through the [`BlockFile`] seam (a failed
//! fsync must latch the volume; a full disk is reported as such).

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustix::io::Errno;

use crate::file::{BlockFile, Fallocate, OsFile, Seek};

/// Switches for a [`FaultyFile`], kept by the test.
#[derive(Clone, Default)]
pub struct Faults {
    /// `fdatasync` fails with EIO while set.
    pub fail_sync: Arc<AtomicBool>,
    /// Writes fail with ENOSPC while set.
    pub disk_full: Arc<AtomicBool>,
    /// Reads fail with EIO while set.
    pub fail_read: Arc<AtomicBool>,
}

impl Faults {
    pub fn set_fail_sync(&self, on: bool) {
        self.fail_sync.store(on, Ordering::Relaxed);
    }

    pub fn set_disk_full(&self, on: bool) {
        self.disk_full.store(on, Ordering::Relaxed);
    }

    pub fn set_fail_read(&self, on: bool) {
        self.fail_read.store(on, Ordering::Relaxed);
    }

    fn read(&self) -> io::Result<()> {
        if self.fail_read.load(Ordering::Relaxed) {
            return Err(Errno::IO.into());
        }
        Ok(())
    }
}

pub struct FaultyFile {
    inner: OsFile,
    faults: Faults,
}

impl FaultyFile {
    pub fn new(file: File, faults: Faults) -> FaultyFile {
        FaultyFile {
            inner: OsFile::new(file),
            faults,
        }
    }
}

impl BlockFile for FaultyFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.faults.read()?;
        self.inner.read_at(buf, offset)
    }
    fn read_cached_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_cached_at(buf, offset)
    }
    fn read_direct_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.faults.read()?;
        self.inner.read_direct_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        if self.faults.disk_full.load(Ordering::Relaxed) {
            return Err(Errno::NOSPC.into());
        }
        self.inner.write_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        if self.faults.fail_sync.load(Ordering::Relaxed) {
            return Err(Errno::IO.into());
        }
        self.inner.sync_data()
    }
    fn fallocate(&self, mode: Fallocate, offset: u64, len: u64) -> io::Result<()> {
        self.inner.fallocate(mode, offset, len)
    }
    fn seek(&self, offset: u64, whence: Seek) -> io::Result<Option<u64>> {
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
