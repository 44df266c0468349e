//! The hypervisor a protected VM runs on (docs/VMS.md): a small interface
//! ([`Hypervisor`]) with a libvirt backend driving `virsh`
//! ([`virsh::Virsh`]) and an in-memory one for tests ([`fake::Fake`]), and
//! the domain XML read and rewritten without I/O ([`xml`]).

#![forbid(unsafe_code)]

pub mod fake;
pub mod qemu;
pub mod virsh;
pub mod xml;

use std::time::Duration;

pub use qemu::{InvalidTarget, PciAddress};
pub use xml::{Disk, DiskSource, ProtectedDisk, XmlError};

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

/// Where [`Hypervisor::move_disk`] puts a running guest's disk.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Destination {
    /// Tandem's form: the volume's NBD export on the agent's Unix socket,
    /// as the raw node `tandem-<target>` with QEMU's `reconnect-delay`
    /// ([`qemu::nbd_blockdev`]). The export must be exactly the disk's size.
    Nbd {
        volume: String,
        socket: String,
        reconnect_delay_secs: u32,
    },
    /// A local raw file (`tandem unprotect`), as the node
    /// `tandem-<target>-local`. Created at the disk's size if absent (QEMU
    /// must be able to open it: same host, and QEMU's user); if present it
    /// must be exactly the disk's size.
    File { path: String },
}

/// How far a live move has copied (the mirror job's `offset` and `len`:
/// `total` grows while the guest writes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub copied: u64,
    pub total: u64,
    /// Source and destination are in sync; the pivot comes next.
    pub ready: bool,
}

/// How a live move went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoveOutcome {
    /// From the first QMP command to the check after the pivot.
    pub elapsed: Duration,
    /// The pause at the pivot: from `block-job-complete` until QEMU shows
    /// the job concluded (an upper bound: each look costs a `virsh` call of
    /// some tens of ms).
    pub pivot: Duration,
    /// The node the device reads from now (`tandem-<target>` or
    /// `tandem-<target>-local`).
    pub node: String,
    /// The node it read from before.
    pub previous: String,
    /// The disk's size in bytes.
    pub size: u64,
}

/// Why a live move failed. The guest still reads from its old disk unless
/// [`HypervisorError::Move`]'s `guest_on` says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("the domain is not running ({0})")]
    NotRunning(DomainState),
    #[error("the domain has no disk {0}")]
    NoSuchDisk(String),
    #[error("QEMU has no block device {device} with a medium (looked for disk {target})")]
    NoBlockDevice { target: String, device: String },
    #[error("the disk reads from {0} already")]
    AlreadyThere(String),
    #[error("the destination is {destination} bytes but the disk is {disk}")]
    SizeMismatch { disk: u64, destination: u64 },
    #[error("cannot prepare {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("the mirror job failed: {0}")]
    JobFailed(String),
    #[error("the mirror job vanished before it was ready")]
    JobVanished,
    #[error("{stage} did not finish within {timeout:?}")]
    Timeout {
        stage: &'static str,
        timeout: Duration,
    },
    #[error("after the pivot the device reads from {actual:?}, not {expected}")]
    NotPivoted {
        expected: String,
        actual: Option<String>,
    },
    #[error("{0}")]
    Call(Box<HypervisorError>),
}

/// A live move that failed ([`HypervisorError::Move`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "moving disk {target} of {name}: {error}{}{}",
    match guest_on { Some(n) => format!(" (the disk reads from {n})"), None => String::new() },
    match cleanup { Some(e) => format!("; cleaning up also failed: {e}"), None => String::new() }
)]
pub struct MoveFailure {
    pub name: String,
    pub target: String,
    pub error: MoveError,
    /// The node the disk reads from after the cleanup, if it could be
    /// asked.
    pub guest_on: Option<String>,
    /// What went wrong cleaning up (cancelling the job, deleting the new
    /// node), if anything did.
    pub cleanup: Option<Box<HypervisorError>>,
}

impl HypervisorError {
    /// A failed move of disk `target` of `name`, nothing else known.
    pub fn moving(name: &str, target: &str, error: MoveError) -> HypervisorError {
        HypervisorError::Move(Box::new(MoveFailure {
            name: name.to_owned(),
            target: target.to_owned(),
            error,
            guest_on: None,
            cleanup: None,
        }))
    }

    /// The reason of a failed move, if this is one.
    pub fn move_error(&self) -> Option<&MoveError> {
        match self {
            HypervisorError::Move(f) => Some(&f.error),
            _ => None,
        }
    }
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
    #[error(transparent)]
    InvalidTarget(#[from] InvalidTarget),
    #[error("the domain's QEMU monitor answered something that is not JSON: {0}")]
    Monitor(String),
    #[error("QEMU refused {command}: {class}: {desc}")]
    Qmp {
        command: String,
        class: String,
        desc: String,
    },
    #[error(transparent)]
    Move(Box<MoveFailure>),
    #[error("destroying {name}: libvirt failed ({libvirt}), and killing its QEMU failed: {error}")]
    Kill {
        name: String,
        error: Box<KillError>,
        /// Why `virsh destroy` did not do it.
        libvirt: Box<HypervisorError>,
    },
}

/// Why [`virsh::Virsh`]'s destroy could not kill a domain's QEMU itself.
#[derive(Debug, thiserror::Error)]
pub enum KillError {
    #[error("the connection {0} names no local QEMU pid files (remote, or not the QEMU driver)")]
    NoPidDir(String),
    #[error("{0:?} cannot be a libvirt domain name")]
    InvalidName(String),
    #[error("cannot read {path}: {source}")]
    PidFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no process id: {content:?}")]
    BadPid {
        path: std::path::PathBuf,
        content: String,
    },
    #[error("process {pid} is not this domain's QEMU (its command line has no -name guest=...)")]
    NotItsQemu { pid: i32 },
    #[error("cannot signal process {pid}: {source}")]
    Signal { pid: i32, source: std::io::Error },
    #[error("process {pid} still runs {timeout:?} after SIGKILL")]
    StillAlive { pid: i32, timeout: Duration },
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
    /// Moves a running domain's disk `target` onto `to` while the guest
    /// runs, over QMP: `blockdev-add` of the destination node,
    /// `blockdev-mirror` (`sync: full`, `copy-mode: write-blocking`) from
    /// the node the disk reads from now, `progress` reported until the job
    /// is ready, `block-job-complete`, and a check that the device reads
    /// from the new node. On failure the job is cancelled and the new node
    /// deleted: the guest goes on with its old disk
    /// ([`HypervisorError::Move`]). The persistent definition is not
    /// changed ([`xml::protect`], [`xml::unprotect`] do that).
    fn move_disk(
        &self,
        name: &str,
        target: &str,
        to: &Destination,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<MoveOutcome, HypervisorError>;
    /// A QMP command to the domain's QEMU; its answer.
    fn monitor(
        &self,
        name: &str,
        command: &serde_json::Value,
    ) -> Result<serde_json::Value, HypervisorError>;
}
