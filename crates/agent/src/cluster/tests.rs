use super::*;
use crate::status::{Mode, ReplicaStatus};

fn replica(site: &str, state: ReplicaState, lag: u64) -> ReplicaStatus {
    ReplicaStatus {
        site: site.into(),
        state,
        lag_bytes: lag,
        lag_seconds: if lag > 0 { 3.0 } else { 0.0 },
        durable_seq: 10,
        applied_seq: 10,
        resyncing: false,
        resync: None,
        verify: None,
        rtt_ms: None,
        wire_bytes: 0,
        raw_bytes: 0,
        last_error: None,
        since: Some("2026-12-06T10:00:00Z".into()),
        rpo_seconds: None,
        reported_by: None,
        compare_bytes_read: 0,
        points: None,
        history: None,
    }
}

fn group(
    name: &str,
    role: Role,
    epoch: u64,
    primary: &str,
    replicas: Vec<ReplicaStatus>,
) -> GroupStatus {
    GroupStatus {
        name: name.into(),
        role,
        epoch,
        primary: primary.into(),
        mode: Mode::Async,
        replicas,
        next_seq: (role == Role::Primary).then_some(11),
        queued_bytes: None,
        sync_degraded: None,
        vm: None,
        owner: None,
        member: None,
        fenced: None,
        failsafe: None,
        lease_age_seconds: None,
        tests: Vec::new(),
    }
}

fn site(name: &str, groups: Vec<GroupStatus>) -> SiteStatus {
    SiteStatus {
        site: name.into(),
        groups,
        instance: None,
        sites: Vec::new(),
        coordinator: None,
    }
}

/// A primary on `a` with replicas `b` (paused, 16 MiB behind as `a` sees
/// it) and `c`.
fn primary_a(epoch: u64) -> SiteStatus {
    site(
        "a",
        vec![group(
            "web",
            Role::Primary,
            epoch,
            "a",
            vec![
                replica("b", ReplicaState::Paused, 16 << 20),
                replica("c", ReplicaState::Streaming, 0),
            ],
        )],
    )
}

/// A replica's own report: itself, streaming, no lag known.
fn replica_site(name: &str, epoch: u64, primary: &str) -> SiteStatus {
    site(
        name,
        vec![group(
            "web",
            Role::Replica,
            epoch,
            primary,
            vec![replica(name, ReplicaState::Streaming, 0)],
        )],
    )
}

#[test]
fn a_replica_shows_the_owners_view_of_every_replica() {
    let merged = merge(
        replica_site("b", 3, "a"),
        vec![
            ("a".into(), Ok(primary_a(3))),
            ("c".into(), Ok(replica_site("c", 3, "a"))),
        ],
    );
    assert_eq!(merged.site, "b");
    let g = &merged.groups[0];
    assert_eq!(g.role, Role::Replica, "role is this site's");
    assert_eq!(g.owner.as_deref(), Some("a"));
    assert_eq!((g.epoch, g.primary.as_str()), (3, "a"));
    assert_eq!(g.member, Some(true));
    assert_eq!(g.next_seq, Some(11), "from the owner");
    let b = &g.replicas[0];
    // The bug: b said "streaming, 0 B lag" while a had it paused.
    assert_eq!(
        (b.site.as_str(), b.state, b.lag_bytes),
        ("b", ReplicaState::Paused, 16 << 20)
    );
    assert_eq!(b.reported_by.as_deref(), Some("a"));
    assert_eq!(g.replicas[1].site, "c");
    assert_eq!(g.replicas.len(), 2);
    let names: Vec<_> = merged
        .sites
        .iter()
        .map(|s| (s.name.as_str(), s.reachable))
        .collect();
    assert_eq!(names, [("b", true), ("a", true), ("c", true)]);
}

