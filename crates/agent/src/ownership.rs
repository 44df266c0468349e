//! The agent's side of the coordinator (docs/FAILOVER.md): one lease per
//! agent, renewed by its own thread (which also extends the fencing gates),
//! and a loop that reads the store, runs the failover logic
//! (`tandem_coordinator::decide`) for every group and carries out what it
//! says: serve, claim, promote, demote, hand over.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tandem_config::CoordinatorKind;
use tandem_coordinator::decide::{decide, handover_txn, Decision, Local, Policy};
use tandem_coordinator::keys::{
    encode, GroupView, Keys, LagRecord, MemberReport, Request, RequestKind,
};
use tandem_coordinator::{lease, LeaseId, Op, Store, StoreError};
use tracing::{error, info, warn};

use crate::group::{GroupRuntime, Role, Shared};
use crate::hooks::{self, HookEnv};
use crate::AgentError;

/// How long a migration waits for the target to hold everything.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct Ownership {
    handle: Arc<Handle>,
    threads: Vec<JoinHandle<()>>,
}

/// What the API needs to make requests.
pub(crate) struct Handle {
    pub store: Arc<dyn Store>,
    pub keys: Keys,
    pub ttl: Duration,
    lease: Mutex<Option<(LeaseId, Instant)>>,
    stop: AtomicBool,
    shared: Arc<Shared>,
    runtimes: Arc<Vec<Arc<GroupRuntime>>>,
}

fn connect(shared: &Shared) -> Result<Arc<dyn Store>, AgentError> {
    let c = &shared.config.coordinator;
    let timeout = lease::renew_every(c.lease_ttl).max(Duration::from_millis(300));
    match c.kind {
        CoordinatorKind::Witness => {
            tandem_coordinator::witness::WitnessClient::new(&c.endpoints, timeout)
                .map(|s| Arc::new(s) as Arc<dyn Store>)
                .map_err(|e| AgentError::Coordinator(e.to_string()))
        }
        CoordinatorKind::Etcd => tandem_coordinator::etcd::EtcdStore::new(&c.endpoints, timeout)
            .map(|s| Arc::new(s) as Arc<dyn Store>)
            .map_err(|e| AgentError::Coordinator(e.to_string())),
        CoordinatorKind::None => Err(AgentError::Coordinator("no coordinator".into())),
    }
}

