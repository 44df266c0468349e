//! Crash-prefix checker (SPEC G3, G4, G7): a raw NBD client writes
//! stamped 4 KiB blocks one at a time (QD1, so acknowledgement order is
//! capture order is write order) while agents are killed at random write
//! counts; after every crash and clean stop the replica's image must be
//! exactly the state after some prefix 1..=P of the writes issued, in sync
//! mode one that holds every acknowledged write, and once restarted the
//! sites must converge byte for byte. A replica killed in the middle of a
//! resync must say `inconsistent` until a resync completes.
//!
//! Each block written holds a stamp: bytes 0..8 the write's index i
//! (u64 LE), 8..16 the block's byte offset (u64 LE), the rest a pattern
//! derived from i. Seeds are fixed; kill points are printed.
#![allow(clippy::unwrap_used)]
#![allow(clippy::cast_possible_truncation)] // a small test volume: block numbers, counts and lengths are tiny

mod common;

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;
use tandem_nbd::proto::*;
use tandem_nbd::transmission::{decode_reply_header, ReplyHeader, RequestHeader};
use tandem_testkit::poll_every;

const BLOCK: usize = 4096;
const VOLUME: &str = "v0";
const VOLUME_SIZE: &str = "16MiB";
const VOLUME_BYTES: u64 = 16 << 20;
const VOLUME_BLOCKS: u64 = VOLUME_BYTES / BLOCK as u64;
/// Socket timeout of the raw client: a hung primary fails the test
/// instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on waiting for the writer to reach a kill point.
const WRITE_WAIT: Duration = Duration::from_secs(60);
const CONVERGE: Duration = Duration::from_secs(90);
const ROUNDS: u32 = 3;
/// A FLUSH after every this many writes (async tests).
const FLUSH_EVERY: u64 = 32;
/// Writes a writer may go on with past a kill point (well under the
/// 64 MiB default memory queue, so a replica outage costs no resync).
const RUN_ON: u64 = 2000;

// ---------------------------------------------------------------------------
// Deterministic randomness.

/// xorshift64*: the kill points of a test.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Heads or tails.
    fn coin(&mut self) -> bool {
        self.next() >> 63 == 1
    }

    /// Uniform in `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

/// Block written by write `i` of the workload `seed` (stateless, so a
/// writer restarted after a crash continues the same sequence).
fn block_of(seed: u64, i: u64) -> u64 {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) % VOLUME_BLOCKS
}

/// The content of write `i` to `block`.
fn stamp(i: u64, block: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[0..8].copy_from_slice(&i.to_le_bytes());
    b[8..16].copy_from_slice(&(block * BLOCK as u64).to_le_bytes());
    let mut x = i.wrapping_mul(0xD6E8_FEB8_6659_FD93) | 1;
    for word in b[16..].chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes());
    }
    b
}

// ---------------------------------------------------------------------------
// A raw NBD client (fixed newstyle, NBD_OPT_GO, simple replies), copied
// from bad_input.rs and made to report a lost connection instead of
// panicking: losing the primary is what these tests do.

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().expect("2 bytes"))
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

struct Nbd {
    s: UnixStream,
    next_cookie: u64,
}

impl Nbd {
    /// Connects to `socket` and negotiates `VOLUME` with NBD_OPT_GO.
    fn open(socket: &Path) -> Nbd {
        let mut s = UnixStream::connect(socket)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()));
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
        s.set_write_timeout(Some(IO_TIMEOUT))
            .expect("write timeout");
        let mut g = [0u8; 18];
        s.read_exact(&mut g).expect("read the server greeting");
        assert_eq!(be_u64(&g[0..]), NBDMAGIC, "greeting magic");
        assert_eq!(be_u64(&g[8..]), IHAVEOPT, "greeting is not newstyle");
        assert!(
            be_u16(&g[16..]) & FLAG_FIXED_NEWSTYLE != 0,
            "server does not offer fixed newstyle"
        );
        s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .expect("send client flags");
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&((4 + VOLUME.len() + 2) as u32).to_be_bytes());
        opt.extend_from_slice(&(VOLUME.len() as u32).to_be_bytes());
        opt.extend_from_slice(VOLUME.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt).expect("send NBD_OPT_GO");
        let mut size = None;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).expect("read option reply header");
            assert_eq!(be_u64(&h), OPTION_REPLY_MAGIC, "option reply magic");
            assert_eq!(be_u32(&h[8..]), OPT_GO, "reply to another option");
            let len = be_u32(&h[16..]) as usize;
            assert!(len <= 1 << 20, "option reply of {len} bytes");
            let mut data = vec![0u8; len];
            s.read_exact(&mut data).expect("read option reply data");
            match be_u32(&h[12..]) {
                REP_ACK => break,
                REP_INFO => {
                    if be_u16(&data) == INFO_EXPORT {
                        size = Some(be_u64(&data[2..]));
                    }
                }
                other => panic!(
                    "NBD_OPT_GO failed: reply type {other:#x}: {}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
        assert_eq!(size, Some(VOLUME_BYTES), "export size");
        Nbd { s, next_cookie: 1 }
    }

    /// Sends one request and reads its simple reply: the NBD error value
    /// (0 = success), or the I/O error that ended the connection.
    fn request(&mut self, kind: u16, offset: u64, payload: &[u8]) -> io::Result<u32> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut buf = Vec::with_capacity(REQUEST_LEN + payload.len());
        RequestHeader {
            flags: 0,
            kind,
            cookie,
            offset,
            length: payload.len() as u32,
        }
        .encode(&mut buf);
        buf.extend_from_slice(payload);
        self.s.write_all(&buf)?;
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        self.s.read_exact(&mut h)?;
        match decode_reply_header(&h) {
            Ok(Some((ReplyHeader::Simple { error, cookie: c }, _))) if c == cookie => Ok(error),
            other => Err(io::Error::other(format!(
                "bad reply to request {cookie}: {other:?} ({h:02x?})"
            ))),
        }
    }

    fn disconnect(mut self) {
        let mut buf = Vec::new();
        RequestHeader {
            flags: 0,
            kind: CMD_DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        }
        .encode(&mut buf);
        let _ = self.s.write_all(&buf);
    }
}

// ---------------------------------------------------------------------------
// The writer: QD1 stamped writes on one connection, in a thread, so that
// the test can kill agents while a write is in flight. It writes only as
// far as the test allows, so kill points are write counts.

/// Everything the writer issued, across rounds and reconnects.
#[derive(Clone, Debug, Default)]
struct History {
    /// `blocks[i - 1]` is the block written by write i (the last one may
    /// be in flight or lost with the primary).
    blocks: Vec<u64>,
    /// Writes 1..=acked were acknowledged to the client.
    acked: u64,
    /// Writes 1..=flushed were followed by an acknowledged FLUSH.
    flushed: u64,
}

