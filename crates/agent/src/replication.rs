//! Replication in the agent: the peer listener that serves primaries'
//! sessions for the groups this site replicates, and connecting the
//! shippers of the groups this site is primary for to their replicas.
//!
//! Before a connection is authenticated (TLS handshake done, first frame
//! read) it costs little and not for long (docs/PEER.md, "Bounds"): the
//! accept thread holds connections that have sent nothing yet — without a
//! thread each, at most [`PREAUTH_WAITING`] of them, the oldest closed
//! first — and hands each one that has something to say to a small pool
//! of [`PREAUTH_WORKERS`] threads, which complete the TLS handshake and
//! read the first frame (at most [`tandem_peer::MAX_PREAUTH_PAYLOAD`]),
//! all within [`PREAUTH_TIMEOUT`] of its acceptance. Only then does a
//! session get a thread of its own, within caps in all and per peer site.

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::Mutex;
use rustix::event::{PollFd, PollFlags, Timespec};
use tandem_peer::Message;
use tandem_replication::receiver::{self, ReceiverContext};
use tandem_replication::shipper::{ConnectError, Connection};
use tandem_tls::{PeerStream, TlsIdentity};

// A group the configuration accepts fits in one peer hello.
const _: () = assert!(tandem_config::Group::MAX_VOLUMES == tandem_peer::bounds::MAX_VOLUMES);
use tracing::{info, warn};

use crate::preauth::{Sessions, Waiting};

/// A peer silent this long is gone (the primary pings every 100 ms when
/// idle).
const READ_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_RETRY: Duration = Duration::from_millis(50);
/// Time a connection has, from its acceptance, for the TLS handshake and
/// its first frame.
pub const PREAUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections that have sent nothing yet, held at once; past this the
/// oldest is closed.
pub const PREAUTH_WAITING: usize = 128;
/// Threads completing handshakes and reading first frames.
pub const PREAUTH_WORKERS: usize = 4;
/// Connections with something to say, waiting for one of those threads;
/// past this a new one is closed.
const PREAUTH_QUEUE: usize = 32;
/// How often the accept thread looks at its stop flag.
const POLL_EVERY: Duration = Duration::from_millis(250);
/// Connections closed before authentication are logged at most this often.
const SHED_LOG_EVERY: Duration = Duration::from_secs(1);

/// Authenticated sessions allowed at once: one per group and primary is
/// normal (a group has one primary, but an old one may still knock while
/// a new one streams), plus room for connections that are refused.
pub fn session_cap(groups: usize) -> usize {
    64 + 4 * groups
}

/// Authenticated sessions one peer site may hold at once: one per group,
/// and as many again while old connections give way to new ones.
pub fn site_session_cap(groups: usize) -> usize {
    16 + 2 * groups
}

/// The listener on `site.listen`: one thread accepting (and holding
/// connections until they speak), a small pool authenticating them, one
/// thread per authenticated session.
pub struct PeerListener {
    /// Wakes the accept thread, which owns the listener.
    waker: tandem_nbd::AcceptWaker,
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

/// A connection accepted and not yet authenticated.
struct Pending {
    tcp: TcpStream,
    peer: String,
}

/// What the authenticating threads share.
struct Auth {
    ctx: Arc<ReceiverContext>,
    /// Answers `StatusRequest` (docs/PEER.md, "Status").
    reporter: Arc<crate::cluster::gather::Reporter>,
    tls: Option<Arc<TlsIdentity>>,
    sessions: Arc<Mutex<Sessions>>,
}

impl PeerListener {
    pub fn start(
        listener: TcpListener,
        ctx: Arc<ReceiverContext>,
        tls: Option<Arc<TlsIdentity>>,
        groups: usize,
        reporter: Arc<crate::cluster::gather::Reporter>,
    ) -> std::io::Result<PeerListener> {
        listener.set_nonblocking(true)?;
        let waker = tandem_nbd::AcceptWaker::new(&listener)?;
        let stop = Arc::new(AtomicBool::new(false));
        let auth = Arc::new(Auth {
            ctx,
            reporter,
            tls,
            sessions: Arc::new(Mutex::new(Sessions::new(
                session_cap(groups),
                site_session_cap(groups),
            ))),
        });
        let (work, queue) = crossbeam_channel::bounded::<(Pending, Instant)>(PREAUTH_QUEUE);
        for i in 0..PREAUTH_WORKERS {
            let (auth, queue) = (Arc::clone(&auth), queue.clone());
            // Not joined at stop: a worker in a handshake ends within
            // PREAUTH_TIMEOUT, once the accept thread has dropped the queue.
            thread::Builder::new()
                .name(format!("peer-auth-{i}"))
                .spawn(move || authenticate_loop(&auth, &queue))?;
        }
        let thread = {
            let stop = Arc::clone(&stop);
            thread::Builder::new()
                .name("peer-accept".into())
                .spawn(move || accept_loop(&listener, &work, &stop))?
        };
        Ok(PeerListener {
            waker,
            stop,
            thread,
        })
    }

