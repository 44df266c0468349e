//! Recovery points on the surface (issue 12, deliverables 1's keys and 2),
//! with real agents: the history keys are checked like every key; a
//! replica with history lists its points (`tandem points`, oldest first,
//! the primary's times, increasing seqs), shows their window in status and
//! metrics; a group with `retention = "0s"` has none; `--site` asks another
//! site through the local agent (forwarded API requests over the peer
//! port), which answers configured peer sites only, and only requests that
//! may be forwarded.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

const VOLUME: &str = "v0";

fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut c = Command::new(tool("qemu-io"));
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(c.arg(uri), Duration::from_secs(60));
    assert!(!out.contains("failed"), "qemu-io: {out}");
}

/// `tandem points ARGS --config CONFIG`.
fn points(config: &Path, args: &[&str]) -> Output {
    run_with_timeout(
        Command::new(TANDEM)
            .arg("points")
            .args(args)
            .arg("--config")
            .arg(config),
        Duration::from_secs(30),
    )
}

fn ok_json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis()
}

/// An RFC 3339 time with milliseconds in UTC, as ms since the epoch.
fn parse_time(s: &str) -> u128 {
    assert!(
        s.len() == "2026-12-05T10:15:00.123Z".len() && s.ends_with('Z') && s.as_bytes()[19] == b'.',
        "not RFC 3339 with ms in UTC: {s}"
    );
    ms(humantime::parse_rfc3339(s).unwrap())
}

/// The value of the sample `key` (name and labels as written).
fn sample(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
}

