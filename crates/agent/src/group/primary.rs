//! The primary role of a group: change capture over the images, one NBD
//! export per volume behind the fencing gate, a shipper to every other
//! site of the group, and the watcher of its configuration files.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tandem_capture::{CaptureVolume, GroupCapture};
use tandem_coordinator::machine::Tip;
use tandem_nbd::{Export, Scope};
use tandem_replication::files::Watched;
use tandem_replication::shipper::{Link, Shipper, SiteLink};
use tandem_volume::RawImage;
use tracing::{info, warn};

use super::{Images, Shared};
use crate::gate::Gate;
use crate::{catalog, replication, AgentError, SyncPolicy, VolumeExport};

/// How long a demoted primary lets its clients finish what they sent.
const DEMOTE_GRACE: Duration = Duration::from_secs(2);
/// How long an async shipper lets records gather after a send.
const ASYNC_GATHER: Duration = Duration::from_millis(1);

/// A shipper streaming a primary group to one other site.
#[derive(Clone)]
pub(crate) struct LinkHandle {
    pub replica: String,
    pub link: Arc<Link>,
    pub verify: crossbeam_channel::Sender<tandem_replication::shipper::VerifyJob>,
}

pub(crate) struct PrimaryRole {
    pub capture: Arc<GroupCapture>,
    pub epoch: u64,
    pub fork: Tip,
    pub gate: Arc<Gate>,
    pub links: Vec<LinkHandle>,
    /// The NBD listeners and clients of this group's volumes.
    server: Arc<Scope>,
    sockets: Vec<PathBuf>,
    /// The volumes' exports, listened on once ownership is confirmed
    /// ([`PrimaryRole::open_exports`]).
    exports: Vec<Arc<dyn Export>>,
    exported: bool,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    shippers: Vec<tandem_replication::shipper::ShipperTask>,
}

