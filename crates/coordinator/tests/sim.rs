//! The failover logic under simulated time: three sites, one store, and
//! random crashes, restarts and partitions. Every acknowledged write is
//! recorded with its site and epoch, and the checker asserts G6: writes of
//! an older epoch are never acknowledged once a newer epoch has begun, and
//! one epoch is only ever served by one site.

#![allow(clippy::unwrap_used)]
#![allow(clippy::cast_possible_truncation)] // three simulated sites: counts and indexes are tiny

use std::sync::Arc;
use std::time::Duration;

use tandem_coordinator::decide::{decide, handover_txn, Decision, Local, Policy};
use tandem_coordinator::keys::{
    encode, GroupView, Keys, LagRecord, MemberReport, Request, RequestKind,
};
use tandem_coordinator::lease;
use tandem_coordinator::memory::{Clock, MemStore, SimClock};
use tandem_coordinator::{LeaseId, Op, Store, StoreError};

const TTL: Duration = Duration::from_secs(3);
const TICK: Duration = Duration::from_millis(100);
const GROUP: &str = "web01";

struct Site {
    name: String,
    alive: bool,
    /// Can reach the store.
    reach_store: bool,
    /// Can reach the other sites.
    reach_peers: bool,
    lease: Option<LeaseId>,
    valid_until: Duration,
    last_renew: Option<Duration>,
    /// The store named this site owner under its current lease at its
    /// last look.
    owner_ok: bool,
    // What survives a crash:
    primary: bool,
    epoch: u64,
    fork: (u64, u64),
    tip: (u64, u64),
    consistent: bool,
    following: Option<String>,
    last_synced: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Ack {
    at: Duration,
    site: usize,
    epoch: u64,
}

struct World {
    clock: SimClock,
    store: MemStore,
    keys: Keys,
    policy: Policy,
    sites: Vec<Site>,
    acks: Vec<Ack>,
    rng: u64,
}

impl World {
    fn new(seed: u64, automatic: bool) -> World {
        let clock = SimClock::default();
        let names = ["ny", "chicago", "seattle"];
        World {
            store: MemStore::new(Arc::new(clock.clone())),
            clock,
            keys: Keys::new("/tandem"),
            policy: Policy {
                group: GROUP.into(),
                sites: names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (n.to_string(), i as u32))
                    .collect(),
                automatic,
                max_lag: 30.0,
                freshest_first: false,
            },
            sites: names
                .iter()
                .enumerate()
                .map(|(i, n)| Site {
                    name: n.to_string(),
                    alive: true,
                    reach_store: true,
                    reach_peers: true,
                    lease: None,
                    valid_until: Duration::ZERO,
                    last_renew: None,
                    owner_ok: false,
                    primary: i == 0,
                    epoch: 1,
                    fork: (0, 0),
                    tip: (0, 0),
                    consistent: true,
                    following: None,
                    last_synced: Duration::ZERO,
                })
                .collect(),
            acks: Vec::new(),
            rng: seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407)
                | 1,
        }
    }

    fn now(&self) -> Duration {
        self.clock.now()
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn chance(&mut self, per_mille: u64) -> bool {
        self.random() % 1000 < per_mille
    }

    fn crash(&mut self, i: usize) {
        let s = &mut self.sites[i];
        s.alive = false;
        s.lease = None;
        s.last_renew = None;
        s.owner_ok = false;
    }

    fn restart(&mut self, i: usize) {
        self.sites[i].alive = true;
    }

    /// One step of one site: renew, look, decide, act, report.
    fn step(&mut self, i: usize) {
        let now = self.now();
        if !self.sites[i].alive {
            return;
        }
        if self.sites[i].reach_store {
            self.renew(i, now);
            let snapshot = self.store.range(&self.keys.groups());
            if let Ok(snap) = snapshot {
                let view = GroupView::read(&self.keys, GROUP, &snap);
                self.act(i, &view);
                self.report(i);
            }
        }
        let s = &self.sites[i];
        if s.primary && s.owner_ok && now < s.valid_until {
            let s = &mut self.sites[i];
            s.tip = (s.epoch, s.tip.1 + 1);
            let epoch = s.epoch;
            self.acks.push(Ack {
                at: now,
                site: i,
                epoch,
            });
        }
    }

    fn renew(&mut self, i: usize, now: Duration) {
        let s = &mut self.sites[i];
        match s.lease {
            None => {
                if let Ok(id) = self.store.grant(TTL) {
                    s.lease = Some(id);
                    s.last_renew = Some(now);
                    s.valid_until = lease::valid_until(now, TTL);
                    s.owner_ok = false;
                }
            }
            Some(id) => {
                let due = s
                    .last_renew
                    .is_none_or(|t| now >= t + lease::renew_every(TTL));
                if due {
                    match self.store.keep_alive(id) {
                        Ok(_) => {
                            s.last_renew = Some(now);
                            s.valid_until = lease::valid_until(now, TTL);
                        }
                        Err(StoreError::LeaseNotFound(_)) => {
                            s.lease = None;
                            s.owner_ok = false;
                        }
                        Err(e) => panic!("memory store failed: {e}"),
                    }
                }
            }
        }
    }

    fn act(&mut self, i: usize, view: &GroupView) {
        let Some(lease) = self.sites[i].lease else {
            return;
        };
        let s = &self.sites[i];
        let local = Local {
            site: s.name.clone(),
            lease,
            primary: s.primary,
            epoch: s.epoch,
            fork: s.fork,
            tip: s.tip,
            consistent: s.consistent,
            fit: true,
        };
        match decide(&self.keys, &self.policy, view, &local) {
            Decision::Idle => {}
            Decision::Serve { epoch, fork } => {
                let s = &mut self.sites[i];
                if !s.primary || s.epoch != epoch {
                    // Promotion: everything held is applied.
                    assert_eq!(s.tip, fork, "{} promoted away from its tip", s.name);
                    s.primary = true;
                    s.epoch = epoch;
                    s.fork = fork;
                    s.following = None;
                }
                s.owner_ok = true;
            }
            Decision::Follow { owner, epoch } => {
                let s = &mut self.sites[i];
                if s.primary {
                    s.primary = false;
                    // A former owner rolls back what the new one lacks:
                    // until its resync it is not a prefix.
                    s.consistent = false;
                }
                s.owner_ok = false;
                s.epoch = s.epoch.max(epoch);
                s.following = Some(owner);
            }
            Decision::Stale { epoch } => {
                let s = &mut self.sites[i];
                s.primary = false;
                s.owner_ok = false;
                s.consistent = false;
                s.epoch = s.epoch.max(epoch);
            }
            Decision::Claim {
                epoch,
                fork,
                compares,
                ops,
            } => {
                if let Ok((true, _)) = self.store.txn(&compares, &ops) {
                    let s = &mut self.sites[i];
                    s.primary = true;
                    s.epoch = epoch;
                    s.fork = fork;
                    s.owner_ok = true;
                    s.following = None;
                }
            }
            Decision::Reattach { compares, ops } => {
                let _ = self.store.txn(&compares, &ops);
            }
            Decision::HandOver {
                to,
                epoch,
                to_lease,
                ..
            } => {
                // Stop acknowledging, drain to the target, hand over.
                self.sites[i].owner_ok = false;
                let t = self.sites.iter().position(|s| s.name == to).unwrap();
                if !(self.sites[t].alive && self.sites[t].reach_peers && self.sites[i].reach_peers)
                {
                    return;
                }
                self.sites[t].tip = self.sites[i].tip;
                let rev = view.owner.as_ref().map_or(0, |(_, r)| *r);
                let fork = self.sites[i].tip;
                let (c, o) = handover_txn(&self.keys, GROUP, rev, &to, to_lease, epoch, fork);
                if let Ok((true, _)) = self.store.txn(&c, &o) {
                    let s = &mut self.sites[i];
                    s.primary = false;
                    s.epoch = epoch;
                    s.following = Some(to);
                }
            }
        }
    }

    fn report(&mut self, i: usize) {
        let s = &self.sites[i];
        let Some(lease) = s.lease else { return };
        let report = MemberReport {
            site: s.name.clone(),
            lease,
            role: if s.primary { "primary" } else { "replica" }.into(),
            epoch: s.epoch,
            tip_epoch: s.tip.0,
            tip_seq: s.tip.1,
            consistent: s.consistent,
            fit: true,
        };
        let mut ops = vec![Op::Put {
            key: self.keys.member(GROUP, &s.name),
            value: encode(&report),
            lease,
        }];
        if s.primary && s.owner_ok {
            let now = self.now();
            let lag = LagRecord {
                epoch: s.epoch,
                replicas: self
                    .sites
                    .iter()
                    .filter(|r| r.name != s.name)
                    .map(|r| {
                        let secs = now.saturating_sub(r.last_synced).as_secs_f64();
                        (r.name.clone(), secs, r.reach_peers)
                    })
                    .collect(),
            };
            ops.push(Op::Put {
                key: self.keys.lag(GROUP),
                value: encode(&lag),
                lease: 0,
            });
        }
        let _ = self.store.txn(&[], &ops);
    }

    /// Replicas that can reach their owner catch up with it.
    fn replicate(&mut self) {
        let now = self.now();
        for i in 0..self.sites.len() {
            let Some(owner) = self.sites[i].following.clone() else {
                continue;
            };
            let o = self.sites.iter().position(|s| s.name == owner).unwrap();
            let (r, p) = (&self.sites[i], &self.sites[o]);
            let linked = r.alive && p.alive && r.reach_peers && p.reach_peers;
            if !linked || !p.primary || p.epoch < r.epoch {
                continue;
            }
            let on_history = r.tip == p.fork || r.tip.0 == p.epoch;
            let tip = p.tip;
            let r = &mut self.sites[i];
            if on_history && r.consistent {
                r.tip = tip;
            } else {
                // Chunk comparison: inconsistent while it runs.
                if r.consistent {
                    r.consistent = false;
                } else {
                    r.tip = tip;
                    r.consistent = true;
                }
            }
            r.last_synced = now;
        }
    }

    fn tick(&mut self) {
        let n = self.sites.len();
        let start = (self.random() % n as u64) as usize;
        for k in 0..n {
            self.step((start + k) % n);
        }
        self.replicate();
        self.clock.advance(TICK);
    }

    fn run(&mut self, d: Duration) {
        let until = self.now() + d;
        while self.now() < until {
            self.tick();
        }
    }

    fn owner(&self) -> Option<String> {
        let snap = self.store.range(&self.keys.groups()).ok()?;
        GroupView::read(&self.keys, GROUP, &snap)
            .owner
            .map(|(o, _)| o.site)
    }

    fn acking(&self, d: Duration) -> Vec<(String, u64)> {
        let since = self.now().saturating_sub(d);
        let mut v: Vec<(String, u64)> = self
            .acks
            .iter()
            .filter(|a| a.at >= since)
            .map(|a| (self.sites[a.site].name.clone(), a.epoch))
            .collect();
        v.dedup();
        v
    }

    /// An operator's request, as `tandem failover/migrate` writes it.
    fn request(&self, kind: RequestKind, to: &str) {
        let req = Request {
            id: format!("{kind:?}-{to}"),
            kind,
            to: Some(to.into()),
        };
        let put = Op::Put {
            key: self.keys.request(GROUP),
            value: encode(&req),
            lease: 0,
        };
        self.store.txn(&[], &[put]).unwrap();
    }

    /// G6 over everything acknowledged so far.
    fn check(&self) {
        let mut by_epoch: std::collections::BTreeMap<u64, (usize, Duration, Duration)> =
            Default::default();
        for a in &self.acks {
            let e = by_epoch.entry(a.epoch).or_insert((a.site, a.at, a.at));
            assert_eq!(
                e.0, a.site,
                "epoch {} acknowledged by two sites: {} and {}",
                a.epoch, self.sites[e.0].name, self.sites[a.site].name
            );
            e.1 = e.1.min(a.at);
            e.2 = e.2.max(a.at);
        }
        let spans: Vec<_> = by_epoch.iter().collect();
        for w in spans.windows(2) {
            let (e1, (_, _, last)) = w[0];
            let (e2, (_, first, _)) = w[1];
            assert!(
                last < first,
                "epoch {e1} acknowledged a write at {last:?}, after epoch {e2} began at {first:?}"
            );
        }
    }
}

