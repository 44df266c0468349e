//! One group on a replica site: records are journaled and synced, then
//! applied in order to the images; resync chunks go straight to the images
//! while the state says "inconsistent" (docs/REPLICA.md).
//!
//! Receiving and committing overlap: [`ReplicaGroup::receive`] only encodes
//! a record into the batch being filled, and a commit hands whole batches to
//! the group's committer, which writes and syncs them in the journal and
//! then applies them, one batch after another in sequence order. So the
//! session keeps reading from the network while the journal syncs. Between
//! batches, every 2 s, the committer syncs the images and records the
//! applied position (a checkpoint). Committers run on a pool of
//! [`COMMIT_THREADS`] threads shared by every group of the process: a group
//! with batches queued is on the pool's queue once, and one thread at a
//! time commits it.

use std::collections::VecDeque;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tandem_volume::{AlignedBuf, RawImage};

use crate::diverged::{self, Divergence};
use crate::error::ReplicaError;
use crate::history::undo::{self, Change, Encoded, PointAt};
use crate::history::History;
use crate::journal::{remove_segments, Entry, Head, Journal, RecordOp};
use crate::state::{ReplicaState, StateFile};

/// Images are synced and the applied position recorded at least this often
/// while records are applied, or once the journal holds this much: this
/// bounds journal replay after a crash and the journal's size. (Rarer,
/// larger image syncs hold up the journal's own syncs behind them on the
/// same disk: 30 s made the async lag p99 at 50 MiB/s 1.4 s.)
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);
/// With history, the images are synced (and the records made durable) at
/// every FLUSH or FUA and at least this often while records arrive; an
/// idle primary's ping makes the rest durable (docs/HISTORY.md).
pub const HISTORY_SYNC_EVERY: Duration = Duration::from_millis(200);
const CHECKPOINT_BYTES: u64 = 1 << 30;
/// Bytes of received records the committer may have waiting before
/// [`ReplicaGroup::commit_in_background`] blocks the session (back-pressure).
const COMMIT_QUEUE_BYTES: usize = 32 << 20;
/// Emptied batches kept for reuse.
const SPARE_BATCHES: usize = 4;
/// Threads that commit every replica group's batches.
pub const COMMIT_THREADS: usize = 4;

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
    /// The epoch of the primary whose resync last began here.
    pub resync_epoch: u64,
    /// Bytes of the images hashed to compare them with a primary's, since
    /// the group was opened (resyncs and verifications).
    pub compared: u64,
    /// The group keeps history (docs/HISTORY.md).
    pub history: bool,
    /// The history holds a recovery point: promotable at it even in the
    /// middle of a resync.
    pub point: bool,
}

/// Received records in journal encoding, with where each one's data lies.
#[derive(Default)]
struct Batch {
    encoded: Vec<u8>,
    records: Vec<Received>,
    /// Marks (docs/HISTORY.md, "Points"): (how many of `records` precede
    /// the point, epoch, seq, time in ms).
    marks: Vec<(usize, u64, u64, u64)>,
}

struct Received {
    head: Head,
    /// Where its data lies in the batch's `encoded`.
    data: Range<usize>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.records.is_empty() && self.marks.is_empty()
    }

    /// Adds a record, in journal encoding.
    fn push(&mut self, entry: &Entry) {
        let Ok(()) = self.push_with(entry.head(), |o| {
            o.extend_from_slice(&entry.data);
            Ok::<(), std::convert::Infallible>(())
        });
    }

    /// Adds a record whose data `fill` appends (decoded straight into
    /// the batch); on an error the batch is as it was.
    fn push_with<E>(
        &mut self,
        head: Head,
        fill: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        let data = head.encode_with(&mut self.encoded, fill)?;
        self.records.push(Received { head, data });
        Ok(())
    }

    fn last(&self) -> Option<(u64, u64)> {
        self.records.last().map(|r| (r.head.epoch, r.head.seq))
    }

    fn clear(&mut self) {
        self.encoded.clear();
        self.records.clear();
        self.marks.clear();
    }
}

/// What the committer works on: everything but the batch being filled.
struct Core {
    name: String,
    volumes: Arc<Vec<ReplicaVolume>>,
    journal: Journal,
    state: StateFile,
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
    /// Bytes hashed for comparisons since the group was opened.
    compared: u64,
    /// The undo history, when kept (docs/HISTORY.md): it replaces the
    /// journal.
    history: Option<Arc<History>>,
    /// A commit's undo entries (reused).
    undo: Encoded,
    /// With history: records are in the images that no checkpoint has
    /// made durable yet (shared with the receiving side).
    unsynced: Arc<std::sync::atomic::AtomicBool>,
    /// Last record received (shared with the receiving side).
    received: Arc<AtomicU64>,
    /// The latest position, readable while a session holds the group.
    published: Arc<Mutex<Position>>,
}

/// Batches handed to the committer, and how it fares.
#[derive(Default)]
struct Handoff {
    queue: VecDeque<Batch>,
    queued_bytes: usize,
    /// The committer holds a batch it has not finished.
    busy: bool,
    /// On the pool's queue (at most once, and never while busy).
    scheduled: bool,
    /// A commit failed: nothing after it may be applied (order), and the
    /// error is reported to the next caller.
    failed: Option<ReplicaError>,
    broken: bool,
    /// Emptied batches, for reuse (no allocation per batch).
    spare: Vec<Batch>,
}

struct Committer {
    handoff: Mutex<Handoff>,
    changed: Condvar,
}