impl PrimaryRole {
    /// Starts serving `group`: capture, NBD exports, shippers to every
    /// other site. `fresh` starts a new capture history at `fork` (a
    /// promotion); otherwise the capture state on disk is continued.
    /// `images` come with whether each existed before.
    pub fn start(
        shared: &Shared,
        group: &tandem_config::Group,
        epoch: u64,
        fork: Tip,
        images: (Images, Vec<bool>),
        fresh: bool,
    ) -> Result<PrimaryRole, AgentError> {
        let (images, mut existed) = images;
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
        let others: Vec<String> = std::iter::once(&group.primary)
            .chain(group.replicas.iter().map(|r| &r.site))
            .filter(|s| *s != here)
            .cloned()
            .collect();
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
        let mut role = PrimaryRole {
            capture: Arc::clone(&capture),
            epoch,
            fork,
            gate: Arc::clone(&gate),
            links: Vec::new(),
            server: shared.nbd.scope(),
            sockets: Vec::new(),
            exports: Vec::new(),
            exported: false,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            shippers: Vec::new(),
        };
        for index in 0..capture.volumes().len() {
            let export: Arc<dyn Export> = Arc::new(
                (VolumeExport::with_sync(Arc::clone(&capture), index, sync, Arc::clone(&gate)))
                    .in_epoch(epoch)
                    .counted_in(&shared.nbd.stats),
            );
            role.exports.push(export);
        }
        if shared.coordinated {
            // No socket before the coordinator confirms this site as
            // owner: a client (a VM libvirt autostarts) must not attach to
            // a disk that is about to go away. A socket file a killed run
            // left goes now (the image lock proved that no other agent
            // serves these volumes).
            for export in &role.exports {
                let path = shared.layout.socket(export.name());
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        info!(socket = %path.display(), "stale NBD socket of a previous run removed")
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(AgentError::Io {
                            path,
                            what: "remove stale socket",
                            source,
                        })
                    }
                }
            }
            info!(group = %group.name, "NBD exports open once the coordinator confirms ownership");
        } else {
            role.open_exports(shared)?;
        }
        let mut watched: Vec<Watched> = group.files.iter().map(|f| Watched::file(f)).collect();
        if group.vm.is_some() {
            watched.push(Watched::vm_definition(
                &shared.layout.vm_definition(&group.name),
            ));
        }
        let files = if watched.is_empty() {
            None
        } else {
            let set = Arc::new(tandem_replication::files::FileSet::default());
            let watcher =
                tandem_replication::files::watch(watched, Arc::clone(&set), Arc::clone(&role.stop))
                    .map_err(|source| AgentError::Thread {
                        what: format!("start the files watcher of group {}", group.name),
                        source,
                    })?;
            role.threads.push(watcher);
            Some(set)
        };
        // Async: records gather briefly into larger sends (fewer wake-ups
        // and syscalls on both sides). Sync: sent at once.
        let gather = match group.mode {
            tandem_config::Mode::Sync => Duration::ZERO,
            tandem_config::Mode::Async => ASYNC_GATHER,
        };
        // A group defined at runtime travels to its sites with its stream.
        let definition = crate::runtime_groups::path(&shared.layout, &group.name)
            .exists()
            .then(|| group.to_toml());
        let config = shared.config();
        for site in &others {
            let Some(peer) = config.peer(site) else {
                continue;
            };
            role.start_shipper(
                shared,
                site,
                &peer.address,
                files.clone(),
                gather,
                definition.clone(),
            )?;
        }
        info!(group = %group.name, epoch, fork_epoch = fork.0, fork_seq = fork.1, volumes = capture.volumes().len(), replicas = others.len(), "serving group as primary");
        Ok(role)
    }

    /// Leaves the primary role. With `grace` (agent stop) requests
    /// already received finish and a sync-mode wait for replicas that
    /// cannot come is released after the grace; without (demotion) held
    /// changes fail at once. Shippers send what they have queued and stop;
    /// the images are synced. Returns the images, the tip of this site's
    /// history and the stopped capture.
    pub fn stop(
        self,
        shared: &Shared,
        group: &tandem_config::Group,
        grace: Option<Duration>,
    ) -> Result<(Images, Tip, Arc<GroupCapture>), AgentError> {
        let left = match grace {
            Some(grace) => match self.server.shutdown(Duration::from_secs(5)) {
                0 => 0,
                _ => {
                    self.capture.close();
                    self.server.shutdown(grace)
                }
            },
            None => {
                self.gate.close();
                self.server.shutdown(DEMOTE_GRACE)
            }
        };
        if left > 0 {
            warn!(group = %group.name, connections = left, "NBD clients still connected after the grace period");
        }
        for path in &self.sockets {
            let _ = std::fs::remove_file(path);
        }
        {
            let mut tcp = shared.tcp_exports.write();
            for v in &group.volumes {
                tcp.remove(&v.name);
            }
        }
        self.stop.store(true, Ordering::Release);
        // Wakes the shippers out of their wait for records (no more come:
        // the exports are closed), so they see `stop` now, not after their
        // wait.
        self.capture.close();
        for t in self.shippers {
            t.join();
        }
        for t in self.threads {
            let _ = t.join();
        }
        let images: Vec<Arc<RawImage>> = self
            .capture
            .volumes()
            .iter()
            .map(|v| Arc::clone(&v.image))
            .collect();
        for image in &images {
            image.sync()?;
        }
        let tip = (
            self.epoch,
            self.capture.next_seq().saturating_sub(1).max(self.fork.1),
        );
        Ok((images, tip, self.capture))
    }

    /// Listens on the volumes' sockets (and offers them on the TCP
    /// listener), once: ownership is confirmed.
    pub fn open_exports(&mut self, shared: &Shared) -> Result<(), AgentError> {
        if self.exported {
            return Ok(());
        }
        self.exported = true;
        for export in self.exports.clone() {
            self.listen_unix(shared, Arc::clone(&export))?;
            shared
                .tcp_exports
                .write()
                .insert(export.name().to_owned(), export);
        }
        Ok(())
    }

    fn listen_unix(&mut self, shared: &Shared, export: Arc<dyn Export>) -> Result<(), AgentError> {
        let path = shared.layout.socket(export.name());
        let io_err = |what| {
            let path = path.clone();
            move |source| AgentError::Io { path, what, source }
        };
        // A socket left by a killed agent; the image lock already proved
        // that no other agent serves this volume.
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove stale socket")(e)),
        }
        let listener = UnixListener::bind(&path).map_err(io_err("listen"))?;
        self.server
            .serve_unix(
                listener,
                Arc::new(catalog::SingleExport(Arc::clone(&export))),
            )
            .map_err(io_err("listen"))?;
        info!(volume = export.name(), socket = %path.display(), size = export.size(), "NBD export ready");
        self.sockets.push(path);
        Ok(())
    }

    fn start_shipper(
        &mut self,
        shared: &Shared,
        replica: &str,
        address: &str,
        files: Option<Arc<tandem_replication::files::FileSet>>,
        gather: Duration,
        definition: Option<String>,
    ) -> Result<(), AgentError> {
        let capture = &self.capture;
        let link = Arc::new(Link::new(self.epoch, self.fork));
        let (verify_tx, verify_rx) = crossbeam_channel::unbounded();
        let shipper = Shipper {
            capture: Arc::clone(capture),
            local_site: shared.site.clone(),
            replica_site: replica.to_owned(),
            epoch: self.epoch,
            fork: self.fork,
            site: shared.site_link(replica, address),
            link: Arc::clone(&link),
            stop: Arc::clone(&self.stop),
            files,
            verify: verify_rx,
            gather,
            definition,
        };
        let task = shipper.spawn();
        self.links.push(LinkHandle {
            replica: replica.to_owned(),
            link,
            verify: verify_tx,
        });
        self.shippers.push(task);
        Ok(())
    }
}

impl Shared {
    /// The link to replica site `replica` at `address`, made on first use.
    pub(crate) fn site_link(&self, replica: &str, address: &str) -> Arc<SiteLink> {
        let mut links = self.links.lock();
        if let Some(link) = links.get(replica) {
            return Arc::clone(link);
        }
        let (address, site) = (address.to_owned(), replica.to_owned());
        let limiter = self.bandwidth.limiter(replica);
        let tls = self.tls.clone();
        let name_held = Arc::clone(&self.name_held);
        let connect = Box::new(move || {
            if !name_held.load(Ordering::Acquire) {
                return Err(tandem_replication::shipper::ConnectError::Socket(
                    std::io::Error::other(
                        "not connecting yet: this agent does not hold its site name",
                    ),
                ));
            }
            let link = replication::connect(&address, &site, tls.as_deref())?;
            Ok(match &limiter {
                Some(limiter) => tandem_replication::shipper::Connection {
                    writer: Box::new(tandem_replication::throttle::Throttled {
                        inner: link.writer,
                        limiter: Arc::clone(limiter),
                    }),
                    ..link
                },
                None => link,
            })
        });
        let link = SiteLink::new(&self.site, replica, connect);
        links.insert(replica.to_owned(), Arc::clone(&link));
        link
    }
}