#[test]
fn unreachable_sites_are_marked_and_the_group_still_shows() {
    let merged = merge(
        replica_site("b", 3, "a"),
        vec![
            ("c".into(), Err("no answer within 2s".into())),
            ("a".into(), Ok(primary_a(3))),
        ],
    );
    let c = merged.sites.iter().find(|s| s.name == "c").unwrap();
    assert!(!c.reachable);
    assert_eq!(c.error.as_deref(), Some("no answer within 2s"));
    assert_eq!(merged.groups.len(), 1);
    assert_eq!(merged.groups[0].owner.as_deref(), Some("a"));
    assert_eq!(merged.groups[0].replicas.len(), 2, "c as a sees it");
}

#[test]
fn without_the_owner_replicas_speak_for_themselves() {
    let merged = merge(
        replica_site("b", 3, "a"),
        vec![
            ("a".into(), Err("connection refused".into())),
            ("c".into(), Ok(replica_site("c", 3, "a"))),
        ],
    );
    let g = &merged.groups[0];
    assert_eq!(g.owner, None);
    assert_eq!((g.epoch, g.primary.as_str()), (3, "a"));
    let sites: Vec<_> = g
        .replicas
        .iter()
        .map(|r| (r.site.as_str(), r.reported_by.as_deref()))
        .collect();
    assert_eq!(sites, [("b", Some("b")), ("c", Some("c"))]);
    assert_eq!(g.next_seq, None);
}

#[test]
fn the_highest_epoch_owns_and_primary_beats_fenced() {
    // An old primary (epoch 3, fenced) came back; b owns epoch 4.
    let mut b = primary_a(4);
    b.site = "b".into();
    b.groups[0].primary = "b".into();
    b.groups[0].replicas = vec![replica("a", ReplicaState::Resyncing, 1 << 20)];
    let mut old = primary_a(3);
    old.groups[0].role = Role::Fenced;
    let merged = merge(
        replica_site("c", 4, "b"),
        vec![("a".into(), Ok(old)), ("b".into(), Ok(b.clone()))],
    );
    let g = &merged.groups[0];
    assert_eq!(
        (g.owner.as_deref(), g.epoch, g.primary.as_str()),
        (Some("b"), 4, "b")
    );
    // a from b's view, c from its own report (b does not list it).
    let states: Vec<_> = g
        .replicas
        .iter()
        .map(|r| (r.site.as_str(), r.state))
        .collect();
    assert_eq!(
        states,
        [
            ("a", ReplicaState::Resyncing),
            ("c", ReplicaState::Streaming)
        ]
    );

    // Same epoch: the one acknowledging writes wins.
    let mut fenced = b.clone();
    fenced.site = "d".into();
    fenced.groups[0].role = Role::Fenced;
    let merged = merge(
        replica_site("c", 4, "b"),
        vec![("d".into(), Ok(fenced)), ("b".into(), Ok(b))],
    );
    assert_eq!(merged.groups[0].owner.as_deref(), Some("b"));
}

#[test]
fn groups_this_site_has_no_part_in_are_listed() {
    let merged = merge(site("z", vec![]), vec![("a".into(), Ok(primary_a(2)))]);
    let g = &merged.groups[0];
    assert_eq!(
        (g.role, g.member, g.owner.as_deref()),
        (Role::Down, Some(false), Some("a"))
    );
}

#[test]
fn the_pinned_fields_stay() {
    let merged = merge(
        replica_site("b", 3, "a"),
        vec![("a".into(), Ok(primary_a(3)))],
    );
    let v = serde_json::to_value(&merged).unwrap();
    assert_eq!(v["site"], "b");
    let g = &v["groups"][0];
    for key in [
        "name", "role", "epoch", "primary", "mode", "replicas", "owner",
    ] {
        assert!(g.get(key).is_some(), "{key}");
    }
    for key in ["site", "state", "lag_bytes", "lag_seconds", "since"] {
        assert!(g["replicas"][0].get(key).is_some(), "{key}");
    }
    assert_eq!(v["sites"][1]["name"], "a");
    // And it reads back.
    let back: SiteStatus = serde_json::from_value(v).unwrap();
    assert_eq!(back, merged);
}

