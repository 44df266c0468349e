//! Errors of the TLS layer. Each names the file or the peer, and says what is
//! wrong.

use std::path::PathBuf;

/// Everything that can go wrong loading TLS material, creating certificates
/// or setting up a peer connection.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{}: cannot read {what}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the file should hold ("CA certificate", "private key"...).
        what: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not PEM, or its PEM is malformed.
    #[error("{}: not a valid PEM file ({what}): {reason}", path.display())]
    NotPem {
        /// The file.
        path: PathBuf,
        /// What the file should hold.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A PEM file holds no certificate.
    #[error("{}: no certificate found (expected a PEM \"CERTIFICATE\" block for the {what})", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
        /// What the file should hold.
        what: &'static str,
    },
    /// A certificate could not be used.
    #[error("{}: bad {what}: {reason}", path.display())]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// What the file should hold.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A key file holds no private key, or one that cannot be used.
    #[error("{}: bad private key: {reason}", path.display())]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The private key does not belong to the certificate.
    #[error(
        "{}: private key does not match the certificate in {}",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// Our own certificate does not chain to the configured CA, or is not
    /// usable for a site (expired, wrong key usage...).
    #[error("{}: certificate is not valid under the CA in {}: {reason}", cert.display(), ca.display())]
    NotSignedByCa {
        /// The certificate file.
        cert: PathBuf,
        /// The CA file.
        ca: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A site name cannot be used in a certificate or as a TLS server name.
    #[error("invalid site name {name:?}: {reason}")]
    InvalidSiteName {
        /// The name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// `certs create` would overwrite a file.
    #[error("{}: already exists; refusing to overwrite it (remove it or choose another --out directory)", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// A file or directory could not be written.
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("cannot generate {what}: {reason}")]
    Generate {
        /// What was being generated.
        what: String,
        /// What went wrong.
        reason: String,
    },
    /// Building the rustls configuration failed.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The TLS handshake with a peer failed.
    #[error("refusing {peer}: its certificate names no site (no DNS name in its subjectAltName; the site name is taken only from there); create site certificates with `tandem certs create`")]
    NoSiteName { peer: String },
    #[error("TLS handshake with {peer} failed: {reason}")]
    Handshake {
        /// The peer's address (and expected site, client side).
        peer: String,
        /// Why, in words.
        reason: String,
    },
}
