//! Links (docs/PEER.md, "Links"): one connection between two sites carries
//! the sessions of every group, each on its own channel. A link has two
//! threads, whatever the number of groups: a writer that sends what the
//! sessions queue (and, on the primary's side, pings once a second) and a
//! reader that hands each frame to its channel's session. The sessions
//! themselves are tasks ([`crate::runtime`]).
//!
//! Flow control: a session waits to queue more once its link has
//! [`OUT_BUDGET`] bytes queued; on the replica's side the reader waits
//! once a channel has [`IN_BUDGET`] bytes its session has not taken. The
//! primary's reader never waits (what a replica sends is small and bounded
//! by what was asked), so the two sides cannot wait on each other.

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::RecvTimeoutError;
use parking_lot::{Condvar, Mutex};
use tandem_peer::{
    payload_len, read_frame_within, try_encode_on, try_encode_split, write_frame, Message,
    PeerError, MAX_CHANNEL, MAX_PAYLOAD,
};
use tokio::sync::{mpsc, Semaphore};

use crate::runtime;
use crate::session::shipper::{ConnectError, ShipError};
use crate::squeeze::Squeeze;

/// Bytes a link may have queued for its writer; sessions wait beyond.
/// Small on purpose: what is in flight is not acknowledged, and the
/// primary's queue holds it meanwhile (32 MiB here and 64 MiB below let a
/// 4 KiB random-write load overflow that queue into dirty tracking: 0.26x
/// instead of 0.34x of the no-replica IOPS in bench part a).
pub const OUT_BUDGET: usize = 8 << 20;
/// Bytes of one channel's messages its session has not taken yet, beyond
/// which the replica's reader waits.
pub const IN_BUDGET: usize = 8 << 20;
/// A session's frames go to the writer in pieces of about this much.
const OUT_PIECE: usize = 256 << 10;
/// The primary pings each link this often...
pub const LINK_PING: Duration = Duration::from_secs(1);
/// ...and closes it when it heard nothing for this long.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(10);
/// A failed connection attempt is the answer for this long (so that the
/// groups waiting for a link do not each try again at once).
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// A connection to a peer: its halves, and a way to close it from
/// another thread.
pub struct Connection {
    pub reader: Box<dyn Read + Send>,
    pub writer: Box<dyn Write + Send>,
    pub close: Box<dyn Fn() + Send + Sync>,
}

/// Opens a connection to the replica site.
pub type Connect = dyn Fn() -> Result<Connection, ConnectError> + Send + Sync;

/// The link is gone: nothing more can be sent on it.
#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error("the link to the peer site is down")]
pub struct LinkDown;

impl From<LinkDown> for ShipError {
    fn from(_: LinkDown) -> ShipError {
        ShipError::LinkClosed
    }
}

/// Frames queued for a link's writer; `permits` go back to the budget
/// once written.
struct Queued {
    /// Written in order: encoded frames, and long writes' data shared
    /// with the capture queue (no copy).
    parts: Vec<Bytes>,
    permits: u32,
}

/// Where a link's sessions queue their frames.
#[derive(Clone)]
pub struct Outbound {
    tx: crossbeam_channel::Sender<Queued>,
    budget: Arc<Semaphore>,
}

impl Outbound {
    /// Queues encoded frames, waiting while the link has [`OUT_BUDGET`]
    /// bytes queued.
    pub async fn send_bytes(&self, bytes: Vec<u8>) -> Result<(), LinkDown> {
        self.send_parts(vec![Bytes::from(bytes)]).await
    }

    /// [`Outbound::send_bytes`] of frames in parts, written in order.
    pub async fn send_parts(&self, parts: Vec<Bytes>) -> Result<(), LinkDown> {
        let len: usize = parts.iter().map(Bytes::len).sum();
        let permits = u32::try_from(len.min(OUT_BUDGET)).unwrap_or(u32::MAX);
        let permit = self
            .budget
            .acquire_many(permits)
            .await
            .map_err(|_| LinkDown)?;
        permit.forget();
        self.tx.send(Queued { parts, permits }).map_err(|_| {
            self.budget.add_permits(permits as usize);
            LinkDown
        })
    }