#[test]
fn the_configured_primary_starts_the_group_in_epoch_one() {
    let mut w = World::new(1, true);
    w.run(Duration::from_secs(2));
    assert_eq!(w.owner().as_deref(), Some("ny"));
    assert_eq!(w.acking(Duration::from_secs(1)), vec![("ny".into(), 1)]);
    w.check();
}

#[test]
fn losing_the_owner_promotes_the_best_priority_within_the_lease() {
    let mut w = World::new(2, true);
    w.run(Duration::from_secs(5));
    w.crash(0);
    let killed = w.now();
    while w.owner().as_deref() != Some("chicago") {
        assert!(
            w.now() < killed + TTL + Duration::from_secs(1),
            "no failover"
        );
        w.tick();
    }
    w.run(Duration::from_secs(1));
    assert_eq!(
        w.acking(Duration::from_millis(500)),
        vec![("chicago".into(), 2)]
    );
    // New York -> Chicago -> Seattle.
    w.crash(1);
    w.run(TTL + Duration::from_secs(1));
    assert_eq!(w.owner().as_deref(), Some("seattle"));
    // The old owner comes back as a replica and catches up.
    w.restart(0);
    w.run(Duration::from_secs(3));
    assert!(!w.sites[0].primary);
    assert_eq!(w.sites[0].tip, w.sites[2].tip);
    assert!(w.sites[0].consistent);
    w.check();
}

