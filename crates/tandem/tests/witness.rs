//! `tandem witness` as a process, with the certificates `tandem certs
//! create` makes: a site proves its name with its certificate, strangers
//! are refused and logged with their address, and plain HTTP is only for
//! loopback.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tandem_coordinator::witness::WitnessClient;
use tandem_coordinator::{Store, StoreError};
use tandem_testkit::wait_until;
use tandem_tls::TlsIdentity;

const TIMEOUT: Duration = Duration::from_secs(10);

struct Running {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn witness(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(TANDEM);
    cmd.arg("witness")
        .args(args)
        .arg("--data-dir")
        .arg(dir.join("witness"))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    cmd
}

#[test]
fn the_witness_speaks_tls_with_the_sites_certificates_and_refuses_strangers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    run_ok(
        Command::new(TANDEM)
            .args(["certs", "create", "--out"])
            .arg(&pki)
            .args(["ny", "chicago"]),
        TIMEOUT,
    );
    // The witness's files go to its data directory, where it looks.
    let data = dir.path().join("witness");
    std::fs::create_dir_all(&data).expect("mkdir");
    for f in ["ca.pem", "witness.pem", "witness.key"] {
        std::fs::copy(pki.join(f), data.join(f)).expect("copy");
    }
    let addr = format!("127.0.0.1:{}", free_port());
    let log = dir.path().join("witness.log");
    let file = std::fs::File::create(&log).expect("log");
    let child = witness(dir.path(), &["--listen", &addr])
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("spawn tandem witness");
    let w = Running { child, log };
    wait_until(TIMEOUT, "the witness to listen", || {
        TcpStream::connect(&addr).is_ok()
    });

    // A site with its certificate is served.
    let ny = TlsIdentity::load(
        &pki.join("ca.pem"),
        &pki.join("ny.pem"),
        &pki.join("ny.key"),
    )
    .expect("identity");
    let client = WitnessClient::tls(std::slice::from_ref(&addr), &ny, TIMEOUT).expect("client");
    let lease = client.grant(Duration::from_secs(5)).expect("grant");
    client.keep_alive(lease).expect("keepalive");

    // Plain HTTP gets no answer, and the log names the peer.
    let mut plain = TcpStream::connect(&addr).expect("connect");
    plain.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let local = plain.local_addr().expect("addr").to_string();
    let _ = plain.write_all(
        b"POST /v1/revoke HTTP/1.1\r\nTandem-Site: ny\r\nContent-Length: 8\r\n\r\n{\"id\":1}",
    );
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    assert!(!String::from_utf8_lossy(&got).contains("200 OK"));
    wait_until(TIMEOUT, "the refusal to be logged with the peer", || {
        w.log()
            .lines()
            .any(|l| l.contains("refused an unauthenticated connection") && l.contains(&local))
    });
    // The lease the stranger tried to revoke is alive.
    client.keep_alive(lease).expect("the lease survived");

    // Another site's lease cannot be revoked with a valid certificate.
    let chicago = TlsIdentity::load(
        &pki.join("ca.pem"),
        &pki.join("chicago.pem"),
        &pki.join("chicago.key"),
    )
    .expect("identity");
    let other = WitnessClient::tls(std::slice::from_ref(&addr), &chicago, TIMEOUT).expect("client");
    assert!(matches!(other.revoke(lease), Err(StoreError::Refused(_))));
    client.keep_alive(lease).expect("the lease survived");
    wait_until(TIMEOUT, "the policy refusal to be logged", || {
        w.log()
            .lines()
            .any(|l| l.contains("witness: refused:") && l.contains("site=chicago"))
    });
}

#[test]
fn an_agent_with_tls_on_claims_its_group_through_the_https_witness() {
    let mut site = Site::new(&[vol("v0", "16MiB")]);
    let dir = site.dir.path().to_owned();
    let pki = dir.join("pki");
    run_ok(
        Command::new(TANDEM)
            .args(["certs", "create", "--out"])
            .arg(&pki)
            .args(["ny", "dr"]),
        TIMEOUT,
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let log = dir.join("witness.log");
    let file = std::fs::File::create(&log).expect("log");
    let p = |f: &str| pki.join(f).display().to_string();
    let child = witness(
        &dir,
        &[
            "--listen",
            &addr,
            "--ca",
            &p("ca.pem"),
            "--cert",
            &p("witness.pem"),
            "--key",
            &p("witness.key"),
        ],
    )
    .stdout(file.try_clone().expect("log"))
    .stderr(file)
    .spawn()
    .expect("spawn tandem witness");
    let w = Running { child, log };
    wait_until(TIMEOUT, "the witness to listen", || {
        TcpStream::connect(&addr).is_ok()
    });
    // The site's own [tls] identity, and the witness as coordinator.
    let text = std::fs::read_to_string(&site.config).expect("config");
    let text = text
        .replace(
            "[tls]\nmode = \"off\"\n",
            &format!(
                "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                p("ca.pem"),
                p("ny.pem"),
                p("ny.key")
            ),
        )
        .replace(
            "[coordinator]\nkind = \"none\"\n",
            &format!(
                "[coordinator]\nkind = \"witness\"\nendpoints = [\"{addr}\"]\nlease_ttl = \"3s\"\n"
            ),
        );
    std::fs::write(&site.config, text).expect("config");
    site.start();

    // The agent claimed the group and reports itself, over HTTPS with
    // its certificate: what the witness holds says so.
    let ny = TlsIdentity::load(
        &pki.join("ca.pem"),
        &pki.join("ny.pem"),
        &pki.join("ny.key"),
    )
    .expect("identity");
    let client = WitnessClient::tls(std::slice::from_ref(&addr), &ny, TIMEOUT).expect("client");
    let keys = tandem_coordinator::keys::Keys::new("/tandem");
    wait_until(
        Duration::from_secs(20),
        "ny to own g and report itself",
        || {
            let snap = client.range(&keys.group("g")).expect("range");
            let owner = snap.get(&keys.owner("g")).and_then(|kv| {
                serde_json::from_slice::<tandem_coordinator::keys::OwnerRecord>(&kv.value).ok()
            });
            owner.is_some_and(|o| o.site == "ny" && o.epoch == 1)
                && snap.get(&keys.member("g", "ny")).is_some()
        },
    );
    assert!(
        !w.log().contains("witness: refused:"),
        "the witness refused the agent:\n{}",
        w.log()
    );
    site.stop();
}

#[test]
fn plain_http_only_on_loopback_and_tls_needs_its_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |args: &[&str]| {
        let t = Instant::now();
        let out = witness(dir.path(), args)
            .output()
            .expect("run tandem witness");
        assert!(t.elapsed() < TIMEOUT);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run(&["--listen", "0.0.0.0:0", "--tls", "off"]);
    assert!(!ok, "a plain witness started on 0.0.0.0");
    assert!(err.contains("loopback"), "{err}");
    let (ok, err) = run(&["--listen", "127.0.0.1:0"]);
    assert!(!ok, "a TLS witness started without its certificate");
    assert!(
        err.contains("witness.pem") && err.contains("certs create"),
        "{err}"
    );
}
