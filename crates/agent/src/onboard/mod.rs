//! `tandem protect DOMAIN`: a domain of this host becomes a protected VM
//! (docs/VMS.md, "Onboarding"). The request is checked and the group
//! defined (and sent to its replicas) before the API answers; a thread
//! then moves the disks onto the group's volumes — live, by QEMU's block
//! mirror and a pivot, when the VM runs; copied when it is shut off —,
//! rewrites the persistent definition to Tandem's disk form and keeps it
//! with the group. Status shows how it goes (`vm.onboarding`).
//!
//! `<data_dir>/vms/<group>.onboarding` (the plan, JSON) exists from
//! before the group is defined until the definition is kept: while it
//! does, ownership neither starts nor keeps the VM, and a second
//! `tandem protect` of the domain resumes where the first stopped.

mod import;
mod plan;
mod unprotect;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_hypervisor::{
    xml, Destination, DomainState, Hypervisor, HypervisorError, MoveError, ProtectedDisk,
};
use tracing::{error, info, warn};

use crate::group::{Groups, Shared};
use crate::runtime_groups::DefineError;
use crate::status::{Onboarding, OnboardingDisk, OnboardingStage};
use crate::view::StatusView;

pub use plan::{PlanError, PlannedDisk, ProtectRequest, ReplicaRequest};
pub(crate) use unprotect::UnprotectError;
pub use unprotect::{UnprotectRequest, Unprotected, UnprotectedDisk, DEFAULT_DIR};

