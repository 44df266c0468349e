//! Whole-file tests: the SPEC example, defaults, helpers, and every
//! validation error (each asserting file, line and key).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use super::*;

const FILE: &str = "/etc/tandem/tandem.toml";

/// SPEC §4.1's example, completed with the [[peer]] entries it refers to.
const SPEC_EXAMPLE: &str = r#"[site]
name = "ny"
data_dir = "/var/lib/tandem"
listen = "0.0.0.0:7450"        # peer (replication) listener
api = "127.0.0.1:7451"         # REST API, web console, /metrics

[tls]                          # mutual TLS between sites; required by default
ca = "/etc/tandem/tls/ca.pem"
cert = "/etc/tandem/tls/ny.pem"
key = "/etc/tandem/tls/ny.key"
# mode = "off"                 # accepted only when every address is loopback

[coordinator]
kind = "witness"               # "witness" | "etcd" | "none"
endpoints = ["10.0.3.1:7460"]
lease_ttl = "3s"

[[peer]]                       # every site, this one included
name = "ny"
address = "10.0.0.1:7450"

[[peer]]
name = "chicago"
address = "10.0.1.1:7450"
bandwidth = "200Mbit"          # optional
schedule = ["Mon-Fri 08:00-18:00 50Mbit"]   # optional windows, local time

[[peer]]
name = "seattle"
address = "10.0.2.1:7450"

[[group]]
name = "web01"
primary = "ny"                 # owner at first start; later the coordinator decides
replicas = [ { site = "chicago", priority = 1 }, { site = "seattle", priority = 2 } ]
mode = "async"                 # "async" | "sync"
sync_replicas = 1
failover = "automatic"         # "automatic" | "manual"
max_lag_on_failover = "30s"
volumes = [ { name = "web01-root", size = "20GiB" } ]
files = ["/etc/libvirt/qemu/web01.xml"]
on_promote = "/etc/tandem/hooks/start-vm web01"
on_demote = "/etc/tandem/hooks/stop-vm web01"
"#;

fn ok(text: &str) -> Config {
    match parse(text, Path::new(FILE)) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got: {e}\n{text}"),
    }
}

fn fails(text: &str) -> ConfigError {
    match parse(text, Path::new(FILE)) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e,
    }
}

/// The SPEC example with `old` replaced by `new` (which must occur).
fn spec_with(old: &str, new: &str) -> String {
    assert!(SPEC_EXAMPLE.contains(old), "{old:?} not in the example");
    SPEC_EXAMPLE.replacen(old, new, 1)
}

/// 1-based number of the first line of `text` containing `marker`.
fn line_of(text: &str, marker: &str) -> usize {
    text.lines()
        .position(|l| l.contains(marker))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{marker:?} not found"))
}

/// Asserts that `text` fails at the line containing `marker`, on `key`, with
/// a message containing `message`.
#[track_caller]
fn check(text: &str, marker: &str, key: &str, message: &str) -> ConfigError {
    let e = fails(text);
    let shown = e.to_string();
    let line = line_of(text, marker);
    assert!(
        shown.starts_with(&format!("{FILE}:{line}:")),
        "expected line {line}: {shown}"
    );
    assert_eq!(e.key(), Some(key), "{shown}");
    assert!(shown.contains(&format!(": {key}: ")), "{shown}");
    assert!(shown.contains(message), "expected {message:?} in: {shown}");
    assert_eq!(e.location().map(|l| l.line), Some(line));
    assert_eq!(e.file(), Path::new(FILE));
    e
}

// ---------------------------------------------------------------------------
// Valid files.

#[test]
fn spec_example_parses() {
    let c = ok(SPEC_EXAMPLE);
    assert_eq!(c.path, Path::new(FILE));
    assert_eq!(
        c.site,
        Site {
            name: "ny".into(),
            data_dir: "/var/lib/tandem".into(),
            listen: "0.0.0.0:7450".into(),
            api: "127.0.0.1:7451".into(),
            nbd_listen: None,
            nbd_tls: false,
            nbd_insecure: false,
        }
    );
    assert_eq!(c.tls.mode, TlsMode::On);
    assert_eq!(
        c.tls.ca.as_deref(),
        Some(Path::new("/etc/tandem/tls/ca.pem"))
    );
    assert_eq!(
        c.tls.cert.as_deref(),
        Some(Path::new("/etc/tandem/tls/ny.pem"))
    );
    assert_eq!(
        c.tls.key.as_deref(),
        Some(Path::new("/etc/tandem/tls/ny.key"))
    );
    assert_eq!(
        c.coordinator,
        Coordinator {
            kind: CoordinatorKind::Witness,
            endpoints: vec!["10.0.3.1:7460".into()],
            lease_ttl: Duration::from_secs(3),
            failsafe: true,
            prefix: "/tandem".into(),
            etcd: EtcdAccess::default(),
        }
    );
    assert_eq!(c.peers.len(), 3);
    let chicago = c.peer("chicago").unwrap();
    assert_eq!(chicago.address, "10.0.1.1:7450");
    assert_eq!(chicago.bandwidth, Some(Rate(200_000_000)));
    assert_eq!(
        chicago.schedule,
        vec!["Mon-Fri 08:00-18:00 50Mbit"
            .parse::<ScheduleWindow>()
            .unwrap()]
    );
    assert_eq!(
        c.groups,
        vec![Group {
            name: "web01".into(),
            primary: "ny".into(),
            replicas: vec![
                ReplicaSpec {
                    site: "chicago".into(),
                    priority: 1
                },
                ReplicaSpec {
                    site: "seattle".into(),
                    priority: 2
                },
            ],
            mode: Mode::Async,
            sync_replicas: 1,
            failover: FailoverPolicy::Automatic,
            max_lag_on_failover: Duration::from_secs(30),
            volumes: vec![VolumeSpec {
                name: "web01-root".into(),
                size: 20 << 30,
            }],
            files: vec!["/etc/libvirt/qemu/web01.xml".into()],
            on_promote: Some("/etc/tandem/hooks/start-vm web01".into()),
            on_demote: Some("/etc/tandem/hooks/stop-vm web01".into()),
            max_queue: 1 << 30,
            queue_memory: 256 << 20,
            on_sync_loss: OnSyncLoss::Suspend,
            on_lost_lease: OnLostLease::Suspend,
            on_promote_failure: OnPromoteFailure::Report,
            vm: None,
            vm_shutdown_timeout: Group::DEFAULT_VM_SHUTDOWN_TIMEOUT,
            retention: Duration::from_secs(24 * 3600),
            history_max: 10 << 30,
            test_scratch_max: 10 << 30,
        }]
    );
    assert_eq!(
        c.data_dir_location(),
        Location {
            line: 3,
            column: 12
        }
    );
}

