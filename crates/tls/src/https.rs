//! TLS for the witness's HTTPS (docs/WITNESS.md): the witness's own
//! certificate (`witness.pem`, SAN `DNS:witness`, from `certs create`), its
//! server configuration requiring a client certificate from the sites' CA,
//! and handshakes on either side with a deadline.
//!
//! A site's name is taken only from its certificate's subjectAltName: a
//! client certificate without a DNS name there is refused.

use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{ServerName, UnixTime};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    ClientConfig, ClientConnection, ConnectionCommon, ServerConfig, ServerConnection, StreamOwned,
};

use crate::identity::{dns_names, provider, read_certs, read_key, read_roots, warn_if_readable};
use crate::stream::{explain, explain_io};
use crate::TlsError;

/// The name in the witness's certificate, which the sites check.
pub const WITNESS_NAME: &str = "witness";

/// The witness's side of an HTTPS connection.
pub type ServerStream = StreamOwned<ServerConnection, TcpStream>;
/// A site's side of an HTTPS connection to the witness.
pub type ClientStream = StreamOwned<ClientConnection, TcpStream>;

/// The witness's loaded TLS material.
#[derive(Clone, Debug)]
pub struct WitnessTls {
    server: Arc<ServerConfig>,
}

impl WitnessTls {
    /// Loads the CA, the witness's certificate and key; checks that the
    /// certificate is the CA's, valid now, for the name
    /// [`WITNESS_NAME`]. Errors name the file.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<WitnessTls, TlsError> {
        let provider = provider();
        let roots = read_roots(ca)?;
        let chain = read_certs(cert, "witness certificate")?;
        let key_der = read_key(key)?;
        warn_if_readable(key);
        let config_err = |e: &dyn std::fmt::Display| TlsError::Config(e.to_string());
        let server_verifier =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| config_err(&e))?;
        let name = ServerName::try_from(WITNESS_NAME).map_err(|e| config_err(&e))?;
        server_verifier
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
            .map_err(|e| TlsError::NotSignedByCa {
                cert: cert.to_path_buf(),
                ca: ca.to_path_buf(),
                reason: format!("{} (the witness's certificate names {WITNESS_NAME:?}; create it with `tandem certs create`)", explain(&e)),
            })?;
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| config_err(&e))?;
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| config_err(&e))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain, key_der)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                    cert: cert.to_path_buf(),
                    key: key.to_path_buf(),
                },
                other => TlsError::BadKey {
                    path: key.to_path_buf(),
                    reason: other.to_string(),
                },
            })?;
        // Every connection verifies the client's certificate afresh.
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        Ok(WitnessTls {
            server: Arc::new(server),
        })
    }

    /// Server side: the handshake on `tcp` by `deadline`; returns the
    /// stream and the client's site (the first DNS name of its verified
    /// certificate). No certificate, another CA, no name: refused.
    pub fn accept(
        &self,
        tcp: TcpStream,
        deadline: Instant,
    ) -> Result<(ServerStream, String), TlsError> {
        let peer = peer_name(&tcp);
        let fail = |reason: String| TlsError::Handshake {
            peer: peer.clone(),
            reason,
        };
        let conn = ServerConnection::new(self.server.clone()).map_err(|e| fail(explain(&e)))?;
        let mut stream = StreamOwned::new(conn, tcp);
        handshake(&mut stream.conn, &mut stream.sock, deadline).map_err(&fail)?;
        let names = stream
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(dns_names)
            .unwrap_or_default();
        let Some(site) = names.into_iter().next() else {
            return Err(fail(
                "the client certificate names no site (no DNS name in its subjectAltName)".into(),
            ));
        };
        if site == WITNESS_NAME {
            return Err(fail("a witness certificate cannot act as a site".into()));
        }
        Ok((stream, site))
    }
}

/// Client side: the handshake with the witness on `tcp` by `deadline`,
/// checking that its certificate names [`WITNESS_NAME`] and presenting the
/// site's own (`config` is the site's [`crate::TlsIdentity::client_config`]).
pub fn connect(
    tcp: TcpStream,
    config: Arc<ClientConfig>,
    deadline: Instant,
) -> Result<ClientStream, TlsError> {
    let peer = format!("{} (the witness)", peer_name(&tcp));
    let fail = |reason: String| TlsError::Handshake {
        peer: peer.clone(),
        reason,
    };
    let name = ServerName::try_from(WITNESS_NAME).map_err(|e| fail(e.to_string()))?;
    let conn = ClientConnection::new(config, name).map_err(|e| fail(explain(&e)))?;
    let mut stream = StreamOwned::new(conn, tcp);
    handshake(&mut stream.conn, &mut stream.sock, deadline).map_err(fail)?;
    Ok(stream)
}

/// The witness's certificate: SAN `DNS:witness`, TLS server only.
pub(crate) fn witness_cert(
    now: Duration,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(String, String), TlsError> {
    let generate = |e: rcgen::Error| TlsError::Generate {
        what: "the witness's certificate".to_owned(),
        reason: e.to_string(),
    };
    let key = crate::certs::new_key("the witness's key")?;
    let mut params = CertificateParams::new(vec![WITNESS_NAME.to_owned()]).map_err(generate)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Tandem witness");
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    crate::certs::set_validity(&mut params, now, crate::certs::SITE_VALIDITY);
    let cert = params.signed_by(&key, issuer).map_err(generate)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn peer_name(tcp: &TcpStream) -> String {
    tcp.peer_addr()
        .map_or_else(|_| "an unknown peer".to_owned(), |a| a.to_string())
}

/// Drives a handshake to its end by `deadline`.
fn handshake<S: rustls::SideData>(
    conn: &mut ConnectionCommon<S>,
    tcp: &mut TcpStream,
    deadline: Instant,
) -> Result<(), String> {
    let saved = (
        tcp.read_timeout().unwrap_or(None),
        tcp.write_timeout().unwrap_or(None),
    );
    let result = (|| {
        while conn.is_handshaking() || conn.wants_write() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("the handshake timed out (the peer is silent or too slow)".to_owned());
            }
            tcp.set_read_timeout(Some(left))
                .and_then(|()| tcp.set_write_timeout(Some(left)))
                .map_err(|e| e.to_string())?;
            match conn.complete_io(tcp) {
                Ok((0, 0)) if conn.is_handshaking() && !conn.wants_write() => {
                    return Err("the peer closed the connection during the handshake".to_owned())
                }
                Ok(_) => {}
                Err(e) => return Err(explain_io(&e)),
            }
        }
        Ok(())
    })();
    let _ = tcp.set_read_timeout(saved.0);
    let _ = tcp.set_write_timeout(saved.1);
    result
}
