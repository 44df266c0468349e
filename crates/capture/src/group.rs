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
use crate::seq::SeqAllocator;

/// Fixed per-record overhead counted against `queue_memory`.
const RECORD_OVERHEAD: usize = 96;

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
        data: Vec<u8>,
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

    fn cost(&self) -> usize {
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
    /// complete.
    Resync {
        ranges: Vec<Vec<(u64, u64)>>,
        resume_at: u64,
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
    queue: VecDeque<Arc<Record>>,
    queued_bytes: usize,
    replicas: Vec<Replica>,
    /// Persistent dirty maps, one per volume; empty without replicas.
    maps: Vec<DirtyMap>,
    /// Latest sequence number that touched each (volume, region).
    last_write: HashMap<(u32, u64), u64>,
    dropped_records: u64,
}

impl State {
    /// The queue is over its memory limit: the streaming replica that is
    /// furthest behind stops holding records in memory; what it still
    /// needs becomes dirty ranges (docs/CAPTURE.md).
    fn overflow_laggard(&mut self) {
        let Some(i) = self
            .replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.overflowed)
            .min_by_key(|(_, r)| r.floor)
            .map(|(i, _)| i)
        else {
            return;
        };
        let r = &mut self.replicas[i];
        let floor = r.floor;
        for record in self.queue.iter().filter(|rec| rec.seq >= floor) {
            r.owe(record.volume as usize, &record.op);
        }
        r.overflowed = true;
        r.behind_since.get_or_insert_with(Instant::now);
        tracing::warn!(
            replica = %r.name,
            acked = r.acked,
            "replica too far behind for the memory queue: tracking dirty regions instead"
        );
        self.dropped_records += self.trim();
    }

    /// Drops records no streaming replica needs; returns how many.
    fn trim(&mut self) -> u64 {
        let floor = self
            .replicas
            .iter()
            .filter(|r| !r.overflowed)
            .map(|r| r.floor)
            .min()
            .unwrap_or(u64::MAX);
        let mut dropped = 0;
        while self.queue.front().is_some_and(|f| f.seq < floor) {
            if let Some(old) = self.queue.pop_front() {
                self.queued_bytes -= old.op.cost();
                dropped += 1;
            }
        }
        dropped
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
    pub queued_records: usize,
    pub queued_bytes: usize,
    pub dropped_records: u64,
    /// Per replica: (name, acked seq, bytes owed by dirty ranges).
    pub replicas: Vec<(String, u64, u64)>,
    /// Per volume: regions marked in the persistent map.
    pub marked_regions: Vec<u64>,
}

pub struct GroupCapture {
    name: String,
    volumes: Vec<CaptureVolume>,
    state: Mutex<State>,
    arrived: Condvar,
    /// Signalled on every acknowledgement and connection change.
    acknowledged: Condvar,
    queue_limit: usize,
    closing: std::sync::atomic::AtomicBool,
}

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
    /// (`<data_dir>/capture/<group>`). `image_existed[i]` says whether
    /// volume `i`'s image was there before this start.
    pub fn open(
        dir: &Path,
        name: &str,
        volumes: Vec<CaptureVolume>,
        image_existed: &[bool],
        replicas: &[String],
        queue_limit: u64,
    ) -> Result<GroupCapture, CaptureError> {
        std::fs::create_dir_all(dir).map_err(CaptureError::io(dir, "create capture directory"))?;
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
        let replicas = replicas
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
            })
            .collect();
        Ok(GroupCapture {
            name: name.to_owned(),
            volumes,
            state: Mutex::new(State {
                seq,
                queue: VecDeque::new(),
                queued_bytes: 0,
                replicas,
                maps,
                last_write: HashMap::new(),
                dropped_records: 0,
            }),
            arrived: Condvar::new(),
            acknowledged: Condvar::new(),
            queue_limit: usize::try_from(queue_limit).unwrap_or(usize::MAX),
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
                data: data.to_vec(),
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
        let mut st = self.state.lock();
        let st = &mut *st;
        let tracked = !st.replicas.is_empty();
        if let (true, Some((offset, len))) = (tracked, range) {
            st.maps[volume].mark(offset, len)?; // D1: durable before the write
        }
        let seq = st.seq.issue()?;
        if let Err(e) = apply(&self.volumes[volume].image) {
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
        if !tracked {
            return Ok(seq);
        }
        if let Some((offset, len)) = range {
            for region in regions_of(offset, len) {
                st.last_write.insert((volume as u32, region), seq);
            }
        }
        let op = op();
        let mut streaming = false;
        for r in &mut st.replicas {
            if r.overflowed {
                r.owe(volume, &op);
            } else {
                streaming = true;
            }
        }
        if streaming {
            let record = Arc::new(Record {
                seq,
                volume: volume as u32,
                op,
                at: Instant::now(),
            });
            st.queued_bytes += record.op.cost();
            st.queue.push_back(record);
            while st.queued_bytes > self.queue_limit {
                st.overflow_laggard();
            }
        }
        self.arrived.notify_all();
        Ok(seq)
    }

    /// The next event for `replica`, waiting up to `timeout` for one.
    pub fn next_event(
        &self,
        replica: &str,
        timeout: Duration,
    ) -> Result<Option<Event>, CaptureError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock();
        loop {
            let st_ref = &mut *st;
            let upcoming = st_ref.seq.peek();
            let r = replica_mut(&mut st_ref.replicas, replica)?;
            if r.overflowed || r.gap.iter().any(|g| !g.is_empty()) {
                return Ok(Some(self.start_resync(r, upcoming)));
            }
            let next = r.next;
            let idx = st_ref.queue.partition_point(|x| x.seq < next);
            if let Some(record) = st_ref.queue.get(idx).cloned() {
                replica_mut(&mut st_ref.replicas, replica)?.next = record.seq + 1;
                return Ok(Some(Event::Record(record)));
            }
            if self.arrived.wait_until(&mut st, deadline).timed_out() {
                return Ok(None);
            }
        }
    }

    /// Hands the replica's owed ranges out as one resync. An overflowed
    /// replica owes every change so far in `gap`, so it resumes with the
    /// next change; otherwise it resumes where its stream was.
    fn start_resync(&self, r: &mut Replica, upcoming: u64) -> Event {
        let empty = vec![FineDirty::default(); self.volumes.len()];
        let gap = std::mem::replace(&mut r.gap, empty);
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
        Event::Resync { ranges, resume_at }
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
        st.trim();
        self.acknowledged.notify_all();
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

    /// Releases every synchronous wait (the agent is stopping).
    pub fn close(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::Release);
        let _st = self.state.lock();
        self.acknowledged.notify_all();
        self.arrived.notify_all();
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
        Ok(())
    }

    /// The replica holds nothing known (new) or was interrupted in a
    /// resync: every region of every volume is owed, to be compared chunk
    /// by chunk (only chunks that differ move).
    pub fn owe_everything(&self, replica: &str) -> Result<(), CaptureError> {
        let mut st = self.state.lock();
        let r = replica_mut(&mut st.replicas, replica)?;
        for (gap, v) in r.gap.iter_mut().zip(&self.volumes) {
            for region in regions_of(0, v.image.size()) {
                gap.add_region(region);
            }
        }
        r.overflowed = true;
        r.behind_since.get_or_insert_with(Instant::now);
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
            for rec in st.queue.iter().filter(|rec| rec.seq > r.acked) {
                bytes += rec.op.range().map_or(0, |(_, len)| len);
                oldest = oldest.or(Some(rec.at));
            }
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
        let mut st = self.state.lock();
        let st = &mut *st;
        if st.replicas.is_empty() {
            return Ok(0);
        }
        let min_acked = st.replicas.iter().map(|r| r.acked).min().unwrap_or(0);
        let mut cleared = 0;
        for (v, map) in st.maps.iter_mut().enumerate() {
            let size = self.volumes[v].image.size();
            let marked: Vec<u64> = map
                .ranges(size)
                .into_iter()
                .flat_map(|(offset, len)| regions_of(offset, len))
                .collect();
            for region in marked {
                let owed = st.replicas.iter().any(|r| {
                    r.gap[v].touches_region(region)
                        || r.resyncing
                            .as_ref()
                            .is_some_and(|(p, _)| p[v].touches_region(region))
                });
                let written_after = st
                    .last_write
                    .get(&(v as u32, region))
                    .is_some_and(|&s| s > min_acked);
                if !owed && !written_after {
                    map.clear(region)?;
                    st.last_write.remove(&(v as u32, region));
                    cleared += 1;
                }
            }
        }
        Ok(cleared)
    }

    pub fn stats(&self) -> CaptureStats {
        let st = self.state.lock();
        CaptureStats {
            next_seq: st.seq.peek(),
            queued_records: st.queue.len(),
            queued_bytes: st.queued_bytes,
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

fn replica_mut<'a>(
    replicas: &'a mut [Replica],
    name: &str,
) -> Result<&'a mut Replica, CaptureError> {
    replicas
        .iter_mut()
        .find(|r| r.name == name)
        .ok_or_else(|| CaptureError::UnknownReplica(name.to_owned()))
}
