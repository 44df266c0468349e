//! Rollback data (docs/ROLLBACK.md): before a demoted primary's images are
//! overwritten by the new owner's (resync), what its persistent dirty map
//! marks — a superset of the writes the new owner may never have got — is
//! saved to `<data_dir>/rollback/<group>-e<epoch>-s<seq>.img`, with an
//! index beside it (`.index`). Written once, never read by the agent:
//! `tandem rollback` lists, shows, exports and discards them.
//!
//! The index format and its decoder ([`Index::parse`]) and the naming
//! ([`parse_id`]) are pure; [`save`], [`list`], [`open`], [`export`] and
//! [`discard`] do the file work around them.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tandem_capture::GroupCapture;
use tandem_coordinator::machine::Tip;

/// The index's first line.
pub const HEADER: &str = "volume\toffset\tlength\tfile_offset";
/// Most ranges an index may list (docs/ROLLBACK.md, invariant 5).
pub const MAX_RANGES: usize = 1_000_000;
/// Copy unit of [`export`].
const CHUNK: u64 = 1 << 20;

/// The rollback directory of a data directory.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("rollback")
}

/// One saved range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    pub volume: String,
    /// Byte offset in the volume.
    pub offset: u64,
    pub length: u64,
    /// Where its bytes start in the `.img`.
    pub file_offset: u64,
}

/// A decoded `.index`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Index {
    pub ranges: Vec<Range>,
}

/// Why an `.index` does not decode (line numbers count from 1, the header
/// being line 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error("the index is not UTF-8 text")]
    NotText,
    #[error("the index is empty")]
    Empty,
    #[error("line 1 is {found:?}, not the header {HEADER:?}")]
    Header { found: String },
    #[error("line {line} does not end with a newline (the index was cut short)")]
    Truncated { line: usize },
    #[error("line {line} has {found} tab-separated fields, not 4")]
    Fields { line: usize, found: usize },
    #[error("line {line}: the volume name is empty or holds control characters")]
    Volume { line: usize },
    #[error("line {line}: {field} {value:?} is not an unsigned decimal number")]
    Number {
        line: usize,
        field: &'static str,
        value: String,
    },
    #[error("line {line}: a range of length 0")]
    ZeroLength { line: usize },
    #[error("line {line}: the range ends past 2^64")]
    Overflow { line: usize },
    #[error(
        "line {line}: file_offset is {found}, expected {expected} (ranges are packed in order)"
    )]
    NotPacked {
        line: usize,
        expected: u64,
        found: u64,
    },
    #[error("line {line}: the range of volume {volume} starts at {offset}, before the end of its previous range ({previous_end})")]
    Overlap {
        line: usize,
        volume: String,
        offset: u64,
        previous_end: u64,
    },
    #[error("more than {MAX_RANGES} ranges")]
    TooMany,
}

/// A line without its newline (`n` counts from 0).
fn take(n: usize, raw: &str) -> Result<&str, IndexError> {
    raw.strip_suffix('\n')
        .ok_or(IndexError::Truncated { line: n + 1 })
}

