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
//!
//! A shut gate says why and since when ([`Gate::fenced_state`], a
//! [`FenceReason`]): status, metrics and the log line of the fence.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Condvar, Mutex};
use tandem_nbd::{ErrorCode, ExportError};

/// How often a held change looks at the gate again.
const RECHECK: Duration = Duration::from_millis(50);

/// Why a gate lets no change through. Extend with new causes as they
/// appear; [`FenceReason::as_str`] is the word status and metrics show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceReason {
    /// The coordinator has not confirmed this site owner yet (the role
    /// just started, or ownership was just claimed).
    Unconfirmed,
    /// The lease could not be renewed, or the store not read, in time:
    /// the coordinator was last heard from at `since`.
    CoordinatorUnreachable { since: SystemTime },
    /// The coordinator no longer knows this agent's lease.
    LeaseLost,
    /// A store read showed another owner, or none (a forced failover).
    Replaced,
    /// A migration drains the group: changes wait.
    Draining,
    /// Demoted or stopping: changes fail.
    Closed,
}

impl FenceReason {
    /// The reason as one word (status JSON `fenced.reason`, the metrics'
    /// `reason` label).
    pub fn as_str(&self) -> &'static str {
        match self {
            FenceReason::Unconfirmed => "unconfirmed",
            FenceReason::CoordinatorUnreachable { .. } => "coordinator_unreachable",
            FenceReason::LeaseLost => "lease_lost",
            FenceReason::Replaced => "replaced",
            FenceReason::Draining => "draining",
            FenceReason::Closed => "closed",
        }
    }
}

impl std::fmt::Display for FenceReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FenceReason::Unconfirmed => {
                f.write_str("ownership not confirmed by the coordinator yet")
            }
            FenceReason::CoordinatorUnreachable { since } => {
                write!(f, "coordinator unreachable since {}", rfc3339(*since))
            }
            FenceReason::LeaseLost => f.write_str("the coordinator lost this agent's lease"),
            FenceReason::Replaced => f.write_str("the coordinator names another owner"),
            FenceReason::Draining => f.write_str("a migration drains the group"),
            FenceReason::Closed => f.write_str("demoted or stopping"),
        }
    }
}

/// `at` as UTC, RFC 3339, to the second (`2026-12-06T10:00:00Z`).
pub fn rfc3339(at: SystemTime) -> String {
    let ms = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    tandem_coordinator::instance::utc(ms)
}

/// Seconds since the Unix epoch (the metrics' timestamps).
pub fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A shut gate: why, and since when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fenced {
    pub reason: FenceReason,
    pub since: SystemTime,
}

/// What [`Gate::fence`] and [`Gate::deny`] record (`not_owner`).
const UNCONFIRMED: u8 = 0;
const LEASE_LOST: u8 = 1;
const REPLACED: u8 = 2;

/// The gate's state at one moment, in nanoseconds since its origin (0:
/// never), for [`explain`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Reading {
    now: u64,
    closed_at: Option<u64>,
    held_at: Option<u64>,
    owner: bool,
    not_owner: u8,
    not_owner_at: u64,
    lease_until: u64,
    confirmed_until: u64,
    /// Failsafe: until when every other site's peer lease runs (0: none).
    peer_until: u64,
    contact: u64,
}

/// Why a gate in state `r` is shut, and since when (in nanoseconds since
/// its origin); `None` when it is open. `wall` turns such nanoseconds into
/// wall-clock time. Without I/O or clock: the order says which cause wins
/// when several hold (a closed gate is closed whatever its clocks say).
fn explain(r: &Reading, wall: impl Fn(u64) -> SystemTime) -> Option<(FenceReason, u64)> {
    if let Some(at) = r.closed_at {
        return Some((FenceReason::Closed, at));
    }
    if let Some(at) = r.held_at {
        return Some((FenceReason::Draining, at));
    }
    if !r.owner {
        let reason = match r.not_owner {
            LEASE_LOST => FenceReason::LeaseLost,
            REPLACED => FenceReason::Replaced,
            _ => FenceReason::Unconfirmed,
        };
        return Some((reason, r.not_owner_at));
    }
    // Shut once the coordinator's clocks lapsed (the earlier of the two)
    // and, with failsafe, the peer leases too.
    let coordinator_lapsed = [r.lease_until, r.confirmed_until]
        .into_iter()
        .filter(|&until| r.now >= until)
        .min()?;
    if r.now < r.peer_until {
        return None;
    }
    let lapsed_at = coordinator_lapsed.max(r.peer_until);
    Some((
        FenceReason::CoordinatorUnreachable {
            since: wall(r.contact),
        },
        lapsed_at,
    ))
}

