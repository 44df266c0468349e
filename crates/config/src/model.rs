//! The typed, validated configuration of one site.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::schedule::ScheduleWindow;
use crate::units::{Rate, GIB, MIB};

/// Declares a lower-case string enum (as written in the file and in JSON).
macro_rules! string_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// The spelling used in the configuration file.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum! {
    /// `[tls] mode`.
    pub enum TlsMode {
        /// Mutual TLS between sites (the default); `ca`, `cert` and `key` are required.
        #[default]
        On = "on",
        /// Plain TCP; accepted only when every address in the file is loopback.
        Off = "off",
    }
}

string_enum! {
    /// `[api] metrics_auth`: whether `GET /metrics` needs the API token.
    pub enum MetricsAuth {
        /// The bearer token from `<data_dir>/api.token`, like every other
        /// endpoint (the default: every port authenticated, SPEC G11).
        #[default]
        Token = "token",
        /// No token: for a Prometheus that cannot send one.
        None = "none",
    }
}

string_enum! {
    /// `[coordinator] kind`.
    pub enum CoordinatorKind {
        /// A `tandem witness` process at a third place.
        Witness = "witness",
        /// An etcd cluster.
        Etcd = "etcd",
        /// No coordinator: failover only on command.
        #[default]
        None = "none",
    }
}

string_enum! {
    /// `[[group]] mode`.
    pub enum Mode {
        /// Writes are acknowledged after the local write.
        #[default]
        Async = "async",
        /// Writes are acknowledged after `sync_replicas` replicas have them.
        Sync = "sync",
    }
}

string_enum! {
    /// `[[group]] failover`.
    pub enum FailoverPolicy {
        /// The coordinator promotes the best replica when the primary fails.
        #[default]
        Automatic = "automatic",
        /// Promotion only on command (`tandem failover`).
        Manual = "manual",
    }
}

string_enum! {
    /// `[[group]] on_sync_loss`: what a sync-mode primary does when fewer than
    /// `sync_replicas` replicas are reachable.
    pub enum OnSyncLoss {
        /// Hold writes until enough replicas are back (keeps RPO 0).
        #[default]
        Suspend = "suspend",
        /// Carry on asynchronously and report the group as degraded.
        Degrade = "degrade",
    }
}

string_enum! {
    /// `[[group]] on_lost_lease`: what a primary does when it cannot renew
    /// its ownership lease (SPEC G6).
    pub enum OnLostLease {
        /// Hold I/O until ownership is regained or the site is demoted.
        #[default]
        Suspend = "suspend",
        /// Fail I/O with an error.
        Error = "error",
    }
}

string_enum! {
    /// `[[group]] on_promote_failure`: what a newly promoted site does when
    /// its `on_promote` hook fails.
    pub enum OnPromoteFailure {
        /// Keep serving, report the failure (status, logs) and count as
        /// unfit for the next failover.
        #[default]
        Report = "report",
        /// Stop serving and hand the group to the next site in the
        /// failover order.
        Next = "next",
    }
}

/// `[site]`: this site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    /// This site's name; a `[[peer]]` with the same name must exist.
    pub name: String,
    /// Where volumes, queues and state live (absolute; a relative path in the
    /// file is taken relative to the file's directory).
    pub data_dir: PathBuf,
    /// Peer (replication) listener, `host:port`.
    pub listen: String,
    /// REST API / console / metrics listener, `host:port`.
    pub api: String,
    /// Optional extra TCP NBD listener, `host:port` (exports are always
    /// served on Unix sockets under `<data_dir>/nbd/`).
    pub nbd_listen: Option<String>,
    /// `nbd_listen` requires TLS (NBD_OPT_STARTTLS) with a client
    /// certificate signed by the site CA (needs `[tls] mode = "on"`).
    pub nbd_tls: bool,
    /// `nbd_listen` serves plain NBD on a non-loopback address although
    /// TLS is on: allowed only when set, and logged at every start.
    pub nbd_insecure: bool,
}

/// `[tls]`: mutual TLS between sites.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Tls {
    /// On (default) or off.
    pub mode: TlsMode,
    /// CA certificate (PEM). Required when `mode` is on.
    pub ca: Option<PathBuf>,
    /// This site's certificate (PEM). Required when `mode` is on.
    pub cert: Option<PathBuf>,
    /// This site's private key (PEM). Required when `mode` is on.
    pub key: Option<PathBuf>,
}

/// `[api]`: how the REST API on `site.api` is guarded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Api {
    /// Whether `/metrics` needs the token (default: it does).
    pub metrics_auth: MetricsAuth,
}

