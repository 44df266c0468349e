//! The replica's journal (docs/REPLICA.md): records are appended and synced
//! here before they are applied to any image, so that after a crash the
//! images can be brought to a consistent prefix again.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::ReplicaError;

const MAGIC: &[u8; 4] = b"TNDJ";
pub const HEADER_LEN: usize = 52;
/// A segment is closed past this size.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// Largest data of one entry (one NBD request).
const MAX_DATA: u64 = 64 << 20;

/// A journaled record's operation: the peer protocol's, with the same
/// values on disk as on the wire (docs/REPLICA.md).
pub use tandem_peer::RecordOp;

/// One journaled record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub epoch: u64,
    pub seq: u64,
    pub volume: u32,
    pub op: RecordOp,
    pub fua: bool,
    pub offset: u64,
    pub len: u64,
    /// Raw data (writes only).
    pub data: Vec<u8>,
}

/// An entry's fields but its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub epoch: u64,
    pub seq: u64,
    pub volume: u32,
    pub op: RecordOp,
    pub fua: bool,
    pub offset: u64,
    pub len: u64,
}

impl Head {
    /// Appends the entry whose data `fill` appends to `out` (a record's
    /// payload decoded straight into place, with no copy in between);
    /// returns where its data lies in `out`. When `fill` fails, `out` is
    /// as it was.
    pub fn encode_with<E>(
        &self,
        out: &mut Vec<u8>,
        fill: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<std::ops::Range<usize>, E> {
        let start = out.len();
        out.extend_from_slice(MAGIC);
        // Patched once the data is in.
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.volume.to_le_bytes());
        out.push(self.op as u8);
        out.push(u8::from(self.fua));
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        let data = start + HEADER_LEN;
        if let Err(e) = fill(out) {
            out.truncate(start);
            return Err(e);
        }
        // A record's data is at most one peer payload (32 MiB, checked by
        // the codec), so the entry's length fits the u32 field.
        #[allow(clippy::cast_possible_truncation)]
        let total = (out.len() - start) as u32;
        out[start + 4..start + 8].copy_from_slice(&total.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&out[start..start + 48]), &out[data..]);
        out[start + 48..data].copy_from_slice(&crc.to_le_bytes());
        Ok(data..out.len())
    }
}

impl Entry {
    pub fn head(&self) -> Head {
        Head {
            epoch: self.epoch,
            seq: self.seq,
            volume: self.volume,
            op: self.op,
            fua: self.fua,
            offset: self.offset,
            len: self.len,
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let Ok(_) = self.head().encode_with(out, |o| {
            o.extend_from_slice(&self.data);
            Ok::<(), std::convert::Infallible>(())
        });
    }

    /// Reads the rest of one entry whose first 4 bytes were `magic`;
    /// `Ok(None)` at a torn or invalid entry (the segment's run ends there).
    fn read_after<R: Read>(magic: [u8; 4], r: &mut R) -> io::Result<Option<Entry>> {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&magic);
        if fill(r, &mut h[4..])? != HEADER_LEN - 4 {
            return Ok(None);
        }
        let u32_at = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[at..at + 8]);
            u64::from_le_bytes(b)
        };
        if &h[0..4] != MAGIC {
            return Ok(None);
        }
        let total = u64::from(u32_at(4));
        let Some(data_len) = total
            .checked_sub(HEADER_LEN as u64)
            .filter(|n| *n <= MAX_DATA)
            .and_then(|n| usize::try_from(n).ok())
        else {
            return Ok(None);
        };
        let Some(op) = RecordOp::from_u8(h[28]) else {
            return Ok(None);
        };
        let mut data = vec![0u8; data_len];
        if fill(r, &mut data)? != data_len {
            return Ok(None);
        }
        if crc32c::crc32c_append(crc32c::crc32c(&h[0..48]), &data) != u32_at(48) {
            return Ok(None);
        }
        Ok(Some(Entry {
            epoch: u64_at(8),
            seq: u64_at(16),
            volume: u32_at(24),
            op,
            fua: h[29] == 1,
            offset: u64_at(32),
            len: u64_at(40),
            data,
        }))
    }
}

/// A closed segment's end (docs/REPLICA.md, "Recycled segments").
const TRAILER_MAGIC: &[u8; 4] = b"TNDE";
const TRAILER_LEN: usize = 32;
/// Trailer flag: the file's tail may hold seqs above the valid run's.
const TAIL_UNKNOWN: u32 = 1;
/// Spares kept for reuse.
const MAX_SPARES: usize = 2;

fn trailer(first: u64, last: u64, flags: u32) -> [u8; TRAILER_LEN] {
    let mut t = [0u8; TRAILER_LEN];
    t[0..4].copy_from_slice(TRAILER_MAGIC);
    #[allow(clippy::cast_possible_truncation)]
    t[4..8].copy_from_slice(&(TRAILER_LEN as u32).to_le_bytes());
    t[8..16].copy_from_slice(&first.to_le_bytes());
    t[16..24].copy_from_slice(&last.to_le_bytes());
    t[24..28].copy_from_slice(&flags.to_le_bytes());
    let crc = crc32c::crc32c(&t[0..28]);
    t[28..32].copy_from_slice(&crc.to_le_bytes());
    t
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    last_seq: u64,
    /// Valid bytes (the file may be longer: stale data or a trailer).
    bytes: u64,
    /// Every seq the file holds is at most `last_seq`: it may become a
    /// spare named after it.
    recyclable: bool,
}