/// QEMU's `reconnect-delay` on a protected disk: an agent restart within
/// this many seconds is not seen by the guest (its requests wait).
pub const RECONNECT_DELAY_SECS: u32 = 30;
/// How long onboarding waits for the new group's exports to take writes.
const ADMIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Why `tandem protect` was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProtectError {
    #[error("the hypervisor is not available: {0}")]
    Hypervisor(#[from] HypervisorError),
    #[error("no domain named {0:?} on this host")]
    NoSuchDomain(String),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Import(#[from] import::ImportError),
    #[error(transparent)]
    Define(#[from] DefineError),
    #[error("group {0} exists and protects no VM being onboarded: choose another --group")]
    GroupExists(String),
    #[error("VM {domain} is being onboarded into group {group} now")]
    Busy { domain: String, group: String },
    #[error("{}: {source}", path.display())]
    Marker {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the onboarding thread: {0}")]
    Thread(#[source] std::io::Error),
}

impl ProtectError {
    /// The HTTP status code of this refusal.
    pub(crate) fn status(&self) -> u16 {
        match self {
            ProtectError::Hypervisor(_) => 503,
            ProtectError::NoSuchDomain(_) => 404,
            ProtectError::Plan(PlanError::AlreadyProtected { .. })
            | ProtectError::GroupExists(_)
            | ProtectError::Busy { .. } => 409,
            ProtectError::Plan(_) | ProtectError::Import(_) => 400,
            ProtectError::Define(DefineError::Agent(_)) => 500,
            ProtectError::Define(_) => 400,
            ProtectError::Marker { .. } | ProtectError::Thread(_) => 500,
        }
    }
}

/// The marker's content: what is being onboarded.
#[derive(serde::Serialize, serde::Deserialize)]
struct Marker {
    domain: String,
    disks: Vec<PlannedDisk>,
}

/// The answer to `POST /api/v1/protect`.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Accepted {
    pub group: String,
    /// A previous, unfinished onboarding of this domain is carried on.
    pub resumed: bool,
}

impl StatusView {
    /// Checks the request, defines the group (or finds the one an earlier
    /// attempt left) and starts moving the domain onto it.
    pub(crate) fn protect(&self, request: &ProtectRequest) -> Result<Accepted, ProtectError> {
        let shared = &self.shared;
        let vms = &shared.vms;
        let hv = Arc::clone(vms.hypervisor());
        let domain = request.domain.as_str();
        let all = self.groups.all();
        let protected_by = all
            .iter()
            .find(|g| g.cfg.vm.as_deref() == Some(domain))
            .map(|g| g.cfg.name.clone());
        // An earlier attempt that did not finish is resumed.
        if let Some(group) = &protected_by {
            if vms.is_onboarding(group) {
                let marker = read_marker(&vms.onboarding_marker(group))?;
                let state = hv.state(domain)?;
                spawn(
                    Arc::clone(shared),
                    Arc::clone(&self.groups),
                    group.clone(),
                    marker,
                    state,
                )?;
                return Ok(Accepted {
                    group: group.clone(),
                    resumed: true,
                });
            }
        }
        let state = hv.state(domain)?;
        if state == DomainState::Absent {
            return Err(ProtectError::NoSuchDomain(domain.to_owned()));
        }
        let persistent = hv.xml(domain, true)?;
        let running_xml = if state == DomainState::Running {
            Some(hv.xml(domain, false)?)
        } else {
            None
        };
        let sizes = disk_sizes(&*hv, domain, state, &persistent)?;
        let plan = plan::plan(
            request,
            &shared.site,
            &plan::Domain {
                name: domain,
                state,
                persistent: &persistent,
                running: running_xml.as_deref(),
                sizes: &sizes,
                protected_by: protected_by.as_deref(),
            },
        )?;
        if self.groups.find(&plan.group).is_some() {
            return Err(ProtectError::GroupExists(plan.group));
        }
        let marker = Marker {
            domain: plan.domain.clone(),
            disks: plan.disks.clone(),
        };
        let path = vms.onboarding_marker(&plan.group);
        write_marker(&path, &marker)?;
        if let Err(e) = self.define_group(&plan.definition) {
            let _ = std::fs::remove_file(&path);
            return Err(e.into());
        }
        info!(group = %plan.group, vm = domain, live = plan.running, "onboarding: group defined");
        spawn(
            Arc::clone(shared),
            Arc::clone(&self.groups),
            plan.group.clone(),
            marker,
            state,
        )?;
        Ok(Accepted {
            group: plan.group,
            resumed: false,
        })
    }
}

/// Each writable disk's guest-visible size: QEMU's for a running domain,
/// the image's for one that is shut off.
fn disk_sizes(
    hv: &dyn Hypervisor,
    domain: &str,
    state: DomainState,
    persistent: &str,
) -> Result<Vec<(String, u64)>, ProtectError> {
    if state.is_active() {
        let info = hv
            .domains()?
            .into_iter()
            .find(|d| d.name == domain)
            .ok_or_else(|| ProtectError::NoSuchDomain(domain.to_owned()))?;
        return Ok(info
            .disks
            .into_iter()
            .filter_map(|d| d.size.map(|s| (d.disk.target, s)))
            .collect());
    }
    let parsed = xml::read(persistent).map_err(PlanError::from)?;
    plan::writable_disks(domain, &parsed)?
        .into_iter()
        .map(|(target, source, format)| Ok((target, import::virtual_size(&source, &format)?)))
        .collect()
}

fn write_marker(path: &std::path::Path, marker: &Marker) -> Result<(), ProtectError> {
    let err = |source| ProtectError::Marker {
        path: path.to_owned(),
        source,
    };
    let text = serde_json::to_vec_pretty(marker).map_err(|e| err(std::io::Error::other(e)))?;
    tandem_replication::files::store_at(path, 0o600, &text).map_err(|e| match e {
        tandem_replication::files::FileError::Io { source, .. } => err(source),
        other => err(std::io::Error::other(other.to_string())),
    })
}

fn read_marker(path: &std::path::Path) -> Result<Marker, ProtectError> {
    let err = |source| ProtectError::Marker {
        path: path.to_owned(),
        source,
    };
    let text = std::fs::read(path).map_err(err)?;
    serde_json::from_slice(&text).map_err(|e| err(std::io::Error::other(e)))
}

fn spawn(
    shared: Arc<Shared>,
    groups: Arc<Groups>,
    group: String,
    marker: Marker,
    state: DomainState,
) -> Result<(), ProtectError> {
    let live = state == DomainState::Running;
    let began = shared.vms.begin_onboarding(
        &group,
        Onboarding {
            stage: OnboardingStage::Preparing,
            live,
            disks: marker
                .disks
                .iter()
                .map(|d| OnboardingDisk {
                    target: d.target.clone(),
                    volume: d.volume.clone(),
                    copied_bytes: 0,
                    total_bytes: d.size,
                    done: false,
                    pivot_ms: None,
                })
                .collect(),
            error: None,
        },
    );
    if !began {
        return Err(ProtectError::Busy {
            domain: marker.domain,
            group,
        });
    }
    std::thread::Builder::new()
        .name(format!("onboard-{group}"))
        .spawn(move || {
            let result = run(&shared, &groups, &group, &marker, live);
            let vms = &shared.vms;
            match result {
                Ok(()) => {
                    vms.update_onboarding(&group, |o| o.stage = OnboardingStage::Done);
                    info!(%group, vm = %marker.domain, "onboarding done: the VM is protected");
                }
                Err(e) => {
                    error!(%group, vm = %marker.domain, "onboarding stopped: {e}");
                    vms.update_onboarding(&group, |o| {
                        o.stage = OnboardingStage::Failed;
                        o.error = Some(e.to_string());
                    });
                }
            }
        })
        .map(|_| ())
        .map_err(ProtectError::Thread)
}

/// Why onboarding stopped half-way.
#[derive(Debug, thiserror::Error)]
enum OnboardError {
    #[error("group {0} is gone")]
    NoGroup(String),
    #[error(
        "the group's exports did not take writes within {0:?} (is this site its owner? see \
         tandem status)"
    )]
    NotAdmitted(Duration),
    #[error("{error}{}", moved_back_note(moved_back, left))]
    Copy {
        error: String,
        moved_back: Vec<String>,
        left: Vec<String>,
    },
    #[error("the domain is {0} now: a live move needs it running")]
    NotRunning(DomainState),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Xml(#[from] tandem_hypervisor::XmlError),
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    #[error("cannot remove {}: {source}", path.display())]
    Marker {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

fn moved_back_note(moved_back: &[String], left: &[String]) -> String {
    let mut s = String::new();
    if !moved_back.is_empty() {
        s.push_str(&format!(
            "; disk(s) {} moved back to their files",
            moved_back.join(", ")
        ));
    }
    if !left.is_empty() {
        s.push_str(&format!(
            "; disk(s) {} stay on their volumes (current data)",
            left.join(", ")
        ));
    }
    s.push_str("; run tandem protect again to resume");
    s
}

fn run(
    shared: &Shared,
    groups: &Groups,
    group: &str,
    marker: &Marker,
    live: bool,
) -> Result<(), OnboardError> {
    let vms = &shared.vms;
    let hv = vms.hypervisor();
    let domain = marker.domain.as_str();
    // The exports take writes once the group is admitted.
    let deadline = Instant::now() + ADMIT_TIMEOUT;
    let rt = loop {
        let rt = groups
            .find(group)
            .ok_or_else(|| OnboardError::NoGroup(group.to_owned()))?;
        if rt.gate().is_some_and(|g| g.is_open()) {
            break rt;
        }
        if Instant::now() >= deadline {
            return Err(OnboardError::NotAdmitted(ADMIT_TIMEOUT));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    vms.update_onboarding(group, |o| o.stage = OnboardingStage::Copying);
    if live {
        move_live(shared, group, marker)?;
    } else {
        for d in &marker.disks {
            let socket = shared.layout.socket(&d.volume);
            import::copy(&d.source, &d.format, &d.volume, &socket, &mut |bp| {
                vms.update_onboarding_disk(group, &d.target, |x| {
                    x.copied_bytes = d.size / 10_000 * bp;
                });
            })
            .map_err(|e| OnboardError::Copy {
                error: e.to_string(),
                moved_back: Vec::new(),
                left: Vec::new(),
            })?;
            vms.update_onboarding_disk(group, &d.target, |x| {
                x.copied_bytes = d.size;
                x.done = true;
            });
        }
    }
    vms.update_onboarding(group, |o| o.stage = OnboardingStage::Defining);
    let persistent = hv.xml(domain, true)?;
    let already: Vec<String> = xml::read(&persistent)?
        .disks
        .into_iter()
        .filter(|d| d.tandem)
        .map(|d| d.target)
        .collect();
    let disks: Vec<ProtectedDisk> = marker
        .disks
        .iter()
        .filter(|d| !already.contains(&d.target))
        .map(|d| ProtectedDisk {
            target: d.target.clone(),
            volume: d.volume.clone(),
            socket: shared.layout.socket(&d.volume).display().to_string(),
        })
        .collect();
    let protected = xml::protect(&persistent, &disks, RECONNECT_DELAY_SECS)?;
    hv.define(&protected)?;
    let path = vms.onboarding_marker(group);
    std::fs::remove_file(&path).map_err(|source| OnboardError::Marker {
        path: path.clone(),
        source,
    })?;
    vms.keep_definition(&rt.cfg)?;
    if !live {
        // Protected means running at the owner: a VM imported shut off
        // starts now, on its volumes.
        vms.start(&rt.cfg)?;
    }
    rt.vm_started
        .store(true, std::sync::atomic::Ordering::Release);
    vms.refresh(&rt.cfg);
    Ok(())
}

/// Moves each disk of the running domain onto its volume; on a failure,
/// moves the ones this run moved back where it can (raw files).
fn move_live(shared: &Shared, group: &str, marker: &Marker) -> Result<(), OnboardError> {
    let vms = &shared.vms;
    let hv = vms.hypervisor();
    let domain = marker.domain.as_str();
    let mut moved: Vec<&PlannedDisk> = Vec::new();
    for d in &marker.disks {
        let to = Destination::Nbd {
            volume: d.volume.clone(),
            socket: shared.layout.socket(&d.volume).display().to_string(),
            reconnect_delay_secs: RECONNECT_DELAY_SECS,
        };
        let outcome = hv.move_disk(domain, &d.target, &to, &mut |p| {
            vms.update_onboarding_disk(group, &d.target, |x| {
                x.copied_bytes = p.copied;
                x.total_bytes = p.total.max(d.size);
            });
        });
        match outcome {
            Ok(out) => {
                info!(%group, vm = domain, disk = %d.target, pivot_ms = out.pivot.as_secs_f64() * 1e3,
                      elapsed_s = out.elapsed.as_secs_f64(), "disk moved onto its volume");
                vms.update_onboarding_disk(group, &d.target, |x| {
                    x.copied_bytes = x.total_bytes;
                    x.done = true;
                    x.pivot_ms = Some(out.pivot.as_secs_f64() * 1e3);
                });
                moved.push(d);
            }
            Err(e) if matches!(e.move_error(), Some(MoveError::AlreadyThere(_))) => {
                // An earlier attempt moved it.
                vms.update_onboarding_disk(group, &d.target, |x| {
                    x.copied_bytes = x.total_bytes;
                    x.done = true;
                });
            }
            Err(e) => {
                if let Some(MoveError::NotRunning(state)) = e.move_error() {
                    return Err(OnboardError::NotRunning(*state));
                }
                let (moved_back, left) = move_back(hv.as_ref(), domain, &moved);
                return Err(OnboardError::Copy {
                    error: e.to_string(),
                    moved_back,
                    left,
                });
            }
        }
    }
    Ok(())
}

/// Moves disks back onto their original raw files; returns the targets
/// moved back and those left on their volumes.
fn move_back(
    hv: &dyn Hypervisor,
    domain: &str,
    moved: &[&PlannedDisk],
) -> (Vec<String>, Vec<String>) {
    let mut back = Vec::new();
    let mut left = Vec::new();
    for d in moved {
        let is_file = std::fs::metadata(&d.source).is_ok_and(|m| m.is_file());
        if d.format != "raw" || !is_file {
            left.push(d.target.clone());
            continue;
        }
        let to = Destination::File {
            path: d.source.clone(),
        };
        match hv.move_disk(domain, &d.target, &to, &mut |_| {}) {
            Ok(_) => back.push(d.target.clone()),
            Err(e) => {
                warn!(vm = domain, disk = %d.target, "moving the disk back failed: {e}");
                left.push(d.target.clone());
            }
        }
    }
    (back, left)
}
