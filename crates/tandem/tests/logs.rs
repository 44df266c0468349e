//! The logs of real agents and a real witness: no colour codes when
//! stderr is a file, one JSON object per line with `--log-format json` (or
//! `TANDEM_LOG_FORMAT=json`), and no floods of identical lines — after a
//! forced failover and around a witness that stops and comes back, an
//! identical line is written a few times at most, its repeats counted in
//! "(repeated N times in the last Ns)".

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const VOLUME: &str = "v";

/// An agent started by the test itself, with its own environment and
/// stderr into `log` (the harness sets `NO_COLOR`, which would hide what
/// is tested here).
struct Agent(Child);

impl Agent {
    fn start(config: &Path, log: &Path, args: &[&str], env: &[(&str, &str)]) -> Agent {
        let file = std::fs::File::create(log).unwrap();
        let mut cmd = Command::new(TANDEM);
        cmd.args(["agent", "--config"])
            .arg(config)
            .args(args)
            .env_remove("NO_COLOR")
            .env_remove("TANDEM_LOG_FORMAT")
            .env("TANDEM_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let agent = Agent(cmd.spawn().unwrap());
        wait_until(Duration::from_secs(30), "the agent's API", || {
            status_json(config).is_some()
        });
        agent
    }

    fn stop(mut self) {
        sigterm(&self.0);
        let status = wait_child(&mut self.0, Duration::from_secs(40));
        assert!(status.success(), "agent exit: {status}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every line of a JSON log parses as an object with a level, a
/// timestamp and a message.
fn assert_json_lines(what: &str, log: &str) {
    assert!(!log.trim().is_empty(), "{what}: empty log");
    for line in log.lines().filter(|l| !l.is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string() && v["message"].is_string(),
            "{what}: {line}"
        );
    }
}

#[test]
fn logs_in_files_have_no_colour_and_json_lines_parse() {
    let c = Cluster::new("ny", &["chicago"], &[vol(VOLUME, "16MiB")], "");
    let config = &c.site("ny").config;
    let log = c.dir.path().join("plain.log");

    let agent = Agent::start(config, &log, &[], &[]);
    agent.stop();
    let text = std::fs::read(&log).unwrap();
    assert!(!text.is_empty());
    assert!(
        !text.contains(&0x1b),
        "ESC in a log written to a file:\n{}",
        String::from_utf8_lossy(&text)
    );
    assert!(String::from_utf8_lossy(&text).contains(" INFO "));

    let agent = Agent::start(config, &log, &["--log-format", "json"], &[]);
    agent.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains('\u{1b}'));
    assert_json_lines("agent --log-format json", &text);
    assert!(
        text.lines().any(|l| l.contains("\"level\":\"INFO\"")),
        "{text}"
    );

    let agent = Agent::start(config, &log, &[], &[("TANDEM_LOG_FORMAT", "json")]);
    agent.stop();
    assert_json_lines(
        "agent, TANDEM_LOG_FORMAT=json",
        &std::fs::read_to_string(&log).unwrap(),
    );

    // The witness too.
    let wlog = c.dir.path().join("witness-json.log");
    let mut witness = Command::new(TANDEM)
        .args(["witness", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--data-dir")
        .arg(c.dir.path().join("w"))
        .args(["--tls", "off", "--log-format", "json"])
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&wlog).unwrap())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(10), "the witness's first line", || {
        std::fs::read_to_string(&wlog).is_ok_and(|t| t.ends_with('\n'))
    });
    sigterm(&witness);
    wait_child(&mut witness, Duration::from_secs(20));
    assert_json_lines("witness", &std::fs::read_to_string(&wlog).unwrap());

    // A bad value is a usage error that says so.
    let out = run_with_timeout(
        Command::new(TANDEM)
            .args(["status", "--config"])
            .arg(config)
            .env("TANDEM_LOG_FORMAT", "xml"),
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TANDEM_LOG_FORMAT=\"xml\""));
}

/// A text log line without its timestamp (the first word).
fn body(line: &str) -> &str {
    line.trim_start()
        .split_once(' ')
        .map_or(line, |(_, rest)| rest.trim_start())
}

