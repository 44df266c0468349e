//! The witness backend end to end: a real witness server on a loopback
//! port, driven through `WitnessClient` (the `Store` every site uses) and
//! through raw HTTP for bad requests.
//!
//! A SIGKILL of a real `tandem witness` process is tested with the binary
//! (crates/tandem); here the server is stopped in-process.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use tandem_coordinator::witness::{self, WitnessClient, WitnessError, WitnessHandle};
use tandem_coordinator::{Compare, LeaseId, Op, Store, StoreError};
use tandem_testkit::wait_until;

const TIMEOUT: Duration = Duration::from_secs(5);

fn start(dir: &Path) -> WitnessHandle {
    witness::serve("127.0.0.1:0", dir, Arc::new(AtomicBool::new(false))).expect("witness starts")
}

fn client_for(handle: &WitnessHandle) -> WitnessClient {
    WitnessClient::plain(&[handle.local_addr().to_string()], "ny", TIMEOUT).expect("client")
}

/// A key of site ny's own (the witness's policy takes any value there).
fn k(name: &str) -> String {
    format!("t/sites/ny/{name}")
}

fn put(key: &str, value: &[u8], lease: LeaseId) -> Op {
    Op::Put {
        key: key.into(),
        value: value.to_vec(),
        lease,
    }
}

fn has_key(store: &dyn Store, key: &str) -> bool {
    store.range(key).expect("range").get(key).is_some()
}

#[test]
fn leased_keys_live_while_kept_alive_and_vanish_after_expiry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = start(dir.path());
    let c = client_for(&w);
    let ttl = Duration::from_millis(600);
    let lease = c.grant(ttl).expect("grant");
    c.txn(&[], &[put(&k("g/owner"), b"ny", lease)])
        .expect("put");

    // Renewed well past one TTL, the key stays.
    let kept_until = Instant::now() + ttl * 3;
    while Instant::now() < kept_until {
        assert_eq!(c.keep_alive(lease).expect("keepalive"), ttl);
        assert!(
            has_key(&c, &k("g/owner")),
            "the key vanished while its lease was renewed"
        );
        // Renewal pacing: what is tested is time passing (three TTLs)
        // with the lease renewed ten times a TTL.
        std::thread::sleep(ttl / 10);
    }

    // Without renewals it goes, not before the TTL.
    let last = Instant::now();
    c.keep_alive(lease).expect("keepalive");
    wait_until(TIMEOUT, "the unrenewed lease's key to vanish", || {
        !has_key(&c, &k("g/owner"))
    });
    assert!(last.elapsed() >= ttl, "expired after {:?}", last.elapsed());
    assert!(matches!(
        c.keep_alive(lease),
        Err(StoreError::LeaseNotFound(id)) if id == lease
    ));
}

#[test]
fn revoking_a_lease_removes_its_keys_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = start(dir.path());
    let c = client_for(&w);
    let lease = c.grant(Duration::from_secs(60)).expect("grant");
    c.txn(
        &[],
        &[
            put(&k("g/owner"), b"ny", lease),
            put(&k("g/epoch"), b"3", 0),
        ],
    )
    .expect("put");
    c.revoke(lease).expect("revoke");
    let snap = c.range(&k("g/")).expect("range");
    assert!(snap.get(&k("g/owner")).is_none());
    assert_eq!(
        snap.get(&k("g/epoch")).expect("unleased key stays").value,
        b"3"
    );
    assert!(matches!(c.revoke(lease), Err(StoreError::LeaseNotFound(_))));
}

#[test]
fn exactly_one_of_two_concurrent_claims_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = start(dir.path());
    let addr = [w.local_addr().to_string()];
    let clients = [
        WitnessClient::plain(&addr, "ny", TIMEOUT).expect("client"),
        WitnessClient::plain(&addr, "chicago", TIMEOUT).expect("client"),
    ];
    for round in 0..20 {
        // Any site may write a group's request key: both race for it.
        let key = format!("t/groups/g{round}/request");
        let barrier = Barrier::new(2);
        let wins: Vec<bool> = std::thread::scope(|s| {
            let claims: Vec<_> = clients
                .iter()
                .zip(["ny", "chicago"])
                .map(|(c, site)| {
                    let (key, barrier) = (&key, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        c.txn(
                            &[Compare::ModRevision(key.clone(), 0)],
                            &[put(key, &request(site), 0)],
                        )
                        .expect("txn")
                        .0
                    })
                })
                .collect();
            claims
                .into_iter()
                .map(|t| t.join().expect("claimer"))
                .collect()
        });
        assert_eq!(
            wins.iter().filter(|&&w| w).count(),
            1,
            "round {round}: {wins:?}"
        );
        let owner = clients[0].range(&key).expect("range");
        let expected = request(if wins[0] { "ny" } else { "chicago" });
        assert_eq!(owner.get(&key).expect("owner").value, expected);
    }
}