    /// Bytes queued for the writer and not yet handed to the socket: near
    /// zero while the link keeps up with its senders.
    pub fn backlog(&self) -> usize {
        OUT_BUDGET.saturating_sub(self.budget.available_permits())
    }

    /// Queues a small message at once (a reader's answer to a ping).
    pub fn send_now(&self, channel: u32, msg: &Message) -> Result<(), LinkDown> {
        let mut bytes = Vec::new();
        try_encode_on(channel, msg, &mut bytes).map_err(|_| LinkDown)?;
        self.tx
            .send(Queued {
                parts: vec![Bytes::from(bytes)],
                permits: 0,
            })
            .map_err(|_| LinkDown)
    }
}

/// A session's side of its channel: frames are gathered and handed to the
/// link's writer in pieces.
pub struct ChannelOut {
    pub channel: u32,
    out: Outbound,
    /// Frames being encoded.
    buf: Vec<u8>,
    /// Gathered before `buf`: earlier frames and long writes' data.
    parts: Vec<Bytes>,
    parts_len: usize,
    squeeze: Squeeze,
}

impl ChannelOut {
    pub fn new(channel: u32, out: Outbound) -> ChannelOut {
        ChannelOut {
            channel,
            out,
            buf: Vec::new(),
            parts: Vec::new(),
            parts_len: 0,
            squeeze: Squeeze::new(Instant::now(), 0),
        }
    }

    /// Adds `msg`; the gathered frames go once they make a piece. A long
    /// write's data is not copied: it goes as a part of its own.
    pub async fn send(&mut self, msg: &Message) -> Result<(), ShipError> {
        if let Some(data) = try_encode_split(self.channel, msg, &mut self.buf)? {
            self.seal();
            self.parts_len += data.len();
            self.parts.push(data);
        }
        if self.parts_len + self.buf.len() >= OUT_PIECE {
            self.flush().await?;
        }
        Ok(())
    }

    /// Whether compressing what is sent next pays (docs/PEER.md): the link
    /// is behind (more than a quarter of [`OUT_BUDGET`] waits for the
    /// socket) and drains slowly enough that bytes, not the receiver's
    /// CPU, hold it up ([`Squeeze`]). `raw_sent`: the data given to the
    /// compressor so far, before compression (measured after it, a link
    /// would look slower for compressing and never stop).
    pub fn compress_wanted(&mut self, raw_sent: u64) -> bool {
        let behind = self.out.backlog() > OUT_BUDGET / 4;
        self.squeeze.wanted(Instant::now(), raw_sent, behind)
    }

    /// Ends the frames encoded so far as a part.
    fn seal(&mut self) {
        if !self.buf.is_empty() {
            let head = Bytes::from(std::mem::take(&mut self.buf));
            self.parts_len += head.len();
            self.parts.push(head);
        }
    }

    /// Hands what was gathered to the writer.
    pub async fn flush(&mut self) -> Result<(), LinkDown> {
        self.seal();
        if self.parts.is_empty() {
            return Ok(());
        }
        self.parts_len = 0;
        let parts = std::mem::take(&mut self.parts);
        self.out.send_parts(parts).await
    }
}

/// The bytes of one channel's messages not yet taken by its session.
struct Budget {
    state: Mutex<(usize, bool)>,
    freed: Condvar,
}

impl Budget {
    fn new() -> Arc<Budget> {
        Arc::new(Budget {
            state: Mutex::new((0, false)),
            freed: Condvar::new(),
        })
    }

    /// Waits for room for `n` bytes; false once the session is gone.
    fn acquire(&self, n: usize) -> bool {
        let mut st = self.state.lock();
        while !st.1 && st.0 > 0 && st.0 + n > IN_BUDGET {
            self.freed.wait(&mut st);
        }
        if st.1 {
            return false;
        }
        st.0 += n;
        true
    }

    fn release(&self, n: usize) {
        let mut st = self.state.lock();
        st.0 = st.0.saturating_sub(n);
        self.freed.notify_all();
    }

    fn close(&self) {
        self.state.lock().1 = true;
        self.freed.notify_all();
    }
}

/// Messages for one channel read in one go, and their size.
type Batch = (Vec<Message>, usize);

