//! The disk tier of the replication queue (docs/CAPTURE.md, "The
//! replication queue on disk"): append-only segment files of framed
//! records, and a small in-memory index over them. Not durable: never
//! synced, deleted at open.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::frame::{FrameError, Header, HEADER_LEN};
use crate::group::Record;
use crate::segfile::{ReadCache, SegmentFile};

/// A checkpoint every this many bytes of a segment bounds the headers read
/// to find a sequence number.
const CHECKPOINT_BYTES: u64 = 64 << 10;
/// Bytes read at once when scanning headers.
const WINDOW: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("{path}: frame at byte {offset}: {source}")]
    Frame {
        path: PathBuf,
        offset: u64,
        source: FrameError,
    },
    #[error("{path}: frame at byte {offset}: {reason}")]
    Index {
        path: PathBuf,
        offset: u64,
        reason: &'static str,
    },
    #[error("{path}: record {seq} does not follow the spilled records")]
    Order { path: PathBuf, seq: u64 },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> SpillError + 'a {
    move |source| SpillError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

/// Deletes what a previous run left in `dir` (the spill is not kept across
/// restarts: the persistent dirty map covers it).
pub fn remove_leftovers(dir: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(dir),
        Ok(_) => std::fs::remove_file(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Where to start looking for a sequence number in a segment.
#[derive(Clone, Copy, Debug)]
struct Checkpoint {
    seq: u64,
    offset: u64,
    /// Bytes of changes in the segment before this frame.
    changes_before: u64,
}

#[derive(Debug)]
struct Segment {
    id: u64,
    path: PathBuf,
    file: SegmentFile,
    first_seq: u64,
    last_seq: u64,
    first_at: Instant,
    /// Bytes of complete frames (invariant S3).
    end: u64,
    records: u64,
    /// Bytes the records' changes touch (for lag).
    changes: u64,
    checkpoints: Vec<Checkpoint>,
}

fn remove_segment_file(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot delete spill segment");
        }
    }
}

/// A consumed segment's file kept for the next segment (it keeps its name).
#[derive(Debug)]
struct Spare {
    path: PathBuf,
    file: SegmentFile,
}

/// Consumed segment files kept for reuse: a segment written over an old
/// one reuses its blocks and page cache instead of allocating anew.
const SPARE_SEGMENTS: usize = 2;

impl Segment {
    /// Starts segment number `*next_id` in `dir` with `record`, in `spare`'s
    /// file if there is one (its old frames stay behind `end`, where
    /// nothing reads), else in a new file.
    fn create(
        dir: &Path,
        next_id: &mut u64,
        record: &Record,
        spare: Option<Spare>,
        direct: bool,
    ) -> Result<Segment, SpillError> {
        let id = *next_id;
        let (path, file) = match spare {
            Some(Spare { path, mut file }) => {
                file.reset();
                (path, file)
            }
            None => {
                std::fs::create_dir_all(dir).map_err(io_err(dir, "create spill directory"))?;
                let path = dir.join(format!("{id:08}.log"));
                let file = SegmentFile::create(&path, direct)
                    .map_err(io_err(&path, "create spill segment"))?;
                (path, file)
            }
        };
        *next_id += 1;
        Ok(Segment {
            id,
            path,
            file,
            first_seq: record.seq,
            last_seq: record.seq,
            first_at: record.at,
            end: 0,
            records: 0,
            changes: 0,
            checkpoints: Vec::new(),
        })
    }
}

/// A replica's reading position: the first frame with a sequence number of
/// at least `seq` is at `offset` of segment `segment`. Frames are never
/// moved, so it stays true until the segment is deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    seq: u64,
    segment: u64,
    offset: u64,
}

/// A frame found by sequence number.
struct Found {
    segment: usize,
    offset: u64,
    changes_before: u64,
    header: Header,
}

#[derive(Debug)]
pub struct Spill {
    dir: PathBuf,
    segment_bytes: u64,
    base: Instant,
    segments: VecDeque<Segment>,
    /// Consumed segments' files, for the next segments.
    spares: Vec<Spare>,
    /// Segment files bypass the page cache where they can.
    direct: bool,
    /// Windows of segments recently read from disk.
    cache: ReadCache,
    next_id: u64,
    bytes: u64,
    records: u64,
}

