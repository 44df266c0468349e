//! Between sites: mutual TLS with certificates from `tandem certs create`,
//! a peer with a certificate from another CA refused with the reason while
//! the others replicate, and malformed peer input refused without
//! disturbing replication (SPEC G8). A certificate of the cluster's CA
//! without a site name is refused; a member site's certificate cannot open
//! a session as a forged primary of a newer epoch; and before
//! authentication the peer port spends bounded memory and threads
//! (docs/PEER.md, "Bounds").
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tandem_peer::{
    read_message, write_message, Hello, Message, Payload, PeerError, Record, RecordOp,
};
use tandem_tls::rustls;
use tandem_tls::{PeerStream, TlsIdentity};

fn certs(dir: &Path, sites: &[&str]) {
    run_ok(
        Command::new(TANDEM)
            .args(["certs", "create", "--out"])
            .arg(dir)
            .args(sites),
        Duration::from_secs(30),
    );
}

/// Turns TLS on in a site's configuration, with certificates from `dir`.
fn use_tls(config: &Path, dir: &Path, site: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    let tls = format!(
        "[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/{1}.pem\"\nkey = \"{0}/{1}.key\"",
        dir.display(),
        site
    );
    std::fs::write(config, text.replace("[tls]\nmode = \"off\"", &tls)).unwrap();
}

/// A site's peer listener address (`site.listen`).
fn peer_listen(c: &Cluster, site: &str) -> String {
    let text = std::fs::read_to_string(&c.site(site).config).unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix("listen = \"")
                .map(|v| v.trim_end_matches('"').to_owned())
        })
        .unwrap()
}

fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut c = Command::new(tool("qemu-io"));
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(c.arg(uri), Duration::from_secs(60));
    assert!(!out.contains("failed"), "{out}");
}

