//! Counters of the NBD front, read by the agent's metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub read_nanos: AtomicU64,
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub write_nanos: AtomicU64,
    pub trims: AtomicU64,
    pub zeroes: AtomicU64,
    pub flushes: AtomicU64,
    pub errors: AtomicU64,
}

impl Stats {
    pub(crate) fn record_read(&self, bytes: u64, started: Instant) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.read_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.read_nanos
            .fetch_add(nanos_since(started), Ordering::Relaxed);
    }

    pub(crate) fn record_write(&self, bytes: u64, started: Instant) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.write_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.write_nanos
            .fetch_add(nanos_since(started), Ordering::Relaxed);
    }
}

/// Saturates after 584 years.
fn nanos_since(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
