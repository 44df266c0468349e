//! Serving a listener: an accept thread, one thread per connection (at most
//! [`Limits::max_connections`]), and a bounded drain when stopping.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};

use crate::conn::{refuse, Conn, Limits, Next, Problem, Refusal, Request, Response, Transport};
use crate::slots::{Admitted, SlotId, Slots};

/// How often the accept loop looks at the stop flag.
const POLL: Duration = Duration::from_millis(100);

/// What a server does with requests.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request. It runs on the connection's own thread and
    /// may take as long as it needs; other connections are served
    /// meanwhile.
    fn handle(&self, request: Request, peer: SocketAddr) -> Response;

    /// The answer to a request that cannot be handled (malformed, too
    /// large, too slow) or to a connection over the limit
    /// ([`Problem::Unavailable`]). The connection is closed after it.
    fn refused(&self, refusal: &Refusal) -> Response;
}

/// A server's TLS: completes the handshake of an accepted connection and
/// says who the peer is (the name its verified certificate carries).
pub trait Secure: Send + Sync + std::fmt::Debug + 'static {
    /// The handshake on `tcp`, done by `deadline`; an error says why the
    /// peer is refused (no certificate, wrong CA, no name, not TLS...).
    fn accept(
        &self,
        tcp: TcpStream,
        deadline: Instant,
    ) -> Result<(Box<dyn Transport>, String), String>;
}

/// How a server runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Names its threads (`NAME`, `NAME-conn`) and starts its log lines.
    pub name: String,
    pub limits: Limits,
    /// Stack size of a connection thread; `None` for the default.
    pub stack_size: Option<usize>,
    /// How long stopping waits for busy connections before leaving them.
    pub drain: Duration,
    /// TLS with client certificates; `None` serves plain HTTP.
    pub secure: Option<Arc<dyn Secure>>,
}

impl Options {
    pub fn new(name: &str) -> Options {
        Options {
            name: name.to_owned(),
            limits: Limits::default(),
            stack_size: None,
            drain: Duration::from_secs(5),
            secure: None,
        }
    }
}

/// The number of connections a server is serving: counted when accepted
/// (one over [`Limits::max_connections`] shows for the moment it takes to
/// refuse it), uncounted when its thread ends. For observability: a test waits until the server holds a
/// connection instead of sleeping and hoping it does.
#[derive(Clone, Debug, Default)]
pub struct Connections(Arc<AtomicUsize>);

impl Connections {
    pub fn new() -> Connections {
        Connections::default()
    }

    /// Connections being served right now.
    pub fn open(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

struct Shared {
    options: Options,
    stop: Arc<AtomicBool>,
    handler: Arc<dyn Handler>,
    connections: Connections,
    slots: Slots,
}

/// Serves `listener` on a new thread until `stop` is set; the thread ends
/// after the listener is closed and connections have drained (bounded by
/// [`Options::drain`]). A request being answered when `stop` is set is
/// answered with `Connection: close`; idle connections close at once.
pub fn spawn(
    listener: TcpListener,
    options: Options,
    stop: Arc<AtomicBool>,
    handler: Arc<dyn Handler>,
) -> io::Result<JoinHandle<()>> {
    spawn_counted(listener, options, stop, handler, Connections::new())
}

/// [`spawn`], keeping the count of open connections in `connections`
/// (which the caller may read).
pub fn spawn_counted(
    listener: TcpListener,
    options: Options,
    stop: Arc<AtomicBool>,
    handler: Arc<dyn Handler>,
    connections: Connections,
) -> io::Result<JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let name = options.name.clone();
    let slots = Slots::new(options.limits);
    let shared = Arc::new(Shared {
        options,
        stop,
        handler,
        connections,
        slots,
    });
    std::thread::Builder::new()
        .name(name)
        .spawn(move || accept_loop(listener, shared))
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    while !shared.stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, peer)) => {
                threads.retain(|t| !t.is_finished());
                if let Some(t) = start_connection(stream, peer, &shared) {
                    threads.push(t);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => readable(&listener, POLL),
            Err(e) => {
                // E.g. out of descriptors: keep the listener, try again.
                tracing::warn!("{}: accept failed: {e}", shared.options.name);
                std::thread::sleep(POLL * 4);
            }
        }
    }
    drop(listener);
    drain(threads, &shared.options);
}

/// Sleeps until the listener has a connection waiting, or `timeout`.
fn readable(listener: &TcpListener, timeout: Duration) {
    let timeout = Timespec::try_from(timeout).unwrap_or(Timespec {
        tv_sec: i64::MAX,
        tv_nsec: 0,
    });
    let mut fds = [PollFd::new(listener, PollFlags::IN)];
    // An error or EINTR only means the caller looks again sooner.
    let _ = rustix::event::poll(&mut fds, Some(&timeout));
}