#[derive(Debug)]
enum End {
    /// Stopped by the test.
    Stopped,
    /// The connection failed (the primary died) or a request failed.
    Lost(String),
}

/// What the writer thread and the test share, under one lock with one
/// condition variable: the test waits for acknowledgements and the writer
/// for permission, neither by polling.
struct Shared {
    progress: Mutex<Progress>,
    changed: Condvar,
}

#[derive(Default)]
struct Progress {
    /// Writes 1..=acked were acknowledged.
    acked: u64,
    /// The writer issues writes up to this index, then waits for more.
    limit: u64,
    /// The test asks the writer to stop.
    stop: bool,
    /// The writer thread ended (stopped, lost its primary, or panicked).
    ended: bool,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.progress.lock().unwrap());
        self.changed.notify_all();
    }
}

/// Marks the writer ended however its thread ends.
struct Ended(Arc<Shared>);

impl Drop for Ended {
    fn drop(&mut self) {
        // Not `update`: the lock may be poisoned by a panic being unwound.
        let mut p = self
            .0
            .progress
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        p.ended = true;
        drop(p);
        self.0.changed.notify_all();
    }
}

struct Writer {
    history: Arc<Mutex<History>>,
    shared: Arc<Shared>,
    handle: JoinHandle<End>,
}

impl Writer {
    /// Connects to the primary's export; the thread writes as far as
    /// [`Writer::allow`] lets it (nothing at first) until stopped or the
    /// connection fails. Write indices continue `history`.
    fn start(socket: &Path, history: &Arc<Mutex<History>>, seed: u64, flush_every: u64) -> Writer {
        let mut nbd = Nbd::open(socket);
        let acked = history.lock().unwrap().acked;
        let shared = Arc::new(Shared {
            progress: Mutex::new(Progress {
                acked,
                limit: acked,
                ..Progress::default()
            }),
            changed: Condvar::new(),
        });
        let handle = {
            let (history, shared) = (Arc::clone(history), Arc::clone(&shared));
            std::thread::spawn(move || {
                let _ended = Ended(Arc::clone(&shared));
                loop {
                    // Idle until the test allows more or asks to stop.
                    let progress = shared.progress.lock().unwrap();
                    let progress = shared
                        .changed
                        .wait_while(progress, |p| !p.stop && p.acked >= p.limit)
                        .unwrap();
                    if progress.stop {
                        drop(progress);
                        nbd.disconnect();
                        return End::Stopped;
                    }
                    drop(progress);
                    let (i, block) = {
                        let mut h = history.lock().unwrap();
                        let i = h.blocks.len() as u64 + 1;
                        let block = block_of(seed, i);
                        h.blocks.push(block);
                        (i, block)
                    };
                    match nbd.request(CMD_WRITE, block * BLOCK as u64, &stamp(i, block)) {
                        Ok(0) => {
                            history.lock().unwrap().acked = i;
                            shared.update(|p| p.acked = i);
                        }
                        Ok(e) => return End::Lost(format!("write {i} failed: NBD error {e}")),
                        Err(e) => return End::Lost(format!("write {i}: {e}")),
                    }
                    if flush_every > 0 && i % flush_every == 0 {
                        match nbd.request(CMD_FLUSH, 0, &[]) {
                            Ok(0) => history.lock().unwrap().flushed = i,
                            Ok(e) => {
                                return End::Lost(format!("flush after {i} failed: NBD error {e}"))
                            }
                            Err(e) => return End::Lost(format!("flush after {i}: {e}")),
                        }
                    }
                }
            })
        };
        Writer {
            history: Arc::clone(history),
            shared,
            handle,
        }
    }

    fn acked(&self) -> u64 {
        self.shared.progress.lock().unwrap().acked
    }

    /// Lets the writer go on until `more` writes past those acknowledged
    /// now; returns that write index.
    fn allow(&self, more: u64) -> u64 {
        let mut limit = 0;
        self.shared.update(|p| {
            p.limit = p.acked + more;
            limit = p.limit;
        });
        limit
    }

    /// Makes `count` more writes and waits until they are acknowledged;
    /// the writer is then idle, nothing in flight.
    fn write(&self, count: u64) {
        let n = self.allow(count);
        self.wait_acked(n);
    }

    /// A kill point: lets the writer run well past `count` more writes
    /// and returns as soon as `count` are acknowledged, so the writer is
    /// busy (a write in flight or about to be).
    fn run_past(&self, count: u64) {
        let at = self.acked() + count;
        self.allow(count + RUN_ON);
        self.wait_acked(at);
    }

    /// Waits (bounded) until write `n` is acknowledged.
    fn wait_acked(&self, n: u64) {
        let progress = self.shared.progress.lock().unwrap();
        let (progress, _) = self
            .shared
            .changed
            .wait_timeout_while(progress, WRITE_WAIT, |p| p.acked < n && !p.ended)
            .unwrap();
        assert!(
            progress.acked >= n || !progress.ended,
            "the writer stopped at {} acknowledged writes, before {n}",
            progress.acked,
        );
        assert!(
            progress.acked >= n,
            "only {} of {n} writes acknowledged after {WRITE_WAIT:?}",
            progress.acked
        );
    }

    /// After a kill of its primary: waits (bounded) for the writer to run
    /// into the dead connection by itself — it is allowed well past the
    /// kill point — then says how it ended. (Stopping it at once could
    /// catch it between two writes, before it tried the dead primary.)
    fn lose(self) -> End {
        {
            let progress = self.shared.progress.lock().unwrap();
            let _ = self
                .shared
                .changed
                .wait_timeout_while(progress, WRITE_WAIT, |p| !p.ended && p.acked < p.limit)
                .unwrap();
        }
        self.finish()
    }

    /// Stops the writer (if it still runs) and says how it ended.
    fn finish(self) -> End {
        self.shared.update(|p| p.stop = true);
        let end = self.handle.join().expect("writer thread panicked");
        let h = self.history.lock().unwrap();
        eprintln!(
            "writer ended ({end:?}) with {} writes acknowledged, {} issued",
            h.acked,
            h.blocks.len()
        );
        end
    }
}

// ---------------------------------------------------------------------------
// The prefix checker.

fn read_image(path: &Path) -> Vec<u8> {
    let mut data =
        std::fs::read(path).unwrap_or_else(|e| panic!("read image {}: {e}", path.display()));
    assert!(
        data.len() as u64 <= VOLUME_BYTES,
        "image {} is {} bytes, larger than the volume",
        path.display(),
        data.len()
    );
    data.resize(VOLUME_BYTES as usize, 0);
    data
}

fn describe(held: Option<u64>) -> String {
    match held {
        None => "zeros".into(),
        Some(i) => format!("write {i}"),
    }
}

