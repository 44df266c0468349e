//! Real TLS over 127.0.0.1: certificate creation, loading errors, mutual
//! authentication, refusals and data transfer.
#![allow(clippy::unwrap_used)]
#![allow(clippy::cast_possible_truncation)] // pattern bytes keep the low bits on purpose

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use tandem_tls::{certs, PeerStream, TlsError, TlsIdentity};

fn sites(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

/// A CA and certificates for `names` in a fresh directory.
fn pki(names: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    certs::create(dir.path(), &sites(names)).unwrap();
    dir
}

fn load(dir: &Path, site: &str) -> TlsIdentity {
    TlsIdentity::load(
        &dir.join("ca.pem"),
        &dir.join(format!("{site}.pem")),
        &dir.join(format!("{site}.key")),
    )
    .unwrap()
}

/// Runs `server` on an accepted connection in a thread and `client` on a
/// connection to it; returns both results.
fn pair<S, C, A, B>(server: S, client: C) -> (A, B)
where
    S: FnOnce(TcpStream) -> A + Send + 'static,
    C: FnOnce(TcpStream) -> B,
    A: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        server(tcp)
    });
    let tcp = TcpStream::connect(addr).unwrap();
    let b = client(tcp);
    (handle.join().unwrap(), b)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

#[test]
fn create_writes_files_that_load() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tls");
    let written = certs::create(&out, &sites(&["ny", "chicago", "seattle"])).unwrap();
    let names: Vec<String> = written
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "ca.pem",
            "ca.key",
            "ny.pem",
            "ny.key",
            "chicago.pem",
            "chicago.key",
            "seattle.pem",
            "seattle.key",
            "witness.pem",
            "witness.key"
        ]
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for p in &written {
            let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            if p.extension().unwrap() == "key" {
                assert_eq!(mode, 0o600, "{}", p.display());
            } else {
                assert_eq!(mode, 0o644, "{}", p.display());
            }
        }
    }
    for site in ["ny", "chicago", "seattle"] {
        assert_eq!(load(&out, site).site(), site);
    }
    let pem = std::fs::read_to_string(out.join("ny.pem")).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    let key = std::fs::read_to_string(out.join("ny.key")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
}

#[test]
fn create_refuses_to_overwrite() {
    let dir = pki(&["ny", "chicago"]);
    let before = std::fs::read(dir.path().join("ca.pem")).unwrap();
    let err = certs::create(dir.path(), &sites(&["ny", "chicago"])).unwrap_err();
    assert!(matches!(err, TlsError::Exists { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("ca.pem") && msg.contains("refusing to overwrite"),
        "{msg}"
    );
    assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), before);

    // Only a site file in the way: its name is given, nothing else written.
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("seattle.key"), "keep").unwrap();
    let err = certs::create(other.path(), &sites(&["ny", "seattle"])).unwrap_err();
    assert!(err.to_string().contains("seattle.key"), "{err}");
    let left: Vec<_> = std::fs::read_dir(other.path()).unwrap().collect();
    assert_eq!(left.len(), 1);
    assert_eq!(
        std::fs::read_to_string(other.path().join("seattle.key")).unwrap(),
        "keep"
    );
}

