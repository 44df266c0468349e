//! The etcd coordinator backend against real etcd processes (SPEC §5):
//! the whole `Store` contract on one member, endpoint failover and
//! bounded failure on a three-member cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/etcd.rs"]
mod etcd_cluster;

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use etcd_cluster::EtcdCluster;
use tandem_coordinator::etcd::{EtcdConfigError, EtcdStore};
use tandem_coordinator::{Compare, LeaseId, Op, Store, StoreError};
use tandem_testkit::wait_until;

const TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on etcd taking up or dropping a watch.
const WATCH_WAIT: Duration = Duration::from_secs(10);

fn store(etcd: &EtcdCluster) -> EtcdStore {
    EtcdStore::new(&etcd.endpoints(), TIMEOUT).unwrap()
}

fn put(key: &str, value: &str, lease: LeaseId) -> Op {
    Op::Put {
        key: key.into(),
        value: value.as_bytes().to_vec(),
        lease,
    }
}

#[test]
fn leases_are_granted_renewed_and_revoked() {
    let etcd = EtcdCluster::single();
    let s = store(&etcd);
    let lease = s.grant(Duration::from_millis(1500)).unwrap();
    assert_ne!(lease, 0);
    // 1.5 s rounds up to 2 s, which is also etcd's minimum with its
    // default election timeout.
    assert_eq!(s.keep_alive(lease).unwrap(), Duration::from_secs(2));
    let (ok, _) = s.txn(&[], &[put("l/owner", "ny", lease)]).unwrap();
    assert!(ok);
    let snap = s.range("l/").unwrap();
    assert_eq!(snap.get("l/owner").unwrap().lease, lease);
    s.revoke(lease).unwrap();
    assert!(s.range("l/").unwrap().kvs.is_empty());
    assert!(matches!(s.keep_alive(lease), Err(StoreError::LeaseNotFound(l)) if l == lease));
    assert!(matches!(s.revoke(lease), Err(StoreError::LeaseNotFound(l)) if l == lease));
}

#[test]
fn a_leased_key_vanishes_when_its_lease_expires_and_the_lease_is_refused_after() {
    let etcd = EtcdCluster::single();
    let s = store(&etcd);
    let lease = s.grant(Duration::from_secs(1)).unwrap();
    let granted = Instant::now();
    s.txn(&[], &[put("x/owner", "ny", lease)]).unwrap();
    assert!(s.range("x/").unwrap().get("x/owner").is_some());
    wait_until(
        Duration::from_secs(10),
        "the leased key to vanish with its lease",
        || s.range("x/").unwrap().kvs.is_empty(),
    );
    // etcd raised the 1 s TTL to its 2 s minimum.
    assert!(granted.elapsed() >= Duration::from_millis(1500));
    assert!(matches!(
        s.keep_alive(lease),
        Err(StoreError::LeaseNotFound(l)) if l == lease
    ));
    assert!(matches!(
        s.txn(&[], &[put("x/owner", "ny", lease)]),
        Err(StoreError::Refused(_))
    ));
    assert!(s.range("x/").unwrap().kvs.is_empty());
}

#[test]
fn a_put_naming_an_unknown_lease_is_refused() {
    let etcd = EtcdCluster::single();
    let s = store(&etcd);
    let before = s.range("").unwrap().revision;
    let result = s.txn(
        &[Compare::ModRevision("k".into(), 0)],
        &[put("k", "v", 0x4242)],
    );
    assert!(matches!(result, Err(StoreError::Refused(_))), "{result:?}");
    let after = s.range("").unwrap();
    assert!(after.kvs.is_empty());
    assert_eq!(after.revision, before);
}