/// What block `b` holds: zeros (None) or a whole, valid stamp of a write
/// issued to it.
fn parse_block(data: &[u8], b: u64, blocks: &[u64]) -> Result<Option<u64>, String> {
    if data.iter().all(|x| *x == 0) {
        return Ok(None);
    }
    let i = u64::from_le_bytes(data[0..8].try_into().unwrap());
    let offset = u64::from_le_bytes(data[8..16].try_into().unwrap());
    if offset != b * BLOCK as u64 {
        return Err(format!(
            "block {b} holds neither zeros nor a stamp for its own offset {}: \
             its offset field says {offset} (first bytes {:02x?})",
            b * BLOCK as u64,
            &data[..16]
        ));
    }
    if i == 0 || i > blocks.len() as u64 {
        return Err(format!(
            "block {b} holds write {i}, which was never issued (the writer issued {})",
            blocks.len()
        ));
    }
    if blocks[i as usize - 1] != b {
        return Err(format!(
            "block {b} holds write {i}, which was issued to block {}",
            blocks[i as usize - 1]
        ));
    }
    let want = stamp(i, b);
    if data != want.as_slice() {
        let first = data.iter().zip(&want).position(|(x, y)| x != y).unwrap();
        let differ = data.iter().zip(&want).filter(|(x, y)| x != y).count();
        return Err(format!(
            "block {b} holds a torn write {i}: its stamp is right but {differ} of its \
             {BLOCK} bytes differ, the first at byte {first}"
        ));
    }
    Ok(Some(i))
}

/// Checks that `image` is exactly the state after writes 1..=P of `blocks`
/// for some P, which it returns; otherwise describes the first violation.
fn check_prefix(image: &[u8], blocks: &[u64]) -> Result<u64, String> {
    let n = VOLUME_BLOCKS as usize;
    let mut held = Vec::with_capacity(n);
    for b in 0..n {
        held.push(parse_block(
            &image[b * BLOCK..(b + 1) * BLOCK],
            b as u64,
            blocks,
        )?);
    }
    let p = held.iter().flatten().copied().max().unwrap_or(0);
    let mut last = vec![None; n];
    for (i, &b) in blocks[..p as usize].iter().enumerate() {
        last[b as usize] = Some(i as u64 + 1);
    }
    let bad: Vec<usize> = (0..n).filter(|&b| held[b] != last[b]).collect();
    let Some(&first) = bad.first() else {
        return Ok(p);
    };
    // The earliest write of the prefix that the image lacks, for the log.
    let earliest = bad
        .iter()
        .filter_map(|&b| last[b].map(|i| (i, b)))
        .min()
        .map(|(i, b)| {
            format!("; the earliest write of the prefix it lacks is write {i} (block {b})")
        })
        .unwrap_or_default();
    let some: Vec<String> = bad
        .iter()
        .take(8)
        .map(|&b| format!("{b}: {} not {}", describe(held[b]), describe(last[b])))
        .collect();
    Err(format!(
        "block {first} holds {} but the prefix {p} (the newest write found in the image) \
         says {}; {} of {n} blocks differ from that prefix{earliest} [{}]",
        describe(held[first]),
        describe(last[first]),
        bad.len(),
        some.join(", ")
    ))
}

/// First block where two images differ, described.
fn first_difference(a: &[u8], b: &[u8], blocks: &[u64]) -> Option<String> {
    let at = (0..VOLUME_BLOCKS as usize)
        .find(|&i| a[i * BLOCK..(i + 1) * BLOCK] != b[i * BLOCK..(i + 1) * BLOCK])?;
    let show = |img: &[u8]| match parse_block(&img[at * BLOCK..(at + 1) * BLOCK], at as u64, blocks)
    {
        Ok(h) => describe(h),
        Err(e) => e,
    };
    let count = (0..VOLUME_BLOCKS as usize)
        .filter(|&i| a[i * BLOCK..(i + 1) * BLOCK] != b[i * BLOCK..(i + 1) * BLOCK])
        .count();
    Some(format!(
        "block {at}: the primary has {}, the replica {} ({count} blocks differ)",
        show(a),
        show(b)
    ))
}

// ---------------------------------------------------------------------------
// Steps shared by the scenarios.

/// A two-site cluster ("ny" primary, "dr" replica) over one 16 MiB volume,
/// started and fully replicated.
fn cluster(extra: &str) -> Cluster {
    let mut c = Cluster::new("ny", &["dr"], &[vol(VOLUME, VOLUME_SIZE)], extra);
    c.start("dr");
    c.start("ny");
    c.wait_replicated(CONVERGE);
    c
}

/// `state` of the site's own entry in its status (on a replica site:
/// what it says of itself).
fn own_state(c: &Cluster, site: &str) -> String {
    let s = c.status(site);
    s["groups"][0]["replicas"][0]["state"]
        .as_str()
        .unwrap_or_else(|| panic!("no replica state in {site}'s status: {s:#}"))
        .to_owned()
}

/// The primary's view of replica "dr".
fn primary_view(c: &Cluster) -> serde_json::Value {
    c.status("ny")["groups"][0]["replicas"][0].clone()
}

/// Stops "dr" cleanly (it must exit 0) and checks that its image is a
/// prefix of the writes issued so far; returns P. Call only where the
/// replica cannot be resyncing (it says whether it is, and is checked).
fn stop_replica_and_check(c: &mut Cluster, history: &Arc<Mutex<History>>, ctx: &str) -> u64 {
    let state = own_state(c, "dr");
    assert_ne!(
        state, "inconsistent",
        "{ctx}: dr says it is inconsistent although no resync can be running"
    );
    let status = c.stop("dr");
    assert!(
        status.success(),
        "{ctx}: dr did not stop cleanly on SIGTERM: {status}"
    );
    // Everything the replica could hold was issued before this snapshot.
    let blocks = history.lock().unwrap().blocks.clone();
    let image = read_image(&c.image("dr", VOLUME));
    check_prefix(&image, &blocks).unwrap_or_else(|e| {
        panic!(
            "{ctx}: G3 violated: after a clean stop, dr (which says it is {state}) is not a \
             prefix of the primary's writes ({} issued): {e}",
            blocks.len()
        )
    })
}

/// After the primary crashed: its own image must be the state after every
/// acknowledged write, plus at most the one in flight (G1, G7); the
/// history is cut to what the primary holds, which is the sequence from
/// now on. Returns (acknowledged, issued, held by the primary).
fn settle_primary(c: &Cluster, history: &Arc<Mutex<History>>, ctx: &str) -> (u64, u64, u64) {
    let mut h = history.lock().unwrap();
    let (acked, issued) = (h.acked, h.blocks.len() as u64);
    let image = read_image(&c.image("ny", VOLUME));
    let p = check_prefix(&image, &h.blocks).unwrap_or_else(|e| {
        panic!(
            "{ctx}: the crashed primary's own image is not a prefix of the writes it received: {e}"
        )
    });
    assert!(
        p >= acked && p <= issued,
        "{ctx}: the crashed primary holds writes 1..={p}, but {acked} were acknowledged and \
         {issued} issued: acknowledged writes were lost on the primary (G7)"
    );
    h.blocks.truncate(p as usize);
    h.acked = p;
    h.flushed = h.flushed.min(p);
    (acked, issued, p)
}

