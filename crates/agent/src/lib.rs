//! The site agent: opens the volumes of the groups this site serves, runs
//! change capture for each group, and serves each volume over NBD at
//! `<data_dir>/nbd/<volume>.sock` (and optionally TCP). See
//! `docs/ARCHITECTURE.md`.

mod api;
pub mod bandwidth;
mod catalog;
mod export;
pub mod layout;
mod metrics;
mod replication;
pub mod status;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tandem_capture::{CaptureError, CaptureVolume, GroupCapture};
use tandem_config::{Config, TlsMode};
use tandem_nbd::{Export, Server};
use tandem_replication::receiver::{GroupPlan, ReceiverContext};
use tandem_replication::replica::{Position, ReplicaGroup, ReplicaVolume};
use tandem_replication::shipper::{LinkInfo, LinkState, Shipper};
use tandem_replication::ReplicaError;
use tandem_tls::TlsIdentity;
use tandem_volume::{RawImage, VolumeError};
use tracing::{info, warn};

use status::{GroupStatus, ReplicaStatus, ResyncProgress, SiteStatus};

pub use export::{SyncPolicy, VolumeExport};
pub use layout::Layout;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] tandem_config::ConfigError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("group {group}: {source}")]
    Capture { group: String, source: CaptureError },
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot listen for NBD on {addr} (site.nbd_listen): {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot listen for peers on {addr} (site.listen): {source}")]
    PeerListen {
        addr: String,
        source: std::io::Error,
    },
    #[error("group {group}: {source}")]
    Replica { group: String, source: ReplicaError },
    #[error("[tls]: {0}")]
    Tls(#[from] tandem_tls::TlsError),
    #[error("[tls]: mode is on but {0} is not set")]
    TlsMissing(&'static str),
    #[error("cannot serve the API on {addr} (site.api): {reason}")]
    Api { addr: String, reason: String },
}

/// Until the coordinator decides ownership, every group is in epoch 1.
const INITIAL_EPOCH: u64 = 1;

/// How long a stopping agent waits for clients to finish their requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// A running site agent.
pub struct Agent {
    site: String,
    server: Arc<Server>,
    groups: Vec<Arc<GroupCapture>>,
    sockets: Vec<PathBuf>,
    /// (group, mode, primary, sync replicas) of every group, in
    /// configuration order.
    plan: Vec<(String, String, String, usize)>,
    links: Vec<LinkHandle>,
    threads: Vec<JoinHandle<()>>,
    replicas: Vec<ReplicaHandle>,
    stop: Arc<AtomicBool>,
    peer_listener: Option<(std::os::fd::RawFd, JoinHandle<()>)>,
    api: Option<JoinHandle<()>>,
    bandwidth: Arc<bandwidth::Bandwidth>,
}

/// A shipper streaming a primary group to one replica site.
#[derive(Clone)]
struct LinkHandle {
    group: String,
    replica: String,
    info: Arc<Mutex<LinkInfo>>,
    verify: crossbeam_channel::Sender<tandem_replication::shipper::VerifyJob>,
}

/// What status needs, shared with the API thread.
pub struct StatusView {
    site: String,
    plan: Vec<(String, String, String, usize)>,
    groups: Vec<Arc<GroupCapture>>,
    links: Vec<LinkHandle>,
    replicas: Vec<ReplicaHandle>,
    nbd: Arc<tandem_nbd::stats::Stats>,
    pub(crate) bandwidth: Arc<bandwidth::Bandwidth>,
}

/// A group this site replicates.
#[derive(Clone)]
struct ReplicaHandle {
    name: String,
    group: Arc<Mutex<ReplicaGroup>>,
    position: Arc<Mutex<Position>>,
    connected: Arc<AtomicBool>,
}

impl Agent {
    /// Opens every volume of the groups this site is primary for and starts
    /// serving them. Images of groups it is a replica for are created (or
    /// checked) but not served.
    pub fn start(config: &Config) -> Result<Agent, AgentError> {
        config.check_data_dir()?;
        let layout = Layout::new(&config.site.data_dir);
        for dir in [layout.volumes_dir(), layout.nbd_dir()] {
            std::fs::create_dir_all(&dir).map_err(|source| AgentError::Io {
                path: dir.clone(),
                what: "create directory",
                source,
            })?;
        }
        let tls = match config.tls.mode {
            TlsMode::Off => None,
            TlsMode::On => {
                let need = |p: &Option<PathBuf>, key| p.clone().ok_or(AgentError::TlsMissing(key));
                let (ca, cert, key) = (
                    need(&config.tls.ca, "ca")?,
                    need(&config.tls.cert, "cert")?,
                    need(&config.tls.key, "key")?,
                );
                Some(Arc::new(TlsIdentity::load(&ca, &cert, &key)?))
            }
        };
        let server = Server::new();
        let mut agent = Agent {
            site: config.site.name.clone(),
            server,
            groups: Vec::new(),
            sockets: Vec::new(),
            plan: config
                .groups
                .iter()
                .map(|g| {
                    (
                        g.name.clone(),
                        g.mode.as_str().to_owned(),
                        g.primary.clone(),
                        g.sync_replicas as usize,
                    )
                })
                .collect(),
            links: Vec::new(),
            threads: Vec::new(),
            replicas: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            peer_listener: None,
            api: None,
            bandwidth: bandwidth::Bandwidth::new(&config.peers, &config.site.name),
        };
        let planner = agent
            .bandwidth
            .plan(Arc::clone(&agent.stop))
            .map_err(|source| AgentError::Io {
                path: PathBuf::from("bandwidth"),
                what: "start the bandwidth planner",
                source,
            })?;
        agent.threads.push(planner);
        let mut all_exports: BTreeMap<String, Arc<dyn Export>> = BTreeMap::new();
        let mut plans = Vec::new();
        for group in &config.groups {
            let here = &config.site.name;
            if group.primary != *here {
                if group.replicas.iter().any(|r| &r.site == here) {
                    plans.push(agent.open_replica(&layout, group)?);
                }
                continue;
            }
            let mut volumes = Vec::new();
            let mut existed = Vec::new();
            for v in &group.volumes {
                let path = layout.image(&v.name);
                existed.push(path.exists());
                let image = RawImage::open_or_create(&path, v.size)?;
                volumes.push(CaptureVolume {
                    name: v.name.clone(),
                    image: Arc::new(image),
                });
            }
            let replicas: Vec<String> = group.replicas.iter().map(|r| r.site.clone()).collect();
            let capture = GroupCapture::open(
                &layout.capture_dir(&group.name),
                &group.name,
                volumes,
                &existed,
                &replicas,
                group.queue_memory,
            )
            .map_err(|source| AgentError::Capture {
                group: group.name.clone(),
                source,
            })?;
            let capture = Arc::new(capture);
            let sync = (group.mode == tandem_config::Mode::Sync).then_some(SyncPolicy {
                replicas: group.sync_replicas as usize,
                degrade: group.on_sync_loss == tandem_config::OnSyncLoss::Degrade,
            });
            for index in 0..capture.volumes().len() {
                let export: Arc<dyn Export> =
                    Arc::new(VolumeExport::with_sync(Arc::clone(&capture), index, sync));
                agent.listen_unix(&layout, Arc::clone(&export))?;
                all_exports.insert(export.name().to_owned(), export);
            }
            info!(
                group = %group.name,
                volumes = capture.volumes().len(),
                replicas = replicas.len(),
                "serving group as primary"
            );
            let files = if group.files.is_empty() {
                None
            } else {
                let set = Arc::new(tandem_replication::files::FileSet::default());
                let watcher = tandem_replication::files::watch(
                    group.files.clone(),
                    Arc::clone(&set),
                    Arc::clone(&agent.stop),
                )
                .map_err(|source| AgentError::Io {
                    path: PathBuf::from(&group.name),
                    what: "start the files watcher",
                    source,
                })?;
                agent.threads.push(watcher);
                Some(set)
            };
            for r in &group.replicas {
                let Some(peer) = config.peer(&r.site) else {
                    continue;
                };
                agent.start_shipper(
                    &capture,
                    &config.site.name,
                    &r.site,
                    &peer.address,
                    tls.clone(),
                    files.clone(),
                )?;
            }
            agent.groups.push(capture);
        }
        let listener =
            TcpListener::bind(&config.site.listen).map_err(|source| AgentError::PeerListen {
                addr: config.site.listen.clone(),
                source,
            })?;
        let fd = listener.as_raw_fd();
        let ctx = Arc::new(ReceiverContext {
            site: config.site.name.clone(),
            groups: plans,
        });
        let handle =
            replication::listen(listener, ctx, tls, Arc::clone(&agent.stop)).map_err(|source| {
                AgentError::PeerListen {
                    addr: config.site.listen.clone(),
                    source,
                }
            })?;
        agent.peer_listener = Some((fd, handle));
        info!(addr = %config.site.listen, "listening for replication peers");
        let view = Arc::new(agent.status_view());
        agent.api = Some(api::start(
            &config.site.api,
            &layout,
            view,
            Arc::clone(&agent.stop),
        )?);
        if let Some(addr) = &config.site.nbd_listen {
            let listener = TcpListener::bind(addr).map_err(|source| AgentError::Listen {
                addr: addr.clone(),
                source,
            })?;
            agent
                .server
                .serve_tcp(listener, Arc::new(catalog::AllExports(all_exports)))
                .map_err(|source| AgentError::Listen {
                    addr: addr.clone(),
                    source,
                })?;
            info!(%addr, "NBD also on TCP");
        }
        Ok(agent)
    }

    /// Opens the images and replica state of a group this site replicates.
    fn open_replica(
        &mut self,
        layout: &Layout,
        group: &tandem_config::Group,
    ) -> Result<GroupPlan, AgentError> {
        let mut volumes = Vec::new();
        for v in &group.volumes {
            let image = RawImage::open_or_create(&layout.image(&v.name), v.size)?;
            volumes.push(ReplicaVolume {
                name: v.name.clone(),
                image: Arc::new(image),
            });
        }
        let replica = ReplicaGroup::open(&layout.replica_dir(&group.name), &group.name, volumes)
            .map_err(|source| AgentError::Replica {
                group: group.name.clone(),
                source,
            })?;
        let position = replica.published();
        let replica = Arc::new(Mutex::new(replica));
        let connected = Arc::new(AtomicBool::new(false));
        info!(group = %group.name, primary = %group.primary, "replica of this group: waiting for its primary");
        self.replicas.push(ReplicaHandle {
            name: group.name.clone(),
            group: Arc::clone(&replica),
            position,
            connected: Arc::clone(&connected),
        });
        Ok(GroupPlan {
            name: group.name.clone(),
            primary: group.primary.clone(),
            replicas: group.replicas.iter().map(|r| r.site.clone()).collect(),
            volumes: group
                .volumes
                .iter()
                .map(|v| (v.name.clone(), v.size))
                .collect(),
            group: replica,
            connected,
            files_dir: layout.data_dir.join("files").join(&group.name),
            files: group.files.clone(),
        })
    }

    fn start_shipper(
        &mut self,
        capture: &Arc<GroupCapture>,
        local: &str,
        replica: &str,
        address: &str,
        tls: Option<Arc<TlsIdentity>>,
        files: Option<Arc<tandem_replication::files::FileSet>>,
    ) -> Result<(), AgentError> {
        let info = Arc::new(Mutex::new(LinkInfo::default()));
        let (address, site) = (address.to_owned(), replica.to_owned());
        let limiter = self.bandwidth.limiter(replica);
        let (verify_tx, verify_rx) = crossbeam_channel::unbounded();
        let shipper = Shipper {
            capture: Arc::clone(capture),
            local_site: local.to_owned(),
            replica_site: replica.to_owned(),
            epoch: INITIAL_EPOCH,
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
            stop: Arc::clone(&self.stop),
            files,
            verify: verify_rx,
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
        self.links.push(LinkHandle {
            group: capture.name().to_owned(),
            replica: replica.to_owned(),
            info,
            verify: verify_tx,
        });
        self.threads.push(thread);
        Ok(())
    }

    fn status_view(&self) -> StatusView {
        StatusView {
            site: self.site.clone(),
            plan: self.plan.clone(),
            groups: self.groups.clone(),
            links: self.links.clone(),
            replicas: self.replicas.clone(),
            nbd: Arc::clone(&self.server.stats),
            bandwidth: Arc::clone(&self.bandwidth),
        }
    }

    /// The site's status (SPEC §4.4).
    pub fn status(&self) -> SiteStatus {
        self.status_view().status()
    }
}

impl StatusView {
    /// Compares every replica of `group` with this primary (`tandem
    /// verify`).
    pub fn verify(&self, group: &str) -> Result<status::VerifyResult, String> {
        if !self.groups.iter().any(|g| g.name() == group) {
            return Err(format!(
                "this site is not the primary of a group named {group:?}"
            ));
        }
        let mut replicas = Vec::new();
        for link in self.links.iter().filter(|l| l.group == group) {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let outcome = if link.info.lock().state == LinkState::Disconnected {
                Err("replica not connected".to_owned())
            } else if link
                .verify
                .send(tandem_replication::shipper::VerifyJob { reply: tx })
                .is_err()
            {
                Err("replication link stopped".to_owned())
            } else {
                rx.recv_timeout(Duration::from_secs(6 * 3600))
                    .map_err(|_| "no answer from the replication link".to_owned())
                    .and_then(|r| r)
            };
            let volumes: Vec<String> = self
                .groups
                .iter()
                .find(|g| g.name() == group)
                .map(|g| g.volumes().iter().map(|v| v.name.clone()).collect())
                .unwrap_or_default();
            replicas.push(match outcome {
                Ok(report) => status::VerifyReplica {
                    site: link.replica.clone(),
                    compared_bytes: report.compared_bytes,
                    passes: report.passes,
                    differing: report
                        .differing
                        .iter()
                        .map(|&(v, offset, length)| status::DifferingRange {
                            volume: volumes.get(v as usize).cloned().unwrap_or_default(),
                            offset,
                            length,
                        })
                        .collect(),
                    error: None,
                },
                Err(e) => status::VerifyReplica {
                    site: link.replica.clone(),
                    compared_bytes: 0,
                    passes: 0,
                    differing: Vec::new(),
                    error: Some(e),
                },
            });
        }
        let identical = replicas
            .iter()
            .all(|r| r.error.is_none() && r.differing.is_empty());
        Ok(status::VerifyResult {
            group: group.to_owned(),
            identical,
            replicas,
        })
    }

    /// The site's status (SPEC §4.4).
    pub fn status(&self) -> SiteStatus {
        let mut groups = Vec::new();
        for (name, mode, primary, sync_needed) in &self.plan {
            if let Some(capture) = self.groups.iter().find(|g| g.name() == name) {
                let stats = capture.stats();
                let replicas = self
                    .links
                    .iter()
                    .filter(|l| &l.group == name)
                    .map(|l| link_status(capture, l, &self.bandwidth))
                    .collect();
                groups.push(GroupStatus {
                    name: name.clone(),
                    role: "primary".into(),
                    epoch: INITIAL_EPOCH,
                    primary: primary.clone(),
                    mode: mode.clone(),
                    replicas,
                    next_seq: Some(stats.next_seq),
                    queued_bytes: Some(stats.queued_bytes as u64),
                    sync_degraded: (mode == "sync")
                        .then(|| capture.connected_replicas() < *sync_needed),
                });
            } else if let Some(r) = self.replicas.iter().find(|r| &r.name == name) {
                let p = *r.position.lock();
                let connected = r.connected.load(Ordering::Acquire);
                let state = if !p.consistent {
                    "inconsistent"
                } else if connected {
                    "streaming"
                } else {
                    "disconnected"
                };
                groups.push(GroupStatus {
                    name: name.clone(),
                    role: "replica".into(),
                    epoch: p.epoch,
                    primary: primary.clone(),
                    mode: mode.clone(),
                    replicas: vec![ReplicaStatus {
                        site: self.site.clone(),
                        state: state.into(),
                        lag_bytes: 0,
                        lag_seconds: 0.0,
                        durable_seq: p.durable,
                        applied_seq: p.applied,
                        resyncing: p.resyncing,
                        resync: None,
                        rtt_ms: None,
                        wire_bytes: 0,
                        raw_bytes: 0,
                        last_error: None,
                    }],
                    next_seq: None,
                    queued_bytes: None,
                    sync_degraded: None,
                });
            }
        }
        SiteStatus {
            site: self.site.clone(),
            groups,
        }
    }
}

impl Agent {
    fn listen_unix(&mut self, layout: &Layout, export: Arc<dyn Export>) -> Result<(), AgentError> {
        let path = layout.socket(export.name());
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
            .map_err(io_err("start accept thread"))?;
        info!(volume = export.name(), socket = %path.display(), size = export.size(), "NBD export ready");
        self.sockets.push(path);
        Ok(())
    }

    /// The change capture of a group this site serves.
    pub fn capture(&self, group: &str) -> Option<Arc<GroupCapture>> {
        self.groups.iter().find(|g| g.name() == group).cloned()
    }

    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    /// Stops accepting, lets clients finish what they sent, makes every
    /// image durable and removes the sockets.
    pub fn shutdown(self) -> Result<(), AgentError> {
        self.stop.store(true, Ordering::Release);
        if let Some((fd, handle)) = self.peer_listener {
            // SAFETY: shutdown(2) on the listening socket the accept thread
            // owns; it only wakes accept() with an error.
            unsafe {
                libc::shutdown(fd, libc::SHUT_RDWR);
            }
            let _ = handle.join();
        }
        // Requests already received finish; a sync-mode wait for replicas
        // that cannot come is released after a short grace.
        let mut left = self.server.shutdown(Duration::from_secs(5));
        if left > 0 {
            for group in &self.groups {
                group.close();
            }
            left = self.server.shutdown(SHUTDOWN_GRACE);
        }
        if left > 0 {
            warn!(
                connections = left,
                "clients still connected after the grace period"
            );
        }
        for path in &self.sockets {
            let _ = std::fs::remove_file(path);
        }
        // Shippers send what they have queued and stop.
        for thread in self.threads {
            let _ = thread.join();
        }
        // What every replica holds need not be compared after a restart.
        for group in &self.groups {
            if let Err(e) = group.clear_replicated() {
                warn!(group = group.name(), "cannot clear the dirty map: {e}");
            }
        }
        if let Some(api) = self.api {
            let _ = api.join();
        }
        let mut first_error = None;
        for r in &self.replicas {
            // A running session holds the group; it ends when its primary's
            // connection does. Close what is free now.
            if let Some(mut group) = r.group.try_lock_for(Duration::from_secs(2)) {
                if let Err(e) = group.commit().and_then(|_| group.checkpoint()) {
                    warn!(group = %r.name, "final replica checkpoint failed: {e}");
                }
            }
        }
        for group in &self.groups {
            for v in group.volumes() {
                if let Err(e) = v.image.sync() {
                    warn!("final flush failed: {e}");
                    first_error.get_or_insert(AgentError::Volume(e));
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn link_status(
    capture: &GroupCapture,
    link: &LinkHandle,
    bandwidth: &bandwidth::Bandwidth,
) -> ReplicaStatus {
    let info = link.info.lock().clone();
    let lag = capture.lag(&link.replica).ok();
    let connected = info.state != LinkState::Disconnected;
    let paused = bandwidth
        .limiter(&link.replica)
        .is_some_and(|l| l.rate_bps() == 0);
    let state = if !connected {
        "disconnected"
    } else if paused {
        "paused"
    } else if !info.replica_consistent {
        "inconsistent"
    } else if info.state == LinkState::Resyncing || lag.is_some_and(|l| l.resyncing) {
        "resyncing"
    } else {
        "streaming"
    };
    let lag_seconds = lag
        .and_then(|l| l.oldest)
        .map_or(0.0, |t| Instant::now().duration_since(t).as_secs_f64());
    ReplicaStatus {
        site: link.replica.clone(),
        state: state.into(),
        lag_bytes: lag.map_or(0, |l| l.bytes),
        lag_seconds,
        durable_seq: info.durable,
        applied_seq: info.applied,
        resyncing: info.state == LinkState::Resyncing || lag.is_some_and(|l| l.resyncing),
        resync: (info.resync_total > 0).then_some(ResyncProgress {
            total_bytes: info.resync_total,
            compared_bytes: info.resync_done.min(info.resync_total),
            sent_bytes: info.resync_sent,
        }),
        rtt_ms: info.rtt.map(|d| d.as_secs_f64() * 1000.0),
        wire_bytes: info.wire_bytes,
        raw_bytes: info.raw_bytes,
        last_error: info.last_error,
    }
}
