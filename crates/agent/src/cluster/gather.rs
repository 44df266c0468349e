//! Asking the other sites for their status over the peer port, and
//! answering them (docs/PEER.md, "Status"): one connection per question,
//! `StatusRequest` then `StatusReport`.

use std::io::Write;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tandem_peer::{read_message_within, write_message, Message, Payload, PeerError};
use tandem_tls::{PeerStream, TlsIdentity};

use super::Answer;
use crate::status::SiteStatus;
use crate::view::StatusView;

/// The time each site has to answer (connect, TLS, report), all sites
/// asked at once.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest answer frame read: the report's bound and its encoding.
const MAX_ANSWER_FRAME: usize = tandem_peer::MAX_STATUS_REPORT as usize + 4096;
/// The time an answering site gives the asker to take the report.
const ANSWER_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a site's status could not be had.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("cannot resolve {address}: {source}")]
    Resolve {
        address: String,
        source: std::io::Error,
    },
    #[error("{0} resolves to no address")]
    NoAddress(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("socket: {0}")]
    Socket(std::io::Error),
    #[error(transparent)]
    Tls(#[from] tandem_tls::TlsError),
    #[error("protocol: {0}")]
    Peer(#[from] PeerError),
    #[error("refused: {0}")]
    Refused(String),
    #[error("answered with {0} instead of a status report")]
    Unexpected(&'static str),
    #[error("its status report is not valid: {0}")]
    Report(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Asks every site of `peers` (name, peer address) for its status, all at
/// once, each within [`ASK_TIMEOUT`]; returns within that time (plus a
/// little) whatever happens. `me` is this site's name.
pub fn ask_all(
    me: &str,
    peers: &[(String, String)],
    tls: Option<&Arc<TlsIdentity>>,
    timeout: Duration,
) -> Vec<(String, Answer)> {
    let deadline = Instant::now() + timeout;
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut sockets = Vec::new();
    let mut answers: Vec<Option<Result<SiteStatus, AskError>>> =
        peers.iter().map(|_| None).collect();
    for (i, (site, address)) in peers.iter().enumerate() {
        let socket: Arc<Mutex<Option<TcpStream>>> = Arc::default();
        sockets.push(Arc::clone(&socket));
        let (ans, me, site, address, tls) = (
            tx.clone(),
            me.to_owned(),
            site.clone(),
            address.clone(),
            tls.cloned(),
        );
        let spawned = std::thread::Builder::new()
            .name("status-ask".into())
            .spawn(move || {
                let answer = ask(&me, &site, &address, tls.as_deref(), deadline, &socket);
                let _ = ans.send((i, answer));
            });
        if let Err(e) = spawned {
            answers[i] = Some(Err(AskError::Socket(e)));
        }
    }
    drop(tx);
    while answers.iter().any(Option::is_none) {
        match rx.recv_deadline(deadline + Duration::from_millis(50)) {
            Ok((i, a)) => answers[i] = Some(a),
            Err(_) => break,
        }
    }
    // Whoever has not answered is cut off (its thread ends at once).
    for s in &sockets {
        if let Some(tcp) = s.lock().as_ref() {
            let _ = tcp.shutdown(std::net::Shutdown::Both);
        }
    }
    peers
        .iter()
        .zip(answers)
        .map(|((site, _), a)| {
            let a = a.unwrap_or(Err(AskError::Timeout(timeout)));
            (site.clone(), a.map_err(|e| e.to_string()))
        })
        .collect()
}

/// Opens a connection of its own to `site` at its peer `address` (mutual
/// TLS, checking that the server is `site`), all within `deadline`; the
/// TCP socket is put in `socket` as soon as it connects (to cut it off).
pub(crate) fn dial(
    site: &str,
    address: &str,
    tls: Option<&TlsIdentity>,
    deadline: Instant,
    socket: &Mutex<Option<TcpStream>>,
) -> Result<PeerStream, AskError> {
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let addrs: Vec<SocketAddr> = address
        .to_socket_addrs()
        .map_err(|source| AskError::Resolve {
            address: address.to_owned(),
            source,
        })?
        .collect();
    let mut last = None;
    let mut tcp = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, left()) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(source) => last = Some(AskError::Connect { addr, source }),
        }
    }
    let tcp = match (tcp, last) {
        (Some(tcp), _) => tcp,
        (None, Some(e)) => return Err(e),
        (None, None) => return Err(AskError::NoAddress(address.to_owned())),
    };
    *socket.lock() = Some(tcp.try_clone().map_err(AskError::Socket)?);
    let _ = tcp.set_nodelay(true);
    tcp.set_read_timeout(Some(left()))
        .map_err(AskError::Socket)?;
    tcp.set_write_timeout(Some(left()))
        .map_err(AskError::Socket)?;
    let stream = match tls {
        Some(identity) => PeerStream::connect_tls(tcp, identity, site)?,
        None => PeerStream::Plain(tcp),
    };
    stream
        .tcp()
        .set_read_timeout(Some(left()))
        .map_err(AskError::Socket)?;
    Ok(stream)
}

/// Asks one site for its status.
fn ask(
    me: &str,
    site: &str,
    address: &str,
    tls: Option<&TlsIdentity>,
    deadline: Instant,
    socket: &Mutex<Option<TcpStream>>,
) -> Result<SiteStatus, AskError> {
    let mut stream = dial(site, address, tls, deadline, socket)?;
    let mut scratch = Vec::new();
    write_message(
        &mut stream,
        &Message::StatusRequest {
            site: me.to_owned(),
        },
        &mut scratch,
    )?;
    match read_message_within(&mut stream, &mut scratch, MAX_ANSWER_FRAME)? {
        Message::StatusReport { report } => {
            let json = report.decode().map_err(AskError::Peer)?;
            serde_json::from_slice(&json).map_err(|e| AskError::Report(e.to_string()))
        }
        Message::Refuse { reason } => Err(AskError::Refused(reason)),
        other => Err(AskError::Unexpected(other.kind())),
    }
}

/// Why a status request is not answered.
#[derive(Debug, thiserror::Error)]
pub enum RefuseStatus {
    #[error("the agent is still starting")]
    Starting,
    #[error("the certificate is site {cert:?}'s, the request claims {claimed:?}")]
    Certificate { cert: String, claimed: String },
    #[error("{0:?} is not a peer site of this one")]
    UnknownSite(String),
}

/// Answers status requests on the peer port (set once the agent's status
/// can be read).
#[derive(Default)]
pub struct Reporter {
    view: RwLock<Option<Arc<StatusView>>>,
}

impl Reporter {
    pub fn set(&self, view: Arc<StatusView>) {
        *self.view.write() = Some(view);
    }

    /// The report for `asker` (the site it names; `cert_site` the site of
    /// its TLS certificate, None without TLS), or why not.
    fn report(&self, asker: &str, cert_site: Option<&str>) -> Result<SiteStatus, RefuseStatus> {
        let view = self.view.read().clone().ok_or(RefuseStatus::Starting)?;
        let config = view.shared.config();
        let peers: Vec<&str> = config.peers.iter().map(|p| p.name.as_str()).collect();
        admit(asker, cert_site, &peers, &view.shared.site)?;
        Ok(view.status())
    }

    /// The view, once the agent's status can be read.
    pub(crate) fn view(&self) -> Option<Arc<StatusView>> {
        self.view.read().clone()
    }

    /// Serves a connection that opened with `StatusRequest` from `asker`:
    /// one answer, then the connection ends.
    pub fn answer<W: Write>(&self, writer: &mut W, asker: &str, cert_site: Option<&str>) {
        let mut scratch = Vec::new();
        let answer = match self.report(asker, cert_site) {
            Ok(status) => match serde_json::to_vec(&status) {
                Ok(json) if json.len() > tandem_peer::MAX_STATUS_REPORT as usize => {
                    Message::Refuse {
                        reason: format!(
                            "the status ({} bytes) exceeds the {} bytes of a status report",
                            json.len(),
                            tandem_peer::MAX_STATUS_REPORT
                        ),
                    }
                }
                Ok(json) => Message::StatusReport {
                    report: Payload::encode(&json, &mut tandem_peer::Compressor::new(1)),
                },
                Err(e) => Message::Refuse {
                    reason: format!("cannot encode the status: {e}"),
                },
            },
            Err(e) => {
                tracing::warn!(site = %asker, "status request refused: {e}");
                Message::Refuse {
                    reason: e.to_string(),
                }
            }
        };
        if let Err(e) = write_message(writer, &answer, &mut scratch) {
            tracing::debug!(site = %asker, "status report not sent: {e}");
        }
    }
}

/// Whether a status request from `asker` is answered: with TLS its
/// certificate must name it (as for `Link`), and it must be one of this
/// site's `[[peer]]` sites other than itself.
pub fn admit(
    asker: &str,
    cert_site: Option<&str>,
    peers: &[&str],
    me: &str,
) -> Result<(), RefuseStatus> {
    if let Some(cert) = cert_site.filter(|c| *c != asker) {
        return Err(RefuseStatus::Certificate {
            cert: cert.to_owned(),
            claimed: asker.to_owned(),
        });
    }
    if asker == me || !peers.contains(&asker) {
        return Err(RefuseStatus::UnknownSite(asker.to_owned()));
    }
    Ok(())
}

/// The timeout for writing an answer.
pub fn answer_write_timeout() -> Duration {
    ANSWER_WRITE_TIMEOUT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_peer_sites_get_an_answer() {
        let peers = ["a", "b", "c"];
        assert!(admit("b", Some("b"), &peers, "a").is_ok());
        assert!(admit("b", None, &peers, "a").is_ok(), "without TLS");
        assert!(matches!(
            admit("b", Some("c"), &peers, "a"),
            Err(RefuseStatus::Certificate { .. })
        ));
        assert!(matches!(
            admit("mallory", None, &peers, "a"),
            Err(RefuseStatus::UnknownSite(_))
        ));
        assert!(matches!(
            admit("a", Some("a"), &peers, "a"),
            Err(RefuseStatus::UnknownSite(_))
        ));
    }

    #[test]
    fn an_unreachable_site_is_reported_within_the_bound() {
        // A listener that accepts (the kernel does) and never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let silent_addr = silent.local_addr().unwrap().to_string();
        // A port nobody listens on.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_addr = closed.local_addr().unwrap().to_string();
        drop(closed);
        let started = Instant::now();
        let answers = ask_all(
            "a",
            &[
                ("b".into(), silent_addr),
                ("c".into(), closed_addr),
                ("d".into(), "no-such-host.invalid:1".into()),
            ],
            None,
            Duration::from_millis(300),
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let names: Vec<_> = answers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["b", "c", "d"]);
        for (name, a) in &answers {
            let e = a.as_ref().unwrap_err();
            assert!(!e.is_empty(), "{name}");
        }
        assert!(answers[1]
            .1
            .as_ref()
            .unwrap_err()
            .contains("cannot connect"));
        drop(silent);
    }
}