/// A request record whose id names `site`.
fn request(site: &str) -> Vec<u8> {
    format!(r#"{{"id":"{site}","kind":"migrate","to":null}}"#).into_bytes()
}

#[test]
fn ranges_revisions_and_values_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = start(dir.path());
    let c = client_for(&w);
    let every_byte: Vec<u8> = (0..=255).collect();
    let (ok, r1) = c
        .txn(
            &[],
            &[
                put(&k("a/2"), &every_byte, 0),
                put(&k("a/1"), b"", 0),
                put(&k("b"), b"x", 0),
            ],
        )
        .expect("txn");
    assert!(ok);
    let (_, r2) = c.txn(&[], &[put(&k("a/2"), b"v2", 0)]).expect("txn");
    assert!(r2 > r1);

    let snap = c.range(&k("a/")).expect("range");
    assert_eq!(snap.revision, r2);
    let keys: Vec<&str> = snap.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, [k("a/1"), k("a/2")]);
    let a2 = snap.get(&k("a/2")).expect("a/2");
    assert_eq!((a2.create_revision, a2.mod_revision), (r1, r2));

    // Binary values, and compares on values.
    c.txn(&[], &[put(&k("a/2"), &every_byte, 0)]).expect("txn");
    assert_eq!(c.range(&k("a/2")).expect("range").kvs[0].value, every_byte);
    let (held, _) = c
        .txn(
            &[Compare::Value(k("a/2"), every_byte.clone())],
            &[Op::Delete { key: k("a/2") }],
        )
        .expect("txn");
    assert!(held);
    let (stale, _) = c
        .txn(
            &[Compare::ModRevision(k("a/1"), r2)],
            &[put(&k("a/1"), b"no", 0)],
        )
        .expect("txn");
    assert!(!stale, "a stale revision must not match");
    assert_eq!(c.range("").expect("range").kvs.len(), 2);
}

#[test]
fn a_put_on_a_missing_lease_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = start(dir.path());
    let c = client_for(&w);
    assert!(matches!(
        c.txn(&[], &[put(&k("k"), b"v", 4242)]),
        Err(StoreError::Refused(_))
    ));
    assert!(c.range("").expect("range").kvs.is_empty());
}

#[test]
fn wait_returns_on_a_change_and_times_out_otherwise() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = start(dir.path());
    let c = client_for(&w);
    let rev = c.range(&k("g/")).expect("range").revision;

    let quiet = Duration::from_millis(300);
    let t = Instant::now();
    c.wait(&k("g/"), rev, quiet).expect("wait");
    assert!(t.elapsed() >= quiet, "returned after {:?}", t.elapsed());

    let writer = client_for(&w);
    std::thread::scope(|s| {
        let waiter = s.spawn(|| c.wait(&k("g/"), rev, Duration::from_secs(20)));
        // Only a change made while the wait is held on the witness shows
        // that a change wakes it (a change made before it arrived would
        // answer it at once).
        wait_until(TIMEOUT, "the witness to hold the wait", || w.waiting() == 1);
        let t = Instant::now();
        writer
            .txn(&[], &[put(&k("g/owner"), b"ny", 0)])
            .expect("put");
        waiter.join().expect("waiter").expect("wait");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "woke {:?} after the change",
            t.elapsed()
        );
    });

    // Already past: immediate.
    let t = Instant::now();
    c.wait(&k("g/"), rev, Duration::from_secs(20))
        .expect("wait");
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[test]
fn long_polls_do_not_hold_up_lease_renewals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = start(dir.path());
    let c = client_for(&w);
    let rev = c.range("").expect("range").revision;
    let lease = c.grant(Duration::from_secs(10)).expect("grant");
    let rev = rev.max(c.range("").expect("range").revision);
    std::thread::scope(|s| {
        let waiters: Vec<_> = (0..16)
            .map(|_| {
                let c = client_for(&w);
                s.spawn(move || c.wait(&k("quiet/"), rev, Duration::from_secs(20)))
            })
            .collect();
        wait_until(TIMEOUT, "the witness to hold 16 long polls", || {
            w.waiting() == 16
        });
        let t = Instant::now();
        c.keep_alive(lease).expect("keepalive");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "took {:?}",
            t.elapsed()
        );
        assert_eq!(
            w.waiting(),
            16,
            "the renewal was not served while every long poll was held"
        );
        // A change ends the long polls.
        c.txn(&[], &[put(&k("quiet/done"), b"1", 0)]).expect("put");
        for waiter in waiters {
            waiter.join().expect("waiter").expect("wait");
        }
    });
}

