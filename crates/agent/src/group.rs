//! One group on this site and its role: primary (serves the volumes over
//! NBD, captures changes, ships them to every other site of the group) or
//! replica (receives, journals and applies). Promotion and demotion move
//! the same open images from one role to the other (docs/FAILOVER.md).

use std::collections::BTreeMap;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tandem_capture::{CaptureVolume, GroupCapture};
use tandem_config::Config;
use tandem_nbd::{Export, Server};
use tandem_replication::receiver::{GroupPlan, ReceiverContext};
use tandem_replication::replica::{Position, ReplicaGroup, ReplicaVolume};
use tandem_replication::shipper::{LinkInfo, Shipper};
use tandem_tls::TlsIdentity;
use tandem_volume::RawImage;
use tracing::{info, warn};

use crate::gate::Gate;
use crate::rolefile::{self, RoleRecord};
use crate::{bandwidth, catalog, replication, AgentError, Layout, SyncPolicy, VolumeExport};

/// How long a demoted primary lets its clients finish what they sent.
const DEMOTE_GRACE: Duration = Duration::from_secs(2);
/// How long a promotion waits for a replication session to let go.
const SESSION_RELEASE: Duration = Duration::from_secs(15);
/// How long an async shipper lets records gather after a send.
const ASYNC_GATHER: Duration = Duration::from_millis(1);

/// A group's open images, handed from one role to the next.
type Images = Vec<Arc<RawImage>>;
/// (epoch, seq) of the last record an image holds.
type Tip = (u64, u64);

/// What every group of this agent shares.
pub(crate) struct Shared {
    pub site: String,
    pub layout: Layout,
    pub config: Arc<Config>,
    pub tls: Option<Arc<TlsIdentity>>,
    pub bandwidth: Arc<bandwidth::Bandwidth>,
    pub receivers: Arc<ReceiverContext>,
    /// Exports offered on `site.nbd_listen`, as roles come and go.
    pub tcp_exports: Arc<RwLock<BTreeMap<String, Arc<dyn Export>>>>,
    /// A coordinator decides ownership (not `kind = "none"`).
    pub coordinated: bool,
    /// The agent is stopping.
    pub stop: Arc<AtomicBool>,
}

/// A shipper streaming a primary group to one other site.
#[derive(Clone)]
pub(crate) struct LinkHandle {
    pub replica: String,
    pub info: Arc<Mutex<LinkInfo>>,
    pub verify: crossbeam_channel::Sender<tandem_replication::shipper::VerifyJob>,
}

