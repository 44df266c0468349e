//! SPEC G8 over the NBD front: malformed input gets a protocol error reply,
//! or a closed connection with a log line naming the peer and the reason,
//! and the agent keeps serving everyone else.
//!
//! Every test drives a real `tandem agent` with a small raw NBD client
//! written here (so it can misbehave on purpose), keeps a second,
//! well-behaved raw client connected throughout, and ends with a fresh
//! `qemu-io` client.
#![allow(clippy::unwrap_used)]
#![allow(clippy::cast_possible_truncation)] // test requests of a few MiB: lengths fit NBD's u32 fields

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use common::*;
use tandem_nbd::proto::*;
use tandem_nbd::transmission::{decode_reply_header, ReplyHeader, RequestHeader};

const MIB: u64 = 1 << 20;
const VOLUME_SIZE: u64 = 64 * MIB;
/// Socket read/write timeout of the raw clients: a hung server fails the
/// test instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Where the well-behaved client keeps its data; several bad requests aim
/// at ranges that cover it.
const GOOD_OFF: u64 = 8 * MIB;
const GOOD_LEN: usize = 128 << 10;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

// ---------------------------------------------------------------------------
// A raw NBD client (fixed newstyle, simple replies).

fn connect(site: &Site) -> UnixStream {
    let s = UnixStream::connect(site.socket("v0"))
        .unwrap_or_else(|e| panic!("connect to {}: {e}", site.socket("v0").display()));
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
    s.set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
    s
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().expect("2 bytes"))
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// Reads the 18-byte newstyle greeting and checks it.
fn read_greeting(s: &mut UnixStream) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("read the server greeting");
    assert_eq!(be_u64(&g[0..]), NBDMAGIC, "greeting magic");
    assert_eq!(be_u64(&g[8..]), IHAVEOPT, "greeting is not newstyle");
    let flags = be_u16(&g[16..]);
    assert!(
        flags & FLAG_FIXED_NEWSTYLE != 0,
        "server does not offer fixed newstyle (flags {flags:#x})"
    );
}

fn send_client_flags(s: &mut UnixStream, flags: u32) {
    s.write_all(&flags.to_be_bytes())
        .expect("send client flags");
}