#[test]
fn exactly_one_of_two_concurrent_claimers_wins() {
    let etcd = EtcdCluster::single();
    let sites = ["chicago", "seattle"];
    for round in 0..10 {
        let key = format!("claims/g{round}/owner");
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = sites
            .iter()
            .map(|site| {
                let s = store(&etcd);
                let key = key.clone();
                let barrier = barrier.clone();
                let site = site.to_string();
                thread::spawn(move || {
                    let lease = s.grant(Duration::from_secs(5)).unwrap();
                    barrier.wait();
                    let (won, _) = s
                        .txn(
                            &[Compare::ModRevision(key.clone(), 0)],
                            &[put(&key, &site, lease)],
                        )
                        .unwrap();
                    (site, won)
                })
            })
            .collect();
        let results: Vec<(String, bool)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let winners: Vec<&String> = results.iter().filter(|r| r.1).map(|r| &r.0).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        let snap = store(&etcd).range(&format!("claims/g{round}/")).unwrap();
        assert_eq!(snap.get(&key).unwrap().value, winners[0].as_bytes());
    }
}

#[test]
fn revisions_grow_and_compares_see_them() {
    let etcd = EtcdCluster::single();
    let s = store(&etcd);
    let (ok, r1) = s.txn(&[], &[put("r/k", "1", 0)]).unwrap();
    assert!(ok);
    let (_, r2) = s.txn(&[], &[put("r/k", "2", 0)]).unwrap();
    assert!(r2 > r1);
    let snap = s.range("r/").unwrap();
    assert_eq!(snap.revision, r2);
    let kv = snap.get("r/k").unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision, kv.lease), (r1, r2, 0));
    assert_eq!(kv.value, b"2");

    // A stale revision does not match, the current one does.
    let del = Op::Delete { key: "r/k".into() };
    let (ok, rev) = s
        .txn(
            &[Compare::ModRevision("r/k".into(), r1)],
            std::slice::from_ref(&del),
        )
        .unwrap();
    assert!(!ok);
    assert_eq!(rev, r2, "a failed compare changes nothing");
    let (ok, _) = s
        .txn(
            &[
                Compare::ModRevision("r/k".into(), r2),
                Compare::Value("r/k".into(), b"2".to_vec()),
            ],
            &[put("r/k", "3", 0), put("r/other", "x", 0)],
        )
        .unwrap();
    assert!(ok);
    let (ok, _) = s
        .txn(
            &[Compare::Value("r/k".into(), b"2".to_vec())],
            std::slice::from_ref(&del),
        )
        .unwrap();
    assert!(!ok, "the value changed");
    let (ok, r4) = s
        .txn(&[Compare::Value("r/k".into(), b"3".to_vec())], &[del])
        .unwrap();
    assert!(ok);
    let snap = s.range("r/").unwrap();
    assert_eq!(snap.revision, r4);
    assert_eq!(
        snap.kvs
            .iter()
            .map(|kv| kv.key.as_str())
            .collect::<Vec<_>>(),
        ["r/other"]
    );
    // A missing key has mod revision 0 and no value.
    assert!(
        s.txn(&[Compare::ModRevision("r/k".into(), 0)], &[])
            .unwrap()
            .0
    );
    assert!(
        !s.txn(&[Compare::Value("r/k".into(), Vec::new())], &[])
            .unwrap()
            .0
    );
    // A transaction without changes answers the current revision.
    assert_eq!(s.txn(&[], &[]).unwrap(), (true, r4));
}

#[test]
fn wait_returns_on_a_change_and_times_out_otherwise() {
    let etcd = EtcdCluster::single();
    let s = Arc::new(store(&etcd));
    s.txn(&[], &[put("w/a", "1", 0)]).unwrap();
    let rev = s.range("w/").unwrap().revision;

    // Nothing changes under the prefix: the wait lasts its timeout, even
    // though a key under another prefix changes.
    s.txn(&[], &[put("elsewhere/a", "1", 0)]).unwrap();
    let t = Instant::now();
    s.wait("w/", rev, Duration::from_millis(400)).unwrap();
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(400), "{waited:?}");
    assert!(waited < Duration::from_secs(2), "{waited:?}");

    // A change made while etcd holds the wait (a watch) ends the wait.
    wait_until(WATCH_WAIT, "etcd to drop the timed-out watch", || {
        etcd.watchers(0) == Some(0)
    });
    let waiter = {
        let s = s.clone();
        thread::spawn(move || {
            s.wait("w/", rev, Duration::from_secs(10)).unwrap();
            Instant::now()
        })
    };
    wait_until(WATCH_WAIT, "etcd to hold the wait as a watch", || {
        etcd.watchers(0) == Some(1)
    });
    let changed = Instant::now();
    let (_, rev_b) = s.txn(&[], &[put("w/b", "2", 0)]).unwrap();
    let woke = waiter.join().unwrap();
    let after = woke.saturating_duration_since(changed);
    assert!(
        after < Duration::from_secs(5),
        "woke {after:?} after the change"
    );

    // A change that already happened answers at once.
    let t = Instant::now();
    s.wait("w/", rev, Duration::from_secs(10)).unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // A key vanishing with its lease is a change.
    let lease = s.grant(Duration::from_secs(1)).unwrap();
    let (_, rev_l) = s.txn(&[], &[put("w/leased", "x", lease)]).unwrap();
    assert!(rev_l > rev_b);
    let t = Instant::now();
    s.wait("w/", rev_l, Duration::from_secs(10)).unwrap();
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    assert!(s.range("w/").unwrap().get("w/leased").is_none());
}

