//! Serving a listener: an accept thread, one thread per connection (at most
//! [`Limits::max_connections`]), and a bounded drain when stopping.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};

use crate::conn::{refuse, Conn, Limits, Next, Problem, Refusal, Request, Response};

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
}

impl Options {
    pub fn new(name: &str) -> Options {
        Options {
            name: name.to_owned(),
            limits: Limits::default(),
            stack_size: None,
            drain: Duration::from_secs(5),
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
    let shared = Arc::new(Shared {
        options,
        stop,
        handler,
        connections,
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
    let Ok(mut conn) = Conn::new(stream, options.limits) else {
        return None;
    };
    let count = &shared.connections.0;
    if count.fetch_add(1, Ordering::AcqRel) >= options.limits.max_connections {
        count.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!(%peer, "{}: too many connections; refusing one", options.name);
        let answer = shared
            .handler
            .refused(&refuse(Problem::Unavailable, "too many connections"));
        // Answered from the accept thread: no lingering here.
        let _ = conn.answer(&answer, true);
        return None;
    }
    let shared_for_thread = Arc::clone(shared);
    let mut builder = std::thread::Builder::new().name(format!("{}-conn", options.name));
    if let Some(size) = options.stack_size {
        builder = builder.stack_size(size);
    }
    let spawned = builder.spawn(move || {
        let _slot = Slot(&shared_for_thread.connections.0);
        serve_connection(conn, peer, &shared_for_thread);
    });
    match spawned {
        Ok(t) => Some(t),
        Err(e) => {
            count.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(%peer, "{}: cannot start a connection thread: {e}", options.name);
            None
        }
    }
}

/// A counted connection; the count goes down however its thread ends.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn serve_connection(mut conn: Conn, peer: SocketAddr, shared: &Shared) {
    loop {
        match conn.next(&shared.stop) {
            Next::Request(request) => {
                let close = request.close;
                let answer = shared.handler.handle(request, peer);
                let close = close || shared.stop.load(Ordering::Acquire);
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
