//! `/metrics` of real agents (a primary and a replica under a real
//! witness) after real NBD I/O by qemu-io: `promtool check metrics`
//! accepts it, the per-volume NBD counters match the I/O done, every
//! latency histogram counts as many requests as the counters, and the
//! group's role, epoch, fencing (with its reason) and the coordinator's
//! reachability are there — also while the witness is down.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::*;

const VOLUME: &str = "v";

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new(tool("qemu-io"));
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(c.arg(uri), Duration::from_secs(120));
    assert!(!out.contains("failed"), "qemu-io: {out}");
    out
}

/// `GET /metrics` of a site.
fn metrics(c: &Cluster, site: &str) -> String {
    let (status, body) = api_call(c.site(site), "GET", "/metrics", "");
    assert_eq!(status, 200, "{body}");
    body
}

/// Every sample of the exposition: `name{labels}` -> value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            let v = match v {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap(),
            };
            (k.to_owned(), v)
        })
        .collect()
}

fn value(s: &BTreeMap<String, f64>, key: &str) -> f64 {
    *s.get(key)
        .unwrap_or_else(|| panic!("no sample {key} in {s:#?}"))
}

fn op(s: &BTreeMap<String, f64>, op: &str) -> f64 {
    value(
        s,
        &format!("tandem_nbd_ops_total{{group=\"g\",volume=\"{VOLUME}\",op=\"{op}\"}}"),
    )
}

fn latency_count(s: &BTreeMap<String, f64>, class: &str) -> f64 {
    let labels = format!("group=\"g\",volume=\"{VOLUME}\",op=\"{class}\"");
    let count = value(
        s,
        &format!("tandem_nbd_request_duration_seconds_count{{{labels}}}"),
    );
    let inf = value(
        s,
        &format!("tandem_nbd_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}}"),
    );
    assert_eq!(count, inf, "{class}: _count is the +Inf bucket");
    let sum = value(
        s,
        &format!("tandem_nbd_request_duration_seconds_sum{{{labels}}}"),
    );
    assert!(
        sum >= 0.0 && (count == 0.0) == (sum == 0.0),
        "{class}: sum {sum}"
    );
    count
}

