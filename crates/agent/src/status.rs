//! The site's status in the shape pinned by SPEC §4.4 (fields may be
//! added, never changed): what `tandem status --json` and
//! `GET /api/v1/status` return.

use serde::{Deserialize, Serialize};

pub use tandem_config::Mode;
pub use tandem_coordinator::keys::Role;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SiteStatus {
    pub site: String,
    pub groups: Vec<GroupStatus>,
    /// This agent as the coordinator knows it (one running agent per site
    /// name); absent without a coordinator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<InstanceStatus>,
    /// Cluster view only (`?scope=cluster`): every site asked, this one
    /// first, and whether it answered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<SiteReach>,
    /// The coordinator as the lease keeper sees it; absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<CoordinatorStatus>,
}

/// One site of the cluster view: whether its status could be gathered.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SiteReach {
    pub name: String,
    pub reachable: bool,
    /// Why not (connection refused, no answer within the time allowed,
    /// refused by the site, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Whether the coordinator answers this agent's lease renewals.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CoordinatorStatus {
    /// It answered the last renewal, within the lease TTL.
    pub reachable: bool,
    /// When the last renewal it answered was sent (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_renewal: Option<String>,
    /// Seconds since then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_age_seconds: Option<f64>,
}

/// A primary acknowledging writes on peer leases (failsafe ownership).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FailsafeStatus {
    /// Since when (UTC, RFC 3339).
    pub since: String,
    /// The sites whose peer leases it holds.
    pub peers: Vec<String>,
}

/// Why a primary acknowledges no writes now, and since when.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FencedStatus {
    /// `unconfirmed` | `coordinator_unreachable` | `lease_lost` |
    /// `replaced` | `draining` | `closed` (more may be added).
    pub reason: String,
    /// When writes stopped being acknowledged (UTC, RFC 3339).
    pub since: String,
    /// The reason in words ("coordinator unreachable since T").
    pub detail: String,
    /// `since` in seconds since the Unix epoch (metrics).
    #[serde(skip)]
    pub since_unix: f64,
}

impl From<crate::gate::Fenced> for FencedStatus {
    fn from(f: crate::gate::Fenced) -> Self {
        FencedStatus {
            reason: f.reason.as_str().to_owned(),
            since: crate::gate::rfc3339(f.since),
            detail: f.reason.to_string(),
            since_unix: crate::gate::unix_seconds(f.since),
        }
    }
}

/// This running agent and its claim of the site name (docs/FAILOVER.md,
/// "One agent per site name").
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceStatus {
    /// Random, new at each start.
    pub id: String,
    pub host: String,
    pub pid: u32,
    /// When this agent started (UTC).
    pub since: String,
    pub state: InstanceState,
    /// The other agent holding the site name (`waiting`, `refused`,
    /// `lost`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other: Option<OtherInstance>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Where this agent's claim of its site name is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Taking the site's instance key (nothing is acted on yet).
    Claiming,
    /// Another instance holds it: waiting for its lease to end (a crashed
    /// run's does).
    Waiting,
    /// This agent is the site's one running instance.
    Held,
    /// A live agent holds the site name: this one refused and exits.
    Refused,
    /// The site name was taken from this agent: it fenced and exits.
    Lost,
}

/// Another agent with this site name, as its record in the coordinator
/// says (fields absent when the record is unreadable).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct OtherInstance {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Its lease (hex).
    pub lease: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GroupStatus {
    pub name: String,
    pub role: Role,
    pub epoch: u64,
    pub primary: String,
    pub mode: Mode,
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
    /// The group's VM on this site (`vm = "libvirt:NAME"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmStatus>,
    /// Cluster view only: the site serving the group (the highest epoch
    /// among the sites that report serving it); absent when no reachable
    /// site does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Cluster view only: `false` when this site has no part in the
    /// group (its `role` is then `down`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<bool>,
    /// Primary role here, writes acknowledged on peer leases alone (the
    /// coordinator unreachable; docs/FAILOVER.md, "Failsafe").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failsafe: Option<FailsafeStatus>,
    /// Primary role here, writes not acknowledged: why, since when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced: Option<FencedStatus>,
    /// Primary role here, with a coordinator: seconds since the
    /// coordinator last renewed the right to acknowledge writes (a lease
    /// renewal or a read naming this site owner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_age_seconds: Option<f64>,
    /// Replica role here: the test views running on this site
    /// (`tandem test start`; docs/HISTORY.md, "Test views").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<TestStatus>,
}

/// A test view of a group (`tandem test start`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TestStatus {
    /// Names the test in `tandem test stop GROUP --id ID`.
    pub id: u64,
    pub point: TestPoint,
    /// When the test started (RFC 3339, UTC).
    pub started: String,
    /// Bytes of scratch its writes hold, and the cap (`test_scratch_max`).
    pub scratch_bytes: u64,
    pub scratch_max: u64,
    /// `running`, or `failed` (its writes are refused; `error` says why).
    pub state: TestState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub exports: Vec<TestExportStatus>,
    /// The copy of the group's VM booted on the view (`--boot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<TestVm>,
}

/// The copy of a group's VM a test booted (`tandem test start --boot`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TestVm {
    /// `<vm>-test-<id>`.
    pub name: String,
    /// Its libvirt state (`running`, `shut off`...).
    pub state: String,
}

/// The recovery point a test views.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TestPoint {
    /// The primary's wall-clock time of the point, RFC 3339 with
    /// milliseconds (UTC): given back to `--at`, it selects this point.
    pub time: String,
    pub time_ms: u64,
    pub epoch: u64,
    pub seq: u64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TestState {
    Running,
    Failed,
}

