//! A protected VM on this site (docs/VMS.md, "The VM follows ownership"):
//! started from the group's definition when this site becomes owner,
//! stopped (and its definition removed from this host) when it stops
//! being owner, destroyed at once by the fencer, and, on the owner, its
//! libvirt definition kept in the group so it travels to the other sites.
//!
//! The group's copy of the definition is `<data_dir>/vms/<group>.xml` on
//! every site. The owner writes it from libvirt's persistent definition
//! whenever that changes; the primary's file watcher ships it with the
//! group's stream (`files::VM_DEFINITION`); replicas store it atomically.
//! A site defines the domain from it, rewritten for itself (disks on its
//! own sockets, networks renamed by `[libvirt] network_map`), only when it
//! is about to start the VM.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tandem_hypervisor::{xml, DomainState, Hypervisor, HypervisorError, XmlError};
use tracing::{info, warn};

use crate::Layout;

/// Why a VM step failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("libvirt: {0}")]
    Hypervisor(#[from] HypervisorError),
    #[error(
        "no definition of VM {vm:?} at this site: libvirt does not have it and the group has \
         not received one ({})",
        path.display()
    )]
    NoDefinition { vm: String, path: PathBuf },
    #[error("the group's definition {} is of domain {found:?}, not {vm:?}", path.display())]
    WrongDomain {
        vm: String,
        found: String,
        path: PathBuf,
    },
    #[error("the group's VM definition: {0}")]
    Xml(#[from] XmlError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot keep the VM definition: {0}")]
    Store(#[from] tandem_replication::files::FileError),
}

/// How a start went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Started {
    /// It was running already (an agent restart under a running guest).
    AlreadyRunning,
    /// Defined from the group's definition and started.
    FromDefinition,
    /// Started from libvirt's own definition (the group has none yet).
    AsDefined,
    /// `tandem protect` or `tandem unprotect` is moving its disks: it is
    /// left as it is (docs/VMS.md, "Onboarding", "Unprotect").
    DisksMoving,
}

/// What status shows of a VM on this site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub name: String,
    pub state: DomainState,
    /// Why the state could not be read (libvirt down); `state` is then the
    /// last one known.
    pub error: Option<String>,
}

/// This site's hypervisor, as the groups' VMs use it.
pub struct Vms {
    hypervisor: Arc<dyn Hypervisor>,
    layout: Layout,
    network_map: Vec<(String, String)>,
    seen: Mutex<BTreeMap<String, Seen>>,
    /// `tandem protect` of a group's VM, by group, while this agent runs.
    onboarding: Mutex<BTreeMap<String, crate::status::Onboarding>>,
}