#[test]
fn helpers() {
    let text = format!(
        "{SPEC_EXAMPLE}
[[group]]
name = \"db01\"
primary = \"chicago\"
replicas = [ {{ site = \"ny\" }}, {{ site = \"seattle\" }} ]
volumes = [ {{ name = \"db01-root\", size = \"8G\" }}, {{ name = \"db01-data\", size = 1073741824 }} ]
"
    );
    let c = ok(&text);
    assert_eq!(c.local_peer().name, "ny");
    assert_eq!(c.local_peer().address, "10.0.0.1:7450");
    let here: Vec<&str> = c.groups_primary_here().map(|g| g.name.as_str()).collect();
    assert_eq!(here, ["web01"]);
    let replica_here: Vec<&str> = c.groups_replica_here().map(|g| g.name.as_str()).collect();
    assert_eq!(replica_here, ["db01"]);
    assert_eq!(c.group("db01").unwrap().primary, "chicago");
    assert!(c.group("nope").is_none());
    let (g, v) = c.volume("db01-data").unwrap();
    assert_eq!((g.name.as_str(), v.size), ("db01", 1 << 30));
    assert!(c.volume("web01").is_none());
    // Default priorities follow list order.
    let db = c.group("db01").unwrap();
    assert_eq!(db.replicas[0].priority, 1);
    assert_eq!(db.replicas[1].priority, 2);
    assert!(db.involves("seattle") && db.involves("chicago"));
    assert_eq!(
        c.volume_image_path("web01-root"),
        Path::new("/var/lib/tandem/volumes/web01-root.img")
    );
    assert_eq!(
        c.nbd_socket_path("web01-root"),
        Path::new("/var/lib/tandem/nbd/web01-root.sock")
    );
    assert_eq!(
        c.group_files_dir("web01"),
        Path::new("/var/lib/tandem/files/web01")
    );
    assert_eq!(c.api_token_path(), Path::new("/var/lib/tandem/api.token"));

    // Schedule first, bandwidth otherwise.
    let chicago = c.peer("chicago").unwrap();
    assert_eq!(chicago.rate_at(0, 9 * 60), Some(Rate(50_000_000)));
    assert_eq!(chicago.rate_at(0, 19 * 60), Some(Rate(200_000_000)));
    assert_eq!(chicago.rate_at(5, 9 * 60), Some(Rate(200_000_000)));
    assert_eq!(c.peer("seattle").unwrap().rate_at(0, 0), None);
}

#[test]
fn replicas_by_priority_sorts() {
    let text = spec_with(
        r#"replicas = [ { site = "chicago", priority = 1 }, { site = "seattle", priority = 2 } ]"#,
        r#"replicas = [ { site = "chicago", priority = 20 }, { site = "seattle", priority = 10 } ]"#,
    );
    let c = ok(&text);
    let order: Vec<&str> = c.groups[0]
        .replicas_by_priority()
        .iter()
        .map(|r| r.site.as_str())
        .collect();
    assert_eq!(order, ["seattle", "chicago"]);
}

#[test]
fn minimal_file_and_defaults() {
    let text = r#"
[site]
name = "a"
data_dir = "state"
listen = "127.0.0.1:7450"
api = "127.0.0.1:7451"

[tls]
mode = "off"

[[peer]]
name = "a"
address = "127.0.0.1:7450"

[[peer]]
name = "b"
address = "localhost:7550"

[[group]]
name = "g"
primary = "a"
replicas = [ { site = "b" } ]
volumes = [ { name = "v", size = "1M" } ]
"#;
    let c = parse(text, Path::new("/srv/demo/a.toml")).unwrap();
    // Relative data_dir is taken from the file's directory.
    assert_eq!(c.site.data_dir, Path::new("/srv/demo/state"));
    assert_eq!(
        c.tls,
        Tls {
            mode: TlsMode::Off,
            ca: None,
            cert: None,
            key: None
        }
    );
    assert_eq!(c.coordinator, Coordinator::default());
    assert_eq!(c.coordinator.kind, CoordinatorKind::None);
    let g = &c.groups[0];
    assert_eq!(g.mode, Mode::Async);
    assert_eq!(g.sync_replicas, 1);
    assert_eq!(g.failover, FailoverPolicy::Automatic);
    assert_eq!(g.max_lag_on_failover, Duration::from_secs(30));
    assert_eq!(g.max_queue, 1 << 30);
    assert_eq!(g.queue_memory, 256 << 20);
    assert_eq!(g.on_sync_loss, OnSyncLoss::Suspend);
    assert_eq!(g.on_lost_lease, OnLostLease::Suspend);
    assert!(g.files.is_empty() && g.on_promote.is_none() && g.on_demote.is_none());
    assert_eq!(g.replicas[0].priority, 1);
    assert_eq!(g.retention, Duration::from_secs(24 * 3600));
    assert!(g.keeps_history());
    assert_eq!(g.history_max, 10 << 30);
    assert_eq!(g.test_scratch_max, 10 << 30);
}

#[test]
fn history_keys() {
    let text = spec_with(
        "max_lag_on_failover = \"30s\"",
        "retention = \"72h\"\nhistory_max = \"50GiB\"\ntest_scratch_max = \"2GiB\"",
    );
    let g = &ok(&text).groups[0];
    assert_eq!(g.retention, Duration::from_secs(72 * 3600));
    assert_eq!(g.history_max, 50 << 30);
    assert_eq!(g.test_scratch_max, 2 << 30);
    // No history: the replica keeps only its redo journal.
    let text = spec_with("max_lag_on_failover = \"30s\"", "retention = \"0s\"");
    let g = &ok(&text).groups[0];
    assert_eq!(g.retention, Duration::ZERO);
    assert!(!g.keeps_history());
    // A runtime group's table keeps them.
    let mut g = ok(&text).groups[0].clone();
    g.history_max = 3 << 30;
    let toml = g.to_toml();
    assert!(toml.contains("retention = \"0s\""), "{toml}");
    assert!(toml.contains("history_max = \"3GiB\""), "{toml}");
    assert!(toml.contains("test_scratch_max = \"10GiB\""), "{toml}");
}

#[test]
fn added_keys() {
    let text = spec_with(
        "api = \"127.0.0.1:7451\"",
        "api = \"127.0.0.1:7451\"\nnbd_listen = \"127.0.0.1:10809\"",
    );
    let text = text
        .replacen(
            "kind = \"witness\"",
            "kind = \"etcd\"\nprefix = \"/prod/tandem\"",
            1,
        )
        .replacen(
            "[\"10.0.3.1:7460\"]",
            "[\"https://10.0.3.1:2379\", \"https://10.0.3.2:2379/\"]",
            1,
        )
        .replacen(
            "mode = \"async\"",
            "mode = \"sync\"\nmax_queue = \"4GiB\"\nqueue_memory = 134217728\n\
             on_sync_loss = \"degrade\"\non_lost_lease = \"error\"\non_promote_failure = \"next\"",
            1,
        )
        .replacen("failover = \"automatic\"", "failover = \"manual\"", 1)
        .replacen("lease_ttl = \"3s\"", "lease_ttl = \"1500ms\"", 1)
        .replacen(
            "max_lag_on_failover = \"30s\"",
            "max_lag_on_failover = \"0s\"",
            1,
        );
    let c = ok(&text);
    assert_eq!(c.site.nbd_listen.as_deref(), Some("127.0.0.1:10809"));
    assert_eq!(c.coordinator.kind, CoordinatorKind::Etcd);
    assert_eq!(c.coordinator.prefix, "/prod/tandem");
    assert_eq!(c.coordinator.endpoints.len(), 2);
    assert_eq!(c.coordinator.lease_ttl, Duration::from_millis(1500));
    let g = &c.groups[0];
    assert_eq!(g.mode, Mode::Sync);
    assert_eq!(g.failover, FailoverPolicy::Manual);
    assert_eq!(g.max_lag_on_failover, Duration::ZERO);
    assert_eq!(g.max_queue, 4 << 30);
    assert_eq!(g.queue_memory, 128 << 20);
    assert_eq!(g.on_sync_loss, OnSyncLoss::Degrade);
    assert_eq!(g.on_lost_lease, OnLostLease::Error);
    assert_eq!(g.on_promote_failure, OnPromoteFailure::Next);
    assert_eq!(g.mode.to_string(), "sync");
}

#[test]
fn relative_tls_paths_follow_the_file() {
    let text = spec_with("ca = \"/etc/tandem/tls/ca.pem\"", "ca = \"tls/ca.pem\"");
    let c = parse(&text, Path::new("/opt/site/tandem.toml")).unwrap();
    assert_eq!(c.tls.ca.as_deref(), Some(Path::new("/opt/site/tls/ca.pem")));
    let c = parse(&text, Path::new("tandem.toml")).unwrap();
    assert_eq!(c.tls.ca.as_deref(), Some(Path::new("./tls/ca.pem")));
}

#[test]
fn load_reads_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tandem.toml");
    std::fs::write(&path, SPEC_EXAMPLE).unwrap();
    let c = load(&path).unwrap();
    assert_eq!(c.path, path);
    assert_eq!(c.site.name, "ny");

    let missing = dir.path().join("nope.toml");
    let e = load(&missing).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }));
    assert!(e.to_string().starts_with(&format!(
        "{}: cannot read configuration file:",
        missing.display()
    )));
    assert_eq!(e.location(), None);
}

// ---------------------------------------------------------------------------
// Syntax errors.

#[test]
fn syntax_error_has_position() {
    let text = spec_with("lease_ttl = \"3s\"", "lease_ttl = \"3s");
    let e = fails(&text);
    let line = line_of(&text, "lease_ttl");
    assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
    assert!(e.to_string().starts_with(&format!("{FILE}:{line}:")), "{e}");
    assert!(!e.to_string().contains('\n'));

    let text = spec_with("name = \"ny\"\n", "name = \"ny\"\nname = \"ny\"\n");
    let e = fails(&text);
    assert!(matches!(e, ConfigError::Syntax { .. }));
    assert_eq!(e.location().map(|l| l.line), Some(3));
    assert!(e.to_string().contains("duplicate key"), "{e}");
}

// ---------------------------------------------------------------------------
// Unknown keys, wrong types, missing keys.

#[test]
fn unknown_keys() {
    let text = spec_with("name = \"ny\"\n", "name = \"ny\"\ncolour = \"blue\"\n");
    let e = check(&text, "colour", "site.colour", "unknown key `colour`");
    assert_eq!(e.location(), Some(Location { line: 3, column: 1 }));

    let text = spec_with("[coordinator]", "[extra]\nx = 1\n\n[coordinator]");
    check(&text, "[extra]", "extra", "unknown key `extra`");

    let text = spec_with("lease_ttl = \"3s\"", "lease_ttl = \"3s\"\ntimeout = \"3s\"");
    check(&text, "timeout", "coordinator.timeout", "unknown key");

    let text = spec_with("# mode = \"off\"", "mod = \"off\"");
    check(&text, "mod = ", "tls.mod", "unknown key");

    let text = spec_with("bandwidth = \"200Mbit\"", "bandwith = \"200Mbit\"");
    check(
        &text,
        "bandwith",
        "peer[1].bandwith",
        "unknown key `bandwith`",
    );

    let text = spec_with("sync_replicas = 1", "sync_replica = 1");
    check(
        &text,
        "sync_replica",
        "group[0].sync_replica",
        "unknown key",
    );
}

#[test]
fn unknown_keys_in_inline_tables() {
    let text = spec_with(
        "{ site = \"seattle\", priority = 2 }",
        "{ site = \"seattle\", priority = 2, weight = 3 }",
    );
    let e = check(
        &text,
        "replicas =",
        "group[0].replicas[1].weight",
        "unknown key `weight`",
    );
    let col = text
        .lines()
        .nth(e.location().unwrap().line - 1)
        .unwrap()
        .find("weight")
        .unwrap()
        + 1;
    assert_eq!(e.location().unwrap().column, col);

    let text = spec_with("size = \"20GiB\" }", "size = \"20GiB\", thin = true }");
    check(
        &text,
        "volumes =",
        "group[0].volumes[0].thin",
        "unknown key `thin`",
    );
}

#[test]
fn wrong_types() {
    let text = spec_with("sync_replicas = 1", "sync_replicas = \"one\"");
    check(
        &text,
        "sync_replicas",
        "group[0].sync_replicas",
        "invalid type: string \"one\"",
    );

    let text = spec_with("name = \"ny\"\n", "name = 7\n");
    check(&text, "name = 7", "site.name", "invalid type: integer `7`");

    let text = spec_with(
        "volumes = [ { name = \"web01-root\", size = \"20GiB\" } ]",
        "volumes = \"web01-root\"",
    );
    check(
        &text,
        "volumes =",
        "group[0].volumes",
        "invalid type: string",
    );

    let text = spec_with(
        "endpoints = [\"10.0.3.1:7460\"]",
        "endpoints = \"10.0.3.1:7460\"",
    );
    check(&text, "endpoints", "coordinator.endpoints", "invalid type");

    let text = spec_with("priority = 2", "priority = -2");
    check(
        &text,
        "priority = -2",
        "group[0].replicas[1].priority",
        "invalid value",
    );

    let text = spec_with("lease_ttl = \"3s\"", "lease_ttl = 3");
    check(
        &text,
        "lease_ttl",
        "coordinator.lease_ttl",
        "expected a duration like \"3s\"",
    );

    let text = spec_with("bandwidth = \"200Mbit\"", "bandwidth = 200");
    check(&text, "bandwidth", "peer[1].bandwidth", "expected a rate");

    let text = spec_with(
        "max_lag_on_failover = \"30s\"",
        "max_lag_on_failover = 1979-05-27T07:32:00Z",
    );
    check(
        &text,
        "max_lag_on_failover",
        "group[0].max_lag_on_failover",
        "invalid type",
    );

    let text = spec_with("mode = \"async\"", "mode = \"semi\"");
    check(
        &text,
        "mode = \"semi\"",
        "group[0].mode",
        "unknown value `semi`, expected `async` or `sync`",
    );

    let text = spec_with("kind = \"witness\"", "kind = \"zookeeper\"");
    check(
        &text,
        "zookeeper",
        "coordinator.kind",
        "unknown value `zookeeper`",
    );

    let text = spec_with("# mode = \"off\"", "mode = \"maybe\"");
    check(&text, "maybe", "tls.mode", "unknown value");

    let text = spec_with(
        "files = [\"/etc/libvirt/qemu/web01.xml\"]",
        "files = [\"/a\", 5]",
    );
    check(
        &text,
        "files =",
        "group[0].files[1]",
        "invalid type: integer `5`",
    );
}

#[test]
fn missing_required_keys() {
    let cases: [(&str, &str, &str, &str); 12] = [
        ("name = \"ny\"\n", "", "[site]", "site.name"),
        (
            "data_dir = \"/var/lib/tandem\"\n",
            "",
            "[site]",
            "site.data_dir",
        ),
        ("listen = \"0.0.0.0:7450\"", "", "[site]", "site.listen"),
        ("api = \"127.0.0.1:7451\"", "", "[site]", "site.api"),
        ("name = \"web01\"\n", "", "[[group]]", "group[0].name"),
        ("primary = \"ny\"", "", "[[group]]", "group[0].primary"),
        (
            "volumes = [ { name = \"web01-root\", size = \"20GiB\" } ]",
            "",
            "[[group]]",
            "group[0].volumes",
        ),
        (
            "{ name = \"web01-root\", size = \"20GiB\" }",
            "{ size = \"20GiB\" }",
            "volumes =",
            "group[0].volumes[0].name",
        ),
        (
            "{ name = \"web01-root\", size = \"20GiB\" }",
            "{ name = \"web01-root\" }",
            "volumes =",
            "group[0].volumes[0].size",
        ),
        (
            "name = \"chicago\"\n",
            "",
            "address = \"10.0.1.1:7450\"",
            "peer[1].name",
        ),
        (
            "address = \"10.0.2.1:7450\"",
            "",
            "name = \"seattle\"",
            "peer[2].address",
        ),
        (
            "{ site = \"chicago\", priority = 1 }",
            "{ priority = 1 }",
            "replicas =",
            "group[0].replicas[0].site",
        ),
    ];
    for (old, new, marker, key) in cases {
        let text = spec_with(old, new);
        // The error points at the table that lacks the key.
        // For the peers, the marker is the line after the [[peer]] header.
        let line = if marker.starts_with("address") || marker.starts_with("name") {
            line_of(&text, marker) - 1
        } else {
            line_of(&text, marker)
        };
        let e = fails(&text);
        assert_eq!(e.key(), Some(key), "{e}");
        assert_eq!(e.location().unwrap().line, line, "{e}");
        assert!(
            e.to_string()
                .ends_with(&format!(": {key}: missing required key")),
            "{e}"
        );
    }
}

#[test]
fn missing_site_section() {
    let text = SPEC_EXAMPLE.replacen("[site]", "[sight]", 1);
    check(&text, "[sight]", "sight", "unknown key");
    let text = "[[peer]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n";
    let e = fails(text);
    assert_eq!(e.key(), Some("site"));
    assert_eq!(
        e.to_string(),
        format!("{FILE}:1:1: site: missing required key")
    );
    let e = fails("");
    assert_eq!(e.key(), Some("site"));
}

// ---------------------------------------------------------------------------
// Bad values.

#[test]
fn bad_size_message_matches_the_documented_form() {
    let text = spec_with("size = \"20GiB\"", "size = \"20XB\"");
    let e = fails(&text);
    let line = line_of(&text, "20XB");
    let col = text
        .lines()
        .nth(line - 1)
        .unwrap()
        .find("\"20XB\"")
        .unwrap()
        + 1;
    assert_eq!(
        e.to_string(),
        format!(
            "{FILE}:{line}:{col}: group[0].volumes[0].size: invalid size \"20XB\": expected a \
             number with KiB/MiB/GiB/TiB (or K/M/G/T)"
        )
    );
}

#[test]
fn bad_values() {
    let text = spec_with(
        "size = \"20GiB\" }",
        "size = \"20GiB\" }, { name = \"b\", size = \"1.3K\" }",
    );
    check(
        &text,
        "1.3K",
        "group[0].volumes[1].size",
        "invalid size \"1.3K\"",
    );

    let text = spec_with("bandwidth = \"200Mbit\"", "bandwidth = \"200Mb\"");
    check(
        &text,
        "200Mb",
        "peer[1].bandwidth",
        "invalid rate \"200Mb\"",
    );

    let text = spec_with("bandwidth = \"200Mbit\"", "bandwidth = \"0Mbit\"");
    check(&text, "0Mbit", "peer[1].bandwidth", "greater than zero");

    let text = spec_with("lease_ttl = \"3s\"", "lease_ttl = \"3 sec\"");
    check(
        &text,
        "lease_ttl",
        "coordinator.lease_ttl",
        "invalid duration \"3 sec\"",
    );

    let text = spec_with("lease_ttl = \"3s\"", "lease_ttl = \"0s\"");
    check(
        &text,
        "lease_ttl",
        "coordinator.lease_ttl",
        "greater than zero",
    );
    for bad in ["1ns", "50ms", "999ms", "61m", "48h"] {
        let text = spec_with("lease_ttl = \"3s\"", &format!("lease_ttl = \"{bad}\""));
        check(
            &text,
            "lease_ttl",
            "coordinator.lease_ttl",
            "must be from 1s to 1h",
        );
    }
    for good in ["1s", "1h"] {
        let text = spec_with("lease_ttl = \"3s\"", &format!("lease_ttl = \"{good}\""));
        assert!(
            crate::parse(&text, std::path::Path::new(FILE)).is_ok(),
            "{good}"
        );
    }

    let text = spec_with(
        "max_lag_on_failover = \"30s\"",
        "max_lag_on_failover = \"30\"",
    );
    check(
        &text,
        "max_lag",
        "group[0].max_lag_on_failover",
        "invalid duration \"30\"",
    );

    let text = spec_with("max_lag_on_failover = \"30s\"", "max_queue = \"1 bucket\"");
    check(&text, "max_queue", "group[0].max_queue", "invalid size");

    let text = spec_with("max_lag_on_failover = \"30s\"", "queue_memory = 0");
    check(
        &text,
        "queue_memory",
        "group[0].queue_memory",
        "greater than zero",
    );

    let text = spec_with("max_lag_on_failover = \"30s\"", "retention = \"1 day\"");
    check(
        &text,
        "retention",
        "group[0].retention",
        "invalid duration \"1 day\"",
    );
    let text = spec_with("max_lag_on_failover = \"30s\"", "retention = 3600");
    check(&text, "retention", "group[0].retention", "a duration");
    let text = spec_with("max_lag_on_failover = \"30s\"", "history_max = \"0GiB\"");
    check(
        &text,
        "history_max",
        "group[0].history_max",
        "greater than zero (to keep no history, set retention = \"0s\")",
    );
    let text = spec_with("max_lag_on_failover = \"30s\"", "history_max = \"lots\"");
    check(&text, "history_max", "group[0].history_max", "invalid size");
    let text = spec_with("max_lag_on_failover = \"30s\"", "test_scratch_max = 0");
    check(
        &text,
        "test_scratch_max",
        "group[0].test_scratch_max",
        "greater than zero",
    );

    let text = spec_with("max_lag_on_failover = \"30s\"", "max_queue = -1");
    check(&text, "max_queue", "group[0].max_queue", "invalid size -1");

    let text = spec_with(
        "schedule = [\"Mon-Fri 08:00-18:00 50Mbit\"]",
        "schedule = [\"Mon-Fri 08:00-18:00 50Mbit\", \"Sat 8-18 1Mbit\"]",
    );
    check(
        &text,
        "schedule",
        "peer[1].schedule[1]",
        "invalid schedule \"Sat 8-18 1Mbit\"",
    );

    let text = spec_with("listen = \"0.0.0.0:7450\"", "listen = \"7450\"");
    check(&text, "listen", "site.listen", "invalid address \"7450\"");

    let text = spec_with(
        "address = \"10.0.2.1:7450\"",
        "address = \"10.0.2.1:99999\"",
    );
    check(&text, "99999", "peer[2].address", "port");

    let text = spec_with("address = \"10.0.2.1:7450\"", "address = \"10.0.2.1:0\"");
    check(&text, "10.0.2.1:0", "peer[2].address", "port 0");

    let text = spec_with("address = \"10.0.2.1:7450\"", "address = \"fe80::1:7450\"");
    check(&text, "fe80", "peer[2].address", "brackets");

    let text = spec_with(
        "endpoints = [\"10.0.3.1:7460\"]",
        "endpoints = [\"10.0.3.1\"]",
    );
    check(
        &text,
        "endpoints",
        "coordinator.endpoints[0]",
        "invalid address",
    );

    let text = spec_with(
        "endpoints = [\"10.0.3.1:7460\"]",
        "endpoints = [\"a:1\", \"a:1\"]",
    );
    check(
        &text,
        "endpoints",
        "coordinator.endpoints[1]",
        "duplicate endpoint",
    );

    let text = spec_with("lease_ttl = \"3s\"", "prefix = \"tandem\"");
    check(&text, "prefix", "coordinator.prefix", "must start with '/'");

    let text = spec_with("data_dir = \"/var/lib/tandem\"", "data_dir = \"\"");
    check(&text, "data_dir", "site.data_dir", "must not be empty");

    let text = spec_with(
        "on_demote = \"/etc/tandem/hooks/stop-vm web01\"",
        "on_demote = \" \"",
    );
    check(
        &text,
        "on_demote",
        "group[0].on_demote",
        "must not be empty",
    );

    let text = spec_with("api = \"127.0.0.1:7451\"", "api = \"127.0.0.1:7450\"");
    check(&text, "api =", "site.api", "same port as site.listen");
}

#[test]
fn volume_sizes() {
    for bad in ["\"0\"", "0", "\"1000B\"", "1000", "\"1.25K\"", "\"511\""] {
        let text = spec_with("size = \"20GiB\"", &format!("size = {bad}"));
        check(
            &text,
            "volumes =",
            "group[0].volumes[0].size",
            "volume size must be a non-zero multiple of 512 bytes",
        );
    }
    for good in ["512", "\"512B\"", "\"1.5KiB\"", "\"4T\""] {
        ok(&spec_with("size = \"20GiB\"", &format!("size = {good}")));
    }
}

#[test]
fn names_are_file_safe() {
    let long = "a".repeat(65);
    let max = "a".repeat(64);
    ok(&spec_with("name = \"web01\"", &format!("name = \"{max}\"")));
    ok(&spec_with("name = \"web01\"", "name = \"Web_01.prod-x\""));
    let cases = [
        (
            "name = \"web01\"",
            "name = \"web/01\"".to_string(),
            "group[0].name",
        ),
        (
            "name = \"web01\"",
            "name = \".hidden\"".to_string(),
            "group[0].name",
        ),
        (
            "name = \"web01\"",
            format!("name = \"{long}\""),
            "group[0].name",
        ),
        (
            "name = \"web01\"",
            "name = \"\"".to_string(),
            "group[0].name",
        ),
        (
            "name = \"web01-root\"",
            "name = \"-root\"".to_string(),
            "group[0].volumes[0].name",
        ),
        (
            "name = \"web01-root\"",
            "name = \"root vol\"".to_string(),
            "group[0].volumes[0].name",
        ),
        (
            "name = \"web01-root\"",
            "name = \"root.é\"".to_string(),
            "group[0].volumes[0].name",
        ),
        (
            "name = \"ny\"\n",
            "name = \"new york\"\n".to_string(),
            "site.name",
        ),
        (
            "name = \"seattle\"",
            "name = \"sea/ttle\"".to_string(),
            "peer[2].name",
        ),
    ];
    for (old, new, key) in cases {
        let text = spec_with(old, &new);
        check(&text, new.trim_end(), key, "invalid name");
    }
}

#[test]
fn files_must_be_absolute() {
    let text = spec_with(
        "files = [\"/etc/libvirt/qemu/web01.xml\"]",
        "files = [\"/etc/a.xml\", \"web01.xml\"]",
    );
    check(
        &text,
        "files",
        "group[0].files[1]",
        "\"web01.xml\" is not an absolute path",
    );

    let text = spec_with(
        "files = [\"/etc/libvirt/qemu/web01.xml\"]",
        "files = [\"/etc/../root/x\"]",
    );
    check(&text, "files", "group[0].files[0]", "must not contain '..'");

    let text = spec_with(
        "files = [\"/etc/libvirt/qemu/web01.xml\"]",
        "files = [\"/etc/a\", \"/etc/a\"]",
    );
    check(&text, "files", "group[0].files[1]", "duplicate file /etc/a");
}

// ---------------------------------------------------------------------------
// Duplicates and references.

#[test]
fn duplicate_peer_name() {
    let text = spec_with("name = \"seattle\"", "name = \"chicago\"");
    let first = line_of(&text, "name = \"chicago\"");
    let e = fails(&text);
    let line = line_of(&text, "address = \"10.0.2.1") - 1;
    assert_eq!(e.location(), Some(Location { line, column: 8 }));
    assert_eq!(e.key(), Some("peer[2].name"));
    assert!(
        e.to_string().ends_with(&format!(
            ": peer[2].name: duplicate peer name \"chicago\" (first defined at line {first})"
        )),
        "{e}"
    );
}

#[test]
fn duplicate_group_name() {
    let text = format!(
        "{SPEC_EXAMPLE}\n[[group]]\nname = \"web01\"\nprimary = \"ny\"\nvolumes = [ {{ name = \"v2\", size = \"1G\" }} ]\n"
    );
    let first = line_of(&text, "name = \"web01\"");
    let e = fails(&text);
    let second = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains("name = \"web01\""))
        .nth(1)
        .unwrap()
        .0
        + 1;
    assert_eq!(e.location().unwrap().line, second);
    assert_eq!(e.key(), Some("group[1].name"));
    assert!(
        e.to_string().contains(&format!(
            "duplicate group name \"web01\" (first defined at line {first})"
        )),
        "{e}"
    );
}

#[test]
fn duplicate_volume_name_across_groups() {
    let text = format!(
        "{SPEC_EXAMPLE}\n[[group]]\nname = \"web02\"\nprimary = \"chicago\"\n\
         volumes = [ {{ name = \"web02-root\", size = \"1G\" }}, {{ name = \"web01-root\", size = \"1G\" }} ]\n"
    );
    check(
        &text,
        "web02-root",
        "group[1].volumes[1].name",
        "duplicate volume name \"web01-root\" (already used in group \"web01\"",
    );

    // Within one group too.
    let text = spec_with(
        "size = \"20GiB\" }",
        "size = \"20GiB\" }, { name = \"web01-root\", size = \"1G\" }",
    );
    check(
        &text,
        "volumes",
        "group[0].volumes[1].name",
        "duplicate volume name",
    );
}

#[test]
fn duplicate_replica_site_and_priority() {
    let text = spec_with(
        "{ site = \"seattle\", priority = 2 }",
        "{ site = \"chicago\", priority = 2 }",
    );
    check(
        &text,
        "replicas",
        "group[0].replicas[1].site",
        "duplicate replica site \"chicago\"",
    );

    let text = spec_with(
        "{ site = \"seattle\", priority = 2 }",
        "{ site = \"seattle\", priority = 1 }",
    );
    let e = check(
        &text,
        "replicas",
        "group[0].replicas[1].priority",
        "duplicate priority 1",
    );
    let col = text
        .lines()
        .nth(e.location().unwrap().line - 1)
        .unwrap()
        .rfind("1 }")
        .unwrap()
        + 1;
    assert_eq!(e.location().unwrap().column, col);

    // A default priority (the position) can clash with an explicit one.
    let text = spec_with(
        "{ site = \"chicago\", priority = 1 }, { site = \"seattle\", priority = 2 }",
        "{ site = \"chicago\", priority = 2 }, { site = \"seattle\" }",
    );
    check(
        &text,
        "replicas",
        "group[0].replicas[1].priority",
        "duplicate priority 2",
    );
}

#[test]
fn unknown_sites() {
    let text = spec_with("primary = \"ny\"", "primary = \"boston\"");
    check(
        &text,
        "boston",
        "group[0].primary",
        "unknown site \"boston\"",
    );

    let text = spec_with(
        "{ site = \"seattle\", priority = 2 }",
        "{ site = \"denver\", priority = 2 }",
    );
    check(
        &text,
        "denver",
        "group[0].replicas[1].site",
        "unknown site \"denver\"",
    );

    let text = spec_with(
        "{ site = \"seattle\", priority = 2 }",
        "{ site = \"ny\", priority = 2 }",
    );
    check(
        &text,
        "replicas",
        "group[0].replicas[1].site",
        "is the group's primary",
    );

    let text = spec_with("name = \"ny\"\naddress", "name = \"newyork\"\naddress");
    check(
        &text,
        "name = \"ny\"",
        "site.name",
        "site \"ny\" is not listed in any [[peer]] table",
    );
}

#[test]
fn sync_replica_counts() {
    let text = spec_with("mode = \"async\"", "mode = \"sync\"").replacen(
        "sync_replicas = 1",
        "sync_replicas = 0",
        1,
    );
    check(
        &text,
        "sync_replicas",
        "group[0].sync_replicas",
        "at least 1",
    );

    let text = spec_with("mode = \"async\"", "mode = \"sync\"").replacen(
        "sync_replicas = 1",
        "sync_replicas = 3",
        1,
    );
    check(
        &text,
        "sync_replicas",
        "group[0].sync_replicas",
        "sync_replicas = 3, but the group has 2 replicas",
    );

    // Without replicas and with the default sync_replicas, the error is on mode.
    let text = spec_with("mode = \"async\"", "mode = \"sync\"")
        .replacen("sync_replicas = 1\n", "", 1)
        .replacen(
            "replicas = [ { site = \"chicago\", priority = 1 }, { site = \"seattle\", priority = 2 } ]\n",
            "",
            1,
        );
    check(&text, "mode = \"sync\"", "group[0].mode", "has 0 replicas");

    // Async mode does not look at sync_replicas.
    ok(&spec_with("sync_replicas = 1", "sync_replicas = 0"));
    ok(&spec_with("mode = \"async\"", "mode = \"sync\"").replacen(
        "sync_replicas = 1",
        "sync_replicas = 2",
        1,
    ));
}

// ---------------------------------------------------------------------------
// TLS and coordinator.

#[test]
fn tls_required_by_default() {
    let text = spec_with("cert = \"/etc/tandem/tls/ny.pem\"\n", "");
    check(&text, "[tls]", "tls.cert", "missing required key");

    let start = SPEC_EXAMPLE.find("[tls]").unwrap();
    let end = SPEC_EXAMPLE.find("[coordinator]").unwrap();
    let text = format!("{}{}", &SPEC_EXAMPLE[..start], &SPEC_EXAMPLE[end..]);
    let e = fails(&text);
    assert_eq!(e.key(), Some("tls.ca"));
    assert!(e.to_string().contains("missing [tls] section"), "{e}");
    assert_eq!(e.location(), Some(Location::START));
}

const LOOPBACK: &str = r#"[site]
name = "a"
data_dir = "/tmp/a"
listen = "127.0.0.1:7450"
api = "localhost:7451"
nbd_listen = "[::1]:10809"

[tls]
mode = "off"

[coordinator]
kind = "etcd"
endpoints = ["http://127.0.0.1:2379", "127.0.0.2:2379"]

[[peer]]
name = "a"
address = "127.0.0.1:7450"

[[peer]]
name = "b"
address = "127.1.2.3:7450"
"#;

#[test]
fn tls_off_only_on_loopback() {
    let c = ok(LOOPBACK);
    assert_eq!(c.tls.mode, TlsMode::Off);
    assert_eq!(c.coordinator.endpoints.len(), 2);

    let cases = [
        (
            "listen = \"127.0.0.1:7450\"",
            "listen = \"0.0.0.0:7450\"",
            "site.listen",
        ),
        (
            "api = \"localhost:7451\"",
            "api = \"10.0.0.1:7451\"",
            "site.api",
        ),
        (
            "nbd_listen = \"[::1]:10809\"",
            "nbd_listen = \"[::]:10809\"",
            "site.nbd_listen",
        ),
        (
            "\"http://127.0.0.1:2379\"",
            "\"http://etcd.example:2379\"",
            "coordinator.endpoints[0]",
        ),
        (
            "address = \"127.1.2.3:7450\"",
            "address = \"192.168.1.2:7450\"",
            "peer[1].address",
        ),
    ];
    for (old, new, key) in cases {
        assert!(LOOPBACK.contains(old));
        let text = LOOPBACK.replacen(old, new, 1);
        check(
            &text,
            new,
            key,
            "is not loopback, but tls mode = \"off\" (line 9)",
        );
    }

    // The first non-loopback address in file order is named.
    let text = LOOPBACK
        .replacen(
            "address = \"127.1.2.3:7450\"",
            "address = \"192.168.1.2:7450\"",
            1,
        )
        .replacen("api = \"localhost:7451\"", "api = \"0.0.0.0:7451\"", 1);
    check(&text, "api =", "site.api", "not loopback");
}

#[test]
fn coordinator_kinds() {
    let text = spec_with("endpoints = [\"10.0.3.1:7460\"]\n", "");
    check(
        &text,
        "kind = \"witness\"",
        "coordinator.endpoints",
        "needs at least one endpoint",
    );

    let text = spec_with("endpoints = [\"10.0.3.1:7460\"]", "endpoints = []");
    check(
        &text,
        "endpoints = []",
        "coordinator.endpoints",
        "needs at least one endpoint",
    );

    let text = spec_with("kind = \"witness\"", "kind = \"none\"");
    check(
        &text,
        "endpoints",
        "coordinator.endpoints",
        "kind is \"none\"",
    );

    let text = spec_with(
        "kind = \"witness\"               # \"witness\" | \"etcd\" | \"none\"\n",
        "",
    );
    check(
        &text,
        "endpoints",
        "coordinator.endpoints",
        "kind is \"none\"",
    );

    let text = spec_with("kind = \"witness\"", "kind = \"none\"").replacen(
        "endpoints = [\"10.0.3.1:7460\"]\n",
        "",
        1,
    );
    assert_eq!(ok(&text).coordinator.kind, CoordinatorKind::None);
}

// ---------------------------------------------------------------------------
// Data directory.

fn with_data_dir(dir: &Path) -> Config {
    let text = spec_with(
        "data_dir = \"/var/lib/tandem\"",
        &format!("data_dir = {:?}", dir.display().to_string()),
    );
    ok(&text)
}

#[test]
fn check_data_dir_creates_private_dirs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a/b/state");
    let c = with_data_dir(&dir);
    c.check_data_dir().unwrap();
    assert!(dir.is_dir());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for d in [&dir, &tmp.path().join("a")] {
            let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", d.display());
        }
    }
    // Nothing left behind, and a second check passes.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    c.check_data_dir().unwrap();
}

