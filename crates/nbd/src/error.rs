//! Errors of the NBD front: the codes sent to clients, and why a connection
//! was closed.

use std::fmt;

/// An error value of the transmission phase, as sent in a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    Perm,
    Io,
    NoMem,
    Invalid,
    NoSpace,
    Overflow,
    NotSupported,
    Shutdown,
}

impl ErrorCode {
    /// The value on the wire.
    pub fn wire(self) -> u32 {
        match self {
            ErrorCode::Perm => 1,
            ErrorCode::Io => 5,
            ErrorCode::NoMem => 12,
            ErrorCode::Invalid => 22,
            ErrorCode::NoSpace => 28,
            ErrorCode::Overflow => 75,
            ErrorCode::NotSupported => 95,
            ErrorCode::Shutdown => 108,
        }
    }

    /// Parses a wire value (clients see unknown values as EINVAL).
    pub fn from_wire(value: u32) -> Option<ErrorCode> {
        Some(match value {
            1 => ErrorCode::Perm,
            5 => ErrorCode::Io,
            12 => ErrorCode::NoMem,
            22 => ErrorCode::Invalid,
            28 => ErrorCode::NoSpace,
            75 => ErrorCode::Overflow,
            95 => ErrorCode::NotSupported,
            108 => ErrorCode::Shutdown,
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            ErrorCode::Perm => "EPERM",
            ErrorCode::Io => "EIO",
            ErrorCode::NoMem => "ENOMEM",
            ErrorCode::Invalid => "EINVAL",
            ErrorCode::NoSpace => "ENOSPC",
            ErrorCode::Overflow => "EOVERFLOW",
            ErrorCode::NotSupported => "ENOTSUP",
            ErrorCode::Shutdown => "ESHUTDOWN",
        };
        f.write_str(name)
    }
}

/// A failed operation on an export: the code for the client and a message
/// for humans (sent in structured error chunks, and logged).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ExportError {
    pub code: ErrorCode,
    pub message: String,
}

impl ExportError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ExportError {
            code,
            message: message.into(),
        }
    }
}

/// Why the server ended a connection: malformed framing or a protocol
/// violation that leaves the stream unusable. Logged with the peer's name.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("bad magic {found:#x} (expected {expected:#x})")]
    BadMagic { expected: u64, found: u64 },
    #[error("client did not set the fixed-newstyle flag (client flags {0:#x})")]
    NotFixedNewstyle(u32),
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("option {option} carries {len} bytes, more than the {max}-byte limit")]
    OptionTooLarge { option: u32, len: u32, max: u32 },
    #[error("export {0:?} does not exist (NBD_OPT_EXPORT_NAME cannot report errors)")]
    UnknownExport(String),
    #[error("handshake not finished within {0:?} (client silent): timed out")]
    HandshakeTimeout(std::time::Duration),
    #[error("client asked for an export without TLS, which this listener requires")]
    TlsRequired,
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("client aborted the handshake")]
    Aborted,
    #[error("connection closed mid-message ({0})")]
    Truncated(&'static str),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}