/// The most repeated identical lines of a log, most first.
fn most_repeated(log: &str) -> Vec<(usize, String)> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        *counts.entry(body(line)).or_default() += 1;
    }
    let mut v: Vec<(usize, String)> = counts.into_iter().map(|(l, n)| (n, l.to_owned())).collect();
    v.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    v.truncate(5);
    v
}

/// At most this many identical lines in one agent's log over the test
/// (a minute at most: one per 10 s window, and a line or two said again
/// by a role change).
const MAX_IDENTICAL: usize = 8;

#[test]
fn a_forced_failover_and_a_witness_outage_do_not_flood_the_logs() {
    let mut c = Cluster::new("ny", &["chicago"], &[vol(VOLUME, "16MiB")], "");
    let mut witness = Witness::start(c.dir.path());
    c.set_coordinator(&witness.section("2s"));
    c.start_any("ny");
    c.start_any("chicago");
    wait_until(Duration::from_secs(30), "ny primary", || {
        c.status("ny")["groups"][0]["role"] == "primary"
    });
    run_ok(
        Command::new(tool("qemu-io"))
            .args(["-f", "raw", "-c", "write -P 0x21 0 1M"])
            .arg(c.uri("ny", VOLUME)),
        Duration::from_secs(60),
    );

    // A forced failover, run on the primary, while a client writes.
    let mut writer = Command::new(tool("qemu-io"));
    writer.args(["-f", "raw"]);
    for i in 0..2000u64 {
        writer.args(["-c", &format!("write -P 0x22 {} 4k", (i % 256) * 4096)]);
    }
    let mut writer = writer
        .arg(c.uri("ny", VOLUME))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    run_ok(
        Command::new(TANDEM)
            .args(["failover", "g", "--to", "chicago", "--force", "--config"])
            .arg(&c.site("ny").config),
        Duration::from_secs(120),
    );
    wait_until(
        Duration::from_secs(30),
        "chicago primary, ny its replica",
        || {
            c.status("chicago")["groups"][0]["role"] == "primary"
                && c.status("ny")["groups"][0]["role"] == "replica"
                && c.status("ny")["groups"][0]["replicas"][0]["state"] == "streaming"
        },
    );

    let _ = writer.kill();
    let _ = writer.wait();

    // The witness stops for longer than a lease, and comes back (the
    // sites stay healthy: with failsafe ownership writes go on).
    witness.kill();
    wait_until(
        Duration::from_secs(20),
        "both sites a lease without the witness",
        || {
            ["ny", "chicago"].iter().all(|s| {
                let st = c.status(s);
                st["coordinator"]["reachable"] == false
                    && st["coordinator"]["lease_age_seconds"]
                        .as_f64()
                        .unwrap_or(0.0)
                        > 2.5
            })
        },
    );
    witness.restart();
    wait_until(
        Duration::from_secs(30),
        "the witness reachable again",
        || {
            ["ny", "chicago"]
                .iter()
                .all(|s| c.status(s)["coordinator"]["reachable"] == true)
        },
    );
    assert_eq!(c.status("chicago")["groups"][0]["role"], "primary");

    // A clean stop says the counts still owed.
    for site in ["ny", "chicago"] {
        assert!(c.stop(site).success());
    }
    for site in ["ny", "chicago"] {
        let log = c.site(site).log();
        if std::env::var_os("SHOW_LOGS").is_some() {
            eprintln!("--- {site} ---\n{log}");
        }
        let top = most_repeated(&log);
        assert!(
            top.first().is_some_and(|(n, _)| *n <= MAX_IDENTICAL),
            "{site}: identical lines {top:#?}"
        );
        // While the witness was away the store was read again and again
        // (every 200 ms): written once, the rest counted, not lost.
        let failed_reads: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("cannot read the coordinator"))
            .collect();
        assert!(
            failed_reads.len() >= 2
                && failed_reads
                    .iter()
                    .any(|l| l.contains("tandem::repeated") && l.contains(" in the last ")),
            "{site}: {failed_reads:#?}"
        );
    }
}
