//! The primary side of replication to one replica site (docs/PEER.md):
//! connects, says hello, resyncs what the replica lacks by chunk
//! comparison, then streams the group's captured records in order while a
//! second thread reads the replica's acknowledgements.

use std::collections::VecDeque;
use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use parking_lot::Mutex;
use tandem_capture::{Event, GroupCapture, Op};
use tandem_peer::{
    read_message, write_message, Compressor, Hello, Message, Payload, RecordOp, ReplicaState,
};

use crate::replica::chunk_hashes;

/// Chunk size for comparing whole regions, and for small known-dirty ranges.
const CHUNK_LARGE: u32 = 64 << 10;
const CHUNK_SMALL: u32 = 4 << 10;
/// Chunks per `Hashes` message, and `Hashes` messages in flight.
const HASHES_PER_MESSAGE: usize = 256;
/// Deep enough that scattered 4 KiB ranges (one message each) are not
/// bound by round trips.
const HASHES_IN_FLIGHT: usize = 256;
/// Records taken from the capture queue per lock.
const EVENTS_PER_LOCK: usize = 256;
/// An idle link pings this often; the replica also syncs its journal then,
/// so durability follows the last write within about this long.
const IDLE_PING: Duration = Duration::from_millis(100);
/// A replica silent this long is considered gone.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often changed configuration files are looked for.
const FILES_EVERY: Duration = Duration::from_millis(250);
/// How often regions every replica holds are cleared from the persistent
/// dirty map (docs/CAPTURE.md, D2), while the link is idle.
const CLEAR_EVERY: Duration = Duration::from_secs(5);

/// How a replication link is doing, for status and metrics.
#[derive(Clone, Debug, Default)]
pub struct LinkInfo {
    pub state: LinkState,
    pub connected_since: Option<Instant>,
    /// Latest acknowledgement.
    pub received: u64,
    pub durable: u64,
    pub applied: u64,
    pub replica_state: Option<&'static str>,
    pub rtt: Option<Duration>,
    pub resync_total: u64,
    pub resync_done: u64,
    pub resync_sent: u64,
    pub raw_bytes: u64,
    pub wire_bytes: u64,
    pub last_error: Option<String>,
    pub connects: u64,
    /// The replica's images are a prefix of the stream (as last reported,
    /// or once it has applied everything below the resync's end).
    pub replica_consistent: bool,
    pub consistent_at: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LinkState {
    #[default]
    Disconnected,
    Resyncing,
    Streaming,
}

/// A connection to a replica: its halves, and a way to close it from
/// another thread.
pub struct Link {
    pub reader: Box<dyn Read + Send>,
    pub writer: Box<dyn Write + Send>,
    pub close: Box<dyn Fn() + Send + Sync>,
}

/// Opens a connection to the replica.
pub type Connect = dyn Fn() -> Result<Link, String> + Send + Sync;

pub struct Shipper {
    pub capture: Arc<GroupCapture>,
    pub local_site: String,
    pub replica_site: String,
    pub epoch: u64,
    /// Where this primary's epoch began (docs/FAILOVER.md): a replica whose
    /// tip is exactly here, or in this epoch, can stream; any other needs
    /// a comparison.
    pub fork: (u64, u64),
    pub connect: Box<Connect>,
    pub link: Arc<Mutex<LinkInfo>>,
    pub stop: Arc<AtomicBool>,
    /// The group's configuration files, if it has any.
    pub files: Option<Arc<crate::files::FileSet>>,
    /// Verification requests (`tandem verify`).
    pub verify: Receiver<VerifyJob>,
    /// After sending what was queued, wait this long for more before
    /// looking again (async mode: records travel in larger batches, with
    /// fewer wake-ups on both sides). Zero sends every record at once.
    pub gather: Duration,
}

/// A request to compare the replica with the primary, chunk by chunk.
pub struct VerifyJob {
    pub reply: crossbeam_channel::Sender<Result<VerifyReport, String>>,
}

/// What a verification found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub compared_bytes: u64,
    /// Ranges that still differed after the replica had caught up:
    /// (volume index, offset, length).
    pub differing: Vec<(u32, u64, u64)>,
    pub passes: u32,
}

