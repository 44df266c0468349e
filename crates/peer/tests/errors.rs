//! Bad frames get the right error, and the error says what is wrong.
#![allow(clippy::unwrap_used)]
#![allow(clippy::cast_possible_truncation)] // test payloads and frame limits fit the wire's u16/u32 fields

use std::io::{Cursor, Read};

use tandem_peer::*;

fn frame(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode(msg, &mut out);
    out
}

/// A frame of type `ty` around `payload`, with a correct CRC.
fn raw_frame(ty: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&MAGIC.to_le_bytes());
    f.extend_from_slice(&[ty, 0, 0, 0]);
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

fn malformed(buf: &[u8]) -> String {
    match decode(buf) {
        Err(PeerError::Malformed(what)) => what,
        other => panic!("expected Malformed, got {other:?}"),
    }
}

#[test]
fn magic_is_tndp_little_endian() {
    let f = frame(&Message::Ping(1));
    assert_eq!(&f[..4], &[0x50, 0x44, 0x4E, 0x54]);
    assert_eq!(f[4], 12);
    assert_eq!(&f[5..8], &[0, 0, 0]);
    assert_eq!(&f[8..12], &8u32.to_le_bytes());
    assert_eq!(&f[16..], &1u64.to_le_bytes());
    assert_eq!(f.len(), FRAME_HEADER_LEN + 8);
}

#[test]
fn bad_magic() {
    let mut f = frame(&Message::Ping(1));
    f[0] = b'X';
    match decode(&f) {
        Err(PeerError::BadMagic(m)) => assert_eq!(m & 0xFF, u32::from(b'X')),
        other => panic!("{other:?}"),
    }
    // Refused on the first wrong byte, before the header is complete.
    assert!(matches!(decode(b"X"), Err(PeerError::BadMagic(_))));
    assert!(matches!(decode(b"PDX"), Err(PeerError::BadMagic(_))));
    assert!(matches!(decode(b"PD"), Ok(None)));
    // An HTTP client talking to the peer port.
    let e = decode(b"GET / HTTP/1.1\r\n").unwrap_err();
    assert!(e.to_string().contains("magic"), "{e}");
}

#[test]
fn unknown_type() {
    for ty in [0u8, 40, 200, 255] {
        let mut f = frame(&Message::Ping(1));
        f[4] = ty;
        match decode(&f) {
            Err(PeerError::UnknownType(t)) => assert_eq!(t, ty),
            other => panic!("{other:?}"),
        }
        // Known from the fifth byte on.
        assert!(matches!(decode(&f[..5]), Err(PeerError::UnknownType(_))));
    }
}

#[test]
fn a_channel_outside_a_link_is_refused() {
    let mut f = frame(&Message::Ping(1));
    f[6] = 1;
    assert!(malformed(&f).contains("channel 256"), "{}", malformed(&f));
    // On a link the same frame is channel 256's.
    let (channel, msg, n) = tandem_peer::decode_frame(&f).unwrap().unwrap();
    assert_eq!((channel, msg, n), (256, Message::Ping(1), f.len()));
}

#[test]
fn oversize_length() {
    let mut f = frame(&Message::Ping(1));
    f[8..12].copy_from_slice(&((MAX_PAYLOAD + 1) as u32).to_le_bytes());
    match decode(&f) {
        Err(PeerError::TooLarge { len, max }) => {
            assert_eq!(len, MAX_PAYLOAD as u64 + 1);
            assert_eq!(max, MAX_PAYLOAD as u64);
        }
        other => panic!("{other:?}"),
    }
    // The limit itself is fine (needs more bytes).
    f[8..12].copy_from_slice(&(MAX_PAYLOAD as u32).to_le_bytes());
    assert!(matches!(decode(&f), Ok(None)));
}

