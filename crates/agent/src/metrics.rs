//! Prometheus text exposition (format 0.0.4) of the site's state
//! (`GET /metrics`). Written by hand, carefully: label values escaped,
//! every family's samples together under one `# HELP` and `# TYPE`,
//! counters named `_total`, histograms as cumulative `_bucket{le=...}`
//! with `_sum` and `_count`; `promtool check metrics` passes on it (test
//! `metrics`). The metrics are listed in docs/OBSERVABILITY.md.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;

use tandem_nbd::stats::{ExportStats, Op, OpClass, Stats, LATENCY_BOUNDS};

use crate::status::{Role, SiteStatus};

/// Every role a group can have on a site (`tandem_group_role`).
const ROLES: [Role; 4] = [Role::Primary, Role::Replica, Role::Fenced, Role::Down];

/// The exposition being written.
struct Out {
    text: String,
}

impl Out {
    /// A family's header. Families without samples are left out.
    fn family(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.text, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape_label(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", number(value));
    }

    /// A family with its samples (nothing when there are none).
    fn gauge_or_counter(
        &mut self,
        name: &str,
        help: &str,
        kind: &str,
        samples: &[(Vec<(&str, &str)>, f64)],
    ) {
        if samples.is_empty() {
            return;
        }
        self.family(name, help, kind);
        for (labels, value) in samples {
            self.sample(name, labels, *value);
        }
    }
}

/// A sample value as the text format writes it.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

/// Label values escape `\`, `"` and newlines.
fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Help text escapes `\` and newlines.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

fn role_word(role: Role) -> &'static str {
    match role {
        Role::Primary => "primary",
        Role::Replica => "replica",
        Role::Fenced => "fenced",
        Role::Down => "down",
    }
}

/// The whole exposition. `volume_groups` names each volume's group (the
/// NBD counters are kept by volume); volumes of no group (removed) are
/// left out. `nbd` holds the agent's NBD counters.
pub fn render(
    status: &SiteStatus,
    nbd: &Stats,
    volume_groups: &BTreeMap<String, String>,
) -> String {
    let mut out = Out {
        text: String::with_capacity(8 << 10),
    };
    let groups = &status.groups;
    fn g(name: &str) -> Vec<(&'static str, &str)> {
        vec![("group", name)]
    }

    out.gauge_or_counter(
        "tandem_group_epoch",
        "Ownership generation of the group, as this site knows it.",
        "gauge",
        &groups
            .iter()
            .map(|x| (g(&x.name), x.epoch as f64))
            .collect::<Vec<_>>(),
    );
    out.gauge_or_counter(
        "tandem_group_primary",
        "1 if this site is the group's primary and acknowledges writes.",
        "gauge",
        &groups
            .iter()
            .map(|x| (g(&x.name), f64::from(u8::from(x.role == Role::Primary))))
            .collect::<Vec<_>>(),
    );
    out.gauge_or_counter(
        "tandem_group_role",
        "1 for the group's role on this site (primary, replica, fenced, down), 0 for the others.",
        "gauge",
        &groups
            .iter()
            .flat_map(|x| {
                ROLES.iter().map(move |r| {
                    (
                        vec![("group", x.name.as_str()), ("role", role_word(*r))],
                        f64::from(u8::from(x.role == *r)),
                    )
                })
            })
            .collect::<Vec<_>>(),
    );
    out.gauge_or_counter(
        "tandem_group_fenced",
        "1 if this site holds the group's primary role but acknowledges no writes; reason says why (empty when not fenced).",
        "gauge",
        &groups
            .iter()
            .map(|x| match &x.fenced {
                Some(f) => (
                    vec![("group", x.name.as_str()), ("reason", f.reason.as_str())],
                    1.0,
                ),
                None => (vec![("group", x.name.as_str()), ("reason", "")], 0.0),
            })
            .collect::<Vec<_>>(),
    );
    out.gauge_or_counter(
        "tandem_group_failsafe",
        "1 if this site acknowledges the group's writes on peer leases alone: the coordinator is unreachable (failsafe ownership).",
        "gauge",
        &groups
            .iter()
            .filter(|x| x.role == crate::status::Role::Primary)
            .map(|x| (g(&x.name), f64::from(u8::from(x.failsafe.is_some()))))
            .collect::<Vec<_>>(),
    );
    out.gauge_or_counter(
        "tandem_group_fenced_since_seconds",
        "When the group's writes stopped being acknowledged here (Unix time); only while fenced.",
        "gauge",
        &groups
            .iter()
            .filter_map(|x| x.fenced.as_ref().map(|f| (g(&x.name), f.since_unix)))
            .collect::<Vec<_>>(),
    );
    out.gauge_or_counter(
        "tandem_group_lease_age_seconds",
        "Primary here: seconds since the coordinator last renewed the right to acknowledge the group's writes.",
        "gauge",
        &groups
            .iter()
            .filter_map(|x| x.lease_age_seconds.map(|a| (g(&x.name), a)))
            .collect::<Vec<_>>(),
    );
    if let Some(c) = &status.coordinator {
        out.gauge_or_counter(
            "tandem_coordinator_up",
            "1 if the coordinator answered this agent's last lease renewal, within the lease TTL.",
            "gauge",
            &[(Vec::new(), f64::from(u8::from(c.reachable)))],
        );
        if let Some(age) = c.lease_age_seconds {
            out.gauge_or_counter(
                "tandem_coordinator_lease_age_seconds",
                "Seconds since the last lease renewal the coordinator answered was sent.",
                "gauge",
                &[(Vec::new(), age)],
            );
        }
    }
    out.gauge_or_counter(
        "tandem_queue_bytes",
        "Bytes of changes held in the memory queue.",
        "gauge",
        &groups
            .iter()
            .filter_map(|x| x.queued_bytes.map(|b| (g(&x.name), b as f64)))
            .collect::<Vec<_>>(),
    );
    out.gauge_or_counter(
        "tandem_sync_degraded",
        "1 if a sync-mode group has fewer connected replicas than sync_replicas.",
        "gauge",
        &groups
            .iter()
            .filter_map(|x| {
                x.sync_degraded
                    .map(|d| (g(&x.name), f64::from(u8::from(d))))
            })
            .collect::<Vec<_>>(),
    );
    // This site's recovery-point history of each group it keeps one of
    // (its own replica entry; docs/HISTORY.md).
    let kept: Vec<_> = groups
        .iter()
        .filter_map(|x| {
            let own = x.replicas.iter().find(|r| r.site == status.site)?;
            Some((x.name.as_str(), own.points.as_ref()?, own.history.as_ref()?))
        })
        .collect();
    out.gauge_or_counter(
        "tandem_history_bytes",
        "Bytes of recovery-point history (undo log) this replica keeps for the group.",
        "gauge",
        &kept
            .iter()
            .map(|(name, _, h)| (g(name), h.bytes as f64))
            .collect::<Vec<_>>(),
    );
    out.gauge_or_counter(
        "tandem_history_points",
        "Recovery points this replica keeps for the group.",
        "gauge",
        &kept
            .iter()
            .map(|(name, p, _)| (g(name), p.count as f64))
            .collect::<Vec<_>>(),
    );
    let now = std::time::SystemTime::now();
    out.gauge_or_counter(
        "tandem_history_oldest_point_age_seconds",
        "Age of the oldest recovery point this replica keeps for the group (the primary's time of its write).",
        "gauge",
        &kept
            .iter()
            .filter_map(|(name, _, h)| {
                h.oldest_ms
                    .map(|ms| (g(name), crate::history::age_seconds(ms, now)))
            })
            .collect::<Vec<_>>(),
    );
    out.gauge_or_counter(
        "tandem_history_dropped_bytes_total",
        "Bytes of history dropped because of history_max since the agent started (never a resync).",
        "counter",
        &kept
            .iter()
            .map(|(name, _, h)| (g(name), h.dropped_bytes as f64))
            .collect::<Vec<_>>(),
    );
    let replicas: Vec<_> = groups
        .iter()
        .flat_map(|x| x.replicas.iter().map(move |r| (x, r)))
        .collect();
    let per_replica = |f: &dyn Fn(&crate::status::ReplicaStatus) -> Option<f64>| {
        replicas
            .iter()
            .filter_map(|(x, r)| {
                f(r).map(|v| {
                    (
                        vec![("group", x.name.as_str()), ("replica", r.site.as_str())],
                        v,
                    )
                })
            })
            .collect::<Vec<_>>()
    };
    out.gauge_or_counter(
        "tandem_replica_lag_bytes",
        "Bytes of changes the replica does not hold yet.",
        "gauge",
        &per_replica(&|r| Some(r.lag_bytes as f64)),
    );
    out.gauge_or_counter(
        "tandem_replica_lag_seconds",
        "Age of the oldest change the replica does not hold yet.",
        "gauge",
        &per_replica(&|r| Some(r.lag_seconds)),
    );
    out.gauge_or_counter(
        "tandem_replica_state",
        "1 for the replica's current state.",
        "gauge",
        &replicas
            .iter()
            .map(|(x, r)| {
                (
                    vec![
                        ("group", x.name.as_str()),
                        ("replica", r.site.as_str()),
                        ("state", r.state.as_str()),
                    ],
                    1.0,
                )
            })
            .collect::<Vec<_>>(),
    );
    out.gauge_or_counter(
        "tandem_replica_durable_seq",
        "Every change up to this sequence number is durable on the replica.",
        "gauge",
        &per_replica(&|r| Some(r.durable_seq as f64)),
    );
    out.gauge_or_counter(
        "tandem_replica_sent_bytes_total",
        "Bytes sent to the replica on the wire (after compression).",
        "counter",
        &per_replica(&|r| Some(r.wire_bytes as f64)),
    );
    out.gauge_or_counter(
        "tandem_resync_total_bytes",
        "Bytes to compare in the running resync.",
        "gauge",
        &per_replica(&|r| r.resync.as_ref().map(|p| p.total_bytes as f64)),
    );
    out.gauge_or_counter(
        "tandem_resync_compared_bytes",
        "Bytes compared so far in the running resync.",
        "gauge",
        &per_replica(&|r| r.resync.as_ref().map(|p| p.compared_bytes as f64)),
    );
    render_nbd(&mut out, nbd, volume_groups);
    out.text
}

/// The NBD front: per volume, every operation, its bytes, errors and
/// latency histograms.
fn render_nbd(out: &mut Out, nbd: &Stats, volume_groups: &BTreeMap<String, String>) {
    let volumes: Vec<(&str, &str, std::sync::Arc<ExportStats>)> = nbd
        .exports()
        .into_iter()
        .filter_map(|(volume, stats)| {
            volume_groups
                .get_key_value(&volume)
                .map(|(v, g)| (v.as_str(), g.as_str(), stats))
        })
        .collect();
    let mut ops = Vec::new();
    let mut bytes = Vec::new();
    let mut errors = Vec::new();
    for (volume, group, s) in &volumes {
        for op in Op::ALL {
            ops.push((
                vec![("group", *group), ("volume", *volume), ("op", op.name())],
                s.ops(op) as f64,
            ));
        }
        bytes.push((
            vec![("group", *group), ("volume", *volume), ("op", "read")],
            s.bytes_read() as f64,
        ));
        bytes.push((
            vec![("group", *group), ("volume", *volume), ("op", "write")],
            s.bytes_written() as f64,
        ));
        errors.push((
            vec![("group", *group), ("volume", *volume)],
            s.errors() as f64,
        ));
    }
    out.gauge_or_counter(
        "tandem_nbd_ops_total",
        "NBD requests served, by volume and operation (read, write, write_zeroes, trim, flush, cache, block_status), failed ones included.",
        "counter",
        &ops,
    );
    out.gauge_or_counter(
        "tandem_nbd_bytes_total",
        "NBD payload bytes, by volume and direction (op: read, write).",
        "counter",
        &bytes,
    );
    out.gauge_or_counter(
        "tandem_nbd_errors_total",
        "NBD requests answered with an error, by volume.",
        "counter",
        &errors,
    );
    let name = "tandem_nbd_request_duration_seconds";
    if !volumes.is_empty() {
        out.family(
            name,
            "NBD request latency, from its header read to its reply made, by volume and class (read; write: write, write_zeroes, trim; flush).",
            "histogram",
        );
    }
    let bounds: Vec<String> = LATENCY_BOUNDS
        .iter()
        .map(|b| number(*b))
        .chain(std::iter::once("+Inf".to_owned()))
        .collect();
    for (volume, group, s) in &volumes {
        for class in OpClass::ALL {
            let h = s.latency(class);
            let base = [("group", *group), ("volume", *volume), ("op", class.name())];
            for (le, count) in bounds.iter().zip(&h.cumulative) {
                let mut l = base.to_vec();
                l.push(("le", le));
                out.sample(&format!("{name}_bucket"), &l, *count as f64);
            }
            out.sample(&format!("{name}_sum"), &base, h.sum_seconds);
            out.sample(&format!("{name}_count"), &base, h.count() as f64);
        }
    }
    out.gauge_or_counter(
        "tandem_nbd_connections",
        "NBD clients connected.",
        "gauge",
        &[(Vec::new(), nbd.connections.load(Ordering::Relaxed) as f64)],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_labels_are_written_as_the_format_wants() {
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(3.0), "3");
        assert_eq!(number(0.00005), "0.00005");
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn a_volume_has_ops_bytes_and_histograms() {
        let nbd = Stats::default();
        let s = nbd.export("web01-root");
        let t = std::time::Instant::now();
        s.served(Op::Write, t);
        s.written_bytes(4096);
        s.served(Op::Flush, t);
        let status = SiteStatus {
            site: "ny".into(),
            groups: Vec::new(),
            instance: None,
            sites: Vec::new(),
            coordinator: None,
        };
        let map = BTreeMap::from([("web01-root".to_owned(), "web01".to_owned())]);
        let text = render(&status, &nbd, &map);
        assert!(text.contains(
            "tandem_nbd_ops_total{group=\"web01\",volume=\"web01-root\",op=\"write\"} 1\n"
        ));
        assert!(text.contains(
            "tandem_nbd_bytes_total{group=\"web01\",volume=\"web01-root\",op=\"write\"} 4096\n"
        ));
        assert!(text.contains(
            "tandem_nbd_request_duration_seconds_bucket{group=\"web01\",volume=\"web01-root\",op=\"write\",le=\"+Inf\"} 1\n"
        ));
        assert!(text.contains(
            "tandem_nbd_request_duration_seconds_count{group=\"web01\",volume=\"web01-root\",op=\"flush\"} 1\n"
        ));
        assert_eq!(
            text.matches("# TYPE tandem_nbd_request_duration_seconds histogram")
                .count(),
            1
        );
        let unknown = render(&status, &nbd, &BTreeMap::new());
        assert!(!unknown.contains("web01-root"), "a volume of no group");
    }
}
