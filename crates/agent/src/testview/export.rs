//! One volume of a test view as a writable NBD export (docs/HISTORY.md,
//! "Test views"): the bytes the test wrote come from its scratch file,
//! every other byte from the recovery point's stable content
//! ([`PointSource`]). Nothing the test does reaches the replica's images
//! or its history.
//!
//! The scratch is a sparse file the size of the volume plus an in-memory
//! map of byte ranges: `Data` (the file holds the test's bytes there) or
//! `Zero` (the test zeroed or trimmed them; the file's blocks there are
//! punched). Writes land at their own offset in the file, so an
//! unaligned write needs no read-modify-write. The bytes in `Data` ranges
//! count against the test's [`Budget`] (`test_scratch_max`); a write past
//! it fails with ENOSPC and fails the test, never replication.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use rangemap::RangeMap;
use tandem_nbd::{Completion, ErrorCode, Export, ExportError, Extent, ZeroFlags};

/// Where a test view's unwritten bytes come from: the volumes as they
/// were at the point (a [`tandem_replication::history::PointView`]).
pub trait PointSource: Send + Sync {
    /// The volumes' sizes, by volume index.
    fn sizes(&self) -> &[u64];
    /// Reads `buf.len()` bytes of `volume` at `offset` as at the point.
    fn read(&self, volume: u32, offset: u64, buf: &mut [u8]) -> Result<(), SourceError>;
}

/// A point's content could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(#[from] pub Box<dyn std::error::Error + Send + Sync>);

impl PointSource for tandem_replication::history::PointView {
    fn sizes(&self) -> &[u64] {
        tandem_replication::history::PointView::sizes(self)
    }

    fn read(&self, volume: u32, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        tandem_replication::history::PointView::read(self, volume, offset, buf)
            .map_err(|e| SourceError(Box::new(e)))
    }
}

/// The scratch space of one test (all its volumes): bytes held against
/// `test_scratch_max`, and why the test failed, if it did.
pub struct Budget {
    cap: u64,
    used: AtomicU64,
    failed: Mutex<Option<String>>,
}

impl Budget {
    pub fn new(cap: u64) -> Budget {
        Budget {
            cap,
            used: AtomicU64::new(0),
            failed: Mutex::new(None),
        }
    }

    /// Bytes of scratch the test's writes hold now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// Why the test failed (its writes are refused from then on).
    pub fn failed(&self) -> Option<String> {
        self.failed.lock().clone()
    }

    /// Takes `bytes` more, or fails the test: past the cap nothing more
    /// is written.
    fn reserve(&self, bytes: u64, group: &str) -> Result<(), ExportError> {
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.cap)
            });
        match taken {
            Ok(_) => Ok(()),
            Err(used) => {
                let reason = format!(
                    "scratch full: the test's writes hold {used} bytes and this one needs {bytes} more, past test_scratch_max ({} bytes); its writes are refused from now on — `tandem test stop {group}` discards it (replication is not affected)",
                    self.cap
                );
                let mut failed = self.failed.lock();
                if failed.is_none() {
                    tracing::error!(group, "test view FAILED: {reason}");
                    *failed = Some(reason.clone());
                }
                Err(ExportError::new(ErrorCode::NoSpace, reason))
            }
        }
    }

    fn release(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(bytes))
            });
    }

    fn check(&self) -> Result<(), ExportError> {
        match &*self.failed.lock() {
            None => Ok(()),
            Some(reason) => Err(ExportError::new(ErrorCode::NoSpace, reason.clone())),
        }
    }
}

/// What the scratch holds for a byte range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    /// The test's bytes, in the scratch file at the same offset.
    Data,
    /// The test zeroed (or trimmed) them.
    Zero,
}

/// One volume of a running test, served over NBD.
pub struct TestExport {
    name: String,
    group: String,
    description: String,
    volume: u32,
    size: u64,
    source: Arc<dyn PointSource>,
    scratch: Arc<File>,
    held: RwLock<RangeMap<u64, Held>>,
    /// One change at a time (the map and the budget move together).
    writer: Mutex<()>,
    budget: Arc<Budget>,
}

