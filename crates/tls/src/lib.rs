//! Mutual TLS between Tandem sites.
//!
//! * [`certs::create`] makes a private CA and one certificate per site
//!   (`tandem certs create --out DIR SITE...`).
//! * [`TlsIdentity`] is a site's loaded `[tls]` material (CA, certificate,
//!   key) and the rustls configurations built from it.
//! * [`PeerStream`] is a connected peer: plain TCP (`mode = "off"`, loopback
//!   only) or TLS, with the handshake completed eagerly and every failure
//!   explained.
//!
//! A site's name is the DNS name in its certificate's subjectAltName: the
//! connecting side checks that the server is the site it meant to reach, and
//! the accepting side learns the client's site from [`PeerStream::peer_site`].

#![forbid(unsafe_code)]

pub mod certs;
mod error;
pub mod https;
mod identity;
mod split;
mod stream;

pub use error::TlsError;
pub use identity::TlsIdentity;
pub use split::{PeerReader, PeerWriter};
pub use stream::{PeerStream, HANDSHAKE_TIMEOUT};

/// Re-exported so users need not depend on rustls themselves.
pub use rustls;
