//! Operator requests (`tandem failover`, `tandem migrate`, the API): a
//! request key the group's sites act on, then a wait for the new owner.
//!
//! A forced failover deletes the group's owner key (only if it is still
//! the one read) after writing the request. It does not revoke the
//! owner's lease: that lease also carries the owner's other groups, which
//! would lose their owner keys while their gates are still open. The
//! owner's gate fences this group alone at its next read of the store, and
//! at the latest when its last confirming read lapses (TTL - TTL/6); the
//! candidate waits a full TTL from when it saw the key gone (F2).

use std::time::{Duration, Instant};

use tandem_coordinator::decide::{plan_request, Plan, Refusal};
use tandem_coordinator::keys::{encode, GroupView, Request, RequestKind};
use tandem_coordinator::{Compare, Op, StoreError};
use tracing::{info, warn};

use super::Handle;

/// Why a request was not carried out.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    #[error("no group named {0:?} on this site")]
    UnknownGroup(String),
    #[error("{site} is not a site of group {group}")]
    NotMember { site: String, group: String },
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("{site} cannot take {group} over: {why}; it would be left without an owner (choose another site, or none to let the failover order choose)")]
    TargetUnable {
        site: String,
        group: String,
        why: Unable,
    },
    #[error("{group}: no new owner within {waited:?}")]
    TimedOut { group: String, waited: Duration },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Who owns a group after a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub owner: String,
    pub epoch: u64,
    /// False: the group already was where a migration asked it to go.
    pub moved: bool,
}

/// Why a named site cannot take a group over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Unable {
    #[error("it has no report in the coordinator (is its agent running?)")]
    Absent,
    #[error("its images are not a consistent prefix (new, or in the middle of a resync)")]
    Inconsistent,
    #[error("it reports itself unfit (its last on_promote failed; restart its agent once fixed)")]
    Unfit,
}

impl Handle {
    /// Whether `site` could claim `group` now, as its report in the store
    /// says. A site that is merely behind in reporting (its resync just
    /// ended) gets a lease's time to say so.
    fn able_to_take_over(&self, group: &str, site: &str, prefix: &str) -> Result<(), RequestError> {
        let deadline = Instant::now() + self.ttl;
        loop {
            let snap = self.store.range(prefix)?;
            let view = GroupView::read(&self.keys, group, &snap);
            let is_owner = view.owner.as_ref().is_some_and(|(o, _)| o.site == site);
            let why = match view.member(site) {
                _ if is_owner => return Ok(()),
                None => Unable::Absent,
                Some(m) if !m.consistent => Unable::Inconsistent,
                Some(m) if !m.fit => Unable::Unfit,
                Some(_) => return Ok(()),
            };
            if Instant::now() >= deadline {
                return Err(RequestError::TargetUnable {
                    site: site.to_owned(),
                    group: group.to_owned(),
                    why,
                });
            }
            let _ = self.store.wait(
                prefix,
                snap.revision,
                deadline.saturating_duration_since(Instant::now()),
            );
        }
    }

    /// Asks for a failover or migration of `group` and waits until a site
    /// other than the current owner owns it (the one named by `to`, if
    /// any), or `timeout`. Returns the new owner and its epoch, or the
    /// current owner, unmoved, when a migration names it.
    pub fn request(
        &self,
        group: &str,
        kind: RequestKind,
        to: Option<String>,
        force: bool,
        timeout: Duration,
    ) -> Result<Outcome, RequestError> {
        let member = self
            .members()
            .into_iter()
            .find(|m| m.runtime.name() == group)
            .ok_or_else(|| RequestError::UnknownGroup(group.to_owned()))?;
        if let Some(to) = &to {
            if !member.runtime.members().contains(to) {
                return Err(RequestError::NotMember {
                    site: to.clone(),
                    group: group.to_owned(),
                });
            }
        }
        let prefix = self.keys.group(group);
        let policy = member.machine.lock().policy().clone();
        // A replica that is merely behind in reporting (its first sync
        // just ended) gets a lease's time to say so before a failover
        // without a target is refused for want of a candidate.
        let patience = Instant::now() + self.ttl;
        let (view, plan) = loop {
            let snap = self.store.range(&prefix)?;
            let view = GroupView::read(&self.keys, group, &snap);
            match plan_request(&policy, &view, kind, to.as_deref(), force) {
                Err(Refusal::NoCandidate { .. }) if Instant::now() < patience => {
                    let _ = self.store.wait(
                        &prefix,
                        snap.revision,
                        patience.saturating_duration_since(Instant::now()),
                    );
                }
                plan => break (view, plan?),
            }
        };
        let before = view.owner.as_ref().map(|(o, _)| (o.site.clone(), o.epoch));
        let from = match plan {
            Plan::AlreadyThere { owner, epoch } => {
                return Ok(Outcome {
                    owner,
                    epoch,
                    moved: false,
                })
            }
            Plan::Ask { from, expect } => {
                if let Some(expect) = expect {
                    info!(group, to = %expect, ?kind, "operator request: moving the group");
                }
                from
            }
        };
        // A forced failover to a site that cannot claim would take the
        // group away from its owner and leave it with none.
        if let (RequestKind::Failover, Some(site)) = (kind, &to) {
            self.able_to_take_over(group, site, &prefix)?;
        }
        // The request goes first: whoever sees the owner gone also sees
        // it, and waits a full TTL before claiming (F2).
        let req = Request {
            id: format!(
                "{}-{}-{}",
                self.shared.site,
                std::process::id(),
                view.revision
            ),
            kind,
            to: to.clone(),
            from: from.clone(),
        };
        self.store.txn(
            &[],
            &[Op::Put {
                key: self.keys.request(group),
                value: encode(&req),
                lease: 0,
            }],
        )?;
        if let (RequestKind::Failover, Some((o, rev))) = (kind, &view.owner) {
            warn!(group, owner = %o.site, "forced failover: taking the group away from its owner");
            let key = self.keys.owner(group);
            self.store.txn(
                &[Compare::ModRevision(key.clone(), *rev)],
                &[Op::Delete { key }],
            )?;
        }
        let deadline = Instant::now() + timeout;
        loop {
            let snap = self.store.range(&prefix)?;
            let view = GroupView::read(&self.keys, group, &snap);
            if let Some((o, _)) = &view.owner {
                let moved = before
                    .as_ref()
                    .is_none_or(|(s, e)| *s != o.site || *e != o.epoch);
                let right = to.as_ref().is_none_or(|t| *t == o.site)
                    && from.as_ref().is_none_or(|f| *f != o.site);
                if moved && right {
                    return Ok(Outcome {
                        owner: o.site.clone(),
                        epoch: o.epoch,
                        moved: true,
                    });
                }
            }
            if Instant::now() >= deadline {
                return Err(RequestError::TimedOut {
                    group: group.to_owned(),
                    waited: timeout,
                });
            }
            let _ = self
                .store
                .wait(&prefix, snap.revision, Duration::from_millis(500));
        }
    }
}
