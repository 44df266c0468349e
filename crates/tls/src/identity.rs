//! A site's TLS material (CA, certificate, key), loaded and checked once, and
//! the rustls configurations built from it.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::TlsError;

/// Loaded TLS material for one site, from the `[tls]` section (`ca`, `cert`,
/// `key` paths), with the rustls configurations for both directions.
///
/// Cheap to clone (the configurations are shared).
#[derive(Clone, Debug)]
pub struct TlsIdentity {
    site: String,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// The crypto provider used everywhere in Tandem: *ring*, chosen explicitly
/// so that another crate enabling aws-lc-rs cannot make the process-default
/// provider ambiguous.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsIdentity {
    /// Loads and checks the CA certificate(s), this site's certificate
    /// (chain) and private key.
    ///
    /// Errors name the file and what is wrong: missing or unreadable, not
    /// PEM, no certificate, no or unusable key, key not matching the
    /// certificate, certificate not issued by the CA (or expired, or without
    /// a site name).
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<TlsIdentity, TlsError> {
        let provider = provider();

        let roots = read_roots(ca)?;

        let chain = read_certs(cert, "site certificate")?;
        let key_der = read_key(key)?;
        warn_if_readable(key);

        // The key must load, and match the certificate.
        let certified =
            rustls::sign::CertifiedKey::from_der(chain.clone(), key_der.clone_key(), &provider)
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
        drop(certified);

        let end_entity = &chain[0];
        let site =
            dns_names(end_entity)
                .into_iter()
                .next()
                .ok_or_else(|| TlsError::BadCertificate {
                    path: cert.to_path_buf(),
                    what: "site certificate",
                    reason: "no DNS name in its subjectAltName (the site name); \
                         create site certificates with `tandem certs create`"
                        .to_owned(),
                })?;
        let server_name =
            ServerName::try_from(site.clone()).map_err(|e| TlsError::BadCertificate {
                path: cert.to_path_buf(),
                what: "site certificate",
                reason: format!("site name {site:?} is not a valid DNS name: {e}"),
            })?;

        let config_err = |e: &dyn std::fmt::Display| TlsError::Config(e.to_string());
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| config_err(&e))?;
        let server_verifier =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| config_err(&e))?;

        // Check our own certificate now, as a peer will, so that a wrong CA
        // file or an expired certificate is reported at start-up, naming the
        // files, rather than at every connection.
        let now = UnixTime::now();
        let not_valid = |e: rustls::Error| TlsError::NotSignedByCa {
            cert: cert.to_path_buf(),
            ca: ca.to_path_buf(),
            reason: match e {
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer
                    | rustls::CertificateError::BadSignature,
                ) => "it is not signed by this CA".to_owned(),
                e => e.to_string(),
            },
        };
        server_verifier
            .verify_server_cert(end_entity, &chain[1..], &server_name, &[], now)
            .map_err(not_valid)?;
        client_verifier
            .verify_client_cert(end_entity, &chain[1..], now)
            .map_err(not_valid)?;

        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_err(&e))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key_der.clone_key())
            .map_err(|e| TlsError::BadKey {
                path: key.to_path_buf(),
                reason: e.to_string(),
            })?;
        // Connections are few and long-lived: always a full handshake, so
        // that certificates are verified every time.
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;

        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| config_err(&e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key_der)
            .map_err(|e| TlsError::BadKey {
                path: key.to_path_buf(),
                reason: e.to_string(),
            })?;
        client.resumption = Resumption::disabled();

        Ok(TlsIdentity {
            site,
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// The site name in our own certificate (its first SAN DNS name).
    pub fn site(&self) -> &str {
        &self.site
    }

    /// Server side: requires a client certificate and verifies it against the
    /// CA.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// Client side: verifies the server's certificate against the CA (and
    /// its name against the expected site, per connection), and presents our
    /// certificate.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }
}

/// The DNS names in a certificate's subjectAltName, in order (empty if it
/// cannot be parsed).
pub(crate) fn dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    match webpki::EndEntityCert::try_from(cert) {
        Ok(ee) => ee.valid_dns_names().map(str::to_owned).collect(),
        Err(_) => Vec::new(),
    }
}

fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        what,
        source,
    })
}

fn not_pem(path: &Path, what: &'static str, e: pem::Error) -> TlsError {
    TlsError::NotPem {
        path: path.to_path_buf(),
        what,
        reason: e.to_string(),
    }
}

fn looks_like_pem(data: &[u8]) -> bool {
    data.windows(11).any(|w| w == b"-----BEGIN ")
}

/// The CA certificates of `ca` (PEM) as trust roots.
pub(crate) fn read_roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in read_certs(ca, "CA certificate")? {
        roots.add(c).map_err(|e| TlsError::BadCertificate {
            path: ca.to_path_buf(),
            what: "CA certificate",
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

pub(crate) fn read_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = read_file(path, what)?;
    if !looks_like_pem(&data) {
        return Err(TlsError::NotPem {
            path: path.to_path_buf(),
            what,
            reason: "no \"-----BEGIN\" line".to_owned(),
        });
    }
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| not_pem(path, what, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
            what,
        });
    }
    for c in &certs {
        if let Err(e) = webpki::EndEntityCert::try_from(c) {
            return Err(TlsError::BadCertificate {
                path: path.to_path_buf(),
                what,
                reason: format!("cannot parse the certificate: {e}"),
            });
        }
    }
    Ok(certs)
}

pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    const WHAT: &str = "private key";
    let data = read_file(path, WHAT)?;
    if !looks_like_pem(&data) {
        return Err(TlsError::NotPem {
            path: path.to_path_buf(),
            what: WHAT,
            reason: "no \"-----BEGIN\" line".to_owned(),
        });
    }
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::BadKey {
            path: path.to_path_buf(),
            reason: "no private key found (expected a PEM \"PRIVATE KEY\", \
                     \"EC PRIVATE KEY\" or \"RSA PRIVATE KEY\" block)"
                .to_owned(),
        },
        e => not_pem(path, WHAT, e),
    })
}

/// Warns when a private key is readable by group or others.
pub(crate) fn warn_if_readable(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    "{}: private key is readable by other users (mode {mode:03o}); \
                     chmod 600 it",
                    path.display()
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}