#[test]
fn metrics_count_every_nbd_request_and_say_why_a_group_is_fenced() {
    let mut c = Cluster::new("ny", &["chicago"], &[vol(VOLUME, "16MiB")], "");
    let mut witness = Witness::start(c.dir.path());
    // Without failsafe ownership: the witness's loss alone fences.
    c.set_coordinator(&format!("{}\nfailsafe = false", witness.section("2s")));
    c.start_any("ny");
    c.start_any("chicago");
    wait_until(Duration::from_secs(30), "ny primary", || {
        c.status("ny")["groups"][0]["role"] == "primary"
    });

    // Before any I/O: the volume has not been served yet, or all zero.
    promtool(&metrics(&c, "ny"));

    // 3 writes (1 MiB, 64 KiB, 4 KiB), 1 write zeroes, 1 trim, 2 reads
    // (1 MiB, 4 KiB) and at least one flush (qemu-io flushes at exit).
    qemu_io(
        &c.uri("ny", VOLUME),
        &[
            "write -P 0x11 0 1M",
            "write -P 0x12 1M 64k",
            "write -P 0x13 2M 4k",
            "write -z 3M 64k",
            "discard 4M 64k",
            "flush",
            "read -P 0x11 0 1M",
            "read -P 0x13 2M 4k",
        ],
    );
    let text = metrics(&c, "ny");
    promtool(&text);
    let s = samples(&text);
    assert_eq!(op(&s, "write"), 3.0);
    assert_eq!(op(&s, "write_zeroes"), 1.0);
    assert_eq!(op(&s, "trim"), 1.0);
    assert_eq!(op(&s, "read"), 2.0);
    let flushes = op(&s, "flush");
    assert!(flushes >= 1.0, "flushes: {flushes}");
    let bytes = |dir: &str| {
        value(
            &s,
            &format!("tandem_nbd_bytes_total{{group=\"g\",volume=\"{VOLUME}\",op=\"{dir}\"}}"),
        )
    };
    assert_eq!(
        bytes("write"),
        f64::from((1 << 20) + (64 << 10) + (4 << 10))
    );
    assert_eq!(bytes("read"), f64::from((1 << 20) + (4 << 10)));
    assert_eq!(
        value(
            &s,
            &format!("tandem_nbd_errors_total{{group=\"g\",volume=\"{VOLUME}\"}}")
        ),
        0.0
    );
    assert_eq!(latency_count(&s, "read"), 2.0);
    assert_eq!(latency_count(&s, "write"), 5.0, "write, write zeroes, trim");
    assert_eq!(latency_count(&s, "flush"), flushes);
    // Roles, epoch, fencing, the coordinator.
    assert_eq!(
        value(&s, "tandem_group_role{group=\"g\",role=\"primary\"}"),
        1.0
    );
    assert_eq!(
        value(&s, "tandem_group_role{group=\"g\",role=\"fenced\"}"),
        0.0
    );
    assert_eq!(value(&s, "tandem_group_epoch{group=\"g\"}"), 1.0);
    assert_eq!(
        value(&s, "tandem_group_fenced{group=\"g\",reason=\"\"}"),
        0.0
    );
    assert_eq!(value(&s, "tandem_coordinator_up"), 1.0);
    let age = value(&s, "tandem_group_lease_age_seconds{group=\"g\"}");
    assert!((0.0..5.0).contains(&age), "lease age {age}");

    let replica = metrics(&c, "chicago");
    promtool(&replica);
    let r = samples(&replica);
    assert_eq!(
        value(&r, "tandem_group_role{group=\"g\",role=\"replica\"}"),
        1.0
    );
    assert!(
        !replica.contains("tandem_nbd_ops_total{"),
        "the replica serves no volume"
    );

    // The witness goes away: the primary fences, and says why.
    witness.kill();
    wait_until(Duration::from_secs(20), "ny fenced", || {
        c.status("ny")["groups"][0]["role"] == "fenced"
    });
    let g = c.status("ny")["groups"][0].clone();
    assert_eq!(g["fenced"]["reason"], "coordinator_unreachable", "{g:#}");
    let since = g["fenced"]["since"].as_str().unwrap().to_owned();
    assert!(
        since.len() == 20 && since.ends_with('Z'),
        "RFC 3339: {since}"
    );
    let table = run_ok(
        Command::new(TANDEM)
            .args(["status", "--config"])
            .arg(&c.site("ny").config),
        Duration::from_secs(20),
    );
    assert!(
        table.contains(&format!(
            "writes fenced since {since}: coordinator unreachable since 20"
        )),
        "{table}"
    );
    let text = metrics(&c, "ny");
    promtool(&text);
    let s = samples(&text);
    assert_eq!(
        value(
            &s,
            "tandem_group_fenced{group=\"g\",reason=\"coordinator_unreachable\"}"
        ),
        1.0
    );
    assert_eq!(
        value(&s, "tandem_group_role{group=\"g\",role=\"fenced\"}"),
        1.0
    );
    assert_eq!(value(&s, "tandem_coordinator_up"), 0.0);
    let fenced_since = value(&s, "tandem_group_fenced_since_seconds{group=\"g\"}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - 30.0..=now).contains(&fenced_since),
        "fenced since {fenced_since}, now {now}"
    );
    let log = c.site("ny").log();
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("group g: writes fenced: coordinator unreachable since 20"))
        .collect();
    assert_eq!(said.len(), 1, "one line when writes are fenced:\n{log}");

    // It comes back: writes resume, once said; the status loses `fenced`.
    witness.restart();
    wait_until(Duration::from_secs(30), "ny primary again", || {
        c.status("ny")["groups"][0]["role"] == "primary"
    });
    assert!(c.status("ny")["groups"][0].get("fenced").is_none());
    wait_until(Duration::from_secs(10), "the resume logged", || {
        c.site("ny").log().contains("group g: writes resumed after")
    });
    let s = samples(&metrics(&c, "ny"));
    assert_eq!(value(&s, "tandem_coordinator_up"), 1.0);
    assert_eq!(
        value(&s, "tandem_group_fenced{group=\"g\",reason=\"\"}"),
        0.0
    );
    qemu_io(&c.uri("ny", VOLUME), &["write -P 0x14 5M 4k"]);
    let s = samples(&metrics(&c, "ny"));
    assert_eq!(op(&s, "write"), 4.0, "counting goes on");
}
