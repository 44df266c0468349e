//! The witness policy on a real [`MemStore`]: the failover logic's own
//! transactions pass, forgeries are refused, and random request sequences
//! from several sites never break the invariants.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::decide::handover_txn;
use crate::keys::{encode, Keys, Role};
use crate::memory::{MemStore, SimClock};
use crate::Store;

const TTL: Duration = Duration::from_secs(3);

struct World {
    store: MemStore,
    clock: SimClock,
    keys: Keys,
    limits: Limits,
}

impl World {
    fn new() -> World {
        let clock = SimClock::default();
        World {
            store: MemStore::new(Arc::new(clock.clone())),
            clock,
            keys: Keys::new("tandem"),
            limits: Limits::default(),
        }
    }

    fn grant(&self, site: &str) -> LeaseId {
        self.store
            .grant_to(TTL, site, |s| {
                check(site, s, &Action::Grant, &self.limits).map(|_| ())
            })
            .unwrap()
            .unwrap()
    }

    fn txn(&self, site: &str, compares: &[Compare], ops: &[Op]) -> Result<bool, Refusal> {
        self.store
            .txn_checked(compares, ops, site, |s| {
                check(site, s, &Action::Txn { compares, ops }, &self.limits)
            })
            .unwrap()
            .map(|(ok, _)| ok)
    }

    /// A store error (a lease not found) counts as nothing done.
    fn txn_any(&self, site: &str, ops: &[Op]) {
        let _ = self.store.txn_checked(&[], ops, site, |s| {
            check(site, s, &Action::Txn { compares: &[], ops }, &self.limits)
        });
    }

    fn keep_alive(&self, site: &str, lease: LeaseId) -> Result<(), Refusal> {
        match self.store.keep_alive_checked(lease, |s| {
            check(site, s, &Action::KeepAlive(lease), &self.limits).map(|_| ())
        }) {
            Ok(r) => r.map(|_| ()),
            Err(_) => Ok(()),
        }
    }

    fn revoke(&self, site: &str, lease: LeaseId) -> Result<(), Refusal> {
        match self.store.revoke_checked(lease, |s| {
            check(site, s, &Action::Revoke(lease), &self.limits).map(|_| ())
        }) {
            Ok(r) => r,
            Err(_) => Ok(()),
        }
    }

    fn value(&self, key: &str) -> Option<Vec<u8>> {
        self.store
            .range(key)
            .unwrap()
            .get(key)
            .map(|kv| kv.value.clone())
    }

    fn owner(&self) -> Option<OwnerRecord> {
        self.value(&self.keys.owner("g"))
            .map(|v| serde_json::from_slice(&v).unwrap())
    }

    fn epoch(&self) -> u64 {
        self.value(&self.keys.epoch("g"))
            .map_or(0, |v| String::from_utf8(v).unwrap().parse().unwrap())
    }

    /// The claim transaction `decide` builds.
    fn claim_ops(&self, site: &str, lease: LeaseId, epoch: u64) -> Vec<Op> {
        owner_ops(&self.keys, site, lease, epoch)
    }

    fn member(&self, site: &str, lease: LeaseId) -> Op {
        let report = MemberReport {
            site: site.into(),
            lease,
            role: Role::Replica,
            epoch: 1,
            tip_epoch: 1,
            tip_seq: 0,
            consistent: true,
            fit: true,
            vm: None,
        };
        Op::Put {
            key: self.keys.member("g", site),
            value: encode(&report),
            lease,
        }
    }
}

fn owner_ops(keys: &Keys, site: &str, lease: LeaseId, epoch: u64) -> Vec<Op> {
    let record = OwnerRecord {
        site: site.into(),
        epoch,
        lease,
        fork_epoch: 0,
        fork_seq: 0,
    };
    vec![
        Op::Put {
            key: keys.owner("g"),
            value: encode(&record),
            lease,
        },
        Op::Put {
            key: keys.epoch("g"),
            value: epoch.to_string().into_bytes(),
            lease: 0,
        },
    ]
}

fn code(r: Result<bool, Refusal>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(e) => e.code(),
    }
}

