//! The peer protocol of Tandem (docs/PEER.md): the messages that replicate
//! a group's volumes from its primary site to each replica site, and their
//! codec. It works on bytes ([`encode`], [`decode`]), with thin blocking
//! helpers over `std::io` ([`read_message`], [`write_message`]); sockets,
//! TLS and sessions live elsewhere.
//!
//! Decoding never panics and never allocates more than a frame's length
//! limit ([`MAX_PAYLOAD`]) or, for decoded data, [`MAX_DATA`]; every
//! length, count and size in a message has a bound ([`bounds`]) checked
//! before anything is allocated for it; every error says what is wrong
//! (SPEC G8). Encoded data is raw, zstd or all-zero,
//! chosen per payload by a [`Compressor`] that backs off on incompressible
//! streams.
//!
//! ```
//! use tandem_peer::{decode, encode, Compressor, Message, Payload, Record, RecordOp};
//!
//! let mut compressor = Compressor::new(1);
//! let data = b"hello hello hello hello ".repeat(100);
//! let record = Message::Record(Record {
//!     epoch: 3, seq: 41, volume: 0, op: RecordOp::Write, fua: false,
//!     offset: 4096, len: data.len() as u64,
//!     data: Payload::encode(&data, &mut compressor),
//! });
//! let mut wire = Vec::new();
//! encode(&record, &mut wire);
//! assert!(decode(&wire[..10]).unwrap().is_none()); // needs more bytes
//! let (back, used) = decode(&wire).unwrap().unwrap();
//! assert_eq!((&back, used), (&record, wire.len()));
//! let Message::Record(rec) = back else { unreachable!() };
//! assert_eq!(rec.data.decode().unwrap(), data);
//! ```

#![forbid(unsafe_code)]

pub mod bounds;
pub mod codec;
pub mod error;
pub mod fuzzing;
pub mod message;
pub mod payload;
pub mod stream;

pub use bounds::{
    chunk_ok, MAX_API_ANSWER, MAX_API_BODY, MAX_API_METHOD, MAX_BITMAP, MAX_CHUNK,
    MAX_DIVERGED_RANGES, MAX_FILE, MAX_HASHES, MAX_MODE, MAX_NAME, MAX_PATH, MAX_PREAUTH_PAYLOAD,
    MAX_STATUS_REPORT, MAX_VOLUMES, MIN_CHUNK,
};
pub use codec::{
    decode, decode_frame, decode_payload, encode, encode_on, parse_header, payload_len, try_encode,
    try_encode_on, try_encode_split, validate, FrameHeader, MAX_CHANNEL, SPLIT_AT,
};
pub use error::PeerError;
pub use message::{
    frame_kind, message_type, type_name, Ack, Diverged, Hello, Message, Record, RecordOp,
    ReplicaState, Welcome,
};
pub use payload::{is_zero, Compressor, Encoding, Payload, PAYLOAD_OVERHEAD};
pub use stream::{
    read_frame_within, read_message, read_message_within, write_frame, write_message,
};

/// The protocol version sent in `Link` and `Hello`; a peer of another
/// version is refused with both versions named. 5 added `Mark`, 6 the
/// `Welcome` flags (history, point).
pub const VERSION: u16 = 6;
/// `ResyncEnd.consistent_at` of a resync part that more parts follow: the
/// replica stays inconsistent until a later part ends.
pub const NOT_YET_CONSISTENT: u64 = u64::MAX;
/// The frame magic, `"TNDP"` as a little-endian `u32`.
pub const MAGIC: u32 = 0x544E_4450;
/// Bytes of a frame header.
pub const FRAME_HEADER_LEN: usize = 16;
/// The longest frame payload: 64 MiB + 4 KiB.
pub const MAX_PAYLOAD: usize = (64 << 20) + 4096;
/// The longest decoded data of one payload (`raw_len`): 64 MiB.
pub const MAX_DATA: usize = 64 << 20;

/// The BLAKE3 hash of a chunk, as carried by `Hashes`.
pub fn chunk_hash(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

/// Whether chunk `i` is marked as differing in a `Diff` bitmap (bit `i % 8`
/// of byte `i / 8`, least significant bit first). Bits past the end are
/// clear.
pub fn diff_bit(bitmap: &[u8], i: usize) -> bool {
    bitmap.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// Marks chunk `i` as differing in a `Diff` bitmap, growing it as needed.
pub fn set_diff_bit(bitmap: &mut Vec<u8>, i: usize) {
    if bitmap.len() <= i / 8 {
        bitmap.resize(i / 8 + 1, 0);
    }
    bitmap[i / 8] |= 1 << (i % 8);
}

/// Bytes of a `Diff` bitmap for `chunks` chunks.
pub fn diff_bitmap_len(chunks: usize) -> usize {
    chunks.div_ceil(8)
}