#[test]
fn state_survives_a_restart_and_leases_get_a_full_ttl_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ttl = Duration::from_millis(1000);
    let (lease, revision) = {
        let w = start(dir.path());
        let c = client_for(&w);
        let granted = Instant::now();
        let lease = c.grant(ttl).expect("grant");
        c.txn(
            &[],
            &[
                put(&k("g/epoch"), b"7", 0),
                put(&k("g/owner"), b"ny", lease),
            ],
        )
        .expect("put");
        let revision = c.range("").expect("range").revision;
        // Most of the TTL is used up before the stop: without a fresh TTL
        // at restart the key would vanish moments after it. Time passing
        // is what is tested here (bounded by the TTL).
        std::thread::sleep((ttl * 9 / 10).saturating_sub(granted.elapsed()));
        w.shutdown();
        (lease, revision)
    };

    let w = start(dir.path());
    let restarted = Instant::now();
    let c = client_for(&w);
    let snap = c.range(&k("g/")).expect("range");
    assert_eq!(snap.revision, revision);
    assert_eq!(snap.get(&k("g/epoch")).expect("epoch").value, b"7");
    assert_eq!(snap.get(&k("g/owner")).expect("leased key").lease, lease);
    assert!(
        c.grant(ttl).expect("grant") > lease,
        "a lease id was handed out twice"
    );

    let mut last_seen = restarted;
    wait_until(TIMEOUT, "the restored lease's key to vanish", || {
        let seen = Instant::now();
        let present = has_key(&c, &k("g/owner"));
        if present {
            last_seen = seen;
        }
        !present
    });
    assert!(
        last_seen - restarted >= ttl / 2,
        "the restored lease expired {:?} after the restart, not a full TTL",
        last_seen - restarted
    );
    assert!(has_key(&c, &k("g/epoch")));
}

#[test]
fn every_answered_change_is_on_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = start(dir.path());
    let c = client_for(&w);
    let (_, revision) = c.txn(&[], &[put(&k("g/epoch"), b"9", 0)]).expect("put");
    let text = std::fs::read_to_string(dir.path().join(witness::STATE_FILE)).expect("state file");
    let file: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(file["state"]["revision"], revision);
    assert_eq!(
        file["state"]["keys"][k("g/epoch").as_str()]["value"],
        serde_json::json!([57])
    );
    assert_eq!(file["witness_id"], w.witness_id());
}

#[test]
fn a_witness_that_cannot_write_its_state_answers_nothing_more() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = start(dir.path());
    let c = client_for(&w);
    let (_, kept) = c.txn(&[], &[put(&k("g/epoch"), b"1", 0)]).expect("put");
    // The next write's temporary file cannot be created.
    let temp = dir.path().join("witness.json.tmp");
    std::fs::create_dir(&temp).expect("mkdir");
    assert!(matches!(
        c.txn(&[], &[put(&k("g/epoch"), b"2", 0)]),
        Err(StoreError::Unreachable(_))
    ));
    // Memory is now ahead of the disk: not even reads are answered.
    assert!(matches!(c.range(&k("g/")), Err(StoreError::Unreachable(_))));
    let failure = w.failure().expect("failed");
    assert!(
        matches!(&failure, tandem_coordinator::memory::PersistError::Write { path, .. } if path.ends_with("witness.json")),
        "{failure}"
    );
    w.shutdown();

    std::fs::remove_dir(&temp).expect("rmdir");
    let w = start(dir.path());
    let snap = client_for(&w).range(&k("g/")).expect("range");
    assert_eq!(snap.revision, kept);
    assert_eq!(snap.get(&k("g/epoch")).expect("epoch").value, b"1");
}

#[test]
fn a_second_witness_cannot_share_a_data_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _w = start(dir.path());
    let second = witness::serve("127.0.0.1:0", dir.path(), Arc::new(AtomicBool::new(false)));
    match second {
        Err(e @ WitnessError::Locked { .. }) => {
            assert!(e.to_string().contains(witness::LOCK_FILE), "{e}")
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("two witnesses on one data directory"),
    }
}

