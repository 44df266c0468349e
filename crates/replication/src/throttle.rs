//! Bandwidth limits per peer site (SPEC §4.1 `bandwidth`, `schedule`): a
//! token bucket shared by every link to that site, applied under the
//! shipper's buffer so that whole frames never wait in pieces longer than
//! needed.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Largest piece written at once under a limit (keeps pacing smooth).
const PIECE: usize = 64 << 10;
/// Tokens may accumulate for this long of idle time (the burst).
const BURST: Duration = Duration::from_millis(100);

/// No limit.
pub const UNLIMITED: u64 = u64::MAX;

/// A rate limit in bits per second: [`UNLIMITED`], or 0 for paused.
pub struct Limiter {
    rate_bps: AtomicU64,
    bucket: Mutex<Bucket>,
}

struct Bucket {
    /// Bytes that may be sent now (negative: owed).
    tokens: f64,
    refilled: Instant,
}

impl Limiter {
    pub fn new(rate_bps: u64) -> Arc<Limiter> {
        Arc::new(Limiter {
            rate_bps: AtomicU64::new(rate_bps),
            bucket: Mutex::new(Bucket {
                tokens: 0.0,
                refilled: Instant::now(),
            }),
        })
    }

    pub fn rate_bps(&self) -> u64 {
        self.rate_bps.load(Ordering::Relaxed)
    }

    /// Changes the rate now ([`UNLIMITED`], or 0 to pause).
    pub fn set_rate(&self, rate_bps: u64) {
        if self.rate_bps.swap(rate_bps, Ordering::Relaxed) != rate_bps {
            tracing::info!(rate_bps, "bandwidth limit changed");
        }
    }

    /// Waits until `bytes` may be sent.
    pub fn acquire(&self, bytes: usize) {
        loop {
            let rate = self.rate_bps();
            if rate == UNLIMITED {
                return;
            }
            if rate == 0 {
                // Paused (a schedule window of 0): wait for a new rate.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            let per_sec = rate as f64 / 8.0;
            let wait = {
                let mut b = self.bucket.lock();
                let now = Instant::now();
                let elapsed = now.duration_since(b.refilled).as_secs_f64();
                b.refilled = now;
                b.tokens = (b.tokens + elapsed * per_sec).min(per_sec * BURST.as_secs_f64());
                if b.tokens >= 0.0 {
                    b.tokens -= bytes as f64;
                    return;
                }
                Duration::from_secs_f64(-b.tokens / per_sec)
            };
            // Short sleeps: a raised limit takes effect at once.
            std::thread::sleep(wait.min(Duration::from_millis(50)));
        }
    }
}

/// A writer paced by a [`Limiter`].
pub struct Throttled<W> {
    pub inner: W,
    pub limiter: Arc<Limiter>,
}

impl<W: Write> Write for Throttled<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.limiter.rate_bps() == UNLIMITED {
            return self.inner.write(buf);
        }
        let n = buf.len().min(PIECE);
        self.limiter.acquire(n);
        self.inner.write_all(&buf[..n])?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paces_to_the_rate_within_five_percent() {
        let limiter = Limiter::new(80_000_000); // 10 MB/s
        let mut w = Throttled {
            inner: io::sink(),
            limiter: Arc::clone(&limiter),
        };
        let started = Instant::now();
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..20 {
            w.write_all(&chunk).unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        let rate = 20.0 * (1 << 20) as f64 / secs;
        // Never above the limit (a busy machine can only make it slower).
        assert!(
            (10e6 * 0.7..=10e6 * 1.05).contains(&rate),
            "{rate} B/s for a 10 MB/s limit"
        );
    }

    #[test]
    fn unlimited_does_not_wait_and_a_new_rate_applies_at_once() {
        let limiter = Limiter::new(8_000); // 1 KB/s
        limiter.set_rate(UNLIMITED);
        let started = Instant::now();
        limiter.acquire(10 << 20);
        assert!(started.elapsed() < Duration::from_millis(50));
    }
}
