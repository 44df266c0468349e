//! The messages of the peer protocol (docs/PEER.md, "Messages").

use crate::payload::Payload;

/// One message of the peer protocol; each is sent as one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// P→R: opens a session.
    Hello(Hello),
    /// R→P: accepts a session and says what the replica holds.
    Welcome(Welcome),
    /// R→P: refuses a session (or anything after it), with the reason.
    Refuse { reason: String },
    /// P→R: one captured write, zeroing, trim or flush.
    Record(Record),
    /// R→P: how far the replica got.
    Ack(Ack),
    /// P→R: a resync starts; `bytes` is how much will be compared.
    ResyncBegin {
        epoch: u64,
        resume_at: u64,
        bytes: u64,
    },
    /// P→R: the BLAKE3 hashes of consecutive `chunk`-byte chunks from `offset`.
    Hashes {
        volume: u32,
        offset: u64,
        chunk: u32,
        hashes: Vec<[u8; 32]>,
    },
    /// R→P: which of the chunks of a `Hashes` differ (bit i, LSB first, of
    /// byte i / 8 set = chunk i differs).
    Diff {
        volume: u32,
        offset: u64,
        chunk: u32,
        bitmap: Vec<u8>,
    },
    /// P→R: fresh contents of a range, read from the primary image.
    Chunk {
        volume: u32,
        offset: u64,
        data: Payload,
    },
    /// P→R: the resync is over; consistent once every record below
    /// `consistent_at` is applied.
    ResyncEnd { consistent_at: u64 },
    /// R→P: everything of the resync that resumes at `resume_at` is durable
    /// here (sent after processing `ResyncEnd`, so it cannot be confused
    /// with an acknowledgement sent before the resync).
    ResyncDone { resume_at: u64 },
    /// P→R: a file to store beside the group (configuration and the like).
    File {
        path: String,
        mode: u32,
        data: Payload,
    },
    /// P→R, before `Hello`: the definition of a group defined at runtime
    /// (one `[[group]]` table), for a replica site that may not have it.
    Define { group: String, definition: String },
    /// R→P: the replica has the group `Define` named (now or already).
    Defined { group: String },
    /// P→R, alone on a connection: the group is removed (`tandem
    /// unprotect`); the replica drops it and its images.
    Retire { group: String },
    /// R→P: the replica no longer has the group `Retire` named.
    Retired { group: String },
    /// P→R, the first frame of a link (channel 0): one connection between
    /// two sites carrying every group's session on its own channel
    /// (docs/PEER.md, "Links").
    Link {
        version: u16,
        primary: String,
        replica: String,
    },
    /// R→P: the link is accepted.
    Linked { version: u16 },
    /// Either way, on a link's channel: the session on this channel is
    /// over (the primary stops the group; the replica was promoted or
    /// failed), with the reason.
    End { reason: String },
    /// P→R, on a link's channel 0: failsafe ownership (docs/FAILOVER.md,
    /// "Failsafe"): the primary site, serving each listed group in the
    /// given epoch without its coordinator, asks for peer leases of
    /// `duration_ms`.
    LeaseAsk {
        id: u64,
        duration_ms: u32,
        groups: Vec<(String, u64)>,
    },
    /// R→P, on channel 0: answers the `LeaseAsk` `id`, per group: granted
    /// for `duration_ms` (an empty refusal) or refused, with a short
    /// reason.
    LeaseAnswer {
        id: u64,
        duration_ms: u32,
        answers: Vec<(String, String)>,
    },
    /// R→P, right after `Welcome` (type 26): what this replica knows of
    /// where its images may differ from the primary's, so that only those
    /// regions are compared (docs/PEER.md, "Divergence").
    Diverged(Diverged),
    /// Either way: a keepalive carrying the sender's clock in nanoseconds.
    Ping(u64),
    /// Either way: answers a `Ping`, echoing its value.
    Pong(u64),
    /// Any site to any site, alone on a connection of its own: asks for
    /// the answering site's local status (`tandem status`, cluster view).
    /// `site` is the asking site (its certificate's, with TLS).
    StatusRequest { site: String },
    /// Answers a `StatusRequest`: the site's local status as JSON (SPEC
    /// §4.4), at most [`crate::bounds::MAX_STATUS_REPORT`] bytes decoded.
    StatusReport { report: Payload },
    /// P→R, on a group's session channel, after the record `seq` was sent
    /// (type 27): the primary had captured every record up to `seq` by
    /// `time_ms` (ms since the Unix epoch, its clock): a recovery point
    /// (docs/HISTORY.md, "Points").
    Mark { seq: u64, time_ms: u64 },
    /// Any site to any site, alone on a connection of its own (type 28):
    /// an API request of an operator of `site` (the asking site, its
    /// certificate's with TLS) to be served by the answering site as its
    /// own API would (`--site`, docs/PEER.md "Forwarded API requests").
    /// `query` without the leading `?`; `body` at most
    /// [`crate::bounds::MAX_API_BODY`] bytes decoded.
    ApiRequest {
        site: String,
        method: String,
        path: String,
        query: String,
        body: Payload,
    },
    /// Answers an `ApiRequest` (type 29): the HTTP status and JSON body the
    /// answering site's API gave, at most [`crate::bounds::MAX_API_ANSWER`]
    /// bytes decoded.
    ApiAnswer { status: u16, body: Payload },
}

