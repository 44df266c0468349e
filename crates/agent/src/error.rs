//! The agent's errors: each says what failed, on what, and why.

use std::path::PathBuf;

use tandem_capture::CaptureError;
use tandem_replication::ReplicaError;
use tandem_volume::VolumeError;

use crate::rolefile::RoleFileError;

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
    #[error("cannot {what}: {source}")]
    Thread {
        what: String,
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
    #[error("cannot serve the API on {addr} (site.api): {source}")]
    Api {
        addr: String,
        source: std::io::Error,
    },
    #[error("API token {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    RoleFile(#[from] RoleFileError),
    /// A role change found the group in another role than it expects.
    #[error("group {group}: not {expected} on this site")]
    WrongRole {
        group: String,
        expected: &'static str,
    },
    #[error("group {group}: the replication session did not end within {waited:?}")]
    SessionStuck {
        group: String,
        waited: std::time::Duration,
    },
    #[error("{path}: the data directory is in use by another agent (is another agent running on this data_dir?)")]
    DataDirInUse { path: PathBuf },
    /// The agent was told to stop while it was starting.
    #[error("the agent is stopping")]
    Stopping,
    #[error("no coordinator configured ([coordinator] kind = \"none\")")]
    NoCoordinator,
    #[error("[coordinator] witness: {0}")]
    Witness(#[from] tandem_coordinator::witness::WitnessError),
    #[error("[coordinator] etcd: {0}")]
    Etcd(#[from] tandem_coordinator::etcd::EtcdConfigError),
}