/// One volume of a test, served over NBD.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TestExportStatus {
    pub volume: String,
    pub socket: String,
}

/// A protected VM as this site sees it (SPEC §4.4).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VmStatus {
    pub name: String,
    /// libvirt's state word, `absent` where the domain is not defined.
    pub state: tandem_hypervisor::DomainState,
    /// Why the state could not be read just now (it is the last known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The VM's state at each site of the group, as their reports to the
    /// coordinator say (this site's from libvirt just now); empty without
    /// a coordinator.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<VmAtSite>,
    /// `tandem protect` of this VM, on the site doing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onboarding: Option<Onboarding>,
}

/// The VM's state at one site.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmAtSite {
    pub site: String,
    /// libvirt's state word there (`absent`: not defined).
    pub state: String,
}

/// How `tandem protect` is getting on (docs/VMS.md, "Onboarding").
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Onboarding {
    pub stage: OnboardingStage,
    /// `true`: moved live; `false`: a shut-off VM, copied.
    pub live: bool,
    pub disks: Vec<OnboardingDisk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where onboarding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnboardingStage {
    /// Waiting for the group's exports to take writes.
    Preparing,
    /// Copying the disks (live: mirroring, then the pivot).
    Copying,
    /// Rewriting the persistent definition and keeping it with the group.
    Defining,
    /// The VM is protected.
    Done,
    /// It stopped; `error` says why. `tandem protect` again resumes.
    Failed,
    /// The agent stopped before it finished. `tandem protect` again resumes.
    Interrupted,
}

/// One disk of an onboarding VM.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OnboardingDisk {
    pub target: String,
    pub volume: String,
    pub copied_bytes: u64,
    pub total_bytes: u64,
    /// The disk reads from its volume now.
    pub done: bool,
    /// Live: the guest's pause at the pivot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pivot_ms: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ReplicaStatus {
    pub site: String,
    pub state: ReplicaState,
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
    /// `tandem verify` of this replica, while it runs (`sent_bytes` 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<ResyncProgress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// Bytes sent on the link, after compression, and before.
    pub wire_bytes: u64,
    pub raw_bytes: u64,
    /// Bytes of this site's images hashed to compare them with the other
    /// side (resyncs and `tandem verify`) since the agent started: on a
    /// primary, for this replica; on a replica, for its primaries.
    #[serde(default)]
    pub compare_bytes_read: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the replica entered `state` (UTC), as the reporting site saw
    /// it change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// The writes that a loss of the primary now would lose on this
    /// replica, in seconds: the age of the oldest write it does not hold
    /// durably (0 when it holds them all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_seconds: Option<f64>,
    /// Cluster view only: the site whose report this entry comes from
    /// (the owner's, else the replica's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_by: Option<String>,
    /// The recovery-point window (SPEC §4.4), on the entry of a site that
    /// keeps history for the group (its own report; the cluster view
    /// carries it over).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub points: Option<PointsWindow>,
    /// The history's bytes beside the points (docs/HISTORY.md,
    /// "Retention"), where `points` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<HistoryStatus>,
}

/// The recovery points a replica keeps (SPEC §4.4 `points`): the oldest
/// and newest one's time (RFC 3339 with milliseconds, UTC; absent while
/// there is none) and how many.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PointsWindow {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newest: Option<String>,
    pub count: u64,
}

/// A replica's history in bytes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HistoryStatus {
    /// Bytes of undo log kept.
    pub bytes: u64,
    /// Bytes dropped because of `history_max` since the agent started.
    pub dropped_bytes: u64,
    /// Running test views hold the log past `history_max`.
    pub held_over_cap: bool,
    /// The oldest point in ms since the Unix epoch (metrics).
    #[serde(skip)]
    pub oldest_ms: Option<u64>,
}

/// `tandem points GROUP --json` (SPEC §4.3, pinned): the recovery points
/// of `group` that `site` keeps, oldest first.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PointsList {
    pub group: String,
    pub site: String,
    pub points: Vec<PointEntry>,
}

/// One recovery point: the primary's time of the write (RFC 3339 with
/// milliseconds, UTC) and its sequence number.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PointEntry {
    pub time: String,
    pub seq: u64,
}

/// `GET /api/v1/groups/{group}/points`: the pinned list, and the
/// history's bytes (what `tandem points` prints as text).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PointsAnswer {
    #[serde(flatten)]
    pub list: PointsList,
    pub history: HistoryStatus,
}

/// How a replica is doing (SPEC §4.4 `state`; the words are pinned).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    /// Connected, and a consistent prefix of the primary's writes.
    Streaming,
    /// Being compared and brought up to date; consistent meanwhile (an
    /// overflow resync of known-dirty ranges).
    Resyncing,
    /// Not a consistent prefix (mid-resync without an undo log, or new):
    /// never promoted automatically (G3).
    Inconsistent,
    /// No session.
    Disconnected,
    /// Connected but its link's bandwidth is set to zero.
    Paused,
}

impl ReplicaState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Streaming => "streaming",
            ReplicaState::Resyncing => "resyncing",
            ReplicaState::Inconsistent => "inconsistent",
            ReplicaState::Disconnected => "disconnected",
            ReplicaState::Paused => "paused",
        }
    }
}

impl std::fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ResyncProgress {
    pub total_bytes: u64,
    pub compared_bytes: u64,
    pub sent_bytes: u64,
    /// Bytes compared per second over the last seconds (absent until two
    /// samples apart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_bytes_per_second: Option<f64>,
    /// Seconds left at that rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
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
