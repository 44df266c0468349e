//! One live agent per site name (SPEC G6, G11; docs/FAILOVER.md, "One
//! agent per site name"), decided without I/O.
//!
//! Every agent with a coordinator holds the key
//! [`Keys::instance`]`(site)` under its lease, naming itself: a random
//! instance id made at start, the host, the process id, when it started,
//! its TLS certificate's fingerprint and its lease TTL. It takes the key
//! with a "key absent" compare before it claims, reports or acknowledges
//! anything, so two agents with one site name (a cloned host, a copied
//! configuration) can never both act: the second one finds the key held.
//!
//! A key held by someone else is not at once a live agent: the previous
//! run of this very agent may have crashed, and its key stays until its
//! lease expires. So [`Claim`] waits (at most [`patience`] after it first
//! saw the key held), and refuses only if the key is still held then —
//! by a live agent, since a dead one's lease would have ended.
//!
//! Once held, [`check`] says whether a read of the key still shows it
//! ours; a key gone (while the lease lives) or naming another instance
//! means this agent must stop acknowledging and exit.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::keys::{encode, Keys};
use crate::{Compare, KeyValue, LeaseId, Op};

/// Most bytes of an instance value this code reads; anything larger is
/// not an agent's record.
pub const MAX_VALUE: usize = 4096;

/// Most characters of a host name or certificate fingerprint kept.
const MAX_FIELD: usize = 256;

/// The longest lease TTL an instance record may claim (the configuration
/// allows at most one hour).
const MAX_TTL_MS: u64 = 3_600_000;

/// One running agent, as it names itself in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Random, made at each start (32 hex digits).
    pub id: String,
    pub site: String,
    pub host: String,
    pub pid: u32,
    /// When the agent started, milliseconds since the Unix epoch (its
    /// host's clock).
    pub since_ms: u64,
    /// SHA-256 of its TLS certificate (DER), hex; none with TLS off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_sha256: Option<String>,
    /// Its lease TTL: how long its key outlives it after a crash.
    pub lease_ttl_ms: u64,
    /// Which running kernel and process it is: the host's boot id, its
    /// pid namespace and its start time (clock ticks since boot). A later
    /// run on the same kernel and pid namespace can tell for sure that
    /// this process is gone ([`Process::same_host`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<Process>,
}

/// A process as the kernel names it, unique while the host runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    /// `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
    /// `readlink /proc/self/ns/pid`.
    pub pid_ns: String,
    /// Field 22 of `/proc/self/stat`.
    pub start_ticks: u64,
}

impl Process {
    /// Whether `other` ran on this very kernel and pid namespace, where
    /// its pid can be looked up (not a cloned host, another container or
    /// an earlier boot).
    pub fn same_host(&self, other: &Process) -> bool {
        self.boot_id == other.boot_id && self.pid_ns == other.pid_ns
    }
}

impl Instance {
    /// The record's bytes in the store.
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Reads a record, refusing oversized or malformed values.
    pub fn decode(value: &[u8]) -> Result<Instance, String> {
        if value.len() > MAX_VALUE {
            return Err(format!(
                "{} bytes, more than an instance record's {MAX_VALUE}",
                value.len()
            ));
        }
        let mut i: Instance = serde_json::from_slice(value).map_err(|e| e.to_string())?;
        i.host = clip(&i.host);
        i.cert_sha256 = i.cert_sha256.map(|c| clip(&c));
        i.lease_ttl_ms = i.lease_ttl_ms.min(MAX_TTL_MS);
        if let Some(p) = &mut i.process {
            p.boot_id = clip(&p.boot_id);
            p.pid_ns = clip(&p.pid_ns);
        }
        Ok(i)
    }

    /// How long after its last renewal this instance's key may linger.
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms.min(MAX_TTL_MS))
    }
}

impl std::fmt::Display for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "instance {} on host {:?}, pid {}, since {}",
            self.id,
            self.host,
            self.pid,
            utc(self.since_ms)
        )?;
        if let Some(c) = &self.cert_sha256 {
            write!(f, ", certificate sha256 {c}")?;
        }
        Ok(())
    }
}

fn clip(s: &str) -> String {
    s.chars().take(MAX_FIELD).collect()
}