#[test]
fn tls_links_replicate_and_a_foreign_certificate_is_refused_with_the_reason() {
    let mut c = Cluster::new("ny", &["dr", "seattle"], &[vol("v0", "16MiB")], "");
    let good = c.dir.path().join("pki");
    let other = c.dir.path().join("other-pki");
    certs(&good, &["ny", "dr"]);
    certs(&other, &["seattle"]);
    for (site, dir) in [("ny", &good), ("dr", &good), ("seattle", &other)] {
        use_tls(&c.site(site).config, dir, site);
    }
    // The CA file must be the right one on each side; seattle trusts only
    // its own CA.
    c.start("dr");
    c.start("seattle");
    c.start("ny");
    qemu_io(&c.uri("ny", "v0"), &["write -P 0x21 0 1M", "flush"]);
    let mut last = serde_json::Value::Null;
    let settled = poll(Duration::from_secs(60), || {
        let s = c.status("ny");
        let reps = s["groups"][0]["replicas"].as_array().unwrap().clone();
        let dr = reps.iter().find(|r| r["site"] == "dr").unwrap().clone();
        let seattle = reps
            .iter()
            .find(|r| r["site"] == "seattle")
            .unwrap()
            .clone();
        let refused = seattle["last_error"].as_str().unwrap_or("");
        if dr["state"] == "streaming" && dr["lag_bytes"] == 0 && refused.contains("certificate") {
            assert_eq!(seattle["state"], "disconnected");
            assert!(
                refused.contains("issuer") || refused.contains("CA"),
                "reason not given: {refused}"
            );
            return Some(());
        }
        last = s;
        None
    });
    assert!(
        settled.is_some(),
        "dr not streaming or seattle not refused within 60 s: {last:#}"
    );
    // seattle logged why it refused ny.
    let log = c.site("seattle").log();
    assert!(
        log.contains("refusing peer connection") && log.contains("certificate"),
        "{log}"
    );
    // The cluster status goes over the same mutual TLS: dr sees ny's view
    // of the group; seattle (another CA) is unreachable, with the reason.
    let out = run_ok(
        Command::new(TANDEM)
            .args(["status", "--json", "--config"])
            .arg(&c.site("dr").config),
        Duration::from_secs(20),
    );
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["groups"][0]["owner"], "ny", "{s:#}");
    assert_eq!(s["groups"][0]["replicas"][0]["reported_by"], "ny", "{s:#}");
    let site = |name: &str| {
        s["sites"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(site("ny")["reachable"], true, "{s:#}");
    assert_eq!(site("seattle")["reachable"], false, "{s:#}");
    assert!(
        site("seattle")["error"].as_str().unwrap().contains("TLS")
            || site("seattle")["error"]
                .as_str()
                .unwrap()
                .contains("certificate"),
        "{s:#}"
    );
    assert!(c.stop("ny").success());
    assert!(c.stop("dr").success());
    assert!(files_equal(&c.image("ny", "v0"), &c.image("dr", "v0")));
}

#[test]
fn garbage_on_the_peer_port_is_refused_and_replication_continues() {
    let mut c = Cluster::new("ny", &["dr"], &[vol("v0", "16MiB")], "");
    c.start("dr");
    c.start("ny");
    qemu_io(&c.uri("ny", "v0"), &["write -P 0x31 0 1M", "flush"]);
    c.wait_replicated(Duration::from_secs(30));
    let listen = peer_listen(&c, "dr");
    // Not the peer protocol at all, then a frame with a bad magic, then a
    // valid-looking header announcing 4 GiB.
    for junk in [
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0xAB; 64],
        [
            0x50u8, 0x44, 0x4E, 0x54, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0,
        ]
        .to_vec(),
    ] {
        let mut s = TcpStream::connect(&listen).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&junk).unwrap();
        let mut buf = [0u8; 16];
        // The replica closes the connection (maybe after a Refuse).
        let _ = s.read(&mut buf);
    }
    wait_until(Duration::from_secs(10), "the replica's log line", || {
        let log = c.site("dr").log();
        log.contains("bad frame magic") && log.contains("exceeds the limit")
    });
    qemu_io(&c.uri("ny", "v0"), &["write -P 0x32 2M 1M", "flush"]);
    c.wait_replicated(Duration::from_secs(30));
    assert!(c.stop("ny").success());
    assert!(c.stop("dr").success());
    assert!(files_equal(&c.image("ny", "v0"), &c.image("dr", "v0")));
}

/// A certificate signed by the CA in `pki` (from `tandem certs create`)
/// with no subjectAltName at all: its common name says "dr", which does
/// not count. Returns (certificate DER, PKCS#8 key DER).
fn sanless_certificate(pki: &Path) -> (Vec<u8>, Vec<u8>) {
    let ca_pem = std::fs::read_to_string(pki.join("ca.pem")).unwrap();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.join("ca.key")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    assert!(params.subject_alt_names.is_empty());
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "dr");
    params.distinguished_name = dn;
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.der().to_vec(), key.serialize_der())
}

