//! The store's semantics in memory: leases with deadlines, keys with
//! revisions, transactions and waits. The witness serves one of these
//! (persisted on every change); the failover simulation drives one with a
//! simulated clock.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use crate::{Compare, KeyValue, LeaseId, Op, Snapshot, Store, StoreError};

/// Monotonic time as the store sees it.
pub trait Clock: Send + Sync {
    fn now(&self) -> Duration;
}

/// The machine's monotonic clock.
pub struct RealClock(Instant);

impl RealClock {
    pub fn new() -> RealClock {
        RealClock(Instant::now())
    }
}

impl Default for RealClock {
    fn default() -> Self {
        RealClock::new()
    }
}

impl Clock for RealClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// A clock a test moves by hand.
#[derive(Clone, Default)]
pub struct SimClock(Arc<AtomicU64>);

impl SimClock {
    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.0.fetch_add(nanos, Ordering::SeqCst);
    }
}

impl Clock for SimClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::SeqCst))
    }
}

/// Everything the store holds, as persisted by the witness. Lease
/// deadlines are not persisted: after a restart every lease gets its full
/// TTL again (a holder that is gone lets it expire then).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    pub revision: i64,
    pub next_lease: LeaseId,
    /// Lease id -> TTL in milliseconds.
    pub leases: BTreeMap<LeaseId, u64>,
    pub keys: BTreeMap<String, StoredKey>,
    /// Witness: lease id -> the site it was granted to (the name in the
    /// site's certificate). A lease acts only for its holder.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub holders: BTreeMap<LeaseId, String>,
    /// Witness: a group's epoch key -> the site that owns, or last owned,
    /// the epoch stored there (it alone may claim that epoch again).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub epoch_holders: BTreeMap<String, String>,
}

/// What a guarded transaction records besides its ops: the holder of the
/// epoch stored in an epoch key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochHolder {
    pub epoch_key: String,
    pub site: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredKey {
    pub value: Vec<u8>,
    pub mod_revision: i64,
    pub create_revision: i64,
    pub lease: LeaseId,
    /// Witness: the site that wrote it last (what its quotas count).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub by: String,
}

/// Called with the state to make durable before a change (or a read of
/// it) is answered; an error fails the request (the change stays in
/// memory). Concurrent requests share one call (group commit): the call
/// gets the latest state, which includes every change made so far.
pub type Persist = Box<dyn Fn(&State) -> Result<(), PersistError> + Send + Sync>;

/// Why the store's state could not be made durable.
#[derive(Clone, Debug, thiserror::Error)]
pub enum PersistError {
    #[error("the witness is stopping")]
    Stopping,
    #[error("cannot write {path}: {source}; the witness answers nothing more until restarted")]
    Write {
        path: std::path::PathBuf,
        source: Arc<std::io::Error>,
    },
}

struct Inner {
    state: State,
    /// Lease id -> deadline on the store's clock.
    deadlines: BTreeMap<LeaseId, Duration>,
    /// Changes of `state` so far (what durability is counted in).
    version: u64,
}

/// How far the state on disk has come.
#[derive(Default)]
struct Durable {
    /// Every change up to this version is persisted.
    version: u64,
    /// A request is writing the state now; the others wait for it.
    writing: bool,
    failed: Option<PersistError>,
}

pub struct MemStore {
    inner: Mutex<Inner>,
    changed: Condvar,
    clock: Arc<dyn Clock>,
    persist: Option<Persist>,
    durable: Mutex<Durable>,
    persisted: Condvar,
}

impl MemStore {
    pub fn new(clock: Arc<dyn Clock>) -> MemStore {
        MemStore::restore(
            State {
                revision: 1,
                next_lease: 1,
                ..State::default()
            },
            clock,
            None,
        )
    }

    /// A store holding `state` (as read back by the witness), each lease
    /// with its full TTL from now.
    pub fn restore(state: State, clock: Arc<dyn Clock>, persist: Option<Persist>) -> MemStore {
        let now = clock.now();
        let deadlines = state
            .leases
            .iter()
            .map(|(&id, &ttl)| (id, now + Duration::from_millis(ttl)))
            .collect();
        MemStore {
            inner: Mutex::new(Inner {
                state,
                deadlines,
                version: 0,
            }),
            changed: Condvar::new(),
            clock,
            persist,
            durable: Mutex::new(Durable::default()),
            persisted: Condvar::new(),
        }
    }

