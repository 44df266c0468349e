//! Why the demo stopped: one enum, each variant with what was being done
//! and where (site, process, path), the cause as its `source`.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use crate::api::ApiError;
use crate::cluster::{ProcName, SiteName, GROUP, VOLUME};
use crate::nbd::NbdError;
use crate::vm::VM;
use crate::writer::WriteFailure;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("interrupted")]
    Interrupted,
    #[error("cannot write the demo's output")]
    Output(#[source] io::Error),
    #[error("cannot create a directory in {}", base.display())]
    CreateDir {
        base: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot find free loopback ports")]
    Ports(#[source] io::Error),
    #[error("cannot write {}", path.display())]
    WriteConfig {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the demo's own configuration for {site} is invalid")]
    Config {
        site: SiteName,
        #[source]
        source: tandem_config::ConfigError,
    },
    #[error("cannot open the log {}", path.display())]
    OpenLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start {proc} ({})", exe.display())]
    Spawn {
        proc: ProcName,
        exe: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot SIGKILL {proc}")]
    Kill {
        proc: ProcName,
        #[source]
        source: io::Error,
    },
    #[error("{proc} exited unexpectedly ({status})\n{tail}")]
    Exited {
        proc: ProcName,
        status: ExitStatus,
        /// The last lines of its log.
        tail: String,
    },
    #[error("timed out after {} s waiting for {what}\n{logs}", timeout.as_secs())]
    Timeout {
        what: Wait,
        timeout: Duration,
        /// The last lines of the logs that may say why.
        logs: String,
    },
    #[error("cannot start the {name} thread")]
    Thread {
        name: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot get {site}'s status")]
    Status {
        site: SiteName,
        #[source]
        source: ApiError,
    },
    #[error("pausing {site}'s link to {peer} through its API failed")]
    Bandwidth {
        site: SiteName,
        peer: SiteName,
        #[source]
        source: ApiError,
    },
    #[error("the migration through {site}'s API failed")]
    Migrate {
        site: SiteName,
        #[source]
        source: ApiError,
    },
    #[error("{action} on {site} over NBD")]
    Nbd {
        site: SiteName,
        action: NbdAction,
        #[source]
        source: NbdError,
    },
    #[error("{site}'s export is {size} bytes, expected {expected}")]
    ExportSize {
        site: SiteName,
        size: u64,
        expected: u64,
    },
    #[error(
        "{site} acknowledged writes but reports role {role} in epoch {epoch} \
         (expected primary in epoch {expected_epoch})"
    )]
    NotPromoted {
        site: SiteName,
        role: tandem_agent::status::Role,
        epoch: u64,
        expected_epoch: u64,
    },
    #[error("{owner} does not list {replica} as a replica")]
    MissingReplica { owner: SiteName, replica: SiteName },
    #[error(
        "the migration ended with owner {owner} in epoch {epoch} \
         (expected {expected_owner} in epoch {expected_epoch})"
    )]
    MigrationEnded {
        owner: String,
        epoch: u64,
        expected_owner: SiteName,
        expected_epoch: u64,
    },
    #[error("the application stopped writing: all {slots} record slots are used")]
    OutOfRecordSlots { slots: u64 },
    #[error("{site} acknowledged no write")]
    NoAcks { site: SiteName },
    #[error(
        "{} records acknowledged by {site} after the migration are not on {site}: {records:?}",
        records.len()
    )]
    LostAfterMigration { site: SiteName, records: Vec<u64> },
    #[error(
        "the migration lost {} acknowledged writes (records {records:?}): \
         a planned migration must lose nothing",
        records.len()
    )]
    LostInMigration { records: Vec<u64> },
    #[error(
        "the {} read back from {site} differ: blake3 {found}, written {expected}",
        tandem_config::format_size_approx(*len)
    )]
    Checksum {
        site: SiteName,
        /// Bytes compared, from the start of the volume.
        len: u64,
        found: String,
        expected: String,
    },
    #[error("cannot read {}", path.display())]
    ReadImage {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the three images differ after everything was replicated: {}",
        hashes.iter().map(|(s, h)| format!("{s} {}", short(h))).collect::<Vec<_>>().join(", ")
    )]
    ImagesDiffer { hashes: Vec<(SiteName, String)> },
    /// `tandem demo --vm` without what it runs.
    #[error(
        "tandem demo --vm needs a hypervisor and the tools that build its guest, and this \
         machine lacks {}: install the Debian packages {} (scripts/test installs all of \
         them; on machines with a qemu-utils backport, pin it to qemu-system-x86's version in \
         the same line: apt-get install --allow-downgrades qemu-system-x86 \
         qemu-utils=VERSION ...)",
        missing.join(", "),
        packages.join(" ")
    )]
    VmTools {
        /// Commands not found on PATH (with a hint where one is elsewhere).
        missing: Vec<String>,
        /// The Debian packages that bring them.
        packages: Vec<&'static str>,
    },
    #[error(
        "tandem demo --vm must run as root: it starts a libvirt daemon per site in \
         private mount namespaces, and QEMU opens root-owned NBD sockets"
    )]
    VmNotRoot,
    #[error("{action}")]
    Vm {
        action: VmAction,
        #[source]
        source: tandem_vmkit::Error,
    },
    #[error("tandem protect {VM} on {site} failed")]
    Protect {
        site: SiteName,
        #[source]
        source: ApiError,
    },
    #[error("tandem protect {VM} stopped at ny in stage {stage}: {reason}")]
    Onboarding { stage: String, reason: String },
    #[error(
        "{} ran at ny ({pid_before}), but a different process ({}) after tandem protect: \
         the guest was restarted",
        VM,
        pid_after.map_or_else(|| "none".to_owned(), |p| p.to_string())
    )]
    GuestRestarted {
        pid_before: u32,
        pid_after: Option<u32>,
    },
    #[error(
        "{VM} reports an error on its console: {line}\n--- its console's last lines ---\n{tail}"
    )]
    GuestFailed { line: String, tail: String },
    #[error("cannot copy {} to {}", from.display(), to.display())]
    CopyImage {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} of the files {VM} acknowledged at ny before the host loss are not intact at \
         chicago (sync mode must lose none): {}",
        files.len(),
        files.iter().map(|(n, why)| format!("f{n} {why}")).collect::<Vec<_>>().join(", ")
    )]
    LostAcked { files: Vec<(u64, String)> },
    /// A wait that failed, with each site's view and the application's
    /// last error.
    #[error(
        "{}\nwhat the sites say:\n{}the application's last error: {}",
        chain(cause),
        views.iter().map(|(s, v)| format!("  {s}: {v}\n")).collect::<String>(),
        last_error.as_ref().map_or_else(|| "none".to_owned(), ToString::to_string)
    )]
    Stuck {
        cause: Box<DemoError>,
        views: Vec<(SiteName, String)>,
        last_error: Option<WriteFailure>,
    },
}

