//! The lease keeper: grants this agent's lease and renews it every TTL/3,
//! extending every primary gate's lease clock with each renewal the store
//! grants (F2: until `sent + TTL - TTL/6`). A lease the store no longer
//! knows fences every gate at once; a new one is granted. No lease is
//! acted on before the site's instance key is held under it
//! ([`instance::acquire`]).

use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use tandem_coordinator::{lease, StoreError};
use tracing::{info, warn};

use super::{instance, Handle, Lease};

/// How the lease keeper's renewals went: what status and metrics say of
/// the coordinator (`tandem_coordinator_up`, the lease's age).
#[derive(Debug, Default)]
pub(crate) struct Contact {
    state: Mutex<ContactState>,
}

#[derive(Debug, Default)]
struct ContactState {
    /// When the last renewal (or grant) the store answered was sent.
    renewed: Option<(Instant, SystemTime)>,
    /// The last attempt failed (no answer, or an error).
    failing: bool,
}

impl Contact {
    fn answered(&self, sent: Instant) {
        let wall = SystemTime::now()
            .checked_sub(sent.elapsed())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut s = self.state.lock();
        s.renewed = Some((sent, wall));
        s.failing = false;
    }

    fn failed(&self) {
        self.state.lock().failing = true;
    }

    /// The coordinator answered the last renewal, and within `ttl`.
    pub fn reachable(&self, ttl: Duration) -> bool {
        let s = self.state.lock();
        !s.failing && s.renewed.is_some_and(|(at, _)| at.elapsed() < ttl)
    }

    /// Time since the last renewal the coordinator answered was sent.
    pub fn lease_age(&self) -> Option<Duration> {
        self.state.lock().renewed.map(|(at, _)| at.elapsed())
    }

    /// When that renewal was sent, on the wall clock.
    pub fn last_renewal(&self) -> Option<SystemTime> {
        self.state.lock().renewed.map(|(_, wall)| wall)
    }
}

pub(super) fn run(h: &Handle) {
    let every = lease::renew_every(h.ttl);
    let mut first = true;
    while h.running() {
        let sent = Instant::now();
        let current = h.lease().map(|l| l.id);
        let outcome = match current {
            None => h.store.grant(h.ttl).map(Some),
            Some(id) => h.store.keep_alive(id).map(|_| None),
        };
        let mut valid = h.valid_from(sent);
        // A new lease is acted on only once this site's instance key is
        // held under it (one running agent per site name).
        if let Ok(Some(id)) = outcome {
            match instance::acquire(h, id, sent, first) {
                instance::Acquired::Held { renewed } => {
                    first = false;
                    valid = h.valid_from(renewed);
                }
                instance::Acquired::LeaseLost => continue,
                instance::Acquired::Refused | instance::Acquired::Stopped => return,
            }
        }
        match &outcome {
            Ok(_) | Err(StoreError::LeaseNotFound(_)) => h.contact.answered(sent),
            Err(_) => h.contact.failed(),
        }
        match outcome {
            Ok(granted) => {
                {
                    let mut l = h.lease.lock();
                    match (granted, l.as_mut()) {
                        (Some(id), _) => {
                            info!(lease = format!("{id:x}"), "coordinator lease granted");
                            *l = Some(Lease { id, valid });
                        }
                        (None, Some(held)) => held.valid = valid,
                        (None, None) => {}
                    }
                }
                for m in h.members() {
                    if let Some(gate) = m.runtime.gate() {
                        gate.extend(valid);
                    }
                }
            }
            Err(StoreError::LeaseNotFound(id)) => {
                warn!(
                    lease = format!("{id:x}"),
                    "coordinator lease lost: writes are fenced until ownership is confirmed again (but while peer leases run: failsafe)"
                );
                *h.lease.lock() = None;
                for m in h.members() {
                    if let Some(gate) = m.runtime.gate() {
                        gate.lease_lost();
                    }
                }
            }
            Err(e) => warn!("cannot renew the coordinator lease: {e}"),
        }
        h.ended.wait_until(sent + every);
    }
}