/// With the writer stopped and both sites idle: "ny" holds exactly every
/// acknowledged write, and "dr" the same bytes.
fn assert_converged(c: &Cluster, history: &Arc<Mutex<History>>, ctx: &str) {
    let h = history.lock().unwrap();
    let ny = read_image(&c.image("ny", VOLUME));
    let p = check_prefix(&ny, &h.blocks)
        .unwrap_or_else(|e| panic!("{ctx}: the primary's image is not a prefix: {e}"));
    assert_eq!(
        p, h.acked,
        "{ctx}: the primary holds writes 1..={p} but {} were acknowledged",
        h.acked
    );
    let dr = read_image(&c.image("dr", VOLUME));
    if let Some(d) = first_difference(&ny, &dr, &h.blocks) {
        panic!("{ctx}: the replica reports itself replicated but differs from the primary: {d}");
    }
}

fn expect_lost(end: End, ctx: &str) {
    match end {
        End::Lost(why) => eprintln!("{ctx}: the writer lost its primary: {why}"),
        End::Stopped => panic!("{ctx}: the writer should have lost its primary, but it ran on"),
    }
}

fn expect_stopped(end: End, ctx: &str) {
    assert!(
        matches!(end, End::Stopped),
        "{ctx}: the writer failed while the primary was up: {end:?}"
    );
}

// ---------------------------------------------------------------------------
// Scenarios.

/// Starts `site` and SIGKILLs it at a random moment of its first 50 ms:
/// a crash during recovery (journal replay, state and map checks).
fn crash_during_start(c: &mut Cluster, site: &str, rng: &mut Rng) -> u64 {
    let ms = rng.range(0, 50);
    c.spawn(site);
    // The kill point is a moment, not a condition: nothing to poll.
    std::thread::sleep(Duration::from_millis(ms));
    c.kill(site);
    ms
}

/// After a SIGKILL, the replica's raw image may hold a partly applied run
/// until the agent restarts and replays its journal (docs/REPLICA.md):
/// only noted, not required.
fn note_raw_image(c: &Cluster, site: &str, history: &Arc<Mutex<History>>, ctx: &str) {
    let blocks = history.lock().unwrap().blocks.clone();
    match check_prefix(&read_image(&c.image(site, VOLUME)), &blocks) {
        Ok(p) => eprintln!("{ctx}: {site}'s raw image right after SIGKILL: prefix {p}"),
        Err(e) => eprintln!(
            "{ctx}: {site}'s raw image right after SIGKILL is not a prefix (allowed until it \
             replays its journal): {e}"
        ),
    }
}

/// G7: a restart after SIGKILL needs no full resync. The primary's log
/// names every full comparison; the first copy of the new replica is one.
fn assert_one_full_comparison(c: &Cluster, ctx: &str) {
    let log = c.site("ny").log();
    let full: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("full comparison"))
        .collect();
    assert_eq!(
        full.len(),
        1,
        "{ctx}: G7 violated: the primary ran {} full comparisons of dr, but only the new \
         replica's first copy needs one:\n{}",
        full.len(),
        full.join("\n")
    );
}

/// Async: the primary is SIGKILLed mid-stream; the replica, stopped
/// cleanly, is a prefix of the writes. Both restart and converge.
#[test]
fn async_primary_killed_mid_stream_leaves_a_prefix_on_the_replica() {
    const SEED: u64 = 0x5EED_0001;
    let mut rng = Rng::new(SEED);
    let mut c = cluster("");
    let history = Arc::new(Mutex::new(History::default()));
    for round in 1..=ROUNDS {
        let ctx = format!("seed {SEED:#x} round {round}");
        let w = Writer::start(&c.socket("ny", VOLUME), &history, SEED, FLUSH_EVERY);
        w.run_past(rng.range(50, 400));
        c.kill("ny");
        expect_lost(w.lose(), &ctx);
        let p = stop_replica_and_check(&mut c, &history, &ctx);
        let (acked, issued, held) = settle_primary(&c, &history, &ctx);
        eprintln!(
            "{ctx}: ny killed at {acked} acknowledged / {issued} issued writes; \
             dr held prefix {p}, ny {held}"
        );
        c.start("dr");
        c.start("ny");
        c.wait_replicated(CONVERGE);
        assert_converged(&c, &history, &ctx);
    }
    let ctx = format!("seed {SEED:#x} end");
    assert!(c.stop("ny").success(), "{ctx}: ny did not stop cleanly");
    assert!(c.stop("dr").success(), "{ctx}: dr did not stop cleanly");
    assert_converged(&c, &history, &ctx);
    assert_one_full_comparison(&c, &ctx);
}

/// Async: the replica is SIGKILLed mid-stream (sometimes again while it
/// recovers) while the writer goes on; restarted and stopped cleanly at
/// once it is a prefix; restarted again it catches up from its journal
/// position, and in the end equals the primary.
#[test]
fn async_replica_killed_mid_stream_restarts_as_a_prefix_and_converges() {
    const SEED: u64 = 0x5EED_0002;
    let mut rng = Rng::new(SEED);
    let mut c = cluster("");
    let history = Arc::new(Mutex::new(History::default()));
    let w = Writer::start(&c.socket("ny", VOLUME), &history, SEED, FLUSH_EVERY);
    for round in 1..=ROUNDS {
        let ctx = format!("seed {SEED:#x} round {round}");
        w.run_past(rng.range(50, 400));
        c.kill("dr");
        let killed_at = w.acked();
        note_raw_image(&c, "dr", &history, &ctx);
        // The writer goes on while the replica is down; from round 2 dr
        // also crashes again while it recovers.
        let again = (round > 1).then(|| crash_during_start(&mut c, "dr", &mut rng));
        if again.is_some() {
            note_raw_image(&c, "dr", &history, &ctx);
        }
        c.start("dr");
        // ...and while it restarts and stops.
        w.allow(RUN_ON);
        let p = stop_replica_and_check(&mut c, &history, &ctx);
        eprintln!(
            "{ctx}: dr killed at {killed_at} acknowledged writes{}; restarted and stopped \
             cleanly it held prefix {p} (writer at {})",
            again.map_or(String::new(), |ms| format!(
                ", and again {ms} ms into its restart"
            )),
            w.acked()
        );
        c.start("dr");
        w.write(rng.range(20, 100));
        // The next kill finds dr streaming, caught up (the primary
        // reconnects with backoff).
        c.wait_replicated(CONVERGE);
    }
    let ctx = format!("seed {SEED:#x} end");
    expect_stopped(w.finish(), &ctx);
    c.wait_replicated(CONVERGE);
    assert!(c.stop("ny").success(), "{ctx}: ny did not stop cleanly");
    assert!(c.stop("dr").success(), "{ctx}: dr did not stop cleanly");
    assert_converged(&c, &history, &ctx);
    assert_one_full_comparison(&c, &ctx);
}