#[test]
fn a_certificate_of_the_cluster_ca_without_a_site_name_is_refused() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    let mut c = Cluster::new("ny", &["dr"], &[vol("v0", "16MiB")], "");
    let pki = c.dir.path().join("pki");
    certs(&pki, &["ny", "dr"]);
    for site in ["ny", "dr"] {
        use_tls(&c.site(site).config, &pki, site);
    }
    c.start("dr");
    c.start("ny");
    qemu_io(&c.uri("ny", "v0"), &["write -P 0x71 0 1M", "flush"]);
    c.wait_replicated(Duration::from_secs(60));

    // A TLS client presenting the SAN-less certificate to dr's peer port.
    let (cert, key) = sanless_certificate(&pki);
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(pki.join("ca.pem")).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![CertificateDer::from(cert)],
        PrivateKeyDer::Pkcs8(key.into()),
    )
    .unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("dr").unwrap())
        .unwrap();
    let tcp = TcpStream::connect(peer_listen(&c, "dr")).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    // The handshake verifies (the certificate chains to the CA); then dr
    // closes the connection instead of accepting it, and never reads a
    // hello from it.
    let hello = Message::Hello(Hello {
        version: tandem_peer::VERSION,
        primary: "ny".into(),
        replica: "dr".into(),
        group: "g".into(),
        epoch: 9,
        fork_epoch: 0,
        fork_seq: 0,
        volumes: vec![("v0".into(), 16 << 20)],
    });
    let _ = write_message(&mut tls, &hello, &mut Vec::new());
    let mut byte = [0u8; 1];
    let verdict = tls.read(&mut byte);
    assert!(
        !matches!(verdict, Ok(1)),
        "a certificate without a site name was accepted"
    );
    wait_until(Duration::from_secs(10), "dr's log line", || {
        let log = c.site("dr").log();
        log.contains("names no site") && log.contains("subjectAltName")
    });
    assert_eq!(c.status("dr")["groups"][0]["epoch"], 1);
    // ny replicates on.
    qemu_io(&c.uri("ny", "v0"), &["write -P 0x72 2M 1M", "flush"]);
    c.wait_replicated(Duration::from_secs(30));
    assert!(c.stop("ny").success());
    assert!(c.stop("dr").success());
    assert!(files_equal(&c.image("ny", "v0"), &c.image("dr", "v0")));
}

