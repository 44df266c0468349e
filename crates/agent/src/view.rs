//! What the API (and `Agent::status`) reads and asks of the agent: the
//! site's status (SPEC §4.4), verification of replicas, and owner changes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_capture::GroupCapture;
use tandem_coordinator::keys::{RequestKind, Role};
use tandem_replication::shipper::{LinkState, VerifyError};

use crate::bandwidth;
use crate::group::{GroupRuntime, Groups, LinkHandle, Plane, Shared};
use crate::ownership::{Handle, RequestError};
use crate::status::{
    self, GroupStatus, ReplicaState, ReplicaStatus, ResyncProgress, SiteStatus, VmStatus,
};

/// How long `tandem failover` / `migrate` wait for the new owner.
const OWNER_CHANGE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `tandem verify` waits for a replica's comparison.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// What status and the API need, shared with the API thread.
pub struct StatusView {
    pub(crate) shared: Arc<Shared>,
    pub(crate) groups: Arc<Groups>,
    pub(crate) nbd: Arc<tandem_nbd::stats::Stats>,
    pub(crate) bandwidth: Arc<bandwidth::Bandwidth>,
    pub(crate) ownership: Option<Arc<Handle>>,
    /// This site's hypervisor (`[libvirt] uri`).
    pub(crate) hypervisor: Arc<dyn tandem_hypervisor::Hypervisor>,
    /// Held while a group is defined at runtime.
    pub(crate) defining: Arc<parking_lot::Mutex<()>>,
}

/// The outcome of `tandem failover` / `tandem migrate`.
#[derive(serde::Serialize)]
pub struct OwnerChanged {
    pub group: String,
    pub owner: String,
    pub epoch: u64,
    /// False when the group already was where a migration asked it to
    /// go (nothing was done).
    pub moved: bool,
    pub elapsed_ms: u64,
}

/// Why an owner change was not made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OwnerChangeError {
    #[error("no coordinator configured ([coordinator] kind = \"none\"): failover needs one")]
    NoCoordinator,
    #[error("migrate needs a target site (--to SITE)")]
    NoTarget,
    #[error(transparent)]
    Request(#[from] RequestError),
}

/// Why a verification was not made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum VerifyGroupError {
    #[error("this site is not the primary of a group named {0:?}")]
    NotPrimary(String),
}

/// Why `tandem points` has no list from this site.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PointsError {
    #[error("no group named {0:?} on this site")]
    UnknownGroup(String),
    #[error("group {0} keeps no recovery points (retention = \"0s\")")]
    NoHistory(String),
    #[error(
        "this site ({site}) keeps no recovery points of group {group}{why}; {}",
        keepers_hint(group, keepers)
    )]
    NotKeptHere {
        site: String,
        group: String,
        why: &'static str,
        keepers: Vec<String>,
    },
}

fn keepers_hint(group: &str, keepers: &[String]) -> String {
    match keepers.first() {
        None => "no other site keeps them either".to_owned(),
        Some(first) => format!(
            "the sites that keep them: {} (e.g. tandem points {group} --site {first})",
            keepers.join(", ")
        ),
    }
}

impl PointsError {
    pub(crate) fn status(&self) -> u16 {
        match self {
            PointsError::UnknownGroup(_) => 404,
            PointsError::NoHistory(_) | PointsError::NotKeptHere { .. } => 409,
        }
    }
}

impl StatusView {
    /// This site's recovery points of `group`, oldest first (`tandem
    /// points`, SPEC §4.3), or which sites keep them.
    pub(crate) fn points(&self, group: &str) -> Result<status::PointsAnswer, PointsError> {
        let rt = self
            .runtime(group)
            .ok_or_else(|| PointsError::UnknownGroup(group.to_owned()))?;
        let site = &self.shared.site;
        if let Some(history) = rt.history() {
            let summary = history.summary();
            return Ok(status::PointsAnswer {
                list: crate::history::list(group, site, &history.points()),
                history: crate::history::bytes(&summary),
            });
        }
        let config = self.shared.config();
        let cfg = config.group(group).unwrap_or(&rt.cfg);
        if !cfg.keeps_history() {
            return Err(PointsError::NoHistory(group.to_owned()));
        }
        // Every site of the group but its owner keeps them (as this site
        // knows the owner).
        let owner = rt
            .owner
            .lock()
            .clone()
            .unwrap_or_else(|| cfg.primary.clone());
        let (why, serving) = match &*rt.plane.lock() {
            Plane::Primary(_) => (" (it serves the group)", true),
            Plane::Replica(_) => ("", false),
            Plane::Down => (" (the group is down here)", false),
        };
        let keepers = rt
            .members()
            .into_iter()
            .filter(|s| s != site && (serving || *s != owner))
            .collect();
        Err(PointsError::NotKeptHere {
            site: site.clone(),
            group: group.to_owned(),
            why,
            keepers,
        })
    }

