//! Ordered change capture for one group (docs/CAPTURE.md): every change to
//! any of the group's volumes gets the next sequence number in the order it
//! reaches the images, and is queued for each replica.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tandem_volume::{RawImage, VolumeError};

use crate::dirty::{regions_of, DirtyMap};
use crate::error::CaptureError;
use crate::fine::FineDirty;
use crate::queue::{Pressure, Queue, QueueOptions};
use crate::seq::SeqAllocator;
use crate::spill::{self, Cursor};

/// Fixed per-record overhead counted against `queue_memory`.
const RECORD_OVERHEAD: usize = 96;
/// Regions (4 MiB) handed out per resync part: 1 GiB. A part is confirmed
/// (`ResyncDone`) before the next starts, so an interrupted resync starts
/// again from the first part not confirmed, not from the beginning.
pub const RESYNC_PART_REGIONS: usize = 256;

/// One captured change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    /// Index of the volume in the group.
    pub volume: u32,
    pub op: Op,
    /// When it was captured (for lag in seconds).
    pub at: Instant,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Write {
        offset: u64,
        /// Shared, not copied, from the capture to the wire.
        data: bytes::Bytes,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Flush,
}

impl Op {
    /// The byte range the change touches.
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            Op::Write { offset, data, .. } => Some((*offset, data.len() as u64)),
            Op::WriteZeroes { offset, len, .. } | Op::Trim { offset, len, .. } => {
                Some((*offset, *len))
            }
            Op::Flush => None,
        }
    }

    /// What the record costs against `queue_memory`.
    pub(crate) fn cost(&self) -> usize {
        RECORD_OVERHEAD
            + match self {
                Op::Write { data, .. } => data.len(),
                _ => 0,
            }
    }
}

/// What a replica's consumer gets next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Record(Arc<Record>),
    /// Records were dropped before this replica acknowledged them (or the
    /// agent restarted): copy these ranges of each volume (indexed like the
    /// group's volumes) from the primary, then continue with the records
    /// from `resume_at`. [`GroupCapture::resync_done`] says the copy is
    /// complete. A long resync comes in parts of at most
    /// [`RESYNC_PART_REGIONS`] regions: `more` bytes are still owed after
    /// this one (0: the last part), and the next part is handed out once
    /// this one is confirmed.
    Resync {
        ranges: Vec<Vec<(u64, u64)>>,
        resume_at: u64,
        more: u64,
    },
}

/// A volume of the group.
pub struct CaptureVolume {
    pub name: String,
    pub image: Arc<RawImage>,
}

struct Replica {
    name: String,
    /// Every record up to here is durable on the replica.
    acked: u64,
    /// Every record up to here has reached the replica (maybe not durable).
    received: u64,
    /// A replication session is up.
    connected: bool,
    /// The next record to hand out.
    next: u64,
    /// Records below this are not needed any more (acknowledged, or
    /// covered by a resync).
    floor: u64,
    /// Too far behind for the memory queue: its changes go to `gap`
    /// directly, until its consumer takes the resync.
    overflowed: bool,
    /// Ranges owed outside the record stream (per volume).
    gap: Vec<FineDirty>,
    /// Ranges handed out in a resync that is not yet acknowledged, and the
    /// sequence number whose acknowledgement completes it.
    resyncing: Option<(Vec<FineDirty>, u64)>,
    /// Since when it has owed ranges outside the stream (for lag).
    behind_since: Option<Instant>,
    /// Its place in the spill, when it reads from there.
    cursor: Option<Cursor>,
}

impl Replica {
    fn owe(&mut self, volume: usize, op: &Op) {
        if let Some((offset, len)) = op.range() {
            self.gap[volume].add(offset, len);
        }
    }
}

struct State {
    seq: SeqAllocator,
    queue: Queue,
    replicas: Vec<Replica>,
    /// Persistent dirty maps, one per volume; empty without replicas.
    maps: Vec<DirtyMap>,
    /// Volume sizes, indexed like the maps.
    sizes: Vec<u64>,
    /// Latest sequence number that touched each (volume, region).
    last_write: HashMap<(usize, u64), u64>,
    /// The lowest acknowledged seq at each of the last two periodic clears.
    clear_passes: VecDeque<u64>,
    dropped_records: u64,
}

