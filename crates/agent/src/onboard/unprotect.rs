//! `tandem unprotect GROUP`: the group's VM goes back to plain local raw
//! files on the site that runs it — moved live when it runs, copied when
//! it is shut off —, its persistent definition back to `<disk>` elements,
//! and the group is removed from every site (docs/VMS.md, "Unprotect").
//! Nothing locks the VM to Tandem afterwards.

use std::path::PathBuf;

use tandem_hypervisor::{xml, Destination, DiskSource, DomainState, HypervisorError, XmlError};
use tracing::{info, warn};

use crate::runtime_groups::RemoveError;
use crate::view::StatusView;

/// Where the disks go unless `--to` says otherwise: libvirt's default
/// image directory.
pub const DEFAULT_DIR: &str = "/var/lib/libvirt/images";

/// `POST /api/v1/groups/{group}/unprotect`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnprotectRequest {
    /// The directory for the VM's raw files [default: `DEFAULT_DIR`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<PathBuf>,
}

/// What `tandem unprotect` did.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Unprotected {
    pub group: String,
    pub vm: String,
    /// Each disk's new file.
    pub disks: Vec<UnprotectedDisk>,
    /// Replicas that could not be told to drop the group (they keep it and
    /// its images until they are told again or it is removed by hand).
    pub replicas_not_told: Vec<String>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct UnprotectedDisk {
    pub target: String,
    pub file: PathBuf,
}

/// Why the VM was not unprotected.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UnprotectError {
    #[error("no group named {0:?} on this site")]
    NoSuchGroup(String),
    #[error("group {0} protects no VM (no vm = \"libvirt:...\"): nothing to unprotect")]
    NoVm(String),
    #[error(
        "this site does not serve group {group} (its owner is {owner}): run tandem unprotect \
         there"
    )]
    NotOwner { group: String, owner: String },
    #[error("VM {0} is being onboarded: wait for tandem protect to finish (or fail) first")]
    Onboarding(String),
    #[error("VM {vm} is {state}: unprotect needs it running or shut off")]
    State { vm: String, state: DomainState },
    #[error("{} exists: Tandem does not overwrite files (choose another --to)", .0.display())]
    Exists(PathBuf),
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("the hypervisor is not available: {0}")]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Xml(#[from] XmlError),
    #[error(transparent)]
    Copy(#[from] super::import::ImportError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the VM runs on its local files now, but removing the group failed: {0} (tandem \
         unprotect again finishes it)"
    )]
    Remove(#[source] RemoveError),
}