#[test]
fn four_gib_header_is_refused_without_allocating() {
    let mut header = Vec::new();
    header.extend_from_slice(&MAGIC.to_le_bytes());
    header.extend_from_slice(&[4, 0, 0, 0]);
    header.extend_from_slice(&u32::MAX.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    assert!(matches!(
        decode(&header),
        Err(PeerError::TooLarge { len, .. }) if len == u64::from(u32::MAX)
    ));
    assert!(matches!(
        decode(&header[..12]),
        Err(PeerError::TooLarge { .. })
    ));

    // The blocking reader, with endless bytes behind the header.
    let mut r = Cursor::new(header.clone()).chain(std::io::repeat(0));
    let mut buf = Vec::new();
    let e = read_message(&mut r, &mut buf).unwrap_err();
    assert!(matches!(e, PeerError::TooLarge { .. }), "{e}");
    assert_eq!(buf.capacity(), 0);
    assert!(e.to_string().contains("4294967295"), "{e}");
}

#[test]
fn large_announced_frame_grows_with_the_bytes() {
    // A peer announcing 64 MiB and sending 10 bytes: we hold about 1 MiB.
    let mut header = Vec::new();
    header.extend_from_slice(&MAGIC.to_le_bytes());
    header.extend_from_slice(&[9, 0, 0, 0]);
    header.extend_from_slice(&(64u32 << 20).to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&[0; 10]);
    let mut buf = Vec::new();
    let e = read_message(&mut Cursor::new(header), &mut buf).unwrap_err();
    assert!(matches!(e, PeerError::Truncated), "{e}");
    assert!(buf.capacity() <= 1 << 20, "{}", buf.capacity());
}

#[test]
fn checksum_mismatch() {
    let mut f = frame(&Message::Refuse {
        reason: "no such group".into(),
    });
    let last = f.len() - 1;
    f[last] ^= 0x20;
    match decode(&f) {
        Err(e @ PeerError::Checksum { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("refuse") && text.contains("checksum"),
                "{text}"
            );
        }
        other => panic!("{other:?}"),
    }
    let mut f = frame(&Message::Ping(3));
    f[12] ^= 1;
    assert!(matches!(decode(&f), Err(PeerError::Checksum { .. })));
}

#[test]
fn truncated_fields_and_trailing_bytes() {
    // A Ping with 7 bytes.
    assert!(malformed(&raw_frame(12, &[0; 7])).contains("nanos"));
    // A Ping with 9 bytes.
    assert!(malformed(&raw_frame(12, &[0; 9])).contains("trailing"));
    // An empty Hello.
    assert!(malformed(&raw_frame(1, &[])).contains("hello: version"));
}

#[test]
fn mark_wire_format_and_bad_marks() {
    // seq u64 then time_ms u64, little-endian, type 27.
    let f = frame(&Message::Mark {
        seq: 0x0102,
        time_ms: 1_700_000_000_123,
    });
    assert_eq!((f[4], f.len()), (27, FRAME_HEADER_LEN + 16));
    assert_eq!(&f[16..24], &0x0102u64.to_le_bytes());
    assert_eq!(&f[24..], &1_700_000_000_123u64.to_le_bytes());
    // Every shorter payload names the missing field; a longer one is
    // refused for its trailing bytes.
    for n in 0..8 {
        assert!(
            malformed(&raw_frame(27, &vec![0; n])).contains("mark: seq truncated"),
            "{n}"
        );
    }
    for n in 8..16 {
        assert!(
            malformed(&raw_frame(27, &vec![0; n])).contains("mark: time_ms truncated"),
            "{n}"
        );
    }
    assert!(malformed(&raw_frame(27, &[0; 17])).contains("trailing"));
    // A corrupted mark is a checksum error, not a different mark.
    let mut bad = f.clone();
    bad[20] ^= 1;
    assert!(matches!(
        decode(&bad),
        Err(PeerError::Checksum { kind: "mark", .. })
    ));
}

#[test]
fn invalid_utf8_is_malformed() {
    let mut p = Vec::new();
    p.extend_from_slice(&2u16.to_le_bytes());
    p.extend_from_slice(&[0xC3, 0x28]);
    let what = malformed(&raw_frame(3, &p));
    assert!(what.contains("reason") && what.contains("UTF-8"), "{what}");
}

#[test]
fn list_count_is_checked_before_allocating() {
    // Hashes claiming 1000 hashes (within the bound) in a 56-byte payload.
    let mut p = Vec::new();
    p.extend_from_slice(&1u32.to_le_bytes());
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&65536u32.to_le_bytes());
    p.extend_from_slice(&1000u32.to_le_bytes());
    p.extend_from_slice(&[7; 32]);
    let what = malformed(&raw_frame(7, &p));
    assert!(what.contains("hashes") && what.contains("1000"), "{what}");

    // Hello claiming 1000 volumes (within the bound) and carrying none.
    let mut p = Vec::new();
    p.extend_from_slice(&1u16.to_le_bytes());
    for s in ["ny", "ldn", "db"] {
        p.extend_from_slice(&(s.len() as u16).to_le_bytes());
        p.extend_from_slice(s.as_bytes());
    }
    for epoch_or_fork in [5u64, 4, 900] {
        p.extend_from_slice(&epoch_or_fork.to_le_bytes());
    }
    p.extend_from_slice(&1000u32.to_le_bytes());
    assert!(malformed(&raw_frame(1, &p)).contains("volumes"));

    // A byte string longer than what is left.
    let mut p = Vec::new();
    p.extend_from_slice(&1u32.to_le_bytes());
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&65536u32.to_le_bytes());
    p.extend_from_slice(&100u32.to_le_bytes());
    p.extend_from_slice(&[1; 10]);
    assert!(malformed(&raw_frame(8, &p)).contains("bitmap"));
}