/// `[libvirt]`: where protected VMs live on this site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Libvirt {
    /// libvirt connection URI (default `qemu:///system`).
    pub uri: String,
    /// Networks and bridges renamed when a VM is defined on this site:
    /// (name at the VM's source, name here).
    pub network_map: Vec<(String, String)>,
}

impl Libvirt {
    /// Default `uri`.
    pub const DEFAULT_URI: &'static str = "qemu:///system";
}

impl Default for Libvirt {
    fn default() -> Libvirt {
        Libvirt {
            uri: Libvirt::DEFAULT_URI.to_owned(),
            network_map: Vec::new(),
        }
    }
}

/// `[coordinator]`: who decides which site owns a group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Coordinator {
    /// Witness, etcd or none (default when the section is missing).
    pub kind: CoordinatorKind,
    /// `host:port` (etcd also takes `http://` / `https://` URLs); at least
    /// one for witness and etcd.
    pub endpoints: Vec<String>,
    /// Ownership lease time-to-live (default 3 s).
    pub lease_ttl: Duration,
    /// Failsafe ownership (default on; docs/FAILOVER.md, "Failsafe"): an
    /// owner that cannot reach the coordinator keeps acknowledging writes
    /// while every other site of the group grants it a peer lease.
    pub failsafe: bool,
    /// Key prefix in etcd (default `/tandem`).
    pub prefix: String,
    /// How to reach etcd over TLS and log in (`etcd_*` keys).
    pub etcd: EtcdAccess,
}

/// `[coordinator] etcd_*`: TLS and authentication towards etcd
/// (docs/FAILOVER.md, "etcd backend"), resolved at load: with `https://`
/// endpoints `ca` is `etcd_ca`, else `[tls] ca`; `cert`/`key` are
/// `etcd_cert`/`etcd_key`, else (when `etcd_ca` is not given either)
/// `[tls] cert`/`key`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdAccess {
    /// The endpoints are `https://`: the CA that signed etcd's server
    /// certificates. `None` with plain HTTP (loopback only).
    pub ca: Option<PathBuf>,
    /// The client certificate and key presented to etcd.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// etcd user (v3 authentication) and the file holding its password.
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
}

impl Coordinator {
    /// Default `lease_ttl`.
    pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(3);
    /// The shortest `lease_ttl`: renewals come every third of it and the
    /// fencing margin is a sixth, which must stay above store round trips
    /// and scheduling hiccups of a busy host.
    pub const MIN_LEASE_TTL: Duration = Duration::from_secs(1);
    /// The longest `lease_ttl`: a dead site keeps its groups this long.
    pub const MAX_LEASE_TTL: Duration = Duration::from_secs(3600);
    /// Default etcd `prefix`.
    pub const DEFAULT_PREFIX: &'static str = "/tandem";
}

impl Default for Coordinator {
    fn default() -> Self {
        Coordinator {
            kind: CoordinatorKind::None,
            endpoints: Vec::new(),
            lease_ttl: Coordinator::DEFAULT_LEASE_TTL,
            failsafe: true,
            prefix: Coordinator::DEFAULT_PREFIX.to_string(),
            etcd: EtcdAccess::default(),
        }
    }
}

/// `[[peer]]`: one site of the cluster (this one included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The site's name.
    pub name: String,
    /// Its replication address, `host:port`.
    pub address: String,
    /// Rate limit for traffic to this peer outside schedule windows
    /// (`None` = unlimited).
    pub bandwidth: Option<Rate>,
    /// Time windows with their own rate limit, in the site's local time.
    pub schedule: Vec<ScheduleWindow>,
}

impl Peer {
    /// The rate limit in force at `minute_of_day` of `weekday` (0 = Monday):
    /// the rate of the first schedule window covering that moment, else
    /// `bandwidth`; `None` means unlimited. A rate of 0 means paused.
    pub fn rate_at(&self, weekday: u8, minute_of_day: u16) -> Option<Rate> {
        self.schedule
            .iter()
            .find_map(|w| w.rate_at(weekday, minute_of_day))
            .or(self.bandwidth)
    }
}

/// One entry of `[[group]] replicas`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaSpec {
    /// The replica site (a `[[peer]]` name).
    pub site: String,
    /// Failover preference: lower is preferred. Defaults to the 1-based
    /// position in the list.
    pub priority: u32,
}

/// One entry of `[[group]] volumes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeSpec {
    /// Volume name, unique across all groups (names files and sockets).
    pub name: String,
    /// Size in bytes: a non-zero multiple of 512.
    pub size: u64,
}