/// The segment being written.
#[derive(Debug)]
struct Current {
    file: File,
    /// Size of the file (a recycled one is longer than what is written).
    len: u64,
}

/// How a segment's valid run ends.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// At end of file.
    Eof,
    /// At a trailer naming the segment and its last seq.
    Trailer { tail_unknown: bool },
    /// At anything else: stale data, a torn or corrupt entry.
    Other,
}

/// A journal in numbered segment files, recycled once applied.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    /// First seq of each segment -> segment.
    segments: BTreeMap<u64, Segment>,
    /// Highest seq a spare file ever held -> its path.
    spares: BTreeMap<u64, PathBuf>,
    current: Option<Current>,
    last_seq: u64,
    segment_bytes: u64,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ReplicaError {
    let path = path.to_owned();
    move |source| ReplicaError::Io { path, op, source }
}

impl Journal {
    /// Opens the journal in `dir`, scanning every segment
    /// (docs/REPLICA.md, "Recycled segments"). A segment that is not the
    /// newest must be whole; otherwise its first invalid entry ends the
    /// journal and later segments are removed. The newest segment's valid
    /// run simply ends (stale data or a torn write).
    pub fn open(dir: &Path) -> Result<Journal, ReplicaError> {
        std::fs::create_dir_all(dir).map_err(io_err("create journal directory", dir))?;
        let mut firsts = Vec::new();
        let mut spares = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(io_err("list journal", dir))? {
            let entry = entry.map_err(io_err("list journal", dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(first) = name
                .strip_suffix(".log")
                .and_then(|n| n.parse::<u64>().ok())
            {
                firsts.push(first);
            } else if let Some(max) = name
                .strip_prefix("spare-")
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                spares.insert(max, entry.path());
            } else if name.starts_with("drop-") && name.ends_with(".seg") {
                remove_file(&entry.path(), "remove dropped journal segment")?;
            }
        }
        firsts.sort_unstable();
        let mut journal = Journal {
            dir: dir.to_owned(),
            segments: BTreeMap::new(),
            spares,
            current: None,
            last_seq: 0,
            segment_bytes: SEGMENT_BYTES,
        };
        while journal.spares.len() > MAX_SPARES {
            if let Some((_, path)) = journal.spares.pop_last() {
                remove_file(&path, "remove journal spare")?;
            }
        }
        let newest = firsts.last().copied();
        let mut ended = false;
        for first in firsts {
            let path = journal.segment_path(first);
            if ended {
                tracing::warn!(segment = %path.display(), "removing journal segment after a corrupt one");
                remove_file(&path, "remove journal segment")?;
                continue;
            }
            let (valid_bytes, last, end) = scan(&path, first)?;
            let mut recyclable = !matches!(end, End::Trailer { tail_unknown: true });
            if end == End::Other {
                if Some(first) == newest {
                    tracing::info!(segment = %path.display(), at = valid_bytes, "journal ends here (stale data or a torn write follows)");
                } else {
                    tracing::warn!(segment = %path.display(), at = valid_bytes, "corrupt journal entry: the journal ends here");
                    ended = true;
                }
                if valid_bytes > 0 {
                    // Later segments may follow after the next write: mark
                    // the end (the tail's seqs are not known).
                    seal(&path, valid_bytes, first, last, TAIL_UNKNOWN)?;
                    recyclable = false;
                }
            }
            if valid_bytes == 0 {
                remove_file(&path, "remove empty journal segment")?;
                continue;
            }
            journal.last_seq = journal.last_seq.max(last);
            journal.segments.insert(
                first,
                Segment {
                    path,
                    last_seq: last,
                    bytes: valid_bytes,
                    recyclable,
                },
            );
        }
        Ok(journal)
    }

    /// Closes segments at `bytes` instead of [`SEGMENT_BYTES`] (tests).
    #[cfg(test)]
    fn with_segment_bytes(mut self, bytes: u64) -> Journal {
        self.segment_bytes = bytes;
        self
    }

    fn segment_path(&self, first: u64) -> PathBuf {
        self.dir.join(format!("{first:020}.log"))
    }

    /// Sequence number of the last synced entry.
    pub fn durable_seq(&self) -> u64 {
        self.last_seq
    }

    /// Writes entries already encoded with [`Entry::encode`] (in sequence
    /// order, the last one numbered `last`), in as many buffers as they
    /// came in, and syncs them once; returns the last durable seq.
    pub fn write_encoded(&mut self, parts: &[&[u8]], last: u64) -> Result<u64, ReplicaError> {
        let Some(first_part) = parts.iter().find(|p| !p.is_empty()) else {
            return Ok(self.last_seq);
        };
        let needs_new = match self.segments.values().next_back() {
            Some(seg) => self.current.is_none() || seg.bytes >= self.segment_bytes,
            None => true,
        };
        if needs_new {
            self.close_current()?;
            let first = first_seq_of(first_part).unwrap_or(last);
            self.start_segment(first)?;
        }
        let (Some((_, seg)), Some(cur)) = (self.segments.iter_mut().next_back(), &mut self.current)
        else {
            return Ok(self.last_seq);
        };
        let mut end = seg.bytes;
        let mut written = Ok(());
        for part in parts {
            written = cur.file.write_all_at(part, end);
            if written.is_err() {
                break;
            }
            end += part.len() as u64;
        }
        let written = written.and_then(|()| cur.file.sync_data());
        if let Err(source) = written {
            // Part of it may be on disk, with seqs above the segment's.
            seg.recyclable = false;
            let total: u64 = parts.iter().map(|p| p.len() as u64).sum();
            cur.len = cur.len.max(seg.bytes + total);
            return Err(ReplicaError::Io {
                path: seg.path.clone(),
                op: "write journal",
                source,
            });
        }
        cur.len = cur.len.max(end);
        seg.bytes = end;
        seg.last_seq = last;
        self.last_seq = last;
        Ok(self.last_seq)
    }

    /// Ends the segment being written: a trailer, synced, where its file
    /// goes on past the valid run.
    fn close_current(&mut self) -> Result<(), ReplicaError> {
        let Some(cur) = self.current.take() else {
            return Ok(());
        };
        let Some((&first, seg)) = self.segments.iter().next_back() else {
            return Ok(());
        };
        if seg.bytes == 0 {
            // Its first write failed: nothing valid, maybe some of it.
            let path = seg.path.clone();
            self.segments.remove(&first);
            drop(cur);
            return remove_file(&path, "remove journal segment");
        }
        if cur.len > seg.bytes || !seg.recyclable {
            let flags = if seg.recyclable { 0 } else { TAIL_UNKNOWN };
            let sealed = cur
                .file
                .write_all_at(&trailer(first, seg.last_seq, flags), seg.bytes)
                .and_then(|()| cur.file.sync_data())
                .map_err(io_err("write journal trailer", &seg.path));
            if sealed.is_err() {
                // No next segment before this one is closed: the next
                // write tries again.
                self.current = Some(cur);
            }
            sealed?;
        }
        Ok(())
    }

    /// Starts segment `first`, in a spare file if one can hold it.
    fn start_segment(&mut self, first: u64) -> Result<(), ReplicaError> {
        let path = self.segment_path(first);
        let mut file = None;
        while let Some((&max, _)) = self.spares.range(..first).next_back() {
            let Some(spare) = self.spares.remove(&max) else {
                break;
            };
            let taken = std::fs::rename(&spare, &path).and_then(|()| {
                let f = OpenOptions::new().write(true).open(&path)?;
                let len = f.metadata()?.len();
                Ok(Current { file: f, len })
            });
            match taken {
                Ok(cur) => {
                    file = Some(cur);
                    break;
                }
                Err(e) => {
                    tracing::warn!(spare = %spare.display(), error = %e, "journal spare not usable");
                }
            }
        }
        let cur = match file {
            Some(cur) => cur,
            None => {
                let f = OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io_err("create journal segment", &path))?;
                Current { file: f, len: 0 }
            }
        };
        sync_dir(&self.dir)?;
        self.current = Some(cur);
        self.segments.insert(
            first,
            Segment {
                path,
                last_seq: 0,
                bytes: 0,
                recyclable: true,
            },
        );
        Ok(())
    }

