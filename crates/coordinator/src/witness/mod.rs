//! The witness backend (SPEC §2 "Coordinator", G6, G7): a small
//! `tandem witness` process at a third place decides, like a cluster's
//! quorum witness, which site owns each group.
//!
//! - [`serve`] runs the witness: one [`MemStore`](crate::memory::MemStore)
//!   on the real clock, rewritten atomically to `<data_dir>/witness.json`
//!   after every change and before the change is answered, served over
//!   HTTP/1.1 JSON.
//! - [`WitnessClient`] is a site's [`Store`](crate::Store) backed by it.
//!
//! The protocol, the state file and what a crash at any point does are in
//! docs/WITNESS.md.

mod client;
pub mod persist;
pub mod policy;
mod server;
pub mod wire;

use std::path::PathBuf;

pub use client::WitnessClient;
pub use persist::{LOCK_FILE, STATE_FILE};
pub use server::{
    serve, serve_options, serve_with, ServeOptions, WitnessHandle, MAX_TTL_MS, MAX_WAIT,
    SITE_HEADER,
};
pub use tandem_http::Limits;

/// Why a witness could not start, or a client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error("witness: {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "witness: {path} is held by another running witness (one data directory, one witness)"
    )]
    Locked { path: PathBuf },
    #[error(
        "witness: state file {path} cannot be read ({reason}); refusing to start rather than \
         forget ownership epochs: repair or restore it (see docs/WITNESS.md)"
    )]
    Corrupt {
        path: PathBuf,
        reason: persist::StateError,
    },
    #[error("witness: cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error(
        "witness: plain HTTP (--tls off) is accepted only on a loopback address, not {addr}: \
         give the witness its certificate (see docs/WITNESS.md)"
    )]
    PlainNotLoopback { addr: String },
    #[error("witness: {0}")]
    Tls(#[from] tandem_tls::TlsError),
    #[error("witness endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
}
