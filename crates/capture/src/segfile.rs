//! A spill segment's file (docs/CAPTURE.md, "Direct I/O"): written once,
//! strictly in order, read back once, never synced. Where the file system
//! takes it, the file is opened `O_DIRECT`: appends gather in a staging
//! block that is written whole, and reads go through a small cache of
//! aligned windows, so spilled data never passes through the page cache
//! (no page of it is allocated, copied into, or evicted for).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use tandem_volume::AlignedBuf;

/// Alignment of direct I/O (offsets, lengths and buffers): the largest
/// logical block size of the disks it meets.
pub const ALIGN: usize = tandem_volume::DIRECT_ALIGN;
/// Appends are written in blocks of this many bytes.
pub const BLOCK: usize = 1 << 20;
/// Reads from disk are of at least this many bytes (one cached window).
pub const WINDOW: usize = 256 << 10;
/// Windows kept (several replicas may read the spill at once).
const WINDOWS: usize = 4;

/// A window of a segment read from disk: `(segment, start)` names it.
struct Window {
    segment: u64,
    start: u64,
    data: AlignedBuf,
    used: u64,
}

/// Recently read windows of a spill's segments.
#[derive(Default)]
pub struct ReadCache {
    windows: Mutex<(Vec<Window>, u64)>,
}

impl std::fmt::Debug for ReadCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadCache").finish_non_exhaustive()
    }
}

impl ReadCache {
    /// Forgets every window (what the disk holds is read again).
    #[cfg(test)]
    pub fn clear(&self) {
        self.windows.lock().0.clear();
    }
}

pub struct SegmentFile {
    file: Arc<File>,
    direct: bool,
    /// Bytes from `tail_at` not yet handed to the writer (direct only;
    /// `tail_at` is aligned).
    tail: Option<AlignedBuf>,
    tail_len: usize,
    tail_at: u64,
    /// Blocks below `tail_at` on their way to the disk.
    pending: Arc<Pending>,
}

impl std::fmt::Debug for SegmentFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentFile")
            .field("direct", &self.direct)
            .field("tail_at", &self.tail_at)
            .field("tail_len", &self.tail_len)
            .finish_non_exhaustive()
    }
}

/// Blocks handed to the spill writer (docs/CAPTURE.md, "Direct I/O"):
/// they are read from memory until they are on disk.
#[derive(Default)]
struct Pending {
    state: Mutex<PendingState>,
    changed: Condvar,
}

#[derive(Default)]
struct PendingState {
    /// (offset, block, bytes of it written), in offset order; a block
    /// leaves once written (a failed one stays: it is read from here).
    blocks: VecDeque<(u64, Arc<AlignedBuf>, usize)>,
    /// Blocks handed over and not yet done with.
    in_flight: usize,
    /// The first write that failed: every later append fails with it.
    failed: Option<(io::ErrorKind, String)>,
    /// Written blocks, for the next ones.
    free: Vec<AlignedBuf>,
    /// Nothing more is appended (until a reset): written blocks are let
    /// go, so that complete segments hold no memory.
    complete: bool,
}

/// Blocks a file may have on their way to the disk before an append
/// waits (the device is that far behind).
const IN_FLIGHT: usize = 8;
/// Written blocks kept per file for reuse: as many as may be on their
/// way, so that a file being appended to allocates none once running (a
/// fresh block costs its pages' faults and zeroing, more than the copy).
const FREE_BLOCKS: usize = IN_FLIGHT;

/// One block for the writer.
struct Job {
    file: Arc<File>,
    at: u64,
    block: Arc<AlignedBuf>,
    len: usize,
    pending: Arc<Pending>,
}

/// The process's spill writer thread (started on first use; `None` if it
/// could not be: blocks are then written by the appender).
fn writer() -> Option<&'static std::sync::mpsc::Sender<Job>> {
    static WRITER: std::sync::OnceLock<Option<std::sync::mpsc::Sender<Job>>> =
        std::sync::OnceLock::new();
    WRITER
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<Job>();
            let spawned = std::thread::Builder::new()
                .name("spill-writer".into())
                .spawn(move || {
                    for job in rx {
                        let written = job.file.write_all_at(&job.block.bytes()[..job.len], job.at);
                        job.pending.done(job.at, job.block, written);
                    }
                });
            match spawned {
                Ok(_) => Some(tx),
                Err(e) => {
                    tracing::warn!("cannot start the spill writer thread: spill blocks are written by the NBD threads: {e}");
                    None
                }
            }
        })
        .as_ref()
}