#[test]
fn check_data_dir_errors_point_at_data_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();

    // A file where the directory should be.
    let c = with_data_dir(&file);
    let e = c.check_data_dir().unwrap_err();
    assert_eq!(e.key(), Some("site.data_dir"));
    assert!(
        e.to_string()
            .starts_with(&format!("{FILE}:3:12: site.data_dir: ")),
        "{e}"
    );
    assert!(e.to_string().contains("not a directory"), "{e}");

    // A file where a parent should be.
    let c = with_data_dir(&file.join("sub"));
    let e = c.check_data_dir().unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("{FILE}:3:12: site.data_dir: ")),
        "{e}"
    );
    assert!(
        e.to_string().to_lowercase().contains("not a directory"),
        "{e}"
    );
}

#[cfg(unix)]
#[test]
fn check_data_dir_unwritable() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ro");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o500)).unwrap();
    // root ignores permissions: only check when they apply.
    let applies = std::fs::File::create(dir.join("probe")).is_err();
    let c = with_data_dir(&dir);
    let r = c.check_data_dir();
    if applies {
        let e = r.unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("{FILE}:3:12: site.data_dir: ")),
            "{e}"
        );
        assert!(
            e.to_string().to_lowercase().contains("permission denied"),
            "{e}"
        );
        // And a directory that cannot be created.
        let c = with_data_dir(&dir.join("sub"));
        let e = c.check_data_dir().unwrap_err();
        assert!(
            e.to_string().contains("cannot create data directory"),
            "{e}"
        );
    } else {
        r.unwrap();
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
}

