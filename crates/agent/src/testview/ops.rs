//! The API's test operations (`POST|GET|DELETE
//! /api/v1/groups/{group}/tests[/{id}]`), on this site's groups.

use tandem_replication::history::HistoryError;

use super::{at, TestError};
use crate::group::Plane;
use crate::status::TestStatus;
use crate::StatusView;

/// Why a test request was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum TestRequestError {
    #[error("group {0} is not defined on this site")]
    UnknownGroup(String),
    #[error(transparent)]
    At(#[from] at::AtError),
    #[error(transparent)]
    Test(#[from] TestError),
}

impl TestRequestError {
    /// The HTTP status code.
    pub fn status(&self) -> u16 {
        match self {
            TestRequestError::UnknownGroup(_) => 404,
            TestRequestError::At(_) => 400,
            TestRequestError::Test(e) => match e {
                TestError::NotReplica(_) | TestError::NoHistory(_) | TestError::NoVm(_) => 409,
                TestError::Boot { .. } => 500,
                TestError::History {
                    source: HistoryError::NoPoint(_),
                    ..
                } => 404,
                TestError::NoTest { .. } => 404,
                TestError::History { .. } | TestError::Io { .. } => 500,
            },
        }
    }
}

/// Body of `POST /api/v1/groups/{group}/tests`.
#[derive(Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// `latest` (the default) or an RFC 3339 time.
    #[serde(default)]
    pub at: Option<String>,
    /// Boot a copy of the group's VM on the view, its network detached.
    #[serde(default)]
    pub boot: bool,
}

impl StatusView {
    fn group(
        &self,
        group: &str,
    ) -> Result<std::sync::Arc<crate::group::GroupRuntime>, TestRequestError> {
        self.groups
            .find(group)
            .ok_or_else(|| TestRequestError::UnknownGroup(group.to_owned()))
    }

    /// Starts a test view of `group` at the point `request` names.
    pub fn start_test(
        &self,
        group: &str,
        request: &StartRequest,
    ) -> Result<TestStatus, TestRequestError> {
        let choice = at::parse_absolute(request.at.as_deref().unwrap_or("latest"))?;
        let rt = self.group(group)?;
        if !matches!(&*rt.plane.lock(), Plane::Replica(_)) {
            return Err(TestError::NotReplica(group.to_owned()).into());
        }
        if request.boot && rt.cfg.vm.is_none() {
            return Err(TestError::NoVm(group.to_owned()).into());
        }
        let history = rt
            .history()
            .ok_or_else(|| TestError::NoHistory(group.to_owned()))?;
        // The group as configured now (a reload may have changed
        // `test_scratch_max`; its volumes never change).
        let config = self.shared.config();
        let current = config.group(group).unwrap_or(&rt.cfg);
        let mut status = rt.tests.start(
            &self.shared.layout,
            &self.shared.nbd,
            current,
            &history,
            choice,
        )?;
        if request.boot {
            let vm = current.vm.as_deref().unwrap_or_default();
            let name = super::copy_name(vm, status.id);
            let sockets: Vec<(String, String)> = status
                .exports
                .iter()
                .map(|e| (e.volume.clone(), e.socket.clone()))
                .collect();
            let socket_of = |volume: &str| {
                sockets
                    .iter()
                    .find(|(v, _)| v == volume)
                    .map(|(_, s)| s.clone())
                    // A disk of a volume the group no longer has: a socket
                    // that does not exist, so the copy never reads the VM's.
                    .unwrap_or_else(|| format!("/nonexistent/tandem-test/{volume}.sock"))
            };
            if let Err(source) = self.shared.vms.boot_test_copy(current, &name, socket_of) {
                let _ = rt
                    .tests
                    .stop(group, Some(status.id), "its VM copy could not boot");
                return Err(TestError::Boot {
                    group: group.to_owned(),
                    name,
                    source: Box::new(source),
                }
                .into());
            }
            let hv = std::sync::Arc::clone(self.shared.vms.hypervisor());
            status.vm = Some(crate::status::TestVm {
                name: name.clone(),
                state: hv
                    .state(&name)
                    .map_or_else(|e| format!("unknown ({e})"), |s| s.to_string()),
            });
            rt.tests.attach_copy(group, status.id, name, hv);
        }
        Ok(status)
    }

    /// The tests of `group` running on this site.
    pub fn tests(&self, group: &str) -> Result<Vec<TestStatus>, TestRequestError> {
        Ok(self.group(group)?.tests.status())
    }

    /// Stops test `id` of `group`, or all of them; the stopped ones' ids.
    pub fn stop_tests(&self, group: &str, id: Option<u64>) -> Result<Vec<u64>, TestRequestError> {
        Ok(self
            .group(group)?
            .tests
            .stop(group, id, "tandem test stop")?)
    }
}