/// What a channel's session receives, in order; ends (None) when the link
/// or the channel closes. The reader hands messages over in batches (what
/// it read for the channel before its input ran dry): one wake-up of the
/// session per batch, not per message.
pub struct Mailbox {
    rx: mpsc::UnboundedReceiver<Batch>,
    ready: std::collections::VecDeque<Message>,
    budget: Option<Arc<Budget>>,
}

impl Mailbox {
    pub async fn recv(&mut self) -> Option<Message> {
        if self.ready.is_empty() {
            let (msgs, n) = self.rx.recv().await?;
            if let Some(b) = &self.budget {
                b.release(n);
            }
            self.ready.extend(msgs);
        }
        self.ready.pop_front()
    }

    /// Nothing more has arrived yet.
    pub fn is_empty(&self) -> bool {
        self.ready.is_empty() && self.rx.is_empty()
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            b.close();
        }
    }
}

struct ChannelTx {
    tx: mpsc::UnboundedSender<Batch>,
    budget: Option<Arc<Budget>>,
}

/// What a link's threads and sessions share.
pub struct LinkCore {
    channels: Mutex<HashMap<u32, ChannelTx>>,
    alive: AtomicBool,
    started: Instant,
    /// When the reader last heard anything, in nanoseconds from `started`.
    heard: AtomicU64,
    /// The latest round trip of a link ping, in nanoseconds (0: none yet).
    rtt: AtomicU64,
    /// Why the link ended, once it has.
    fault: Mutex<Option<Arc<ShipError>>>,
    close: Box<dyn Fn() + Send + Sync>,
}

impl LinkCore {
    fn new(close: Box<dyn Fn() + Send + Sync>) -> Arc<LinkCore> {
        Arc::new(LinkCore {
            channels: Mutex::new(HashMap::new()),
            alive: AtomicBool::new(true),
            started: Instant::now(),
            heard: AtomicU64::new(0),
            rtt: AtomicU64::new(0),
            fault: Mutex::new(None),
            close,
        })
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Why the link ended (None while it is up, or if it ended cleanly).
    pub fn fault(&self) -> Option<Arc<ShipError>> {
        self.fault.lock().clone()
    }

    /// The latest round trip of a link ping.
    pub fn rtt(&self) -> Option<Duration> {
        match self.rtt.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_nanos(n)),
        }
    }

    fn since_start(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn heard_ago(&self) -> Duration {
        Duration::from_nanos(
            self.since_start()
                .saturating_sub(self.heard.load(Ordering::Relaxed)),
        )
    }

    /// Ends the link: every session's mailbox ends, the connection closes.
    fn end(&self, fault: Option<ShipError>) {
        if let Some(f) = fault {
            self.fault.lock().get_or_insert(Arc::new(f));
        }
        self.alive.store(false, Ordering::Release);
        for (_, c) in self.channels.lock().drain() {
            if let Some(b) = c.budget {
                b.close();
            }
        }
        (self.close)();
    }

    /// A new channel `id`; `budgeted`: the reader waits for its session.
    fn open_channel(&self, id: u32, budgeted: bool) -> Mailbox {
        let (tx, rx) = mpsc::unbounded_channel();
        let budget = budgeted.then(Budget::new);
        self.channels.lock().insert(
            id,
            ChannelTx {
                tx,
                budget: budget.clone(),
            },
        );
        Mailbox {
            rx,
            ready: std::collections::VecDeque::new(),
            budget,
        }
    }

    /// Ends channel `id`: its session's mailbox ends once it has taken
    /// what arrived; later frames for it are dropped.
    pub fn close_channel(&self, id: u32) {
        if let Some(c) = self.channels.lock().remove(&id) {
            if let Some(b) = c.budget {
                b.close();
            }
        }
    }

    fn has_channel(&self, id: u32) -> bool {
        self.channels.lock().contains_key(&id)
    }

    /// Hands a batch to its channel's session (dropped if the session has
    /// ended). Waits (the replica's reader) while the channel is over its
    /// budget.
    fn deliver(&self, id: u32, batch: Batch) {
        let (tx, budget) = match self.channels.lock().get(&id) {
            Some(c) => (c.tx.clone(), c.budget.clone()),
            None => return,
        };
        let n = batch.1;
        if let Some(b) = &budget {
            if !b.acquire(n) {
                return; // the session ended meanwhile: dropped
            }
        }
        if tx.send(batch).is_err() {
            if let Some(b) = &budget {
                b.release(n);
            }
        }
    }
}