/// P→R: opens a session (type 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub primary: String,
    pub replica: String,
    pub group: String,
    pub epoch: u64,
    /// Where the primary's epoch begins: it held exactly the records up to
    /// `fork_seq` of epoch `fork_epoch` when it took the group over.
    pub fork_epoch: u64,
    pub fork_seq: u64,
    /// Volume names and sizes in bytes.
    pub volumes: Vec<(String, u64)>,
}

/// What a replica's images hold, as told in `Welcome`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReplicaState {
    /// A consistent prefix of the primary's writes.
    Consistent = 0,
    /// Mid-resync: not a consistent image.
    Inconsistent = 1,
    /// Never synced.
    New = 2,
}

impl ReplicaState {
    /// `"consistent"`, `"inconsistent"` or `"new"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Consistent => "consistent",
            ReplicaState::Inconsistent => "inconsistent",
            ReplicaState::New => "new",
        }
    }

    /// Parses the wire value.
    pub fn from_u8(value: u8) -> Option<ReplicaState> {
        Some(match value {
            0 => ReplicaState::Consistent,
            1 => ReplicaState::Inconsistent,
            2 => ReplicaState::New,
            _ => return None,
        })
    }
}

impl std::fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// R→P: accepts a session (type 2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    pub replica: String,
    pub epoch: u64,
    /// Every record up to this sequence number is in the replica's images.
    pub applied: u64,
    /// Every record up to this sequence number is synced in its journal.
    pub durable: u64,
    pub state: ReplicaState,
    /// The replica keeps history for the group (docs/HISTORY.md): every
    /// mark it is sent becomes a recovery point.
    pub history: bool,
    /// It holds a recovery point: whatever `state` says, it can be
    /// promoted at that point (a resync in progress is undone).
    pub point: bool,
}

/// The operation of a `Record`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordOp {
    Write = 0,
    WriteZeroes = 1,
    Trim = 2,
    Flush = 3,
}

impl RecordOp {
    /// `"write"`, `"write_zeroes"`, `"trim"` or `"flush"`.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordOp::Write => "write",
            RecordOp::WriteZeroes => "write_zeroes",
            RecordOp::Trim => "trim",
            RecordOp::Flush => "flush",
        }
    }

    /// Parses the wire value.
    pub fn from_u8(value: u8) -> Option<RecordOp> {
        Some(match value {
            0 => RecordOp::Write,
            1 => RecordOp::WriteZeroes,
            2 => RecordOp::Trim,
            3 => RecordOp::Flush,
            _ => return None,
        })
    }
}