#[test]
fn wait_on_a_compacted_revision_answers_at_once() {
    let etcd = EtcdCluster::single();
    let s = store(&etcd);
    for i in 0..5 {
        s.txn(&[], &[put("c/k", &i.to_string(), 0)]).unwrap();
    }
    let rev = s.range("c/").unwrap().revision;
    let (status, body) = etcd
        .post(
            0,
            "/v3/kv/compaction",
            &format!("{{\"revision\":\"{rev}\"}}"),
        )
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let t = Instant::now();
    s.wait("c/", 1, Duration::from_secs(10)).unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[test]
fn key_prefixes_are_isolated() {
    let etcd = EtcdCluster::single();
    let s = store(&etcd);
    s.txn(
        &[],
        &[
            put("/prod/tandem/web01/owner", "ny", 0),
            put("/prod/tandem-other/web01/owner", "seattle", 0),
            put("/prod/tandem0", "x", 0),
            put("/test/tandem/web01/owner", "chicago", 0),
        ],
    )
    .unwrap();
    let keys = |prefix: &str| -> Vec<String> {
        s.range(prefix)
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| kv.key)
            .collect()
    };
    assert_eq!(keys("/prod/tandem/"), ["/prod/tandem/web01/owner"]);
    assert_eq!(keys("/test/tandem/"), ["/test/tandem/web01/owner"]);
    assert_eq!(
        keys("/prod/tandem"),
        [
            "/prod/tandem-other/web01/owner",
            "/prod/tandem/web01/owner",
            "/prod/tandem0"
        ]
    );
    assert_eq!(keys("").len(), 4);
    // A claim under one prefix does not see the other's owner.
    let (won, _) = s
        .txn(
            &[Compare::ModRevision("/test/tandem/web02/owner".into(), 0)],
            &[put("/test/tandem/web02/owner", "chicago", 0)],
        )
        .unwrap();
    assert!(won);
    assert_eq!(keys("/prod/tandem/"), ["/prod/tandem/web01/owner"]);
    // A wait under one prefix does not wake for the other.
    let rev = s.range("/prod/tandem/").unwrap().revision;
    s.txn(&[], &[put("/test/tandem/web01/owner", "ny", 0)])
        .unwrap();
    let t = Instant::now();
    s.wait("/prod/tandem/", rev, Duration::from_millis(300))
        .unwrap();
    assert!(t.elapsed() >= Duration::from_millis(300));
}

#[test]
fn endpoint_configuration_is_checked() {
    let t = Duration::from_secs(1);
    assert!(matches!(
        EtcdStore::new(&[], t),
        Err(EtcdConfigError::NoEndpoints)
    ));
    assert!(matches!(
        EtcdStore::new(&["https://etcd:2379".into()], t),
        Err(EtcdConfigError::TlsUnsupported(_))
    ));
    assert!(matches!(
        EtcdStore::new(&["etcd".into()], t),
        Err(EtcdConfigError::BadEndpoint(_))
    ));
    assert!(matches!(
        EtcdStore::new(&["etcd:2379".into()], Duration::ZERO),
        Err(EtcdConfigError::ZeroTimeout)
    ));
    let s = EtcdStore::new(&["10.0.3.1:2379".into(), "http://etcd:2379/".into()], t).unwrap();
    assert_eq!(s.endpoints(), ["http://10.0.3.1:2379", "http://etcd:2379"]);
}

