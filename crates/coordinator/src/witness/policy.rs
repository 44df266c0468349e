//! What a site may ask of the witness (SPEC G11): every request acts only
//! for the site named in its client certificate. Pure: the server runs
//! [`check`] on the store's state inside the store's lock, before the
//! change, and applies the change only when it is [`Ok`].
//!
//! The rules follow what the failover logic ([`crate::decide`],
//! [`crate::machine`]) writes, and nothing more (docs/WITNESS.md,
//! "Identities and policy"). Keys are those of [`crate::keys`] under any
//! prefix, `<prefix>/groups/<g>/{owner,epoch,lag,request,members/<site>}`,
//! plus each site's own `<prefix>/sites/<site>/...`; any other key is
//! refused.

use std::collections::BTreeMap;

use crate::keys::{LagRecord, MemberReport, OwnerRecord, Request, RequestKind};
use crate::memory::{EpochHolder, State};
use crate::{Compare, LeaseId, Op};

/// Bounds on what one site may store, and on the whole store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of one key's name.
    pub max_key: usize,
    /// Bytes of one key's value.
    pub max_value: usize,
    /// Compares plus ops in one transaction.
    pub max_txn: usize,
    /// Keys last written by one site.
    pub site_keys: usize,
    /// Bytes (names and values) last written by one site.
    pub site_bytes: usize,
    /// Leases one site holds at once.
    pub site_leases: usize,
    /// Keys in the whole store.
    pub total_keys: usize,
    /// Bytes (names and values) in the whole store.
    pub total_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key: 512,
            max_value: 8 * 1024,
            max_txn: 256,
            site_keys: 20_000,
            site_bytes: 4 << 20,
            site_leases: 1024,
            total_keys: 100_000,
            total_bytes: 16 << 20,
        }
    }
}

/// A request, as far as the policy cares.
#[derive(Clone, Copy, Debug)]
pub enum Action<'a> {
    Grant,
    KeepAlive(LeaseId),
    Revoke(LeaseId),
    Txn {
        compares: &'a [Compare],
        ops: &'a [Op],
    },
}

/// Why a request is refused. Each has a stable `code` and HTTP status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("lease {lease:x} is held by site {holder:?}, not by {site:?}")]
    NotYourLease {
        site: String,
        lease: LeaseId,
        holder: String,
    },
    #[error("key {key:?} is not one of the keys Tandem's sites write")]
    UnknownKey { key: String },
    #[error("key {key:?} belongs to site {owner:?}, not to {site:?}")]
    NotYourKey {
        site: String,
        key: String,
        owner: String,
    },
    #[error("{key}: {reason}")]
    BadValue { key: String, reason: String },
    #[error("{key}: site {site:?} may not write an owner record for site {named:?}")]
    OwnerNotCaller {
        site: String,
        key: String,
        named: String,
    },
    #[error("{key}: owned by site {owner:?}; only the owner may change or release it")]
    NotOwner {
        site: String,
        key: String,
        owner: String,
    },
    #[error("{key}: epoch {wanted} is not the stored epoch {stored} plus one")]
    EpochNotNext {
        key: String,
        stored: u64,
        wanted: u64,
    },
    #[error("{key}: the epochs are used up (stored epoch {stored})")]
    EpochExhausted { key: String, stored: u64 },
    #[error("{key}: {reason}")]
    EpochKey { key: String, reason: String },
    #[error("key {key:?} appears twice in one transaction")]
    Duplicate { key: String },
    #[error("{what} of {size} bytes is over the limit of {limit}")]
    TooLarge {
        what: String,
        size: usize,
        limit: usize,
    },
    #[error("site {site:?} would hold {what} over its limit of {limit}")]
    SiteQuota {
        site: String,
        what: &'static str,
        limit: usize,
    },
    #[error("the witness would hold {what} over its limit of {limit}")]
    StoreFull { what: &'static str, limit: usize },
}