// ---------------------------------------------------------------------------
// Robustness.

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Arbitrary text never panics the parser.
        #[test]
        fn parse_never_panics(s in ".{0,200}") {
            let _ = parse(&s, Path::new(FILE));
        }

        /// Damaging one byte of a valid file gives a result, never a panic,
        /// and any error has a location inside the file.
        #[test]
        fn mutated_example_never_panics(pos in 0usize..SPEC_EXAMPLE.len(), byte in 0x20u8..0x7f) {
            let mut bytes = SPEC_EXAMPLE.as_bytes().to_vec();
            bytes[pos] = byte;
            if let Ok(text) = String::from_utf8(bytes) {
                if let Err(e) = parse(&text, Path::new(FILE)) {
                    let loc = e.location().unwrap();
                    prop_assert!(loc.line >= 1 && loc.line <= text.lines().count() + 1);
                    prop_assert!(!e.to_string().contains('\n'));
                }
            }
        }
    }
}

#[test]
fn dotted_keys() {
    let text = r#"site.name = "a"
site.data_dir = "/x"
site.listen = "127.0.0.1:1"
site.api = "127.0.0.1:2"
tls.mode = "off"
coordinator.kind = "witness"
coordinator.endpoints = ["127.0.0.1:3"]

[[peer]]
name = "a"
address = "127.0.0.1:1"

[[group]]
name = "g"
primary = "a"

[[group.volumes]]
name = "x"
size = "1G"
"#;
    let c = ok(text);
    assert_eq!(c.site.name, "a");
    assert_eq!(c.coordinator.kind, CoordinatorKind::Witness);
    assert_eq!(c.groups[0].volumes[0].size, 1 << 30);

    let bad = text.replacen("site.api = \"127.0.0.1:2\"\n", "", 1);
    check(&bad, "site.name", "site.api", "missing required key");

    let bad = text.replacen("size = \"1G\"", "size.value = \"1G\"", 1);
    check(
        &bad,
        "size.value",
        "group[0].volumes[0].size",
        "invalid type: table (made by dotted keys)",
    );

    let bad = text.replacen("site.name = \"a\"", "site.name.first = \"a\"", 1);
    let e = check(&bad, "site.name.first", "site.name", "invalid type: table");
    assert_eq!(e.location().unwrap().column, 6);

    let bad = format!("{text}\n[[group.volumes]] # second\nname = \"y\"\n");
    check(
        &bad,
        "# second",
        "group[0].volumes[1].size",
        "missing required key",
    );
}