impl State {
    /// The queue is over its limit: the streaming replica that is furthest
    /// behind stops holding records; what it still needs becomes dirty
    /// ranges (docs/CAPTURE.md). False if no replica was streaming.
    fn overflow_laggard(&mut self) -> bool {
        let Some(i) = self
            .replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.overflowed)
            .min_by_key(|(_, r)| r.floor)
            .map(|(i, _)| i)
        else {
            self.dropped_records += self.trim();
            return false;
        };
        let r = &mut self.replicas[i];
        let floor = r.floor;
        let owed = self.queue.visit_from(floor, |volume, range| {
            if let (Some(gap), Some((offset, len))) = (r.gap.get_mut(volume as usize), range) {
                gap.add(offset, len);
            }
        });
        tracing::warn!(
            replica = %r.name,
            acked = r.acked,
            "replica too far behind for the queue: tracking dirty regions instead"
        );
        match owed {
            Ok(()) => {
                r.overflowed = true;
                r.behind_since.get_or_insert_with(Instant::now);
                self.dropped_records += self.trim();
            }
            Err(e) => self.fall_back(i, &e),
        }
        true
    }

    /// The spill failed the replica `i` (a damaged frame, an I/O error):
    /// the records it lacks are unknown, so it owes every region of the
    /// persistent map, which covers every change it has not acknowledged
    /// (invariants D1, D2), and stops holding records.
    fn fall_back(&mut self, i: usize, error: &spill::SpillError) {
        let r = &mut self.replicas[i];
        tracing::warn!(
            replica = %r.name,
            acked = r.acked,
            %error,
            "cannot read the queue's spill: the replica resyncs every marked region instead"
        );
        for ((gap, map), &size) in r.gap.iter_mut().zip(&self.maps).zip(&self.sizes) {
            for (offset, len) in map.ranges(size) {
                for region in regions_of(offset, len) {
                    gap.add_region(region);
                }
            }
        }
        r.overflowed = true;
        r.cursor = None;
        r.behind_since.get_or_insert_with(Instant::now);
        self.dropped_records += self.trim();
    }

    /// Drops records no streaming replica needs; returns how many.
    fn trim(&mut self) -> u64 {
        let mut released = Vec::new();
        self.trim_into(&mut released)
    }

    /// [`State::trim`], handing the released records to the caller.
    fn trim_into(&mut self, released: &mut Vec<Arc<Record>>) -> u64 {
        let floor = self
            .replicas
            .iter()
            .filter(|r| !r.overflowed)
            .map(|r| r.floor)
            .min()
            .unwrap_or(u64::MAX);
        self.queue.trim_below_into(floor, released)
    }

    /// Brings the queue back within its limits after a record was added:
    /// spills its oldest records, overflows the replicas furthest behind.
    fn relieve(&mut self) {
        loop {
            match self.queue.pressure() {
                Pressure::Fits => return,
                Pressure::Spill => {
                    if let Err(e) = self.queue.spill_oldest() {
                        tracing::warn!(
                            error = %e,
                            "cannot spill the replication queue to disk: falling back to dirty regions"
                        );
                        if !self.overflow_laggard() {
                            return;
                        }
                    }
                }
                Pressure::Overflow => {
                    if !self.overflow_laggard() {
                        return;
                    }
                }
            }
        }
    }
}

/// How far a replica is behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lag {
    pub bytes: u64,
    /// Capture time of the oldest change the replica lacks.
    pub oldest: Option<Instant>,
    pub acked: u64,
    /// Owes ranges outside the record stream (resync pending or running).
    pub resyncing: bool,
}

/// Counters for status and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CaptureStats {
    pub next_seq: u64,
    /// Records in memory.
    pub queued_records: usize,
    /// Their cost against `queue_memory`.
    pub queued_bytes: usize,
    /// Records in spill segments on disk.
    pub spilled_records: u64,
    /// Bytes of spill segments (counted with `queued_bytes` against
    /// `max_queue`).
    pub spilled_bytes: u64,
    pub dropped_records: u64,
    /// Per replica: (name, acked seq, bytes owed by dirty ranges).
    pub replicas: Vec<(String, u64, u64)>,
    /// Per volume: regions marked in the persistent map.
    pub marked_regions: Vec<u64>,
}

/// Replicated regions (of 4 MiB) that stay marked in the dirty map while
/// they are among the most recently written (4 GiB): clearing them would
/// make the next write into each pay a synchronous map update. A crash
/// costs at most their comparison.
pub const HOT_REGIONS: usize = 1024;

