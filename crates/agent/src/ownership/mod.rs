//! The agent's side of the coordinator (docs/FAILOVER.md): the driver of
//! the groups' ownership machines (`tandem_coordinator::machine`).
//!
//! Threads:
//! * **lease-keeper** — grants and renews the agent's one lease every
//!   TTL/3 and extends every primary gate's lease clock; a lost lease
//!   fences every gate at once.
//! * **store-watch** — reads the store, confirms (or fences) each
//!   primary's gate by what the read shows, hands each group's view to its
//!   actor (latest only: an actor busy with a transition skips views it
//!   did not get to), and publishes this site's reports.
//! * **fencer** — destroys the VM of a group whose gate lapsed, at once
//!   (G9), and tells the group's actor.
//! * **own-<n>**, the actor pool (`pool`): a few workers run the groups'
//!   actors, each stepping its group's machine and carrying out its
//!   effects: store transactions, role-change steps on the group's data
//!   plane, hooks, migration drains. A transition blocks only its own
//!   group: long effects get a worker of their own while they run, so a
//!   hanging hook or a slow promotion of one group delays no other group.

mod actor;
mod failsafe;
mod fencer;
mod instance;
mod keeper;
mod mailbox;
mod pool;
mod request;
mod watcher;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tandem_config::CoordinatorKind;
use tandem_coordinator::decide::Policy;
use tandem_coordinator::keys::Keys;
use tandem_coordinator::machine::{GroupMachine, PromoteFailure, Settings};
use tandem_coordinator::{lease, LeaseId, Store};
use tracing::{info, warn};

use crate::group::{GroupRuntime, Shared};
use crate::rolefile::RoleRecord;
use crate::signal::Signal;
use crate::AgentError;

pub(crate) use request::RequestError;
#[cfg(test)]
pub(crate) use request::Unable;

/// How long a migration waits for the target to hold everything.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The agent's lease: its id and until when it may be acted on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Lease {
    pub id: LeaseId,
    pub valid: Instant,
}

/// One group as the ownership driver sees it.
pub(crate) struct Member {
    pub runtime: Arc<GroupRuntime>,
    /// Stepped by the group's actor; read by the watcher for reports.
    pub machine: Mutex<GroupMachine>,
    inbox: mailbox::Mailbox,
    /// What the actor keeps between its turns (taken by the worker
    /// running the group).
    actor: Mutex<actor::ActorState>,
    /// Failsafe: the peer leases this site holds as the group's owner.
    pub failsafe: failsafe::GroupLeases,
}

/// What the driver's threads share; also what the API uses for requests.
pub(crate) struct Handle {
    pub store: Arc<dyn Store>,
    pub keys: Keys,
    pub ttl: Duration,
    lease: Mutex<Option<Lease>>,
    /// Decisions end (the agent stops); running hooks are killed.
    deciding_stopped: AtomicBool,
    /// The lease is no longer renewed, the store no longer watched.
    stopped: AtomicBool,
    /// Raised with `deciding_stopped` (wakes the fencer).
    deciding_ended: Signal,
    /// Raised with `stopped` (wakes the lease keeper).
    ended: Signal,
    shared: Arc<Shared>,
    members: RwLock<Vec<Arc<Member>>>,
    /// Runs the groups' actors.
    pool: pool::Pool,
    /// This agent's claim of its site name (one running agent per name).
    pub instance: instance::Instances,
    /// How the lease keeper's renewals went.
    pub contact: keeper::Contact,
    /// Failsafe: peer lease asks in flight.
    asks: failsafe::Asks,
}

pub(crate) struct Ownership {
    handle: Arc<Handle>,
    threads: Vec<JoinHandle<()>>,
}

/// The store of the configured coordinator (not `kind = "none"`, which
/// runs no ownership driver).
fn connect(shared: &Shared) -> Result<Arc<dyn Store>, AgentError> {
    let c = &shared.config().coordinator;
    let timeout = lease::renew_every(c.lease_ttl).max(Duration::from_millis(300));
    Ok(match c.kind {
        CoordinatorKind::Etcd => Arc::new(tandem_coordinator::etcd::EtcdStore::secure(
            &c.endpoints,
            timeout,
            etcd_security(&c.etcd)?,
        )?),
        // The site's own certificate proves who it is to the witness;
        // with TLS off (loopback only) it names itself in a header.
        CoordinatorKind::Witness => Arc::new(match &shared.tls {
            Some(identity) => {
                tandem_coordinator::witness::WitnessClient::tls(&c.endpoints, identity, timeout)?
            }
            None => tandem_coordinator::witness::WitnessClient::plain(
                &c.endpoints,
                &shared.site,
                timeout,
            )?,
        }),
        CoordinatorKind::None => return Err(AgentError::NoCoordinator),
    })
}