#[test]
fn keys_of_the_layout_parse_and_others_do_not() {
    assert_eq!(
        parse_key("tandem/groups/web01/owner"),
        Some(KeyKind::Owner {
            group: "tandem/groups/web01/"
        })
    );
    assert_eq!(
        parse_key("/x/groups/g/members/ny"),
        Some(KeyKind::Member {
            group: "/x/groups/g/",
            site: "ny"
        })
    );
    assert_eq!(
        parse_key("p/sites/ny/instance"),
        Some(KeyKind::Site { site: "ny" })
    );
    for bad in [
        "g/owner",
        "tandem/groups//owner",
        "tandem/groups/g/owner/x",
        "tandem/groups/g/members/",
        "tandem/groups/g/members/a/b",
        "tandem/xgroups/g/owner",
        "tandem/sites/ny/",
        "junk",
    ] {
        assert_eq!(parse_key(bad), None, "{bad}");
    }
}

#[test]
fn the_failover_logic_own_transactions_pass() {
    let w = World::new();
    let ny = w.grant("ny");
    let chicago = w.grant("chicago");
    // First claim, reports, lag.
    assert_eq!(code(w.txn("ny", &[], &w.claim_ops("ny", ny, 1))), "ok");
    assert_eq!(
        code(w.txn("chicago", &[], &[w.member("chicago", chicago)])),
        "ok"
    );
    let lag = Op::Put {
        key: w.keys.lag("g"),
        value: encode(&LagRecord::default()),
        lease: 0,
    };
    assert_eq!(code(w.txn("ny", &[], std::slice::from_ref(&lag))), "ok");
    assert_eq!(code(w.txn("chicago", &[], &[lag])), "not_owner");
    // Reattach after a restart: same record, new lease.
    let ny2 = w.grant("ny");
    let moved = OwnerRecord {
        lease: ny2,
        ..w.owner().unwrap()
    };
    let reattach = [Op::Put {
        key: w.keys.owner("g"),
        value: encode(&moved),
        lease: ny2,
    }];
    assert_eq!(code(w.txn("ny", &[], &reattach)), "ok");
    // A migration: any site asks, the owner hands epoch 2 over.
    let request = Op::Put {
        key: w.keys.request("g"),
        value: encode(&Request {
            id: "r1".into(),
            kind: RequestKind::Migrate,
            to: Some("chicago".into()),
            from: None,
        }),
        lease: 0,
    };
    assert_eq!(code(w.txn("chicago", &[], &[request])), "ok");
    let rev = w
        .store
        .range("")
        .unwrap()
        .get(&w.keys.owner("g"))
        .unwrap()
        .mod_revision;
    let (compares, ops) = handover_txn(&w.keys, "g", rev, "chicago", chicago, 2, (1, 5));
    assert_eq!(code(w.txn("ny", &compares, &ops)), "ok");
    assert_eq!(w.owner().unwrap().site, "chicago");
    assert_eq!(w.epoch(), 2);
    // The new owner releases it (a failed promotion), ny claims epoch 3.
    let release = [Op::Delete {
        key: w.keys.owner("g"),
    }];
    assert_eq!(code(w.txn("ny", &[], &release)), "not_owner");
    assert_eq!(code(w.txn("chicago", &[], &release)), "ok");
    assert_eq!(
        code(w.txn("ny", &[], &w.claim_ops("ny", ny2, 2))),
        "epoch_not_next"
    );
    assert_eq!(code(w.txn("ny", &[], &w.claim_ops("ny", ny2, 3))), "ok");
    // A forced failover from chicago: request first, then the delete.
    assert_eq!(code(w.txn("chicago", &[], &release)), "not_owner");
    let failover = Op::Put {
        key: w.keys.request("g"),
        value: encode(&Request {
            id: "r2".into(),
            kind: RequestKind::Failover,
            to: Some("chicago".into()),
            from: None,
        }),
        lease: 0,
    };
    assert_eq!(code(w.txn("chicago", &[], &[failover])), "ok");
    assert_eq!(code(w.txn("chicago", &[], &release)), "ok");
    let mut claim = w.claim_ops("chicago", chicago, 4);
    claim.push(Op::Delete {
        key: w.keys.request("g"),
    });
    assert_eq!(code(w.txn("chicago", &[], &claim)), "ok");
    assert_eq!(
        (w.owner().unwrap().site.as_str(), w.epoch()),
        ("chicago", 4)
    );
}