    /// A copy of what the store holds.
    pub fn state(&self) -> State {
        let mut inner = self.inner.lock();
        self.expire(&mut inner);
        inner.state.clone()
    }

    /// Drops expired leases and their keys. Returns whether anything
    /// changed.
    fn expire(&self, inner: &mut Inner) -> bool {
        let now = self.clock.now();
        let expired: Vec<LeaseId> = inner
            .deadlines
            .iter()
            .filter(|(_, &d)| d <= now)
            .map(|(&id, _)| id)
            .collect();
        if expired.is_empty() {
            return false;
        }
        for id in &expired {
            self.drop_lease(inner, *id);
        }
        true
    }

    fn drop_lease(&self, inner: &mut Inner, id: LeaseId) {
        inner.deadlines.remove(&id);
        inner.state.leases.remove(&id);
        inner.state.holders.remove(&id);
        let before = inner.state.keys.len();
        inner.state.keys.retain(|_, k| k.lease != id);
        if inner.state.keys.len() != before {
            inner.state.revision += 1;
        }
    }

    /// The state changed: waiters are woken; the change is persisted
    /// before anything that saw it is answered ([`MemStore::settle`]).
    fn commit(&self, inner: &mut Inner) {
        inner.version += 1;
        self.changed.notify_all();
    }

    /// Returns once every change up to `version` is persisted. One caller
    /// at a time writes the latest state, outside the store's lock; the
    /// others wait for it and are done if it covered their changes
    /// (group commit: one write and sync for every request that arrived
    /// meanwhile).
    fn settle(&self, version: u64) -> Result<(), StoreError> {
        let Some(persist) = &self.persist else {
            return Ok(());
        };
        let mut d = self.durable.lock();
        loop {
            if d.version >= version {
                return Ok(());
            }
            if let Some(e) = &d.failed {
                return Err(StoreError::Unreachable(format!("cannot persist: {e}")));
            }
            if d.writing {
                self.persisted.wait(&mut d);
                continue;
            }
            d.writing = true;
            drop(d);
            let (state, upto) = {
                let inner = self.inner.lock();
                (inner.state.clone(), inner.version)
            };
            let written = persist(&state);
            d = self.durable.lock();
            d.writing = false;
            match written {
                Ok(()) => d.version = d.version.max(upto),
                Err(e) => d.failed = Some(e),
            }
            self.persisted.notify_all();
        }
    }

    /// Runs `f` on the state under the store's lock, then answers once
    /// every change it made or saw is persisted.
    fn locked<T>(
        &self,
        f: impl FnOnce(&mut Inner) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let (result, version) = {
            let mut inner = self.inner.lock();
            let result = f(&mut inner);
            (result, inner.version)
        };
        self.settle(version)?;
        result
    }

    fn holds(state: &State, c: &Compare) -> bool {
        match c {
            Compare::ModRevision(key, rev) => {
                state.keys.get(key).map_or(0, |k| k.mod_revision) == *rev
            }
            Compare::Value(key, value) => state.keys.get(key).is_some_and(|k| &k.value == value),
        }
    }

    /// When the next lease expires, if any.
    fn next_deadline(inner: &Inner) -> Option<Duration> {
        inner.deadlines.values().min().copied()
    }
}

/// The witness's guarded calls: `check` sees the state (expired leases
/// dropped) inside the store's lock and may refuse before anything
/// changes; `Ok(Err(refusal))` is its refusal.
impl MemStore {
    /// Grants a lease held by `holder`.
    pub fn grant_to<R>(
        &self,
        ttl: Duration,
        holder: &str,
        check: impl FnOnce(&State) -> Result<(), R>,
    ) -> Result<Result<LeaseId, R>, StoreError> {
        self.locked(|inner| {
            self.expire(inner);
            if let Err(refusal) = check(&inner.state) {
                self.commit(inner);
                return Ok(Err(refusal));
            }
            self.grant_locked(inner, ttl, holder).map(Ok)
        })
    }

