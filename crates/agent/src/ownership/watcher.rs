//! The store watcher: reads every group's keys, confirms each primary's
//! gate by what the read shows (a read sent at `t` naming this site owner
//! under its lease may be acted on until `t + TTL - TTL/6`; one showing
//! anything else fences at once), hands each group's view to its actor,
//! and publishes this site's reports — a group's report when it changed
//! (its tip at most every TTL/3), the owner's lag record when it changed
//! (at most every TTL/3; unchanged, once a minute) — batched into few
//! transactions. An idle cluster so writes nothing, and no watcher is
//! woken by another site's unchanged records. Then it waits for the next change in
//! the store, or TTL/3 (at most a second, so that a stop is quick).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tandem_coordinator::keys::{encode, GroupView, MemberReport};
use tandem_coordinator::{lease, KeyValue, LeaseId, Op, Snapshot};
use tandem_replication::shipper::LinkState;
use tracing::warn;

use super::mailbox::Seen;
use super::Handle;
use crate::group::Plane;

/// Puts per transaction (etcd refuses more than 128 operations in one).
const OPS_PER_TXN: usize = 64;
/// How long to wait while the agent has no lease.
const NO_LEASE_POLL: Duration = Duration::from_millis(50);
/// How long to wait after a failed read.
const READ_RETRY: Duration = Duration::from_millis(200);
/// The longest wait for a change: a stopping agent waits for the watcher
/// at most this long, whatever the lease TTL (the wait cannot be woken,
/// and a TTL of an hour would otherwise make it 20 minutes).
const WAIT_AT_MOST: Duration = Duration::from_secs(1);
/// An unchanged lag record is written again this often (the record has
/// no lease: this refreshes one lost with a restored store).
const LAG_REFRESH: Duration = Duration::from_secs(60);

/// What was last published for a group.
struct Published {
    report: MemberReport,
    at: Instant,
    lag_at: Option<Instant>,
    /// The lag record last written.
    lag: Option<tandem_coordinator::keys::LagRecord>,
}

pub(super) fn run(h: &std::sync::Arc<Handle>) {
    let prefix = h.keys.groups();
    let every = lease::renew_every(h.ttl);
    let mut published: HashMap<String, Published> = HashMap::new();
    while h.running() {
        let Some(lease) = h.lease() else {
            std::thread::sleep(NO_LEASE_POLL);
            continue;
        };
        let sent = Instant::now();
        let snap = match h.store.range(&prefix) {
            Ok(s) => s,
            Err(e) => {
                warn!("cannot read the coordinator: {e}");
                std::thread::sleep(READ_RETRY);
                continue;
            }
        };
        let confirmed = h.valid_from(sent);
        let revision = snap.revision;
        let mut by_group = by_group(&prefix, snap.kvs);
        let mut scheduled = Vec::new();
        for m in h.members() {
            // Only this group's keys: reading a view of one group out of
            // every group's keys would cost groups x keys.
            let own = Snapshot {
                revision,
                kvs: by_group.remove(m.runtime.name()).unwrap_or_default(),
            };
            let view = GroupView::read(&h.keys, m.runtime.name(), &own);
            for (key, reason) in &view.unreadable {
                warn!(%key, "unreadable coordinator value: {reason}");
            }
            // What a primary's hello is judged by (docs/PEER.md).
            h.shared.receivers.owners.publish(
                m.runtime.name(),
                view.owner.as_ref().map(|(o, _)| (o.site.as_str(), o.epoch)),
            );
            if let Some(gate) = m.runtime.gate() {
                match &view.owner {
                    Some((o, _)) if o.site == h.shared.site && o.lease == lease.id => {
                        gate.confirm(confirmed)
                    }
                    // The owner key lapsed with this site's lease, nobody
                    // newer, no operator's request: while every peer lease
                    // runs nobody can claim (F5), and the machine claims
                    // the epoch back.
                    None if view.request.is_none()
                        && m.machine.lock().serving().map(|(e, _)| e) == Some(view.epoch) =>
                    {
                        gate.deny_unless_failsafe(view.revision)
                    }
                    _ => gate.deny(view.revision),
                }
            }
            if h.deciding()
                && h.deliver(
                    &m,
                    Seen {
                        view,
                        lease: lease.id,
                        sent,
                    },
                )
            {
                scheduled.push(m);
            }
        }
        h.pool.schedule_all(h, scheduled);
        publish(h, lease.id, every, &mut published);
        let _ = h.store.wait(&prefix, revision, every.min(WAIT_AT_MOST));
    }
}

/// The keys under `prefix` (`<prefix><group>/...`) by group, in one pass.
fn by_group(prefix: &str, kvs: Vec<KeyValue>) -> HashMap<String, Vec<KeyValue>> {
    let mut out: HashMap<String, Vec<KeyValue>> = HashMap::new();
    for kv in kvs {
        let Some(group) = kv
            .key
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_once('/'))
            .map(|(group, _)| group)
        else {
            continue;
        };
        match out.get_mut(group) {
            Some(v) => v.push(kv),
            None => {
                out.insert(group.to_owned(), vec![kv]);
            }
        }
    }
    out
}

