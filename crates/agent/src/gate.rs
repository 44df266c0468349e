//! Fencing in the data path (SPEC G6): a primary acknowledges a change
//! only while the coordinator names it owner, and only as long as two
//! clocks allow (docs/FAILOVER.md, F2):
//!
//! * the agent's lease, renewed recently enough
//!   (`tandem_coordinator::lease`), extended by the lease keeper;
//! * the last store read that showed this site owner of the group, counted
//!   the same way from when that read was sent, extended by the store
//!   watcher. A forced failover deletes one group's owner key (not the
//!   agent's lease): a gate whose confirmation lapses, or a read that shows
//!   another owner, fences that group alone.
//!
//! Failsafe ownership adds a third clock (docs/FAILOVER.md, "Failsafe",
//! F5): the peer leases every other site of the group granted, extended by
//! the failsafe driver. While it runs, a lapsed lease or confirmation (the
//! coordinator unreachable) does not shut the gate; a read that shows
//! another owner or a newer epoch still does, at once.
//!
//! When the gate is shut, changes are held (`on_lost_lease = "suspend"`)
//! or failed (`"error"`) until ownership is back or the site is demoted. A
//! migration *holds* changes whatever the setting, while it drains.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tandem_nbd::{ErrorCode, ExportError};

/// How often a held change looks at the gate again.
const RECHECK: Duration = Duration::from_millis(50);