    /// Fails the group over (or migrates it) through the coordinator and
    /// waits for the new owner.
    pub(crate) fn change_owner(
        &self,
        group: &str,
        migrate: bool,
        to: Option<String>,
        force: bool,
    ) -> Result<OwnerChanged, OwnerChangeError> {
        let Some(o) = &self.ownership else {
            return Err(OwnerChangeError::NoCoordinator);
        };
        if migrate && to.is_none() {
            return Err(OwnerChangeError::NoTarget);
        }
        let started = Instant::now();
        let kind = if migrate {
            RequestKind::Migrate
        } else {
            RequestKind::Failover
        };
        let done = o.request(group, kind, to, force, OWNER_CHANGE_TIMEOUT)?;
        Ok(OwnerChanged {
            group: group.to_owned(),
            owner: done.owner,
            epoch: done.epoch,
            moved: done.moved,
            elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }

    fn runtime(&self, group: &str) -> Option<Arc<GroupRuntime>> {
        self.groups.find(group)
    }

    /// Compares every replica of `group` with this primary (`tandem
    /// verify`).
    pub(crate) fn verify(&self, group: &str) -> Result<status::VerifyResult, VerifyGroupError> {
        let not_primary = || VerifyGroupError::NotPrimary(group.to_owned());
        let (links, volumes, total) = {
            let rt = self.runtime(group).ok_or_else(not_primary)?;
            let plane = rt.plane.lock();
            match &*plane {
                Plane::Primary(p) => (
                    p.links.clone(),
                    p.capture
                        .volumes()
                        .iter()
                        .map(|v| v.name.clone())
                        .collect::<Vec<_>>(),
                    p.capture
                        .volumes()
                        .iter()
                        .map(|v| v.image.size())
                        .sum::<u64>(),
                ),
                _ => return Err(not_primary()),
            }
        };
        let mut replicas = Vec::new();
        for link in &links {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let tracker = &self.shared.tracker;
            tracker.verify_begins(group, &link.replica, link.link.info().resync_done, total);
            let outcome = if link.link.info().state == LinkState::Disconnected {
                Err(VerifyError::NotConnected)
            } else if link
                .verify
                .send(tandem_replication::shipper::VerifyJob { reply: tx })
                .is_err()
            {
                Err(VerifyError::LinkStopped)
            } else {
                // The shipper sleeps until records arrive: wake it.
                link.link.wake();
                rx.recv_timeout(VERIFY_TIMEOUT)
                    .map_err(|_| VerifyError::NoAnswer)
                    .and_then(|r| r)
            };
            tracker.verify_ends(group, &link.replica);
            replicas.push(match outcome {
                Ok(report) => status::VerifyReplica {
                    site: link.replica.clone(),
                    compared_bytes: report.compared_bytes,
                    passes: report.passes,
                    differing: report
                        .differing
                        .iter()
                        .map(|&(v, offset, length)| status::DifferingRange {
                            volume: volumes.get(v as usize).cloned().unwrap_or_default(),
                            offset,
                            length,
                        })
                        .collect(),
                    error: None,
                },
                Err(e) => status::VerifyReplica {
                    site: link.replica.clone(),
                    compared_bytes: 0,
                    passes: 0,
                    differing: Vec::new(),
                    error: Some(e.to_string()),
                },
            });
        }
        let identical = replicas
            .iter()
            .all(|r| r.error.is_none() && r.differing.is_empty());
        Ok(status::VerifyResult {
            group: group.to_owned(),
            identical,
            replicas,
        })
    }

    /// This host's domains and the groups protecting them (`tandem vms`).
    pub(crate) fn vms(&self) -> Result<crate::vms::VmList, tandem_hypervisor::HypervisorError> {
        Ok(crate::vms::VmList {
            site: self.shared.site.clone(),
            vms: crate::vms::list(
                &*self.hypervisor,
                &self
                    .groups
                    .all()
                    .iter()
                    .map(|g| g.cfg.clone())
                    .collect::<Vec<_>>(),
            )?,
        })
    }

    /// The Prometheus exposition (`GET /metrics`).
    pub(crate) fn metrics(&self) -> String {
        let volume_groups = self
            .groups
            .all()
            .iter()
            .flat_map(|g| {
                g.cfg
                    .volumes
                    .iter()
                    .map(|v| (v.name.clone(), g.cfg.name.clone()))
            })
            .collect();
        crate::metrics::render(&self.status(), &self.nbd, &volume_groups)
    }

    /// The site's status (SPEC §4.4).
    pub fn status(&self) -> SiteStatus {
        let site = &self.shared.site;
        let mut groups = Vec::new();
        for rt in self.groups.all() {
            let cfg = &rt.cfg;
            let known_owner = rt.owner.lock().clone();
            let seen_epoch = rt.epoch.load(Ordering::Acquire);
            let plane = rt.plane.lock();
            let base = GroupStatus {
                name: cfg.name.clone(),
                role: Role::Down,
                epoch: seen_epoch,
                primary: known_owner.unwrap_or_else(|| cfg.primary.clone()),
                mode: cfg.mode,
                replicas: Vec::new(),
                next_seq: None,
                queued_bytes: None,
                sync_degraded: None,
                owner: None,
                member: None,
                fenced: None,
                lease_age_seconds: None,
                failsafe: None,
                tests: rt.tests.status(),
                vm: cfg.vm.as_ref().map(|name| {
                    let seen = self.shared.vms.seen(&cfg.name);
                    let state = seen
                        .as_ref()
                        .map_or(tandem_hypervisor::DomainState::Absent, |s| s.state);
                    let mut sites: Vec<status::VmAtSite> = rt
                        .vm_sites
                        .lock()
                        .iter()
                        .filter(|(s, _)| s != site)
                        .map(|(site, state)| status::VmAtSite {
                            site: site.clone(),
                            state: state.clone(),
                        })
                        .collect();
                    if !sites.is_empty() {
                        sites.push(status::VmAtSite {
                            site: site.clone(),
                            state: state.as_str().to_owned(),
                        });
                        sites.sort_by(|a, b| a.site.cmp(&b.site));
                    }
                    VmStatus {
                        name: name.clone(),
                        state,
                        error: seen.and_then(|s| s.error),
                        sites,
                        onboarding: self.shared.vms.onboarding(&cfg.name),
                    }
                }),
            };
            groups.push(match &*plane {
                Plane::Primary(p) => {
                    let capture = &p.capture;
                    let stats = capture.stats();
                    let fenced = p.gate.fenced_state();
                    GroupStatus {
                        role: if fenced.is_none() {
                            Role::Primary
                        } else {
                            Role::Fenced
                        },
                        failsafe: p.gate.failsafe().filter(|_| p.gate.on_peer_leases()).map(
                            |(since, peers)| status::FailsafeStatus {
                                since: crate::gate::rfc3339(since),
                                peers,
                            },
                        ),
                        fenced: fenced.map(status::FencedStatus::from),
                        lease_age_seconds: p
                            .gate
                            .last_contact()
                            .filter(|_| self.shared.coordinated)
                            .map(|at| at.elapsed().unwrap_or_default().as_secs_f64()),
                        epoch: p.epoch,
                        primary: site.clone(),
                        replicas: p
                            .links
                            .iter()
                            .map(|l| {
                                link_status(
                                    capture,
                                    l,
                                    &self.bandwidth,
                                    &self.shared.tracker,
                                    &cfg.name,
                                )
                            })
                            .collect(),
                        next_seq: Some(stats.next_seq),
                        queued_bytes: Some(stats.queued_bytes as u64),
                        sync_degraded: (cfg.mode == tandem_config::Mode::Sync)
                            .then(|| capture.connected_replicas() < cfg.sync_replicas as usize),
                        ..base
                    }
                }
                Plane::Replica(r) => {
                    let p = *r.position.lock();
                    let connected = r.connected.load(Ordering::Acquire);
                    let state = if !p.consistent && r.fallback().is_some() {
                        // Promotable at its newest point (docs/HISTORY.md,
                        // "Always promotable").
                        ReplicaState::Resyncing
                    } else if !p.consistent {
                        ReplicaState::Inconsistent
                    } else if connected {
                        ReplicaState::Streaming
                    } else {
                        ReplicaState::Disconnected
                    };
                    let seen = self.shared.tracker.observe(
                        &cfg.name,
                        site,
                        state,
                        None,
                        Instant::now(),
                        crate::cluster::now_ms(),
                    );
                    let summary = r.history.as_ref().map(|h| h.summary());
                    GroupStatus {
                        role: Role::Replica,
                        epoch: p.epoch.max(seen_epoch),
                        replicas: vec![ReplicaStatus {
                            site: site.clone(),
                            state,
                            lag_bytes: 0,
                            lag_seconds: 0.0,
                            durable_seq: p.durable,
                            applied_seq: p.applied,
                            resyncing: p.resyncing,
                            resync: None,
                            verify: None,
                            rtt_ms: None,
                            wire_bytes: 0,
                            raw_bytes: 0,
                            compare_bytes_read: p.compared,
                            last_error: None,
                            since: Some(tandem_coordinator::instance::utc(seen.since_ms)),
                            // Only the primary knows what this site lacks.
                            rpo_seconds: None,
                            reported_by: None,
                            points: summary.as_ref().map(crate::history::window),
                            history: summary.as_ref().map(crate::history::bytes),
                        }],
                        ..base
                    }
                }
                Plane::Down => base,
            });
        }
        SiteStatus {
            site: site.clone(),
            groups,
            instance: self.ownership.as_ref().map(|o| o.instance.status()),
            sites: Vec::new(),
            coordinator: self.ownership.as_ref().map(|o| status::CoordinatorStatus {
                reachable: o.contact.reachable(o.ttl),
                last_renewal: o.contact.last_renewal().map(crate::gate::rfc3339),
                lease_age_seconds: o.contact.lease_age().map(|a| a.as_secs_f64()),
            }),
        }
    }
}

fn link_status(
    capture: &GroupCapture,
    link: &LinkHandle,
    bandwidth: &bandwidth::Bandwidth,
    tracker: &crate::cluster::Tracker,
    group: &str,
) -> ReplicaStatus {
    let info = link.link.info();
    let lag = capture.lag(&link.replica).ok();
    let connected = info.state != LinkState::Disconnected;
    let paused = bandwidth
        .limiter(&link.replica)
        .is_some_and(|l| l.rate_bps() == 0);
    let resyncing = info.state == LinkState::Resyncing || lag.is_some_and(|l| l.resyncing);
    let state = if !connected {
        ReplicaState::Disconnected
    } else if paused {
        ReplicaState::Paused
    } else if !info.replica_promotable {
        ReplicaState::Inconsistent
    } else if resyncing {
        ReplicaState::Resyncing
    } else {
        ReplicaState::Streaming
    };
    let lag_seconds = lag
        .and_then(|l| l.oldest)
        .map_or(0.0, |t| Instant::now().duration_since(t).as_secs_f64());
    let resync = (info.resync_total > 0)
        .then_some((info.resync_done.min(info.resync_total), info.resync_total));
    let seen = tracker.observe(
        group,
        &link.replica,
        state,
        resync.filter(|_| resyncing),
        Instant::now(),
        crate::cluster::now_ms(),
    );
    ReplicaStatus {
        site: link.replica.clone(),
        state,
        lag_bytes: lag.map_or(0, |l| l.bytes),
        lag_seconds,
        durable_seq: info.durable,
        applied_seq: info.applied,
        resyncing,
        resync: resync.map(|(done, total)| ResyncProgress {
            total_bytes: total,
            compared_bytes: done,
            sent_bytes: info.resync_sent,
            rate_bytes_per_second: seen.rate,
            eta_seconds: seen.eta,
        }),
        verify: tracker
            .verify_progress(group, &link.replica, info.resync_done, Instant::now())
            .map(|v| ResyncProgress {
                total_bytes: v.total,
                compared_bytes: v.compared,
                sent_bytes: 0,
                rate_bytes_per_second: v.rate,
                eta_seconds: v.eta,
            }),
        rtt_ms: info.rtt.map(|d| d.as_secs_f64() * 1000.0),
        wire_bytes: info.wire_bytes,
        raw_bytes: info.raw_bytes,
        compare_bytes_read: info.compare_bytes,
        last_error: info.last_error,
        since: Some(tandem_coordinator::instance::utc(seen.since_ms)),
        rpo_seconds: Some(lag_seconds),
        reported_by: None,
        // The replica's own report says its points.
        points: None,
        history: None,
    }
}