impl TestExport {
    /// Volume `volume` (named `name`) of `source`, its writes going to
    /// `scratch` (an empty file; it is sized here).
    pub fn new(
        name: &str,
        group: &str,
        description: String,
        volume: u32,
        source: Arc<dyn PointSource>,
        scratch: File,
        budget: Arc<Budget>,
    ) -> std::io::Result<TestExport> {
        let size = source
            .sizes()
            .get(volume as usize)
            .copied()
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("the point has no volume {volume}"),
                )
            })?;
        scratch.set_len(size)?;
        Ok(TestExport {
            name: name.to_owned(),
            group: group.to_owned(),
            description,
            volume,
            size,
            source,
            scratch: Arc::new(scratch),
            held: RwLock::new(RangeMap::new()),
            writer: Mutex::new(()),
            budget,
        })
    }

    /// The runs of `range`: what the scratch holds for each (None: the
    /// point's content).
    fn runs(&self, range: Range<u64>) -> Vec<(Range<u64>, Option<Held>)> {
        let held = self.held.read();
        let mut out = Vec::new();
        let mut at = range.start;
        for (r, h) in held.overlapping(&range) {
            let start = r.start.max(range.start);
            let end = r.end.min(range.end);
            if start > at {
                out.push((at..start, None));
            }
            out.push((start..end, Some(*h)));
            at = end;
        }
        if at < range.end {
            out.push((at..range.end, None));
        }
        out
    }

    /// Bytes of `range` the scratch holds as data.
    fn data_in(held: &RangeMap<u64, Held>, range: &Range<u64>) -> u64 {
        held.overlapping(range)
            .filter(|(_, h)| **h == Held::Data)
            .map(|(r, _)| r.end.min(range.end) - r.start.max(range.start))
            .sum()
    }

    fn zero(&self, offset: u64, len: u64, fua: bool) -> Result<Completion, ExportError> {
        self.budget.check()?;
        if len == 0 {
            return Ok(Completion::Done);
        }
        let range = offset..offset + len;
        {
            let _writer = self.writer.lock();
            let mut held = self.held.write();
            let freed = TestExport::data_in(&held, &range);
            held.insert(range.clone(), Held::Zero);
            drop(held);
            self.budget.release(freed);
            if freed > 0 {
                // Best effort: the map, not the file, says these bytes
                // are zero; the hole only gives the space back.
                let _ = rustix::fs::fallocate(
                    &*self.scratch,
                    rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                    offset,
                    len,
                );
            }
        }
        self.completion(fua)
    }

    fn completion(&self, durable: bool) -> Result<Completion, ExportError> {
        if !durable {
            return Ok(Completion::Done);
        }
        let scratch = Arc::clone(&self.scratch);
        Ok(Completion::Deferred(Box::new(move || {
            scratch.sync_data().map_err(io_error)
        })))
    }
}

fn io_error(e: std::io::Error) -> ExportError {
    ExportError::new(ErrorCode::Io, format!("test scratch: {e}"))
}

