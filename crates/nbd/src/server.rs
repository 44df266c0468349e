//! The NBD server: accepts connections, runs the handshake, and serves
//! requests.
//!
//! Threads: one accept thread per listener, one reader thread per
//! connection, and a shared worker pool. The reader decodes requests and
//! runs what cannot block for long inline — writes and trims (applied in
//! arrival order), reads that hit the page cache — batching their replies
//! into one socket write. Anything that may block (reads from disk,
//! flushes, FUA, waiting for replicas) goes to the pool, which replies out
//! of order. Replies share the socket through a mutex.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};
use tracing::{debug, info, warn};

use crate::error::{ErrorCode, ExportError, ProtocolError};
use crate::export::{Catalog, Completion, Export};
use crate::handshake::{self, Agreement, Negotiation, Step};
use crate::listener::AcceptWaker;
use crate::proto::*;
use crate::stats::Stats;
use crate::transmission::{self as tx, Command, RequestHeader, Session};

/// Bytes of replies and payloads one connection may have in the worker
/// pool at once; the reader waits beyond this (bounded memory).
const INFLIGHT_BUDGET: usize = 64 << 20;
/// Reader buffer: many pipelined 4 KiB writes fit in one read.
const INBUF: usize = 256 << 10;
/// Batched replies are written out beyond this size.
const BATCH_FLUSH: usize = 256 << 10;
/// A client must finish the handshake within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
const POOL_THREADS: usize = 8;
/// A client that stops reading its replies for this long is disconnected,
/// so that it cannot hold worker threads.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections served at once; more are refused with a log line.
pub const MAX_CONNECTIONS: usize = 512;
/// A write buffer above this size is released after use.
const SCRATCH_KEEP: usize = 4 << 20;

/// A connected byte stream the server can serve (Unix or TCP socket).
pub trait Stream: Read + Write + Send + Sync + Sized + 'static {
    fn try_clone(&self) -> io::Result<Self>;
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Stream for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        UnixStream::shutdown(self, how)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, timeout)
    }
}

impl Stream for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        TcpStream::shutdown(self, how)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout)
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Shared state of all listeners and connections of one server.
pub struct Server {
    pool: Sender<Job>,
    stopping: AtomicBool,
    next_id: AtomicU64,
    /// Live connections: a handle to close each one's read side.
    connections: Mutex<HashMap<u64, Box<dyn Fn() + Send>>>,
    idle: Condvar,
    /// Our own descriptors of the listening sockets, to wake their accept
    /// threads at shutdown (see [`AcceptWaker`]).
    listeners: Mutex<Vec<AcceptWaker>>,
    accept_threads: Mutex<Vec<thread::JoinHandle<()>>>,
    pub stats: Arc<Stats>,
}

impl Server {
    pub fn new() -> Arc<Server> {
        let (pool, jobs) = crossbeam_channel::unbounded::<Job>();
        for i in 0..POOL_THREADS {
            let jobs: Receiver<Job> = jobs.clone();
            let spawned = thread::Builder::new()
                .name(format!("nbd-worker-{i}"))
                .spawn(move || {
                    for job in jobs {
                        job();
                    }
                });
            if let Err(e) = spawned {
                warn!("could not start NBD worker thread: {e}");
            }
        }
        Arc::new(Server {
            pool,
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            connections: Mutex::new(HashMap::new()),
            idle: Condvar::new(),
            listeners: Mutex::new(Vec::new()),
            accept_threads: Mutex::new(Vec::new()),
            stats: Arc::new(Stats::default()),
        })
    }

