//! The failover logic: given what the store shows of a group and what
//! this site holds, what should this site do? Pure: no I/O, no clock.
//! The agent runs it after every change it sees in the store; the
//! simulation in `tests/sim.rs` runs it for many sites under crashes and
//! partitions. The timing half of fencing (stop acknowledging before the
//! lease can expire) is [`crate::lease::Validity`].

use crate::keys::{encode, GroupView, Keys, MemberReport, OwnerRecord, RequestKind, Role};
use crate::{Compare, LeaseId, Op};

/// A group's failover settings, from the configuration.
#[derive(Clone, Debug)]
pub struct Policy {
    pub group: String,
    /// Every site of the group with its priority: the configured primary
    /// is 0, replicas carry their configured priority (lower goes first).
    pub sites: Vec<(String, u32)>,
    /// `failover = "automatic"`.
    pub automatic: bool,
    /// `max_lag_on_failover`, seconds.
    pub max_lag: f64,
    /// Sync mode: the freshest candidate goes first (it holds every
    /// acknowledged write when `sync_replicas` is the number of replicas),
    /// then priority. Async: priority first, then freshness.
    pub freshest_first: bool,
}

impl Policy {
    pub fn priority(&self, site: &str) -> Option<u32> {
        self.sites.iter().find(|(s, _)| s == site).map(|(_, p)| *p)
    }
}

/// What this site holds for the group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Local {
    pub site: String,
    /// This agent's current lease.
    pub lease: LeaseId,
    pub primary: bool,
    /// The epoch this site serves (primary) or last followed (replica).
    pub epoch: u64,
    /// Where the epoch it serves started (primary only).
    pub fork: (u64, u64),
    /// Its images hold the records up to here: (epoch, seq).
    pub tip: (u64, u64),
    pub consistent: bool,
    pub fit: bool,
}

/// What to do now.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Nothing.
    Idle,
    /// This site owns `epoch`: serve it, promoting itself first if it is
    /// not yet primary. `fork` is where the epoch's sequence starts.
    Serve { epoch: u64, fork: (u64, u64) },
    /// Another site owns the group: be its replica, demoting first if
    /// this site is primary.
    Follow { owner: String, epoch: u64 },
    /// A newer epoch exists and no owner is known: stop serving now.
    Stale { epoch: u64 },
    /// Try to take ownership with this transaction; on success, serve
    /// `epoch` from `fork`.
    Claim {
        epoch: u64,
        fork: (u64, u64),
        compares: Vec<Compare>,
        ops: Vec<Op>,
    },
    /// The owner key still names this site under its previous lease
    /// (it restarted in time): move the key to the current lease.
    Reattach {
        compares: Vec<Compare>,
        ops: Vec<Op>,
    },
    /// A migration to `to` is requested: stop writes, drain to `to`, then
    /// apply the transaction that hands the next epoch over.
    HandOver {
        to: String,
        epoch: u64,
        request_id: String,
        /// Built at drain time with the final fork: see [`handover_txn`].
        to_lease: LeaseId,
    },
    /// The group's epochs are used up (`epoch` is `u64::MAX`): no site
    /// can take it over or be handed it, ever. A refusal, never a wrap to
    /// 0 (which every replica would take for the oldest epoch). The owner,
    /// if any, keeps serving `epoch`.
    Exhausted { epoch: u64 },
}

/// The epoch after `epoch`, or `None` when there is none (`u64::MAX`).
pub fn next_epoch(epoch: u64) -> Option<u64> {
    epoch.checked_add(1)
}

