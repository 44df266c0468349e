//! Counters of the NBD front, read by the agent's metrics.
//!
//! [`Stats`] is the server's (connections); [`ExportStats`] belongs to one
//! export (a volume): every request served on it, by operation, its bytes,
//! its errors, and how long each took, in [`Histogram`]s of fixed buckets.
//! Recording is a handful of relaxed atomic additions: no lock and no
//! allocation per request.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

/// The server's own counters, and every export's by name.
#[derive(Debug, Default)]
pub struct Stats {
    /// NBD clients connected now (past the accept, any export).
    pub connections: AtomicU64,
    /// Kept while the server runs, so that an export served again (a
    /// role change) counts on from where it was.
    exports: Mutex<BTreeMap<String, Arc<ExportStats>>>,
}

impl Stats {
    /// The counters of the export named `name` (made at first use).
    pub fn export(&self, name: &str) -> Arc<ExportStats> {
        let mut exports = self.exports.lock();
        match exports.get(name) {
            Some(s) => Arc::clone(s),
            None => {
                let s = Arc::new(ExportStats::default());
                exports.insert(name.to_owned(), Arc::clone(&s));
                s
            }
        }
    }

    /// Every export's counters, by name.
    pub fn exports(&self) -> Vec<(String, Arc<ExportStats>)> {
        self.exports
            .lock()
            .iter()
            .map(|(n, s)| (n.clone(), Arc::clone(s)))
            .collect()
    }
}

/// Upper bounds of the latency buckets, in seconds (50 us .. 5 s; the
/// last bucket, `+Inf`, is implicit). Storage latencies span five orders
/// of magnitude: a page-cache write, an fdatasync on flash, a sync-mode
/// round trip over a WAN, a held write while ownership is confirmed.
pub const LATENCY_BOUNDS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
];

/// The same bounds in nanoseconds, for recording without floating point.
const BOUNDS_NANOS: [u64; 16] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
];

/// A latency histogram: a fixed array of counters, one per bucket (not
/// cumulative; [`Histogram::snapshot`] makes them so), and the sum.
#[derive(Debug, Default)]
pub struct Histogram {
    /// `buckets[i]` counts observations in `(bound[i-1], bound[i]]`; the
    /// last one those above every bound.
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
}

/// A histogram read at one moment, in the exposition's terms.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// Cumulative counts for each of [`LATENCY_BOUNDS`], then `+Inf`.
    pub cumulative: Vec<u64>,
    /// Sum of the observations, in seconds.
    pub sum_seconds: f64,
}

impl HistogramSnapshot {
    /// Observations in all (the `+Inf` bucket).
    pub fn count(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }
}

impl Histogram {
    /// Counts one observation of `nanos` nanoseconds.
    pub fn observe_nanos(&self, nanos: u64) {
        let bucket = BOUNDS_NANOS.partition_point(|&b| b < nanos);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The counts now. The count is the sum of the buckets, so `_count`
    /// always equals the `+Inf` bucket even while requests are recorded.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0u64;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                total = total.saturating_add(b.load(Ordering::Relaxed));
                total
            })
            .collect();
        HistogramSnapshot {
            cumulative,
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// The operations counted, by name in the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    WriteZeroes,
    Trim,
    Flush,
    Cache,
    BlockStatus,
}

impl Op {
    pub const ALL: [Op; 7] = [
        Op::Read,
        Op::Write,
        Op::WriteZeroes,
        Op::Trim,
        Op::Flush,
        Op::Cache,
        Op::BlockStatus,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::WriteZeroes => "write_zeroes",
            Op::Trim => "trim",
            Op::Flush => "flush",
            Op::Cache => "cache",
            Op::BlockStatus => "block_status",
        }
    }

    /// Which latency histogram the operation is timed in, if any: reads,
    /// changes (write, write zeroes, trim) and flushes.
    pub fn class(self) -> Option<OpClass> {
        match self {
            Op::Read => Some(OpClass::Read),
            Op::Write | Op::WriteZeroes | Op::Trim => Some(OpClass::Write),
            Op::Flush => Some(OpClass::Flush),
            Op::Cache | Op::BlockStatus => None,
        }
    }
}

/// The latency histograms of an export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpClass {
    Read,
    Write,
    Flush,
}

impl OpClass {
    pub const ALL: [OpClass; 3] = [OpClass::Read, OpClass::Write, OpClass::Flush];

    pub fn name(self) -> &'static str {
        match self {
            OpClass::Read => "read",
            OpClass::Write => "write",
            OpClass::Flush => "flush",
        }
    }
}

/// One export's counters.
#[derive(Debug, Default)]
pub struct ExportStats {
    ops: [AtomicU64; Op::ALL.len()],
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
    /// Requests answered with an error (refused, or failed by the export).
    errors: AtomicU64,
    latency: [Histogram; OpClass::ALL.len()],
}

impl ExportStats {
    /// A request of `op` was served (successfully or not): counted, and
    /// its latency from `started` (its header read) to its reply made.
    pub fn served(&self, op: Op, started: Instant) {
        self.ops[op as usize].fetch_add(1, Ordering::Relaxed);
        if let Some(class) = op.class() {
            self.latency[class as usize].observe_nanos(nanos_since(started));
        }
    }

    /// Payload bytes of a read.
    pub fn read_bytes(&self, bytes: u64) {
        self.read_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Payload bytes of a write.
    pub fn written_bytes(&self, bytes: u64) {
        self.written_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A request answered with an error.
    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn ops(&self, op: Op) -> u64 {
        self.ops[op as usize].load(Ordering::Relaxed)
    }

    pub fn bytes_read(&self) -> u64 {
        self.read_bytes.load(Ordering::Relaxed)
    }

    pub fn bytes_written(&self) -> u64 {
        self.written_bytes.load(Ordering::Relaxed)
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub fn latency(&self, class: OpClass) -> HistogramSnapshot {
        self.latency[class as usize].snapshot()
    }
}

/// Saturates after 584 years.
fn nanos_since(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_agree() {
        for (s, n) in LATENCY_BOUNDS.iter().zip(BOUNDS_NANOS) {
            assert!((s * 1e9 - n as f64).abs() < 0.5, "{s} s vs {n} ns");
        }
        assert!(BOUNDS_NANOS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = Histogram::default();
        h.observe_nanos(0);
        h.observe_nanos(50_000); // exactly a bound: `le` is inclusive
        h.observe_nanos(50_001);
        h.observe_nanos(3_000_000_000);
        h.observe_nanos(u64::MAX / 2);
        let s = h.snapshot();
        assert_eq!(s.cumulative.len(), LATENCY_BOUNDS.len() + 1);
        assert_eq!(s.cumulative[0], 2, "<= 50us");
        assert_eq!(s.cumulative[1], 3, "<= 100us");
        assert_eq!(s.cumulative[14], 3, "<= 2.5s");
        assert_eq!(s.cumulative[15], 4, "<= 5s");
        assert_eq!(s.count(), 5, "+Inf");
        assert!(s.cumulative.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn ops_are_timed_by_class() {
        let s = ExportStats::default();
        let t = Instant::now();
        for op in Op::ALL {
            s.served(op, t);
        }
        s.served(Op::Write, t);
        assert_eq!(s.ops(Op::Write), 2);
        assert_eq!(s.ops(Op::BlockStatus), 1);
        assert_eq!(s.latency(OpClass::Read).count(), 1);
        assert_eq!(
            s.latency(OpClass::Write).count(),
            4,
            "write x2, zeroes, trim"
        );
        assert_eq!(s.latency(OpClass::Flush).count(), 1);
    }
}
