//! Between sites: mutual TLS with certificates from `tandem certs create`,
//! a peer with a certificate from another CA refused with the reason while
//! the others replicate, and malformed peer input refused without
//! disturbing replication (SPEC G8).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

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

#[test]
fn silent_peer_connections_beyond_the_cap_are_closed_at_once_and_replication_continues() {
    let mut c = Cluster::new("ny", &["dr"], &[vol("v0", "16MiB")], "");
    c.start("dr");
    c.start("ny");
    qemu_io(&c.uri("ny", "v0"), &["write -P 0x41 0 1M", "flush"]);
    c.wait_replicated(Duration::from_secs(30));
    let listen = peer_listen(&c, "dr");
    // dr replicates one group: 64 + 4 sessions at once, one of them ny's.
    // Connections that say nothing hold the others; past the cap, dr
    // closes each new connection at once.
    let cap = 68;
    let held: Vec<TcpStream> = (0..cap + 5)
        .map(|_| {
            let s = TcpStream::connect(&listen).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s
        })
        .collect();
    wait_until(Duration::from_secs(10), "the cap's log line", || {
        c.site("dr").log().contains("too many replication sessions")
    });
    let mut s = TcpStream::connect(&listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1];
    let started = std::time::Instant::now();
    assert!(
        matches!(s.read(&mut buf), Ok(0)),
        "a connection past the cap is closed"
    );
    assert!(started.elapsed() < Duration::from_secs(4), "closed at once");
    // ny's session goes on meanwhile.
    qemu_io(&c.uri("ny", "v0"), &["write -P 0x42 2M 1M", "flush"]);
    c.wait_replicated(Duration::from_secs(30));
    drop(held);
    assert!(c.stop("ny").success());
    assert!(c.stop("dr").success());
    assert!(files_equal(&c.image("ny", "v0"), &c.image("dr", "v0")));
}