pub struct GroupCapture {
    name: String,
    volumes: Vec<CaptureVolume>,
    state: Mutex<State>,
    /// Replicas are configured (fixed for the capture's life): changes
    /// are queued and dirty-tracked.
    tracked: bool,
    arrived: Condvar,
    /// Signalled on every acknowledgement and connection change.
    acknowledged: Condvar,
    closing: std::sync::atomic::AtomicBool,
    /// Called whenever records arrive and when the capture closes (the
    /// shippers' wake-ups, who do not wait on `arrived`).
    listeners: Mutex<Vec<(u64, Listener)>>,
    next_listener: std::sync::atomic::AtomicU64,
}

/// Told that records arrived or the capture closed; must not block.
pub type Listener = Box<dyn Fn() + Send + Sync>;

/// How a synchronous wait for replicas ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncOutcome {
    /// Enough replicas have the change.
    Replicated,
    /// Too few replicas are connected and the policy is to degrade.
    Degraded,
    /// The agent is stopping.
    Closing,
}

impl GroupCapture {
    /// Opens the capture state of group `name` under `dir`
    /// (`<data_dir>/capture/<group>`), with a queue of `queue_limit` bytes
    /// in memory and no spill. `image_existed[i]` says whether volume `i`'s
    /// image was there before this start.
    pub fn open(
        dir: &Path,
        name: &str,
        volumes: Vec<CaptureVolume>,
        image_existed: &[bool],
        replicas: &[String],
        queue_limit: u64,
    ) -> Result<GroupCapture, CaptureError> {
        let options = QueueOptions::memory_only(queue_limit);
        Self::open_with(dir, name, volumes, image_existed, replicas, options)
    }