impl Pending {
    /// A block handed over is written (or failed).
    fn done(&self, at: u64, block: Arc<AlignedBuf>, written: io::Result<()>) {
        let mut p = self.state.lock();
        p.in_flight = p.in_flight.saturating_sub(1);
        match written {
            Ok(()) => {
                if let Some(i) = p.blocks.iter().position(|b| b.0 == at) {
                    p.blocks.remove(i);
                }
                if let Ok(block) = Arc::try_unwrap(block) {
                    if !p.complete && p.free.len() < FREE_BLOCKS {
                        p.free.push(block);
                    }
                }
            }
            Err(e) => {
                if p.failed.is_none() {
                    p.failed = Some((e.kind(), e.to_string()));
                }
            }
        }
        self.changed.notify_all();
    }

    fn check(p: &PendingState) -> io::Result<()> {
        match &p.failed {
            Some((kind, msg)) => Err(io::Error::new(*kind, format!("spill block write: {msg}"))),
            None => Ok(()),
        }
    }

    /// Waits until nothing handed over is still being written.
    fn wait_idle(&self) {
        let mut p = self.state.lock();
        while p.in_flight > 0 {
            self.changed.wait(&mut p);
        }
    }
}

fn round_up(n: u64) -> u64 {
    n.div_ceil(ALIGN as u64) * ALIGN as u64
}

fn round_down(n: u64) -> u64 {
    n / ALIGN as u64 * ALIGN as u64
}