    /// Serves `catalog` on a Unix socket listener until [`Server::shutdown`].
    pub fn serve_unix(
        self: &Arc<Self>,
        listener: UnixListener,
        catalog: Arc<dyn Catalog>,
    ) -> io::Result<()> {
        let label = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
            .unwrap_or_else(|| "unix".into());
        self.listeners.lock().push(AcceptWaker::new(&listener)?);
        let server = Arc::clone(self);
        let handle = thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || {
                let mut n = 0u64;
                for conn in listener.incoming() {
                    if server.stopping.load(Ordering::Acquire) {
                        break;
                    }
                    match conn {
                        Ok(stream) => {
                            n += 1;
                            server.spawn_connection(
                                stream,
                                format!("{label}#{n}"),
                                Arc::clone(&catalog),
                            );
                        }
                        Err(e) => {
                            warn!(listener = %label, "accept failed: {e}");
                            thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })?;
        self.accept_threads.lock().push(handle);
        Ok(())
    }

    /// Serves `catalog` on a TCP listener until [`Server::shutdown`].
    pub fn serve_tcp(
        self: &Arc<Self>,
        listener: TcpListener,
        catalog: Arc<dyn Catalog>,
    ) -> io::Result<()> {
        self.listeners.lock().push(AcceptWaker::new(&listener)?);
        let server = Arc::clone(self);
        let handle = thread::Builder::new()
            .name("nbd-accept-tcp".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if server.stopping.load(Ordering::Acquire) {
                        break;
                    }
                    match conn {
                        Ok(stream) => {
                            let _ = stream.set_nodelay(true);
                            let peer = stream
                                .peer_addr()
                                .map(|a| a.to_string())
                                .unwrap_or_else(|_| "tcp".into());
                            server.spawn_connection(stream, peer, Arc::clone(&catalog));
                        }
                        Err(e) => {
                            warn!("NBD TCP accept failed: {e}");
                            thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })?;
        self.accept_threads.lock().push(handle);
        Ok(())
    }

    /// Serves one already-connected stream on the calling thread.
    pub fn serve_stream<S: Stream>(
        self: &Arc<Self>,
        stream: S,
        peer: String,
        catalog: Arc<dyn Catalog>,
    ) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        match stream.try_clone() {
            Ok(handle) => {
                let mut conns = self.connections.lock();
                if conns.len() >= MAX_CONNECTIONS {
                    warn!(peer = %peer, "refusing NBD connection: {MAX_CONNECTIONS} connections already open");
                    return;
                }
                conns.insert(
                    id,
                    Box::new(move || {
                        let _ = handle.shutdown(Shutdown::Read);
                    }),
                );
            }
            Err(e) => {
                warn!(peer = %peer, "cannot track connection: {e}");
                return;
            }
        }
        if self.stopping.load(Ordering::Acquire) {
            let _ = stream.shutdown(Shutdown::Read);
        }
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        debug!(peer = %peer, "NBD client connected");
        match serve_connection(self, stream, &peer, catalog.as_ref()) {
            Ok(()) => debug!(peer = %peer, "NBD client disconnected"),
            Err(ProtocolError::Io(e)) if is_disconnect(&e) => {
                debug!(peer = %peer, "NBD client went away: {e}")
            }
            Err(e) => warn!(peer = %peer, "closing NBD connection: {e}"),
        }
        self.stats.connections.fetch_sub(1, Ordering::Relaxed);
        let mut conns = self.connections.lock();
        conns.remove(&id);
        if conns.is_empty() {
            self.idle.notify_all();
        }
    }

    fn spawn_connection<S: Stream>(
        self: &Arc<Self>,
        stream: S,
        peer: String,
        catalog: Arc<dyn Catalog>,
    ) {
        let server = Arc::clone(self);
        let name = format!("nbd-conn-{}", self.next_id.load(Ordering::Relaxed));
        let spawned = thread::Builder::new()
            .name(name)
            .spawn(move || server.serve_stream(stream, peer, catalog));
        if let Err(e) = spawned {
            warn!("cannot start a thread for an NBD connection: {e}");
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Stops accepting, lets every connection finish the requests it has
    /// received, and waits up to `grace` for them to close. Returns the
    /// number of connections still open after the wait.
    pub fn shutdown(&self, grace: Duration) -> usize {
        self.stopping.store(true, Ordering::Release);
        // Each accept thread sees `stopping` when its accept() fails.
        for waker in self.listeners.lock().drain(..) {
            waker.wake();
        }
        for handle in self.accept_threads.lock().drain(..) {
            let _ = handle.join();
        }
        let deadline = Instant::now() + grace;
        let mut conns = self.connections.lock();
        for close_read in conns.values() {
            close_read();
        }
        while !conns.is_empty() {
            if self.idle.wait_until(&mut conns, deadline).timed_out() {
                break;
            }
        }
        conns.len()
    }

    fn submit(&self, job: Job) {
        if let Err(e) = self.pool.send(job) {
            // The pool never stops while the server lives; run inline.
            (e.into_inner())();
        }
    }
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
    )
}

/// Runs the handshake, then the transmission phase.
fn serve_connection<S: Stream>(
    server: &Arc<Server>,
    mut stream: S,
    peer: &str,
    catalog: &dyn Catalog,
) -> Result<(), ProtocolError> {
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let agreement = match negotiate(server, &mut stream, catalog) {
        Ok(Some(agreement)) => agreement,
        Ok(None) => return Ok(()),
        Err(ProtocolError::Io(e))
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Err(ProtocolError::HandshakeTimeout(HANDSHAKE_TIMEOUT))
        }
        Err(e) => return Err(e),
    };
    stream.set_read_timeout(None)?;
    info!(
        peer = %peer,
        export = agreement.export.name(),
        structured = agreement.structured,
        block_status = agreement.base_allocation,
        "NBD client attached"
    );
    Transmission::new(server, stream, agreement)?.run()
}

fn negotiate<S: Stream>(
    server: &Server,
    stream: &mut S,
    catalog: &dyn Catalog,
) -> Result<Option<Agreement>, ProtocolError> {
    stream.write_all(&handshake::greeting())?;
    let mut flags = [0u8; 4];
    read_exact(stream, &mut flags, "client flags")?;
    let mut negotiation = Negotiation::new(catalog);
    negotiation.client_flags(u32::from_be_bytes(flags))?;
    let mut out = Vec::new();
    let mut data = Vec::new();
    loop {
        let mut header = [0u8; OPTION_HEADER_LEN];
        read_exact(stream, &mut header, "option header")?;
        let header = handshake::decode_option_header(&header)?;
        data.resize(header.len as usize, 0);
        read_exact(stream, &mut data, "option data")?;
        if server.is_stopping() {
            negotiation.set_shutting_down();
        }
        out.clear();
        let step = negotiation.option(header.option, &data, &mut out)?;
        stream.write_all(&out)?;
        match step {
            Step::Continue => {}
            Step::Transmit(agreement) => return Ok(Some(agreement)),
            Step::Close => return Ok(None),
        }
    }
}

fn read_exact<S: Read>(
    stream: &mut S,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), ProtocolError> {
    match stream.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(ProtocolError::Truncated(what)),
        Err(e) => Err(ProtocolError::Io(e)),
    }
}

/// Replies from the reader and the pool share the socket.
struct ReplySink<S> {
    stream: Mutex<S>,
    broken: AtomicBool,
}

impl<S: Stream> ReplySink<S> {
    fn send(&self, bytes: &[u8]) {
        if bytes.is_empty() || self.broken.load(Ordering::Relaxed) {
            return;
        }
        let mut stream = self.stream.lock();
        if let Err(e) = stream.write_all(bytes) {
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                // The client has not read its replies for REPLY_TIMEOUT:
                // it is dropped (an operator wants to know).
                warn!("NBD client did not read its replies within {REPLY_TIMEOUT:?}: disconnecting it");
            } else {
                debug!("reply write failed: {e}");
            }
            self.broken.store(true, Ordering::Relaxed);
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

/// Bytes in the worker pool for one connection, bounded by
/// [`INFLIGHT_BUDGET`].
struct Inflight {
    state: Mutex<(usize, usize)>, // (jobs, bytes)
    changed: Condvar,
}

impl Inflight {
    fn acquire(&self, bytes: usize) {
        let mut state = self.state.lock();
        while state.0 > 0 && state.1 + bytes > INFLIGHT_BUDGET {
            self.changed.wait(&mut state);
        }
        state.0 += 1;
        state.1 += bytes;
    }

    fn release(&self, bytes: usize) {
        let mut state = self.state.lock();
        state.0 -= 1;
        state.1 -= bytes;
        self.changed.notify_all();
    }

    fn wait_idle(&self) {
        let mut state = self.state.lock();
        while state.0 > 0 {
            self.changed.wait(&mut state);
        }
    }
}

/// The transmission phase of one connection (runs on its reader thread).
struct Transmission<S: Stream> {
    server: Arc<Server>,
    reader: S,
    sink: Arc<ReplySink<S>>,
    export: Arc<dyn Export>,
    session: Session,
    inflight: Arc<Inflight>,
    inbuf: Vec<u8>,
    start: usize,
    end: usize,
    batch: Vec<u8>,
    scratch: Vec<u8>,
}

impl<S: Stream> Transmission<S> {
    fn new(server: &Arc<Server>, stream: S, agreement: Agreement) -> io::Result<Self> {
        let writer = stream.try_clone()?;
        writer.set_write_timeout(Some(REPLY_TIMEOUT))?;
        let session = Session {
            export_size: agreement.export.size(),
            read_only: agreement.export.read_only(),
            structured: agreement.structured,
            base_allocation: agreement.base_allocation,
        };
        Ok(Transmission {
            server: Arc::clone(server),
            reader: stream,
            sink: Arc::new(ReplySink {
                stream: Mutex::new(writer),
                broken: AtomicBool::new(false),
            }),
            export: agreement.export,
            session,
            inflight: Arc::new(Inflight {
                state: Mutex::new((0, 0)),
                changed: Condvar::new(),
            }),
            inbuf: vec![0u8; INBUF],
            start: 0,
            end: 0,
            batch: Vec::with_capacity(64 << 10),
            scratch: Vec::new(),
        })
    }

    fn run(mut self) -> Result<(), ProtocolError> {
        let result = self.serve();
        // Whatever ended the loop, answer everything already received.
        self.flush_batch();
        self.inflight.wait_idle();
        if let Err(e) = &result {
            if !matches!(e, ProtocolError::Io(_)) {
                // The stream is out of step with the client; stop here.
                let _ = self.reader.shutdown(Shutdown::Both);
            }
        }
        result
    }

    fn serve(&mut self) -> Result<(), ProtocolError> {
        loop {
            if self.sink.broken.load(Ordering::Relaxed) {
                return Ok(());
            }
            if self.buffered() < REQUEST_LEN {
                if self.server.is_stopping() {
                    return Ok(());
                }
                if !self.fill(REQUEST_LEN)? {
                    if self.buffered() == 0 {
                        return Ok(()); // clean end between requests
                    }
                    return Err(ProtocolError::Truncated("request header"));
                }
            }
            let Some(header) = tx::decode_request(&self.inbuf[self.start..self.end])? else {
                continue;
            };
            self.start += REQUEST_LEN;
            if !self.handle(header)? {
                return Ok(());
            }
            if self.batch.len() >= BATCH_FLUSH {
                self.flush_batch();
            }
        }
    }

    fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Reads until at least `want` bytes are buffered (`want` <= INBUF).
    /// Pending replies go out before blocking. `Ok(false)` at end of stream.
    fn fill(&mut self, want: usize) -> Result<bool, ProtocolError> {
        if self.start > 0 && self.inbuf.len() - self.start < want {
            self.inbuf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.buffered() < want {
            self.flush_batch();
            match self.reader.read(&mut self.inbuf[self.end..]) {
                Ok(0) => return Ok(false),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ProtocolError::Io(e)),
            }
        }
        Ok(true)
    }

    fn flush_batch(&mut self) {
        if !self.batch.is_empty() {
            self.sink.send(&self.batch);
            self.batch.clear();
        }
    }

    /// Handles one request; `Ok(false)` ends the session (DISC).
    fn handle(&mut self, header: RequestHeader) -> Result<bool, ProtocolError> {
        let stats = Arc::clone(&self.server.stats);
        let started = Instant::now();
        let command = match tx::validate(&header, &self.session) {
            Ok(command) => command,
            Err(err) => {
                self.skip_payload(header.payload_len() as usize)?;
                debug!(
                    export = self.export.name(),
                    "refused request {header:?}: {err}"
                );
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tx::error_reply(
                    &mut self.batch,
                    self.session.structured,
                    header.cookie,
                    &err,
                );
                return Ok(true);
            }
        };
        let cookie = header.cookie;
        match command {
            Command::Read { offset, len } => {
                self.read(cookie, offset, len);
                stats.record_read(u64::from(len), started);
            }
            Command::Write { offset, len, fua } => {
                let len = len as usize;
                let result = if len <= INBUF {
                    if !self.fill(len)? {
                        return Err(ProtocolError::Truncated("write payload"));
                    }
                    let data = &self.inbuf[self.start..self.start + len];
                    self.start += len;
                    self.export.write(offset, data, fua)
                } else {
                    self.read_large_payload(len)?;
                    let result = self.export.write(offset, &self.scratch, fua);
                    if self.scratch.capacity() > SCRATCH_KEEP {
                        self.scratch = Vec::new();
                    }
                    result
                };
                self.complete(cookie, result, len);
                stats.record_write(len as u64, started);
            }
            Command::Trim { offset, len, fua } => {
                let result = if len == 0 {
                    Ok(Completion::Done)
                } else {
                    self.export.trim(offset, u64::from(len), fua)
                };
                self.complete(cookie, result, 0);
                stats.trims.fetch_add(1, Ordering::Relaxed);
            }
            Command::WriteZeroes { offset, len, flags } => {
                let result = if len == 0 {
                    Ok(Completion::Done)
                } else {
                    self.export.write_zeroes(offset, u64::from(len), flags)
                };
                self.complete(cookie, result, 0);
                stats.zeroes.fetch_add(1, Ordering::Relaxed);
            }
            Command::Flush => {
                let result = self.export.flush();
                self.complete(cookie, result, 0);
                stats.flushes.fetch_add(1, Ordering::Relaxed);
            }
            Command::Cache { offset, len } => {
                let result = self
                    .export
                    .cache(offset, u64::from(len))
                    .map(|()| Completion::Done);
                self.complete(cookie, result, 0);
            }
            Command::BlockStatus {
                offset,
                len,
                req_one,
            } => self.block_status(cookie, offset, len, req_one),
            Command::Disconnect => return Ok(false),
        }
        Ok(true)
    }

    fn skip_payload(&mut self, mut len: usize) -> Result<(), ProtocolError> {
        while len > 0 {
            if self.buffered() == 0 && !self.fill(1)? {
                return Err(ProtocolError::Truncated("refused write payload"));
            }
            let n = len.min(self.buffered());
            self.start += n;
            len -= n;
        }
        Ok(())
    }

    fn read_large_payload(&mut self, len: usize) -> Result<(), ProtocolError> {
        self.scratch.clear();
        self.scratch.resize(len, 0);
        let have = self.buffered().min(len);
        self.scratch[..have].copy_from_slice(&self.inbuf[self.start..self.start + have]);
        self.start += have;
        if have < len {
            self.flush_batch();
            read_exact(&mut self.reader, &mut self.scratch[have..], "write payload")?;
        }
        Ok(())
    }

    /// Replies now, or hands the rest of the operation to the pool.
    fn complete(&mut self, cookie: u64, result: Result<Completion, ExportError>, bytes: usize) {
        match result {
            Ok(Completion::Done) => tx::ok_reply(&mut self.batch, cookie),
            Ok(Completion::Deferred(rest)) => {
                let sink = Arc::clone(&self.sink);
                let structured = self.session.structured;
                let inflight = Arc::clone(&self.inflight);
                let errors = Arc::clone(&self.server.stats);
                inflight.acquire(bytes);
                self.server.submit(Box::new(move || {
                    let mut reply = Vec::with_capacity(32);
                    match rest() {
                        Ok(()) => tx::ok_reply(&mut reply, cookie),
                        Err(err) => {
                            errors.errors.fetch_add(1, Ordering::Relaxed);
                            tx::error_reply(&mut reply, structured, cookie, &err)
                        }
                    }
                    sink.send(&reply);
                    inflight.release(bytes);
                }));
            }
            Err(err) => {
                self.server.stats.errors.fetch_add(1, Ordering::Relaxed);
                debug!(export = self.export.name(), "request failed: {err}");
                tx::error_reply(&mut self.batch, self.session.structured, cookie, &err);
            }
        }
    }

    fn read(&mut self, cookie: u64, offset: u64, len: u32) {
        let structured = self.session.structured;
        if len == 0 {
            if structured {
                tx::chunk_header(&mut self.batch, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
            } else {
                tx::ok_reply(&mut self.batch, cookie);
            }
            return;
        }
        let header_len = tx::read_reply_header_len(structured);
        let at = self.batch.len();
        self.batch.resize(at + header_len + len as usize, 0);
        match self
            .export
            .read_cached(offset, &mut self.batch[at + header_len..])
        {
            Ok(true) => {
                let mut header = Vec::with_capacity(header_len);
                tx::read_reply_header(&mut header, structured, cookie, offset, len);
                self.batch[at..at + header_len].copy_from_slice(&header);
                return;
            }
            Ok(false) => self.batch.truncate(at),
            Err(err) => {
                self.batch.truncate(at);
                tx::error_reply(&mut self.batch, structured, cookie, &err);
                return;
            }
        }
        // Not cached: read on a worker so this connection keeps going.
        let export = Arc::clone(&self.export);
        let sink = Arc::clone(&self.sink);
        let inflight = Arc::clone(&self.inflight);
        let bytes = header_len + len as usize;
        inflight.acquire(bytes);
        self.server.submit(Box::new(move || {
            let mut reply = vec![0u8; bytes];
            match export.read(offset, &mut reply[header_len..]) {
                Ok(()) => {
                    let mut header = Vec::with_capacity(header_len);
                    tx::read_reply_header(&mut header, structured, cookie, offset, len);
                    reply[..header_len].copy_from_slice(&header);
                }
                Err(err) => {
                    reply.clear();
                    tx::error_reply(&mut reply, structured, cookie, &err);
                }
            }
            sink.send(&reply);
            inflight.release(bytes);
        }));
    }

    fn block_status(&mut self, cookie: u64, offset: u64, len: u32, req_one: bool) {
        let result = if len == 0 {
            Err(ExportError::new(
                ErrorCode::Invalid,
                "block status of zero length",
            ))
        } else {
            self.export.extents(offset, u64::from(len))
        };
        match result {
            Ok(mut extents) if !extents.is_empty() => {
                if req_one {
                    extents.truncate(1);
                    extents[0].length = extents[0].length.min(len);
                }
                extents.truncate(tx::MAX_REPLY_EXTENTS);
                tx::block_status_reply(&mut self.batch, cookie, &extents);
            }
            Ok(_) => {
                let err = ExportError::new(ErrorCode::Io, "no allocation information");
                tx::error_reply(&mut self.batch, true, cookie, &err);
            }
            Err(err) => tx::error_reply(&mut self.batch, true, cookie, &err),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    struct NoExports;

    impl Catalog for NoExports {
        fn lookup(&self, _: &str) -> Option<Arc<dyn Export>> {
            None
        }
        fn list(&self) -> Vec<Arc<dyn Export>> {
            Vec::new()
        }
    }

    #[test]
    fn shutdown_wakes_the_accept_thread_of_every_listener() {
        let server = Server::new();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let unix = UnixListener::bind(&path).unwrap();
        server.serve_unix(unix, Arc::new(NoExports)).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        server.serve_tcp(tcp, Arc::new(NoExports)).unwrap();
        // Both accept threads are running once a client gets its greeting;
        // the client stays connected, mid-handshake, during the shutdown.
        let mut greeting = [0u8; 18];
        let mut client = UnixStream::connect(&path).unwrap();
        client.read_exact(&mut greeting).unwrap();
        TcpStream::connect(addr)
            .unwrap()
            .read_exact(&mut greeting)
            .unwrap();

        let (done, left) = mpsc::channel();
        let stopping = Arc::clone(&server);
        thread::spawn(move || done.send(stopping.shutdown(Duration::from_secs(5))));
        let left = left
            .recv_timeout(Duration::from_secs(10))
            .expect("shutdown still waiting for an accept thread");
        assert_eq!(left, 0);
        assert!(TcpStream::connect(addr).is_err());
        assert!(UnixStream::connect(&path).is_err());
    }
}
