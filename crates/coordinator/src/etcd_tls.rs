//! TLS towards etcd (`https://` endpoints): etcd's CA, and the client
//! certificate and key an etcd started with `--client-cert-auth` asks
//! for; plugged into the HTTP client as its TLS connector. Every failure
//! is said in words: a server certificate not signed by the CA or not
//! naming the endpoint's host, and etcd refusing this client's
//! certificate (which TLS 1.3 reports only after the handshake, on the
//! first read).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError, ClientConfig, ClientConnection, RootCertStore};

/// Why the TLS material for etcd could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum EtcdTlsError {
    #[error("{}: cannot read the {what}: {source}", path.display())]
    Read {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{}: no usable {what} in it ({reason})", path.display())]
    Pem {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("{}: the client key does not fit the certificate in {} or cannot be used: {reason}", key.display(), cert.display())]
    Key {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("TLS configuration for etcd: {0}")]
    Config(String),
}

/// A loaded TLS client configuration for etcd.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    config: Arc<ClientConfig>,
}

fn certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, EtcdTlsError> {
    let data = std::fs::read(path).map_err(|source| EtcdTlsError::Read {
        path: path.to_path_buf(),
        what,
        source,
    })?;
    let pem = |reason: String| EtcdTlsError::Pem {
        path: path.to_path_buf(),
        what,
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem("no PEM \"CERTIFICATE\" block".into()));
    }
    Ok(certs)
}

impl EtcdTls {
    /// Loads etcd's CA (`ca`) and, if given, this client's certificate
    /// and key (`client`: certificate, key).
    pub fn load(ca: &Path, client: Option<(&Path, &Path)>) -> Result<EtcdTls, EtcdTlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for c in certs(ca, "CA certificate")? {
            roots.add(c).map_err(|e| EtcdTlsError::Pem {
                path: ca.to_path_buf(),
                what: "CA certificate",
                reason: e.to_string(),
            })?;
        }
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| EtcdTlsError::Config(e.to_string()))?
            .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = certs(cert, "client certificate")?;
                let data = std::fs::read(key).map_err(|source| EtcdTlsError::Read {
                    path: key.to_path_buf(),
                    what: "client key",
                    source,
                })?;
                let der = PrivateKeyDer::from_pem_slice(&data).map_err(|e| EtcdTlsError::Pem {
                    path: key.to_path_buf(),
                    what: "private key",
                    reason: e.to_string(),
                })?;
                builder
                    .with_client_auth_cert(chain, der)
                    .map_err(|e| EtcdTlsError::Key {
                        cert: cert.to_path_buf(),
                        key: key.to_path_buf(),
                        reason: e.to_string(),
                    })?
            }
        };
        Ok(EtcdTls {
            config: Arc::new(config),
        })
    }
}

/// What a TLS failure means, in words.
pub(crate) fn explain(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "etcd's certificate is not signed by the configured CA (etcd_ca)".into()
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => {
            "etcd's certificate does not name the host of the endpoint (its subjectAltName)".into()
        }
        rustls::Error::InvalidCertificate(c) => format!("etcd's certificate is not valid: {c:?}"),
        rustls::Error::AlertReceived(
            a @ (AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied),
        ) => format!(
            "etcd refused this client's certificate (TLS alert {a:?}): give etcd_cert and \
             etcd_key signed by a CA in etcd's --trusted-ca-file"
        ),
        other => format!("TLS: {other}"),
    }
}

/// Turns an I/O error carrying a rustls error into one that explains it.
fn explained(e: std::io::Error) -> std::io::Error {
    let why = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .map(explain);
    match why {
        Some(why) => std::io::Error::new(e.kind(), why),
        None => e,
    }
}

#[derive(Debug)]
struct TlsStream {
    inner: rustls::StreamOwned<ClientConnection, Box<dyn ureq::ReadWrite>>,
    /// Nothing came from etcd yet since the handshake.
    unanswered: bool,
}

impl TlsStream {
    /// An error of this connection, explained. Under TLS 1.3 a server
    /// judges the client's certificate after the client's handshake is
    /// done, so a refusal often reaches the client as the connection
    /// closing under its first request (a broken pipe, a reset), not as
    /// an alert it could read.
    fn explain(&self, e: std::io::Error) -> std::io::Error {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
        let e = explained(e);
        if self.unanswered
            && matches!(
                e.kind(),
                BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof
            )
        {
            return std::io::Error::new(
                e.kind(),
                format!(
                    "etcd closed the connection right after the TLS handshake ({e}): most likely \
                     etcd refused this client's certificate (none, or one it does not trust): \
                     give etcd_cert and etcd_key signed by a CA that etcd's \
                     --trusted-ca-file names"
                ),
            );
        }
        e
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.unanswered &= n == 0;
                Ok(n)
            }
            Err(e) => Err(self.explain(e)),
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf).map_err(|e| self.explain(e))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush().map_err(|e| self.explain(e))
    }
}

impl ureq::ReadWrite for TlsStream {
    fn socket(&self) -> Option<&TcpStream> {
        self.inner.sock.socket()
    }
}

impl ureq::TlsConnector for EtcdTls {
    fn connect(
        &self,
        dns_name: &str,
        mut io: Box<dyn ureq::ReadWrite>,
    ) -> Result<Box<dyn ureq::ReadWrite>, ureq::Error> {
        let name = ServerName::try_from(dns_name.to_owned()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{dns_name:?} is not a host name TLS can check: {e}"),
            )
        })?;
        let mut conn = ClientConnection::new(Arc::clone(&self.config), name)
            .map_err(|e| std::io::Error::other(explain(&e)))?;
        // The handshake now, so that its failures are told as such.
        while conn.is_handshaking() {
            conn.complete_io(&mut io).map_err(explained)?;
        }
        Ok(Box::new(TlsStream {
            inner: rustls::StreamOwned::new(conn, io),
            unanswered: true,
        }))
    }
}
