//! A connected peer stream: plain TCP or mutual TLS, blocking.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{
    AlertDescription, CertificateError, ClientConnection, ConnectionCommon, ServerConnection,
    StreamOwned,
};

use crate::identity::dns_names;
use crate::{TlsError, TlsIdentity};

/// Time allowed for a whole TLS handshake: a silent or slow peer cannot hold
/// a thread longer than this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Sent by the server, inside TLS, once it has accepted the client's
/// certificate. With TLS 1.3 the client finishes its handshake before the
/// server has checked the client's certificate; waiting for this byte makes
/// [`PeerStream::connect_tls`] report a refusal itself instead of the first
/// read after it.
const ACCEPTED: u8 = 0x01;

/// A connected peer stream: plain TCP (`[tls] mode = "off"`) or TLS on
/// either side, blocking.
///
/// A TLS stream is one state machine: it cannot be split between a reader
/// and a writer thread. Use [`PeerStream::try_clone_tcp`] to shut the
/// connection down from another thread.
#[derive(Debug)]
pub enum PeerStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// The accepting (replica) side of a TLS connection.
    Server(Box<StreamOwned<ServerConnection, TcpStream>>),
    /// The connecting (primary) side of a TLS connection.
    Client(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl PeerStream {
    /// Client side: TLS handshake with the site `expected_site` (the server
    /// name checked against the SAN of the server's certificate, e.g.
    /// `"chicago"`), presenting our certificate.
    ///
    /// The handshake is completed here, including the server's acceptance of
    /// our certificate, so every refusal surfaces here with the reason
    /// (unknown CA, name mismatch, certificate refused by the server...). It
    /// must finish within [`HANDSHAKE_TIMEOUT`]; the socket's timeouts are
    /// restored afterwards.
    pub fn connect_tls(
        tcp: TcpStream,
        identity: &TlsIdentity,
        expected_site: &str,
    ) -> Result<PeerStream, TlsError> {
        let peer = format!("{} (site {expected_site:?})", peer_name(&tcp));
        let fail = |reason: String| TlsError::Handshake {
            peer: peer.clone(),
            reason,
        };
        let name = ServerName::try_from(expected_site.to_owned()).map_err(|e| {
            TlsError::InvalidSiteName {
                name: expected_site.to_owned(),
                reason: e.to_string(),
            }
        })?;
        let conn =
            ClientConnection::new(identity.client_config(), name).map_err(|e| fail(explain(&e)))?;
        let mut stream = StreamOwned::new(conn, tcp);
        with_deadline(
            &stream.sock.try_clone().map_err(|e| fail(e.to_string()))?,
            Instant::now() + HANDSHAKE_TIMEOUT,
            |deadline| {
                handshake(&mut stream.conn, &mut stream.sock, deadline)?;
                // Wait for the server's verdict on our certificate.
                set_timeouts(&stream.sock, deadline)?;
                let mut byte = [0u8; 1];
                match stream.read(&mut byte) {
                    Ok(1) if byte[0] == ACCEPTED => Ok(()),
                    Ok(0) => Err(
                        "the server closed the connection after the handshake (it probably \
                     refused our certificate or our site; see its log)"
                            .to_owned(),
                    ),
                    Ok(_) => Err(
                        "the server does not speak Tandem's TLS layer (unexpected first byte)"
                            .to_owned(),
                    ),
                    Err(e) => Err(explain_io(&e)),
                }
            },
        )
        .map_err(fail)?;
        Ok(PeerStream::Client(Box::new(stream)))
    }

    /// Server side: TLS handshake with a connecting peer; its certificate
    /// must chain to the CA. Completed here, within [`HANDSHAKE_TIMEOUT`];
    /// the socket's timeouts are restored afterwards. The peer's site is
    /// then [`PeerStream::peer_site`].
    ///
    /// A certificate that names no site (no DNS name in its
    /// subjectAltName) is refused ([`TlsError::NoSiteName`]), however it is
    /// signed: a site's name is taken only from there.
    pub fn accept_tls(tcp: TcpStream, identity: &TlsIdentity) -> Result<PeerStream, TlsError> {
        PeerStream::accept_tls_within(tcp, identity, HANDSHAKE_TIMEOUT)
    }

    /// [`PeerStream::accept_tls`] that must finish within `timeout` (e.g.
    /// what is left of the time a connection may take to authenticate).
    pub fn accept_tls_within(
        tcp: TcpStream,
        identity: &TlsIdentity,
        timeout: Duration,
    ) -> Result<PeerStream, TlsError> {
        let peer = peer_name(&tcp);
        let fail = |reason: String| TlsError::Handshake {
            peer: peer.clone(),
            reason,
        };
        let conn =
            ServerConnection::new(identity.server_config()).map_err(|e| fail(explain(&e)))?;
        let mut stream = StreamOwned::new(conn, tcp);
        let sock = stream.sock.try_clone().map_err(|e| fail(e.to_string()))?;
        let deadline = Instant::now() + timeout;
        with_deadline(&sock, deadline, |deadline| {
            handshake(&mut stream.conn, &mut stream.sock, deadline)
        })
        .map_err(fail)?;
        // The name check: no site name in the certificate, no entry (the
        // connection closes without our acceptance byte).
        let named = stream
            .conn
            .peer_certificates()
            .and_then(|certs| certs.first())
            .is_some_and(|cert| !dns_names(cert).is_empty());
        if !named {
            return Err(TlsError::NoSiteName { peer });
        }
        with_deadline(&sock, deadline, |deadline| {
            set_timeouts(&stream.sock, deadline)?;
            stream
                .write_all(&[ACCEPTED])
                .and_then(|()| stream.flush())
                .map_err(|e| explain_io(&e))
        })
        .map_err(fail)?;
        Ok(PeerStream::Server(Box::new(stream)))
    }

    /// The site name from the peer's verified certificate (its first SAN DNS
    /// name); `None` for a plain stream. An accepted TLS stream always has
    /// one ([`PeerStream::accept_tls`] refuses a certificate without).
    pub fn peer_site(&self) -> Option<String> {
        let certs = match self {
            PeerStream::Plain(_) => return None,
            PeerStream::Server(s) => s.conn.peer_certificates(),
            PeerStream::Client(s) => s.conn.peer_certificates(),
        }?;
        dns_names(certs.first()?).into_iter().next()
    }

    /// Whether the stream is TLS.
    pub fn is_tls(&self) -> bool {
        !matches!(self, PeerStream::Plain(_))
    }

    /// The TCP socket, for timeouts, shutdown, addresses. Do not read or
    /// write it directly on a TLS stream.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            PeerStream::Plain(s) => s,
            PeerStream::Server(s) => &s.sock,
            PeerStream::Client(s) => &s.sock,
        }
    }

    /// A clone of the TCP socket (e.g. to shut the connection down from
    /// another thread, which makes a blocked read return).
    pub fn try_clone_tcp(&self) -> io::Result<TcpStream> {
        self.tcp().try_clone()
    }

    /// Closes the connection cleanly: a TLS close_notify (best effort), then
    /// a TCP shutdown of both directions.
    pub fn shutdown(&mut self) -> io::Result<()> {
        match self {
            PeerStream::Plain(_) => {}
            PeerStream::Server(s) => {
                s.conn.send_close_notify();
                let _ = s.flush();
            }
            PeerStream::Client(s) => {
                s.conn.send_close_notify();
                let _ = s.flush();
            }
        }
        self.tcp().shutdown(Shutdown::Both)
    }
}

