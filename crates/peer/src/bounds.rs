//! The bounds of every length, count and size a peer message carries
//! (docs/PEER.md, "Bounds"). The decoder checks each one as it reads the
//! field, before anything is allocated for it, and the encoder refuses a
//! message outside them ([`crate::try_encode`]), so both sides agree on
//! what is valid. What only the receiver can judge (a volume's size, the
//! chunks a replica holds) is checked where it acts on the message.

use crate::error::PeerError;
use crate::message::{Message, RecordOp};
use crate::MAX_DATA;

/// The longest site, group or volume name: the configuration's rule
/// (1-64 characters of `[A-Za-z0-9._-]`).
pub const MAX_NAME: usize = 64;
/// Volumes of a group, as listed in `Hello`.
pub const MAX_VOLUMES: usize = 1024;
/// The smallest and largest chunk of `Hashes` and `Diff` (a power of two
/// in between). The primary uses 4 KiB and 64 KiB.
pub const MIN_CHUNK: u32 = 4 << 10;
pub const MAX_CHUNK: u32 = 1 << 20;
/// Hashes in one `Hashes` (the primary sends 256).
pub const MAX_HASHES: usize = 1024;
/// Groups in one `LeaseAsk` or `LeaseAnswer`.
pub const MAX_LEASE_GROUPS: usize = 4096;
/// A refusal's reason in a `LeaseAnswer`.
pub const MAX_REASON: usize = 256;
/// Bytes of a `Diff` bitmap: one bit per hash.
pub const MAX_BITMAP: usize = MAX_HASHES / 8;
/// The longest `File` path.
pub const MAX_PATH: usize = 4096;
/// `File` mode bits (permissions, setuid, setgid, sticky).
pub const MAX_MODE: u32 = 0o7777;
/// The largest `File` (configuration files and VM definitions).
pub const MAX_FILE: u32 = 16 << 20;
/// The largest status report (`StatusReport`, decoded JSON): a site's
/// status with hundreds of groups is far smaller.
pub const MAX_STATUS_REPORT: u32 = 8 << 20;
/// The largest forwarded API request body (`ApiRequest`, decoded): the
/// API's own bound on a request body.
pub const MAX_API_BODY: u32 = 64 << 10;
/// The largest forwarded API answer (`ApiAnswer`, decoded JSON).
pub const MAX_API_ANSWER: u32 = 32 << 20;
/// The longest method of an `ApiRequest` (`GET`, `POST`, ...).
pub const MAX_API_METHOD: usize = 16;
/// Ranges in one `Diverged` (20 bytes each: 20 MiB at most). A replica
/// that knows more sends `known = false` (a whole comparison).
pub const MAX_DIVERGED_RANGES: usize = 1 << 20;
pub(crate) const DIVERGED_RULE: &str = "at most 1048576";
/// The longest frame a connection may send before it is authenticated
/// (TLS handshake done, hello checked): the largest valid `Define` or
/// `Hello`, with room to spare. A longer one is refused from its header.
pub const MAX_PREAUTH_PAYLOAD: usize = 128 << 10;

/// Whether `chunk` is a chunk size a `Hashes` or `Diff` may carry.
pub fn chunk_ok(chunk: u32) -> bool {
    chunk.is_power_of_two() && (MIN_CHUNK..=MAX_CHUNK).contains(&chunk)
}

pub(crate) fn out_of_bounds(
    kind: &'static str,
    field: &'static str,
    value: u64,
    rule: &'static str,
) -> PeerError {
    PeerError::OutOfBounds {
        kind,
        field,
        value,
        rule,
    }
}

pub(crate) const NAME_RULE: &str = "at most 64 bytes";
pub(crate) const PATH_RULE: &str = "at most 4096 bytes";
pub(crate) const API_METHOD_RULE: &str = "at most 16 bytes";
pub(crate) const CHUNK_RULE: &str = "a power of two from 4096 to 1048576";

pub(crate) fn check_name(
    kind: &'static str,
    field: &'static str,
    len: usize,
) -> Result<(), PeerError> {
    if len > MAX_NAME {
        return Err(out_of_bounds(kind, field, len as u64, NAME_RULE));
    }
    Ok(())
}

pub(crate) fn check_chunk(kind: &'static str, chunk: u32) -> Result<(), PeerError> {
    if chunk_ok(chunk) {
        Ok(())
    } else {
        Err(out_of_bounds(kind, "chunk", u64::from(chunk), CHUNK_RULE))
    }
}

/// The largest decoded data a message of type `kind` may carry in its
/// payload field.
pub(crate) fn max_data(kind: &str) -> u32 {
    match kind {
        "chunk" => MAX_CHUNK,
        "file" => MAX_FILE,
        "status_report" => MAX_STATUS_REPORT,
        "api_request" => MAX_API_BODY,
        "api_answer" => MAX_API_ANSWER,
        _ => u32::try_from(MAX_DATA).unwrap_or(u32::MAX),
    }
}

pub(crate) fn check_data(kind: &'static str, raw_len: u32) -> Result<(), PeerError> {
    let max = max_data(kind);
    if raw_len > max {
        return Err(PeerError::DataTooLarge {
            len: u64::from(raw_len),
            max: u64::from(max),
        });
    }
    Ok(())
}

