//! A replica's undo history (docs/HISTORY.md): the old data every write
//! overwrote, kept beside the latest image, and the recovery points it
//! makes readable (test views) and restorable (rollback).

pub mod entry;
mod log;
mod ranges;
pub mod undo;
mod view;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use crate::error::ReplicaError;
use crate::replica::ReplicaVolume;
use entry::{EntryHead, HEADER_LEN};
use log::Log;
use ranges::RangeMap;
use undo::Encoded;
pub use view::PointView;
use view::{Overlay, Src};

/// Points kept in memory at most; past it, every other one of the
/// oldest half is forgotten (their data stays).
const MAX_POINTS: usize = 1 << 20;

/// How much history a group keeps (docs/HISTORY.md, "Retention").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Points younger than this are kept (`retention`).
    pub keep: Duration,
    /// Past this many bytes of log the oldest history goes (`history_max`).
    pub max_bytes: u64,
}

/// A recovery point: the images held exactly the group's records up to
/// `seq` (of `epoch`), captured by the primary by `time_ms` (ms since the
/// Unix epoch, the primary's clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Point {
    pub epoch: u64,
    pub seq: u64,
    pub time_ms: u64,
    /// Where in the log the point is (docs/HISTORY.md, H2).
    pub pos: u64,
}

/// Which point a command means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PointChoice {
    /// The newest point.
    Latest,
    /// The newest point at or before this time (ms since the Unix epoch).
    AtOrBefore(u64),
}

/// The window of a group's history, for status and `tandem points`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub count: usize,
    pub oldest: Option<Point>,
    pub newest: Option<Point>,
    /// Bytes of log kept.
    pub bytes: u64,
    /// Bytes of log dropped because of `history_max` since the agent
    /// started.
    pub dropped_bytes: u64,
    /// Test views hold the log past `history_max`.
    pub held_over_cap: bool,
}

/// Why a point cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("no recovery point at or before {0} (the history's oldest point is later, or there is none yet)")]
    NoPoint(String),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
}

/// A group's history, shared by its committer, its views and status.
pub struct History {
    dir: PathBuf,
    volumes: Arc<Vec<ReplicaVolume>>,
    log: RwLock<Log>,
    meta: Mutex<Meta>,
}

struct Meta {
    points: Vec<Point>,
    retention: Retention,
    dropped_bytes: u64,
    held_over_cap: bool,
    /// Views that learn every new entry (H2).
    views: Vec<Weak<Overlay>>,
    /// Positions the log is held from (one per open view, or view being
    /// opened): position -> count.
    pins: BTreeMap<u64, usize>,
}

/// A header read from the log.
struct Found {
    pos: u64,
    head: EntryHead,
}

