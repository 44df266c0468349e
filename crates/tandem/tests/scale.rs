//! Many groups on one agent: real `tandem agent` processes (a primary `ny`
//! and its replica `dr`, TLS off on loopback) and a real `tandem witness`,
//! at two sizes. What an operator with many volumes relies on:
//!
//! * every group reaches streaming within a bound, whatever their number;
//! * threads do not grow with the groups — every thread of the process,
//!   replication and the NBD server included: going from 10 to 100 groups
//!   adds at most a small constant;
//! * the primary reaches its replica over one connection, whatever the
//!   number of groups (a link per site pair);
//! * open files stay under the per-volume figure the agent's open-file
//!   warning uses (`tandem_agent::fdlimit`);
//! * a clean stop (SIGTERM) of the primary and of the replica ends within
//!   5 s, with exit status 0;
//! * groups whose `on_promote` hooks take long (more of them than the
//!   agent has actor workers) do not hold up another group's failover.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;

/// What one size measured.
#[derive(Debug)]
struct Figures {
    groups: usize,
    /// Every thread of the process, by site.
    all_threads: BTreeMap<String, usize>,
    /// Every thread, by name with its group stripped (for the messages).
    threads: BTreeMap<String, BTreeMap<String, usize>>,
    fds: BTreeMap<String, usize>,
    /// Established TCP connections to dr's peer port.
    peer_connections: usize,
    stop_took: BTreeMap<String, Duration>,
}

/// Thread names of a process, each without its group or number suffix.
fn threads(pid: u32) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(name) = std::fs::read_to_string(t.path().join("comm")) else {
            continue;
        };
        let name = name.trim();
        // ship-g007-dr -> ship-, own-3 -> own-
        let short = match name.find('-') {
            Some(i) => &name[..=i],
            None => name,
        };
        *out.entry(short.to_owned()).or_insert(0) += 1;
    }
    out
}

fn all_threads(names: &BTreeMap<String, usize>) -> usize {
    names.values().sum()
}

/// The peer port `site.listen` of a site's configuration.
fn listen_port(config: &std::path::Path) -> u16 {
    let text = std::fs::read_to_string(config).expect("the site's configuration");
    let line = text
        .lines()
        .find(|l| l.starts_with("listen = "))
        .expect("a [site] listen line");
    line.trim_end_matches('"')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port")
}

/// Established TCP connections (IPv4, this network namespace) whose
/// remote end is `port`.
fn established_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let remote = f.get(2).and_then(|r| r.rsplit(':').next());
            f.get(3) == Some(&"01")
                && remote.and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port)
        })
        .count()
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// `groups` groups `s000`..., one sparse volume each, primary ny, replica
/// dr, decided by a witness.
fn cluster(groups: usize) -> (Cluster, Witness) {
    let c = Cluster::new("ny", &["dr"], &[vol("s000-v", "16MiB")], "");
    let tables: String = (0..groups)
        .map(|i| group_table(&format!("s{i:03}"), "ny", "dr", ""))
        .collect();
    with_witness(c, &tables)
}

/// A `[[group]]` table: one sparse volume `<name>-v`.
fn group_table(name: &str, primary: &str, replica: &str, extra: &str) -> String {
    format!(
        "[[group]]\nname = \"{name}\"\nprimary = \"{primary}\"\nreplicas = [ {{ site = \"{replica}\", priority = 1 }} ]\nvolumes = [ {{ name = \"{name}-v\", size = \"16MiB\" }} ]\n{extra}\n"
    )
}

/// The cluster's sites with `tables` as their groups, decided by a new
/// witness (TTL 3 s).
fn with_witness(mut c: Cluster, tables: &str) -> (Cluster, Witness) {
    let witness = Witness::start(c.dir.path());
    c.set_coordinator(&witness.section("3s"));
    for s in &c.sites {
        let text = std::fs::read_to_string(&s.config).expect("read config");
        let at = text.find("[[group]]").expect("a group table");
        std::fs::write(&s.config, format!("{}{tables}", &text[..at])).expect("write config");
    }
    (c, witness)
}