/// Whether a new report must go out now.
fn due(last: Option<&Published>, report: &MemberReport, now: Instant, every: Duration) -> bool {
    let Some(last) = last else { return true };
    let p = &last.report;
    let settled = p.lease == report.lease
        && p.role == report.role
        && p.epoch == report.epoch
        && p.consistent == report.consistent
        && p.fit == report.fit
        && p.vm == report.vm;
    if !settled {
        return true;
    }
    let moved = (p.tip_epoch, p.tip_seq) != (report.tip_epoch, report.tip_seq);
    moved && now >= last.at + every
}

fn publish(
    h: &Handle,
    lease: LeaseId,
    every: Duration,
    published: &mut HashMap<String, Published>,
) {
    let now = Instant::now();
    let mut ops = Vec::new();
    let mut sent = Vec::new();
    for m in h.members() {
        let name = m.runtime.name();
        let holding = m.runtime.holding();
        let mut report = m.machine.lock().report(lease, holding);
        if m.runtime.cfg.vm.is_some() {
            report.vm = Some(
                h.shared
                    .vms
                    .seen(name)
                    .map_or("absent", |s| s.state.as_str())
                    .to_owned(),
            );
        }
        let last = published.get(name);
        let report_due = due(last, &report, now, every);
        let lag_due = last
            .and_then(|l| l.lag_at)
            .is_none_or(|at| now >= at + every);
        let lag = if lag_due { lag_record(&m) } else { None };
        // Unchanged since it was last written: only a refresh, rarely.
        let lag = lag.filter(|record| {
            last.is_none_or(|l| {
                l.lag.as_ref() != Some(record) || l.lag_at.is_none_or(|at| now >= at + LAG_REFRESH)
            })
        });
        if !report_due && lag.is_none() {
            continue;
        }
        if report_due {
            ops.push(Op::Put {
                key: h.keys.member(name, &h.shared.site),
                value: encode(&report),
                lease,
            });
        }
        if let Some(lag) = &lag {
            ops.push(Op::Put {
                key: h.keys.lag(name),
                value: encode(lag),
                lease: 0,
            });
        }
        sent.push((name.to_owned(), report_due.then_some(report), lag));
    }
    let mut failed = false;
    for chunk in ops.chunks(OPS_PER_TXN) {
        if let Err(e) = h.store.txn(&[], chunk) {
            warn!("cannot publish this site's reports: {e}");
            failed = true;
            break;
        }
    }
    if failed {
        return;
    }
    for (name, report, lag) in sent {
        let entry = published.entry(name);
        match (entry, report) {
            (std::collections::hash_map::Entry::Occupied(mut e), report) => {
                let p = e.get_mut();
                if let Some(r) = report {
                    p.report = r;
                    p.at = now;
                }
                if lag.is_some() {
                    p.lag_at = Some(now);
                    p.lag = lag;
                }
            }
            (std::collections::hash_map::Entry::Vacant(e), Some(report)) => {
                e.insert(Published {
                    report,
                    at: now,
                    lag_at: lag.is_some().then_some(now),
                    lag,
                });
            }
            (std::collections::hash_map::Entry::Vacant(_), None) => {}
        }
    }
}

/// The owner's view of its replicas' lag, while it acknowledges writes.
fn lag_record(m: &super::Member) -> Option<tandem_coordinator::keys::LagRecord> {
    let replicas = {
        let plane = m.runtime.plane.lock();
        let Plane::Primary(p) = &*plane else {
            return None;
        };
        if !p.gate.is_open() {
            return None;
        }
        p.links
            .iter()
            .map(|l| {
                let lag = p.capture.lag(&l.replica).ok();
                let secs = lag
                    .and_then(|l| l.oldest)
                    .map_or(0.0, |t| t.elapsed().as_secs_f64());
                let connected = l.link.info().state != LinkState::Disconnected;
                (l.replica.clone(), secs, connected)
            })
            .collect()
    };
    m.machine.lock().lag_record(replicas)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_coordinator::keys::Keys;

    fn kv(key: String) -> KeyValue {
        KeyValue {
            key,
            value: Vec::new(),
            mod_revision: 1,
            create_revision: 1,
            lease: 0,
        }
    }

    #[test]
    fn keys_are_split_by_group_name_not_by_name_prefix() {
        let keys = Keys::new("/tandem");
        let kvs = vec![
            kv(keys.owner("a")),
            kv(keys.member("ab", "ny")),
            kv(keys.member("a", "ny")),
            kv(keys.epoch("ab")),
            kv("/tandem/leases/7".into()),
            kv(format!("{}no-slash", keys.groups())),
        ];
        let mut by = by_group(&keys.groups(), kvs);
        let names = |v: Vec<KeyValue>| v.into_iter().map(|kv| kv.key).collect::<Vec<_>>();
        assert_eq!(
            names(by.remove("a").unwrap_or_default()),
            [keys.owner("a"), keys.member("a", "ny")]
        );
        assert_eq!(
            names(by.remove("ab").unwrap_or_default()),
            [keys.member("ab", "ny"), keys.epoch("ab")]
        );
        assert!(by.is_empty(), "keys outside any group's prefix: {by:?}");
    }
}
