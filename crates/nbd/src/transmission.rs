//! The transmission phase as a codec over bytes: request headers in,
//! validated [`Command`]s out, and reply encoders. No I/O happens here.

use crate::error::{ErrorCode, ExportError, ProtocolError};
use crate::export::{Extent, ZeroFlags};
use crate::proto::*;
use crate::wire::{get_u16, get_u32, get_u64, put_u16, put_u32, put_u64};

/// A request header as sent by the client, before validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    /// Bytes of payload that follow the header on the wire. Only WRITE
    /// carries a payload; it must be consumed even when the request is
    /// refused, to stay in step with the client.
    pub fn payload_len(&self) -> u32 {
        if self.kind == CMD_WRITE {
            self.length
        } else {
            0
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, REQUEST_MAGIC);
        put_u16(out, self.flags);
        put_u16(out, self.kind);
        put_u64(out, self.cookie);
        put_u64(out, self.offset);
        put_u32(out, self.length);
    }
}

/// Decodes a request header from the front of `buf`. `Ok(None)` means more
/// bytes are needed; a bad magic is a framing error that ends the
/// connection.
pub fn decode_request(buf: &[u8]) -> Result<Option<RequestHeader>, ProtocolError> {
    if buf.len() < REQUEST_LEN {
        return Ok(None);
    }
    let magic = get_u32(buf, 0);
    if magic != REQUEST_MAGIC {
        return Err(ProtocolError::BadMagic {
            expected: u64::from(REQUEST_MAGIC),
            found: u64::from(magic),
        });
    }
    Ok(Some(RequestHeader {
        flags: get_u16(buf, 4),
        kind: get_u16(buf, 6),
        cookie: get_u64(buf, 8),
        offset: get_u64(buf, 16),
        length: get_u32(buf, 24),
    }))
}

/// A request that passed validation: in range, known flags only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Disconnect,
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Cache {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        flags: ZeroFlags,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

/// What validation needs to know about the session.
#[derive(Clone, Copy, Debug)]
pub struct Session {
    pub export_size: u64,
    pub read_only: bool,
    pub structured: bool,
    pub base_allocation: bool,
}

/// Checks a request against the protocol and the export; an error is sent
/// back to the client and the connection lives on.
pub fn validate(h: &RequestHeader, s: &Session) -> Result<Command, ExportError> {
    let allowed = match h.kind {
        CMD_READ => {
            if s.structured {
                CMD_FLAG_DF
            } else {
                0
            }
        }
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        CMD_DISC | CMD_FLUSH | CMD_CACHE => 0,
        other => {
            return Err(ExportError::new(
                ErrorCode::Invalid,
                format!("unknown command {other}"),
            ))
        }
    };
    if h.flags & !allowed != 0 {
        return Err(ExportError::new(
            ErrorCode::Invalid,
            format!("flags {:#x} are not valid for command {}", h.flags, h.kind),
        ));
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (h.offset, h.length);
    let in_range = offset
        .checked_add(u64::from(len))
        .is_some_and(|end| end <= s.export_size);
    let out_of_range = |code| {
        ExportError::new(
            code,
            format!(
                "range {offset}+{len} is beyond the end of the export ({} bytes)",
                s.export_size
            ),
        )
    };
    let writes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && s.read_only {
        return Err(ExportError::new(ErrorCode::Perm, "export is read-only"));
    }
    if matches!(h.kind, CMD_READ | CMD_WRITE) && len > MAX_PAYLOAD {
        return Err(ExportError::new(
            ErrorCode::Invalid,
            format!("length {len} exceeds the maximum payload of {MAX_PAYLOAD} bytes"),
        ));
    }
    let command = match h.kind {
        CMD_READ => Command::Read { offset, len },
        CMD_WRITE => Command::Write { offset, len, fua },
        CMD_DISC => return Ok(Command::Disconnect),
        CMD_FLUSH => return Ok(Command::Flush),
        CMD_TRIM => Command::Trim { offset, len, fua },
        CMD_CACHE => Command::Cache { offset, len },
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            len,
            flags: ZeroFlags {
                fua,
                no_hole: h.flags & CMD_FLAG_NO_HOLE != 0,
                fast: h.flags & CMD_FLAG_FAST_ZERO != 0,
            },
        },
        _ => {
            if !s.base_allocation {
                return Err(ExportError::new(
                    ErrorCode::Invalid,
                    "block status needs the base:allocation meta context",
                ));
            }
            // The final extent may run past the request, never past the end.
            Command::BlockStatus {
                offset,
                len,
                req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
            }
        }
    };
    if !in_range {
        let code = match h.kind {
            CMD_WRITE | CMD_WRITE_ZEROES => ErrorCode::NoSpace,
            _ => ErrorCode::Invalid,
        };
        return Err(out_of_range(code));
    }
    Ok(command)
}

/// Appends a simple reply header.
pub fn simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    put_u32(out, SIMPLE_REPLY_MAGIC);
    put_u32(out, error);
    put_u64(out, cookie);
}

