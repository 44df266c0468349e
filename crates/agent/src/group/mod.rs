//! One group on this site: its data plane, in one of two roles — primary
//! (serves the volumes over NBD, captures changes, ships them to every
//! other site of the group; [`primary`]) or replica (receives, journals and
//! applies; [`replica`]) — and the steps that move the same open images
//! from one role to the other (docs/FAILOVER.md). Which step runs when is
//! decided by the group's ownership machine; this module only carries the
//! steps out.

mod primary;
mod replica;
pub mod rollback;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tandem_capture::GroupCapture;
use tandem_config::Config;
use tandem_coordinator::machine::{Holding, Tip};
use tandem_nbd::Export;
use tandem_replication::receiver::ReceiverContext;
use tandem_tls::TlsIdentity;
use tandem_volume::RawImage;
use tracing::warn;

use crate::gate::Gate;
use crate::rolefile::{self, RoleRecord};
use crate::{bandwidth, AgentError, Layout};

pub(crate) use primary::{LinkHandle, PrimaryRole};
pub(crate) use replica::ReplicaRole;

/// A group's open images, handed from one role to the next.
type Images = Vec<Arc<RawImage>>;

/// The groups this agent runs: those of the configuration file, and those
/// defined at runtime as they come and go.
#[derive(Default)]
pub(crate) struct Groups {
    list: RwLock<Vec<Arc<GroupRuntime>>>,
}

impl Groups {
    /// Every group now.
    pub fn all(&self) -> Vec<Arc<GroupRuntime>> {
        self.list.read().clone()
    }

    pub fn find(&self, name: &str) -> Option<Arc<GroupRuntime>> {
        self.list.read().iter().find(|r| r.name() == name).cloned()
    }

    pub fn push(&self, rt: Arc<GroupRuntime>) {
        self.list.write().push(rt);
    }

    /// Takes a group out (it is being removed).
    pub fn remove(&self, name: &str) -> Option<Arc<GroupRuntime>> {
        let mut list = self.list.write();
        let i = list.iter().position(|r| r.name() == name)?;
        Some(list.remove(i))
    }
}

/// What every group of this agent shares.
pub(crate) struct Shared {
    pub site: String,
    pub layout: Layout,
    /// The configuration now (file and runtime groups); replaced by a
    /// reload (docs/CONFIG.md, "Reload"). Read it with [`Shared::config`].
    pub config: RwLock<Arc<Config>>,
    pub tls: Option<Arc<TlsIdentity>>,
    pub bandwidth: Arc<bandwidth::Bandwidth>,
    pub receivers: Arc<ReceiverContext>,
    /// The agent's NBD server (accept thread, worker pool, memory budget).
    pub nbd: Arc<tandem_nbd::Server>,
    /// Exports offered on `site.nbd_listen`, as roles come and go.
    pub tcp_exports: Arc<RwLock<BTreeMap<String, Arc<dyn Export>>>>,
    /// A coordinator decides ownership (not `kind = "none"`).
    pub coordinated: bool,
    /// This agent holds its site name in the coordinator (always, without
    /// one): until then no primary role connects to a replica
    /// (docs/FAILOVER.md, "One agent per site name").
    pub name_held: Arc<AtomicBool>,
    /// The agent is stopping.
    pub stop: Arc<AtomicBool>,
    /// The same, for threads that sleep between rounds.
    pub stopping: Arc<crate::signal::Signal>,
    /// This site's hypervisor, for the groups' VMs.
    pub vms: Arc<crate::vm::Vms>,
    /// The links to replica sites, one per site, shared by every group
    /// (docs/PEER.md, "Links"); made as the first group needs one.
    pub links: Mutex<BTreeMap<String, Arc<tandem_replication::link::SiteLink>>>,
    /// Since when each replica is in its state, and resync rates, for
    /// status.
    pub tracker: Arc<crate::cluster::Tracker>,
}

impl Shared {
    /// The configuration now.
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.config.read())
    }
}

/// The role the group's data plane has now.
pub(crate) enum Plane {
    Primary(PrimaryRole),
    Replica(ReplicaRole),
    /// Between roles (or a role change failed).
    Down,
}

/// The images (and the stopped capture) of the role just left, for the
/// next one.
struct Leaving {
    images: Images,
    capture: Option<Arc<GroupCapture>>,
}

