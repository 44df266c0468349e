//! Replication in the agent: the peer listener that serves primaries'
//! sessions for the groups this site replicates, and the shippers that
//! stream each group this site is primary for to its replicas.

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tandem_replication::receiver::{self, ReceiverContext};
use tandem_replication::shipper::Link;
use tandem_tls::{PeerStream, TlsIdentity};
use tracing::{info, warn};

/// A peer silent this long is gone (the primary pings every second).
const READ_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts primaries' connections on `site.listen` until `stop`.
pub fn listen(
    listener: TcpListener,
    ctx: Arc<ReceiverContext>,
    tls: Option<Arc<TlsIdentity>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("peer-accept".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let tcp = match conn {
                    Ok(tcp) => tcp,
                    Err(e) => {
                        warn!("peer accept failed: {e}");
                        thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                };
                let (ctx, tls) = (Arc::clone(&ctx), tls.clone());
                let spawned = thread::Builder::new()
                    .name("peer-session".into())
                    .spawn(move || serve_peer(tcp, &ctx, tls.as_deref()));
                if let Err(e) = spawned {
                    warn!("cannot start a peer session thread: {e}");
                }
            }
        })
}

fn serve_peer(tcp: TcpStream, ctx: &ReceiverContext, tls: Option<&TlsIdentity>) {
    let peer = tcp
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "unknown".into());
    let _ = tcp.set_nodelay(true);
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
    match receiver::serve(ctx, reader, writer, site.as_deref(), closer) {
        Ok(()) => info!(%peer, "replication session ended"),
        Err(e) => {
            warn!(%peer, site = site.as_deref().unwrap_or("(no TLS)"), "replication session closed: {e}")
        }
    }
}

/// Connects to a replica site at `address`; TLS checks that the server is
/// `site`.
pub fn connect(address: &str, site: &str, tls: Option<&TlsIdentity>) -> Result<Link, String> {
    let addrs: Vec<SocketAddr> = address
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {address}: {e}"))?
        .collect();
    let mut last = format!("no address for {address}");
    let tcp = addrs
        .iter()
        .find_map(|a| match TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
            Ok(s) => Some(s),
            Err(e) => {
                last = format!("connect to {site} at {a}: {e}");
                None
            }
        })
        .ok_or(last)?;
    let _ = tcp.set_nodelay(true);
    let stream = match tls {
        Some(identity) => {
            PeerStream::connect_tls(tcp, identity, site).map_err(|e| e.to_string())?
        }
        None => PeerStream::Plain(tcp),
    };
    stream
        .tcp()
        .set_read_timeout(Some(READ_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let closer = stream.try_clone_tcp().map_err(|e| e.to_string())?;
    let (reader, writer) = stream.split().map_err(|e| e.to_string())?;
    Ok(Link {
        reader: Box::new(reader),
        writer: Box::new(writer),
        close: Box::new(move || {
            let _ = closer.shutdown(std::net::Shutdown::Both);
        }),
    })
}
