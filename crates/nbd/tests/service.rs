//! The server over real Unix sockets: a client that reads none of its
//! replies is disconnected after the reply timeout and every byte it held
//! of the agent-wide budget comes back; so do the bytes of a client that
//! vanishes mid-request.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_nbd::fuzzing::{MemCatalog, MemExport};
use tandem_nbd::proto::*;
use tandem_nbd::transmission::RequestHeader;
use tandem_nbd::Server;

fn attach(path: &std::path::Path) -> UnixStream {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    let mut opt = IHAVEOPT.to_be_bytes().to_vec();
    opt.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    opt.extend_from_slice(&4u32.to_be_bytes());
    opt.extend_from_slice(b"disk");
    s.write_all(&opt).unwrap();
    let mut info = [0u8; 10];
    s.read_exact(&mut info).unwrap();
    s
}

fn request(kind: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut out = Vec::new();
    RequestHeader {
        flags: 0,
        kind,
        cookie,
        offset,
        length,
    }
    .encode(&mut out);
    out
}

/// Waits (bounded) until `cond` holds.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_client_that_reads_no_replies_is_dropped_and_its_budget_returns() {
    let server = Server::with_limits(64 << 20, Duration::from_secs(1)).unwrap();
    let scope = server.scope();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.sock");
    let export = Arc::new(MemExport::new("disk", 64 << 20));
    scope
        .serve_unix(
            UnixListener::bind(&path).unwrap(),
            Arc::new(MemCatalog(export)),
        )
        .unwrap();

    // Pipelines 1 MiB reads and never reads a reply.
    let mut greedy = attach(&path);
    greedy
        .set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut sent = 0u64;
    let started = Instant::now();
    loop {
        let req = request(CMD_READ, sent, (sent % 64) << 20, 1 << 20);
        match greedy.write_all(&req) {
            Ok(()) => sent += 1,
            Err(_) => break, // the server stopped reading us
        }
        assert!(started.elapsed() < Duration::from_secs(20), "never stopped");
    }
    // Its replies held part of the budget, at most the connection's share.
    assert!(server.memory_in_use() > 0);
    assert!(server.memory_in_use() <= tandem_nbd::budget::CONNECTION_BUDGET + (2 << 20));

    // Meanwhile another client is served at once.
    let mut polite = attach(&path);
    polite.write_all(&request(CMD_FLUSH, 1, 0, 0)).unwrap();
    let mut reply = [0u8; 16];
    polite.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[4..8], &[0; 4]);

    // After the reply timeout the greedy client is dropped: reading now
    // drains what was sent and ends in EOF (or a reset).
    wait_until("the greedy client's budget to come back", || {
        server.memory_in_use() == 0
    });
    greedy
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut sink = vec![0u8; 1 << 20];
    loop {
        match greedy.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    assert_eq!(scope.shutdown(Duration::from_secs(5)), 0);
    server.stop();
}

#[test]
fn a_client_vanishing_mid_write_gives_its_budget_back() {
    let server = Server::new().unwrap();
    let scope = server.scope();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.sock");
    let export = Arc::new(MemExport::new("disk", 64 << 20));
    scope
        .serve_unix(
            UnixListener::bind(&path).unwrap(),
            Arc::new(MemCatalog(Arc::clone(&export))),
        )
        .unwrap();
    let mut s = attach(&path);
    // A 32 MiB write of which only 1 MiB arrives.
    s.write_all(&request(CMD_WRITE, 1, 0, 32 << 20)).unwrap();
    s.write_all(&vec![0xAB; 1 << 20]).unwrap();
    wait_until("the write to be admitted", || server.memory_in_use() > 0);
    drop(s);
    wait_until("the budget to come back", || server.memory_in_use() == 0);
    assert!(
        export.contents()[..1 << 20].iter().all(|b| *b == 0),
        "nothing applied"
    );
    assert_eq!(scope.shutdown(Duration::from_secs(5)), 0);
    server.stop();
}
