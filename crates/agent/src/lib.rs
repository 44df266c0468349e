//! The site agent: opens the volumes of the groups this site serves, runs
//! change capture for each group, and serves each volume over NBD at
//! `<data_dir>/nbd/<volume>.sock` (and optionally TCP). See
//! `docs/ARCHITECTURE.md`.

mod catalog;
mod export;
pub mod layout;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tandem_capture::{CaptureError, CaptureVolume, GroupCapture};
use tandem_config::Config;
use tandem_nbd::{Export, Server};
use tandem_volume::{RawImage, VolumeError};
use tracing::{info, warn};

pub use export::VolumeExport;
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
}

/// How long a stopping agent waits for clients to finish their requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// A running site agent.
pub struct Agent {
    server: Arc<Server>,
    groups: Vec<Arc<GroupCapture>>,
    sockets: Vec<PathBuf>,
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
        let server = Server::new();
        let mut agent = Agent {
            server,
            groups: Vec::new(),
            sockets: Vec::new(),
        };
        let mut all_exports: BTreeMap<String, Arc<dyn Export>> = BTreeMap::new();
        for group in &config.groups {
            let here = &config.site.name;
            if group.primary != *here {
                if group.replicas.iter().any(|r| &r.site == here) {
                    for v in &group.volumes {
                        RawImage::open_or_create(&layout.image(&v.name), v.size)?;
                    }
                    info!(group = %group.name, "replica site for this group: volumes are not served here");
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
            for index in 0..capture.volumes().len() {
                let export: Arc<dyn Export> =
                    Arc::new(VolumeExport::new(Arc::clone(&capture), index));
                agent.listen_unix(&layout, Arc::clone(&export))?;
                all_exports.insert(export.name().to_owned(), export);
            }
            info!(
                group = %group.name,
                volumes = capture.volumes().len(),
                replicas = replicas.len(),
                "serving group as primary"
            );
            agent.groups.push(capture);
        }
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
        let left = self.server.shutdown(SHUTDOWN_GRACE);
        if left > 0 {
            warn!(
                connections = left,
                "clients still connected after the grace period"
            );
        }
        for path in &self.sockets {
            let _ = std::fs::remove_file(path);
        }
        let mut first_error = None;
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