fn number(line: usize, field: &'static str, value: &str) -> Result<u64, IndexError> {
    let bad = || IndexError::Number {
        line,
        field,
        value: value.chars().take(40).collect(),
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    value.parse().map_err(|_| bad())
}

impl Index {
    /// Decodes an index, checking every invariant of docs/ROLLBACK.md.
    pub fn parse(bytes: &[u8]) -> Result<Index, IndexError> {
        let text = std::str::from_utf8(bytes).map_err(|_| IndexError::NotText)?;
        if text.is_empty() {
            return Err(IndexError::Empty);
        }
        let mut lines = text.split_inclusive('\n').enumerate();
        let mut ranges: Vec<Range> = Vec::new();
        // Per volume: the end of its last range.
        let mut ends: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
        let mut packed = 0u64;
        let Some((n, first)) = lines.next() else {
            return Err(IndexError::Empty);
        };
        let header = take(n, first)?;
        if header != HEADER {
            return Err(IndexError::Header {
                found: header.chars().take(80).collect(),
            });
        }
        for (n, raw) in lines {
            let line = n + 1;
            let body = take(n, raw)?;
            if ranges.len() == MAX_RANGES {
                return Err(IndexError::TooMany);
            }
            let fields: Vec<&str> = body.split('\t').collect();
            let [volume, offset, length, file_offset] = fields[..] else {
                return Err(IndexError::Fields {
                    line,
                    found: fields.len(),
                });
            };
            if volume.is_empty() || volume.chars().any(char::is_control) {
                return Err(IndexError::Volume { line });
            }
            let offset = number(line, "offset", offset)?;
            let length = number(line, "length", length)?;
            let file_offset = number(line, "file_offset", file_offset)?;
            if length == 0 {
                return Err(IndexError::ZeroLength { line });
            }
            let end = offset
                .checked_add(length)
                .ok_or(IndexError::Overflow { line })?;
            if file_offset != packed {
                return Err(IndexError::NotPacked {
                    line,
                    expected: packed,
                    found: file_offset,
                });
            }
            packed = file_offset
                .checked_add(length)
                .ok_or(IndexError::Overflow { line })?;
            let previous_end = ends.entry(volume).or_insert(0);
            if offset < *previous_end {
                return Err(IndexError::Overlap {
                    line,
                    volume: volume.to_owned(),
                    offset,
                    previous_end: *previous_end,
                });
            }
            *previous_end = end;
            ranges.push(Range {
                volume: volume.to_owned(),
                offset,
                length,
                file_offset,
            });
        }
        Ok(Index { ranges })
    }

    /// The index's text (what [`Index::parse`] reads back).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(32 * (self.ranges.len() + 1));
        out.push_str(HEADER);
        out.push('\n');
        for r in &self.ranges {
            out.push_str(&format!(
                "{}\t{}\t{}\t{}\n",
                r.volume, r.offset, r.length, r.file_offset
            ));
        }
        out
    }

    /// Bytes the `.img` holds (the sum of the lengths).
    pub fn data_len(&self) -> u64 {
        self.ranges.iter().map(|r| r.length).sum()
    }

    /// The volumes it holds ranges of, in first-seen order.
    pub fn volumes(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for r in &self.ranges {
            if !out.contains(&r.volume.as_str()) {
                out.push(&r.volume);
            }
        }
        out
    }

    /// Where the last range of `volume` ends (0: none).
    pub fn end_of(&self, volume: &str) -> u64 {
        self.ranges
            .iter()
            .filter(|r| r.volume == volume)
            .map(|r| r.offset + r.length)
            .max()
            .unwrap_or(0)
    }
}

/// The group, epoch and seq an ID (`web01-e3-s1234`) names; None when it is
/// not one (a group name may itself hold `-`).
pub fn parse_id(id: &str) -> Option<(&str, u64, u64)> {
    let (rest, seq) = id.rsplit_once("-s")?;
    let (group, epoch) = rest.rsplit_once("-e")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if group.is_empty() || !digits(epoch) || !digits(seq) {
        return None;
    }
    Some((group, epoch.parse().ok()?, seq.parse().ok()?))
}

/// Why a save is incomplete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Incomplete {
    #[error("no index (the save was interrupted)")]
    NoIndex,
    #[error("no data file")]
    NoData,
    #[error("the index does not decode: {0}")]
    BadIndex(IndexError),
    #[error("the data file holds {found} bytes, the index lists {expected}")]
    ShortData { expected: u64, found: u64 },
    #[error("cannot read it: {0}")]
    Unreadable(String),
}

/// Whether an index and a data file of `data_len` bytes make a complete
/// save. Pure.
pub fn assess(index: Option<&[u8]>, data_len: Option<u64>) -> Result<Index, Incomplete> {
    let Some(found) = data_len else {
        return Err(Incomplete::NoData);
    };
    let index = Index::parse(index.ok_or(Incomplete::NoIndex)?).map_err(Incomplete::BadIndex)?;
    let expected = index.data_len();
    if found < expected {
        return Err(Incomplete::ShortData { expected, found });
    }
    Ok(index)
}

/// One save in the rollback directory.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub group: String,
    pub epoch: u64,
    pub seq: u64,
    /// The `.img` (which may be missing).
    pub data: PathBuf,
    /// The `.img`'s modification time.
    pub created: Option<SystemTime>,
    /// The `.img`'s length (0 when missing).
    pub data_bytes: u64,
    pub state: Result<Index, Incomplete>,
}