/// Frames a reader has read and not yet handed over, by channel.
#[derive(Default)]
struct Gathered {
    batches: Vec<(u32, Batch)>,
    bytes: usize,
}

/// Hand over once this much is gathered, even if more is buffered.
const GATHER_BYTES: usize = 1 << 20;

impl Gathered {
    fn add(&mut self, channel: u32, msg: Message) {
        let n = payload_len(&msg);
        self.bytes += n;
        match self.batches.iter_mut().find(|(c, _)| *c == channel) {
            Some((_, (msgs, bytes))) => {
                msgs.push(msg);
                *bytes += n;
            }
            None => self.batches.push((channel, (vec![msg], n))),
        }
    }

    /// Hands everything over when the reader's next read may wait (no
    /// whole frame left in its buffer), or when enough was gathered.
    fn deliver_if_dry(&mut self, core: &LinkCore, buffered: &[u8]) {
        if self.bytes >= GATHER_BYTES || !whole_frame(buffered) {
            self.deliver(core);
        }
    }

    fn deliver(&mut self, core: &LinkCore) {
        for (channel, batch) in self.batches.drain(..) {
            core.deliver(channel, batch);
        }
        self.bytes = 0;
    }
}

/// Whether `buf` starts with a whole frame (its header's length says how
/// long it is).
fn whole_frame(buf: &[u8]) -> bool {
    match buf.get(8..12) {
        Some(len) => {
            let mut n = [0u8; 4];
            n.copy_from_slice(len);
            buf.len() >= tandem_peer::FRAME_HEADER_LEN + u32::from_le_bytes(n) as usize
        }
        None => false,
    }
}

/// The wall clock in nanoseconds, as pings carry it.
pub(crate) fn nanos_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Starts a link's writer thread over `writer`; `ping`: the primary's
/// side, which pings and watches the link's liveness.
fn start_writer(
    core: &Arc<LinkCore>,
    writer: Box<dyn Write + Send>,
    ping: bool,
    name: String,
) -> Result<(Outbound, thread::JoinHandle<()>), std::io::Error> {
    let (tx, rx) = crossbeam_channel::unbounded::<Queued>();
    let budget = Arc::new(Semaphore::new(OUT_BUDGET));
    let out = Outbound {
        tx,
        budget: Arc::clone(&budget),
    };
    let core = Arc::clone(core);
    let handle = thread::Builder::new().name(name).spawn(move || {
        let result = write_loop(&core, &rx, writer, &budget, ping);
        budget.close();
        if core.is_alive() {
            core.end(result.err());
        }
    })?;
    Ok((out, handle))
}

fn write_loop(
    core: &LinkCore,
    rx: &crossbeam_channel::Receiver<Queued>,
    writer: Box<dyn Write + Send>,
    budget: &Semaphore,
    ping: bool,
) -> Result<(), ShipError> {
    // The sessions' pieces go to the socket as they are, several per
    // system call (no copy into a buffer of the writer's own).
    let mut w = writer;
    let mut last_ping = Instant::now();
    let mut scratch = Vec::new();
    let mut pieces: Vec<Queued> = Vec::new();
    loop {
        let wait = if ping {
            LINK_PING.saturating_sub(last_ping.elapsed())
        } else {
            LINK_TIMEOUT
        };
        match rx.recv_timeout(wait) {
            Ok(q) => {
                pieces.push(q);
                while pieces.len() < WRITE_PIECES {
                    match rx.try_recv() {
                        Ok(q) => pieces.push(q),
                        Err(_) => break,
                    }
                }
                write_pieces(&mut w, &pieces).map_err(PeerError::Io)?;
                for q in pieces.drain(..) {
                    budget.add_permits(q.permits as usize);
                }
                w.flush().map_err(PeerError::Io)?;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                w.flush().map_err(PeerError::Io)?;
                return Ok(());
            }
        }
        if !core.is_alive() {
            return Ok(());
        }
        if ping && last_ping.elapsed() >= LINK_PING {
            let silent = core.heard_ago();
            if silent >= LINK_TIMEOUT {
                return Err(ShipError::Silent(silent));
            }
            write_frame(&mut w, 0, &Message::Ping(nanos_now()), &mut scratch)?;
            w.flush().map_err(PeerError::Io)?;
            last_ping = Instant::now();
        }
    }
}