pub(crate) struct GroupRuntime {
    pub cfg: tandem_config::Group,
    /// `on_promote` / `on_demote` now: `cfg`'s, or a reload's.
    pub hooks: RwLock<crate::hooks::GroupHooks>,
    pub plane: Mutex<Plane>,
    leaving: Mutex<Option<Leaving>>,
    /// The newest epoch this site knows for the group (status).
    pub epoch: AtomicU64,
    /// The owner as the coordinator last named it (status).
    pub owner: Mutex<Option<String>>,
    /// The group's actor started the VM here (or is starting it) and has
    /// not stopped it since: the fencer destroys it if the gate lapses.
    pub vm_started: AtomicBool,
    /// The VM's state at each site, as their reports in the coordinator
    /// last said (status).
    pub vm_sites: Mutex<Vec<(String, String)>>,
    /// The test views running on this site (replica role only).
    pub tests: crate::testview::Tests,
    /// `tandem recover`: the recovery point the next promotion of this
    /// replica rolls back to (docs/HISTORY.md).
    pub recover_at: Mutex<Option<tandem_replication::history::Point>>,
}

impl GroupRuntime {
    pub fn new(cfg: tandem_config::Group) -> GroupRuntime {
        GroupRuntime {
            hooks: RwLock::new(crate::hooks::GroupHooks::of(&cfg)),
            cfg,
            plane: Mutex::new(Plane::Down),
            leaving: Mutex::new(None),
            epoch: AtomicU64::new(0),
            owner: Mutex::new(None),
            vm_started: AtomicBool::new(false),
            vm_sites: Mutex::new(Vec::new()),
            tests: crate::testview::Tests::default(),
            recover_at: Mutex::new(None),
        }
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Every site of the group.
    pub fn members(&self) -> Vec<String> {
        let mut v = vec![self.cfg.primary.clone()];
        v.extend(self.cfg.replicas.iter().map(|r| r.site.clone()));
        v
    }

    /// Opens the group in the role its role file names (at first start:
    /// the configured one).
    pub fn open(&self, shared: &Shared, record: &RoleRecord) -> Result<(), AgentError> {
        if record.primary {
            let images = self.open_images(shared)?;
            let role = PrimaryRole::start(
                shared,
                &self.cfg,
                record.epoch,
                (record.fork_epoch, record.fork_seq),
                images,
                false,
            )?;
            self.become_primary(shared, role)
        } else {
            self.epoch.fetch_max(record.epoch, Ordering::AcqRel);
            let images = self.open_images(shared)?;
            let role = ReplicaRole::start(shared, &self.cfg, images.0, None)?;
            self.become_replica(shared, role)
        }
    }

    /// The images of the group's volumes, and which existed before.
    fn open_images(&self, shared: &Shared) -> Result<(Images, Vec<bool>), AgentError> {
        let mut images = Vec::new();
        let mut existed = Vec::new();
        for v in &self.cfg.volumes {
            let path = shared.layout.image(&v.name);
            existed.push(path.exists());
            images.push(Arc::new(RawImage::open_or_create(&path, v.size)?));
        }
        Ok((images, existed))
    }

    /// The images the last role left, or freshly opened ones (a restart
    /// between two steps of a role change).
    fn take_images(&self, shared: &Shared) -> Result<Images, AgentError> {
        match self.leaving.lock().take() {
            Some(l) => Ok(l.images),
            None => Ok(self.open_images(shared)?.0),
        }
    }

    fn become_primary(&self, shared: &Shared, role: PrimaryRole) -> Result<(), AgentError> {
        let (epoch, fork) = (role.epoch, role.fork);
        self.epoch.fetch_max(epoch, Ordering::AcqRel);
        rolefile::store(
            &shared.layout.data_dir,
            self.name(),
            &RoleRecord {
                primary: true,
                epoch,
                fork_epoch: fork.0,
                fork_seq: fork.1,
            },
        )?;
        *self.plane.lock() = Plane::Primary(role);
        Ok(())
    }

    fn become_replica(&self, shared: &Shared, role: ReplicaRole) -> Result<(), AgentError> {
        self.epoch.fetch_max(role.held_epoch(), Ordering::AcqRel);
        rolefile::store(
            &shared.layout.data_dir,
            self.name(),
            &RoleRecord {
                primary: false,
                epoch: self.epoch.load(Ordering::Acquire),
                fork_epoch: 0,
                fork_seq: 0,
            },
        )?;
        *self.plane.lock() = Plane::Replica(role);
        Ok(())
    }

    /// Leaves the replica role: no more sessions, everything received
    /// applied and synced. The images wait for the next role; returns
    /// their tip and whether they are a prefix (G3).
    pub fn stop_receiving(&self, shared: &Shared) -> Result<(Tip, bool), AgentError> {
        // A view reads the images through the history, which the primary
        // role does not keep.
        self.tests
            .stop_all(self.name(), "this replica is being promoted");
        let plane = std::mem::replace(&mut *self.plane.lock(), Plane::Down);
        let Plane::Replica(r) = plane else {
            *self.plane.lock() = plane;
            return Err(AgentError::WrongRole {
                group: self.name().to_owned(),
                expected: "a replica",
            });
        };
        let recover = self.recover_at.lock().take();
        let (images, tip, consistent) = r.stop(shared, self.name(), recover)?;
        *self.leaving.lock() = Some(Leaving {
            images,
            capture: None,
        });
        Ok((tip, consistent))
    }

    /// Serves `epoch`, a new history from `fork`, on the images the
    /// replica role left.
    pub fn start_serving(&self, shared: &Shared, epoch: u64, fork: Tip) -> Result<(), AgentError> {
        let images = self.take_images(shared)?;
        let existed = vec![true; images.len()];
        let role = PrimaryRole::start(shared, &self.cfg, epoch, fork, (images, existed), true)?;
        self.become_primary(shared, role)
    }

    /// Leaves the primary role: the exports close (held changes fail),
    /// shippers stop, the images are synced. Returns the tip of this
    /// site's own history and whether its dirty map is clean (every
    /// replica acknowledged every write).
    pub fn stop_serving(&self, shared: &Shared) -> Result<(Tip, bool), AgentError> {
        let plane = std::mem::replace(&mut *self.plane.lock(), Plane::Down);
        let Plane::Primary(p) = plane else {
            *self.plane.lock() = plane;
            return Err(AgentError::WrongRole {
                group: self.name().to_owned(),
                expected: "the primary",
            });
        };
        let (images, tip, capture) = p.stop(shared, &self.cfg, None)?;
        let clean = capture.dirty_ranges().iter().all(Vec::is_empty);
        *self.leaving.lock() = Some(Leaving {
            images,
            capture: Some(capture),
        });
        Ok((tip, clean))
    }

    /// Saves what the dirty map of the primary role just left marks: a
    /// superset of what the new owner may lack.
    pub fn save_rollback(&self, shared: &Shared, tip: Tip) {
        let leaving = self.leaving.lock();
        let Some(capture) = leaving.as_ref().and_then(|l| l.capture.as_ref()) else {
            return;
        };
        match rollback::save(&shared.layout.data_dir, self.name(), capture, tip) {
            Ok(Some(path)) => {
                warn!(group = self.name(), file = %path.display(), ?tip, "this site may hold writes the new owner never got (regions its dirty map marks): saved before they are rolled back")
            }
            Ok(None) => {}
            Err(e) => warn!(
                group = self.name(),
                "cannot save the rolled-back writes: {e}"
            ),
        }
    }

    /// Becomes a replica following `epoch` on the images the primary role
    /// left, which hold exactly `tip`.
    ///
    /// The regions the primary role's dirty map marks (a superset of the
    /// writes the new owner may lack) are kept beside the replica state,
    /// so that the new owner compares only those and its own writes
    /// (docs/REPLICA.md, "Divergence"); the map itself stays on disk until
    /// this site serves again.
    pub fn start_receiving(&self, shared: &Shared, tip: Tip, epoch: u64) -> Result<(), AgentError> {
        self.epoch.fetch_max(epoch, Ordering::AcqRel);
        let leaving = self.leaving.lock().take();
        let (images, capture) = match leaving {
            Some(l) => (l.images, l.capture),
            None => (self.open_images(shared)?.0, None),
        };
        let diverged = self.divergence(shared, capture.as_deref());
        let role = ReplicaRole::start(shared, &self.cfg, images, Some((tip, epoch, diverged)))?;
        self.become_replica(shared, role)
    }

    /// The regions the dirty map of the primary role just left marks, as
    /// (volume index, offset, length): from the stopped capture, or (a
    /// restart between the steps) from the map files. None when they
    /// cannot be read: the new owner then compares everything.
    fn divergence(
        &self,
        shared: &Shared,
        capture: Option<&GroupCapture>,
    ) -> Option<Vec<(u32, u64, u64)>> {
        let per_volume = match capture {
            Some(c) => c.dirty_ranges(),
            None => {
                let dir = shared.layout.capture_dir(self.name());
                let mut all = Vec::new();
                for v in &self.cfg.volumes {
                    let path = dir.join(format!("{}.dirty", v.name));
                    match tandem_capture::dirty::read_ranges(&path, v.size) {
                        Ok(r) => all.push(r),
                        Err(e) => {
                            warn!(
                                group = self.name(),
                                "{e}: the new owner will compare every region"
                            );
                            return None;
                        }
                    }
                }
                all
            }
        };
        let mut out = Vec::new();
        for (v, ranges) in per_volume.into_iter().enumerate() {
            let v = u32::try_from(v).ok()?;
            out.extend(ranges.into_iter().map(|(o, l)| (v, o, l)));
        }
        Some(out)
    }

    /// A replica learns of `epoch`: older primaries are refused from now
    /// on, and an older session is ended if `end_session`.
    pub fn adopt_epoch(&self, epoch: u64, end_session: bool) {
        self.epoch.fetch_max(epoch, Ordering::AcqRel);
        if let Plane::Replica(r) = &*self.plane.lock() {
            r.adopt_epoch(self.name(), epoch, end_session);
        }
    }

    /// What the data plane holds now, for the ownership machine.
    pub fn holding(&self) -> Holding {
        match &*self.plane.lock() {
            Plane::Primary(p) => Holding::Serving {
                last_seq: p.capture.next_seq().saturating_sub(1),
            },
            Plane::Replica(r) => {
                let pos = *r.position.lock();
                // In the middle of a resync, a replica with history is
                // promotable at its newest point (docs/HISTORY.md).
                match r.fallback() {
                    Some(p) => Holding::Receiving {
                        epoch: pos.epoch,
                        tip: (p.epoch, p.seq),
                        consistent: true,
                    },
                    None => Holding::Receiving {
                        epoch: pos.epoch,
                        tip: (pos.tip_epoch, pos.applied),
                        consistent: pos.consistent,
                    },
                }
            }
            Plane::Down => Holding::Nothing,
        }
    }

    /// The undo history of the replica role, if this site is a replica
    /// of the group that keeps one (docs/HISTORY.md).
    pub fn history(&self) -> Option<Arc<tandem_replication::history::History>> {
        match &*self.plane.lock() {
            Plane::Replica(r) => r.history.clone(),
            _ => None,
        }
    }

    /// The gate of the primary role, if this site serves the group.
    pub fn gate(&self) -> Option<Arc<Gate>> {
        match &*self.plane.lock() {
            Plane::Primary(p) => Some(Arc::clone(&p.gate)),
            _ => None,
        }
    }

    /// Opens the primary role's NBD exports (ownership is confirmed).
    pub fn open_exports(&self, shared: &Shared) -> Result<(), AgentError> {
        match &mut *self.plane.lock() {
            Plane::Primary(p) => p.open_exports(shared),
            _ => Ok(()),
        }
    }

    /// The change capture of the primary role.
    pub fn capture(&self) -> Option<Arc<GroupCapture>> {
        match &*self.plane.lock() {
            Plane::Primary(p) => Some(Arc::clone(&p.capture)),
            _ => None,
        }
    }

    /// Holds writes (a migration drains); the last one issued.
    pub fn hold(&self) -> Option<u64> {
        match &*self.plane.lock() {
            Plane::Primary(p) => {
                p.gate.hold(true);
                Some(p.capture.next_seq().saturating_sub(1))
            }
            _ => None,
        }
    }

    /// Lets held writes go on.
    pub fn resume(&self) {
        if let Some(gate) = self.gate() {
            gate.hold(false);
        }
    }

    /// Waits until `to` holds every change up to `through` durably (and
    /// owes no resync), or `deadline`, or `stop`.
    pub fn await_drain(
        &self,
        to: &str,
        through: u64,
        deadline: Instant,
        stop: &AtomicBool,
    ) -> bool {
        let Some(capture) = self.capture() else {
            return false;
        };
        loop {
            let drained = capture
                .lag(to)
                .is_ok_and(|l| l.acked >= through && l.bytes == 0 && !l.resyncing);
            if drained {
                return true;
            }
            if Instant::now() >= deadline || stop.load(Ordering::Acquire) {
                return false;
            }
            capture.wait_acknowledged(Duration::from_millis(20));
        }
    }

    /// Sockets of the exports, for hooks.
    pub fn sockets(&self, shared: &Shared) -> Vec<String> {
        self.cfg
            .volumes
            .iter()
            .map(|v| shared.layout.socket(&v.name).display().to_string())
            .collect()
    }

    /// Stops whatever role runs (agent stop): clients finish, queued
    /// changes are sent, everything is synced.
    pub fn stop_graceful(&self, shared: &Shared, grace: Duration) -> Result<(), AgentError> {
        self.tests
            .stop_all(self.name(), "the group stops on this site");
        let plane = std::mem::replace(&mut *self.plane.lock(), Plane::Down);
        match plane {
            Plane::Primary(p) => {
                let (_, _, capture) = p.stop(shared, &self.cfg, Some(grace))?;
                // What every replica holds need not be compared after a
                // restart.
                if let Err(e) = capture.clear_replicated() {
                    warn!(group = self.name(), "cannot clear the dirty map: {e}");
                }
            }
            Plane::Replica(r) => r.close(shared, self.name()),
            Plane::Down => {}
        }
        Ok(())
    }
}