#[test]
fn a_corrupt_state_file_is_refused_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(start(dir.path()));
    let path = dir.path().join(witness::STATE_FILE);
    let good = std::fs::read(&path).expect("state file");
    let dangling = String::from_utf8_lossy(&good).replace(
        r#""keys":{}"#,
        r#""keys":{"g/owner":{"value":[1],"mod_revision":1,"create_revision":1,"lease":9}}"#,
    );
    for bad in [
        b"{not json".to_vec(),
        good[..good.len() / 2].to_vec(),
        Vec::new(),
        dangling.into_bytes(),
    ] {
        std::fs::write(&path, &bad).expect("write");
        match witness::serve("127.0.0.1:0", dir.path(), Arc::new(AtomicBool::new(false))) {
            Err(e @ WitnessError::Corrupt { .. }) => {
                assert!(e.to_string().contains(&path.display().to_string()), "{e}")
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("started on {:?}", String::from_utf8_lossy(&bad)),
        }
        assert_eq!(
            std::fs::read(&path).expect("kept"),
            bad,
            "the bad file was touched"
        );
    }
}

/// Sends raw bytes, returns the status code and the answer.
fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    s.write_all(request).expect("send");
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    // The witness closes after refusing; for a good request stop at the
    // end of the body.
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
        }
        let text = String::from_utf8_lossy(&answer);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if len.is_some_and(|len| body.len() >= len) {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: w\r\nTandem-Site: ny\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn bad_requests_get_4xx_and_the_witness_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = start(dir.path());
    let addr = w.local_addr();
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (post("/v1/txn", "{not json"), 400, "bad_request"),
        (post("/v1/grant", r#"{"ttl_ms":0}"#), 400, "ttl_ms"),
        (post("/v1/grant", r#"{"ttl":5}"#), 400, "unknown field"),
        (
            post(
                "/v1/txn",
                r#"{"ops":[{"kind":"put","key":"t/sites/ny/k","value":"!!"}]}"#,
            ),
            400,
            "base64",
        ),
        (post("/v1/nope", "{}"), 404, "no such endpoint"),
        (
            b"GET /v1/txn HTTP/1.1\r\nHost: w\r\nTandem-Site: ny\r\n\r\n".to_vec(),
            405,
            "POST",
        ),
        // With TLS off a request names its site; without, it is refused.
        (
            b"POST /v1/range HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            403,
            "no_identity",
        ),
        (
            b"POST /v1/range HTTP/1.1\r\nTandem-Site: a/b\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            403,
            "no_identity",
        ),
        (
            post("/v1/keepalive", r#"{"id":777}"#),
            404,
            "lease_not_found",
        ),
        (
            b"POST /v1/txn HTTP/1.1\r\nContent-Length: 2097152\r\n\r\n{".to_vec(),
            413,
            "too_large",
        ),
        (
            b"POST /v1/txn HTTP/1.1\r\nContent-Length: 100000000000000\r\n\r\n".to_vec(),
            413,
            "too_large",
        ),
        (
            b"POST /v1/txn HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            400,
            "Content-Length",
        ),
        (b"HELLO\r\n\r\n".to_vec(), 400, "request line"),
        (
            format!("GET /{} HTTP/1.1\r\n\r\n", "x".repeat(20_000)).into_bytes(),
            431,
            "head",
        ),
    ];
    for (request, status, needle) in cases {
        let (got, text) = raw(addr, &request);
        let text: String = text.chars().take(400).collect();
        let shown = String::from_utf8_lossy(&request[..request.len().min(60)]).into_owned();
        assert_eq!(got, status, "{shown:?} -> {text}");
        assert!(text.contains(needle), "{shown:?} -> {text}");
    }
    // Still serving, good requests included.
    let (ok, text) = raw(addr, &post("/v1/range", r#"{"prefix":""}"#));
    assert_eq!(ok, 200, "{text}");
    assert!(text.contains(witness::wire::WITNESS_HEADER), "{text}");
    let c = client_for(&w);
    c.txn(&[], &[put(&k("still"), b"here", 0)]).expect("txn");
    assert!(has_key(&c, &k("still")));
}

#[test]
fn a_slow_request_times_out_without_holding_others_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = witness::Limits {
        request_time: Duration::from_millis(300),
        ..witness::Limits::default()
    };
    let w = witness::serve_with(
        "127.0.0.1:0",
        dir.path(),
        Arc::new(AtomicBool::new(false)),
        limits,
    )
    .expect("witness starts");
    let mut slow = TcpStream::connect(w.local_addr()).expect("connect");
    slow.write_all(b"POST /v1/range HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
        .expect("send");
    let c = client_for(&w);
    c.range("").expect("others are served meanwhile");
    slow.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut answer = String::new();
    let _ = slow.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

#[test]
fn idle_strangers_make_room_and_sites_are_still_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = witness::Limits {
        max_unauthenticated: 2,
        ..witness::Limits::default()
    };
    let w = witness::serve_with(
        "127.0.0.1:0",
        dir.path(),
        Arc::new(AtomicBool::new(false)),
        limits,
    )
    .expect("witness starts");
    let mut idle: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(w.local_addr()).expect("connect"))
        .collect();
    // A site is served although every stranger's slot is taken: the
    // oldest stranger is closed for it.
    let c = client_for(&w);
    c.range("").expect("served");
    let oldest = &mut idle[0];
    oldest.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut byte = [0u8; 1];
    assert_eq!(
        oldest.read(&mut byte).expect("closed"),
        0,
        "the oldest idle stranger was kept"
    );
    // The site's connection keeps its slot while strangers keep coming.
    let more: Vec<TcpStream> = (0..10)
        .map(|_| TcpStream::connect(w.local_addr()).expect("connect"))
        .collect();
    let t = Instant::now();
    c.range("").expect("still served");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
    drop(more);
}

#[test]
fn the_client_moves_to_the_next_endpoint_only_when_it_cannot_connect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = start(dir.path());
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let c =
        WitnessClient::plain(&[closed, w.local_addr().to_string()], "ny", TIMEOUT).expect("client");
    c.txn(&[], &[put(&k("k"), b"v", 0)])
        .expect("second endpoint answers");
    assert_eq!(c.witness_id().as_deref(), Some(w.witness_id()));
}

#[test]
fn the_client_refuses_a_different_witness() {
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let a = start(dir_a.path());
    let b = start(dir_b.path());
    let endpoints = [a.local_addr().to_string(), b.local_addr().to_string()];
    let c = WitnessClient::plain(&endpoints, "ny", TIMEOUT).expect("client");
    c.range("").expect("a answers");
    a.shutdown();
    match c.range("") {
        Err(StoreError::Protocol(msg)) => assert!(msg.contains(b.witness_id()), "{msg}"),
        other => panic!("mixed two witnesses: {other:?}"),
    }
}

#[test]
fn an_unresponsive_witness_is_unreachable_within_the_timeout() {
    // Accepts connections (the kernel does) but never answers.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let timeout = Duration::from_millis(400);
    let c = WitnessClient::plain(
        &[silent.local_addr().expect("addr").to_string()],
        "ny",
        timeout,
    )
    .expect("client");
    let t = Instant::now();
    assert!(matches!(c.range(""), Err(StoreError::Unreachable(_))));
    assert!(matches!(
        c.wait("", 0, Duration::from_millis(200)),
        Err(StoreError::Unreachable(_))
    ));
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );

    let gone = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let c = WitnessClient::plain(&[gone], "ny", timeout).expect("client");
    assert!(matches!(c.grant(timeout), Err(StoreError::Unreachable(_))));
}

#[test]
fn a_stopped_witness_answers_nothing_and_frees_its_port_and_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stop = Arc::new(AtomicBool::new(false));
    let w = witness::serve("127.0.0.1:0", dir.path(), Arc::clone(&stop)).expect("starts");
    let addr = w.local_addr();
    let c = client_for(&w);
    c.range("").expect("serving");
    stop.store(true, std::sync::atomic::Ordering::Release);
    assert!(!w.is_serving());
    w.shutdown();
    assert!(c.range("").is_err());
    let again = witness::serve(
        &addr.to_string(),
        dir.path(),
        Arc::new(AtomicBool::new(false)),
    )
    .expect("same port and directory again");
    drop(again);
}

#[test]
fn bad_endpoints_are_refused_up_front() {
    assert!(WitnessClient::plain(&[], "ny", TIMEOUT).is_err());
    assert!(WitnessClient::plain(&["https://w:7460".into()], "ny", TIMEOUT).is_err());
    assert!(WitnessClient::plain(&["w".into()], "ny", TIMEOUT).is_err());
}