#[test]
fn the_tracker_keeps_since_until_the_state_changes() {
    let t = Tracker::default();
    let t0 = Instant::now();
    let at = |s: u64| (t0 + Duration::from_secs(s), 1_000_000 + s * 1000);
    let (i, ms) = at(0);
    let o = t.observe("g", "b", ReplicaState::Streaming, None, i, ms);
    assert_eq!(o.since_ms, 1_000_000);
    let (i, ms) = at(5);
    let o = t.observe("g", "b", ReplicaState::Streaming, None, i, ms);
    assert_eq!(o.since_ms, 1_000_000, "same state: same since");
    let (i, ms) = at(7);
    let o = t.observe("g", "b", ReplicaState::Resyncing, Some((0, 1000)), i, ms);
    assert_eq!((o.since_ms, o.rate), (1_007_000, None));
    let (i, ms) = at(9);
    let o = t.observe("g", "b", ReplicaState::Resyncing, Some((200, 1000)), i, ms);
    assert_eq!(o.since_ms, 1_007_000);
    assert_eq!(o.rate, Some(100.0));
    assert_eq!(o.eta, Some(8.0));
    // Another replica is tracked apart.
    let o = t.observe("g", "c", ReplicaState::Paused, None, i, ms);
    assert_eq!(o.since_ms, 1_009_000);
}

#[test]
fn verify_progress_counts_from_its_start() {
    let t = Tracker::default();
    let t0 = Instant::now();
    assert_eq!(t.verify_progress("g", "b", 10, t0), None);
    t.verify_begins("g", "b", 1000, 4000);
    let p = t.verify_progress("g", "b", 1000, t0).unwrap();
    assert_eq!((p.compared, p.total, p.rate), (0, 4000, None));
    let p = t
        .verify_progress("g", "b", 3000, t0 + Duration::from_secs(2))
        .unwrap();
    assert_eq!((p.compared, p.rate, p.eta), (2000, Some(1000.0), Some(2.0)));
    // Never past the total, never below 0 (a resync restarted the count).
    let p = t
        .verify_progress("g", "b", 99_999, t0 + Duration::from_secs(3))
        .unwrap();
    assert_eq!(p.compared, 4000);
    let p = t
        .verify_progress("g", "b", 5, t0 + Duration::from_secs(4))
        .unwrap();
    assert_eq!(p.compared, 0);
    t.verify_ends("g", "b");
    assert_eq!(t.verify_progress("g", "b", 10, t0), None);
}

#[test]
fn a_replicas_points_come_from_its_own_report() {
    let window = crate::status::PointsWindow {
        oldest: Some("2026-12-06T10:00:00.000Z".into()),
        newest: Some("2026-12-06T10:05:00.250Z".into()),
        count: 301,
    };
    let history = crate::status::HistoryStatus {
        bytes: 1 << 20,
        dropped_bytes: 0,
        held_over_cap: false,
        oldest_ms: None,
    };
    let mut own = replica("chicago", ReplicaState::Streaming, 0);
    own.points = Some(window.clone());
    own.history = Some(history.clone());
    let ny = site(
        "ny",
        vec![group(
            "web01",
            Role::Primary,
            2,
            "ny",
            vec![
                replica("chicago", ReplicaState::Streaming, 0),
                replica("seattle", ReplicaState::Streaming, 0),
            ],
        )],
    );
    let chicago = site(
        "chicago",
        vec![group("web01", Role::Replica, 2, "ny", vec![own])],
    );
    let merged = merge(ny, vec![("chicago".into(), Ok(chicago))]);
    let g = &merged.groups[0];
    let c = g.replicas.iter().find(|r| r.site == "chicago").unwrap();
    assert_eq!(c.reported_by.as_deref(), Some("ny"), "the owner's entry");
    assert_eq!(c.points.as_ref(), Some(&window));
    assert_eq!(c.history.as_ref(), Some(&history));
    // Seattle did not answer: no points are made up for it.
    let s = g.replicas.iter().find(|r| r.site == "seattle").unwrap();
    assert!(s.points.is_none() && s.history.is_none());
}