/// Why a rollback command failed.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    #[error(
        "{0:?} is not a rollback ID (<group>-e<epoch>-s<seq>, as `tandem rollback list` shows)"
    )]
    BadId(String),
    #[error("no rollback data {id:?} in {dir}")]
    NotFound { id: String, dir: PathBuf },
    #[error("rollback data {id} is incomplete ({why}): it can only be discarded")]
    Incomplete { id: String, why: Incomplete },
    #[error("rollback data {id} holds no range of volume {volume:?} (it holds: {holds})")]
    NoSuchVolume {
        id: String,
        volume: String,
        holds: String,
    },
    #[error("{0} exists already: choose a new file")]
    Exists(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RollbackError {
    let path = path.to_owned();
    move |source| RollbackError::Io { what, path, source }
}

/// Writes a new file with mode 0600, synced.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its mode through open: set it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Saves the marked regions; None when nothing is marked.
pub fn save(
    data_dir: &Path,
    group: &str,
    capture: &GroupCapture,
    tip: Tip,
) -> Result<Option<PathBuf>, std::io::Error> {
    let ranges = capture.dirty_ranges();
    let volumes: Vec<(&str, &tandem_volume::RawImage)> = capture
        .volumes()
        .iter()
        .map(|v| (v.name.as_str(), &*v.image))
        .collect();
    save_ranges(data_dir, group, &volumes, &ranges, tip)
}

/// Saves `ranges` (per volume, (offset, length)) of `volumes` as the
/// rollback data of `group` at `tip`; None when there are none.
pub fn save_ranges(
    data_dir: &Path,
    group: &str,
    volumes: &[(&str, &tandem_volume::RawImage)],
    ranges: &[Vec<(u64, u64)>],
    tip: Tip,
) -> Result<Option<PathBuf>, std::io::Error> {
    if ranges.iter().all(Vec::is_empty) {
        return Ok(None);
    }
    let dir = dir(data_dir);
    DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
    // A directory made by an older version (0755) is closed too.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    let base = dir.join(format!("{group}-e{}-s{}", tip.0, tip.1));
    let data_path = base.with_extension("img");
    let mut data = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&data_path)?;
    data.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    let mut index = Index::default();
    let mut at = 0u64;
    let mut buf = Vec::new();
    for (&(name, image), volume_ranges) in volumes.iter().zip(ranges) {
        for &(offset, length) in volume_ranges {
            // In pieces: a range may be as large as the volume.
            let mut done = 0;
            while done < length {
                let n = (length - done).min(CHUNK);
                buf.resize(usize::try_from(n).map_err(std::io::Error::other)?, 0);
                image
                    .read(offset + done, &mut buf)
                    .map_err(std::io::Error::other)?;
                data.write_all(&buf)?;
                done += n;
            }
            index.ranges.push(Range {
                volume: name.to_owned(),
                offset,
                length,
                file_offset: at,
            });
            at += length;
        }
    }
    data.sync_all()?;
    // The index appears whole or not at all (docs/ROLLBACK.md).
    let part = base.with_extension("index.part");
    write_private(&part, index.encode().as_bytes())?;
    std::fs::rename(&part, base.with_extension("index"))?;
    File::open(&dir)?.sync_all()?;
    Ok(Some(data_path))
}

/// Every save in `data_dir`'s rollback directory (none when it does not
/// exist), by group, epoch, seq. Files whose names are not an ID are
/// skipped; incomplete saves are listed as such.
pub fn list(data_dir: &Path) -> Result<Vec<Entry>, RollbackError> {
    let dir = dir(data_dir);
    let read = match std::fs::read_dir(&dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("cannot read", &dir)(e)),
    };
    let mut ids = std::collections::BTreeSet::new();
    for entry in read {
        let entry = entry.map_err(io("cannot read", &dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let id = name
            .strip_suffix(".img")
            .or_else(|| name.strip_suffix(".index"))
            .or_else(|| name.strip_suffix(".index.part"));
        if let Some(id) = id.filter(|id| parse_id(id).is_some()) {
            ids.insert(id.to_owned());
        }
    }
    let mut out: Vec<Entry> = ids.iter().map(|id| load(&dir, id)).collect();
    out.sort_by(|a, b| (&a.group, a.epoch, a.seq).cmp(&(&b.group, b.epoch, b.seq)));
    Ok(out)
}

/// Reads one save's files (never fails: what cannot be read makes it
/// incomplete).
fn load(dir: &Path, id: &str) -> Entry {
    let (group, epoch, seq) = parse_id(id).unwrap_or((id, 0, 0));
    let data = dir.join(format!("{id}.img"));
    let meta = std::fs::metadata(&data).ok();
    let index = std::fs::read(dir.join(format!("{id}.index")));
    let state = match &index {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Incomplete::Unreadable(e.to_string()))
        }
        _ => assess(
            index.as_deref().ok(),
            meta.as_ref().filter(|m| m.is_file()).map(|m| m.len()),
        ),
    };
    Entry {
        id: id.to_owned(),
        group: group.to_owned(),
        epoch,
        seq,
        created: meta.as_ref().and_then(|m| m.modified().ok()),
        data_bytes: meta.as_ref().map_or(0, |m| m.len()),
        data,
        state,
    }
}

