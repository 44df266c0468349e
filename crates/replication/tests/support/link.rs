//! An in-process network for replication tests: connections between named
//! sites as pairs of byte pipes, with filters on each direction of a pair
//! of sites — a partition (connections refused, live ones reset), a delay
//! (bytes delivered that long after they were written), a reset after a
//! number of bytes (what a dropped packet becomes on a stream). Real
//! shippers and receivers run over it in one test process.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;

/// What happens to bytes from one site to another.
#[derive(Clone, Copy, Debug, Default)]
pub struct Filter {
    /// Nothing gets through: connecting fails, live connections reset.
    pub partitioned: bool,
    /// Bytes arrive this long after they were written.
    pub delay: Duration,
    /// A connection resets once this many bytes went this way.
    pub reset_after: Option<usize>,
}

/// A live connection, so a partition can reset it.
struct Live {
    from: String,
    to: String,
    reset: Arc<AtomicBool>,
}

#[derive(Default)]
pub struct Network {
    filters: Mutex<HashMap<(String, String), Filter>>,
    live: Mutex<Vec<Live>>,
}

/// One direction of a connection.
struct Chunk {
    at: Instant,
    bytes: Vec<u8>,
}

pub struct PipeWriter {
    tx: Option<Sender<Chunk>>,
    delay: Duration,
    reset: Arc<AtomicBool>,
    budget: Option<usize>,
}

pub struct PipeReader {
    rx: Receiver<Chunk>,
    pending: VecDeque<u8>,
    reset: Arc<AtomicBool>,
}

fn reset_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "simulated link reset")
}

impl Write for PipeWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.reset.load(Ordering::Acquire) {
            return Err(reset_error());
        }
        if let Some(budget) = self.budget.as_mut() {
            if buf.len() > *budget {
                self.reset.store(true, Ordering::Release);
                return Err(reset_error());
            }
            *budget -= buf.len();
        }
        let tx = self.tx.as_ref().ok_or_else(reset_error)?;
        tx.send(Chunk {
            at: Instant::now() + self.delay,
            bytes: buf.to_vec(),
        })
        .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "peer gone"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl PipeWriter {
    /// Closes this direction (the reader sees the end of the stream).
    pub fn close(&mut self) {
        self.tx = None;
    }
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pending.is_empty() {
            if self.reset.load(Ordering::Acquire) {
                return Err(reset_error());
            }
            match self.rx.recv_timeout(Duration::from_millis(20)) {
                Ok(chunk) => {
                    let now = Instant::now();
                    if chunk.at > now {
                        std::thread::sleep(chunk.at - now);
                    }
                    self.pending.extend(chunk.bytes);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(0),
            }
        }
        let n = buf.len().min(self.pending.len());
        for (slot, b) in buf.iter_mut().zip(self.pending.drain(..n)) {
            *slot = b;
        }
        Ok(n)
    }
}

/// Both ends of a connection: (the connecting side's reader and writer,
/// the accepting side's reader and writer, a reset switch).
pub struct Connection {
    pub client: (PipeReader, PipeWriter),
    pub server: (PipeReader, PipeWriter),
    pub reset: Arc<AtomicBool>,
}

impl Network {
    pub fn new() -> Arc<Network> {
        Arc::new(Network::default())
    }

    fn filter(&self, from: &str, to: &str) -> Filter {
        self.filters
            .lock()
            .get(&(from.to_owned(), to.to_owned()))
            .copied()
            .unwrap_or_default()
    }

    /// Sets the filter of both directions between `a` and `b`; a
    /// partition resets their live connections.
    pub fn set(&self, a: &str, b: &str, filter: Filter) {
        {
            let mut f = self.filters.lock();
            f.insert((a.to_owned(), b.to_owned()), filter);
            f.insert((b.to_owned(), a.to_owned()), filter);
        }
        if filter.partitioned {
            self.reset_between(a, b);
        }
    }

    /// Resets every live connection between `a` and `b`.
    pub fn reset_between(&self, a: &str, b: &str) {
        let mut live = self.live.lock();
        live.retain(|l| {
            let between = (l.from == a && l.to == b) || (l.from == b && l.to == a);
            if between {
                l.reset.store(true, Ordering::Release);
            }
            !between && !l.reset.load(Ordering::Acquire)
        });
    }

    /// Heals everything.
    pub fn heal(&self) {
        self.filters.lock().clear();
    }

    /// Connects `from` to `to`, or fails as a refused connection would.
    pub fn connect(&self, from: &str, to: &str) -> io::Result<Connection> {
        let (there, back) = (self.filter(from, to), self.filter(to, from));
        if there.partitioned || back.partitioned {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "simulated partition",
            ));
        }
        let reset = Arc::new(AtomicBool::new(false));
        let (tx1, rx1) = crossbeam_channel::unbounded();
        let (tx2, rx2) = crossbeam_channel::unbounded();
        self.live.lock().push(Live {
            from: from.to_owned(),
            to: to.to_owned(),
            reset: Arc::clone(&reset),
        });
        let writer = |tx, f: Filter| PipeWriter {
            tx: Some(tx),
            delay: f.delay,
            reset: Arc::clone(&reset),
            budget: f.reset_after,
        };
        let reader = |rx| PipeReader {
            rx,
            pending: VecDeque::new(),
            reset: Arc::clone(&reset),
        };
        Ok(Connection {
            client: (reader(rx2), writer(tx1, there)),
            server: (reader(rx1), writer(tx2, back)),
            reset: Arc::clone(&reset),
        })
    }
}