#[test]
fn unreachable_endpoints_fail_fast() {
    // Ports with nothing listening.
    let ports: Vec<String> = (0..2)
        .map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        })
        .collect();
    let s = EtcdStore::new(&ports, Duration::from_secs(2)).unwrap();
    let t = Instant::now();
    assert!(matches!(s.range("a/"), Err(StoreError::Unreachable(_))));
    assert!(matches!(
        s.grant(Duration::from_secs(3)),
        Err(StoreError::Unreachable(_))
    ));
    assert!(matches!(s.keep_alive(7), Err(StoreError::Unreachable(_))));
    assert!(matches!(
        s.txn(&[], &[put("a", "b", 0)]),
        Err(StoreError::Unreachable(_))
    ));
    assert!(matches!(
        s.wait("a/", 1, Duration::from_secs(5)),
        Err(StoreError::Unreachable(_))
    ));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let Err(e) = s.range("a/") else {
        unreachable!()
    };
    let msg = e.to_string();
    assert!(msg.contains(&ports[0]) && msg.contains(&ports[1]), "{msg}");
}

/// A fake etcd answering `body` with `status` to every request.
fn fake_etcd(answers: Vec<(u16, &'static str)>) -> (String, thread::JoinHandle<()>) {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let addr = server.server_addr().to_ip().unwrap().to_string();
    let handle = thread::spawn(move || {
        for (status, body) in answers {
            let Ok(req) = server.recv() else { return };
            let _ = req.respond(tiny_http::Response::from_string(body).with_status_code(status));
        }
    });
    (addr, handle)
}

#[test]
fn answers_etcd_would_not_give_are_protocol_errors() {
    let (addr, server) = fake_etcd(vec![
        (200, "this is not json"),
        (200, r#"{"header":{"revision":"seven"}}"#),
        (200, r#"{"header":{"revision":"3"},"kvs":[{"key":"%%%"}]}"#),
        (
            200,
            r#"{"header":{"revision":"3"},"kvs":[{"key":"/w==","value":""}]}"#,
        ),
        (200, r#"{"header":{"revision":"3"}}"#),
        (200, r#"{"result":{"header":{}}}"#),
        (
            400,
            r#"{"error":"etcdserver: key is not provided","code":3}"#,
        ),
    ]);
    let s = EtcdStore::new(&[addr], Duration::from_secs(2)).unwrap();
    for _ in 0..4 {
        assert!(matches!(s.range("a/"), Err(StoreError::Protocol(_))));
    }
    // A grant answer without a lease id.
    assert!(matches!(
        s.grant(Duration::from_secs(1)),
        Err(StoreError::Protocol(_))
    ));
    // A keep-alive answer without a TTL: the lease is gone.
    assert!(matches!(s.keep_alive(5), Err(StoreError::LeaseNotFound(5))));
    let e = s.txn(&[], &[]).unwrap_err();
    assert!(
        matches!(&e, StoreError::Protocol(m) if m.contains("key is not provided")),
        "{e}"
    );
    server.join().unwrap();
}

#[test]
fn a_three_member_cluster_keeps_working_with_one_member_killed() {
    let mut etcd = EtcdCluster::three();
    let leader = etcd
        .wait_leader(Duration::from_secs(10))
        .expect("no leader");
    // The client prefers the leader, which is killed: the hardest case.
    let mut endpoints = vec![etcd.endpoint(leader)];
    endpoints.extend((0..3).filter(|&i| i != leader).map(|i| etcd.endpoint(i)));
    let timeout = Duration::from_secs(5);
    let s = EtcdStore::new(&endpoints, timeout).unwrap();
    let lease = s.grant(Duration::from_secs(5)).unwrap();
    let (won, _) = s
        .txn(
            &[Compare::ModRevision("g/web01/owner".into(), 0)],
            &[put("g/web01/owner", "ny", lease)],
        )
        .unwrap();
    assert!(won);

    etcd.kill(leader);

    let t = Instant::now();
    let ttl = s.keep_alive(lease).unwrap();
    assert_eq!(ttl, Duration::from_secs(5));
    eprintln!("keep-alive after the leader's death took {:?}", t.elapsed());
    assert!(t.elapsed() <= timeout + Duration::from_millis(500));
    let t = Instant::now();
    let (won, _) = s
        .txn(
            &[Compare::ModRevision("g/web02/owner".into(), 0)],
            &[put("g/web02/owner", "ny", lease)],
        )
        .unwrap();
    assert!(won);
    eprintln!("claim after the leader's death took {:?}", t.elapsed());
    assert!(t.elapsed() <= timeout + Duration::from_millis(500));
    let (won, _) = s
        .txn(
            &[Compare::ModRevision("g/web01/owner".into(), 0)],
            &[put("g/web01/owner", "chicago", 0)],
        )
        .unwrap();
    assert!(!won, "web01 is owned already");
    let snap = s.range("g/").unwrap();
    assert_eq!(snap.kvs.len(), 2);
    assert_eq!(snap.get("g/web01/owner").unwrap().value, b"ny");

    // The killed member comes back and catches up.
    etcd.restart(leader);
    let only_it = EtcdStore::new(&[etcd.endpoint(leader)], timeout).unwrap();
    let snap = only_it.range("g/").unwrap();
    assert_eq!(snap.kvs.len(), 2);
    only_it.keep_alive(lease).unwrap();
}

type Call<'a> = Box<dyn Fn() -> Result<(), StoreError> + 'a>;

#[test]
fn without_quorum_calls_fail_within_the_request_timeout() {
    let mut etcd = EtcdCluster::three();
    let timeout = Duration::from_secs(1);
    let bound = timeout + Duration::from_millis(500);
    let s = EtcdStore::new(&etcd.endpoints(), timeout).unwrap();
    let lease = s.grant(Duration::from_secs(10)).unwrap();
    let (_, rev) = s.txn(&[], &[put("q/owner", "ny", lease)]).unwrap();

    etcd.kill(1);
    etcd.kill(2);

    // Right after the kill the survivor may still believe in a leader and
    // let requests hang; later it answers "no leader" at once. Either way
    // every call ends within the request timeout.
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut rounds = 0;
    while Instant::now() < deadline || rounds < 2 {
        rounds += 1;
        let calls: Vec<(&str, Call)> = vec![
            ("range", Box::new(|| s.range("q/").map(drop))),
            (
                "txn",
                Box::new(|| s.txn(&[], &[put("q/x", "1", 0)]).map(drop)),
            ),
            (
                "grant",
                Box::new(|| s.grant(Duration::from_secs(3)).map(drop)),
            ),
            ("keep_alive", Box::new(|| s.keep_alive(lease).map(drop))),
            ("revoke", Box::new(|| s.revoke(lease))),
        ];
        for (name, call) in calls {
            let t = Instant::now();
            let result = call();
            let took = t.elapsed();
            if rounds == 1 || took > Duration::from_millis(100) {
                eprintln!("round {rounds}: {name} failed after {took:?}: {result:?}");
            }
            assert!(
                matches!(result, Err(StoreError::Unreachable(_))),
                "{name}: {result:?}"
            );
            assert!(took <= bound, "{name} took {took:?}");
        }
        let t = Instant::now();
        let result = s.wait("q/", rev, Duration::from_millis(800));
        assert!(
            matches!(result, Ok(()) | Err(StoreError::Unreachable(_))),
            "{result:?}"
        );
        assert!(t.elapsed() <= bound, "wait took {:?}", t.elapsed());
        // Pacing, not synchronisation: the calls are spread over the
        // seconds after the kill, which is what is tested.
        thread::sleep(Duration::from_millis(100));
    }

    // Quorum is back with a second member: calls succeed again.
    etcd.restart(1);
    wait_until(
        Duration::from_secs(15),
        "an answer after quorum came back",
        || s.range("q/").is_ok(),
    );
    s.keep_alive(lease).unwrap();
    assert_eq!(s.range("q/").unwrap().get("q/owner").unwrap().value, b"ny");
}
