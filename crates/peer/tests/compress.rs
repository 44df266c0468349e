//! The compression policy: zero elision, zstd when it pays, backoff when it
//! does not.
#![allow(clippy::unwrap_used)]
#![allow(clippy::cast_possible_truncation)] // noise bytes keep the low bits on purpose

use tandem_peer::*;

/// Deterministic incompressible bytes (xorshift).
fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn text(n: usize) -> Vec<u8> {
    let words = [
        "replica ", "primary ", "journal ", "epoch ", "volume ", "42 ", "\n",
    ];
    let mut out = Vec::with_capacity(n);
    let mut i = 7usize;
    while out.len() < n {
        i = i.wrapping_mul(31).wrapping_add(17) % 1009;
        out.extend_from_slice(words[i % words.len()].as_bytes());
    }
    out.truncate(n);
    out
}

#[test]
fn zero_data_is_elided() {
    let mut c = Compressor::new(1);
    let p = Payload::encode(&[0; 65536], &mut c);
    assert_eq!(p.encoding, Encoding::Zeroes);
    assert_eq!(p.raw_len, 65536);
    assert!(p.bytes.is_empty());
    assert_eq!(p.wire_len(), PAYLOAD_OVERHEAD);
    assert_eq!(p.decode().unwrap(), vec![0; 65536]);
    assert_eq!(c.attempts(), 0);
    assert_eq!(c.stats(), (65536, PAYLOAD_OVERHEAD as u64));

    // Even when compression is off.
    let p = Payload::encode(&[0; 100], &mut Compressor::disabled());
    assert_eq!(p.encoding, Encoding::Zeroes);
    // Empty data.
    assert_eq!(Payload::encode(&[], &mut c), Payload::empty());
}

#[test]
fn text_is_compressed_and_round_trips() {
    let mut c = Compressor::new(3);
    let data = text(65536);
    let p = Payload::encode(&data, &mut c);
    assert_eq!(p.encoding, Encoding::Zstd);
    assert!(p.bytes.len() * 8 <= data.len() * 7);
    assert_eq!(p.decode().unwrap(), data);
    let (raw, wire) = c.stats();
    assert_eq!(raw, 65536);
    assert_eq!(wire, p.wire_len() as u64);
    assert!(wire < raw / 2, "{wire}");

    // Through a frame.
    let msg = Message::Chunk {
        volume: 2,
        offset: 0,
        data: p,
    };
    let mut f = Vec::new();
    try_encode(&msg, &mut f).unwrap();
    let (back, _) = decode(&f).unwrap().unwrap();
    let Message::Chunk { data: back, .. } = back else {
        panic!()
    };
    assert_eq!(back.decode().unwrap(), data);
}

#[test]
fn while_not_wanted_data_goes_raw_and_zeroes_still_elided() {
    let mut c = Compressor::new(1);
    let data = text(65536);
    c.set_wanted(false);
    let p = Payload::encode(&data, &mut c);
    assert_eq!(p.encoding, Encoding::Raw);
    assert_eq!(c.attempts(), 0, "zstd was not run");
    assert_eq!(p.decode().unwrap(), data);
    let z = Payload::encode(&[0u8; 8192], &mut c);
    assert_eq!(z.encoding, Encoding::Zeroes);
    // Wanted again (the link fell behind): compressed at once.
    c.set_wanted(true);
    let p = Payload::encode(&data, &mut c);
    assert_eq!(p.encoding, Encoding::Zstd);
    assert_eq!(c.attempts(), 1);
}

#[test]
fn small_data_is_sent_raw() {
    let mut c = Compressor::new(1);
    let p = Payload::encode(b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", &mut c);
    assert_eq!(p.encoding, Encoding::Raw);
    assert_eq!(c.attempts(), 0);
}

#[test]
fn disabled_never_compresses() {
    let mut c = Compressor::disabled();
    assert!(!c.is_enabled());
    let data = text(8192);
    let p = Payload::encode(&data, &mut c);
    assert_eq!(p.encoding, Encoding::Raw);
    assert_eq!(p.bytes, data);
    assert_eq!(c.attempts(), 0);
}

#[test]
fn random_data_backs_off() {
    let mut c = Compressor::new(1);
    let n = 1000;
    for i in 0..n {
        let data = random(4096, i + 1);
        let p = Payload::encode(&data, &mut c);
        assert_eq!(p.encoding, Encoding::Raw);
        assert_eq!(p.decode().unwrap(), data);
    }
    // 8 misses, then one probe after 64, 128, 256, 512 skipped payloads.
    let attempts = c.attempts();
    assert!(attempts <= 14, "{attempts} attempts");
    assert_eq!(attempts + c.skipped(), n);
    let (raw, wire) = c.stats();
    assert_eq!(raw, n * 4096);
    assert_eq!(wire, n * (4096 + PAYLOAD_OVERHEAD as u64));

    // Compressible data switches it back on after the current pause.
    assert!(c.backing_off());
    let data = text(4096);
    let mut switched = None;
    for i in 0..2048 {
        if Payload::encode(&data, &mut c).encoding == Encoding::Zstd {
            switched = Some(i);
            break;
        }
    }
    let i = switched.expect("compression never resumed");
    assert!(i <= 1024, "resumed after {i}");
    assert!(!c.backing_off());
    // And stays on.
    for _ in 0..100 {
        assert_eq!(Payload::encode(&data, &mut c).encoding, Encoding::Zstd);
    }
    // A short burst of incompressible data does not pause it.
    for i in 0..7 {
        Payload::encode(&random(4096, 99 + i), &mut c);
    }
    assert!(!c.backing_off());
    assert_eq!(Payload::encode(&data, &mut c).encoding, Encoding::Zstd);
}

#[test]
fn mostly_incompressible_is_raw() {
    // Saves less than 1/8: a quarter compressible, three quarters random.
    let mut data = random(3 * 4096, 5);
    data.extend_from_slice(&[b'a'; 4096]);
    let mut c = Compressor::new(3);
    let p = Payload::encode(&data, &mut c);
    assert_eq!(p.encoding, Encoding::Zstd, "saves about 1/4");
    let mut data = random(7 * 4096, 6);
    data.extend_from_slice(&[b'a'; 2048]);
    let p = Payload::encode(&data, &mut c);
    assert_eq!(p.encoding, Encoding::Raw, "saves under 1/8");
    assert_eq!(c.attempts(), 2);
}