/// A group's turn on the pool. The pool holds the group's state only
/// while it commits: once the group is dropped and idle, its images are
/// closed (a group opened again at once finds them unlocked).
struct Job {
    committer: Arc<Committer>,
    core: std::sync::Weak<Mutex<Core>>,
}

/// The committer threads and the groups waiting for one.
struct Pool {
    ready: Mutex<VecDeque<Job>>,
    wake: Condvar,
}

/// The process's committer pool, started on first use.
fn pool() -> &'static Pool {
    static POOL: std::sync::OnceLock<&'static Pool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            ready: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
        }));
        for i in 0..COMMIT_THREADS {
            let spawned = std::thread::Builder::new()
                .name(format!("commit-{i}"))
                .spawn(move || pool.run());
            if let Err(e) = spawned {
                // Fewer threads commit; with none, commits wait forever:
                // say so loudly.
                tracing::error!("cannot start a replica commit thread: {e}");
            }
        }
        pool
    })
}

impl Pool {
    fn run(&self) {
        loop {
            let next = {
                let mut ready = self.ready.lock();
                loop {
                    if let Some(c) = ready.pop_front() {
                        break c;
                    }
                    self.wake.wait(&mut ready);
                }
            };
            Committer::commit_queued(next);
        }
    }

    fn push(&self, c: Job) {
        self.ready.lock().push_back(c);
        self.wake.notify_one();
    }
}

pub struct ReplicaGroup {
    name: String,
    volumes: Arc<Vec<ReplicaVolume>>,
    core: Arc<Mutex<Core>>,
    committer: Arc<Committer>,
    /// Received and not yet handed to the committer.
    batch: Batch,
    received: Arc<AtomicU64>,
    published: Arc<Mutex<Position>>,
    /// Where the images may differ, if this site served the group until
    /// it became a replica (`diverged` beside the state).
    divergence: Option<Divergence>,
    divergence_path: std::path::PathBuf,
    /// The undo history, when the group keeps one (docs/HISTORY.md).
    history: Option<Arc<History>>,
    /// Epoch of the last record received (a mark's point's epoch).
    last_epoch: u64,
    /// With history: applied records wait for a checkpoint to be durable.
    unsynced: Arc<std::sync::atomic::AtomicBool>,
}

/// How a replica group is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicaOptions {
    /// Keep an undo history (docs/HISTORY.md) with this retention; None:
    /// the redo journal alone (docs/REPLICA.md).
    pub history: Option<crate::history::Retention>,
}

/// The file of a demoted primary's divergence in a group's replica
/// directory.
const DIVERGED_FILE: &str = "diverged";
/// The undo history's directory in a group's replica directory.
const HISTORY_DIR: &str = "history";

