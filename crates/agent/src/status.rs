//! The site's status in the shape pinned by SPEC §4.4 (fields may be
//! added, never changed): what `tandem status --json` and
//! `GET /api/v1/status` return.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SiteStatus {
    pub site: String,
    pub groups: Vec<GroupStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GroupStatus {
    pub name: String,
    /// `primary` | `replica` | `fenced` | `down`
    pub role: String,
    pub epoch: u64,
    pub primary: String,
    /// `async` | `sync`
    pub mode: String,
    pub replicas: Vec<ReplicaStatus>,
    /// Primary only: the sequence number the next change gets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_seq: Option<u64>,
    /// Primary only: bytes held in the memory queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_bytes: Option<u64>,
    /// Sync mode only: fewer than `sync_replicas` replicas are connected
    /// (writes wait, or with `on_sync_loss = "degrade"` go on without them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_degraded: Option<bool>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ReplicaStatus {
    pub site: String,
    /// `streaming` | `resyncing` | `inconsistent` | `disconnected` | `paused`
    pub state: String,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    /// Every change up to here is durable on the replica.
    pub durable_seq: u64,
    /// Every change up to here is applied to the replica's images.
    pub applied_seq: u64,
    /// A resync (chunk comparison) is running or owed.
    pub resyncing: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync: Option<ResyncProgress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// Bytes sent on the link, after compression, and before.
    pub wire_bytes: u64,
    pub raw_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ResyncProgress {
    pub total_bytes: u64,
    pub compared_bytes: u64,
    pub sent_bytes: u64,
}

/// What `tandem verify GROUP` found.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VerifyResult {
    pub group: String,
    /// Every replica answered and none differs.
    pub identical: bool,
    pub replicas: Vec<VerifyReplica>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VerifyReplica {
    pub site: String,
    pub compared_bytes: u64,
    /// Comparison passes (differing chunks are compared again after the
    /// replica caught up with writes made meanwhile).
    pub passes: u32,
    pub differing: Vec<DifferingRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DifferingRange {
    pub volume: String,
    pub offset: u64,
    pub length: u64,
}
