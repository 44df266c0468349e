//! The replica's journal (docs/REPLICA.md): records are appended and synced
//! here before they are applied to any image, so that after a crash the
//! images can be brought to a consistent prefix again.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
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

impl Entry {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(MAGIC);
        // A record's data is at most one peer payload (32 MiB, checked by
        // the codec), so the entry's length fits the u32 field.
        #[allow(clippy::cast_possible_truncation)]
        let total = (HEADER_LEN + self.data.len()) as u32;
        out.extend_from_slice(&total.to_le_bytes());
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.volume.to_le_bytes());
        out.push(self.op as u8);
        out.push(u8::from(self.fua));
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&out[start..start + 48]), &self.data);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&self.data);
    }

    /// Reads one entry; `Ok(None)` at a clean end or a torn/invalid entry
    /// (the journal ends there).
    fn read<R: Read>(r: &mut R) -> io::Result<Option<Entry>> {
        let mut h = [0u8; HEADER_LEN];
        if !read_full(r, &mut h)? {
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
        if !read_full(r, &mut data)? {
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

/// Fills `buf`; false on end of file (even part way: a torn entry).
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => return Ok(false),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    last_seq: u64,
    bytes: u64,
}

/// An append-only journal in numbered segment files.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    /// First seq of each segment -> segment.
    segments: BTreeMap<u64, Segment>,
    current: Option<File>,
    last_seq: u64,
}

impl Journal {
    /// Opens the journal in `dir`, scanning every segment. The first torn or
    /// invalid entry ends the journal: the segment is truncated there and
    /// later segments are removed.
    pub fn open(dir: &Path) -> Result<Journal, ReplicaError> {
        let io_err = |op, path: &Path| {
            let path = path.to_owned();
            move |source| ReplicaError::Io { path, op, source }
        };
        std::fs::create_dir_all(dir).map_err(io_err("create journal directory", dir))?;
        let mut firsts = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err("list journal", dir))? {
            let entry = entry.map_err(io_err("list journal", dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(first) = name
                .strip_suffix(".log")
                .and_then(|n| n.parse::<u64>().ok())
            {
                firsts.push(first);
            }
        }
        firsts.sort_unstable();
        let mut journal = Journal {
            dir: dir.to_owned(),
            segments: BTreeMap::new(),
            current: None,
            last_seq: 0,
        };
        let mut ended = false;
        for first in firsts {
            let path = journal.segment_path(first);
            if ended {
                tracing::warn!(segment = %path.display(), "removing journal segment after a torn entry");
                std::fs::remove_file(&path).map_err(io_err("remove journal segment", &path))?;
                continue;
            }
            let (valid_bytes, last, complete) = scan(&path)?;
            if !complete {
                ended = true;
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err("open journal segment", &path))?;
                f.set_len(valid_bytes)
                    .map_err(io_err("truncate torn journal entry", &path))?;
                f.sync_all().map_err(io_err("sync journal", &path))?;
                tracing::warn!(segment = %path.display(), at = valid_bytes, "journal ends with a torn entry: truncated");
            }
            if valid_bytes == 0 {
                std::fs::remove_file(&path)
                    .map_err(io_err("remove empty journal segment", &path))?;
                continue;
            }
            journal.last_seq = journal.last_seq.max(last);
            journal.segments.insert(
                first,
                Segment {
                    path,
                    last_seq: last,
                    bytes: valid_bytes,
                },
            );
        }
        Ok(journal)
    }

    fn segment_path(&self, first: u64) -> PathBuf {
        self.dir.join(format!("{first:020}.log"))
    }

    /// Sequence number of the last synced entry.
    pub fn durable_seq(&self) -> u64 {
        self.last_seq
    }

    /// Writes entries already encoded with [`Entry::encode`] (in sequence
    /// order, the last one numbered `last`) and syncs them; returns the
    /// last durable seq.
    pub fn write_encoded(&mut self, encoded: &[u8], last: u64) -> Result<u64, ReplicaError> {
        if encoded.is_empty() {
            return Ok(self.last_seq);
        }
        let needs_new = match self.segments.values().next_back() {
            Some(seg) => self.current.is_none() || seg.bytes >= SEGMENT_BYTES,
            None => true,
        };
        if needs_new {
            let first = first_seq_of(encoded).unwrap_or(last);
            let path = self.segment_path(first);
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)
                .map_err(|source| ReplicaError::Io {
                    path: path.clone(),
                    op: "create journal segment",
                    source,
                })?;
            if let Ok(d) = File::open(&self.dir) {
                let _ = d.sync_all();
            }
            self.current = Some(file);
            self.segments.insert(
                first,
                Segment {
                    path,
                    last_seq: 0,
                    bytes: 0,
                },
            );
        }
        let Some((_, seg)) = self.segments.iter_mut().next_back() else {
            return Ok(self.last_seq);
        };
        let file = self.current.as_mut().ok_or_else(|| ReplicaError::Corrupt {
            path: seg.path.clone(),
            reason: "journal segment not open".into(),
        })?;
        file.write_all(encoded)
            .and_then(|()| file.sync_data())
            .map_err(|source| ReplicaError::Io {
                path: seg.path.clone(),
                op: "write journal",
                source,
            })?;
        seg.bytes += encoded.len() as u64;
        seg.last_seq = last;
        self.last_seq = last;
        Ok(self.last_seq)
    }

    /// Calls `apply` for every durable entry with `seq > after`, in order.
    pub fn replay(
        &self,
        after: u64,
        mut apply: impl FnMut(Entry) -> Result<(), ReplicaError>,
    ) -> Result<u64, ReplicaError> {
        let mut count = 0;
        for seg in self.segments.values().filter(|s| s.last_seq > after) {
            let file = File::open(&seg.path).map_err(|source| ReplicaError::Io {
                path: seg.path.clone(),
                op: "open journal segment",
                source,
            })?;
            let mut r = BufReader::new(file.take(seg.bytes));
            while let Some(entry) = Entry::read(&mut r).map_err(|source| ReplicaError::Io {
                path: seg.path.clone(),
                op: "read journal",
                source,
            })? {
                if entry.seq > after {
                    apply(entry)?;
                    count += 1;
                }
            }
        }
        Ok(count)
    }

    /// Removes segments whose entries are all applied (never the one being
    /// written).
    pub fn release(&mut self, applied: u64) -> Result<(), ReplicaError> {
        remove_segments(self.detach_applied(applied))
    }

    /// Takes segments whose entries are all applied (never the one being
    /// written) out of the journal and returns their files, for the caller
    /// to remove with [`remove_segments`] (maybe without holding the
    /// journal). Until then they are harmless: a replay skips applied
    /// entries.
    pub fn detach_applied(&mut self, applied: u64) -> Vec<PathBuf> {
        let newest = self.segments.keys().next_back().copied();
        let done: Vec<u64> = self
            .segments
            .iter()
            .filter(|(first, seg)| Some(**first) != newest && seg.last_seq <= applied)
            .map(|(first, _)| *first)
            .collect();
        done.into_iter()
            .filter_map(|first| self.segments.remove(&first))
            .map(|seg| seg.path)
            .collect()
    }

    /// Drops every entry. The caller has applied and synced them all: a
    /// resync is about to redefine the position, possibly below entries of
    /// another history, which must never be replayed.
    pub fn clear(&mut self) -> Result<(), ReplicaError> {
        self.current = None;
        for (_, seg) in std::mem::take(&mut self.segments) {
            match std::fs::remove_file(&seg.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(ReplicaError::Io {
                        path: seg.path,
                        op: "remove journal segment",
                        source,
                    })
                }
            }
        }
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.last_seq = 0;
        Ok(())
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.values().map(|s| s.bytes).sum()
    }
}