/// Async: both sites are SIGKILLed at random points (either first), then
/// again while they recover; the replica, restarted and stopped cleanly,
/// is a prefix; both restart and converge.
#[test]
fn async_both_killed_at_random_points_converge() {
    const SEED: u64 = 0x5EED_0003;
    let mut rng = Rng::new(SEED);
    let mut c = cluster("");
    let history = Arc::new(Mutex::new(History::default()));
    for round in 1..=ROUNDS {
        let ctx = format!("seed {SEED:#x} round {round}");
        let w = Writer::start(&c.socket("ny", VOLUME), &history, SEED, FLUSH_EVERY);
        w.run_past(rng.range(50, 400));
        let order = if rng.coin() {
            c.kill("dr");
            w.run_past(rng.range(1, 200));
            c.kill("ny");
            "dr, then ny".to_owned()
        } else {
            c.kill("ny");
            // A moment later, while the replica may still be taking in
            // what the primary sent last (no writes to count any more).
            let ms = rng.range(0, 30);
            std::thread::sleep(Duration::from_millis(ms));
            c.kill("dr");
            format!("ny, then dr {ms} ms later")
        };
        expect_lost(w.lose(), &ctx);
        let (acked, issued, held) = settle_primary(&c, &history, &ctx);
        let ny_ms = crash_during_start(&mut c, "ny", &mut rng);
        let dr_ms = crash_during_start(&mut c, "dr", &mut rng);
        let again = check_prefix(
            &read_image(&c.image("ny", VOLUME)),
            &history.lock().unwrap().blocks,
        );
        assert_eq!(
            again,
            Ok(held),
            "{ctx}: a crash {ny_ms} ms into the primary's restart changed its image"
        );
        // The primary is down: nothing can resync the replica meanwhile.
        c.start("dr");
        let p = stop_replica_and_check(&mut c, &history, &ctx);
        eprintln!(
            "{ctx}: killed {order} at {acked} acknowledged / {issued} issued writes, then ny \
             {ny_ms} ms and dr {dr_ms} ms into their restarts; dr held prefix {p}, ny {held}"
        );
        if rng.coin() {
            c.start("ny");
            c.start("dr");
        } else {
            c.start("dr");
            c.start("ny");
        }
        c.wait_replicated(CONVERGE);
        assert_converged(&c, &history, &ctx);
    }
    let ctx = format!("seed {SEED:#x} end");
    assert!(c.stop("ny").success(), "{ctx}: ny did not stop cleanly");
    assert!(c.stop("dr").success(), "{ctx}: dr did not stop cleanly");
    assert_converged(&c, &history, &ctx);
    assert_one_full_comparison(&c, &ctx);
}

// --- the replica's durable state, read from its file (docs/REPLICA.md) ---

/// CRC-32C (Castagnoli), as the state slots carry.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The replica state of group "g" on `site`, as its newest valid slot
/// says: (inconsistent, applied, consistent_at); None before it exists.
fn disk_state(c: &Cluster, site: &str) -> Option<(bool, u64, u64)> {
    let path = c
        .site(site)
        .data_dir
        .join("replica")
        .join("g")
        .join("state");
    let data = std::fs::read(path).ok()?;
    let word = |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().unwrap());
    let mut best: Option<(u64, (bool, u64, u64))> = None;
    for at in [0usize, 512] {
        // docs/REPLICA.md: 80-byte `TNDRST04` slots, CRC of 0..72 at 72.
        let Some(s) = data.get(at..at + 76) else {
            continue;
        };
        let crc = u32::from_le_bytes(s[72..76].try_into().unwrap());
        if &s[0..8] != b"TNDRST04" || crc != crc32c(&s[0..72]) || s[40] > 1 {
            continue;
        }
        let generation = word(s, 8);
        if best.is_none_or(|(g, _)| generation > g) {
            best = Some((generation, (s[40] == 1, word(s, 24), word(s, 32))));
        }
    }
    best.map(|(_, state)| state)
}