/// The roles of `site`'s groups, by name.
fn roles(c: &Cluster, site: &str) -> Option<BTreeMap<String, String>> {
    let s = status_json(&c.site(site).config)?;
    Some(
        s["groups"]
            .as_array()?
            .iter()
            .map(|g| {
                (
                    g["name"].as_str().unwrap_or_default().to_owned(),
                    g["role"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect(),
    )
}

fn measure(groups: usize) -> Figures {
    let (mut c, _witness) = cluster(groups);
    let started = Instant::now();
    c.spawn("dr");
    c.spawn("ny");
    let bound = Duration::from_secs(20)
        + Duration::from_millis(200) * u32::try_from(groups).unwrap_or(u32::MAX);
    let mut last = String::new();
    let streaming = poll(bound, || {
        for site in ["ny", "dr"] {
            assert!(c.is_running(site), "{site} exited:\n{}", c.site(site).log());
        }
        let s = status_json(&c.site("ny").config)?;
        let ready = s["groups"].as_array().map_or(0, |gs| {
            gs.iter()
                .filter(|g| {
                    g["role"] == "primary"
                        && g["replicas"].as_array().is_some_and(|rs| {
                            rs.iter()
                                .any(|r| r["site"] == "dr" && r["state"] == "streaming")
                        })
                })
                .count()
        });
        last = format!("{ready} of {groups} groups primary at ny and streaming to dr");
        (ready == groups).then_some(())
    });
    assert!(
        streaming.is_some(),
        "{groups} groups: not all streaming within {bound:?}: {last}"
    );
    eprintln!(
        "{groups} groups: all streaming after {:?}",
        started.elapsed()
    );
    // Idle: the start's transient workers (role changes) have retired.
    std::thread::sleep(Duration::from_secs(2));
    let mut f = Figures {
        groups,
        all_threads: BTreeMap::new(),
        threads: BTreeMap::new(),
        fds: BTreeMap::new(),
        peer_connections: established_to(listen_port(&c.site("dr").config)),
        stop_took: BTreeMap::new(),
    };
    for site in ["ny", "dr"] {
        let pid = c.pid(site);
        let names = threads(pid);
        f.all_threads.insert(site.into(), all_threads(&names));
        f.threads.insert(site.into(), names);
        f.fds.insert(site.into(), fds(pid));
    }
    for site in ["ny", "dr"] {
        let t = Instant::now();
        let status = c.stop(site);
        let took = t.elapsed();
        assert!(
            status.success(),
            "{groups} groups: {site} exited with {status} on SIGTERM:\n{}",
            c.site(site).log()
        );
        f.stop_took.insert(site.into(), took);
    }
    f
}

#[test]
fn threads_and_files_do_not_grow_per_group_and_a_stop_is_quick() {
    let small = measure(10);
    let large = measure(100);
    eprintln!("{small:#?}\n{large:#?}");
    for f in [&small, &large] {
        for (site, took) in &f.stop_took {
            assert!(
                *took <= Duration::from_secs(5),
                "{} groups: SIGTERM of {site} took {took:?} (more than 5 s)",
                f.groups
            );
        }
    }
    for f in [&small, &large] {
        assert_eq!(
            f.peer_connections, 1,
            "{} groups: ny should reach dr over one link, not {} connections",
            f.groups, f.peer_connections
        );
    }
    let added = (large.groups - small.groups) as u64;
    for site in ["ny", "dr"] {
        let (a, b) = (small.all_threads[site], large.all_threads[site]);
        assert!(
            b <= a + 4,
            "{site}: the process's threads grew from {a} at {} groups to {b} at {} groups: {:?}",
            small.groups,
            large.groups,
            large.threads[site]
        );
        let (a, b) = (small.fds[site] as u64, large.fds[site] as u64);
        let per = tandem_agent::fdlimit::PER_VOLUME + tandem_agent::fdlimit::PER_GROUP;
        assert!(
            b.saturating_sub(a) <= added * per,
            "{site}: {} more open files for {added} more groups of one volume (more than {per} each)",
            b.saturating_sub(a)
        );
    }
}

/// Groups `s000..s007` (primary ny) have an `on_promote` hook that runs
/// for a minute — more such groups than the agent's actor pool has
/// workers; group `fast` (primary sea) has none; dr replicates them all.
/// ny is killed: its groups are promoted at dr and their hooks run. Then
/// sea is killed: `fast` is primary at dr within the lease's time and a
/// few seconds — the running hooks hold only their own groups, not the
/// workers every group needs.
#[test]
fn slow_hooks_of_many_groups_do_not_hold_up_another_groups_failover() {
    const SLOW: usize = 8;
    let c = Cluster::new("ny", &["dr", "sea"], &[vol("s000-v", "16MiB")], "");
    let mut tables: String = (0..SLOW)
        .map(|i| group_table(&format!("s{i:03}"), "ny", "dr", "on_promote = \"sleep 60\""))
        .collect();
    tables.push_str(&group_table("fast", "sea", "dr", ""));
    let (mut c, _witness) = with_witness(c, &tables);
    for site in ["dr", "ny", "sea"] {
        c.spawn(site);
    }
    let streaming = |c: &Cluster, site: &str| {
        status_json(&c.site(site).config).map_or(0, |s| {
            s["groups"].as_array().map_or(0, |gs| {
                gs.iter()
                    .filter(|g| {
                        g["role"] == "primary"
                            && g["replicas"]
                                .as_array()
                                .is_some_and(|rs| rs.iter().any(|r| r["state"] == "streaming"))
                    })
                    .count()
            })
        })
    };
    let ready = poll(Duration::from_secs(60), || {
        (streaming(&c, "ny") == SLOW && streaming(&c, "sea") == 1).then_some(())
    });
    assert!(ready.is_some(), "not every group streaming at the start");
    c.kill("ny");
    let hooked = poll(Duration::from_secs(30), || {
        let r = roles(&c, "dr")?;
        let promoted = r.values().filter(|role| *role == "primary").count();
        (promoted == SLOW).then_some(())
    });
    assert!(
        hooked.is_some(),
        "ny's groups not primary at dr (their hooks running) within 30 s: {:?}",
        roles(&c, "dr")
    );
    let killed = Instant::now();
    c.kill("sea");
    let bound = Duration::from_secs(3 + 8);
    let promoted = poll(bound, || {
        (roles(&c, "dr")?.get("fast").map(String::as_str) == Some("primary")).then_some(())
    });
    assert!(
        promoted.is_some(),
        "fast (no hook) not primary at dr within {bound:?} of sea's kill while {SLOW} groups run \
         their on_promote hooks there: {:?}",
        roles(&c, "dr")
    );
    eprintln!("fast primary at dr {:?} after sea's kill", killed.elapsed());
    let t = Instant::now();
    let status = c.stop("dr");
    assert!(status.success(), "dr exited with {status} on SIGTERM");
    assert!(
        t.elapsed() <= Duration::from_secs(10),
        "stopping dr with its hooks running took {:?}",
        t.elapsed()
    );
}
