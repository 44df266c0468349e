//! One group on a replica site: records are journaled and synced, then
//! applied in order to the images; resync chunks go straight to the images
//! while the state says "inconsistent" (docs/REPLICA.md).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_volume::RawImage;

use crate::error::ReplicaError;
use crate::journal::{Entry, EntryOp, Journal};
use crate::state::{ReplicaState, StateFile};

/// Images are synced and the applied position recorded at least this often
/// while records are applied (bounds journal replay after a crash).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

/// A volume of a replicated group.
pub struct ReplicaVolume {
    pub name: String,
    pub image: Arc<RawImage>,
}

/// Where a replica stands, for status and the peer protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub received: u64,
    pub durable: u64,
    pub applied: u64,
    pub epoch: u64,
    /// Epoch of the records up to `applied` (see [`ReplicaGroup::tip`]).
    pub tip_epoch: u64,
    pub consistent: bool,
    /// No state yet: the images hold nothing known.
    pub new: bool,
    pub resyncing: bool,
}

pub struct ReplicaGroup {
    name: String,
    volumes: Vec<ReplicaVolume>,
    journal: Journal,
    state: StateFile,
    /// Received and appended, not yet synced in the journal.
    batch: Vec<Entry>,
    /// Applied to the images (maybe not yet synced).
    applied: u64,
    /// Epoch of the record at `applied`.
    tip_epoch: u64,
    /// Epoch of the resync in progress.
    resync_epoch: u64,
    last_checkpoint: Instant,
    /// The resync in progress resumes the stream here.
    resume_at: Option<u64>,
    /// Created by this run and never synced since.
    new: bool,
    /// The latest position, readable while a session holds the group.
    published: Arc<parking_lot::Mutex<Position>>,
}

