//! Fencing in the data path (SPEC G6): a primary acknowledges a change
//! only while the coordinator names it owner under a lease it renewed
//! recently enough (`tandem_coordinator::lease`). When that stops being
//! true, changes are held (`on_lost_lease = "suspend"`) or failed
//! (`"error"`) until ownership is back or the site is demoted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tandem_nbd::{ErrorCode, ExportError};

/// How often a held change looks at the gate again.
const RECHECK: Duration = Duration::from_millis(50);

pub struct Gate {
    origin: Instant,
    /// Nanoseconds since `origin` until which the lease may be acted on;
    /// `u64::MAX` without a coordinator.
    valid_until: AtomicU64,
    /// The coordinator names this site owner under its current lease.
    owner: AtomicBool,
    /// Demoted or stopping: every change fails.
    closed: AtomicBool,
    suspend: bool,
    lock: Mutex<()>,
    changed: Condvar,
}

impl Gate {
    /// A gate for a group that has no coordinator: always open.
    pub fn open() -> Gate {
        let gate = Gate::fenced(false);
        gate.valid_until.store(u64::MAX, Ordering::Release);
        gate.owner.store(true, Ordering::Release);
        gate
    }

    /// A gate that opens once the coordinator confirms ownership.
    pub fn fenced(suspend: bool) -> Gate {
        Gate {
            origin: Instant::now(),
            valid_until: AtomicU64::new(0),
            owner: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            suspend,
            lock: Mutex::new(()),
            changed: Condvar::new(),
        }
    }

    /// The lease may be acted on until `until`.
    pub fn extend(&self, until: Instant) {
        let nanos = until.saturating_duration_since(self.origin).as_nanos() as u64;
        if self.valid_until.load(Ordering::Acquire) != u64::MAX {
            self.valid_until.store(nanos, Ordering::Release);
        }
        self.changed.notify_all();
    }

    /// Whether the coordinator names this site owner under its lease.
    pub fn set_owner(&self, owner: bool) {
        self.owner.store(owner, Ordering::Release);
        self.changed.notify_all();
    }

    /// Demotion or stop: fail whatever is held and everything after.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.changed.notify_all();
    }

    /// Whether a change may be acknowledged now.
    pub fn is_open(&self) -> bool {
        let now = self.origin.elapsed().as_nanos() as u64;
        !self.closed.load(Ordering::Acquire)
            && self.owner.load(Ordering::Acquire)
            && now < self.valid_until.load(Ordering::Acquire)
    }

    /// Lets a change through, holds it, or fails it.
    pub fn admit(&self) -> Result<(), ExportError> {
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(ExportError::new(
                    ErrorCode::Io,
                    "this site no longer owns the group",
                ));
            }
            if self.is_open() {
                return Ok(());
            }
            if !self.suspend {
                return Err(ExportError::new(
                    ErrorCode::Io,
                    "ownership lease not renewed: writes fail (on_lost_lease = \"error\")",
                ));
            }
            let mut held = self.lock.lock();
            self.changed.wait_for(&mut held, RECHECK);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lapsed_lease_fails_or_holds_changes() {
        let gate = Gate::fenced(false);
        assert!(gate.admit().is_err(), "closed until ownership is confirmed");
        gate.set_owner(true);
        gate.extend(Instant::now() + Duration::from_secs(5));
        assert!(gate.admit().is_ok());
        gate.extend(Instant::now());
        assert!(gate.admit().is_err(), "a lapsed lease must fence");

        let held = std::sync::Arc::new(Gate::fenced(true));
        held.set_owner(true);
        let waiter = {
            let held = std::sync::Arc::clone(&held);
            std::thread::spawn(move || held.admit())
        };
        held.close();
        assert!(
            waiter.join().is_ok_and(|r| r.is_err()),
            "demotion releases held changes with an error"
        );
    }

    #[test]
    fn without_a_coordinator_the_gate_is_open() {
        let gate = Gate::open();
        gate.extend(Instant::now());
        assert!(gate.admit().is_ok());
    }
}
