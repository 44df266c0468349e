//! The primary side of replication to one replica site (docs/PEER.md), as
//! a driver of [`ShipperSession`]: connects, says hello, resyncs what the
//! replica lacks by chunk comparison, then streams the group's captured
//! records in order while a second thread reads the replica's
//! acknowledgements. Both threads step the link's one session machine.

use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use parking_lot::Mutex;
use tandem_capture::{Event, GroupCapture, Op};
use tandem_peer::{
    read_message, write_message, Compressor, Hello, Message, Payload, PeerError, RecordOp,
};

use crate::replica::chunk_hashes;
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
/// A link with records the replica does not yet hold durably and applied
/// pings this often; the replica also syncs its journal then, so
/// durability follows the last write within about this long.
const IDLE_PING: Duration = Duration::from_millis(100);
/// A settled link (the replica holds everything sent) only shows it is
/// alive, this often: well inside `PEER_TIMEOUT` and the replica's read
/// timeout, and cheap with a thousand groups.
const SETTLED_PING: Duration = Duration::from_secs(2);
/// How long an idle sender waits for records before it looks at its
/// flags, pings and files: while records are in flight, and when settled.
const BUSY_WAIT: Duration = Duration::from_millis(200);
const SETTLED_WAIT: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A session that lasted this long resets the backoff.
const BACKOFF_RESET: Duration = Duration::from_secs(30);
/// How often changed configuration files are looked for.
const FILES_EVERY: Duration = Duration::from_millis(250);
/// How often regions every replica holds are cleared from the persistent
/// dirty map (docs/CAPTURE.md, D2), while the link is idle.
const CLEAR_EVERY: Duration = Duration::from_secs(5);
/// How long a sender waits for a diff before looking at its flags.
const DIFF_POLL: Duration = Duration::from_millis(200);
/// How long `verify` lets the replica catch up before each pass.
const CATCH_UP: Duration = Duration::from_secs(60);

/// A connection to a replica: its halves, and a way to close it from
/// another thread.
pub struct Connection {
    pub reader: Box<dyn Read + Send>,
    pub writer: Box<dyn Write + Send>,
    pub close: Box<dyn Fn() + Send + Sync>,
}

/// Opens a connection to the replica.
pub type Connect = dyn Fn() -> Result<Connection, ConnectError> + Send + Sync;

/// The link to one replica across reconnects: its session machine and
/// byte counters, read by status.
pub struct Link {
    session: Mutex<ShipperSession>,
    raw_bytes: AtomicU64,
    wire_bytes: AtomicU64,
}

impl Link {
    pub fn new(epoch: u64, fork: Tip) -> Link {
        Link {
            session: Mutex::new(ShipperSession::new(epoch, fork, Instant::now())),
            raw_bytes: AtomicU64::new(0),
            wire_bytes: AtomicU64::new(0),
        }
    }

    /// What status shows of the link.
    pub fn info(&self) -> LinkInfo {
        self.session.lock().info((
            self.raw_bytes.load(Ordering::Relaxed),
            self.wire_bytes.load(Ordering::Relaxed),
        ))
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
    pub connect: Box<Connect>,
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

/// The connection as the resync and verify pipelines use it.
struct Wire<'a, W> {
    w: &'a mut W,
    diffs: &'a Receiver<Diff>,
    alive: &'a AtomicBool,
    compressor: &'a mut Compressor,
    scratch: Vec<u8>,
}

impl<W: Write> Wire<'_, W> {
    fn send(&mut self, msg: &Message) -> Result<(), ShipError> {
        Ok(write_message(self.w, msg, &mut self.scratch)?)
    }

    fn flush(&mut self) -> Result<(), ShipError> {
        Ok(self.w.flush().map_err(PeerError::Io)?)
    }
}

/// What to do with chunks a `Diff` marks.
enum OnDiff<'a> {
    /// Send them (resync).
    Send,
    /// Note them (verify).
    Collect(&'a mut Vec<(u32, u64, u64)>),
}