impl Refusal {
    /// The `code` of the error answer.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::NotYourLease { .. } => "not_your_lease",
            Refusal::UnknownKey { .. } => "unknown_key",
            Refusal::NotYourKey { .. } => "not_your_key",
            Refusal::BadValue { .. } => "bad_value",
            Refusal::OwnerNotCaller { .. } => "owner_not_caller",
            Refusal::NotOwner { .. } => "not_owner",
            Refusal::EpochNotNext { .. } => "epoch_not_next",
            Refusal::EpochExhausted { .. } => "epoch_exhausted",
            Refusal::EpochKey { .. } => "epoch_key",
            Refusal::Duplicate { .. } => "duplicate_key",
            Refusal::TooLarge { .. } => "value_too_large",
            Refusal::SiteQuota { .. } => "site_quota",
            Refusal::StoreFull { .. } => "store_full",
        }
    }

    /// The HTTP status: 403 for what the site may not do, 413 for a value
    /// or transaction too large, 409 for a quota.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::TooLarge { .. } => 413,
            Refusal::SiteQuota { .. } | Refusal::StoreFull { .. } => 409,
            _ => 403,
        }
    }
}

/// A key of the layout, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyKind<'a> {
    /// `<prefix>/groups/<g>/owner`; `group` is `<prefix>/groups/<g>/`.
    Owner {
        group: &'a str,
    },
    Epoch {
        group: &'a str,
    },
    Lag {
        group: &'a str,
    },
    Request {
        group: &'a str,
    },
    Member {
        group: &'a str,
        site: &'a str,
    },
    /// `<prefix>/sites/<site>/...`: that site's own records.
    Site {
        site: &'a str,
    },
}

/// A name segment: a group or site name (no `/`, not empty).
fn name(s: &str) -> bool {
    !s.is_empty() && !s.contains('/')
}

/// Splits `key` into `(group dir with trailing '/', rest)` for a key under
/// `.../groups/<g>/`, the last `groups/` segment deciding.
fn group_dir(key: &str) -> Option<(&str, &str)> {
    let mut search = key.len();
    while let Some(at) = key[..search].rfind("groups/") {
        if at == 0 || key.as_bytes()[at - 1] == b'/' {
            let after = &key[at + "groups/".len()..];
            let (g, rest) = after.split_once('/')?;
            if name(g) {
                let dir_len = at + "groups/".len() + g.len() + 1;
                return Some((&key[..dir_len], rest));
            }
            return None;
        }
        search = at;
    }
    None
}

/// Parses a key of Tandem's layout.
pub fn parse_key(key: &str) -> Option<KeyKind<'_>> {
    if let Some((group, rest)) = group_dir(key) {
        return match rest {
            "owner" => Some(KeyKind::Owner { group }),
            "epoch" => Some(KeyKind::Epoch { group }),
            "lag" => Some(KeyKind::Lag { group }),
            "request" => Some(KeyKind::Request { group }),
            _ => rest
                .strip_prefix("members/")
                .filter(|s| name(s))
                .map(|site| KeyKind::Member { group, site }),
        };
    }
    let at = key.rfind("sites/")?;
    if at != 0 && key.as_bytes()[at - 1] != b'/' {
        return None;
    }
    let (site, rest) = key[at + "sites/".len()..].split_once('/')?;
    (name(site) && !rest.is_empty()).then_some(KeyKind::Site { site })
}

/// Decides whether `site` may do `action` on a store holding `state`.
/// `Ok` carries the epoch holders to record if a transaction applies.
pub fn check(
    site: &str,
    state: &State,
    action: &Action<'_>,
    limits: &Limits,
) -> Result<Vec<EpochHolder>, Refusal> {
    match action {
        Action::Grant => {
            let held = state.holders.values().filter(|h| *h == site).count();
            if held >= limits.site_leases {
                return Err(Refusal::SiteQuota {
                    site: site.to_owned(),
                    what: "leases",
                    limit: limits.site_leases,
                });
            }
            Ok(Vec::new())
        }
        Action::KeepAlive(lease) | Action::Revoke(lease) => {
            // A lease the store does not know is answered "not found".
            if state.leases.contains_key(lease) {
                own_lease(site, state, *lease)?;
            }
            Ok(Vec::new())
        }
        Action::Txn { compares, ops } => txn(site, state, compares, ops, limits),
    }
}