/// Decides for one group.
pub fn decide(keys: &Keys, policy: &Policy, view: &GroupView, local: &Local) -> Decision {
    let g = &policy.group;
    if let Some((owner, rev)) = &view.owner {
        if owner.site != local.site {
            return Decision::Follow {
                owner: owner.site.clone(),
                epoch: owner.epoch,
            };
        }
        if owner.lease != local.lease {
            let moved = OwnerRecord {
                lease: local.lease,
                ..owner.clone()
            };
            return Decision::Reattach {
                compares: vec![Compare::ModRevision(keys.owner(g), *rev)],
                ops: vec![Op::Put {
                    key: keys.owner(g),
                    value: encode(&moved),
                    lease: local.lease,
                }],
            };
        }
        if let Some((req, _)) = &view.request {
            if let (RequestKind::Migrate, Some(to)) = (req.kind, &req.to) {
                if to != &local.site && local.primary && local.epoch == owner.epoch {
                    if let Some(target) = view.member(to) {
                        let Some(epoch) = next_epoch(owner.epoch) else {
                            return Decision::Exhausted { epoch: owner.epoch };
                        };
                        return Decision::HandOver {
                            to: to.clone(),
                            epoch,
                            request_id: req.id.clone(),
                            to_lease: target.lease,
                        };
                    }
                }
            }
        }
        return Decision::Serve {
            epoch: owner.epoch,
            fork: (owner.fork_epoch, owner.fork_seq),
        };
    }
    // No owner. A forced failover names who may take over.
    let request = view
        .request
        .as_ref()
        .filter(|(r, _)| r.kind == RequestKind::Failover);
    if local.primary {
        if view.epoch > local.epoch {
            return Decision::Stale { epoch: view.epoch };
        }
        let handed_away = request.is_some_and(|(r, _)| r.to.as_deref() != Some(&local.site));
        if handed_away {
            return Decision::Stale { epoch: view.epoch };
        }
        // This site owned the newest epoch and nobody took over since its
        // lease lapsed: take it back without a new epoch (replicas keep
        // streaming). Also the very first start.
        return claim(keys, policy, view, local, local.epoch.max(1), local.fork);
    }
    if view.epoch == 0 && request.is_none() {
        // Nobody ever owned the group: the configured primary starts it.
        return Decision::Idle;
    }
    if !policy.automatic && request.is_none() {
        return Decision::Idle;
    }
    let wanted = request.and_then(|(r, _)| r.to.as_deref());
    let from = request.and_then(|(r, _)| r.from.as_deref());
    let best = best_candidate(policy, view, wanted, from);
    match best {
        Some(m) if m.site == local.site && local.consistent && local.fit => {
            let newest = view.epoch.max(local.epoch);
            match next_epoch(newest) {
                Some(epoch) => claim(keys, policy, view, local, epoch, local.tip),
                None => Decision::Exhausted { epoch: newest },
            }
        }
        _ => Decision::Idle,
    }
}

/// The site the failover order chooses among the group's reports: present
/// (lease alive), in the group, `fit`, `consistent`, not primary, within
/// `max_lag_on_failover`, not `excluded` (the owner a forced failover
/// takes the group from) and, if `wanted` names one, that one; ranked by
/// priority then freshness (async), or freshness then priority (sync).
pub fn best_candidate<'v>(
    policy: &Policy,
    view: &'v GroupView,
    wanted: Option<&str>,
    excluded: Option<&str>,
) -> Option<&'v MemberReport> {
    view.members
        .iter()
        .filter(|m| policy.priority(&m.site).is_some())
        .filter(|m| m.fit && m.consistent && m.role != Role::Primary)
        .filter(|m| wanted.is_none_or(|w| w == m.site))
        .filter(|m| excluded.is_none_or(|x| x != m.site))
        .filter(|m| within_lag(policy, view, &m.site))
        .min_by_key(|m| {
            let priority = policy.priority(&m.site).unwrap_or(u32::MAX);
            let fresh = std::cmp::Reverse((m.tip_epoch, m.tip_seq));
            let none = std::cmp::Reverse((0, 0));
            let (first, then) = if policy.freshest_first {
                (fresh, none)
            } else {
                (none, fresh)
            };
            (first, priority, then, m.site.clone())
        })
}

fn within_lag(policy: &Policy, view: &GroupView, site: &str) -> bool {
    let Some(lag) = &view.lag else { return true };
    if lag.epoch != view.epoch {
        return true;
    }
    lag.replicas
        .iter()
        .find(|(s, _, _)| s == site)
        .is_none_or(|(_, secs, _)| *secs <= policy.max_lag)
}

fn claim(
    keys: &Keys,
    policy: &Policy,
    view: &GroupView,
    local: &Local,
    epoch: u64,
    fork: (u64, u64),
) -> Decision {
    let g = &policy.group;
    let owner = OwnerRecord {
        site: local.site.clone(),
        epoch,
        lease: local.lease,
        fork_epoch: fork.0,
        fork_seq: fork.1,
    };
    let mut ops = vec![
        Op::Put {
            key: keys.owner(g),
            value: encode(&owner),
            lease: local.lease,
        },
        Op::Put {
            key: keys.epoch(g),
            value: epoch.to_string().into_bytes(),
            lease: 0,
        },
    ];
    let mut compares = vec![
        Compare::ModRevision(keys.owner(g), 0),
        Compare::ModRevision(keys.epoch(g), view.epoch_revision),
    ];
    if let Some((_, rev)) = &view.request {
        compares.push(Compare::ModRevision(keys.request(g), *rev));
        ops.push(Op::Delete {
            key: keys.request(g),
        });
    }
    Decision::Claim {
        epoch,
        fork,
        compares,
        ops,
    }
}