/// Appends a structured reply chunk header.
pub fn chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, len: u32) {
    put_u32(out, STRUCTURED_REPLY_MAGIC);
    put_u16(out, flags);
    put_u16(out, kind);
    put_u64(out, cookie);
    put_u32(out, len);
}

/// Appends the header of a successful read reply whose `len` data bytes the
/// caller appends next (one OFFSET_DATA chunk when structured).
pub fn read_reply_header(out: &mut Vec<u8>, structured: bool, cookie: u64, offset: u64, len: u32) {
    if structured {
        chunk_header(
            out,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            len.saturating_add(8),
        );
        put_u64(out, offset);
    } else {
        simple_reply(out, cookie, 0);
    }
}

/// Bytes [`read_reply_header`] appends.
pub fn read_reply_header_len(structured: bool) -> usize {
    if structured {
        STRUCTURED_REPLY_LEN + 8
    } else {
        SIMPLE_REPLY_LEN
    }
}

/// Appends a successful reply without data.
pub fn ok_reply(out: &mut Vec<u8>, cookie: u64) {
    simple_reply(out, cookie, 0);
}

/// Appends an error reply: an ERROR chunk with the message when structured
/// replies are on, else a simple reply with the code.
pub fn error_reply(out: &mut Vec<u8>, structured: bool, cookie: u64, err: &ExportError) {
    if structured {
        let message = truncate(&err.message, MAX_STRING);
        #[allow(clippy::cast_possible_truncation)] // at most MAX_STRING (4096) bytes
        let message_len = message.len() as u16;
        chunk_header(
            out,
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            cookie,
            6 + u32::from(message_len),
        );
        put_u32(out, err.code.wire());
        put_u16(out, message_len);
        out.extend_from_slice(message);
    } else {
        simple_reply(out, cookie, err.code.wire());
    }
}

/// Extents in one BLOCK_STATUS reply at most (more are left out: a reply
/// may describe less than was asked). Keeps the chunk's length in a `u32`.
pub const MAX_REPLY_EXTENTS: usize = 1 << 20;

/// Appends a BLOCK_STATUS chunk for `base:allocation` (final chunk), with
/// at most [`MAX_REPLY_EXTENTS`] of `extents`.
pub fn block_status_reply(out: &mut Vec<u8>, cookie: u64, extents: &[Extent]) {
    let extents = &extents[..extents.len().min(MAX_REPLY_EXTENTS)];
    #[allow(clippy::cast_possible_truncation)] // at most MAX_REPLY_EXTENTS
    let len = 4 + 8 * extents.len() as u32;
    chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, len);
    put_u32(out, META_ID_BASE_ALLOCATION);
    for e in extents {
        put_u32(out, e.length);
        put_u32(out, e.flags);
    }
}

fn truncate(message: &str, max: usize) -> &[u8] {
    let bytes = message.as_bytes();
    &bytes[..bytes.len().min(max)]
}

/// A reply as a client sees it; used by tests and tools that talk to the
/// server as a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        len: u32,
    },
}

/// Decodes a reply header from the front of `buf`: the header and its
/// length, `Ok(None)` if more bytes are needed.
pub fn decode_reply_header(buf: &[u8]) -> Result<Option<(ReplyHeader, usize)>, ProtocolError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    match get_u32(buf, 0) {
        SIMPLE_REPLY_MAGIC if buf.len() >= SIMPLE_REPLY_LEN => Ok(Some((
            ReplyHeader::Simple {
                error: get_u32(buf, 4),
                cookie: get_u64(buf, 8),
            },
            SIMPLE_REPLY_LEN,
        ))),
        STRUCTURED_REPLY_MAGIC if buf.len() >= STRUCTURED_REPLY_LEN => Ok(Some((
            ReplyHeader::Chunk {
                flags: get_u16(buf, 4),
                kind: get_u16(buf, 6),
                cookie: get_u64(buf, 8),
                len: get_u32(buf, 16),
            },
            STRUCTURED_REPLY_LEN,
        ))),
        SIMPLE_REPLY_MAGIC | STRUCTURED_REPLY_MAGIC => Ok(None),
        other => Err(ProtocolError::BadMagic {
            expected: u64::from(SIMPLE_REPLY_MAGIC),
            found: u64::from(other),
        }),
    }
}
