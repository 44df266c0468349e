//! Who owns a group: the coordinator (SPEC §2, G6; docs/FAILOVER.md).
//!
//! Two real backends — the `tandem witness` process and an etcd cluster —
//! implement one small interface, [`Store`]: leases, a key space with
//! revisions, compare-and-swap transactions and a wait for changes. The
//! failover logic ([`decide`]) is written once over what a [`Store`] shows
//! and is tested with simulated time ([`memory::MemStore`]).

#![forbid(unsafe_code)]

pub mod decide;
pub mod etcd;
pub mod etcd_tls;
pub mod failsafe;
pub mod instance;
pub mod keys;
pub mod lease;
pub mod machine;
pub mod memory;
pub mod witness;

use std::time::Duration;

/// A lease handed out by the store; keys attached to it vanish when it
/// expires or is revoked.
pub type LeaseId = i64;

/// One key as the store holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the last change to this key.
    pub mod_revision: i64,
    /// Revision at which this key was created.
    pub create_revision: i64,
    /// The lease it is attached to, 0 for none.
    pub lease: LeaseId,
}

/// Every key under a prefix at one revision of the store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub revision: i64,
    pub kvs: Vec<KeyValue>,
}

impl Snapshot {
    pub fn get(&self, key: &str) -> Option<&KeyValue> {
        self.kvs.iter().find(|kv| kv.key == key)
    }
}

/// A condition of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key's last change was at this revision; 0 means the key does
    /// not exist.
    ModRevision(String, i64),
    /// The key holds exactly this value (and exists).
    Value(String, Vec<u8>),
}

/// A change made by a transaction whose conditions all hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Sets a key; `lease` 0 keeps it until deleted.
    Put {
        key: String,
        value: Vec<u8>,
        lease: LeaseId,
    },
    Delete {
        key: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The coordinator could not be reached or did not answer in time.
    #[error("coordinator unreachable: {0}")]
    Unreachable(String),
    /// The coordinator answered something this client does not
    /// understand.
    #[error("coordinator answered badly: {0}")]
    Protocol(String),
    /// The lease does not exist (expired or revoked).
    #[error("lease {0:x} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// A put named a lease that does not exist.
    #[error("coordinator refused: {0}")]
    Refused(String),
}

/// The interface both coordinator backends implement. Every call is
/// bounded in time: a backend gives up with [`StoreError::Unreachable`]
/// rather than block longer than its request timeout.
pub trait Store: Send + Sync {
    /// Grants a lease of `ttl` (rounded up to what the backend supports).
    fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError>;
    /// Renews a lease to its full TTL; returns that TTL.
    fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError>;
    /// Ends a lease now; its keys vanish.
    fn revoke(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// Every key starting with `prefix`, in key order.
    fn range(&self, prefix: &str) -> Result<Snapshot, StoreError>;
    /// Applies `ops` atomically if every compare holds. Returns whether it
    /// did, and the store's revision after the call.
    fn txn(&self, compares: &[Compare], ops: &[Op]) -> Result<(bool, i64), StoreError>;
    /// Returns once a key under `prefix` changed after `after_revision`
    /// (immediately if one already did), or after `timeout`.
    fn wait(&self, prefix: &str, after_revision: i64, timeout: Duration) -> Result<(), StoreError>;
}