#[test]
fn the_holder_of_an_epoch_alone_takes_it_back() {
    let w = World::new();
    let ny = w.grant("ny");
    assert_eq!(code(w.txn("ny", &[], &w.claim_ops("ny", ny, 7))), "ok");
    // ny's lease lapses: its key goes.
    w.clock.advance(TTL * 2);
    assert!(w.owner().is_none());
    let chicago = w.grant("chicago");
    assert_eq!(
        code(w.txn("chicago", &[], &w.claim_ops("chicago", chicago, 7))),
        "epoch_not_next"
    );
    let ny = w.grant("ny");
    assert_eq!(code(w.txn("ny", &[], &w.claim_ops("ny", ny, 7))), "ok");
}

#[test]
fn forgeries_are_refused_and_change_nothing() {
    let w = World::new();
    let ny = w.grant("ny");
    let chicago = w.grant("chicago");
    assert_eq!(code(w.txn("ny", &[], &w.claim_ops("ny", ny, 1))), "ok");
    let before = w.store.state();
    let forged: Vec<(&str, Vec<Op>, &str)> = vec![
        // chicago writes an owner record for ny, or itself over ny.
        ("chicago", w.claim_ops("ny", ny, 2), "not_owner"),
        ("chicago", w.claim_ops("chicago", chicago, 2), "not_owner"),
        // ny hands over to a site without a lease of its own.
        ("ny", w.claim_ops("mallory", ny, 2), "not_your_lease"),
        // Wild epochs from the owner itself.
        ("ny", w.claim_ops("chicago", chicago, 0), "epoch_not_next"),
        ("ny", w.claim_ops("chicago", chicago, 3), "epoch_not_next"),
        (
            "ny",
            w.claim_ops("chicago", chicago, u64::MAX),
            "epoch_not_next",
        ),
        // Another site's member key, or a report on another's lease.
        ("chicago", vec![w.member("ny", ny)], "not_your_key"),
        ("chicago", vec![w.member("chicago", ny)], "not_your_lease"),
        // The epoch key alone, or deleted.
        (
            "ny",
            vec![Op::Put {
                key: w.keys.epoch("g"),
                value: b"2".to_vec(),
                lease: 0,
            }],
            "epoch_key",
        ),
        (
            "ny",
            vec![Op::Delete {
                key: w.keys.epoch("g"),
            }],
            "epoch_key",
        ),
        // Deleting the owner without a forced failover request.
        (
            "chicago",
            vec![Op::Delete {
                key: w.keys.owner("g"),
            }],
            "not_owner",
        ),
        // Keys outside the layout, another site's own keys.
        (
            "ny",
            vec![Op::Put {
                key: "junk".into(),
                value: b"x".to_vec(),
                lease: 0,
            }],
            "unknown_key",
        ),
        (
            "ny",
            vec![Op::Put {
                key: "tandem/sites/chicago/instance".into(),
                value: b"x".to_vec(),
                lease: 0,
            }],
            "not_your_key",
        ),
        (
            "ny",
            vec![Op::Put {
                key: w.keys.request("g"),
                value: vec![b'x'; 9000],
                lease: 0,
            }],
            "value_too_large",
        ),
    ];
    for (site, ops, expected) in forged {
        assert_eq!(code(w.txn(site, &[], &ops)), expected, "{site}: {ops:?}");
    }
    assert_eq!(
        w.store.state(),
        before,
        "a refused request changed the store"
    );
    // Another site's lease: neither renewed nor revoked.
    assert_eq!(
        w.keep_alive("chicago", ny).map_err(|e| e.code()),
        Err("not_your_lease")
    );
    assert_eq!(
        w.revoke("chicago", ny).map_err(|e| e.code()),
        Err("not_your_lease")
    );
    assert!(w.owner().is_some());
}

