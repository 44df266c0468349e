//! A group's actor: steps the group's ownership machine and carries out
//! its effects, in order, feeding each effect's outcome back as the next
//! input. It runs in turns on the actor pool ([`super::pool`]), one worker
//! at a time per group: only it changes the group's role, so role changes
//! are serialized per group; other groups' actors run theirs at the same
//! time (long effects inside [`super::pool::Pool::blocking`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tandem_coordinator::machine::{Effect, Failed, Hook, Input, ServingStopped, Write};
use tandem_coordinator::{Compare, Op};
use tracing::{debug, error, info, warn};

use super::mailbox::Taken;
use super::{Handle, Member};
use crate::hooks::{self, HookEnv};

/// The store interaction that last showed this site's ownership: when it
/// was sent and the revision it showed.
#[derive(Clone, Copy)]
struct Contact {
    sent: Instant,
    revision: i64,
}

/// What a group's actor keeps between its turns.
pub(super) struct ActorState {
    contact: Contact,
    promoting_since: Option<Instant>,
}

impl Default for ActorState {
    fn default() -> Self {
        ActorState {
            contact: Contact {
                sent: Instant::now(),
                revision: 0,
            },
            promoting_since: None,
        }
    }
}

/// One turn of the group's actor: every input in its inbox, until it is
/// empty (which unschedules the group).
pub(super) fn turn(h: &Arc<Handle>, m: &Arc<Member>) {
    let mut state = m.actor.lock();
    let mut actor = Actor {
        h,
        m,
        state: &mut state,
    };
    while let Some(taken) = m.inbox.try_take() {
        let input = match taken {
            Taken::Fenced => Input::Fenced,
            Taken::View(seen) => {
                if m.runtime.cfg.vm.is_some() {
                    *m.runtime.vm_sites.lock() = seen
                        .view
                        .members
                        .iter()
                        .filter_map(|r| r.vm.clone().map(|state| (r.site.clone(), state)))
                        .collect();
                }
                actor.state.contact = Contact {
                    sent: seen.sent,
                    revision: seen.view.revision,
                };
                let seen = *seen;
                Input::Store {
                    view: Box::new(seen.view),
                    lease: seen.lease,
                    holding: m.runtime.holding(),
                }
            }
        };
        actor.drive(input);
    }
}

struct Actor<'a> {
    h: &'a Arc<Handle>,
    m: &'a Arc<Member>,
    state: &'a mut ActorState,
}

