//! One group's ownership on one site, as a state machine without I/O
//! (docs/FAILOVER.md, "The group machine").
//!
//! [`GroupMachine::step`] takes an [`Input`] — what the store shows (with
//! this agent's lease and what the data plane holds), or the outcome of an
//! effect it asked for — and the time, and returns the [`Effect`]s to carry
//! out, in order. It never blocks, reads a clock or touches a lock: the
//! agent's driver (`crates/agent/src/ownership`) feeds it and carries its
//! effects out against the real store, images and hooks; the simulation
//! (`tests/sim.rs`) does the same against a simulated store, clock and data
//! plane, with crashes and partitions between any two steps.
//!
//! A role change is a *transition*: a sequence of effects, each answered by
//! an input before the next is asked for (promote: stop receiving -> start
//! serving -> `on_promote`; demote: stop serving -> save rollback -> start
//! receiving -> `on_demote`; hand over: `on_demote` -> hold writes -> drain
//! -> transaction -> demote). While one runs, what the store shows is not
//! acted on: the next store input after it ends is.
//!
//! A group that protects a VM (`vm = "libvirt:NAME"`, G9) adds two steps:
//! the VM starts after the primary role does and before `on_promote` (a VM
//! that does not start is a failed promotion), and it is stopped before
//! anything else when the site leaves the primary role (destroyed on a
//! demotion; shut down cleanly before a migration's handover). A replica
//! makes sure it does not run the VM. The machine starts the VM only while
//! the coordinator names this site owner, and starts it again after a
//! fence once ownership is confirmed ([`Input::Fenced`]).

use std::time::{Duration, Instant};

use crate::decide::{decide, handover_txn, Decision, Local, Policy};
use crate::failsafe::Refusal;
use crate::keys::{GroupView, Keys, LagRecord, MemberReport, RequestKind, Role};
use crate::{Compare, LeaseId, Op};

/// (epoch, sequence number) of a record: where a history stands.
pub type Tip = (u64, u64);

/// The owner fork a demotion gets when no new owner is known (a newer
/// epoch exists, or this site gives the group away): never equal to a tip,
/// so what this site wrote is saved and compared.
pub const UNKNOWN_FORK: Tip = (u64::MAX, u64::MAX);

/// How long a replica waits before it tries again to make sure it does
/// not run the VM, after an attempt failed (libvirt down): the store's
/// views come several times a second, and each attempt would otherwise
/// be another hypervisor call and another error in the log.
pub const VM_RETRY: Duration = Duration::from_secs(5);

/// An operator's command run at a role change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    OnPromote,
    OnDemote,
}

impl Hook {
    /// The configuration key, as hooks are named in logs.
    pub fn key(self) -> &'static str {
        match self {
            Hook::OnPromote => "on_promote",
            Hook::OnDemote => "on_demote",
        }
    }
}

/// `on_promote_failure`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromoteFailure {
    /// Keep serving; report unfit.
    Stay,
    /// Stop serving and give the group to the next site.
    Next,
}

/// A group's settings, from the configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// This site.
    pub site: String,
    pub keys: Keys,
    pub policy: Policy,
    /// The coordinator's lease TTL: a forced failover waits this long for
    /// the revoked owner to fence itself.
    pub ttl: Duration,
    /// Which hooks are configured.
    pub on_promote: bool,
    pub on_demote: bool,
    pub on_promote_failure: PromoteFailure,
    /// How long a migration waits for the target to hold every write.
    pub drain_timeout: Duration,
    /// The group protects a VM: it runs on the owner only (G9).
    pub vm: bool,
    /// Failsafe ownership (docs/FAILOVER.md, "Failsafe"): this site
    /// grants peer leases for `ttl`, and claims nothing during one.
    pub failsafe: bool,
}

/// What this site was for the group when the agent started (its role
/// file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Serving `epoch`, whose history began at `fork`.
    Primary { epoch: u64, fork: Tip },
    /// Receiving; the newest epoch it had seen.
    Replica { epoch: u64 },
}

/// What the data plane holds now, sampled by the driver with every store
/// input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Holding {
    /// Serving: the last sequence number issued (0: none yet).
    Serving { last_seq: u64 },
    /// Receiving: the newest epoch its state holds, the records its
    /// images hold, and whether they are a prefix of the stream (G3).
    Receiving {
        epoch: u64,
        tip: Tip,
        consistent: bool,
    },
    /// Neither (between roles).
    #[default]
    Nothing,
}

/// An effect failed; the driver logged why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failed;