impl History {
    /// Opens the history in `dir` of a group whose images are `volumes`;
    /// `synced_end` is the state's `history_end` (H5). Entries at or after
    /// it are rolled back (docs/HISTORY.md, "Crash behaviour"). Returns
    /// the history and how many entries were rolled back.
    pub fn open(
        dir: &Path,
        volumes: Arc<Vec<ReplicaVolume>>,
        synced_end: u64,
        retention: Retention,
    ) -> Result<(Arc<History>, usize), ReplicaError> {
        let mut log = Log::open(dir)?;
        let synced_end = synced_end.clamp(log.start(), log.end());
        let mut points = Vec::new();
        let mut tail = Vec::new();
        let mut damaged_until = None;
        let mut torn_at = None;
        for (s, len) in log.segments() {
            let end = s + len;
            let mut pos = s;
            while pos < end {
                match read_head(&log, pos, end, pos >= synced_end)? {
                    Some(head) => {
                        if pos >= synced_end {
                            tail.push(Found { pos, head });
                        } else if let EntryHead::Point {
                            epoch,
                            seq,
                            time_ms,
                        } = head
                        {
                            points.push(Point {
                                epoch,
                                seq,
                                time_ms,
                                pos,
                            });
                        }
                        pos += head.entry_len();
                    }
                    None if pos >= synced_end => {
                        torn_at = Some(pos);
                        break;
                    }
                    None => {
                        tracing::error!(dir = %dir.display(), pos, "history damaged: the points before the end of its segment are dropped");
                        damaged_until = Some(end);
                        break;
                    }
                }
            }
            if torn_at.is_some() {
                break;
            }
        }
        if let Some(until) = damaged_until {
            if until > synced_end {
                return Err(ReplicaError::Corrupt {
                    path: dir.to_owned(),
                    reason: "the history's last segment is damaged before its synced end: the images cannot be rolled back to a consistent point".into(),
                });
            }
            while log.segment_of(log.start()).is_some_and(|(_, e)| e <= until) {
                if log.drop_first()?.is_none() {
                    break;
                }
            }
            points.retain(|p| p.pos >= until);
        }
        let rolled = tail.len();
        if !tail.is_empty() {
            for f in tail.iter().rev() {
                undo_one(&log, &volumes, f)?;
            }
            for v in volumes.iter() {
                v.image.sync()?;
            }
        }
        let cut = torn_at.map_or(synced_end, |t| t.min(synced_end));
        if log.end() > cut {
            log.truncate(cut)?;
        }
        // The scan opened segments to read them: only views keep any.
        log.close_readers();
        let history = Arc::new(History {
            dir: dir.to_owned(),
            volumes,
            log: RwLock::new(log),
            meta: Mutex::new(Meta {
                points,
                retention,
                dropped_bytes: 0,
                held_over_cap: false,
                views: Vec::new(),
                pins: BTreeMap::new(),
            }),
        });
        Ok((history, rolled))
    }

    /// The log's length: what a checkpoint records as `history_end`.
    pub fn end(&self) -> u64 {
        self.log.read().end()
    }

    pub fn set_retention(&self, retention: Retention) {
        self.meta.lock().retention = retention;
    }

    /// Appends a commit's entries and tells every open view of them; the
    /// images may be written once [`History::sync`] has returned.
    pub fn append(&self, encoded: &Encoded) -> Result<u64, ReplicaError> {
        if encoded.bytes.is_empty() {
            return Ok(self.end());
        }
        let start = self.log.write().append(&encoded.bytes)?;
        let meta = self.meta.lock();
        for overlay in meta.views.iter().filter_map(Weak::upgrade) {
            for placed in &encoded.entries {
                let pos = start + placed.at as u64;
                deliver(&overlay, pos, &placed.head);
            }
        }
        Ok(start)
    }

    /// Makes the appended entries durable.
    pub fn sync(&self) -> Result<(), ReplicaError> {
        self.log.read().sync()
    }

    /// Lists the points of a commit that `append` placed at `start`, once
    /// their records are in the images.
    pub fn add_points(&self, start: u64, encoded: &Encoded) {
        let mut meta = self.meta.lock();
        for placed in &encoded.entries {
            if let EntryHead::Point {
                epoch,
                seq,
                time_ms,
            } = placed.head
            {
                meta.points.push(Point {
                    epoch,
                    seq,
                    time_ms,
                    pos: start + placed.at as u64,
                });
            }
        }
        if meta.points.len() > MAX_POINTS {
            let half = meta.points.len() / 2;
            let mut i = 0;
            meta.points.retain(|_| {
                i += 1;
                i > half || i % 2 == 0
            });
        }
    }