fn record_bytes(op: u8, flags: u8, len: u64, data: Option<(u8, u32, &[u8])>) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&3u64.to_le_bytes());
    p.extend_from_slice(&17u64.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.push(op);
    p.push(flags);
    p.extend_from_slice(&4096u64.to_le_bytes());
    p.extend_from_slice(&len.to_le_bytes());
    if let Some((enc, raw_len, bytes)) = data {
        p.push(enc);
        p.extend_from_slice(&raw_len.to_le_bytes());
        p.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        p.extend_from_slice(bytes);
    }
    raw_frame(4, &p)
}

#[test]
fn record_fields() {
    // A valid FUA write of 4 bytes.
    let (msg, _) = decode(&record_bytes(0, 1, 4, Some((0, 4, b"abcd"))))
        .unwrap()
        .unwrap();
    let Message::Record(rec) = msg else { panic!() };
    assert!(rec.fua);
    assert_eq!(rec.data.decode().unwrap(), b"abcd");
    // A flush carries no data on the wire.
    let (msg, _) = decode(&record_bytes(3, 0, 0, None)).unwrap().unwrap();
    let Message::Record(rec) = msg else { panic!() };
    assert_eq!(rec.op, RecordOp::Flush);
    assert_eq!(rec.data, Payload::empty());
    assert!(malformed(&record_bytes(3, 0, 0, Some((0, 0, b"")))).contains("trailing"));

    assert!(malformed(&record_bytes(4, 0, 0, None)).contains("unknown op 4"));
    assert!(malformed(&record_bytes(0, 2, 4, Some((0, 4, b"abcd")))).contains("flags"));
    assert!(malformed(&record_bytes(0, 0, 4, Some((3, 4, b"abcd")))).contains("encoding"));
    // Raw bytes must match raw_len, and raw_len the record's len.
    assert!(malformed(&record_bytes(0, 0, 5, Some((0, 5, b"abcd")))).contains("raw_len"));
    assert!(malformed(&record_bytes(0, 0, 5, Some((0, 4, b"abcd")))).contains("write of 5"));
    // Zeroes carry no bytes.
    assert!(malformed(&record_bytes(0, 0, 4, Some((2, 4, b"abcd")))).contains("zeroes"));
    // Data over the limit.
    let big = MAX_DATA as u32 + 1;
    assert!(matches!(
        decode(&record_bytes(0, 0, u64::from(big), Some((2, big, b"")))),
        Err(PeerError::DataTooLarge { .. })
    ));
}