/// What the machine is told.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// What the store shows of the group, under this agent's `lease`, and
    /// what the data plane holds.
    Store {
        view: Box<GroupView>,
        lease: LeaseId,
        holding: Holding,
    },
    /// A [`Effect::Claim`], [`Effect::HandOver`] or [`Effect::Write`]
    /// transaction ran: whether it applied, and the store's revision after
    /// it (the owner key's revision when a claim applied).
    Txn(Result<(bool, i64), Failed>),
    /// [`Effect::StopReceiving`] done: the images hold `tip`, and are a
    /// prefix of the stream if `consistent`.
    ReceivingStopped(Result<(Tip, bool), Failed>),
    /// [`Effect::StartServing`] done.
    Serving(Result<(), Failed>),
    /// [`Effect::StopServing`] done: the images hold this site's history
    /// up to `tip`; `clean` when its dirty map marks nothing (every
    /// replica acknowledged every write).
    ServingStopped(Result<ServingStopped, Failed>),
    /// [`Effect::StartReceiving`] done.
    Receiving(Result<(), Failed>),
    /// [`Effect::RunHook`] done.
    HookDone { hook: Hook, ok: bool },
    /// [`Effect::Hold`] done: writes are held; the last one issued.
    Held(Result<u64, Failed>),
    /// [`Effect::AwaitDrain`] done: whether the target caught up in time.
    Drained(bool),
    /// [`Effect::StartVm`] done: the VM runs here.
    VmStarted(Result<(), Failed>),
    /// [`Effect::StopVm`] done: the VM does not run here (an error: it
    /// may).
    VmStopped(Result<(), Failed>),
    /// The site's gate fenced itself (its lease or its last confirmation
    /// of ownership lapsed) and the driver destroyed the VM at once: the
    /// VM no longer runs here.
    Fenced,
}

/// How a primary's serving ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServingStopped {
    pub tip: Tip,
    pub clean: bool,
}

/// Why the machine writes to the store without waiting for the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// The owner key moves to this agent's new lease (a quick restart).
    Reattach,
    /// A promotion failed (or `on_promote` did, with `"next"`): the owner
    /// key is deleted if it still names this site, so the next site can
    /// take over.
    Release,
    /// A migration that could not complete withdraws its request.
    Withdraw,
}

/// What the driver is to do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Try to take ownership; answer [`Input::Txn`].
    Claim {
        epoch: u64,
        fork: Tip,
        compares: Vec<Compare>,
        ops: Vec<Op>,
    },
    /// End a migration: the target owns `epoch` from `fork`; answer
    /// [`Input::Txn`].
    HandOver {
        to: String,
        epoch: u64,
        fork: Tip,
        compares: Vec<Compare>,
        ops: Vec<Op>,
    },
    /// A transaction that changes no role; answer [`Input::Txn`] (its
    /// revision tells the machine which views are older than it).
    Write {
        why: Write,
        compares: Vec<Compare>,
        ops: Vec<Op>,
    },
    /// The coordinator names this site owner under its lease: acknowledge
    /// writes while the lease is valid.
    Admit,
    /// Hold writes (a migration drains); answer [`Input::Held`].
    Hold,
    /// Let held writes go on (a migration gave up).
    Resume,
    /// Leave the replica role: end the session, apply and sync everything
    /// received; answer [`Input::ReceivingStopped`].
    StopReceiving,
    /// Serve `epoch`, a new history from `fork`, on the images the replica
    /// role left; answer [`Input::Serving`].
    StartServing { epoch: u64, fork: Tip },
    /// Leave the primary role: exports close (held changes fail), shippers
    /// stop, images synced; answer [`Input::ServingStopped`].
    StopServing,
    /// Save the regions the dirty map marks: writes the new owner may
    /// never have got, before they are overwritten.
    SaveRollback { tip: Tip },
    /// Become a replica following `epoch` on the images the primary role
    /// left, which hold exactly `tip`; answer [`Input::Receiving`].
    StartReceiving { tip: Tip, epoch: u64 },
    /// A replica learns of `epoch`: it refuses older primaries from now on,
    /// and ends the running session if `end_session` (an older one).
    AdoptEpoch { epoch: u64, end_session: bool },
    /// Run a hook; answer [`Input::HookDone`].
    RunHook { hook: Hook, epoch: u64 },
    /// Wait until `to` holds every write up to `through` durably, or
    /// `deadline`; answer [`Input::Drained`].
    AwaitDrain {
        to: String,
        through: u64,
        deadline: Instant,
    },
    /// Define the VM from the group's definition (for this site) and start
    /// it, unless it runs already; answer [`Input::VmStarted`].
    StartVm { epoch: u64 },
    /// Make sure the VM does not run here: shut it down cleanly within a
    /// bound (`graceful`, a migration) or destroy it at once, then remove
    /// its definition from this host; answer [`Input::VmStopped`].
    StopVm { graceful: bool },
}

/// What the machine believes of the group's VM on this site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Not known (the agent started): neither started nor stopped yet.
    Unknown,
    /// Started by this machine (or found running at start on the owner).
    Up,
    /// Stopped (or never started) by this machine or the fencer.
    Down,
}

/// The role the data plane has, as the machine set it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    Primary {
        epoch: u64,
        fork: Tip,
    },
    Replica,
    /// Between roles after a failed transition: nothing is decided until
    /// the agent restarts.
    Down,
}

/// What a demotion does once the site is a replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct AfterDemote {
    hook: bool,
    /// Delete the owner key at this revision (give the group away).
    release: Option<i64>,
}

