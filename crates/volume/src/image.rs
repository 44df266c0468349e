//! A volume's plain raw sparse image: positioned I/O with clear errors, and
//! a failure latch so that a failed fsync is never retried into silent
//! corruption.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use rustix::fs::FlockOperation;
use rustix::io::Errno;

use crate::file::{BlockFile, Fallocate, OsFile, Seek, DIRECT_ALIGN};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{path}: cannot open the volume image: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error(
        "{path}: the image is {actual} bytes but the configuration says {configured} bytes; \
         refusing to resize it (fix the size in the configuration, or resize the image \
         with `qemu-img resize` while the agent is stopped)"
    )]
    SizeMismatch {
        path: PathBuf,
        actual: u64,
        configured: u64,
    },
    #[error("{path}: the image is in use by another process (is another agent running on this data_dir?)")]
    Locked { path: PathBuf },
    #[error("{path}: no space left on the host's disk for {op} of {len} bytes at offset {offset}")]
    NoSpace {
        path: PathBuf,
        op: &'static str,
        offset: u64,
        len: u64,
    },
    #[error("{path}: {op} of {len} bytes at offset {offset} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        offset: u64,
        len: u64,
        source: io::Error,
    },
    #[error(
        "{path}: the volume failed earlier ({reason}); writes and flushes are refused \
         until the agent restarts, so that no acknowledged data is silently lost"
    )]
    Failed { path: PathBuf, reason: String },
    #[error("{path}: fast zeroing is not possible here")]
    SlowZero { path: PathBuf },
}

/// A raw image of fixed size.
pub struct RawImage {
    file: Box<dyn BlockFile>,
    path: PathBuf,
    size: u64,
    /// Set on the first failed fsync (or EIO on write); never cleared.
    failure: OnceLock<String>,
    /// RWF_NOWAIT reads work on this filesystem.
    nowait: AtomicBool,
    /// FALLOC_FL_ZERO_RANGE works on this filesystem.
    zero_range: AtomicBool,
    /// Keeps the image's exclusive flock for as long as it is open.
    _lock: Option<File>,
    /// The last data run `SEEK_HOLE` reported, so that a walk over a large
    /// allocated run asks once: on tmpfs `SEEK_HOLE` walks every page to
    /// the run's end, and asking once per piece of a long scan made it
    /// quadratic. It only ever claims data, and any hole made since voids
    /// it (`holes_made`).
    data_hint: Mutex<DataHint>,
    /// Counts deallocations begun (punched holes), before each one.
    holes_made: AtomicU64,
}

/// `[from, until)` was data when `holes_made` was `holes`.
#[derive(Clone, Copy, Debug, Default)]
struct DataHint {
    from: u64,
    until: u64,
    holes: u64,
}

impl std::fmt::Debug for RawImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawImage")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("failure", &self.failure.get())
            .finish()
    }
}

