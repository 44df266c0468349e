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

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::{error, warn};

use super::Handle;

/// How often the gates are looked at.
const EVERY: Duration = Duration::from_millis(50);

pub(super) fn run(h: &std::sync::Arc<Handle>) {
    while h.running() && h.deciding() {
        let started = Instant::now();
        for m in h.members() {
            let rt = &m.runtime;
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
        h.deciding_ended.wait_until(started + EVERY);
    }
}
