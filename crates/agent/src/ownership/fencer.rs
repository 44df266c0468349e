//! The fencer: the moment a primary's gate lapses (its lease or its last
//! confirmation of ownership ran out, or a read showed another owner), the
//! VM its actor started is destroyed, whatever the actor is doing (a hook
//! may run for minutes). Another site starts the VM only after it claimed
//! the group, which the coordinator allows only after this site's lease
//! (or, for a forced failover, a TTL) ran out — later than the gate, whose
//! clocks end a margin before the lease does (G9). The actor is told
//! ([`super::mailbox::Mailbox::fenced`]) so its machine starts the VM
//! again once ownership is confirmed.
//!
//! The fencer stops when decisions stop: an agent that is stopping (or
//! restarting) leaves a running guest alone.
//!
//! It also says, in one log line each, when a primary's writes become
//! fenced (and why: "group G: writes fenced: coordinator unreachable since
//! T") and when they resume ([`Said`]).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use tracing::{error, info, warn};

use super::Handle;
use crate::gate::{FenceReason, Fenced};

/// What the log last said of a group's gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Said {
    /// Nothing yet (a new gate, not confirmed yet).
    Nothing,
    Open,
    Fenced(Fenced),
}

/// What to log now that a gate is `now`, after the log said `said`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Say {
    Fenced(Fenced),
    Resumed { after: Fenced },
}

/// One line when writes become fenced, one when the reason changes, one
/// when they resume; none for a gate that was never open yet (its actor
/// says when ownership is confirmed), nor for a demotion (its steps are
/// logged). Without I/O.
pub(super) fn say(said: Said, now: Option<Fenced>) -> (Said, Option<Say>) {
    match (said, now) {
        (Said::Nothing, None) => (Said::Open, None),
        (Said::Nothing, Some(_)) => (Said::Nothing, None),
        (Said::Open, None) => (Said::Open, None),
        (Said::Open | Said::Fenced(_), Some(f)) if f.reason == FenceReason::Closed => {
            (Said::Fenced(f), None)
        }
        (Said::Open, Some(f)) => (Said::Fenced(f), Some(Say::Fenced(f))),
        (Said::Fenced(was), Some(f)) if was.reason.as_str() == f.reason.as_str() => {
            (Said::Fenced(was), None)
        }
        (Said::Fenced(_), Some(f)) => (Said::Fenced(f), Some(Say::Fenced(f))),
        (Said::Fenced(was), None) if was.reason == FenceReason::Closed => (Said::Open, None),
        (Said::Fenced(was), None) => (Said::Open, Some(Say::Resumed { after: was })),
    }
}

/// How often the gates are looked at.
const EVERY: Duration = Duration::from_millis(50);

/// Logs what [`say`] says of one group.
fn log(group: &str, say: Say) {
    let ago = |at: SystemTime| at.elapsed().unwrap_or_default().as_secs_f64();
    match say {
        Say::Fenced(f) if f.reason == FenceReason::Draining => {
            info!(group, "group {group}: writes held: {}", f.reason)
        }
        Say::Fenced(f) => warn!(group, "group {group}: writes fenced: {}", f.reason),
        Say::Resumed { after } => info!(
            group,
            "group {group}: writes resumed after {:.1}s fenced ({})",
            ago(after.since),
            after.reason
        ),
    }
}

pub(super) fn run(h: &std::sync::Arc<Handle>) {
    // What the log said of each primary group, and the round it was last
    // seen in (a group gone, or no longer primary, is forgotten).
    let mut said: HashMap<String, (Said, u64)> = HashMap::new();
    let mut round = 0u64;
    while h.running() && h.deciding() {
        let started = Instant::now();
        round += 1;
        for m in h.members() {
            let rt = &m.runtime;
            if let Some(gate) = rt.gate() {
                let state = gate.fenced_state();
                let entry = match said.get_mut(rt.name()) {
                    Some(e) => e,
                    None => said
                        .entry(rt.name().to_owned())
                        .or_insert((Said::Nothing, round)),
                };
                let (now, line) = say(entry.0, state);
                if let Some(line) = line {
                    log(rt.name(), line);
                }
                *entry = (now, round);
            }
            if rt.cfg.vm.is_none() || !rt.vm_started.load(Ordering::Acquire) {
                continue;
            }
            let Some(gate) = rt.gate() else { continue };
            if !gate.lapsed() {
                continue;
            }
            warn!(group = rt.name(), "fenced: destroying the VM here");
            match h.shared.vms.destroy(&rt.cfg) {
                Ok(()) => {
                    rt.vm_started.store(false, Ordering::Release);
                    h.deliver_fence(&m);
                }
                Err(e) => error!(
                    group = rt.name(),
                    "fenced, but the VM could not be destroyed (trying again): {e}"
                ),
            }
        }
        said.retain(|_, (_, seen)| *seen == round);
        h.deciding_ended.wait_until(started + EVERY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fenced(reason: FenceReason, secs: u64) -> Fenced {
        Fenced {
            reason,
            since: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        }
    }

    #[test]
    fn one_line_when_fenced_one_when_resumed() {
        let start = fenced(FenceReason::Unconfirmed, 0);
        let (s, line) = say(Said::Nothing, Some(start));
        assert_eq!((s, line), (Said::Nothing, None), "a new gate is quiet");
        let (s, line) = say(s, None);
        assert_eq!((s, line), (Said::Open, None), "the actor says it opened");
        let unreachable = fenced(
            FenceReason::CoordinatorUnreachable {
                since: SystemTime::UNIX_EPOCH,
            },
            10,
        );
        let (s, line) = say(s, Some(unreachable));
        assert_eq!(line, Some(Say::Fenced(unreachable)));
        // Polled again and again while fenced: nothing more.
        for _ in 0..100 {
            let (again, line) = say(s, Some(unreachable));
            assert_eq!((again, line), (s, None));
        }
        let replaced = fenced(FenceReason::Replaced, 20);
        let (s, line) = say(s, Some(replaced));
        assert_eq!(line, Some(Say::Fenced(replaced)), "a new reason is said");
        let (s, line) = say(s, None);
        assert_eq!(line, Some(Say::Resumed { after: replaced }));
        assert_eq!(s, Said::Open);
        let (s, line) = say(s, Some(fenced(FenceReason::Closed, 30)));
        assert_eq!(line, None, "a demotion is logged by its steps");
        assert_eq!(say(s, None).1, None);
    }
}