impl ReplicaGroup {
    /// Opens the group's replica state under `dir`
    /// (`<data_dir>/replica/<group>`) and brings the images to the last
    /// durable prefix by replaying the journal.
    pub fn open(
        dir: &Path,
        name: &str,
        volumes: Vec<ReplicaVolume>,
    ) -> Result<ReplicaGroup, ReplicaError> {
        std::fs::create_dir_all(dir).map_err(|source| ReplicaError::Io {
            path: dir.to_owned(),
            op: "create replica directory",
            source,
        })?;
        let journal = Journal::open(&dir.join("journal"))?;
        let mut state = StateFile::open(&dir.join("state"))?;
        let new = state.created;
        if new {
            // Nothing is known of these images until a first full
            // comparison completes: durably inconsistent from the start.
            state.set(ReplicaState {
                inconsistent: true,
                ..ReplicaState::default()
            })?;
        }
        let applied = state.get().applied;
        let tip_epoch = state.get().tip_epoch;
        let mut group = ReplicaGroup {
            name: name.to_owned(),
            volumes,
            journal,
            state,
            batch: Vec::new(),
            applied,
            tip_epoch,
            resync_epoch: 0,
            last_checkpoint: Instant::now(),
            resume_at: None,
            new,
            published: Arc::new(parking_lot::Mutex::new(Position {
                received: 0,
                durable: 0,
                applied: 0,
                epoch: 0,
                tip_epoch: 0,
                consistent: false,
                new,
                resyncing: false,
            })),
        };
        let replayed = {
            let ReplicaGroup {
                journal,
                volumes,
                applied,
                tip_epoch,
                ..
            } = &mut group;
            journal.replay(*applied, |entry| {
                apply(volumes, &entry)?;
                *applied = entry.seq;
                *tip_epoch = entry.epoch;
                Ok(())
            })?
        };
        if replayed > 0 {
            tracing::info!(
                group = name,
                entries = replayed,
                applied = group.applied,
                "replayed the journal after a restart"
            );
        }
        group.checkpoint()?;
        Ok(group)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets up the replica state of a site that served the group until
    /// now (demotion): its images hold exactly the records up to `tip`
    /// (epoch, seq) of its own history, and its journal is empty. A stale
    /// state from an earlier time as replica is replaced.
    pub fn adopt(
        dir: &Path,
        name: &str,
        volumes: Vec<ReplicaVolume>,
        tip: (u64, u64),
        epoch: u64,
    ) -> Result<ReplicaGroup, ReplicaError> {
        let journal = dir.join("journal");
        match std::fs::remove_dir_all(&journal) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ReplicaError::Io {
                    path: journal,
                    op: "remove the journal of an earlier replica life",
                    source,
                })
            }
        }
        std::fs::create_dir_all(dir).map_err(|source| ReplicaError::Io {
            path: dir.to_owned(),
            op: "create replica directory",
            source,
        })?;
        let mut state = StateFile::open(&dir.join("state"))?;
        state.set(ReplicaState {
            epoch: epoch.max(tip.0),
            applied: tip.1,
            consistent_at: 0,
            inconsistent: false,
            tip_epoch: tip.0,
        })?;
        drop(state);
        ReplicaGroup::open(dir, name, volumes)
    }

    /// The records the images hold: (epoch, seq) of the last one applied.
    pub fn tip(&self) -> (u64, u64) {
        (self.tip_epoch, self.applied)
    }

    /// A handle on the latest published position (updated at every
    /// commit and state change).
    pub fn published(&self) -> Arc<parking_lot::Mutex<Position>> {
        Arc::clone(&self.published)
    }

    fn publish(&self) {
        *self.published.lock() = self.position();
    }

    pub fn volumes(&self) -> &[ReplicaVolume] {
        &self.volumes
    }

    pub fn position(&self) -> Position {
        let s = self.state.get();
        Position {
            received: self.journal.last_seq().max(self.applied),
            durable: self.journal.durable_seq().max(self.applied),
            applied: self.applied,
            epoch: s.epoch,
            tip_epoch: self.tip_epoch,
            consistent: ReplicaState {
                applied: self.applied,
                ..s
            }
            .is_consistent(),
            new: self.new,
            resyncing: s.inconsistent,
        }
    }

    /// Adopts a newer epoch (from the primary's hello).
    pub fn set_epoch(&mut self, epoch: u64) -> Result<(), ReplicaError> {
        let s = self.state.get();
        if epoch > s.epoch {
            self.state.set(ReplicaState { epoch, ..s })?;
        }
        self.publish();
        Ok(())
    }

    /// Checks and appends a record; it is durable after [`commit`].
    pub fn receive(&mut self, entry: Entry) -> Result<(), ReplicaError> {
        let Some(volume) = self.volumes.get(entry.volume as usize) else {
            return Err(ReplicaError::NoSuchVolume {
                seq: entry.seq,
                volume: entry.volume,
                volumes: self.volumes.len(),
            });
        };
        let size = volume.image.size();
        if entry.op != EntryOp::Flush
            && entry
                .offset
                .checked_add(entry.len)
                .is_none_or(|end| end > size)
        {
            return Err(ReplicaError::OutOfRange {
                seq: entry.seq,
                volume: volume.name.clone(),
                size,
            });
        }
        self.journal.append(&entry);
        self.batch.push(entry);
        Ok(())
    }

    pub fn has_uncommitted(&self) -> bool {
        !self.batch.is_empty()
    }

    /// Syncs the journal, then applies what it made durable. Returns the
    /// durable sequence number: everything up to it is in the journal or,
    /// after a resync, reflected in the synced images.
    pub fn commit(&mut self) -> Result<u64, ReplicaError> {
        let durable = self.journal.sync()?.max(self.applied);
        for entry in std::mem::take(&mut self.batch) {
            apply(&self.volumes, &entry)?;
            self.applied = entry.seq;
            self.tip_epoch = entry.epoch;
        }
        if self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
            self.checkpoint()?;
        }
        self.publish();
        Ok(durable)
    }

    /// Syncs the images and records the applied position; releases
    /// journal segments that are no longer needed.
    pub fn checkpoint(&mut self) -> Result<(), ReplicaError> {
        for v in &self.volumes {
            v.image.sync()?;
        }
        let mut s = self.state.get();
        let consistent_now = s.consistent_at != 0 && self.applied + 1 >= s.consistent_at;
        if s.applied != self.applied || s.tip_epoch != self.tip_epoch || consistent_now {
            s.applied = self.applied;
            s.tip_epoch = self.tip_epoch;
            if consistent_now {
                s.consistent_at = 0;
                tracing::info!(group = %self.name, applied = self.applied, "replica is a consistent prefix again");
            }
            self.state.set(s)?;
        }
        self.journal.release(self.applied)?;
        self.last_checkpoint = Instant::now();
        self.publish();
        Ok(())
    }

    /// A resync starts: from now on the images are not a prefix. Records
    /// below `resume_at` are replaced by the resync's chunks.
    pub fn begin_resync(&mut self, epoch: u64, resume_at: u64) -> Result<(), ReplicaError> {
        self.commit()?;
        self.checkpoint()?;
        // Everything journaled is in the synced images now; the resync
        // redefines the position (maybe below records of another history).
        self.journal.clear()?;
        self.applied = resume_at.saturating_sub(1);
        self.resume_at = Some(resume_at);
        self.resync_epoch = epoch;
        let s = self.state.get();
        self.state.set(ReplicaState {
            epoch: epoch.max(s.epoch),
            inconsistent: true,
            ..s
        })?;
        self.publish();
        Ok(())
    }

    /// BLAKE3 hashes of `count` chunks of `chunk` bytes from `offset`
    /// (the last chunk may be short at the end of the volume).
    pub fn hashes(
        &self,
        volume: u32,
        offset: u64,
        chunk: u32,
        count: usize,
    ) -> Result<Vec<[u8; 32]>, ReplicaError> {
        let image = &self.volume(volume)?.image;
        chunk_hashes(image, offset, chunk, count)
    }

    /// Writes a resync chunk straight to the image.
    pub fn write_chunk(
        &mut self,
        volume: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ReplicaError> {
        let v = self.volume(volume)?;
        let size = v.image.size();
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > size)
        {
            return Err(ReplicaError::OutOfRange {
                seq: 0,
                volume: v.name.clone(),
                size,
            });
        }
        if data.iter().all(|b| *b == 0) {
            v.image
                .write_zeroes(offset, data.len() as u64, false, false)?;
        } else {
            v.image.write(offset, data)?;
        }
        Ok(())
    }

    /// The resync has sent everything: once every record below
    /// `consistent_at` is applied, the images are a prefix again.
    pub fn end_resync(&mut self, consistent_at: u64) -> Result<(), ReplicaError> {
        for v in &self.volumes {
            v.image.sync()?;
        }
        // The chunks reflect every change below resume_at.
        // The images now reflect the primary's sequence up to
        // resume_at - 1 (begin_resync reset the position there, also when
        // this replica had applied higher numbers of another history), plus
        // the records applied since.
        if let Some(resume_at) = self.resume_at.take() {
            self.applied = self.applied.max(resume_at.saturating_sub(1));
        }
        // The images now hold the resyncing primary's history.
        self.tip_epoch = self.resync_epoch;
        self.new = false;
        let s = self.state.get();
        self.state.set(ReplicaState {
            inconsistent: false,
            consistent_at: consistent_at.max(1),
            ..s
        })?;
        self.checkpoint()
    }

    fn volume(&self, volume: u32) -> Result<&ReplicaVolume, ReplicaError> {
        self.volumes
            .get(volume as usize)
            .ok_or(ReplicaError::NoSuchVolume {
                seq: 0,
                volume,
                volumes: self.volumes.len(),
            })
    }

    /// Applies and syncs everything received (clean stop).
    pub fn close(mut self) -> Result<(), ReplicaError> {
        self.commit()?;
        self.checkpoint()
    }
}

