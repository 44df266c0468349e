//! When a shipper compresses: only where fewer bytes are what limits it.
//!
//! zstd at level 1 costs the sender about 2 ms of CPU per MiB. That pays
//! only on a link that is behind (the shipper's bytes wait for the socket)
//! *and* slow: a link draining hundreds of MiB/s is held up by its
//! receiver's CPU, not by bytes, and compressed data only costs both ends
//! more CPU there (the receiver decompresses too).

use std::time::{Duration, Instant};

/// A link that drains more than this is not slowed by its bytes.
pub const COMPRESS_BELOW: u64 = 192 << 20;
/// How often the drain rate is measured.
const WINDOW: Duration = Duration::from_millis(250);

/// Decides, batch by batch, whether compressing is wanted.
#[derive(Debug)]
pub struct Squeeze {
    started: Instant,
    sent_at_start: u64,
    /// Bytes per second handed to the link in the last whole window.
    rate: Option<u64>,
}

impl Squeeze {
    pub fn new(now: Instant, sent: u64) -> Squeeze {
        Squeeze {
            started: now,
            sent_at_start: sent,
            rate: None,
        }
    }

    /// `sent`: the data handed to the link so far, counted before
    /// compression; `behind`: the link's queue waits for its socket.
    /// Compressing is wanted while the link is behind and, as far as
    /// measured, carries data below [`COMPRESS_BELOW`] a second (while
    /// behind, what the shipper hands over is what the link drains).
    pub fn wanted(&mut self, now: Instant, sent: u64, behind: bool) -> bool {
        let elapsed = now.saturating_duration_since(self.started);
        if elapsed >= WINDOW {
            let window = sent.saturating_sub(self.sent_at_start);
            let rate = u128::from(window) * 1_000_000 / elapsed.as_micros().max(1);
            self.rate = Some(u64::try_from(rate).unwrap_or(u64::MAX));
            self.started = now;
            self.sent_at_start = sent;
        }
        behind && self.rate.is_none_or(|r| r < COMPRESS_BELOW)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Feeds `rate` bytes/s for `windows` windows, `behind` throughout;
    /// returns the last decision.
    fn run(s: &mut Squeeze, at: &mut Instant, sent: &mut u64, rate: u64, behind: bool) -> bool {
        let mut wanted = false;
        for _ in 0..8 {
            *at += WINDOW / 4;
            *sent += rate / 16;
            wanted = s.wanted(*at, *sent, behind);
        }
        wanted
    }

    #[test]
    fn a_slow_link_that_is_behind_compresses() {
        let (mut at, mut sent) = (Instant::now(), 0);
        let mut s = Squeeze::new(at, sent);
        assert!(s.wanted(at, sent, true), "unmeasured and behind: compress");
        assert!(
            run(&mut s, &mut at, &mut sent, 12 * MIB, true),
            "100 Mbit/s"
        );
        assert!(
            !run(&mut s, &mut at, &mut sent, 12 * MIB, false),
            "caught up"
        );
    }

    #[test]
    fn a_fast_link_held_up_by_its_receiver_does_not() {
        let (mut at, mut sent) = (Instant::now(), 0);
        let mut s = Squeeze::new(at, sent);
        assert!(!run(&mut s, &mut at, &mut sent, 400 * MIB, true));
        // The link slows down (a WAN path).
        assert!(run(&mut s, &mut at, &mut sent, 50 * MIB, true));
    }
}