/// A transition in progress: which answer the machine waits for.
#[derive(Clone, Debug, PartialEq)]
enum Pending {
    Claim {
        epoch: u64,
        fork: Tip,
    },
    /// Promotion: the replica role is ending.
    StopReceiving {
        epoch: u64,
        owner_rev: i64,
    },
    /// Promotion: the primary role is starting.
    StartServing {
        epoch: u64,
        fork: Tip,
        owner_rev: i64,
    },
    /// Promotion: `on_promote` runs.
    PromoteHook {
        epoch: u64,
        owner_rev: i64,
    },
    /// Demotion: the primary role is ending.
    StopServing {
        epoch: u64,
        owner_fork: Tip,
        after: AfterDemote,
    },
    /// Demotion: the replica role is starting.
    StartReceiving {
        epoch: u64,
        after: AfterDemote,
    },
    /// Demotion: `on_demote` runs.
    DemoteHook,
    /// Migration: `on_demote` runs before writes are held.
    HandOverHook(HandingOver),
    /// Migration: writes are being held.
    Hold(HandingOver),
    /// The VM is being started (after a promotion when `promotion`).
    StartVm {
        epoch: u64,
        owner_rev: i64,
        promotion: bool,
    },
    /// The VM is being stopped; then `then`.
    StopVm(AfterStopVm),
    /// Migration: waiting for the target to hold every write.
    Drain {
        to: HandingOver,
        last: u64,
    },
    /// Migration: the handover transaction runs.
    HandOverTxn {
        epoch: u64,
        fork: Tip,
        to: String,
    },
    /// A transaction that changes no role runs.
    Write,
}

/// What follows a stop of the VM.
#[derive(Clone, Debug, PartialEq)]
enum AfterStopVm {
    Nothing,
    /// Leave the primary role.
    Demote {
        epoch: u64,
        owner_fork: Tip,
        after: AfterDemote,
    },
    /// Go on with a migration's handover.
    HandOver(HandingOver),
}

#[derive(Clone, Debug, PartialEq)]
struct HandingOver {
    to: String,
    /// The epoch the target gets.
    epoch: u64,
    to_lease: LeaseId,
    owner_rev: i64,
}

/// What the machine shows of itself (status, reports).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shown {
    pub role: Role,
    /// The newest epoch this site knows for the group.
    pub epoch: u64,
    /// The owner as the coordinator last named it.
    pub owner: Option<String>,
    /// Willing to take the group over (no failed promotion or hook).
    pub fit: bool,
    /// A transition runs.
    pub changing: bool,
}

/// One group's ownership on this site.
#[derive(Clone, Debug)]
pub struct GroupMachine {
    settings: Settings,
    held: Held,
    /// The newest epoch seen for the group.
    epoch: u64,
    owner: Option<String>,
    /// Since when the store has shown the group without an owner.
    owner_missing_since: Option<Instant>,
    fit: bool,
    pending: Option<Pending>,
    /// The store's revision after this machine's latest transaction: a
    /// view older than that does not show it yet and is not acted on
    /// (the driver may hand over a view read before the transaction).
    written: i64,
    /// The owner key's revision this site gave away (released): a view
    /// still naming this site owner at that revision is answered with the
    /// release again, never with a promotion.
    released: Option<i64>,
    vm: VmState,
    /// After a failed [`Effect::StopVm`]: not tried again before then.
    vm_retry_at: Option<Instant>,
    /// Why the site is unfit, when the VM is (`fit` is false).
    unfit: Option<Unfit>,
    /// The last [`Effect::StopVm`] failed (the hypervisor did not answer).
    stop_failed: bool,
    /// [`Decision::Exhausted`] was logged already.
    exhausted: bool,
    /// Failsafe: this site promised an owner not to claim the group
    /// before then (a peer lease it granted; F5).
    promised_until: Option<Instant>,
    /// The first input was taken (failsafe: a grant of the previous run
    /// may still run, so the first input promises a TTL).
    started: bool,
    /// The last view showed an operator's failover request.
    failover_requested: bool,
}

/// What made a site unfit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unfit {
    /// `on_promote` failed, or the VM failed to start while the
    /// hypervisor answered: until the agent restarts.
    Lasting,
    /// The VM did not start and the hypervisor has not answered since
    /// (libvirt down): fit again once a stop of the VM succeeds.
    HypervisorDown,
}

impl GroupMachine {
    /// The group's failover settings.
    pub fn policy(&self) -> &crate::decide::Policy {
        &self.settings.policy
    }

    pub fn new(settings: Settings, start: Start) -> GroupMachine {
        let (held, epoch) = match start {
            Start::Primary { epoch, fork } => (Held::Primary { epoch, fork }, epoch),
            Start::Replica { epoch } => (Held::Replica, epoch),
        };
        GroupMachine {
            settings,
            held,
            epoch,
            owner: None,
            owner_missing_since: None,
            fit: true,
            pending: None,
            written: 0,
            released: None,
            vm: VmState::Unknown,
            vm_retry_at: None,
            unfit: None,
            stop_failed: false,
            exhausted: false,
            promised_until: None,
            started: false,
            failover_requested: false,
        }
    }

    pub fn group(&self) -> &str {
        &self.settings.policy.group
    }

