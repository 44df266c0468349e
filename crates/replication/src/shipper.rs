//! The primary side of replication to one replica site (docs/PEER.md), as
//! a driver of [`ShipperSession`]: opens a channel on the link to the
//! replica site, says hello, resyncs what the replica lacks by chunk
//! comparison, then streams the group's captured records in order while
//! a second task takes the replica's acknowledgements. Both tasks step the
//! session's one machine. They are tasks on the replication runtime
//! ([`crate::runtime`]), woken by the capture when records arrive: an idle
//! group costs no thread and no wake-up.

use std::io::{BufReader, BufWriter, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use parking_lot::Mutex;
use tandem_capture::{Event, GroupCapture, Op};
use tandem_peer::{
    read_message, write_message, Compressor, Hello, Message, Payload, PeerError, RecordOp,
};
use tandem_volume::AlignedBuf;
use tokio::sync::{mpsc, Notify};

use crate::link::{nanos_now, ChannelOut, Mailbox};
pub use crate::link::{Connect, Connection, SiteLink};
use crate::replica::chunk_hashes;
use crate::runtime;
use crate::session::marks::{Marker, WallClock};
pub use crate::session::shipper::{ConnectError, LinkInfo, LinkState, ShipError};
use crate::session::shipper::{Incoming, Opening, ShipperSession};
use crate::session::Tip;

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
/// A session with records the replica does not yet hold durably and
/// applied pings this often; the replica also syncs its journal then, so
/// durability follows the last write within about this long. A settled
/// session does not ping: its link does, once a second for every group.
const IDLE_PING: Duration = Duration::from_millis(100);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A session that lasted this long resets the backoff.
const BACKOFF_RESET: Duration = Duration::from_secs(30);
/// How often changed configuration files are looked for.
const FILES_EVERY: Duration = Duration::from_millis(250);
/// How often regions every replica holds are cleared from the persistent
/// dirty map (docs/CAPTURE.md, D2), while the session is idle.
const CLEAR_EVERY: Duration = Duration::from_secs(5);
/// How long a settled session with nothing to clear sleeps when nothing
/// wakes it (records, a verification request and the stop do at once).
const QUIET_WAIT: Duration = Duration::from_secs(30);
/// How long a sender waits for a diff before looking at its flags.
const DIFF_POLL: Duration = Duration::from_millis(200);
/// How long `verify` lets the replica catch up before each pass.
const CATCH_UP: Duration = Duration::from_secs(60);

/// The session with one replica across reconnects: its machine and byte
/// counters, read by status.
pub struct Link {
    session: Mutex<ShipperSession>,
    raw_bytes: AtomicU64,
    wire_bytes: AtomicU64,
    /// Bytes of this site's images hashed to compare them with the
    /// replica's (resyncs and verifications), since the link was made.
    compare_bytes: AtomicU64,
    site: Mutex<Option<Arc<SiteLink>>>,
    /// Wakes the shipper (records arrived, a verification was asked for,
    /// the session's acknowledgement task ended, the capture closed).
    wake: Arc<Notify>,
}

impl Link {
    pub fn new(epoch: u64, fork: Tip) -> Link {
        Link {
            session: Mutex::new(ShipperSession::new(epoch, fork)),
            raw_bytes: AtomicU64::new(0),
            wire_bytes: AtomicU64::new(0),
            compare_bytes: AtomicU64::new(0),
            site: Mutex::new(None),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Wakes the shipper, e.g. after sending it a verification request.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// What status shows of the link.
    pub fn info(&self) -> LinkInfo {
        let mut info = self.session.lock().info((
            self.raw_bytes.load(Ordering::Relaxed),
            self.wire_bytes.load(Ordering::Relaxed),
        ));
        info.compare_bytes = self.compare_bytes.load(Ordering::Relaxed);
        if info.state != LinkState::Disconnected {
            // The site link's pings are the freshest round trips.
            if let Some(rtt) = self.site.lock().as_ref().and_then(|s| s.rtt()) {
                info.rtt = Some(rtt);
            }
        }
        info
    }

    fn count(&self, compressor: &Compressor) {
        let (raw, wire) = compressor.stats();
        self.raw_bytes.store(raw, Ordering::Relaxed);
        self.wire_bytes.store(wire, Ordering::Relaxed);
    }
}

pub struct Shipper {
    pub capture: Arc<GroupCapture>,
    pub local_site: String,
    pub replica_site: String,
    pub epoch: u64,
    /// Where this primary's epoch began (docs/FAILOVER.md): a replica whose
    /// tip is exactly here, or in this epoch, can stream; any other needs
    /// a comparison.
    pub fork: Tip,
    /// The link to the replica site, shared by every group.
    pub site: Arc<SiteLink>,
    pub link: Arc<Link>,
    pub stop: Arc<AtomicBool>,
    /// The group's configuration files, if it has any.
    pub files: Option<Arc<crate::files::FileSet>>,
    /// Verification requests (`tandem verify`).
    pub verify: Receiver<VerifyJob>,
    /// After sending what was queued, wait this long for more before
    /// looking again (async mode: records travel in larger batches, with
    /// fewer wake-ups on both sides). Zero sends every record at once.
    pub gather: Duration,
    /// A group defined at runtime: its definition, sent before the hello.
    pub definition: Option<String>,
}

/// A running shipper.
pub struct ShipperTask {
    done: crossbeam_channel::Receiver<()>,
}

impl ShipperTask {
    /// Waits until the shipper has ended (after its `stop` was set and
    /// its capture closed).
    pub fn join(self) {
        let _ = self.done.recv();
    }
}

/// Why a verification did not complete.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("replica not connected")]
    NotConnected,
    #[error("replication link stopped")]
    LinkStopped,
    #[error("no answer from the replication link")]
    NoAnswer,
    #[error("replication link failed: {0}")]
    Link(Arc<ShipError>),
}

/// A request to compare the replica with the primary, chunk by chunk.
pub struct VerifyJob {
    pub reply: crossbeam_channel::Sender<Result<VerifyReport, VerifyError>>,
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

/// A diff handed from the reader to the sender, with the hashes it
/// answers: (volume, offset, chunk, count).
struct Diff {
    asked: crate::session::shipper::Asked,
    bitmap: Vec<u8>,
}

/// A session's channel as the sender uses it: where frames go, the diffs
/// the acknowledgement task hands over, whether that task still runs.
struct Wire<'a> {
    out: &'a mut ChannelOut,
    diffs: &'a mut mpsc::UnboundedReceiver<Diff>,
    alive: &'a AtomicBool,
    compressor: &'a mut Compressor,
    marks: &'a mut Marks,
}

/// Which records of a session are marked as recovery points, and their
/// capture instants as wall-clock time (docs/PEER.md, "Marks").
struct Marks {
    marker: Marker,
    clock: WallClock,
    /// Told of every mark sent (the replica's point, for status).
    link: Arc<Link>,
}

impl Marks {
    /// `consistent`: the session streams to a replica that is a prefix.
    fn new(consistent: bool, link: Arc<Link>) -> Marks {
        Marks {
            marker: Marker::new(consistent),
            clock: WallClock::now(),
            link,
        }
    }

    fn message(&self, mark: crate::session::marks::MarkAt) -> Message {
        self.link.session.lock().marked(mark.seq);
        Message::Mark {
            seq: mark.seq,
            time_ms: self.clock.ms(mark.at),
        }
    }
}

/// Sends a captured record, then its mark if it gets one.
async fn send_record(
    out: &mut ChannelOut,
    epoch: u64,
    rec: &tandem_capture::Record,
    compressor: &mut Compressor,
    marks: &mut Marks,
) -> Result<(), ShipError> {
    out.send(&record_message(epoch, rec, compressor)).await?;
    let point = match rec.op {
        Op::Flush => true,
        Op::Write { fua, .. } | Op::WriteZeroes { fua, .. } | Op::Trim { fua, .. } => fua,
    };
    if let Some(mark) = marks.marker.sent(rec.seq, rec.at, point) {
        out.send(&marks.message(mark)).await?;
    }
    Ok(())
}

impl Wire<'_> {
    async fn send(&mut self, msg: &Message) -> Result<(), ShipError> {
        self.out.send(msg).await
    }

    async fn flush(&mut self) -> Result<(), ShipError> {
        Ok(self.out.flush().await?)
    }
}

/// What to do with chunks a `Diff` marks.
enum OnDiff<'a> {
    /// Send them (resync).
    Send,
    /// Note them (verify).
    Collect(&'a mut Vec<(u32, u64, u64)>),
}

impl Shipper {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Starts the shipper as a task on the replication runtime; it runs
    /// until `stop` is set and the capture closed.
    pub fn spawn(self) -> ShipperTask {
        let (tx, done) = crossbeam_channel::bounded(1);
        runtime::handle().spawn(async move {
            self.serve().await;
            let _ = tx.send(());
        });
        ShipperTask { done }
    }

    /// Runs the shipper on the calling thread until `stop`.
    pub fn run(self) {
        runtime::handle().block_on(self.serve());
    }

    /// Runs until `stop`, reconnecting with backoff.
    async fn serve(self) {
        *self.link.site.lock() = Some(Arc::clone(&self.site));
        let wake = Arc::clone(&self.link.wake);
        let listener = {
            let wake = Arc::clone(&wake);
            self.capture.on_arrival(Box::new(move || wake.notify_one()))
        };
        // The capture outlives this shipper (a role change may reuse it):
        // it stops waking it when it ends.
        struct Unlisten<'a>(&'a GroupCapture, u64);
        impl Drop for Unlisten<'_> {
            fn drop(&mut self) {
                self.0.remove_listener(self.1);
            }
        }
        let _unlisten = Unlisten(&self.capture, listener);
        let mut backoff = BACKOFF_MIN;
        // Kept across reconnects, so that the byte counters are cumulative.
        let mut compressor = Compressor::new(1);
        while !self.stopping() {
            let started = Instant::now();
            match self.session(&mut compressor, &wake).await {
                Ok(()) => return,
                Err(e) => {
                    let mut session = self.link.session.lock();
                    if session.is_new_error(&e) {
                        tracing::warn!(group = self.capture.name(), replica = %self.replica_site, "replication link down: {e}");
                    }
                    session.disconnected(&e);
                }
            }
            if started.elapsed() > BACKOFF_RESET {
                backoff = BACKOFF_MIN;
            }
            let until = tokio::time::Instant::now() + backoff;
            // Woken early by records or the stop (the capture closes).
            while tokio::time::Instant::now() < until && !self.stopping() {
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep_until(until) => {}
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn session(
        &self,
        compressor: &mut Compressor,
        wake: &Arc<Notify>,
    ) -> Result<(), ShipError> {
        let group = self.capture.name().to_owned();
        let replica = self.replica_site.clone();
        let crate::link::Channel {
            mut out,
            mut inbox,
            guard,
        } = self.site.open().await?;
        let ended = |inbox_end: Option<Message>| match inbox_end {
            Some(Message::Refuse { reason }) => ShipError::Refused(reason),
            Some(Message::End { reason }) => ShipError::Ended(reason),
            Some(other) => ShipError::Unexpected(other.kind()),
            None => guard
                .link()
                .fault()
                .map_or(ShipError::LinkClosed, ShipError::Link),
        };
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
        if let Some(definition) = &self.definition {
            let define = Message::Define {
                group: group.clone(),
                definition: definition.clone(),
            };
            out.send(&define).await?;
            out.flush().await?;
            match inbox.recv().await {
                Some(Message::Defined { .. }) => {}
                other => return Err(ended(other)),
            }
        }
        out.send(&hello).await?;
        out.flush().await?;
        let welcome = match inbox.recv().await {
            Some(Message::Welcome(w)) => w,
            other => return Err(ended(other)),
        };
        let diverged = match inbox.recv().await {
            Some(Message::Diverged(d)) => d,
            other => return Err(ended(other)),
        };
        let cap = &self.capture;
        let sizes: Vec<u64> = cap.volumes().iter().map(|v| v.image.size()).collect();
        let opening = self.link.session.lock().welcome(
            &welcome,
            &diverged,
            cap.next_seq(),
            cap.owes(&replica)?,
            &sizes,
            Instant::now(),
        )?;
        // Only a replica that is a prefix of this history gets marks before
        // a resync has made it one again.
        let consistent = matches!(opening, Opening::Stream { .. });
        match opening {
            Opening::Stream { durable } => cap.ack(&replica, durable)?,
            Opening::Resume { durable } => {
                tracing::info!(%group, %replica, "replica inconsistent after a resync of this epoch: comparing only what is still owed");
                if let Some(durable) = durable {
                    cap.ack(&replica, durable)?;
                }
            }
            Opening::CompareKnown { ranges } => {
                let bytes: u64 = ranges.iter().flatten().map(|r| r.1).sum();
                tracing::info!(%group, %replica, tip = ?(welcome.epoch, welcome.durable), replica_dirty_bytes = bytes, "a former owner returns: comparing the regions it wrote and those written here since the fork");
                runtime::blocking(|| cap.owe_ranges(&replica, &ranges))?;
            }
            Opening::CompareAll(why) => {
                tracing::info!(%group, %replica, ?why, "replica needs a full comparison; only differing chunks move");
                runtime::blocking(|| cap.owe_everything(&replica))?;
            }
        }
        cap.rewind(&replica)?;
        tracing::info!(%group, %replica, durable = welcome.durable, state = welcome.state.as_str(), "replication link up");
        cap.set_connected(&replica, true)?;
        struct Disconnected<'a>(&'a GroupCapture, &'a str);
        impl Drop for Disconnected<'_> {
            fn drop(&mut self) {
                let _ = self.0.set_connected(self.1, false);
            }
        }
        let _connected = Disconnected(cap, &replica);

        let alive = Arc::new(AtomicBool::new(true));
        let (diff_tx, mut diff_rx) = mpsc::unbounded_channel::<Diff>();
        let acks = {
            let (cap, link, alive, wake) = (
                Arc::clone(cap),
                Arc::clone(&self.link),
                Arc::clone(&alive),
                Arc::clone(wake),
            );
            let replica = replica.clone();
            runtime::handle().spawn(async move {
                let end = read_acks(&mut inbox, &cap, &link, &replica, &diff_tx).await;
                alive.store(false, Ordering::Release);
                wake.notify_one();
                end
            })
        };
        let mut marks = Marks::new(consistent, Arc::clone(&self.link));
        let result = self
            .stream(&mut out, &mut diff_rx, &alive, compressor, &mut marks, wake)
            .await;
        alive.store(false, Ordering::Release);
        // Tell the replica why the session ends (best effort), then end the
        // channel: the acknowledgement task's mailbox ends.
        let reason = match &result {
            Ok(()) => "the primary is stopping the group".to_owned(),
            Err(e) => e.to_string(),
        };
        if guard.link().is_alive() {
            let _ = out.send(&Message::End { reason }).await;
            let _ = out.flush().await;
        }
        drop(guard);
        let acks_end = match acks.await {
            Ok(end) => end,
            Err(_) => ShipError::ReaderPanicked,
        };
        match result {
            Err(ShipError::ReaderEnded) => Err(acks_end),
            other => other,
        }
    }

    /// Sends records and resyncs until stopped or the link fails.
    async fn stream(
        &self,
        out: &mut ChannelOut,
        diffs: &mut mpsc::UnboundedReceiver<Diff>,
        alive: &AtomicBool,
        compressor: &mut Compressor,
        marks: &mut Marks,
        wake: &Notify,
    ) -> Result<(), ShipError> {
        let cap = &self.capture;
        let replica = &self.replica_site;
        let mut unflushed = false;
        let mut last_sent = Instant::now();
        // Every file goes again on a new session: the replica may have
        // missed changes.
        let mut files_sent = std::collections::BTreeMap::new();
        let mut files_checked: Option<Instant> = None;
        let mut cleared = Instant::now();
        // Events taken from the capture in one lock, sent one by one.
        let mut events = std::collections::VecDeque::new();
        loop {
            if let Ok(job) = self.verify.try_recv() {
                out.flush().await?;
                match self
                    .verify_replica(out, diffs, alive, compressor, marks, wake)
                    .await
                {
                    Ok(report) => {
                        let _ = job.reply.send(Ok(report));
                    }
                    Err(e) => {
                        let e = Arc::new(e);
                        let _ = job.reply.send(Err(VerifyError::Link(Arc::clone(&e))));
                        return Err(ShipError::Verify(e));
                    }
                }
                unflushed = false;
                last_sent = Instant::now();
            }
            if files_checked.is_none_or(|t| t.elapsed() >= FILES_EVERY) {
                files_checked = Some(Instant::now());
                if self.send_files(out, &mut files_sent, compressor).await? {
                    unflushed = true;
                }
            }
            if self.stopping() {
                out.flush().await?;
                return Ok(());
            }
            if !alive.load(Ordering::Acquire) {
                return Err(ShipError::ReaderEnded);
            }
            if events.is_empty() {
                compressor.set_wanted(out.compress_wanted(compressor.stats().0));
                cap.next_events(replica, Duration::ZERO, EVENTS_PER_LOCK, &mut events)?;
                // Registered before any is written: an acknowledgement
                // cannot overtake the sender's bookkeeping.
                let last = events.iter().rev().find_map(|e| match e {
                    Event::Record(r) => Some(r.seq),
                    Event::Resync { .. } => None,
                });
                if let Some(last) = last {
                    self.link.session.lock().sending(last);
                }
            }
            match events.pop_front() {
                Some(Event::Record(rec)) => {
                    send_record(out, self.epoch, &rec, compressor, marks).await?;
                    unflushed = true;
                    last_sent = Instant::now();
                }
                Some(Event::Resync {
                    ranges,
                    resume_at,
                    more,
                }) => {
                    out.flush().await?;
                    let mut wire = Wire {
                        out: &mut *out,
                        diffs: &mut *diffs,
                        alive,
                        compressor: &mut *compressor,
                        marks: &mut *marks,
                    };
                    self.resync(&mut wire, &ranges, resume_at, more).await?;
                    unflushed = false;
                    last_sent = Instant::now();
                }
                None => {
                    // The stream is idle: its last record is marked a
                    // second after its capture at the latest.
                    if let Some(mark) = marks.marker.idle(Instant::now()) {
                        out.send(&marks.message(mark)).await?;
                        unflushed = true;
                    }
                    if unflushed {
                        out.flush().await?;
                        unflushed = false;
                        if !self.gather.is_zero() {
                            tokio::time::sleep(self.gather).await;
                        }
                        self.link.count(compressor);
                        continue;
                    }
                    let settled = self.link.session.lock().settled();
                    if !settled && last_sent.elapsed() >= IDLE_PING {
                        out.send(&Message::Ping(nanos_now())).await?;
                        out.flush().await?;
                        last_sent = Instant::now();
                    }
                    // Only a map with marked regions has anything to
                    // clear (and takes passes to clear it): an idle group
                    // with a clean map is not woken for it.
                    let marked = cap.has_marked();
                    if marked && cleared.elapsed() >= CLEAR_EVERY {
                        cleared = Instant::now();
                        match runtime::blocking(|| cap.clear_cold()) {
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
                    // Sleep until records arrive (the capture wakes us),
                    // or the next thing to look at.
                    let wait = if !settled {
                        IDLE_PING.saturating_sub(last_sent.elapsed())
                    } else if self.files.is_some() {
                        FILES_EVERY
                    } else if marked {
                        CLEAR_EVERY.saturating_sub(cleared.elapsed())
                    } else {
                        // Nothing to do until something wakes this task.
                        QUIET_WAIT
                    };
                    // ...or until the last record sent is to be marked.
                    let wait = marks.marker.deadline().map_or(wait, |at| {
                        wait.min(at.saturating_duration_since(Instant::now()))
                    });
                    tokio::select! {
                        () = wake.notified() => {}
                        () = tokio::time::sleep(wait.max(Duration::from_millis(1))) => {}
                    }
                }
            }
            self.link.count(compressor);
        }
    }

    /// Sends files that changed since they were last sent on this session.
    async fn send_files(
        &self,
        out: &mut ChannelOut,
        sent: &mut std::collections::BTreeMap<std::path::PathBuf, u64>,
        compressor: &mut Compressor,
    ) -> Result<bool, ShipError> {
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
            out.send(&msg).await?;
            sent.insert(path.clone(), version.version);
            tracing::debug!(group = self.capture.name(), replica = %self.replica_site, file = %path.display(), "file sent");
        }
        Ok(!changed.is_empty())
    }

    /// One resync part: compares `ranges`, then continues with records
    /// from `resume_at`; `more` bytes are still owed after it (a later
    /// part compares them, and until then the replica stays
    /// inconsistent).
    async fn resync(
        &self,
        wire: &mut Wire<'_>,
        ranges: &[Vec<(u64, u64)>],
        resume_at: u64,
        more: u64,
    ) -> Result<(), ShipError> {
        let cap = &self.capture;
        let total: u64 = ranges.iter().flatten().map(|r| r.1).sum();
        self.link
            .session
            .lock()
            .resync_begins(resume_at, total, more);
        wire.marks.marker.resync_begins(resume_at);
        tracing::info!(group = cap.name(), replica = %self.replica_site, bytes = total, more, resume_at, "resync: comparing chunks");
        wire.send(&Message::ResyncBegin {
            epoch: self.epoch,
            resume_at,
            bytes: total,
        })
        .await?;
        // Whole regions compare in large chunks; small known-dirty ranges
        // in 4 KiB chunks, so that only what changed travels.
        let mut items = Vec::new();
        for (volume, list) in ranges.iter().enumerate() {
            let volume =
                u32::try_from(volume).map_err(|_| ShipError::Unexpected("volume index"))?;
            for &(offset, len) in list {
                let chunk = if len >= 1 << 20 {
                    CHUNK_LARGE
                } else {
                    CHUNK_SMALL
                };
                let start = offset - offset % u64::from(chunk);
                items.push((volume, start, offset + len - start, chunk));
            }
        }
        self.compare(wire, &items, &mut OnDiff::Send).await?;
        // Every chunk was read before this point: once the replica has
        // applied the records below it, it is a prefix again — unless
        // more parts follow (never, as far as this part goes).
        let consistent_at = if more > 0 {
            tandem_peer::NOT_YET_CONSISTENT
        } else {
            cap.next_seq()
        };
        self.link.session.lock().resync_ends(consistent_at);
        wire.marks.marker.resync_ends(consistent_at, Instant::now());
        wire.send(&Message::ResyncEnd { consistent_at }).await?;
        wire.flush().await?;
        let sent = self.link.info().resync_sent;
        tracing::info!(group = cap.name(), replica = %self.replica_site, compared = total, sent, "resync: data sent");
        Ok(())
    }

    /// Compares chunks with the replica: `items` are (volume, offset,
    /// length, chunk size). `Hashes` go out in a pipeline of
    /// [`HASHES_IN_FLIGHT`]; the chunks each `Diff` marks are sent (resync)
    /// or noted (verify). Returns the bytes compared.
    async fn compare(
        &self,
        wire: &mut Wire<'_>,
        items: &[(u32, u64, u64, u32)],
        on_diff: &mut OnDiff<'_>,
    ) -> Result<u64, ShipError> {
        let mut compared = 0;
        // Hashes sent whose diff this sender has not handled yet.
        let mut in_flight = 0usize;
        for &(volume, offset, len, chunk) in items {
            let image = self.capture.image(volume as usize);
            let end = offset + len;
            let mut pos = offset;
            while pos < end {
                let count = usize::try_from((end - pos).div_ceil(u64::from(chunk)))
                    .unwrap_or(usize::MAX)
                    .min(HASHES_PER_MESSAGE);
                let hashes = runtime::blocking(|| chunk_hashes(image, pos, chunk, count))?;
                let n = hashes.len();
                if n == 0 {
                    break; // past the end of the volume
                }
                let hashed = (n as u64 * u64::from(chunk)).min(image.size().saturating_sub(pos));
                self.link.compare_bytes.fetch_add(hashed, Ordering::Relaxed);
                compared += (n as u64 * u64::from(chunk)).min(end - pos);
                self.link.session.lock().asking((volume, pos, chunk, n));
                wire.send(&Message::Hashes {
                    volume,
                    offset: pos,
                    chunk,
                    hashes,
                })
                .await?;
                pos += n as u64 * u64::from(chunk);
                in_flight += 1;
                while in_flight >= HASHES_IN_FLIGHT {
                    wire.flush().await?;
                    self.answer_diff(wire, on_diff).await?;
                    in_flight -= 1;
                }
            }
        }
        wire.flush().await?;
        while in_flight > 0 {
            self.answer_diff(wire, on_diff).await?;
            in_flight -= 1;
            wire.flush().await?;
        }
        Ok(compared)
    }

    /// Waits for the next `Diff` and handles the chunks that differ: sent
    /// read fresh from the image, or noted.
    async fn answer_diff(
        &self,
        wire: &mut Wire<'_>,
        on_diff: &mut OnDiff<'_>,
    ) -> Result<(), ShipError> {
        let diff = loop {
            match tokio::time::timeout(DIFF_POLL, wire.diffs.recv()).await {
                Ok(Some(d)) => break d,
                Ok(None) => return Err(ShipError::ReaderEnded),
                Err(_) if wire.alive.load(Ordering::Acquire) => {
                    if self.stopping() {
                        return Err(ShipError::Stopping);
                    }
                }
                Err(_) => return Err(ShipError::ReaderEnded),
            }
        };
        let (volume, offset, chunk, count) = diff.asked;
        let image = self.capture.image(volume as usize);
        // Read around the page cache, as the hashes were (chunk_hashes).
        let mut buf = AlignedBuf::new(chunk as usize);
        let mut sent = 0u64;
        let raw_sent = wire.compressor.stats().0;
        wire.compressor
            .set_wanted(wire.out.compress_wanted(raw_sent));
        for i in (0..count).filter(|&i| tandem_peer::diff_bit(&diff.bitmap, i)) {
            let at = offset + i as u64 * u64::from(chunk);
            let n =
                usize::try_from(u64::from(chunk).min(image.size().saturating_sub(at))).unwrap_or(0);
            match on_diff {
                OnDiff::Collect(found) => found.push((volume, at, n as u64)),
                OnDiff::Send => {
                    let data = &mut buf.bytes_mut()[..n];
                    runtime::blocking(|| image.read_uncached(at, data))?;
                    let data = Payload::encode(data, wire.compressor);
                    sent += data.wire_len() as u64;
                    wire.send(&Message::Chunk {
                        volume,
                        offset: at,
                        data,
                    })
                    .await?;
                }
            }
        }
        self.link
            .session
            .lock()
            .compared(count as u64 * u64::from(chunk), sent);
        Ok(())
    }

    /// Compares every chunk of every volume with the replica; chunks that
    /// differ are compared again once the replica has caught up with the
    /// changes made meanwhile (the VM keeps writing), up to three passes.
    async fn verify_replica(
        &self,
        out: &mut ChannelOut,
        diffs: &mut mpsc::UnboundedReceiver<Diff>,
        alive: &AtomicBool,
        compressor: &mut Compressor,
        marks: &mut Marks,
        wake: &Notify,
    ) -> Result<VerifyReport, ShipError> {
        let mut report = VerifyReport::default();
        let mut suspects = Vec::new();
        for (v, vol) in self.capture.volumes().iter().enumerate() {
            let v = u32::try_from(v).map_err(|_| ShipError::Unexpected("volume index"))?;
            suspects.push((v, 0, vol.image.size()));
        }
        for pass in 1..=3 {
            report.passes = pass;
            let mut wire = Wire {
                out: &mut *out,
                diffs: &mut *diffs,
                alive,
                compressor: &mut *compressor,
                marks: &mut *marks,
            };
            self.catch_up(&mut wire, wake).await?;
            let items: Vec<_> = suspects
                .iter()
                .map(|&(v, off, len)| (v, off, len, CHUNK_LARGE))
                .collect();
            let mut found = Vec::new();
            let compared = self
                .compare(&mut wire, &items, &mut OnDiff::Collect(&mut found))
                .await?;
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
    async fn catch_up(&self, wire: &mut Wire<'_>, wake: &Notify) -> Result<(), ShipError> {
        let cap = &self.capture;
        let target = cap.next_seq().saturating_sub(1);
        let deadline = Instant::now() + CATCH_UP;
        let mut events = std::collections::VecDeque::new();
        loop {
            let lag = cap.lag(&self.replica_site)?;
            if lag.acked >= target && !lag.resyncing {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ShipError::CatchUp(CATCH_UP));
            }
            if !wire.alive.load(Ordering::Acquire) {
                return Err(ShipError::ReaderEnded);
            }
            cap.next_events(&self.replica_site, Duration::ZERO, 1, &mut events)?;
            match events.pop_front() {
                Some(Event::Record(rec)) => {
                    self.link.session.lock().sending(rec.seq);
                    send_record(wire.out, self.epoch, &rec, wire.compressor, wire.marks).await?;
                }
                Some(Event::Resync {
                    ranges,
                    resume_at,
                    more,
                }) => self.resync(wire, &ranges, resume_at, more).await?,
                None => {
                    if let Some(mark) = wire.marks.marker.idle(Instant::now()) {
                        let mark = wire.marks.message(mark);
                        wire.send(&mark).await?;
                    }
                    wire.send(&Message::Ping(nanos_now())).await?;
                    wire.flush().await?;
                    tokio::select! {
                        () = wake.notified() => {}
                        () = tokio::time::sleep(Duration::from_millis(20)) => {}
                    }
                }
            }
        }
    }
}

/// Takes the replica's messages until the channel ends; returns why.
async fn read_acks(
    inbox: &mut Mailbox,
    cap: &GroupCapture,
    link: &Link,
    replica: &str,
    diffs: &mpsc::UnboundedSender<Diff>,
) -> ShipError {
    loop {
        let Some(msg) = inbox.recv().await else {
            return ShipError::LinkClosed;
        };
        if let Message::End { reason } = msg {
            return ShipError::Ended(reason);
        }
        let incoming = link.session.lock().receive(msg, nanos_now());
        let done = match incoming {
            Ok(Incoming::Nothing) => Ok(()),
            Ok(Incoming::Acked { received, durable }) => cap
                .ack_received(replica, received, durable)
                .map_err(ShipError::from),
            Ok(Incoming::Diff { asked, bitmap }) => diffs
                .send(Diff { asked, bitmap })
                .map_err(|_| ShipError::ReaderEnded),
            Ok(Incoming::ResyncDone { resume_at }) => {
                runtime::blocking(|| cap.resync_done(replica, resume_at).map_err(ShipError::from))
            }
            Err(e) => Err(e),
        };
        if let Err(e) = done {
            return e;
        }
    }
}

/// The one place a captured record becomes a peer-protocol record.
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
            Payload::encode_shared(data, compressor),
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

/// Tells the replica on `conn` that `group` is removed (`Retire`, alone on
/// the connection) and waits for its `Retired`.
pub fn retire(conn: Connection, group: &str) -> Result<(), ShipError> {
    let Connection {
        reader,
        writer,
        close,
    } = conn;
    let mut w = BufWriter::new(writer);
    let mut r = BufReader::new(reader);
    let mut scratch = Vec::new();
    let result = (|| {
        let retire = Message::Retire {
            group: group.to_owned(),
        };
        write_message(&mut w, &retire, &mut scratch)?;
        w.flush().map_err(PeerError::Io)?;
        let mut buf = Vec::new();
        match read_message(&mut r, &mut buf).map_err(ShipError::NoWelcome)? {
            Message::Retired { .. } => Ok(()),
            Message::Refuse { reason } => Err(ShipError::Refused(reason)),
            other => Err(ShipError::Unexpected(other.kind())),
        }
    })();
    close();
    result
}
