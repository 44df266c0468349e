//! Why a frame could not be decoded, encoded or read: every variant says
//! what is wrong, for the log line that names the peer before the
//! connection is closed (SPEC G8).

/// A peer-protocol error. Any of these on a connection is fatal to it: the
/// receiver logs the peer and this reason, then closes the connection.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The frame does not start with the magic `0x544E4450`.
    #[error("bad frame magic {0:#010x} (expected {expected:#010x})", expected = crate::MAGIC)]
    BadMagic(u32),
    /// The frame's message type is not one of this version's.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// The frame announces (or a message to send would need) a payload over
    /// the limit; nothing was allocated for it.
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: u64 },
    /// Encoded bytes announce decoded data over the limit.
    #[error("data of {len} bytes exceeds the limit of {max} bytes")]
    DataTooLarge { len: u64, max: u64 },
    /// A field is outside its bound (docs/PEER.md, "Bounds"); nothing was
    /// allocated for it.
    #[error("{kind}: {field} of {value} is out of bounds ({rule})")]
    OutOfBounds {
        kind: &'static str,
        field: &'static str,
        value: u64,
        rule: &'static str,
    },
    /// The payload does not match the CRC-32C in the header.
    #[error(
        "{kind} frame checksum mismatch: header says {expected:#010x}, payload has {actual:#010x}"
    )]
    Checksum {
        kind: &'static str,
        expected: u32,
        actual: u32,
    },
    /// A field of the frame is invalid; the text names the message and field.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// Compressed data could not be decompressed to its announced length.
    #[error("bad compressed data: {0}")]
    Decompress(String),
    /// The peer closed the connection between two frames.
    #[error("connection closed by peer")]
    Closed,
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed by peer in the middle of a frame")]
    Truncated,
    /// Reading or writing the connection failed.
    #[error("peer connection I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl PeerError {
    pub(crate) fn malformed(kind: &str, what: impl std::fmt::Display) -> PeerError {
        PeerError::Malformed(format!("{kind}: {what}"))
    }

    /// Whether the error is the peer's fault (a protocol error, as opposed to
    /// the connection closing or failing).
    pub fn is_protocol_error(&self) -> bool {
        !matches!(
            self,
            PeerError::Closed | PeerError::Truncated | PeerError::Io(_)
        )
    }
}