    pub fn keep_alive_checked<R>(
        &self,
        lease: LeaseId,
        check: impl FnOnce(&State) -> Result<(), R>,
    ) -> Result<Result<Duration, R>, StoreError> {
        self.locked(|inner| {
            if self.expire(inner) {
                self.commit(inner);
            }
            if let Err(refusal) = check(&inner.state) {
                return Ok(Err(refusal));
            }
            self.keep_alive_locked(inner, lease).map(Ok)
        })
    }

    pub fn revoke_checked<R>(
        &self,
        lease: LeaseId,
        check: impl FnOnce(&State) -> Result<(), R>,
    ) -> Result<Result<(), R>, StoreError> {
        self.locked(|inner| {
            let expired = self.expire(inner);
            if let Err(refusal) = check(&inner.state) {
                if expired {
                    self.commit(inner);
                }
                return Ok(Err(refusal));
            }
            self.revoke_locked(inner, lease, expired).map(Ok)
        })
    }

    /// A transaction written by `by`; `check` (run only when every
    /// compare holds) also says which epoch holders to record if it
    /// applies.
    pub fn txn_checked<R>(
        &self,
        compares: &[Compare],
        ops: &[Op],
        by: &str,
        check: impl FnOnce(&State) -> Result<Vec<EpochHolder>, R>,
    ) -> Result<Result<(bool, i64), R>, StoreError> {
        self.locked(|inner| {
            let expired = self.expire(inner);
            // A transaction whose compares fail changes nothing: it is
            // answered `false` as usual, whatever it would have written.
            if !compares.iter().all(|c| Self::holds(&inner.state, c)) {
                if expired {
                    self.commit(inner);
                }
                return Ok(Ok((false, inner.state.revision)));
            }
            match check(&inner.state) {
                Err(refusal) => {
                    if expired {
                        self.commit(inner);
                    }
                    Ok(Err(refusal))
                }
                Ok(marks) => self
                    .txn_locked(inner, expired, compares, ops, by, &marks)
                    .map(Ok),
            }
        })
    }

    fn grant_locked(
        &self,
        inner: &mut Inner,
        ttl: Duration,
        holder: &str,
    ) -> Result<LeaseId, StoreError> {
        let id = inner.state.next_lease;
        inner.state.next_lease += 1;
        let ttl_ms = u64::try_from(ttl.as_millis().max(1)).unwrap_or(u64::MAX);
        inner.state.leases.insert(id, ttl_ms);
        if !holder.is_empty() {
            inner.state.holders.insert(id, holder.to_owned());
        }
        let deadline = self.clock.now() + Duration::from_millis(ttl_ms);
        inner.deadlines.insert(id, deadline);
        self.commit(inner);
        Ok(id)
    }

    fn keep_alive_locked(&self, inner: &mut Inner, lease: LeaseId) -> Result<Duration, StoreError> {
        let Some(&ttl_ms) = inner.state.leases.get(&lease) else {
            return Err(StoreError::LeaseNotFound(lease));
        };
        let ttl = Duration::from_millis(ttl_ms);
        let deadline = self.clock.now() + ttl;
        inner.deadlines.insert(lease, deadline);
        Ok(ttl)
    }

    fn revoke_locked(
        &self,
        inner: &mut Inner,
        lease: LeaseId,
        expired: bool,
    ) -> Result<(), StoreError> {
        if !inner.state.leases.contains_key(&lease) {
            if expired {
                self.commit(inner);
            }
            return Err(StoreError::LeaseNotFound(lease));
        }
        self.drop_lease(inner, lease);
        self.commit(inner);
        Ok(())
    }

