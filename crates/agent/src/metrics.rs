//! Prometheus text exposition of the site's state (`GET /metrics`).

use std::fmt::Write;
use std::sync::atomic::Ordering;

use tandem_nbd::stats::Stats;

use crate::status::SiteStatus;

pub fn render(status: &SiteStatus, nbd: &Stats) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, kind: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let group_labels = |g: &str| format!("{{group=\"{g}\"}}");
    let replica_labels = |g: &str, r: &str| format!("{{group=\"{g}\",replica=\"{r}\"}}");
    let groups = &status.groups;
    metric(
        "tandem_group_epoch",
        "Ownership generation of the group.",
        "gauge",
        groups
            .iter()
            .map(|g| (group_labels(&g.name), g.epoch as f64))
            .collect(),
    );
    metric(
        "tandem_group_primary",
        "1 if this site is the group's primary.",
        "gauge",
        groups
            .iter()
            .map(|g| {
                (
                    group_labels(&g.name),
                    f64::from(u8::from(g.role == crate::status::Role::Primary)),
                )
            })
            .collect(),
    );
    metric(
        "tandem_queue_bytes",
        "Bytes of changes held in the memory queue.",
        "gauge",
        groups
            .iter()
            .filter_map(|g| g.queued_bytes.map(|b| (group_labels(&g.name), b as f64)))
            .collect(),
    );
    metric(
        "tandem_sync_degraded",
        "1 if a sync-mode group has fewer connected replicas than sync_replicas.",
        "gauge",
        groups
            .iter()
            .filter_map(|g| {
                g.sync_degraded
                    .map(|d| (group_labels(&g.name), f64::from(u8::from(d))))
            })
            .collect(),
    );
    let replicas: Vec<_> = groups
        .iter()
        .flat_map(|g| g.replicas.iter().map(move |r| (g, r)))
        .collect();
    metric(
        "tandem_replica_lag_bytes",
        "Bytes of changes the replica does not hold yet.",
        "gauge",
        replicas
            .iter()
            .map(|(g, r)| (replica_labels(&g.name, &r.site), r.lag_bytes as f64))
            .collect(),
    );
    metric(
        "tandem_replica_lag_seconds",
        "Age of the oldest change the replica does not hold yet.",
        "gauge",
        replicas
            .iter()
            .map(|(g, r)| (replica_labels(&g.name, &r.site), r.lag_seconds))
            .collect(),
    );
    metric(
        "tandem_replica_state",
        "1 for the replica's current state.",
        "gauge",
        replicas
            .iter()
            .map(|(g, r)| {
                (
                    format!(
                        "{{group=\"{}\",replica=\"{}\",state=\"{}\"}}",
                        g.name, r.site, r.state
                    ),
                    1.0,
                )
            })
            .collect(),
    );
    metric(
        "tandem_replica_durable_seq",
        "Every change up to this sequence number is durable on the replica.",
        "gauge",
        replicas
            .iter()
            .map(|(g, r)| (replica_labels(&g.name, &r.site), r.durable_seq as f64))
            .collect(),
    );
    metric(
        "tandem_replica_sent_bytes_total",
        "Bytes sent to the replica on the wire (after compression).",
        "counter",
        replicas
            .iter()
            .map(|(g, r)| (replica_labels(&g.name, &r.site), r.wire_bytes as f64))
            .collect(),
    );
    metric(
        "tandem_resync_total_bytes",
        "Bytes to compare in the running resync.",
        "gauge",
        replicas
            .iter()
            .filter_map(|(g, r)| {
                r.resync
                    .as_ref()
                    .map(|p| (replica_labels(&g.name, &r.site), p.total_bytes as f64))
            })
            .collect(),
    );
    metric(
        "tandem_resync_compared_bytes",
        "Bytes compared so far in the running resync.",
        "gauge",
        replicas
            .iter()
            .filter_map(|(g, r)| {
                r.resync
                    .as_ref()
                    .map(|p| (replica_labels(&g.name, &r.site), p.compared_bytes as f64))
            })
            .collect(),
    );
    let counter = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed) as f64;
    metric(
        "tandem_nbd_ops_total",
        "NBD requests served, by operation.",
        "counter",
        vec![
            ("{op=\"read\"}".into(), counter(&nbd.reads)),
            ("{op=\"write\"}".into(), counter(&nbd.writes)),
            ("{op=\"trim\"}".into(), counter(&nbd.trims)),
            ("{op=\"write_zeroes\"}".into(), counter(&nbd.zeroes)),
            ("{op=\"flush\"}".into(), counter(&nbd.flushes)),
        ],
    );
    metric(
        "tandem_nbd_bytes_total",
        "NBD payload bytes, by direction.",
        "counter",
        vec![
            ("{op=\"read\"}".into(), counter(&nbd.read_bytes)),
            ("{op=\"write\"}".into(), counter(&nbd.write_bytes)),
        ],
    );
    metric(
        "tandem_nbd_latency_seconds_sum",
        "Sum of NBD request service times on the reader thread, by operation.",
        "counter",
        vec![
            ("{op=\"read\"}".into(), counter(&nbd.read_nanos) / 1e9),
            ("{op=\"write\"}".into(), counter(&nbd.write_nanos) / 1e9),
        ],
    );
    metric(
        "tandem_nbd_errors_total",
        "NBD requests answered with an error.",
        "counter",
        vec![(String::new(), counter(&nbd.errors))],
    );
    metric(
        "tandem_nbd_connections",
        "NBD clients connected.",
        "gauge",
        vec![(String::new(), counter(&nbd.connections))],
    );
    out
}
