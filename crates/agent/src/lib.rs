//! The site agent: opens the volumes of the groups this site serves, runs
//! change capture for each group, and serves each volume over NBD at
//! `<data_dir>/nbd/<volume>.sock` (and optionally TCP). See
//! `docs/ARCHITECTURE.md`.

#![allow(clippy::cast_possible_truncation)] // TODO(issue 8): being rewritten; fixed with the rewrite

mod api;
pub mod bandwidth;
mod catalog;
mod export;
pub mod gate;
mod group;
mod hooks;
pub mod layout;
mod metrics;
mod ownership;
mod replication;
mod rolefile;
pub mod status;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use group::{GroupRuntime, LinkHandle, Role, Shared};
use tandem_capture::{CaptureError, GroupCapture};
use tandem_config::{Config, TlsMode};
use tandem_nbd::Server;
use tandem_replication::receiver::ReceiverContext;
use tandem_replication::shipper::LinkState;
use tandem_replication::ReplicaError;
use tandem_tls::TlsIdentity;
use tandem_volume::VolumeError;
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
    #[error("role change: {0}")]
    Role(String),
    #[error("coordinator: {0}")]
    Coordinator(String),
}

/// A group's first epoch.
const INITIAL_EPOCH: u64 = 1;

/// How long a stopping agent waits for clients to finish their requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// A running site agent.
pub struct Agent {
    shared: Arc<Shared>,
    runtimes: Arc<Vec<Arc<GroupRuntime>>>,
    /// The agent-wide NBD server (the TCP listener).
    server: Arc<Server>,
    threads: Vec<JoinHandle<()>>,
    peer_listener: Option<(std::os::fd::RawFd, JoinHandle<()>)>,
    api: Option<JoinHandle<()>>,
    ownership: Option<ownership::Ownership>,
}

/// What status and the API need, shared with the API thread.
pub struct StatusView {
    shared: Arc<Shared>,
    runtimes: Arc<Vec<Arc<GroupRuntime>>>,
    nbd: Arc<tandem_nbd::stats::Stats>,
    pub(crate) bandwidth: Arc<bandwidth::Bandwidth>,
    pub(crate) ownership: Option<Arc<ownership::Handle>>,
}