pub struct Gate {
    origin: Instant,
    /// `origin` on the wall clock (what status and metrics show).
    wall_origin: SystemTime,
    /// When a clock was last moved forward (the coordinator last heard
    /// from), in nanoseconds since `origin`.
    contact: AtomicU64,
    /// Why `owner` is false ([`UNCONFIRMED`], [`LEASE_LOST`],
    /// [`REPLACED`]) and since when.
    not_owner: AtomicU8,
    not_owner_at: AtomicU64,
    /// When `held` / `closed` were set (nanoseconds since `origin`).
    held_at: AtomicU64,
    closed_at: AtomicU64,
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
    /// Failsafe: since when changes pass on peer leases alone, and whose
    /// (set by the failsafe driver; status and metrics).
    failsafe: Mutex<Option<(SystemTime, Vec<String>)>>,
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
            wall_origin: SystemTime::now(),
            contact: AtomicU64::new(0),
            not_owner: AtomicU8::new(UNCONFIRMED),
            not_owner_at: AtomicU64::new(0),
            held_at: AtomicU64::new(0),
            closed_at: AtomicU64::new(0),
            lease_until: AtomicU64::new(0),
            confirmed_until: AtomicU64::new(0),
            peer_until: AtomicU64::new(0),
            admitted_revision: AtomicI64::new(0),
            owner: AtomicBool::new(false),
            held: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            suspend,
            lock: Mutex::new(()),
            failsafe: Mutex::new(None),
            changed: Condvar::new(),
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Moves a clock forward to `until` (never back: renewals and reads
    /// sent later may be seen first).
    /// Whether the clock moved.
    fn set_until(&self, slot: &AtomicU64, until: Instant) -> bool {
        let until = self.nanos(until);
        let moved = slot.fetch_max(until, Ordering::AcqRel) < until;
        self.changed.notify_all();
        moved
    }

    /// The coordinator moved one of its clocks: heard from now.
    fn heard_from_coordinator(&self, moved: bool) {
        if moved {
            self.contact
                .fetch_max(self.nanos(Instant::now()), Ordering::AcqRel);
        }
    }

    /// The lease may be acted on until `until` (the lease keeper).
    pub fn extend(&self, until: Instant) {
        let moved = self.set_until(&self.lease_until, until);
        self.heard_from_coordinator(moved);
    }

    /// A store read sent early enough to act on until `until` named this
    /// site owner (the store watcher).
    pub fn confirm(&self, until: Instant) {
        let moved = self.set_until(&self.confirmed_until, until);
        self.heard_from_coordinator(moved);
    }

    /// Every other site of the group granted a peer lease that may be
    /// acted on until `until` (failsafe).
    pub fn extend_peer(&self, until: Instant) {
        self.set_until(&self.peer_until, until);
    }

    /// Failsafe: changes pass on the peer leases of `sites` since
    /// `since` (None: not, or no longer).
    pub fn set_failsafe(&self, state: Option<(SystemTime, Vec<String>)>) {
        *self.failsafe.lock() = state;
    }

    /// Since when changes pass on peer leases alone, and whose.
    pub fn failsafe(&self) -> Option<(SystemTime, Vec<String>)> {
        self.failsafe.lock().clone()
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
            self.not_owner(REPLACED);
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
        self.not_owner(LEASE_LOST);
    }

    fn not_owner(&self, why: u8) {
        if self.owner.swap(false, Ordering::AcqRel) {
            self.not_owner.store(why, Ordering::Release);
            self.not_owner_at
                .store(self.nanos(Instant::now()), Ordering::Release);
        }
        self.changed.notify_all();
    }

    /// Holds changes (a migration drains) or lets them go on.
    pub fn hold(&self, held: bool) {
        if held {
            self.held_at
                .store(self.nanos(Instant::now()), Ordering::Release);
        }
        self.held.store(held, Ordering::Release);
        self.changed.notify_all();
    }

    /// Demotion or stop: fail whatever is held and everything after.
    pub fn close(&self) {
        if !self.closed.load(Ordering::Acquire) {
            self.closed_at
                .store(self.nanos(Instant::now()), Ordering::Release);
        }
        self.closed.store(true, Ordering::Release);
        self.changed.notify_all();
    }

    fn wall(&self, nanos: u64) -> SystemTime {
        self.wall_origin + Duration::from_nanos(nanos)
    }

    /// Why no change is acknowledged now, and since when; `None` while
    /// the gate is open.
    pub fn fenced_state(&self) -> Option<Fenced> {
        let held = self.held.load(Ordering::Acquire);
        let closed = self.closed.load(Ordering::Acquire);
        let reading = Reading {
            now: self.nanos(Instant::now()),
            closed_at: closed.then(|| self.closed_at.load(Ordering::Acquire)),
            held_at: held.then(|| self.held_at.load(Ordering::Acquire)),
            owner: self.owner.load(Ordering::Acquire),
            not_owner: self.not_owner.load(Ordering::Acquire),
            not_owner_at: self.not_owner_at.load(Ordering::Acquire),
            lease_until: self.lease_until.load(Ordering::Acquire),
            confirmed_until: self.confirmed_until.load(Ordering::Acquire),
            peer_until: self.peer_until.load(Ordering::Acquire),
            contact: self.contact.load(Ordering::Acquire),
        };
        explain(&reading, |n| self.wall(n)).map(|(reason, since)| Fenced {
            reason,
            since: self.wall(since),
        })
    }

    /// When the coordinator last extended one of the gate's clocks (a
    /// lease renewal or a read naming this site owner); `None`: never.
    pub fn last_contact(&self) -> Option<SystemTime> {
        match self.contact.load(Ordering::Acquire) {
            0 => None,
            n => Some(self.wall(n)),
        }
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

    fn wall(n: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(n)
    }

    #[test]
    fn the_reason_follows_the_state() {
        let open = Reading {
            now: 100,
            owner: true,
            lease_until: 200,
            confirmed_until: 300,
            contact: 50,
            ..Reading::default()
        };
        assert_eq!(explain(&open, wall), None);
        let lapsed = Reading { now: 250, ..open };
        assert_eq!(
            explain(&lapsed, wall),
            Some((FenceReason::CoordinatorUnreachable { since: wall(50) }, 200)),
            "fenced since the lease ran out; unreachable since the last contact"
        );
        let both = Reading { now: 400, ..open };
        assert_eq!(explain(&both, wall).map(|(_, at)| at), Some(200));
        let failsafe = Reading {
            peer_until: 350,
            ..lapsed
        };
        assert_eq!(explain(&failsafe, wall), None, "open on peer leases");
        let peers_lapsed = Reading {
            now: 360,
            ..failsafe
        };
        assert_eq!(
            explain(&peers_lapsed, wall).map(|(_, at)| at),
            Some(350),
            "shut when the last clock ran out"
        );
        let replaced = Reading {
            owner: false,
            not_owner: REPLACED,
            not_owner_at: 80,
            ..open
        };
        assert_eq!(explain(&replaced, wall), Some((FenceReason::Replaced, 80)));
        let lost = Reading {
            not_owner: LEASE_LOST,
            ..replaced
        };
        assert_eq!(explain(&lost, wall), Some((FenceReason::LeaseLost, 80)));
        let fresh = Reading {
            not_owner: UNCONFIRMED,
            not_owner_at: 0,
            ..replaced
        };
        assert_eq!(explain(&fresh, wall), Some((FenceReason::Unconfirmed, 0)));
        let draining = Reading {
            held_at: Some(90),
            ..lapsed
        };
        assert_eq!(explain(&draining, wall), Some((FenceReason::Draining, 90)));
        let closed = Reading {
            closed_at: Some(95),
            ..draining
        };
        assert_eq!(explain(&closed, wall), Some((FenceReason::Closed, 95)));
    }

    #[test]
    fn a_gate_says_why_it_is_shut() {
        let gate = Gate::fenced(false);
        assert_eq!(
            gate.fenced_state().map(|f| f.reason),
            Some(FenceReason::Unconfirmed)
        );
        assert_eq!(gate.last_contact(), None);
        let gate = owned(false, SHORT, LONG);
        assert_eq!(gate.fenced_state(), None);
        let contact = gate.last_contact().expect("extended");
        until_shut(&gate);
        let fenced = gate.fenced_state().expect("lapsed");
        assert_eq!(
            fenced.reason,
            FenceReason::CoordinatorUnreachable { since: contact }
        );
        assert!(fenced.since >= contact);
        assert!(fenced
            .reason
            .to_string()
            .starts_with("coordinator unreachable since 20"));
        gate.extend(Instant::now() + LONG);
        assert_eq!(gate.fenced_state(), None, "renewed");
        gate.deny(11);
        assert_eq!(
            gate.fenced_state().map(|f| f.reason),
            Some(FenceReason::Replaced)
        );
        gate.close();
        assert_eq!(
            gate.fenced_state().map(|f| f.reason.as_str()),
            Some("closed")
        );
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