    /// Calls `apply` for every durable entry with `seq > after`, in order.
    pub fn replay(
        &self,
        after: u64,
        mut apply: impl FnMut(Entry) -> Result<(), ReplicaError>,
    ) -> Result<u64, ReplicaError> {
        let mut count = 0;
        for seg in self.segments.values().filter(|s| s.last_seq > after) {
            let file = File::open(&seg.path).map_err(io_err("open journal segment", &seg.path))?;
            let mut r = BufReader::new(file.take(seg.bytes));
            loop {
                let item = read_item(&mut r).map_err(io_err("read journal", &seg.path))?;
                let Item::Entry(entry) = item else { break };
                if entry.seq > after {
                    apply(entry)?;
                    count += 1;
                }
            }
        }
        Ok(count)
    }

    /// Recycles segments whose entries are all applied (never the one
    /// being written).
    pub fn release(&mut self, applied: u64) -> Result<(), ReplicaError> {
        remove_segments(self.detach_applied(applied))
    }

    /// Takes segments whose entries are all applied (never the one being
    /// written) out of the journal: each becomes a spare (a rename), and
    /// files beyond the spares kept are renamed to `drop-` names and
    /// returned, for the caller to delete with [`remove_segments`] (maybe
    /// without holding the journal: nothing else uses those names).
    pub fn detach_applied(&mut self, applied: u64) -> Vec<PathBuf> {
        let newest = self.segments.keys().next_back().copied();
        let done: Vec<u64> = self
            .segments
            .iter()
            .filter(|(first, seg)| Some(**first) != newest && seg.last_seq <= applied)
            .map(|(first, _)| *first)
            .collect();
        let mut doomed = Vec::new();
        for first in done {
            if let Some(seg) = self.segments.remove(&first) {
                self.recycle(first, seg, &mut doomed);
            }
        }
        doomed
    }