impl RawImage {
    /// Opens the image at `path`, creating it sparse at `size` bytes if it
    /// does not exist. An existing image of another size is an error, never
    /// a silent resize. The image is locked against a second agent.
    pub fn open_or_create(path: &Path, size: u64) -> Result<RawImage, VolumeError> {
        let open_err = |source| VolumeError::Open {
            path: path.to_owned(),
            source,
        };
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(file) => {
                file.set_len(size).map_err(open_err)?;
                file.sync_all().map_err(open_err)?;
                if let Some(dir) = path.parent() {
                    File::open(dir)
                        .and_then(|d| d.sync_all())
                        .map_err(open_err)?;
                }
                file
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(open_err)?,
            Err(e) => return Err(open_err(e)),
        };
        // Released when the file (and the clone kept in `_lock`) closes.
        if rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
            return Err(VolumeError::Locked {
                path: path.to_owned(),
            });
        }
        let lock = file.try_clone().map_err(open_err)?;
        let actual = file.metadata().map_err(open_err)?.len();
        if actual != size {
            return Err(VolumeError::SizeMismatch {
                path: path.to_owned(),
                actual,
                configured: size,
            });
        }
        let mut image = RawImage::with_file(Box::new(OsFile::new(file)), path.to_owned(), size);
        image._lock = Some(lock);
        Ok(image)
    }

    /// An image over any [`BlockFile`] (tests inject failures this way).
    pub fn with_file(file: Box<dyn BlockFile>, path: PathBuf, size: u64) -> RawImage {
        RawImage {
            file,
            path,
            size,
            failure: OnceLock::new(),
            nowait: AtomicBool::new(true),
            zero_range: AtomicBool::new(true),
            _lock: None,
            data_hint: Mutex::new(DataHint::default()),
            holes_made: AtomicU64::new(0),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Why the volume latched into its failed state, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    fn check_healthy(&self) -> Result<(), VolumeError> {
        match self.failure.get() {
            Some(reason) => Err(VolumeError::Failed {
                path: self.path.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn latch(&self, reason: String) {
        if self.failure.set(reason.clone()).is_ok() {
            tracing::error!(image = %self.path.display(), "volume failed: {reason}");
        }
    }

    fn io_error(&self, op: &'static str, offset: u64, len: u64, source: io::Error) -> VolumeError {
        match Errno::from_io_error(&source) {
            Some(Errno::NOSPC | Errno::DQUOT | Errno::FBIG) => VolumeError::NoSpace {
                path: self.path.clone(),
                op,
                offset,
                len,
            },
            _ => VolumeError::Io {
                path: self.path.clone(),
                op,
                offset,
                len,
                source,
            },
        }
    }

    /// Reads `buf.len()` bytes at `offset`, blocking on storage if needed.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.read_into(offset, buf, false)
    }

    /// Reads `buf.len()` bytes at `offset` as [`RawImage::read`] does, but
    /// around the page cache where the file system allows it (`O_DIRECT`):
    /// a scan of the whole image (a compare) then neither pays for filling
    /// the cache nor evicts what the VM's I/O keeps there. Dirty cached
    /// pages in the range are written back first by the kernel, so the
    /// bytes are the same. Only an aligned buffer, offset and length (see
    /// [`crate::AlignedBuf`]) read directly; anything else, and the part
    /// after a short read at the image's end, reads through the cache.
    pub fn read_uncached(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.read_into(offset, buf, true)
    }

    fn read_into(&self, offset: u64, buf: &mut [u8], direct: bool) -> Result<(), VolumeError> {
        let aligned = |at: u64, b: &[u8]| {
            at.is_multiple_of(DIRECT_ALIGN as u64)
                && b.len().is_multiple_of(DIRECT_ALIGN)
                && b.as_ptr().addr().is_multiple_of(DIRECT_ALIGN)
        };
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let rest = &mut buf[done..];
            let got = if direct && aligned(at, rest) {
                match self.file.read_direct_at(rest, at) {
                    // Some file systems refuse only some direct reads.
                    Err(e) if Errno::from_io_error(&e) == Some(Errno::INVAL) => {
                        self.file.read_at(rest, at)
                    }
                    r => r,
                }
            } else {
                self.file.read_at(rest, at)
            };
            match got {
                Ok(0) => {
                    // Past the end of a shorter file reads as zeroes.
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_error("read", offset, buf.len() as u64, e)),
            }
        }
        Ok(())
    }

    /// Reads from the page cache only; `Ok(false)` when that is not
    /// possible without blocking.
    pub fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Result<bool, VolumeError> {
        if !self.nowait.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match self.file.read_cached_at(buf, offset) {
            Ok(n) => Ok(n == buf.len()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e)
                if matches!(
                    Errno::from_io_error(&e),
                    Some(Errno::OPNOTSUPP | Errno::INVAL | Errno::NOSYS)
                ) =>
            {
                self.nowait.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(self.io_error("read", offset, buf.len() as u64, e)),
        }
    }

    /// Writes `data` at `offset` (into the page cache; [`RawImage::sync`]
    /// makes it durable).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), VolumeError> {
        self.check_healthy()?;
        let mut done = 0;
        while done < data.len() {
            match self.file.write_at(&data[done..], offset + done as u64) {
                Ok(0) => {
                    let e = io::Error::new(io::ErrorKind::WriteZero, "wrote nothing");
                    return Err(self.io_error("write", offset, data.len() as u64, e));
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let err = self.io_error("write", offset, data.len() as u64, e);
                    if matches!(err, VolumeError::Io { .. }) {
                        self.latch(err.to_string());
                    }
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// Deallocates `[offset, offset + len)`; it reads back as zeroes.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.check_healthy()?;
        self.holes_made.fetch_add(1, Ordering::AcqRel);
        match self.file.fallocate(Fallocate::PunchHole, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if Errno::from_io_error(&e) == Some(Errno::OPNOTSUPP) => {
                self.write_zero_buffers(offset, len)
            }
            Err(e) => Err(self.io_error("trim", offset, len, e)),
        }
    }

    /// Zeroes `[offset, offset + len)`. With `keep_allocated` the range
    /// stays provisioned (no hole). With `fast_only`, fails with
    /// [`VolumeError::SlowZero`] (changing nothing) unless it can be done
    /// without writing zero buffers.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        keep_allocated: bool,
        fast_only: bool,
    ) -> Result<(), VolumeError> {
        self.check_healthy()?;
        if !keep_allocated {
            self.holes_made.fetch_add(1, Ordering::AcqRel);
            match self.file.fallocate(Fallocate::PunchHole, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if Errno::from_io_error(&e) == Some(Errno::OPNOTSUPP) => {}
                Err(e) => return Err(self.io_error("write zeroes", offset, len, e)),
            }
        }
        if self.zero_range.load(Ordering::Relaxed) {
            // Zeroed extents may read as holes (unwritten extents).
            self.holes_made.fetch_add(1, Ordering::AcqRel);
            match self.file.fallocate(Fallocate::ZeroRange, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if Errno::from_io_error(&e) == Some(Errno::OPNOTSUPP) => {
                    self.zero_range.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(self.io_error("write zeroes", offset, len, e)),
            }
        }
        if fast_only {
            return Err(VolumeError::SlowZero {
                path: self.path.clone(),
            });
        }
        self.write_zero_buffers(offset, len)
    }

    fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        const CHUNK: usize = 1 << 20;
        let chunk = |rest: u64| usize::try_from(rest).map_or(CHUNK, |rest| rest.min(CHUNK));
        let zeroes = vec![0u8; chunk(len)];
        let mut done = 0;
        while done < len {
            let n = chunk(len - done);
            self.write(offset + done, &zeroes[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    /// Makes every completed write durable. A failure latches the volume:
    /// the kernel may have dropped the dirty pages, so retrying could
    /// report success for data that is gone.
    pub fn sync(&self) -> Result<(), VolumeError> {
        self.check_healthy()?;
        if let Err(e) = self.file.sync_data() {
            let err = self.io_error("fsync", 0, self.size, e);
            self.latch(err.to_string());
            return Err(err);
        }
        Ok(())
    }

    /// Prefetch hint.
    pub fn cache(&self, offset: u64, len: u64) {
        self.file.advise_willneed(offset, len);
    }

    /// Allocation map of `[offset, offset + len)` from SEEK_DATA/SEEK_HOLE:
    /// consecutive `(length, is_hole)` runs, at most `max` of them (fewer
    /// than requested is allowed; at least one is returned).
    pub fn extents(
        &self,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Result<Vec<(u64, bool)>, VolumeError> {
        let end = offset.saturating_add(len).min(self.size);
        let mut runs = Vec::new();
        let mut pos = offset;
        let seek = |at, whence| {
            self.file
                .seek(at, whence)
                .map_err(|e| self.io_error("extent map", at, len, e))
        };
        while pos < end && runs.len() < max.max(1) {
            let holes = self.holes_made.load(Ordering::Acquire);
            let hint = self
                .data_hint
                .lock()
                .map_or_else(|p| *p.into_inner(), |h| *h);
            if hint.holes == holes && hint.from <= pos && pos < hint.until {
                let stop = hint.until.min(end);
                runs.push((stop - pos, false));
                pos = stop;
                continue;
            }
            let data = seek(pos, Seek::Data)?.unwrap_or(self.size);
            if data > pos {
                let stop = data.min(end);
                runs.push((stop - pos, true));
                pos = stop;
                continue;
            }
            let hole = seek(pos, Seek::Hole)?.unwrap_or(self.size).max(pos + 1);
            if let Ok(mut h) = self.data_hint.lock() {
                // Kept only if no hole was begun while asking.
                if self.holes_made.load(Ordering::Acquire) == holes {
                    *h = DataHint {
                        from: pos,
                        until: hole,
                        holes,
                    };
                }
            }
            let stop = hole.min(end);
            runs.push((stop - pos, false));
            pos = stop;
        }
        if runs.is_empty() {
            runs.push((len.max(1), false));
        }
        Ok(runs)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! The system calls behind a real image, and how their errors map.

    use super::*;

    const MIB: u64 = 1 << 20;

    fn image(size: u64) -> (tempfile::TempDir, RawImage) {
        let dir = tempfile::tempdir().unwrap();
        let image = RawImage::open_or_create(&dir.path().join("v.img"), size).unwrap();
        (dir, image)
    }

    fn read(image: &RawImage, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0xee; len];
        image.read(offset, &mut buf).unwrap();
        buf
    }

    /// A directory on a disk file system (direct I/O; tmpfs refuses it).
    fn disk_dir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("tandem-volume-test")
            .tempdir_in("/var/tmp")
            .unwrap()
    }

    #[test]
    fn uncached_reads_see_what_cached_reads_see_dirty_pages_and_the_short_end_included() {
        let dir = disk_dir();
        // Not a multiple of the alignment: the last direct read is short.
        let size = 3 * MIB + 1000;
        let image = RawImage::open_or_create(&dir.path().join("v.img"), size).unwrap();
        let data: Vec<u8> = (0..size)
            .map(|i| ((i % 251) ^ (i >> 12)).to_le_bytes()[0])
            .collect();
        image.write(0, &data[..2 << 20]).unwrap();
        image.sync().unwrap();
        // Dirty in the page cache, not yet written back.
        image.write(2 * MIB, &data[2 << 20..]).unwrap();
        image.write(4096 * 3, &[7; 100]).unwrap();
        let cases: &[(u64, usize)] = &[
            (0, 0),
            (0, 4096),
            (0, 1 << 20),
            (4096, 2 << 20),
            (2 * MIB - 4096, 8192),
            (3 * MIB, 4096),        // runs past the end: short, then zeroes
            (3 * MIB - 4096, 8192), // crosses the end
            (size - 10, 10),        // unaligned tail
            (4096 * 3 + 50, 4096),  // unaligned offset
            (8192, 4096 * 3 + 100), // unaligned length
        ];
        for &(at, len) in cases {
            let want = read(&image, at, len);
            let mut aligned = crate::AlignedBuf::new(len);
            aligned.bytes_mut().fill(0xee);
            image.read_uncached(at, aligned.bytes_mut()).unwrap();
            assert_eq!(aligned.bytes(), &want[..], "aligned buffer, {at}+{len}");
            let mut plain = vec![0xee; len];
            image.read_uncached(at, &mut plain).unwrap();
            assert_eq!(plain, want, "plain buffer, {at}+{len}");
        }
    }

    /// Bytes of `path` in the page cache, as util-linux's `fincore` sees
    /// them (`mincore(2)`; a `RWF_NOWAIT` probe would start readahead).
    fn cached_bytes(path: &Path) -> u64 {
        let out = std::process::Command::new("fincore")
            .args(["--bytes", "--noheadings", "--output", "RES"])
            .arg(path)
            .output()
            .expect("fincore (util-linux) runs");
        assert!(out.status.success(), "fincore: {:?}", out);
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    #[test]
    fn uncached_reads_of_a_disk_image_leave_the_page_cache_as_it_was() {
        let dir = disk_dir();
        let path = dir.path().join("v.img");
        let image = RawImage::open_or_create(&path, 4 * MIB).unwrap();
        image.write(0, &vec![0x5a; 4 << 20]).unwrap();
        image.sync().unwrap();
        // Clean pages: the kernel drops them on request.
        let other = File::open(&path).unwrap();
        rustix::fs::fadvise(&other, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        assert_eq!(
            cached_bytes(&path),
            0,
            "the test needs the image out of the cache"
        );
        let mut buf = crate::AlignedBuf::new(4 << 20);
        image.read_uncached(0, buf.bytes_mut()).unwrap();
        assert!(buf.bytes().iter().all(|&b| b == 0x5a));
        assert_eq!(
            cached_bytes(&path),
            0,
            "an uncached read filled the page cache"
        );
        // The check can see a cached range: a plain read caches it.
        let mut plain = vec![0; 1 << 20];
        image.read(MIB, &mut plain).unwrap();
        assert!(cached_bytes(&path) >= MIB);
    }

    #[test]
    fn a_second_open_of_the_same_image_is_refused_as_locked() {
        let (dir, _image) = image(MIB);
        let err = RawImage::open_or_create(&dir.path().join("v.img"), MIB).unwrap_err();
        assert!(matches!(err, VolumeError::Locked { .. }), "{err}");
    }

    #[test]
    fn trimmed_and_zeroed_ranges_read_back_as_zeroes() {
        let (_dir, image) = image(4 * MIB);
        image.write(0, &vec![7; 4 << 20]).unwrap();
        image.punch_hole(MIB, 4096).unwrap();
        image.write_zeroes(2 * MIB, 8192, true, false).unwrap();
        image.write_zeroes(3 * MIB, 8192, false, true).unwrap();
        let data = read(&image, 0, 4 << 20);
        let zero = |at: u64, len: u64| at..at + len;
        let zeroed = [zero(MIB, 4096), zero(2 * MIB, 8192), zero(3 * MIB, 8192)];
        for (i, byte) in data.iter().enumerate() {
            let at = i as u64;
            let want = if zeroed.iter().any(|r| r.contains(&at)) {
                0
            } else {
                7
            };
            assert_eq!(*byte, want, "byte {at}");
        }
    }

    #[test]
    fn extents_see_a_punched_hole() {
        let (_dir, image) = image(4 * MIB);
        image.write(0, &vec![1; 4 << 20]).unwrap();
        image.punch_hole(MIB, MIB).unwrap();
        let runs = image.extents(0, 4 * MIB, 16).unwrap();
        assert_eq!(runs, vec![(MIB, false), (MIB, true), (2 * MIB, false)]);
        // Past the last data, SEEK_DATA fails with ENXIO: one hole to the end.
        image.punch_hole(2 * MIB, 2 * MIB).unwrap();
        assert_eq!(
            image.extents(2 * MIB, 2 * MIB, 16).unwrap(),
            vec![(2 * MIB, true)]
        );
    }

    /// An OS file that counts its `SEEK_HOLE` calls.
    struct CountsHoleSeeks(OsFile, std::sync::Arc<AtomicU64>);

    impl BlockFile for CountsHoleSeeks {
        fn read_at(&self, buf: &mut [u8], at: u64) -> io::Result<usize> {
            self.0.read_at(buf, at)
        }
        fn read_cached_at(&self, buf: &mut [u8], at: u64) -> io::Result<usize> {
            self.0.read_cached_at(buf, at)
        }
        fn write_at(&self, buf: &[u8], at: u64) -> io::Result<usize> {
            self.0.write_at(buf, at)
        }
        fn sync_data(&self) -> io::Result<()> {
            self.0.sync_data()
        }
        fn fallocate(&self, mode: Fallocate, at: u64, len: u64) -> io::Result<()> {
            self.0.fallocate(mode, at, len)
        }
        fn seek(&self, at: u64, whence: Seek) -> io::Result<Option<u64>> {
            if matches!(whence, Seek::Hole) {
                self.1.fetch_add(1, Ordering::Relaxed);
            }
            self.0.seek(at, whence)
        }
        fn advise_willneed(&self, at: u64, len: u64) {
            self.0.advise_willneed(at, len);
        }
        fn byte_len(&self) -> io::Result<u64> {
            self.0.byte_len()
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.0.set_len(len)
        }
    }

    #[test]
    fn a_walk_in_pieces_asks_for_the_end_of_a_data_run_once_and_still_sees_new_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.set_len(16 * MIB).unwrap();
        let seeks = std::sync::Arc::new(AtomicU64::new(0));
        let image = RawImage::with_file(
            Box::new(CountsHoleSeeks(OsFile::new(file), seeks.clone())),
            path,
            16 * MIB,
        );
        image.write(0, &vec![1; 16 << 20]).unwrap();
        for piece in 0..16 {
            let runs = image.extents(piece * MIB, MIB, 16).unwrap();
            assert_eq!(runs, vec![(MIB, false)], "piece {piece}");
        }
        assert_eq!(
            seeks.load(Ordering::Relaxed),
            1,
            "one SEEK_HOLE for the run"
        );
        // A hole punched after the run was learnt is seen at once...
        image.punch_hole(5 * MIB, MIB).unwrap();
        assert_eq!(
            image.extents(4 * MIB, 3 * MIB, 16).unwrap(),
            vec![(MIB, false), (MIB, true), (MIB, false)]
        );
        // ...and so is one that zeroing made.
        image.write_zeroes(9 * MIB, MIB, false, false).unwrap();
        assert_eq!(
            image.extents(8 * MIB, 3 * MIB, 16).unwrap(),
            vec![(MIB, false), (MIB, true), (MIB, false)]
        );
    }

    #[test]
    fn a_cached_read_returns_what_was_just_written() {
        let (_dir, image) = image(MIB);
        image.write(8192, &[9; 4096]).unwrap();
        let mut buf = [0u8; 4096];
        // Filesystems without RWF_NOWAIT answer "not cached".
        if image.read_cached(8192, &mut buf).unwrap() {
            assert_eq!(buf, [9; 4096]);
        }
    }

    /// A file whose cached reads fail with one error.
    struct CachedReadFails(Errno);

    impl BlockFile for CachedReadFails {
        fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<usize> {
            Ok(0)
        }
        fn read_cached_at(&self, _: &mut [u8], _: u64) -> io::Result<usize> {
            Err(self.0.into())
        }
        fn write_at(&self, buf: &[u8], _: u64) -> io::Result<usize> {
            Ok(buf.len())
        }
        fn sync_data(&self) -> io::Result<()> {
            Ok(())
        }
        fn fallocate(&self, _: Fallocate, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn seek(&self, _: u64, _: Seek) -> io::Result<Option<u64>> {
            Ok(None)
        }
        fn advise_willneed(&self, _: u64, _: u64) {}
        fn byte_len(&self) -> io::Result<u64> {
            Ok(MIB)
        }
        fn set_len(&self, _: u64) -> io::Result<()> {
            Ok(())
        }
    }

    fn failing(errno: Errno) -> RawImage {
        RawImage::with_file(Box::new(CachedReadFails(errno)), "t.img".into(), MIB)
    }

    #[test]
    fn cached_read_errors_map_to_not_cached_or_io() {
        let mut buf = [0u8; 512];
        // EAGAIN: not in the page cache this time; try again next time.
        let image = failing(Errno::AGAIN);
        assert!(!image.read_cached(0, &mut buf).unwrap());
        assert!(image.nowait.load(Ordering::Relaxed));
        // EOPNOTSUPP, EINVAL, ENOSYS: no RWF_NOWAIT here; stop trying.
        for errno in [Errno::OPNOTSUPP, Errno::INVAL, Errno::NOSYS] {
            let image = failing(errno);
            assert!(!image.read_cached(0, &mut buf).unwrap());
            assert!(!image.nowait.load(Ordering::Relaxed), "{errno:?}");
        }
        // Anything else is a read error.
        let image = failing(Errno::IO);
        let err = image.read_cached(0, &mut buf).unwrap_err();
        assert!(matches!(err, VolumeError::Io { op: "read", .. }), "{err}");
    }
}