    fn txn_locked(
        &self,
        inner: &mut Inner,
        expired: bool,
        compares: &[Compare],
        ops: &[Op],
        by: &str,
        marks: &[EpochHolder],
    ) -> Result<(bool, i64), StoreError> {
        if !compares.iter().all(|c| Self::holds(&inner.state, c)) {
            if expired {
                self.commit(inner);
            }
            return Ok((false, inner.state.revision));
        }
        for op in ops {
            if let Op::Put { lease, key, .. } = op {
                if *lease != 0 && !inner.state.leases.contains_key(lease) {
                    if expired {
                        self.commit(inner);
                    }
                    return Err(StoreError::Refused(format!(
                        "put {key}: lease {lease:x} not found"
                    )));
                }
            }
        }
        if ops.is_empty() {
            if expired {
                self.commit(inner);
            }
            return Ok((true, inner.state.revision));
        }
        let revision = inner.state.revision + 1;
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    let create_revision = inner
                        .state
                        .keys
                        .get(key)
                        .map_or(revision, |k| k.create_revision);
                    inner.state.keys.insert(
                        key.clone(),
                        StoredKey {
                            value: value.clone(),
                            mod_revision: revision,
                            create_revision,
                            lease: *lease,
                            by: by.to_owned(),
                        },
                    );
                }
                Op::Delete { key } => {
                    inner.state.keys.remove(key);
                }
            }
        }
        for mark in marks {
            inner
                .state
                .epoch_holders
                .insert(mark.epoch_key.clone(), mark.site.clone());
        }
        inner.state.revision = revision;
        self.commit(inner);
        Ok((true, revision))
    }
}

