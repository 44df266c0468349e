//! Real `tandem agent` processes with an etcd coordinator over TLS (SPEC
//! G11): etcd started with `--client-cert-auth`, every certificate made by
//! `tandem certs create`, each site presenting its own client
//! certificate (`[coordinator] etcd_ca`, `etcd_cert`, `etcd_key`). The
//! primary gets ownership, acknowledges writes, and a SIGKILL fails the
//! group over to the replica through the same TLS link.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../coordinator/tests/support/etcd.rs"]
mod etcd_cluster;

use std::process::Command;
use std::time::Duration;

use common::*;
use etcd_cluster::{EtcdCluster, EtcdOptions, EtcdTlsFiles};

const VOLUME: &str = "v";

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new(tool("qemu-io"));
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(c.arg(uri), Duration::from_secs(60));
    assert!(!out.contains("failed"), "qemu-io: {out}");
    out
}

fn wait_primary(c: &Cluster, site: &str, epoch: u64, timeout: Duration) {
    wait_until(timeout, &format!("{site} primary in epoch {epoch}"), || {
        let g = c.status(site)["groups"][0].clone();
        g["role"] == "primary" && g["epoch"] == epoch
    });
}

#[test]
fn agents_with_an_etcd_coordinator_over_tls_own_and_fail_over() {
    let mut c = Cluster::new("ny", &["chicago"], &[vol(VOLUME, "16MiB")], "");
    let certs = c.dir.path().join("etcd-certs");
    run_ok(
        Command::new(TANDEM)
            .args(["certs", "create", "--out"])
            .arg(&certs)
            .args(["localhost", "ny", "chicago"]),
        Duration::from_secs(30),
    );
    let etcd = EtcdCluster::start_with(
        1,
        EtcdOptions {
            tls: Some(EtcdTlsFiles {
                ca: certs.join("ca.pem"),
                cert: certs.join("localhost.pem"),
                key: certs.join("localhost.key"),
            }),
            ..EtcdOptions::default()
        },
    );
    c.set_coordinator(&format!(
        "kind = \"etcd\"\nendpoints = [\"https://localhost:{}\"]\nlease_ttl = \"3s\"\n\
         etcd_ca = \"{}\"\netcd_cert = \"{}/SITE.pem\"\netcd_key = \"{}/SITE.key\"",
        etcd.member(0).client_port,
        certs.join("ca.pem").display(),
        certs.display(),
        certs.display(),
    ));
    for s in &c.sites {
        let text = std::fs::read_to_string(&s.config).unwrap();
        std::fs::write(&s.config, text.replace("SITE", &s.name)).unwrap();
    }
    for s in ["ny", "chicago"] {
        c.start_any(s);
    }
    wait_primary(&c, "ny", 1, Duration::from_secs(30));
    qemu_io(&c.uri("ny", VOLUME), &["write -P 0x71 0 1M", "flush"]);
    let s = c.status("ny");
    assert_eq!(s["instance"]["state"], "held", "{s:#}");
    assert!(
        c.site("ny").log().contains("tls=true"),
        "{}",
        c.site("ny").log()
    );
    c.wait_replicated(Duration::from_secs(30));

    c.kill("ny");
    wait_primary(&c, "chicago", 2, Duration::from_secs(30));
    qemu_io(
        &c.uri("chicago", VOLUME),
        &["read -P 0x71 0 1M", "write -P 0x72 1M 4k", "flush"],
    );
}
