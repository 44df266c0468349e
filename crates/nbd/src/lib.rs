//! The NBD front of a Tandem volume: the handshake and transmission codecs
//! (bytes in, bytes out, no I/O) and a server that drives them over Unix
//! and TCP sockets. Fixed newstyle only; see `docs/NBD.md`.

#![forbid(unsafe_code)]

pub mod budget;
mod conn;
pub mod error;
pub mod export;
pub mod fuzzing;
pub mod handshake;
pub mod listener;
pub mod pool;
pub mod proto;
pub mod server;
mod session;
pub mod stats;
pub mod tls;
pub mod transmission;
mod wire;

pub use error::{ErrorCode, ExportError, ProtocolError};
pub use export::{Catalog, Completion, Deferred, Export, Extent, ZeroFlags};
pub use listener::AcceptWaker;
pub use server::{ListenOptions, Scope, Server};
pub use session::REPLY_TIMEOUT;