/// The transaction that ends a migration: if this site still owns
/// `epoch - 1` under `owner_revision`, `to` owns `epoch` from `fork`.
pub fn handover_txn(
    keys: &Keys,
    group: &str,
    owner_revision: i64,
    to: &str,
    to_lease: LeaseId,
    epoch: u64,
    fork: (u64, u64),
) -> (Vec<Compare>, Vec<Op>) {
    let owner = OwnerRecord {
        site: to.to_owned(),
        epoch,
        lease: to_lease,
        fork_epoch: fork.0,
        fork_seq: fork.1,
    };
    (
        vec![Compare::ModRevision(keys.owner(group), owner_revision)],
        vec![
            Op::Put {
                key: keys.owner(group),
                value: encode(&owner),
                lease: to_lease,
            },
            Op::Put {
                key: keys.epoch(group),
                value: epoch.to_string().into_bytes(),
                lease: 0,
            },
            Op::Delete {
                key: keys.request(group),
            },
        ],
    )
}

/// What an operator's request (`tandem failover`, `tandem migrate`) is to
/// do, decided from the store's view of the group before anything is
/// written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// The group already is where a migration asks it to go: nothing to
    /// do.
    AlreadyThere { owner: String, epoch: u64 },
    /// Write the request (with `from`, see [`crate::keys::Request`]).
    /// `expect` is the site that should end up owning the group, when it
    /// is known now (a named target, or the failover order's choice among
    /// the replicas of a live owner).
    Ask {
        from: Option<String>,
        expect: Option<String>,
    },
}

/// Why an operator's request is refused before anything is written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("group {group} has no owner to migrate from")]
    NoOwner { group: String },
    #[error("{owner} owns {group} (epoch {epoch}) and holds its lease: use `tandem migrate` for a planned move, or --force to fail over anyway")]
    OwnerAlive {
        owner: String,
        group: String,
        epoch: u64,
    },
    #[error("{owner} already owns {group} (epoch {epoch}): a failover moves a group to another site; name a replica with --to, or leave --to out to let the failover order choose one")]
    TargetIsOwner {
        owner: String,
        group: String,
        epoch: u64,
    },
    #[error("no replica of {group} can take it over from {owner} now (none reports itself consistent, fit and within max_lag_on_failover): nothing was changed")]
    NoCandidate { owner: String, group: String },
}