    /// Makes `seg` a spare, or a file to delete (into `doomed`).
    fn recycle(&mut self, first: u64, seg: Segment, doomed: &mut Vec<PathBuf>) {
        let dropped = self.dir.join(format!("drop-{first:020}.seg"));
        let target = if seg.recyclable && seg.bytes > 0 {
            let spare = self.dir.join(format!("spare-{:020}.seg", seg.last_seq));
            match std::fs::rename(&seg.path, &spare) {
                Ok(()) => {
                    self.spares.insert(seg.last_seq, spare);
                    None
                }
                Err(e) => {
                    tracing::warn!(segment = %seg.path.display(), error = %e, "journal segment not recycled");
                    Some(seg.path)
                }
            }
        } else {
            Some(seg.path)
        };
        if let Some(path) = target {
            doomed.push(rename_or_keep(path, dropped));
        }
        while self.spares.len() > MAX_SPARES {
            let Some((max, spare)) = self.spares.pop_last() else {
                break;
            };
            let dropped = self.dir.join(format!("drop-spare-{max:020}.seg"));
            doomed.push(rename_or_keep(spare, dropped));
        }
    }

    /// Drops every entry. The caller has applied and synced them all: a
    /// resync is about to redefine the position, possibly below entries of
    /// another history, which must never be replayed. The segments become
    /// spares.
    pub fn clear(&mut self) -> Result<(), ReplicaError> {
        self.current = None;
        let mut doomed = Vec::new();
        for (first, seg) in std::mem::take(&mut self.segments) {
            self.recycle(first, seg, &mut doomed);
        }
        sync_dir(&self.dir)?;
        self.last_seq = 0;
        remove_segments(doomed)
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.values().map(|s| s.bytes).sum()
    }
}

impl Drop for Journal {
    /// A clean close ends the segment being written with a trailer, so
    /// that it stays recyclable after a restart.
    fn drop(&mut self) {
        // Only while the file is still this journal's segment: a journal
        // opened on the directory since may have recycled it.
        let ours = match (&self.current, self.segments.values().next_back()) {
            (Some(cur), Some(seg)) => match (cur.file.metadata(), std::fs::metadata(&seg.path)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            },
            _ => false,
        };
        if !ours {
            return;
        }
        if let Err(e) = self.close_current() {
            tracing::warn!(error = %e, "journal segment not closed");
        }
    }
}

/// `from` renamed to `to`, or `from` itself if that fails.
fn rename_or_keep(from: PathBuf, to: PathBuf) -> PathBuf {
    match std::fs::rename(&from, &to) {
        Ok(()) => to,
        Err(_) => from,
    }
}

fn sync_dir(dir: &Path) -> Result<(), ReplicaError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync journal directory", dir))
}

fn remove_file(path: &Path, op: &'static str) -> Result<(), ReplicaError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ReplicaError::Io {
            path: path.to_owned(),
            op,
            source,
        }),
    }
}

/// Writes a trailer at `at` and syncs it.
fn seal(path: &Path, at: u64, first: u64, last: u64, flags: u32) -> Result<(), ReplicaError> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| {
            f.write_all_at(&trailer(first, last, flags), at)?;
            f.sync_data()
        })
        .map_err(io_err("seal journal segment", path))
}

/// Deletes journal files handed out by [`Journal::detach_applied`].
pub fn remove_segments(paths: Vec<PathBuf>) -> Result<(), ReplicaError> {
    for path in paths {
        remove_file(&path, "remove applied journal segment")?;
    }
    Ok(())
}

