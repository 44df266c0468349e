//! Thin blocking helpers: one frame at a time over `std::io::Read` and
//! `std::io::Write`.

use std::io::{ErrorKind, Read, Write};

use crate::codec::{decode_payload, outside_link, parse_header, try_encode, try_encode_on};
use crate::error::PeerError;
use crate::message::Message;
use crate::{FRAME_HEADER_LEN, MAX_PAYLOAD};

/// The payload buffer grows by at most this much before the bytes that
/// fill it have arrived, so that a peer announcing a large frame and
/// sending nothing does not make us allocate for it.
const READ_STEP: usize = 1 << 20;

/// Reads exactly one frame from `r` and decodes it; `buf` is scratch for
/// the payload (reused between calls).
///
/// The header is validated before anything is allocated for the payload,
/// and the buffer grows only as payload bytes arrive. End of stream before
/// the first byte of a frame is [`PeerError::Closed`]; within a frame it is
/// [`PeerError::Truncated`]. Any error leaves the stream mid-frame: close the
/// connection (a read timeout, in particular, is fatal).
pub fn read_message<R: Read + ?Sized>(r: &mut R, buf: &mut Vec<u8>) -> Result<Message, PeerError> {
    read_message_within(r, buf, MAX_PAYLOAD)
}

/// [`read_message`] with a lower frame limit `max` (e.g.
/// [`crate::MAX_PREAUTH_PAYLOAD`] before the peer is authenticated): a
/// frame announcing more is refused from its header
/// ([`PeerError::TooLarge`]), before any of its payload is read.
pub fn read_message_within<R: Read + ?Sized>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<Message, PeerError> {
    match read_frame_within(r, buf, max)? {
        (0, msg) => Ok(msg),
        (channel, msg) => Err(outside_link(channel, msg.kind())),
    }
}

/// [`read_message_within`] on a link: the frame's channel and message.
pub fn read_frame_within<R: Read + ?Sized>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<(u32, Message), PeerError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let mut filled = 0;
    while filled < FRAME_HEADER_LEN {
        match r.read(&mut header[filled..]) {
            Ok(0) if filled == 0 => return Err(PeerError::Closed),
            Ok(0) => return Err(PeerError::Truncated),
            Ok(n) => {
                filled += n;
                // Refuse garbage as soon as it shows.
                parse_header(&header[..filled])?;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let Some(header) = parse_header(&header)? else {
        return Err(PeerError::Truncated); // unreachable: the header is whole
    };
    let len = header.len as usize;
    if len > max {
        return Err(PeerError::TooLarge {
            len: u64::from(header.len),
            max: max as u64,
        });
    }
    buf.clear();
    let mut got = 0;
    while got < len {
        if buf.len() == got {
            let grow = (len - got).min(READ_STEP.max(got));
            buf.reserve_exact(grow);
            buf.resize(got + grow, 0);
        }
        match r.read(&mut buf[got..]) {
            Ok(0) => return Err(PeerError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok((header.channel, decode_payload(&header, &buf[..len])?))
}

/// Encodes `msg` into `scratch` (cleared first) and writes it to `w`, then
/// flushes `w`. A message the receiver could not decode to the same value
/// is refused before anything is written (see [`crate::try_encode`]).
/// To batch several messages in one write, [`crate::encode`] them into one
/// buffer instead.
pub fn write_message<W: Write + ?Sized>(
    w: &mut W,
    msg: &Message,
    scratch: &mut Vec<u8>,
) -> Result<(), PeerError> {
    scratch.clear();
    try_encode(msg, scratch)?;
    w.write_all(scratch)?;
    w.flush()?;
    Ok(())
}

/// [`write_message`] on a link's `channel` (without the flush: a link's
/// writer flushes when its queue runs dry).
pub fn write_frame<W: Write + ?Sized>(
    w: &mut W,
    channel: u32,
    msg: &Message,
    scratch: &mut Vec<u8>,
) -> Result<(), PeerError> {
    scratch.clear();
    try_encode_on(channel, msg, scratch)?;
    w.write_all(scratch)?;
    Ok(())
}