/// What the demo was waiting for when it gave up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    WitnessListening,
    ApiAnswers(SiteName),
    FirstPrimary,
    Failover,
    Follows {
        replica: SiteName,
        owner: SiteName,
    },
    CaughtUp(SiteName),
    Records {
        site: SiteName,
        count: usize,
    },
    Rejoined,
    SentEverything {
        from: SiteName,
        to: SiteName,
    },
    Migration,
    WriteAfterMigration,
    /// `--vm`: the guest's console shows this many `ACK` lines in all.
    GuestAcks {
        site: SiteName,
        count: usize,
    },
    Onboarded,
    ReplicasStreaming,
    Definition(SiteName),
    VmRunning(SiteName),
    VmPrimary(SiteName),
    GuestWritesAgain {
        site: SiteName,
        after: u64,
    },
}

impl fmt::Display for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Wait::WitnessListening => write!(f, "the witness to listen"),
            Wait::ApiAnswers(site) => write!(f, "{site}'s API to answer"),
            Wait::FirstPrimary => write!(
                f,
                "ny to be primary in epoch 1 with chicago and seattle streaming"
            ),
            Wait::Failover => write!(f, "a write acknowledged by chicago (automatic failover)"),
            Wait::Follows { replica, owner } => write!(f, "{replica} to stream from {owner}"),
            Wait::CaughtUp(owner) => write!(f, "{owner}'s replicas to catch up"),
            Wait::Records { site, count } => write!(f, "{count} records acknowledged by {site}"),
            Wait::Rejoined => write!(f, "ny to come back as chicago's replica, streaming"),
            Wait::SentEverything { from, to } => write!(f, "{from} to have sent {to} everything"),
            Wait::Migration => write!(
                f,
                "the migration to finish (POST /api/v1/groups/web01/migrate on chicago)"
            ),
            Wait::WriteAfterMigration => {
                write!(f, "a write acknowledged by ny after the migration")
            }
            Wait::GuestAcks { site, count } => write!(
                f,
                "{VM} at {site} to acknowledge {count} files in all (ACK lines on its console)"
            ),
            Wait::Onboarded => write!(
                f,
                "tandem protect to move {VM}'s disk onto its volume (vm.onboarding.stage \"done\" at ny)"
            ),
            Wait::ReplicasStreaming => write!(f, "chicago and seattle to stream {GROUP} from ny"),
            Wait::Definition(site) => write!(f, "{VM}'s definition at {site} (vms/{GROUP}.xml)"),
            Wait::VmRunning(site) => write!(f, "{VM}'s QEMU to run at {site}"),
            Wait::VmPrimary(site) => {
                write!(f, "{site} to report itself primary with {VM} running")
            }
            Wait::GuestWritesAgain { site, after } => write!(
                f,
                "{VM} at {site} to acknowledge a file after f{after}, the last one ny acknowledged"
            ),
        }
    }
}