impl Ownership {
    pub fn start(
        shared: Arc<Shared>,
        runtimes: Arc<Vec<Arc<GroupRuntime>>>,
    ) -> Result<Ownership, AgentError> {
        let store = connect(&shared)?;
        let c = &shared.config.coordinator;
        let handle = Arc::new(Handle {
            store,
            keys: Keys::new(&c.prefix),
            ttl: c.lease_ttl,
            lease: Mutex::new(None),
            stop: AtomicBool::new(false),
            shared: Arc::clone(&shared),
            runtimes,
        });
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|source| AgentError::Io {
                    path: name.into(),
                    what: "start thread",
                    source,
                })
        };
        let keeper = {
            let h = Arc::clone(&handle);
            spawn("lease-keeper", Box::new(move || h.keep_lease()))?
        };
        let decider = {
            let h = Arc::clone(&handle);
            spawn("ownership", Box::new(move || h.run()))?
        };
        info!(kind = ?c.kind, endpoints = ?c.endpoints, ttl = ?c.lease_ttl, "coordinator decides ownership");
        Ok(Ownership {
            handle,
            threads: vec![keeper, decider],
        })
    }

    pub fn handle(&self) -> Arc<Handle> {
        Arc::clone(&self.handle)
    }

    /// Stops renewing. The lease is left to expire rather than revoked:
    /// an agent restarted within the TTL takes its groups back at once
    /// (a QEMU client with `reconnect-delay` sees no error), and one that
    /// does not come back is failed over after the TTL.
    pub fn stop(self) {
        self.handle.stop.store(true, Ordering::Release);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

impl Handle {
    /// The lease is renewed until [`Ownership::stop`], after the exports
    /// closed; decisions end as soon as the agent starts stopping.
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire) || self.shared.stop.load(Ordering::Acquire)
    }

    fn renewing(&self) -> bool {
        !self.stop.load(Ordering::Acquire)
    }

    /// Grants and renews this agent's lease; extends the gates.
    fn keep_lease(&self) {
        let every = lease::renew_every(self.ttl);
        while self.renewing() {
            let sent = Instant::now();
            let current = self.lease.lock().map(|(id, _)| id);
            let outcome = match current {
                None => self.store.grant(self.ttl).map(Some),
                Some(id) => self.store.keep_alive(id).map(|_| None),
            };
            let valid = sent + self.ttl.saturating_sub(lease::margin(self.ttl));
            match outcome {
                Ok(granted) => {
                    let mut l = self.lease.lock();
                    match granted {
                        Some(id) => {
                            info!(lease = format!("{id:x}"), "coordinator lease granted");
                            *l = Some((id, valid));
                        }
                        None => {
                            if let Some((_, until)) = l.as_mut() {
                                *until = valid;
                            }
                        }
                    }
                    drop(l);
                    self.extend_gates(valid);
                }
                Err(StoreError::LeaseNotFound(id)) => {
                    warn!(lease = format!("{id:x}"), "coordinator lease lost: writes are fenced until ownership is confirmed again");
                    *self.lease.lock() = None;
                    self.fence_all();
                }
                Err(e) => warn!("cannot renew the coordinator lease: {e}"),
            }
            let next = sent + every;
            while Instant::now() < next && self.renewing() {
                std::thread::sleep(
                    Duration::from_millis(20).min(next.saturating_duration_since(Instant::now())),
                );
            }
        }
    }

    fn extend_gates(&self, until: Instant) {
        for rt in self.runtimes.iter() {
            if let Some(gate) = rt.gate() {
                gate.extend(until);
            }
        }
    }

    fn fence_all(&self) {
        for rt in self.runtimes.iter() {
            if let Some(gate) = rt.gate() {
                gate.set_owner(false);
            }
        }
    }

    /// The decision loop.
    fn run(&self) {
        let prefix = self.keys.groups();
        let every = lease::renew_every(self.ttl);
        while !self.stopping() {
            let Some((lease, valid)) = *self.lease.lock() else {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            let snap = match self.store.range(&prefix) {
                Ok(s) => s,
                Err(e) => {
                    warn!("cannot read the coordinator: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            };
            for rt in self.runtimes.iter() {
                let view = GroupView::read(&self.keys, rt.name(), &snap);
                for (key, reason) in &view.unreadable {
                    warn!(%key, "unreadable coordinator value: {reason}");
                }
                if let Err(e) = self.act(rt, &view, lease, valid) {
                    error!(group = rt.name(), "{e}");
                }
                if let Err(e) = self.report(rt, lease) {
                    warn!(group = rt.name(), "cannot publish this site's report: {e}");
                }
            }
            let _ = self.store.wait(&prefix, snap.revision, every);
        }
    }

    fn policy(rt: &GroupRuntime) -> Policy {
        let cfg = &rt.cfg;
        let mut sites = vec![(cfg.primary.clone(), 0)];
        sites.extend(cfg.replicas.iter().map(|r| (r.site.clone(), r.priority)));
        Policy {
            group: cfg.name.clone(),
            sites,
            automatic: cfg.failover == tandem_config::FailoverPolicy::Automatic,
            max_lag: cfg.max_lag_on_failover.as_secs_f64(),
            freshest_first: cfg.mode == tandem_config::Mode::Sync,
        }
    }

    fn local(&self, rt: &GroupRuntime, lease: LeaseId) -> Local {
        let role = rt.role.lock();
        let fit = !rt.hook_failed.load(Ordering::Acquire);
        let site = self.shared.site.clone();
        match &*role {
            Role::Primary(p) => Local {
                site,
                lease,
                primary: true,
                epoch: p.epoch,
                fork: p.fork,
                tip: (
                    p.epoch,
                    p.capture.next_seq().saturating_sub(1).max(p.fork.1),
                ),
                consistent: true,
                fit,
            },
            Role::Replica(r) => {
                let pos = *r.position.lock();
                Local {
                    site,
                    lease,
                    primary: false,
                    epoch: pos.epoch.max(rt.epoch.load(Ordering::Acquire)),
                    fork: (0, 0),
                    tip: (pos.tip_epoch, pos.applied),
                    consistent: pos.consistent,
                    fit,
                }
            }
            Role::Down => Local {
                site,
                lease,
                primary: false,
                epoch: rt.epoch.load(Ordering::Acquire),
                fork: (0, 0),
                tip: (0, 0),
                consistent: false,
                fit: false,
            },
        }
    }

    fn act(
        &self,
        rt: &Arc<GroupRuntime>,
        view: &GroupView,
        lease: LeaseId,
        valid: Instant,
    ) -> Result<(), AgentError> {
        // One role change at a time, and none once the agent stops: the
        // agent's stop takes the same lock. A stopping agent, or a group
        // between roles (a failed transition), decides nothing.
        let _transition = rt.transition.lock();
        if self.stopping() || matches!(*rt.role.lock(), Role::Down) {
            return Ok(());
        }
        let local = self.local(rt, lease);
        let missing_since = {
            let mut since = rt.owner_missing_since.lock();
            match (&view.owner, *since) {
                (Some(_), _) => *since = None,
                (None, None) => *since = Some(Instant::now()),
                (None, Some(_)) => {}
            }
            *since
        };
        let decision = decide(&self.keys, &Self::policy(rt), view, &local);
        let shared = &self.shared;
        match decision {
            Decision::Idle => {}
            Decision::Serve { epoch, fork } => {
                *rt.owner.lock() = Some(shared.site.clone());
                rt.epoch.fetch_max(epoch, Ordering::AcqRel);
                if local.primary && local.epoch == epoch {
                    if let Some(gate) = rt.gate() {
                        gate.extend(valid);
                        if !gate.is_open() {
                            info!(
                                group = rt.name(),
                                epoch, "ownership confirmed: acknowledging writes"
                            );
                        }
                        gate.set_owner(true);
                    }
                } else if !local.primary {
                    // Handed over to this site (migration).
                    if local.tip.1 < fork.1 && local.tip.0 <= fork.0 {
                        return Ok(()); // still receiving up to the fork
                    }
                    self.promote(rt, epoch, valid)?;
                } else {
                    warn!(
                        group = rt.name(),
                        local = local.epoch,
                        store = epoch,
                        "serving under a newer epoch"
                    );
                }
            }
            Decision::Follow { owner, epoch } => {
                *rt.owner.lock() = Some(owner.clone());
                let owner_fork = view
                    .owner
                    .as_ref()
                    .map_or((0, 0), |(o, _)| (o.fork_epoch, o.fork_seq));
                if local.primary {
                    warn!(group = rt.name(), %owner, epoch, "another site owns the group: demoting");
                    rt.epoch.fetch_max(epoch, Ordering::AcqRel);
                    rt.demote(shared, epoch, owner_fork)?;
                    self.run_hook(rt, "on_demote", epoch);
                } else {
                    self.follow(rt, epoch);
                }
            }
            Decision::Stale { epoch } => {
                *rt.owner.lock() = None;
                if local.primary {
                    warn!(
                        group = rt.name(),
                        epoch, "a newer epoch exists: this site stops serving"
                    );
                    rt.epoch.fetch_max(epoch, Ordering::AcqRel);
                    rt.demote(shared, epoch, (u64::MAX, u64::MAX))?;
                    self.run_hook(rt, "on_demote", epoch);
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
                if forced && !local.primary && missing_since.is_none_or(|t| t.elapsed() < self.ttl)
                {
                    return Ok(());
                }
                let (won, _) = self
                    .store
                    .txn(&compares, &ops)
                    .map_err(|e| AgentError::Coordinator(e.to_string()))?;
                if !won {
                    return Ok(());
                }
                *rt.owner.lock() = Some(shared.site.clone());
                if local.primary {
                    info!(group = rt.name(), epoch, "ownership claimed");
                    if let Some(gate) = rt.gate() {
                        gate.extend(valid);
                        gate.set_owner(true);
                    }
                } else {
                    info!(
                        group = rt.name(),
                        epoch,
                        fork_epoch = fork.0,
                        fork_seq = fork.1,
                        "failover: this site takes the group over"
                    );
                    self.promote(rt, epoch, valid)?;
                }
            }
            Decision::Reattach { compares, ops } => {
                let _ = self.store.txn(&compares, &ops);
            }
            Decision::HandOver {
                to,
                epoch,
                request_id,
                to_lease,
            } => {
                self.hand_over(rt, view, &to, epoch, &request_id, to_lease)?;
            }
        }
        Ok(())
    }

    /// A replica learns the owner's epoch: older primaries are refused
    /// from now on, and a session of an older epoch is ended.
    fn follow(&self, rt: &GroupRuntime, epoch: u64) {
        let before = rt.epoch.fetch_max(epoch, Ordering::AcqRel);
        let role = rt.role.lock();
        if let Role::Replica(r) = &*role {
            let held = r.position.lock().epoch;
            if held < epoch {
                if before < epoch {
                    r.plan.end_session();
                }
                if let Some(mut g) = r.group.try_lock_for(Duration::from_millis(200)) {
                    if let Err(e) = g.set_epoch(epoch) {
                        warn!(group = rt.name(), "cannot record epoch {epoch}: {e}");
                    }
                }
            }
        }
    }

    fn promote(
        &self,
        rt: &Arc<GroupRuntime>,
        epoch: u64,
        valid: Instant,
    ) -> Result<(), AgentError> {
        let started = Instant::now();
        if let Err(e) = rt.promote(&self.shared, epoch) {
            // Nothing was acknowledged in this epoch (the gate never
            // opened): give the group back so the next site can take it.
            rt.hook_failed.store(true, Ordering::Release);
            self.release(rt);
            return Err(e);
        }
        if let Some(gate) = rt.gate() {
            gate.extend(valid);
            gate.set_owner(true);
        }
        info!(
            group = rt.name(),
            epoch,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "promoted: NBD export open"
        );
        if !self.run_hook(rt, "on_promote", epoch) {
            rt.hook_failed.store(true, Ordering::Release);
            if rt.cfg.on_promote_failure == tandem_config::OnPromoteFailure::Next {
                // Stop serving first (no acknowledgement after this), then
                // give the group to the next site.
                warn!(
                    group = rt.name(),
                    epoch, "on_promote failed: handing the group to the next site"
                );
                rt.demote(&self.shared, epoch, (u64::MAX, u64::MAX))?;
                self.release(rt);
            }
        }
        Ok(())
    }

    /// Deletes the owner key if it still names this site (a promotion
    /// that failed before any write was acknowledged).
    fn release(&self, rt: &GroupRuntime) {
        let Ok(snap) = self.store.range(&self.keys.group(rt.name())) else {
            return;
        };
        let view = GroupView::read(&self.keys, rt.name(), &snap);
        if let Some((o, rev)) = view.owner {
            if o.site == self.shared.site {
                let key = self.keys.owner(rt.name());
                let done = self.store.txn(
                    &[tandem_coordinator::Compare::ModRevision(key.clone(), rev)],
                    &[Op::Delete { key }],
                );
                error!(group = rt.name(), epoch = o.epoch, released = ?done.map(|d| d.0), "promotion failed: ownership given back, this site reports itself unfit");
            }
        }
    }

    /// Runs a hook if configured; true when it succeeded or is absent.
    fn run_hook(&self, rt: &GroupRuntime, which: &str, epoch: u64) -> bool {
        let command = match which {
            "on_promote" => rt.cfg.on_promote.clone(),
            _ => rt.cfg.on_demote.clone(),
        };
        let Some(command) = command else { return true };
        let files_dir = self.shared.layout.data_dir.join("files").join(rt.name());
        let env = HookEnv {
            group: rt.name(),
            site: &self.shared.site,
            epoch,
            nbd_sockets: rt.sockets(&self.shared),
            files_dir: files_dir.display().to_string(),
        };
        hooks::run(which, &command, &env, hooks::HOOK_TIMEOUT).is_ok()
    }

    /// Planned switchover: stop the VM, hold writes, drain to the target,
    /// hand the next epoch over, become its replica.
    fn hand_over(
        &self,
        rt: &Arc<GroupRuntime>,
        view: &GroupView,
        to: &str,
        epoch: u64,
        request_id: &str,
        to_lease: LeaseId,
    ) -> Result<(), AgentError> {
        info!(group = rt.name(), %to, epoch, request = request_id, "migration: handing the group over");
        self.run_hook(rt, "on_demote", epoch - 1);
        let (gate, capture) = match &*rt.role.lock() {
            Role::Primary(p) => (Arc::clone(&p.gate), Arc::clone(&p.capture)),
            _ => return Ok(()),
        };
        gate.set_owner(false);
        let last = capture.next_seq().saturating_sub(1);
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let acked = capture.lag(to).map(|l| l.acked).unwrap_or(0);
            let drained = capture.lag(to).is_ok_and(|l| l.bytes == 0 && !l.resyncing);
            if acked >= last && drained {
                break;
            }
            if Instant::now() >= deadline {
                gate.set_owner(true);
                let _ = self.store.txn(
                    &[],
                    &[Op::Delete {
                        key: self.keys.request(rt.name()),
                    }],
                );
                return Err(AgentError::Role(format!(
                    "migration of {} to {to}: the target did not catch up within {DRAIN_TIMEOUT:?}; writes resumed here",
                    rt.name()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let fork = match &*rt.role.lock() {
            Role::Primary(p) => (p.epoch, last.max(p.fork.1)),
            _ => return Ok(()),
        };
        let owner_rev = view.owner.as_ref().map_or(0, |(_, r)| *r);
        let (compares, ops) =
            handover_txn(&self.keys, rt.name(), owner_rev, to, to_lease, epoch, fork);
        let (done, _) = self
            .store
            .txn(&compares, &ops)
            .map_err(|e| AgentError::Coordinator(e.to_string()))?;
        if !done {
            gate.set_owner(true);
            return Err(AgentError::Role(
                "migration lost a race with another change of owner".into(),
            ));
        }
        *rt.owner.lock() = Some(to.to_owned());
        rt.epoch.fetch_max(epoch, Ordering::AcqRel);
        rt.demote(&self.shared, epoch, fork)?;
        info!(group = rt.name(), %to, epoch, "migration: handed over");
        Ok(())
    }

    /// Publishes this site's report (and, as owner, its replicas' lag).
    fn report(&self, rt: &GroupRuntime, lease: LeaseId) -> Result<(), StoreError> {
        let local = self.local(rt, lease);
        let report = MemberReport {
            site: local.site.clone(),
            lease,
            role: if local.primary {
                tandem_coordinator::keys::Role::Primary
            } else {
                tandem_coordinator::keys::Role::Replica
            },
            epoch: local.epoch,
            tip_epoch: local.tip.0,
            tip_seq: local.tip.1,
            consistent: local.consistent,
            fit: local.fit,
        };
        let mut ops = vec![Op::Put {
            key: self.keys.member(rt.name(), &local.site),
            value: encode(&report),
            lease,
        }];
        if let Role::Primary(p) = &*rt.role.lock() {
            if p.gate.is_open() {
                let replicas = p
                    .links
                    .iter()
                    .map(|l| {
                        let lag = p.capture.lag(&l.replica).ok();
                        let secs = lag
                            .and_then(|l| l.oldest)
                            .map_or(0.0, |t| t.elapsed().as_secs_f64());
                        let connected = l.info.lock().state
                            != tandem_replication::shipper::LinkState::Disconnected;
                        (l.replica.clone(), secs, connected)
                    })
                    .collect();
                ops.push(Op::Put {
                    key: self.keys.lag(rt.name()),
                    value: encode(&LagRecord {
                        epoch: p.epoch,
                        replicas,
                    }),
                    lease: 0,
                });
            }
        }
        self.store.txn(&[], &ops).map(|_| ())
    }

    /// Asks for a failover or migration of `group` (API). Waits until a
    /// site other than the current owner owns it, or `timeout`.
    pub fn request(
        &self,
        group: &str,
        kind: RequestKind,
        to: Option<String>,
        force: bool,
        timeout: Duration,
    ) -> Result<(String, u64), String> {
        let rt = self
            .runtimes
            .iter()
            .find(|r| r.name() == group)
            .ok_or_else(|| format!("no group named {group:?} on this site"))?;
        if let Some(to) = &to {
            if !rt.members().contains(to) {
                return Err(format!("{to} is not a site of group {group}"));
            }
        }
        let snap = self
            .store
            .range(&self.keys.group(group))
            .map_err(|e| e.to_string())?;
        let view = GroupView::read(&self.keys, group, &snap);
        let before = view.owner.as_ref().map(|(o, _)| (o.site.clone(), o.epoch));
        match (kind, &view.owner) {
            (RequestKind::Migrate, None) => {
                return Err("the group has no owner to migrate from".into())
            }
            (RequestKind::Migrate, Some((o, _))) if Some(&o.site) == to.as_ref() => {
                return Ok((o.site.clone(), o.epoch))
            }
            (RequestKind::Failover, Some((o, _))) if !force => {
                return Err(format!(
                    "{} owns {group} (epoch {}) and holds its lease: use `tandem migrate` for a planned move, or --force to fail over anyway",
                    o.site, o.epoch
                ));
            }
            _ => {}
        }
        // The request goes first: whoever sees the owner gone also sees
        // it, and waits a full TTL before claiming (F2).
        let req = Request {
            id: format!("{}-{}", self.shared.site, std::process::id()),
            kind,
            to: to.clone(),
        };
        self.store
            .txn(
                &[],
                &[Op::Put {
                    key: self.keys.request(group),
                    value: encode(&req),
                    lease: 0,
                }],
            )
            .map_err(|e| e.to_string())?;
        if let (RequestKind::Failover, Some((o, _))) = (kind, &view.owner) {
            // Take the lease away: the owner's renewals fail and it fences
            // itself within the TTL.
            warn!(group, owner = %o.site, "forced failover: revoking the owner's lease");
            let _ = self.store.revoke(o.lease);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let snap = self
                .store
                .range(&self.keys.group(group))
                .map_err(|e| e.to_string())?;
            let view = GroupView::read(&self.keys, group, &snap);
            if let Some((o, _)) = &view.owner {
                let moved = before
                    .as_ref()
                    .is_none_or(|(s, e)| *s != o.site || *e != o.epoch);
                let right = to.as_ref().is_none_or(|t| *t == o.site);
                if moved && right {
                    return Ok((o.site.clone(), o.epoch));
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("{group}: no new owner within {timeout:?}"));
            }
            let _ = self.store.wait(
                &self.keys.group(group),
                snap.revision,
                Duration::from_millis(500),
            );
        }
    }
}
