//! The site agent: opens the volumes of the groups this site serves, runs
//! change capture for each group, serves each volume over NBD at
//! `<data_dir>/nbd/<volume>.sock` (and optionally TCP), receives the
//! groups it replicates, and — with a coordinator — drives each group's
//! ownership machine. See `docs/ARCHITECTURE.md`.

#![forbid(unsafe_code)]

mod api;
pub mod bandwidth;
mod catalog;
pub mod cluster;
mod error;
mod export;
pub mod fdlimit;
pub mod gate;
mod group;
pub use group::rollback;
pub mod forward;
pub mod history;
mod hooks;
pub mod layout;
mod metrics;
pub mod onboard;
mod ownership;
mod preauth;
pub mod rate;
pub mod recover;
pub mod reload;
mod replication;
mod rolefile;
mod runtime_groups;
mod signal;
mod startup;
pub mod status;
pub mod testview;
mod view;
pub mod vm;
pub mod vms;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use group::{Groups, Plane, Shared};
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
pub use reload::apply::{Applied, ReloadError};
pub use runtime_groups::load as load_runtime_groups;
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
    /// The agent-wide NBD server.
    server: Arc<Server>,
    /// The TCP listener's clients.
    tcp: Arc<tandem_nbd::Scope>,
    threads: Vec<JoinHandle<()>>,
    peers: Option<replication::PeerListener>,
    api: Option<JoinHandle<()>>,
    ownership: Option<ownership::Ownership>,
    /// The configuration file's contents the agent runs with (without
    /// the runtime groups): what a reload compares the file with.
    file_config: parking_lot::Mutex<Config>,
    /// The data directory's lock, held while the agent runs.
    _dir_lock: std::fs::File,
}

impl Agent {
    /// Opens every group of this site in the role it last had (or the
    /// configured one at first start) and starts serving. With a
    /// coordinator, ownership is then confirmed or changed by it.
    pub fn start(config: &Config) -> Result<Agent, AgentError> {
        config.check_data_dir()?;
        let layout = Layout::new(&config.site.data_dir);
        let dir_lock = startup::lock_data_dir(&layout)?;
        let file_config = config.clone();
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
        testview::remove_leftovers(&layout);
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
        let nbd = Server::new().map_err(|source| AgentError::Thread {
            what: "start the NBD server".into(),
            source,
        })?;
        let stopping = Arc::new(signal::Signal::default());
        let bandwidth = bandwidth::Bandwidth::new(&config.peers, &config.site.name);
        let coordinated = config.coordinator.kind != tandem_config::CoordinatorKind::None;
        let shared = Arc::new(Shared {
            site: config.site.name.clone(),
            layout: layout.clone(),
            config: parking_lot::RwLock::new(Arc::new(config.clone())),
            tls: tls.clone(),
            bandwidth: Arc::clone(&bandwidth),
            receivers: Arc::new(ReceiverContext {
                site: config.site.name.clone(),
                groups: parking_lot::RwLock::new(Vec::new()),
                definer: parking_lot::RwLock::new(None),
                grantor: parking_lot::RwLock::new(None),
                owners: Arc::new(if coordinated {
                    Owners::coordinated()
                } else {
                    Owners::configured()
                }),
            }),
            nbd: Arc::clone(&nbd),
            tcp_exports: Arc::new(parking_lot::RwLock::new(BTreeMap::new())),
            coordinated,
            name_held: Arc::new(AtomicBool::new(!coordinated)),
            stop: Arc::clone(&stop),
            stopping: Arc::clone(&stopping),
            vms: Arc::new(vm::Vms::new(
                Arc::new(tandem_hypervisor::virsh::Virsh::new(&config.libvirt.uri)),
                layout.clone(),
                config.libvirt.network_map.clone(),
            )),
            links: parking_lot::Mutex::new(BTreeMap::new()),
            tracker: Arc::default(),
        });
        testview::remove_leftover_copies(shared.vms.hypervisor().as_ref(), config);
        let mut agent = Agent {
            shared: Arc::clone(&shared),
            groups: Arc::new(Groups::default()),
            defining: Arc::new(parking_lot::Mutex::new(())),
            tcp: nbd.scope(),
            server: nbd,
            threads: Vec::new(),
            peers: None,
            api: None,
            ownership: None,
            file_config: parking_lot::Mutex::new(file_config),
            _dir_lock: dir_lock,
        };
        let planner =
            bandwidth
                .plan(Arc::clone(&stopping))
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
        let members: Vec<&tandem_config::Group> = config
            .groups
            .iter()
            .filter(|g| g.primary == *here || g.replicas.iter().any(|r| &r.site == here))
            .collect();
        fdlimit::raise(members.len(), members.iter().map(|g| g.volumes.len()).sum());
        // The peer listener comes up before any group opens: a primary's
        // session for a group not open here yet is refused and retried
        // with backoff, not refused at connect.
        let listener =
            TcpListener::bind(&config.site.listen).map_err(|source| AgentError::PeerListen {
                addr: config.site.listen.clone(),
                source,
            })?;
        let sessions_cap = replication::session_cap(members.len());
        let reporter = Arc::new(cluster::gather::Reporter::default());
        agent.peers = Some(
            replication::PeerListener::start(
                listener,
                Arc::clone(&shared.receivers),
                tls,
                members.len(),
                Arc::clone(&reporter),
            )
            .map_err(|source| AgentError::PeerListen {
                addr: config.site.listen.clone(),
                source,
            })?,
        );
        info!(addr = %config.site.listen, sessions = sessions_cap, "listening for replication peers");
        if coordinated {
            agent.ownership = Some(ownership::Ownership::start(
                Arc::clone(&shared),
                Vec::new(),
            )?);
        }
        // No group is defined at runtime (API or peer) while the
        // configured ones open: a definition is checked against them all.
        let opening = Instant::now();
        let opened = {
            let _one_at_a_time = agent.defining.lock();
            startup::open_groups(
                &shared,
                &agent.groups,
                agent.ownership.as_ref().map(ownership::Ownership::handle),
                &members,
            )
        };
        if let Err(e) = opened {
            // What opened is stopped again, as at a clean stop.
            if let Err(stop_error) = agent.shutdown() {
                warn!("stopping after a failed start: {stop_error}");
            }
            return Err(e);
        }
        info!(
            groups = members.len(),
            elapsed_ms = u64::try_from(opening.elapsed().as_millis()).unwrap_or(u64::MAX),
            "every group open"
        );
        let view = Arc::new(agent.status_view());
        *shared.receivers.definer.write() =
            Some(Arc::new(runtime_groups::PeerDefiner(Arc::clone(&view))));
        reporter.set(Arc::clone(&view));
        match cluster::sample(Arc::clone(&view), Arc::clone(&stopping)) {
            Ok(sampler) => agent.threads.push(sampler),
            Err(e) => warn!("cannot start the status sampler: {e}"),
        }
        // The API comes up with every group open: a status that answers
        // lists them all (clients and scripts wait for the API to mean
        // that the agent is up).
        if let Err(e) = agent.serve(config, &view) {
            if let Err(stop_error) = agent.shutdown() {
                warn!("stopping after a failed start: {stop_error}");
            }
            return Err(e);
        }
        Ok(agent)
    }

