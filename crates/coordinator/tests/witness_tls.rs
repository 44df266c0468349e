//! The witness with identities, over real TCP and TLS with certificates
//! from `certs::create` (issue 10's probes): a site acts only for itself,
//! epochs only grow by one, values and keys are bounded, strangers (no
//! certificate, another CA, no site name, plain HTTP) are refused and
//! logged with their address, and idle strangers cannot lock a site out.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tandem_coordinator::keys::{encode, Keys, OwnerRecord};
use tandem_coordinator::witness::{self, policy, ServeOptions, WitnessClient, WitnessHandle};
use tandem_coordinator::{Compare, LeaseId, Op, Store, StoreError};
use tandem_testkit::wait_until;
use tandem_tls::https::WitnessTls;
use tandem_tls::rustls;
use tandem_tls::{certs, TlsIdentity};

const TIMEOUT: Duration = Duration::from_secs(5);

/// Everything the witnesses of this test binary log.
fn log() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buf);
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || Sink(Arc::clone(&sink)))
            .init();
        buf
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logged() -> String {
    String::from_utf8_lossy(&log().lock().expect("log")).into_owned()
}

/// Waits until the log has a line with every one of `needles`.
fn wait_logged(needles: &[&str]) {
    wait_until(TIMEOUT, &format!("a log line with {needles:?}"), || {
        logged()
            .lines()
            .any(|l| needles.iter().all(|n| l.contains(n)))
    });
}

struct Setup {
    _dir: tempfile::TempDir,
    pki: PathBuf,
    witness: WitnessHandle,
}

fn setup(policy: policy::Limits) -> Setup {
    log();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    certs::create(&pki, &["ny".to_owned(), "chicago".to_owned()]).expect("certs");
    let tls = WitnessTls::load(
        &pki.join("ca.pem"),
        &pki.join("witness.pem"),
        &pki.join("witness.key"),
    )
    .expect("witness TLS");
    let witness = witness::serve_options(
        "127.0.0.1:0",
        &dir.path().join("witness"),
        Arc::new(AtomicBool::new(false)),
        ServeOptions {
            tls: Some(tls),
            policy,
            ..ServeOptions::default()
        },
    )
    .expect("witness starts");
    Setup {
        _dir: dir,
        pki,
        witness,
    }
}

fn identity(pki: &Path, site: &str) -> TlsIdentity {
    TlsIdentity::load(
        &pki.join("ca.pem"),
        &pki.join(format!("{site}.pem")),
        &pki.join(format!("{site}.key")),
    )
    .expect("identity")
}

impl Setup {
    fn client(&self, site: &str) -> WitnessClient {
        WitnessClient::tls(
            &[self.witness.local_addr().to_string()],
            &identity(&self.pki, site),
            TIMEOUT,
        )
        .expect("client")
    }
}

