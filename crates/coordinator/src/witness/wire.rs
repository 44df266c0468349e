//! The witness protocol on the wire: HTTP/1.1, one JSON object per request
//! and per answer (documented in docs/WITNESS.md). Key values are bytes
//! and travel as standard base64 strings.

use serde::{Deserialize, Serialize};

use crate::{Compare, KeyValue, LeaseId, Op, Snapshot};

/// Header carried by every witness answer: the identity of the witness's
/// data directory, so a client never mixes two different witnesses.
pub const WITNESS_HEADER: &str = "Tandem-Witness";

pub const GRANT: &str = "/v1/grant";
pub const KEEPALIVE: &str = "/v1/keepalive";
pub const REVOKE: &str = "/v1/revoke";
pub const RANGE: &str = "/v1/range";
pub const TXN: &str = "/v1/txn";
pub const WAIT: &str = "/v1/wait";
pub const HEALTH: &str = "/v1/health";

/// `POST /v1/grant`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    pub ttl_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct GrantReply {
    pub id: LeaseId,
    pub ttl_ms: u64,
}

/// `POST /v1/keepalive` and `POST /v1/revoke`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    pub id: LeaseId,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct KeepAliveReply {
    pub ttl_ms: u64,
}

/// An answer with nothing to say but success.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Empty {}