/// Opens a TLS peer connection to `site` of `c` with the certificate of
/// `as_site` and sends `hello`, then `writes` records of its epoch;
/// returns the replica's answer to the hello, or None when the connection
/// broke before it could be read: records not yet sent can make reading
/// fail (TLS writes what is pending first) once the replica has refused
/// and closed.
fn forge(
    c: &Cluster,
    pki: &Path,
    as_site: &str,
    site: &str,
    hello: Hello,
    writes: u64,
) -> Option<Message> {
    let identity = TlsIdentity::load(
        &pki.join("ca.pem"),
        &pki.join(format!("{as_site}.pem")),
        &pki.join(format!("{as_site}.key")),
    )
    .unwrap();
    let tcp = TcpStream::connect(peer_listen(c, site)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // The certificate is a valid member's: the handshake succeeds.
    let mut s = PeerStream::connect_tls(tcp, &identity, site).unwrap();
    let epoch = hello.epoch;
    let mut scratch = Vec::new();
    write_message(&mut s, &Message::Hello(hello), &mut scratch).unwrap();
    for seq in 1..=writes {
        let record = Message::Record(Record {
            epoch,
            seq,
            volume: 0,
            op: RecordOp::Write,
            fua: true,
            offset: seq * 65536,
            len: 65536,
            data: Payload::raw(vec![0xEE; 65536]),
        });
        if write_message(&mut s, &record, &mut scratch).is_err() {
            break;
        }
    }
    let mut buf = Vec::new();
    match read_message(&mut s, &mut buf) {
        Ok(answer) => Some(answer),
        Err(PeerError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            None
        }
        Err(e) => panic!("reading the answer to a forged hello: {e}"),
    }
}

/// The forger was refused for a reason containing every `expect`: in the
/// answer, or (when the connection broke first) in the replica's log.
fn assert_refused(c: &Cluster, site: &str, answer: Option<Message>, expect: &[&str]) {
    match answer {
        Some(Message::Refuse { reason }) => {
            assert!(expect.iter().all(|e| reason.contains(e)), "{reason}");
        }
        Some(other) => panic!("a forged primary was answered {other:?}"),
        None => wait_until(Duration::from_secs(10), "the refusal in the log", || {
            c.site(site).log().lines().any(|l| {
                l.contains("replication session closed") && expect.iter().all(|e| l.contains(e))
            })
        }),
    }
}

#[test]
fn a_forged_newer_epoch_hello_from_a_member_site_is_refused_and_the_owner_replicates_on() {
    let mut c = Cluster::new("ny", &["dr", "r2"], &[vol("v0", "16MiB")], "");
    let pki = c.dir.path().join("pki");
    certs(&pki, &["ny", "dr", "r2"]);
    for site in ["ny", "dr", "r2"] {
        use_tls(&c.site(site).config, &pki, site);
    }
    let witness = Witness::start_tls(c.dir.path(), &pki);
    c.set_coordinator(&witness.section("3s"));
    for site in ["dr", "r2", "ny"] {
        c.start_any(site);
    }
    wait_until(Duration::from_secs(30), "ny primary in epoch 1", || {
        let g = &c.status("ny")["groups"][0];
        g["role"] == "primary" && g["epoch"] == 1
    });
    qemu_io(&c.uri("ny", "v0"), &["write -P 0x51 0 4M", "flush"]);
    c.wait_replicated(Duration::from_secs(60));
    let image_before = std::fs::read(c.image("dr", "v0")).unwrap();

    // r2 (a site of the group, not its owner) opens a session to dr as
    // the primary of epoch 51 and writes.
    let forged = |primary: &str, epoch: u64| Hello {
        version: tandem_peer::VERSION,
        primary: primary.into(),
        replica: "dr".into(),
        group: "g".into(),
        epoch,
        fork_epoch: 0,
        fork_seq: 0,
        volumes: vec![("v0".into(), 16 << 20)],
    };
    let answer = forge(&c, &pki, "r2", "dr", forged("r2", 51), 8);
    assert_refused(
        &c,
        "dr",
        answer,
        &[
            "r2 is not the owner of group g in epoch 51",
            "names ny owner in epoch 1",
        ],
    );
    // Nor may it speak for the owner.
    let answer = forge(&c, &pki, "r2", "dr", forged("ny", 51), 1);
    assert_refused(&c, "dr", answer, &["certificate is for site r2"]);
    assert!(c.site("dr").log().contains("is not the owner of group g"));
    // dr's epoch and image are what they were.
    let dr = &c.status("dr")["groups"][0];
    assert_eq!(dr["epoch"], 1, "{dr:#}");
    assert_eq!(dr["role"], "replica");
    assert!(std::fs::read(c.image("dr", "v0")).unwrap() == image_before);

    // ny's session goes on: new writes reach dr, which follows epoch 1.
    qemu_io(&c.uri("ny", "v0"), &["write -P 0x52 8M 1M", "flush"]);
    c.wait_replicated(Duration::from_secs(30));
    assert_eq!(c.status("dr")["groups"][0]["epoch"], 1);
    for site in ["ny", "dr", "r2"] {
        assert!(c.stop(site).success(), "{site}");
    }
    assert!(files_equal(&c.image("ny", "v0"), &c.image("dr", "v0")));
}

/// (VmRSS in bytes, threads) of a process, from /proc/PID/status.
fn rss_and_threads(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().trim_end_matches(" kB").parse::<u64>().unwrap())
            .unwrap()
    };
    (field("VmRSS:") * 1024, field("Threads:"))
}

/// The largest RSS and thread count seen while sampling.
#[derive(Clone, Copy, Default)]
struct Peak {
    rss: u64,
    threads: u64,
}

impl Peak {
    fn sample(&mut self, pid: u32) {
        let (rss, threads) = rss_and_threads(pid);
        self.rss = self.rss.max(rss);
        self.threads = self.threads.max(threads);
    }
}