fn holder(state: &State, lease: LeaseId) -> &str {
    state.holders.get(&lease).map_or("", String::as_str)
}

/// The lease must be the caller's (a lease the store does not know is left
/// to the store, which refuses a put on it).
fn own_lease(site: &str, state: &State, lease: LeaseId) -> Result<(), Refusal> {
    if lease == 0 || !state.leases.contains_key(&lease) {
        return Ok(());
    }
    match holder(state, lease) {
        h if h == site => Ok(()),
        h => Err(Refusal::NotYourLease {
            site: site.to_owned(),
            lease,
            holder: if h.is_empty() { "(unknown)" } else { h }.to_owned(),
        }),
    }
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(value).map_err(|e| Refusal::BadValue {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

fn stored<'s>(state: &'s State, key: &str) -> Option<&'s [u8]> {
    state.keys.get(key).map(|k| k.value.as_slice())
}

/// The epoch stored in a group's epoch key: `None` if absent.
fn stored_epoch(state: &State, key: &str) -> Result<Option<u64>, Refusal> {
    match stored(state, key) {
        None => Ok(None),
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or_else(|| Refusal::EpochKey {
                key: key.to_owned(),
                reason: "the stored epoch is not a number".into(),
            }),
    }
}

fn parse_epoch(key: &str, value: &[u8]) -> Result<u64, Refusal> {
    std::str::from_utf8(value)
        .ok()
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Refusal::BadValue {
            key: key.to_owned(),
            reason: "an epoch is a decimal number".into(),
        })
}

/// One transaction's ops, by key.
struct Planned<'a> {
    puts: BTreeMap<&'a str, (&'a [u8], LeaseId)>,
    deletes: Vec<&'a str>,
}

impl Planned<'_> {
    fn put(&self, key: &str) -> Option<(&[u8], LeaseId)> {
        self.puts.get(key).copied()
    }
}

fn txn(
    site: &str,
    state: &State,
    compares: &[Compare],
    ops: &[Op],
    limits: &Limits,
) -> Result<Vec<EpochHolder>, Refusal> {
    let size = compares.len() + ops.len();
    if size > limits.max_txn {
        return Err(Refusal::TooLarge {
            what: "a transaction's compares and ops".into(),
            size,
            limit: limits.max_txn,
        });
    }
    let mut planned = Planned {
        puts: BTreeMap::new(),
        deletes: Vec::new(),
    };
    for op in ops {
        let key = match op {
            Op::Put { key, .. } | Op::Delete { key } => key.as_str(),
        };
        if key.len() > limits.max_key {
            return Err(Refusal::TooLarge {
                what: "a key name".into(),
                size: key.len(),
                limit: limits.max_key,
            });
        }
        let dup = planned.puts.contains_key(key) || planned.deletes.contains(&key);
        if dup {
            return Err(Refusal::Duplicate {
                key: key.to_owned(),
            });
        }
        match op {
            Op::Put { value, lease, .. } => {
                if value.len() > limits.max_value {
                    return Err(Refusal::TooLarge {
                        what: format!("the value of {key}"),
                        size: value.len(),
                        limit: limits.max_value,
                    });
                }
                planned.puts.insert(key, (value.as_slice(), *lease));
            }
            Op::Delete { .. } => planned.deletes.push(key),
        }
    }
    let mut marks = Vec::new();
    for (&key, &(value, lease)) in &planned.puts {
        let kind = parse_key(key).ok_or_else(|| Refusal::UnknownKey {
            key: key.to_owned(),
        })?;
        put(site, state, &planned, key, &kind, value, lease, &mut marks)?;
    }
    for &key in &planned.deletes {
        let kind = parse_key(key).ok_or_else(|| Refusal::UnknownKey {
            key: key.to_owned(),
        })?;
        delete(site, state, &planned, key, &kind)?;
    }
    quotas(site, state, &planned, limits)?;
    Ok(marks)
}

