//! The demo's application: a thread that appends one 4 KiB timestamped
//! record every 10 ms (a WRITE, then a FLUSH) to whichever site serves
//! the volume, and remembers every record the server acknowledged, so that
//! loss and pauses can be measured afterwards. Each attempt uses a new
//! slot, so a record that was never acknowledged cannot hide another.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::cluster::{SiteName, VOLUME, VOLUME_SIZE};
use crate::error::{chain, DemoError, NbdAction};
use crate::nbd::{NbdClient, NbdError};

/// Records live in the upper half of the volume, one per 4 KiB slot.
pub const RECORD_BASE: u64 = 128 << 20;
pub const RECORD_SIZE: usize = 4096;
pub const MAX_RECORDS: u64 = (VOLUME_SIZE - RECORD_BASE) / RECORD_SIZE as u64;
/// One record this often.
pub const INTERVAL: Duration = Duration::from_millis(10);
/// A server that answers nothing for this long is given up on.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const MAGIC: &[u8; 8] = b"TNDMREC1";

/// One record a server acknowledged (its WRITE and the FLUSH after it).
#[derive(Clone, Debug)]
pub struct Ack {
    pub seq: u64,
    pub site: SiteName,
    /// When the FLUSH's reply arrived.
    pub at: Instant,
    /// Wall-clock time written into the record (ns since the epoch).
    pub stamp: u64,
}

impl Ack {
    pub fn offset(&self) -> u64 {
        slot_offset(self.seq)
    }

    /// The record's bytes, as written.
    pub fn content(&self) -> Vec<u8> {
        record(self.seq, self.stamp, self.site.as_str())
    }
}

pub fn slot_offset(seq: u64) -> u64 {
    RECORD_BASE + seq * RECORD_SIZE as u64
}

/// Record `seq`: magic, sequence number, time stamp, the site written to,
/// then bytes derived from the sequence number.
fn record(seq: u64, stamp: u64, site: &str) -> Vec<u8> {
    let mut r = Vec::with_capacity(RECORD_SIZE);
    r.extend_from_slice(MAGIC);
    r.extend_from_slice(&seq.to_le_bytes());
    r.extend_from_slice(&stamp.to_le_bytes());
    let mut name = [0u8; 16];
    let n = site.len().min(16);
    name[..n].copy_from_slice(&site.as_bytes()[..n]);
    r.extend_from_slice(&name);
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while r.len() < RECORD_SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        r.extend_from_slice(&x.to_le_bytes());
    }
    r.truncate(RECORD_SIZE);
    r
}

/// A failed attempt: where, and why.
#[derive(Clone, Debug)]
pub struct WriteFailure {
    pub site: SiteName,
    pub error: Arc<NbdError>,
}

impl fmt::Display for WriteFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.site, chain(&*self.error))
    }
}

/// Sites to try, in order, with their NBD sockets.
pub type Targets = Vec<(SiteName, PathBuf)>;

struct Shared {
    stop: AtomicBool,
    /// Sites to try, in order, when there is no working connection.
    targets: Mutex<Targets>,
    acks: Mutex<Vec<Ack>>,
    /// The latest failure, for diagnostics.
    last_error: Mutex<Option<WriteFailure>>,
    /// Every record slot is used: the writer stopped.
    gave_up: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub struct Writer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts writing to the first of `targets` that answers.
    pub fn start(targets: Targets) -> Result<Writer, DemoError> {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            targets: Mutex::new(targets),
            acks: Mutex::new(Vec::new()),
            last_error: Mutex::new(None),
            gave_up: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("demo-writer".into())
            .spawn(move || run(&s))
            .map_err(|source| DemoError::Thread {
                name: "writer",
                source,
            })?;
        Ok(Writer {
            shared,
            thread: Some(thread),
        })
    }

    /// Where to reconnect from now on, once the current server fails.
    pub fn set_targets(&self, targets: Targets) {
        *lock(&self.shared.targets) = targets;
    }

    pub fn acks(&self) -> Vec<Ack> {
        lock(&self.shared.acks).clone()
    }

    pub fn count_on(&self, site: SiteName) -> usize {
        lock(&self.shared.acks)
            .iter()
            .filter(|a| a.site == site)
            .count()
    }

    /// The first record `site` acknowledged after `after`.
    pub fn first_ack_on(&self, site: SiteName, after: Instant) -> Option<Ack> {
        lock(&self.shared.acks)
            .iter()
            .find(|a| a.site == site && a.at > after)
            .cloned()
    }

    /// The latest failed attempt.
    pub fn last_error(&self) -> Option<WriteFailure> {
        lock(&self.shared.last_error).clone()
    }

    /// Whether the writer stopped because every record slot is used.
    pub fn gave_up(&self) -> bool {
        self.shared.gave_up.load(Ordering::Acquire)
    }

    /// Stops the thread and returns every acknowledged record.
    pub fn stop(mut self) -> Vec<Ack> {
        self.halt();
        self.acks()
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.halt();
    }
}

fn run(shared: &Shared) {
    let mut conn: Option<(SiteName, NbdClient)> = None;
    let mut seq = 0u64;
    let mut next = Instant::now();
    while !shared.stop.load(Ordering::Acquire) {
        if seq >= MAX_RECORDS {
            shared.gave_up.store(true, Ordering::Release);
            break;
        }
        let Some((site, client)) = conn.as_mut() else {
            let targets = lock(&shared.targets).clone();
            for (site, socket) in targets {
                match NbdClient::connect(&socket, VOLUME, IO_TIMEOUT) {
                    Ok(c) => {
                        conn = Some((site, c));
                        break;
                    }
                    Err(e) => failed(shared, site, e),
                }
            }
            if conn.is_none() {
                std::thread::sleep(Duration::from_millis(5));
            }
            continue;
        };
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let data = record(seq, stamp, site.as_str());
        let result = client
            .write(slot_offset(seq), &data)
            .and_then(|()| client.flush());
        match result {
            Ok(()) => lock(&shared.acks).push(Ack {
                seq,
                site: *site,
                at: Instant::now(),
                stamp,
            }),
            Err(e) => {
                failed(shared, *site, e);
                conn = None;
            }
        }
        // A failed attempt may have reached the disk: its slot is never reused.
        seq += 1;
        if conn.is_some() {
            next += INTERVAL;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else {
                next = now;
            }
        }
    }
    if let Some((_, c)) = conn {
        c.disconnect();
    }
}

fn failed(shared: &Shared, site: SiteName, error: NbdError) {
    *lock(&shared.last_error) = Some(WriteFailure {
        site,
        error: Arc::new(error),
    });
}

/// Reads back every record of `acks` through `client`, connected to
/// `site`; returns the sequence numbers of those that are not there, byte
/// for byte.
pub fn missing(
    client: &mut NbdClient,
    site: SiteName,
    acks: &[Ack],
) -> Result<Vec<u64>, DemoError> {
    let mut buf = vec![0u8; RECORD_SIZE];
    let mut out = Vec::new();
    for a in acks {
        client
            .read(a.offset(), &mut buf)
            .map_err(|source| DemoError::Nbd {
                site,
                action: NbdAction::ReadRecord(a.seq),
                source,
            })?;
        if buf != a.content() {
            out.push(a.seq);
        }
    }
    Ok(out)
}
