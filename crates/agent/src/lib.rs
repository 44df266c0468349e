//! The site agent: opens the volumes of the groups this site serves, runs
//! change capture for each group, serves each volume over NBD at
//! `<data_dir>/nbd/<volume>.sock` (and optionally TCP), receives the
//! groups it replicates, and — with a coordinator — drives each group's
//! ownership machine. See `docs/ARCHITECTURE.md`.

#![forbid(unsafe_code)]

mod api;
pub mod bandwidth;
mod catalog;
mod error;
mod export;
pub mod gate;
mod group;
mod hooks;
pub mod layout;
mod metrics;
pub mod onboard;
mod ownership;
mod preauth;
mod replication;
mod rolefile;
mod runtime_groups;
pub mod status;
mod view;
pub mod vm;
pub mod vms;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use group::{GroupRuntime, Groups, Plane, Shared};
use tandem_capture::GroupCapture;
use tandem_config::{Config, TlsMode};
use tandem_nbd::Server;
use tandem_replication::owners::Owners;
use tandem_replication::receiver::ReceiverContext;
use tandem_tls::TlsIdentity;
use tracing::{info, warn};

use status::SiteStatus;

pub use error::AgentError;
pub use export::{SyncPolicy, VolumeExport};
pub use layout::Layout;
pub use view::{OwnerChanged, StatusView};

/// A group's first epoch.
pub(crate) const INITIAL_EPOCH: u64 = 1;

/// How long a stopping agent waits for clients to finish their requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// A running site agent.
pub struct Agent {
    shared: Arc<Shared>,
    groups: Arc<Groups>,
    /// One group definition at a time (API or peer).
    defining: Arc<parking_lot::Mutex<()>>,
    /// The agent-wide NBD server (the TCP listener).
    server: Arc<Server>,
    threads: Vec<JoinHandle<()>>,
    peers: Option<replication::PeerListener>,
    api: Option<JoinHandle<()>>,
    ownership: Option<ownership::Ownership>,
}

impl Agent {
    /// Opens every group of this site in the role it last had (or the
    /// configured one at first start) and starts serving. With a
    /// coordinator, ownership is then confirmed or changed by it.
    pub fn start(config: &Config) -> Result<Agent, AgentError> {
        config.check_data_dir()?;
        let layout = Layout::new(&config.site.data_dir);
        let mut with_runtime = config.clone();
        runtime_groups::load(&layout, &mut with_runtime)?;
        let config = &with_runtime;
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
                definer: parking_lot::RwLock::new(None),
                owners: Arc::new(if coordinated {
                    Owners::coordinated()
                } else {
                    Owners::configured()
                }),
            }),
            tcp_exports: Arc::new(parking_lot::RwLock::new(BTreeMap::new())),
            coordinated,
            stop: Arc::clone(&stop),
            vms: Arc::new(vm::Vms::new(
                Arc::new(tandem_hypervisor::virsh::Virsh::new(&config.libvirt.uri)),
                layout.clone(),
                config.libvirt.network_map.clone(),
            )),
        });
        let mut agent = Agent {
            shared: Arc::clone(&shared),
            groups: Arc::new(Groups::default()),
            defining: Arc::new(parking_lot::Mutex::new(())),
            server: Server::new(),
            threads: Vec::new(),
            peers: None,
            api: None,
            ownership: None,
        };
        let planner = bandwidth
            .plan(Arc::clone(&stop))
            .map_err(|source| AgentError::Thread {
                what: "start the bandwidth planner".into(),
                source,
            })?;
        agent.threads.push(planner);
        let keeper =
            vm::keep(Arc::clone(&shared), Arc::clone(&agent.groups)).map_err(|source| {
                AgentError::Thread {
                    what: "start the VM keeper".into(),
                    source,
                }
            })?;
        agent.threads.push(keeper);
        let here = &config.site.name;
        let mut opened = Vec::new();
        for group in &config.groups {
            let member = group.primary == *here || group.replicas.iter().any(|r| &r.site == here);
            if !member {
                continue;
            }
            let rt = Arc::new(GroupRuntime::new(group.clone()));
            let record =
                rolefile::load(&layout.data_dir, &group.name)?.unwrap_or(rolefile::RoleRecord {
                    primary: group.primary == *here,
                    epoch: INITIAL_EPOCH,
                    fork_epoch: 0,
                    fork_seq: 0,
                });
            rt.open(&shared, &record)?;
            opened.push((rt, record));
        }
        for (rt, _) in &opened {
            agent.groups.push(Arc::clone(rt));
        }
        let listener =
            TcpListener::bind(&config.site.listen).map_err(|source| AgentError::PeerListen {
                addr: config.site.listen.clone(),
                source,
            })?;
        let sessions_cap = replication::session_cap(agent.groups.len());
        agent.peers = Some(
            replication::PeerListener::start(
                listener,
                Arc::clone(&shared.receivers),
                tls,
                agent.groups.len(),
            )
            .map_err(|source| AgentError::PeerListen {
                addr: config.site.listen.clone(),
                source,
            })?,
        );
        info!(addr = %config.site.listen, sessions = sessions_cap, "listening for replication peers");
        if coordinated {
            agent.ownership = Some(ownership::Ownership::start(Arc::clone(&shared), opened)?);
        }
        let view = Arc::new(agent.status_view());
        *shared.receivers.definer.write() =
            Some(Arc::new(runtime_groups::PeerDefiner(Arc::clone(&view))));
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
            hypervisor: Arc::clone(self.shared.vms.hypervisor()),
            shared: Arc::clone(&self.shared),
            groups: Arc::clone(&self.groups),
            defining: Arc::clone(&self.defining),
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
        self.groups
            .find(group)
            .and_then(|r| match &*r.plane.lock() {
                Plane::Primary(p) => Some(Arc::clone(&p.capture)),
                _ => None,
            })
    }

    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    /// Stops deciding, stops accepting, lets clients finish what they
    /// sent, makes every image durable and removes the sockets; the lease
    /// is renewed until the exports are closed (their last
    /// acknowledgements stay covered by it), then left to expire.
    pub fn shutdown(mut self) -> Result<(), AgentError> {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(o) = self.ownership.as_mut() {
            o.stop_deciding();
        }
        if let Some(peers) = self.peers.take() {
            peers.stop();
        }
        let left = self.server.shutdown(Duration::from_secs(5));
        if left > 0 {
            let _ = self.server.shutdown(SHUTDOWN_GRACE);
        }
        let mut first_error = None;
        for rt in self.groups.all() {
            if let Err(e) = rt.stop_graceful(&self.shared, SHUTDOWN_GRACE) {
                warn!(group = rt.name(), "final flush failed: {e}");
                first_error.get_or_insert(e);
            }
        }
        if let Some(o) = self.ownership.take() {
            o.stop();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        if let Some(api) = self.api.take() {
            let _ = api.join();
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