/// Async, `queue_memory = "1MiB"`: the replica is away for longer than
/// the memory queue holds, so it needs a resync; it is SIGKILLed in the
/// middle of that resync. Restarted (with no primary to finish the
/// resync) it must say `inconsistent`, again after a clean restart; once
/// the primary is back and a resync completes it equals the primary.
#[test]
fn a_replica_killed_mid_resync_says_inconsistent_until_a_resync_completes() {
    const SEED: u64 = 0x5EED_0004;
    let mut rng = Rng::new(SEED);
    // No disk spill: an outage past 1 MiB of changes means a resync. No
    // history: with one, the replica keeps a point to be promoted at
    // (`a_replica_killed_mid_resync_is_promotable_at_its_last_point`).
    let mut c = cluster("queue_memory = \"1MiB\"\nmax_queue = \"1MiB\"\nretention = \"0s\"");
    let history = Arc::new(Mutex::new(History::default()));
    for round in 1..=ROUNDS {
        let ctx = format!("seed {SEED:#x} round {round}");
        let w = Writer::start(&c.socket("ny", VOLUME), &history, SEED, FLUSH_EVERY);
        w.write(rng.range(20, 100));
        let mut attempt = 0;
        let killed = loop {
            attempt += 1;
            assert!(
                attempt <= 5,
                "{ctx}: could not kill dr during a resync in 5 attempts"
            );
            if c.is_running("dr") {
                let p = stop_replica_and_check(&mut c, &history, &ctx);
                eprintln!("{ctx}: dr stopped cleanly at prefix {p}");
            }
            assert_eq!(
                disk_state(&c, "dr").map(|s| s.0),
                Some(false),
                "{ctx}: dr should be consistent before its outage"
            );
            // An outage longer than the memory queue: 1 MiB holds about
            // 250 writes of 4 KiB.
            let outage = rng.range(400, 700);
            w.write(outage);
            wait_until(
                Duration::from_secs(20),
                "the primary to stop queuing for dr and owe it a resync (resyncing: true)",
                || primary_view(&c)["resyncing"] == true,
            );
            // Writes go on during the resync.
            w.allow(RUN_ON);
            // Kill dr once its state says a resync is writing chunks: at
            // once in round 1, later a random moment into the resync
            // (shorter at each attempt, so that one lands inside it).
            let into = if round == 1 {
                0
            } else {
                rng.range(1, 40) >> (attempt - 1)
            };
            c.spawn("dr");
            // Looked at every 200 µs (a small file read): the kill is
            // meant to land right after the resync begins.
            let began = poll_every(Duration::from_micros(200), Duration::from_secs(30), || {
                assert!(
                    c.is_running("dr"),
                    "{ctx}: dr exited during start:\n{}",
                    c.site("dr").log()
                );
                disk_state(&c, "dr").is_some_and(|s| s.0).then_some(())
            });
            assert!(
                began.is_some(),
                "{ctx}: no resync of dr started within 30 s: {:#}",
                primary_view(&c)
            );
            // A moment, not a condition: nothing to poll.
            std::thread::sleep(Duration::from_millis(into));
            c.kill("dr");
            let state = disk_state(&c, "dr").unwrap();
            if state.0 {
                eprintln!(
                    "{ctx}: dr killed mid-resync, {into} ms after it began, after an outage of \
                     {outage} writes (attempt {attempt}, writer at {}): state {state:?}",
                    w.acked()
                );
                break state;
            }
            eprintln!(
                "{ctx}: attempt {attempt}: the resync ended within {into} ms, before the kill \
                 (state {state:?}); again"
            );
        };
        expect_stopped(w.finish(), &ctx);
        // No primary: nothing can complete the resync while dr is looked at.
        assert!(c.stop("ny").success(), "{ctx}: ny did not stop cleanly");
        assert_primary_holds_every_acknowledged_write(&c, &history, &ctx);
        for start in 1..=2 {
            c.start("dr");
            let s = c.status("dr");
            let me = &s["groups"][0]["replicas"][0];
            assert_eq!(
                me["state"], "inconsistent",
                "{ctx}: G3 violated: dr was killed in the middle of a resync (state {killed:?}), \
                 so its image is no prefix, but after restart {start} it says {}: {s:#}",
                me["state"]
            );
            assert!(
                c.stop("dr").success(),
                "{ctx}: dr (inconsistent) did not stop cleanly"
            );
            assert_eq!(
                disk_state(&c, "dr").map(|s| s.0),
                Some(true),
                "{ctx}: a clean stop made dr's interrupted resync look complete"
            );
        }
        c.start("dr");
        c.start("ny");
        c.wait_replicated(CONVERGE);
        assert_eq!(
            own_state(&c, "dr"),
            "streaming",
            "{ctx}: dr does not say it is consistent after its resync completed"
        );
        assert_converged(&c, &history, &ctx);
    }
    let ctx = format!("seed {SEED:#x} end");
    assert!(c.stop("ny").success(), "{ctx}: ny did not stop cleanly");
    assert!(c.stop("dr").success(), "{ctx}: dr did not stop cleanly");
    assert_converged(&c, &history, &ctx);
}

/// The primary alone (stopped) holds exactly every acknowledged write.
fn assert_primary_holds_every_acknowledged_write(
    c: &Cluster,
    history: &Arc<Mutex<History>>,
    ctx: &str,
) {
    let h = history.lock().unwrap();
    let ny = read_image(&c.image("ny", VOLUME));
    let p = check_prefix(&ny, &h.blocks)
        .unwrap_or_else(|e| panic!("{ctx}: the primary's image is not a prefix: {e}"));
    assert_eq!(
        p, h.acked,
        "{ctx}: the primary holds writes 1..={p} but {} were acknowledged",
        h.acked
    );
}

/// Sync mode: the primary is SIGKILLed mid-stream; the replica, stopped
/// cleanly, holds a prefix that includes every acknowledged write (G4).
/// In round 2 the replica is SIGKILLed a moment after the primary: once
/// restarted it still holds every write an acknowledged FLUSH covered.
#[test]
fn sync_primary_killed_mid_stream_replica_holds_every_acknowledged_write() {
    const SEED: u64 = 0x5EED_0005;
    let mut rng = Rng::new(SEED);
    let mut c = cluster("mode = \"sync\"\nsync_replicas = 1");
    let history = Arc::new(Mutex::new(History::default()));
    for round in 1..=ROUNDS {
        let ctx = format!("seed {SEED:#x} round {round}");
        let w = Writer::start(&c.socket("ny", VOLUME), &history, SEED, FLUSH_EVERY);
        w.run_past(rng.range(50, 400));
        c.kill("ny");
        let crash = round == 2;
        let ms = rng.range(0, 30);
        if crash {
            // The replica dies too, a moment later (no write to count).
            std::thread::sleep(Duration::from_millis(ms));
            c.kill("dr");
        }
        expect_lost(w.lose(), &ctx);
        let (acked, flushed) = {
            let h = history.lock().unwrap();
            (h.acked, h.flushed)
        };
        if crash {
            c.start("dr");
        }
        let p = stop_replica_and_check(&mut c, &history, &ctx);
        if crash {
            // Writes are acknowledged once the replica has received them,
            // FLUSH once it holds them durably: a replica crash may lose
            // what followed the last FLUSH, never what preceded it.
            assert!(
                p >= flushed,
                "{ctx}: G4/G7 violated: a FLUSH after write {flushed} was acknowledged in sync \
                 mode, but after losing the primary and a crash of the replica {ms} ms later, \
                 the replica holds only writes 1..={p}"
            );
        } else {
            assert!(
                p >= acked,
                "{ctx}: G4 violated: {acked} writes were acknowledged in sync mode, but after \
                 the primary's loss the replica holds only writes 1..={p}"
            );
        }
        let (_, issued, held) = settle_primary(&c, &history, &ctx);
        let also = if crash {
            format!(", dr {ms} ms later")
        } else {
            String::new()
        };
        eprintln!(
            "{ctx}: ny killed at {acked} acknowledged / {issued} issued writes (FLUSH \
             acknowledged after {flushed}){also}; dr held prefix {p}, ny {held}"
        );
        c.start("dr");
        c.start("ny");
        c.wait_replicated(CONVERGE);
        assert_converged(&c, &history, &ctx);
    }
    let ctx = format!("seed {SEED:#x} end");
    assert!(c.stop("ny").success(), "{ctx}: ny did not stop cleanly");
    assert!(c.stop("dr").success(), "{ctx}: dr did not stop cleanly");
    assert_converged(&c, &history, &ctx);
    assert_one_full_comparison(&c, &ctx);
}