/// One save by ID.
pub fn open(data_dir: &Path, id: &str) -> Result<Entry, RollbackError> {
    if parse_id(id).is_none() || id.contains('/') {
        return Err(RollbackError::BadId(id.to_owned()));
    }
    let dir = dir(data_dir);
    let exists = ["img", "index", "index.part"]
        .iter()
        .any(|ext| dir.join(format!("{id}.{ext}")).exists());
    if !exists {
        return Err(RollbackError::NotFound {
            id: id.to_owned(),
            dir,
        });
    }
    Ok(load(&dir, id))
}

/// Writes `volume`'s saved ranges to a new sparse raw file `out` of
/// `size` bytes (at least the end of its last range): the saved bytes at
/// their offsets, holes elsewhere. Returns the bytes copied.
pub fn export(entry: &Entry, volume: &str, out: &Path, size: u64) -> Result<u64, RollbackError> {
    let index = entry
        .state
        .as_ref()
        .map_err(|why| RollbackError::Incomplete {
            id: entry.id.clone(),
            why: why.clone(),
        })?;
    if !index.ranges.iter().any(|r| r.volume == volume) {
        return Err(RollbackError::NoSuchVolume {
            id: entry.id.clone(),
            volume: volume.to_owned(),
            holds: index.volumes().join(", "),
        });
    }
    let data = File::open(&entry.data).map_err(io("cannot open", &entry.data))?;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                RollbackError::Exists(out.to_owned())
            } else {
                io("cannot create", out)(e)
            }
        })?;
    file.set_len(size.max(index.end_of(volume)))
        .map_err(io("cannot size", out))?;
    let mut buf = vec![0u8; usize::try_from(CHUNK).unwrap_or(1 << 20)];
    let mut copied = 0u64;
    for r in index.ranges.iter().filter(|r| r.volume == volume) {
        let mut done = 0u64;
        while done < r.length {
            let n = (r.length - done).min(CHUNK);
            let piece = &mut buf[..usize::try_from(n).unwrap_or(0)];
            data.read_exact_at(piece, r.file_offset + done)
                .map_err(io("cannot read", &entry.data))?;
            file.write_all_at(piece, r.offset + done)
                .map_err(io("cannot write", out))?;
            done += n;
        }
        copied += r.length;
    }
    file.sync_all().map_err(io("cannot sync", out))?;
    Ok(copied)
}

/// Removes a save (all its files) and syncs the directory.
pub fn discard(data_dir: &Path, id: &str) -> Result<(), RollbackError> {
    open(data_dir, id)?;
    let dir = dir(data_dir);
    for ext in ["index", "index.part", "img"] {
        let path = dir.join(format!("{id}.{ext}"));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("cannot remove", &path)(e)),
        }
    }
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot sync", &dir))
}

/// The pieces of `[offset, offset + len)` that `ranges` (one volume's,
/// ascending, not overlapping) hold: (position in the request, position
/// in the data file, length). Pure.
pub fn pieces(ranges: &[Range], offset: u64, len: u64) -> Vec<(u64, u64, u64)> {
    let end = offset.saturating_add(len);
    let first = ranges.partition_point(|r| r.offset + r.length <= offset);
    ranges[first..]
        .iter()
        .take_while(|r| r.offset < end)
        .map(|r| {
            let from = r.offset.max(offset);
            let to = (r.offset + r.length).min(end);
            (from - offset, r.file_offset + (from - r.offset), to - from)
        })
        .collect()
}

