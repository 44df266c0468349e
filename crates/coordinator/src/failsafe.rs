//! Failsafe ownership: an owner that cannot reach the coordinator keeps
//! acknowledging writes while every other site of the group promises, over
//! the peer link, not to be promoted for a while — a *peer lease*
//! (docs/FAILOVER.md, "Failsafe"). Pure: no I/O, no clock.
//!
//! The owner's side is [`PeerLeases`]: per group, the grant each other
//! site gave, each valid from when the owner *sent* its ask until
//! `sent + duration - margin` (as a coordinator lease, F2). The other
//! side is the group machine's [`crate::machine::GroupMachine::grant`]:
//! a replica that grants does not claim the group before
//! `received + duration`, which is later.
//!
//! Why this is safe (F5): a new owner needs a claim, and only a site of
//! the group claims; every such site other than the owner is asked, and
//! the owner acts on peer leases only while *all* of them hold a grant it
//! asked for. A site that claimed or is claiming, that is primary, or
//! that knows a newer epoch or another owner refuses; one that granted
//! claims nothing until its grant ran out, which is after the owner
//! stopped acting on it. Granting only ever delays a failover.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use crate::lease;

/// Why a site refused a peer lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Failsafe is off on the asked site.
    Disabled,
    /// The asked site does not have the group.
    UnknownGroup,
    /// The asked site serves the group, or is taking it over.
    Promoting,
    /// The asked site is between roles (a failed role change).
    Down,
    /// The asked site knows a newer epoch than the asker's.
    NewerEpoch { epoch: u64 },
    /// The asked site knows another owner of the asker's epoch.
    OtherOwner { owner: String },
    /// An operator asked for a failover of the group.
    FailoverRequested,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Disabled => write!(f, "failsafe is off there"),
            Refusal::UnknownGroup => write!(f, "it does not have the group"),
            Refusal::Promoting => write!(f, "it serves the group or is taking it over"),
            Refusal::Down => write!(f, "it is between roles"),
            Refusal::NewerEpoch { epoch } => write!(f, "it knows the newer epoch {epoch}"),
            Refusal::OtherOwner { owner } => write!(f, "it follows {owner}"),
            Refusal::FailoverRequested => write!(f, "a failover of the group was requested"),
        }
    }
}

impl Refusal {
    /// A short code for the wire and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Disabled => "disabled",
            Refusal::UnknownGroup => "unknown_group",
            Refusal::Promoting => "promoting",
            Refusal::Down => "down",
            Refusal::NewerEpoch { .. } => "newer_epoch",
            Refusal::OtherOwner { .. } => "other_owner",
            Refusal::FailoverRequested => "failover_requested",
        }
    }
}

/// How long before its coordinator validity lapses an owner starts asking
/// for peer leases: two fifths of the TTL. In steady state the validity
/// never falls under `TTL - margin - TTL/3` (half the TTL), so an owner
/// asks only once a renewal or a confirming read is late.
pub fn ask_before(ttl: Duration) -> Duration {
    ttl * 2 / 5
}

/// How often the owner's driver looks whether to ask.
pub fn look_every(ttl: Duration) -> Duration {
    (ttl / 15).max(Duration::from_millis(20))
}

/// Until when a grant of `duration`, asked for at `sent`, may be acted on.
pub fn valid_until(sent: Instant, duration: Duration) -> Instant {
    sent + duration.saturating_sub(lease::margin(duration))
}

/// Whether an owner whose coordinator lets it act until `coordinator`
/// and whose peer leases run until `peers` should ask for peer leases now.
pub fn should_ask(
    now: Instant,
    coordinator: Instant,
    peers: Option<Instant>,
    ttl: Duration,
) -> bool {
    let soon = |until: Instant| until.saturating_duration_since(now) < ask_before(ttl);
    soon(coordinator) && peers.is_none_or(soon)
}

/// The owner's peer leases of one group: a grant from every other site.
#[derive(Clone, Debug, Default)]
pub struct PeerLeases {
    /// The sites to ask (every site of the group but the owner).
    sites: Vec<String>,
    /// Until when each site's grant may be acted on.
    until: BTreeMap<String, Instant>,
    /// The latest refusal of each site, as it said it (cleared by its
    /// next grant).
    refused: BTreeMap<String, String>,
}

impl PeerLeases {
    pub fn new(sites: Vec<String>) -> PeerLeases {
        PeerLeases {
            sites,
            until: BTreeMap::new(),
            refused: BTreeMap::new(),
        }
    }

    pub fn sites(&self) -> &[String] {
        &self.sites
    }

