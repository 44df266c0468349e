//! The undo log's bytes on disk: one sequence of positions stored in
//! segment files named by the position of their first byte
//! (docs/HISTORY.md, "Files").

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::ReplicaError;

/// A segment is closed once it holds this much.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// Segment files kept open for reading at once.
const OPEN_READERS: usize = 64;

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> ReplicaError {
    let path = path.to_owned();
    move |source| ReplicaError::Io { path, op, source }
}

/// The segments, the open one for appending, and a few for reading.
pub struct Log {
    dir: PathBuf,
    /// start position -> length of every segment, oldest first.
    segments: BTreeMap<u64, u64>,
    /// The last segment, open for appending.
    tail: Option<(u64, File)>,
    readers: Mutex<Vec<(u64, Arc<File>)>>,
}

impl Log {
    /// Opens (creating) the log in `dir`.
    pub fn open(dir: &Path) -> Result<Log, ReplicaError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir, "create history directory"))?;
        let mut segments = BTreeMap::new();
        for e in std::fs::read_dir(dir).map_err(io_err(dir, "list history"))? {
            let e = e.map_err(io_err(dir, "list history"))?;
            let name = e.file_name();
            let Some(start) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".undo"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let len = e
                .metadata()
                .map_err(io_err(&e.path(), "stat segment"))?
                .len();
            segments.insert(start, len);
        }
        let mut log = Log {
            dir: dir.to_owned(),
            segments,
            tail: None,
            readers: Mutex::new(Vec::new()),
        };
        // Segments must follow one another: a gap (a segment lost) ends
        // the usable history before it.
        let mut expected = None;
        let mut cut = None;
        for (&start, &len) in &log.segments {
            if let Some(x) = expected {
                if start != x {
                    cut = Some(start);
                }
            }
            expected = Some(start + len);
        }
        if let Some(from) = cut {
            tracing::error!(dir = %dir.display(), "history segments are not contiguous: dropping those before position {from}");
            log.drop_before(from)?;
        }
        Ok(log)
    }

    fn path(&self, start: u64) -> PathBuf {
        self.dir.join(format!("{start:020}.undo"))
    }

    /// The first position kept.
    pub fn start(&self) -> u64 {
        self.segments.keys().next().copied().unwrap_or(0)
    }

    /// The position after the last byte.
    pub fn end(&self) -> u64 {
        self.segments
            .iter()
            .next_back()
            .map(|(s, l)| s + l)
            .unwrap_or(0)
    }

    /// Bytes kept.
    pub fn bytes(&self) -> u64 {
        self.end() - self.start()
    }

    /// Segment starts and lengths, oldest first.
    pub fn segments(&self) -> Vec<(u64, u64)> {
        self.segments.iter().map(|(s, l)| (*s, *l)).collect()
    }

    /// Appends `bytes` (whole entries) at the end; a new segment starts
    /// first when the last one is full. Returns the position they start at.
    pub fn append(&mut self, bytes: &[u8]) -> Result<u64, ReplicaError> {
        let end = self.end();
        let last = self.segments.iter().next_back().map(|(s, l)| (*s, *l));
        let start = match last {
            Some((s, l)) if l < SEGMENT_BYTES => s,
            _ => end,
        };
        if self.tail.as_ref().is_none_or(|(s, _)| *s != start) {
            let path = self.path(start);
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .mode(0o600)
                .open(&path)
                .map_err(io_err(&path, "open history segment"))?;
            if let std::collections::btree_map::Entry::Vacant(e) = self.segments.entry(start) {
                e.insert(0);
                sync_dir(&self.dir)?;
            }
            self.tail = Some((start, file));
        }
        let Some((s, file)) = self.tail.as_ref() else {
            return Ok(end);
        };
        let at = end - s;
        file.write_all_at(bytes, at)
            .map_err(io_err(&self.path(*s), "append to history"))?;
        let s = *s;
        self.segments.insert(s, at + bytes.len() as u64);
        Ok(end)
    }

    /// Makes everything appended durable.
    pub fn sync(&self) -> Result<(), ReplicaError> {
        if let Some((s, file)) = &self.tail {
            file.sync_data()
                .map_err(io_err(&self.path(*s), "sync history"))?;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `pos` (within one segment); false when
    /// they are not all in the log.
    pub fn read_at(&self, pos: u64, buf: &mut [u8]) -> Result<bool, ReplicaError> {
        let Some((&s, &len)) = self.segments.range(..=pos).next_back() else {
            return Ok(false);
        };
        if pos + buf.len() as u64 > s + len {
            return Ok(false);
        }
        let file = self.reader(s)?;
        file.read_exact_at(buf, pos - s)
            .map_err(io_err(&self.path(s), "read history"))?;
        Ok(true)
    }

    fn reader(&self, start: u64) -> Result<Arc<File>, ReplicaError> {
        let mut readers = self.readers.lock();
        if let Some(i) = readers.iter().position(|(s, _)| *s == start) {
            let hit = readers.remove(i);
            let file = Arc::clone(&hit.1);
            readers.push(hit);
            return Ok(file);
        }
        let path = self.path(start);
        let file = Arc::new(File::open(&path).map_err(io_err(&path, "open history segment"))?);
        if readers.len() >= OPEN_READERS {
            readers.remove(0);
        }
        readers.push((start, Arc::clone(&file)));
        Ok(file)
    }

    /// Closes the segments kept open for reading (after a scan at open:
    /// only test views keep them open).
    pub fn close_readers(&self) {
        self.readers.lock().clear();
    }

    /// The segment holding `pos`: (start, end).
    pub fn segment_of(&self, pos: u64) -> Option<(u64, u64)> {
        self.segments
            .range(..=pos)
            .next_back()
            .map(|(s, l)| (*s, s + l))
            .filter(|(_, e)| pos < *e)
    }

    /// Cuts everything from `pos` on.
    pub fn truncate(&mut self, pos: u64) -> Result<(), ReplicaError> {
        let later: Vec<u64> = self.segments.range(pos..).map(|(s, _)| *s).collect();
        for s in later {
            if s == pos && s == self.start() {
                // Keep the (now empty) first segment: it says where the
                // history's positions continue.
                self.set_len(s, 0)?;
                continue;
            }
            self.remove(s)?;
        }
        if let Some((&s, &len)) = self.segments.range(..pos).next_back() {
            if s + len > pos {
                self.set_len(s, pos - s)?;
            }
        }
        sync_dir(&self.dir)
    }

    fn set_len(&mut self, s: u64, len: u64) -> Result<(), ReplicaError> {
        let path = self.path(s);
        let f = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io_err(&path, "open history segment"))?;
        f.set_len(len)
            .and_then(|()| f.sync_all())
            .map_err(io_err(&path, "truncate history"))?;
        self.segments.insert(s, len);
        Ok(())
    }

    fn remove(&mut self, s: u64) -> Result<(), ReplicaError> {
        let path = self.path(s);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path, "remove history segment")(e)),
        }
        self.segments.remove(&s);
        if self.tail.as_ref().is_some_and(|(t, _)| *t == s) {
            self.tail = None;
        }
        self.readers.lock().retain(|(r, _)| *r != s);
        Ok(())
    }

    /// Deletes the oldest segment unless it is the last one; returns its
    /// (start, end).
    pub fn drop_first(&mut self) -> Result<Option<(u64, u64)>, ReplicaError> {
        if self.segments.len() < 2 {
            return Ok(None);
        }
        let Some((&s, &len)) = self.segments.iter().next() else {
            return Ok(None);
        };
        self.remove(s)?;
        Ok(Some((s, s + len)))
    }

    /// Deletes every segment before the one starting at `from`.
    fn drop_before(&mut self, from: u64) -> Result<(), ReplicaError> {
        let older: Vec<u64> = self.segments.range(..from).map(|(s, _)| *s).collect();
        for s in older {
            self.remove(s)?;
        }
        Ok(())
    }

    /// Deletes everything (a new history begins at position 0).
    pub fn clear(&mut self) -> Result<(), ReplicaError> {
        let all: Vec<u64> = self.segments.keys().copied().collect();
        for s in all {
            self.remove(s)?;
        }
        sync_dir(&self.dir)
    }
}

pub fn sync_dir(dir: &Path) -> Result<(), ReplicaError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "sync history directory"))
}