#[test]
fn deeply_nested_input_is_an_error_not_a_crash() {
    let deep = format!("x = {}{}", "[".repeat(5000), "]".repeat(5000));
    assert!(matches!(fails(&deep), ConfigError::Syntax { .. }));
    let deep = format!("x = {}1{}", "{a=".repeat(5000), "}".repeat(5000));
    assert!(matches!(fails(&deep), ConfigError::Syntax { .. }));
}

#[test]
fn docs_examples_parse() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/CONFIG.md"))
        .unwrap();
    let blocks: Vec<&str> = doc
        .split("```toml\n")
        .skip(1)
        .filter_map(|b| b.split_once("```").map(|(code, _)| code))
        .collect();
    assert_eq!(blocks.len(), 2);
    assert_eq!(
        blocks[0], SPEC_EXAMPLE,
        "docs/CONFIG.md example differs from the test's"
    );
    for b in blocks {
        ok(b);
    }
}

// ---------------------------------------------------------------------------
// VMs: [libvirt] and vm (SPEC §4.1 additions).

#[test]
fn libvirt_section_and_vm_key_parse() {
    let text = spec_with(
        "[[peer]]                       # every site, this one included",
        "[libvirt]\nuri = \"qemu+ssh://root@h/system\"\nnetwork_map = { default = \"dr-net\", br0 = \"br9\" }\n\n[[peer]]",
    )
    .replace(
        "on_demote = \"/etc/tandem/hooks/stop-vm web01\"",
        "on_demote = \"/etc/tandem/hooks/stop-vm web01\"\nvm = \"libvirt:web01\"",
    );
    let c = ok(&text);
    assert_eq!(c.libvirt.uri, "qemu+ssh://root@h/system");
    assert_eq!(
        c.libvirt.network_map,
        vec![
            ("br0".to_owned(), "br9".to_owned()),
            ("default".to_owned(), "dr-net".to_owned())
        ]
    );
    assert_eq!(c.groups[0].vm.as_deref(), Some("web01"));
    // Defaults: qemu:///system, no map, no VM.
    let plain = ok(SPEC_EXAMPLE);
    assert_eq!(plain.libvirt, crate::Libvirt::default());
    assert_eq!(plain.libvirt.uri, "qemu:///system");
    assert_eq!(plain.groups[0].vm, None);
}