impl Agent {
    /// Opens every group of this site in the role it last had (or the
    /// configured one at first start) and starts serving. With a
    /// coordinator, ownership is then confirmed or changed by it.
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
        let stop = Arc::new(AtomicBool::new(false));
        let bandwidth = bandwidth::Bandwidth::new(&config.peers, &config.site.name);
        let coordinated = config.coordinator.kind != tandem_config::CoordinatorKind::None;
        let shared = Arc::new(Shared {
            site: config.site.name.clone(),
            layout: layout.clone(),
            config: Arc::new(config.clone()),
            tls: tls.clone(),
            bandwidth: Arc::clone(&bandwidth),
            receivers: Arc::new(ReceiverContext {
                site: config.site.name.clone(),
                groups: parking_lot::RwLock::new(Vec::new()),
            }),
            tcp_exports: Arc::new(parking_lot::RwLock::new(BTreeMap::new())),
            coordinated,
            stop: Arc::clone(&stop),
        });
        let mut agent = Agent {
            shared: Arc::clone(&shared),
            runtimes: Arc::new(Vec::new()),
            server: Server::new(),
            threads: Vec::new(),
            peer_listener: None,
            api: None,
            ownership: None,
        };
        let planner = bandwidth
            .plan(Arc::clone(&stop))
            .map_err(|source| AgentError::Io {
                path: PathBuf::from("bandwidth"),
                what: "start the bandwidth planner",
                source,
            })?;
        agent.threads.push(planner);
        let here = &config.site.name;
        let mut runtimes = Vec::new();
        for group in &config.groups {
            let member = group.primary == *here || group.replicas.iter().any(|r| &r.site == here);
            if !member {
                continue;
            }
            let rt = Arc::new(GroupRuntime::new(group.clone()));
            let last = rolefile::load(&layout.data_dir, &group.name).map_err(AgentError::Role)?;
            let record = last.unwrap_or(rolefile::RoleRecord {
                primary: group.primary == *here,
                epoch: INITIAL_EPOCH,
                fork_epoch: 0,
                fork_seq: 0,
            });
            if record.primary {
                rt.start_primary(
                    &shared,
                    record.epoch,
                    (record.fork_epoch, record.fork_seq),
                    None,
                    false,
                )?;
            } else {
                rt.epoch.fetch_max(record.epoch, Ordering::AcqRel);
                rt.start_replica(&shared, None, None)?;
            }
            runtimes.push(rt);
        }
        agent.runtimes = Arc::new(runtimes);
        let listener =
            TcpListener::bind(&config.site.listen).map_err(|source| AgentError::PeerListen {
                addr: config.site.listen.clone(),
                source,
            })?;
        let fd = listener.as_raw_fd();
        let handle = replication::listen(
            listener,
            Arc::clone(&shared.receivers),
            tls,
            Arc::clone(&stop),
        )
        .map_err(|source| AgentError::PeerListen {
            addr: config.site.listen.clone(),
            source,
        })?;
        agent.peer_listener = Some((fd, handle));
        info!(addr = %config.site.listen, "listening for replication peers");
        if coordinated {
            agent.ownership = Some(ownership::Ownership::start(
                Arc::clone(&shared),
                Arc::clone(&agent.runtimes),
            )?);
        }
        let view = Arc::new(agent.status_view());
        agent.api = Some(api::start(
            &config.site.api,
            &layout,
            view,
            Arc::clone(&stop),
        )?);
        if let Some(addr) = &config.site.nbd_listen {
            let listener = TcpListener::bind(addr).map_err(|source| AgentError::Listen {
                addr: addr.clone(),
                source,
            })?;
            agent
                .server
                .serve_tcp(
                    listener,
                    Arc::new(catalog::LiveExports(Arc::clone(&shared.tcp_exports))),
                )
                .map_err(|source| AgentError::Listen {
                    addr: addr.clone(),
                    source,
                })?;
            info!(%addr, "NBD also on TCP");
        }
        Ok(agent)
    }

    fn status_view(&self) -> StatusView {
        StatusView {
            shared: Arc::clone(&self.shared),
            runtimes: Arc::clone(&self.runtimes),
            nbd: Arc::clone(&self.server.stats),
            bandwidth: Arc::clone(&self.shared.bandwidth),
            ownership: self.ownership.as_ref().map(|o| o.handle()),
        }
    }

    /// The site's status (SPEC §4.4).
    pub fn status(&self) -> SiteStatus {
        self.status_view().status()
    }

    /// The change capture of a group this site serves.
    pub fn capture(&self, group: &str) -> Option<Arc<GroupCapture>> {
        self.runtimes
            .iter()
            .find(|r| r.name() == group)
            .and_then(|r| match &*r.role.lock() {
                Role::Primary(p) => Some(Arc::clone(&p.capture)),
                _ => None,
            })
    }

    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    /// Stops accepting, lets clients finish what they sent, makes every
    /// image durable and removes the sockets.
    pub fn shutdown(self) -> Result<(), AgentError> {
        self.shared.stop.store(true, Ordering::Release);
        if let Some((fd, handle)) = self.peer_listener {
            // SAFETY: shutdown(2) on the listening socket the accept thread
            // owns; it only wakes accept() with an error.
            unsafe {
                libc::shutdown(fd, libc::SHUT_RDWR);
            }
            let _ = handle.join();
        }
        let left = self.server.shutdown(Duration::from_secs(5));
        if left > 0 {
            let _ = self.server.shutdown(SHUTDOWN_GRACE);
        }
        let mut first_error = None;
        for rt in self.runtimes.iter() {
            if let Err(e) = rt.stop_graceful(&self.shared, SHUTDOWN_GRACE) {
                warn!(group = rt.name(), "final flush failed: {e}");
                first_error.get_or_insert(e);
            }
        }
        // The lease is renewed until the exports are closed: their last
        // acknowledgements stay covered by it.
        if let Some(o) = self.ownership {
            o.stop();
        }
        for thread in self.threads {
            let _ = thread.join();
        }
        if let Some(api) = self.api {
            let _ = api.join();
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The outcome of `tandem failover` / `tandem migrate`.
#[derive(serde::Serialize)]
pub struct OwnerChanged {
    pub group: String,
    pub owner: String,
    pub epoch: u64,
    pub elapsed_ms: u64,
}

impl StatusView {
    /// Fails the group over (or migrates it) through the coordinator and
    /// waits for the new owner.
    pub fn change_owner(
        &self,
        group: &str,
        migrate: bool,
        to: Option<String>,
        force: bool,
    ) -> Result<OwnerChanged, String> {
        let Some(o) = &self.ownership else {
            return Err("no coordinator configured ([coordinator] kind = \"none\"): failover needs one on this version".into());
        };
        if migrate && to.is_none() {
            return Err("migrate needs --to SITE".into());
        }
        let started = Instant::now();
        let kind = if migrate {
            tandem_coordinator::keys::RequestKind::Migrate
        } else {
            tandem_coordinator::keys::RequestKind::Failover
        };
        let (owner, epoch) = o.request(group, kind, to, force, Duration::from_secs(120))?;
        Ok(OwnerChanged {
            group: group.to_owned(),
            owner,
            epoch,
            elapsed_ms: started.elapsed().as_millis() as u64,
        })
    }

    fn runtime(&self, group: &str) -> Option<&Arc<GroupRuntime>> {
        self.runtimes.iter().find(|r| r.name() == group)
    }

    /// Compares every replica of `group` with this primary (`tandem
    /// verify`).
    pub fn verify(&self, group: &str) -> Result<status::VerifyResult, String> {
        let (links, volumes) = match self.runtime(group).map(|r| r.role.lock()) {
            Some(role) => match &*role {
                Role::Primary(p) => (
                    p.links.clone(),
                    p.capture
                        .volumes()
                        .iter()
                        .map(|v| v.name.clone())
                        .collect::<Vec<_>>(),
                ),
                _ => {
                    return Err(format!(
                        "this site is not the primary of a group named {group:?}"
                    ))
                }
            },
            None => {
                return Err(format!(
                    "this site is not the primary of a group named {group:?}"
                ))
            }
        };
        let mut replicas = Vec::new();
        for link in &links {
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
        let site = &self.shared.site;
        let mut groups = Vec::new();
        for rt in self.runtimes.iter() {
            let cfg = &rt.cfg;
            let mode = cfg.mode.as_str().to_owned();
            let known_owner = rt.owner.lock().clone();
            let role = rt.role.lock();
            match &*role {
                Role::Primary(p) => {
                    let capture = &p.capture;
                    let stats = capture.stats();
                    let replicas = p
                        .links
                        .iter()
                        .map(|l| link_status(capture, l, &self.bandwidth))
                        .collect();
                    let fenced = !p.gate.is_open();
                    groups.push(GroupStatus {
                        name: cfg.name.clone(),
                        role: if fenced { "fenced" } else { "primary" }.into(),
                        epoch: p.epoch,
                        primary: site.clone(),
                        mode: mode.clone(),
                        replicas,
                        next_seq: Some(stats.next_seq),
                        queued_bytes: Some(stats.queued_bytes as u64),
                        sync_degraded: (mode == "sync")
                            .then(|| capture.connected_replicas() < cfg.sync_replicas as usize),
                    });
                }
                Role::Replica(r) => {
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
                        name: cfg.name.clone(),
                        role: "replica".into(),
                        epoch: p.epoch.max(rt.epoch.load(Ordering::Acquire)),
                        primary: known_owner.unwrap_or_else(|| cfg.primary.clone()),
                        mode: mode.clone(),
                        replicas: vec![ReplicaStatus {
                            site: site.clone(),
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
                Role::Down => groups.push(GroupStatus {
                    name: cfg.name.clone(),
                    role: "down".into(),
                    epoch: rt.epoch.load(Ordering::Acquire),
                    primary: known_owner.unwrap_or_else(|| cfg.primary.clone()),
                    mode: mode.clone(),
                    replicas: Vec::new(),
                    next_seq: None,
                    queued_bytes: None,
                    sync_degraded: None,
                }),
            }
        }
        SiteStatus {
            site: site.clone(),
            groups,
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
