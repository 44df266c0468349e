//! `tandem recover GROUP --at TIME` on a replica site that keeps the
//! group's history (docs/HISTORY.md, "Recovery"): the newest point at or
//! before TIME is armed for this site's next promotion, which rolls the
//! images back to it (saving what they held since as rollback data),
//! and a forced failover to this site is asked for.

use std::time::{Duration, Instant};

use tandem_coordinator::keys::RequestKind;
use tandem_replication::history::{HistoryError, PointChoice};

use crate::group::Plane;
use crate::ownership::RequestError;
use crate::view::StatusView;

/// How long a recovery waits for this site to own the group.
const RECOVER_TIMEOUT: Duration = Duration::from_secs(120);

/// The outcome of `tandem recover`.
#[derive(Debug, serde::Serialize)]
pub struct Recovered {
    pub group: String,
    pub site: String,
    /// The point the group now starts from.
    pub point: PointJson,
    pub owner: String,
    pub epoch: u64,
    pub elapsed_ms: u64,
}

/// A recovery point as the API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PointJson {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub seq: u64,
    pub epoch: u64,
}

/// Why a recovery was not made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecoverError {
    #[error("no coordinator configured ([coordinator] kind = \"none\"): a recovery is a failover and needs one")]
    NoCoordinator,
    #[error("no group named {0:?} on this site")]
    UnknownGroup(String),
    #[error("{site} is not a replica of {group} now (a recovery runs on a replica that keeps the group's history: give --site)")]
    NotReplica { site: String, group: String },
    #[error("{site} keeps no history of {group} (retention = \"0s\")")]
    NoHistory { site: String, group: String },
    #[error(transparent)]
    Point(#[from] HistoryError),
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("{group}: this site was named owner but its promotion at the recovery point did not complete within {waited:?} (see its log)")]
    NotPromoted { group: String, waited: Duration },
}

impl StatusView {
    /// Fails `group` over to this site at the recovery point `at` names
    /// (the newest at or before a time, or the latest).
    pub(crate) fn recover(&self, group: &str, at: PointChoice) -> Result<Recovered, RecoverError> {
        let Some(o) = &self.ownership else {
            return Err(RecoverError::NoCoordinator);
        };
        let site = self.shared.site.clone();
        let rt = self
            .groups
            .find(group)
            .ok_or_else(|| RecoverError::UnknownGroup(group.to_owned()))?;
        let history = match &*rt.plane.lock() {
            Plane::Replica(r) => r.history.clone().ok_or_else(|| RecoverError::NoHistory {
                site: site.clone(),
                group: group.to_owned(),
            })?,
            _ => {
                return Err(RecoverError::NotReplica {
                    site: site.clone(),
                    group: group.to_owned(),
                })
            }
        };
        let point = history.choose(at)?;
        let started = Instant::now();
        *rt.recover_at.lock() = Some(point);
        tracing::warn!(group, seq = point.seq, epoch = point.epoch, time = %crate::history::utc_ms(point.time_ms), "recovery to a point in time: failing the group over to this site at that point");
        let done = o.request(
            group,
            RequestKind::Failover,
            Some(site.clone()),
            true,
            RECOVER_TIMEOUT,
        );
        let done = match done {
            Ok(done) => done,
            Err(e) => {
                // A request that failed must not leave the point armed
                // for a later, unrelated promotion.
                rt.recover_at.lock().take();
                return Err(e.into());
            }
        };
        // The coordinator names this site owner before its promotion
        // runs: wait until the promotion has taken the point and serves.
        let deadline = Instant::now() + RECOVER_TIMEOUT;
        loop {
            let taken = rt.recover_at.lock().is_none();
            let serving = matches!(&*rt.plane.lock(), Plane::Primary(_));
            if taken && serving {
                break;
            }
            if Instant::now() >= deadline {
                rt.recover_at.lock().take();
                return Err(RecoverError::NotPromoted {
                    group: group.to_owned(),
                    waited: RECOVER_TIMEOUT,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Recovered {
            group: group.to_owned(),
            site,
            point: PointJson {
                time: crate::history::utc_ms(point.time_ms),
                seq: point.seq,
                epoch: point.epoch,
            },
            owner: done.owner,
            epoch: done.epoch,
            elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }
}
