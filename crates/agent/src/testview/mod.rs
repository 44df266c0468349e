//! Test views of a replica (`tandem test start|stop`; docs/HISTORY.md,
//! "Test views"): a recovery point's volumes served over NBD, writable,
//! their writes kept in scratch files of the test's own, while
//! replication goes on untouched.
//!
//! Where things are (docs/HISTORY.md):
//! * sockets: `<data_dir>/nbd/test/<group>/<volume>.sock` for the test
//!   that holds that directory (the first; SPEC §4.2), and
//!   `<data_dir>/nbd/test/<group>@<id>/<volume>.sock` for further tests
//!   of the group running at the same time;
//! * scratch: `<data_dir>/tests/<group>/<id>/<volume>.scratch`.
//!
//! Both go when the test stops, when the replica is promoted or its group
//! removed, and (what a killed agent left) at agent start: tests do not
//! survive a restart.

pub mod at;
pub mod export;
mod ops;
pub use ops::{StartRequest, TestRequestError};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use tandem_nbd::{Export, Scope};
use tandem_replication::history::{History, HistoryError, Point, PointChoice};
use tracing::{info, warn};

use crate::status::{TestExportStatus, TestPoint, TestState, TestStatus, TestVm};
use crate::Layout;
use export::{Budget, PointSource, TestExport};
use tandem_hypervisor::Hypervisor;

/// How long a stopping test lets its clients finish their requests.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// The scratch cap of a group's tests when the configuration names none.
pub const DEFAULT_SCRATCH_MAX: u64 = tandem_config::Group::DEFAULT_TEST_SCRATCH_MAX;

/// The scratch cap of `group`'s tests (`test_scratch_max`, default
/// [`DEFAULT_SCRATCH_MAX`]).
pub fn scratch_max(group: &tandem_config::Group) -> u64 {
    group.test_scratch_max
}

/// Why a test cannot start or stop.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    #[error("group {0} is not a replica on this site: a test view opens on a replica of the group (try --site)")]
    NotReplica(String),
    #[error("group {0} keeps no history on this site (retention = \"0s\"): there is no recovery point to test")]
    NoHistory(String),
    #[error("group {group}: {source}")]
    History { group: String, source: HistoryError },
    #[error("group {0} has no VM (vm = \"libvirt:NAME\"): --boot starts a copy of the group's VM; start the test without it")]
    NoVm(String),
    #[error("group {group}: cannot boot the test copy {name} of the VM: {source}")]
    Boot {
        group: String,
        name: String,
        source: Box<crate::vm::VmError>,
    },
    #[error("group {group} has no test {id} running")]
    NoTest { group: String, id: u64 },
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
}

fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> TestError {
    let path = path.to_owned();
    move |source| TestError::Io { path, what, source }
}

/// One running test.
struct Running {
    id: u64,
    point: Point,
    started: SystemTime,
    budget: Arc<Budget>,
    /// Its listeners and clients.
    scope: Arc<Scope>,
    /// Its sockets' directory (`nbd/test/<group>[@<id>]`), and whether it
    /// is the group's pinned one.
    socket_dir: PathBuf,
    pinned: bool,
    sockets: Vec<(String, PathBuf)>,
    scratch_dir: PathBuf,
    /// The copy of the group's VM booted on the view (`--boot`), and the
    /// hypervisor it runs on.
    copy: Option<(String, Arc<dyn Hypervisor>)>,
}

impl Running {
    fn status(&self) -> TestStatus {
        let failed = self.budget.failed();
        TestStatus {
            id: self.id,
            point: point_status(&self.point),
            started: crate::gate::rfc3339(self.started),
            scratch_bytes: self.budget.used(),
            scratch_max: self.budget.cap(),
            state: if failed.is_some() {
                TestState::Failed
            } else {
                TestState::Running
            },
            error: failed,
            exports: self
                .sockets
                .iter()
                .map(|(volume, socket)| TestExportStatus {
                    volume: volume.clone(),
                    socket: socket.display().to_string(),
                })
                .collect(),
            vm: self.copy.as_ref().map(|(name, hv)| TestVm {
                name: name.clone(),
                state: hv
                    .state(name)
                    .map_or_else(|e| format!("unknown ({e})"), |s| s.to_string()),
            }),
        }
    }