#[test]
fn welcome_state() {
    let mut f = frame(&Message::Welcome(Welcome {
        replica: "ldn".into(),
        epoch: 1,
        applied: 2,
        durable: 3,
        state: ReplicaState::New,
        history: true,
        point: false,
    }));
    let state = f.len() - 2;
    f[state] = 3;
    let crc = crc32c::crc32c(&f[16..]);
    f[12..16].copy_from_slice(&crc.to_le_bytes());
    assert!(malformed(&f).contains("state 3"));
}

#[test]
fn welcome_flags() {
    let mut f = frame(&Message::Welcome(Welcome {
        replica: "ldn".into(),
        epoch: 1,
        applied: 2,
        durable: 3,
        state: ReplicaState::Inconsistent,
        history: true,
        point: true,
    }));
    let flags = f.len() - 1;
    assert_eq!(f[flags], 3);
    f[flags] = 4;
    let crc = crc32c::crc32c(&f[16..]);
    f[12..16].copy_from_slice(&crc.to_le_bytes());
    assert!(
        malformed(&f).contains("unknown flags 0x04"),
        "{}",
        malformed(&f)
    );
}

#[test]
fn try_encode_refuses_what_would_not_decode() {
    let mut out = vec![1, 2, 3];
    let long = "x".repeat(70_000);
    let e = try_encode(
        &Message::Refuse {
            reason: long.clone(),
        },
        &mut out,
    )
    .unwrap_err();
    assert!(matches!(e, PeerError::Malformed(_)), "{e}");
    assert_eq!(out, [1, 2, 3]);

    // encode itself cuts the string (at a character boundary).
    let mut f = Vec::new();
    let s = "é".repeat(40_000);
    encode(&Message::Refuse { reason: s.clone() }, &mut f);
    let (m, _) = decode(&f).unwrap().unwrap();
    let Message::Refuse { reason } = m else {
        panic!()
    };
    assert!(s.starts_with(&reason) && reason.len() == 65534);

    let rec = Record {
        epoch: 1,
        seq: 1,
        volume: 0,
        op: RecordOp::Trim,
        fua: false,
        offset: 0,
        len: 8,
        data: Payload::raw(vec![1; 8]),
    };
    assert!(try_encode(&Message::Record(rec.clone()), &mut out).is_err());
    let write = Record {
        op: RecordOp::Write,
        len: 9,
        ..rec
    };
    assert!(try_encode(&Message::Record(write), &mut out).is_err());

    let bad = Payload {
        encoding: Encoding::Raw,
        raw_len: 3,
        bytes: vec![0; 2].into(),
    };
    assert!(try_encode(
        &Message::Chunk {
            volume: 0,
            offset: 0,
            data: bad
        },
        &mut out
    )
    .is_err());

    // A frame over the limit.
    let e = try_encode(
        &Message::Chunk {
            volume: 0,
            offset: 0,
            data: Payload {
                encoding: Encoding::Zstd,
                raw_len: 10,
                bytes: vec![0; MAX_PAYLOAD].into(),
            },
        },
        &mut out,
    )
    .unwrap_err();
    assert!(matches!(e, PeerError::TooLarge { .. }), "{e}");
    assert_eq!(out, [1, 2, 3]);
}