/// Removes journal segment files taken out with [`Journal::detach_applied`].
pub fn remove_segments(paths: Vec<PathBuf>) -> Result<(), ReplicaError> {
    for path in paths {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ReplicaError::Io {
                    path,
                    op: "remove applied journal segment",
                    source,
                })
            }
        }
    }
    Ok(())
}

fn first_seq_of(encoded: &[u8]) -> Option<u64> {
    let b = encoded.get(16..24)?;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

/// (valid bytes, last seq, whether the whole file was valid).
fn scan(path: &Path) -> Result<(u64, u64, bool), ReplicaError> {
    let io_err = |source| ReplicaError::Io {
        path: path.to_owned(),
        op: "scan journal segment",
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let size = file.metadata().map_err(io_err)?.len();
    let mut r = BufReader::new(file);
    let (mut valid, mut last) = (0u64, 0u64);
    while let Some(entry) = Entry::read(&mut r).map_err(io_err)? {
        if entry.seq <= last && last != 0 {
            break; // sequence went backwards: treat as the end
        }
        valid += (HEADER_LEN + entry.data.len()) as u64;
        last = entry.seq;
    }
    Ok((valid, last, valid == size))
}

#[cfg(test)]
// Test data: small numbers.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

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

    /// Writes and syncs `entries`; returns the last durable seq.
    fn write(j: &mut Journal, entries: &[Entry]) -> u64 {
        let mut encoded = Vec::new();
        for e in entries {
            e.encode(&mut encoded);
        }
        let last = entries.last().map_or(0, |e| e.seq);
        j.write_encoded(&encoded, last).unwrap()
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
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        j.release(1).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let mut seen = Vec::new();
        j.replay(0, |e| {
            seen.push(e.seq);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![2]);
    }
}