impl Spill {
    /// A spill in `dir` (created on first use), closing segments at
    /// `segment_bytes`; capture times are stored relative to `base`.
    pub fn new(dir: PathBuf, segment_bytes: u64, base: Instant) -> Spill {
        Spill {
            dir,
            segment_bytes: segment_bytes.max(1),
            base,
            segments: VecDeque::new(),
            spares: Vec::new(),
            direct: true,
            cache: ReadCache::default(),
            next_id: 0,
            bytes: 0,
            records: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Bytes of segment files.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Records in segment files (including ones below every floor in a
    /// segment not yet deleted).
    pub fn records(&self) -> u64 {
        self.records
    }

    pub fn last_seq(&self) -> Option<u64> {
        self.segments.back().map(|s| s.last_seq)
    }

    /// Appends `record`, newer than every spilled record. On error nothing
    /// is counted (a partial frame past the end is never read).
    pub fn append(&mut self, record: &Record) -> Result<(), SpillError> {
        if self.last_seq().is_some_and(|last| record.seq <= last) {
            return Err(SpillError::Order {
                path: self.dir.clone(),
                seq: record.seq,
            });
        }
        let header = Header::of(record, self.base).map_err(|source| SpillError::Frame {
            path: self.dir.clone(),
            offset: 0,
            source,
        })?;
        let mut fresh = None;
        let seg = match self.segments.back_mut() {
            Some(seg) if seg.end < self.segment_bytes => seg,
            Some(full) => {
                // Complete: its staged bytes go to disk now.
                full.file
                    .finish()
                    .map_err(io_err(&full.path, "write spill frame"))?;
                fresh.insert(Segment::create(
                    &self.dir,
                    &mut self.next_id,
                    record,
                    self.spares.pop(),
                    self.direct,
                )?)
            }
            None => fresh.insert(Segment::create(
                &self.dir,
                &mut self.next_id,
                record,
                self.spares.pop(),
                self.direct,
            )?),
        };
        let at = seg.end;
        let written = seg
            .file
            .append(at, &header.encode())
            .and_then(|()| match &record.op {
                crate::group::Op::Write { data, .. } => {
                    seg.file.append(at + HEADER_LEN as u64, data)
                }
                _ => Ok(()),
            });
        if let Err(e) = written {
            let err = io_err(&seg.path, "write spill frame")(e);
            if let Some(empty) = fresh {
                self.delete(empty, &mut 0, false);
            }
            return Err(err);
        }
        let change = header.range().map_or(0, |(_, len)| len);
        if seg
            .checkpoints
            .last()
            .is_none_or(|c| at - c.offset >= CHECKPOINT_BYTES)
        {
            seg.checkpoints.push(Checkpoint {
                seq: record.seq,
                offset: at,
                changes_before: seg.changes,
            });
        }
        if seg.records == 0 {
            seg.first_seq = record.seq;
            seg.first_at = record.at;
        }
        seg.last_seq = record.seq;
        seg.end += header.frame_len();
        seg.records += 1;
        seg.changes += change;
        self.bytes += header.frame_len();
        self.records += 1;
        if let Some(seg) = fresh {
            self.segments.push_back(seg);
        }
        Ok(())
    }

    /// Deletes every segment whose records are all below `floor`; returns
    /// how many records went.
    /// Deletes every segment whose records are all below `floor`; returns
    /// how many records went. While records stay spilled, consumed files
    /// are kept for the next segments; once none do, nothing is left on
    /// disk.
    pub fn trim_below(&mut self, floor: u64) -> u64 {
        let mut dropped = 0;
        while self.segments.front().is_some_and(|s| s.last_seq < floor) {
            if let Some(seg) = self.segments.pop_front() {
                self.delete(seg, &mut dropped, true);
            }
        }
        if self.segments.is_empty() {
            for spare in std::mem::take(&mut self.spares) {
                remove_segment_file(&spare.path);
            }
        }
        dropped
    }

    /// Ends a segment: its file is kept as a spare (`recycle`, while fewer
    /// than [`SPARE_SEGMENTS`] are) or deleted.
    fn delete(&mut self, seg: Segment, dropped: &mut u64, recycle: bool) {
        self.bytes -= seg.end;
        self.records -= seg.records;
        *dropped += seg.records;
        if recycle && self.spares.len() < SPARE_SEGMENTS {
            self.spares.push(Spare {
                path: seg.path,
                file: seg.file,
            });
            return;
        }
        remove_segment_file(&seg.path);
    }

    /// The first spilled record with a sequence number of at least `seq`,
    /// or `None` if every spilled record is older. `cursor` remembers where
    /// the following one is, so reading in order reads no index.
    pub fn read_next(
        &self,
        seq: u64,
        cursor: &mut Option<Cursor>,
    ) -> Result<Option<Record>, SpillError> {
        if self.last_seq().is_none_or(|last| last < seq) {
            return Ok(None);
        }
        let at = match cursor.and_then(|c| self.resolve(c, seq)) {
            Some(at) => at,
            None => match self.find(seq)? {
                Some(f) => (f.segment, f.offset),
                None => return Ok(None),
            },
        };
        let seg = &self.segments[at.0];
        let header = read_header(seg, at.1, &self.cache)?;
        if header.seq < seq || header.seq > seg.last_seq {
            return Err(index_err(seg, at.1, "sequence number out of order"));
        }
        let mut payload = vec![0u8; usize::try_from(header.payload_len()).unwrap_or(usize::MAX)];
        seg.file
            .read_exact_at(&mut payload, at.1 + HEADER_LEN as u64, seg.id, &self.cache)
            .map_err(io_err(&seg.path, "read spill frame"))?;
        let record = header
            .record(payload, self.base)
            .map_err(|source| SpillError::Frame {
                path: seg.path.clone(),
                offset: at.1,
                source,
            })?;
        *cursor = Some(Cursor {
            seq: record.seq + 1,
            segment: seg.id,
            offset: at.1 + header.frame_len(),
        });
        Ok(Some(record))
    }

    /// Where `cursor` points, if it is for `seq` and its segment is still
    /// there (moving past the end of a closed segment).
    fn resolve(&self, cursor: Cursor, seq: u64) -> Option<(usize, u64)> {
        if cursor.seq != seq {
            return None;
        }
        let i = self
            .segments
            .binary_search_by_key(&cursor.segment, |s| s.id)
            .ok()?;
        let seg = &self.segments[i];
        if cursor.offset < seg.end {
            Some((i, cursor.offset))
        } else if cursor.offset == seg.end && i + 1 < self.segments.len() {
            Some((i + 1, 0))
        } else {
            None
        }
    }

    /// The first frame with a sequence number of at least `seq`.
    fn find(&self, seq: u64) -> Result<Option<Found>, SpillError> {
        let i = self.segments.partition_point(|s| s.last_seq < seq);
        let Some(seg) = self.segments.get(i) else {
            return Ok(None);
        };
        let c = seg
            .checkpoints
            .partition_point(|c| c.seq <= seq)
            .saturating_sub(1);
        let Some(&cp) = seg.checkpoints.get(c) else {
            return Err(index_err(seg, 0, "segment without frames"));
        };
        let mut scan = Scanner::default();
        let (mut offset, mut before) = (cp.offset, cp.changes_before);
        let mut prev = None;
        loop {
            let header = scan.header(seg, offset, &self.cache)?;
            let in_order = match prev {
                None => header.seq == cp.seq,
                Some(p) => header.seq > p,
            };
            if !in_order {
                return Err(index_err(seg, offset, "sequence number out of order"));
            }
            if header.seq >= seq {
                return Ok(Some(Found {
                    segment: i,
                    offset,
                    changes_before: before,
                    header,
                }));
            }
            before += header.range().map_or(0, |(_, len)| len);
            prev = Some(header.seq);
            offset += header.frame_len();
        }
    }

    /// Calls `f` with the header of every spilled record from `seq` on, in
    /// order (reads headers only).
    pub fn visit_from(&self, seq: u64, mut f: impl FnMut(&Header)) -> Result<(), SpillError> {
        let Some(found) = self.find(seq)? else {
            return Ok(());
        };
        let mut prev = found.header.seq;
        f(&found.header);
        let mut offset = found.offset + found.header.frame_len();
        for seg in self.segments.iter().skip(found.segment) {
            let mut scan = Scanner::default();
            while offset < seg.end {
                let header = scan.header(seg, offset, &self.cache)?;
                if header.seq <= prev || header.seq > seg.last_seq {
                    return Err(index_err(seg, offset, "sequence number out of order"));
                }
                f(&header);
                prev = header.seq;
                offset += header.frame_len();
            }
            offset = 0;
        }
        Ok(())
    }

    /// Bytes of changes spilled after `acked`, and the capture time of the
    /// oldest of them.
    pub fn changes_after(&self, acked: u64) -> Result<(u64, Option<Instant>), SpillError> {
        let Some(found) = self.find(acked.saturating_add(1))? else {
            return Ok((0, None));
        };
        let seg = &self.segments[found.segment];
        let later: u64 = self
            .segments
            .iter()
            .skip(found.segment + 1)
            .map(|s| s.changes)
            .sum();
        let bytes = seg.changes.saturating_sub(found.changes_before) + later;
        Ok((bytes, Some(found.header.at(self.base))))
    }

    /// [`Spill::changes_after`] from the index alone, counting whole
    /// segments (when the files cannot be read).
    pub fn changes_after_approx(&self, acked: u64) -> (u64, Option<Instant>) {
        let after = || self.segments.iter().filter(|s| s.last_seq > acked);
        let oldest = after().next().map(|s| s.first_at);
        (after().map(|s| s.changes).sum(), oldest)
    }
}

fn index_err(seg: &Segment, offset: u64, reason: &'static str) -> SpillError {
    SpillError::Index {
        path: seg.path.clone(),
        offset,
        reason,
    }
}

/// Reads and checks the header of the frame at `offset`, which must end
/// inside the segment (invariant S1).
fn read_header(seg: &Segment, offset: u64, cache: &ReadCache) -> Result<Header, SpillError> {
    let mut b = [0u8; HEADER_LEN];
    if offset + HEADER_LEN as u64 > seg.end {
        return Err(index_err(seg, offset, "frame past the end of the segment"));
    }
    seg.file
        .read_exact_at(&mut b, offset, seg.id, cache)
        .map_err(io_err(&seg.path, "read spill frame"))?;
    checked(seg, offset, &b)
}

fn checked(seg: &Segment, offset: u64, b: &[u8; HEADER_LEN]) -> Result<Header, SpillError> {
    let header = Header::decode(b).map_err(|source| SpillError::Frame {
        path: seg.path.clone(),
        offset,
        source,
    })?;
    if offset + header.frame_len() > seg.end {
        return Err(index_err(seg, offset, "frame past the end of the segment"));
    }
    Ok(header)
}

/// Reads headers in windows, so that scanning small frames costs few
/// reads and scanning large ones never reads their payloads.
#[derive(Default)]
struct Scanner {
    buf: Vec<u8>,
    at: u64,
}

impl Scanner {
    fn header(
        &mut self,
        seg: &Segment,
        offset: u64,
        cache: &ReadCache,
    ) -> Result<Header, SpillError> {
        if offset + HEADER_LEN as u64 > seg.end {
            return Err(index_err(seg, offset, "frame past the end of the segment"));
        }
        let cached =
            offset >= self.at && offset + HEADER_LEN as u64 <= self.at + self.buf.len() as u64;
        if !cached {
            let len = WINDOW.min(seg.end - offset);
            self.buf
                .resize(usize::try_from(len).unwrap_or(HEADER_LEN), 0);
            seg.file
                .read_exact_at(&mut self.buf, offset, seg.id, cache)
                .map_err(io_err(&seg.path, "read spill frame"))?;
            self.at = offset;
        }
        let start = usize::try_from(offset - self.at).unwrap_or(usize::MAX);
        let mut b = [0u8; HEADER_LEN];
        match self.buf.get(start..start + HEADER_LEN) {
            Some(s) => b.copy_from_slice(s),
            None => return Err(index_err(seg, offset, "frame past the end of the segment")),
        }
        checked(seg, offset, &b)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::group::Op;
    use std::os::unix::fs::FileExt;
    use std::time::Duration;

    fn record(seq: u64, base: Instant) -> Record {
        Record {
            seq,
            volume: (seq % 3) as u32,
            op: match seq % 4 {
                0 => Op::Flush,
                1 => Op::Trim {
                    offset: seq * 512,
                    len: 512,
                    fua: true,
                },
                _ => Op::Write {
                    offset: seq * 4096,
                    data: vec![seq.to_le_bytes()[0]; ((seq * 37) % 5000) as usize].into(),
                    fua: false,
                },
            },
            at: base + Duration::from_millis(seq),
        }
    }

    fn filled(dir: &Path, seqs: impl Iterator<Item = u64>, segment: u64) -> (Spill, Vec<Record>) {
        let base = Instant::now();
        let mut spill = Spill::new(dir.join("spill"), segment, base);
        let records: Vec<Record> = seqs.map(|s| record(s, base)).collect();
        for r in &records {
            spill.append(r).unwrap();
        }
        (spill, records)
    }

    #[test]
    fn records_come_back_in_order_from_any_start() {
        let dir = tempfile::tempdir().unwrap();
        // Gaps in the sequence, several segments, several checkpoints each.
        let (spill, records) = filled(dir.path(), (10..3000).filter(|s| s % 7 != 0), 300 << 10);
        assert!(spill.segments.len() > 3);
        assert_eq!(spill.records(), records.len() as u64);
        for start in [0, 10, 11, 14, 700, 1500, 2999, 3000] {
            let mut cursor = None;
            let mut seq = start;
            let mut got = Vec::new();
            while let Some(r) = spill.read_next(seq, &mut cursor).unwrap() {
                seq = r.seq + 1;
                got.push(r);
            }
            let want: Vec<Record> = records.iter().filter(|r| r.seq >= start).cloned().collect();
            assert_eq!(got, want, "from {start}");
        }
    }

    #[test]
    fn a_stale_cursor_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let (spill, _) = filled(dir.path(), 1..200, 16 << 10);
        let mut cursor = None;
        assert_eq!(spill.read_next(50, &mut cursor).unwrap().unwrap().seq, 50);
        // A rewind to 20 with the cursor still at 51.
        assert_eq!(spill.read_next(20, &mut cursor).unwrap().unwrap().seq, 20);
        assert_eq!(spill.read_next(21, &mut cursor).unwrap().unwrap().seq, 21);
    }

    #[test]
    fn headers_and_change_bytes_match_the_records() {
        let dir = tempfile::tempdir().unwrap();
        let (spill, records) = filled(dir.path(), 1..2000, 200 << 10);
        for acked in [0, 1, 5, 999, 1998, 1999, 5000] {
            let want: u64 = records
                .iter()
                .filter(|r| r.seq > acked)
                .map(|r| r.op.range().map_or(0, |(_, l)| l))
                .sum();
            let oldest = records.iter().find(|r| r.seq > acked).map(|r| r.at);
            assert_eq!(
                spill.changes_after(acked).unwrap(),
                (want, oldest),
                "{acked}"
            );
            let mut seen = Vec::new();
            spill
                .visit_from(acked + 1, |h| seen.push((h.seq, h.volume, h.range())))
                .unwrap();
            let want: Vec<_> = records
                .iter()
                .filter(|r| r.seq > acked)
                .map(|r| (r.seq, r.volume, r.op.range()))
                .collect();
            assert_eq!(seen, want);
        }
    }

    #[test]
    fn trimming_deletes_whole_segments_only() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spill, _) = filled(dir.path(), 1..400, 64 << 10);
        let files = || std::fs::read_dir(dir.path().join("spill")).unwrap().count();
        let before = files();
        assert_eq!(before, spill.segments.len());
        let first_last = spill.segments[0].last_seq;
        assert_eq!(spill.trim_below(first_last), 0);
        let n = spill.segments[0].records;
        assert_eq!(spill.trim_below(first_last + 1), n);
        // The consumed segment's file is kept as a spare.
        assert_eq!(files(), before);
        assert_eq!(spill.segments.len(), before - 1);
        let bytes: u64 = spill.segments.iter().map(|s| s.end).sum();
        assert_eq!(spill.bytes(), bytes);
        spill.trim_below(u64::MAX);
        assert!(spill.is_empty());
        // Nothing spilled: nothing on disk, spares included.
        assert_eq!((spill.bytes(), spill.records(), files()), (0, 0, 0));
    }

    #[test]
    fn spare_files_are_written_over_and_only_new_frames_read() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (mut spill, _) = filled(dir.path(), 1..400, 64 << 10);
        let inodes = |spill: &Spill| -> Vec<u64> {
            spill
                .segments
                .iter()
                .map(|s| s.file.metadata().unwrap().ino())
                .collect()
        };
        let old = inodes(&spill);
        // All but the newest segment consumed.
        let newest_first = spill.segments.back().unwrap().first_seq;
        spill.trim_below(newest_first);
        assert_eq!(spill.spares.len(), SPARE_SEGMENTS);
        // Fewer, shorter frames than the files held: stale frames stay
        // behind each segment's end.
        let base = spill.base;
        let records: Vec<Record> = (400..460).map(|s| record(s, base)).collect();
        for r in &records {
            spill.append(r).unwrap();
        }
        let reused = inodes(&spill);
        assert!(
            reused.iter().all(|i| old.contains(i)),
            "{reused:?} not in {old:?}"
        );
        assert!(spill.spares.len() < SPARE_SEGMENTS);
        spill.trim_below(newest_first);
        let mut cursor = None;
        let mut seq = newest_first;
        let mut got = Vec::new();
        while let Some(r) = spill.read_next(seq, &mut cursor).unwrap() {
            seq = r.seq + 1;
            got.push(r);
        }
        let want: Vec<Record> = (newest_first..400)
            .map(|s| record(s, base))
            .chain(records)
            .collect();
        assert_eq!(got, want);
        let mut seen = Vec::new();
        spill.visit_from(0, |h| seen.push(h.seq)).unwrap();
        assert_eq!(seen, (newest_first..460).collect::<Vec<_>>());
    }