/// The peer `listen` address of a site.
fn listen(c: &Cluster, site: &str) -> String {
    std::fs::read_to_string(&c.site(site).config)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("listen = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_owned()
}

/// Sends one `ApiRequest` to a site's peer port as `asker`; its answer.
fn ask_peer(
    c: &Cluster,
    site: &str,
    asker: &str,
    method: &str,
    path: &str,
) -> tandem_peer::Message {
    let mut tcp = std::net::TcpStream::connect(listen(c, site)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut scratch = Vec::new();
    tandem_peer::write_message(
        &mut tcp,
        &tandem_peer::Message::ApiRequest {
            site: asker.into(),
            method: method.into(),
            path: path.into(),
            query: String::new(),
            body: tandem_peer::Payload::empty(),
        },
        &mut scratch,
    )
    .unwrap();
    tandem_peer::read_message(&mut tcp, &mut scratch).unwrap()
}

#[test]
fn history_keys_are_checked_with_file_line_and_key() {
    for (bad, key, says) in [
        (
            "retention = \"1 day\"",
            "group[0].retention",
            "invalid duration",
        ),
        (
            "history_max = \"0GiB\"",
            "group[0].history_max",
            "to keep no history, set retention = \"0s\"",
        ),
        (
            "history_max = \"lots\"",
            "group[0].history_max",
            "invalid size",
        ),
        (
            "test_scratch_max = 0",
            "group[0].test_scratch_max",
            "greater than zero",
        ),
    ] {
        let c = Cluster::new("a", &["b"], &[vol(VOLUME, "8MiB")], bad);
        let config = &c.site("b").config;
        let out = run_with_timeout(
            Command::new(TANDEM).args(["check", "--config"]).arg(config),
            Duration::from_secs(20),
        );
        assert_eq!(out.status.code(), Some(1), "{bad}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let line = std::fs::read_to_string(config)
            .unwrap()
            .lines()
            .position(|l| l == bad)
            .unwrap()
            + 1;
        assert!(
            err.contains(&format!("{}:{line}:", config.display()))
                && err.contains(key)
                && err.contains(says),
            "{bad}: {err}"
        );
    }
    // Good values pass.
    let c = Cluster::new(
        "a",
        &["b"],
        &[vol(VOLUME, "8MiB")],
        "retention = \"72h\"\nhistory_max = \"50GiB\"\ntest_scratch_max = \"1GiB\"",
    );
    let out = run_with_timeout(
        Command::new(TANDEM)
            .args(["check", "--config"])
            .arg(&c.site("b").config),
        Duration::from_secs(20),
    );
    assert!(out.status.success(), "{out:?}");
}

/// Needs the history core (points are made of the primary's `Mark`s).
#[test]
fn a_replica_lists_its_points_oldest_first_here_and_through_another_site() {
    let mut c = Cluster::new("a", &["b", "c"], &[vol(VOLUME, "16MiB")], "");
    c.start("b");
    c.start("c");
    c.start("a");
    let began = SystemTime::now();
    // Writes with flushes, spread over more than a second.
    for i in 0..4u32 {
        qemu_io(
            &c.uri("a", VOLUME),
            &[&format!("write -P {} {}k 64k", 0x20 + i, i * 64), "flush"],
        );
        std::thread::sleep(Duration::from_millis(400));
    }
    c.wait_replicated(Duration::from_secs(60));
    let ended = SystemTime::now();

    // Points are listed once applied: wait until b lists the flushes'
    // and its list no longer grows (the primary marks an idle stream's
    // last record too).
    let mut previous = serde_json::Value::Null;
    let list = poll(Duration::from_secs(30), || {
        let out = points(&c.site("b").config, &["g", "--json"]);
        let v = ok_json(&out);
        let settled = v == previous && v["points"].as_array().map_or(0, Vec::len) >= 4;
        previous = v.clone();
        settled.then_some(v)
    })
    .unwrap_or_else(|| {
        panic!(
            "b lists no points: {}",
            String::from_utf8_lossy(&points(&c.site("b").config, &["g", "--json"]).stdout)
        )
    });
    // Exactly the pinned shape, oldest first.
    let keys: Vec<&String> = list.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["group", "points", "site"], "{list:#}");
    assert_eq!(list["group"], "g");
    assert_eq!(list["site"], "b");
    let pts = list["points"].as_array().unwrap();
    let mut last: Option<(u128, u64)> = None;
    for p in pts {
        let fields: Vec<&String> = p.as_object().unwrap().keys().collect();
        assert_eq!(fields, ["seq", "time"], "{p}");
        let t = parse_time(p["time"].as_str().unwrap());
        let seq = p["seq"].as_u64().unwrap();
        assert!(
            ms(began) <= t + 1000 && t <= ms(ended) + 1000,
            "point {p} outside the test's window"
        );
        if let Some((lt, ls)) = last {
            assert!(seq > ls && t >= lt, "not oldest first: {list:#}");
        }
        last = Some((t, seq));
    }
    let newest_seq = pts.last().unwrap()["seq"].as_u64().unwrap();
    let a = c.status("a");
    let next = a["groups"][0]["next_seq"].as_u64().unwrap();
    assert!(
        newest_seq < next,
        "the newest point ({newest_seq}) is a write the primary made (next {next})"
    );

    // Status: b's own entry carries the window; the history's bytes.
    let s = c.status("b");
    let me = &s["groups"][0]["replicas"][0];
    assert_eq!(me["site"], "b");
    // (A later mark may add a point: the window holds at least the list.)
    let count = me["points"]["count"].as_u64().unwrap();
    assert!(count >= pts.len() as u64, "{me:#}");
    assert_eq!(me["points"]["oldest"], pts[0]["time"]);
    let newest = parse_time(me["points"]["newest"].as_str().unwrap());
    assert!(newest >= parse_time(pts[pts.len() - 1]["time"].as_str().unwrap()));
    assert!(me["history"]["bytes"].as_u64().unwrap() > 0, "{me:#}");
    assert_eq!(me["history"]["dropped_bytes"], 0);
    assert_eq!(me["history"]["held_over_cap"], false);
    // The cluster view, from the primary, carries b's window on its entry.
    let cluster = run_ok(
        Command::new(TANDEM)
            .args(["status", "--json", "--config"])
            .arg(&c.site("a").config),
        Duration::from_secs(20),
    );
    let cluster: serde_json::Value = serde_json::from_str(&cluster).unwrap();
    let b = cluster["groups"][0]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["site"] == "b")
        .unwrap()
        .clone();
    assert!(
        b["points"]["count"].as_u64().unwrap() >= pts.len() as u64,
        "{b:#}"
    );
    assert_eq!(b["points"]["oldest"], pts[0]["time"], "{b:#}");

    // Metrics on b, clean for promtool.
    let (code, text) = api_call(c.site("b"), "GET", "/metrics", "");
    assert_eq!(code, 200);
    promtool(&text);
    assert!(sample(&text, "tandem_history_points{group=\"g\"}").unwrap() >= pts.len() as f64);
    assert!(sample(&text, "tandem_history_bytes{group=\"g\"}").unwrap() > 0.0);
    let age = sample(
        &text,
        "tandem_history_oldest_point_age_seconds{group=\"g\"}",
    )
    .unwrap();
    assert!((0.0..600.0).contains(&age), "age {age}");
    assert_eq!(
        sample(&text, "tandem_history_dropped_bytes_total{group=\"g\"}"),
        Some(0.0)
    );

    // Text: both ends, count and bytes.
    let out = points(&c.site("b").config, &["g"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(" recovery points, "), "{text}");
    let oldest = format!(
        "oldest  {}  seq {}",
        pts[0]["time"].as_str().unwrap(),
        pts[0]["seq"]
    );
    assert!(text.contains(&oldest), "{text}");
    assert!(text.contains("newest  "), "{text}");

    // The primary keeps none: it says which sites do.
    let out = points(&c.site("a").config, &["g"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("keeps no recovery points") && err.contains("b, c"),
        "{err}"
    );
    // Through the primary's agent, b's list: the same.
    let forwarded = ok_json(&points(
        &c.site("a").config,
        &["g", "--site", "b", "--json"],
    ));
    assert_eq!(forwarded["site"], "b");
    let fwd = forwarded["points"].as_array().unwrap();
    assert!(
        fwd.len() >= pts.len() && fwd[..pts.len()] == pts[..],
        "{forwarded:#}"
    );
    // And c's, through b.
    let from_c = ok_json(&points(
        &c.site("b").config,
        &["g", "--site", "c", "--json"],
    ));
    assert_eq!(from_c["site"], "c");
    assert!(
        !from_c["points"].as_array().unwrap().is_empty(),
        "{from_c:#}"
    );
}

#[test]
fn without_history_there_are_no_points() {
    let mut c = Cluster::new("a", &["b"], &[vol(VOLUME, "8MiB")], "retention = \"0s\"");
    c.start("b");
    c.start("a");
    qemu_io(&c.uri("a", VOLUME), &["write -P 0x31 0 64k", "flush"]);
    c.wait_replicated(Duration::from_secs(60));
    let s = c.status("b");
    let me = &s["groups"][0]["replicas"][0];
    assert_eq!(me["site"], "b");
    assert!(me.get("points").is_none(), "{me:#}");
    assert!(me.get("history").is_none(), "{me:#}");
    let out = points(&c.site("b").config, &["g", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("409") && err.contains("keeps no recovery points (retention = \"0s\")"),
        "{err}"
    );
    let (code, text) = api_call(c.site("b"), "GET", "/metrics", "");
    assert_eq!(code, 200);
    assert!(!text.contains("tandem_history_"), "{text}");
}

#[test]
fn forwarding_is_for_peer_sites_and_listed_requests_only() {
    let mut c = Cluster::new("a", &["b"], &[vol(VOLUME, "8MiB")], "");
    c.start("b");
    c.start("a");
    let points_path = "/api/v1/groups/g/points";

    // A stranger speaking the peer protocol is refused.
    match ask_peer(&c, "b", "mallory", "GET", points_path) {
        tandem_peer::Message::Refuse { reason } => {
            assert!(reason.contains("not a peer site"), "{reason}")
        }
        other => panic!("answered {other:?}"),
    }
    // A peer site, but a request that changes ownership: refused.
    match ask_peer(&c, "b", "a", "POST", "/api/v1/groups/g/failover") {
        tandem_peer::Message::Refuse { reason } => {
            assert!(
                reason.contains("cannot be sent to another site"),
                "{reason}"
            )
        }
        other => panic!("answered {other:?}"),
    }
    // A peer site's listed request: served by b's API, answered with its
    // status and JSON body (b is a replica of g: its list, or, without
    // the history core, why not).
    match ask_peer(&c, "b", "a", "GET", points_path) {
        tandem_peer::Message::ApiAnswer { status, body } => {
            let v: serde_json::Value = serde_json::from_slice(&body.decode().unwrap()).unwrap();
            match status {
                200 => assert_eq!(v["site"], "b", "{v}"),
                409 => assert!(v["error"].as_str().unwrap().contains("(b)"), "{v}"),
                other => panic!("{other}: {v}"),
            }
        }
        other => panic!("answered {other:?}"),
    }
    // Unknown groups are the answering site's 404, passed through.
    let (code, body) = api_call(c.site("a"), "GET", "/api/v1/groups/nope/points?site=b", "");
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("no group named \\\"nope\\\""), "{body}");
    // Through the CLI: b asks a (the primary), which names its replica.
    let out = points(&c.site("b").config, &["g", "--site", "a"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("this site (a) keeps no recovery points of group g (it serves the group)")
            && err.contains("--site b"),
        "{err}"
    );
    // A site that is not in the cluster; a request that cannot be
    // forwarded; no token.
    let (code, body) = api_call(c.site("a"), "GET", "/api/v1/groups/g/points?site=zz", "");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not a site of this cluster"), "{body}");
    let (code, body) = api_call(c.site("a"), "POST", "/api/v1/groups/g/failover?site=b", "");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("cannot be sent to another site"), "{body}");
    let (code, _) = api_raw(
        c.site("a"),
        &format!("GET {points_path}?site=b HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
        b"",
    );
    assert_eq!(code, 401);
    // This site named: served here.
    let (code, body) = api_call(c.site("a"), "GET", &format!("{points_path}?site=a"), "");
    assert_eq!(code, 409, "{body}");
    // A site that is configured but down: a bad gateway, said at once.
    c.kill("b");
    let (code, body) = api_call(c.site("a"), "GET", &format!("{points_path}?site=b"), "");
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("site b"), "{body}");
    // a serves on.
    assert_eq!(c.status("a")["groups"][0]["role"], "primary");
}

/// Needs the history core and the primary's marks: `tandem recover
/// --site` runs on the site named, asked through another site's agent.
#[test]
fn recover_runs_on_the_site_named_through_another_sites_agent() {
    let mut c = Cluster::new("a", &["b", "c"], &[vol(VOLUME, "16MiB")], "");
    let witness = Witness::start(c.dir.path());
    c.set_coordinator(&witness.section("2s"));
    for s in ["a", "b", "c"] {
        c.start_any(s);
    }
    let socket = c.socket("a", VOLUME);
    wait_until(Duration::from_secs(30), "a serving", || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    // The replicas' first comparison over (writes during it travel as
    // its chunks, not as records marked as points).
    c.wait_replicated(Duration::from_secs(60));
    qemu_io(&c.uri("a", VOLUME), &["write -P 0x41 0 64k", "flush"]);
    let last = c.wait_replicated(Duration::from_secs(60))["groups"][0]["next_seq"]
        .as_u64()
        .unwrap()
        - 1;
    // The point of the last flush (qemu-io's at its exit): it holds the
    // write (an older point, of the comparison's end, would not).
    let good = poll(Duration::from_secs(30), || {
        let v = ok_json(&points(&c.site("b").config, &["g", "--json"]));
        v["points"]
            .as_array()?
            .iter()
            .find(|p| p["seq"].as_u64() == Some(last))
            .cloned()
    })
    .unwrap_or_else(|| {
        panic!(
            "b lists no point after the first flush: {}\n{:#}\n{:#}",
            String::from_utf8_lossy(&points(&c.site("b").config, &["g", "--json"]).stdout),
            c.status("b"),
            c.status("a")
        )
    });
    // The damage, replicated.
    qemu_io(&c.uri("a", VOLUME), &["write -P 0x66 0 64k", "flush"]);
    c.wait_replicated(Duration::from_secs(60));

    // From c: recover at b, at the good point.
    let out = run_with_timeout(
        Command::new(TANDEM)
            .args(["recover", "g", "--at", good["time"].as_str().unwrap()])
            .args(["--site", "b", "--config"])
            .arg(&c.site("c").config),
        Duration::from_secs(180),
    );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("owned by b"), "{said}");
    let socket = c.socket("b", VOLUME);
    wait_until(Duration::from_secs(30), "b serving", || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    qemu_io(&c.uri("b", VOLUME), &["read -P 0x41 0 64k"]);
}