#[allow(clippy::too_many_arguments)]
fn put(
    site: &str,
    state: &State,
    planned: &Planned<'_>,
    key: &str,
    kind: &KeyKind<'_>,
    value: &[u8],
    lease: LeaseId,
    marks: &mut Vec<EpochHolder>,
) -> Result<(), Refusal> {
    match kind {
        KeyKind::Owner { group } => {
            owner_put(site, state, planned, key, group, value, lease, marks)
        }
        KeyKind::Epoch { group } => {
            // Written only with the owner record of that epoch (whose rule
            // checks the epoch itself).
            let epoch = parse_epoch(key, value)?;
            let owner_key = format!("{group}owner");
            let with_owner = planned
                .put(&owner_key)
                .and_then(|(v, _)| serde_json::from_slice::<OwnerRecord>(v).ok())
                .is_some_and(|o| o.epoch == epoch);
            if lease != 0 || !with_owner {
                return Err(Refusal::EpochKey {
                    key: key.to_owned(),
                    reason: "written only without a lease, in the transaction that writes the \
                             owner record of the same epoch"
                        .into(),
                });
            }
            Ok(())
        }
        KeyKind::Member { site: named, .. } => {
            if *named != site {
                return Err(not_your_key(site, key, named));
            }
            let report: MemberReport = decode(key, value)?;
            if report.site != site || report.lease != lease || lease == 0 {
                return Err(Refusal::BadValue {
                    key: key.to_owned(),
                    reason: "a member report names its own site and is attached to the lease \
                             it names"
                        .into(),
                });
            }
            own_lease(site, state, lease)
        }
        KeyKind::Lag { group } => {
            let _: LagRecord = decode(key, value)?;
            owner_only(site, state, planned, key, group)?;
            own_lease(site, state, lease)
        }
        KeyKind::Request { .. } => {
            // Operators' requests: any site may make one.
            let _: Request = decode(key, value)?;
            own_lease(site, state, lease)
        }
        KeyKind::Site { site: named } => {
            if *named != site {
                return Err(not_your_key(site, key, named));
            }
            own_lease(site, state, lease)
        }
    }
}

fn not_your_key(site: &str, key: &str, owner: &str) -> Refusal {
    Refusal::NotYourKey {
        site: site.to_owned(),
        key: key.to_owned(),
        owner: owner.to_owned(),
    }
}

/// The site that owns the group, as the store holds it, or as this
/// transaction writes it.
fn owner_only(
    site: &str,
    state: &State,
    planned: &Planned<'_>,
    key: &str,
    group: &str,
) -> Result<(), Refusal> {
    let owner_key = format!("{group}owner");
    let owner = planned
        .put(&owner_key)
        .map(|(v, _)| v)
        .or_else(|| stored(state, &owner_key))
        .and_then(|v| serde_json::from_slice::<OwnerRecord>(v).ok());
    let epoch_key = format!("{group}epoch");
    match owner {
        Some(o) if o.site == site => Ok(()),
        Some(o) => Err(Refusal::NotOwner {
            site: site.to_owned(),
            key: key.to_owned(),
            owner: o.site,
        }),
        // An owner whose lease lapsed still reports until it steps down.
        None if state.epoch_holders.get(&epoch_key).map(String::as_str) == Some(site) => Ok(()),
        None => Err(Refusal::NotOwner {
            site: site.to_owned(),
            key: key.to_owned(),
            owner: "(none)".into(),
        }),
    }
}