/// Hashes `count` chunks of an image.
pub fn chunk_hashes(
    image: &RawImage,
    offset: u64,
    chunk: u32,
    count: usize,
) -> Result<Vec<[u8; 32]>, ReplicaError> {
    let size = image.size();
    let mut out = Vec::with_capacity(count.min(4096));
    let mut buf = vec![0u8; chunk as usize];
    // Chunks wholly inside a hole hash as zeroes without being read: a
    // sparse image compares at the speed of its allocation map.
    let span = u64::from(chunk).saturating_mul(count as u64);
    let holes = hole_runs(image, offset, span)?;
    let zero_full = *blake3::hash(&vec![0u8; chunk as usize]).as_bytes();
    for i in 0..count as u64 {
        let at = offset + i * u64::from(chunk);
        if at >= size {
            break;
        }
        let n = (u64::from(chunk)).min(size - at) as usize;
        let end = at + n as u64;
        if holes.iter().any(|&(s, e)| s <= at && end <= e) {
            out.push(if n == chunk as usize {
                zero_full
            } else {
                *blake3::hash(&vec![0u8; n]).as_bytes()
            });
            continue;
        }
        image.read(at, &mut buf[..n])?;
        out.push(*blake3::hash(&buf[..n]).as_bytes());
    }
    Ok(out)
}

/// The holes of `[offset, offset + len)` as (start, end) intervals. Past
/// what the allocation map reports (it may stop early), data is assumed.
fn hole_runs(image: &RawImage, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, ReplicaError> {
    let mut holes = Vec::new();
    let mut at = offset;
    for (run, is_hole) in image.extents(offset, len, 4096)? {
        if is_hole {
            holes.push((at, at + run));
        }
        at += run;
    }
    Ok(holes)
}

fn apply(volumes: &[ReplicaVolume], entry: &Entry) -> Result<(), ReplicaError> {
    let Some(v) = volumes.get(entry.volume as usize) else {
        return Err(ReplicaError::NoSuchVolume {
            seq: entry.seq,
            volume: entry.volume,
            volumes: volumes.len(),
        });
    };
    match entry.op {
        EntryOp::Write => v.image.write(entry.offset, &entry.data)?,
        EntryOp::WriteZeroes => v
            .image
            .write_zeroes(entry.offset, entry.len, false, false)?,
        EntryOp::Trim => v.image.punch_hole(entry.offset, entry.len)?,
        EntryOp::Flush => {}
    }
    Ok(())
}