/// `[offset, offset + len)` as runs of (length, saved data?), in order,
/// each at most `max` long. Pure.
pub fn runs(ranges: &[Range], offset: u64, len: u64, max: u64) -> Vec<(u64, bool)> {
    let mut out = Vec::new();
    let mut at = 0;
    let push = |n: u64, data: bool, out: &mut Vec<(u64, bool)>| {
        let mut left = n;
        while left > 0 {
            let step = left.min(max);
            out.push((step, data));
            left -= step;
        }
    };
    for (pos, _, n) in pieces(ranges, offset, len) {
        push(pos - at, false, &mut out);
        push(n, true, &mut out);
        at = pos + n;
    }
    push(len - at, false, &mut out);
    out
}

/// A read-only NBD view of one volume's saved ranges (`tandem rollback
/// export --nbd`): the saved bytes at their offsets, zeros (holes)
/// elsewhere — the same bytes as the file [`export`] writes.
pub struct View {
    name: String,
    size: u64,
    data: File,
    ranges: Vec<Range>,
}

impl View {
    /// The view of `volume` in `entry`, `size` bytes long (at least the
    /// end of its last range).
    pub fn open(entry: &Entry, volume: &str, size: u64) -> Result<View, RollbackError> {
        let index = entry
            .state
            .as_ref()
            .map_err(|why| RollbackError::Incomplete {
                id: entry.id.clone(),
                why: why.clone(),
            })?;
        let ranges: Vec<Range> = index
            .ranges
            .iter()
            .filter(|r| r.volume == volume)
            .cloned()
            .collect();
        if ranges.is_empty() {
            return Err(RollbackError::NoSuchVolume {
                id: entry.id.clone(),
                volume: volume.to_owned(),
                holds: index.volumes().join(", "),
            });
        }
        Ok(View {
            name: volume.to_owned(),
            size: size.max(index.end_of(volume)),
            data: File::open(&entry.data).map_err(io("cannot open", &entry.data))?,
            ranges,
        })
    }
}

fn read_only() -> tandem_nbd::ExportError {
    tandem_nbd::ExportError::new(tandem_nbd::ErrorCode::Perm, "a rollback view is read-only")
}