/// The owner record: a claim, a reattach or a handover (docs/WITNESS.md).
#[allow(clippy::too_many_arguments)]
fn owner_put(
    site: &str,
    state: &State,
    planned: &Planned<'_>,
    key: &str,
    group: &str,
    value: &[u8],
    lease: LeaseId,
    marks: &mut Vec<EpochHolder>,
) -> Result<(), Refusal> {
    let new: OwnerRecord = decode(key, value)?;
    if new.lease != lease || lease == 0 {
        return Err(Refusal::BadValue {
            key: key.to_owned(),
            reason: "an owner record is attached to the lease it names".into(),
        });
    }
    let epoch_key = format!("{group}epoch");
    let stored_epoch = stored_epoch(state, &epoch_key)?;
    let written_epoch = planned
        .put(&epoch_key)
        .map(|(v, _)| parse_epoch(&epoch_key, v))
        .transpose()?;
    let current = stored(state, key)
        .map(|v| decode::<OwnerRecord>(key, v))
        .transpose()?;
    let next = |stored: u64| {
        stored
            .checked_add(1)
            .ok_or_else(|| Refusal::EpochExhausted {
                key: key.to_owned(),
                stored,
            })
    };
    let with_epoch_key = |epoch: u64| {
        if written_epoch == Some(epoch) {
            Ok(())
        } else {
            Err(Refusal::EpochKey {
                key: epoch_key.clone(),
                reason: format!("a new owner's epoch {epoch} is written to the epoch key in the same transaction"),
            })
        }
    };
    let lease_of = |holder_site: &str| match holder(state, lease) {
        // A lease the store does not know: the store refuses the put.
        _ if !state.leases.contains_key(&lease) => Ok(()),
        h if h == holder_site => Ok(()),
        h => Err(Refusal::NotYourLease {
            site: holder_site.to_owned(),
            lease,
            holder: if h.is_empty() { "(none)" } else { h }.to_owned(),
        }),
    };
    match current {
        Some(cur) if cur.site != site => Err(Refusal::NotOwner {
            site: site.to_owned(),
            key: key.to_owned(),
            owner: cur.site,
        }),
        Some(cur) if new.site == site => {
            // Reattach: the same record under the caller's new lease.
            let same = OwnerRecord {
                lease: cur.lease,
                ..new.clone()
            };
            if same != cur || written_epoch.is_some() {
                return Err(Refusal::EpochKey {
                    key: key.to_owned(),
                    reason: "the owner may only move its record to its new lease, or hand the \
                             next epoch to another site"
                        .into(),
                });
            }
            lease_of(site)
        }
        Some(_) => {
            // Handover: the owner gives the next epoch to another site,
            // under that site's lease.
            let stored = stored_epoch.unwrap_or(0);
            let epoch = next(stored)?;
            if new.epoch != epoch {
                return Err(Refusal::EpochNotNext {
                    key: key.to_owned(),
                    stored,
                    wanted: new.epoch,
                });
            }
            with_epoch_key(epoch)?;
            lease_of(&new.site)?;
            marks.push(EpochHolder {
                epoch_key,
                site: new.site,
            });
            Ok(())
        }
        None => {
            // A claim, by the caller for itself.
            if new.site != site {
                return Err(Refusal::OwnerNotCaller {
                    site: site.to_owned(),
                    key: key.to_owned(),
                    named: new.site,
                });
            }
            lease_of(site)?;
            match stored_epoch {
                // A group this witness never saw: its first epoch is the
                // one its sites bring (a witness started over).
                None if new.epoch >= 1 && new.epoch < u64::MAX => {}
                None => {
                    return Err(Refusal::EpochNotNext {
                        key: key.to_owned(),
                        stored: 0,
                        wanted: new.epoch,
                    })
                }
                // The holder of the stored epoch takes it back (its lease
                // lapsed and nobody took over).
                Some(stored)
                    if new.epoch == stored
                        && stored >= 1
                        && state.epoch_holders.get(&epoch_key).map(String::as_str)
                            == Some(site) => {}
                Some(stored) => {
                    let epoch = next(stored)?;
                    if new.epoch != epoch {
                        return Err(Refusal::EpochNotNext {
                            key: key.to_owned(),
                            stored,
                            wanted: new.epoch,
                        });
                    }
                }
            }
            with_epoch_key(new.epoch)?;
            marks.push(EpochHolder {
                epoch_key,
                site: site.to_owned(),
            });
            Ok(())
        }
    }
}