    /// The API, and NBD on TCP if configured.
    fn serve(&mut self, config: &Config, view: &Arc<StatusView>) -> Result<(), AgentError> {
        self.api = Some(api::start(
            &config.site.api,
            &self.shared.layout,
            Arc::clone(view),
            config.api.metrics_auth,
            Arc::clone(&self.shared.stop),
        )?);
        if let Some(addr) = &config.site.nbd_listen {
            let listener = TcpListener::bind(addr).map_err(|source| AgentError::Listen {
                addr: addr.clone(),
                source,
            })?;
            self.tcp
                .serve_tcp(
                    listener,
                    Arc::new(catalog::LiveExports(Arc::clone(&self.shared.tcp_exports))),
                    nbd_listen_options(config, self.shared.tls.as_deref()),
                )
                .map_err(|source| AgentError::Listen {
                    addr: addr.clone(),
                    source,
                })?;
            if config.site.nbd_tls {
                info!(%addr, "NBD also on TCP, TLS required (STARTTLS, client certificates of the site CA)");
            } else if config.site.nbd_insecure {
                warn!(%addr, "NBD also on TCP WITHOUT TLS (site.nbd_insecure = true): anyone who reaches this address can read and write the disks");
            } else {
                info!(%addr, "NBD also on TCP");
            }
        }
        Ok(())
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

    /// Why this agent must exit, once it must: another agent runs with
    /// its site name (it refused ownership at start, or the name was
    /// taken from it); every group is fenced already.
    pub fn fatal(&self) -> Option<String> {
        self.ownership
            .as_ref()
            .and_then(ownership::Ownership::fatal)
    }

    /// Runs `f` once the agent must exit (at once if it must already;
    /// never without a coordinator).
    pub fn on_fatal(&self, f: Box<dyn FnOnce() + Send>) {
        if let Some(o) = &self.ownership {
            o.on_fatal(f);
        }
    }

    /// Reloads the configuration: `new` is the file as it reads now.
    /// Peers, groups, bandwidth, schedules and hook commands change in
    /// place; NBD clients of the groups that stay are not touched. A
    /// change that cannot be made refuses the whole reload (each one is
    /// logged) and the running configuration stays (docs/CONFIG.md,
    /// "Reload").
    pub fn reload(&self, new: Config) -> Result<Applied, ReloadError> {
        let mut running = self.file_config.lock();
        let (now, outcome) = self.status_view().reload(&running, new);
        *running = now;
        outcome
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
        self.shared.stopping.raise();
        if let Some(o) = self.ownership.as_mut() {
            o.stop_deciding();
        }
        if let Some(peers) = self.peers.take() {
            peers.stop();
        }
        let left = self.tcp.shutdown(Duration::from_secs(5));
        if left > 0 {
            let _ = self.tcp.shutdown(SHUTDOWN_GRACE);
        }
        let first_error = startup::stop_groups(&self.shared, &self.groups.all(), SHUTDOWN_GRACE);
        if let Some(o) = self.ownership.take() {
            o.stop();
        }
        self.server.stop();
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

/// How the TCP NBD listener talks to clients: with `site.nbd_tls`, TLS is
/// required (NBD_OPT_STARTTLS) and the client's certificate must be signed
/// by the site CA.
fn nbd_listen_options(config: &Config, tls: Option<&TlsIdentity>) -> tandem_nbd::ListenOptions {
    tandem_nbd::ListenOptions {
        tls: tls
            .filter(|_| config.site.nbd_tls)
            .map(TlsIdentity::server_config),
    }
}
