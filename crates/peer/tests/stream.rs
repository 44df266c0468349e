//! The blocking helpers over an in-memory cursor and a real socket pair.
#![allow(clippy::unwrap_used)]
#![allow(clippy::cast_possible_truncation)] // pattern bytes keep the low bits on purpose

use std::io::{Cursor, Read, Write};
use std::os::unix::net::UnixStream;

use tandem_peer::*;

fn session() -> Vec<Message> {
    let mut c = Compressor::new(1);
    let text: Vec<u8> = (0..200_000u32)
        .flat_map(|i| format!("line {} of the log\n", i % 977).into_bytes())
        .collect();
    let random: Vec<u8> = (0..70_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    vec![
        Message::Hello(Hello {
            version: VERSION,
            primary: "ny".into(),
            replica: "ldn".into(),
            group: "db".into(),
            epoch: 4,
            fork_epoch: 3,
            fork_seq: 900,
            volumes: vec![("data".into(), 1 << 30), ("log".into(), 1 << 26)],
        }),
        Message::Welcome(Welcome {
            replica: "ldn".into(),
            epoch: 4,
            applied: 10,
            durable: 12,
            state: ReplicaState::Consistent,
            history: true,
            point: true,
        }),
        Message::Record(Record {
            epoch: 4,
            seq: 13,
            volume: 0,
            op: RecordOp::Write,
            fua: true,
            offset: 8192,
            len: text.len() as u64,
            data: Payload::encode(&text, &mut c),
        }),
        Message::Record(Record {
            epoch: 4,
            seq: 14,
            volume: 1,
            op: RecordOp::Flush,
            fua: false,
            offset: 0,
            len: 0,
            data: Payload::empty(),
        }),
        Message::Chunk {
            volume: 0,
            offset: 1 << 20,
            data: Payload::encode(&random, &mut c),
        },
        Message::Chunk {
            volume: 0,
            offset: 2 << 20,
            data: Payload::encode(&[0; 65536], &mut c),
        },
        Message::Ack(Ack {
            received: 14,
            durable: 14,
            applied: 13,
        }),
        Message::Ping(99),
        Message::Pong(99),
    ]
}

#[test]
fn cursor_round_trip_then_closed() {
    let msgs = session();
    let mut wire = Vec::new();
    let mut scratch = Vec::new();
    for m in &msgs {
        write_message(&mut wire, m, &mut scratch).unwrap();
    }
    let mut r = Cursor::new(&wire);
    let mut buf = Vec::new();
    for m in &msgs {
        assert_eq!(&read_message(&mut r, &mut buf).unwrap(), m);
    }
    assert!(matches!(
        read_message(&mut r, &mut buf),
        Err(PeerError::Closed)
    ));

    // Cut anywhere inside the last frame: truncated, not closed.
    let last = wire.len() - (FRAME_HEADER_LEN + 8);
    for cut in [last + 1, last + 15, last + 16, wire.len() - 1] {
        let mut r = Cursor::new(&wire[..cut]);
        for m in &msgs[..msgs.len() - 1] {
            assert_eq!(&read_message(&mut r, &mut buf).unwrap(), m);
        }
        let e = read_message(&mut r, &mut buf).unwrap_err();
        assert!(matches!(e, PeerError::Truncated), "cut {cut}: {e}");
        assert!(!e.is_protocol_error());
    }
}

#[test]
fn write_message_refuses_invalid_without_writing() {
    let mut wire = Vec::new();
    let mut scratch = Vec::new();
    let bad = Message::Refuse {
        reason: "x".repeat(65536),
    };
    assert!(write_message(&mut wire, &bad, &mut scratch).is_err());
    assert!(wire.is_empty());
}

/// A reader that hands out one byte at a time and is interrupted between.
struct Trickle<'a> {
    data: &'a [u8],
    interrupt: bool,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.interrupt = !self.interrupt;
        if self.interrupt {
            return Err(std::io::ErrorKind::Interrupted.into());
        }
        if self.data.is_empty() || buf.is_empty() {
            return Ok(0);
        }
        buf[0] = self.data[0];
        self.data = &self.data[1..];
        Ok(1)
    }
}

#[test]
fn byte_at_a_time_with_interrupts() {
    let msgs = &session()[..4];
    let mut wire = Vec::new();
    for m in msgs {
        encode(m, &mut wire);
    }
    let mut r = Trickle {
        data: &wire,
        interrupt: false,
    };
    let mut buf = Vec::new();
    for m in msgs {
        assert_eq!(&read_message(&mut r, &mut buf).unwrap(), m);
    }
    assert!(matches!(
        read_message(&mut r, &mut buf),
        Err(PeerError::Closed)
    ));
}

#[test]
fn garbage_is_refused_before_the_header_is_whole() {
    // A reader that would block after 3 bytes: the bad magic is seen first.
    struct ThreeThenPanic(usize);
    impl Read for ThreeThenPanic {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            assert!(self.0 < 3, "read past the bad magic");
            buf[0] = b"GET"[self.0];
            self.0 += 1;
            Ok(1)
        }
    }
    let mut buf = Vec::new();
    let e = read_message(&mut ThreeThenPanic(0), &mut buf).unwrap_err();
    assert!(matches!(e, PeerError::BadMagic(_)), "{e}");
}

/// A broken test fails with a timeout instead of hanging.
fn guard(a: &UnixStream, b: &UnixStream) {
    for s in [a, b] {
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
    }
}

#[test]
fn unix_socket_pair() {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    guard(&a, &b);
    let msgs = session();
    let expect = msgs.clone();
    let writer = std::thread::spawn(move || {
        let mut scratch = Vec::new();
        for m in &msgs {
            write_message(&mut a, m, &mut scratch).unwrap();
        }
        // A reply comes back the other way.
        let mut buf = Vec::new();
        let reply = read_message(&mut a, &mut buf).unwrap();
        assert_eq!(reply, Message::Pong(5));
        a.shutdown(std::net::Shutdown::Both).unwrap();
    });
    let mut buf = Vec::new();
    for m in &expect {
        assert_eq!(&read_message(&mut b, &mut buf).unwrap(), m);
    }
    write_message(&mut b, &Message::Pong(5), &mut Vec::new()).unwrap();
    assert!(matches!(
        read_message(&mut b, &mut buf),
        Err(PeerError::Closed)
    ));
    writer.join().unwrap();
}

#[test]
fn unix_socket_truncated_and_garbage() {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    guard(&a, &b);
    let mut f = Vec::new();
    encode(&Message::Ping(1), &mut f);
    a.write_all(&f[..20]).unwrap();
    drop(a);
    let mut buf = Vec::new();
    assert!(matches!(
        read_message(&mut b, &mut buf),
        Err(PeerError::Truncated)
    ));

    let (mut a, mut b) = UnixStream::pair().unwrap();
    guard(&a, &b);
    f[11] = 0xFF; // length 0xFF000008 > limit
    a.write_all(&f).unwrap();
    let e = read_message(&mut b, &mut buf).unwrap_err();
    assert!(matches!(e, PeerError::TooLarge { .. }), "{e}");
    assert!(e.is_protocol_error());
}