#[test]
fn create_checks_site_names() {
    let dir = tempfile::tempdir().unwrap();
    for bad in [
        "",
        "two words",
        "-x",
        ".x",
        "10.0.0.1",
        "a/b",
        "ca",
        "witness",
        &"x".repeat(65),
    ] {
        let err = certs::create(dir.path(), &sites(&[bad])).unwrap_err();
        assert!(
            matches!(err, TlsError::InvalidSiteName { .. }),
            "{bad:?}: {err}"
        );
    }
    let err = certs::create(dir.path(), &sites(&["ny", "ny"])).unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");
    let err = certs::create(dir.path(), &[]).unwrap_err();
    assert!(err.to_string().contains("no site names"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    for good in ["ny", "new-york", "site_2", "dc1.example", "A1"] {
        certs::check_site_name(good).unwrap();
    }
}

#[test]
fn handshake_both_sides_see_the_peer_site_and_data_flows() {
    let dir = pki(&["ny", "chicago"]);
    let ny = load(dir.path(), "ny");
    let chicago = load(dir.path(), "chicago");
    const LEN: usize = 3 << 20;
    let (server, client) = pair(
        move |tcp| {
            let mut s = PeerStream::accept_tls(tcp, &chicago).unwrap();
            assert!(s.is_tls());
            assert_eq!(s.tcp().read_timeout().unwrap(), None);
            assert_eq!(s.tcp().write_timeout().unwrap(), None);
            let site = s.peer_site();
            let mut got = vec![0u8; LEN];
            s.read_exact(&mut got).unwrap();
            assert!(got == pattern(LEN, 1), "server received corrupted data");
            s.write_all(&pattern(LEN, 2)).unwrap();
            s.flush().unwrap();
            // Wait for the client's close.
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty());
            site
        },
        move |tcp| {
            let mut s = PeerStream::connect_tls(tcp, &ny, "chicago").unwrap();
            assert_eq!(s.tcp().read_timeout().unwrap(), None);
            assert_eq!(s.tcp().write_timeout().unwrap(), None);
            s.try_clone_tcp().unwrap().peer_addr().unwrap();
            let site = s.peer_site();
            s.write_all(&pattern(LEN, 1)).unwrap();
            s.flush().unwrap();
            let mut got = vec![0u8; LEN];
            s.read_exact(&mut got).unwrap();
            assert!(got == pattern(LEN, 2), "client received corrupted data");
            s.shutdown().unwrap();
            site
        },
    );
    assert_eq!(server.as_deref(), Some("ny"));
    assert_eq!(client.as_deref(), Some("chicago"));
}

#[test]
fn socket_timeouts_set_before_the_handshake_are_restored() {
    let dir = pki(&["ny", "chicago"]);
    let ny = load(dir.path(), "ny");
    let chicago = load(dir.path(), "chicago");
    let t = Some(Duration::from_secs(42));
    let (server, client) = pair(
        move |tcp| {
            tcp.set_read_timeout(t).unwrap();
            let s = PeerStream::accept_tls(tcp, &chicago).unwrap();
            s.tcp().read_timeout().unwrap()
        },
        move |tcp| {
            tcp.set_write_timeout(t).unwrap();
            let s = PeerStream::connect_tls(tcp, &ny, "chicago").unwrap();
            (
                s.tcp().read_timeout().unwrap(),
                s.tcp().write_timeout().unwrap(),
            )
        },
    );
    assert_eq!(server, t);
    assert_eq!(client, (None, t));
}

#[test]
fn client_from_another_ca_is_refused() {
    let ours = pki(&["chicago"]);
    let theirs = pki(&["ny"]);
    let chicago = load(ours.path(), "chicago");
    let intruder = load(theirs.path(), "ny");
    let (server, client) = pair(
        move |tcp| PeerStream::accept_tls(tcp, &chicago).map(|_| ()),
        move |tcp| PeerStream::connect_tls(tcp, &intruder, "chicago").map(|_| ()),
    );
    // Each side distrusts the other's CA; the client checks first and says
    // why, the server learns that its certificate was refused.
    let server = server.unwrap_err().to_string();
    eprintln!("{}: {server}", stringify!(server));
    assert!(server.contains("certificate"), "{server}");
    assert!(server.contains("127.0.0.1"), "{server}");
    let client = client.unwrap_err().to_string();
    eprintln!("{}: {client}", stringify!(client));
    assert!(
        client.contains("certificate") && client.contains("unknown issuer"),
        "{client}"
    );
}

#[test]
fn client_refused_by_server_learns_it_in_connect() {
    // The client trusts the server (same CA), but the server trusts another
    // CA: with TLS 1.3 the client's handshake completes before the server
    // judges its certificate; connect_tls must still fail.
    let shared = pki(&["ny"]);
    let other = pki(&["x"]);
    // Server "x" trusts only its own CA.
    let picky = load(other.path(), "x");
    // Client "ny" trusts both CAs, so it accepts "x"'s certificate.
    let bundle = tempfile::tempdir().unwrap();
    let mut ca = std::fs::read(shared.path().join("ca.pem")).unwrap();
    ca.extend(std::fs::read(other.path().join("ca.pem")).unwrap());
    std::fs::write(bundle.path().join("ca.pem"), ca).unwrap();
    let ny_trusting_both = TlsIdentity::load(
        &bundle.path().join("ca.pem"),
        &shared.path().join("ny.pem"),
        &shared.path().join("ny.key"),
    )
    .unwrap();
    let (server, client) = pair(
        move |tcp| PeerStream::accept_tls(tcp, &picky).map(|_| ()),
        move |tcp| PeerStream::connect_tls(tcp, &ny_trusting_both, "x").map(|_| ()),
    );
    let server = server.unwrap_err().to_string();
    eprintln!("{}: {server}", stringify!(server));
    assert!(server.contains("unknown issuer"), "{server}");
    let client = client.unwrap_err().to_string();
    eprintln!("{}: {client}", stringify!(client));
    assert!(
        client.contains("refused our certificate"),
        "connect_tls must report the refusal: {client}"
    );
}

#[test]
fn server_with_the_wrong_site_name_is_refused() {
    let dir = pki(&["ny", "chicago", "seattle"]);
    let ny = load(dir.path(), "ny");
    let seattle = load(dir.path(), "seattle");
    let (server, client) = pair(
        move |tcp| PeerStream::accept_tls(tcp, &seattle).map(|_| ()),
        move |tcp| PeerStream::connect_tls(tcp, &ny, "chicago").map(|_| ()),
    );
    let client = client.unwrap_err().to_string();
    eprintln!("{}: {client}", stringify!(client));
    assert!(
        client.contains("\"chicago\"") && client.contains("seattle"),
        "{client}"
    );
    assert!(client.contains("another site name"), "{client}");
    let server = server.unwrap_err().to_string();
    eprintln!("{}: {server}", stringify!(server));
    assert!(server.contains("refused our certificate"), "{server}");
}

#[test]
fn plain_client_against_tls_server_is_explained() {
    let dir = pki(&["chicago"]);
    let chicago = load(dir.path(), "chicago");
    let (server, ()) = pair(
        move |tcp| PeerStream::accept_tls(tcp, &chicago).map(|_| ()),
        |mut tcp| {
            let _ = tcp.write_all(b"TNDP this is not TLS at all, just a plain peer\n");
            let _ = tcp.shutdown(std::net::Shutdown::Write);
            let mut sink = Vec::new();
            let _ = tcp.read_to_end(&mut sink);
        },
    );
    let server = server.unwrap_err().to_string();
    eprintln!("{}: {server}", stringify!(server));
    assert!(server.contains("does not seem to speak TLS"), "{server}");
}

#[test]
fn server_closing_at_once_is_reported() {
    let dir = pki(&["ny"]);
    let ny = load(dir.path(), "ny");
    let ((), client) = pair(drop, move |tcp| {
        PeerStream::connect_tls(tcp, &ny, "chicago").map(|_| ())
    });
    let client = client.unwrap_err().to_string();
    eprintln!("{}: {client}", stringify!(client));
    assert!(client.contains("chicago"), "{client}");
}

#[test]
fn silent_peer_times_out() {
    let dir = pki(&["ny"]);
    let ny = load(dir.path(), "ny");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (_held, _) = listener.accept().unwrap();
    let start = Instant::now();
    let err = PeerStream::connect_tls(tcp, &ny, "chicago")
        .map(|_| ())
        .unwrap_err()
        .to_string();
    let took = start.elapsed();
    assert!(err.contains("timed out"), "{err}");
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(13),
        "{took:?}"
    );
}