/// The transaction `decide` makes to claim (or hand over) group `g`.
fn owner_ops(site: &str, lease: LeaseId, epoch: u64) -> Vec<Op> {
    let keys = Keys::new("tandem");
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

fn owner(c: &WitnessClient) -> Option<(OwnerRecord, String)> {
    let keys = Keys::new("tandem");
    let snap = c.range(&keys.group("g")).expect("range");
    let record = snap
        .get(&keys.owner("g"))
        .map(|kv| serde_json::from_slice(&kv.value).expect("owner record"))?;
    let epoch = snap
        .get(&keys.epoch("g"))
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
        .unwrap_or_default();
    Some((record, epoch))
}

/// The call was refused by the witness's policy with `code`.
fn assert_refused<T: std::fmt::Debug>(result: Result<T, StoreError>, code: &str) {
    match result {
        Err(StoreError::Refused(msg)) => assert!(msg.contains(code), "{code}: {msg}"),
        other => panic!("expected a refusal {code}, got {other:?}"),
    }
}

#[test]
fn a_site_acts_only_for_itself() {
    let s = setup(policy::Limits::default());
    let (ny, chicago) = (s.client("ny"), s.client("chicago"));
    let ttl = Duration::from_millis(1500);
    let keys = Keys::new("tandem");
    let l_ny = ny.grant(ttl).expect("grant");
    let claim = [
        Compare::ModRevision(keys.owner("g"), 0),
        Compare::ModRevision(keys.epoch("g"), 0),
    ];
    assert!(ny.txn(&claim, &owner_ops("ny", l_ny, 1)).expect("claim").0);
    let l_chicago = chicago.grant(ttl).expect("grant");
    let before = owner(&ny).expect("owner");

    // Forged claim: chicago's certificate writes an owner record for ny,
    // or for itself over ny.
    assert_refused(chicago.txn(&[], &owner_ops("ny", l_ny, 2)), "NotOwner");
    assert_refused(
        chicago.txn(&[], &owner_ops("chicago", l_chicago, 2)),
        "NotOwner",
    );
    // "mallory": a site that is not the caller and holds no lease.
    assert_refused(
        chicago.txn(&[], &owner_ops("mallory", l_chicago, 2)),
        "NotOwner",
    );
    assert_refused(ny.txn(&[], &owner_ops("mallory", l_ny, 2)), "NotYourLease");
    // Wild epochs, even from the owner handing over: 0, u64::MAX, +2.
    for epoch in [0, u64::MAX, 3] {
        assert_refused(
            ny.txn(&[], &owner_ops("chicago", l_chicago, epoch)),
            "EpochNotNext",
        );
    }
    // Another site's lease: neither revoked nor renewed.
    assert_refused(chicago.revoke(l_ny), "NotYourLease");
    assert_refused(chicago.keep_alive(l_ny), "NotYourLease");
    assert_eq!(
        owner(&ny),
        Some(before.clone()),
        "a refused request changed the owner"
    );
    assert_eq!(before.0.site, "ny");
    assert_eq!(before.1, "1");
    let denied = logged();
    assert!(
        denied.contains("witness: refused") && denied.contains("site=chicago"),
        "refusals are logged with the site: {denied}"
    );

    // ny stops renewing (it died); chicago renewing ny's lease for it
    // does not keep the dead owner's key alive.
    let last_renewal = Instant::now();
    ny.keep_alive(l_ny).expect("the owner renews its own lease");
    wait_until(ttl * 3, "the dead owner's key to vanish", || {
        chicago
            .keep_alive(l_chicago)
            .expect("chicago renews its own lease");
        match chicago.keep_alive(l_ny) {
            Err(StoreError::LeaseNotFound(_)) => {}
            other => assert_refused(other, "NotYourLease"),
        }
        owner(&chicago).is_none()
    });
    let gone_after = last_renewal.elapsed();
    assert!(gone_after >= ttl, "gone after {gone_after:?}");
    // Now chicago may take over, with the next epoch only.
    assert_refused(
        chicago.txn(&[], &owner_ops("chicago", l_chicago, 1)),
        "EpochNotNext",
    );
    assert!(
        chicago
            .txn(&[], &owner_ops("chicago", l_chicago, 2))
            .expect("claim")
            .0
    );
}

#[test]
fn state_bloat_is_refused_and_a_normal_txn_stays_fast() {
    let limits = policy::Limits {
        site_keys: 1000,
        site_bytes: 256 * 1024,
        ..policy::Limits::default()
    };
    let s = setup(limits);
    let (ny, chicago) = (s.client("ny"), s.client("chicago"));
    let put = |i: usize, size: usize| Op::Put {
        key: format!("tandem/sites/ny/junk{i}"),
        value: vec![b'j'; size],
        lease: 0,
    };
    assert_refused(ny.txn(&[], &[put(0, 100 * 1024)]), "ValueTooLarge");
    let mut refused = None;
    for round in 0..20 {
        let ops: Vec<Op> = (0..200).map(|i| put(round * 200 + i, 1000)).collect();
        if let Err(e) = ny.txn(&[], &ops) {
            refused = Some(e);
            break;
        }
    }
    assert_refused(refused.map_or(Ok(()), Err), "SiteQuota");
    let state = std::fs::metadata(s._dir.path().join("witness").join(witness::STATE_FILE))
        .expect("state file")
        .len();
    // Values are stored as JSON numbers: up to about 4 bytes a byte.
    assert!(state < 2 << 20, "the state file grew to {state} bytes");

    // Another site's normal work is still quick.
    let lease = chicago.grant(Duration::from_secs(10)).expect("grant");
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let t = Instant::now();
        chicago.keep_alive(lease).expect("keepalive");
        chicago
            .txn(
                &[],
                &[Op::Put {
                    key: format!("tandem/sites/chicago/k{i}"),
                    value: b"v".to_vec(),
                    lease,
                }],
            )
            .expect("txn");
        slowest = slowest.max(t.elapsed());
    }
    eprintln!(
        "after the bloat attempts: slowest keepalive+txn {slowest:?}, state file {state} bytes"
    );
    assert!(
        slowest < Duration::from_millis(500),
        "slowest keepalive+txn: {slowest:?}"
    );
}

/// Sends a plain request; returns what came back before the end.
fn exchange(stream: &mut dyn ReadWrite) -> Vec<u8> {
    let _ = stream.write_all(
        b"POST /v1/range HTTP/1.1\r\nHost: w\r\nTandem-Site: ny\r\nContent-Length: 2\r\n\r\n{}",
    );
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    got
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn tls_client(pki: &Path, cert: Option<(Vec<u8>, Vec<u8>)>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pki.join("ca.pem")).expect("ca") {
        roots.add(c.expect("ca cert")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    Arc::new(match cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(&cert).expect("cert")],
                PrivateKeyDer::from_pem_slice(&key).expect("key"),
            )
            .expect("client cert"),
    })
}