/// Waits up to `options.drain` for connection threads; any still busy (a
/// long request, a peer not reading its answer) is left behind.
fn drain(mut threads: Vec<JoinHandle<()>>, options: &Options) {
    let until = Instant::now() + options.drain;
    while Instant::now() < until && threads.iter().any(|t| !t.is_finished()) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (done, stuck): (Vec<_>, Vec<_>) = threads.drain(..).partition(|t| t.is_finished());
    for t in done {
        let _ = t.join();
    }
    if !stuck.is_empty() {
        tracing::warn!(
            connections = stuck.len(),
            "{}: connections still busy at shutdown",
            options.name
        );
    }
}

fn start_connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
) -> Option<JoinHandle<()>> {
    let options = &shared.options;
    if stream.set_nonblocking(false).is_err() || stream.set_nodelay(true).is_err() {
        return None;
    }
    let count = &shared.connections.0;
    let slot = match stream.try_clone() {
        Ok(clone) => shared.slots.admit(clone),
        Err(_) => return None,
    };
    let slot = match slot {
        Admitted::Slot(slot) => slot,
        Admitted::Full => {
            tracing::warn!(%peer, "{}: too many connections; refusing one", options.name);
            if let Ok(mut conn) = Conn::new(stream, options.limits) {
                let answer = shared
                    .handler
                    .refused(&refuse(Problem::Unavailable, "too many connections"));
                // Answered from the accept thread: no lingering here.
                let _ = conn.answer(&answer, true);
            }
            return None;
        }
    };
    count.fetch_add(1, Ordering::AcqRel);
    let shared_for_thread = Arc::clone(shared);
    let mut builder = std::thread::Builder::new().name(format!("{}-conn", options.name));
    if let Some(size) = options.stack_size {
        builder = builder.stack_size(size);
    }
    let spawned = builder.spawn(move || {
        let _slot = Slot {
            count: &shared_for_thread.connections.0,
            slots: &shared_for_thread.slots,
            id: slot,
        };
        serve_connection(stream, peer, slot, &shared_for_thread);
    });
    match spawned {
        Ok(t) => Some(t),
        Err(e) => {
            count.fetch_sub(1, Ordering::AcqRel);
            shared.slots.release(slot);
            tracing::warn!(%peer, "{}: cannot start a connection thread: {e}", options.name);
            None
        }
    }
}

/// A counted connection; the count goes down and its slot is freed
/// however its thread ends.
struct Slot<'a> {
    count: &'a AtomicUsize,
    slots: &'a Slots,
    id: SlotId,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.slots.release(self.id);
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sets up the connection (TLS handshake and identity, if any), then
/// serves its requests.
fn serve_connection(stream: TcpStream, peer: SocketAddr, slot: SlotId, shared: &Shared) {
    let options = &shared.options;
    let limits = options.limits;
    let conn = match &options.secure {
        None => Conn::new(stream, limits).map(|mut c| {
            c.set_idle(limits.unauthenticated_idle);
            c
        }),
        Some(secure) => {
            let deadline = Instant::now() + limits.handshake_time;
            match secure.accept(stream, deadline) {
                Ok((transport, identity)) => {
                    if !shared.slots.authenticate(slot, &identity) {
                        tracing::warn!(%peer, %identity, "{}: too many connections of {identity}; refusing one", options.name);
                        return;
                    }
                    Conn::over(transport, limits, Some(identity))
                }
                Err(reason) => {
                    tracing::warn!(%peer, "{}: refused an unauthenticated connection: {reason}", options.name);
                    return;
                }
            }
        }
    };
    match conn {
        Ok(conn) => serve_requests(conn, peer, slot, shared),
        Err(e) => tracing::debug!(%peer, "{}: cannot set up the connection: {e}", options.name),
    }
}

fn serve_requests(mut conn: Conn, peer: SocketAddr, slot: SlotId, shared: &Shared) {
    loop {
        match conn.next(&shared.stop) {
            Next::Request(request) => {
                let close = request.close;
                shared.slots.busy(slot, true);
                let answer = shared.handler.handle(request, peer);
                shared.slots.busy(slot, false);
                let mut close = close || shared.stop.load(Ordering::Acquire);
                if let Some(identity) = &answer.authenticated {
                    if shared.slots.authenticate(slot, identity) {
                        conn.set_idle(shared.options.limits.idle);
                    } else {
                        close = true;
                    }
                }
                if conn.answer(&answer, close).is_err() || close {
                    return;
                }
            }
            Next::Refused(refusal) => {
                tracing::info!(
                    %peer,
                    status = refusal.problem.status(),
                    "{}: bad request: {}",
                    shared.options.name,
                    refusal.message
                );
                let answer = shared.handler.refused(&refusal);
                conn.refuse(&answer);
                return;
            }
            Next::Done => return,
        }
    }
}