    /// `site` granted `duration` to the ask sent at `sent`.
    pub fn granted(&mut self, site: &str, sent: Instant, duration: Duration) {
        if !self.sites.iter().any(|s| s == site) {
            return;
        }
        let until = valid_until(sent, duration);
        let slot = self.until.entry(site.to_owned()).or_insert(until);
        *slot = (*slot).max(until);
        self.refused.remove(site);
    }

    /// `site` refused: whatever it granted before still runs its course
    /// (it promised), but nothing is extended.
    pub fn refused(&mut self, site: &str, why: String) {
        if self.sites.iter().any(|s| s == site) {
            self.refused.insert(site.to_owned(), why);
        }
    }

    /// Until when every site's grant allows acting: `None` while a site
    /// has never granted (or the group has no other site: see
    /// [`PeerLeases::unbounded`]).
    pub fn valid_until(&self) -> Option<Instant> {
        let mut until: Option<Instant> = None;
        for s in &self.sites {
            let u = *self.until.get(s)?;
            until = Some(until.map_or(u, |a| a.min(u)));
        }
        until
    }

    /// The group has no other site: nobody can take it over.
    pub fn unbounded(&self) -> bool {
        self.sites.is_empty()
    }

    /// Whether the grants allow acting at `now`.
    pub fn valid_at(&self, now: Instant) -> bool {
        self.unbounded() || self.valid_until().is_some_and(|u| now < u)
    }

    /// The sites whose grant does not run at `now`, with their latest
    /// refusal if they refused.
    pub fn lacking(&self, now: Instant) -> Vec<(String, Option<String>)> {
        self.sites
            .iter()
            .filter(|s| self.until.get(*s).is_none_or(|u| now >= *u))
            .map(|s| (s.clone(), self.refused.get(s).cloned()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TTL: Duration = Duration::from_secs(3);

    #[test]
    fn every_site_must_grant() {
        let t0 = Instant::now();
        let mut p = PeerLeases::new(vec!["chicago".into(), "seattle".into()]);
        assert_eq!(p.valid_until(), None);
        p.granted("chicago", t0, TTL);
        assert_eq!(p.valid_until(), None, "seattle has not granted");
        assert_eq!(p.lacking(t0).len(), 1);
        p.granted("seattle", t0 + Duration::from_millis(100), TTL);
        assert_eq!(p.valid_until(), Some(t0 + Duration::from_millis(2500)));
        p.refused("chicago", Refusal::FailoverRequested.to_string());
        assert_eq!(
            p.valid_until(),
            Some(t0 + Duration::from_millis(2500)),
            "a refusal does not take back what was promised"
        );
        let lacking = p.lacking(t0 + Duration::from_secs(3));
        assert_eq!(
            lacking,
            vec![
                (
                    "chicago".into(),
                    Some(Refusal::FailoverRequested.to_string())
                ),
                ("seattle".into(), None)
            ]
        );
        p.granted("elsewhere", t0 + TTL, TTL);
        assert_eq!(p.lacking(t0 + Duration::from_secs(3)).len(), 2);
    }

    #[test]
    fn an_owner_asks_only_once_the_coordinator_is_late() {
        let now = Instant::now();
        let fresh = now + Duration::from_millis(1500);
        assert!(!should_ask(now, fresh, None, TTL), "steady state");
        let late = now + Duration::from_millis(1100);
        assert!(should_ask(now, late, None, TTL));
        assert!(
            !should_ask(now, late, Some(now + Duration::from_secs(2)), TTL),
            "peer leases still fresh"
        );
        assert!(should_ask(
            now,
            late,
            Some(now + Duration::from_secs(1)),
            TTL
        ));
    }

    proptest! {
        /// F5: the owner stops acting on a grant before the granting site
        /// may claim, whatever the delays: the ask is received after it is
        /// sent, and the grant is counted from the receipt.
        #[test]
        fn the_owner_stops_before_any_grantor_may_claim(
            ttl_ms in 100u64..60_000,
            delays in proptest::collection::vec((0u64..5_000, 0u64..5_000), 1..4),
        ) {
            let ttl = Duration::from_millis(ttl_ms);
            let t0 = Instant::now();
            let sites: Vec<String> = (0..delays.len()).map(|i| format!("s{i}")).collect();
            let mut p = PeerLeases::new(sites.clone());
            let mut may_claim = Vec::new();
            for (i, (sent_after, transit)) in delays.iter().enumerate() {
                let sent = t0 + Duration::from_millis(*sent_after);
                let received = sent + Duration::from_millis(*transit);
                p.granted(&sites[i], sent, ttl);
                may_claim.push(received + ttl);
            }
            let until = p.valid_until().unwrap();
            for m in may_claim {
                prop_assert!(until < m);
            }
        }
    }
}