impl Actor<'_> {
    fn group(&self) -> &str {
        self.m.runtime.name()
    }

    /// Steps the machine until it waits for the store again.
    fn drive(&mut self, first: Input) {
        let mut next = Some(first);
        while let Some(input) = next.take() {
            if !self.h.deciding() {
                return;
            }
            let (effects, shown) = {
                let mut machine = self.m.machine.lock();
                let effects = machine.step(input, Instant::now());
                (effects, machine.shown())
            };
            let rt = &self.m.runtime;
            rt.epoch.fetch_max(shown.epoch, Ordering::AcqRel);
            *rt.owner.lock() = shown.owner;
            for effect in effects {
                if !self.h.deciding() {
                    // A transition left half-way, as a crash would leave
                    // it: the next start carries on from the role file and
                    // the store.
                    info!(
                        group = self.group(),
                        "agent stopping: role change left here"
                    );
                    return;
                }
                if let Some(answer) = self.carry_out(effect) {
                    debug_assert!(next.is_none(), "one answered effect per step");
                    next = Some(answer);
                }
            }
        }
    }

    fn txn(&mut self, compares: &[Compare], ops: &[Op]) -> Result<(bool, i64), Failed> {
        let sent = Instant::now();
        match self.h.store.txn(compares, ops) {
            Ok((applied, revision)) => {
                if applied {
                    self.state.contact = Contact { sent, revision };
                }
                Ok((applied, revision))
            }
            Err(e) => {
                warn!(group = self.group(), "coordinator transaction failed: {e}");
                Err(Failed)
            }
        }
    }

    /// Carries out one effect; its answer, if the machine waits for one.
    /// Effects that may take long (role changes, hooks, the VM, drains)
    /// run as the pool's blocking work.
    fn carry_out(&mut self, effect: Effect) -> Option<Input> {
        if is_long(&effect) {
            let h = Arc::clone(self.h);
            h.pool.blocking(&h, || self.carry_out_now(effect))
        } else {
            self.carry_out_now(effect)
        }
    }

    fn carry_out_now(&mut self, effect: Effect) -> Option<Input> {
        let shared = &self.h.shared;
        let rt = Arc::clone(&self.m.runtime);
        let group = rt.name().to_owned();
        match effect {
            Effect::Claim { compares, ops, .. } | Effect::HandOver { compares, ops, .. } => {
                Some(Input::Txn(self.txn(&compares, &ops)))
            }
            Effect::Write { why, compares, ops } => {
                let outcome = self.txn(&compares, &ops);
                match why {
                    Write::Release => {
                        error!(%group, released = ?outcome.map(|o| o.0).ok(), "ownership given back")
                    }
                    Write::Reattach => {
                        debug!(%group, moved = ?outcome.map(|o| o.0).ok(), "owner key moved to this agent's new lease")
                    }
                    Write::Withdraw => {
                        debug!(%group, withdrawn = ?outcome.map(|o| o.0).ok(), "migration request withdrawn")
                    }
                }
                Some(Input::Txn(outcome))
            }
            Effect::Admit => {
                if let Some(gate) = rt.gate() {
                    if let Some(lease) = self.h.lease() {
                        gate.extend(lease.valid);
                    }
                    let was_open = gate.is_open();
                    gate.admit(
                        self.state.contact.revision,
                        self.h.valid_from(self.state.contact.sent),
                    );
                    if !was_open && gate.is_open() {
                        info!(%group, "ownership confirmed: acknowledging writes");
                    }
                }
                if let Err(e) = rt.open_exports(shared) {
                    error!(%group, "cannot open the NBD exports: {e}");
                }
                None
            }
            Effect::Hold => Some(Input::Held(rt.hold().ok_or(Failed))),
            Effect::Resume => {
                rt.resume();
                None
            }
            Effect::StopReceiving => {
                self.state.promoting_since = Some(Instant::now());
                Some(Input::ReceivingStopped(rt.stop_receiving(shared).map_err(
                    |e| {
                        error!(%group, "promotion: leaving the replica role failed: {e}");
                        Failed
                    },
                )))
            }
            Effect::StartServing { epoch, fork } => {
                let result = rt.start_serving(shared, epoch, fork).map_err(|e| {
                    error!(%group, "promotion: serving failed: {e}");
                    Failed
                });
                if result.is_ok() {
                    let elapsed = self.state.promoting_since.take().map(|t| t.elapsed());
                    info!(
                        %group,
                        epoch,
                        elapsed_ms = elapsed.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                        "promoted: NBD export open"
                    );
                }
                Some(Input::Serving(result))
            }
            Effect::StopServing => Some(Input::ServingStopped(
                rt.stop_serving(shared)
                    .map(|(tip, clean)| ServingStopped { tip, clean })
                    .map_err(|e| {
                        error!(%group, "demotion: leaving the primary role failed: {e}");
                        Failed
                    }),
            )),
            Effect::SaveRollback { tip } => {
                rt.save_rollback(shared, tip);
                None
            }
            Effect::StartReceiving { tip, epoch } => Some(Input::Receiving(
                rt.start_receiving(shared, tip, epoch).map_err(|e| {
                    error!(%group, "demotion: becoming a replica failed: {e}");
                    Failed
                }),
            )),
            Effect::AdoptEpoch { epoch, end_session } => {
                rt.adopt_epoch(epoch, end_session);
                None
            }
            Effect::StartVm { epoch } => {
                rt.vm_started.store(true, Ordering::Release);
                let result = shared.vms.start(&rt.cfg);
                Some(Input::VmStarted(match result {
                    Ok(how) => {
                        info!(%group, epoch, vm = rt.cfg.vm.as_deref().unwrap_or_default(), ?how, "the VM runs here");
                        Ok(())
                    }
                    Err(e) => {
                        error!(%group, epoch, "the VM did not start: {e}");
                        Err(Failed)
                    }
                }))
            }
            Effect::StopVm { graceful } => {
                let result = shared.vms.stop(&rt.cfg, graceful);
                Some(Input::VmStopped(match result {
                    Ok(()) => {
                        rt.vm_started.store(false, Ordering::Release);
                        info!(%group, graceful, "the VM is stopped here");
                        Ok(())
                    }
                    Err(e) => {
                        error!(%group, "the VM could not be stopped: {e}");
                        Err(Failed)
                    }
                }))
            }
            Effect::RunHook { hook, epoch } => Some(Input::HookDone {
                hook,
                ok: self.run_hook(hook, epoch),
            }),
            Effect::AwaitDrain {
                to,
                through,
                deadline,
            } => Some(Input::Drained(rt.await_drain(
                &to,
                through,
                deadline,
                &self.h.deciding_stopped,
            ))),
        }
    }

    /// Runs a hook if configured; true when it succeeded or is absent.
    fn run_hook(&self, hook: Hook, epoch: u64) -> bool {
        let rt = &self.m.runtime;
        let command = match hook {
            Hook::OnPromote => rt.cfg.on_promote.clone(),
            Hook::OnDemote => rt.cfg.on_demote.clone(),
        };
        let Some(command) = command else { return true };
        let shared = &self.h.shared;
        let files_dir = shared.layout.data_dir.join("files").join(rt.name());
        let env = HookEnv {
            group: rt.name(),
            site: &shared.site,
            epoch,
            nbd_sockets: rt.sockets(shared),
            files_dir: files_dir.display().to_string(),
        };
        hooks::run(
            hook.key(),
            &command,
            &env,
            hooks::HOOK_TIMEOUT,
            &self.h.deciding_stopped,
        )
        .is_ok()
    }
}

/// Whether an effect may block its worker for long: anything but a store
/// transaction (bounded by the client's timeout) or a bookkeeping step.
fn is_long(effect: &Effect) -> bool {
    match effect {
        Effect::Claim { .. }
        | Effect::HandOver { .. }
        | Effect::Write { .. }
        | Effect::Admit
        | Effect::Hold
        | Effect::Resume => false,
        // Waits up to 200 ms for a running session to let go.
        Effect::AdoptEpoch { .. }
        | Effect::StopReceiving
        | Effect::StartServing { .. }
        | Effect::StopServing
        | Effect::SaveRollback { .. }
        | Effect::StartReceiving { .. }
        | Effect::StartVm { .. }
        | Effect::StopVm { .. }
        | Effect::RunHook { .. }
        | Effect::AwaitDrain { .. } => true,
    }
}
