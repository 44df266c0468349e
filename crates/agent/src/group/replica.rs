//! The replica role of a group: its journal and images
//! (`tandem_replication::replica`), offered to primaries' sessions through
//! the peer listener.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tandem_coordinator::machine::Tip;
use tandem_replication::history::History;
use tandem_replication::receiver::{GroupPlan, Membership};
use tandem_replication::replica::{Position, ReplicaGroup, ReplicaOptions, ReplicaVolume};
use tracing::{info, warn};

use super::{Images, Shared};
use crate::AgentError;

/// How long a promotion waits for a replication session to let go.
const SESSION_RELEASE: Duration = Duration::from_secs(15);
/// How long an agent stop waits for it.
const STOP_RELEASE: Duration = Duration::from_secs(2);
/// How long recording a newer epoch waits for a running session.
const EPOCH_WAIT: Duration = Duration::from_millis(200);

/// What a demoted primary's images hold: (tip, epoch followed, the
/// regions its dirty map marked as (volume, offset, length), if known).
pub(crate) type Adopt = (Tip, u64, Option<Vec<(u32, u64, u64)>>);

pub(crate) struct ReplicaRole {
    pub group: Arc<Mutex<ReplicaGroup>>,
    pub position: Arc<Mutex<Position>>,
    pub connected: Arc<AtomicBool>,
    pub plan: Arc<GroupPlan>,
    /// The group's recovery-point history here (docs/HISTORY.md), if it
    /// keeps one.
    pub history: Option<Arc<History>>,
}

impl ReplicaRole {
    /// Starts receiving `group`. `adopt` (demotion) sets the replica state
    /// from what the images hold: (tip, epoch followed, the regions the
    /// primary role's dirty map marked).
    pub fn start(
        shared: &Shared,
        group: &tandem_config::Group,
        images: Images,
        adopt: Option<Adopt>,
    ) -> Result<ReplicaRole, AgentError> {
        let volumes = group
            .volumes
            .iter()
            .zip(images)
            .map(|(v, image)| ReplicaVolume {
                name: v.name.clone(),
                image,
            })
            .collect();
        let dir = shared.layout.replica_dir(&group.name);
        let replica_err = |source| AgentError::Replica {
            group: group.name.clone(),
            source,
        };
        let replica = match adopt {
            Some((tip, epoch, diverged)) => {
                ReplicaGroup::adopt(&dir, &group.name, volumes, tip, epoch, diverged)
            }
            None => {
                // The retention now: the file's, or a reload's.
                let config = shared.config();
                let current = config.group(&group.name).unwrap_or(group);
                let options = ReplicaOptions {
                    history: crate::history::retention(current),
                };
                ReplicaGroup::open_with(&dir, &group.name, volumes, options)
            }
        }
        .map_err(replica_err)?;
        let history = replica.history();
        let position = replica.published();
        let replica = Arc::new(Mutex::new(replica));
        let connected = Arc::new(AtomicBool::new(false));
        let mut sites = vec![group.primary.clone()];
        sites.extend(group.replicas.iter().map(|r| r.site.clone()));
        let plan = Arc::new(GroupPlan {
            membership: Membership {
                group: group.name.clone(),
                primary: group.primary.clone(),
                sites,
                volumes: group
                    .volumes
                    .iter()
                    .map(|v| (v.name.clone(), v.size))
                    .collect(),
            },
            group: Arc::clone(&replica),
            position: Arc::clone(&position),
            connected: Arc::clone(&connected),
            files_dir: shared.layout.data_dir.join("files").join(&group.name),
            files: group.files.clone(),
            vm_definition: group
                .vm
                .as_ref()
                .map(|_| shared.layout.vm_definition(&group.name)),
            session: Mutex::new(None),
        });
        {
            let mut plans = shared.receivers.groups.write();
            plans.retain(|p| p.name() != group.name);
            plans.push(Arc::clone(&plan));
        }
        info!(group = %group.name, "replica of this group: waiting for its primary");
        Ok(ReplicaRole {
            group: replica,
            position,
            connected,
            plan,
            history,
        })
    }

    /// The newest epoch its state holds.
    pub fn held_epoch(&self) -> u64 {
        self.position.lock().epoch
    }

    /// Leaves the role: no more sessions, everything received applied and
    /// synced. Returns the images, their tip and whether they are a
    /// prefix (G3).
    pub fn stop(self, shared: &Shared, name: &str) -> Result<(Images, Tip, bool), AgentError> {
        shared
            .receivers
            .groups
            .write()
            .retain(|p| !Arc::ptr_eq(p, &self.plan));
        self.plan.end_session();
        let Some(mut group) = self.group.try_lock_for(SESSION_RELEASE) else {
            return Err(AgentError::SessionStuck {
                group: name.to_owned(),
                waited: SESSION_RELEASE,
            });
        };
        let replica_err = |source| AgentError::Replica {
            group: name.to_owned(),
            source,
        };
        group.commit().map_err(replica_err)?;
        group.checkpoint().map_err(replica_err)?;
        let consistent = group.position().consistent;
        let images = group
            .volumes()
            .iter()
            .map(|v| Arc::clone(&v.image))
            .collect();
        Ok((images, group.tip(), consistent))
    }

    /// Refuses primaries older than `epoch` from now on; ends the running
    /// session (of an older epoch) if `end_session`.
    pub fn adopt_epoch(&self, name: &str, epoch: u64, end_session: bool) {
        if self.position.lock().epoch >= epoch {
            return;
        }
        if end_session {
            self.plan.end_session();
        }
        if let Some(mut g) = self.group.try_lock_for(EPOCH_WAIT) {
            if let Err(e) = g.set_epoch(epoch) {
                warn!(group = name, "cannot record epoch {epoch}: {e}");
            }
        }
    }

    /// Agent stop: the session ends, everything received is applied and
    /// synced.
    pub fn close(self, shared: &Shared, name: &str) {
        shared
            .receivers
            .groups
            .write()
            .retain(|p| !Arc::ptr_eq(p, &self.plan));
        self.plan.end_session();
        if let Some(mut group) = self.group.try_lock_for(STOP_RELEASE) {
            if let Err(e) = group.commit().and_then(|_| group.checkpoint()) {
                warn!(group = name, "final replica checkpoint failed: {e}");
            }
        }
    }
}