    /// [`GroupCapture::open`] with the queue's limits, including its spill
    /// to disk (`QueueOptions::with_spill(queue_memory, max_queue)`).
    pub fn open_with(
        dir: &Path,
        name: &str,
        volumes: Vec<CaptureVolume>,
        image_existed: &[bool],
        replicas: &[String],
        queue: QueueOptions,
    ) -> Result<GroupCapture, CaptureError> {
        std::fs::create_dir_all(dir).map_err(CaptureError::io(dir, "create capture directory"))?;
        // The spill of a previous run is stale: the dirty map covers it.
        let spill_dir = dir.join("spill");
        if let Err(e) = spill::remove_leftovers(&spill_dir) {
            tracing::warn!(path = %spill_dir.display(), error = %e, "cannot delete the previous run's spill");
        }
        let seq = SeqAllocator::open(&dir.join("seq"))?;
        let mut maps = Vec::new();
        if !replicas.is_empty() {
            for (i, v) in volumes.iter().enumerate() {
                let existed = image_existed.get(i).copied().unwrap_or(true);
                let path = dir.join(format!("{}.dirty", v.name));
                maps.push(DirtyMap::open(&path, v.image.size(), existed)?);
            }
        }
        // After a restart the queue is empty: every replica owes what the
        // persistent map says may differ.
        let owed: Vec<FineDirty> = maps
            .iter()
            .zip(&volumes)
            .map(|(map, v)| {
                let mut d = FineDirty::default();
                for (offset, len) in map.ranges(v.image.size()) {
                    for r in regions_of(offset, len) {
                        d.add_region(r);
                    }
                }
                d
            })
            .collect();
        let start = seq.peek();
        let owes = owed.iter().any(|d| !d.is_empty());
        let replicas: Vec<Replica> = replicas
            .iter()
            .map(|r| Replica {
                name: r.clone(),
                acked: start - 1,
                received: start - 1,
                connected: false,
                next: start,
                floor: start,
                overflowed: false,
                gap: owed.clone(),
                resyncing: None,
                behind_since: owes.then(Instant::now),
                cursor: None,
            })
            .collect();
        let sizes = volumes.iter().map(|v| v.image.size()).collect();
        Ok(GroupCapture {
            name: name.to_owned(),
            volumes,
            tracked: !replicas.is_empty(),
            state: Mutex::new(State {
                seq,
                queue: Queue::new(spill_dir, queue, Instant::now()),
                replicas,
                maps,
                sizes,
                last_write: HashMap::new(),
                clear_passes: VecDeque::new(),
                dropped_records: 0,
            }),
            arrived: Condvar::new(),
            acknowledged: Condvar::new(),
            listeners: Mutex::new(Vec::new()),
            next_listener: std::sync::atomic::AtomicU64::new(0),
            closing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The sequence number the next change will get.
    pub fn next_seq(&self) -> u64 {
        self.state.lock().seq.peek()
    }

    pub fn volumes(&self) -> &[CaptureVolume] {
        &self.volumes
    }

    pub fn image(&self, volume: usize) -> &Arc<RawImage> {
        &self.volumes[volume].image
    }

    /// Writes `data` at `offset` of volume `volume`; returns its sequence
    /// number.
    pub fn write(
        &self,
        volume: usize,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<u64, CaptureError> {
        self.change(
            volume,
            Some((offset, data.len() as u64)),
            |image| image.write(offset, data),
            || Op::Write {
                offset,
                data: bytes::Bytes::copy_from_slice(data),
                fua,
            },
        )
    }

    /// [`GroupCapture::write`] of a buffer the caller gives up: queued
    /// for the replicas as it is, not copied.
    pub fn write_owned(
        &self,
        volume: usize,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> Result<u64, CaptureError> {
        let len = data.len() as u64;
        // The buffer goes into the queued record when there is one (taken
        // before the write), else the write reads it where it is.
        let unqueued = std::cell::Cell::new(Some(data));
        self.change_with(
            volume,
            Some((offset, len)),
            |image, op| match op {
                Some(Op::Write { data, .. }) => image.write(offset, data),
                _ => image.write(offset, &unqueued.take().unwrap_or_default()),
            },
            || Op::Write {
                offset,
                data: bytes::Bytes::from(unqueued.take().unwrap_or_default()),
                fua,
            },
        )
    }

    /// Zeroes a range. `keep_allocated`: no hole; `fast_only`: fail
    /// without changing anything unless it is cheap.
    pub fn write_zeroes(
        &self,
        volume: usize,
        offset: u64,
        len: u64,
        keep_allocated: bool,
        fast_only: bool,
        fua: bool,
    ) -> Result<u64, CaptureError> {
        self.change(
            volume,
            Some((offset, len)),
            |image| image.write_zeroes(offset, len, keep_allocated, fast_only),
            || Op::WriteZeroes { offset, len, fua },
        )
    }

    pub fn trim(
        &self,
        volume: usize,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<u64, CaptureError> {
        self.change(
            volume,
            Some((offset, len)),
            |image| image.punch_hole(offset, len),
            || Op::Trim { offset, len, fua },
        )
    }

    /// Orders a flush after every change so far (the caller then makes the
    /// image durable with [`RawImage::sync`]).
    pub fn flush(&self, volume: usize) -> Result<u64, CaptureError> {
        self.change(volume, None, |_| Ok(()), || Op::Flush)
    }

    fn change(
        &self,
        volume: usize,
        range: Option<(u64, u64)>,
        apply: impl FnOnce(&RawImage) -> Result<(), VolumeError>,
        op: impl FnOnce() -> Op,
    ) -> Result<u64, CaptureError> {
        self.change_with(volume, range, |image, _| apply(image), op)
    }

    /// [`GroupCapture::change`] whose `apply` also sees the queued
    /// operation (`None` when nothing is queued).
    fn change_with(
        &self,
        volume: usize,
        range: Option<(u64, u64)>,
        apply: impl FnOnce(&RawImage, Option<&Op>) -> Result<(), VolumeError>,
        op: impl FnOnce() -> Op,
    ) -> Result<u64, CaptureError> {
        // The queued copy is made before the order lock is taken: the lock
        // covers only what ordering needs.
        let op = self.tracked.then(op);
        let mut st = self.state.lock();
        let st = &mut *st;
        if let (true, Some((offset, len))) = (self.tracked, range) {
            st.maps[volume].mark(offset, len)?; // D1: durable before the write
        }
        let seq = st.seq.issue()?;
        if let Err(e) = apply(&self.volumes[volume].image, op.as_ref()) {
            // A failed change may have reached the image in part: owe it to
            // every replica. A refused fast zero changed nothing.
            if let (false, Some((offset, len))) = (matches!(e, VolumeError::SlowZero { .. }), range)
            {
                for r in &mut st.replicas {
                    r.gap[volume].add(offset, len);
                }
            }
            return Err(e.into());
        }
        let Some(op) = op else {
            return Ok(seq);
        };
        if let Some((offset, len)) = range {
            for region in regions_of(offset, len) {
                st.last_write.insert((volume, region), seq);
            }
        }
        let mut streaming = false;
        for r in &mut st.replicas {
            if r.overflowed {
                r.owe(volume, &op);
            } else {
                streaming = true;
            }
        }
        if streaming {
            // `volume` indexes the group's open images, each holding file
            // descriptors: there are far fewer than 2^32 of them.
            #[allow(clippy::cast_possible_truncation)]
            let volume = volume as u32;
            let record = Arc::new(Record {
                seq,
                volume,
                op,
                at: Instant::now(),
            });
            st.queue.push(record);
            st.relieve();
        }
        self.arrived.notify_all();
        self.tell_listeners();
        Ok(seq)
    }

    /// Has `listener` called whenever records arrive and when the capture
    /// closes, for a shipper that waits elsewhere than in
    /// [`GroupCapture::next_events`].
    /// Returns what [`GroupCapture::remove_listener`] takes.
    pub fn on_arrival(&self, listener: Listener) -> u64 {
        let id = self
            .next_listener
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.listeners.lock().push((id, listener));
        id
    }

    /// Stops calling the listener `id` (its shipper ended).
    pub fn remove_listener(&self, id: u64) {
        self.listeners.lock().retain(|(l, _)| *l != id);
    }

    fn tell_listeners(&self) {
        for (_, l) in self.listeners.lock().iter() {
            l();
        }
    }

    /// The next event for `replica`, waiting up to `timeout` for one.
    pub fn next_event(
        &self,
        replica: &str,
        timeout: Duration,
    ) -> Result<Option<Event>, CaptureError> {
        let mut out = VecDeque::with_capacity(1);
        self.next_events(replica, timeout, 1, &mut out)?;
        Ok(out.pop_front())
    }

    /// Up to `max` next events for `replica` (records in order, or one
    /// resync), appended to `out`, waiting up to `timeout` for the first.
    /// One lock for the lot: the shipper does not contend with writers
    /// record by record.
    pub fn next_events(
        &self,
        replica: &str,
        timeout: Duration,
        max: usize,
        out: &mut VecDeque<Event>,
    ) -> Result<(), CaptureError> {
        let deadline = Instant::now() + timeout;
        let start = out.len();
        let mut st = self.state.lock();
        loop {
            let st_ref = &mut *st;
            let upcoming = st_ref.seq.peek();
            let i = replica_index(&st_ref.replicas, replica)?;
            let r = &mut st_ref.replicas[i];
            let owes = r.overflowed || r.gap.iter().any(|g| !g.is_empty());
            if owes && r.resyncing.is_none() {
                if out.len() == start {
                    out.push_back(self.start_resync(r, upcoming));
                }
                return Ok(());
            }
            let mut fell_back = false;
            // With a part not yet confirmed and more owed, nothing is
            // handed out until its `ResyncDone` (or a reconnect).
            while !owes && out.len() - start < max {
                match st_ref.queue.next_from(r.next, &mut r.cursor) {
                    Ok(Some(record)) => {
                        r.next = record.seq + 1;
                        out.push_back(Event::Record(record));
                    }
                    Ok(None) => break,
                    Err(e) => {
                        st_ref.fall_back(i, &e);
                        fell_back = true;
                        break;
                    }
                }
            }
            if out.len() > start {
                return Ok(());
            }
            if fell_back {
                continue;
            }
            if self.arrived.wait_until(&mut st, deadline).timed_out() {
                return Ok(());
            }
        }
    }

    /// Hands the replica's owed ranges out as one resync. An overflowed
    /// replica owes every change so far in `gap`, so it resumes with the
    /// next change; otherwise it resumes where its stream was.
    fn start_resync(&self, r: &mut Replica, upcoming: u64) -> Event {
        let mut budget = RESYNC_PART_REGIONS;
        let gap: Vec<FineDirty> = r
            .gap
            .iter_mut()
            .map(|g| {
                let part = g.split_off_regions(budget);
                budget -= part.region_count().min(budget);
                part
            })
            .collect();
        let more = r.gap.iter().map(FineDirty::dirty_bytes).sum();
        let ranges = gap
            .iter()
            .zip(&self.volumes)
            .map(|(g, v)| g.ranges(v.image.size()))
            .collect();
        let resume_at = if r.overflowed { upcoming } else { r.next };
        r.overflowed = false;
        r.next = resume_at;
        r.floor = r.floor.max(resume_at);
        let mut pending = gap;
        if let Some((older, _)) = r.resyncing.take() {
            for (p, o) in pending.iter_mut().zip(older) {
                p.merge(&o);
            }
        }
        r.resyncing = Some((pending, resume_at));
        Event::Resync {
            ranges,
            resume_at,
            more,
        }
    }

    /// `replica` holds every change up to `seq` durably.
    pub fn ack(&self, replica: &str, seq: u64) -> Result<(), CaptureError> {
        self.ack_received(replica, seq, seq)
    }

    /// `replica` has received every change up to `received`, and holds
    /// every change up to `durable` durably.
    pub fn ack_received(
        &self,
        replica: &str,
        received: u64,
        durable: u64,
    ) -> Result<(), CaptureError> {
        let mut st = self.state.lock();
        let r = replica_mut(&mut st.replicas, replica)?;
        r.acked = r.acked.max(durable);
        r.received = r.received.max(received).max(r.acked);
        r.floor = r.floor.max(r.acked + 1);
        // Acknowledged records are freed after the order lock is let go:
        // writers do not wait for the deallocation.
        let mut released = Vec::new();
        st.trim_into(&mut released);
        drop(st);
        self.acknowledged.notify_all();
        drop(released);
        Ok(())
    }

    /// A replication session to `replica` went up or down.
    pub fn set_connected(&self, replica: &str, connected: bool) -> Result<(), CaptureError> {
        let mut st = self.state.lock();
        replica_mut(&mut st.replicas, replica)?.connected = connected;
        self.acknowledged.notify_all();
        Ok(())
    }

    /// Waits until `count` replicas have change `seq` — durably if
    /// `durable`, else received. With `degrade`, gives up as soon as fewer
    /// than `count` replicas are connected; otherwise waits for them to
    /// come back (suspend), logging every `warn_every`.
    pub fn wait_replicated(
        &self,
        seq: u64,
        count: usize,
        durable: bool,
        degrade: bool,
        warn_every: Duration,
    ) -> SyncOutcome {
        let mut st = self.state.lock();
        let mut warned = Instant::now();
        loop {
            if self.closing.load(std::sync::atomic::Ordering::Acquire) {
                return SyncOutcome::Closing;
            }
            let have = st
                .replicas
                .iter()
                .filter(|r| {
                    if durable {
                        r.acked >= seq
                    } else {
                        r.received >= seq
                    }
                })
                .count();
            if have >= count {
                return SyncOutcome::Replicated;
            }
            let connected = st.replicas.iter().filter(|r| r.connected).count();
            if degrade && connected < count {
                return SyncOutcome::Degraded;
            }
            if warned.elapsed() >= warn_every {
                tracing::warn!(
                    group = %self.name,
                    seq,
                    connected,
                    needed = count,
                    "sync mode: holding I/O until enough replicas have the change (on_sync_loss = \"suspend\")"
                );
                warned = Instant::now();
            }
            self.acknowledged
                .wait_for(&mut st, Duration::from_millis(500));
        }
    }

    /// Waits up to `timeout` for a replica's acknowledgement (or a change
    /// of its connection), for callers that watch [`GroupCapture::lag`].
    pub fn wait_acknowledged(&self, timeout: Duration) {
        let mut st = self.state.lock();
        self.acknowledged.wait_for(&mut st, timeout);
    }

    /// Releases every synchronous wait (the agent is stopping).
    pub fn close(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::Release);
        let st = self.state.lock();
        self.acknowledged.notify_all();
        self.arrived.notify_all();
        drop(st);
        self.tell_listeners();
    }

    /// Replicas with a session up.
    pub fn connected_replicas(&self) -> usize {
        self.state
            .lock()
            .replicas
            .iter()
            .filter(|r| r.connected)
            .count()
    }

    /// The replica says the resync that resumes at `resume_at` is complete
    /// and durable: its ranges are no longer owed.
    pub fn resync_done(&self, replica: &str, resume_at: u64) -> Result<(), CaptureError> {
        let mut st = self.state.lock();
        let r = replica_mut(&mut st.replicas, replica)?;
        if r.resyncing.as_ref().is_some_and(|(_, at)| *at == resume_at) {
            r.resyncing = None;
            r.acked = r.acked.max(resume_at.saturating_sub(1));
            r.floor = r.floor.max(r.acked + 1);
            if !r.overflowed && r.gap.iter().all(FineDirty::is_empty) {
                r.behind_since = None;
            }
        }
        st.trim();
        drop(st);
        self.acknowledged.notify_all();
        // The next part (if any) may start.
        self.arrived.notify_all();
        self.tell_listeners();
        Ok(())
    }

    /// Whether `replica` is owed ranges outside the record stream (a
    /// resync handed out and not confirmed, or dirty ranges).
    pub fn owes(&self, replica: &str) -> Result<bool, CaptureError> {
        let mut st = self.state.lock();
        let r = replica_mut(&mut st.replicas, replica)?;
        Ok(r.overflowed || r.resyncing.is_some() || r.gap.iter().any(|g| !g.is_empty()))
    }

    /// `replica` may differ from this site's images in `ranges` (per
    /// volume: a former owner's writes this site never got) and in every
    /// change it has not acknowledged: those ranges are marked in the
    /// persistent dirty map (durably, invariant D1: they stay owed across
    /// a restart until the replica confirms them) and owed with every
    /// region the map marks, to be compared chunk by chunk; its records
    /// resume with the next change.
    pub fn owe_ranges(
        &self,
        replica: &str,
        ranges: &[Vec<(u64, u64)>],
    ) -> Result<(), CaptureError> {
        let mut st = self.state.lock();
        let st = &mut *st;
        let i = replica_index(&st.replicas, replica)?;
        for ((map, list), &size) in st.maps.iter_mut().zip(ranges).zip(&st.sizes) {
            for &(offset, len) in list {
                let len = len.min(size.saturating_sub(offset));
                if len > 0 {
                    map.mark(offset, len)?;
                }
            }
        }
        let r = &mut st.replicas[i];
        for ((gap, map), &size) in r.gap.iter_mut().zip(&st.maps).zip(&st.sizes) {
            for (offset, len) in map.ranges(size) {
                for region in regions_of(offset, len) {
                    gap.add_region(region);
                }
            }
        }
        r.overflowed = true;
        r.cursor = None;
        r.behind_since.get_or_insert_with(Instant::now);
        let dropped = st.trim();
        st.dropped_records += dropped;
        Ok(())
    }

    /// The replica holds nothing known (new) or was interrupted in a
    /// resync: every region of every volume is owed, to be compared chunk
    /// by chunk (only chunks that differ move).
    pub fn owe_everything(&self, replica: &str) -> Result<(), CaptureError> {
        let mut st = self.state.lock();
        let st = &mut *st;
        // Marked first, durably: the map covers what this replica lacks
        // until it confirms the comparison, across restarts (D1), so an
        // interrupted initial sync resumes with what is left.
        for (map, &size) in st.maps.iter_mut().zip(&st.sizes) {
            if size > 0 {
                map.mark(0, size)?;
            }
        }
        let r = replica_mut(&mut st.replicas, replica)?;
        for (gap, v) in r.gap.iter_mut().zip(&self.volumes) {
            for region in regions_of(0, v.image.size()) {
                gap.add_region(region);
            }
        }
        r.overflowed = true;
        r.behind_since.get_or_insert_with(Instant::now);
        let dropped = st.trim();
        st.dropped_records += dropped;
        Ok(())
    }

    /// How far `replica` is behind: bytes owed (queued records it has not
    /// acknowledged plus dirty ranges) and the age of the oldest change it
    /// lacks.
    pub fn lag(&self, replica: &str) -> Result<Lag, CaptureError> {
        let st = self.state.lock();
        let r = st
            .replicas
            .iter()
            .find(|r| r.name == replica)
            .ok_or_else(|| CaptureError::UnknownReplica(replica.to_owned()))?;
        // Owed and being resynced may overlap: count their union.
        let mut owed = r.gap.clone();
        if let Some((pending, _)) = &r.resyncing {
            for (o, p) in owed.iter_mut().zip(pending) {
                o.merge(p);
            }
        }
        let owed_ranges: u64 = owed.iter().map(FineDirty::dirty_bytes).sum();
        let mut bytes = owed_ranges;
        let mut oldest = None;
        if !r.overflowed {
            let (queued, queued_oldest) = st.queue.changes_after(r.acked);
            bytes += queued;
            oldest = queued_oldest;
        }
        Ok(Lag {
            bytes,
            oldest: oldest.or(r.behind_since),
            acked: r.acked,
            resyncing: r.resyncing.is_some() || owed_ranges > 0 || r.overflowed,
        })
    }

    /// Makes the replica start again from its acknowledged position (after
    /// a reconnect). An unacknowledged resync is owed again.
    pub fn rewind(&self, replica: &str) -> Result<(), CaptureError> {
        let mut st = self.state.lock();
        let r = replica_mut(&mut st.replicas, replica)?;
        r.next = r.floor;
        if let Some((pending, _)) = r.resyncing.take() {
            for (g, p) in r.gap.iter_mut().zip(pending) {
                g.merge(&p);
            }
        }
        Ok(())
    }

    /// Clears the persistent mark of every region that all replicas hold
    /// (invariant D2). Returns the number of regions cleared.
    pub fn clear_replicated(&self) -> Result<u64, CaptureError> {
        self.clear(false)
    }

    /// The periodic form of [`GroupCapture::clear_replicated`]: a replicated
    /// region stays marked while it is among the [`HOT_REGIONS`] most
    /// recently written and was written since the pass before last, so a
    /// working set does not pay a synchronous map update after every pass.
    /// Idle regions are cleared within two passes.
    /// Whether any region is marked in the persistent dirty map: only
    /// then is there anything for [`GroupCapture::clear_cold`] to do.
    pub fn has_marked(&self) -> bool {
        self.state.lock().maps.iter().any(DirtyMap::any_marked)
    }

    pub fn clear_cold(&self) -> Result<u64, CaptureError> {
        self.clear(true)
    }

    fn clear(&self, keep_hot: bool) -> Result<u64, CaptureError> {
        let mut st = self.state.lock();
        let st = &mut *st;
        if st.replicas.is_empty() {
            return Ok(0);
        }
        let min_acked = st.replicas.iter().map(|r| r.acked).min().unwrap_or(0);
        // Everything up to here was replicated two passes ago: a region
        // not written since is idle.
        let idle_below = match st.clear_passes.len() {
            2 => st.clear_passes[0],
            _ => 0,
        };
        // (last write seq, volume, region) of every region that may be
        // cleared; marked regions not written since the last clear (or this
        // start) count as oldest.
        let mut clearable = Vec::new();
        let mut held = 0usize;
        for (v, map) in st.maps.iter().enumerate() {
            let size = self.volumes[v].image.size();
            let marked = map
                .ranges(size)
                .into_iter()
                .flat_map(|(offset, len)| regions_of(offset, len));
            for region in marked {
                let owed = st.replicas.iter().any(|r| {
                    r.gap[v].touches_region(region)
                        || r.resyncing
                            .as_ref()
                            .is_some_and(|(p, _)| p[v].touches_region(region))
                });
                let last = st.last_write.get(&(v, region)).copied();
                if owed || last.is_some_and(|s| s > min_acked) {
                    held += 1;
                } else {
                    clearable.push((last.unwrap_or(0), v, region));
                }
            }
        }
        // Newest first: hot ones (within the budget, written lately) kept.
        clearable.sort_unstable_by_key(|c| std::cmp::Reverse(c.0));
        let budget = HOT_REGIONS.saturating_sub(held);
        let mut cleared = 0;
        for (i, &(last, v, region)) in clearable.iter().enumerate() {
            if keep_hot && i < budget && last > idle_below {
                continue;
            }
            st.maps[v].clear(region)?;
            st.last_write.remove(&(v, region));
            cleared += 1;
        }
        if keep_hot {
            if st.clear_passes.len() == 2 {
                st.clear_passes.pop_front();
            }
            st.clear_passes.push_back(min_acked);
        }
        Ok(cleared)
    }

    pub fn stats(&self) -> CaptureStats {
        let st = self.state.lock();
        CaptureStats {
            next_seq: st.seq.peek(),
            queued_records: st.queue.memory_records(),
            queued_bytes: st.queue.memory_bytes(),
            spilled_records: st.queue.spilled_records(),
            spilled_bytes: st.queue.spilled_bytes(),
            dropped_records: st.dropped_records,
            replicas: st
                .replicas
                .iter()
                .map(|r| {
                    let owed = r.gap.iter().map(FineDirty::dirty_bytes).sum();
                    (r.name.clone(), r.acked, owed)
                })
                .collect(),
            marked_regions: st.maps.iter().map(DirtyMap::marked_count).collect(),
        }
    }

    /// Marked ranges of each volume's persistent map.
    pub fn dirty_ranges(&self) -> Vec<Vec<(u64, u64)>> {
        let st = self.state.lock();
        st.maps
            .iter()
            .zip(&self.volumes)
            .map(|(m, v)| m.ranges(v.image.size()))
            .collect()
    }
}

fn replica_index(replicas: &[Replica], name: &str) -> Result<usize, CaptureError> {
    replicas
        .iter()
        .position(|r| r.name == name)
        .ok_or_else(|| CaptureError::UnknownReplica(name.to_owned()))
}

fn replica_mut<'a>(
    replicas: &'a mut [Replica],
    name: &str,
) -> Result<&'a mut Replica, CaptureError> {
    replicas
        .iter_mut()
        .find(|r| r.name == name)
        .ok_or_else(|| CaptureError::UnknownReplica(name.to_owned()))
}