    /// What status and reports show.
    pub fn shown(&self) -> Shown {
        Shown {
            role: match self.held {
                Held::Primary { .. } => Role::Primary,
                Held::Replica => Role::Replica,
                Held::Down => Role::Down,
            },
            epoch: self.epoch.max(match self.held {
                Held::Primary { epoch, .. } => epoch,
                _ => 0,
            }),
            owner: self.owner.clone(),
            fit: self.fit,
            changing: self.pending.is_some(),
        }
    }

    /// What the machine believes of the VM here (`Unknown` for a group
    /// without one).
    pub fn vm(&self) -> VmState {
        self.vm
    }

    /// The epoch served and where it began, if this site is primary.
    pub fn serving(&self) -> Option<(u64, Tip)> {
        match self.held {
            Held::Primary { epoch, fork } => Some((epoch, fork)),
            _ => None,
        }
    }

    /// Failsafe (F5): `owner`, serving `epoch` without the coordinator,
    /// asks this site to promise not to claim the group for a TTL.
    /// Granted when this site is a replica that is not taking the group
    /// over and knows neither a newer epoch nor another owner of that
    /// one; the promise runs from `now` (its receipt) and holds even if
    /// this site learns of a failover meanwhile.
    pub fn grant(&mut self, owner: &str, epoch: u64, now: Instant) -> Result<Duration, Refusal> {
        if !self.settings.failsafe {
            return Err(Refusal::Disabled);
        }
        match self.held {
            Held::Primary { .. } => return Err(Refusal::Promoting),
            Held::Down => return Err(Refusal::Down),
            Held::Replica => {}
        }
        if matches!(
            self.pending,
            Some(
                Pending::Claim { .. }
                    | Pending::StopReceiving { .. }
                    | Pending::StartServing { .. }
                    | Pending::PromoteHook { .. }
                    | Pending::StartVm { .. }
            )
        ) {
            return Err(Refusal::Promoting);
        }
        if epoch < self.epoch {
            return Err(Refusal::NewerEpoch { epoch: self.epoch });
        }
        if epoch == self.epoch {
            if let Some(known) = self.owner.as_deref().filter(|o| *o != owner) {
                return Err(Refusal::OtherOwner {
                    owner: known.to_owned(),
                });
            }
        }
        if self.failover_requested {
            return Err(Refusal::FailoverRequested);
        }
        let until = now + self.settings.ttl;
        self.promised_until = Some(self.promised_until.map_or(until, |u| u.max(until)));
        Ok(self.settings.ttl)
    }

    /// Until when this site promised not to claim the group, if it did.
    pub fn promised_until(&self) -> Option<Instant> {
        self.promised_until
    }

    /// This site's report for the store.
    pub fn report(&self, lease: LeaseId, holding: Holding) -> MemberReport {
        let local = self.local(lease, holding);
        MemberReport {
            site: self.settings.site.clone(),
            lease,
            role: self.shown().role,
            epoch: local.epoch,
            tip_epoch: local.tip.0,
            tip_seq: local.tip.1,
            consistent: local.consistent,
            fit: local.fit,
            vm: None,
        }
    }

    /// The owner's lag record (primary only).
    pub fn lag_record(&self, replicas: Vec<(String, f64, bool)>) -> Option<LagRecord> {
        self.serving()
            .map(|(epoch, _)| LagRecord { epoch, replicas })
    }

    fn local(&self, lease: LeaseId, holding: Holding) -> Local {
        let site = self.settings.site.clone();
        match (self.held, holding) {
            (Held::Primary { epoch, fork }, holding) => {
                let last = match holding {
                    Holding::Serving { last_seq } => last_seq,
                    _ => 0,
                };
                Local {
                    site,
                    lease,
                    primary: true,
                    epoch,
                    fork,
                    tip: (epoch, last.max(fork.1)),
                    consistent: true,
                    fit: self.fit,
                }
            }
            (
                Held::Replica,
                Holding::Receiving {
                    epoch,
                    tip,
                    consistent,
                },
            ) => Local {
                site,
                lease,
                primary: false,
                epoch: epoch.max(self.epoch),
                fork: (0, 0),
                tip,
                consistent,
                // A replica not yet sure that it does not run the VM
                // decides nothing (libvirt down): no other site may wait
                // for it to take over.
                fit: self.fit && !(self.settings.vm && self.vm != VmState::Down),
            },
            _ => Local {
                site,
                lease,
                primary: false,
                epoch: self.epoch,
                fork: (0, 0),
                tip: (0, 0),
                consistent: false,
                fit: false,
            },
        }
    }

    /// Takes one input; returns what to do, in order.
    pub fn step(&mut self, input: Input, now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        if self.settings.failsafe && !self.started {
            // The previous run of this agent may have granted a peer
            // lease just before it stopped: honour it as if given now.
            self.started = true;
            let until = now + self.settings.ttl;
            self.promised_until = Some(self.promised_until.map_or(until, |u| u.max(until)));
        }
        match input {
            Input::Store {
                view,
                lease,
                holding,
            } => self.on_store(&view, lease, holding, now, &mut out),
            Input::Fenced => {
                if self.settings.vm {
                    tracing::warn!(group = %self.group(), "fenced: the VM was destroyed here");
                    self.vm = VmState::Down;
                }
            }
            answer => self.on_answer(answer, now, &mut out),
        }
        out
    }

