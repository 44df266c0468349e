//! Failsafe ownership, the agent's side (docs/FAILOVER.md, "Failsafe").
//!
//! * **As owner**, the `failsafe` thread looks at every primary gate each
//!   TTL/15. Once the coordinator's clocks run short (a renewal or a
//!   confirming read is late) it asks every other site of the group for a
//!   peer lease, one `LeaseAsk` per site over the replication link, and
//!   extends the gate's peer clock with what *all* of them granted
//!   (`tandem_coordinator::failsafe::PeerLeases`).
//! * **As replica**, [`Grantor`] answers a primary site's asks: each group
//!   by its ownership machine ([`GroupMachine::grant`]), which then claims
//!   nothing until its promise ran out.
//!
//! [`GroupMachine::grant`]: tandem_coordinator::machine::GroupMachine::grant

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use tandem_coordinator::failsafe::{self, PeerLeases};
use tandem_peer::Message;
use tandem_replication::receiver::LeaseGrantor;
use tracing::{info, warn};

use super::{Handle, Member};

/// What the owner's side keeps between asks.
#[derive(Default)]
pub(crate) struct Asks {
    next: AtomicU64,
    /// Asks not answered yet: id -> (sent, site). Entries older than a
    /// lease are dropped (their answer would be worthless).
    pending: Mutex<HashMap<u64, (Instant, String)>>,
}

/// A group's failsafe state on the owner's side.
pub(crate) struct GroupLeases {
    pub peers: Mutex<PeerLeases>,
    /// The sites the last warning named as lacking (not repeated).
    warned: Mutex<Vec<(String, Option<String>)>>,
}

impl GroupLeases {
    pub fn new(others: Vec<String>) -> GroupLeases {
        GroupLeases {
            peers: Mutex::new(PeerLeases::new(others)),
            warned: Mutex::new(Vec::new()),
        }
    }
}

/// The owner's loop (thread `failsafe`).
pub(super) fn run(h: &Arc<Handle>) {
    let every = failsafe::look_every(h.ttl);
    let duration_ms = u32::try_from(h.ttl.as_millis()).unwrap_or(u32::MAX);
    while h.running() {
        let now = Instant::now();
        let mut per_site: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
        for m in h.members() {
            look(h, &m, now, &mut per_site);
        }
        if !per_site.is_empty() {
            h.asks
                .pending
                .lock()
                .retain(|_, (sent, _)| now.saturating_duration_since(*sent) < h.ttl);
        }
        for (site, groups) in per_site {
            let link = h.shared.links.lock().get(&site).cloned();
            let Some(link) = link else { continue };
            let id = h.asks.next.fetch_add(1, Ordering::Relaxed);
            h.asks.pending.lock().insert(id, (now, site.clone()));
            let weak = Arc::downgrade(h);
            link.on_lease_answers(Arc::new(move |site, id, ms, answers| {
                if let Some(h) = weak.upgrade() {
                    answered(&h, site, id, ms, answers);
                }
            }));
            let ask = Message::LeaseAsk {
                id,
                duration_ms,
                groups,
            };
            if !link.send_control(&ask) {
                h.asks.pending.lock().remove(&id);
            }
        }
        h.ended.wait_until(now + every);
    }
}