/// The checker itself: it accepts prefixes and names what is wrong
/// otherwise.
#[test]
fn the_checker_catches_what_it_must() {
    // Writes 1..=4 to blocks 1, 2, 1, 3.
    let blocks = [1u64, 2, 1, 3];
    let mut img = vec![0u8; VOLUME_BYTES as usize];
    let put = |img: &mut Vec<u8>, i: u64| {
        let b = blocks[i as usize - 1] as usize;
        img[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&stamp(i, b as u64));
    };
    assert_eq!(check_prefix(&img, &blocks), Ok(0));
    put(&mut img, 1);
    put(&mut img, 2);
    assert_eq!(check_prefix(&img, &blocks), Ok(2));
    // Write 4 without write 3: not a prefix.
    put(&mut img, 4);
    let e = check_prefix(&img, &blocks).unwrap_err();
    assert!(
        e.contains("block 1 holds write 1 but the prefix 4")
            && e.contains("earliest write of the prefix it lacks is write 3"),
        "{e}"
    );
    put(&mut img, 3);
    assert_eq!(check_prefix(&img, &blocks), Ok(4));
    // A torn block.
    img[BLOCK + 100] ^= 1;
    assert!(check_prefix(&img, &blocks).unwrap_err().contains("torn"));
    img[BLOCK + 100] ^= 1;
    // A stamp at the wrong place.
    img.copy_within(BLOCK..2 * BLOCK, 9 * BLOCK);
    assert!(check_prefix(&img, &blocks)
        .unwrap_err()
        .contains("its own offset"));
    img[9 * BLOCK..10 * BLOCK].fill(0);
    // A write never issued.
    img[5 * BLOCK..6 * BLOCK].copy_from_slice(&stamp(9, 5));
    assert!(check_prefix(&img, &blocks)
        .unwrap_err()
        .contains("never issued"));
    assert_eq!(crc32c(b"123456789"), 0xE306_9283, "CRC-32C check value");
}

// ---------------------------------------------------------------------------
// Recovery points (SPEC G10, docs/HISTORY.md).

/// Starts a test view of the point at `time` on `site`; returns its id
/// and the socket of the volume.
fn test_start(c: &Cluster, site: &str, time: &str) -> (u64, String) {
    let out = run_ok(
        std::process::Command::new(TANDEM)
            .args(["test", "start", "g", "--at", time, "--json", "--config"])
            .arg(&c.site(site).config),
        Duration::from_secs(30),
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let socket = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["volume"] == VOLUME)
        .unwrap()["socket"]
        .as_str()
        .unwrap()
        .to_owned();
    (v["id"].as_u64().unwrap(), socket)
}

fn test_stop(c: &Cluster, site: &str, id: u64) {
    run_ok(
        std::process::Command::new(TANDEM)
            .args(["test", "stop", "g", "--id", &id.to_string(), "--config"])
            .arg(&c.site(site).config),
        Duration::from_secs(30),
    );
}

/// The whole volume as an NBD server at `socket` serves it (nbdcopy).
fn read_nbd(socket: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("read.raw");
    let _ = std::fs::remove_file(&out);
    run_ok(
        std::process::Command::new(tool("nbdcopy"))
            .arg(format!("nbd+unix:///{VOLUME}?socket={socket}"))
            .arg(&out),
        Duration::from_secs(60),
    );
    read_image(&out)
}

/// The record seq of write `i`, with writes numbered from 1 after the
/// record `base`, a FLUSH after every `every` writes, nothing else (QD1).
fn seq_of_write(base: u64, every: u64, i: u64) -> u64 {
    base + i + (i - 1) / every
}