#[test]
fn largest_chunk_fits() {
    let msg = Message::Chunk {
        volume: 1,
        offset: 0,
        data: Payload::zeroes(MAX_CHUNK),
    };
    let mut f = Vec::new();
    try_encode(&msg, &mut f).unwrap();
    assert_eq!(decode(&f).unwrap().unwrap().0, msg);
    // A raw 64 MiB write is within the frame limit too.
    assert!(
        payload_len(&Message::Record(Record {
            epoch: 1,
            seq: 1,
            volume: 0,
            op: RecordOp::Write,
            fua: true,
            offset: 0,
            len: MAX_DATA as u64,
            data: Payload {
                encoding: Encoding::Raw,
                raw_len: MAX_DATA as u32,
                bytes: bytes::Bytes::new(),
            },
        })) + MAX_DATA
            <= MAX_PAYLOAD
    );
}

#[test]
fn zstd_payload_errors_are_bounded() {
    // 1 MiB of zeroes compressed, announced as 1000 bytes.
    let bomb = zstd::bulk::compress(&vec![0u8; 1 << 20], 3).unwrap();
    let p = Payload {
        encoding: Encoding::Zstd,
        raw_len: 1000,
        bytes: bomb.clone().into(),
    };
    let e = p.decode().unwrap_err();
    assert!(matches!(e, PeerError::Decompress(_)), "{e}");
    // Announced as more than it is.
    let p = Payload {
        encoding: Encoding::Zstd,
        raw_len: (1 << 20) + 1,
        bytes: bomb.into(),
    };
    let e = p.decode().unwrap_err();
    assert!(e.to_string().contains("1048576"), "{e}");
    // Not zstd at all.
    let p = Payload {
        encoding: Encoding::Zstd,
        raw_len: 10,
        bytes: b"hello".to_vec().into(),
    };
    assert!(matches!(p.decode(), Err(PeerError::Decompress(_))));
    // Over the data limit.
    let p = Payload::zeroes(MAX_DATA as u32 + 1);
    assert!(matches!(p.decode(), Err(PeerError::DataTooLarge { .. })));
}

#[test]
fn kinds() {
    assert_eq!(frame_kind(&Message::Ping(0)), "ping");
    assert_eq!(
        frame_kind(&Message::ResyncEnd { consistent_at: 0 }),
        "resync_end"
    );
    assert_eq!(ReplicaState::Inconsistent.as_str(), "inconsistent");
    assert_eq!(type_name(4), Some("record"));
    assert_eq!(type_name(14), Some("resync_done"));
    assert_eq!(type_name(15), Some("define"));
    assert_eq!(type_name(16), Some("defined"));
    assert_eq!(type_name(17), Some("retire"));
    assert_eq!(type_name(18), Some("retired"));
    assert_eq!(type_name(19), Some("link"));
    assert_eq!(type_name(20), Some("linked"));
    assert_eq!(type_name(21), Some("end"));
    assert_eq!(type_name(22), Some("lease_ask"));
    assert_eq!(type_name(23), Some("lease_answer"));
    assert_eq!(type_name(24), Some("status_request"));
    assert_eq!(type_name(25), Some("status_report"));
    assert_eq!(type_name(26), Some("diverged"));
    assert_eq!(type_name(27), Some("mark"));
    assert_eq!(frame_kind(&Message::Mark { seq: 1, time_ms: 2 }), "mark");
    assert_eq!(type_name(28), Some("api_request"));
    assert_eq!(type_name(29), Some("api_answer"));
    assert_eq!(type_name(30), None);
    assert_eq!(type_name(40), None);
}

#[test]
fn diff_bitmap_helpers() {
    let mut b = Vec::new();
    set_diff_bit(&mut b, 0);
    set_diff_bit(&mut b, 9);
    assert_eq!(b, [0b0000_0001, 0b0000_0010]);
    assert!(diff_bit(&b, 0) && diff_bit(&b, 9));
    assert!(!diff_bit(&b, 1) && !diff_bit(&b, 100));
    assert_eq!(diff_bitmap_len(17), 3);
    assert_eq!(chunk_hash(b"abc"), *blake3::hash(b"abc").as_bytes());
}
