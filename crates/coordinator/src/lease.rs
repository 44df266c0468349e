//! The timing half of fencing (SPEC G6): a holder may act on its lease
//! only until `sent + ttl - margin`, where `sent` is when it sent the
//! last renewal the store granted. The store counts the TTL from when it
//! received that renewal, which is later; so the holder stops
//! acknowledging writes at least `margin` before anyone else can be
//! promoted.

use std::time::Duration;

/// How long before the lease could expire a holder stops acting on it.
pub fn margin(ttl: Duration) -> Duration {
    (ttl / 6).max(Duration::from_millis(100))
}

/// How often a holder renews its lease.
pub fn renew_every(ttl: Duration) -> Duration {
    ttl / 3
}

/// Until when a lease renewed at `sent` (on the holder's monotonic clock)
/// may be acted on.
pub fn valid_until(sent: Duration, ttl: Duration) -> Duration {
    sent + ttl.saturating_sub(margin(ttl))
}