#[test]
fn plain_streams_work() {
    const LEN: usize = 1 << 20;
    let (server, ()) = pair(
        |tcp| {
            let mut s = PeerStream::Plain(tcp);
            assert!(!s.is_tls());
            let mut got = vec![0u8; LEN];
            s.read_exact(&mut got).unwrap();
            s.write_all(&got).unwrap();
            (s.peer_site(), got == pattern(LEN, 7))
        },
        |tcp| {
            let mut s = PeerStream::Plain(tcp);
            s.write_all(&pattern(LEN, 7)).unwrap();
            let mut got = vec![0u8; LEN];
            s.read_exact(&mut got).unwrap();
            assert!(got == pattern(LEN, 7));
            assert_eq!(s.peer_site(), None);
            s.shutdown().unwrap();
        },
    );
    assert_eq!(server, (None, true));
}

fn load_err(ca: &Path, cert: &Path, key: &Path) -> String {
    TlsIdentity::load(ca, cert, key).unwrap_err().to_string()
}

#[test]
fn load_errors_name_the_file() {
    let dir = pki(&["ny", "chicago"]);
    let other = pki(&["ny"]);
    let p = |name: &str| -> PathBuf { dir.path().join(name) };
    let (ca, cert, key) = (p("ca.pem"), p("ny.pem"), p("ny.key"));

    // Missing files.
    let missing = p("nope.pem");
    let e = load_err(&missing, &cert, &key);
    eprintln!("load: {e}");
    assert!(
        e.contains("nope.pem") && e.contains("cannot read CA certificate"),
        "{e}"
    );
    let e = load_err(&ca, &missing, &key);
    eprintln!("load: {e}");
    assert!(
        e.contains("nope.pem") && e.contains("site certificate"),
        "{e}"
    );
    let e = load_err(&ca, &cert, &missing);
    eprintln!("load: {e}");
    assert!(e.contains("nope.pem") && e.contains("private key"), "{e}");

    // Garbage.
    let garbage = p("garbage.pem");
    std::fs::write(&garbage, b"\x00\x01 this is not a certificate").unwrap();
    for (a, b, c) in [
        (&garbage, &cert, &key),
        (&ca, &garbage, &key),
        (&ca, &cert, &garbage),
    ] {
        let e = load_err(a, b, c);
        assert!(
            e.contains("garbage.pem") && e.contains("not a valid PEM"),
            "{e}"
        );
    }
    // Broken base64 inside a PEM block.
    let broken = p("broken.pem");
    std::fs::write(
        &broken,
        "-----BEGIN CERTIFICATE-----\n!!!notbase64!!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let e = load_err(&ca, &broken, &key);
    eprintln!("load: {e}");
    assert!(e.contains("broken.pem"), "{e}");
    let e = load_err(&ca, &cert, &broken);
    eprintln!("load: {e}");
    assert!(e.contains("broken.pem"), "{e}");

    // A key file given as the certificate, and the other way round.
    let e = load_err(&ca, &key, &key);
    eprintln!("load: {e}");
    assert!(e.contains("ny.key") && e.contains("no certificate"), "{e}");
    let e = load_err(&ca, &cert, &cert);
    eprintln!("load: {e}");
    assert!(e.contains("ny.pem") && e.contains("no private key"), "{e}");

    // Key of another site.
    let e = load_err(&ca, &cert, &p("chicago.key"));
    eprintln!("load: {e}");
    assert!(
        e.contains("chicago.key") && e.contains("does not match") && e.contains("ny.pem"),
        "{e}"
    );

    // Certificate from another CA than the configured one.
    let e = load_err(
        &ca,
        &other.path().join("ny.pem"),
        &other.path().join("ny.key"),
    );
    assert!(
        e.contains("ny.pem") && e.contains("ca.pem") && e.contains("not valid under the CA"),
        "{e}"
    );
}

#[test]
fn keys_readable_by_others_still_load() {
    // Only a warning is logged; loading works.
    let dir = pki(&["ny"]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.path().join("ny.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
    }
    assert_eq!(load(dir.path(), "ny").site(), "ny");
}

#[test]
fn the_witness_certificate_serves_the_witness_and_cannot_act_as_a_site() {
    let dir = pki(&["ny"]);
    let p = dir.path();
    tandem_tls::https::WitnessTls::load(
        &p.join("ca.pem"),
        &p.join("witness.pem"),
        &p.join("witness.key"),
    )
    .unwrap();
    // Server authentication only: not a client (site) certificate.
    assert!(TlsIdentity::load(
        &p.join("ca.pem"),
        &p.join("witness.pem"),
        &p.join("witness.key")
    )
    .is_err());
    // A site's certificate does not name the witness.
    let err = tandem_tls::https::WitnessTls::load(
        &p.join("ca.pem"),
        &p.join("ny.pem"),
        &p.join("ny.key"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("witness"), "{err}");
}
