//! The hypervisor a protected VM runs on (docs/VMS.md): a small interface
//! ([`Hypervisor`]) with a libvirt backend driving `virsh`
//! ([`virsh::Virsh`]) and an in-memory one for tests ([`fake::Fake`]), and
//! the domain XML read and rewritten without I/O ([`xml`]).

#![forbid(unsafe_code)]

pub mod fake;
pub mod virsh;
pub mod xml;

use std::time::Duration;

pub use xml::{Disk, DiskSource, XmlError};

/// A domain's state, in libvirt's words (SPEC §4.4 `vm.state`), and
/// `absent` where the domain is not defined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DomainState {
    #[serde(rename = "running")]
    Running,
    #[serde(rename = "idle")]
    Idle,
    #[serde(rename = "paused")]
    Paused,
    #[serde(rename = "in shutdown")]
    InShutdown,
    #[serde(rename = "shut off")]
    ShutOff,
    #[serde(rename = "crashed")]
    Crashed,
    #[serde(rename = "pmsuspended")]
    PmSuspended,
    #[serde(rename = "absent")]
    Absent,
}

impl DomainState {
    /// libvirt's word, as `virsh domstate` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            DomainState::Running => "running",
            DomainState::Idle => "idle",
            DomainState::Paused => "paused",
            DomainState::InShutdown => "in shutdown",
            DomainState::ShutOff => "shut off",
            DomainState::Crashed => "crashed",
            DomainState::PmSuspended => "pmsuspended",
            DomainState::Absent => "absent",
        }
    }

    /// Parses `virsh domstate` output.
    pub fn parse(word: &str) -> Option<DomainState> {
        Some(match word.trim() {
            "running" => DomainState::Running,
            "idle" => DomainState::Idle,
            "paused" => DomainState::Paused,
            "in shutdown" => DomainState::InShutdown,
            "shut off" => DomainState::ShutOff,
            "crashed" => DomainState::Crashed,
            "pmsuspended" => DomainState::PmSuspended,
            _ => return None,
        })
    }

    /// Whether a QEMU process runs for the domain.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            DomainState::Running
                | DomainState::Idle
                | DomainState::Paused
                | DomainState::InShutdown
                | DomainState::PmSuspended
        )
    }
}

impl std::fmt::Display for DomainState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A disk of a domain, with its size when the hypervisor knows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskInfo {
    #[serde(flatten)]
    pub disk: Disk,
    /// Guest-visible size in bytes.
    pub size: Option<u64>,
}

/// A domain as `tandem vms` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DomainInfo {
    pub name: String,
    pub state: DomainState,
    pub disks: Vec<DiskInfo>,
}

/// How a live disk copy went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyOutcome {
    /// How long the copy and its pivot took in all.
    pub elapsed: Duration,
}

/// Why the hypervisor did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{what} did not finish within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("{what} failed ({status}): {stderr}")]
    Failed {
        what: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("no domain named {0:?} on this host")]
    NoSuchDomain(String),
    #[error("{what}: unexpected output: {output:?}")]
    Output { what: String, output: String },
    #[error(transparent)]
    Xml(#[from] XmlError),
    #[error("the domain's QEMU monitor answered something that is not JSON: {0}")]
    Monitor(String),
}

/// What Tandem needs of a hypervisor. Every call is bounded in time.
pub trait Hypervisor: Send + Sync {
    /// Every domain defined or running on this host.
    fn domains(&self) -> Result<Vec<DomainInfo>, HypervisorError>;
    /// A domain's state (`Absent` if it is not defined).
    fn state(&self, name: &str) -> Result<DomainState, HypervisorError>;
    /// A domain's XML: the running one, or with `inactive` the persistent
    /// definition.
    fn xml(&self, name: &str, inactive: bool) -> Result<String, HypervisorError>;
    /// Defines (or redefines) a domain persistently; returns its name.
    fn define(&self, xml: &str) -> Result<String, HypervisorError>;
    /// Removes a domain's persistent definition (a running one goes on).
    fn undefine(&self, name: &str) -> Result<(), HypervisorError>;
    /// Starts a defined domain.
    fn start(&self, name: &str) -> Result<(), HypervisorError>;
    /// Stops a domain at once (its QEMU process is killed).
    fn destroy(&self, name: &str) -> Result<(), HypervisorError>;
    /// Asks the guest to shut down and waits up to `timeout`.
    fn shutdown(&self, name: &str, timeout: Duration) -> Result<(), HypervisorError>;
    /// Moves a running domain's disk `target` onto the disk described by
    /// `disk_xml` (a `<disk>` element) while the guest runs: copy, then
    /// pivot.
    fn copy_disk(
        &self,
        name: &str,
        target: &str,
        disk_xml: &str,
    ) -> Result<CopyOutcome, HypervisorError>;
    /// A QMP command to the domain's QEMU; its answer.
    fn monitor(
        &self,
        name: &str,
        command: &serde_json::Value,
    ) -> Result<serde_json::Value, HypervisorError>;
}