    /// Closes the exports and removes the sockets and the scratch; the
    /// view (and its hold on the history) goes with the last export.
    fn stop(self, group: &str, why: &str) {
        if let Some((name, hv)) = &self.copy {
            remove_copy(hv.as_ref(), group, name);
        }
        let left = self.scope.shutdown(STOP_GRACE);
        if left > 0 {
            warn!(
                group,
                test = self.id,
                connections = left,
                "test view clients still connected after the grace period: disconnected"
            );
        }
        drop(self.scope);
        for (path, what) in [
            (&self.socket_dir, "test sockets"),
            (&self.scratch_dir, "test scratch"),
        ] {
            match std::fs::remove_dir_all(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warn!(
                    group,
                    test = self.id,
                    "cannot remove the {what} {}: {e}",
                    path.display()
                ),
            }
        }
        if let Some(parent) = self.scratch_dir.parent() {
            // The group's directory, once its last test is gone.
            let _ = std::fs::remove_dir(parent);
        }
        info!(
            group,
            test = self.id,
            scratch_bytes = self.budget.used(),
            "test view stopped ({why}): sockets and scratch removed"
        );
    }
}

/// The point as status and the API give it.
pub fn point_status(point: &Point) -> TestPoint {
    TestPoint {
        time: rfc3339_ms(point.time_ms),
        time_ms: point.time_ms,
        epoch: point.epoch,
        seq: point.seq,
    }
}

/// `ms` since the Unix epoch as RFC 3339, UTC, with milliseconds.
pub fn rfc3339_ms(ms: u64) -> String {
    crate::history::utc_ms(ms)
}

/// The test views of one group on this site.
#[derive(Default)]
pub struct Tests {
    running: Mutex<Vec<Running>>,
    next_id: AtomicU64,
}

impl Tests {
    /// The running tests, for status and the API.
    pub fn status(&self) -> Vec<TestStatus> {
        self.running.lock().iter().map(Running::status).collect()
    }

    /// Opens a view of the point `choice` names in `history` and serves
    /// its volumes.
    pub fn start(
        &self,
        layout: &Layout,
        nbd: &Arc<tandem_nbd::Server>,
        group: &tandem_config::Group,
        history: &Arc<History>,
        choice: PointChoice,
    ) -> Result<TestStatus, TestError> {
        let history_err = |source| TestError::History {
            group: group.name.clone(),
            source,
        };
        let point = history.choose(choice).map_err(history_err)?;
        let view: Arc<dyn PointSource> = Arc::new(history.open_view(point).map_err(history_err)?);
        let mut running = self.running.lock();
        let id = self.next_id.fetch_add(1, Ordering::AcqRel) + 1;
        let pinned = !running.iter().any(|r| r.pinned);
        let socket_dir = layout.test_socket_dir(&group.name, (!pinned).then_some(id));
        let scratch_dir = layout.test_dir(&group.name, id);
        let mut test = Running {
            id,
            point,
            started: SystemTime::now(),
            budget: Arc::new(Budget::new(scratch_max(group))),
            scope: nbd.scope(),
            socket_dir,
            pinned,
            sockets: Vec::new(),
            scratch_dir,
            copy: None,
        };
        match serve(&mut test, group, view) {
            Ok(()) => {
                let status = test.status();
                info!(
                    group = %group.name,
                    test = id,
                    point_time = %status.point.time,
                    point_seq = point.seq,
                    sockets = %status.exports.iter().map(|e| e.socket.as_str()).collect::<Vec<_>>().join(" "),
                    "test view started: the point's volumes are served writable; replication goes on"
                );
                running.push(test);
                Ok(status)
            }
            Err(e) => {
                test.stop(&group.name, "it could not start");
                Err(e)
            }
        }
    }

    /// Records the copy of the VM booted on test `id`'s view, stopped with
    /// it; when the test is gone already (stopped meanwhile), the copy goes
    /// at once.
    pub fn attach_copy(&self, group: &str, id: u64, name: String, hv: Arc<dyn Hypervisor>) {
        let mut running = self.running.lock();
        match running.iter_mut().find(|r| r.id == id) {
            Some(test) => test.copy = Some((name, hv)),
            None => {
                drop(running);
                remove_copy(hv.as_ref(), group, &name);
            }
        }
    }

    /// Stops test `id`, or every test of the group; returns the stopped
    /// ones' ids.
    pub fn stop(&self, group: &str, id: Option<u64>, why: &str) -> Result<Vec<u64>, TestError> {
        let taken: Vec<Running> = {
            let mut running = self.running.lock();
            match id {
                Some(id) => {
                    let i = running.iter().position(|r| r.id == id).ok_or_else(|| {
                        TestError::NoTest {
                            group: group.to_owned(),
                            id,
                        }
                    })?;
                    vec![running.remove(i)]
                }
                None => running.drain(..).collect(),
            }
        };
        let ids = taken.iter().map(|t| t.id).collect();
        for test in taken {
            test.stop(group, why);
        }
        Ok(ids)
    }

    /// Stops every test first (the replica is promoted, or the group
    /// stops), saying so.
    pub fn stop_all(&self, group: &str, why: &str) {
        let n = self.running.lock().len();
        if n > 0 {
            warn!(group, tests = n, "stopping the group's test views: {why}");
            let _ = self.stop(group, None, why);
        }
    }
}

