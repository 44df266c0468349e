//! Two sites in their own network namespaces, joined by a veth pair
//! shaped with `tc qdisc tbf`, talking mutual TLS: data written through NBD
//! on one arrives byte-identical on the other, and the shaped link is
//! respected. (Namespaces and addresses are the test's own; traffic stays
//! inside them.)
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Netns {
    names: [String; 2],
}

impl Netns {
    /// Namespaces `a` and `b` with 10.88.N.1 and 10.88.N.2 on a veth pair;
    /// the link from a to b shaped to `rate`.
    fn new(rate: &str) -> Netns {
        let ip = tool("ip");
        let tc = tool("tc");
        let id = std::process::id() % 200 + 20;
        let names = [format!("tdm{id}a"), format!("tdm{id}b")];
        let sh = |args: &[&str]| {
            run_ok(Command::new(&ip).args(args), Duration::from_secs(10));
        };
        for n in &names {
            let _ = run_with_timeout(
                Command::new(&ip).args(["netns", "del", n]),
                Duration::from_secs(10),
            );
            sh(&["netns", "add", n]);
            sh(&["-n", n, "link", "set", "lo", "up"]);
        }
        let (va, vb) = (format!("tv{id}a"), format!("tv{id}b"));
        sh(&[
            "link", "add", &va, "netns", &names[0], "type", "veth", "peer", "name", &vb, "netns",
            &names[1],
        ]);
        sh(&[
            "-n",
            &names[0],
            "addr",
            "add",
            &format!("10.88.{id}.1/24"),
            "dev",
            &va,
        ]);
        sh(&[
            "-n",
            &names[1],
            "addr",
            "add",
            &format!("10.88.{id}.2/24"),
            "dev",
            &vb,
        ]);
        sh(&["-n", &names[0], "link", "set", &va, "up"]);
        sh(&["-n", &names[1], "link", "set", &vb, "up"]);
        run_ok(
            Command::new(&tc).args([
                "-n", &names[0], "qdisc", "add", "dev", &va, "root", "tbf", "rate", rate, "burst",
                "32kbit", "latency", "50ms",
            ]),
            Duration::from_secs(10),
        );
        Netns { names }
    }

    fn addr(&self, i: usize) -> String {
        format!("10.88.{}.{}", std::process::id() % 200 + 20, i + 1)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

struct NsSite {
    ns: String,
    config: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl NsSite {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(tool("ip"));
        c.args(["netns", "exec", &self.ns, TANDEM]).args(args);
        c
    }

    fn start(&mut self) {
        let log = std::fs::File::create(&self.log).unwrap();
        let mut c = self.cmd(&["agent", "--config"]);
        c.arg(&self.config)
            .env("TANDEM_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(c.spawn().unwrap());
        wait_until(
            Duration::from_secs(20),
            "agent API in its namespace",
            || self.status().is_some(),
        );
    }

    fn status(&self) -> Option<serde_json::Value> {
        let mut c = self.cmd(&["status", "--json", "--local", "--config"]);
        c.arg(&self.config);
        let out = run_with_timeout(&mut c, Duration::from_secs(15));
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // ip netns exec execs the agent: the child is the agent.
            sigterm(&child);
            assert!(wait_child(&mut child, Duration::from_secs(40)).success());
        }
    }
}

impl Drop for NsSite {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- {} ---\n{}",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

fn config(dir: &Path, site: &str, addr: &str, peers: &[(&str, String)], pki: &Path) -> PathBuf {
    let peers: String = peers
        .iter()
        .map(|(n, a)| format!("[[peer]]\nname = \"{n}\"\naddress = \"{a}:7450\"\n\n"))
        .collect();
    let text = format!(
        "[site]\nname = \"{site}\"\ndata_dir = \"{data}\"\nlisten = \"{addr}:7450\"\napi = \"127.0.0.1:7451\"\n\n\
         [tls]\nca = \"{pki}/ca.pem\"\ncert = \"{pki}/{site}.pem\"\nkey = \"{pki}/{site}.key\"\n\n{peers}\
         [[group]]\nname = \"g\"\nprimary = \"ny\"\nreplicas = [ {{ site = \"dr\" }} ]\nvolumes = [ {{ name = \"v0\", size = \"64MiB\" }} ]\n",
        data = dir.join(site).display(),
        pki = pki.display()
    );
    let path = dir.join(format!("{site}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn replication_across_namespaces_over_a_tbf_shaped_veth_with_tls() {
    let net = Netns::new("40mbit");
    let dir = tempfile::Builder::new()
        .prefix("tn")
        .tempdir_in("/tmp")
        .unwrap();
    let pki = dir.path().join("pki");
    run_ok(
        Command::new(TANDEM)
            .args(["certs", "create", "--out"])
            .arg(&pki)
            .args(["ny", "dr"]),
        Duration::from_secs(30),
    );
    let peers = [("ny", net.addr(0)), ("dr", net.addr(1))];
    let mut ny = NsSite {
        ns: net.names[0].clone(),
        config: config(dir.path(), "ny", &net.addr(0), &peers, &pki),
        child: None,
        log: dir.path().join("ny.log"),
    };
    let mut dr = NsSite {
        ns: net.names[1].clone(),
        config: config(dir.path(), "dr", &net.addr(1), &peers, &pki),
        child: None,
        log: dir.path().join("dr.log"),
    };
    dr.start();
    ny.start();
    // 24 MiB of incompressible data over a 40 Mbit/s link: about 5 s.
    let src = dir.path().join("src.bin");
    std::fs::write(&src, pattern(77, 24 << 20)).unwrap();
    let uri = format!(
        "nbd+unix:///v0?socket={}",
        dir.path().join("ny/nbd/v0.sock").display()
    );
    let started = Instant::now();
    run_ok(
        Command::new(tool("nbdcopy")).arg(&src).arg(&uri),
        Duration::from_secs(60),
    );
    wait_until(
        Duration::from_secs(120),
        "the replica to catch up over the shaped link",
        || {
            let Some(s) = ny.status() else { return false };
            let g = &s["groups"][0];
            let r = &g["replicas"][0];
            r["state"] == "streaming"
                && r["lag_bytes"] == 0
                && r["durable_seq"].as_u64().unwrap_or(0) + 1
                    >= g["next_seq"].as_u64().unwrap_or(u64::MAX)
        },
    );
    let elapsed = started.elapsed().as_secs_f64();
    // The shaping is real: 24 MiB cannot cross 40 Mbit/s in under ~4.5 s.
    assert!(
        elapsed > 4.0,
        "24 MiB crossed a 40 Mbit/s link in {elapsed:.1} s: the link is not shaped"
    );
    ny.stop();
    dr.stop();
    assert!(files_equal(
        &dir.path().join("ny/volumes/v0.img"),
        &dir.path().join("dr/volumes/v0.img")
    ));
}