impl Read for PeerStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            PeerStream::Plain(s) => s.read(buf),
            PeerStream::Server(s) => s.read(buf),
            PeerStream::Client(s) => s.read(buf),
        }
    }
}

impl Write for PeerStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            PeerStream::Plain(s) => s.write(buf),
            PeerStream::Server(s) => s.write(buf),
            PeerStream::Client(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            PeerStream::Plain(s) => s.flush(),
            PeerStream::Server(s) => s.flush(),
            PeerStream::Client(s) => s.flush(),
        }
    }
}

fn peer_name(tcp: &TcpStream) -> String {
    tcp.peer_addr()
        .map_or_else(|_| "an unknown peer".to_owned(), |a| a.to_string())
}

/// Runs `f` with `deadline`, then restores the socket's previous timeouts
/// (whatever the outcome).
fn with_deadline(
    tcp: &TcpStream,
    deadline: Instant,
    f: impl FnOnce(Instant) -> Result<(), String>,
) -> Result<(), String> {
    let read = tcp.read_timeout().unwrap_or(None);
    let write = tcp.write_timeout().unwrap_or(None);
    let result = f(deadline);
    let restored = tcp
        .set_read_timeout(read)
        .and_then(|()| tcp.set_write_timeout(write));
    match (result, restored) {
        (Err(e), _) => Err(e),
        (Ok(()), Err(e)) => Err(format!("cannot restore socket timeouts: {e}")),
        (Ok(()), Ok(())) => Ok(()),
    }
}

