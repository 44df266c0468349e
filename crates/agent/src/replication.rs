//! Replication in the agent: the peer listener that serves primaries'
//! sessions for the groups this site replicates, and connecting the
//! shippers of the groups this site is primary for to their replicas.

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tandem_replication::receiver::{self, ReceiverContext};
use tandem_replication::shipper::{ConnectError, Connection};
use tandem_tls::{PeerStream, TlsIdentity};
use tracing::{info, warn};

/// A peer silent this long is gone (the primary pings every 100 ms when
/// idle).
const READ_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Inbound sessions allowed at once: one per group and primary is normal
/// (a group has one primary, but an old one may still knock while a new
/// one streams), plus room for connections that are refused.
pub fn session_cap(groups: usize) -> usize {
    64 + 4 * groups
}

/// The listener on `site.listen`: one thread accepting, one thread per
/// session, at most `cap` sessions (more are closed at once, with a log
/// line naming the peer).
pub struct PeerListener {
    /// Wakes the accept thread, which owns the listener.
    waker: tandem_nbd::AcceptWaker,
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

impl PeerListener {
    pub fn start(
        listener: TcpListener,
        ctx: Arc<ReceiverContext>,
        tls: Option<Arc<TlsIdentity>>,
        cap: usize,
    ) -> std::io::Result<PeerListener> {
        let waker = tandem_nbd::AcceptWaker::new(&listener)?;
        let stop = Arc::new(AtomicBool::new(false));
        let running = Arc::new(AtomicUsize::new(0));
        let thread = {
            let stop = Arc::clone(&stop);
            thread::Builder::new()
                .name("peer-accept".into())
                .spawn(move || accept_loop(&listener, &ctx, tls.as_ref(), cap, &running, &stop))?
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

fn accept_loop(
    listener: &TcpListener,
    ctx: &Arc<ReceiverContext>,
    tls: Option<&Arc<TlsIdentity>>,
    cap: usize,
    running: &Arc<AtomicUsize>,
    stop: &AtomicBool,
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let tcp = match conn {
            Ok(tcp) => tcp,
            Err(e) => {
                warn!("peer accept failed: {e}");
                thread::sleep(ACCEPT_RETRY);
                continue;
            }
        };
        let peer = peer_name(&tcp);
        if running.fetch_add(1, Ordering::AcqRel) >= cap {
            running.fetch_sub(1, Ordering::AcqRel);
            warn!(%peer, cap, "refusing peer connection: too many replication sessions");
            continue; // dropped: closed
        }
        let (ctx, tls, running) = (Arc::clone(ctx), tls.cloned(), Arc::clone(running));
        let spawned = thread::Builder::new()
            .name("peer-session".into())
            .spawn(move || {
                serve_peer(tcp, &peer, &ctx, tls.as_deref());
                running.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            warn!("cannot start a peer session thread: {e}");
        }
    }
}

fn peer_name(tcp: &TcpStream) -> String {
    tcp.peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn serve_peer(tcp: TcpStream, peer: &str, ctx: &ReceiverContext, tls: Option<&TlsIdentity>) {
    let _ = tcp.set_nodelay(true);
    // Bounds the TLS handshake and every later read.
    let _ = tcp.set_read_timeout(Some(READ_TIMEOUT));
    let stream = match tls {
        Some(identity) => match PeerStream::accept_tls(tcp, identity) {
            Ok(s) => s,
            Err(e) => {
                warn!(%peer, "refusing peer connection: {e}");
                return;
            }
        },
        None => PeerStream::Plain(tcp),
    };
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
    match receiver::serve(ctx, reader, writer, site.as_deref(), closer) {
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