pub struct Gate {
    origin: Instant,
    /// Nanoseconds since `origin` until which the lease may be acted on;
    /// `u64::MAX` without a coordinator.
    lease_until: AtomicU64,
    /// Nanoseconds since `origin` until which the last read naming this
    /// site owner may be acted on; `u64::MAX` without a coordinator.
    confirmed_until: AtomicU64,
    /// Nanoseconds since `origin` until which every other site's peer
    /// lease may be acted on (failsafe); 0 without one.
    peer_until: AtomicU64,
    /// The store revision at which ownership was last admitted: a read of
    /// an older revision does not fence.
    admitted_revision: AtomicI64,
    /// The coordinator names this site owner under its current lease.
    owner: AtomicBool,
    /// A migration drains: changes wait.
    held: AtomicBool,
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
        gate.lease_until.store(u64::MAX, Ordering::Release);
        gate.confirmed_until.store(u64::MAX, Ordering::Release);
        gate.owner.store(true, Ordering::Release);
        gate
    }

    /// A gate that opens once the coordinator confirms ownership.
    pub fn fenced(suspend: bool) -> Gate {
        Gate {
            origin: Instant::now(),
            lease_until: AtomicU64::new(0),
            confirmed_until: AtomicU64::new(0),
            peer_until: AtomicU64::new(0),
            admitted_revision: AtomicI64::new(0),
            owner: AtomicBool::new(false),
            held: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            suspend,
            lock: Mutex::new(()),
            changed: Condvar::new(),
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Moves a clock forward to `until` (never back: renewals and reads
    /// sent later may be seen first).
    fn set_until(&self, slot: &AtomicU64, until: Instant) {
        slot.fetch_max(self.nanos(until), Ordering::AcqRel);
        self.changed.notify_all();
    }

    /// The lease may be acted on until `until` (the lease keeper).
    pub fn extend(&self, until: Instant) {
        self.set_until(&self.lease_until, until);
    }

    /// A store read sent early enough to act on until `until` named this
    /// site owner (the store watcher).
    pub fn confirm(&self, until: Instant) {
        self.set_until(&self.confirmed_until, until);
    }

    /// Every other site of the group granted a peer lease that may be
    /// acted on until `until` (failsafe).
    pub fn extend_peer(&self, until: Instant) {
        self.set_until(&self.peer_until, until);
    }

    /// Until when the coordinator's two clocks allow acting.
    pub fn coordinator_until(&self) -> Instant {
        let n = self
            .lease_until
            .load(Ordering::Acquire)
            .min(self.confirmed_until.load(Ordering::Acquire));
        // u64::MAX (no coordinator) is centuries away: far enough.
        self.origin
            .checked_add(Duration::from_nanos(n))
            .unwrap_or(self.origin + Duration::from_secs(100 * 365 * 86_400))
    }

    /// Whether changes pass on peer leases alone at `now` (failsafe): the
    /// coordinator's clocks lapsed, the peer leases run.
    pub fn on_peer_leases(&self) -> bool {
        let now = self.nanos(Instant::now());
        !self.coordinator_valid(now) && self.peer_valid(now)
    }

    fn coordinator_valid(&self, now: u64) -> bool {
        now < self.lease_until.load(Ordering::Acquire)
            && now < self.confirmed_until.load(Ordering::Acquire)
    }

    fn peer_valid(&self, now: u64) -> bool {
        now < self.peer_until.load(Ordering::Acquire)
    }

    /// The clocks allow acting at `now`: the coordinator's, or the peer
    /// leases.
    fn clocks_allow(&self, now: u64) -> bool {
        self.coordinator_valid(now) || self.peer_valid(now)
    }

    /// The coordinator names this site owner: acknowledge while both
    /// clocks allow. `revision` is the store revision that showed it,
    /// `until` as for [`Gate::confirm`].
    pub fn admit(&self, revision: i64, until: Instant) {
        self.admitted_revision.fetch_max(revision, Ordering::AcqRel);
        self.confirm(until);
        self.owner.store(true, Ordering::Release);
        self.changed.notify_all();
    }

    /// A read at `revision` shows this site is not (or no longer) owner:
    /// fence, unless ownership was admitted at a later revision.
    pub fn deny(&self, revision: i64) {
        if revision >= self.admitted_revision.load(Ordering::Acquire) {
            self.fence();
        }
    }

    /// A read at `revision` shows the owner key gone with this site's
    /// lease (nobody newer): fence, unless peer leases run (F5: no other
    /// site may claim before they end).
    pub fn deny_unless_failsafe(&self, revision: i64) {
        if !self.peer_valid(self.nanos(Instant::now())) {
            self.deny(revision);
        }
    }

    /// The lease is gone: fence now, unless peer leases run (failsafe).
    pub fn lease_lost(&self) {
        if !self.peer_valid(self.nanos(Instant::now())) {
            self.fence();
        }
    }

    /// The lease is gone: fence now.
    pub fn fence(&self) {
        self.owner.store(false, Ordering::Release);
        self.changed.notify_all();
    }

    /// Holds changes (a migration drains) or lets them go on.
    pub fn hold(&self, held: bool) {
        self.held.store(held, Ordering::Release);
        self.changed.notify_all();
    }

    /// Demotion or stop: fail whatever is held and everything after.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.changed.notify_all();
    }

    /// The coordinator no longer lets this site act as owner: a read
    /// showed another owner, or the lease or the last confirmation lapsed
    /// (not a migration's hold, not a role that closed).
    pub fn lapsed(&self) -> bool {
        let now = self.nanos(Instant::now());
        let owner = self.owner.load(Ordering::Acquire) && self.clocks_allow(now);
        let closed_or_held =
            self.closed.load(Ordering::Acquire) || self.held.load(Ordering::Acquire);
        !closed_or_held && !owner
    }

    /// The coordinator admitted this site as owner and nothing fenced or
    /// closed the gate since (its clocks aside).
    pub fn admitted(&self) -> bool {
        self.owner.load(Ordering::Acquire) && !self.closed.load(Ordering::Acquire)
    }

    /// Whether a change may be acknowledged now.
    pub fn is_open(&self) -> bool {
        let now = self.nanos(Instant::now());
        !self.closed.load(Ordering::Acquire)
            && !self.held.load(Ordering::Acquire)
            && self.owner.load(Ordering::Acquire)
            && self.clocks_allow(now)
    }

    /// Lets a change through, holds it, or fails it.
    pub fn pass(&self) -> Result<(), ExportError> {
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
            if !self.suspend && !self.held.load(Ordering::Acquire) {
                return Err(ExportError::new(
                    ErrorCode::Io,
                    "ownership lease not renewed: writes fail (on_lost_lease = \"error\")",
                ));
            }
            let mut waiting = self.lock.lock();
            self.changed.wait_for(&mut waiting, RECHECK);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(30);
    const SHORT: Duration = Duration::from_millis(100);

    /// A gate owned with the lease and the confirmation valid for these.
    fn owned(suspend: bool, lease: Duration, confirmed: Duration) -> Gate {
        let gate = Gate::fenced(suspend);
        gate.extend(Instant::now() + lease);
        gate.admit(10, Instant::now() + confirmed);
        gate
    }

    /// Waits (bounded) until the gate has shut by itself.
    fn until_shut(gate: &Gate) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while gate.is_open() {
            assert!(Instant::now() < deadline, "the gate did not shut");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_lapsed_lease_fails_or_holds_changes() {
        let gate = Gate::fenced(false);
        assert!(gate.pass().is_err(), "closed until ownership is confirmed");
        let gate = owned(false, SHORT, LONG);
        assert!(gate.pass().is_ok());
        until_shut(&gate);
        assert!(gate.pass().is_err(), "a lapsed lease must fence");

        let held = std::sync::Arc::new(owned(true, SHORT, LONG));
        until_shut(&held);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let waiter = {
            let held = std::sync::Arc::clone(&held);
            std::thread::spawn(move || tx.send(held.pass().is_err()))
        };
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "suspend: a change waits for the lease"
        );
        held.close();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Ok(true),
            "demotion releases held changes with an error"
        );
        assert!(waiter.join().is_ok());
    }

    #[test]
    fn a_lapsed_confirmation_fences_one_group_however_fresh_the_lease() {
        let gate = owned(false, LONG, SHORT);
        assert!(gate.pass().is_ok());
        until_shut(&gate);
        assert!(gate.pass().is_err());
        gate.confirm(Instant::now() + LONG);
        assert!(gate.pass().is_ok(), "a newer read confirms it again");
    }

    #[test]
    fn clocks_only_move_forward() {
        let gate = owned(false, LONG, LONG);
        gate.extend(Instant::now());
        gate.confirm(Instant::now());
        assert!(gate.is_open(), "an older renewal or read seen late");
    }

    #[test]
    fn a_read_older_than_the_admission_does_not_fence() {
        let gate = owned(false, LONG, LONG);
        gate.deny(9);
        assert!(gate.is_open(), "a read from before the claim");
        gate.deny(11);
        assert!(!gate.is_open(), "a later read without this site as owner");
    }

    #[test]
    fn a_migration_holds_changes_even_with_on_lost_lease_error() {
        let gate = std::sync::Arc::new(owned(false, LONG, LONG));
        gate.hold(true);
        assert!(!gate.is_open());
        let (tx, rx) = crossbeam_channel::bounded(1);
        let waiter = {
            let gate = std::sync::Arc::clone(&gate);
            std::thread::spawn(move || tx.send(gate.pass().is_ok()))
        };
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "a held change neither fails nor passes"
        );
        gate.hold(false);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Ok(true),
            "released by the end of the hold"
        );
        assert!(waiter.join().is_ok());
    }

    #[test]
    fn peer_leases_keep_the_gate_open_until_they_lapse() {
        let gate = owned(false, SHORT, SHORT);
        gate.extend_peer(Instant::now() + SHORT * 3);
        gate.lease_lost();
        gate.deny_unless_failsafe(11);
        std::thread::sleep(SHORT + SHORT / 2);
        assert!(gate.on_peer_leases());
        assert!(
            gate.pass().is_ok(),
            "the coordinator lapsed, the peers hold"
        );
        until_shut(&gate);
        assert!(gate.pass().is_err(), "the peer leases lapsed too");
        gate.extend_peer(Instant::now() + LONG);
        gate.deny(12);
        assert!(!gate.is_open(), "another owner fences whatever the peers");
    }

    #[test]
    fn without_peer_leases_a_lost_lease_fences_at_once() {
        let gate = owned(false, LONG, LONG);
        gate.lease_lost();
        assert!(!gate.is_open());
    }

    #[test]
    fn without_a_coordinator_the_gate_is_open() {
        let gate = Gate::open();
        gate.extend(Instant::now());
        gate.confirm(Instant::now());
        assert!(gate.pass().is_ok());
    }
}