/// `[[group]]`: a protection group, the unit of replication and failover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// Group name.
    pub name: String,
    /// Owner at first start (later the coordinator decides).
    pub primary: String,
    /// Replica sites, in file order (see [`Group::replicas_by_priority`]).
    pub replicas: Vec<ReplicaSpec>,
    /// Async (default) or sync.
    pub mode: Mode,
    /// In sync mode, how many replicas must have a write before it is
    /// acknowledged (default 1).
    pub sync_replicas: u32,
    /// Automatic (default) or manual failover.
    pub failover: FailoverPolicy,
    /// Automatic failover skips replicas further behind than this (default 30 s).
    pub max_lag_on_failover: Duration,
    /// The group's volumes (at least one).
    pub volumes: Vec<VolumeSpec>,
    /// Configuration files replicated with the group (absolute paths).
    pub files: Vec<PathBuf>,
    /// Command run on a site when the group is promoted there.
    pub on_promote: Option<String>,
    /// Command run on a site when the group is demoted there.
    pub on_demote: Option<String>,
    /// On-disk change queue limit per replica, bytes (default 1 GiB); past
    /// it, dirty regions are tracked instead.
    pub max_queue: u64,
    /// In-memory capture queue limit for the group, bytes (default 64 MiB).
    pub queue_memory: u64,
    /// What a sync primary does when it loses its sync replicas.
    pub on_sync_loss: OnSyncLoss,
    /// What a primary does when it cannot renew its lease.
    pub on_lost_lease: OnLostLease,
    /// What a promoted site does when `on_promote` fails.
    pub on_promote_failure: OnPromoteFailure,
    /// `vm = "libvirt:NAME"`: the libvirt domain the group protects.
    pub vm: Option<String>,
    /// How long a migration lets the guest shut down cleanly before the VM
    /// is destroyed (default 60 s).
    pub vm_shutdown_timeout: Duration,
    /// How long each replica keeps recovery points (default 24 h); zero:
    /// no history, the replica keeps only its redo journal
    /// (docs/HISTORY.md).
    pub retention: Duration,
    /// The byte cap of a replica's history (default 10 GiB); past it the
    /// oldest points go, never a resync.
    pub history_max: u64,
    /// The cap of one test view's scratch writes (default 10 GiB): a test
    /// that fills it is stopped, never replication.
    pub test_scratch_max: u64,
}

impl Group {
    /// Most volumes in one group: what one peer hello names (docs/PEER.md,
    /// "Bounds").
    pub const MAX_VOLUMES: usize = 1024;
    /// Default `sync_replicas`.
    pub const DEFAULT_SYNC_REPLICAS: u32 = 1;
    /// Default `max_lag_on_failover`.
    pub const DEFAULT_MAX_LAG_ON_FAILOVER: Duration = Duration::from_secs(30);
    /// Default `max_queue`.
    pub const DEFAULT_MAX_QUEUE: u64 = GIB;
    /// Default `queue_memory`.
    pub const DEFAULT_QUEUE_MEMORY: u64 = 256 * MIB;
    /// Default `vm_shutdown_timeout`.
    pub const DEFAULT_VM_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);
    /// Default `retention`.
    pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);
    /// Default `history_max`.
    pub const DEFAULT_HISTORY_MAX: u64 = 10 * GIB;
    /// Default `test_scratch_max`.
    pub const DEFAULT_TEST_SCRATCH_MAX: u64 = 10 * GIB;

    /// Whether the group's replicas keep a recovery-point history
    /// (`retention` is not zero).
    pub fn keeps_history(&self) -> bool {
        !self.retention.is_zero()
    }

    /// Replicas ordered by priority (lowest number first).
    pub fn replicas_by_priority(&self) -> Vec<&ReplicaSpec> {
        let mut v: Vec<&ReplicaSpec> = self.replicas.iter().collect();
        v.sort_by_key(|r| r.priority);
        v
    }

    /// The replica entry for `site`, if it is a replica of this group.
    pub fn replica(&self, site: &str) -> Option<&ReplicaSpec> {
        self.replicas.iter().find(|r| r.site == site)
    }

    /// Whether `site` takes part in this group (as primary or replica).
    pub fn involves(&self, site: &str) -> bool {
        self.primary == site || self.replica(site).is_some()
    }

    /// The volume named `name`.
    pub fn volume(&self, name: &str) -> Option<&VolumeSpec> {
        self.volumes.iter().find(|v| v.name == name)
    }
}
