//! Property tests of the codec: every message kind round-trips, every
//! strict prefix of a frame asks for more bytes, and no input panics.
#![allow(clippy::unwrap_used)]
#![allow(clippy::cast_possible_truncation)] // test payloads and frame limits fit the wire's u32 fields

use proptest::prelude::*;
use tandem_peer::*;

/// Any text that fits a name (at most 64 bytes: 16 characters of up to 4).
fn text() -> impl Strategy<Value = String> {
    "\\PC{0,16}"
}

/// A chunk size within the bounds: a power of two from 4 KiB to 1 MiB.
fn chunk() -> impl Strategy<Value = u32> {
    (12u32..=20).prop_map(|shift| 1 << shift)
}

fn payload() -> impl Strategy<Value = Payload> {
    payload_within(MAX_DATA as u32)
}

/// A payload whose decoded length is at most `max`.
fn payload_within(max: u32) -> impl Strategy<Value = Payload> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300).prop_map(Payload::raw),
        (0u32..=max.min(1 << 20)).prop_map(Payload::zeroes),
        // Real zstd data of a repetitive buffer.
        (prop::collection::vec(any::<u8>(), 1..16), 1usize..400).prop_map(|(unit, n)| {
            let data = unit.repeat(n);
            let bytes = zstd::bulk::compress(&data, 1).unwrap();
            Payload {
                encoding: Encoding::Zstd,
                raw_len: data.len() as u32,
                bytes: bytes.into(),
            }
        }),
        // Whatever the policy picks.
        (prop::collection::vec(0u8..4, 0..600))
            .prop_map(|data| { Payload::encode(&data, &mut Compressor::new(1)) }),
        // Garbage claimed to be zstd: the frame carries it all the same.
        (prop::collection::vec(any::<u8>(), 0..64), 0u32..=max).prop_map(|(bytes, raw_len)| {
            Payload {
                encoding: Encoding::Zstd,
                raw_len,
                bytes: bytes.into(),
            }
        }),
    ]
}

fn record() -> impl Strategy<Value = Record> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        0u8..4,
        any::<bool>(),
        any::<u64>(),
        any::<u64>(),
        payload(),
    )
        .prop_map(|(epoch, seq, volume, op, fua, offset, len, data)| {
            let op = RecordOp::from_u8(op).unwrap();
            let (len, data) = if op == RecordOp::Write {
                (u64::from(data.raw_len), data)
            } else {
                (len, Payload::empty())
            };
            // offset + len fits a u64 (a bound).
            let offset = offset.min(u64::MAX - len);
            Record {
                epoch,
                seq,
                volume,
                op,
                fua,
                offset,
                len,
                data,
            }
        })
}