/// What `tandem demo --vm` was doing with libvirt, the guest or its disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmAction {
    StartLibvirt(SiteName),
    GuestImage,
    MakeDisk,
    StartGuest,
    CrashHost(SiteName),
    Suspend(SiteName),
    Resume(SiteName),
    ReplayJournal,
    Fsck,
    ReadFiles,
}

impl fmt::Display for VmAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmAction::StartLibvirt(site) => write!(f, "cannot start {site}'s libvirt daemon"),
            VmAction::GuestImage => write!(
                f,
                "cannot build the guest image (a Debian kernel and a busybox initramfs, \
                 cached in /var/cache/tandem-guest; the first build downloads the kernel \
                 package with apt-get)"
            ),
            VmAction::MakeDisk => write!(f, "cannot make {VM}'s ext4 disk"),
            VmAction::StartGuest => write!(f, "cannot start {VM} at ny"),
            VmAction::CrashHost(site) => write!(f, "cannot crash {site}'s host"),
            VmAction::Suspend(site) => write!(f, "cannot suspend {VM} at {site}"),
            VmAction::Resume(site) => write!(f, "cannot resume {VM} at {site}"),
            VmAction::ReplayJournal => {
                write!(
                    f,
                    "cannot replay the journal on the copy of chicago's volume"
                )
            }
            VmAction::Fsck => write!(f, "the copy of chicago's volume is not a clean file system"),
            VmAction::ReadFiles => {
                write!(f, "cannot read the files on the copy of chicago's volume")
            }
        }
    }
}

/// What the demo was doing over NBD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NbdAction {
    Open,
    /// The bulk data, in MiB.
    WriteMiB(u64),
    Flush,
    ReadRecord(u64),
    /// The bulk data, this many bytes, read back for its checksum.
    ReadBack(u64),
}

impl fmt::Display for NbdAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAction::Open => write!(f, "cannot open {VOLUME}"),
            NbdAction::WriteMiB(i) => write!(f, "writing MiB {i}"),
            NbdAction::Flush => write!(f, "flushing"),
            NbdAction::ReadRecord(seq) => write!(f, "reading record {seq} back"),
            NbdAction::ReadBack(len) => write!(
                f,
                "reading the {} back",
                tandem_config::format_size_approx(*len)
            ),
        }
    }
}

/// An error with its causes, as `anyhow` shows them with `{:#}`.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The first 16 hex digits of a hash.
pub(crate) fn short(hash: &str) -> &str {
    hash.get(..16).unwrap_or(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stuck_demo_shows_the_cause_with_its_chain_and_the_views() {
        let e = DemoError::Stuck {
            cause: Box::new(DemoError::Status {
                site: SiteName::Chicago,
                source: ApiError::NoGroup {
                    group: crate::GROUP,
                },
            }),
            views: vec![(SiteName::Ny, "down".into())],
            last_error: None,
        };
        assert_eq!(
            e.to_string(),
            "cannot get chicago's status: the agent does not report group web01\n\
             what the sites say:\n  ny: down\nthe application's last error: none"
        );
    }
}