fn nanos_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Shipper {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Runs until `stop`, reconnecting with backoff.
    pub fn run(self) {
        let mut backoff = BACKOFF_MIN;
        // Kept across reconnects, so that the byte counters are cumulative.
        let mut compressor = Compressor::new(1);
        while !self.stopping() {
            let started = Instant::now();
            match self.session(&mut compressor) {
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
            let until = Instant::now() + backoff;
            while Instant::now() < until && !self.stopping() {
                thread::sleep(Duration::from_millis(20));
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn session(&self, compressor: &mut Compressor) -> Result<(), ShipError> {
        let group = self.capture.name().to_owned();
        let replica = self.replica_site.clone();
        let Connection {
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
        let mut buf = Vec::new();
        if let Some(definition) = &self.definition {
            let define = Message::Define {
                group: group.clone(),
                definition: definition.clone(),
            };
            write_message(&mut w, &define, &mut scratch)?;
            w.flush().map_err(PeerError::Io)?;
            match read_message(&mut r, &mut buf).map_err(ShipError::NoWelcome)? {
                Message::Defined { .. } => {}
                Message::Refuse { reason } => return Err(ShipError::Refused(reason)),
                other => return Err(ShipError::Unexpected(other.kind())),
            }
        }
        write_message(&mut w, &hello, &mut scratch)?;
        w.flush().map_err(PeerError::Io)?;
        let welcome = match read_message(&mut r, &mut buf).map_err(ShipError::NoWelcome)? {
            Message::Welcome(w) => w,
            Message::Refuse { reason } => return Err(ShipError::Refused(reason)),
            other => return Err(ShipError::Unexpected(other.kind())),
        };
        let cap = &self.capture;
        let opening = self
            .link
            .session
            .lock()
            .welcome(&welcome, cap.next_seq(), Instant::now());
        match opening {
            Opening::Stream { durable } => cap.ack(&replica, durable)?,
            Opening::CompareAll(why) => {
                tracing::info!(%group, %replica, ?why, "replica needs a full comparison; only differing chunks move");
                cap.owe_everything(&replica)?;
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
        let (diff_tx, diff_rx) = crossbeam_channel::bounded::<Diff>(HASHES_IN_FLIGHT * 2);
        let reader_thread = {
            let (cap, link, alive) = (Arc::clone(cap), Arc::clone(&self.link), Arc::clone(&alive));
            let replica = replica.clone();
            thread::Builder::new()
                .name(format!("acks-{group}-{replica}"))
                .spawn(move || {
                    let end = read_acks(&mut r, &cap, &link, &replica, &diff_tx, &alive);
                    alive.store(false, Ordering::Release);
                    end
                })
                .map_err(ShipError::Thread)?
        };
        let result = self.stream(&mut w, &diff_rx, &alive, compressor);
        alive.store(false, Ordering::Release);
        drop(w);
        close(); // wakes the ack reader
        let reader_end = reader_thread.join().unwrap_or(ShipError::ReaderPanicked);
        match result {
            Err(ShipError::ReaderEnded) => Err(reader_end),
            other => other,
        }
    }

    /// Sends records and resyncs until stopped or the link fails.
    fn stream<W: Write>(
        &self,
        w: &mut W,
        diffs: &Receiver<Diff>,
        alive: &AtomicBool,
        compressor: &mut Compressor,
    ) -> Result<(), ShipError> {
        let cap = &self.capture;
        let replica = &self.replica_site;
        let mut scratch = Vec::new();
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
                w.flush().map_err(PeerError::Io)?;
                match self.verify_replica(w, diffs, alive, compressor) {
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
                if self.send_files(w, &mut files_sent, compressor, &mut scratch)? {
                    unflushed = true;
                }
            }
            if self.stopping() {
                w.flush().map_err(PeerError::Io)?;
                return Ok(());
            }
            if !alive.load(Ordering::Acquire) {
                return Err(ShipError::ReaderEnded);
            }
            if events.is_empty() {
                // Only an idle sender asks the session how long to wait:
                // not once per record on the hot path.
                let wait = if unflushed {
                    Duration::ZERO
                } else if self.link.session.lock().settled() {
                    SETTLED_WAIT
                } else {
                    BUSY_WAIT
                };
                cap.next_events(replica, wait, EVENTS_PER_LOCK, &mut events)?;
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
                    let msg = record_message(self.epoch, &rec, compressor);
                    write_message(w, &msg, &mut scratch)?;
                    unflushed = true;
                    last_sent = Instant::now();
                }
                Some(Event::Resync { ranges, resume_at }) => {
                    w.flush().map_err(PeerError::Io)?;
                    self.resync(w, diffs, alive, &ranges, resume_at, compressor)?;
                    unflushed = false;
                    last_sent = Instant::now();
                }
                None => {
                    if unflushed {
                        w.flush().map_err(PeerError::Io)?;
                        unflushed = false;
                        if !self.gather.is_zero() {
                            thread::sleep(self.gather);
                        }
                    } else if last_sent.elapsed() >= self.ping_every() {
                        write_message(w, &Message::Ping(nanos_now()), &mut scratch)?;
                        w.flush().map_err(PeerError::Io)?;
                        last_sent = Instant::now();
                    }
                    if let Some(e) = self.link.session.lock().silent(Instant::now()) {
                        return Err(e);
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
            self.link.count(compressor);
        }
    }

    /// How often an idle link pings: often while the replica does not hold
    /// everything sent, rarely once it does.
    fn ping_every(&self) -> Duration {
        if self.link.session.lock().settled() {
            SETTLED_PING
        } else {
            IDLE_PING
        }
    }

    /// Sends files that changed since they were last sent on this session.
    fn send_files<W: Write>(
        &self,
        w: &mut W,
        sent: &mut std::collections::BTreeMap<std::path::PathBuf, u64>,
        compressor: &mut Compressor,
        scratch: &mut Vec<u8>,
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
            write_message(w, &msg, scratch)?;
            sent.insert(path.clone(), version.version);
            tracing::debug!(group = self.capture.name(), replica = %self.replica_site, file = %path.display(), "file sent");
        }
        Ok(!changed.is_empty())
    }

    fn resync<W: Write>(
        &self,
        w: &mut W,
        diffs: &Receiver<Diff>,
        alive: &AtomicBool,
        ranges: &[Vec<(u64, u64)>],
        resume_at: u64,
        compressor: &mut Compressor,
    ) -> Result<(), ShipError> {
        let cap = &self.capture;
        let total: u64 = ranges.iter().flatten().map(|r| r.1).sum();
        self.link.session.lock().resync_begins(resume_at, total);
        tracing::info!(group = cap.name(), replica = %self.replica_site, bytes = total, resume_at, "resync: comparing chunks");
        let mut wire = Wire {
            w,
            diffs,
            alive,
            compressor,
            scratch: Vec::new(),
        };
        wire.send(&Message::ResyncBegin {
            epoch: self.epoch,
            resume_at,
            bytes: total,
        })?;
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
        self.compare(&mut wire, &items, &mut OnDiff::Send)?;
        // Every chunk was read before this point: once the replica has
        // applied the records below it, it is a prefix again.
        let consistent_at = cap.next_seq();
        self.link.session.lock().resync_ends(consistent_at);
        wire.send(&Message::ResyncEnd { consistent_at })?;
        wire.flush()?;
        let sent = self.link.info().resync_sent;
        tracing::info!(group = cap.name(), replica = %self.replica_site, compared = total, sent, "resync: data sent");
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
                let hashes = chunk_hashes(image, pos, chunk, count)?;
                let n = hashes.len();
                if n == 0 {
                    break; // past the end of the volume
                }
                compared += (n as u64 * u64::from(chunk)).min(end - pos);
                self.link.session.lock().asking((volume, pos, chunk, n));
                wire.send(&Message::Hashes {
                    volume,
                    offset: pos,
                    chunk,
                    hashes,
                })?;
                pos += n as u64 * u64::from(chunk);
                in_flight += 1;
                while in_flight >= HASHES_IN_FLIGHT {
                    wire.flush()?;
                    self.answer_diff(wire, on_diff)?;
                    in_flight -= 1;
                }
            }
        }
        wire.flush()?;
        while in_flight > 0 {
            self.answer_diff(wire, on_diff)?;
            in_flight -= 1;
            wire.flush()?;
        }
        Ok(compared)
    }

    /// Waits for the next `Diff` and handles the chunks that differ: sent
    /// read fresh from the image, or noted.
    fn answer_diff<W: Write>(
        &self,
        wire: &mut Wire<'_, W>,
        on_diff: &mut OnDiff<'_>,
    ) -> Result<(), ShipError> {
        let diff = loop {
            match wire.diffs.recv_timeout(DIFF_POLL) {
                Ok(d) => break d,
                Err(RecvTimeoutError::Timeout) if wire.alive.load(Ordering::Acquire) => {
                    if self.stopping() {
                        return Err(ShipError::Stopping);
                    }
                }
                Err(_) => return Err(ShipError::ReaderEnded),
            }
        };
        let (volume, offset, chunk, count) = diff.asked;
        let image = self.capture.image(volume as usize);
        let mut buf = vec![0u8; chunk as usize];
        let mut sent = 0u64;
        for i in (0..count).filter(|&i| tandem_peer::diff_bit(&diff.bitmap, i)) {
            let at = offset + i as u64 * u64::from(chunk);
            let n =
                usize::try_from(u64::from(chunk).min(image.size().saturating_sub(at))).unwrap_or(0);
            match on_diff {
                OnDiff::Collect(found) => found.push((volume, at, n as u64)),
                OnDiff::Send => {
                    image.read(at, &mut buf[..n])?;
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
        self.link
            .session
            .lock()
            .compared(count as u64 * u64::from(chunk), sent);
        Ok(())
    }

    /// Compares every chunk of every volume with the replica; chunks that
    /// differ are compared again once the replica has caught up with the
    /// changes made meanwhile (the VM keeps writing), up to three passes.
    fn verify_replica<W: Write>(
        &self,
        w: &mut W,
        diffs: &Receiver<Diff>,
        alive: &AtomicBool,
        compressor: &mut Compressor,
    ) -> Result<VerifyReport, ShipError> {
        let mut report = VerifyReport::default();
        let mut suspects = Vec::new();
        for (v, vol) in self.capture.volumes().iter().enumerate() {
            let v = u32::try_from(v).map_err(|_| ShipError::Unexpected("volume index"))?;
            suspects.push((v, 0, vol.image.size()));
        }
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
        diffs: &Receiver<Diff>,
        alive: &AtomicBool,
        compressor: &mut Compressor,
    ) -> Result<(), ShipError> {
        let cap = &self.capture;
        let target = cap.next_seq().saturating_sub(1);
        let deadline = Instant::now() + CATCH_UP;
        let mut scratch = Vec::new();
        loop {
            let lag = cap.lag(&self.replica_site)?;
            if lag.acked >= target && !lag.resyncing {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ShipError::CatchUp(CATCH_UP));
            }
            if !alive.load(Ordering::Acquire) {
                return Err(ShipError::ReaderEnded);
            }
            match cap.next_event(&self.replica_site, Duration::from_millis(20))? {
                Some(Event::Record(rec)) => {
                    self.link.session.lock().sending(rec.seq);
                    let msg = record_message(self.epoch, &rec, compressor);
                    write_message(w, &msg, &mut scratch)?;
                }
                Some(Event::Resync { ranges, resume_at }) => {
                    self.resync(w, diffs, alive, &ranges, resume_at, compressor)?
                }
                None => w.flush().map_err(PeerError::Io)?,
            }
        }
    }
}

/// Reads the replica's messages until the connection ends; returns why.
fn read_acks<R: Read>(
    r: &mut R,
    cap: &GroupCapture,
    link: &Link,
    replica: &str,
    diffs: &crossbeam_channel::Sender<Diff>,
    alive: &AtomicBool,
) -> ShipError {
    let mut buf = Vec::new();
    loop {
        let msg = match read_message(r, &mut buf) {
            Ok(msg) => msg,
            Err(e) => return e.into(),
        };
        let incoming = link
            .session
            .lock()
            .receive(msg, Instant::now(), nanos_now());
        let done = match incoming {
            Ok(Incoming::Nothing) => Ok(()),
            Ok(Incoming::Acked { received, durable }) => cap
                .ack_received(replica, received, durable)
                .map_err(ShipError::from),
            Ok(Incoming::Diff { asked, bitmap }) => diffs
                .send(Diff { asked, bitmap })
                .map_err(|_| ShipError::ReaderEnded),
            Ok(Incoming::ResyncDone { resume_at }) => {
                cap.resync_done(replica, resume_at).map_err(ShipError::from)
            }
            Err(e) => Err(e),
        };
        if let Err(e) = done {
            return e;
        }
        if !alive.load(Ordering::Acquire) {
            return ShipError::ReaderEnded;
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
