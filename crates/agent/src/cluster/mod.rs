//! The cluster view of `tandem status` (docs/ARCHITECTURE.md, "Cluster
//! status"): every site's local status, gathered over the peer port
//! ([`gather`]), merged into one ([`merge`], no I/O); and what a site
//! remembers of its replicas between status readings ([`Tracker`]: since
//! when each is in its state, how fast a resync goes).

pub mod gather;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::rate::RateWindow;
use crate::status::{GroupStatus, ReplicaState, Role, SiteReach, SiteStatus};

/// One other site's answer: its local status, or why there is none.
pub type Answer = Result<SiteStatus, String>;

/// Merges this site's local status with the other sites' answers (`others`:
/// site name and answer) into the cluster view.
///
/// Per group: the owner is the site with the highest epoch among the
/// reachable sites reporting the group as `primary` (or `fenced`: it
/// serves the group but may not acknowledge now); a `primary` wins over a
/// `fenced` one of the same epoch. The owner's report gives the epoch,
/// `primary`, mode, and the replicas' states as the owner sees them; a
/// replica the owner's report does not list (or every replica, when no
/// owner answered) comes from the replica's own report. `role`, `vm` and
/// `member` are this site's. `sites` lists every site asked, this one first.
pub fn merge(local: SiteStatus, others: Vec<(String, Answer)>) -> SiteStatus {
    let mut sites = vec![SiteReach {
        name: local.site.clone(),
        reachable: true,
        error: None,
    }];
    // Each report under the name of the site asked (a report naming
    // another site is taken as the asked one's).
    let mut reports: Vec<(&str, &SiteStatus)> = vec![(&local.site, &local)];
    let mut others_sorted: Vec<&(String, Answer)> = others.iter().collect();
    others_sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, answer) in others_sorted {
        match answer {
            Ok(status) => {
                sites.push(SiteReach {
                    name: name.clone(),
                    reachable: true,
                    error: None,
                });
                reports.push((name, status));
            }
            Err(e) => sites.push(SiteReach {
                name: name.clone(),
                reachable: false,
                error: Some(e.clone()),
            }),
        }
    }
    let mut by_group: BTreeMap<&str, Vec<(&str, &GroupStatus)>> = BTreeMap::new();
    for (reporter, r) in &reports {
        for g in &r.groups {
            by_group.entry(&g.name).or_default().push((reporter, g));
        }
    }
    let mut groups = Vec::new();
    for (name, views) in by_group {
        groups.push(merge_group(&local, name, &views));
    }
    SiteStatus {
        site: local.site.clone(),
        groups,
        instance: local.instance.clone(),
        sites,
        coordinator: local.coordinator.clone(),
    }
}

/// Whether a report says its site serves the group.
fn serves(role: Role) -> bool {
    matches!(role, Role::Primary | Role::Fenced)
}

fn merge_group(local: &SiteStatus, name: &str, views: &[(&str, &GroupStatus)]) -> GroupStatus {
    let mine = views
        .iter()
        .find(|(site, _)| *site == local.site)
        .map(|(_, g)| *g);
    let owner = views
        .iter()
        .filter(|(_, g)| serves(g.role))
        .max_by(|(sa, a), (sb, b)| {
            (a.epoch, a.role == Role::Primary, std::cmp::Reverse(*sa)).cmp(&(
                b.epoch,
                b.role == Role::Primary,
                std::cmp::Reverse(*sb),
            ))
        })
        .copied();
    // Without an owner: the report with the highest epoch speaks for the
    // group (every site knows the configured primary and the last owner
    // it heard of).
    let (_, base) = owner.unwrap_or_else(|| {
        *views
            .iter()
            .max_by_key(|(site, g)| (g.epoch, *site == local.site))
            .unwrap_or(&views[0])
    });
    let mut replicas = Vec::new();
    let mut listed = BTreeSet::new();
    if let Some((owner_site, g)) = owner {
        for r in &g.replicas {
            let mut r = r.clone();
            r.reported_by = Some(owner_site.to_owned());
            listed.insert(r.site.clone());
            replicas.push(r);
        }
    }
    // Only a replica knows its history: its own report's points go on the
    // owner's entry of it.
    for r in &mut replicas {
        if r.points.is_some() {
            continue;
        }
        let own = views
            .iter()
            .filter(|(site, _)| *site == r.site)
            .find_map(|(_, g)| g.replicas.iter().find(|x| x.site == r.site));
        if let Some(own) = own {
            r.points.clone_from(&own.points);
            r.history.clone_from(&own.history);
        }
    }
    // Replicas' own reports of themselves fill what the owner did not say.
    for (site, g) in views {
        if serves(g.role) || listed.contains(*site) {
            continue;
        }
        if let Some(r) = g.replicas.iter().find(|r| r.site == *site) {
            let mut r = r.clone();
            r.reported_by = Some((*site).to_owned());
            listed.insert(r.site.clone());
            replicas.push(r);
        }
    }
    replicas.sort_by(|a, b| a.site.cmp(&b.site));
    GroupStatus {
        name: name.to_owned(),
        role: mine.map_or(Role::Down, |g| g.role),
        epoch: base.epoch,
        primary: base.primary.clone(),
        mode: base.mode,
        replicas,
        next_seq: owner.and_then(|(_, g)| g.next_seq),
        queued_bytes: owner.and_then(|(_, g)| g.queued_bytes),
        sync_degraded: owner.and_then(|(_, g)| g.sync_degraded),
        vm: mine.and_then(|g| g.vm.clone()),
        owner: owner.map(|(site, _)| site.to_owned()),
        member: Some(mine.is_some()),
        // Why the owner acknowledges no writes, as it says.
        fenced: owner.and_then(|(_, g)| g.fenced.clone()),
        failsafe: owner.and_then(|(_, g)| g.failsafe.clone()),
        lease_age_seconds: owner.and_then(|(_, g)| g.lease_age_seconds),
        // This site's own test views (their sockets are local paths).
        tests: mine.map(|g| g.tests.clone()).unwrap_or_default(),
    }
}

