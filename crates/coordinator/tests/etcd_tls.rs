//! The etcd backend over TLS and with etcd's user/password
//! authentication, against real etcd processes: one started with
//! `--client-cert-auth --trusted-ca-file --cert-file --key-file` and
//! certificates made by `tandem certs create` (`tandem_tls::certs`), one
//! with authentication enabled through the gateway's JSON API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/etcd.rs"]
mod etcd_cluster;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use etcd_cluster::{EtcdCluster, EtcdOptions, EtcdTlsFiles};
use tandem_coordinator::etcd::{EtcdConfigError, EtcdStore, Login, Security};
use tandem_coordinator::etcd_tls::EtcdTls;
use tandem_coordinator::{Compare, Op, Store, StoreError};

const TIMEOUT: Duration = Duration::from_secs(3);

/// `dir/ca.pem` and, per name, `dir/<name>.pem` and `.key`.
fn certs(dir: &Path, names: &[&str]) {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    tandem_tls::certs::create(dir, &names).unwrap();
}

/// An etcd member serving TLS with the certificate of "localhost" (its
/// SAN), requiring client certificates from `dir`'s CA.
fn tls_etcd(dir: &Path) -> EtcdCluster {
    EtcdCluster::start_with(
        1,
        EtcdOptions {
            tls: Some(EtcdTlsFiles {
                ca: dir.join("ca.pem"),
                cert: dir.join("localhost.pem"),
                key: dir.join("localhost.key"),
            }),
            ..EtcdOptions::default()
        },
    )
}

fn https(etcd: &EtcdCluster) -> Vec<String> {
    vec![format!("https://localhost:{}", etcd.member(0).client_port)]
}

fn store(endpoints: &[String], tls: EtcdTls) -> EtcdStore {
    EtcdStore::secure(
        endpoints,
        TIMEOUT,
        Security {
            tls: Some(tls),
            login: None,
        },
    )
    .unwrap()
}

fn put(key: &str, value: &str, lease: i64) -> Op {
    Op::Put {
        key: key.into(),
        value: value.as_bytes().to_vec(),
        lease,
    }
}

#[test]
fn the_store_works_over_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path(), &["localhost", "chicago"]);
    let etcd = tls_etcd(dir.path());
    let d = dir.path();
    let s = store(
        &https(&etcd),
        EtcdTls::load(
            &d.join("ca.pem"),
            Some((&d.join("chicago.pem"), &d.join("chicago.key"))),
        )
        .unwrap(),
    );
    let lease = s.grant(Duration::from_secs(3)).unwrap();
    assert_eq!(s.keep_alive(lease).unwrap(), Duration::from_secs(3));
    let (won, _) = s
        .txn(
            &[Compare::ModRevision("t/owner".into(), 0)],
            &[put("t/owner", "chicago", lease)],
        )
        .unwrap();
    assert!(won);
    let snap = s.range("t/").unwrap();
    let kv = snap.get("t/owner").unwrap();
    assert_eq!((kv.value.as_slice(), kv.lease), (&b"chicago"[..], lease));
    // A watch over TLS sees a change made by another client.
    let endpoints = https(&etcd);
    let tls = EtcdTls::load(
        &d.join("ca.pem"),
        Some((&d.join("chicago.pem"), &d.join("chicago.key"))),
    )
    .unwrap();
    let writer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        store(&endpoints, tls)
            .txn(&[], &[put("t/other", "x", 0)])
            .unwrap()
    });
    let started = Instant::now();
    s.wait("t/", snap.revision, Duration::from_secs(10))
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "the watch saw no change"
    );
    writer.join().unwrap();
    assert!(s.range("t/").unwrap().get("t/other").is_some());
    s.revoke(lease).unwrap();
    assert!(s.range("t/").unwrap().get("t/owner").is_none());
}