    fn on_store(
        &mut self,
        view: &GroupView,
        lease: LeaseId,
        holding: Holding,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        self.failover_requested = view
            .request
            .as_ref()
            .is_some_and(|(r, _)| r.kind == RequestKind::Failover);
        match (&view.owner, self.owner_missing_since) {
            (Some(_), _) => self.owner_missing_since = None,
            (None, None) => self.owner_missing_since = Some(now),
            (None, Some(_)) => {}
        }
        // One role change at a time; a site between roles (a failed
        // transition) decides nothing; a view from before this machine's
        // own latest change is stale.
        if self.pending.is_some() || self.held == Held::Down || view.revision < self.written {
            return;
        }
        match (&view.owner, self.released) {
            (Some((o, rev)), Some(released))
                if o.site == self.settings.site && *rev == released =>
            {
                // The release did not take (or this view predates it).
                self.release(released, out);
                return;
            }
            (_, Some(_)) => self.released = None,
            _ => {}
        }
        if self.settings.vm && self.held == Held::Replica && self.vm != VmState::Down {
            // A replica never runs the VM (an agent that starts as a
            // replica, or one whose demotion left it unsure). It decides
            // nothing else until it is sure; after a failed attempt it
            // waits VM_RETRY before the next one.
            if self.vm_retry_at.is_some_and(|at| now < at) {
                return;
            }
            self.pending = Some(Pending::StopVm(AfterStopVm::Nothing));
            out.push(Effect::StopVm { graceful: false });
            return;
        }
        let local = self.local(lease, holding);
        let group = self.settings.policy.group.clone();
        match decide(&self.settings.keys, &self.settings.policy, view, &local) {
            Decision::Idle => {}
            Decision::Exhausted { epoch } => {
                if !self.exhausted {
                    self.exhausted = true;
                    tracing::error!(%group, epoch, "the group's epochs are used up: no site can take it over or be handed it (the owner, if any, keeps serving)");
                }
            }
            Decision::Serve { epoch, fork } => {
                self.owner = Some(self.settings.site.clone());
                self.epoch = self.epoch.max(epoch);
                let owner_rev = view.owner.as_ref().map_or(0, |(_, rev)| *rev);
                if local.primary && local.epoch == epoch {
                    out.push(Effect::Admit);
                    self.ensure_vm(epoch, owner_rev, false, now, out);
                } else if !local.primary {
                    // Handed over to this site (migration): the old owner
                    // drained every write to it, but the stream may not
                    // have reached the fork here yet.
                    if local.tip.1 < fork.1 && local.tip.0 <= fork.0 {
                        tracing::debug!(%group, tip = ?local.tip, ?fork, "owner of the group: still receiving up to the fork");
                        return;
                    }
                    self.promote(epoch, owner_rev, out);
                } else {
                    tracing::warn!(%group, local = local.epoch, store = epoch, "serving under a newer epoch");
                }
            }
            Decision::Follow { owner, epoch } => {
                self.owner = Some(owner.clone());
                let owner_fork = view
                    .owner
                    .as_ref()
                    .map_or((0, 0), |(o, _)| (o.fork_epoch, o.fork_seq));
                let before = self.epoch;
                self.epoch = self.epoch.max(epoch);
                if local.primary {
                    tracing::warn!(%group, %owner, epoch, "another site owns the group: demoting");
                    self.demote(
                        epoch,
                        owner_fork,
                        AfterDemote {
                            hook: true,
                            release: None,
                        },
                        out,
                    );
                } else if let Holding::Receiving { epoch: held, .. } = holding {
                    if held < epoch {
                        out.push(Effect::AdoptEpoch {
                            epoch,
                            end_session: before < epoch,
                        });
                    }
                }
            }
            Decision::Stale { epoch } => {
                self.owner = None;
                self.epoch = self.epoch.max(epoch);
                if local.primary {
                    tracing::warn!(%group, epoch, "a newer epoch exists: this site stops serving");
                    self.demote(
                        epoch,
                        UNKNOWN_FORK,
                        AfterDemote {
                            hook: true,
                            release: None,
                        },
                        out,
                    );
                }
            }
            Decision::Claim {
                epoch,
                fork,
                compares,
                ops,
            } => {
                // An owner taken away by `failover --force` lost its key
                // before its lease could lapse: give it the TTL to fence.
                let forced = view
                    .request
                    .as_ref()
                    .is_some_and(|(r, _)| r.kind == RequestKind::Failover);
                let fenced_by_now = self
                    .owner_missing_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= self.settings.ttl);
                if forced && !local.primary && !fenced_by_now {
                    return;
                }
                // F5: a peer lease this site granted runs: the owner may
                // still be acknowledging writes on it.
                if !local.primary && self.promised_until.is_some_and(|u| now < u) {
                    tracing::debug!(%group, "failover waits: this site granted the owner a peer lease");
                    return;
                }
                self.pending = Some(Pending::Claim { epoch, fork });
                out.push(Effect::Claim {
                    epoch,
                    fork,
                    compares,
                    ops,
                });
            }
            Decision::Reattach { compares, ops } => {
                self.pending = Some(Pending::Write);
                out.push(Effect::Write {
                    why: Write::Reattach,
                    compares,
                    ops,
                });
            }
            Decision::HandOver {
                to,
                epoch,
                request_id,
                to_lease,
            } => {
                tracing::info!(%group, %to, epoch, request = %request_id, "migration: handing the group over");
                let h = HandingOver {
                    to,
                    epoch,
                    to_lease,
                    owner_rev: view.owner.as_ref().map_or(0, |(_, rev)| *rev),
                };
                if self.settings.vm && self.vm != VmState::Down {
                    // Cold migration: the VM shuts down before the hand
                    // over and starts at the target after it.
                    self.pending = Some(Pending::StopVm(AfterStopVm::HandOver(h)));
                    out.push(Effect::StopVm { graceful: true });
                } else {
                    self.hand_over(h, out);
                }
            }
        }
    }

    /// A migration goes on once the VM is down: `on_demote`, then writes
    /// are held.
    fn hand_over(&mut self, h: HandingOver, out: &mut Vec<Effect>) {
        if self.settings.on_demote {
            out.push(Effect::RunHook {
                hook: Hook::OnDemote,
                // The epoch handed away (h.epoch came from a checked +1).
                epoch: h.epoch.saturating_sub(1),
            });
            self.pending = Some(Pending::HandOverHook(h));
        } else {
            out.push(Effect::Hold);
            self.pending = Some(Pending::Hold(h));
        }
    }

    /// The owner runs the VM: start it unless this machine started it
    /// already (or it failed here before: the site is unfit).
    /// Starts the VM unless it runs. An owner whose start failed (and who
    /// stays owner: `on_promote_failure = "report"`) tries again every
    /// [`VM_RETRY`]: serving the group without its VM is an outage.
    fn ensure_vm(
        &mut self,
        epoch: u64,
        owner_rev: i64,
        promotion: bool,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        if !self.settings.vm || self.vm == VmState::Up {
            return;
        }
        if !promotion && self.vm_retry_at.is_some_and(|at| now < at) {
            return;
        }
        self.pending = Some(Pending::StartVm {
            epoch,
            owner_rev,
            promotion,
        });
        out.push(Effect::StartVm { epoch });
    }

    /// Replica -> primary of `epoch` (owner key at `owner_rev`).
    fn promote(&mut self, epoch: u64, owner_rev: i64, out: &mut Vec<Effect>) {
        self.pending = Some(Pending::StopReceiving { epoch, owner_rev });
        out.push(Effect::StopReceiving);
    }

    /// Primary -> replica of `epoch`, whose owner's history forked at
    /// `owner_fork`.
    fn demote(&mut self, epoch: u64, owner_fork: Tip, after: AfterDemote, out: &mut Vec<Effect>) {
        if self.settings.vm && self.vm != VmState::Down {
            // G9: the VM goes first, before the data plane changes role.
            self.pending = Some(Pending::StopVm(AfterStopVm::Demote {
                epoch,
                owner_fork,
                after,
            }));
            out.push(Effect::StopVm { graceful: false });
            return;
        }
        self.pending = Some(Pending::StopServing {
            epoch,
            owner_fork,
            after,
        });
        out.push(Effect::StopServing);
    }

    /// Gives the group back: the owner key goes if it is still at
    /// `owner_rev` (this site's claim or handover).
    fn release(&mut self, owner_rev: i64, out: &mut Vec<Effect>) {
        let key = self.settings.keys.owner(self.group());
        self.released = Some(owner_rev);
        self.pending = Some(Pending::Write);
        out.push(Effect::Write {
            why: Write::Release,
            compares: vec![Compare::ModRevision(key.clone(), owner_rev)],
            ops: vec![Op::Delete { key }],
        });
    }

    fn on_answer(&mut self, answer: Input, now: Instant, out: &mut Vec<Effect>) {
        let group = self.settings.policy.group.clone();
        if let Input::Txn(Ok((_, revision))) = &answer {
            self.written = self.written.max(*revision);
        }
        let Some(pending) = self.pending.take() else {
            tracing::debug!(%group, ?answer, "an answer with no transition running: ignored");
            return;
        };
        match (pending, answer) {
            (Pending::Claim { epoch, fork }, Input::Txn(result)) => match result {
                Ok((true, revision)) => {
                    self.owner = Some(self.settings.site.clone());
                    self.epoch = self.epoch.max(epoch);
                    if self.serving().is_some() {
                        tracing::info!(%group, epoch, "ownership claimed");
                        out.push(Effect::Admit);
                        self.ensure_vm(epoch, revision, false, now, out);
                    } else {
                        tracing::info!(%group, epoch, fork_epoch = fork.0, fork_seq = fork.1, "failover: this site takes the group over");
                        self.promote(epoch, revision, out);
                    }
                }
                Ok((false, _)) => {}
                Err(Failed) => {}
            },
            (Pending::StopReceiving { epoch, owner_rev }, Input::ReceivingStopped(result)) => {
                match result {
                    Ok((tip, consistent)) => {
                        if !consistent {
                            tracing::warn!(%group, "promoted while inconsistent (forced)");
                        }
                        self.held = Held::Down;
                        self.pending = Some(Pending::StartServing {
                            epoch,
                            fork: tip,
                            owner_rev,
                        });
                        out.push(Effect::StartServing { epoch, fork: tip });
                    }
                    Err(Failed) => self.promotion_failed(owner_rev, out),
                }
            }
            (
                Pending::StartServing {
                    epoch,
                    fork,
                    owner_rev,
                },
                Input::Serving(result),
            ) => match result {
                Ok(()) => {
                    self.held = Held::Primary { epoch, fork };
                    self.epoch = self.epoch.max(epoch);
                    out.push(Effect::Admit);
                    if self.settings.vm {
                        self.ensure_vm(epoch, owner_rev, true, now, out);
                    } else {
                        self.promote_hook(epoch, owner_rev, out);
                    }
                }
                Err(Failed) => self.promotion_failed(owner_rev, out),
            },
            (
                Pending::StartVm {
                    epoch,
                    owner_rev,
                    promotion,
                },
                Input::VmStarted(result),
            ) => match result {
                Ok(()) => {
                    self.vm = VmState::Up;
                    self.vm_retry_at = None;
                    if self.unfit == Some(Unfit::HypervisorDown) {
                        // A retried start worked (the owner stayed).
                        self.fit = true;
                        self.unfit = None;
                    }
                    if promotion {
                        self.promote_hook(epoch, owner_rev, out);
                    }
                }
                Err(Failed) => {
                    // A failed start may leave a process behind: a
                    // demotion that follows destroys whatever is there.
                    self.vm = VmState::Unknown;
                    self.vm_retry_at = Some(now + VM_RETRY);
                    tracing::error!(%group, epoch, "the VM did not start here");
                    self.failed_as_owner(epoch, owner_rev, "the VM did not start", out);
                    self.unfit = Some(Unfit::HypervisorDown);
                }
            },
            (Pending::StopVm(then), Input::VmStopped(result)) => {
                match result {
                    Ok(()) => {
                        self.vm = VmState::Down;
                        // A start that failed while the hypervisor did not
                        // answer stops counting against this site once it
                        // answers again; one that failed although it
                        // answered lasts.
                        if self.unfit == Some(Unfit::HypervisorDown) {
                            if self.stop_failed {
                                tracing::info!(%group, "the hypervisor answers again: this site is fit to take the group over");
                                self.fit = true;
                                self.unfit = None;
                            } else {
                                self.unfit = Some(Unfit::Lasting);
                            }
                        }
                        self.stop_failed = false;
                        self.vm_retry_at = None;
                    }
                    Err(Failed) => {
                        // The data path is fenced or closing whatever
                        // happens; the VM is tried again at a decision
                        // VM_RETRY from now (and by the fencer while
                        // fenced).
                        tracing::error!(%group, retry_in = ?VM_RETRY, "the VM could not be stopped here");
                        self.stop_failed = true;
                        self.vm = VmState::Unknown;
                        self.vm_retry_at = Some(now + VM_RETRY);
                    }
                }
                match then {
                    AfterStopVm::Nothing => {}
                    AfterStopVm::Demote {
                        epoch,
                        owner_fork,
                        after,
                    } => {
                        // Demoting with the VM down (or unknown after an
                        // error: the stop is not tried twice).
                        self.pending = Some(Pending::StopServing {
                            epoch,
                            owner_fork,
                            after,
                        });
                        out.push(Effect::StopServing);
                    }
                    AfterStopVm::HandOver(h) => {
                        if self.vm == VmState::Down {
                            self.hand_over(h, out);
                        } else {
                            tracing::error!(%group, to = %h.to, "migration: the VM did not stop; the group stays here");
                            self.withdraw(out);
                        }
                    }
                }
            }
            (Pending::PromoteHook { epoch, owner_rev }, Input::HookDone { ok, .. }) => {
                if !ok {
                    self.failed_as_owner(epoch, owner_rev, "on_promote failed", out);
                }
            }
            (
                Pending::StopServing {
                    epoch,
                    owner_fork,
                    after,
                },
                Input::ServingStopped(result),
            ) => match result {
                Ok(ServingStopped { mut tip, clean }) => {
                    // Every region clean in the dirty map means every
                    // replica, the new owner included, acknowledged every
                    // write this site made: when the new owner forked from
                    // this site's own epoch, these images are exactly its
                    // fork (after a crash the sequence skips ahead, so the
                    // numbers alone cannot tell).
                    if clean && owner_fork.0 == tip.0 && owner_fork != UNKNOWN_FORK {
                        tip = owner_fork;
                    }
                    if tip != owner_fork {
                        out.push(Effect::SaveRollback { tip });
                    }
                    self.held = Held::Down;
                    self.pending = Some(Pending::StartReceiving { epoch, after });
                    out.push(Effect::StartReceiving { tip, epoch });
                }
                Err(Failed) => {
                    self.held = Held::Down;
                    if let Some(rev) = after.release {
                        self.release(rev, out);
                    }
                }
            },
            (Pending::StartReceiving { epoch, after }, Input::Receiving(result)) => match result {
                Ok(()) => {
                    self.held = Held::Replica;
                    if let Some(rev) = after.release {
                        self.release(rev, out);
                    } else if after.hook && self.settings.on_demote {
                        self.pending = Some(Pending::DemoteHook);
                        out.push(Effect::RunHook {
                            hook: Hook::OnDemote,
                            epoch,
                        });
                    }
                }
                Err(Failed) => {
                    self.held = Held::Down;
                    if let Some(rev) = after.release {
                        self.release(rev, out);
                    }
                }
            },
            (Pending::DemoteHook, Input::HookDone { .. }) => {}
            (Pending::Write, Input::Txn(_)) => {}
            (Pending::HandOverHook(h), Input::HookDone { .. }) => {
                self.pending = Some(Pending::Hold(h));
                out.push(Effect::Hold);
            }
            (Pending::Hold(h), Input::Held(result)) => match result {
                Ok(last) => {
                    out.push(Effect::AwaitDrain {
                        to: h.to.clone(),
                        through: last,
                        deadline: now + self.settings.drain_timeout,
                    });
                    self.pending = Some(Pending::Drain { to: h, last });
                }
                Err(Failed) => out.push(Effect::Resume),
            },
            (Pending::Drain { to: h, last }, Input::Drained(caught_up)) => {
                let Some((serving, fork)) = self.serving() else {
                    return;
                };
                if !caught_up {
                    tracing::error!(%group, to = %h.to, timeout = ?self.settings.drain_timeout, "migration: the target did not catch up in time; writes resume here");
                    out.push(Effect::Resume);
                    self.withdraw(out);
                    return;
                }
                let fork = (serving, last.max(fork.1));
                let (compares, ops) = handover_txn(
                    &self.settings.keys,
                    &group,
                    h.owner_rev,
                    &h.to,
                    h.to_lease,
                    h.epoch,
                    fork,
                );
                self.pending = Some(Pending::HandOverTxn {
                    epoch: h.epoch,
                    fork,
                    to: h.to.clone(),
                });
                out.push(Effect::HandOver {
                    to: h.to,
                    epoch: h.epoch,
                    fork,
                    compares,
                    ops,
                });
            }
            (Pending::HandOverTxn { epoch, fork, to }, Input::Txn(result)) => match result {
                Ok((true, _)) => {
                    tracing::info!(%group, %to, epoch, "migration: handed over");
                    self.owner = Some(to);
                    self.epoch = self.epoch.max(epoch);
                    self.demote(
                        epoch,
                        fork,
                        AfterDemote {
                            hook: false,
                            release: None,
                        },
                        out,
                    );
                }
                Ok((false, _)) | Err(Failed) => {
                    tracing::error!(%group, %to, "migration lost a race with another change of owner; writes resume here");
                    out.push(Effect::Resume);
                }
            },
            (pending, answer) => {
                // The driver answers every effect in order, so this is a
                // driver bug; keep waiting for the right answer.
                tracing::error!(%group, ?pending, ?answer, "an answer that does not fit the transition: ignored");
                self.pending = Some(pending);
            }
        }
    }

    /// Runs `on_promote` if configured (the promotion's last step).
    fn promote_hook(&mut self, epoch: u64, owner_rev: i64, out: &mut Vec<Effect>) {
        if self.settings.on_promote {
            self.pending = Some(Pending::PromoteHook { epoch, owner_rev });
            out.push(Effect::RunHook {
                hook: Hook::OnPromote,
                epoch,
            });
        }
    }

    /// The owner cannot do its job here (`on_promote` failed, or the VM
    /// did not start): the site reports itself unfit and, with
    /// `on_promote_failure = "next"`, stops serving (no acknowledgement
    /// after this) and gives the group to the next site.
    fn failed_as_owner(&mut self, epoch: u64, owner_rev: i64, why: &str, out: &mut Vec<Effect>) {
        self.fit = false;
        self.unfit = Some(Unfit::Lasting);
        if self.settings.on_promote_failure == PromoteFailure::Next {
            tracing::warn!(group = %self.group(), epoch, "{why}: handing the group to the next site");
            self.demote(
                epoch,
                UNKNOWN_FORK,
                AfterDemote {
                    hook: false,
                    release: Some(owner_rev),
                },
                out,
            );
        }
    }

    /// A migration that cannot complete withdraws its request.
    fn withdraw(&mut self, out: &mut Vec<Effect>) {
        let key = self.settings.keys.request(self.group());
        self.pending = Some(Pending::Write);
        out.push(Effect::Write {
            why: Write::Withdraw,
            compares: Vec::new(),
            ops: vec![Op::Delete { key }],
        });
    }

    /// A promotion failed before anything was acknowledged in its epoch
    /// (the gate never opened): the site reports itself unfit and gives
    /// the group back so the next site can take it.
    fn promotion_failed(&mut self, owner_rev: i64, out: &mut Vec<Effect>) {
        self.fit = false;
        self.unfit = Some(Unfit::Lasting);
        self.held = Held::Down;
        tracing::error!(group = %self.group(), "promotion failed: ownership given back, this site reports itself unfit");
        self.release(owner_rev, out);
    }
}