/// What a site remembers of each replica it reports (its own links as a
/// primary, itself as a replica) between status readings: since when it
/// is in its state, and its resync's progress over time.
#[derive(Default)]
pub struct Tracker {
    entries: Mutex<HashMap<(String, String), Entry>>,
    /// `tandem verify` running per (group, replica): the link's compared
    /// bytes when it began, the bytes to compare, and its rate.
    verifying: Mutex<HashMap<(String, String), Verifying>>,
}

/// A running verification: the link's compared bytes when it began, the
/// bytes to compare, its rate.
type Verifying = (u64, u64, RateWindow);

struct Entry {
    state: ReplicaState,
    since_ms: u64,
    resync: RateWindow,
    seen: Instant,
}

/// What [`Tracker::observe`] says of a replica.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Observed {
    /// When it entered its state (ms since the Unix epoch).
    pub since_ms: u64,
    /// Resync bytes compared per second, over [`crate::rate::WINDOW`].
    pub rate: Option<f64>,
    pub eta: Option<f64>,
}

/// How a `tandem verify` of one replica is getting on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VerifyProgress {
    pub compared: u64,
    pub total: u64,
    pub rate: Option<f64>,
    pub eta: Option<f64>,
}

/// Entries not observed this long are forgotten (a group removed).
const FORGET_AFTER: Duration = Duration::from_secs(600);

impl Tracker {
    /// A verification of `site` begins: the link has compared `baseline`
    /// bytes so far, `total` are to be compared.
    pub fn verify_begins(&self, group: &str, site: &str, baseline: u64, total: u64) {
        self.verifying.lock().insert(
            (group.to_owned(), site.to_owned()),
            (baseline, total, RateWindow::new(crate::rate::WINDOW)),
        );
    }

    pub fn verify_ends(&self, group: &str, site: &str) {
        self.verifying
            .lock()
            .remove(&(group.to_owned(), site.to_owned()));
    }

    /// The progress of a running verification, the link having compared
    /// `compared` bytes in all now (a resync the verification waits for
    /// may restart that count: progress is then approximate).
    pub fn verify_progress(
        &self,
        group: &str,
        site: &str,
        compared: u64,
        now: Instant,
    ) -> Option<VerifyProgress> {
        let mut v = self.verifying.lock();
        let (baseline, total, rate) = v.get_mut(&(group.to_owned(), site.to_owned()))?;
        let done = compared.saturating_sub(*baseline).min(*total);
        rate.observe(now, done);
        Some(VerifyProgress {
            compared: done,
            total: *total,
            rate: rate.rate(),
            eta: rate.eta(*total),
        })
    }

    /// Notes the state of `site` in `group` at `now` (`now_ms`: the same
    /// moment as wall time) and, while it resyncs, `resync` = (done,
    /// total) bytes.
    pub fn observe(
        &self,
        group: &str,
        site: &str,
        state: ReplicaState,
        resync: Option<(u64, u64)>,
        now: Instant,
        now_ms: u64,
    ) -> Observed {
        let mut entries = self.entries.lock();
        if entries.len() > 64 {
            entries.retain(|_, e| now.saturating_duration_since(e.seen) < FORGET_AFTER);
        }
        let e = entries
            .entry((group.to_owned(), site.to_owned()))
            .or_insert_with(|| Entry {
                state,
                since_ms: now_ms,
                resync: RateWindow::new(crate::rate::WINDOW),
                seen: now,
            });
        if e.state != state {
            e.state = state;
            e.since_ms = now_ms;
        }
        e.seen = now;
        let (rate, eta) = match resync {
            Some((done, total)) => {
                e.resync.observe(now, done);
                (e.resync.rate(), e.resync.eta(total))
            }
            None => {
                e.resync = RateWindow::new(crate::rate::WINDOW);
                (None, None)
            }
        };
        Observed {
            since_ms: e.since_ms,
            rate,
            eta,
        }
    }
}

/// Now, in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl crate::view::StatusView {
    /// The cluster view: this site's status merged with every other
    /// `[[peer]]`'s, asked over the peer port, each within
    /// [`gather::ASK_TIMEOUT`].
    pub fn cluster_status(&self) -> SiteStatus {
        let local = self.status();
        let config = self.shared.config();
        let peers: Vec<(String, String)> = config
            .peers
            .iter()
            .filter(|p| p.name != self.shared.site)
            .map(|p| (p.name.clone(), p.address.clone()))
            .collect();
        let answers = gather::ask_all(
            &self.shared.site,
            &peers,
            self.shared.tls.as_ref(),
            gather::ASK_TIMEOUT,
        );
        merge(local, answers)
    }
}

/// Samples the status every second, so that `since` and resync rates
/// are known between readings; until `stop`.
pub(crate) fn sample(
    view: std::sync::Arc<crate::view::StatusView>,
    stop: std::sync::Arc<crate::signal::Signal>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("status-sampler".into())
        .spawn(move || {
            while !stop.wait(Duration::from_secs(1)) {
                let _ = view.status();
            }
        })
}

#[cfg(test)]
mod tests;