/// Sets both socket timeouts to the time left before `deadline`.
fn set_timeouts(tcp: &TcpStream, deadline: Instant) -> Result<(), String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(timed_out());
    }
    tcp.set_read_timeout(Some(left))
        .and_then(|()| tcp.set_write_timeout(Some(left)))
        .map_err(|e| format!("cannot set socket timeouts: {e}"))
}

fn timed_out() -> String {
    "timed out (the peer is silent or too slow)".to_owned()
}

/// Drives a handshake to completion (and flushes its last flight).
fn handshake<S: rustls::SideData>(
    conn: &mut ConnectionCommon<S>,
    tcp: &mut TcpStream,
    deadline: Instant,
) -> Result<(), String> {
    while conn.is_handshaking() || conn.wants_write() {
        set_timeouts(tcp, deadline)?;
        match conn.complete_io(tcp) {
            Ok((0, 0)) if conn.is_handshaking() && !conn.wants_write() => {
                return Err("the peer closed the connection during the handshake".to_owned())
            }
            Ok(_) => {}
            Err(e) => return Err(explain_io(&e)),
        }
    }
    Ok(())
}

/// Explains an I/O error from a TLS stream: the rustls error inside it if
/// any, a timeout, or the I/O error itself.
pub(crate) fn explain_io(e: &io::Error) -> String {
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return explain(tls);
    }
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => timed_out(),
        io::ErrorKind::UnexpectedEof => {
            "the peer closed the connection during the handshake (it may have refused us; \
             see its log)"
                .to_owned()
        }
        _ => e.to_string(),
    }
}

/// A rustls error, with what it most likely means for Tandem sites.
pub(crate) fn explain(e: &rustls::Error) -> String {
    use rustls::Error as E;
    use CertificateError as C;
    let hint = match e {
        E::InvalidCertificate(C::UnknownIssuer) => {
            "unknown issuer: the peer's certificate is not signed by our CA"
        }
        E::InvalidCertificate(C::BadSignature) => {
            "the peer's certificate is not signed by our CA, but by another CA with the same name"
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "the peer's certificate is for another site name"
        }
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the certificate has expired"
        }
        E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "the certificate is not valid yet; check the clocks"
        }
        E::InvalidCertificate(C::InvalidPurpose | C::InvalidPurposeContext { .. }) => {
            "the certificate is not allowed for this use; create site certificates with \
             `tandem certs create`"
        }
        E::InvalidCertificate(_) => "the peer's certificate was refused",
        E::NoCertificatesPresented => "the peer presented no certificate",
        E::AlertReceived(AlertDescription::UnknownCA) => {
            "the peer refused our certificate: it is not signed by the peer's CA"
        }
        E::AlertReceived(AlertDescription::CertificateExpired) => {
            "the peer refused our certificate: expired"
        }
        E::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRequired,
        ) => "the peer refused our certificate",
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => {
            "the peer does not seem to speak TLS; is [tls] mode = \"off\" there?"
        }
        _ => "",
    };
    if hint.is_empty() {
        e.to_string()
    } else {
        format!("{e} ({hint})")
    }
}