    /// Stops accepting; running sessions end with their connections.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        self.waker.wake();
        let _ = self.thread.join();
    }
}

/// Counts connections closed before authentication and logs them at most
/// every [`SHED_LOG_EVERY`].
#[derive(Default)]
struct Shed {
    closed: u64,
    logged: Option<Instant>,
}

impl Shed {
    fn note(&mut self, peer: &str, why: &str) {
        self.closed += 1;
        let now = Instant::now();
        if self
            .logged
            .is_none_or(|at| now.saturating_duration_since(at) >= SHED_LOG_EVERY)
        {
            warn!(%peer, closed = self.closed, "closing an unauthenticated peer connection: {why}");
            self.logged = Some(now);
            self.closed = 0;
        }
    }
}

fn timespec(d: Duration) -> Timespec {
    Timespec::try_from(d).unwrap_or(Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    })
}

fn accept_loop(listener: &TcpListener, work: &Sender<(Pending, Instant)>, stop: &AtomicBool) {
    let mut waiting: Waiting<Pending> = Waiting::new(PREAUTH_WAITING, PREAUTH_TIMEOUT);
    let mut shed = Shed::default();
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        let wait = waiting
            .next_expiry()
            .map_or(POLL_EVERY, |at| at.saturating_duration_since(now))
            .min(POLL_EVERY);
        let ready: Vec<usize> = {
            let mut fds = Vec::with_capacity(1 + waiting.len());
            fds.push(PollFd::new(listener, PollFlags::IN));
            fds.extend(waiting.iter().map(|p| PollFd::new(&p.tcp, PollFlags::IN)));
            // An error or EINTR only means looking again sooner.
            let _ = rustix::event::poll(&mut fds, Some(&timespec(wait)));
            fds[1..]
                .iter()
                .enumerate()
                .filter(|(_, fd)| !fd.revents().is_empty())
                .map(|(i, _)| i)
                .collect()
        };
        if stop.load(Ordering::Acquire) {
            break;
        }
        // Connections with something to say (or closed) go to the pool.
        for (conn, accepted) in waiting.take(&ready) {
            match work.try_send((conn, accepted)) {
                Ok(()) => {}
                Err(TrySendError::Full((conn, _))) => {
                    shed.note(&conn.peer, "every authenticating thread is busy");
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
        loop {
            match listener.accept() {
                Ok((tcp, addr)) => {
                    let conn = Pending {
                        tcp,
                        peer: addr.to_string(),
                    };
                    if let Some(old) = waiting.push(conn, Instant::now()) {
                        shed.note(
                            &old.peer,
                            "too many connections waiting to authenticate (the oldest is closed)",
                        );
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    if !stop.load(Ordering::Acquire) {
                        warn!("peer accept failed: {e}");
                        thread::sleep(ACCEPT_RETRY);
                    }
                    break;
                }
            }
        }
        for old in waiting.expire(Instant::now()) {
            shed.note(&old.peer, "it sent nothing within the time allowed");
        }
    }
}

fn authenticate_loop(auth: &Auth, queue: &Receiver<(Pending, Instant)>) {
    for (conn, accepted) in queue {
        authenticate(auth, conn, accepted);
    }
}

/// The site a connection speaks for: its certificate's (TLS), else what
/// its first frame claims, else its address.
fn claimed_site(stream: &PeerStream, first: &Message, peer: &str) -> String {
    if let Some(site) = stream.peer_site() {
        return site;
    }
    match first {
        Message::Hello(h) => h.primary.clone(),
        Message::Link { primary, .. } => primary.clone(),
        Message::StatusRequest { site } | Message::ApiRequest { site, .. } => site.clone(),
        _ => peer.rsplit_once(':').map_or(peer, |(ip, _)| ip).to_owned(),
    }
}

/// Completes the TLS handshake and reads the first frame within
/// [`PREAUTH_TIMEOUT`] of `accepted`, then admits the session and starts
/// its thread.
fn authenticate(auth: &Auth, conn: Pending, accepted: Instant) {
    let Pending { tcp, peer } = conn;
    let deadline = accepted + PREAUTH_TIMEOUT;
    let left = || deadline.saturating_duration_since(Instant::now());
    let _ = tcp.set_nonblocking(false);
    let _ = tcp.set_nodelay(true);
    let mut stream = match &auth.tls {
        Some(identity) => match PeerStream::accept_tls_within(tcp, identity, left()) {
            Ok(s) => s,
            Err(e) => {
                warn!(%peer, "refusing peer connection: {e}");
                return;
            }
        },
        None => PeerStream::Plain(tcp),
    };
    let first = match stream
        .tcp()
        .set_read_timeout(Some(left().max(Duration::from_millis(1))))
    {
        Ok(()) => receiver::read_opening(&mut stream),
        Err(e) => Err(e.into()),
    };
    let first = match first {
        Ok(m) => m,
        Err(e) => {
            warn!(%peer, "refusing peer connection before authentication: {e}");
            return;
        }
    };
    let site = claimed_site(&stream, &first, &peer);
    if let Err(full) = auth.sessions.lock().admit(&site) {
        warn!(%peer, %site, "refusing peer connection: {full}");
        return;
    }
    let (ctx, sessions) = (Arc::clone(&auth.ctx), Arc::clone(&auth.sessions));
    let reporter = Arc::clone(&auth.reporter);
    let released = site.clone();
    let spawned = thread::Builder::new()
        .name("peer-session".into())
        .spawn(move || {
            match first {
                // Alone on its connection: served here as this site's own
                // API would, one answer and it ends.
                Message::ApiRequest {
                    site: asker,
                    method,
                    path,
                    query,
                    body,
                } => {
                    let mut stream = stream;
                    // The request's work bounds its own time; the answer
                    // is written within this.
                    let _ = stream
                        .tcp()
                        .set_write_timeout(Some(crate::forward::answer_write_timeout()));
                    let cert = stream.peer_site();
                    crate::forward::answer(
                        &reporter,
                        &mut stream,
                        crate::forward::Incoming {
                            asker,
                            method,
                            path,
                            query,
                            body,
                        },
                        cert.as_deref(),
                    );
                    let _ = stream.shutdown();
                }
                // Alone on its connection: one answer and it ends.
                Message::StatusRequest { site: asker } => {
                    let mut stream = stream;
                    let _ = stream
                        .tcp()
                        .set_write_timeout(Some(crate::cluster::gather::answer_write_timeout()));
                    let cert = stream.peer_site();
                    reporter.answer(&mut stream, &asker, cert.as_deref());
                    let _ = stream.shutdown();
                }
                first => serve_peer(stream, first, &peer, &ctx),
            }
            sessions.lock().release(&released);
        });
    if let Err(e) = spawned {
        auth.sessions.lock().release(&site);
        warn!("cannot start a peer session thread: {e}");
    }
}

fn serve_peer(stream: PeerStream, first: Message, peer: &str, ctx: &Arc<ReceiverContext>) {
    // Bounds every later read.
    let _ = stream.tcp().set_read_timeout(Some(READ_TIMEOUT));
    // A promotion ends this session at once rather than wait for a silent
    // old primary to time out.
    let closer: Option<receiver::SessionCloser> = stream.tcp().try_clone().ok().map(|tcp| {
        Box::new(move || {
            let _ = tcp.shutdown(std::net::Shutdown::Both);
        }) as receiver::SessionCloser
    });
    let site = stream.peer_site();
    let (reader, writer) = match stream.split() {
        Ok(halves) => halves,
        Err(e) => {
            warn!(%peer, "peer connection: {e}");
            return;
        }
    };
    match receiver::serve_from(ctx, first, reader, writer, site.as_deref(), closer) {
        Ok(()) => info!(%peer, "replication session ended"),
        Err(e) => {
            warn!(%peer, site = site.as_deref().unwrap_or("(no TLS)"), "replication session closed: {e}")
        }
    }
}

/// Connects to a replica site at `address`; TLS checks that the server is
/// `site`.
pub fn connect(
    address: &str,
    site: &str,
    tls: Option<&TlsIdentity>,
) -> Result<Connection, ConnectError> {
    let addrs: Vec<SocketAddr> = address
        .to_socket_addrs()
        .map_err(|source| ConnectError::Resolve {
            address: address.to_owned(),
            source,
        })?
        .collect();
    let mut last = None;
    let tcp = addrs
        .iter()
        .find_map(|a| match TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
            Ok(s) => Some(s),
            Err(e) => {
                last = Some((*a, e));
                None
            }
        });
    let tcp = match (tcp, last) {
        (Some(tcp), _) => tcp,
        (None, Some((addr, source))) => {
            return Err(ConnectError::Connect {
                site: site.to_owned(),
                addr,
                source,
            })
        }
        (None, None) => return Err(ConnectError::NoAddress(address.to_owned())),
    };
    let _ = tcp.set_nodelay(true);
    let stream = match tls {
        Some(identity) => PeerStream::connect_tls(tcp, identity, site)?,
        None => PeerStream::Plain(tcp),
    };
    stream
        .tcp()
        .set_read_timeout(Some(READ_TIMEOUT))
        .map_err(ConnectError::Socket)?;
    let closer = stream.try_clone_tcp().map_err(ConnectError::Socket)?;
    let (reader, writer) = stream.split().map_err(ConnectError::Socket)?;
    Ok(Connection {
        reader: Box::new(reader),
        writer: Box::new(writer),
        close: Box::new(move || {
            let _ = closer.shutdown(std::net::Shutdown::Both);
        }),
    })
}
