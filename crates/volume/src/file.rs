//! The system calls a raw image needs, behind a small trait so that tests
//! can inject storage failures (a failing fsync, a full disk). The calls
//! std lacks (`preadv2` with `RWF_NOWAIT`, `fallocate`, `SEEK_DATA`,
//! `posix_fadvise`) go through `rustix`, so this crate has no `unsafe`.

use std::fs::File;
use std::io::{self, IoSliceMut};
use std::num::NonZeroU64;
use std::os::unix::fs::FileExt;

use rustix::fs::{Advice, FallocateFlags, SeekFrom};
use rustix::io::{Errno, ReadWriteFlags};

/// What [`BlockFile::fallocate`] does to a range. The file's size never
/// changes (`FALLOC_FL_KEEP_SIZE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallocate {
    /// `FALLOC_FL_PUNCH_HOLE`: deallocate; the range reads as zeroes.
    PunchHole,
    /// `FALLOC_FL_ZERO_RANGE`: zero the range, keeping it allocated.
    ZeroRange,
}

/// Where [`BlockFile::seek`] looks from an offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seek {
    /// `SEEK_DATA`: the next offset holding data.
    Data,
    /// `SEEK_HOLE`: the next offset in a hole (the end counts as one).
    Hole,
}

/// Positioned I/O on one file.
pub trait BlockFile: Send + Sync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Reads only what is in the page cache; `Ok(0)` or `WouldBlock` when
    /// the first byte is not cached.
    fn read_cached_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize>;
    fn sync_data(&self) -> io::Result<()>;
    /// `fallocate(2)` on `[offset, offset + len)`.
    fn fallocate(&self, mode: Fallocate, offset: u64, len: u64) -> io::Result<()>;
    /// `lseek(2)` with SEEK_DATA or SEEK_HOLE; `Ok(None)` past the last
    /// data (ENXIO).
    fn seek(&self, offset: u64, whence: Seek) -> io::Result<Option<u64>>;
    fn advise_willneed(&self, offset: u64, len: u64);
    fn byte_len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
}

/// The real thing: a file on the host's filesystem.
pub struct OsFile(pub File);

impl BlockFile for OsFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }

    fn read_cached_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        // EAGAIN (not cached) arrives as `io::ErrorKind::WouldBlock`.
        let n = rustix::io::preadv2(
            &self.0,
            &mut [IoSliceMut::new(buf)],
            offset,
            ReadWriteFlags::NOWAIT,
        )?;
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.0.write_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        // fdatasync(2).
        self.0.sync_data()
    }

    fn fallocate(&self, mode: Fallocate, offset: u64, len: u64) -> io::Result<()> {
        let mode = match mode {
            Fallocate::PunchHole => FallocateFlags::PUNCH_HOLE,
            Fallocate::ZeroRange => FallocateFlags::ZERO_RANGE,
        };
        rustix::fs::fallocate(&self.0, mode | FallocateFlags::KEEP_SIZE, offset, len)?;
        Ok(())
    }

    fn seek(&self, offset: u64, whence: Seek) -> io::Result<Option<u64>> {
        // Only reads the file's extent map: the file offset it moves is
        // never used (all I/O is positioned).
        let to = match whence {
            Seek::Data => SeekFrom::Data(offset),
            Seek::Hole => SeekFrom::Hole(offset),
        };
        match rustix::fs::seek(&self.0, to) {
            Ok(pos) => Ok(Some(pos)),
            Err(Errno::NXIO) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn advise_willneed(&self, offset: u64, len: u64) {
        // A hint: failure changes nothing. A length of 0 means "to the end
        // of the file", as in posix_fadvise(2).
        let _ = rustix::fs::fadvise(&self.0, offset, NonZeroU64::new(len), Advice::WillNeed);
    }

    fn byte_len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}
