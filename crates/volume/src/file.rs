//! The system calls a raw image needs, behind a small trait so that tests
//! can inject storage failures (a failing fsync, a full disk). The calls
//! std lacks (`preadv2` with `RWF_NOWAIT`, `fallocate`, `SEEK_DATA`,
//! `posix_fadvise`) go through `rustix`, so this crate has no `unsafe`.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSliceMut};
use std::num::NonZeroU64;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::OnceLock;

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
    /// Reads around the page cache (`O_DIRECT`) where the file system
    /// allows it; `buf`'s address and length and `offset` are multiples of
    /// [`DIRECT_ALIGN`]. Elsewhere it reads as [`BlockFile::read_at`] does.
    fn read_direct_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.read_at(buf, offset)
    }
    fn byte_len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
}

/// What direct I/O needs aligned: buffer addresses, lengths and offsets.
pub const DIRECT_ALIGN: usize = 4096;

/// The real thing: a file on the host's filesystem.
pub struct OsFile {
    file: File,
    /// The same file opened again with `O_DIRECT` for
    /// [`BlockFile::read_direct_at`], on first use; `None` where the file
    /// system refuses direct I/O (tmpfs).
    direct: OnceLock<Option<File>>,
}

impl OsFile {
    pub fn new(file: File) -> OsFile {
        OsFile {
            file,
            direct: OnceLock::new(),
        }
    }

    /// A second open file description of this file, read-only and direct
    /// (`/proc/self/fd` names the very file, even if renamed since).
    fn open_direct(&self) -> Option<File> {
        let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        match OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(&path)
        {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::debug!(error = %e, "no direct reads of this image: reads go through the page cache");
                None
            }
        }
    }
}

impl BlockFile for OsFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    fn read_direct_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match self.direct.get_or_init(|| self.open_direct()) {
            Some(direct) => direct.read_at(buf, offset),
            None => self.file.read_at(buf, offset),
        }
    }

    fn read_cached_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        // EAGAIN (not cached) arrives as `io::ErrorKind::WouldBlock`.
        let n = rustix::io::preadv2(
            &self.file,
            &mut [IoSliceMut::new(buf)],
            offset,
            ReadWriteFlags::NOWAIT,
        )?;
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.file.write_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        // fdatasync(2).
        self.file.sync_data()
    }

    fn fallocate(&self, mode: Fallocate, offset: u64, len: u64) -> io::Result<()> {
        let mode = match mode {
            Fallocate::PunchHole => FallocateFlags::PUNCH_HOLE,
            Fallocate::ZeroRange => FallocateFlags::ZERO_RANGE,
        };
        rustix::fs::fallocate(&self.file, mode | FallocateFlags::KEEP_SIZE, offset, len)?;
        Ok(())
    }

    fn seek(&self, offset: u64, whence: Seek) -> io::Result<Option<u64>> {
        // Only reads the file's extent map: the file offset it moves is
        // never used (all I/O is positioned).
        let to = match whence {
            Seek::Data => SeekFrom::Data(offset),
            Seek::Hole => SeekFrom::Hole(offset),
        };
        match rustix::fs::seek(&self.file, to) {
            Ok(pos) => Ok(Some(pos)),
            Err(Errno::NXIO) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn advise_willneed(&self, offset: u64, len: u64) {
        // A hint: failure changes nothing. A length of 0 means "to the end
        // of the file", as in posix_fadvise(2).
        let _ = rustix::fs::fadvise(&self.file, offset, NonZeroU64::new(len), Advice::WillNeed);
    }

    fn byte_len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
}