/// Why a replica was not told to drop the group.
#[derive(Debug, thiserror::Error)]
enum RetireError {
    #[error("no [[peer]] named {0}")]
    NoPeer(String),
    #[error(transparent)]
    Connect(#[from] tandem_replication::shipper::ConnectError),
    #[error(transparent)]
    Ship(#[from] tandem_replication::shipper::ShipError),
}

impl UnprotectError {
    pub(crate) fn status(&self) -> u16 {
        match self {
            UnprotectError::NoSuchGroup(_) => 404,
            UnprotectError::NoVm(_)
            | UnprotectError::Exists(_)
            | UnprotectError::NotADirectory(_) => 400,
            UnprotectError::NotOwner { .. }
            | UnprotectError::Onboarding(_)
            | UnprotectError::State { .. } => 409,
            UnprotectError::Hypervisor(_) => 503,
            UnprotectError::Xml(_)
            | UnprotectError::Copy(_)
            | UnprotectError::Io { .. }
            | UnprotectError::Remove(_) => 500,
        }
    }
}

impl StatusView {
    /// Unprotects the VM of `group` (on the site serving it).
    pub(crate) fn unprotect(
        &self,
        group: &str,
        request: &UnprotectRequest,
    ) -> Result<Unprotected, UnprotectError> {
        let shared = &self.shared;
        let vms = &shared.vms;
        let hv = vms.hypervisor();
        let rt = self
            .groups
            .find(group)
            .ok_or_else(|| UnprotectError::NoSuchGroup(group.to_owned()))?;
        let vm = rt
            .cfg
            .vm
            .clone()
            .ok_or_else(|| UnprotectError::NoVm(group.to_owned()))?;
        if !rt.gate().is_some_and(|g| g.is_open()) {
            return Err(UnprotectError::NotOwner {
                group: group.to_owned(),
                owner: rt
                    .owner
                    .lock()
                    .clone()
                    .unwrap_or_else(|| rt.cfg.primary.clone()),
            });
        }
        if vms.is_onboarding(group) {
            return Err(UnprotectError::Onboarding(vm));
        }
        let marker = vms.unprotect_marker(group);
        let state = hv.state(&vm)?;
        // A group whose VM is gone already (an earlier unprotect that
        // moved the disks, then failed to remove the group) is removed.
        let persistent = match state {
            DomainState::Running | DomainState::ShutOff => hv.xml(&vm, true)?,
            state => return Err(UnprotectError::State { vm, state }),
        };
        let dir = request
            .to
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
        if !dir.is_dir() {
            return Err(UnprotectError::NotADirectory(dir));
        }
        let disks: Vec<(String, String, PathBuf)> = xml::read(&persistent)?
            .disks
            .into_iter()
            .filter(|d| d.tandem)
            .filter_map(|d| match d.source {
                DiskSource::Nbd { export, .. } => {
                    let file = dir.join(format!("{vm}-{}.raw", d.target));
                    Some((d.target, export, file))
                }
                _ => None,
            })
            .collect();
        for (_, _, file) in &disks {
            if file.exists() {
                return Err(UnprotectError::Exists(file.clone()));
            }
        }
        // Ownership leaves the VM alone from here.
        tandem_replication::files::store_at(&marker, 0o600, b"unprotect\n").map_err(|e| {
            UnprotectError::Io {
                path: marker.clone(),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
        let result = self.move_out(&vm, state, &persistent, &disks);
        if let Err(e) = result {
            let _ = std::fs::remove_file(&marker);
            return Err(e);
        }
        info!(%group, %vm, "the VM runs on local files: removing the group");
        let mut not_told = Vec::new();
        for r in &rt.cfg.replicas {
            if let Err(e) = self.retire_at(&r.site, group) {
                warn!(%group, replica = %r.site, "the replica was not told to drop the group: {e}");
                not_told.push(r.site.clone());
            }
        }
        self.remove_group(group).map_err(UnprotectError::Remove)?;
        Ok(Unprotected {
            group: group.to_owned(),
            vm,
            disks: disks
                .into_iter()
                .map(|(target, _, file)| UnprotectedDisk { target, file })
                .collect(),
            replicas_not_told: not_told,
        })
    }

    /// Moves (running) or copies (shut off) each disk to its file and
    /// redefines the domain on them.
    fn move_out(
        &self,
        vm: &str,
        state: DomainState,
        persistent: &str,
        disks: &[(String, String, PathBuf)],
    ) -> Result<(), UnprotectError> {
        let shared = &self.shared;
        let hv = shared.vms.hypervisor();
        for (target, volume, file) in disks {
            if state == DomainState::Running {
                let to = Destination::File {
                    path: file.display().to_string(),
                };
                let out = hv.move_disk(vm, target, &to, &mut |_| {})?;
                info!(%vm, disk = %target, file = %file.display(), pivot_ms = out.pivot.as_secs_f64() * 1e3, "disk moved to a local file");
            } else {
                super::import::copy_out(&shared.layout.socket(volume), volume, file)?;
            }
        }
        let pairs: Vec<(String, String)> = disks
            .iter()
            .map(|(t, _, f)| (t.clone(), f.display().to_string()))
            .collect();
        hv.define(&xml::unprotect(persistent, &pairs)?)?;
        Ok(())
    }

    /// Tells a replica site to drop the group.
    fn retire_at(&self, site: &str, group: &str) -> Result<(), RetireError> {
        let shared = &self.shared;
        let config = shared.config();
        let peer = config
            .peer(site)
            .ok_or_else(|| RetireError::NoPeer(site.to_owned()))?;
        let conn = crate::replication::connect(&peer.address, site, shared.tls.as_deref())?;
        tandem_replication::shipper::retire(conn, group)?;
        Ok(())
    }
}