#[test]
fn an_owner_cut_from_the_store_fences_itself_before_anyone_takes_over() {
    let mut w = World::new(3, true);
    w.run(Duration::from_secs(5));
    w.sites[0].reach_store = false;
    w.run(TTL + Duration::from_secs(2));
    assert_eq!(w.owner().as_deref(), Some("chicago"));
    assert_eq!(
        w.acking(Duration::from_millis(500)),
        vec![("chicago".into(), 2)]
    );
    w.sites[0].reach_store = true;
    w.run(Duration::from_secs(3));
    assert!(!w.sites[0].primary, "the old owner must follow the new one");
    w.check();
}

#[test]
fn a_short_coordinator_outage_keeps_the_owner_and_its_epoch() {
    let mut w = World::new(4, true);
    w.run(Duration::from_secs(5));
    // Every site loses the store for less than the lease: nothing moves.
    for s in &mut w.sites {
        s.reach_store = false;
    }
    w.run(Duration::from_millis(1500));
    for s in &mut w.sites {
        s.reach_store = true;
    }
    w.run(Duration::from_secs(2));
    assert_eq!(w.owner().as_deref(), Some("ny"));
    assert_eq!(w.acking(Duration::from_millis(500)), vec![("ny".into(), 1)]);
    w.check();
}

