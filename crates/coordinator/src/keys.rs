//! Where the failover logic keeps its facts in the store, and their
//! encoding (JSON values). Under the configured prefix, per group `g`:
//!
//! | key | value | lease |
//! |---|---|---|
//! | `<prefix>/groups/<g>/owner` | [`OwnerRecord`] | the owner's |
//! | `<prefix>/groups/<g>/epoch` | the last epoch granted, decimal | none |
//! | `<prefix>/groups/<g>/members/<site>` | [`MemberReport`] | that site's |
//! | `<prefix>/groups/<g>/lag` | [`LagRecord`], written by the owner | none |
//! | `<prefix>/groups/<g>/request` | [`Request`] (migrate, failover) | none |
//!
//! and per site `s`:
//!
//! | key | value | lease |
//! |---|---|---|
//! | `<prefix>/sites/<s>/instance` | [`crate::instance::Instance`]: the one running agent of that site name | that agent's |

use serde::{Deserialize, Serialize};

use crate::{KeyValue, LeaseId, Snapshot};

/// The owner of a group and the epoch it owns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    pub site: String,
    pub epoch: u64,
    /// The owner's lease (the key is attached to it).
    pub lease: LeaseId,
    /// Where this epoch's sequence starts: the owner held exactly the
    /// records up to `fork_seq` of epoch `fork_epoch` when it took over.
    pub fork_epoch: u64,
    pub fork_seq: u64,
}

/// What a site says of itself for one group, refreshed while it lives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberReport {
    pub site: String,
    pub lease: LeaseId,
    pub role: Role,
    /// The newest epoch this site knows.
    pub epoch: u64,
    /// Its images hold exactly the records up to (`tip_epoch`, `tip_seq`).
    pub tip_epoch: u64,
    pub tip_seq: u64,
    /// Its images are a prefix of the group's sequence (G3).
    pub consistent: bool,
    /// It is willing to take over (e.g. its last `on_promote` did not
    /// fail).
    pub fit: bool,
    /// The group's VM on this site, in libvirt's words (`running`,
    /// `absent`, ...), for status; absent from a group without a VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
}

/// What a site is for a group (SPEC §4.4 `role`): these words are pinned
/// in `tandem status --json` and are the values of `role` in
/// [`MemberReport`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Serves the group and acknowledges writes.
    Primary,
    /// Receives the group's changes from its owner.
    Replica,
    /// Serves the group but may not acknowledge writes now (its lease is
    /// not confirmed).
    Fenced,
    /// Neither: between roles, or a role change failed.
    Down,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Fenced => "fenced",
            Role::Down => "down",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The owner's view of its replicas' lag, kept after the owner dies so
/// that `max_lag_on_failover` can be judged.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LagRecord {
    pub epoch: u64,
    /// (site, lag in seconds, connected).
    pub replicas: Vec<(String, f64, bool)>,
}

/// An operator's request, acted on by the site it concerns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Unique, so a requester can tell its request was acted on.
    pub id: String,
    pub kind: RequestKind,
    /// The site to take over; None lets the failover order choose.
    pub to: Option<String>,
    /// A failover away from a live owner (`--force`): the site it takes
    /// the group from, which is never a candidate for it. Absent in
    /// migrations, in failovers of an ownerless group, and in requests
    /// written before this field existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestKind {
    /// Planned switchover with zero data loss, done by the owner.
    Migrate,
    /// Promote now (the owner is gone, or was revoked by `--force`).
    Failover,
}

/// Key names for one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.trim_end_matches('/').to_owned(),
        }
    }
    /// Everything of every group.
    pub fn groups(&self) -> String {
        format!("{}/groups/", self.prefix)
    }
    pub fn group(&self, g: &str) -> String {
        format!("{}/groups/{g}/", self.prefix)
    }
    pub fn owner(&self, g: &str) -> String {
        format!("{}owner", self.group(g))
    }
    pub fn epoch(&self, g: &str) -> String {
        format!("{}epoch", self.group(g))
    }
    pub fn member(&self, g: &str, site: &str) -> String {
        format!("{}members/{site}", self.group(g))
    }
    pub fn lag(&self, g: &str) -> String {
        format!("{}lag", self.group(g))
    }
    pub fn request(&self, g: &str) -> String {
        format!("{}request", self.group(g))
    }
    /// The running instance of site `site` (one agent per site name).
    pub fn instance(&self, site: &str) -> String {
        format!("{}/sites/{site}/instance", self.prefix)
    }
}

/// What the store shows of one group.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupView {
    pub revision: i64,
    pub owner: Option<(OwnerRecord, i64)>,
    /// The last epoch granted and the revision of that key (0: none yet).
    pub epoch: u64,
    pub epoch_revision: i64,
    pub members: Vec<MemberReport>,
    pub lag: Option<LagRecord>,
    pub request: Option<(Request, i64)>,
    /// Values that could not be decoded: (key, reason).
    pub unreadable: Vec<(String, String)>,
}

impl GroupView {
    /// Reads group `g` out of a snapshot of [`Keys::groups`].
    pub fn read(keys: &Keys, g: &str, snap: &Snapshot) -> GroupView {
        let mut view = GroupView {
            revision: snap.revision,
            ..GroupView::default()
        };
        let members = format!("{}members/", keys.group(g));
        for kv in &snap.kvs {
            let KeyValue {
                key,
                value,
                mod_revision,
                ..
            } = kv;
            let bad = |e: String| view_unreadable(key, e);
            if *key == keys.owner(g) {
                match serde_json::from_slice(value) {
                    Ok(o) => view.owner = Some((o, *mod_revision)),
                    Err(e) => view.unreadable.push(bad(e.to_string())),
                }
            } else if *key == keys.epoch(g) {
                match std::str::from_utf8(value).ok().and_then(|s| s.parse().ok()) {
                    Some(e) => {
                        view.epoch = e;
                        view.epoch_revision = *mod_revision;
                    }
                    None => view.unreadable.push(bad("not a number".into())),
                }
            } else if key.starts_with(&members) {
                match serde_json::from_slice(value) {
                    Ok(m) => view.members.push(m),
                    Err(e) => view.unreadable.push(bad(e.to_string())),
                }
            } else if *key == keys.lag(g) {
                match serde_json::from_slice(value) {
                    Ok(l) => view.lag = Some(l),
                    Err(e) => view.unreadable.push(bad(e.to_string())),
                }
            } else if *key == keys.request(g) {
                match serde_json::from_slice(value) {
                    Ok(r) => view.request = Some((r, *mod_revision)),
                    Err(e) => view.unreadable.push(bad(e.to_string())),
                }
            }
        }
        view
    }

    pub fn member(&self, site: &str) -> Option<&MemberReport> {
        self.members.iter().find(|m| m.site == site)
    }
}

fn view_unreadable(key: &str, e: String) -> (String, String) {
    (key.to_owned(), e)
}

/// JSON bytes of a record.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}