/// Plans an operator's request. A failover never moves a group to its
/// current owner: `to` naming the owner is refused, and without `to` a
/// live owner's group goes to the best other candidate
/// ([`best_candidate`], the owner excluded), or the request is refused
/// when there is none. A migration to the owner is [`Plan::AlreadyThere`].
pub fn plan_request(
    policy: &Policy,
    view: &GroupView,
    kind: RequestKind,
    to: Option<&str>,
    force: bool,
) -> Result<Plan, Refusal> {
    let group = &policy.group;
    let owner = view.owner.as_ref().map(|(o, _)| o);
    match (kind, owner) {
        (RequestKind::Migrate, None) => Err(Refusal::NoOwner {
            group: group.clone(),
        }),
        (RequestKind::Migrate, Some(o)) if Some(o.site.as_str()) == to => Ok(Plan::AlreadyThere {
            owner: o.site.clone(),
            epoch: o.epoch,
        }),
        (RequestKind::Migrate, Some(_)) => Ok(Plan::Ask {
            from: None,
            expect: to.map(str::to_owned),
        }),
        (RequestKind::Failover, Some(o)) if Some(o.site.as_str()) == to => {
            Err(Refusal::TargetIsOwner {
                owner: o.site.clone(),
                group: group.clone(),
                epoch: o.epoch,
            })
        }
        (RequestKind::Failover, Some(o)) if !force => Err(Refusal::OwnerAlive {
            owner: o.site.clone(),
            group: group.clone(),
            epoch: o.epoch,
        }),
        (RequestKind::Failover, Some(o)) => {
            let expect = match to {
                Some(t) => t.to_owned(),
                None => best_candidate(policy, view, None, Some(&o.site))
                    .map(|m| m.site.clone())
                    .ok_or_else(|| Refusal::NoCandidate {
                        owner: o.site.clone(),
                        group: group.clone(),
                    })?,
            };
            Ok(Plan::Ask {
                from: Some(o.site.clone()),
                expect: Some(expect),
            })
        }
        (RequestKind::Failover, None) => Ok(Plan::Ask {
            from: None,
            expect: to.map(str::to_owned),
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn view(members: &[(&str, u64)]) -> GroupView {
        GroupView {
            epoch: 1,
            epoch_revision: 5,
            members: members
                .iter()
                .map(|(s, tip)| MemberReport {
                    site: s.to_string(),
                    lease: 7,
                    role: Role::Replica,
                    epoch: 1,
                    tip_epoch: 1,
                    tip_seq: *tip,
                    consistent: true,
                    fit: true,
                    vm: None,
                })
                .collect(),
            ..GroupView::default()
        }
    }

    fn winner(freshest_first: bool) -> Option<String> {
        let policy = Policy {
            group: "g".into(),
            sites: vec![
                ("ny".into(), 0),
                ("chicago".into(), 1),
                ("seattle".into(), 2),
            ],
            automatic: true,
            max_lag: 30.0,
            freshest_first,
        };
        let v = view(&[("chicago", 90), ("seattle", 100)]);
        ["chicago", "seattle"].into_iter().find_map(|site| {
            let local = Local {
                site: site.into(),
                lease: 7,
                primary: false,
                epoch: 1,
                fork: (0, 0),
                tip: (1, if site == "chicago" { 90 } else { 100 }),
                consistent: true,
                fit: true,
            };
            matches!(
                decide(&Keys::new("/t"), &policy, &v, &local),
                Decision::Claim { .. }
            )
            .then(|| site.to_string())
        })
    }

    fn policy() -> Policy {
        Policy {
            group: "g".into(),
            sites: vec![("ny".into(), 0), ("chicago".into(), 1)],
            automatic: true,
            max_lag: 30.0,
            freshest_first: false,
        }
    }

    fn replica(site: &str, epoch: u64) -> Local {
        Local {
            site: site.into(),
            lease: 7,
            primary: false,
            epoch,
            fork: (0, 0),
            tip: (epoch, 10),
            consistent: true,
            fit: true,
        }
    }

    #[test]
    fn an_exhausted_epoch_is_refused_never_wrapped() {
        let keys = Keys::new("/t");
        // A failover after the last epoch.
        let mut v = view(&[("chicago", 10)]);
        v.epoch = u64::MAX;
        assert_eq!(
            decide(&keys, &policy(), &v, &replica("chicago", u64::MAX)),
            Decision::Exhausted { epoch: u64::MAX }
        );
        // A replica that knows of the last epoch, in a store that does not.
        v.epoch = 3;
        assert_eq!(
            decide(&keys, &policy(), &v, &replica("chicago", u64::MAX)),
            Decision::Exhausted { epoch: u64::MAX }
        );
        // A migration away from the owner of the last epoch.
        let mut v = view(&[("chicago", 10)]);
        v.epoch = u64::MAX;
        v.owner = Some((
            OwnerRecord {
                site: "ny".into(),
                epoch: u64::MAX,
                lease: 7,
                fork_epoch: 1,
                fork_seq: 0,
            },
            9,
        ));
        v.request = Some((
            crate::keys::Request {
                id: "r".into(),
                kind: RequestKind::Migrate,
                to: Some("chicago".into()),
                from: None,
            },
            10,
        ));
        let owner = Local {
            primary: true,
            fork: (1, 0),
            ..replica("ny", u64::MAX)
        };
        assert_eq!(
            decide(&keys, &policy(), &v, &owner),
            Decision::Exhausted { epoch: u64::MAX }
        );
    }

    proptest::proptest! {
        /// Whatever the store and the site hold, a claim or a handover
        /// never names an epoch older than one already seen, and a new
        /// epoch is exactly one past the newest (no wrap, no jump).
        #[test]
        fn epochs_never_go_back_or_wrap(
            store_epoch in proptest::prop_oneof![0..4u64, (u64::MAX - 3)..=u64::MAX],
            local_epoch in proptest::prop_oneof![0..4u64, (u64::MAX - 3)..=u64::MAX],
            primary in proptest::bool::ANY,
            owned_by in 0..3u8,
            migrate in proptest::bool::ANY,
        ) {
            let keys = Keys::new("/t");
            let mut v = view(&[("chicago", 10), ("ny", 10)]);
            v.epoch = store_epoch;
            let owner_site = ["ny", "chicago", ""][usize::from(owned_by)];
            if !owner_site.is_empty() {
                v.owner = Some((
                    OwnerRecord {
                        site: owner_site.into(),
                        epoch: store_epoch,
                        lease: 7,
                        fork_epoch: 0,
                        fork_seq: 0,
                    },
                    9,
                ));
            }
            if migrate {
                v.request = Some((
                    crate::keys::Request {
                        id: "r".into(),
                        kind: RequestKind::Migrate,
                        to: Some("chicago".into()),
                        from: None,
                    },
                    10,
                ));
            }
            let local = Local { primary, ..replica("ny", local_epoch) };
            match decide(&keys, &policy(), &v, &local) {
                Decision::Claim { epoch, .. } => {
                    proptest::prop_assert!(epoch >= 1);
                    proptest::prop_assert!(epoch >= store_epoch);
                    if !primary {
                        proptest::prop_assert_eq!(Some(epoch), store_epoch.max(local_epoch).checked_add(1));
                    }
                }
                Decision::HandOver { epoch, .. } => {
                    proptest::prop_assert_eq!(Some(epoch), store_epoch.checked_add(1));
                }
                Decision::Exhausted { epoch } => proptest::prop_assert_eq!(epoch, u64::MAX),
                _ => {}
            }
        }
    }

    #[test]
    fn async_goes_by_priority_sync_by_freshness() {
        assert_eq!(winner(false).as_deref(), Some("chicago"));
        assert_eq!(winner(true).as_deref(), Some("seattle"));
    }

    fn owned_by(site: &str, members: &[(&str, u64)]) -> GroupView {
        let mut v = view(members);
        v.owner = Some((
            OwnerRecord {
                site: site.into(),
                epoch: 1,
                lease: 7,
                fork_epoch: 0,
                fork_seq: 0,
            },
            9,
        ));
        if let Some(m) = v.members.iter_mut().find(|m| m.site == site) {
            m.role = Role::Primary;
        }
        v
    }

    fn three() -> Policy {
        Policy {
            group: "g".into(),
            sites: vec![
                ("ny".into(), 0),
                ("chicago".into(), 1),
                ("seattle".into(), 2),
            ],
            automatic: true,
            max_lag: 30.0,
            freshest_first: false,
        }
    }

    #[test]
    fn a_forced_failover_without_a_target_goes_to_the_first_replica_by_priority() {
        let v = owned_by("ny", &[("ny", 10), ("seattle", 10), ("chicago", 10)]);
        assert_eq!(
            plan_request(&three(), &v, RequestKind::Failover, None, true),
            Ok(Plan::Ask {
                from: Some("ny".into()),
                expect: Some("chicago".into()),
            })
        );
        // An unfit priority-1 replica is passed over.
        let mut v = v;
        v.members
            .iter_mut()
            .find(|m| m.site == "chicago")
            .unwrap()
            .fit = false;
        assert_eq!(
            plan_request(&three(), &v, RequestKind::Failover, None, true),
            Ok(Plan::Ask {
                from: Some("ny".into()),
                expect: Some("seattle".into()),
            })
        );
    }

    #[test]
    fn a_failover_to_the_owner_is_refused_and_a_migration_there_is_a_no_op() {
        let v = owned_by("ny", &[("ny", 10), ("chicago", 10)]);
        for force in [false, true] {
            assert_eq!(
                plan_request(&three(), &v, RequestKind::Failover, Some("ny"), force),
                Err(Refusal::TargetIsOwner {
                    owner: "ny".into(),
                    group: "g".into(),
                    epoch: 1,
                })
            );
        }
        assert_eq!(
            plan_request(&three(), &v, RequestKind::Migrate, Some("ny"), false),
            Ok(Plan::AlreadyThere {
                owner: "ny".into(),
                epoch: 1,
            })
        );
        assert_eq!(
            plan_request(&three(), &v, RequestKind::Failover, Some("chicago"), false),
            Err(Refusal::OwnerAlive {
                owner: "ny".into(),
                group: "g".into(),
                epoch: 1,
            })
        );
    }

    #[test]
    fn a_forced_failover_with_no_other_candidate_is_refused() {
        // The owner alone reports; its replicas are absent or inconsistent.
        let mut v = owned_by("ny", &[("ny", 10), ("chicago", 10)]);
        v.members[1].consistent = false;
        assert_eq!(
            plan_request(&three(), &v, RequestKind::Failover, None, true),
            Err(Refusal::NoCandidate {
                owner: "ny".into(),
                group: "g".into(),
            })
        );
    }

    #[test]
    fn the_owner_a_forced_failover_takes_the_group_from_never_claims_it_back() {
        // The owner key is gone, the request names ny as the one it is
        // taken from; ny has stepped down (a replica, priority 0, freshest).
        let keys = Keys::new("/t");
        let mut v = view(&[("ny", 20), ("chicago", 10), ("seattle", 10)]);
        v.request = Some((
            crate::keys::Request {
                id: "r".into(),
                kind: RequestKind::Failover,
                to: None,
                from: Some("ny".into()),
            },
            10,
        ));
        let ny = Local {
            tip: (1, 20),
            ..replica("ny", 1)
        };
        assert_eq!(decide(&keys, &three(), &v, &ny), Decision::Idle);
        // Still primary (not yet stepped down): it stops serving.
        let ny_primary = Local {
            primary: true,
            ..ny.clone()
        };
        assert!(matches!(
            decide(&keys, &three(), &v, &ny_primary),
            Decision::Stale { .. }
        ));
        // Chicago, priority 1, claims the next epoch.
        assert!(matches!(
            decide(&keys, &three(), &v, &replica("chicago", 1)),
            Decision::Claim { epoch: 2, .. }
        ));
        assert_eq!(
            decide(&keys, &three(), &v, &replica("seattle", 1)),
            Decision::Idle
        );
        // Without `from` (an older request), ny would have been chosen:
        // the fault this field closes.
        v.request.as_mut().unwrap().0.from = None;
        assert!(matches!(
            decide(&keys, &three(), &v, &ny),
            Decision::Claim { epoch: 2, .. }
        ));
    }

    proptest::proptest! {
        /// Whatever the reports, a failover's plan never expects the
        /// owner, and the site it expects is one `decide` lets claim once
        /// the owner key is gone.
        #[test]
        fn a_failover_never_plans_the_owner(
            owner in 0..3usize,
            fit in proptest::collection::vec(proptest::bool::ANY, 3),
            consistent in proptest::collection::vec(proptest::bool::ANY, 3),
            tips in proptest::collection::vec(0..5u64, 3),
            to in 0..4usize,
            force in proptest::bool::ANY,
        ) {
            let sites = ["ny", "chicago", "seattle"];
            let mut v = owned_by(sites[owner], &[("ny", tips[0]), ("chicago", tips[1]), ("seattle", tips[2])]);
            for (i, m) in v.members.iter_mut().enumerate() {
                m.fit = fit[i];
                m.consistent = consistent[i];
            }
            let to = sites.get(to).copied();
            if let Ok(Plan::Ask { expect: Some(expect), from }) =
                plan_request(&three(), &v, RequestKind::Failover, to, force)
            {
                proptest::prop_assert_ne!(&expect, sites[owner]);
                proptest::prop_assert_eq!(from.as_deref(), Some(sites[owner]));
                if to.is_none() {
                    // The owner key deleted, the owner stepped down.
                    let mut gone = v.clone();
                    gone.owner = None;
                    for m in &mut gone.members {
                        m.role = Role::Replica;
                    }
                    gone.request = Some((
                        crate::keys::Request { id: "r".into(), kind: RequestKind::Failover, to: None, from },
                        10,
                    ));
                    let keys = Keys::new("/t");
                    for (i, site) in sites.iter().enumerate() {
                        let local = Local {
                            tip: (1, tips[i]),
                            consistent: consistent[i],
                            fit: fit[i],
                            ..replica(site, 1)
                        };
                        let claims = matches!(decide(&keys, &three(), &gone, &local), Decision::Claim { .. });
                        proptest::prop_assert_eq!(claims, *site == expect, "{}", site);
                    }
                }
            }
        }
    }
}