#[test]
fn manual_groups_are_never_promoted_automatically_but_on_request() {
    let mut w = World::new(5, false);
    w.run(Duration::from_secs(3));
    w.crash(0);
    w.run(TTL * 3);
    assert_eq!(w.owner(), None);
    w.request(RequestKind::Failover, "seattle");
    w.run(Duration::from_secs(1));
    assert_eq!(w.owner().as_deref(), Some("seattle"));
    w.check();
}

#[test]
fn an_inconsistent_replica_is_passed_over() {
    let mut w = World::new(6, true);
    w.run(Duration::from_secs(3));
    w.sites[1].consistent = false;
    w.sites[1].following = None; // stays inconsistent
    w.crash(0);
    w.run(TTL + Duration::from_secs(2));
    assert_eq!(w.owner().as_deref(), Some("seattle"));
    w.check();
}

#[test]
fn migration_hands_over_with_no_overlap() {
    let mut w = World::new(7, true);
    w.run(Duration::from_secs(3));
    w.request(RequestKind::Migrate, "seattle");
    w.run(Duration::from_secs(1));
    assert_eq!(w.owner().as_deref(), Some("seattle"));
    assert_eq!(
        w.acking(Duration::from_millis(300)),
        vec![("seattle".into(), 2)]
    );
    // Zero loss: the target held everything the old owner acknowledged.
    let ny_last = w.acks.iter().filter(|a| a.site == 0).count();
    assert!(ny_last > 0);
    assert!(w.sites[0].consistent && !w.sites[0].primary);
    w.check();
}

#[test]
fn randomized_crashes_restarts_and_partitions_never_overlap_epochs() {
    let rounds = std::env::var("TANDEM_SIM_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300u64);
    let mut failovers = 0;
    for seed in 0..rounds {
        let mut w = World::new(seed, true);
        let mut down: Vec<Option<Duration>> = vec![None; 3];
        let mut cut: Vec<Option<Duration>> = vec![None; 3];
        w.run(Duration::from_secs(2));
        for _ in 0..600 {
            for i in 0..3 {
                let now = w.now();
                if down[i].is_some_and(|t| now >= t) {
                    down[i] = None;
                    w.restart(i);
                }
                if cut[i].is_some_and(|t| now >= t) {
                    cut[i] = None;
                    w.sites[i].reach_store = true;
                    w.sites[i].reach_peers = true;
                }
                if down[i].is_none() && w.chance(2) {
                    w.crash(i);
                    down[i] = Some(now + Duration::from_millis(500 + w.random() % 6000));
                }
                if cut[i].is_none() && w.chance(2) {
                    match w.random() % 3 {
                        0 => w.sites[i].reach_store = false,
                        1 => w.sites[i].reach_peers = false,
                        _ => {
                            w.sites[i].reach_store = false;
                            w.sites[i].reach_peers = false;
                        }
                    }
                    cut[i] = Some(now + Duration::from_millis(500 + w.random() % 8000));
                }
            }
            w.tick();
        }
        // Heal everything: the group must settle on one owner that acks.
        for i in 0..3 {
            if !w.sites[i].alive {
                w.restart(i);
            }
            w.sites[i].reach_store = true;
            w.sites[i].reach_peers = true;
        }
        w.run(Duration::from_secs(15));
        w.check();
        let acking = w.acking(Duration::from_secs(1));
        assert_eq!(
            acking.len(),
            1,
            "seed {seed}: after healing, acking {acking:?}"
        );
        failovers += w.acks.last().map_or(0, |a| a.epoch - 1);
    }
    assert!(
        failovers > rounds,
        "the faults should cause failovers ({failovers})"
    );
}