/// G10 with the stamping writer and checker: every point the replica
/// lists reads back, through a test view, as exactly the writes up to the
/// point's sequence; three views stay exactly so while 1 GiB of
/// whole-volume overwrites ("ransomware") is replicated; `tandem recover`
/// at the newest point before the overwrites brings that prefix back as
/// the group's data.
#[test]
fn every_listed_point_is_the_prefix_up_to_it_and_recover_undoes_a_whole_volume_overwrite() {
    const SEED: u64 = 0x5EED_0010;
    const WRITES: u64 = 1500;
    const EVERY: u64 = 50;
    let mut c = Cluster::new("ny", &["dr"], &[vol(VOLUME, VOLUME_SIZE)], "");
    let witness = Witness::start(c.dir.path());
    c.set_coordinator(&witness.section("2s"));
    c.start_any("dr");
    c.start_any("ny");
    c.wait_replicated(CONVERGE);
    let base = c.status("ny")["groups"][0]["next_seq"].as_u64().unwrap() - 1;
    let history = Arc::new(Mutex::new(History::default()));
    let w = Writer::start(&c.socket("ny", VOLUME), &history, SEED, EVERY);
    w.write(WRITES);
    expect_stopped(w.finish(), "writer");
    let last_flush = seq_of_write(base, EVERY, WRITES) + 1;
    c.wait_replicated(CONVERGE);
    let blocks = history.lock().unwrap().blocks.clone();
    // The replica lists the last flush's point (its mark follows it).
    let points = poll_every(Duration::from_secs(30), Duration::from_millis(100), || {
        let out = run_ok(
            std::process::Command::new(TANDEM)
                .args(["points", "g", "--json", "--config"])
                .arg(&c.site("dr").config),
            Duration::from_secs(30),
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let points = v["points"].as_array()?.clone();
        points
            .iter()
            .any(|p| p["seq"].as_u64() >= Some(last_flush))
            .then_some(points)
    })
    .unwrap_or_else(|| panic!("dr never listed the point of the last flush (seq {last_flush})"));
    let flush_points = points
        .iter()
        .filter(|p| {
            let s = p["seq"].as_u64().unwrap();
            s > base && (s - base).is_multiple_of(EVERY + 1)
        })
        .count() as u64;
    assert!(
        flush_points >= WRITES / EVERY,
        "every FLUSH is a point: {flush_points} of {} listed ({} points)",
        WRITES / EVERY,
        points.len()
    );
    let scratch = tempfile::tempdir().unwrap();
    let mut kept = Vec::new();
    for (n, p) in points.iter().enumerate() {
        let seq = p["seq"].as_u64().unwrap();
        let time = p["time"].as_str().unwrap();
        let (id, socket) = test_start(&c, "dr", time);
        let image = read_nbd(&socket, scratch.path());
        let prefix = check_prefix(&image, &blocks)
            .unwrap_or_else(|e| panic!("point seq {seq} ({time}): not a prefix: {e}"));
        // The prefix is exactly the writes up to the point's seq.
        if prefix > 0 {
            assert!(
                seq_of_write(base, EVERY, prefix) <= seq,
                "point seq {seq} holds write {prefix}, which is seq {}",
                seq_of_write(base, EVERY, prefix)
            );
        }
        if prefix < WRITES {
            assert!(
                seq_of_write(base, EVERY, prefix + 1) > seq,
                "point seq {seq} lacks write {}, which is seq {}",
                prefix + 1,
                seq_of_write(base, EVERY, prefix + 1)
            );
        }
        if n == 0 || n == points.len() / 2 || n + 1 == points.len() {
            kept.push((id, socket, image, seq, time.to_owned()));
        } else {
            test_stop(&c, "dr", id);
        }
    }
    eprintln!("{} points read, each the prefix of its seq", points.len());
    // The "ransomware": the whole volume overwritten 64 times (1 GiB).
    let uri = c.uri("ny", VOLUME);
    let mut cmds: Vec<String> = (0..64)
        .map(|k| format!("write -P {} 0 {}M", 0x80 + k, VOLUME_BYTES >> 20))
        .collect();
    cmds.push("flush".into());
    run_ok(
        std::process::Command::new(tool("qemu-io"))
            .args(["-f", "raw", &uri])
            .args(cmds.iter().flat_map(|c| ["-c", c.as_str()])),
        Duration::from_secs(300),
    );
    c.wait_replicated(CONVERGE);
    for (id, socket, before, seq, _) in &kept {
        let now = read_nbd(socket, scratch.path());
        assert!(
            now == *before,
            "the view of point seq {seq} moved while 1 GiB was replicated"
        );
        test_stop(&c, "dr", *id);
    }
    // Recover at the newest point before the overwrite.
    let (_, _, want, seq, time) = kept.last().unwrap().clone();
    let out = run_ok(
        std::process::Command::new(TANDEM)
            .args(["recover", "g", "--at", &time, "--config"])
            .arg(&c.site("dr").config),
        Duration::from_secs(180),
    );
    assert!(out.contains("owned by dr"), "{out}");
    let socket = c.socket("dr", VOLUME);
    let now = read_nbd(socket.to_str().unwrap(), scratch.path());
    assert!(
        now == want,
        "after recover at seq {seq}, dr serves that point's data"
    );
    // What the recovery gave up is kept as rollback data on dr.
    let saved = std::fs::read_dir(c.site("dr").data_dir.join("rollback"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(saved >= 2, "dr kept the overwritten data (.img and .index)");
    drop(witness);
}

/// G3 with history (docs/HISTORY.md, "Always promotable"): a replica
/// SIGKILLed in the middle of a resync still holds its last point: when
/// the primary's site is lost, automatic failover promotes it (it reports
/// itself consistent at that point), the promotion rolls back to the
/// point, and what it serves is exactly the prefix of the writes up to it.
#[test]
fn a_replica_killed_mid_resync_is_promotable_at_its_last_point() {
    const SEED: u64 = 0x5EED_0011;
    const EVERY: u64 = 25;
    let mut c = Cluster::new(
        "ny",
        &["dr"],
        &[vol(VOLUME, VOLUME_SIZE)],
        "queue_memory = \"1MiB\"\nmax_queue = \"1MiB\"",
    );
    let witness = Witness::start(c.dir.path());
    c.set_coordinator(&witness.section("2s"));
    c.start_any("dr");
    c.start_any("ny");
    c.wait_replicated(CONVERGE);
    let history = Arc::new(Mutex::new(History::default()));
    let w = Writer::start(&c.socket("ny", VOLUME), &history, SEED, EVERY);
    w.write(200);
    c.wait_replicated(CONVERGE);
    let last = c.status("ny")["groups"][0]["next_seq"].as_u64().unwrap() - 1;
    let newest = || {
        let s = c.status("dr");
        s["groups"][0]["replicas"][0]["points"]["newest"]
            .as_str()
            .map(str::to_owned)
    };
    // dr's newest point is the last flush (writes 1..=200).
    let points = |c: &Cluster| -> Vec<serde_json::Value> {
        let out = run_ok(
            std::process::Command::new(TANDEM)
                .args(["points", "g", "--json", "--config"])
                .arg(&c.site("dr").config),
            Duration::from_secs(30),
        );
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["points"]
            .as_array()
            .unwrap()
            .clone()
    };
    let point = poll_every(Duration::from_secs(30), Duration::from_millis(100), || {
        points(&c).last().filter(|p| p["seq"] == last).cloned()
    })
    .unwrap_or_else(|| {
        panic!(
            "dr's newest point is not the last flush (seq {last}): {:?}",
            newest()
        )
    });
    // An outage longer than the memory queue: dr needs a resync.
    assert!(c.stop("dr").success());
    w.write(600);
    wait_until(Duration::from_secs(20), "ny to owe dr a resync", || {
        primary_view(&c)["resyncing"] == true
    });
    w.allow(RUN_ON);
    // A slow link keeps the resync going while the views are read.
    run_ok(
        std::process::Command::new(TANDEM)
            .args(["bandwidth", "--config"])
            .arg(&c.site("ny").config)
            .args(["dr", "1Mbit"]),
        Duration::from_secs(15),
    );
    c.spawn("dr");
    let began = poll_every(Duration::from_micros(200), Duration::from_secs(30), || {
        assert!(
            c.is_running("dr"),
            "dr exited during start:\n{}",
            c.site("dr").log()
        );
        disk_state(&c, "dr").is_some_and(|s| s.0).then_some(())
    });
    assert!(
        began.is_some(),
        "no resync of dr began: {:#}",
        primary_view(&c)
    );
    // Both views of dr: `resyncing`, never `inconsistent` (it holds a
    // point: always promotable).
    let seen = poll_every(Duration::from_secs(20), Duration::from_millis(50), || {
        let theirs = primary_view(&c);
        assert_ne!(theirs["state"], "inconsistent", "ny's view: {theirs:#}");
        let own = own_state(&c, "dr");
        assert_ne!(own, "inconsistent", "dr's own view");
        (theirs["state"] == "resyncing" && own == "resyncing").then_some(())
    });
    assert!(
        seen.is_some(),
        "dr is not `resyncing` in both views: ny says {:#}, dr says {}",
        primary_view(&c),
        own_state(&c, "dr")
    );
    assert_eq!(
        disk_state(&c, "dr").map(|s| s.0),
        Some(true),
        "the resync ended before the views were read (the link is slow)"
    );
    c.kill("dr");
    assert_eq!(
        disk_state(&c, "dr").map(|s| s.0),
        Some(true),
        "dr was killed in the middle of its resync"
    );
    expect_stopped(w.finish(), "writer");
    // The primary's site is lost.
    c.kill("ny");
    c.start_any("dr");
    wait_until(
        Duration::from_secs(60),
        "dr promoted by automatic failover",
        || c.status("dr")["groups"][0]["role"] == "primary",
    );
    // It was promoted as a replica in the middle of its resync, at its
    // newest point (reported consistent there: the failover chose it).
    let log = c.site("dr").log();
    assert!(
        log.contains("promoted at a recovery point (its images are in the middle of a resync)"),
        "dr's promotion did not fall back to its point:\n{log}"
    );
    let scratch = tempfile::tempdir().unwrap();
    let image = read_nbd(c.socket("dr", VOLUME).to_str().unwrap(), scratch.path());
    let blocks = history.lock().unwrap().blocks.clone();
    let prefix = check_prefix(&image, &blocks)
        .unwrap_or_else(|e| panic!("dr promoted mid-resync serves no prefix: {e}"));
    assert_eq!(
        prefix, 200,
        "dr serves its last point (seq {}, the writes up to 200), not prefix {prefix}",
        point["seq"]
    );
    drop(witness);
}
