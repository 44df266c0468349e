//! Rate and time left of long work (resync, verify, onboarding copies):
//! bytes done per second over a sliding window of samples, and the
//! seconds left at that rate. No I/O: the caller gives the times.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The window `tandem status` and progress bars use.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Samples of (time, bytes done) of one piece of work within a window.
#[derive(Clone, Debug)]
pub struct RateWindow {
    window: Duration,
    samples: VecDeque<(Instant, u64)>,
}

impl RateWindow {
    pub fn new(window: Duration) -> RateWindow {
        RateWindow {
            window,
            samples: VecDeque::new(),
        }
    }

    /// Notes that `done` bytes were done at `at`. A `done` below the last
    /// one is new work: the samples start over. Samples older than the
    /// window (before the newest) are dropped, but the oldest one inside
    /// is kept so a rate spans the whole window.
    pub fn observe(&mut self, at: Instant, done: u64) {
        if let Some(&(last_at, last)) = self.samples.back() {
            if done < last {
                self.samples.clear();
            } else if at < last_at {
                return; // out of order: ignore
            }
        }
        self.samples.push_back((at, done));
        while self.samples.len() > 2 {
            let second = self.samples[1].0;
            if at.saturating_duration_since(second) >= self.window {
                self.samples.pop_front();
            } else {
                break;
            }
        }
    }

    /// Bytes per second between the oldest and newest sample in the
    /// window; `None` with fewer than two samples or no time between them.
    pub fn rate(&self) -> Option<f64> {
        let (&(t0, d0), &(t1, d1)) = (self.samples.front()?, self.samples.back()?);
        let secs = t1.saturating_duration_since(t0).as_secs_f64();
        (secs > 0.0).then(|| (d1 - d0) as f64 / secs)
    }

    /// Seconds left to reach `total` at the current rate.
    pub fn eta(&self, total: u64) -> Option<f64> {
        let &(_, done) = self.samples.back()?;
        eta_seconds(done, total, self.rate()?)
    }
}

/// Seconds to go from `done` to `total` at `rate` bytes per second: 0 when
/// done, `None` when nothing moves (rate 0) or the rate is not a number.
pub fn eta_seconds(done: u64, total: u64, rate: f64) -> Option<f64> {
    if done >= total {
        return Some(0.0);
    }
    if !(rate.is_finite() && rate > 0.0) {
        return None;
    }
    Some((total - done) as f64 / rate)
}

/// `85.3MiB/s`: a rate for people.
pub fn format_rate(bytes_per_second: f64) -> String {
    let whole = if bytes_per_second.is_finite() && bytes_per_second > 0.0 {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        // finite, > 0, display only
        let b = bytes_per_second.min(u64::MAX as f64) as u64;
        b
    } else {
        0
    };
    format!("{}/s", tandem_config::format_size_approx(whole))
}

/// `12s`, `4m05s`, `2h03m`: a duration in seconds for people.
pub fn format_eta(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "?".into();
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // finite, >= 0, display only
    let s = secs.round().min(u64::MAX as f64) as u64;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(t0: Instant, s: f64) -> Instant {
        t0 + Duration::from_secs_f64(s)
    }

    #[test]
    fn no_rate_until_two_samples_apart() {
        let t0 = Instant::now();
        let mut w = RateWindow::new(WINDOW);
        assert_eq!(w.rate(), None);
        w.observe(t0, 100);
        assert_eq!(w.rate(), None);
        assert_eq!(w.eta(1000), None);
        w.observe(t0, 200); // no time between
        assert_eq!(w.rate(), None);
    }

    #[test]
    fn steady_rate_and_eta() {
        let t0 = Instant::now();
        let mut w = RateWindow::new(WINDOW);
        for i in 0..=4u32 {
            w.observe(secs(t0, f64::from(i)), u64::from(i) * 1_000_000);
        }
        assert_eq!(w.rate(), Some(1_000_000.0));
        assert_eq!(w.eta(10_000_000), Some(6.0));
        assert_eq!(w.eta(4_000_000), Some(0.0));
    }

    #[test]
    fn the_window_slides() {
        let t0 = Instant::now();
        let mut w = RateWindow::new(Duration::from_secs(10));
        // Fast for 10 s, then slow: after another 10 s only the slow part
        // counts.
        for i in 0..=10u32 {
            w.observe(secs(t0, f64::from(i)), u64::from(i) * 10_000);
        }
        for i in 1..=12u32 {
            w.observe(secs(t0, f64::from(10 + i)), 100_000 + u64::from(i) * 1_000);
        }
        let r = w.rate().unwrap();
        assert!((r - 1_000.0).abs() < 1e-6, "{r}");
        assert!(w.samples.len() <= 12, "old samples dropped");
    }

    #[test]
    fn new_work_starts_over() {
        let t0 = Instant::now();
        let mut w = RateWindow::new(WINDOW);
        w.observe(t0, 5_000);
        w.observe(secs(t0, 1.0), 10_000);
        w.observe(secs(t0, 2.0), 0); // a new resync
        assert_eq!(w.rate(), None);
        w.observe(secs(t0, 4.0), 4_000);
        assert_eq!(w.rate(), Some(2_000.0));
    }

    #[test]
    fn stalled_work_has_no_eta() {
        let t0 = Instant::now();
        let mut w = RateWindow::new(WINDOW);
        w.observe(t0, 10);
        w.observe(secs(t0, 3.0), 10);
        assert_eq!(w.rate(), Some(0.0));
        assert_eq!(w.eta(100), None);
        assert_eq!(eta_seconds(10, 100, f64::NAN), None);
        assert_eq!(eta_seconds(100, 100, 0.0), Some(0.0));
    }

    #[test]
    fn eta_words() {
        assert_eq!(format_eta(0.4), "0s");
        assert_eq!(format_eta(59.0), "59s");
        assert_eq!(format_eta(245.0), "4m05s");
        assert_eq!(format_eta(7380.0), "2h03m");
        assert_eq!(format_eta(f64::INFINITY), "?");
        assert_eq!(format_rate(2.0 * 1024.0 * 1024.0), "2MiB/s");
        assert_eq!(format_rate(f64::NAN), "0B/s");
    }
}