fn first_seq_of(encoded: &[u8]) -> Option<u64> {
    let b = encoded.get(16..24)?;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

/// One item of a segment.
enum Item {
    Entry(Entry),
    /// A valid trailer: (first, last, flags).
    Trailer(u64, u64, u32),
    /// Clean end of file.
    Eof,
    /// A torn or invalid item.
    Invalid,
}

fn read_item<R: Read>(r: &mut R) -> io::Result<Item> {
    let mut magic = [0u8; 4];
    match fill(r, &mut magic)? {
        0 => return Ok(Item::Eof),
        4 => {}
        _ => return Ok(Item::Invalid),
    }
    if &magic == TRAILER_MAGIC {
        let mut t = [0u8; TRAILER_LEN];
        t[0..4].copy_from_slice(&magic);
        if fill(r, &mut t[4..])? != TRAILER_LEN - 4 {
            return Ok(Item::Invalid);
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&t[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let u32_at = |at: usize| u32::from_le_bytes([t[at], t[at + 1], t[at + 2], t[at + 3]]);
        if u32_at(4) as usize != TRAILER_LEN || crc32c::crc32c(&t[0..28]) != u32_at(28) {
            return Ok(Item::Invalid);
        }
        return Ok(Item::Trailer(u64_at(8), u64_at(16), u32_at(24)));
    }
    Ok(match Entry::read_after(magic, r)? {
        Some(e) => Item::Entry(e),
        None => Item::Invalid,
    })
}

/// Reads into `buf` until full or end of file; the bytes read.
fn fill<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// (valid bytes, last seq, how the valid run ends) of segment `first`.
fn scan(path: &Path, first: u64) -> Result<(u64, u64, End), ReplicaError> {
    let file = File::open(path).map_err(io_err("scan journal segment", path))?;
    scan_from(&mut BufReader::new(file), first, |_| {})
        .map_err(io_err("scan journal segment", path))
}

/// [`scan`] over any reader; `each` sees every entry of the valid run.
fn scan_from<R: Read>(
    r: &mut R,
    first: u64,
    mut each: impl FnMut(&Entry),
) -> io::Result<(u64, u64, End)> {
    let (mut valid, mut last) = (0u64, None::<u64>);
    let end = loop {
        match read_item(r)? {
            Item::Entry(e) if e.seq >= first && last.is_none_or(|l| e.seq > l) => {
                valid += (HEADER_LEN + e.data.len()) as u64;
                last = Some(e.seq);
                each(&e);
            }
            Item::Eof => break End::Eof,
            Item::Trailer(f, l, flags) if f == first && Some(l) == last => {
                break End::Trailer {
                    tail_unknown: flags & TAIL_UNKNOWN != 0,
                }
            }
            // Stale (an old seq), a stale trailer, torn or corrupt.
            _ => break End::Other,
        }
    };
    Ok((valid, last.unwrap_or(0), end))
}

/// One fuzzing input (`fuzz/fuzz_targets/journal_segment.rs`): the first 8
/// bytes name the segment's first seq, the rest is its file. The scan's
/// valid run is a prefix of the file made of entries that encode back to
/// exactly its bytes, with seqs at least `first` and strictly increasing;
/// a trailer ends it only where it names the segment and its last entry.
///
/// # Panics
/// When that does not hold (the fuzzer's finding).
pub fn fuzz_one(data: &[u8]) {
    // A short input is a first seq (zero-padded) with an empty file.
    let split = data.len().min(8);
    let mut head = [0u8; 8];
    head[..split].copy_from_slice(&data[..split]);
    let (first, file) = (u64::from_le_bytes(head), &data[split..]);
    let mut again = Vec::new();
    let mut seqs = Vec::new();
    let (valid, last, end) = match scan_from(&mut &file[..], first, |e| {
        e.encode(&mut again);
        seqs.push(e.seq);
    }) {
        Ok(scanned) => scanned,
        Err(e) => panic!("reading a slice cannot fail: {e}"),
    };
    let valid = usize::try_from(valid).unwrap_or(usize::MAX);
    assert!(valid <= file.len(), "the valid run is inside the file");
    assert_eq!(
        &again[..],
        &file[..valid],
        "valid entries encode to their bytes"
    );
    assert!(
        seqs.first().is_none_or(|s| *s >= first),
        "seqs start at the segment's first"
    );
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seqs strictly increase"
    );
    assert_eq!(last, seqs.last().copied().unwrap_or(0));
    match end {
        End::Eof => assert_eq!(valid, file.len(), "end of file ends the run"),
        End::Trailer { .. } => {
            let t = &file[valid..valid + TRAILER_LEN];
            assert_eq!(&t[0..4], TRAILER_MAGIC);
            assert_eq!(&t[8..16], &first.to_le_bytes());
            assert_eq!(&t[16..24], &last.to_le_bytes());
        }
        End::Other => assert!(valid < file.len(), "something follows the run"),
    }
}

#[cfg(test)]
// Test data: small numbers.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    fn entry(seq: u64, n: usize) -> Entry {
        Entry {
            epoch: 1,
            seq,
            volume: 0,
            op: RecordOp::Write,
            fua: false,
            offset: seq * 4096,
            len: n as u64,
            data: vec![seq as u8; n],
        }
    }

    proptest! {
        /// The fuzz target's checks over segments built from valid
        /// entries, trailers and junk, and over raw bytes.
        #[test]
        fn the_scanner_holds_its_invariants(
            first in 0u64..8,
            items in proptest::collection::vec((0u8..4, 0u64..12, 0usize..64), 0..12),
            cut in any::<proptest::sample::Index>(),
            raw in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut file = Vec::new();
            let mut last = 0;
            for (kind, seq, n) in items {
                match kind {
                    0 | 1 => {
                        entry(seq, n).encode(&mut file);
                        last = seq;
                    }
                    2 => file.extend_from_slice(&trailer(first, last, u32::from(n % 2 == 0))),
                    _ => file.extend(std::iter::repeat_n(seq as u8, n)),
                }
            }
            let cut = cut.index(file.len() + 1);
            let mut input = first.to_le_bytes().to_vec();
            input.extend_from_slice(&file[..cut]);
            fuzz_one(&input);
            let mut input = first.to_le_bytes().to_vec();
            input.extend_from_slice(&raw);
            fuzz_one(&input);
        }
    }

    /// Writes and syncs `entries`, each in its own buffer (as batches
    /// queued behind one another are written); returns the last durable
    /// seq.
    fn write(j: &mut Journal, entries: &[Entry]) -> u64 {
        let encoded: Vec<Vec<u8>> = entries
            .iter()
            .map(|e| {
                let mut b = Vec::new();
                e.encode(&mut b);
                b
            })
            .collect();
        let parts: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
        let last = entries.last().map_or(0, |e| e.seq);
        j.write_encoded(&parts, last).unwrap()
    }

    #[test]
    fn entries_replay_in_order_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let entries: Vec<Entry> = (1..=5).map(|seq| entry(seq, 100)).collect();
        assert_eq!(write(&mut j, &entries), 5);
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.durable_seq(), 5);
        let mut seen = Vec::new();
        j.replay(2, |e| {
            seen.push(e.seq);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![3, 4, 5]);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_appending_continues() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        write(&mut j, &[entry(1, 10), entry(2, 10)]);
        drop(j);
        // A torn third entry: its header and part of its data.
        let seg = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut torn = Vec::new();
        entry(3, 5000).encode(&mut torn);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&torn[..3000]).unwrap();
        drop(f);
        let mut j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.durable_seq(), 2);
        write(&mut j, &[entry(3, 10)]);
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        let mut seen = Vec::new();
        j.replay(0, |e| {
            seen.push((e.seq, e.data.len()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(1, 10), (2, 10), (3, 10)]);
    }

    #[test]
    fn a_flipped_bit_ends_the_journal_at_that_entry() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let entries: Vec<Entry> = (1..=3).map(|seq| entry(seq, 64)).collect();
        write(&mut j, &entries);
        drop(j);
        let seg = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut bytes = std::fs::read(&seg).unwrap();
        let second = HEADER_LEN + 64;
        bytes[second + HEADER_LEN + 7] ^= 1;
        std::fs::write(&seg, &bytes).unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.durable_seq(), 1);
    }

    #[test]
    fn applied_segments_are_released() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        // Two segments: force a roll by writing more than SEGMENT_BYTES.
        write(&mut j, &[entry(1, (SEGMENT_BYTES as usize) + 1)]);
        write(&mut j, &[entry(2, 10)]);
        assert_eq!(names(dir.path()), vec![log(1), log(2)]);
        j.release(1).unwrap();
        assert_eq!(names(dir.path()), vec![log(2), spare(1)]);
        let mut seen = Vec::new();
        j.replay(0, |e| {
            seen.push(e.seq);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![2]);
    }

    fn log(first: u64) -> String {
        format!("{first:020}.log")
    }

    fn spare(max: u64) -> String {
        format!("spare-{max:020}.seg")
    }

    /// The journal directory's file names, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn seqs(j: &Journal, after: u64) -> Vec<u64> {
        let mut seen = Vec::new();
        j.replay(after, |e| {
            assert_eq!(
                e,
                entry(e.seq, e.data.len()),
                "entry {} replayed as written",
                e.seq
            );
            seen.push(e.seq);
            Ok(())
        })
        .unwrap();
        seen
    }

    /// 152 bytes an entry.
    const SMALL: usize = 100;
    const SMALL_BYTES: u64 = (HEADER_LEN + SMALL) as u64;

    /// Segment 1 (entries 1..=20, 20 entries long) released into a spare,
    /// segment 21 (21..=30) closed, and segment 31 started in the spare
    /// with entries 31..=`upto`; segments hold 10 entries from 21 on.
    fn recycled(dir: &Path, upto: u64) -> Journal {
        let mut j = Journal::open(dir)
            .unwrap()
            .with_segment_bytes(20 * SMALL_BYTES);
        for seq in 1..=20 {
            write(&mut j, &[entry(seq, SMALL)]);
        }
        j.segment_bytes = 10 * SMALL_BYTES;
        for seq in 21..=30 {
            write(&mut j, &[entry(seq, SMALL)]);
        }
        let ino = std::fs::metadata(dir.join(log(1))).unwrap().ino();
        j.release(20).unwrap();
        assert_eq!(names(dir), vec![log(21), spare(20)]);
        for seq in 31..=upto {
            write(&mut j, &[entry(seq, SMALL)]);
        }
        if upto > 30 {
            assert_eq!(names(dir), vec![log(21), log(31)]);
            let meta = std::fs::metadata(dir.join(log(31))).unwrap();
            assert_eq!(meta.ino(), ino, "the spare's inode is reused");
            assert_eq!(meta.len(), 20 * SMALL_BYTES, "written in place");
        }
        j
    }

    /// Ends `j` as a crash would: no trailer for the segment being written.
    fn crash(j: Journal) {
        std::mem::forget(j);
    }

    #[test]
    fn a_recycled_segment_stays_recyclable_after_a_clean_close_only() {
        for clean in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let j = recycled(dir.path(), 33);
            if clean {
                drop(j);
            } else {
                crash(j);
            }
            let mut j = Journal::open(dir.path()).unwrap();
            assert_eq!(seqs(&j, 0), (21..=33).collect::<Vec<_>>());
            write(&mut j, &[entry(34, SMALL)]);
            j.release(33).unwrap();
            let mut want = vec![log(34), spare(30)];
            if clean {
                want.push(spare(33));
            }
            assert_eq!(names(dir.path()), want, "clean: {clean}");
        }
    }

    #[test]
    fn a_journal_dropped_late_leaves_a_recycled_file_alone() {
        let dir = tempfile::tempdir().unwrap();
        let old = recycled(dir.path(), 30);
        let ino = std::fs::metadata(dir.path().join(log(21))).unwrap().ino();
        // A second journal on the directory while the first is alive: it
        // releases the first's segment 21 (being written), and reuses its
        // file for segment 41.
        let mut j = Journal::open(dir.path())
            .unwrap()
            .with_segment_bytes(10 * SMALL_BYTES);
        for seq in 31..=44 {
            write(&mut j, &[entry(seq, SMALL)]);
            j.release(seq - 1).unwrap();
        }
        let path = dir.path().join(log(41));
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino);
        let before = std::fs::read(&path).unwrap();
        drop(old);
        assert_eq!(std::fs::read(&path).unwrap(), before);
        crash(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(seqs(&j, 40), vec![41, 42, 43, 44]);
    }

    #[test]
    fn a_spare_is_written_in_place_without_growing() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = recycled(dir.path(), 31);
        let path = dir.path().join(log(31));
        for seq in 32..=35 {
            write(&mut j, &[entry(seq, SMALL)]);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 20 * SMALL_BYTES);
        }
        assert_eq!(seqs(&j, 0), (21..=35).collect::<Vec<_>>());
    }

    #[test]
    fn after_reuse_reopen_replays_only_new_entries() {
        let dir = tempfile::tempdir().unwrap();
        // The new run ends at an old entry's boundary: old entry 4 (CRC
        // valid) follows entry 33.
        let j = recycled(dir.path(), 33);
        crash(j);
        let mut j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.durable_seq(), 33);
        assert_eq!(seqs(&j, 0), (21..=33).collect::<Vec<_>>());
        assert_eq!(seqs(&j, 30), vec![31, 32, 33]);
        // Writing on starts a new segment; the sealed one stays whole.
        write(&mut j, &[entry(34, SMALL)]);
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.durable_seq(), 34);
        assert_eq!(seqs(&j, 0), (21..=34).collect::<Vec<_>>());
    }

    #[test]
    fn a_torn_write_into_a_recycled_segment_replays_the_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let j = recycled(dir.path(), 32);
        crash(j);
        let mut torn = Vec::new();
        entry(33, SMALL).encode(&mut torn);
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join(log(31)))
            .unwrap();
        f.write_all_at(&torn[..70], 2 * SMALL_BYTES).unwrap();
        drop(f);
        let mut j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.durable_seq(), 32);
        assert_eq!(seqs(&j, 0), (21..=32).collect::<Vec<_>>());
        write(&mut j, &[entry(33, SMALL)]);
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(seqs(&j, 0), (21..=33).collect::<Vec<_>>());
    }

    #[test]
    fn a_spare_taken_but_never_written_holds_no_entry() {
        let dir = tempfile::tempdir().unwrap();
        let j = recycled(dir.path(), 30);
        drop(j);
        // A crash right after the spare became segment 31: its old entries
        // (1..=20, CRC valid) start at offset 0.
        std::fs::rename(dir.path().join(spare(20)), dir.path().join(log(31))).unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.durable_seq(), 30);
        assert_eq!(seqs(&j, 0), (21..=30).collect::<Vec<_>>());
        assert_eq!(names(dir.path()), vec![log(21)]);
    }

    #[test]
    fn a_closed_recycled_segment_ends_at_its_trailer() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = recycled(dir.path(), 40);
        write(&mut j, &[entry(41, SMALL)]);
        drop(j);
        // Segment 31 holds 31..=40 and a trailer, then old entries.
        let bytes = std::fs::read(dir.path().join(log(31))).unwrap();
        let at = (10 * SMALL_BYTES) as usize;
        assert_eq!(&bytes[at..at + 4], TRAILER_MAGIC);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.durable_seq(), 41);
        assert_eq!(seqs(&j, 0), (21..=41).collect::<Vec<_>>());
    }

    #[test]
    fn a_flipped_bit_in_a_closed_segment_ends_the_journal_there() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = recycled(dir.path(), 40);
        write(&mut j, &[entry(41, SMALL)]);
        write(&mut j, &[entry(42, SMALL)]);
        drop(j);
        let path = dir.path().join(log(31));
        let mut bytes = std::fs::read(&path).unwrap();
        // Entry 33's data.
        bytes[(2 * SMALL_BYTES) as usize + HEADER_LEN + 7] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.durable_seq(), 32);
        assert_eq!(seqs(&j, 0), (21..=32).collect::<Vec<_>>());
        assert!(!dir.path().join(log(41)).exists());
    }

    #[test]
    fn a_missing_trailer_in_a_closed_segment_ends_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = recycled(dir.path(), 40);
        write(&mut j, &[entry(41, SMALL)]);
        drop(j);
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join(log(31)))
            .unwrap();
        f.write_all_at(&[0u8; TRAILER_LEN], 10 * SMALL_BYTES)
            .unwrap();
        drop(f);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.durable_seq(), 40);
        assert!(!dir.path().join(log(41)).exists());
    }

    #[test]
    fn the_file_count_stays_bounded_and_inodes_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path())
            .unwrap()
            .with_segment_bytes(4 * SMALL_BYTES);
        let mut inodes = std::collections::BTreeSet::new();
        for seq in 1..=400u64 {
            write(&mut j, &[entry(seq, SMALL)]);
            // Applied up to a few entries behind.
            j.release(seq.saturating_sub(6)).unwrap();
            let files = names(dir.path());
            assert!(files.len() <= 5, "{files:?}");
            for f in files {
                if let Ok(m) = std::fs::metadata(dir.path().join(f)) {
                    inodes.insert(m.ino());
                }
            }
        }
        assert!(inodes.len() <= 6, "{} distinct files", inodes.len());
        assert_eq!(seqs(&j, 394), (395..=400).collect::<Vec<_>>());
    }

    #[test]
    fn after_clear_a_lower_position_never_sees_old_entries() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = recycled(dir.path(), 35);
        j.clear().unwrap();
        assert_eq!(j.durable_seq(), 0);
        // The resync resumes below the old entries: spare-35 and spare-30
        // (higher seqs than the new ones) are not taken.
        write(&mut j, &[entry(5, SMALL)]);
        write(&mut j, &[entry(6, SMALL)]);
        crash(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(seqs(&j, 0), vec![5, 6]);
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// A batch of entries of these data sizes.
        Write(Vec<usize>),
        /// Release up to this share (in 1/8) of the written entries.
        Release(u8),
        Reopen,
        /// Reopen without closing the journal.
        Crash,
        /// Reopen after a torn write of that many bytes of the next entry.
        Torn(usize),
        /// Clear, and go on this many seqs lower.
        Clear(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            // Mostly one size, so that old entries line up with new ones.
            6 => prop::collection::vec(prop_oneof![3 => Just(SMALL), 1 => 0usize..400], 1..4)
                .prop_map(Op::Write),
            2 => (0u8..=8).prop_map(Op::Release),
            1 => Just(Op::Reopen),
            1 => Just(Op::Crash),
            1 => (1usize..200).prop_map(Op::Torn),
            1 => (0u64..30).prop_map(Op::Clear),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn replay_matches_a_model(ops in prop::collection::vec(op(), 1..80)) {
            let dir = tempfile::tempdir().unwrap();
            let open = |d: &Path| Journal::open(d).unwrap().with_segment_bytes(1500);
            let mut j = open(dir.path());
            // Entries since the last clear, and how far they are applied.
            let mut model: Vec<Entry> = Vec::new();
            let mut applied = 0u64;
            let mut next = 1u64;
            for op in ops {
                match op {
                    Op::Write(sizes) => {
                        let batch: Vec<Entry> = sizes
                            .iter()
                            .enumerate()
                            .map(|(i, n)| entry(next + i as u64, *n))
                            .collect();
                        next += batch.len() as u64;
                        write(&mut j, &batch);
                        model.extend(batch);
                    }
                    Op::Release(share) => {
                        let n = model.len() * usize::from(share) / 8;
                        if let Some(e) = n.checked_sub(1).and_then(|i| model.get(i)) {
                            applied = applied.max(e.seq);
                        }
                        j.release(applied).unwrap();
                    }
                    Op::Reopen => {
                        drop(j);
                        j = open(dir.path());
                    }
                    Op::Crash => {
                        crash(j);
                        j = open(dir.path());
                    }
                    Op::Torn(n) => {
                        let at = j.segments.values().next_back().map(|s| (s.path.clone(), s.bytes));
                        crash(j);
                        if let Some((path, at)) = at {
                            let mut torn = Vec::new();
                            entry(next, 300).encode(&mut torn);
                            let f = OpenOptions::new().write(true).open(&path).unwrap();
                            f.write_all_at(&torn[..n], at).unwrap();
                        }
                        j = open(dir.path());
                    }
                    Op::Clear(down) => {
                        j.clear().unwrap();
                        model.clear();
                        next = next.saturating_sub(down).max(1);
                        applied = next - 1;
                    }
                }
                let want: Vec<u64> = model.iter().map(|e| e.seq).filter(|s| *s > applied).collect();
                prop_assert_eq!(seqs(&j, applied), want);
                prop_assert_eq!(j.durable_seq(), model.last().map_or(0, |e| e.seq));
                let files = names(dir.path());
                prop_assert!(files.iter().filter(|f| f.starts_with("spare-")).count() <= MAX_SPARES);
                prop_assert!(!files.iter().any(|f| f.starts_with("drop-")));
            }
        }
    }
}
