//! Who owns each group, as this replica site knows it: what a primary's
//! hello is judged against ([`judge_owner`], docs/PEER.md, "Session").
//!
//! With a coordinator, the agent's store watcher publishes every group's
//! owner record each time it reads the store; a hello for an epoch newer
//! than the last reading waits (bounded) for the next one. Without a
//! coordinator, a group's configured primary is its only owner.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tandem_peer::Hello;

use crate::session::replica::{judge_owner, Membership, Owner, OwnerVerdict};

/// The owners of the groups of one site.
pub struct Owners {
    coordinated: bool,
    /// Group -> (owner site, epoch) of its owner record; absent: none.
    records: Mutex<HashMap<String, (String, u64)>>,
    changed: Condvar,
}

impl Owners {
    /// No coordinator (`kind = "none"`): every group's configured primary
    /// owns it.
    pub fn configured() -> Owners {
        Owners::new(false)
    }

    /// A coordinator decides: owners as the store watcher publishes them
    /// ([`Owners::publish`]); unknown until then.
    pub fn coordinated() -> Owners {
        Owners::new(true)
    }

    fn new(coordinated: bool) -> Owners {
        Owners {
            coordinated,
            records: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
        }
    }

    /// A reading of `group`'s owner record: `(site, epoch)`, or `None`
    /// when the coordinator names no owner.
    pub fn publish(&self, group: &str, record: Option<(&str, u64)>) {
        let mut records = self.records.lock();
        let changed = match record {
            Some((site, epoch)) => {
                let now = (site.to_owned(), epoch);
                records.insert(group.to_owned(), now.clone()) != Some(now)
            }
            None => records.remove(group).is_some(),
        };
        if changed {
            self.changed.notify_all();
        }
    }

    /// Who owns the group of `membership` now, as known here.
    pub fn owner(&self, membership: &Membership) -> Owner {
        self.owner_locked(&self.records.lock(), membership)
    }

    fn owner_locked(
        &self,
        records: &HashMap<String, (String, u64)>,
        membership: &Membership,
    ) -> Owner {
        if !self.coordinated {
            return Owner::Configured(membership.primary.clone());
        }
        match records.get(&membership.group) {
            Some((site, epoch)) => Owner::Recorded {
                site: site.clone(),
                epoch: *epoch,
            },
            None => Owner::Unknown,
        }
    }

    /// The owner to judge `hello` by: the current one, or — while it does
    /// not confirm the hello but a newer reading might
    /// ([`OwnerVerdict::Unconfirmed`]) — the next readings, for at most
    /// `wait`.
    pub fn settle(&self, hello: &Hello, membership: &Membership, wait: Duration) -> Owner {
        let deadline = Instant::now() + wait;
        let mut records = self.records.lock();
        loop {
            let owner = self.owner_locked(&records, membership);
            if !matches!(judge_owner(hello, &owner), OwnerVerdict::Unconfirmed(_)) {
                return owner;
            }
            if self.changed.wait_until(&mut records, deadline).timed_out() {
                return self.owner_locked(&records, membership);
            }
        }
    }
}