pub(crate) struct PrimaryRole {
    pub capture: Arc<GroupCapture>,
    pub epoch: u64,
    pub fork: (u64, u64),
    pub gate: Arc<Gate>,
    pub links: Vec<LinkHandle>,
    server: Arc<Server>,
    sockets: Vec<PathBuf>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

pub(crate) struct ReplicaRole {
    pub group: Arc<Mutex<ReplicaGroup>>,
    pub position: Arc<Mutex<Position>>,
    pub connected: Arc<AtomicBool>,
    pub plan: Arc<GroupPlan>,
}

pub(crate) enum Role {
    Primary(PrimaryRole),
    Replica(ReplicaRole),
    /// Between roles (or a transition failed).
    Down,
}

pub(crate) struct GroupRuntime {
    pub cfg: tandem_config::Group,
    pub role: Mutex<Role>,
    /// The last `on_promote` failed: this site says it is unfit.
    pub hook_failed: AtomicBool,
    /// The newest epoch this site has seen for the group.
    pub epoch: std::sync::atomic::AtomicU64,
    /// The owner as the coordinator last named it.
    pub owner: Mutex<Option<String>>,
    /// Since when this site has seen the group without an owner.
    pub owner_missing_since: Mutex<Option<std::time::Instant>>,
    /// Held while the role changes (ownership decisions, agent stop).
    pub transition: Mutex<()>,
}

impl GroupRuntime {
    pub fn new(cfg: tandem_config::Group) -> GroupRuntime {
        GroupRuntime {
            cfg,
            role: Mutex::new(Role::Down),
            hook_failed: AtomicBool::new(false),
            epoch: std::sync::atomic::AtomicU64::new(0),
            owner: Mutex::new(None),
            owner_missing_since: Mutex::new(None),
            transition: Mutex::new(()),
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

    /// Opens the images, or reuses those of the role being left.
    fn images(
        &self,
        shared: &Shared,
        reuse: Option<Vec<Arc<RawImage>>>,
    ) -> Result<(Vec<Arc<RawImage>>, Vec<bool>), AgentError> {
        if let Some(images) = reuse {
            let n = images.len();
            return Ok((images, vec![true; n]));
        }
        let mut images = Vec::new();
        let mut existed = Vec::new();
        for v in &self.cfg.volumes {
            let path = shared.layout.image(&v.name);
            existed.push(path.exists());
            images.push(Arc::new(RawImage::open_or_create(&path, v.size)?));
        }
        Ok((images, existed))
    }

    /// Starts serving the group: capture, NBD exports, shippers to every
    /// other site. `fresh` starts a new capture history at `fork` (a
    /// promotion); otherwise the capture state on disk is continued.
    pub fn start_primary(
        &self,
        shared: &Shared,
        epoch: u64,
        fork: (u64, u64),
        reuse: Option<Vec<Arc<RawImage>>>,
        fresh: bool,
    ) -> Result<(), AgentError> {
        let group = &self.cfg;
        let (images, mut existed) = self.images(shared, reuse)?;
        let capture_dir = shared.layout.capture_dir(&group.name);
        let capture_err = |source| AgentError::Capture {
            group: group.name.clone(),
            source,
        };
        if fresh {
            // A new owner's history starts where it took over: no dirty
            // regions of an older life, numbers after the fork.
            match std::fs::remove_dir_all(&capture_dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(AgentError::Io {
                        path: capture_dir,
                        what: "reset the capture state",
                        source,
                    })
                }
            }
            std::fs::create_dir_all(&capture_dir).map_err(|source| AgentError::Io {
                path: capture_dir.clone(),
                what: "create directory",
                source,
            })?;
            tandem_capture::seq::SeqAllocator::create_from(&capture_dir.join("seq"), fork.1 + 1)
                .map_err(capture_err)?;
            existed.iter_mut().for_each(|e| *e = false);
        }
        let volumes = group
            .volumes
            .iter()
            .zip(&images)
            .map(|(v, image)| CaptureVolume {
                name: v.name.clone(),
                image: Arc::clone(image),
            })
            .collect();
        let here = &shared.site;
        let others: Vec<String> = self.members().into_iter().filter(|s| s != here).collect();
        let capture = GroupCapture::open_with(
            &capture_dir,
            &group.name,
            volumes,
            &existed,
            &others,
            tandem_capture::QueueOptions::with_spill(group.queue_memory, group.max_queue),
        )
        .map_err(capture_err)?;
        let capture = Arc::new(capture);
        let gate = Arc::new(if shared.coordinated {
            Gate::fenced(group.on_lost_lease == tandem_config::OnLostLease::Suspend)
        } else {
            Gate::open()
        });
        let sync = (group.mode == tandem_config::Mode::Sync).then_some(SyncPolicy {
            replicas: group.sync_replicas as usize,
            degrade: group.on_sync_loss == tandem_config::OnSyncLoss::Degrade,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let mut role = PrimaryRole {
            capture: Arc::clone(&capture),
            epoch,
            fork,
            gate: Arc::clone(&gate),
            links: Vec::new(),
            server: Server::new(),
            sockets: Vec::new(),
            stop: Arc::clone(&stop),
            threads: Vec::new(),
        };
        for index in 0..capture.volumes().len() {
            let export: Arc<dyn Export> = Arc::new(
                (VolumeExport::with_sync(Arc::clone(&capture), index, sync, Arc::clone(&gate)))
                    .in_epoch(epoch),
            );
            listen_unix(shared, &mut role, Arc::clone(&export))?;
            shared
                .tcp_exports
                .write()
                .insert(export.name().to_owned(), export);
        }
        let files = if group.files.is_empty() {
            None
        } else {
            let set = Arc::new(tandem_replication::files::FileSet::default());
            let watcher = tandem_replication::files::watch(
                group.files.clone(),
                Arc::clone(&set),
                Arc::clone(&stop),
            )
            .map_err(|source| AgentError::Io {
                path: PathBuf::from(&group.name),
                what: "start the files watcher",
                source,
            })?;
            role.threads.push(watcher);
            Some(set)
        };
        for site in &others {
            let Some(peer) = shared.config.peer(site) else {
                continue;
            };
            // Async: records gather briefly into larger sends (fewer
            // wake-ups and syscalls on both sides). Sync: sent at once.
            let gather = match group.mode {
                tandem_config::Mode::Sync => Duration::ZERO,
                tandem_config::Mode::Async => ASYNC_GATHER,
            };
            start_shipper(
                shared,
                &mut role,
                site,
                &peer.address,
                files.clone(),
                gather,
            )?;
        }
        info!(group = %group.name, epoch, fork_epoch = fork.0, fork_seq = fork.1, volumes = capture.volumes().len(), replicas = others.len(), "serving group as primary");
        self.epoch.fetch_max(epoch, Ordering::AcqRel);
        rolefile::store(
            &shared.layout.data_dir,
            &group.name,
            &RoleRecord {
                primary: true,
                epoch,
                fork_epoch: fork.0,
                fork_seq: fork.1,
            },
        )
        .map_err(AgentError::Role)?;
        *self.role.lock() = Role::Primary(role);
        Ok(())
    }

    /// Starts receiving the group. `adopt` (demotion) sets the replica
    /// state from what the images hold: (tip, epoch followed).
    pub fn start_replica(
        &self,
        shared: &Shared,
        reuse: Option<Vec<Arc<RawImage>>>,
        adopt: Option<((u64, u64), u64)>,
    ) -> Result<(), AgentError> {
        let group = &self.cfg;
        let (images, _) = self.images(shared, reuse)?;
        let volumes = group
            .volumes
            .iter()
            .zip(images)
            .map(|(v, image)| ReplicaVolume {
                name: v.name.clone(),
                image,
            })
            .collect();
        let dir = shared.layout.replica_dir(&group.name);
        let replica_err = |source| AgentError::Replica {
            group: group.name.clone(),
            source,
        };
        let replica = match adopt {
            Some((tip, epoch)) => ReplicaGroup::adopt(&dir, &group.name, volumes, tip, epoch),
            None => ReplicaGroup::open(&dir, &group.name, volumes),
        }
        .map_err(replica_err)?;
        let position = replica.published();
        let held = replica.position().epoch;
        self.epoch.fetch_max(held, Ordering::AcqRel);
        let replica = Arc::new(Mutex::new(replica));
        let connected = Arc::new(AtomicBool::new(false));
        let plan = Arc::new(GroupPlan {
            name: group.name.clone(),
            primary: group.primary.clone(),
            replicas: self.members(),
            volumes: group
                .volumes
                .iter()
                .map(|v| (v.name.clone(), v.size))
                .collect(),
            group: Arc::clone(&replica),
            position: Arc::clone(&position),
            connected: Arc::clone(&connected),
            files_dir: shared.layout.data_dir.join("files").join(&group.name),
            files: group.files.clone(),
            session: Mutex::new(None),
        });
        {
            let mut plans = shared.receivers.groups.write();
            plans.retain(|p| p.name != group.name);
            plans.push(Arc::clone(&plan));
        }
        rolefile::store(
            &shared.layout.data_dir,
            &group.name,
            &RoleRecord {
                primary: false,
                epoch: self.epoch.load(Ordering::Acquire),
                fork_epoch: 0,
                fork_seq: 0,
            },
        )
        .map_err(AgentError::Role)?;
        info!(group = %group.name, "replica of this group: waiting for its primary");
        *self.role.lock() = Role::Replica(ReplicaRole {
            group: replica,
            position,
            connected,
            plan,
        });
        Ok(())
    }

    /// Leaves the replica role: no more sessions, everything received
    /// applied and synced. Returns the images and their tip.
    fn stop_replica(&self, shared: &Shared) -> Result<(Images, Tip, bool), AgentError> {
        let role = std::mem::replace(&mut *self.role.lock(), Role::Down);
        let Role::Replica(r) = role else {
            *self.role.lock() = role;
            return Err(AgentError::Role(format!(
                "group {} is not a replica here",
                self.name()
            )));
        };
        shared
            .receivers
            .groups
            .write()
            .retain(|p| !Arc::ptr_eq(p, &r.plan));
        r.plan.end_session();
        let Some(mut group) = r.group.try_lock_for(SESSION_RELEASE) else {
            return Err(AgentError::Role(format!(
                "group {}: the replication session did not end",
                self.name()
            )));
        };
        let replica_err = |source| AgentError::Replica {
            group: self.cfg.name.clone(),
            source,
        };
        group.commit().map_err(replica_err)?;
        group.checkpoint().map_err(replica_err)?;
        let consistent = group.position().consistent;
        let images = group
            .volumes()
            .iter()
            .map(|v| Arc::clone(&v.image))
            .collect();
        Ok((images, group.tip(), consistent))
    }

    /// Leaves the primary role: the exports close (held changes fail),
    /// shippers stop, the images are synced. Returns the images and the
    /// tip of this site's own history.
    fn stop_primary(
        &self,
        shared: &Shared,
        grace: Option<Duration>,
    ) -> Result<(Images, Tip, Arc<GroupCapture>), AgentError> {
        let role = std::mem::replace(&mut *self.role.lock(), Role::Down);
        let Role::Primary(p) = role else {
            *self.role.lock() = role;
            return Err(AgentError::Role(format!(
                "group {} is not served here",
                self.name()
            )));
        };
        match grace {
            // Agent stop: requests already received finish; a sync-mode
            // wait for replicas that cannot come is released after a
            // short grace.
            Some(grace) => {
                if p.server.shutdown(Duration::from_secs(5)) > 0 {
                    p.capture.close();
                    let left = p.server.shutdown(grace);
                    if left > 0 {
                        warn!(
                            group = self.name(),
                            connections = left,
                            "clients still connected after the grace period"
                        );
                    }
                }
            }
            // Demotion: held changes fail at once.
            None => {
                p.gate.close();
                let left = p.server.shutdown(DEMOTE_GRACE);
                if left > 0 {
                    warn!(
                        group = self.name(),
                        connections = left,
                        "NBD clients still connected after demotion"
                    );
                }
            }
        }
        for path in &p.sockets {
            let _ = std::fs::remove_file(path);
        }
        {
            let mut tcp = shared.tcp_exports.write();
            for v in &self.cfg.volumes {
                tcp.remove(&v.name);
            }
        }
        // Shippers send what they have queued (to replicas that still
        // take this epoch) and stop.
        p.stop.store(true, Ordering::Release);
        for t in p.threads {
            let _ = t.join();
        }
        p.capture.close();
        let images: Vec<Arc<RawImage>> = p
            .capture
            .volumes()
            .iter()
            .map(|v| Arc::clone(&v.image))
            .collect();
        for image in &images {
            image.sync()?;
        }
        let tip = (
            p.epoch,
            p.capture.next_seq().saturating_sub(1).max(p.fork.1),
        );
        Ok((images, tip, p.capture))
    }

    /// Replica -> primary of `epoch`. Everything received is applied
    /// first; the new history starts at the resulting tip (the fork).
    pub fn promote(&self, shared: &Shared, epoch: u64) -> Result<(), AgentError> {
        let (images, tip, consistent) = self.stop_replica(shared)?;
        if !consistent {
            warn!(group = self.name(), "promoted while inconsistent (forced)");
        }
        self.start_primary(shared, epoch, tip, Some(images), true)
    }

    /// Primary -> replica of the owner of `epoch`, whose history forked
    /// at `owner_fork`. What this site wrote after that fork is saved for
    /// forensics, then replaced by the new owner's data (resync).
    pub fn demote(
        &self,
        shared: &Shared,
        epoch: u64,
        owner_fork: (u64, u64),
    ) -> Result<(), AgentError> {
        let (images, mut tip, capture) = self.stop_primary(shared, None)?;
        // Every region clean in the dirty map means every replica, the new
        // owner included, acknowledged every write this site made: when
        // the new owner forked from this site's own epoch, these images are
        // exactly its fork (after a crash the sequence skips ahead, so the
        // numbers alone cannot tell).
        let clean = capture.dirty_ranges().iter().all(Vec::is_empty);
        if clean && owner_fork.0 == tip.0 && owner_fork.1 != u64::MAX {
            tip = owner_fork;
        }
        let diverged = tip != owner_fork;
        if diverged {
            match save_rollback(shared, self.name(), &capture, tip) {
                Ok(Some(path)) => {
                    warn!(group = self.name(), file = %path.display(), ?tip, ?owner_fork, "this site may hold writes the new owner never got (regions its dirty map marks): saved before they are rolled back")
                }
                Ok(None) => {}
                Err(e) => warn!(
                    group = self.name(),
                    "cannot save the rolled-back writes: {e}"
                ),
            }
        }
        drop(capture);
        self.start_replica(shared, Some(images), Some((tip, epoch)))
    }

    /// Stops whatever role runs (agent stop): clients finish, queued
    /// changes are sent, everything is synced.
    pub fn stop_graceful(&self, shared: &Shared, grace: Duration) -> Result<(), AgentError> {
        let _transition = self.transition.lock();
        let is_primary = matches!(&*self.role.lock(), Role::Primary(_));
        if is_primary {
            let (_, _, capture) = self.stop_primary(shared, Some(grace))?;
            // What every replica holds need not be compared after a
            // restart.
            if let Err(e) = capture.clear_replicated() {
                warn!(group = self.name(), "cannot clear the dirty map: {e}");
            }
            return Ok(());
        }
        let role = std::mem::replace(&mut *self.role.lock(), Role::Down);
        if let Role::Replica(r) = role {
            if let Some(mut group) = r.group.try_lock_for(Duration::from_secs(2)) {
                if let Err(e) = group.commit().and_then(|_| group.checkpoint()) {
                    warn!(group = self.name(), "final replica checkpoint failed: {e}");
                }
            }
        }
        Ok(())
    }

    /// The gate of the primary role, if this site serves the group.
    pub fn gate(&self) -> Option<Arc<Gate>> {
        match &*self.role.lock() {
            Role::Primary(p) => Some(Arc::clone(&p.gate)),
            _ => None,
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
}

/// Saves what the persistent dirty map marks (a superset of what the new
/// owner lacks) to `<data_dir>/rollback/<group>-e<epoch>-s<seq>.img` with
/// an index beside it, before the resync overwrites it.
fn save_rollback(
    shared: &Shared,
    group: &str,
    capture: &GroupCapture,
    tip: (u64, u64),
) -> Result<Option<PathBuf>, std::io::Error> {
    use std::io::Write;
    let ranges = capture.dirty_ranges();
    if ranges.iter().all(Vec::is_empty) {
        return Ok(None);
    }
    let dir = shared.layout.data_dir.join("rollback");
    std::fs::create_dir_all(&dir)?;
    let base = dir.join(format!("{group}-e{}-s{}", tip.0, tip.1));
    let data_path = base.with_extension("img");
    let mut data = std::fs::File::create(&data_path)?;
    let mut index = String::from("volume\toffset\tlength\tfile_offset\n");
    let mut at = 0u64;
    let mut buf = Vec::new();
    for (v, volume_ranges) in capture.volumes().iter().zip(ranges) {
        for (offset, len) in volume_ranges {
            buf.resize(len as usize, 0);
            v.image
                .read(offset, &mut buf)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            data.write_all(&buf)?;
            index.push_str(&format!("{}\t{offset}\t{len}\t{at}\n", v.name));
            at += len;
        }
    }
    data.sync_all()?;
    std::fs::write(base.with_extension("index"), index)?;
    Ok(Some(data_path))
}

fn listen_unix(
    shared: &Shared,
    role: &mut PrimaryRole,
    export: Arc<dyn Export>,
) -> Result<(), AgentError> {
    let path = shared.layout.socket(export.name());
    let io_err = |what| {
        let path = path.clone();
        move |source| AgentError::Io { path, what, source }
    };
    // A socket left by a killed agent; the image lock already proved that
    // no other agent serves this volume.
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove stale socket")(e)),
    }
    let listener = UnixListener::bind(&path).map_err(io_err("listen"))?;
    role.server
        .serve_unix(
            listener,
            Arc::new(catalog::SingleExport(Arc::clone(&export))),
        )
        .map_err(io_err("start accept thread"))?;
    info!(volume = export.name(), socket = %path.display(), size = export.size(), "NBD export ready");
    role.sockets.push(path);
    Ok(())
}

fn start_shipper(
    shared: &Shared,
    role: &mut PrimaryRole,
    replica: &str,
    address: &str,
    files: Option<Arc<tandem_replication::files::FileSet>>,
    gather: Duration,
) -> Result<(), AgentError> {
    let capture = &role.capture;
    let info = Arc::new(Mutex::new(LinkInfo::default()));
    let (address, site) = (address.to_owned(), replica.to_owned());
    let limiter = shared.bandwidth.limiter(replica);
    let tls = shared.tls.clone();
    let (verify_tx, verify_rx) = crossbeam_channel::unbounded();
    let shipper = Shipper {
        capture: Arc::clone(capture),
        local_site: shared.site.clone(),
        replica_site: replica.to_owned(),
        epoch: role.epoch,
        fork: role.fork,
        connect: Box::new(move || {
            let link = replication::connect(&address, &site, tls.as_deref())?;
            Ok(match &limiter {
                Some(limiter) => tandem_replication::shipper::Link {
                    writer: Box::new(tandem_replication::throttle::Throttled {
                        inner: link.writer,
                        limiter: Arc::clone(limiter),
                    }),
                    ..link
                },
                None => link,
            })
        }),
        link: Arc::clone(&info),
        stop: Arc::clone(&role.stop),
        files,
        verify: verify_rx,
        gather,
    };
    let name = format!("ship-{}-{replica}", capture.name());
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || shipper.run())
        .map_err(|source| AgentError::Io {
            path: PathBuf::from(capture.name()),
            what: "start replication thread",
            source,
        })?;
    role.links.push(LinkHandle {
        replica: replica.to_owned(),
        info,
        verify: verify_tx,
    });
    role.threads.push(thread);
    Ok(())
}