    /// Drops the oldest history that retention lets go, or that
    /// `history_max` forces out (docs/HISTORY.md, "Retention").
    pub fn trim(&self, now_ms: u64) -> Result<(), ReplicaError> {
        let mut meta = self.meta.lock();
        meta.views.retain(|w| w.strong_count() > 0);
        // A running test view holds the log from its point on; the newest
        // point is never dropped, so that images in the middle of a resync
        // (which makes no points) stay promotable at it (H6).
        let pinned = meta.pins.keys().next().copied().unwrap_or(u64::MAX);
        let newest = meta.points.last().map_or(u64::MAX, |p| p.pos);
        let held_from = pinned.min(newest);
        let cutoff = now_ms
            .saturating_sub(u64::try_from(meta.retention.keep.as_millis()).unwrap_or(u64::MAX));
        let mut held = None;
        loop {
            let mut log = self.log.write();
            let segments = log.segments();
            let (Some(&(s0, l0)), true) = (segments.first(), segments.len() >= 2) else {
                break;
            };
            let e0 = s0 + l0;
            let over_cap = log.bytes() > meta.retention.max_bytes;
            let newest_in = meta
                .points
                .iter()
                .take_while(|p| p.pos < e0)
                .last()
                .copied();
            let expired = newest_in.is_none_or(|p| p.time_ms < cutoff);
            if !over_cap && !expired {
                break;
            }
            if held_from < e0 {
                held = over_cap.then_some(if pinned < e0 {
                    "a running test view holds it"
                } else {
                    "the newest recovery point is kept until a newer one is made (a resync makes none)"
                });
                break;
            }
            log.drop_first()?;
            drop(log);
            let gone = meta.points.iter().take_while(|p| p.pos < e0).count();
            if over_cap && !expired {
                meta.dropped_bytes += l0;
                let last = newest_in.map(|p| p.seq).unwrap_or(0);
                tracing::warn!(
                    dir = %self.dir.display(),
                    bytes = l0,
                    points = gone,
                    "history_max reached: the oldest history is dropped (points up to seq {last})"
                );
            }
            meta.points.drain(..gone);
        }
        if let (Some(why), false) = (held, meta.held_over_cap) {
            tracing::warn!(dir = %self.dir.display(), "history is over history_max: {why}");
        }
        meta.held_over_cap = held.is_some();
        Ok(())
    }

    /// The ranges (volume, offset, length) the images changed in since
    /// `point`: what a rollback to it gives up.
    pub fn changed_since(&self, point: Point) -> Result<Vec<(u32, u64, u64)>, ReplicaError> {
        let mut changed: Vec<RangeMap<()>> = self.volumes.iter().map(|_| RangeMap::new()).collect();
        let log = self.log.read();
        let mut pos = point.pos + HEADER_LEN as u64;
        while pos < log.end() {
            let Some((_, seg_end)) = log.segment_of(pos) else {
                break;
            };
            let Some(head) = read_head(&log, pos, seg_end, false)? else {
                return Err(corrupt(&self.dir, pos));
            };
            if let EntryHead::Undo {
                volume,
                offset,
                len,
                ..
            } = head
            {
                if let Some(m) = changed.get_mut(volume as usize) {
                    m.fill(offset, offset.saturating_add(len), ());
                }
            }
            pos += head.entry_len();
        }
        drop(log);
        // (The views' lock before the log's, as everywhere.)
        let meta = self.meta.lock();
        if meta.pins.is_empty() {
            self.log.read().close_readers();
        }
        drop(meta);
        let mut out = Vec::new();
        for (v, m) in changed.iter().enumerate() {
            let v = u32::try_from(v).unwrap_or(u32::MAX);
            // Adjacent pieces merge into one range.
            let mut run: Option<(u64, u64)> = None;
            for (s, e, (), _) in m.covered(0, u64::MAX) {
                match run {
                    Some((rs, re)) if re == s => run = Some((rs, e)),
                    Some((rs, re)) => {
                        out.push((v, rs, re - rs));
                        run = Some((s, e));
                    }
                    None => run = Some((s, e)),
                }
            }
            if let Some((rs, re)) = run {
                out.push((v, rs, re - rs));
            }
        }
        Ok(out)
    }