fn send_option(s: &mut UnixStream, option: u32, data: &[u8]) {
    let mut buf = Vec::with_capacity(16 + data.len());
    buf.extend_from_slice(&IHAVEOPT.to_be_bytes());
    buf.extend_from_slice(&option.to_be_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
    s.write_all(&buf).expect("send option");
}

struct OptReply {
    option: u32,
    kind: u32,
    data: Vec<u8>,
}

fn read_option_reply(s: &mut UnixStream) -> OptReply {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("read option reply header");
    assert_eq!(be_u64(&h), OPTION_REPLY_MAGIC, "option reply magic");
    let len = be_u32(&h[16..]) as usize;
    assert!(len <= 1 << 20, "option reply of {len} bytes");
    let mut data = vec![0u8; len];
    s.read_exact(&mut data).expect("read option reply data");
    OptReply {
        option: be_u32(&h[8..]),
        kind: be_u32(&h[12..]),
        data,
    }
}

/// Data of NBD_OPT_GO for `name` with no information requests.
fn go_data(name: &str) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// A connection in the transmission phase.
struct Nbd {
    s: UnixStream,
    size: u64,
    next_cookie: u64,
}

impl Nbd {
    /// Connects and negotiates "v0" with NBD_OPT_GO.
    fn open(site: &Site) -> Nbd {
        let mut s = connect(site);
        read_greeting(&mut s);
        send_client_flags(&mut s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        Nbd::go(s)
    }

    /// Sends NBD_OPT_GO for "v0" on a stream past the client flags and
    /// reads replies until NBD_REP_ACK.
    fn go(mut s: UnixStream) -> Nbd {
        send_option(&mut s, OPT_GO, &go_data("v0"));
        let mut size = None;
        loop {
            let r = read_option_reply(&mut s);
            assert_eq!(r.option, OPT_GO, "reply to another option");
            match r.kind {
                REP_ACK => break,
                REP_INFO => {
                    if be_u16(&r.data) == INFO_EXPORT {
                        size = Some(be_u64(&r.data[2..]));
                    }
                }
                other => panic!(
                    "NBD_OPT_GO failed: reply type {other:#x}: {}",
                    String::from_utf8_lossy(&r.data)
                ),
            }
        }
        let size = size.expect("NBD_OPT_GO sent no NBD_INFO_EXPORT");
        assert_eq!(size, VOLUME_SIZE, "export size");
        Nbd {
            s,
            size,
            next_cookie: 1,
        }
    }

    fn header(&mut self, kind: u16, flags: u16, offset: u64, length: u32) -> (u64, Vec<u8>) {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut buf = Vec::with_capacity(REQUEST_LEN);
        RequestHeader {
            flags,
            kind,
            cookie,
            offset,
            length,
        }
        .encode(&mut buf);
        (cookie, buf)
    }

    /// Sends one request (header and payload) and returns its cookie.
    fn send(&mut self, kind: u16, flags: u16, offset: u64, length: u32, payload: &[u8]) -> u64 {
        let (cookie, mut buf) = self.header(kind, flags, offset, length);
        buf.extend_from_slice(payload);
        self.s.write_all(&buf).expect("send request");
        cookie
    }

    /// Reads one simple reply for `cookie`; returns its error value.
    fn reply(&mut self, cookie: u64) -> u32 {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        self.s
            .read_exact(&mut h)
            .unwrap_or_else(|e| panic!("no reply to request {cookie}: {e}"));
        match decode_reply_header(&h) {
            Ok(Some((ReplyHeader::Simple { error, cookie: c }, _))) => {
                assert_eq!(c, cookie, "reply for another request");
                error
            }
            other => panic!("expected a simple reply, got {other:?} ({h:02x?})"),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        let cookie = self.send(CMD_WRITE, 0, offset, data.len() as u32, data);
        self.reply(cookie)
    }

    fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let cookie = self.send(CMD_READ, 0, offset, len, &[]);
        match self.reply(cookie) {
            0 => {
                let mut data = vec![0u8; len as usize];
                self.s.read_exact(&mut data).expect("read reply data");
                Ok(data)
            }
            error => Err(error),
        }
    }

    fn flush(&mut self) -> u32 {
        let cookie = self.send(CMD_FLUSH, 0, 0, 0, &[]);
        self.reply(cookie)
    }

    /// A valid write then read on this connection, verified.
    fn write_read_ok(&mut self, offset: u64, seed: u64, len: usize) {
        let data = pattern(seed, len);
        assert_eq!(self.write(offset, &data), 0, "valid write at {offset}");
        let back = self.read(offset, len as u32).expect("valid read");
        assert!(
            back == data,
            "read at {offset} does not return what was written"
        );
    }
}

/// Waits (bounded) until the server closes `s`: end of stream or reset.
/// Bytes the server sent first are returned.
fn expect_closed(s: &mut UnixStream, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                assert!(got.len() < 1 << 20, "{what}: server keeps sending data");
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return got,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("{what}: the server did not close the connection: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------
// The well-behaved client, the final check and the log.

/// A second client that stays connected while another misbehaves.
struct Good {
    nbd: Nbd,
    data: Vec<u8>,
    round: u64,
}

impl Good {
    fn new(site: &Site) -> Good {
        let mut nbd = Nbd::open(site);
        let data = pattern(1000, GOOD_LEN);
        assert_eq!(nbd.write(GOOD_OFF, &data), 0, "good client: write");
        assert_eq!(nbd.flush(), 0, "good client: flush");
        let back = nbd
            .read(GOOD_OFF, GOOD_LEN as u32)
            .expect("good client: read");
        assert!(back == data, "good client: data read back differs");
        Good {
            nbd,
            data,
            round: 0,
        }
    }

    /// Its data is unchanged, and it can still write and read.
    fn check(&mut self) {
        let back = self
            .nbd
            .read(GOOD_OFF, GOOD_LEN as u32)
            .expect("good client: read after the bad input");
        assert!(
            back == self.data,
            "good client: its data changed under it (bad input reached the image)"
        );
        self.round += 1;
        let data = pattern(1000 + self.round, GOOD_LEN);
        assert_eq!(
            self.nbd.write(GOOD_OFF, &data),
            0,
            "good client: write again"
        );
        assert_eq!(self.nbd.flush(), 0, "good client: flush again");
        let back = self
            .nbd
            .read(GOOD_OFF, GOOD_LEN as u32)
            .expect("good client: read again");
        assert!(back == data, "good client: new data read back differs");
        self.data = data;
    }
}

/// The agent still runs, the long-lived client still works, and a fresh
/// qemu-io client can write and read.
fn finish(site: &mut Site, good: &mut Good) {
    assert!(site.is_running(), "agent died:\n{}", site.log());
    good.check();
    let out = run_with_timeout(
        Command::new(tool("qemu-io"))
            .args(["-f", "raw"])
            .args(["-c", "write -P 0x5a 0 64k", "-c", "read -P 0x5a 0 64k"])
            .arg(site.uri("v0")),
        Duration::from_secs(60),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("fail") && text.contains("read 65536/65536"),
        "fresh qemu-io client failed ({}): {text}",
        out.status
    );
    assert!(site.is_running(), "agent died:\n{}", site.log());
}

/// The agent's log without terminal colour codes.
fn plain_log(site: &Site) -> String {
    let raw = site.log();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A log line containing every one of `all` and at least one of `any`
/// (case-insensitive; the line is matched with a blank appended).
fn log_line(site: &Site, all: &[&str], any: &[&str]) -> Option<String> {
    plain_log(site)
        .lines()
        .find(|line| {
            // A trailing blank lets a needle "peer=X " match a last field.
            let l = format!("{} ", line.to_lowercase());
            all.iter().all(|n| l.contains(&n.to_lowercase()))
                && (any.is_empty() || any.iter().any(|n| l.contains(&n.to_lowercase())))
        })
        .map(str::to_owned)
}

fn wait_log_line(site: &Site, all: &[&str], any: &[&str], what: &str) -> String {
    poll(Duration::from_secs(10), || log_line(site, all, any)).unwrap_or_else(|| {
        panic!(
            "no log line for {what} within 10 s: wanted all of {all:?} and one of {any:?}; log:\n{}",
            plain_log(site)
        )
    })
}

fn attached_lines(site: &Site) -> Vec<String> {
    plain_log(site)
        .lines()
        .filter(|l| l.contains("NBD client attached"))
        .map(str::to_owned)
        .collect()
}

/// Opens a connection and returns it with the peer name the agent logged
/// for it (`peer=...` of its "attached" line).
fn open_named(site: &Site) -> (Nbd, String) {
    let before = attached_lines(site).len();
    let nbd = Nbd::open(site);
    wait_until(
        Duration::from_secs(10),
        "the agent to log the attach",
        || attached_lines(site).len() > before,
    );
    let lines = attached_lines(site);
    assert_eq!(lines.len(), before + 1, "one attach expected");
    let line = &lines[before];
    let peer = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("peer="))
        .unwrap_or_else(|| panic!("attach line names no peer: {line}"))
        .to_owned();
    (nbd, peer)
}

fn started() -> (Site, Good) {
    let mut site = Site::new(&[vol("v0", "64MiB")]);
    site.start();
    let good = Good::new(&site);
    (site, good)
}

fn socket_name(site: &Site) -> String {
    site.socket("v0").display().to_string()
}

// ---------------------------------------------------------------------------
// Handshake.

#[test]
fn bad_option_magic_closes_the_connection_with_a_log_line() {
    let (mut site, mut good) = started();
    let mut s = connect(&site);
    read_greeting(&mut s);
    send_client_flags(&mut s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    s.write_all(b"GARBAGE!GARBAGE!").expect("send garbage");
    let sent = expect_closed(&mut s, "garbage instead of an option header");
    assert!(sent.is_empty(), "server answered garbage with {sent:02x?}");
    let line = wait_log_line(
        &site,
        &["magic", &socket_name(&site)],
        &[],
        "bad handshake magic",
    );
    eprintln!("log: {line}");
    finish(&mut site, &mut good);
}

#[test]
fn client_without_fixed_newstyle_or_with_oversize_option_is_closed() {
    let (mut site, mut good) = started();
    let peer = socket_name(&site);

    let mut s = connect(&site);
    read_greeting(&mut s);
    send_client_flags(&mut s, 0);
    expect_closed(&mut s, "client without the fixed-newstyle flag");
    wait_log_line(
        &site,
        &[&peer, "newstyle"],
        &[],
        "client without fixed newstyle",
    );

    // An option announcing 4 GiB of data: refused without reading (or
    // allocating) it.
    let mut s = connect(&site);
    read_greeting(&mut s);
    send_client_flags(&mut s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    let mut h = Vec::new();
    h.extend_from_slice(&IHAVEOPT.to_be_bytes());
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&h).expect("send option header");
    expect_closed(&mut s, "option of 4 GiB");
    wait_log_line(
        &site,
        &[&peer, &u32::MAX.to_string()],
        &["limit", "too large", "too big"],
        "oversize option",
    );
    finish(&mut site, &mut good);
}

#[test]
fn unknown_option_gets_unsup_and_the_connection_can_still_go() {
    let (mut site, mut good) = started();
    let mut s = connect(&site);
    read_greeting(&mut s);
    send_client_flags(&mut s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    send_option(&mut s, 0x1234, b"some option data");
    let r = read_option_reply(&mut s);
    assert_eq!(r.option, 0x1234, "reply names the option");
    assert_eq!(
        r.kind,
        REP_ERR_UNSUP,
        "unknown option: expected NBD_REP_ERR_UNSUP, got {:#x} ({})",
        r.kind,
        String::from_utf8_lossy(&r.data)
    );
    let mut nbd = Nbd::go(s);
    nbd.write_read_ok(16 * MIB, 7, 64 << 10);
    finish(&mut site, &mut good);
}

#[test]
fn many_connections_abandoned_mid_handshake_do_not_block_new_clients() {
    let (mut site, mut good) = started();
    let pid = site.pid();
    let count = |what: &str| {
        std::fs::read_dir(format!("/proc/{pid}/{what}"))
            .expect("read /proc")
            .count()
    };
    let (threads0, fds0) = (count("task"), count("fd"));

    let mut held = Vec::new();
    for i in 0..50 {
        let mut s = connect(&site);
        match i % 3 {
            0 => {}
            1 => {
                read_greeting(&mut s);
                send_client_flags(&mut s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
            }
            _ => {
                read_greeting(&mut s);
                send_client_flags(&mut s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
                s.write_all(&IHAVEOPT.to_be_bytes())
                    .expect("half an option");
            }
        }
        held.push(s);
    }
    // While all 50 hang in the handshake, a new client works.
    let mut nbd = Nbd::open(&site);
    nbd.write_read_ok(20 * MIB, 9, 256 << 10);
    drop(nbd);
    good.check();

    // Abandoned: every resource they held is given back.
    drop(held);
    wait_until(
        Duration::from_secs(20),
        "agent threads and descriptors back to what they were",
        || count("task") <= threads0 && count("fd") <= fds0,
    );
    finish(&mut site, &mut good);
}

#[test]
fn silent_client_is_closed_after_the_handshake_timeout() {
    let (mut site, mut good) = started();
    let mut s = connect(&site);
    s.set_read_timeout(Some(Duration::from_secs(45)))
        .expect("read timeout");
    read_greeting(&mut s);
    // Sends nothing more: NBD.md promises the handshake ends within 30 s.
    let t = std::time::Instant::now();
    expect_closed(&mut s, "silent client in the handshake");
    assert!(
        t.elapsed() < Duration::from_secs(40),
        "closed after {:?}",
        t.elapsed()
    );
    let line = wait_log_line(
        &site,
        &[&socket_name(&site)],
        &["timed out", "timeout", "time out"],
        "handshake timeout",
    );
    eprintln!("log: {line}");
    finish(&mut site, &mut good);
}

// ---------------------------------------------------------------------------
// Transmission.

#[test]
fn truncated_request_header_and_payload_close_only_that_connection() {
    let (mut site, mut good) = started();

    let (mut bad, peer) = open_named(&site);
    let (_, header) = bad.header(CMD_WRITE, 0, 0, 4096);
    bad.s.write_all(&header[..10]).expect("send 10 bytes");
    drop(bad);
    let line = wait_log_line(
        &site,
        &[&format!("peer={peer} "), "header"],
        &["truncat", "mid-message", "closed"],
        "truncated request header",
    );
    eprintln!("log: {line}");
    good.check();

    let (mut bad, peer) = open_named(&site);
    let (_, mut buf) = bad.header(CMD_WRITE, 0, GOOD_OFF, 64 << 10);
    buf.extend_from_slice(&pattern(5, 1000));
    bad.s.write_all(&buf).expect("send header and 1000 bytes");
    drop(bad);
    let line = wait_log_line(
        &site,
        &[&format!("peer={peer} "), "payload"],
        &["truncat", "mid-message", "closed"],
        "truncated write payload",
    );
    eprintln!("log: {line}");
    finish(&mut site, &mut good);
}

#[test]
fn oversize_read_and_write_get_einval_and_the_connection_continues() {
    let (mut site, mut good) = started();
    let mut nbd = Nbd::open(&site);
    let len = 33 * MIB as u32;

    let cookie = nbd.send(CMD_READ, 0, 0, len, &[]);
    assert_eq!(nbd.reply(cookie), EINVAL, "READ of 33 MiB");
    let back = nbd
        .read(GOOD_OFF, GOOD_LEN as u32)
        .expect("valid read after");
    assert!(back == good.data, "valid read after the refused one");

    // The refused write's payload is read and discarded.
    let cookie = nbd.send(CMD_WRITE, 0, 0, len, &pattern(6, len as usize));
    assert_eq!(nbd.reply(cookie), EINVAL, "WRITE of 33 MiB");
    nbd.write_read_ok(40 * MIB, 11, 64 << 10);
    good.check();
    finish(&mut site, &mut good);
}

#[test]
fn out_of_range_read_and_write_are_refused_and_the_connection_continues() {
    let (mut site, mut good) = started();
    let mut nbd = Nbd::open(&site);
    let size = nbd.size;

    for (offset, len) in [(size - 4096, 8192), (size, 512), (u64::MAX - 100, 4096)] {
        let cookie = nbd.send(CMD_READ, 0, offset, len, &[]);
        assert_eq!(nbd.reply(cookie), EINVAL, "READ {offset}+{len}");
    }
    for (offset, len) in [(size - 4096, 8192u32), (size, 512), (u64::MAX - 100, 4096)] {
        let cookie = nbd.send(CMD_WRITE, 0, offset, len, &pattern(offset, len as usize));
        assert_eq!(nbd.reply(cookie), ENOSPC, "WRITE {offset}+{len}");
    }
    // Nothing of the refused write reached the image.
    let tail = nbd.read(size - 4096, 4096).expect("read the last 4 KiB");
    assert!(
        tail.iter().all(|&b| b == 0),
        "part of an out-of-range write was applied"
    );
    nbd.write_read_ok(size - 4096, 12, 4096);
    finish(&mut site, &mut good);
}

#[test]
fn bad_request_magic_closes_the_connection_with_a_log_line() {
    let (mut site, mut good) = started();
    let (mut bad, peer) = open_named(&site);
    bad.write_read_ok(30 * MIB, 13, 4096);
    let (_, mut buf) = bad.header(CMD_READ, 0, 0, 4096);
    buf[..4].copy_from_slice(&0xdead_beef_u32.to_be_bytes());
    bad.s.write_all(&buf).expect("send bad header");
    let sent = expect_closed(&mut bad.s, "bad request magic");
    assert!(
        sent.is_empty(),
        "server answered a bad magic with {sent:02x?}"
    );
    let line = wait_log_line(
        &site,
        &[&format!("peer={peer} "), "magic"],
        &[],
        "bad request magic",
    );
    eprintln!("log: {line}");
    finish(&mut site, &mut good);
}

#[test]
fn client_vanishing_mid_write_leaves_the_image_unchanged() {
    let (mut site, mut good) = started();
    let (mut bad, peer) = open_named(&site);
    // 1 MiB from 256 KiB before the good client's data: the half that is
    // sent covers the first 256 KiB of it.
    let offset = GOOD_OFF - (256 << 10);
    let (_, mut buf) = bad.header(CMD_WRITE, 0, offset, MIB as u32);
    buf.extend_from_slice(&pattern(77, (MIB / 2) as usize));
    bad.s.write_all(&buf).expect("send half a write");
    drop(bad);
    let line = wait_log_line(
        &site,
        &[&format!("peer={peer} "), "payload"],
        &["truncat", "mid-message", "closed"],
        "client gone mid-write",
    );
    eprintln!("log: {line}");
    // Also on disk, not only through the agent.
    let image = std::fs::read(site.image("v0")).expect("read image");
    let at = GOOD_OFF as usize;
    assert!(
        image[at..at + GOOD_LEN] == good.data[..],
        "the image holds part of a write whose payload never fully arrived"
    );
    assert!(
        image[offset as usize..at].iter().all(|&b| b == 0),
        "the image holds part of a write whose payload never fully arrived"
    );
    finish(&mut site, &mut good);
}

#[test]
fn unknown_command_or_flag_gets_einval_and_the_connection_continues() {
    let (mut site, mut good) = started();
    let mut nbd = Nbd::open(&site);
    let cookie = nbd.send(77, 0, 0, 4096, &[]);
    assert_eq!(nbd.reply(cookie), EINVAL, "command 77");
    nbd.write_read_ok(50 * MIB, 14, 8192);
    let cookie = nbd.send(CMD_READ, 1 << 15, 0, 4096, &[]);
    assert_eq!(nbd.reply(cookie), EINVAL, "READ with an unknown flag");
    nbd.write_read_ok(50 * MIB, 15, 8192);
    finish(&mut site, &mut good);
}

// ---------------------------------------------------------------------------
// The REST API on `site.api` (SPEC G8, §4.5).

/// `GET /api/v1/status` answers 200 with the site's status.
fn api_status_ok(site: &Site) {
    let head = format!(
        "GET /api/v1/status HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        api_token(site)
    );
    let (status, text) = api_raw(site, &head, b"");
    assert_eq!(status, 200, "status after bad API requests: {text}");
    assert!(text.contains("\"site\": \"ny\""), "{text}");
}

#[test]
fn metrics_need_the_api_token_by_default() {
    let (mut site, mut good) = started();
    let token = api_token(&site); // also waits for the API to listen
    let get = |auth: &str| {
        let head = format!("GET /metrics HTTP/1.1\r\nHost: t\r\n{auth}Connection: close\r\n\r\n");
        api_raw(&site, &head, b"")
    };
    let (status, text) = get("");
    assert_eq!(status, 401, "/metrics without the token: {text}");
    assert!(
        !text.contains("tandem_"),
        "metrics leaked without the token: {text}"
    );
    let (status, text) = get("Authorization: Bearer wrong\r\n");
    assert_eq!(status, 401, "/metrics with a wrong token: {text}");
    let (status, text) = get(&format!("Authorization: Bearer {token}\r\n"));
    assert_eq!(status, 200, "/metrics with the token: {text}");
    assert!(text.contains("tandem_"), "{text}");
    finish(&mut site, &mut good);
}

#[test]
fn idle_connections_do_not_lock_the_api_out() {
    let (mut site, mut good) = started();
    api_token(&site);
    // 100 connections that never send a byte (no token either).
    let idle: Vec<std::net::TcpStream> = (0..100)
        .map(|_| std::net::TcpStream::connect(api_addr(&site)).expect("connect"))
        .collect();
    let t = std::time::Instant::now();
    api_status_ok(&site);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "status took {:?} behind 100 idle connections",
        t.elapsed()
    );
    drop(idle);
    finish(&mut site, &mut good);
}

#[test]
fn api_requests_with_huge_or_oversize_bodies_get_4xx_and_the_agent_keeps_serving() {
    let (mut site, mut good) = started();
    let token = api_token(&site);

    // A connection that sent half a request and stalls holds nobody up.
    let mut stalled = std::net::TcpStream::connect(api_addr(&site)).expect("connect");
    stalled
        .write_all(b"PUT /api/v1/peers/dr/bandwidth HTTP/1.1\r\nContent-Length: 30\r\n\r\n{")
        .expect("half a request");

    // Claimed lengths far beyond memory, with no body sent: with or
    // without the token, on routes that read a body and on one that
    // does not.
    let huge = 100_000_000_000_000u64;
    for (method, path, auth) in [
        ("POST", "/api/v1/groups/g/failover", true),
        ("PUT", "/api/v1/peers/dr/bandwidth", true),
        ("GET", "/api/v1/status", true),
        ("GET", "/metrics", false),
        ("POST", "/api/v1/groups/g/verify", false),
    ] {
        let auth = if auth {
            format!("Authorization: Bearer {token}\r\n")
        } else {
            String::new()
        };
        let head =
            format!("{method} {path} HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: {huge}\r\n\r\n");
        let (status, text) = api_raw(&site, &head, b"");
        assert_eq!(status, 413, "{method} {path} claiming {huge} bytes: {text}");
        assert!(text.contains("limit"), "{text}");
        assert!(site.is_running(), "agent died:\n{}", site.log());
        api_status_ok(&site);
    }
    let line = wait_log_line(
        &site,
        &["API", &huge.to_string(), "peer="],
        &["limit"],
        "a refused API request",
    );
    eprintln!("log: {line}");

    // A 2 MiB body that is really sent.
    let body = pattern(3, 2 << 20);
    let head = format!(
        "PUT /api/v1/peers/dr/bandwidth HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (status, text) = api_raw(&site, &head, &body);
    assert_eq!(status, 413, "2 MiB body: {text}");

    // Malformed framing gets a 4xx as well.
    for head in [
        "HELLO\r\n\r\n".to_owned(),
        "POST /api/v1/groups/g/failover HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_owned(),
        "GET /api/v1/status HTTP/1.1\r\nContent-Length: -5\r\n\r\n".to_owned(),
        format!("GET /{} HTTP/1.1\r\n\r\n", "x".repeat(20_000)),
    ] {
        let (status, text) = api_raw(&site, &head, b"");
        assert!(
            (400..500).contains(&status),
            "{:?}: {text}",
            &head[..head.len().min(60)]
        );
    }

    // Still serving: the API (raw, and through `tandem status` with its
    // `Connection: close`) and NBD.
    api_status_ok(&site);
    let status = status_json(&site.config).expect("tandem status --json answers");
    assert_eq!(status["site"], "ny", "{status}");
    drop(stalled);
    finish(&mut site, &mut good);
}