#[test]
fn a_vm_must_be_a_libvirt_domain_protected_once() {
    let text = spec_with(
        "on_demote = \"/etc/tandem/hooks/stop-vm web01\"",
        "vm = \"xen:web01\"",
    );
    check(&text, "vm = ", "group[0].vm", "libvirt:NAME");
    let text = spec_with(
        "on_demote = \"/etc/tandem/hooks/stop-vm web01\"",
        "vm = \"libvirt:\"",
    );
    check(&text, "vm = ", "group[0].vm", "must not be empty");
    let twice = format!(
        "{}\nvm = \"libvirt:web01\"\n\n[[group]]\nname = \"web02\"\nprimary = \"ny\"\nvolumes = [ {{ name = \"web02-root\", size = \"1GiB\" }} ]\nvm = \"libvirt:web01\" # again\n",
        SPEC_EXAMPLE.trim_end()
    );
    check(&twice, "# again", "group[1].vm", "already protected");
}

#[test]
fn unknown_libvirt_keys_are_refused() {
    let text = spec_with(
        "[[peer]]                       # every site, this one included",
        "[libvirt]\nurl = \"qemu:///system\"\n\n[[peer]]",
    );
    let e = fails(&text);
    assert!(e.to_string().contains("url"), "{e}");
}

// ---------------------------------------------------------------------------
// Groups defined at runtime.