#[test]
fn clients_without_the_right_certificates_are_refused_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path(), &["localhost", "chicago"]);
    let other = tempfile::tempdir().unwrap();
    certs(other.path(), &["chicago"]);
    let etcd = tls_etcd(dir.path());
    let (d, o) = (dir.path(), other.path());
    let refused = |tls: EtcdTls, expect: &str| {
        let result = store(&https(&etcd), tls).range("t/");
        match result {
            Err(StoreError::Unreachable(why)) => {
                assert!(why.contains(expect), "{expect:?} not in: {why}");
            }
            other => panic!("expected a refusal ({expect}), got {other:?}"),
        }
    };
    // No client certificate.
    refused(
        EtcdTls::load(&d.join("ca.pem"), None).unwrap(),
        "etcd refused this client's certificate",
    );
    // A client certificate from another CA.
    refused(
        EtcdTls::load(
            &d.join("ca.pem"),
            Some((&o.join("chicago.pem"), &o.join("chicago.key"))),
        )
        .unwrap(),
        "etcd refused this client's certificate",
    );
    // etcd's certificate checked against another CA.
    refused(
        EtcdTls::load(
            &o.join("ca.pem"),
            Some((&o.join("chicago.pem"), &o.join("chicago.key"))),
        )
        .unwrap(),
        "not signed by the configured CA",
    );
    // etcd's certificate names "localhost", not the address.
    let by_ip = vec![format!("https://127.0.0.1:{}", etcd.member(0).client_port)];
    let result = store(
        &by_ip,
        EtcdTls::load(
            &d.join("ca.pem"),
            Some((&d.join("chicago.pem"), &d.join("chicago.key"))),
        )
        .unwrap(),
    )
    .range("t/");
    assert!(
        matches!(&result, Err(StoreError::Unreachable(why)) if why.contains("does not name the host")),
        "{result:?}"
    );
    // Plain HTTP to the TLS port fails; https without TLS material and a
    // key that is not the certificate's are refused when set up.
    let plain = EtcdStore::new(&[etcd.endpoint(0)], TIMEOUT).unwrap();
    assert!(matches!(
        plain.range("t/"),
        Err(StoreError::Unreachable(_) | StoreError::Protocol(_))
    ));
    assert!(matches!(
        EtcdStore::new(&https(&etcd), TIMEOUT),
        Err(EtcdConfigError::TlsUnsupported(_))
    ));
    let wrong_key = EtcdTls::load(
        &d.join("ca.pem"),
        Some((&d.join("chicago.pem"), &d.join("localhost.key"))),
    );
    assert!(
        matches!(&wrong_key, Err(e) if e.to_string().contains("localhost.key")),
        "{wrong_key:?}"
    );
    let missing = EtcdTls::load(&d.join("nope.pem"), None);
    assert!(
        matches!(&missing, Err(e) if e.to_string().contains("nope.pem") && e.to_string().contains("CA certificate")),
        "{missing:?}"
    );
}

/// Enables authentication with a root user through the gateway.
fn enable_auth(etcd: &EtcdCluster, password: &str) {
    let calls = [
        (
            "/v3/auth/user/add",
            format!(r#"{{"name":"root","password":"{password}"}}"#),
        ),
        ("/v3/auth/role/add", r#"{"name":"root"}"#.to_owned()),
        (
            "/v3/auth/user/grant",
            r#"{"user":"root","role":"root"}"#.to_owned(),
        ),
        ("/v3/auth/enable", "{}".to_owned()),
    ];
    for (path, body) in calls {
        let (status, answer) = etcd.post(0, path, &body).unwrap();
        assert_eq!(status, 200, "{path}: {answer}");
    }
}

fn with_login(etcd: &EtcdCluster, user: &str, password: &str) -> EtcdStore {
    EtcdStore::secure(
        &[etcd.endpoint(0)],
        TIMEOUT,
        Security {
            tls: None,
            login: Some(Login {
                user: user.into(),
                password: password.into(),
            }),
        },
    )
    .unwrap()
}

#[test]
fn a_login_is_used_renewed_when_its_token_expires_and_a_wrong_one_is_refused() {
    let etcd = EtcdCluster::start_with(
        1,
        EtcdOptions {
            auth_token_ttl: Some(2),
            ..EtcdOptions::default()
        },
    );
    enable_auth(&etcd, "s3cret");
    let s = with_login(&etcd, "root", "s3cret");
    let lease = s.grant(Duration::from_secs(5)).unwrap();
    s.txn(&[], &[put("a/owner", "ny", lease)]).unwrap();
    assert!(s.range("a/").unwrap().get("a/owner").is_some());
    // The token expires after 2 s (etcd checks simple tokens every
    // second): every call still works, logging in again by itself.
    let until = Instant::now() + Duration::from_secs(6);
    let mut calls = 0;
    while Instant::now() < until {
        s.keep_alive(lease).unwrap();
        assert!(s.range("a/").unwrap().get("a/owner").is_some());
        calls += 1;
        thread::sleep(Duration::from_millis(500));
    }
    assert!(calls >= 8);
    // A password file as the agent reads it.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), "s3cret\n").unwrap();
    let login = Login::from_file("root", file.path()).unwrap();
    assert_eq!(login.password, "s3cret");
    // Wrong password; no login at all.
    let wrong = with_login(&etcd, "root", "guess").range("a/");
    assert!(
        matches!(&wrong, Err(StoreError::Refused(why)) if why.contains("did not accept the login of user \"root\"")),
        "{wrong:?}"
    );
    let anonymous = EtcdStore::new(&[etcd.endpoint(0)], TIMEOUT)
        .unwrap()
        .range("a/");
    assert!(
        matches!(&anonymous, Err(StoreError::Refused(why)) if why.contains("user name is empty")),
        "{anonymous:?}"
    );
}
