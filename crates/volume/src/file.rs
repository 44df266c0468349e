//! The system calls a raw image needs, behind a small trait so that tests
//! can inject storage failures (a failing fsync, a full disk).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Positioned I/O on one file.
pub trait BlockFile: Send + Sync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Reads only what is in the page cache; `Ok(0)` or `WouldBlock` when
    /// the first byte is not cached.
    fn read_cached_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize>;
    fn sync_data(&self) -> io::Result<()>;
    /// `fallocate(2)` with the given mode bits.
    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()>;
    /// `lseek(2)` with SEEK_DATA or SEEK_HOLE; `Ok(None)` past the last
    /// data (ENXIO).
    fn seek(&self, offset: u64, whence: i32) -> io::Result<Option<u64>>;
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
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: `iov` points into `buf`, which outlives the call; the fd
        // is owned by `self.0`.
        let n = unsafe {
            libc::preadv2(
                self.0.as_raw_fd(),
                &iov,
                1,
                offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.0.write_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: plain syscall on an fd owned by `self.0`.
        let rc = unsafe {
            libc::fallocate(
                self.0.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn seek(&self, offset: u64, whence: i32) -> io::Result<Option<u64>> {
        // SAFETY: plain syscall on an fd owned by `self.0`; lseek with
        // SEEK_DATA/SEEK_HOLE only reads the file's extent map (the file
        // offset it moves is never used: all I/O is positioned).
        let pos = unsafe { libc::lseek(self.0.as_raw_fd(), offset as libc::off_t, whence) };
        if pos < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(err);
        }
        Ok(Some(pos as u64))
    }

    fn advise_willneed(&self, offset: u64, len: u64) {
        // SAFETY: advisory syscall on an fd owned by `self.0`.
        unsafe {
            libc::posix_fadvise(
                self.0.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            );
        }
    }

    fn byte_len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}
