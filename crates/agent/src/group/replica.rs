//! The replica role of a group: its journal and images
//! (`tandem_replication::replica`), offered to primaries' sessions through
//! the peer listener.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tandem_coordinator::machine::Tip;
use tandem_replication::history::{History, Point};
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
    /// The group's undo history, when it keeps one (docs/HISTORY.md).
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
        let position = replica.published();
        let history = replica.history();
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
            marks: Default::default(),
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

    /// The point a promotion falls back to while the images are not a
    /// prefix (a resync is running): the newest recovery point (its
    /// images are made of it by a rollback, docs/HISTORY.md).
    pub fn fallback(&self) -> Option<Point> {
        let p = *self.position.lock();
        if p.consistent {
            return None;
        }
        self.history.as_ref()?.latest()
    }

    /// Leaves the role: no more sessions, everything received applied and
    /// synced. Returns the images, their tip and whether they are a
    /// prefix (G3). With `recover`, or when the images are not a prefix
    /// but the history holds a point, the images are first rolled back to
    /// that point, what they held since saved to rollback data
    /// (docs/ROLLBACK.md).
    pub fn stop(
        self,
        shared: &Shared,
        name: &str,
        recover: Option<Point>,
    ) -> Result<(Images, Tip, bool), AgentError> {
        let target = recover.or_else(|| self.fallback());
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
        if recover.is_some() && group.history().is_none() {
            return Err(replica_err(tandem_replication::ReplicaError::Corrupt {
                path: shared.layout.replica_dir(name),
                reason:
                    "a recovery to a point in time needs the group's history (retention is 0s here)"
                        .into(),
            }));
        }
        if let (Some(point), Some(history)) = (target, group.history()) {
            let why = if recover.is_some() {
                "recovery to a point in time"
            } else {
                "its images are in the middle of a resync"
            };
            let changed = history.changed_since(point).map_err(replica_err)?;
            let mut ranges = vec![Vec::new(); group.volumes().len()];
            for (v, offset, length) in changed {
                if let Some(r) = ranges.get_mut(v as usize) {
                    r.push((offset, length));
                }
            }
            let volumes: Vec<(&str, &tandem_volume::RawImage)> = group
                .volumes()
                .iter()
                .map(|v| (v.name.as_str(), &*v.image))
                .collect();
            let tip = group.tip();
            let saved = match super::rollback::save_ranges(
                &shared.layout.data_dir,
                name,
                &volumes,
                &ranges,
                tip,
            ) {
                Ok(saved) => saved,
                // A recovery gives up writes the user may want back: not
                // without them saved.
                Err(source) if recover.is_some() => {
                    return Err(AgentError::Io {
                        path: super::rollback::dir(&shared.layout.data_dir),
                        what: "save what a recovery to a point in time gives up",
                        source,
                    })
                }
                Err(e) => {
                    warn!(group = %name, "cannot save what the resync had written since the recovery point: {e}");
                    None
                }
            };
            drop(volumes);
            group.roll_back_to(point).map_err(replica_err)?;
            info!(group = %name, seq = point.seq, epoch = point.epoch, time_ms = point.time_ms, saved = ?saved, "promoted at a recovery point ({why}); what the images held since is kept in the rollback data");
        }
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