impl tandem_nbd::Export for View {
    fn name(&self) -> &str {
        &self.name
    }
    fn description(&self) -> String {
        "tandem rollback data (read-only)".into()
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        true
    }
    fn multi_conn(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), tandem_nbd::ExportError> {
        buf.fill(0);
        for (pos, at, n) in pieces(&self.ranges, offset, buf.len() as u64) {
            // Both within `buf` (pieces() keeps to the request).
            let (Ok(pos), Ok(n)) = (usize::try_from(pos), usize::try_from(n)) else {
                return Err(tandem_nbd::ExportError::new(
                    tandem_nbd::ErrorCode::Invalid,
                    "a read past the address space",
                ));
            };
            self.data
                .read_exact_at(&mut buf[pos..pos + n], at)
                .map_err(|e| {
                    tandem_nbd::ExportError::new(tandem_nbd::ErrorCode::Io, e.to_string())
                })?;
        }
        Ok(())
    }
    fn write(
        &self,
        _offset: u64,
        _data: &[u8],
        _fua: bool,
    ) -> Result<tandem_nbd::Completion, tandem_nbd::ExportError> {
        Err(read_only())
    }
    fn write_zeroes(
        &self,
        _offset: u64,
        _len: u64,
        _flags: tandem_nbd::ZeroFlags,
    ) -> Result<tandem_nbd::Completion, tandem_nbd::ExportError> {
        Err(read_only())
    }
    fn trim(
        &self,
        _offset: u64,
        _len: u64,
        _fua: bool,
    ) -> Result<tandem_nbd::Completion, tandem_nbd::ExportError> {
        Err(read_only())
    }
    fn flush(&self) -> Result<tandem_nbd::Completion, tandem_nbd::ExportError> {
        Ok(tandem_nbd::Completion::Done)
    }
    fn cache(&self, _offset: u64, _len: u64) -> Result<(), tandem_nbd::ExportError> {
        Ok(())
    }
    fn extents(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<tandem_nbd::Extent>, tandem_nbd::ExportError> {
        // Bit 0: hole, bit 1: reads as zeroes.
        Ok(runs(&self.ranges, offset, len, 1 << 30)
            .into_iter()
            .map(|(n, data)| tandem_nbd::Extent {
                length: u32::try_from(n).unwrap_or(1 << 30),
                flags: if data { 0 } else { 3 },
            })
            .collect())
    }
}

/// A listener's catalog: the one view, by its volume's name or as the
/// default export.
pub struct ViewCatalog(pub std::sync::Arc<View>);

impl tandem_nbd::Catalog for ViewCatalog {
    fn lookup(&self, name: &str) -> Option<std::sync::Arc<dyn tandem_nbd::Export>> {
        use tandem_nbd::Export;
        (name.is_empty() || name == self.0.name())
            .then(|| std::sync::Arc::clone(&self.0) as std::sync::Arc<dyn tandem_nbd::Export>)
    }
    fn list(&self) -> Vec<std::sync::Arc<dyn tandem_nbd::Export>> {
        vec![std::sync::Arc::clone(&self.0) as std::sync::Arc<dyn tandem_nbd::Export>]
    }
}

/// Fuzzing entry point (`fuzz/fuzz_targets/rollback_index.rs`): any input
/// either is refused or decodes to an index that re-encodes to exactly the
/// same bytes and satisfies the invariants.
pub fn fuzz_one(data: &[u8]) {
    if let Ok(index) = Index::parse(data) {
        assert_eq!(index.encode().as_bytes(), data, "not a round trip");
        let mut packed = 0;
        for r in &index.ranges {
            assert!(r.length > 0);
            assert_eq!(r.file_offset, packed);
            packed += r.length;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn index(ranges: &[(&str, u64, u64)]) -> Index {
        let mut at = 0;
        Index {
            ranges: ranges
                .iter()
                .map(|(v, o, l)| {
                    let r = Range {
                        volume: (*v).into(),
                        offset: *o,
                        length: *l,
                        file_offset: at,
                    };
                    at += l;
                    r
                })
                .collect(),
        }
    }

    #[test]
    fn the_documented_example_decodes() {
        let text = "volume\toffset\tlength\tfile_offset\nweb01-root\t0\t1048576\t0\nweb01-root\t8388608\t65536\t1048576\nweb01-data\t4096\t4096\t1114112\n";
        let i = Index::parse(text.as_bytes()).unwrap();
        assert_eq!(
            i,
            index(&[
                ("web01-root", 0, 1048576),
                ("web01-root", 8388608, 65536),
                ("web01-data", 4096, 4096)
            ])
        );
        assert_eq!(i.data_len(), 1048576 + 65536 + 4096);
        assert_eq!(i.volumes(), ["web01-root", "web01-data"]);
        assert_eq!(i.encode(), text);
    }

    #[test]
    fn bad_input_is_refused_naming_the_line() {
        let h = format!("{HEADER}\n");
        let cases: Vec<(String, IndexError)> = vec![
            (String::new(), IndexError::Empty),
            (
                "vol\toff\n".into(),
                IndexError::Header {
                    found: "vol\toff".into(),
                },
            ),
            (HEADER.into(), IndexError::Truncated { line: 1 }),
            (
                format!("{h}v\t0\t4096\t0"),
                IndexError::Truncated { line: 2 },
            ),
            (
                format!("{h}v\t0\t4096\n"),
                IndexError::Fields { line: 2, found: 3 },
            ),
            (format!("{h}\t0\t4096\t0\n"), IndexError::Volume { line: 2 }),
            (
                format!("{h}v\t-1\t4096\t0\n"),
                IndexError::Number {
                    line: 2,
                    field: "offset",
                    value: "-1".into(),
                },
            ),
            (
                format!("{h}v\t0\t+4\t0\n"),
                IndexError::Number {
                    line: 2,
                    field: "length",
                    value: "+4".into(),
                },
            ),
            (
                format!("{h}v\t0\t99999999999999999999\t0\n"),
                IndexError::Number {
                    line: 2,
                    field: "length",
                    value: "99999999999999999999".into(),
                },
            ),
            (
                format!("{h}v\t0\t0\t0\n"),
                IndexError::ZeroLength { line: 2 },
            ),
            (
                format!("{h}v\t18446744073709551615\t2\t0\n"),
                IndexError::Overflow { line: 2 },
            ),
            (
                format!("{h}v\t0\t4096\t0\nv\t8192\t4096\t0\n"),
                IndexError::NotPacked {
                    line: 3,
                    expected: 4096,
                    found: 0,
                },
            ),
            (
                format!("{h}v\t8192\t4096\t0\nv\t0\t4096\t4096\n"),
                IndexError::Overlap {
                    line: 3,
                    volume: "v".into(),
                    offset: 0,
                    previous_end: 12288,
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(Index::parse(text.as_bytes()), Err(want), "{text:?}");
        }
        assert_eq!(Index::parse(&[0xff, 0xfe]), Err(IndexError::NotText));
        // Other volumes may start anywhere.
        assert!(
            Index::parse(format!("{h}a\t8192\t4096\t0\nb\t0\t4096\t4096\n").as_bytes()).is_ok()
        );
    }

    #[test]
    fn ids_split_at_the_last_epoch_and_seq() {
        assert_eq!(parse_id("web01-e3-s1234"), Some(("web01", 3, 1234)));
        assert_eq!(parse_id("a-e1-s2-e3-s4"), Some(("a-e1-s2", 3, 4)));
        for bad in [
            "web01",
            "web01-e3",
            "-e3-s4",
            "g-e-s4",
            "g-e3-s",
            "g-ex-s1",
            "g-e3-s1.img",
        ] {
            assert_eq!(parse_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_save_is_complete_only_with_an_index_and_all_its_data() {
        let good = index(&[("v", 0, 4096)]).encode();
        assert!(assess(Some(good.as_bytes()), Some(4096)).is_ok());
        assert_eq!(assess(None, Some(4096)), Err(Incomplete::NoIndex));
        assert_eq!(assess(Some(good.as_bytes()), None), Err(Incomplete::NoData));
        assert_eq!(
            assess(Some(good.as_bytes()), Some(100)),
            Err(Incomplete::ShortData {
                expected: 4096,
                found: 100
            })
        );
        // A partial index (cut mid-line) is incomplete, not a crash.
        let cut = &good.as_bytes()[..good.len() - 3];
        assert!(matches!(
            assess(Some(cut), Some(4096)),
            Err(Incomplete::BadIndex(IndexError::Truncated { line: 2 }))
        ));
    }

    fn arb_index() -> impl Strategy<Value = Index> {
        let volume = "[a-z][a-z0-9_.-]{0,12}";
        proptest::collection::vec((volume, 0..1u64 << 40, 1..1u64 << 30), 0..20).prop_map(|raw| {
            // Per volume ascending, non-overlapping: lay each volume's
            // ranges out one after another from their own start.
            let mut ends: std::collections::HashMap<String, u64> = Default::default();
            let mut at = 0;
            let ranges = raw
                .into_iter()
                .map(|(volume, gap, length)| {
                    let end = ends.entry(volume.clone()).or_insert(0);
                    let offset = *end + gap;
                    *end = offset + length;
                    let r = Range {
                        volume,
                        offset,
                        length,
                        file_offset: at,
                    };
                    at += length;
                    r
                })
                .collect();
            Index { ranges }
        })
    }

    proptest! {
        #[test]
        fn encode_then_parse_is_the_identity(i in arb_index()) {
            let text = i.encode();
            prop_assert_eq!(Index::parse(text.as_bytes()), Ok(i));
            fuzz_one(text.as_bytes());
        }

        /// Any cut of a valid index (a crash mid-write of an older
        /// version) is refused or is a shorter valid index: never a panic.
        #[test]
        fn a_cut_index_is_refused_or_a_prefix(i in arb_index(), cut in 0..2000usize) {
            let text = i.encode();
            let cut = cut.min(text.len());
            if let Ok(shorter) = Index::parse(&text.as_bytes()[..cut]) {
                prop_assert!(shorter.ranges.len() <= i.ranges.len());
                prop_assert_eq!(&shorter.ranges[..], &i.ranges[..shorter.ranges.len()]);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            fuzz_one(&data);
        }

        #[test]
        fn mutated_indexes_never_panic(i in arb_index(), at in 0..2000usize, byte in proptest::num::u8::ANY) {
            let mut text = i.encode().into_bytes();
            if !text.is_empty() {
                let at = at % text.len();
                text[at] = byte;
            }
            fuzz_one(&text);
        }
    }

    #[test]
    fn a_view_maps_requests_onto_saved_ranges() {
        let i = index(&[("v", 4096, 4096), ("v", 16384, 8192)]);
        let r = &i.ranges;
        assert_eq!(pieces(r, 0, 4096), vec![]);
        assert_eq!(
            pieces(r, 0, 65536),
            vec![(4096, 0, 4096), (16384, 4096, 8192)]
        );
        assert_eq!(
            pieces(r, 6144, 12288),
            vec![(0, 2048, 2048), (10240, 4096, 8192 - 6144)]
        );
        assert_eq!(
            runs(r, 0, 32768, 1 << 30),
            vec![
                (4096, false),
                (4096, true),
                (8192, false),
                (8192, true),
                (8192, false)
            ]
        );
        assert_eq!(runs(r, 20480, 4096, 1024), vec![(1024, true); 4]);
    }

    proptest! {
        /// The view reads exactly what the file export holds.
        #[test]
        fn pieces_tile_the_saved_bytes(i in arb_index(), offset in 0..1u64 << 41, len in 1..1u64 << 32) {
            let v = i.volumes().first().map(|s| s.to_string()).unwrap_or_default();
            let r: Vec<Range> = i.ranges.iter().filter(|r| r.volume == v).cloned().collect();
            let mut at = 0;
            let mut covered = 0;
            for (pos, file, n) in pieces(&r, offset, len) {
                prop_assert!(pos >= at && n > 0 && pos + n <= len);
                let range = r.iter().find(|x| x.file_offset <= file && file < x.file_offset + x.length).unwrap();
                prop_assert_eq!(offset + pos - range.offset, file - range.file_offset);
                at = pos + n;
                covered += n;
            }
            let runs = runs(&r, offset, len, 1 << 30);
            prop_assert_eq!(runs.iter().map(|x| x.0).sum::<u64>(), len);
            prop_assert_eq!(runs.iter().filter(|x| x.1).map(|x| x.0).sum::<u64>(), covered);
        }
    }

    #[test]
    fn save_list_export_and_discard_work_on_files() {
        let dir = tempfile::tempdir().unwrap();
        let rb = super::dir(dir.path());
        DirBuilder::new().mode(0o700).create(&rb).unwrap();
        let i = index(&[("v", 4096, 4096), ("v", 65536, 8192), ("w", 0, 512)]);
        let mut data = vec![0u8; 4096 + 8192 + 512];
        for (n, b) in data.iter_mut().enumerate() {
            *b = u8::try_from(n % 251).unwrap();
        }
        std::fs::write(rb.join("g-e2-s9.img"), &data).unwrap();
        std::fs::write(rb.join("g-e2-s9.index"), i.encode()).unwrap();
        // An interrupted save and a stray file.
        std::fs::write(rb.join("g-e3-s1.img"), b"xx").unwrap();
        std::fs::write(rb.join("notes.txt"), b"").unwrap();
        let all = list(dir.path()).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(
            (all[0].id.as_str(), all[0].epoch, all[0].seq),
            ("g-e2-s9", 2, 9)
        );
        assert_eq!(all[0].state.as_ref().unwrap(), &i);
        assert_eq!(all[1].state.as_ref().unwrap_err(), &Incomplete::NoIndex);

        let out = dir.path().join("v.raw");
        let e = open(dir.path(), "g-e2-s9").unwrap();
        assert_eq!(export(&e, "v", &out, 1 << 20).unwrap(), 4096 + 8192);
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len(), 1 << 20);
        assert_eq!(&got[4096..8192], &data[..4096]);
        assert_eq!(&got[65536..65536 + 8192], &data[4096..4096 + 8192]);
        assert!(got[..4096].iter().all(|b| *b == 0));
        assert!(got[8192..65536].iter().all(|b| *b == 0));
        assert!(matches!(
            export(&e, "v", &out, 0),
            Err(RollbackError::Exists(_))
        ));
        assert!(matches!(
            export(&e, "x", &dir.path().join("x.raw"), 0),
            Err(RollbackError::NoSuchVolume { .. })
        ));
        let broken = open(dir.path(), "g-e3-s1").unwrap();
        assert!(matches!(
            export(&broken, "v", &dir.path().join("y.raw"), 0),
            Err(RollbackError::Incomplete { .. })
        ));

        assert!(matches!(
            open(dir.path(), "../x-e1-s1"),
            Err(RollbackError::BadId(_))
        ));
        assert!(matches!(
            open(dir.path(), "g-e9-s9"),
            Err(RollbackError::NotFound { .. })
        ));
        discard(dir.path(), "g-e2-s9").unwrap();
        discard(dir.path(), "g-e3-s1").unwrap();
        assert!(list(dir.path()).unwrap().is_empty());
        assert!(rb.join("notes.txt").exists());
    }
}