/// One group's turn: note whether it runs on peer leases, and whether to
/// ask for them.
fn look(h: &Handle, m: &Member, now: Instant, per_site: &mut BTreeMap<String, Vec<(String, u64)>>) {
    let gate = m.runtime.gate();
    let serving = m.machine.lock().serving();
    let (Some(gate), Some((epoch, _))) = (gate, serving) else {
        return;
    };
    let group = m.runtime.name();
    let on_peers = gate.admitted() && gate.on_peer_leases();
    // The gate keeps since when it runs on peer leases (status, metrics).
    {
        match (on_peers, gate.failsafe().is_some()) {
            (true, false) => {
                let now = SystemTime::now();
                let peers = m.failsafe.peers.lock().sites().to_vec();
                gate.set_failsafe(Some((now, peers.clone())));
                let sites = peers.join(", ");
                warn!(
                    group,
                    "coordinator unreachable: writes continue on peer leases of {sites} (failsafe)"
                );
            }
            (false, true) => {
                gate.set_failsafe(None);
                if gate.is_open() {
                    info!(
                        group,
                        "coordinator reachable again: writes no longer depend on peer leases"
                    );
                }
            }
            _ => {}
        }
    }
    if !gate.admitted() {
        return;
    }
    let peers = m.failsafe.peers.lock();
    if !failsafe::should_ask(now, gate.coordinator_until(), peers.valid_until(), h.ttl) {
        return;
    }
    if peers.unbounded() {
        // No other site: nobody can take the group over.
        gate.extend_peer(failsafe::valid_until(now, h.ttl));
        return;
    }
    let lacking = peers.lacking(now);
    drop(peers);
    if !lacking.is_empty() {
        let mut warned = m.failsafe.warned.lock();
        if *warned != lacking && lacking.iter().any(|(_, why)| why.is_some()) {
            let said: Vec<String> = lacking
                .iter()
                .map(|(site, why)| match why {
                    Some(why) => format!("{site} refused: {why}"),
                    None => format!("{site} has not answered"),
                })
                .collect();
            warn!(
                group,
                "failsafe: no peer lease from every site ({}): writes stop when the coordinator's lease lapses",
                said.join("; ")
            );
            *warned = lacking;
        }
    } else {
        m.failsafe.warned.lock().clear();
    }
    for site in m.failsafe.peers.lock().sites() {
        per_site
            .entry(site.clone())
            .or_default()
            .push((group.to_owned(), epoch));
    }
}

/// A replica site answered ask `id`.
fn answered(h: &Handle, site: &str, id: u64, duration_ms: u32, answers: Vec<(String, String)>) {
    let Some((sent, asked)) = h.asks.pending.lock().remove(&id) else {
        return;
    };
    if asked != site {
        return;
    }
    // Never act longer than this site asked for, whatever was granted.
    let duration = Duration::from_millis(u64::from(duration_ms)).min(h.ttl);
    let members: HashMap<String, Arc<Member>> = h
        .members()
        .into_iter()
        .map(|m| (m.runtime.name().to_owned(), m))
        .collect();
    for (group, refusal) in answers {
        let Some(m) = members.get(&group) else {
            continue;
        };
        let mut peers = m.failsafe.peers.lock();
        if refusal.is_empty() && !duration.is_zero() {
            peers.granted(site, sent, duration);
        } else {
            peers.refused(site, refusal);
        }
        let until = peers.valid_until();
        drop(peers);
        if let (Some(until), Some(gate)) = (until, m.runtime.gate()) {
            gate.extend_peer(until);
        }
    }
}

/// The replica's side: answers asks from the groups' machines.
pub(crate) struct Grantor {
    pub h: Weak<Handle>,
}

impl LeaseGrantor for Grantor {
    fn answer(
        &self,
        primary: &str,
        id: u64,
        _asked_ms: u32,
        groups: Vec<(String, u64)>,
    ) -> Message {
        let Some(h) = self.h.upgrade() else {
            return refuse_all(id, groups, "disabled: the agent is stopping");
        };
        let members: HashMap<String, Arc<Member>> = h
            .members()
            .into_iter()
            .map(|m| (m.runtime.name().to_owned(), m))
            .collect();
        let now = Instant::now();
        let mut granted = h.ttl;
        let answers = groups
            .into_iter()
            .map(|(group, epoch)| {
                let answer = match members.get(&group) {
                    None => "unknown_group: it does not have the group".to_owned(),
                    Some(m) => match m.machine.lock().grant(primary, epoch, now) {
                        Ok(d) => {
                            granted = granted.min(d);
                            String::new()
                        }
                        Err(why) => format!("{}: {why}", why.code()),
                    },
                };
                (group, answer)
            })
            .collect();
        // Each promise runs for this site's TTL from now; the primary
        // acts on at most what it asked for.
        Message::LeaseAnswer {
            id,
            duration_ms: u32::try_from(granted.as_millis()).unwrap_or(u32::MAX),
            answers,
        }
    }
}

fn refuse_all(id: u64, groups: Vec<(String, u64)>, why: &str) -> Message {
    Message::LeaseAnswer {
        id,
        duration_ms: 0,
        answers: groups
            .into_iter()
            .map(|(g, _)| (g, why.to_owned()))
            .collect(),
    }
}