impl SegmentFile {
    /// Creates (or empties) the file at `path`, direct unless the file
    /// system refuses it or `direct` is false.
    pub fn create(path: &Path, direct: bool) -> io::Result<SegmentFile> {
        let open = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(flags)
                .open(path)
        };
        let (file, direct) = if direct {
            match open(rustix::fs::OFlags::DIRECT.bits() as i32) {
                Ok(f) => (f, true),
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    (open(0)?, false)
                }
                Err(e) => return Err(e),
            }
        } else {
            (open(0)?, false)
        };
        Ok(SegmentFile {
            file: Arc::new(file),
            direct,
            tail: None,
            tail_len: 0,
            tail_at: 0,
            pending: Arc::default(),
        })
    }

    /// Whether the file bypasses the page cache.
    #[cfg(test)]
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    #[cfg(test)]
    pub fn metadata(&self) -> io::Result<std::fs::Metadata> {
        self.file.metadata()
    }

    /// Waits until every block handed over is on disk (or failed).
    #[cfg(test)]
    pub fn wait_written(&self) {
        self.pending.wait_idle();
    }

    /// Starts writing the file over from byte 0 (a spare reused): what it
    /// held stays behind what is written, where nothing reads. Waits for
    /// the writes of its last use, so that none lands on the new content.
    pub fn reset(&mut self) {
        self.pending.wait_idle();
        let mut p = self.pending.state.lock();
        p.blocks.clear();
        p.failed = None;
        p.complete = false;
        drop(p);
        self.tail_len = 0;
        self.tail_at = 0;
    }

    /// Bytes written so far (including the staged ones).
    pub fn end(&self) -> u64 {
        self.tail_at + self.tail_len as u64
    }

    /// Writes `data` at `at`, which is where the last append ended, or
    /// inside the staged block (a failed frame's partial bytes written
    /// over).
    pub fn append(&mut self, at: u64, data: &[u8]) -> io::Result<()> {
        if !self.direct {
            return self.file.write_all_at(data, at);
        }
        if at < self.tail_at || at > self.end() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "spill append at byte {at}, but the file is written up to {}",
                    self.end()
                ),
            ));
        }
        Pending::check(&self.pending.state.lock())?;
        // Within the staged block: at - tail_at < BLOCK.
        self.tail_len = usize::try_from(at - self.tail_at).unwrap_or(0);
        let mut rest = data;
        while !rest.is_empty() {
            let pending = &self.pending;
            let tail = self.tail.get_or_insert_with(|| {
                let spare = pending.state.lock().free.pop();
                spare.unwrap_or_else(|| AlignedBuf::new(BLOCK))
            });
            let n = rest.len().min(BLOCK - self.tail_len);
            tail.bytes_mut()[self.tail_len..self.tail_len + n].copy_from_slice(&rest[..n]);
            self.tail_len += n;
            rest = &rest[n..];
            if self.tail_len == BLOCK {
                self.hand_over(BLOCK)?;
            }
        }
        Ok(())
    }

    /// Hands the staged block's first `len` bytes to the writer (or writes
    /// them here without one) and starts a new block after them.
    fn hand_over(&mut self, len: usize) -> io::Result<()> {
        let Some(block) = self.tail.take() else {
            return Ok(());
        };
        let at = self.tail_at;
        match writer() {
            Some(tx) => {
                let block = Arc::new(block);
                {
                    let mut p = self.pending.state.lock();
                    while p.in_flight >= IN_FLIGHT && p.failed.is_none() {
                        self.pending.changed.wait(&mut p);
                    }
                    Pending::check(&p)?;
                    p.blocks.push_back((at, Arc::clone(&block), len));
                    p.in_flight += 1;
                }
                let job = Job {
                    file: Arc::clone(&self.file),
                    at,
                    block,
                    len,
                    pending: Arc::clone(&self.pending),
                };
                if let Err(std::sync::mpsc::SendError(job)) = tx.send(job) {
                    // The writer is gone: write it here (a failure is
                    // kept as the writer's would be).
                    let written = self.file.write_all_at(&job.block.bytes()[..len], at);
                    self.pending.done(at, job.block, written);
                    Pending::check(&self.pending.state.lock())?;
                }
            }
            None => {
                self.file.write_all_at(&block.bytes()[..len], at)?;
                self.tail = Some(block);
            }
        }
        self.tail_at += len as u64;
        self.tail_len = 0;
        Ok(())
    }

    /// Hands the staged bytes (padded to the alignment) to the writer and
    /// lets go of the staging block: the segment is complete.
    pub fn finish(&mut self) -> io::Result<()> {
        if self.tail.is_some() && self.tail_len > 0 {
            // At most BLOCK, a multiple of ALIGN.
            let len = usize::try_from(round_up(self.tail_len as u64)).unwrap_or(BLOCK);
            self.hand_over(len)?;
        }
        self.tail = None;
        let mut p = self.pending.state.lock();
        p.complete = true;
        p.free.clear();
        Ok(())
    }

    /// Reads `buf.len()` bytes at `at`, which must have been appended;
    /// `segment` names this file's content in `cache`.
    pub fn read_exact_at(
        &self,
        buf: &mut [u8],
        at: u64,
        segment: u64,
        cache: &ReadCache,
    ) -> io::Result<()> {
        if !self.direct {
            return self.file.read_exact_at(buf, at);
        }
        let end = at + buf.len() as u64;
        if end > self.end() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "spill read of bytes {at}..{end}, but only {} are written",
                    self.end()
                ),
            ));
        }
        // [0, on_disk): on disk; [on_disk, tail_at): handed to the
        // writer; [tail_at, end): staged.
        // (The writer only ever moves `on_disk` up: a block found written
        // meanwhile is read from the disk below.)
        let on_disk = self
            .pending
            .state
            .lock()
            .blocks
            .front()
            .map_or(self.tail_at, |b| b.0);
        let mut pos = at;
        if pos < on_disk.min(end) {
            let n = usize::try_from(on_disk.min(end) - pos).unwrap_or(usize::MAX);
            self.read_disk(&mut buf[..n], pos, segment, cache, on_disk)?;
            pos += n as u64;
        }
        let pending = self.pending.state.lock();
        while pos < end.min(self.tail_at) {
            let i = usize::try_from(pos - at).unwrap_or(0);
            let block = pending
                .blocks
                .iter()
                .find(|(b, _, len)| *b <= pos && pos < b + *len as u64);
            let n = match block {
                Some((b, data, len)) => {
                    let from = usize::try_from(pos - b).unwrap_or(0);
                    let n = (len - from).min(buf.len() - i);
                    buf[i..i + n].copy_from_slice(&data.bytes()[from..from + n]);
                    n
                }
                None => {
                    // Written since `on_disk` was read, or after a block
                    // before it failed: on disk, outside the cached prefix.
                    // Blocks start at multiples of BLOCK.
                    let block_end = (pos / BLOCK as u64 + 1) * BLOCK as u64;
                    let stop = end.min(self.tail_at).min(block_end);
                    let n = usize::try_from(stop - pos).unwrap_or(0);
                    self.read_uncached(&mut buf[i..i + n], pos)?;
                    n
                }
            };
            pos += n as u64;
        }
        drop(pending);
        if end > self.tail_at {
            let from = at.max(self.tail_at);
            let (a, b) = (
                usize::try_from(from - at).unwrap_or(0),
                usize::try_from(from - self.tail_at).unwrap_or(0),
            );
            let n = buf.len() - a;
            match &self.tail {
                Some(tail) => buf[a..].copy_from_slice(&tail.bytes()[b..b + n]),
                None => return Err(io::Error::other("spill tail missing")),
            }
        }
        Ok(())
    }

    /// Reads bytes from the disk around the cache (aligned, direct).
    fn read_uncached(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        let start = round_down(at);
        let len = round_up(at + buf.len() as u64) - start;
        let mut data = AlignedBuf::new(usize::try_from(len).unwrap_or(BLOCK));
        self.file.read_exact_at(data.bytes_mut(), start)?;
        let from = usize::try_from(at - start).unwrap_or(0);
        buf.copy_from_slice(&data.bytes()[from..from + buf.len()]);
        Ok(())
    }

    /// Reads bytes below `on_disk` (everything before it is on disk)
    /// through the cache.
    fn read_disk(
        &self,
        buf: &mut [u8],
        at: u64,
        segment: u64,
        cache: &ReadCache,
        on_disk: u64,
    ) -> io::Result<()> {
        let mut guard = cache.windows.lock();
        let (windows, clock) = &mut *guard;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = at + done as u64;
            *clock += 1;
            let hit = windows.iter_mut().find(|w| {
                w.segment == segment && w.start <= pos && pos < w.start + w.data.len() as u64
            });
            let window = match hit {
                Some(w) => w,
                None => {
                    let start = round_down(pos);
                    let want = round_up(at + buf.len() as u64).min(on_disk) - start;
                    let len = want.max(WINDOW as u64).min(on_disk - start);
                    let mut data = AlignedBuf::new(usize::try_from(len).unwrap_or(WINDOW));
                    self.file.read_exact_at(data.bytes_mut(), start)?;
                    let w = Window {
                        segment,
                        start,
                        data,
                        used: *clock,
                    };
                    if windows.len() >= WINDOWS {
                        if let Some(oldest) = windows
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, w)| w.used)
                            .map(|(i, _)| i)
                        {
                            windows.swap_remove(oldest);
                        }
                    }
                    windows.push(w);
                    let last = windows.len() - 1;
                    &mut windows[last]
                }
            };
            window.used = *clock;
            let from = usize::try_from(pos - window.start).unwrap_or(0);
            let n = (window.data.len() - from).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&window.data.bytes()[from..from + n]);
            done += n;
        }
        // A window bigger than the usual (a large record) is not kept.
        windows.retain(|w| w.data.len() <= WINDOW);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
    use super::*;
    use proptest::prelude::*;

    /// A directory on a disk file system (where direct I/O works), not a
    /// tmpfs.
    fn disk_dir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("tandem-segfile")
            .tempdir_in("/var/tmp")
            .unwrap()
    }

    #[test]
    fn a_disk_file_is_direct() {
        let dir = disk_dir();
        let f = SegmentFile::create(&dir.path().join("s"), true).unwrap();
        assert!(f.is_direct());
        let f = SegmentFile::create(&dir.path().join("b"), false).unwrap();
        assert!(!f.is_direct());
    }

    #[derive(Clone, Debug)]
    enum Step {
        Append(Vec<u8>),
        /// Append, then write over its last `n` bytes' worth (a failed
        /// frame): append at `end - n`.
        Rewrite(usize, Vec<u8>),
        Read(u64, usize),
        Finish,
        Reset,
        Clear,
    }

    fn step() -> impl Strategy<Value = Step> {
        let data = (any::<u8>(), 0usize..300_000).prop_map(|(b, n)| {
            (0..n)
                .map(|i| b.wrapping_add((i % 251) as u8))
                .collect::<Vec<u8>>()
        });
        prop_oneof![
            6 => data.clone().prop_map(Step::Append),
            1 => (0usize..5000, data).prop_map(|(n, d)| Step::Rewrite(n, d)),
            6 => (any::<u64>(), 0usize..400_000).prop_map(|(a, n)| Step::Read(a, n)),
            1 => Just(Step::Finish),
            1 => Just(Step::Reset),
            1 => Just(Step::Clear),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Whatever was appended reads back, from disk, from the staged
        /// block or across both, in direct and buffered files alike; a
        /// file written over after a reset shows only its new bytes.
        #[test]
        fn reads_see_exactly_what_was_appended(
            direct in any::<bool>(),
            steps in prop::collection::vec(step(), 1..40),
        ) {
            let dir = disk_dir();
            let mut f = SegmentFile::create(&dir.path().join("s"), direct).unwrap();
            prop_assert_eq!(f.is_direct(), direct);
            let cache = ReadCache::default();
            let mut model: Vec<u8> = Vec::new();
            let mut segment = 0u64;
            let mut finished = false;
            for s in steps {
                match s {
                    Step::Append(d) if !finished => {
                        f.append(model.len() as u64, &d).unwrap();
                        model.extend_from_slice(&d);
                    }
                    Step::Rewrite(n, d) if !finished => {
                        let back = n.min(model.len()).min(f.end().saturating_sub(f.tail_at) as usize);
                        let back = if direct { back } else { n.min(model.len()) };
                        let at = model.len() - back;
                        f.append(at as u64, &d).unwrap();
                        model.truncate(at);
                        model.extend_from_slice(&d);
                    }
                    Step::Append(_) | Step::Rewrite(..) => {}
                    Step::Read(a, n) => {
                        // (Nothing appended yet: an empty read at 0.)
                        let at = (a % (model.len() as u64).max(1)) as usize;
                        let n = n.min(model.len() - at);
                        let mut buf = vec![0u8; n];
                        f.read_exact_at(&mut buf, at as u64, segment, &cache).unwrap();
                        prop_assert_eq!(&buf[..], &model[at..at + n]);
                    }
                    Step::Finish => {
                        f.finish().unwrap();
                        finished = true;
                    }
                    Step::Reset => {
                        f.reset();
                        model.clear();
                        finished = false;
                        // A reused file is a new segment.
                        segment += 1;
                    }
                    Step::Clear => cache.clear(),
                }
                prop_assert!(!direct || f.end() >= model.len() as u64);
            }
            // Past what was appended (and, direct, its padding): a direct
            // file refuses, it knows its end; a buffered one reads what
            // the file holds, an earlier use's bytes included (the
            // spill's index bounds its reads), and refuses past that.
            let mut buf = [0u8; 1];
            let past = f.end().max(model.len() as u64);
            let file_len = f.metadata().unwrap().len();
            let refused = f.read_exact_at(&mut buf, past, segment, &cache).is_err();
            prop_assert_eq!(refused, direct || past >= file_len);
        }
    }

    #[test]
    fn an_append_behind_what_is_on_disk_is_refused() {
        let dir = disk_dir();
        let mut f = SegmentFile::create(&dir.path().join("s"), true).unwrap();
        f.append(0, &vec![7u8; BLOCK + 10]).unwrap();
        assert!(f.append(5, b"x").is_err());
        assert!(f.append(BLOCK as u64 + 11, b"x").is_err());
        f.append(BLOCK as u64 + 10, b"y").unwrap();
        assert_eq!(f.end(), BLOCK as u64 + 11);
    }
}