    /// Rolls the images back to `point` (H3) and cuts the log right after
    /// it; every point after it is gone. No view may be open past it.
    pub fn roll_back(&self, point: Point) -> Result<(), ReplicaError> {
        let mut meta = self.meta.lock();
        if !meta.points.contains(&point) {
            return Err(ReplicaError::Corrupt {
                path: self.dir.clone(),
                reason: format!("point seq {} is not in the history", point.seq),
            });
        }
        let end = point.pos + HEADER_LEN as u64;
        let mut log = self.log.write();
        let mut found = Vec::new();
        let mut pos = end;
        while pos < log.end() {
            let Some((_, seg_end)) = log.segment_of(pos) else {
                break;
            };
            let Some(head) = read_head(&log, pos, seg_end, true)? else {
                return Err(corrupt(&self.dir, pos));
            };
            found.push(Found { pos, head });
            pos += head.entry_len();
        }
        for f in found.iter().rev() {
            undo_one(&log, &self.volumes, f)?;
        }
        for v in self.volumes.iter() {
            v.image.sync()?;
        }
        log.truncate(end)?;
        log.close_readers();
        meta.points.retain(|p| p.pos <= point.pos);
        meta.views.retain(|w| w.strong_count() > 0);
        Ok(())
    }

    /// Forgets everything (the images changed without undo: this site
    /// served the group).
    pub fn clear(&self) -> Result<(), ReplicaError> {
        let mut meta = self.meta.lock();
        meta.points.clear();
        self.log.write().clear()
    }

    /// Every point still in the window, oldest first.
    pub fn points(&self) -> Vec<Point> {
        self.meta.lock().points.clone()
    }

    /// The newest point.
    pub fn latest(&self) -> Option<Point> {
        self.meta.lock().points.last().copied()
    }

    /// The point of record `seq` of `epoch`, if it is one.
    pub fn find(&self, epoch: u64, seq: u64) -> Option<Point> {
        let meta = self.meta.lock();
        let i = meta
            .points
            .partition_point(|p| (p.epoch, p.seq) < (epoch, seq));
        meta.points
            .get(i)
            .filter(|p| (p.epoch, p.seq) == (epoch, seq))
            .copied()
    }

    /// The window in numbers.
    pub fn summary(&self) -> Summary {
        let meta = self.meta.lock();
        Summary {
            count: meta.points.len(),
            oldest: meta.points.first().copied(),
            newest: meta.points.last().copied(),
            bytes: self.log.read().bytes(),
            dropped_bytes: meta.dropped_bytes,
            held_over_cap: meta.held_over_cap,
        }
    }

    /// The point `choice` names.
    pub fn choose(&self, choice: PointChoice) -> Result<Point, HistoryError> {
        let meta = self.meta.lock();
        let found = match choice {
            PointChoice::Latest => meta.points.last(),
            PointChoice::AtOrBefore(ms) => meta.points.iter().rev().find(|p| p.time_ms <= ms),
        };
        found.copied().ok_or_else(|| {
            HistoryError::NoPoint(match choice {
                PointChoice::Latest => "now".into(),
                PointChoice::AtOrBefore(ms) => format!("{ms} ms since the Unix epoch"),
            })
        })
    }

    /// Opens a read-only view of `point` that does not move while
    /// replication goes on; it holds the log from the point on until it
    /// is dropped.
    pub fn open_view(self: &Arc<Self>, point: Point) -> Result<PointView, HistoryError> {
        {
            let mut meta = self.meta.lock();
            if !meta.points.contains(&point) {
                return Err(HistoryError::NoPoint(format!(
                    "seq {} (no longer, or not, in the history)",
                    point.seq
                )));
            }
            *meta.pins.entry(point.pos).or_default() += 1;
        }
        let overlay = Arc::new(Overlay {
            point,
            volumes: self
                .volumes
                .iter()
                .map(|_| Mutex::new(RangeMap::new()))
                .collect(),
        });
        let view = PointView {
            history: Arc::clone(self),
            overlay: Arc::clone(&overlay),
            sizes: self.volumes.iter().map(|v| v.image.size()).collect(),
        };
        // The first pass reads without holding commits up; the second,
        // under the views' lock, the little appended meanwhile.
        let first = point.pos + HEADER_LEN as u64;
        let reached = self.scan_into(&overlay, first, u64::MAX)?;
        let mut meta = self.meta.lock();
        self.scan_into(&overlay, reached, u64::MAX)?;
        meta.views.push(Arc::downgrade(&overlay));
        Ok(view)
    }