fn delete(
    site: &str,
    state: &State,
    planned: &Planned<'_>,
    key: &str,
    kind: &KeyKind<'_>,
) -> Result<(), Refusal> {
    match kind {
        KeyKind::Owner { group } => {
            let Some(value) = stored(state, key) else {
                return Ok(());
            };
            let owner = decode::<OwnerRecord>(key, value)?;
            if owner.site == site {
                return Ok(());
            }
            // A forced failover (an operator's `failover --force`, at any
            // site) first records its request, then takes the group away.
            let request_key = format!("{group}request");
            let forced = planned
                .put(&request_key)
                .map(|(v, _)| v)
                .or_else(|| stored(state, &request_key))
                .and_then(|v| serde_json::from_slice::<Request>(v).ok())
                .is_some_and(|r| r.kind == RequestKind::Failover);
            if forced {
                tracing::warn!(%site, %key, owner = %owner.site, "witness: a forced failover takes the group away from its owner");
                return Ok(());
            }
            Err(Refusal::NotOwner {
                site: site.to_owned(),
                key: key.to_owned(),
                owner: owner.site,
            })
        }
        KeyKind::Epoch { .. } => Err(Refusal::EpochKey {
            key: key.to_owned(),
            reason: "an epoch key is never deleted".into(),
        }),
        KeyKind::Member { site: named, .. } | KeyKind::Site { site: named } => {
            if *named == site {
                Ok(())
            } else {
                Err(not_your_key(site, key, named))
            }
        }
        KeyKind::Lag { group } => {
            if stored(state, key).is_none() {
                return Ok(());
            }
            owner_only(site, state, planned, key, group)
        }
        KeyKind::Request { .. } => Ok(()),
    }
}

/// Keys and bytes per writer and in total, as they would be after the
/// transaction.
fn quotas(
    site: &str,
    state: &State,
    planned: &Planned<'_>,
    limits: &Limits,
) -> Result<(), Refusal> {
    let (mut site_keys, mut site_bytes, mut total_keys, mut total_bytes) = (0, 0, 0, 0);
    for (key, k) in &state.keys {
        if planned.puts.contains_key(key.as_str()) || planned.deletes.contains(&key.as_str()) {
            continue;
        }
        let bytes = key.len() + k.value.len();
        total_keys += 1;
        total_bytes += bytes;
        if k.by == site {
            site_keys += 1;
            site_bytes += bytes;
        }
    }
    for (key, (value, _)) in &planned.puts {
        let bytes = key.len() + value.len();
        site_keys += 1;
        site_bytes += bytes;
        total_keys += 1;
        total_bytes += bytes;
    }
    let grows = !planned.puts.is_empty();
    let site_quota = |what, limit| Refusal::SiteQuota {
        site: site.to_owned(),
        what,
        limit,
    };
    if grows && site_keys > limits.site_keys {
        return Err(site_quota("keys", limits.site_keys));
    }
    if grows && site_bytes > limits.site_bytes {
        return Err(site_quota("bytes", limits.site_bytes));
    }
    if grows && total_keys > limits.total_keys {
        return Err(Refusal::StoreFull {
            what: "keys",
            limit: limits.total_keys,
        });
    }
    if grows && total_bytes > limits.total_bytes {
        return Err(Refusal::StoreFull {
            what: "bytes",
            limit: limits.total_bytes,
        });
    }
    Ok(())
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