/// `POST /v1/range`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeRequest {
    pub prefix: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RangeReply {
    pub revision: i64,
    pub kvs: Vec<WireKeyValue>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WireKeyValue {
    pub key: String,
    #[serde(with = "b64")]
    pub value: Vec<u8>,
    pub mod_revision: i64,
    pub create_revision: i64,
    pub lease: LeaseId,
}

/// `POST /v1/txn`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TxnRequest {
    #[serde(default)]
    pub compares: Vec<WireCompare>,
    #[serde(default)]
    pub ops: Vec<WireOp>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum WireCompare {
    ModRevision {
        key: String,
        revision: i64,
    },
    Value {
        key: String,
        #[serde(with = "b64")]
        value: Vec<u8>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum WireOp {
    Put {
        key: String,
        #[serde(with = "b64")]
        value: Vec<u8>,
        #[serde(default)]
        lease: LeaseId,
    },
    Delete {
        key: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TxnReply {
    pub succeeded: bool,
    pub revision: i64,
}

/// `POST /v1/wait`: a long poll, answered once the store's revision is past
/// `after_revision` or when `timeout_ms` (capped by the witness) ran out.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitRequest {
    #[serde(default)]
    pub prefix: String,
    pub after_revision: i64,
    pub timeout_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WaitReply {
    /// The store's revision when the wait ended; not past `after_revision`
    /// means it timed out.
    pub revision: i64,
}

/// `GET /v1/health`.
#[derive(Debug, Serialize, Deserialize)]
pub struct HealthReply {
    pub witness_id: String,
    pub revision: i64,
    pub keys: usize,
}

/// Every non-2xx answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub error: String,
}

/// What went wrong, for a client to act on (the HTTP status says the same
/// in coarser words).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the request is not what the protocol describes.
    BadRequest,
    /// 404: no such endpoint.
    NotFound,
    /// 405: the endpoint exists but takes another method.
    MethodNotAllowed,
    /// 408: the request did not arrive in time.
    Timeout,
    /// 413: the body is over the limit (1 MiB).
    TooLarge,
    /// 431: the request head is over the limit.
    HeadTooLarge,
    /// 404: the lease named does not exist (expired or revoked).
    LeaseNotFound,
    /// 409: a put named a lease that does not exist.
    Refused,
    /// 503: the witness cannot serve now (stopping, too many connections,
    /// or its state could not be written and it must be restarted).
    Unavailable,
    /// 403: a plain-HTTP request without a `Tandem-Site` header (TLS off).
    NoIdentity,
    /// 403: the witness's policy refuses (docs/WITNESS.md): another
    /// site's lease, key or owner record, an epoch not the next one...
    NotYourLease,
    UnknownKey,
    NotYourKey,
    BadValue,
    OwnerNotCaller,
    NotOwner,
    EpochNotNext,
    EpochExhausted,
    EpochKey,
    DuplicateKey,
    /// 413: a value, key or transaction over its limit.
    ValueTooLarge,
    /// 409: a site's or the whole store's quota would be exceeded.
    SiteQuota,
    StoreFull,
    /// Any code this client does not know.
    #[serde(other)]
    Other,
}

impl ErrorCode {
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest | ErrorCode::Other => 400,
            ErrorCode::NotFound | ErrorCode::LeaseNotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::Timeout => 408,
            ErrorCode::Refused => 409,
            ErrorCode::TooLarge => 413,
            ErrorCode::HeadTooLarge => 431,
            ErrorCode::Unavailable => 503,
            ErrorCode::ValueTooLarge => 413,
            ErrorCode::SiteQuota | ErrorCode::StoreFull => 409,
            ErrorCode::NoIdentity
            | ErrorCode::NotYourLease
            | ErrorCode::UnknownKey
            | ErrorCode::NotYourKey
            | ErrorCode::BadValue
            | ErrorCode::OwnerNotCaller
            | ErrorCode::NotOwner
            | ErrorCode::EpochNotNext
            | ErrorCode::EpochExhausted
            | ErrorCode::EpochKey
            | ErrorCode::DuplicateKey => 403,
        }
    }

    /// Whether the witness's policy refused the request (a site acting
    /// beyond itself, or over a limit).
    pub fn is_policy(self) -> bool {
        matches!(self.status(), 403 | 409 | 413) && !matches!(self, ErrorCode::TooLarge)
    }
}

impl From<&Compare> for WireCompare {
    fn from(c: &Compare) -> Self {
        match c {
            Compare::ModRevision(key, revision) => WireCompare::ModRevision {
                key: key.clone(),
                revision: *revision,
            },
            Compare::Value(key, value) => WireCompare::Value {
                key: key.clone(),
                value: value.clone(),
            },
        }
    }
}

impl From<WireCompare> for Compare {
    fn from(c: WireCompare) -> Self {
        match c {
            WireCompare::ModRevision { key, revision } => Compare::ModRevision(key, revision),
            WireCompare::Value { key, value } => Compare::Value(key, value),
        }
    }
}

impl From<&Op> for WireOp {
    fn from(op: &Op) -> Self {
        match op {
            Op::Put { key, value, lease } => WireOp::Put {
                key: key.clone(),
                value: value.clone(),
                lease: *lease,
            },
            Op::Delete { key } => WireOp::Delete { key: key.clone() },
        }
    }
}

impl From<WireOp> for Op {
    fn from(op: WireOp) -> Self {
        match op {
            WireOp::Put { key, value, lease } => Op::Put { key, value, lease },
            WireOp::Delete { key } => Op::Delete { key },
        }
    }
}

impl From<Snapshot> for RangeReply {
    fn from(s: Snapshot) -> Self {
        RangeReply {
            revision: s.revision,
            kvs: s
                .kvs
                .into_iter()
                .map(|kv| WireKeyValue {
                    key: kv.key,
                    value: kv.value,
                    mod_revision: kv.mod_revision,
                    create_revision: kv.create_revision,
                    lease: kv.lease,
                })
                .collect(),
        }
    }
}

impl From<RangeReply> for Snapshot {
    fn from(r: RangeReply) -> Self {
        Snapshot {
            revision: r.revision,
            kvs: r
                .kvs
                .into_iter()
                .map(|kv| KeyValue {
                    key: kv.key,
                    value: kv.value,
                    mod_revision: kv.mod_revision,
                    create_revision: kv.create_revision,
                    lease: kv.lease,
                })
                .collect(),
        }
    }
}

/// Bytes as a standard base64 string.
mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("value is not base64: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_txn_reads_as_documented() {
        let body = r#"{"compares":[{"kind":"mod_revision","key":"g/owner","revision":0}],
                       "ops":[{"kind":"put","key":"g/owner","value":"bnk=","lease":7},
                              {"kind":"delete","key":"g/old"}]}"#;
        let txn: TxnRequest = serde_json::from_str(body).expect("documented form");
        let ops: Vec<Op> = txn.ops.into_iter().map(Op::from).collect();
        assert_eq!(
            ops[0],
            Op::Put {
                key: "g/owner".into(),
                value: b"ny".to_vec(),
                lease: 7
            }
        );
        assert_eq!(
            ops[1],
            Op::Delete {
                key: "g/old".into()
            }
        );
    }

    #[test]
    fn values_that_are_not_base64_are_refused() {
        let body = r#"{"ops":[{"kind":"put","key":"k","value":"%%%"}]}"#;
        let err = serde_json::from_str::<TxnRequest>(body).expect_err("not base64");
        assert!(err.to_string().contains("base64"), "{err}");
    }

    #[test]
    fn unknown_error_codes_are_tolerated() {
        let reply: ErrorReply =
            serde_json::from_str(r#"{"code":"from_the_future","error":"x"}"#).expect("tolerant");
        assert_eq!(reply.code, ErrorCode::Other);
    }
}