    /// Adds the entries from `from` to the log's end (at most `to`) to
    /// `overlay`; returns where it stopped.
    fn scan_into(&self, overlay: &Overlay, from: u64, to: u64) -> Result<u64, ReplicaError> {
        let mut pos = from;
        loop {
            let log = self.log.read();
            let end = log.end().min(to);
            if pos >= end {
                return Ok(pos);
            }
            // A few thousand headers per turn of the lock.
            for _ in 0..4096 {
                if pos >= end {
                    break;
                }
                let Some((_, seg_end)) = log.segment_of(pos) else {
                    return Ok(pos);
                };
                let Some(head) = read_head(&log, pos, seg_end, false)? else {
                    return Err(corrupt(&self.dir, pos));
                };
                deliver(overlay, pos, &head);
                pos += head.entry_len();
            }
        }
    }

    fn unpin(&self, pos: u64) {
        let mut meta = self.meta.lock();
        if let Some(n) = meta.pins.get_mut(&pos) {
            *n -= 1;
            if *n == 0 {
                meta.pins.remove(&pos);
            }
        }
        if meta.pins.is_empty() {
            // The last view is gone: its segments need no descriptors.
            self.log.read().close_readers();
        }
    }
}

impl Drop for PointView {
    fn drop(&mut self) {
        self.history.unpin(self.overlay.point.pos);
    }
}

fn corrupt(dir: &Path, pos: u64) -> ReplicaError {
    ReplicaError::Corrupt {
        path: dir.to_owned(),
        reason: format!("no valid history entry at position {pos}"),
    }
}

/// Adds an undo entry at `pos` to a view's overlay (first wins).
fn deliver(overlay: &Overlay, pos: u64, head: &EntryHead) {
    if pos <= overlay.point.pos {
        return;
    }
    if let EntryHead::Undo {
        volume,
        offset,
        len,
        zero,
        ..
    } = *head
    {
        if let Some(m) = overlay.volumes.get(volume as usize) {
            m.lock().fill(
                offset,
                offset.saturating_add(len),
                Src {
                    zero,
                    payload: pos + HEADER_LEN as u64,
                    origin: offset,
                },
            );
        }
    }
}

/// The header at `pos` (in a segment ending at `seg_end`), or None where
/// there is no valid entry; `check_payload`: its payload's CRC too.
fn read_head(
    log: &Log,
    pos: u64,
    seg_end: u64,
    check_payload: bool,
) -> Result<Option<EntryHead>, ReplicaError> {
    let mut h = [0u8; HEADER_LEN];
    if pos + HEADER_LEN as u64 > seg_end || !log.read_at(pos, &mut h)? {
        return Ok(None);
    }
    let Ok((head, key)) = entry::decode_head(&h) else {
        return Ok(None);
    };
    if pos + head.entry_len() > seg_end {
        return Ok(None);
    }
    if check_payload {
        let mut payload = vec![0u8; head.payload_len()];
        if !log.read_at(pos + HEADER_LEN as u64, &mut payload)?
            || entry::check_payload(key, &h, &payload).is_err()
        {
            return Ok(None);
        }
    }
    Ok(Some(head))
}

/// Puts back what an undo entry saved.
fn undo_one(log: &Log, volumes: &[ReplicaVolume], f: &Found) -> Result<(), ReplicaError> {
    let EntryHead::Undo {
        volume,
        offset,
        len,
        zero,
        ..
    } = f.head
    else {
        return Ok(());
    };
    let Some(v) = volumes.get(volume as usize) else {
        return Err(ReplicaError::NoSuchVolume {
            seq: 0,
            volume,
            volumes: volumes.len(),
        });
    };
    if zero {
        v.image.write_zeroes(offset, len, false, false)?;
    } else {
        let mut data = vec![0u8; f.head.payload_len()];
        log.read_at(f.pos + HEADER_LEN as u64, &mut data)?;
        v.image.write(offset, &data)?;
    }
    Ok(())
}