pub fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            any::<u16>(),
            text(),
            text(),
            text(),
            any::<u64>(),
            (any::<u64>(), any::<u64>()),
            prop::collection::vec((text(), any::<u64>()), 0..6)
        )
            .prop_map(|(version, primary, replica, group, epoch, fork, volumes)| {
                Message::Hello(Hello {
                    version,
                    primary,
                    replica,
                    group,
                    epoch,
                    fork_epoch: fork.0,
                    fork_seq: fork.1,
                    volumes,
                })
            }),
        (
            text(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            0u8..3,
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(
                |(replica, epoch, applied, durable, state, history, point)| {
                    Message::Welcome(Welcome {
                        replica,
                        epoch,
                        applied,
                        durable,
                        state: ReplicaState::from_u8(state).unwrap(),
                        history,
                        point,
                    })
                }
            ),
        text().prop_map(|reason| Message::Refuse { reason }),
        record().prop_map(Message::Record),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(received, durable, applied)| {
            Message::Ack(Ack {
                received,
                durable,
                applied,
            })
        }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(epoch, resume_at, bytes)| {
            Message::ResyncBegin {
                epoch,
                resume_at,
                bytes,
            }
        }),
        (
            any::<u32>(),
            any::<u64>(),
            chunk(),
            prop::collection::vec(any::<[u8; 32]>(), 0..20)
        )
            .prop_map(|(volume, offset, chunk, hashes)| Message::Hashes {
                volume,
                offset,
                chunk,
                hashes,
            }),
        (
            any::<u32>(),
            any::<u64>(),
            chunk(),
            prop::collection::vec(any::<u8>(), 0..=MAX_BITMAP)
        )
            .prop_map(|(volume, offset, chunk, bitmap)| Message::Diff {
                volume,
                offset,
                chunk,
                bitmap,
            }),
        (any::<u32>(), any::<u64>(), payload_within(MAX_CHUNK)).prop_map(
            |(volume, offset, data)| {
                Message::Chunk {
                    volume,
                    offset,
                    data,
                }
            }
        ),
        any::<u64>().prop_map(|consistent_at| Message::ResyncEnd { consistent_at }),
        any::<u64>().prop_map(|resume_at| Message::ResyncDone { resume_at }),
        (text(), 0..=MAX_MODE, payload_within(MAX_FILE))
            .prop_map(|(path, mode, data)| Message::File { path, mode, data }),
        any::<u64>().prop_map(Message::Ping),
        any::<u64>().prop_map(Message::Pong),
        (text(), text()).prop_map(|(group, definition)| Message::Define { group, definition }),
        text().prop_map(|group| Message::Defined { group }),
        text().prop_map(|group| Message::Retire { group }),
        text().prop_map(|group| Message::Retired { group }),
        (any::<u16>(), text(), text()).prop_map(|(version, primary, replica)| Message::Link {
            version,
            primary,
            replica
        }),
        any::<u16>().prop_map(|version| Message::Linked { version }),
        text().prop_map(|reason| Message::End { reason }),
        (
            any::<u64>(),
            any::<u32>(),
            proptest::collection::vec((text(), any::<u64>()), 0..8)
        )
            .prop_map(|(id, duration_ms, groups)| Message::LeaseAsk {
                id,
                duration_ms,
                groups
            }),
        (
            any::<u64>(),
            any::<u32>(),
            proptest::collection::vec((text(), text()), 0..8)
        )
            .prop_map(|(id, duration_ms, answers)| Message::LeaseAnswer {
                id,
                duration_ms,
                answers
            }),
        text().prop_map(|site| Message::StatusRequest { site }),
        payload_within(MAX_STATUS_REPORT).prop_map(|report| Message::StatusReport { report }),
        (
            text(),
            "[A-Z]{0,16}",
            text(),
            text(),
            payload_within(tandem_peer::MAX_API_BODY)
        )
            .prop_map(|(site, method, path, query, body)| Message::ApiRequest {
                site,
                method,
                path,
                query,
                body
            }),
        (any::<u16>(), payload_within(tandem_peer::MAX_API_ANSWER))
            .prop_map(|(status, body)| Message::ApiAnswer { status, body }),
        (
            any::<u64>(),
            prop::collection::vec((any::<u32>(), any::<u64>(), any::<u64>()), 0..40)
        )
            .prop_map(|(resync_epoch, ranges)| {
                let ranges: Vec<_> = ranges
                    .into_iter()
                    .map(|(v, o, l)| (v, o / 2, l / 2))
                    .collect();
                Message::Diverged(tandem_peer::Diverged {
                    resync_epoch,
                    known: !ranges.is_empty() || resync_epoch % 2 == 0,
                    ranges,
                })
            }),
        (any::<u64>(), any::<u64>()).prop_map(|(seq, time_ms)| Message::Mark { seq, time_ms }),
    ]
}