impl std::fmt::Display for RecordOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// P→R: one captured operation (type 4).
///
/// For `op == Write`, `data` holds the written bytes and `data.raw_len`
/// equals `len`; for the other operations `data` is `Payload::empty()` and
/// is not on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub epoch: u64,
    pub seq: u64,
    pub volume: u32,
    pub op: RecordOp,
    /// Forced unit access: acknowledge once durable on the replica.
    pub fua: bool,
    pub offset: u64,
    pub len: u64,
    pub data: Payload,
}

/// R→P: what a replica knows of where it may differ (type 26).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Diverged {
    /// The epoch of the primary whose resync last began here and has not
    /// yet left the images consistent (0: none, or not known).
    pub resync_epoch: u64,
    /// Whether `ranges` is known: the images hold this site's own history
    /// as it served the group, and `ranges` (its dirty map when it
    /// stopped serving) covers every write that another site may lack.
    pub known: bool,
    /// (volume index, offset, length); empty unless `known`.
    pub ranges: Vec<(u32, u64, u64)>,
}

/// R→P: progress of the replica (type 5); each is a record sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ack {
    pub received: u64,
    pub durable: u64,
    pub applied: u64,
}

/// The wire type of a message.
pub fn message_type(msg: &Message) -> u8 {
    match msg {
        Message::Hello(_) => 1,
        Message::Welcome(_) => 2,
        Message::Refuse { .. } => 3,
        Message::Record(_) => 4,
        Message::Ack(_) => 5,
        Message::ResyncBegin { .. } => 6,
        Message::Hashes { .. } => 7,
        Message::Diff { .. } => 8,
        Message::Chunk { .. } => 9,
        Message::ResyncEnd { .. } => 10,
        Message::File { .. } => 11,
        Message::Ping(_) => 12,
        Message::Pong(_) => 13,
        Message::ResyncDone { .. } => 14,
        Message::Define { .. } => 15,
        Message::Defined { .. } => 16,
        Message::Retire { .. } => 17,
        Message::Retired { .. } => 18,
        Message::Link { .. } => 19,
        Message::Linked { .. } => 20,
        Message::End { .. } => 21,
        Message::LeaseAsk { .. } => 22,
        Message::LeaseAnswer { .. } => 23,
        Message::StatusRequest { .. } => 24,
        Message::StatusReport { .. } => 25,
        Message::Diverged(_) => 26,
        Message::Mark { .. } => 27,
        Message::ApiRequest { .. } => 28,
        Message::ApiAnswer { .. } => 29,
    }
}

/// The name of a wire type (`"record"`, …), or `None` for an unknown one.
pub fn type_name(ty: u8) -> Option<&'static str> {
    Some(match ty {
        1 => "hello",
        2 => "welcome",
        3 => "refuse",
        4 => "record",
        5 => "ack",
        6 => "resync_begin",
        7 => "hashes",
        8 => "diff",
        9 => "chunk",
        10 => "resync_end",
        11 => "file",
        12 => "ping",
        13 => "pong",
        14 => "resync_done",
        15 => "define",
        16 => "defined",
        17 => "retire",
        18 => "retired",
        19 => "link",
        20 => "linked",
        21 => "end",
        22 => "lease_ask",
        23 => "lease_answer",
        24 => "status_request",
        25 => "status_report",
        26 => "diverged",
        27 => "mark",
        28 => "api_request",
        29 => "api_answer",
        _ => return None,
    })
}

/// The kind of a message for logs and metrics: `"hello"`, `"welcome"`,
/// `"refuse"`, `"record"`, `"ack"`, `"resync_begin"`, `"hashes"`, `"diff"`,
/// `"chunk"`, `"resync_end"`, `"file"`, `"ping"`, `"pong"`, … (the names
/// of [`type_name`]).
pub fn frame_kind(msg: &Message) -> &'static str {
    type_name(message_type(msg)).unwrap_or("unknown")
}

impl Message {
    /// Same as [`frame_kind`].
    pub fn kind(&self) -> &'static str {
        frame_kind(self)
    }
}