/// Creates the scratch files and listens on the sockets of `test`.
fn serve(
    test: &mut Running,
    group: &tandem_config::Group,
    view: Arc<dyn PointSource>,
) -> Result<(), TestError> {
    std::fs::create_dir_all(&test.scratch_dir).map_err(io(&test.scratch_dir, "create"))?;
    // A directory a killed run left is gone at start; one left since
    // (a failed stop) is replaced.
    match std::fs::remove_dir_all(&test.socket_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&test.socket_dir, "remove")(e)),
    }
    std::fs::create_dir_all(&test.socket_dir).map_err(io(&test.socket_dir, "create"))?;
    for (index, volume) in group.volumes.iter().enumerate() {
        let path = test.scratch_dir.join(format!("{}.scratch", volume.name));
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io(&path, "create"))?;
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        let export: Arc<dyn Export> = Arc::new(
            TestExport::new(
                &volume.name,
                &group.name,
                format!(
                    "Tandem test view {} of group {}: volume {} at seq {} ({})",
                    test.id,
                    group.name,
                    volume.name,
                    test.point.seq,
                    rfc3339_ms(test.point.time_ms)
                ),
                index,
                Arc::clone(&view),
                file,
                Arc::clone(&test.budget),
            )
            .map_err(io(&path, "size"))?,
        );
        let socket = test.socket_dir.join(format!("{}.sock", volume.name));
        let listener =
            std::os::unix::net::UnixListener::bind(&socket).map_err(io(&socket, "listen on"))?;
        test.scope
            .serve_unix(listener, Arc::new(crate::catalog::SingleExport(export)))
            .map_err(io(&socket, "listen on"))?;
        test.sockets.push((volume.name.clone(), socket));
    }
    Ok(())
}

/// The name of the copy of VM `vm` booted on test `id`.
pub fn copy_name(vm: &str, id: u64) -> String {
    format!("{vm}-test-{id}")
}

/// Whether `domain` is named like a test copy of VM `vm`.
pub fn is_copy_of(vm: &str, domain: &str) -> bool {
    domain
        .strip_prefix(vm)
        .and_then(|rest| rest.strip_prefix("-test-"))
        .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
}

/// Destroys and undefines a test copy of a VM.
fn remove_copy(hv: &dyn Hypervisor, group: &str, name: &str) {
    for (what, result) in [
        ("destroy", hv.destroy(name)),
        ("undefine", hv.undefine(name)),
    ] {
        if let Err(e) = result {
            warn!(
                group,
                vm = name,
                "cannot {what} the test copy of the VM: {e}"
            );
        }
    }
    info!(
        group,
        vm = name,
        "test copy of the VM destroyed and undefined"
    );
}

/// Removes the test copies of the groups' VMs a killed run left (agent
/// start): named `<vm>-test-<id>` on this site's hypervisor.
pub fn remove_leftover_copies(hv: &dyn Hypervisor, config: &tandem_config::Config) {
    let vms: Vec<(&str, &str)> = config
        .groups
        .iter()
        .filter_map(|g| g.vm.as_deref().map(|vm| (g.name.as_str(), vm)))
        .collect();
    if vms.is_empty() {
        return;
    }
    let domains = match hv.domains() {
        Ok(d) => d,
        Err(e) => {
            warn!("cannot look for test copies of VMs a previous run left: {e}");
            return;
        }
    };
    for d in domains {
        if let Some((group, _)) = vms.iter().find(|(_, vm)| is_copy_of(vm, &d.name)) {
            remove_copy(hv, group, &d.name);
        }
    }
}

/// Removes what tests of a killed run left (agent start): tests do not
/// survive a restart.
pub fn remove_leftovers(layout: &Layout) {
    for dir in [layout.tests_dir(), layout.test_sockets_dir()] {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => info!(
                dir = %dir.display(),
                "test views of a previous run removed (tests do not survive a restart)"
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(dir = %dir.display(), "cannot remove what test views of a previous run left: {e}")
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_told_by_their_names() {
        assert_eq!(copy_name("web01", 3), "web01-test-3");
        assert!(is_copy_of("web01", "web01-test-3"));
        assert!(is_copy_of("web01", &copy_name("web01", 12)));
        for other in [
            "web01",
            "web01-test-",
            "web01-test-x",
            "web01-test-3a",
            "web0-test-3",
            "web01-test",
        ] {
            assert!(!is_copy_of("web01", other), "{other}");
        }
    }

    #[test]
    fn point_times_keep_their_milliseconds() {
        assert_eq!(rfc3339_ms(1_796_465_700_123), "2026-12-05T10:15:00.123Z");
        assert_eq!(rfc3339_ms(5), "1970-01-01T00:00:00.005Z");
    }
}