/// Who holds a site's instance key, as one read shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// Nobody.
    Absent,
    /// This agent (its id), under `lease`, at `revision`.
    Me { lease: LeaseId, revision: i64 },
    /// Another instance, or a value that is not a record (`record` none,
    /// `unreadable` says why).
    Other {
        record: Option<Instance>,
        unreadable: Option<String>,
        lease: LeaseId,
        revision: i64,
    },
}

impl Holder {
    /// Sorts out the key as read (`None`: absent) for the agent `me`.
    pub fn of(kv: Option<&KeyValue>, me: &Instance) -> Holder {
        let Some(kv) = kv else {
            return Holder::Absent;
        };
        match Instance::decode(&kv.value) {
            Ok(r) if r.id == me.id => Holder::Me {
                lease: kv.lease,
                revision: kv.mod_revision,
            },
            Ok(r) => Holder::Other {
                record: Some(r),
                unreadable: None,
                lease: kv.lease,
                revision: kv.mod_revision,
            },
            Err(e) => Holder::Other {
                record: None,
                unreadable: Some(e),
                lease: kv.lease,
                revision: kv.mod_revision,
            },
        }
    }
}

impl Holder {
    /// The holder's process, when its record names one that ran on the
    /// same kernel and pid namespace as `me` (so the driver can look its
    /// pid up).
    pub fn process<'a>(&'a self, me: &Instance) -> Option<(u32, &'a Process)> {
        match (self, &me.process) {
            (
                Holder::Other {
                    record: Some(r), ..
                },
                Some(mine),
            ) => r
                .process
                .as_ref()
                .filter(|p| p.same_host(mine))
                .map(|p| (r.pid, p)),
            _ => None,
        }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Absent => f.write_str("nobody"),
            Holder::Me { .. } => f.write_str("this agent"),
            Holder::Other {
                record: Some(r), ..
            } => write!(f, "{r}"),
            Holder::Other {
                unreadable, lease, ..
            } => write!(
                f,
                "an unreadable record under lease {lease:x} ({})",
                unreadable.as_deref().unwrap_or("?")
            ),
        }
    }
}

/// How long a starting agent waits for a key held by another instance to
/// go: the longer of its own and the holder's lease TTL (etcd rounds TTLs
/// up to whole seconds, at least 2 s), plus a margin for the store to
/// notice the expiry (half the TTL, at least 2 s).
pub fn patience(own_ttl: Duration, holder_ttl: Option<Duration>) -> Duration {
    let ttl = own_ttl.max(holder_ttl.unwrap_or_default());
    let whole = Duration::from_secs(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0));
    whole.max(Duration::from_secs(2)) + (ttl / 2).max(Duration::from_secs(2))
}

/// What the driver knows of the process named by another holder's
/// record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// It ran on this kernel and pid namespace, and no process with its
    /// pid and start time exists any more: a crashed run of this agent.
    Gone,
    /// Alive, or elsewhere (cannot be looked up): only its lease ending
    /// tells.
    Unknown,
}

/// What a starting agent does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Take the key with this transaction, then read again.
    Take {
        compares: Vec<Compare>,
        ops: Vec<Op>,
    },
    /// Another instance holds the key: read again after a change or at
    /// `until` at the latest.
    Wait { holder: Holder, until: Instant },
    /// The key is this agent's under its current lease: go on.
    Held,
    /// The key is still held by another instance after the wait: a live
    /// agent has this site name. Do not act; exit.
    Refuse { holder: Holder, waited: Duration },
}

/// A starting agent's claim of its site's instance key: fed each read of
/// the key, it says what to do next. No I/O, no clock (the time is an
/// input).
#[derive(Clone, Debug)]
pub struct Claim {
    key: String,
    me: Instance,
    own_ttl: Duration,
    /// When a read first showed another holder.
    first_held: Option<Instant>,
}