impl Vms {
    pub fn new(
        hypervisor: Arc<dyn Hypervisor>,
        layout: Layout,
        network_map: Vec<(String, String)>,
    ) -> Vms {
        Vms {
            hypervisor,
            layout,
            network_map,
            seen: Mutex::new(BTreeMap::new()),
            onboarding: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn hypervisor(&self) -> &Arc<dyn Hypervisor> {
        &self.hypervisor
    }

    /// Where the group keeps its VM's definition.
    pub fn definition_path(&self, group: &str) -> PathBuf {
        self.layout.vm_definition(group)
    }

    /// The marker of an unfinished `tandem protect` of the group's VM
    /// (docs/VMS.md, "Onboarding").
    pub fn onboarding_marker(&self, group: &str) -> PathBuf {
        self.layout
            .data_dir
            .join("vms")
            .join(format!("{group}.onboarding"))
    }

    /// The marker of an unfinished `tandem unprotect` of the group's VM.
    pub fn unprotect_marker(&self, group: &str) -> PathBuf {
        self.layout
            .data_dir
            .join("vms")
            .join(format!("{group}.unprotecting"))
    }

    /// `tandem protect` of the group's VM has not finished.
    pub fn is_onboarding(&self, group: &str) -> bool {
        self.onboarding_marker(group).exists()
    }

    /// `tandem protect` or `tandem unprotect` moves the VM's disks: the VM
    /// is neither started by ownership nor kept with the group.
    pub fn is_moving(&self, group: &str) -> bool {
        self.is_onboarding(group) || self.unprotect_marker(group).exists()
    }

    /// How `tandem protect` of the group's VM is getting on.
    pub fn onboarding(&self, group: &str) -> Option<crate::status::Onboarding> {
        use crate::status::{Onboarding, OnboardingStage};
        let known = self.onboarding.lock().get(group).cloned();
        match known {
            Some(o) => Some(o),
            None if self.is_onboarding(group) => Some(Onboarding {
                stage: OnboardingStage::Interrupted,
                live: false,
                disks: Vec::new(),
                error: Some(
                    "the agent stopped before onboarding finished: run tandem protect again to \
                     resume"
                        .into(),
                ),
            }),
            None => None,
        }
    }

    /// Forgets a removed group.
    pub fn forget(&self, group: &str) {
        self.onboarding.lock().remove(group);
        self.seen.lock().remove(group);
    }

    /// Records that `tandem protect` of the group's VM starts: false (and
    /// nothing recorded) when one is at work on it already.
    pub fn begin_onboarding(&self, group: &str, onboarding: crate::status::Onboarding) -> bool {
        use crate::status::OnboardingStage::{Copying, Defining, Preparing};
        let mut all = self.onboarding.lock();
        if all
            .get(group)
            .is_some_and(|o| matches!(o.stage, Preparing | Copying | Defining))
        {
            return false;
        }
        all.insert(group.to_owned(), onboarding);
        true
    }

    /// Changes the recorded onboarding of the group's VM, if any.
    pub fn update_onboarding(&self, group: &str, f: impl FnOnce(&mut crate::status::Onboarding)) {
        if let Some(o) = self.onboarding.lock().get_mut(group) {
            f(o);
        }
    }

    /// Changes the recorded progress of one disk of an onboarding VM.
    pub fn update_onboarding_disk(
        &self,
        group: &str,
        target: &str,
        f: impl FnOnce(&mut crate::status::OnboardingDisk),
    ) {
        self.update_onboarding(group, |o| {
            if let Some(d) = o.disks.iter_mut().find(|d| d.target == target) {
                f(d);
            }
        });
    }

    /// Makes the group's VM run here: adopted if it runs, else defined
    /// from the group's definition (for this site) and started.
    pub fn start(&self, group: &tandem_config::Group) -> Result<Started, VmError> {
        let Some(name) = group.vm.as_deref() else {
            return Ok(Started::AlreadyRunning);
        };
        if self.is_moving(&group.name) {
            return Ok(Started::DisksMoving);
        }
        let hv = &self.hypervisor;
        let state = hv.state(name)?;
        if state.is_active() {
            self.note(&group.name, name, state);
            return Ok(Started::AlreadyRunning);
        }
        let path = self.definition_path(&group.name);
        let how = match read_optional(&path)? {
            Some(definition) => {
                let here = self.for_this_site(&definition)?;
                let found = xml::read(&here)?.name;
                if found != name {
                    return Err(VmError::WrongDomain {
                        vm: name.to_owned(),
                        found,
                        path,
                    });
                }
                hv.define(&here)?;
                Started::FromDefinition
            }
            None if state != DomainState::Absent => Started::AsDefined,
            None => {
                return Err(VmError::NoDefinition {
                    vm: name.to_owned(),
                    path,
                })
            }
        };
        hv.start(name)?;
        self.note(&group.name, name, DomainState::Running);
        Ok(how)
    }

    /// Defines and starts `name`, a copy of the group's VM on a test view
    /// (`tandem test start --boot`): the group's definition with its disks
    /// on the view's sockets (`socket_of(volume)`), no network, nothing
    /// that clashes with the VM ([`xml::test_copy`]). Undefined again when
    /// it cannot start.
    pub fn boot_test_copy(
        &self,
        group: &tandem_config::Group,
        name: &str,
        socket_of: impl Fn(&str) -> String,
    ) -> Result<(), VmError> {
        let vm = group.vm.as_deref().unwrap_or_default();
        let path = self.definition_path(&group.name);
        let definition = read_optional(&path)?.ok_or_else(|| VmError::NoDefinition {
            vm: vm.to_owned(),
            path: path.clone(),
        })?;
        let copy = xml::test_copy(&definition, name, socket_of)?;
        let hv = &self.hypervisor;
        hv.define(&copy)?;
        if let Err(e) = hv.start(name) {
            let _ = hv.undefine(name);
            return Err(e.into());
        }
        info!(group = %group.name, vm = name, "test copy of the VM started on the test view (network detached)");
        Ok(())
    }

    /// Makes sure the group's VM does not run here: shut down within the
    /// group's `vm_shutdown_timeout` (`graceful`) or destroyed at once. Its
    /// definition then leaves this host (nothing, autostart or an
    /// operator, can start it here by mistake) when the group keeps a copy
    /// to define it from again.
    pub fn stop(&self, group: &tandem_config::Group, graceful: bool) -> Result<(), VmError> {
        let Some(name) = group.vm.as_deref() else {
            return Ok(());
        };
        let hv = &self.hypervisor;
        if graceful && hv.state(name)?.is_active() {
            if let Err(e) = hv.shutdown(name, group.vm_shutdown_timeout) {
                warn!(group = %group.name, vm = name, "the guest did not shut down cleanly ({e}): destroying it");
                hv.destroy(name)?;
            }
        } else {
            hv.destroy(name)?;
        }
        let kept = self.definition_path(&group.name).exists();
        let state = hv.state(name)?;
        if kept && state != DomainState::Absent {
            if let Err(e) = hv.undefine(name) {
                warn!(group = %group.name, vm = name, "the VM is stopped but its definition stays on this host: {e}");
            }
        }
        self.note(
            &group.name,
            name,
            hv.state(name).unwrap_or(DomainState::ShutOff),
        );
        Ok(())
    }

    /// Kills the VM's process now (the fencer): nothing else.
    pub fn destroy(&self, group: &tandem_config::Group) -> Result<(), VmError> {
        if let Some(name) = group.vm.as_deref() {
            self.hypervisor.destroy(name)?;
            self.note(&group.name, name, DomainState::ShutOff);
        }
        Ok(())
    }

    /// On the owner: keeps the group's copy of the definition in step with
    /// libvirt's persistent one. True when it changed.
    pub fn keep_definition(&self, group: &tandem_config::Group) -> Result<bool, VmError> {
        let Some(name) = group.vm.as_deref() else {
            return Ok(false);
        };
        if self.is_moving(&group.name) {
            return Ok(false);
        }
        let definition = self.hypervisor.xml(name, true)?;
        xml::read(&definition)?;
        let path = self.definition_path(&group.name);
        if read_optional(&path)?.as_deref() == Some(definition.as_str()) {
            return Ok(false);
        }
        tandem_replication::files::store_at(&path, 0o600, definition.as_bytes())?;
        info!(group = %group.name, vm = name, file = %path.display(), "VM definition kept with the group");
        Ok(true)
    }

    /// Reads the VM's state for status (and remembers it).
    pub fn refresh(&self, group: &tandem_config::Group) {
        let Some(name) = group.vm.as_deref() else {
            return;
        };
        match self.hypervisor.state(name) {
            Ok(state) => self.note(&group.name, name, state),
            Err(e) => {
                let mut seen = self.seen.lock();
                let entry = seen.entry(group.name.clone()).or_insert_with(|| Seen {
                    name: name.to_owned(),
                    state: DomainState::Absent,
                    error: None,
                });
                entry.error = Some(e.to_string());
            }
        }
    }

    /// The VM's state as last read.
    pub fn seen(&self, group: &str) -> Option<Seen> {
        self.seen.lock().get(group).cloned()
    }

    fn note(&self, group: &str, name: &str, state: DomainState) {
        self.seen.lock().insert(
            group.to_owned(),
            Seen {
                name: name.to_owned(),
                state,
                error: None,
            },
        );
    }

    /// The definition rewritten for this site (docs/VMS.md): each disk in
    /// Tandem's form on this site's socket of its volume, networks renamed
    /// by `network_map`. Other disks are kept as they are.
    fn for_this_site(&self, definition: &str) -> Result<String, VmError> {
        Ok(xml::for_site(
            definition,
            |volume| self.layout.socket(volume).display().to_string(),
            &self.network_map,
        )?)
    }
}

fn read_optional(path: &Path) -> Result<Option<String>, VmError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(VmError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// How often the keeper reads the VMs' states and the owner's definitions.
pub const KEEP_EVERY: Duration = Duration::from_secs(2);

/// The `vm-keeper` thread: every [`KEEP_EVERY`], reads each protected
/// VM's state (status) and, where this site serves the group and its actor
/// runs the VM, keeps the group's copy of the definition in step.
pub(crate) fn keep(
    shared: Arc<crate::group::Shared>,
    groups: Arc<crate::group::Groups>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("vm-keeper".into())
        .spawn(move || {
            use std::sync::atomic::Ordering;
            while !shared.stop.load(Ordering::Acquire) {
                for rt in groups.all() {
                    if rt.cfg.vm.is_none() {
                        continue;
                    }
                    shared.vms.refresh(&rt.cfg);
                    let serving = rt.gate().is_some();
                    if serving && rt.vm_started.load(Ordering::Acquire) {
                        if let Err(e) = shared.vms.keep_definition(&rt.cfg) {
                            warn!(group = %rt.name(), "cannot keep the VM definition with the group: {e}");
                        }
                    }
                }
                shared.stopping.wait(KEEP_EVERY);
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_hypervisor::fake::{Fake, Op};

    const CONFIG: &str = "[site]\nname = \"chicago\"\ndata_dir = \"/tmp/x\"\nlisten = \"127.0.0.1:1\"\napi = \"127.0.0.1:2\"\n\
        [tls]\nmode = \"off\"\n[[peer]]\nname = \"ny\"\naddress = \"127.0.0.1:3\"\n[[peer]]\nname = \"chicago\"\naddress = \"127.0.0.1:1\"\n\
        [[group]]\nname = \"web\"\nprimary = \"ny\"\nreplicas = [ { site = \"chicago\", priority = 1 } ]\n\
        volumes = [ { name = \"web-vda\", size = \"1M\" } ]\nvm = \"libvirt:web01\"\n";

    /// The definition as the primary (ny, data_dir /ny) kept it.
    /// web01 as protected at ny: its disk in Tandem's form on ny's socket.
    fn at_ny() -> String {
        let plain = "<domain type='qemu'><name>web01</name><devices>\
            <disk type='file' device='disk'><driver name='qemu' type='raw'/>\
            <source file='/images/web01.raw'/><target dev='vda' bus='virtio'/></disk>\
            <interface type='network'><source network='ny-lan'/></interface>\
            </devices></domain>";
        let disk = tandem_hypervisor::ProtectedDisk {
            target: "vda".into(),
            volume: "web-vda".into(),
            socket: "/ny/nbd/web-vda.sock".into(),
        };
        xml::protect(plain, &[disk], 30).unwrap()
    }

    struct Setup {
        _dir: tempfile::TempDir,
        fake: Arc<Fake>,
        vms: Vms,
        group: tandem_config::Group,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake::new());
        let vms = Vms::new(
            Arc::clone(&fake) as Arc<dyn Hypervisor>,
            Layout::new(dir.path()),
            vec![("ny-lan".into(), "chicago-lan".into())],
        );
        let group = tandem_config::parse(CONFIG, Path::new("t.toml"))
            .unwrap()
            .groups
            .remove(0);
        Setup {
            _dir: dir,
            fake,
            vms,
            group,
        }
    }

    #[test]
    fn the_group_definition_is_defined_for_this_site_and_started() {
        let s = setup();
        let path = s.vms.definition_path("web");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, at_ny()).unwrap();
        assert_eq!(s.vms.start(&s.group).unwrap(), Started::FromDefinition);
        assert_eq!(s.fake.state("web01").unwrap(), DomainState::Running);
        let here = s.fake.xml("web01", true).unwrap();
        let socket = s.vms.layout.socket("web-vda").display().to_string();
        assert!(here.contains(&socket), "{here}");
        assert!(!here.contains("/ny/nbd"), "{here}");
        assert!(
            here.contains("chicago-lan") && !here.contains("ny-lan"),
            "{here}"
        );
        assert_eq!(
            s.vms.seen("web").map(|v| v.state),
            Some(DomainState::Running)
        );
    }

    #[test]
    fn a_running_vm_is_adopted_and_nothing_is_redefined() {
        let s = setup();
        s.fake.define(&at_ny()).unwrap();
        s.fake.start("web01").unwrap();
        let before = s.fake.calls().len();
        assert_eq!(s.vms.start(&s.group).unwrap(), Started::AlreadyRunning);
        assert_eq!(s.fake.calls().len(), before, "{:?}", s.fake.calls());
    }

    #[test]
    fn without_any_definition_the_start_fails_clearly() {
        let s = setup();
        let e = s.vms.start(&s.group).unwrap_err();
        assert!(matches!(e, VmError::NoDefinition { .. }), "{e}");
        assert!(e.to_string().contains("web01"), "{e}");
        // Defined by hand in libvirt (a group configured by hand): used.
        s.fake.define(&at_ny()).unwrap();
        assert_eq!(s.vms.start(&s.group).unwrap(), Started::AsDefined);
    }

    #[test]
    fn a_failing_hypervisor_fails_the_start() {
        let s = setup();
        s.fake.define(&at_ny()).unwrap();
        s.fake.fail(Op::Start, true);
        assert!(matches!(s.vms.start(&s.group), Err(VmError::Hypervisor(_))));
    }

    #[test]
    fn stop_destroys_and_removes_the_definition_only_when_the_group_keeps_one() {
        let s = setup();
        s.fake.define(&at_ny()).unwrap();
        s.fake.start("web01").unwrap();
        s.vms.stop(&s.group, false).unwrap();
        assert_eq!(s.fake.state("web01").unwrap(), DomainState::ShutOff);
        // The group keeps one now: the next stop leaves nothing defined.
        assert!(s.vms.keep_definition(&s.group).unwrap());
        assert!(!s.vms.keep_definition(&s.group).unwrap(), "unchanged");
        s.fake.start("web01").unwrap();
        s.vms.stop(&s.group, true).unwrap();
        assert_eq!(s.fake.state("web01").unwrap(), DomainState::Absent);
        // And it can be started again from the group's copy.
        assert_eq!(s.vms.start(&s.group).unwrap(), Started::FromDefinition);
    }

    #[test]
    fn a_definition_of_another_domain_is_refused() {
        let s = setup();
        let path = s.vms.definition_path("web");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, at_ny().replace("web01", "db01")).unwrap();
        assert!(matches!(
            s.vms.start(&s.group),
            Err(VmError::WrongDomain { .. })
        ));
        assert_eq!(s.fake.state("db01").unwrap(), DomainState::Absent);
    }
}