proptest! {
    #[test]
    fn round_trip(msg in message(), channel in 0..=tandem_peer::MAX_CHANNEL) {
        let mut frame = vec![0xAA; 3]; // encode appends
        try_encode(&msg, &mut frame).unwrap();
        let frame = &frame[3..];
        prop_assert_eq!(frame.len(), FRAME_HEADER_LEN + payload_len(&msg));
        let (back, n) = decode(frame).unwrap().unwrap();
        prop_assert_eq!(n, frame.len());
        prop_assert_eq!(&back, &msg);
        prop_assert_eq!(frame_kind(&back), frame_kind(&msg));

        // Followed by another frame, only the first is consumed.
        let mut two = frame.to_vec();
        encode(&Message::Ping(7), &mut two);
        let (first, n) = decode(&two).unwrap().unwrap();
        prop_assert_eq!(&first, &msg);
        prop_assert_eq!(decode(&two[n..]).unwrap().unwrap(), (Message::Ping(7), two.len() - n));

        // On a link's channel, the same message with its channel.
        let mut on = Vec::new();
        tandem_peer::try_encode_on(channel, &msg, &mut on).unwrap();
        let (c, back, n) = tandem_peer::decode_frame(&on).unwrap().unwrap();
        prop_assert_eq!((c, &back, n), (channel, &msg, on.len()));

        // The fuzz property holds on valid frames too.
        tandem_peer::fuzzing::fuzz_one(&two);
    }

    #[test]
    fn every_strict_prefix_needs_more(msg in message()) {
        let mut frame = Vec::new();
        encode(&msg, &mut frame);
        for end in 0..frame.len() {
            prop_assert!(
                matches!(decode(&frame[..end]), Ok(None)),
                "prefix of {} of {} bytes", end, frame.len()
            );
        }
    }

    #[test]
    fn payloads_decode_to_raw_len(p in payload()) {
        if let Ok(data) = p.decode() {
            prop_assert_eq!(data.len(), p.raw_len as usize);
            if p.encoding == Encoding::Zeroes {
                prop_assert!(is_zero(&data));
            }
        }
    }

    /// Appending keeps what the buffer held, adds exactly the decoded
    /// data, and leaves the buffer as it was when the payload is refused.
    #[test]
    fn decode_append_adds_exactly_the_data_or_nothing(
        p in payload(),
        prefix in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut out = prefix.clone();
        match p.decode() {
            Ok(data) => {
                p.decode_append(&mut out).unwrap();
                prop_assert_eq!(&out[..prefix.len()], &prefix[..]);
                prop_assert_eq!(&out[prefix.len()..], &data[..]);
            }
            Err(_) => {
                prop_assert!(p.decode_append(&mut out).is_err());
                prop_assert_eq!(out, prefix);
            }
        }
    }

    #[test]
    fn encode_then_decode_data(data in prop::collection::vec(prop_oneof![Just(0u8), any::<u8>(), 0u8..3], 0..5000)) {
        let mut c = Compressor::new(3);
        let p = Payload::encode(&data, &mut c);
        prop_assert_eq!(p.raw_len as usize, data.len());
        prop_assert!(p.wire_len() <= data.len() + PAYLOAD_OVERHEAD);
        prop_assert_eq!(p.decode().unwrap(), data);
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..4096)) {
        tandem_peer::fuzzing::fuzz_one(&data);
    }

    /// Random payloads behind a valid header and CRC reach the message
    /// parsers (random bytes almost never get past the magic).
    #[test]
    fn arbitrary_payloads_never_panic(
        ty in 1u8..=25,
        payload in prop::collection::vec(any::<u8>(), 0..512),
        tail in prop::collection::vec(any::<u8>(), 0..32),
    ) {
        let mut frame = Vec::new();
        frame.extend_from_slice(&MAGIC.to_le_bytes());
        frame.extend_from_slice(&[ty, 0, 0, 0]);
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        frame.extend_from_slice(&payload);
        frame.extend_from_slice(&tail);
        tandem_peer::fuzzing::fuzz_one(&frame);
        match decode(&frame) {
            Ok(Some(_)) | Ok(None) => {}
            Err(e) => {
                let ok = matches!(
                    e,
                    PeerError::Malformed(_) | PeerError::DataTooLarge { .. } | PeerError::OutOfBounds { .. }
                );
                prop_assert!(ok, "{}", e);
            }
        }
    }

    /// A valid frame with one byte changed is refused or decodes to a
    /// message (never panics); the CRC catches payload changes.
    #[test]
    fn corrupted_frames(msg in message(), at in any::<prop::sample::Index>(), xor in 1u8..) {
        let mut frame = Vec::new();
        encode(&msg, &mut frame);
        let i = at.index(frame.len());
        frame[i] ^= xor;
        let result = decode(&frame);
        if i >= FRAME_HEADER_LEN {
            prop_assert!(matches!(result, Err(PeerError::Checksum { .. })), "{:?}", result);
        }
        tandem_peer::fuzzing::fuzz_one(&frame);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    /// A long write encoded without its data, then the data, is the same
    /// frame byte for byte as the whole frame encoded at once.
    #[test]
    fn a_split_record_is_the_whole_frame(
        len in (tandem_peer::SPLIT_AT - 2)..(tandem_peer::SPLIT_AT + 4097),
        seed in any::<u8>(),
        channel in 0..=tandem_peer::MAX_CHANNEL,
        fua in any::<bool>(),
    ) {
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        let msg = Message::Record(Record {
            epoch: 3,
            seq: 99,
            volume: 1,
            op: RecordOp::Write,
            fua,
            offset: 1 << 20,
            len: len as u64,
            data: tandem_peer::Payload::raw(data),
        });
        let mut whole = Vec::new();
        tandem_peer::try_encode_on(channel, &msg, &mut whole).unwrap();
        let mut split = vec![0xEE; 5];
        let data = tandem_peer::try_encode_split(channel, &msg, &mut split).unwrap();
        prop_assert_eq!(data.is_some(), len >= tandem_peer::SPLIT_AT);
        if let Some(data) = data {
            split.extend_from_slice(&data);
        }
        prop_assert_eq!(&split[5..], &whole[..]);
        let (c, back, n) = tandem_peer::decode_frame(&split[5..]).unwrap().unwrap();
        prop_assert_eq!((c, &back, n), (channel, &msg, whole.len()));
    }
}