impl Claim {
    pub fn new(keys: &Keys, me: Instance, own_ttl: Duration) -> Claim {
        Claim {
            key: keys.instance(&me.site),
            me,
            own_ttl,
            first_held: None,
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn me(&self) -> &Instance {
        &self.me
    }

    /// The next step after a read of the key (`kv`, `None`: absent) at
    /// `now`, for an agent holding `lease`; `liveness` is what the driver
    /// found of the holder's process (see [`Holder::process`]).
    pub fn next(
        &mut self,
        kv: Option<&KeyValue>,
        lease: LeaseId,
        liveness: Liveness,
        now: Instant,
    ) -> Next {
        let holder = Holder::of(kv, &self.me);
        match holder {
            // A crashed run on this host: nothing acts on its lease any
            // more, so its key may be replaced now.
            Holder::Other {
                record: Some(_),
                revision,
                ..
            } if liveness == Liveness::Gone => self.take(revision, lease),
            Holder::Absent => self.take(0, lease),
            Holder::Me { lease: l, .. } if l == lease => Next::Held,
            // Ours under a lease that is not the current one (a retried
            // transaction, or a lease replaced): move it over.
            Holder::Me { revision, .. } => self.take(revision, lease),
            Holder::Other { ref record, .. } => {
                let first = *self.first_held.get_or_insert(now);
                let holder_ttl = record.as_ref().map(Instance::lease_ttl);
                let until = first + patience(self.own_ttl, holder_ttl);
                if now >= until {
                    Next::Refuse {
                        holder,
                        waited: now.saturating_duration_since(first),
                    }
                } else {
                    Next::Wait { holder, until }
                }
            }
        }
    }

    fn take(&self, revision: i64, lease: LeaseId) -> Next {
        Next::Take {
            compares: vec![Compare::ModRevision(self.key.clone(), revision)],
            ops: vec![Op::Put {
                key: self.key.clone(),
                value: self.me.encode(),
                lease,
            }],
        }
    }

    /// The transaction a stopping agent uses to give its key back (only
    /// if it is still its own record): the next start need not wait.
    pub fn release(&self) -> (Vec<Compare>, Vec<Op>) {
        (
            vec![Compare::Value(self.key.clone(), self.me.encode())],
            vec![Op::Delete {
                key: self.key.clone(),
            }],
        )
    }
}

/// What a read of the key shows a running agent that held it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Still ours, under the current lease.
    Held,
    /// Gone: deleted, or its lease ended.
    Gone,
    /// Another instance (or something else) holds it now.
    Replaced(Box<Holder>),
}

/// Judges a read of the instance key by an agent `me` holding `lease`.
pub fn check(kv: Option<&KeyValue>, me: &Instance, lease: LeaseId) -> Verdict {
    match Holder::of(kv, me) {
        Holder::Absent => Verdict::Gone,
        Holder::Me { lease: l, .. } if l == lease => Verdict::Held,
        // Ours, but under another lease: this agent's own record moved
        // to a lease it does not hold is not something it did.
        other => Verdict::Replaced(Box::new(other)),
    }
}

/// `ms` since the Unix epoch as a UTC time, `2024-05-01T12:00:00Z`.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil, for days since 1970-01-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn me(id: &str) -> Instance {
        Instance {
            id: id.into(),
            site: "ny".into(),
            host: "h1".into(),
            pid: 42,
            since_ms: 1_700_000_000_000,
            cert_sha256: None,
            lease_ttl_ms: 3000,
            process: Some(Process {
                boot_id: "b1".into(),
                pid_ns: "pid:[1]".into(),
                start_ticks: 100,
            }),
        }
    }

    fn kv(i: &Instance, lease: LeaseId, rev: i64) -> KeyValue {
        KeyValue {
            key: "/t/sites/ny/instance".into(),
            value: i.encode(),
            mod_revision: rev,
            create_revision: rev,
            lease,
        }
    }

    fn claim() -> Claim {
        Claim::new(&Keys::new("/t"), me("aa"), Duration::from_secs(3))
    }

    #[test]
    fn an_absent_key_is_taken_with_a_key_absent_compare() {
        let mut c = claim();
        let now = Instant::now();
        let Next::Take { compares, ops } = c.next(None, 7, Liveness::Unknown, now) else {
            panic!("not a take")
        };
        assert_eq!(
            compares,
            vec![Compare::ModRevision("/t/sites/ny/instance".into(), 0)]
        );
        assert!(matches!(&ops[..], [Op::Put { key, lease: 7, value }]
            if key == "/t/sites/ny/instance" && Instance::decode(value).ok() == Some(me("aa"))));
        assert_eq!(
            c.next(Some(&kv(&me("aa"), 7, 5)), 7, Liveness::Unknown, now),
            Next::Held
        );
    }

    #[test]
    fn our_record_under_an_old_lease_is_moved_with_a_revision_compare() {
        let mut c = claim();
        let next = c.next(
            Some(&kv(&me("aa"), 6, 9)),
            7,
            Liveness::Unknown,
            Instant::now(),
        );
        let Next::Take { compares, ops } = next else {
            panic!("not a take: {next:?}")
        };
        assert_eq!(
            compares,
            vec![Compare::ModRevision("/t/sites/ny/instance".into(), 9)]
        );
        assert!(matches!(&ops[..], [Op::Put { lease: 7, .. }]));
    }

    #[test]
    fn another_holder_is_waited_for_then_refused() {
        let mut c = claim();
        let t0 = Instant::now();
        let other = kv(&me("bb"), 3, 4);
        let Next::Wait { holder, until } = c.next(Some(&other), 7, Liveness::Unknown, t0) else {
            panic!("not a wait")
        };
        assert!(matches!(holder, Holder::Other { record: Some(ref r), .. } if r.id == "bb"));
        // 3 s TTL: 3 s plus a 2 s margin.
        assert_eq!(until, t0 + Duration::from_secs(5));
        assert!(matches!(
            c.next(Some(&other), 7, Liveness::Unknown, t0 + Duration::from_secs(4)),
            Next::Wait { until: u, .. } if u == until
        ));
        // The key went (the old run's lease ended): take it.
        assert!(matches!(
            c.next(None, 7, Liveness::Unknown, t0 + Duration::from_secs(4)),
            Next::Take { .. }
        ));
        let refused = c.next(
            Some(&other),
            7,
            Liveness::Unknown,
            t0 + Duration::from_secs(5),
        );
        assert!(
            matches!(refused, Next::Refuse { waited, .. } if waited == Duration::from_secs(5)),
            "{refused:?}"
        );
    }

    #[test]
    fn a_holder_with_a_longer_ttl_is_waited_for_longer() {
        let mut c = claim();
        let t0 = Instant::now();
        let mut long = me("bb");
        long.lease_ttl_ms = 20_000;
        let Next::Wait { until, .. } = c.next(Some(&kv(&long, 3, 4)), 7, Liveness::Unknown, t0)
        else {
            panic!("not a wait")
        };
        assert_eq!(until, t0 + Duration::from_secs(30));
        // A wild TTL is clipped to the configuration's hour.
        long.lease_ttl_ms = u64::MAX;
        let mut c = claim();
        let Next::Wait { until, .. } = c.next(Some(&kv(&long, 3, 4)), 7, Liveness::Unknown, t0)
        else {
            panic!("not a wait")
        };
        assert_eq!(until, t0 + Duration::from_secs(3600 + 1800));
    }

    #[test]
    fn a_crashed_run_on_this_host_is_replaced_at_once() {
        let mut c = claim();
        let old = kv(&me("bb"), 3, 4);
        let next = c.next(Some(&old), 7, Liveness::Gone, Instant::now());
        let Next::Take { compares, ops } = next else {
            panic!("not a take: {next:?}")
        };
        assert_eq!(
            compares,
            vec![Compare::ModRevision("/t/sites/ny/instance".into(), 4)]
        );
        assert!(matches!(&ops[..], [Op::Put { lease: 7, .. }]));
        // Only a record naming this kernel and pid namespace can be
        // looked up.
        let me_ = me("aa");
        assert_eq!(
            Holder::of(Some(&old), &me_)
                .process(&me_)
                .map(|(pid, _)| pid),
            Some(42)
        );
        for (boot, ns) in [("b2", "pid:[1]"), ("b1", "pid:[2]")] {
            let mut elsewhere = me("bb");
            elsewhere.process = Some(Process {
                boot_id: boot.into(),
                pid_ns: ns.into(),
                start_ticks: 100,
            });
            let h = Holder::of(Some(&kv(&elsewhere, 3, 4)), &me_);
            assert!(h.process(&me_).is_none(), "{boot} {ns}");
        }
        let mut unnamed = me("bb");
        unnamed.process = None;
        assert!(Holder::of(Some(&kv(&unnamed, 3, 4)), &me_)
            .process(&me_)
            .is_none());
    }

    #[test]
    fn an_unreadable_value_is_someone_else() {
        let mut c = claim();
        let mut bad = kv(&me("aa"), 3, 4);
        bad.value = b"mallory".to_vec();
        let t0 = Instant::now();
        assert!(matches!(
            c.next(Some(&bad), 7, Liveness::Gone, t0),
            Next::Wait {
                holder: Holder::Other {
                    record: None,
                    unreadable: Some(_),
                    ..
                },
                ..
            }
        ));
        bad.value = vec![b' '; MAX_VALUE + 1];
        assert!(matches!(
            check(Some(&bad), &me("aa"), 7),
            Verdict::Replaced(h) if matches!(*h, Holder::Other { record: None, .. })
        ));
    }

    #[test]
    fn a_running_agent_sees_its_key_held_gone_or_replaced() {
        let mine = me("aa");
        assert_eq!(check(Some(&kv(&mine, 7, 5)), &mine, 7), Verdict::Held);
        assert_eq!(check(None, &mine, 7), Verdict::Gone);
        assert!(matches!(
            check(Some(&kv(&me("bb"), 8, 6)), &mine, 7),
            Verdict::Replaced(h) if matches!(&*h, Holder::Other { record: Some(r), lease: 8, .. } if r.id == "bb")
        ));
        assert!(matches!(
            check(Some(&kv(&mine, 8, 6)), &mine, 7),
            Verdict::Replaced(h) if matches!(*h, Holder::Me { lease: 8, .. })
        ));
    }

    #[test]
    fn release_deletes_only_our_own_record() {
        let c = claim();
        let (compares, ops) = c.release();
        assert_eq!(
            compares,
            vec![Compare::Value(
                "/t/sites/ny/instance".into(),
                me("aa").encode()
            )]
        );
        assert_eq!(
            ops,
            vec![Op::Delete {
                key: "/t/sites/ny/instance".into()
            }]
        );
    }

    #[test]
    fn patience_covers_etcd_rounding_and_a_margin() {
        let p = |ms| patience(Duration::from_millis(ms), None);
        assert_eq!(p(1000), Duration::from_secs(4));
        assert_eq!(p(1500), Duration::from_secs(4));
        assert_eq!(p(3000), Duration::from_secs(5));
        assert_eq!(p(10_000), Duration::from_secs(15));
        assert_eq!(
            patience(Duration::from_secs(3), Some(Duration::from_secs(10))),
            Duration::from_secs(15)
        );
    }

    #[test]
    fn times_print_as_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_700_000_000_999), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn records_round_trip_and_the_display_names_the_holder() {
        let mut i = me("0123");
        i.cert_sha256 = Some("ab".repeat(32));
        assert_eq!(Instance::decode(&i.encode()).ok(), Some(i.clone()));
        let shown = i.to_string();
        for part in ["0123", "\"h1\"", "pid 42", "2023-11-14T22:13:20Z", "abab"] {
            assert!(shown.contains(part), "{shown}");
        }
    }

    proptest! {
        #[test]
        fn any_value_decodes_or_is_refused_without_panic(value in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Instance::decode(&value);
        }

        #[test]
        fn decoded_fields_are_bounded(host in ".{0,2000}", ttl in any::<u64>(), since in any::<u64>()) {
            let mut i = me("x");
            i.host = host;
            i.lease_ttl_ms = ttl;
            i.since_ms = since;
            let bytes = i.encode();
            match Instance::decode(&bytes) {
                Ok(d) => {
                    prop_assert!(d.host.chars().count() <= MAX_FIELD);
                    prop_assert!(d.lease_ttl_ms <= MAX_TTL_MS);
                    let _ = d.to_string();
                }
                Err(_) => prop_assert!(bytes.len() > MAX_VALUE),
            }
        }

        #[test]
        fn a_claim_refuses_only_after_its_patience(offsets in proptest::collection::vec(0u64..20_000, 1..20)) {
            let mut c = claim();
            let t0 = Instant::now();
            let other = kv(&me("bb"), 3, 4);
            let mut sorted = offsets;
            sorted.sort_unstable();
            let first = Duration::from_millis(sorted[0]);
            for ms in sorted {
                let at = Duration::from_millis(ms);
                match c.next(Some(&other), 7, Liveness::Unknown, t0 + at) {
                    Next::Refuse { .. } => prop_assert!(at >= first + Duration::from_secs(5)),
                    Next::Wait { .. } => prop_assert!(at < first + Duration::from_secs(5)),
                    n => prop_assert!(false, "unexpected {:?}", n),
                }
            }
        }
    }
}