/// A client certificate from the sites' CA with no name in its
/// subjectAltName (issued here with the CA's key, as a careless operator
/// with openssl might).
fn san_less_cert(pki: &Path) -> (Vec<u8>, Vec<u8>) {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(pki.join("ca.key")).expect("ca.key"))
        .expect("key");
    // The CA as `certs::create` made it: its name comes from its key.
    let mut ca = CertificateParams::default();
    let id: String = ca
        .key_identifier(&ca_key)
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{} {id}", certs::CA_NAME));
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "chicago");
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer).expect("sign");
    (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
}

fn tls_exchange(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> (String, Vec<u8>) {
    let tcp = TcpStream::connect(addr).expect("connect");
    let local = tcp.local_addr().expect("addr").to_string();
    tcp.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let got = match tandem_tls::https::connect(tcp, config, Instant::now() + TIMEOUT) {
        Ok(mut stream) => exchange(&mut stream),
        Err(_) => Vec::new(),
    };
    (local, got)
}

#[test]
fn strangers_are_refused_and_logged_with_their_address() {
    let s = setup(policy::Limits::default());
    let addr = s.witness.local_addr();

    // Plain HTTP to the HTTPS witness: no answer, a log line.
    let mut plain = TcpStream::connect(addr).expect("connect");
    plain.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let local = plain.local_addr().expect("addr").to_string();
    let got = exchange(&mut plain);
    assert!(
        !got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    wait_logged(&["refused an unauthenticated connection", &local]);

    // TLS without a client certificate.
    let (local, got) = tls_exchange(addr, tls_client(&s.pki, None));
    assert!(!String::from_utf8_lossy(&got).contains("HTTP/1.1 200"));
    wait_logged(&["refused an unauthenticated connection", &local]);

    // A certificate from the right CA without a site name.
    let (local, got) = tls_exchange(addr, tls_client(&s.pki, Some(san_less_cert(&s.pki))));
    assert!(!String::from_utf8_lossy(&got).contains("HTTP/1.1 200"));
    wait_logged(&["names no site", &local]);

    // A site of another CA: its client refuses the witness, and the
    // witness refuses it.
    let other = s._dir.path().join("other-pki");
    certs::create(&other, &["ny".to_owned()]).expect("certs");
    let stranger =
        WitnessClient::tls(&[addr.to_string()], &identity(&other, "ny"), TIMEOUT).expect("client");
    assert!(matches!(
        stranger.range(""),
        Err(StoreError::Unreachable(_))
    ));
    // ... and one that trusts the witness but shows the other CA's
    // certificate is refused by the witness.
    let read = |f: &str| std::fs::read(other.join(f)).expect("read");
    let (local, got) = tls_exchange(
        addr,
        tls_client(&s.pki, Some((read("ny.pem"), read("ny.key")))),
    );
    assert!(!String::from_utf8_lossy(&got).contains("HTTP/1.1 200"));
    wait_logged(&["refused an unauthenticated connection", &local]);

    // The sites are served all along.
    s.client("ny").range("").expect("a site is served");
}

#[test]
fn plain_http_is_refused_off_loopback() {
    let dir = tempfile::tempdir().expect("tempdir");
    match witness::serve_options(
        "0.0.0.0:0",
        dir.path(),
        Arc::new(AtomicBool::new(false)),
        ServeOptions::default(),
    ) {
        Err(e @ witness::WitnessError::PlainNotLoopback { .. }) => {
            assert!(e.to_string().contains("loopback"), "{e}")
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a plain witness served a non-loopback address"),
    }
}

#[test]
fn idle_strangers_do_not_lock_a_site_out() {
    let s = setup(policy::Limits::default());
    let addr = s.witness.local_addr();
    let ny = s.client("ny");
    let lease = ny.grant(Duration::from_secs(10)).expect("grant");
    // 300 idle TCP connections, then 300 that began a TLS handshake and
    // stopped (a record header and a byte of a ClientHello).
    for partial in [&b""[..], &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01][..]] {
        let idle: Vec<TcpStream> = (0..300)
            .map(|_| {
                let mut c = TcpStream::connect(addr).expect("connect");
                c.write_all(partial).expect("send");
                c
            })
            .collect();
        // A site still gets a new connection, a lease and a renewal.
        let fresh = s.client("chicago");
        let t = Instant::now();
        let other = fresh.grant(Duration::from_secs(10)).expect("grant");
        fresh.keep_alive(other).expect("keepalive");
        ny.keep_alive(lease).expect("keepalive");
        eprintln!(
            "behind 300 idle strangers ({} bytes sent each): a new site connection, a grant and two renewals in {:?}",
            partial.len(),
            t.elapsed()
        );
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "took {:?}",
            t.elapsed()
        );
        drop(idle);
    }
}