#[test]
fn the_last_epoch_is_never_wrapped() {
    let w = World::new();
    let ny = w.grant("ny");
    let chicago = w.grant("chicago");
    assert_eq!(
        code(w.txn("ny", &[], &w.claim_ops("ny", ny, u64::MAX))),
        "epoch_not_next"
    );
    assert_eq!(
        code(w.txn("ny", &[], &w.claim_ops("ny", ny, u64::MAX - 1))),
        "ok"
    );
    // Handing over the last epoch.
    assert_eq!(
        code(w.txn("ny", &[], &w.claim_ops("chicago", chicago, u64::MAX))),
        "ok"
    );
    assert_eq!(
        code(w.txn("ny", &[], &w.claim_ops("ny", ny, 0))),
        "not_owner"
    );
    assert_eq!(
        code(w.txn(
            "chicago",
            &[],
            &[Op::Delete {
                key: w.keys.owner("g")
            }]
        )),
        "ok"
    );
    assert_eq!(
        code(w.txn("ny", &[], &w.claim_ops("ny", ny, 0))),
        "epoch_exhausted"
    );
    assert_eq!(w.epoch(), u64::MAX);
}

#[test]
fn quotas_bound_what_a_site_stores() {
    let mut w = World::new();
    w.limits = Limits {
        site_keys: 3,
        site_bytes: 10_000,
        total_keys: 5,
        site_leases: 64,
        ..Limits::default()
    };
    let put = |i: usize, size: usize| Op::Put {
        key: format!("tandem/sites/ny/k{i}"),
        value: vec![b'v'; size],
        lease: 0,
    };
    for i in 0..3 {
        assert_eq!(code(w.txn("ny", &[], &[put(i, 10)])), "ok");
    }
    assert_eq!(code(w.txn("ny", &[], &[put(3, 10)])), "site_quota");
    // Rewriting a key it holds stays within the quota.
    assert_eq!(code(w.txn("ny", &[], &[put(0, 20)])), "ok");
    let put_c = |i: usize| Op::Put {
        key: format!("tandem/sites/chicago/k{i}"),
        value: b"v".to_vec(),
        lease: 0,
    };
    assert_eq!(code(w.txn("chicago", &[], &[put_c(0), put_c(1)])), "ok");
    assert_eq!(code(w.txn("chicago", &[], &[put_c(2)])), "store_full");
    let many: Vec<Op> = (0..300).map(|i| put(i, 1)).collect();
    assert_eq!(code(w.txn("ny", &[], &many)), "value_too_large");
    for _ in 0..64 {
        w.grant("ny");
    }
    let refused = w
        .store
        .grant_to(TTL, "ny", |s| {
            check("ny", s, &Action::Grant, &w.limits).map(|_| ())
        })
        .unwrap();
    assert_eq!(refused.map_err(|e| e.code()), Err("site_quota"));
}

/// One random request.
#[derive(Clone, Debug)]
enum Step {
    Grant(usize),
    KeepAlive(usize, usize),
    Revoke(usize, usize),
    /// caller, named site, lease index, epoch choice.
    Owner(usize, usize, usize, u8),
    Member(usize, usize, usize),
    DeleteOwner(usize),
    ForceRequest(usize),
    Advance,
}

const SITES: [&str; 3] = ["ny", "chicago", "seattle"];

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..3usize).prop_map(Step::Grant),
        (0..3usize, 0..8usize).prop_map(|(s, l)| Step::KeepAlive(s, l)),
        (0..3usize, 0..8usize).prop_map(|(s, l)| Step::Revoke(s, l)),
        (0..3usize, 0..4usize, 0..8usize, 0..6u8).prop_map(|(s, n, l, e)| Step::Owner(s, n, l, e)),
        (0..3usize, 0..3usize, 0..8usize).prop_map(|(s, n, l)| Step::Member(s, n, l)),
        (0..3usize).prop_map(Step::DeleteOwner),
        (0..3usize).prop_map(Step::ForceRequest),
        Just(Step::Advance),
    ]
}