#[test]
fn a_group_written_out_reads_back_the_same() {
    let mut c = ok(&spec_with(
        "on_demote = \"/etc/tandem/hooks/stop-vm web01\"",
        "on_demote = \"echo \\\"bye\\\" \\\\ done\"\nvm = \"libvirt:web01\"\nmax_queue = \"1.5GiB\"",
    )
    .replace("max_lag_on_failover = \"30s\"", "max_lag_on_failover = \"1500ms\""));
    let mut g = c.remove_group("web01").unwrap();
    assert!(c.groups.is_empty());
    g.name = "web01".into();
    let text = g.to_toml();
    let back = c
        .add_group(&text, Path::new("/var/lib/tandem/groups/web01.toml"))
        .unwrap()
        .clone();
    assert_eq!(back, g, "{text}");
}

#[test]
fn a_runtime_group_is_checked_against_the_sites_peers_and_groups() {
    let mut c = ok(SPEC_EXAMPLE);
    let path = Path::new("/var/lib/tandem/groups/x.toml");
    let same_name = "[[group]]\nname = \"web01\"\nprimary = \"ny\"\nvolumes = [ { name = \"x\", size = \"1M\" } ]\n";
    let e = c.add_group(same_name, path).unwrap_err();
    assert!(e.to_string().contains("exists on this site already"), "{e}");
    assert_eq!(e.file(), path);
    let same_volume = "[[group]]\nname = \"db\"\nprimary = \"ny\"\nvolumes = [ { name = \"web01-root\", size = \"1M\" } ]\n";
    let e = c.add_group(same_volume, path).unwrap_err();
    assert!(e.to_string().contains("belongs to group \"web01\""), "{e}");
    let unknown_site = "[[group]]\nname = \"db\"\nprimary = \"boston\"\nvolumes = [ { name = \"db\", size = \"1M\" } ]\n";
    let e = c.add_group(unknown_site, path).unwrap_err();
    assert!(e.to_string().contains("unknown site"), "{e}");
    assert_eq!(e.location().map(|l| l.line), Some(3));
    let two = format!("{same_volume}\n[[group]]\nname = \"db2\"\nprimary = \"ny\"\nvolumes = [ {{ name = \"db2\", size = \"1M\" }} ]\n");
    assert!(c.add_group(&two, path).is_err());
    assert!(c.add_group("[site]\nname = \"x\"\n", path).is_err());
    let fine = "[[group]]\nname = \"db\"\nprimary = \"ny\"\nreplicas = [ { site = \"chicago\" } ]\nvolumes = [ { name = \"db\", size = \"1M\" } ]\n";
    assert_eq!(c.add_group(fine, path).unwrap().name, "db");
    assert_eq!(c.groups.len(), 2);
}

// ---------------------------------------------------------------------------
// [api] metrics_auth (issue 10).