/// Checks every bound of a whole message: what the decoder checked field
/// by field, for the encoder.
pub(crate) fn check(msg: &Message) -> Result<(), PeerError> {
    let kind = crate::frame_kind(msg);
    match msg {
        Message::Hello(h) => {
            check_name(kind, "primary", h.primary.len())?;
            check_name(kind, "replica", h.replica.len())?;
            check_name(kind, "group", h.group.len())?;
            if h.volumes.len() > MAX_VOLUMES {
                return Err(out_of_bounds(
                    kind,
                    "volumes",
                    h.volumes.len() as u64,
                    "at most 1024",
                ));
            }
            for (name, _) in &h.volumes {
                check_name(kind, "volume name", name.len())?;
            }
        }
        Message::Welcome(w) => check_name(kind, "replica", w.replica.len())?,
        Message::Record(r) => {
            if r.offset.checked_add(r.len).is_none() {
                return Err(out_of_bounds(
                    kind,
                    "len",
                    r.len,
                    "offset + len must not pass 2^64",
                ));
            }
            if r.op == RecordOp::Write {
                check_data(kind, r.data.raw_len)?;
            }
        }
        Message::Hashes { chunk, hashes, .. } => {
            check_chunk(kind, *chunk)?;
            if hashes.len() > MAX_HASHES {
                return Err(out_of_bounds(
                    kind,
                    "hashes",
                    hashes.len() as u64,
                    "at most 1024",
                ));
            }
        }
        Message::Diff { chunk, bitmap, .. } => {
            check_chunk(kind, *chunk)?;
            if bitmap.len() > MAX_BITMAP {
                return Err(out_of_bounds(
                    kind,
                    "bitmap",
                    bitmap.len() as u64,
                    "at most 128 bytes",
                ));
            }
        }
        Message::Chunk { data, .. } => check_data(kind, data.raw_len)?,
        Message::File { path, mode, data } => {
            if path.len() > MAX_PATH {
                return Err(out_of_bounds(
                    kind,
                    "path",
                    path.len() as u64,
                    "at most 4096 bytes",
                ));
            }
            if *mode > MAX_MODE {
                return Err(out_of_bounds(
                    kind,
                    "mode",
                    u64::from(*mode),
                    "at most 0o7777",
                ));
            }
            check_data(kind, data.raw_len)?;
        }
        Message::Define { group, .. }
        | Message::Defined { group }
        | Message::Retire { group }
        | Message::Retired { group } => check_name(kind, "group", group.len())?,
        Message::Link {
            primary, replica, ..
        } => {
            check_name(kind, "primary", primary.len())?;
            check_name(kind, "replica", replica.len())?;
        }
        Message::LeaseAsk { groups, .. } => {
            if groups.len() > MAX_LEASE_GROUPS {
                return Err(out_of_bounds(
                    kind,
                    "groups",
                    groups.len() as u64,
                    "at most 4096",
                ));
            }
            for (group, _) in groups {
                check_name(kind, "group", group.len())?;
            }
        }
        Message::LeaseAnswer { answers, .. } => {
            if answers.len() > MAX_LEASE_GROUPS {
                return Err(out_of_bounds(
                    kind,
                    "answers",
                    answers.len() as u64,
                    "at most 4096",
                ));
            }
            for (group, reason) in answers {
                check_name(kind, "group", group.len())?;
                if reason.len() > MAX_REASON {
                    return Err(out_of_bounds(
                        kind,
                        "reason",
                        reason.len() as u64,
                        "at most 256 bytes",
                    ));
                }
            }
        }
        Message::Linked { .. } | Message::End { .. } => {}
        Message::StatusRequest { site } => check_name(kind, "site", site.len())?,
        Message::StatusReport { report } => check_data(kind, report.raw_len)?,
        Message::ApiRequest {
            site,
            method,
            path,
            query,
            body,
        } => {
            check_name(kind, "site", site.len())?;
            if method.len() > MAX_API_METHOD {
                return Err(out_of_bounds(
                    kind,
                    "method",
                    method.len() as u64,
                    API_METHOD_RULE,
                ));
            }
            for (field, s) in [("path", path), ("query", query)] {
                if s.len() > MAX_PATH {
                    return Err(out_of_bounds(kind, field, s.len() as u64, PATH_RULE));
                }
            }
            check_data(kind, body.raw_len)?;
        }
        Message::ApiAnswer { body, .. } => check_data(kind, body.raw_len)?,
        Message::Diverged(d) => {
            if d.ranges.len() > MAX_DIVERGED_RANGES {
                return Err(out_of_bounds(
                    kind,
                    "ranges",
                    d.ranges.len() as u64,
                    DIVERGED_RULE,
                ));
            }
            if !d.known && !d.ranges.is_empty() {
                return Err(PeerError::malformed(kind, "ranges that are not known"));
            }
            for &(_, offset, len) in &d.ranges {
                if offset.checked_add(len).is_none() {
                    return Err(out_of_bounds(
                        kind,
                        "len",
                        len,
                        "offset + len must not pass 2^64",
                    ));
                }
            }
        }
        Message::Refuse { .. }
        | Message::Ack(_)
        | Message::ResyncBegin { .. }
        | Message::ResyncEnd { .. }
        | Message::ResyncDone { .. }
        | Message::Ping(_)
        | Message::Pong(_)
        | Message::Mark { .. } => {}
    }
    Ok(())
}