#[test]
fn idle_connections_and_huge_hellos_before_authentication_cost_little_and_a_real_peer_gets_in() {
    let mut c = Cluster::new("ny", &["dr"], &[vol("v0", "16MiB")], "");
    c.start("dr");
    c.start("ny");
    qemu_io(&c.uri("ny", "v0"), &["write -P 0x41 0 1M", "flush"]);
    c.wait_replicated(Duration::from_secs(30));
    let pid = c.site("dr").pid().unwrap();
    let listen = peer_listen(&c, "dr");
    let (rss0, threads0) = rss_and_threads(pid);
    let mut peak = Peak {
        rss: rss0,
        threads: threads0,
    };

    // 500 connections that say nothing.
    let idle: Vec<TcpStream> = (0..500)
        .map(|_| TcpStream::connect(&listen).unwrap())
        .collect();
    // 8 hellos announcing 60 MiB each, sent as fast as dr takes them.
    let hellos: Vec<_> = (0..8)
        .map(|_| {
            let listen = listen.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(&listen).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut header = Vec::new();
                header.extend_from_slice(&tandem_peer::MAGIC.to_le_bytes());
                header.extend_from_slice(&[1, 0, 0, 0]);
                header.extend_from_slice(&(60u32 << 20).to_le_bytes());
                header.extend_from_slice(&[0; 4]);
                s.write_all(&header).unwrap();
                let piece = vec![0x5A; 1 << 20];
                let mut sent = 0u64;
                for _ in 0..60 {
                    if s.write_all(&piece).is_err() {
                        return (sent, true);
                    }
                    sent += piece.len() as u64;
                }
                (sent, false)
            })
        })
        .collect();
    let started = Instant::now();
    while !hellos.iter().all(std::thread::JoinHandle::is_finished) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the hellos were not refused"
        );
        peak.sample(pid);
        std::thread::sleep(Duration::from_millis(20));
    }
    for h in hellos {
        let (sent, refused) = h.join().unwrap();
        assert!(refused, "a 60 MiB hello was read whole");
        assert!(sent < 16 << 20, "{sent} bytes of a hello taken");
    }
    wait_until(Duration::from_secs(15), "dr's log lines", || {
        let log = c.site("dr").log();
        log.contains("closing an unauthenticated peer connection")
            && log.contains("exceeds the limit of 131072 bytes")
    });
    peak.sample(pid);

    // A real peer connects meanwhile: ny restarts (a new connection)
    // while idle connections keep coming, 500 held at any time.
    let flooding = Arc::new(AtomicBool::new(true));
    let opened = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let flood = {
        let (flooding, listen) = (Arc::clone(&flooding), listen.clone());
        let opened = Arc::clone(&opened);
        std::thread::spawn(move || {
            let mut held: VecDeque<TcpStream> = idle.into_iter().collect();
            while flooding.load(Ordering::Acquire) {
                if let Ok(s) = TcpStream::connect(&listen) {
                    held.push_back(s);
                    opened.fetch_add(1, Ordering::AcqRel);
                }
                if held.len() > 500 {
                    held.pop_front();
                }
                // Pacing of the flood (about 200 connections a second).
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    // The flood is well under way before ny comes back.
    wait_until(Duration::from_secs(30), "100 flood connections", || {
        opened.load(Ordering::Acquire) >= 100
    });
    assert!(c.stop("ny").success());
    c.start("ny");
    qemu_io(&c.uri("ny", "v0"), &["write -P 0x42 2M 1M", "flush"]);
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        peak.sample(pid);
        let s = c.status("ny");
        let r = &s["groups"][0]["replicas"][0];
        let next = s["groups"][0]["next_seq"].as_u64().unwrap_or(0);
        if r["state"] == "streaming" && r["durable_seq"].as_u64().unwrap_or(0) + 1 >= next {
            break;
        }
        assert!(Instant::now() < until, "ny did not get in: {s:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
    flooding.store(false, Ordering::Release);
    flood.join().unwrap();
    peak.sample(pid);
    let grown = peak.rss.saturating_sub(rss0);
    eprintln!(
        "dr before authentication under load: RSS {} -> {} MiB (+{} KiB), threads {threads0} -> {}",
        rss0 >> 20,
        peak.rss >> 20,
        grown >> 10,
        peak.threads
    );
    assert!(grown < 32 << 20, "RSS grew by {grown} bytes");
    // One session thread for ny's new connection while the old one ends.
    assert!(
        peak.threads <= threads0 + 2,
        "threads {threads0} -> {}",
        peak.threads
    );
    assert!(c.stop("ny").success());
    assert!(c.stop("dr").success());
    assert!(files_equal(&c.image("ny", "v0"), &c.image("dr", "v0")));
}