#[test]
fn metrics_need_the_token_unless_the_file_says_none() {
    assert_eq!(ok(SPEC_EXAMPLE).api.metrics_auth, crate::MetricsAuth::Token);
    for (value, expected) in [
        ("token", crate::MetricsAuth::Token),
        ("none", crate::MetricsAuth::None),
    ] {
        let text = spec_with(
            "[[peer]]                       # every site, this one included",
            &format!("[api]\nmetrics_auth = \"{value}\"\n\n[[peer]]"),
        );
        assert_eq!(ok(&text).api.metrics_auth, expected, "{value}");
    }
    let text = spec_with(
        "[[peer]]                       # every site, this one included",
        "[api]\nmetrics_auth = \"open\"\n\n[[peer]]",
    );
    check(&text, "metrics_auth = ", "api.metrics_auth", "token");
}

#[test]
fn a_non_loopback_nbd_listener_needs_nbd_tls_or_nbd_insecure() {
    let api = "api = \"127.0.0.1:7451\"";
    let open = spec_with(api, &format!("{api}\nnbd_listen = \"0.0.0.0:10809\""));
    check(
        &open,
        "nbd_listen",
        "site.nbd_listen",
        "Set nbd_tls = true (clients then need NBD STARTTLS",
    );
    let c = ok(&spec_with(
        api,
        &format!("{api}\nnbd_listen = \"0.0.0.0:10809\"\nnbd_tls = true"),
    ));
    assert!(c.site.nbd_tls && !c.site.nbd_insecure);
    let c = ok(&spec_with(
        api,
        &format!("{api}\nnbd_listen = \"0.0.0.0:10809\"\nnbd_insecure = true"),
    ));
    assert!(c.site.nbd_insecure && !c.site.nbd_tls);
    // Loopback needs neither.
    let c = ok(&spec_with(
        api,
        &format!("{api}\nnbd_listen = \"127.0.0.1:10809\""),
    ));
    assert!(!c.site.nbd_tls && !c.site.nbd_insecure);
    check(
        &spec_with(
            api,
            &format!("{api}\nnbd_listen = \"0.0.0.0:10809\"\nnbd_tls = true\nnbd_insecure = true"),
        ),
        "nbd_tls",
        "site.nbd_tls",
        "contradict",
    );
    check(
        &LOOPBACK.replacen(
            "nbd_listen = \"[::1]:10809\"",
            "nbd_listen = \"[::1]:10809\"\nnbd_tls = true",
            1,
        ),
        "nbd_tls",
        "site.nbd_tls",
        "needs [tls] mode = \"on\"",
    );
}

// ---------------------------------------------------------------------------
// etcd over TLS, with authentication (`[coordinator] etcd_*`).

fn etcd(endpoints: &str, extra: &str) -> String {
    spec_with(
        "kind = \"witness\"               # \"witness\" | \"etcd\" | \"none\"\nendpoints = [\"10.0.3.1:7460\"]",
        &format!("kind = \"etcd\"\nendpoints = [{endpoints}]\n{extra}"),
    )
}

#[test]
fn etcd_tls_keys_resolve() {
    // Everything given.
    let c = ok(&etcd(
        "\"https://10.0.3.1:2379\", \"https://10.0.3.2:2379\"",
        "etcd_ca = \"/etc/etcd/ca.pem\"\netcd_cert = \"/etc/etcd/ny.pem\"\netcd_key = \"/etc/etcd/ny.key\"\n\
         etcd_user = \"tandem\"\netcd_password_file = \"etcd.pass\"",
    ));
    let e = &c.coordinator.etcd;
    assert_eq!(e.ca.as_deref(), Some(Path::new("/etc/etcd/ca.pem")));
    assert_eq!(e.cert.as_deref(), Some(Path::new("/etc/etcd/ny.pem")));
    assert_eq!(e.key.as_deref(), Some(Path::new("/etc/etcd/ny.key")));
    assert_eq!(e.user.as_deref(), Some("tandem"));
    assert_eq!(
        e.password_file.as_deref(),
        Some(Path::new("/etc/tandem/etcd.pass"))
    );
    // No etcd_ca: the [tls] material serves.
    let c = ok(&etcd("\"https://10.0.3.1:2379\"", ""));
    let e = &c.coordinator.etcd;
    assert_eq!(e.ca.as_deref(), Some(Path::new("/etc/tandem/tls/ca.pem")));
    assert_eq!(e.cert.as_deref(), Some(Path::new("/etc/tandem/tls/ny.pem")));
    // etcd_ca alone: a server-authenticated link without a client
    // certificate (e.g. with a password).
    let c = ok(&etcd(
        "\"https://10.0.3.1:2379\"",
        "etcd_ca = \"/etc/etcd/ca.pem\"",
    ));
    assert_eq!(c.coordinator.etcd.cert, None);
    // Plain HTTP on loopback.
    let c = ok(&etcd("\"127.0.0.1:2379\", \"http://localhost:2380\"", ""));
    assert_eq!(c.coordinator.etcd, EtcdAccess::default());
}

#[test]
fn etcd_links_must_be_authenticated_off_loopback() {
    check(
        &etcd("\"127.0.0.1:2379\", \"10.0.3.1:2379\"", ""),
        "endpoints = [",
        "coordinator.endpoints[1]",
        "is plain HTTP to an address that is not loopback",
    );
    check(
        &etcd("\"https://10.0.3.1:2379\", \"http://127.0.0.1:2379\"", ""),
        "endpoints = [",
        "coordinator.endpoints[1]",
        "mixes plain and TLS endpoints",
    );
    // https without any CA.
    let text = etcd("\"https://10.0.3.1:2379\"", "").replace(
        "ca = \"/etc/tandem/tls/ca.pem\"\ncert = \"/etc/tandem/tls/ny.pem\"\nkey = \"/etc/tandem/tls/ny.key\"\n# mode = \"off\"",
        "mode = \"off\"",
    );
    let text = text
        .replace("0.0.0.0:7450", "127.0.0.1:7450")
        .replace("10.0.0.1:", "127.0.0.1:")
        .replace("10.0.1.1:", "127.0.0.2:")
        .replace("10.0.2.1:", "127.0.0.3:")
        .replace("https://10.0.3.1:", "https://127.0.0.1:");
    check(
        &text,
        "endpoints = [",
        "coordinator.etcd_ca",
        "need the CA that signed etcd's certificates",
    );
    check(
        &etcd("\"127.0.0.1:2379\"", "etcd_ca = \"/etc/etcd/ca.pem\""),
        "etcd_ca",
        "coordinator.etcd_ca",
        "no endpoint uses https://",
    );
    check(
        &etcd(
            "\"https://10.0.3.1:2379\"",
            "etcd_cert = \"/etc/etcd/ny.pem\"",
        ),
        "etcd_cert",
        "coordinator.etcd_cert",
        "without etcd_key",
    );
    check(
        &etcd("\"https://10.0.3.1:2379\"", "etcd_password_file = \"/p\""),
        "etcd_password_file",
        "coordinator.etcd_password_file",
        "without etcd_user",
    );
    check(
        &spec_with(
            "lease_ttl = \"3s\"",
            "lease_ttl = \"3s\"\netcd_user = \"x\"",
        ),
        "etcd_user",
        "coordinator.etcd_user",
        "is for kind = \"etcd\"",
    );
}

#[test]
fn a_group_has_at_most_1024_volumes() {
    let list = |n: usize| {
        (0..n)
            .map(|i| format!("{{ name = \"v{i}\", size = \"1M\" }}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let with = |n: usize| {
        spec_with(
            "volumes = [ { name = \"web01-root\", size = \"20GiB\" } ]",
            &format!("volumes = [ {} ]", list(n)),
        )
    };
    assert_eq!(
        ok(&with(crate::Group::MAX_VOLUMES)).groups[0].volumes.len(),
        1024
    );
    check(
        &with(crate::Group::MAX_VOLUMES + 1),
        "volumes = [ { name = \"v0\"",
        "group[0].volumes",
        "at most 1024 volumes (this one has 1025)",
    );
}