/// Pieces written with one system call at most (`IOV_MAX` is 1024).
const WRITE_PIECES: usize = 64;

/// Writes every piece, in order, vectored.
fn write_pieces(w: &mut dyn Write, pieces: &[Queued]) -> std::io::Result<()> {
    let mut slices: Vec<std::io::IoSlice<'_>> = pieces
        .iter()
        .flat_map(|q| &q.parts)
        .filter(|b| !b.is_empty())
        .map(|b| std::io::IoSlice::new(b))
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match w.write_vectored(rest) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => std::io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What the primary's reader does with a `LeaseAnswer` (failsafe
/// ownership): called with the replica site, the ask's id, the duration
/// granted and the answers.
pub type LeaseAnswers = Arc<dyn Fn(&str, u64, u32, Vec<(String, String)>) + Send + Sync>;

/// What a replica site answers to a `LeaseAsk` of `primary`.
pub type LeaseGrants<'a> = &'a dyn Fn(&str, u64, u32, Vec<(String, u64)>) -> Message;

/// The primary's side of the link to one replica site, across
/// reconnects: groups open channels on it; the first one connects.
pub struct SiteLink {
    local: String,
    peer: String,
    connect: Box<Connect>,
    /// Where `LeaseAnswer`s go (set by the failsafe driver).
    answers: Arc<Mutex<Option<LeaseAnswers>>>,
    current: tokio::sync::Mutex<Option<Arc<Live>>>,
    failed: Mutex<Option<(Instant, Arc<ShipError>)>>,
}

/// A connected link.
struct Live {
    core: Arc<LinkCore>,
    out: Outbound,
    next: AtomicU32,
}

/// A group's session on a link: its number, what it receives, where it
/// sends. Dropping it ends the channel.
pub struct Channel {
    pub out: ChannelOut,
    pub inbox: Mailbox,
    pub guard: ChannelGuard,
}

/// Ends its channel when dropped.
pub struct ChannelGuard {
    id: u32,
    core: Arc<LinkCore>,
}

impl ChannelGuard {
    /// The link this channel is on.
    pub fn link(&self) -> &LinkCore {
        &self.core
    }

    /// Ends the channel from anywhere: its session's mailbox ends.
    pub fn closer(&self) -> Box<dyn Fn() + Send + Sync> {
        let (core, id) = (Arc::clone(&self.core), self.id);
        Box::new(move || core.close_channel(id))
    }
}

impl Drop for ChannelGuard {
    fn drop(&mut self) {
        self.core.close_channel(self.id);
    }
}

impl SiteLink {
    pub fn new(local: &str, peer: &str, connect: Box<Connect>) -> Arc<SiteLink> {
        Arc::new(SiteLink {
            local: local.to_owned(),
            peer: peer.to_owned(),
            connect,
            answers: Arc::new(Mutex::new(None)),
            current: tokio::sync::Mutex::new(None),
            failed: Mutex::new(None),
        })
    }

    /// Where `LeaseAnswer`s read from this link go from now on.
    pub fn on_lease_answers(&self, answers: LeaseAnswers) {
        *self.answers.lock() = Some(answers);
    }

    /// Sends a link message (channel 0) now if the link is up; false if
    /// it is not (or is being connected).
    pub fn send_control(&self, msg: &Message) -> bool {
        let Ok(current) = self.current.try_lock() else {
            return false;
        };
        current
            .as_ref()
            .filter(|l| l.core.is_alive())
            .is_some_and(|l| l.out.send_now(0, msg).is_ok())
    }

    /// The latest round trip of a link ping, while connected.
    pub fn rtt(&self) -> Option<Duration> {
        self.current.try_lock().ok().and_then(|c| {
            c.as_ref()
                .filter(|l| l.core.is_alive())
                .and_then(|l| l.core.rtt())
        })
    }

    /// Opens a channel, connecting the link first if it is down.
    pub async fn open(&self) -> Result<Channel, ShipError> {
        let mut current = self.current.lock().await;
        let live = match current.as_ref().filter(|l| l.core.is_alive()) {
            Some(live) => Arc::clone(live),
            None => {
                if let Some((at, e)) = self.failed.lock().as_ref() {
                    if at.elapsed() < RETRY_AFTER {
                        return Err(ShipError::Link(Arc::clone(e)));
                    }
                }
                match runtime::blocking(|| self.connect_link()) {
                    Ok(live) => {
                        *self.failed.lock() = None;
                        *current = Some(Arc::clone(&live));
                        live
                    }
                    Err(e) => {
                        let e = Arc::new(e);
                        *self.failed.lock() = Some((Instant::now(), Arc::clone(&e)));
                        return Err(ShipError::Link(e));
                    }
                }
            }
        };
        drop(current);
        let id = live.next.fetch_add(1, Ordering::Relaxed);
        if id > MAX_CHANNEL {
            // Sixteen million sessions on one connection: start afresh.
            live.core.end(None);
            return Err(ShipError::LinkClosed);
        }
        let inbox = live.core.open_channel(id, false);
        Ok(Channel {
            out: ChannelOut::new(id, live.out.clone()),
            inbox,
            guard: ChannelGuard {
                id,
                core: Arc::clone(&live.core),
            },
        })
    }

    /// Connects, says `Link`, waits for `Linked`, starts the threads.
    fn connect_link(&self) -> Result<Arc<Live>, ShipError> {
        let Connection {
            reader,
            mut writer,
            close,
        } = (self.connect)()?;
        let mut r = BufReader::with_capacity(1 << 16, reader);
        let handshake = (|| {
            let link = Message::Link {
                version: tandem_peer::VERSION,
                primary: self.local.clone(),
                replica: self.peer.clone(),
            };
            write_frame(&mut writer, 0, &link, &mut Vec::new())?;
            writer.flush().map_err(PeerError::Io)?;
            match read_frame_within(&mut r, &mut Vec::new(), MAX_PAYLOAD)
                .map_err(ShipError::NoWelcome)?
            {
                (0, Message::Linked { .. }) => Ok(()),
                (0, Message::Refuse { reason }) => Err(ShipError::Refused(reason)),
                (_, other) => Err(ShipError::Unexpected(other.kind())),
            }
        })();
        if let Err(e) = handshake {
            close();
            return Err(e);
        }
        let core = LinkCore::new(close);
        let (out, _writer) = start_writer(&core, writer, true, format!("link-out-{}", self.peer))
            .map_err(ShipError::Thread)?;
        {
            let (reading, out) = (Arc::clone(&core), out.clone());
            let peer = self.peer.clone();
            let answers = Arc::clone(&self.answers);
            let spawned = thread::Builder::new()
                .name(format!("link-in-{}", self.peer))
                .spawn(move || {
                    let end = read_replies(&reading, &mut r, &out, &peer, &answers);
                    if reading.is_alive() {
                        tracing::warn!(replica = %peer, "replication link down: {end}");
                    }
                    reading.end(Some(end));
                });
            if let Err(e) = spawned {
                core.end(None);
                return Err(ShipError::Thread(e));
            }
        }
        tracing::info!(replica = %self.peer, "replication link up (one connection for every group)");
        Ok(Arc::new(Live {
            core,
            out,
            next: AtomicU32::new(1),
        }))
    }
}

/// The primary's reader: hands the replica's frames to their channels
/// (never waits for a session), answers pings; returns why it ended.
fn read_replies<R: Read>(
    core: &LinkCore,
    r: &mut BufReader<R>,
    out: &Outbound,
    peer: &str,
    answers: &Mutex<Option<LeaseAnswers>>,
) -> ShipError {
    let mut buf = Vec::new();
    let mut gathered = Gathered::default();
    loop {
        let (channel, msg) = match read_frame_within(r, &mut buf, MAX_PAYLOAD) {
            Ok(f) => f,
            Err(e) => {
                gathered.deliver(core);
                return e.into();
            }
        };
        core.heard.store(core.since_start(), Ordering::Relaxed);
        if channel != 0 {
            // (A late frame for a session that ended is dropped.)
            gathered.add(channel, msg);
            gathered.deliver_if_dry(core, r.buffer());
            continue;
        }
        gathered.deliver_if_dry(core, r.buffer());
        match msg {
            Message::Pong(sent) => core
                .rtt
                .store(nanos_now().saturating_sub(sent).max(1), Ordering::Relaxed),
            Message::Ping(n) => {
                if out.send_now(0, &Message::Pong(n)).is_err() {
                    return ShipError::LinkClosed;
                }
            }
            Message::LeaseAnswer {
                id,
                duration_ms,
                answers: given,
            } => {
                let handler = answers.lock().clone();
                if let Some(handler) = handler {
                    handler(peer, id, duration_ms, given);
                }
            }
            Message::Refuse { reason } | Message::End { reason } => {
                return ShipError::Ended(reason)
            }
            other => return ShipError::Unexpected(other.kind()),
        }
    }
}

/// The replica's side of a link, served on the calling thread (its
/// reader) after `Link` was checked and `Linked` sent: frames go to their
/// channels' sessions; a `Hello` or `Define` on a new channel starts one
/// with `start`. Returns when the link ends, once every session it
/// started has ended.
pub fn serve_replica<R: Read>(
    mut reader: BufReader<R>,
    writer: Box<dyn Write + Send>,
    close: Box<dyn Fn() + Send + Sync>,
    peer: &str,
    start: &dyn Fn(SessionStart) -> tokio::task::JoinHandle<()>,
    grants: LeaseGrants<'_>,
) -> Result<(), PeerError> {
    let core = LinkCore::new(close);
    let (out, writer_thread) =
        start_writer(&core, writer, false, format!("link-out-{peer}")).map_err(PeerError::Io)?;
    let mut sessions = Vec::new();
    let mut buf = Vec::new();
    let mut gathered = Gathered::default();
    let result = loop {
        let (channel, msg) = match read_frame_within(&mut reader, &mut buf, MAX_PAYLOAD) {
            Ok(f) => f,
            Err(PeerError::Closed) => break Ok(()),
            Err(e) => break Err(e),
        };
        if channel == 0 {
            gathered.deliver_if_dry(&core, reader.buffer());
            match msg {
                Message::Ping(n) => {
                    let _ = out.send_now(0, &Message::Pong(n));
                }
                Message::Pong(_) => {}
                Message::LeaseAsk {
                    id,
                    duration_ms,
                    groups,
                } => {
                    let _ = out.send_now(0, &grants(peer, id, duration_ms, groups));
                }
                Message::End { .. } => break Ok(()),
                other => {
                    break Err(PeerError::Malformed(format!(
                        "{}: not a link message (channel 0)",
                        other.kind()
                    )))
                }
            }
            continue;
        }
        if core.has_channel(channel) {
            gathered.add(channel, msg);
            gathered.deliver_if_dry(&core, reader.buffer());
            continue;
        }
        gathered.deliver_if_dry(&core, reader.buffer());
        if matches!(msg, Message::Hello(_) | Message::Define { .. }) {
            let inbox = core.open_channel(channel, true);
            sessions.retain(|s: &tokio::task::JoinHandle<()>| !s.is_finished());
            sessions.push(start(SessionStart {
                first: msg,
                inbox,
                out: ChannelOut::new(channel, out.clone()),
                guard: ChannelGuard {
                    id: channel,
                    core: Arc::clone(&core),
                },
            }));
        }
        // Anything else is late for a session that ended: dropped.
    };
    // What was read before the end is the sessions' to keep.
    gathered.deliver(&core);
    core.end(None);
    runtime::handle().block_on(async {
        for s in sessions {
            let _ = s.await;
        }
    });
    drop(out);
    let _ = writer_thread.join();
    result
}

/// A session a link's reader starts.
pub struct SessionStart {
    pub first: Message,
    pub inbox: Mailbox,
    pub out: ChannelOut,
    pub guard: ChannelGuard,
}