impl Export for TestExport {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> String {
        self.description.clone()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn multi_conn(&self) -> bool {
        // One scratch file: fdatasync covers every connection's writes.
        true
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        let len = buf.len() as u64;
        for (run, held) in self.runs(offset..offset + len) {
            let from = usize::try_from(run.start - offset).unwrap_or(usize::MAX);
            let to = usize::try_from(run.end - offset).unwrap_or(usize::MAX);
            let part = &mut buf[from..to];
            match held {
                Some(Held::Data) => self
                    .scratch
                    .read_exact_at(part, run.start)
                    .map_err(io_error)?,
                Some(Held::Zero) => part.fill(0),
                None => self
                    .source
                    .read(self.volume, run.start, part)
                    .map_err(|e| {
                        ExportError::new(ErrorCode::Io, format!("reading the recovery point: {e}"))
                    })?,
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<Completion, ExportError> {
        self.budget.check()?;
        if data.is_empty() {
            return Ok(Completion::Done);
        }
        let range = offset..offset + data.len() as u64;
        {
            let _writer = self.writer.lock();
            let new = (range.end - range.start) - TestExport::data_in(&self.held.read(), &range);
            self.budget.reserve(new, &self.group)?;
            // The file first: a read that still sees the old map reads
            // the point, never a half-written scratch range.
            if let Err(e) = self.scratch.write_all_at(data, offset) {
                self.budget.release(new);
                return Err(io_error(e));
            }
            self.held.write().insert(range, Held::Data);
        }
        self.completion(fua)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<Completion, ExportError> {
        self.zero(offset, len, flags.fua)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<Completion, ExportError> {
        // Trimmed bytes read as zeroes afterwards (and hold no scratch).
        self.zero(offset, len, fua)
    }

    fn flush(&self) -> Result<Completion, ExportError> {
        self.completion(true)
    }

    fn cache(&self, _offset: u64, _len: u64) -> Result<(), ExportError> {
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        // Everything reads as data (the point's content is not known to
        // be zero without reading it).
        let _ = offset;
        Ok(vec![Extent {
            length: u32::try_from(len).unwrap_or(u32::MAX),
            flags: 0,
        }])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A point kept in memory.
    struct Memory(Vec<Vec<u8>>, Vec<u64>);

    impl Memory {
        fn new(volumes: Vec<Vec<u8>>) -> Memory {
            let sizes = volumes.iter().map(|v| v.len() as u64).collect();
            Memory(volumes, sizes)
        }
    }

    impl PointSource for Memory {
        fn sizes(&self) -> &[u64] {
            &self.1
        }
        fn read(&self, volume: u32, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
            let v = &self.0[volume as usize];
            let at = offset as usize;
            buf.copy_from_slice(&v[at..at + buf.len()]);
            Ok(())
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    fn export(dir: &tempfile::TempDir, point: Vec<u8>, cap: u64) -> (TestExport, Arc<Budget>) {
        let budget = Arc::new(Budget::new(cap));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("v.scratch"))
            .unwrap();
        let e = TestExport::new(
            "v",
            "g",
            String::new(),
            0,
            Arc::new(Memory::new(vec![point])),
            file,
            Arc::clone(&budget),
        )
        .unwrap();
        (e, budget)
    }

    fn finish(c: Completion) {
        if let Completion::Deferred(f) = c {
            f().unwrap();
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Write(u64, usize, u8),
        Zeroes(u64, u64),
        Trim(u64, u64),
        Read(u64, usize),
        Flush,
    }

    const SIZE: u64 = 64 * 1024 + 1000;

    fn op() -> impl Strategy<Value = Op> {
        let at = 0..SIZE;
        prop_oneof![
            (at.clone(), 1usize..20_000, any::<u8>()).prop_map(|(o, l, s)| Op::Write(o, l, s)),
            (at.clone(), 1u64..40_000).prop_map(|(o, l)| Op::Zeroes(o, l)),
            (at.clone(), 1u64..40_000).prop_map(|(o, l)| Op::Trim(o, l)),
            (at, 1usize..30_000).prop_map(|(o, l)| Op::Read(o, l)),
            Just(Op::Flush),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any sequence of writes, zeroes, trims and reads gives what the
        /// same sequence gives on a plain buffer holding the point, and
        /// the scratch holds exactly the bytes written and not zeroed.
        #[test]
        fn export_equals_a_plain_buffer(seed in any::<u8>(), ops in proptest::collection::vec(op(), 1..60)) {
            let dir = tempfile::tempdir().unwrap();
            let point = pattern(SIZE as usize, seed);
            let (e, budget) = export(&dir, point.clone(), u64::MAX);
            let mut model = point;
            let mut written = vec![false; SIZE as usize];
            for op in ops {
                match op {
                    Op::Write(o, l, s) => {
                        let l = l.min((SIZE - o) as usize);
                        let data = pattern(l, s);
                        finish(e.write(o, &data, s % 2 == 0).unwrap());
                        model[o as usize..o as usize + l].copy_from_slice(&data);
                        written[o as usize..o as usize + l].fill(true);
                    }
                    Op::Zeroes(o, l) | Op::Trim(o, l) => {
                        let l = l.min(SIZE - o);
                        let c = if matches!(op, Op::Trim(..)) {
                            e.trim(o, l, false).unwrap()
                        } else {
                            e.write_zeroes(o, l, ZeroFlags::default()).unwrap()
                        };
                        finish(c);
                        model[o as usize..(o + l) as usize].fill(0);
                        written[o as usize..(o + l) as usize].fill(false);
                    }
                    Op::Read(o, l) => {
                        let l = l.min((SIZE - o) as usize);
                        let mut buf = vec![0xAA; l];
                        e.read(o, &mut buf).unwrap();
                        prop_assert_eq!(&buf[..], &model[o as usize..o as usize + l]);
                    }
                    Op::Flush => finish(e.flush().unwrap()),
                }
            }
            let mut all = vec![0; SIZE as usize];
            e.read(0, &mut all).unwrap();
            prop_assert_eq!(all, model);
            prop_assert_eq!(budget.used(), written.iter().filter(|w| **w).count() as u64);
        }
    }

    #[test]
    fn the_cap_fails_the_test_not_the_point() {
        let dir = tempfile::tempdir().unwrap();
        let point = pattern(1 << 20, 7);
        let (e, budget) = export(&dir, point.clone(), 64 * 1024);
        finish(e.write(0, &[1; 32 * 1024], false).unwrap());
        // Rewriting what is held costs nothing more.
        finish(e.write(0, &[2; 32 * 1024], false).unwrap());
        assert_eq!(budget.used(), 32 * 1024);
        let err = e.write(64 * 1024, &[3; 40 * 1024], false).unwrap_err();
        assert_eq!(err.code, ErrorCode::NoSpace);
        assert!(err.message.contains("test_scratch_max"), "{}", err.message);
        assert!(budget.failed().unwrap().contains("scratch full"));
        // Failed: further changes are refused, reads still work.
        assert_eq!(
            e.write(0, &[4; 10], false).unwrap_err().code,
            ErrorCode::NoSpace
        );
        assert_eq!(
            e.write_zeroes(0, 10, ZeroFlags::default())
                .unwrap_err()
                .code,
            ErrorCode::NoSpace
        );
        let mut buf = vec![0; 1 << 20];
        e.read(0, &mut buf).unwrap();
        assert_eq!(&buf[..32 * 1024], &[2; 32 * 1024][..]);
        assert_eq!(&buf[32 * 1024..], &point[32 * 1024..]);
    }

    #[test]
    fn zeroing_gives_the_scratch_back() {
        let dir = tempfile::tempdir().unwrap();
        let (e, budget) = export(&dir, pattern(1 << 20, 1), u64::MAX);
        finish(e.write(4096, &[9; 8192], true).unwrap());
        assert_eq!(budget.used(), 8192);
        finish(e.trim(0, 1 << 20, false).unwrap());
        assert_eq!(budget.used(), 0);
        let mut buf = vec![1; 1 << 20];
        e.read(0, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0));
    }
}