/// TLS and login towards etcd, from the `[coordinator] etcd_*` keys
/// (resolved by the configuration).
fn etcd_security(
    e: &tandem_config::EtcdAccess,
) -> Result<tandem_coordinator::etcd::Security, AgentError> {
    use tandem_coordinator::etcd::{EtcdConfigError, Login, Security};
    let tls = match &e.ca {
        Some(ca) => {
            let client = e.cert.as_deref().zip(e.key.as_deref());
            Some(
                tandem_coordinator::etcd_tls::EtcdTls::load(ca, client)
                    .map_err(EtcdConfigError::from)?,
            )
        }
        None => None,
    };
    let login = match (&e.user, &e.password_file) {
        (Some(user), Some(file)) => Some(Login::from_file(user, file)?),
        _ => None,
    };
    Ok(Security { tls, login })
}

/// The failover settings of a group, from its configuration.
fn settings(shared: &Shared, keys: &Keys, cfg: &tandem_config::Group) -> Settings {
    let mut sites = vec![(cfg.primary.clone(), 0)];
    sites.extend(cfg.replicas.iter().map(|r| (r.site.clone(), r.priority)));
    Settings {
        site: shared.site.clone(),
        keys: keys.clone(),
        policy: Policy {
            group: cfg.name.clone(),
            sites,
            automatic: cfg.failover == tandem_config::FailoverPolicy::Automatic,
            max_lag: cfg.max_lag_on_failover.as_secs_f64(),
            freshest_first: cfg.mode == tandem_config::Mode::Sync,
        },
        ttl: shared.config().coordinator.lease_ttl,
        on_promote: cfg.on_promote.is_some(),
        on_demote: cfg.on_demote.is_some(),
        on_promote_failure: match cfg.on_promote_failure {
            tandem_config::OnPromoteFailure::Next => PromoteFailure::Next,
            tandem_config::OnPromoteFailure::Report => PromoteFailure::Stay,
        },
        drain_timeout: DRAIN_TIMEOUT,
        vm: cfg.vm.is_some(),
        failsafe: shared.config().coordinator.failsafe,
    }
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, AgentError> {
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(f)
        .map_err(|source| AgentError::Thread {
            what: format!("start thread {name}"),
            source,
        })
}

impl Ownership {
    /// Starts deciding for `groups` (each with the role record it was
    /// opened from).
    pub fn start(
        shared: Arc<Shared>,
        groups: Vec<(Arc<GroupRuntime>, RoleRecord)>,
    ) -> Result<Ownership, AgentError> {
        let store = connect(&shared)?;
        let c = &shared.config().coordinator;
        let keys = Keys::new(&c.prefix);
        let me = instance::identify(&shared);
        let handle = Arc::new(Handle {
            store,
            keys,
            ttl: c.lease_ttl,
            lease: Mutex::new(None),
            deciding_stopped: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            deciding_ended: Signal::default(),
            ended: Signal::default(),
            shared: Arc::clone(&shared),
            members: RwLock::new(Vec::new()),
            pool: pool::Pool::default(),
            instance: instance::Instances::new(me),
            contact: keeper::Contact::default(),
            asks: failsafe::Asks::default(),
        });
        for (runtime, record) in groups {
            handle.add(runtime, &record)?;
        }
        let keeper = {
            let h = Arc::clone(&handle);
            spawn("lease-keeper".into(), move || keeper::run(&h))?
        };
        let watcher = {
            let h = Arc::clone(&handle);
            spawn("store-watch".into(), move || watcher::run(&h))?
        };
        let fencer = {
            let h = Arc::clone(&handle);
            spawn("fencer".into(), move || fencer::run(&h))?
        };
        let instance_watch = {
            let h = Arc::clone(&handle);
            spawn("instance-watch".into(), move || instance::watch(&h))?
        };
        let mut threads = vec![keeper, watcher, fencer, instance_watch];
        if c.failsafe {
            let h = Arc::clone(&handle);
            threads.push(spawn("failsafe".into(), move || failsafe::run(&h))?);
            *shared.receivers.grantor.write() = Some(Arc::new(failsafe::Grantor {
                h: Arc::downgrade(&handle),
            }));
        }
        // Groups join as they open (`Handle::add`), so none are counted here.
        let tls = match c.kind {
            tandem_config::CoordinatorKind::Witness => shared.tls.is_some(),
            _ => c.endpoints.iter().any(|e| e.starts_with("https://")),
        };
        info!(kind = ?c.kind, endpoints = ?c.endpoints, ttl = ?c.lease_ttl, tls, failsafe = c.failsafe,
            etcd_ca = c.etcd.ca.is_some(), etcd_client_cert = c.etcd.cert.is_some(),
            etcd_user = ?c.etcd.user, "coordinator decides ownership");
        Ok(Ownership { handle, threads })
    }

    pub fn handle(&self) -> Arc<Handle> {
        Arc::clone(&self.handle)
    }

    /// Ends every decision: running hooks are killed, a transition in
    /// progress stops after its current step (as a crash would leave it;
    /// the next start carries on from the role files and the store).
    pub fn stop_deciding(&mut self) {
        self.handle.deciding_stopped.store(true, Ordering::Release);
        self.handle.deciding_ended.raise();
        for m in self.handle.members() {
            m.inbox.close();
        }
        self.handle.pool.close();
    }

    /// Stops renewing and watching. The lease is left to expire rather
    /// than revoked: an agent restarted within the TTL takes its groups
    /// back at once (a QEMU client with `reconnect-delay` sees no error),
    /// and one that does not come back is failed over after the TTL.
    pub fn stop(mut self) {
        self.stop_deciding();
        *self.handle.shared.receivers.grantor.write() = None;
        self.handle.stopped.store(true, Ordering::Release);
        self.handle.ended.raise();
        for t in self.threads {
            let _ = t.join();
        }
        instance::release(&self.handle);
    }

    /// Why the agent must exit (another agent has its site name), once
    /// it must.
    pub fn fatal(&self) -> Option<String> {
        self.handle.instance.fatal()
    }

    /// Runs `f` once the agent must exit (at once if it must already).
    pub fn on_fatal(&self, f: Box<dyn FnOnce() + Send>) {
        self.handle.instance.on_fatal(f);
    }
}

impl Handle {
    /// Every group's member now.
    fn members(&self) -> Vec<Arc<Member>> {
        self.members.read().clone()
    }

    /// Starts deciding for a group (at start, or defined at runtime).
    pub fn add(
        self: &Arc<Self>,
        runtime: Arc<GroupRuntime>,
        record: &RoleRecord,
    ) -> Result<(), AgentError> {
        let settings = settings(&self.shared, &self.keys, &runtime.cfg);
        let others = settings
            .policy
            .sites
            .iter()
            .map(|(s, _)| s.clone())
            .filter(|s| *s != self.shared.site)
            .collect();
        let machine = GroupMachine::new(settings, record.start());
        let member = Arc::new(Member {
            runtime,
            machine: Mutex::new(machine),
            inbox: mailbox::Mailbox::default(),
            actor: Mutex::new(actor::ActorState::default()),
            failsafe: failsafe::GroupLeases::new(others),
        });
        self.members.write().push(member);
        Ok(())
    }

    /// Hands a view of the store to a group's actor; true when the group
    /// must be scheduled ([`pool::Pool::schedule_all`]).
    #[must_use]
    fn deliver(&self, m: &Member, seen: mailbox::Seen) -> bool {
        m.inbox.put(seen)
    }

    /// Tells a group's actor that the fencer destroyed its VM.
    fn deliver_fence(self: &Arc<Self>, m: &Arc<Member>) {
        if m.inbox.fenced() {
            self.pool.schedule(self, Arc::clone(m));
        }
    }

    /// Stops deciding for a group (it is being removed): its actor ends
    /// after the step it is in.
    pub fn remove(&self, group: &str) {
        let member = {
            let mut members = self.members.write();
            let i = members.iter().position(|m| m.runtime.name() == group);
            i.map(|i| members.remove(i))
        };
        let Some(member) = member else {
            return;
        };
        member.inbox.close();
        // A hook is killed after HOOK_TIMEOUT; a role change step ends
        // sooner.
        let bound = crate::hooks::HOOK_TIMEOUT + Duration::from_secs(60);
        if !member.inbox.wait_unscheduled(bound) {
            warn!(
                group,
                "removed while its actor still runs a step (waited {bound:?})"
            );
        }
    }

    fn deciding(&self) -> bool {
        !self.deciding_stopped.load(Ordering::Acquire) && !self.shared.stop.load(Ordering::Acquire)
    }

    fn running(&self) -> bool {
        !self.stopped.load(Ordering::Acquire)
    }

    fn lease(&self) -> Option<Lease> {
        *self.lease.lock()
    }

    /// Until when a store interaction sent at `sent` may be acted on (the
    /// same arithmetic as the lease's, F2).
    fn valid_from(&self, sent: Instant) -> Instant {
        sent + self.ttl.saturating_sub(lease::margin(self.ttl))
    }
}