impl Store for MemStore {
    fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.locked(|inner| {
            self.expire(inner);
            self.grant_locked(inner, ttl, "")
        })
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        self.locked(|inner| {
            if self.expire(inner) {
                self.commit(inner);
            }
            self.keep_alive_locked(inner, lease)
        })
    }

    fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.locked(|inner| {
            let expired = self.expire(inner);
            self.revoke_locked(inner, lease, expired)
        })
    }

    fn range(&self, prefix: &str) -> Result<Snapshot, StoreError> {
        self.locked(|inner| {
            if self.expire(inner) {
                self.commit(inner);
            }
            let kvs = inner
                .state
                .keys
                .range(prefix.to_owned()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| KeyValue {
                    key: k.clone(),
                    value: v.value.clone(),
                    mod_revision: v.mod_revision,
                    create_revision: v.create_revision,
                    lease: v.lease,
                })
                .collect();
            Ok(Snapshot {
                revision: inner.state.revision,
                kvs,
            })
        })
    }

    fn txn(&self, compares: &[Compare], ops: &[Op]) -> Result<(bool, i64), StoreError> {
        self.locked(|inner| {
            let expired = self.expire(inner);
            self.txn_locked(inner, expired, compares, ops, "", &[])
        })
    }

    fn wait(&self, prefix: &str, after_revision: i64, timeout: Duration) -> Result<(), StoreError> {
        // Revisions are store-wide here; a change under another prefix
        // wakes the waiter early, which only costs a read.
        let _ = prefix;
        let until = Instant::now() + timeout;
        let mut inner = self.inner.lock();
        loop {
            // (What a waiter is told is read, and so persisted, next.)
            if self.expire(&mut inner) {
                self.commit(&mut inner);
            }
            if inner.state.revision > after_revision {
                return Ok(());
            }
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            let mut slice = until - now;
            if let Some(d) = Self::next_deadline(&inner) {
                slice = slice.min(d.saturating_sub(self.clock.now()) + Duration::from_millis(1));
            }
            self.changed.wait_for(&mut inner, slice);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Concurrent changes share writes (group commit), and none is
    /// answered before a write that holds it has returned; a read is not
    /// answered before the changes it sees are written.
    #[test]
    fn changes_are_persisted_before_they_are_answered_and_share_writes() {
        let written: Arc<Mutex<State>> = Arc::new(Mutex::new(State::default()));
        let writes = Arc::new(AtomicU64::new(0));
        let persist: Persist = {
            let (written, writes) = (Arc::clone(&written), Arc::clone(&writes));
            Box::new(move |state: &State| {
                // A slow disk: others queue up meanwhile.
                std::thread::sleep(Duration::from_millis(20));
                *written.lock() = state.clone();
                writes.fetch_add(1, Ordering::Relaxed);
                Ok(())
            })
        };
        let store = Arc::new(MemStore::restore(
            State {
                revision: 1,
                next_lease: 1,
                ..State::default()
            },
            Arc::new(SimClock::default()),
            Some(persist),
        ));
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let (store, written) = (Arc::clone(&store), Arc::clone(&written));
                std::thread::spawn(move || {
                    let key = format!("g{i}/owner");
                    store.txn(&[], &[put(&key, "ny", 0)]).unwrap();
                    assert!(
                        written.lock().keys.contains_key(&key),
                        "{key} answered before it was written"
                    );
                    let seen = store.range("g").unwrap();
                    let on_disk = written.lock().clone();
                    for kv in &seen.kvs {
                        assert!(
                            on_disk.keys.contains_key(&kv.key),
                            "{} read before it was written",
                            kv.key
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = writes.load(Ordering::Relaxed);
        assert!(n < 16, "16 concurrent changes took {n} writes");
        assert_eq!(written.lock().keys.len(), 16);
    }

    fn store() -> (MemStore, SimClock) {
        let clock = SimClock::default();
        (MemStore::new(Arc::new(clock.clone())), clock)
    }

    fn put(key: &str, value: &str, lease: LeaseId) -> Op {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease,
        }
    }

    #[test]
    fn leased_keys_vanish_when_the_lease_expires() {
        let (s, clock) = store();
        let lease = s.grant(Duration::from_secs(3)).unwrap();
        s.txn(&[], &[put("a/owner", "ny", lease)]).unwrap();
        clock.advance(Duration::from_secs(2));
        s.keep_alive(lease).unwrap();
        clock.advance(Duration::from_secs(2));
        assert!(s.range("a/").unwrap().get("a/owner").is_some());
        clock.advance(Duration::from_millis(1001));
        assert!(s.range("a/").unwrap().kvs.is_empty());
        assert!(matches!(
            s.keep_alive(lease),
            Err(StoreError::LeaseNotFound(_))
        ));
    }

    #[test]
    fn compare_and_swap_lets_exactly_one_claim_win() {
        let (s, _) = store();
        let claim = |who: &str| {
            s.txn(
                &[Compare::ModRevision("g/owner".into(), 0)],
                &[put("g/owner", who, 0)],
            )
            .unwrap()
            .0
        };
        assert!(claim("chicago"));
        assert!(!claim("seattle"));
        let snap = s.range("g/").unwrap();
        assert_eq!(snap.get("g/owner").unwrap().value, b"chicago");
    }

    #[test]
    fn revisions_grow_and_creation_is_remembered() {
        let (s, _) = store();
        let (_, r1) = s.txn(&[], &[put("k", "1", 0)]).unwrap();
        let (_, r2) = s.txn(&[], &[put("k", "2", 0)]).unwrap();
        assert!(r2 > r1);
        let kv = s.range("k").unwrap().kvs[0].clone();
        assert_eq!((kv.create_revision, kv.mod_revision), (r1, r2));
        let (ok, _) = s
            .txn(
                &[Compare::ModRevision("k".into(), r1)],
                &[Op::Delete { key: "k".into() }],
            )
            .unwrap();
        assert!(!ok, "a stale revision must not match");
    }

    #[test]
    fn a_put_on_a_missing_lease_is_refused() {
        let (s, _) = store();
        assert!(matches!(
            s.txn(&[], &[put("k", "v", 42)]),
            Err(StoreError::Refused(_))
        ));
        assert!(s.range("").unwrap().kvs.is_empty());
    }

    #[test]
    fn restored_leases_get_their_full_ttl_again() {
        let (s, clock) = store();
        let lease = s.grant(Duration::from_secs(3)).unwrap();
        s.txn(&[], &[put("k", "v", lease)]).unwrap();
        clock.advance(Duration::from_millis(2900));
        let state = s.state();
        let s2 = MemStore::restore(state, Arc::new(clock.clone()), None);
        clock.advance(Duration::from_millis(2900));
        assert!(s2.range("k").unwrap().get("k").is_some());
        clock.advance(Duration::from_millis(200));
        assert!(s2.range("k").unwrap().get("k").is_none());
    }
}