proptest! {
    /// Whatever several sites ask, in any order: a member key is written
    /// only by its site on its own lease, an owner record names a site on
    /// that site's lease and was written by it or handed over by the
    /// previous owner, the owner's epoch is the epoch key's, and the epoch
    /// key never decreases and grows by at most one per change.
    #[test]
    fn no_site_acts_for_another(steps in proptest::collection::vec(step(), 1..60)) {
        let w = World::new();
        let mut leases: Vec<LeaseId> = Vec::new();
        for step in steps {
            let before = w.store.state();
            let owner_before = w.owner();
            let epoch_before = w.epoch();
            let lease = |i: usize| leases.get(i % leases.len().max(1)).copied().unwrap_or(99);
            let mut caller = "";
            match step {
                Step::Grant(s) => leases.push(w.grant(SITES[s])),
                Step::KeepAlive(s, l) => {
                    let _ = w.keep_alive(SITES[s], lease(l));
                }
                Step::Revoke(s, l) => {
                    let _ = w.revoke(SITES[s], lease(l));
                }
                Step::Owner(s, n, l, e) => {
                    caller = SITES[s];
                    let named = ["ny", "chicago", "seattle", "mallory"][n];
                    let epoch = match e {
                        0 => 0,
                        1 => epoch_before.saturating_sub(1),
                        2 => epoch_before,
                        3 => epoch_before.saturating_add(1),
                        4 => epoch_before.saturating_add(2),
                        _ => u64::MAX,
                    };
                    w.txn_any(caller, &owner_ops(&w.keys, named, lease(l), epoch));
                }
                Step::Member(s, n, l) => {
                    w.txn_any(SITES[s], &[w.member(SITES[n], lease(l))]);
                }
                Step::DeleteOwner(s) => {
                    caller = SITES[s];
                    w.txn_any(caller, &[Op::Delete { key: w.keys.owner("g") }]);
                }
                Step::ForceRequest(s) => {
                    w.txn_any(SITES[s], &[Op::Put {
                        key: w.keys.request("g"),
                        value: encode(&Request { id: "x".into(), kind: RequestKind::Failover, to: None, from: None }),
                        lease: 0,
                    }]);
                }
                Step::Advance => w.clock.advance(Duration::from_secs(2)),
            }
            let after = w.store.state();
            for (key, k) in &after.keys {
                if let Some(KeyKind::Member { site, .. }) = parse_key(key) {
                    prop_assert_eq!(&k.by, site);
                    prop_assert_eq!(after.holders.get(&k.lease).map(String::as_str), Some(site));
                }
            }
            let epoch_after = w.epoch();
            prop_assert!(epoch_after >= epoch_before, "epoch went back");
            // A group's first epoch on a witness is the one its claimant
            // brings; from then on it grows by one.
            let had_epoch = before.keys.contains_key(&w.keys.epoch("g"));
            prop_assert!(!had_epoch || epoch_after - epoch_before <= 1, "epoch jumped");
            if let Some(owner) = w.owner() {
                prop_assert_eq!(owner.epoch, epoch_after);
                prop_assert_eq!(after.holders.get(&owner.lease), Some(&owner.site));
                let key = &after.keys[&w.keys.owner("g")];
                prop_assert_eq!(key.lease, owner.lease);
                if Some(&owner) != owner_before.as_ref() {
                    // A new record: by its site, or handed over by the
                    // owner before it.
                    let by_self = owner.site == caller;
                    let handed = owner_before.as_ref().is_some_and(|o| o.site == caller);
                    prop_assert!(by_self || handed, "{caller} wrote {owner:?} over {owner_before:?}");
                }
            }
            if owner_before.is_some() && w.owner().is_none() && before.leases == after.leases {
                // Deleted, not expired: by the owner or after a forced
                // failover request.
                let o = owner_before.unwrap();
                let forced = before.keys.contains_key(&w.keys.request("g"));
                prop_assert!(o.site == caller || forced);
            }
        }
    }
}
