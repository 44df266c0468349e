//! Per-peer bandwidth: the configured `bandwidth`, the `schedule` windows
//! (local time), and a runtime override set through the API; a planner
//! thread applies the effective rate to each peer's limiter.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use tandem_config::{local_weekday_minute, Peer, Rate};
use tandem_replication::throttle::{Limiter, UNLIMITED};

const PLAN_EVERY: Duration = Duration::from_secs(2);

pub struct PeerBandwidth {
    /// The peer's configuration (a reload may change its rates).
    pub peer: Mutex<Peer>,
    pub limiter: Arc<Limiter>,
    /// Set through the API ([`UNLIMITED`], or 0 to pause).
    pub override_bps: Mutex<Option<u64>>,
}

#[derive(Serialize)]
pub struct BandwidthStatus {
    pub site: String,
    /// Configured limit, bits per second.
    pub bandwidth_bps: Option<u64>,
    pub schedule: Vec<String>,
    /// Set at runtime through the API (until the agent restarts).
    pub override_bps: Option<u64>,
    /// A schedule window or the override pauses replication to this site.
    pub paused: bool,
    /// What applies now; null = unlimited, 0 = paused.
    pub effective_bps: Option<u64>,
}

pub struct Bandwidth {
    /// Every other site; a reload adds and removes them.
    pub peers: parking_lot::RwLock<BTreeMap<String, Arc<PeerBandwidth>>>,
    local: String,
}

impl Bandwidth {
    pub fn new(peers: &[Peer], local: &str) -> Arc<Bandwidth> {
        let peers = peers
            .iter()
            .filter(|p| p.name != local)
            .map(|p| (p.name.clone(), PeerBandwidth::new(p)))
            .collect();
        let b = Arc::new(Bandwidth {
            peers: parking_lot::RwLock::new(peers),
            local: local.to_owned(),
        });
        b.apply();
        b
    }

    pub fn limiter(&self, site: &str) -> Option<Arc<Limiter>> {
        self.peers.read().get(site).map(|p| Arc::clone(&p.limiter))
    }

    /// The rate that applies to `p` now.
    fn effective(p: &PeerBandwidth) -> u64 {
        if let Some(o) = *p.override_bps.lock() {
            return o;
        }
        let (weekday, minute) = local_weekday_minute();
        p.peer
            .lock()
            .rate_at(weekday, minute)
            .map_or(UNLIMITED, |r: Rate| r.bits_per_sec())
    }

    pub fn apply(&self) {
        for p in self.peers.read().values() {
            p.limiter.set_rate(Self::effective(p));
        }
    }

    /// A reload added `peer` (this site's own entry is not a link), or
    /// changed its `bandwidth` or `schedule`: the new rates apply at once;
    /// a runtime override stays. The peer's limiter is kept, so links
    /// already made follow the change.
    pub fn upsert(&self, peer: &Peer) {
        if peer.name == self.local {
            return;
        }
        let mut peers = self.peers.write();
        let entry = peers
            .entry(peer.name.clone())
            .or_insert_with(|| PeerBandwidth::new(peer));
        *entry.peer.lock() = peer.clone();
        entry.limiter.set_rate(Self::effective(entry));
    }

    /// A reload removed the peer `site`.
    pub fn remove(&self, site: &str) {
        self.peers.write().remove(site);
    }

    /// Sets (Some) or clears (None) the runtime override of a peer.
    pub fn set_override(&self, site: &str, bps: Option<u64>) -> Result<(), UnknownPeer> {
        let p = self
            .peers
            .read()
            .get(site)
            .cloned()
            .ok_or_else(|| UnknownPeer(site.to_owned()))?;
        *p.override_bps.lock() = bps;
        p.limiter.set_rate(Self::effective(&p));
        tracing::info!(peer = site, override_bps = ?bps, "bandwidth override changed through the API");
        Ok(())
    }

    pub fn status(&self) -> Vec<BandwidthStatus> {
        self.peers
            .read()
            .values()
            .map(|p| {
                let peer = p.peer.lock();
                BandwidthStatus {
                    site: peer.name.clone(),
                    bandwidth_bps: peer.bandwidth.map(|r| r.bits_per_sec()),
                    schedule: peer.schedule.iter().map(ToString::to_string).collect(),
                    override_bps: *p.override_bps.lock(),
                    paused: p.limiter.rate_bps() == 0,
                    effective_bps: Some(p.limiter.rate_bps()).filter(|r| *r != UNLIMITED),
                }
            })
            .collect()
    }

    /// Re-applies schedules until `stop`.
    pub(crate) fn plan(
        self: &Arc<Self>,
        stop: Arc<crate::signal::Signal>,
    ) -> std::io::Result<JoinHandle<()>> {
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("bandwidth".into())
            .spawn(move || {
                while !stop.is_raised() {
                    me.apply();
                    stop.wait(PLAN_EVERY);
                }
            })
    }
}

impl PeerBandwidth {
    fn new(peer: &Peer) -> Arc<PeerBandwidth> {
        Arc::new(PeerBandwidth {
            peer: Mutex::new(peer.clone()),
            limiter: Limiter::new(UNLIMITED),
            override_bps: Mutex::new(None),
        })
    }
}

/// A bandwidth override named a site that is not a peer of this one.
#[derive(Debug, thiserror::Error)]
#[error("no peer site named {0:?}")]
pub struct UnknownPeer(pub String);
