//! The entry point of the `peer_decode` fuzz target
//! (`fuzz/fuzz_targets/peer_decode.rs`) and of the codec's property tests.
//! Panics only when the codec breaks one of its own properties, never
//! because the bytes are bad.

use std::io::Cursor;

use crate::codec::{decode, decode_frame, encode_on, payload_len, validate};
use crate::error::PeerError;
use crate::message::Message;
use crate::stream::{read_frame_within, read_message, read_message_within};
use crate::MAX_PAYLOAD;
use crate::{FRAME_HEADER_LEN, MAX_PREAUTH_PAYLOAD};

/// Decodes frames off the front of `data` until it runs out or hits an
/// error. Each decoded message must re-encode to exactly the bytes it came
/// from and decode again to itself; its payloads are decoded (bounded by
/// `MAX_DATA`). The blocking reader must agree with the slice decoder.
///
/// Then does the same on a copy of `data` whose frames have their CRCs
/// fixed up, so that mutated inputs reach the message parsers.
pub fn fuzz_one(data: &[u8]) {
    run(data);
    let mut fixed = data.to_vec();
    if fix_crcs(&mut fixed) {
        run(&fixed);
    }
}

/// Rewrites the CRC of each whole frame, following the length fields;
/// whether anything changed.
fn fix_crcs(data: &mut [u8]) -> bool {
    let mut changed = false;
    let mut pos = 0;
    while let Some(header) = data.get(pos..pos + FRAME_HEADER_LEN) {
        let mut len = [0u8; 4];
        len.copy_from_slice(&header[8..12]);
        let end = (pos + FRAME_HEADER_LEN).saturating_add(u32::from_le_bytes(len) as usize);
        let Some(payload) = data.get(pos + FRAME_HEADER_LEN..end) else {
            break;
        };
        let crc = crc32c::crc32c(payload).to_le_bytes();
        if data[pos + 12..pos + 16] != crc {
            data[pos + 12..pos + 16].copy_from_slice(&crc);
            changed = true;
        }
        pos = end;
    }
    changed
}

/// The reader with the pre-authentication limit agrees with the plain one
/// on the first frame, or refuses it from its header as too large.
fn first_frame_before_authentication(data: &[u8]) {
    let limited = read_message_within(&mut Cursor::new(data), &mut Vec::new(), MAX_PREAUTH_PAYLOAD);
    let plain = read_message(&mut Cursor::new(data), &mut Vec::new());
    match (limited, plain) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(PeerError::TooLarge { len, .. }), _) => {
            assert!(len > MAX_PREAUTH_PAYLOAD as u64);
        }
        (Err(_), Err(_)) => {}
        (a, b) => panic!("the limited reader gave {a:?}, the plain one {b:?}"),
    }
}

fn run(data: &[u8]) {
    first_frame_before_authentication(data);
    let mut pos = 0;
    let mut reader = Cursor::new(data);
    let mut buf = Vec::new();
    loop {
        let rest = &data[pos..];
        let streamed = read_frame_within(&mut reader, &mut buf, MAX_PAYLOAD);
        // Outside a link only channel 0 is a frame.
        match (decode(rest), decode_frame(rest)) {
            (Ok(Some((m, n))), Ok(Some((0, f, k)))) => assert_eq!((m, n), (f, k)),
            (Err(_), Ok(Some((c, ..)))) => assert_ne!(c, 0, "decode refused a channel-0 frame"),
            (Ok(None), Ok(None)) | (Err(_), Err(_)) => {}
            (a, b) => panic!("decode gave {a:?}, decode_frame {b:?}"),
        }
        match decode_frame(rest) {
            Ok(Some((channel, msg, n))) => {
                assert!(n >= FRAME_HEADER_LEN && n <= rest.len());
                check_message(channel, &msg, &rest[..n]);
                match streamed {
                    Ok((c, ref m)) => assert_eq!(
                        (c, m),
                        (channel, &msg),
                        "read_frame disagrees with decode_frame"
                    ),
                    Err(e) => panic!("read_message failed ({e}) where decode succeeded"),
                }
                pos += n;
            }
            Ok(None) => {
                match streamed {
                    Err(PeerError::Closed) => assert!(rest.is_empty()),
                    Err(PeerError::Truncated) => assert!(!rest.is_empty()),
                    other => panic!("decode needs more bytes but read_message gave {other:?}"),
                }
                return;
            }
            Err(e) => {
                // Both refuse the frame; the reader may see a different
                // first fault only if it failed earlier, on the header.
                assert!(e.is_protocol_error(), "decode error {e:?}");
                assert!(
                    streamed.is_err(),
                    "read_message accepted a frame decode refused ({e})"
                );
                let _ = e.to_string();
                return;
            }
        }
    }
}

fn check_message(channel: u32, msg: &Message, frame: &[u8]) {
    validate(msg).unwrap_or_else(|e| panic!("decoded message does not validate: {e}"));
    let mut again = Vec::new();
    encode_on(channel, msg, &mut again);
    assert_eq!(again.len(), FRAME_HEADER_LEN + payload_len(msg));
    assert_eq!(again, frame, "re-encoding changed the frame");
    match decode_frame(&again) {
        Ok(Some((c, m, n))) => {
            assert_eq!((c, &m), (channel, msg));
            assert_eq!(n, again.len());
        }
        other => panic!("re-encoded frame does not decode: {other:?}"),
    }
    let _ = crate::frame_kind(msg);
    let _ = format!("{msg:?}");
    let payload = match msg {
        Message::Record(r) => Some(&r.data),
        Message::Chunk { data, .. }
        | Message::File { data, .. }
        | Message::StatusReport { report: data }
        | Message::ApiRequest { body: data, .. }
        | Message::ApiAnswer { body: data, .. } => Some(data),
        _ => None,
    };
    if let Some(p) = payload {
        if let Ok(bytes) = p.decode() {
            assert_eq!(bytes.len(), p.raw_len as usize);
        }
    }
}