fn remove_history(dir: &Path) -> Result<(), ReplicaError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ReplicaError::Io {
            path: dir.to_owned(),
            op: "remove the undo history",
            source,
        }),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
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
        ReplicaGroup::open_with(dir, name, volumes, ReplicaOptions::default())
    }

    /// [`ReplicaGroup::open`] with `options` (the agent's way: history as
    /// configured). With history, the images are rolled back to the last
    /// synced position of the undo log (docs/HISTORY.md, "Crash
    /// behaviour"); without, a history left from before is removed.
    pub fn open_with(
        dir: &Path,
        name: &str,
        volumes: Vec<ReplicaVolume>,
        options: ReplicaOptions,
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
        let volumes = Arc::new(volumes);
        let received = Arc::new(AtomicU64::new(0));
        let published = Arc::new(Mutex::new(Position {
            received: 0,
            durable: 0,
            applied: 0,
            epoch: 0,
            tip_epoch: 0,
            consistent: false,
            new,
            resyncing: false,
            history: false,
            point: false,
            resync_epoch: 0,
            compared: 0,
        }));
        let divergence_path = dir.join(DIVERGED_FILE);
        let divergence = match diverged::load(&divergence_path) {
            Ok(d) => d,
            Err(e) => {
                // Unknown: a primary compares everything instead.
                tracing::warn!(
                    group = name,
                    "{e}: the regions that may differ are not known"
                );
                None
            }
        };
        let mut core = Core {
            name: name.to_owned(),
            volumes: Arc::clone(&volumes),
            applied: state.get().applied,
            tip_epoch: state.get().tip_epoch,
            resync_epoch: state.get().resync_epoch,
            journal,
            state,
            last_checkpoint: Instant::now(),
            resume_at: None,
            new,
            compared: 0,
            history: None,
            undo: Encoded::default(),
            unsynced: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            received: Arc::clone(&received),
            published: Arc::clone(&published),
        };
        let replayed = {
            let Core {
                journal,
                volumes,
                applied,
                tip_epoch,
                ..
            } = &mut core;
            journal.replay(*applied, |entry| {
                apply(volumes, &entry.head(), &entry.data)?;
                *applied = entry.seq;
                *tip_epoch = entry.epoch;
                Ok(())
            })?
        };
        if replayed > 0 {
            tracing::info!(
                group = name,
                entries = replayed,
                applied = core.applied,
                "replayed the journal after a restart"
            );
        }
        let history_dir = dir.join(HISTORY_DIR);
        match options.history {
            Some(retention) => {
                let (history, rolled) = History::open(
                    &history_dir,
                    Arc::clone(&core.volumes),
                    core.state.get().history_end,
                    retention,
                )?;
                if rolled > 0 {
                    tracing::info!(
                        group = name,
                        entries = rolled,
                        applied = core.applied,
                        "rolled the images back to the history's synced end after a restart"
                    );
                }
                core.history = Some(history);
            }
            None => remove_history(&history_dir)?,
        }
        core.received.store(core.applied, Ordering::Release);
        core.checkpoint()?;
        let history = core.history.clone();
        let unsynced = Arc::clone(&core.unsynced);
        let last_epoch = core.tip_epoch;
        let core = Arc::new(Mutex::new(core));
        let committer = Arc::new(Committer {
            handoff: Mutex::new(Handoff::default()),
            changed: Condvar::new(),
        });
        Ok(ReplicaGroup {
            name: name.to_owned(),
            volumes,
            core,
            committer,
            batch: Batch::default(),
            received,
            published,
            divergence,
            divergence_path,
            history,
            last_epoch,
            unsynced,
        })
    }

    /// The group's undo history, if it keeps one.
    pub fn history(&self) -> Option<Arc<History>> {
        self.history.clone()
    }

    /// The primary captured the records up to `seq` by `time_ms` (ms
    /// since the Unix epoch, its clock): a recovery point once they are
    /// applied (`Mark`, docs/PEER.md).
    ///
    /// A mark names the last record received (the primary sends it right
    /// after that record); any other is stale and makes no point.
    /// While the images are not a prefix (a resync is writing chunks, or
    /// has not caught up), no mark makes a point (G10).
    pub fn mark(&mut self, seq: u64, time_ms: u64) {
        if self.history.is_none() || seq == 0 || seq != self.received.load(Ordering::Acquire) {
            return;
        }
        let consistent = {
            let p = self.published.lock();
            p.consistent && !p.resyncing && !p.new
        };
        if !consistent {
            return;
        }
        let n = self.batch.records.len();
        self.batch.marks.push((n, self.last_epoch, seq, time_ms));
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets up the replica state of a site that served the group until
    /// now (demotion): its images hold exactly the records up to `tip`
    /// (epoch, seq) of its own history, and its journal is empty. A stale
    /// state from an earlier time as replica is replaced. `diverged` are
    /// the regions its dirty map marked (volume, offset, length): every
    /// write another site may lack is inside them; kept beside the state
    /// until a resync has ended here (None: not known, and a primary will
    /// compare everything).
    pub fn adopt(
        dir: &Path,
        name: &str,
        volumes: Vec<ReplicaVolume>,
        tip: (u64, u64),
        epoch: u64,
        diverged: Option<Vec<(u32, u64, u64)>>,
    ) -> Result<ReplicaGroup, ReplicaError> {
        ReplicaGroup::adopt_with(
            dir,
            name,
            volumes,
            tip,
            epoch,
            diverged,
            ReplicaOptions::default(),
        )
    }

    /// [`ReplicaGroup::adopt`] with `options`: a history starts empty (the
    /// images changed without undo while this site served the group).
    pub fn adopt_with(
        dir: &Path,
        name: &str,
        volumes: Vec<ReplicaVolume>,
        tip: (u64, u64),
        epoch: u64,
        diverged: Option<Vec<(u32, u64, u64)>>,
        options: ReplicaOptions,
    ) -> Result<ReplicaGroup, ReplicaError> {
        // This site served the group: its images changed without undo,
        // so no point of an earlier time as replica can be rebuilt.
        remove_history(&dir.join(HISTORY_DIR))?;
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
        // Before the state names the tip: a divergence file always
        // belongs to the state beside it, or to none (its tip differs).
        let path = dir.join(DIVERGED_FILE);
        match diverged {
            Some(ranges) if ranges.len() <= tandem_peer::MAX_DIVERGED_RANGES => {
                diverged::store(&path, &Divergence { tip, ranges })?;
            }
            _ => diverged::remove(&path)?,
        }
        let mut state = StateFile::open(&dir.join("state"))?;
        state.set(ReplicaState {
            epoch: epoch.max(tip.0),
            applied: tip.1,
            consistent_at: 0,
            inconsistent: false,
            tip_epoch: tip.0,
            resync_epoch: 0,
            history_end: 0,
        })?;
        drop(state);
        ReplicaGroup::open_with(dir, name, volumes, options)
    }

    /// What this replica tells a primary after its welcome (docs/PEER.md,
    /// "Divergence"): the epoch of the last resync that began here, and
    /// the regions its images may differ in when it served the group
    /// until it became a replica — known only while the images still hold
    /// exactly what they held then (same tip, consistent, no resync since).
    pub fn divergence(&self) -> tandem_peer::Diverged {
        let core = self.core.lock();
        let p = core.position();
        let known = self.divergence.as_ref().filter(|d| {
            p.consistent && !p.new && !p.resyncing && d.tip == (core.tip_epoch, core.applied)
        });
        tandem_peer::Diverged {
            resync_epoch: core.state.get().resync_epoch,
            known: known.is_some(),
            ranges: known.map(|d| d.ranges.clone()).unwrap_or_default(),
        }
    }

    /// The records the images hold: (epoch, seq) of the last one applied.
    pub fn tip(&self) -> (u64, u64) {
        let core = self.core.lock();
        (core.tip_epoch, core.applied)
    }

    /// A handle on the latest published position (updated at every
    /// commit and state change).
    pub fn published(&self) -> Arc<Mutex<Position>> {
        Arc::clone(&self.published)
    }

    /// The latest published position, without waiting for a commit in
    /// progress (what a session acknowledges).
    pub fn progress(&self) -> Position {
        let mut p = *self.published.lock();
        p.received = p.received.max(self.received.load(Ordering::Acquire));
        p
    }

    pub fn volumes(&self) -> &[ReplicaVolume] {
        &self.volumes
    }

    /// The exact position (waits for a commit in progress).
    pub fn position(&self) -> Position {
        self.core.lock().position()
    }

    /// Adopts a newer epoch (from the primary's hello).
    pub fn set_epoch(&mut self, epoch: u64) -> Result<(), ReplicaError> {
        let mut core = self.core.lock();
        let s = core.state.get();
        if epoch > s.epoch {
            core.state.set(ReplicaState { epoch, ..s })?;
        }
        core.publish();
        Ok(())
    }

    /// Checks a record and adds it to the batch being filled; it is durable
    /// after the next commit.
    pub fn receive(&mut self, entry: &Entry) -> Result<(), ReplicaError> {
        let head = entry.head();
        self.check_record(&head)?;
        self.batch.push(entry);
        self.received_up_to(&head);
        Ok(())
    }

    /// [`ReplicaGroup::receive`] for a record as it came from the
    /// primary: its payload is decoded straight into the batch.
    pub fn receive_record(&mut self, r: &tandem_peer::Record) -> Result<(), ReplicaError> {
        let head = Head {
            epoch: r.epoch,
            seq: r.seq,
            volume: r.volume,
            op: r.op,
            fua: r.fua,
            offset: r.offset,
            len: r.len,
        };
        self.check_record(&head)?;
        self.batch
            .push_with(head, |out| {
                if r.op == RecordOp::Write {
                    r.data.decode_append(out)
                } else {
                    Ok(())
                }
            })
            .map_err(|source| ReplicaError::Payload { seq: r.seq, source })?;
        self.received_up_to(&head);
        Ok(())
    }

    /// A record names a volume of the group and stays inside it.
    fn check_record(&self, head: &Head) -> Result<(), ReplicaError> {
        let Some(volume) = self.volumes.get(head.volume as usize) else {
            return Err(ReplicaError::NoSuchVolume {
                seq: head.seq,
                volume: head.volume,
                volumes: self.volumes.len(),
            });
        };
        let size = volume.image.size();
        if head.op != RecordOp::Flush
            && head
                .offset
                .checked_add(head.len)
                .is_none_or(|end| end > size)
        {
            return Err(ReplicaError::OutOfRange {
                seq: head.seq,
                volume: volume.name.clone(),
                size,
            });
        }
        Ok(())
    }

    fn received_up_to(&mut self, head: &Head) {
        self.last_epoch = head.epoch;
        self.received.store(head.seq, Ordering::Release);
    }

    /// Rolls the images back to `point` of the history (docs/HISTORY.md,
    /// H3): the state first says the images hold exactly the point, with
    /// the log's synced end right after it, so that a crash part way
    /// finishes the rollback at the next open. The history after the
    /// point is gone afterwards; a caller that keeps it for forensics
    /// saves [`History::changed_since`] ranges first.
    pub fn roll_back_to(&mut self, point: crate::history::Point) -> Result<(), ReplicaError> {
        let Some(history) = self.history.clone() else {
            return Err(ReplicaError::Corrupt {
                path: self.divergence_path.with_file_name(HISTORY_DIR),
                reason: "the group keeps no history to roll back with".into(),
            });
        };
        self.commit()?;
        self.committer.wait_idle()?;
        let mut core = self.core.lock();
        core.checkpoint()?;
        let s = core.state.get();
        let end = point.pos + crate::history::entry::HEADER_LEN as u64;
        core.state.set(ReplicaState {
            applied: point.seq,
            tip_epoch: point.epoch,
            consistent_at: 0,
            inconsistent: false,
            history_end: end,
            ..s
        })?;
        history.roll_back(point)?;
        core.applied = point.seq;
        core.tip_epoch = point.epoch;
        core.resume_at = None;
        core.new = false;
        self.received.store(point.seq, Ordering::Release);
        self.last_epoch = point.epoch;
        core.checkpoint()?;
        core.publish();
        tracing::info!(group = %self.name, seq = point.seq, epoch = point.epoch, time_ms = point.time_ms, "rolled the images back to a recovery point");
        Ok(())
    }

    /// Records received and not yet handed to the committer.
    pub fn has_batch(&self) -> bool {
        !self.batch.is_empty()
    }

    /// Records received and not yet committed (or being committed).
    pub fn has_uncommitted(&self) -> bool {
        if !self.batch.is_empty() || self.unsynced.load(Ordering::Acquire) {
            return true;
        }
        let h = self.committer.handoff.lock();
        h.busy || !h.queue.is_empty()
    }

    /// Hands the records received so far to the committer without waiting
    /// for them, unless it is already [`COMMIT_QUEUE_BYTES`] behind. Their
    /// durability shows in [`ReplicaGroup::progress`] once synced.
    pub fn commit_in_background(&mut self) -> Result<(), ReplicaError> {
        self.hand_over(true).map(|_| ())
    }

    /// [`ReplicaGroup::commit_in_background`] unless it would wait: false
    /// when the committer is [`COMMIT_QUEUE_BYTES`] behind (nothing was
    /// handed over; call `commit_in_background` where waiting is fine).
    pub fn try_commit_in_background(&mut self) -> Result<bool, ReplicaError> {
        self.hand_over(false)
    }

    fn hand_over(&mut self, wait: bool) -> Result<bool, ReplicaError> {
        if self.batch.is_empty() {
            return self.committer.check().map(|()| true);
        }
        let mut h = self.committer.handoff.lock();
        while !h.broken && h.queued_bytes >= COMMIT_QUEUE_BYTES {
            if !wait {
                return Ok(false);
            }
            self.committer.changed.wait(&mut h);
        }
        if h.broken {
            return Err(h.take_failure());
        }
        let spare = h.spare.pop().unwrap_or_default();
        let batch = std::mem::replace(&mut self.batch, spare);
        h.queued_bytes += batch.encoded.len();
        h.queue.push_back(batch);
        if !h.busy && !h.scheduled {
            h.scheduled = true;
            pool().push(Job {
                committer: Arc::clone(&self.committer),
                core: Arc::downgrade(&self.core),
            });
        }
        Ok(true)
    }

    /// Syncs the journal, then applies what it made durable. Returns the
    /// durable sequence number: everything up to it is in the journal or,
    /// after a resync, reflected in the synced images.
    pub fn commit(&mut self) -> Result<u64, ReplicaError> {
        self.commit_in_background()?;
        self.committer.wait_idle()?;
        let mut core = self.core.lock();
        if core.history.is_some() && core.unsynced.load(Ordering::Acquire) {
            core.checkpoint()?;
        }
        Ok(core.position().durable)
    }

    /// Syncs the images and records the applied position; releases
    /// journal segments that are no longer needed.
    pub fn checkpoint(&mut self) -> Result<(), ReplicaError> {
        self.committer.wait_idle()?;
        self.core.lock().checkpoint()
    }

    /// A resync starts: from now on the images are not a prefix. Records
    /// below `resume_at` are replaced by the resync's chunks.
    pub fn begin_resync(&mut self, epoch: u64, resume_at: u64) -> Result<(), ReplicaError> {
        self.commit()?;
        self.committer.wait_idle()?;
        let mut core = self.core.lock();
        core.checkpoint()?;
        // Everything journaled is in the synced images now; the resync
        // redefines the position (maybe below records of another history).
        core.journal.clear()?;
        core.applied = resume_at.saturating_sub(1);
        self.received.store(core.applied, Ordering::Release);
        core.resume_at = Some(resume_at);
        core.resync_epoch = epoch;
        let s = core.state.get();
        core.state.set(ReplicaState {
            epoch: epoch.max(s.epoch),
            inconsistent: true,
            resync_epoch: epoch,
            ..s
        })?;
        core.publish();
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
        if !tandem_peer::chunk_ok(chunk) || count > tandem_peer::MAX_HASHES {
            return Err(ReplicaError::BadChunks { chunk, count });
        }
        self.committer.wait_idle()?;
        let image = &self.volume(volume)?.image;
        let hashes = chunk_hashes(image, offset, chunk, count)?;
        let bytes =
            (hashes.len() as u64 * u64::from(chunk)).min(image.size().saturating_sub(offset));
        let mut core = self.core.lock();
        core.compared += bytes;
        core.publish();
        Ok(hashes)
    }

    /// Writes a resync chunk straight to the image.
    pub fn write_chunk(
        &mut self,
        volume: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ReplicaError> {
        self.committer.wait_idle()?;
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
        // The resync's overwrites are undoable too (docs/HISTORY.md, H1),
        // unless no point exists to go back to (a new replica's first
        // sync): nothing could use their old data.
        if let Some(history) = self.history.as_ref().filter(|h| h.latest().is_some()) {
            let mut core = self.core.lock();
            let Core { undo, .. } = &mut *core;
            undo.clear();
            let change = Change {
                epoch: 0,
                seq: 0,
                volume,
                offset,
                len: data.len() as u64,
                data,
                zero: false,
            };
            let images: Vec<&RawImage> = self.volumes.iter().map(|v| &*v.image).collect();
            undo::build(&images, &[change], &[], undo)?;
            history.append(undo)?;
            history.sync()?;
        }
        if tandem_peer::is_zero(data) {
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
        // The primary that ran this resync keeps what it owes in its own
        // dirty map: this site's divergence is told once, and obsolete.
        if self.divergence.take().is_some() {
            diverged::remove(&self.divergence_path)?;
        }
        self.committer.wait_idle()?;
        let mut core = self.core.lock();
        for v in core.volumes.iter() {
            v.image.sync()?;
        }
        // The chunks reflect every change below resume_at.
        // The images now reflect the primary's sequence up to
        // resume_at - 1 (begin_resync reset the position there, also when
        // this replica had applied higher numbers of another history), plus
        // the records applied since.
        if let Some(resume_at) = core.resume_at.take() {
            core.applied = core.applied.max(resume_at.saturating_sub(1));
        }
        // The images now hold the resyncing primary's history.
        core.tip_epoch = core.resync_epoch;
        core.new = false;
        let s = core.state.get();
        core.state.set(ReplicaState {
            inconsistent: false,
            consistent_at: consistent_at.max(1),
            ..s
        })?;
        core.checkpoint()
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

impl Drop for ReplicaGroup {
    fn drop(&mut self) {
        // What was handed over is committed (as far as it can be).
        let _ = self.committer.wait_idle();
    }
}

impl Handoff {
    fn fail(&mut self, e: ReplicaError) {
        if self.failed.is_none() {
            self.failed = Some(e);
        }
        self.broken = true;
        self.queue.clear();
        self.queued_bytes = 0;
    }

    fn take_failure(&mut self) -> ReplicaError {
        self.failed.take().unwrap_or_else(|| ReplicaError::Corrupt {
            path: std::path::PathBuf::from("(replica journal)"),
            reason: "an earlier commit failed; nothing after it is applied".into(),
        })
    }
}

impl Committer {
    /// One turn on a pool thread: journal, sync and apply every batch
    /// queued so far (group commit: whatever queued up while the last
    /// sync ran goes to the journal with one sync); back on the pool's
    /// queue if more arrived meanwhile.
    fn commit_queued(job: Job) {
        let Job { committer, core } = job;
        let this = &*committer;
        {
            let mut taken: Vec<Batch> = {
                let mut h = this.handoff.lock();
                h.scheduled = false;
                if h.queue.is_empty() || h.broken {
                    return;
                }
                h.queued_bytes = 0;
                h.busy = true;
                h.queue.drain(..).collect()
            };
            let result = match core.upgrade() {
                Some(core) => {
                    // (The lock is let go before a checkpoint takes it
                    // again.)
                    let committed = core.lock().commit(&taken);
                    match committed {
                        // Between batches, so image and journal syncs
                        // never compete for the disk.
                        Ok(true) => Core::checkpoint_unlocked(&core),
                        Ok(false) => Ok(()),
                        Err(e) => Err(e),
                    }
                }
                // Unreachable while batches wait (the group waits for
                // its committer before it goes): nothing to commit to.
                None => Ok(()),
            };
            taken.iter_mut().for_each(Batch::clear);
            let mut h = this.handoff.lock();
            h.busy = false;
            h.spare.append(&mut taken);
            h.spare.truncate(SPARE_BATCHES);
            if let Err(e) = result {
                tracing::error!("replica commit failed: {e}");
                h.fail(e);
            }
            if !h.queue.is_empty() && !h.broken {
                h.scheduled = true;
                pool().push(Job {
                    committer: Arc::clone(&committer),
                    core,
                });
            }
            this.changed.notify_all();
        }
    }

    /// Waits until every handed batch is committed.
    fn wait_idle(&self) -> Result<(), ReplicaError> {
        let mut h = self.handoff.lock();
        while !h.broken && (h.busy || !h.queue.is_empty()) {
            self.changed.wait(&mut h);
        }
        if h.broken {
            return Err(h.take_failure());
        }
        Ok(())
    }

    fn check(&self) -> Result<(), ReplicaError> {
        let mut h = self.handoff.lock();
        if h.broken {
            return Err(h.take_failure());
        }
        Ok(())
    }
}

impl Core {
    fn publish(&self) {
        *self.published.lock() = self.position();
    }

    fn position(&self) -> Position {
        let s = self.state.get();
        Position {
            received: self
                .received
                .load(Ordering::Acquire)
                .max(self.journal.durable_seq())
                .max(self.applied),
            // With history, durable once a checkpoint synced the images.
            durable: if self.history.is_some() {
                s.applied
            } else {
                self.journal.durable_seq().max(self.applied)
            },
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
            resync_epoch: s.resync_epoch,
            compared: self.compared,
            history: self.history.is_some(),
            point: self.history.as_ref().is_some_and(|h| h.latest().is_some()),
        }
    }

    /// Journals and syncs batches (in the order received, with one sync),
    /// then applies them. True when a checkpoint is due.
    fn commit(&mut self, batches: &[Batch]) -> Result<bool, ReplicaError> {
        if let Some(history) = self.history.clone() {
            return self.commit_with_history(batches, &history).map(|()| false);
        }
        let Some((last_epoch, last)) = batches.iter().rev().find_map(Batch::last) else {
            return Ok(false);
        };
        let parts: Vec<&[u8]> = batches.iter().map(|b| b.encoded.as_slice()).collect();
        self.journal.write_encoded(&parts, last)?;
        self.publish();
        for batch in batches {
            for r in &batch.records {
                let data = batch.encoded.get(r.data.clone()).unwrap_or_default();
                apply(&self.volumes, &r.head, data)?;
            }
        }
        self.applied = last;
        self.tip_epoch = last_epoch;
        self.publish();
        Ok(self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY
            || self.journal.bytes() >= CHECKPOINT_BYTES)
    }

    /// With history (docs/HISTORY.md, "Commit, with history"): the undo
    /// entries are written and synced, then the records applied and the
    /// images synced, then the state records both: only then are the
    /// records durable.
    fn commit_with_history(
        &mut self,
        batches: &[Batch],
        history: &History,
    ) -> Result<(), ReplicaError> {
        let records: usize = batches.iter().map(|b| b.records.len()).sum();
        let mut changes = Vec::with_capacity(records);
        let mut points = Vec::new();
        let point_at = |after, &(_, epoch, seq, time_ms): &(usize, u64, u64, u64)| PointAt {
            after,
            epoch,
            seq,
            time_ms,
        };
        for batch in batches {
            let mut marks = batch.marks.iter().peekable();
            for (i, r) in batch.records.iter().enumerate() {
                while let Some(m) = marks.next_if(|m| m.0 <= i) {
                    points.push(point_at(changes.len(), m));
                }
                let h = &r.head;
                if h.op == RecordOp::Flush {
                    continue;
                }
                changes.push(Change {
                    epoch: h.epoch,
                    seq: h.seq,
                    volume: h.volume,
                    offset: h.offset,
                    len: h.len,
                    data: batch.encoded.get(r.data.clone()).unwrap_or_default(),
                    zero: h.op != RecordOp::Write,
                });
            }
            for m in marks {
                points.push(point_at(changes.len(), m));
            }
        }
        let images: Vec<&RawImage> = self.volumes.iter().map(|v| &*v.image).collect();
        self.undo.clear();
        undo::build(&images, &changes, &points, &mut self.undo)?;
        let start = history.append(&self.undo)?;
        history.sync()?;
        for batch in batches {
            for r in &batch.records {
                let data = batch.encoded.get(r.data.clone()).unwrap_or_default();
                apply(&self.volumes, &r.head, data)?;
            }
        }
        history.add_points(start, &self.undo);
        if let Some((last_epoch, last)) = batches.iter().rev().find_map(Batch::last) {
            self.applied = last;
            self.tip_epoch = last_epoch;
        }
        let flush = batches
            .iter()
            .flat_map(|b| &b.records)
            .any(|r| r.head.op == RecordOp::Flush || r.head.fua);
        // The session commits every HISTORY_SYNC_EVERY (or sooner, when
        // 8 MiB wait): such a commit is a checkpoint, whatever a sync took.
        if flush || self.last_checkpoint.elapsed() >= HISTORY_SYNC_EVERY * 3 / 4 {
            for v in self.volumes.iter() {
                v.image.sync()?;
            }
            self.record_checkpoint(self.applied, self.tip_epoch)?;
        } else {
            self.unsynced.store(true, Ordering::Release);
            self.publish();
        }
        history.trim(now_ms())
    }

    /// Syncs the images and records what they hold (caller holds the lock
    /// throughout: nothing is applied meanwhile).
    fn checkpoint(&mut self) -> Result<(), ReplicaError> {
        for v in self.volumes.iter() {
            v.image.sync()?;
        }
        let done = self.record_checkpoint(self.applied, self.tip_epoch)?;
        remove_segments(done)
    }

    /// [`Core::checkpoint`] without holding the lock while the images sync
    /// (status and position readers do not wait). Called by the committer
    /// between batches, so nothing is applied meanwhile, and resync steps
    /// wait for the committer: the position cannot change underneath.
    fn checkpoint_unlocked(core: &Mutex<Core>) -> Result<(), ReplicaError> {
        let (volumes, applied, tip) = {
            let c = core.lock();
            (Arc::clone(&c.volumes), c.applied, c.tip_epoch)
        };
        for v in volumes.iter() {
            v.image.sync()?;
        }
        let done = core.lock().record_checkpoint(applied, tip)?;
        remove_segments(done)
    }

    /// Records that the images durably hold everything up to `applied`
    /// (epoch `tip`); returns the journal files to delete (applied segments
    /// become spares under the lock; see docs/REPLICA.md, "Recycled segments").
    fn record_checkpoint(
        &mut self,
        applied: u64,
        tip: u64,
    ) -> Result<Vec<std::path::PathBuf>, ReplicaError> {
        let mut s = self.state.get();
        let consistent_now = s.consistent_at != 0 && applied + 1 >= s.consistent_at;
        let history_end = self.history.as_ref().map_or(0, |h| h.end());
        if s.applied != applied
            || s.tip_epoch != tip
            || consistent_now
            || s.history_end != history_end
        {
            s.applied = applied;
            s.tip_epoch = tip;
            s.history_end = history_end;
            if consistent_now {
                s.consistent_at = 0;
                tracing::info!(group = %self.name, applied, "replica is a consistent prefix again");
            }
            self.state.set(s)?;
        }
        let done = self.journal.detach_applied(applied);
        self.last_checkpoint = Instant::now();
        if applied == self.applied {
            self.unsynced.store(false, Ordering::Release);
        }
        self.publish();
        Ok(done)
    }
}

/// Bytes a compare reads at once: runs of chunks holding data.
const HASH_READ: u64 = 1 << 20;

/// What [`chunk_hashes`] does with the next piece of its range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HashPiece {
    /// A chunk wholly inside a hole, of this many bytes: hashed as zeroes.
    Hole(u32),
    /// Chunks holding data: read at once, hashed each.
    Data { at: u64, len: usize },
}

impl HashPiece {
    /// Where to read, for chunks holding data.
    fn run(self) -> Option<(u64, usize)> {
        match self {
            HashPiece::Data { at, len } => Some((at, len)),
            HashPiece::Hole(_) => None,
        }
    }
}

/// Hashes `count` chunks of an image. The image is read around the page
/// cache ([`RawImage::read_uncached`]): a compare scans whole images, and
/// filling the cache with them cost more CPU than the hashing, and evicted
/// what the VM's I/O keeps there. While one run of chunks is hashed, the
/// next is read (a compare runs at the disk's speed, not at the sum of
/// read and hash times).
pub fn chunk_hashes(
    image: &RawImage,
    offset: u64,
    chunk: u32,
    count: usize,
) -> Result<Vec<[u8; 32]>, ReplicaError> {
    let pieces = hash_pieces(image, offset, chunk, count)?;
    let mut out = Vec::with_capacity(count.min(4096));
    let zero_full = *blake3::hash(&vec![0u8; chunk as usize]).as_bytes();
    let mut hash_piece = |piece: HashPiece, data: &[u8]| match piece {
        HashPiece::Hole(n) if n == chunk => out.push(zero_full),
        HashPiece::Hole(n) => out.push(*blake3::hash(&vec![0u8; n as usize]).as_bytes()),
        HashPiece::Data { .. } => out.extend(
            data.chunks(chunk as usize)
                .map(|piece| *blake3::hash(piece).as_bytes()),
        ),
    };
    let runs = || pieces.iter().filter_map(|p| p.run());
    let buf_len = runs().map(|r| r.1).max().unwrap_or(0);
    if runs().nth(1).is_none() {
        // Nothing to overlap: read in place.
        let mut buf = AlignedBuf::new(buf_len);
        for &piece in &pieces {
            let data = match piece.run() {
                Some((at, len)) => {
                    let data = &mut buf.bytes_mut()[..len];
                    image.read_uncached(at, data)?;
                    &*data
                }
                None => &[],
            };
            hash_piece(piece, data);
        }
        return Ok(out);
    }
    std::thread::scope(|s| -> Result<(), ReplicaError> {
        // Two buffers: one being hashed here, one being read there.
        let (full_tx, full_rx) = std::sync::mpsc::sync_channel(1);
        let (free_tx, free_rx) = std::sync::mpsc::channel();
        for _ in 0..2 {
            let _ = free_tx.send(AlignedBuf::new(buf_len));
        }
        std::thread::Builder::new()
            .name("compare-read".into())
            .spawn_scoped(s, move || {
                for (at, len) in runs() {
                    let Ok(mut buf): Result<AlignedBuf, _> = free_rx.recv() else {
                        return; // the hashing side stopped
                    };
                    let read = image.read_uncached(at, &mut buf.bytes_mut()[..len]);
                    let failed = read.is_err();
                    if full_tx.send(read.map(|()| buf)).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(ReplicaError::Spawn)?;
        for &piece in &pieces {
            match piece {
                HashPiece::Hole(_) => hash_piece(piece, &[]),
                HashPiece::Data { len, .. } => {
                    let buf = full_rx.recv().map_err(|_| ReplicaError::ReaderGone)??;
                    hash_piece(piece, &buf.bytes()[..len]);
                    let _ = free_tx.send(buf);
                }
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// The pieces of `count` chunks from `offset`: chunks wholly inside a hole
/// are hashed as zeroes without being read (a sparse image compares at the
/// speed of its allocation map); runs of chunks holding data are read at
/// once, up to [`HASH_READ`] bytes.
fn hash_pieces(
    image: &RawImage,
    offset: u64,
    chunk: u32,
    count: usize,
) -> Result<Vec<HashPiece>, ReplicaError> {
    let size = image.size();
    let chunk_len = u64::from(chunk);
    let span = chunk_len.saturating_mul(count as u64);
    let holes = hole_runs(image, offset, span)?;
    let in_hole = |at: u64| {
        let end = (at + chunk_len).min(size);
        holes.iter().any(|&(s, e)| s <= at && end <= e)
    };
    // Chunks per read (a chunk is at most HASH_READ bytes).
    let per_read: u32 = (HASH_READ / chunk_len).max(1).try_into().unwrap_or(1);
    // Bytes from `at` to the end of the image, if fewer than `max`.
    let left = |at: u64, max: usize| usize::try_from(size - at).map_or(max, |n| n.min(max));
    let ends = offset.saturating_add(span).min(size.max(offset));
    let mut pieces = Vec::new();
    let mut at = offset;
    while at < ends {
        if in_hole(at) {
            let n = u32::try_from(size - at).map_or(chunk, |n| n.min(chunk));
            pieces.push(HashPiece::Hole(n));
            at += chunk_len;
            continue;
        }
        let mut run = 1;
        while run < per_read
            && at + u64::from(run) * chunk_len < ends
            && !in_hole(at + u64::from(run) * chunk_len)
        {
            run += 1;
        }
        // At most max(HASH_READ, one chunk).
        let len = left(at, run as usize * chunk as usize);
        let run = u64::from(run);
        pieces.push(HashPiece::Data { at, len });
        at += run * chunk_len;
    }
    Ok(pieces)
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

/// Applies a record (its data, for a write) to its volume's image.
fn apply(volumes: &[ReplicaVolume], head: &Head, data: &[u8]) -> Result<(), ReplicaError> {
    let Some(v) = volumes.get(head.volume as usize) else {
        return Err(ReplicaError::NoSuchVolume {
            seq: head.seq,
            volume: head.volume,
            volumes: volumes.len(),
        });
    };
    match head.op {
        RecordOp::Write => v.image.write(head.offset, data)?,
        RecordOp::WriteZeroes => v.image.write_zeroes(head.offset, head.len, false, false)?,
        RecordOp::Trim => v.image.punch_hole(head.offset, head.len)?,
        RecordOp::Flush => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(batch: &mut Batch, seq: u64, fill: u8) {
        batch.push(&Entry {
            epoch: 1,
            seq,
            volume: 0,
            op: RecordOp::Write,
            fua: false,
            offset: seq * 4096,
            len: 4096,
            data: vec![fill; 4096],
        });
    }

    #[test]
    fn a_record_decoded_into_the_batch_is_its_journal_entry_and_a_refused_one_leaves_nothing() {
        let mut batch = Batch::default();
        add(&mut batch, 1, 0xa1);
        let second = Entry {
            epoch: 2,
            seq: 2,
            volume: 0,
            op: RecordOp::Write,
            fua: true,
            offset: 8192,
            len: 4096,
            data: vec![0xb2; 4096],
        };
        let payload = tandem_peer::payload::Payload::raw(second.data.clone());
        batch
            .push_with(second.head(), |o| payload.decode_append(o))
            .unwrap();
        let mut want = Vec::new();
        Entry {
            epoch: 1,
            seq: 1,
            volume: 0,
            op: RecordOp::Write,
            fua: false,
            offset: 4096,
            len: 4096,
            data: vec![0xa1; 4096],
        }
        .encode(&mut want);
        second.encode(&mut want);
        assert_eq!(batch.encoded, want);
        let r = &batch.records[1];
        assert_eq!((r.head.seq, r.head.fua, r.data.len()), (2, true, 4096));
        assert!(batch.encoded[r.data.clone()].iter().all(|&b| b == 0xb2));

        // Claimed zstd that is not: refused, and the batch is unchanged.
        let bad = tandem_peer::payload::Payload {
            encoding: tandem_peer::payload::Encoding::Zstd,
            raw_len: 4096,
            bytes: vec![1, 2, 3, 4].into(),
        };
        let third = Entry { seq: 3, ..second };
        assert!(batch
            .push_with(third.head(), |o| bad.decode_append(o))
            .is_err());
        assert_eq!(batch.encoded, want);
        assert_eq!(batch.records.len(), 2);
        assert_eq!(batch.last(), Some((2, 2)));
    }
}