/// The connection as the resync and verify pipelines use it.
struct Wire<'a, W> {
    w: &'a mut W,
    diffs: &'a Receiver<Incoming>,
    alive: &'a AtomicBool,
    compressor: &'a mut Compressor,
    scratch: Vec<u8>,
}

impl<W: Write> Wire<'_, W> {
    fn send(&mut self, msg: &Message) -> Result<(), String> {
        write_message(self.w, msg, &mut self.scratch).map_err(|e| e.to_string())
    }

    fn flush(&mut self) -> Result<(), String> {
        self.w.flush().map_err(|e| e.to_string())
    }
}

/// What to do with chunks a `Diff` marks.
enum OnDiff<'a> {
    /// Send them (resync).
    Send,
    /// Note them (verify).
    Collect(&'a mut Vec<(u32, u64, u64)>),
}

/// Per-link compression state, kept across reconnects so that the byte
/// counters are cumulative.
struct Codec {
    compressor: Compressor,
}

enum Incoming {
    Diff {
        volume: u32,
        offset: u64,
        bitmap: Vec<u8>,
    },
}

impl Shipper {
    /// Runs until `stop`, reconnecting with backoff.
    pub fn run(self) {
        let mut backoff = Duration::from_millis(100);
        let mut codec = Codec {
            compressor: Compressor::new(1),
        };
        while !self.stop.load(Ordering::Acquire) {
            let started = Instant::now();
            match self.session(&mut codec) {
                Ok(()) => return,
                Err(e) => {
                    let mut link = self.link.lock();
                    if link.last_error.as_deref() != Some(&e) {
                        tracing::warn!(group = self.capture.name(), replica = %self.replica_site, "replication link down: {e}");
                    }
                    link.state = LinkState::Disconnected;
                    link.connected_since = None;
                    link.last_error = Some(e);
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(100);
            }
            let until = Instant::now() + backoff;
            while Instant::now() < until && !self.stop.load(Ordering::Acquire) {
                thread::sleep(Duration::from_millis(20));
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn session(&self, codec: &mut Codec) -> Result<(), String> {
        let group = self.capture.name().to_owned();
        let replica = self.replica_site.clone();
        let Link {
            reader,
            writer,
            close,
        } = (self.connect)()?;
        let mut w = BufWriter::with_capacity(1 << 20, writer);
        let mut r = BufReader::with_capacity(1 << 16, reader);
        let mut scratch = Vec::new();
        let volumes = self
            .capture
            .volumes()
            .iter()
            .map(|v| (v.name.clone(), v.image.size()))
            .collect();
        let hello = Message::Hello(Hello {
            version: tandem_peer::VERSION,
            primary: self.local_site.clone(),
            replica: replica.clone(),
            group: group.clone(),
            epoch: self.epoch,
            fork_epoch: self.fork.0,
            fork_seq: self.fork.1,
            volumes,
        });
        write_message(&mut w, &hello, &mut scratch).map_err(|e| e.to_string())?;
        w.flush().map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let welcome =
            match read_message(&mut r, &mut buf).map_err(|e| format!("no welcome: {e}"))? {
                Message::Welcome(w) => w,
                Message::Refuse { reason } => return Err(format!("replica refused: {reason}")),
                other => return Err(format!("expected welcome, got {}", other.kind())),
            };
        let cap = &self.capture;
        let next = cap.next_seq();
        let tip = (welcome.epoch, welcome.durable);
        let on_history = welcome.epoch == self.epoch || tip == self.fork;
        if !on_history {
            tracing::warn!(%group, %replica, tip_epoch = tip.0, tip_seq = tip.1, fork_epoch = self.fork.0, fork_seq = self.fork.1, "replica's records are not on this primary's history: full comparison, only differing chunks move");
            cap.owe_everything(&replica).map_err(|e| e.to_string())?;
        } else if welcome.durable >= next {
            // The replica holds records this primary never issued.
            tracing::warn!(%group, %replica, durable = welcome.durable, next, "replica is ahead of this primary's sequence: full comparison");
            cap.owe_everything(&replica).map_err(|e| e.to_string())?;
        } else {
            cap.ack(&replica, welcome.durable)
                .map_err(|e| e.to_string())?;
        }
        cap.rewind(&replica).map_err(|e| e.to_string())?;
        if welcome.state != ReplicaState::Consistent {
            tracing::info!(%group, %replica, state = welcome.state.as_str(), "replica needs a full comparison");
            cap.owe_everything(&replica).map_err(|e| e.to_string())?;
        }
        {
            let mut link = self.link.lock();
            link.connected_since = Some(Instant::now());
            link.durable = welcome.durable;
            link.applied = welcome.applied;
            link.received = welcome.durable;
            link.replica_state = Some(welcome.state.as_str());
            link.replica_consistent = welcome.state == ReplicaState::Consistent;
            link.consistent_at = 0;
            link.connects += 1;
            link.last_error = None;
            link.state = LinkState::Streaming;
        }
        tracing::info!(%group, %replica, durable = welcome.durable, state = welcome.state.as_str(), "replication link up");
        cap.set_connected(&replica, true)
            .map_err(|e| e.to_string())?;
        struct Disconnected<'a>(&'a GroupCapture, &'a str);
        impl Drop for Disconnected<'_> {
            fn drop(&mut self) {
                let _ = self.0.set_connected(self.1, false);
            }
        }
        let _connected = Disconnected(cap, &replica);

        let alive = Arc::new(AtomicBool::new(true));
        let heard = Arc::new(Mutex::new(Instant::now()));
        let (diff_tx, diff_rx) = crossbeam_channel::bounded::<Incoming>(HASHES_IN_FLIGHT * 2);
        let reader_thread = {
            let (cap, link, alive, heard) = (
                Arc::clone(cap),
                Arc::clone(&self.link),
                Arc::clone(&alive),
                Arc::clone(&heard),
            );
            let replica = replica.clone();
            thread::Builder::new()
                .name(format!("acks-{group}-{replica}"))
                .spawn(move || {
                    let mut buf = Vec::new();
                    let end = loop {
                        match read_message(&mut r, &mut buf) {
                            Ok(msg) => {
                                *heard.lock() = Instant::now();
                                match msg {
                                    Message::Ack(a) => {
                                        if let Err(e) =
                                            cap.ack_received(&replica, a.received, a.durable)
                                        {
                                            break e.to_string();
                                        }
                                        let mut l = link.lock();
                                        l.received = a.received;
                                        l.durable = a.durable;
                                        l.applied = a.applied;
                                        if l.consistent_at != 0 && a.applied + 1 >= l.consistent_at
                                        {
                                            l.replica_consistent = true;
                                            l.consistent_at = 0;
                                        }
                                    }
                                    Message::Diff {
                                        volume,
                                        offset,
                                        bitmap,
                                        ..
                                    } => {
                                        if diff_tx
                                            .send(Incoming::Diff {
                                                volume,
                                                offset,
                                                bitmap,
                                            })
                                            .is_err()
                                        {
                                            break "resync ended".into();
                                        }
                                    }
                                    Message::ResyncDone { resume_at } => {
                                        if let Err(e) = cap.resync_done(&replica, resume_at) {
                                            break e.to_string();
                                        }
                                    }
                                    Message::Pong(sent) => {
                                        let now = nanos_now();
                                        link.lock().rtt =
                                            Some(Duration::from_nanos(now.saturating_sub(sent)));
                                    }
                                    Message::Ping(_) => {}
                                    Message::Refuse { reason } => {
                                        break format!("replica refused: {reason}")
                                    }
                                    other => {
                                        break format!("unexpected {} from replica", other.kind())
                                    }
                                }
                            }
                            Err(e) => break e.to_string(),
                        }
                        if !alive.load(Ordering::Acquire) {
                            break "session closed".into();
                        }
                    };
                    alive.store(false, Ordering::Release);
                    end
                })
                .map_err(|e| e.to_string())?
        };
        let result = self.stream(&mut w, &diff_rx, &alive, &heard, &mut codec.compressor);
        alive.store(false, Ordering::Release);
        drop(w);
        close(); // wakes the ack reader
        let reader_end = reader_thread
            .join()
            .unwrap_or_else(|_| "ack reader panicked".into());
        match result {
            Ok(()) => Ok(()),
            Err(e) if e == "peer gone" => Err(reader_end),
            Err(e) => Err(e),
        }
    }

    /// Sends records and resyncs until stopped or the link fails.
    fn stream<W: Write>(
        &self,
        w: &mut W,
        diffs: &Receiver<Incoming>,
        alive: &AtomicBool,
        heard: &Mutex<Instant>,
        compressor: &mut Compressor,
    ) -> Result<(), String> {
        let cap = &self.capture;
        let replica = &self.replica_site;
        let mut scratch = Vec::new();
        let mut unflushed = false;
        let mut last_sent = Instant::now();
        // Every file goes again on a new session: the replica may have
        // missed changes.
        let mut files_sent = std::collections::BTreeMap::new();
        let mut files_checked = Instant::now() - FILES_EVERY;
        let mut cleared = Instant::now();
        // Events taken from the capture in one lock, sent one by one.
        let mut events = std::collections::VecDeque::new();
        loop {
            if let Ok(job) = self.verify.try_recv() {
                w.flush().map_err(|e| e.to_string())?;
                let report = self.verify_replica(w, diffs, alive, compressor);
                let failed = report.as_ref().err().cloned();
                let _ = job.reply.send(report);
                if let Some(e) = failed {
                    return Err(e);
                }
                unflushed = false;
                last_sent = Instant::now();
            }
            if files_checked.elapsed() >= FILES_EVERY {
                files_checked = Instant::now();
                if self.send_files(w, &mut files_sent, compressor, &mut scratch)? {
                    unflushed = true;
                }
            }
            if self.stop.load(Ordering::Acquire) {
                w.flush().map_err(|e| e.to_string())?;
                return Ok(());
            }
            if !alive.load(Ordering::Acquire) {
                return Err("peer gone".into());
            }
            let wait = if unflushed {
                Duration::ZERO
            } else {
                Duration::from_millis(200)
            };
            if events.is_empty() {
                cap.next_events(replica, wait, EVENTS_PER_LOCK, &mut events)
                    .map_err(|e| e.to_string())?;
            }
            match events.pop_front() {
                Some(Event::Record(rec)) => {
                    let msg = record_message(self.epoch, &rec, compressor);
                    write_message(w, &msg, &mut scratch).map_err(|e| e.to_string())?;
                    unflushed = true;
                    last_sent = Instant::now();
                }
                Some(Event::Resync { ranges, resume_at }) => {
                    w.flush().map_err(|e| e.to_string())?;
                    self.resync(w, diffs, alive, &ranges, resume_at, compressor)?;
                    unflushed = false;
                    last_sent = Instant::now();
                }
                None => {
                    if unflushed {
                        w.flush().map_err(|e| e.to_string())?;
                        unflushed = false;
                        if !self.gather.is_zero() {
                            thread::sleep(self.gather);
                        }
                    } else if last_sent.elapsed() >= IDLE_PING {
                        write_message(w, &Message::Ping(nanos_now()), &mut scratch)
                            .map_err(|e| e.to_string())?;
                        w.flush().map_err(|e| e.to_string())?;
                        last_sent = Instant::now();
                    }
                    if heard.lock().elapsed() > PEER_TIMEOUT {
                        return Err(format!("replica silent for {PEER_TIMEOUT:?}"));
                    }
                    if cleared.elapsed() >= CLEAR_EVERY {
                        cleared = Instant::now();
                        match cap.clear_cold() {
                            Ok(0) => {}
                            Ok(n) => tracing::debug!(
                                group = cap.name(),
                                regions = n,
                                "dirty map: replicated regions cleared"
                            ),
                            Err(e) => tracing::warn!(
                                group = cap.name(),
                                "cannot clear the dirty map: {e}"
                            ),
                        }
                    }
                }
            }
            let (raw, wire) = compressor.stats();
            let mut link = self.link.lock();
            link.raw_bytes = raw;
            link.wire_bytes = wire;
        }
    }

    /// Sends files that changed since they were last sent on this session.
    fn send_files<W: Write>(
        &self,
        w: &mut W,
        sent: &mut std::collections::BTreeMap<std::path::PathBuf, u64>,
        compressor: &mut Compressor,
        scratch: &mut Vec<u8>,
    ) -> Result<bool, String> {
        let Some(files) = &self.files else {
            return Ok(false);
        };
        let changed = files.changed_since(sent);
        for (path, version) in &changed {
            let msg = Message::File {
                path: path.to_string_lossy().into_owned(),
                mode: version.mode,
                data: Payload::encode(&version.content, compressor),
            };
            write_message(w, &msg, scratch).map_err(|e| e.to_string())?;
            sent.insert(path.clone(), version.version);
            tracing::debug!(group = self.capture.name(), replica = %self.replica_site, file = %path.display(), "file sent");
        }
        Ok(!changed.is_empty())
    }

    fn resync<W: Write>(
        &self,
        w: &mut W,
        diffs: &Receiver<Incoming>,
        alive: &AtomicBool,
        ranges: &[Vec<(u64, u64)>],
        resume_at: u64,
        compressor: &mut Compressor,
    ) -> Result<(), String> {
        let cap = &self.capture;
        let total: u64 = ranges.iter().flatten().map(|r| r.1).sum();
        {
            let mut link = self.link.lock();
            link.state = LinkState::Resyncing;
            link.replica_consistent = false;
            link.resync_total = total;
            link.resync_done = 0;
            link.resync_sent = 0;
        }
        tracing::info!(group = cap.name(), replica = %self.replica_site, bytes = total, resume_at, "resync: comparing chunks");
        let mut wire = Wire {
            w,
            diffs,
            alive,
            compressor,
            scratch: Vec::new(),
        };
        let begin = Message::ResyncBegin {
            epoch: self.epoch,
            resume_at,
            bytes: total,
        };
        wire.send(&begin)?;
        // Whole regions compare in large chunks; small known-dirty ranges in
        // 4 KiB chunks, so that only what changed travels.
        let items: Vec<(u32, u64, u64, u32)> = ranges
            .iter()
            .enumerate()
            .flat_map(|(volume, list)| {
                list.iter().map(move |&(offset, len)| {
                    let chunk = if len >= 1 << 20 {
                        CHUNK_LARGE
                    } else {
                        CHUNK_SMALL
                    };
                    let start = offset - offset % u64::from(chunk);
                    (volume as u32, start, offset + len - start, chunk)
                })
            })
            .collect();
        self.compare(&mut wire, &items, &mut OnDiff::Send)?;
        // Every chunk was read before this point: once the replica has
        // applied the records below it, it is a prefix again.
        let consistent_at = cap.next_seq();
        wire.send(&Message::ResyncEnd { consistent_at })?;
        wire.flush()?;
        let mut link = self.link.lock();
        tracing::info!(group = cap.name(), replica = %self.replica_site, compared = total, sent = link.resync_sent, "resync: data sent");
        link.state = LinkState::Streaming;
        link.consistent_at = consistent_at;
        Ok(())
    }

    /// Compares chunks with the replica: `items` are (volume, offset,
    /// length, chunk size). `Hashes` go out in a pipeline of
    /// [`HASHES_IN_FLIGHT`]; the chunks each `Diff` marks are sent (resync)
    /// or noted (verify). Returns the bytes compared.
    fn compare<W: Write>(
        &self,
        wire: &mut Wire<'_, W>,
        items: &[(u32, u64, u64, u32)],
        on_diff: &mut OnDiff<'_>,
    ) -> Result<u64, String> {
        let mut pending: VecDeque<(u32, u64, u32, usize)> = VecDeque::new();
        let mut compared = 0;
        for &(volume, offset, len, chunk) in items {
            let image = self.capture.image(volume as usize);
            let end = offset + len;
            let mut pos = offset;
            while pos < end {
                let count =
                    ((end - pos).div_ceil(u64::from(chunk)) as usize).min(HASHES_PER_MESSAGE);
                let hashes = chunk_hashes(image, pos, chunk, count).map_err(|e| e.to_string())?;
                let n = hashes.len();
                if n == 0 {
                    break; // past the end of the volume
                }
                compared += (n as u64 * u64::from(chunk)).min(end - pos);
                wire.send(&Message::Hashes {
                    volume,
                    offset: pos,
                    chunk,
                    hashes,
                })?;
                pending.push_back((volume, pos, chunk, n));
                pos += n as u64 * u64::from(chunk);
                while pending.len() >= HASHES_IN_FLIGHT {
                    wire.flush()?;
                    self.answer_diff(wire, &mut pending, on_diff)?;
                }
            }
        }
        wire.flush()?;
        while !pending.is_empty() {
            self.answer_diff(wire, &mut pending, on_diff)?;
            wire.flush()?;
        }
        Ok(compared)
    }

    /// Waits for the oldest outstanding `Diff` and handles the chunks that
    /// differ: sent read fresh from the image, or noted.
    fn answer_diff<W: Write>(
        &self,
        wire: &mut Wire<'_, W>,
        pending: &mut VecDeque<(u32, u64, u32, usize)>,
        on_diff: &mut OnDiff<'_>,
    ) -> Result<(), String> {
        let Some((volume, offset, chunk, count)) = pending.pop_front() else {
            return Ok(());
        };
        let Incoming::Diff {
            volume: dv,
            offset: doff,
            bitmap,
        } = loop {
            match wire.diffs.recv_timeout(Duration::from_millis(200)) {
                Ok(d) => break d,
                Err(RecvTimeoutError::Timeout) if wire.alive.load(Ordering::Acquire) => {
                    if self.stop.load(Ordering::Acquire) {
                        return Err("stopping".into());
                    }
                }
                Err(_) => return Err("peer gone".into()),
            }
        };
        if (dv, doff) != (volume, offset) {
            return Err(format!(
                "diff for volume {dv} offset {doff}, expected volume {volume} offset {offset}"
            ));
        }
        let image = self.capture.image(volume as usize);
        let mut buf = vec![0u8; chunk as usize];
        let mut sent = 0u64;
        for i in (0..count).filter(|&i| tandem_peer::diff_bit(&bitmap, i)) {
            let at = offset + i as u64 * u64::from(chunk);
            let n = u64::from(chunk).min(image.size().saturating_sub(at)) as usize;
            match on_diff {
                OnDiff::Collect(found) => found.push((volume, at, n as u64)),
                OnDiff::Send => {
                    image.read(at, &mut buf[..n]).map_err(|e| e.to_string())?;
                    let data = Payload::encode(&buf[..n], wire.compressor);
                    sent += data.wire_len() as u64;
                    wire.send(&Message::Chunk {
                        volume,
                        offset: at,
                        data,
                    })?;
                }
            }
        }
        let mut link = self.link.lock();
        link.resync_done += count as u64 * u64::from(chunk);
        link.resync_sent += sent;
        Ok(())
    }

    /// Compares every chunk of every volume with the replica; chunks that
    /// differ are compared again once the replica has caught up with the
    /// changes made meanwhile (the VM keeps writing), up to three passes.
    fn verify_replica<W: Write>(
        &self,
        w: &mut W,
        diffs: &Receiver<Incoming>,
        alive: &AtomicBool,
        compressor: &mut Compressor,
    ) -> Result<VerifyReport, String> {
        let mut report = VerifyReport::default();
        let mut suspects: Vec<(u32, u64, u64)> = self
            .capture
            .volumes()
            .iter()
            .enumerate()
            .map(|(v, vol)| (v as u32, 0, vol.image.size()))
            .collect();
        for pass in 1..=3 {
            report.passes = pass;
            self.catch_up(w, diffs, alive, compressor)?;
            let items: Vec<_> = suspects
                .iter()
                .map(|&(v, off, len)| (v, off, len, CHUNK_LARGE))
                .collect();
            let mut found = Vec::new();
            let mut wire = Wire {
                w: &mut *w,
                diffs,
                alive,
                compressor: &mut *compressor,
                scratch: Vec::new(),
            };
            let compared = self.compare(&mut wire, &items, &mut OnDiff::Collect(&mut found))?;
            if pass == 1 {
                report.compared_bytes = compared;
            }
            suspects = found;
            if suspects.is_empty() {
                break;
            }
        }
        report.differing = suspects;
        Ok(report)
    }

    /// Streams queued changes (and any owed resync) until the replica holds
    /// every change made so far.
    fn catch_up<W: Write>(
        &self,
        w: &mut W,
        diffs: &Receiver<Incoming>,
        alive: &AtomicBool,
        compressor: &mut Compressor,
    ) -> Result<(), String> {
        let cap = &self.capture;
        let target = cap.next_seq().saturating_sub(1);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut scratch = Vec::new();
        loop {
            let lag = cap.lag(&self.replica_site).map_err(|e| e.to_string())?;
            if lag.acked >= target && !lag.resyncing {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("the replica did not catch up within 60 s; verify again later".into());
            }
            if !alive.load(Ordering::Acquire) {
                return Err("peer gone".into());
            }
            match cap
                .next_event(&self.replica_site, Duration::from_millis(20))
                .map_err(|e| e.to_string())?
            {
                Some(Event::Record(rec)) => {
                    let msg = record_message(self.epoch, &rec, compressor);
                    write_message(w, &msg, &mut scratch).map_err(|e| e.to_string())?;
                }
                Some(Event::Resync { ranges, resume_at }) => {
                    self.resync(w, diffs, alive, &ranges, resume_at, compressor)?
                }
                None => w.flush().map_err(|e| e.to_string())?,
            }
        }
    }
}

fn record_message(
    epoch: u64,
    rec: &tandem_capture::Record,
    compressor: &mut Compressor,
) -> Message {
    let (op, fua, offset, len, data) = match &rec.op {
        Op::Write { offset, data, fua } => (
            RecordOp::Write,
            *fua,
            *offset,
            data.len() as u64,
            Payload::encode(data, compressor),
        ),
        Op::WriteZeroes { offset, len, fua } => {
            (RecordOp::WriteZeroes, *fua, *offset, *len, Payload::empty())
        }
        Op::Trim { offset, len, fua } => (RecordOp::Trim, *fua, *offset, *len, Payload::empty()),
        Op::Flush => (RecordOp::Flush, false, 0, 0, Payload::empty()),
    };
    Message::Record(tandem_peer::Record {
        epoch,
        seq: rec.seq,
        volume: rec.volume,
        op,
        fua,
        offset,
        len,
        data,
    })
}

fn nanos_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