    impl Spill {
        /// Every staged byte on disk and nothing cached: reads see what
        /// the files hold.
        fn settle(&mut self) {
            for seg in &mut self.segments {
                seg.file.finish().unwrap();
                seg.file.wait_written();
            }
            self.cache.clear();
        }
    }

    #[test]
    fn segments_on_a_disk_bypass_the_page_cache() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let (spill, records) = filled(dir.path(), 1..3000, 1 << 20);
        assert!(spill.segments.len() > 2);
        assert!(spill.segments.iter().all(|s| s.file.is_direct()));
        let mut cursor = None;
        for r in &records {
            assert_eq!(&spill.read_next(r.seq, &mut cursor).unwrap().unwrap(), r);
        }
    }

    #[test]
    fn damage_is_reported_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spill, _) = filled(dir.path(), 1..100, 1 << 20);
        spill.settle();
        let path = &spill.segments[0].path;
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        // Damage the payload of record 2 (the first frame is record 1).
        let first = spill.segments[0].checkpoints[0].offset
            + Header::of(&record(1, spill.base), spill.base)
                .unwrap()
                .frame_len();
        file.write_all_at(&[0xee; 4], first + HEADER_LEN as u64 + 1)
            .unwrap();
        let mut cursor = None;
        assert_eq!(spill.read_next(1, &mut cursor).unwrap().unwrap().seq, 1);
        assert!(matches!(
            spill.read_next(2, &mut cursor),
            Err(SpillError::Frame {
                source: FrameError::PayloadCrc,
                ..
            })
        ));
        // A damaged header (its length field).
        file.write_all_at(&[0xff; 4], 4).unwrap();
        spill.settle();
        assert!(spill.read_next(1, &mut None).is_err());
        assert!(spill.visit_from(1, |_| {}).is_err());
        assert!(spill.changes_after(0).is_err());
        // Truncated behind the index's back.
        file.set_len(10).unwrap();
        spill.settle();
        assert!(spill.read_next(50, &mut None).is_err());
        assert!(spill.changes_after_approx(0).0 > 0);
    }

    #[test]
    fn appending_out_of_order_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spill, _) = filled(dir.path(), 5..10, 1 << 20);
        let base = spill.base;
        assert!(matches!(
            spill.append(&record(9, base)),
            Err(SpillError::Order { seq: 9, .. })
        ));
        assert_eq!(spill.records(), 5);
    }

    #[test]
    fn leftovers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let spill = dir.path().join("spill");
        std::fs::create_dir_all(&spill).unwrap();
        std::fs::write(spill.join("00000003.log"), b"old").unwrap();
        remove_leftovers(&spill).unwrap();
        assert!(!spill.exists());
        std::fs::write(&spill, b"not a directory").unwrap();
        remove_leftovers(&spill).unwrap();
        assert!(!spill.exists());
        remove_leftovers(&spill).unwrap();
    }
}
