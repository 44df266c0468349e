//! A site's view of the witness: [`WitnessClient`] implements [`Store`] over
//! the witness's HTTP/1.1 JSON protocol.
//!
//! Every call is bounded by the request timeout (a wait by its own timeout
//! plus the request timeout). Several endpoints are several addresses of
//! *one* witness: the client moves to the next one only when a connection
//! could not be made (so a request is never sent twice), and it refuses an
//! endpoint that answers as a different witness than the one it has been
//! talking to.

use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::server::MAX_WAIT;
use super::wire::{self, ErrorCode, ErrorReply};
use super::WitnessError;
use crate::{Compare, LeaseId, Op, Snapshot, Store, StoreError};

/// The largest answer read from a witness.
const MAX_ANSWER: u64 = 64 * 1024 * 1024;
/// The shortest connect attempt per endpoint.
const MIN_CONNECT: Duration = Duration::from_millis(200);

/// A coordinator client talking to one `tandem witness`.
pub struct WitnessClient {
    /// Base URLs, `http://host:port`.
    endpoints: Vec<String>,
    agent: ureq::Agent,
    timeout: Duration,
    /// The endpoint that answered last; calls start there.
    current: AtomicUsize,
    /// The `Tandem-Witness` identity first seen.
    witness_id: Mutex<Option<String>>,
}

/// How a call failed before being mapped to a [`StoreError`].
enum Failure {
    /// The witness answered with an error.
    Answer(ErrorCode, String),
    Store(StoreError),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Store(e)
    }
}

impl WitnessClient {
    /// A client for the witness at `endpoints` (`host:port` or
    /// `http://host:port`, all addresses of the same witness), giving up
    /// on any call after `request_timeout`.
    pub fn new(endpoints: &[String], request_timeout: Duration) -> Result<Self, WitnessError> {
        if endpoints.is_empty() {
            return Err(WitnessError::Endpoint {
                endpoint: String::new(),
                reason: "no witness endpoint configured".into(),
            });
        }
        let endpoints = endpoints
            .iter()
            .map(|e| base_url(e))
            .collect::<Result<Vec<_>, _>>()?;
        let per_endpoint =
            request_timeout / u32::try_from(endpoints.len().max(1)).unwrap_or(u32::MAX);
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(per_endpoint.max(MIN_CONNECT).min(request_timeout))
            .redirects(0)
            .max_idle_connections_per_host(4)
            .user_agent(concat!("tandem/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(WitnessClient {
            endpoints,
            agent,
            timeout: request_timeout,
            current: AtomicUsize::new(0),
            witness_id: Mutex::new(None),
        })
    }

    /// The identity of the witness this client talks to, once it answered.
    pub fn witness_id(&self) -> Option<String> {
        self.witness_id.lock().clone()
    }

    /// Posts `query` to `path`, trying the endpoints in turn while they
    /// cannot be connected to, within the request timeout plus `extra`.
    fn call<Q: Serialize, A: DeserializeOwned>(
        &self,
        path: &str,
        query: &Q,
        extra: Duration,
    ) -> Result<A, Failure> {
        let body = serde_json::to_vec(query)
            .map_err(|e| StoreError::Protocol(format!("cannot encode request: {e}")))?;
        let deadline = Instant::now() + self.timeout + extra;
        let start = self.current.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for i in 0..self.endpoints.len() {
            let index = (start + i) % self.endpoints.len();
            let endpoint = &self.endpoints[index];
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            let sent = self
                .agent
                .post(&format!("{endpoint}{path}"))
                .timeout(remaining)
                .set("Content-Type", "application/json")
                .send_bytes(&body);
            match sent {
                Ok(response) => {
                    self.current.store(index, Ordering::Relaxed);
                    return self.accept(endpoint, response);
                }
                Err(ureq::Error::Status(_, response)) => {
                    self.current.store(index, Ordering::Relaxed);
                    return Err(self.refusal(endpoint, response));
                }
                Err(ureq::Error::Transport(t)) if not_connected(&t) => {
                    failures.push(format!("{endpoint}: {t}"));
                }
                Err(ureq::Error::Transport(t)) => {
                    return Err(StoreError::Unreachable(format!("{endpoint}{path}: {t}")).into());
                }
            }
        }
        if failures.is_empty() {
            failures.push("no time left".into());
        }
        Err(StoreError::Unreachable(format!(
            "no witness endpoint answered: {}",
            failures.join("; ")
        ))
        .into())
    }

    /// Reads a 200 answer.
    fn accept<A: DeserializeOwned>(
        &self,
        endpoint: &str,
        response: ureq::Response,
    ) -> Result<A, Failure> {
        self.check_identity(endpoint, &response)?;
        let body = read_body(endpoint, response)?;
        serde_json::from_slice(&body).map_err(|e| {
            StoreError::Protocol(format!("{endpoint} answered unreadable JSON: {e}")).into()
        })
    }

    /// Reads an error answer.
    fn refusal(&self, endpoint: &str, response: ureq::Response) -> Failure {
        let status = response.status();
        if let Err(e) = self.check_identity(endpoint, &response) {
            return e;
        }
        let body = match read_body(endpoint, response) {
            Ok(body) => body,
            Err(e) => return e.into(),
        };
        match serde_json::from_slice::<ErrorReply>(&body) {
            Ok(reply) => Failure::Answer(reply.code, reply.error),
            Err(_) => StoreError::Protocol(format!(
                "{endpoint} answered HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ))
            .into(),
        }
    }

    /// Learns the witness's identity from its first answer and refuses
    /// answers from any other witness afterwards.
    fn check_identity(&self, endpoint: &str, response: &ureq::Response) -> Result<(), Failure> {
        let Some(id) = response.header(wire::WITNESS_HEADER) else {
            return Err(StoreError::Protocol(format!(
                "{endpoint} is not a Tandem witness (no {} header)",
                wire::WITNESS_HEADER
            ))
            .into());
        };
        let mut known = self.witness_id.lock();
        match known.as_deref() {
            None => {
                *known = Some(id.to_owned());
                Ok(())
            }
            Some(k) if k == id => Ok(()),
            Some(k) => Err(StoreError::Protocol(format!(
                "{endpoint} is witness {id}, but this site has been using witness {k}: \
                 the endpoints must all reach one witness, whose data directory was not replaced"
            ))
            .into()),
        }
    }
}

/// Whether the request surely never reached the witness.
fn not_connected(t: &ureq::Transport) -> bool {
    matches!(
        t.kind(),
        ureq::ErrorKind::ConnectionFailed | ureq::ErrorKind::Dns
    )
}

fn read_body(endpoint: &str, response: ureq::Response) -> Result<Vec<u8>, StoreError> {
    let mut body = Vec::new();
    response
        .into_reader()
        .take(MAX_ANSWER + 1)
        .read_to_end(&mut body)
        .map_err(|e| StoreError::Unreachable(format!("{endpoint}: reading the answer: {e}")))?;
    if body.len() as u64 > MAX_ANSWER {
        return Err(StoreError::Protocol(format!(
            "{endpoint} answered more than {MAX_ANSWER} bytes"
        )));
    }
    Ok(body)
}

/// `host:port` or `http://host:port[/]` as a base URL.
fn base_url(endpoint: &str) -> Result<String, WitnessError> {
    let bad = |reason: &str| WitnessError::Endpoint {
        endpoint: endpoint.to_owned(),
        reason: reason.to_owned(),
    };
    let trimmed = endpoint.trim().trim_end_matches('/');
    let rest = match trimmed.split_once("://") {
        Some(("http", rest)) => rest,
        Some((scheme, _)) => {
            return Err(bad(&format!(
                "scheme {scheme:?} is not supported; the witness speaks plain http"
            )))
        }
        None => trimmed,
    };
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ']) {
        return Err(bad("expected host:port"));
    }
    if !rest
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0))
    {
        return Err(bad("expected host:port"));
    }
    Ok(format!("http://{rest}"))
}

/// Maps an error answer about lease `id`.
fn lease_failure(id: LeaseId) -> impl Fn(Failure) -> StoreError {
    move |f| match f {
        Failure::Answer(ErrorCode::LeaseNotFound, _) => StoreError::LeaseNotFound(id),
        other => store_failure(other),
    }
}

fn store_failure(f: Failure) -> StoreError {
    match f {
        Failure::Store(e) => e,
        Failure::Answer(ErrorCode::Refused, msg) => StoreError::Refused(msg),
        Failure::Answer(ErrorCode::Unavailable | ErrorCode::Timeout, msg) => {
            StoreError::Unreachable(format!("witness unavailable: {msg}"))
        }
        Failure::Answer(code, msg) => {
            StoreError::Protocol(format!("witness refused the request ({code:?}): {msg}"))
        }
    }
}

impl Store for WitnessClient {
    fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let ttl_ms = u64::try_from(ttl.as_nanos().div_ceil(1_000_000))
            .unwrap_or(u64::MAX)
            .max(1);
        let reply: wire::GrantReply = self
            .call(wire::GRANT, &wire::GrantRequest { ttl_ms }, Duration::ZERO)
            .map_err(store_failure)?;
        Ok(reply.id)
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let reply: wire::KeepAliveReply = self
            .call(
                wire::KEEPALIVE,
                &wire::LeaseRequest { id: lease },
                Duration::ZERO,
            )
            .map_err(lease_failure(lease))?;
        Ok(Duration::from_millis(reply.ttl_ms))
    }

    fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let _: wire::Empty = self
            .call(
                wire::REVOKE,
                &wire::LeaseRequest { id: lease },
                Duration::ZERO,
            )
            .map_err(lease_failure(lease))?;
        Ok(())
    }

    fn range(&self, prefix: &str) -> Result<Snapshot, StoreError> {
        let reply: wire::RangeReply = self
            .call(
                wire::RANGE,
                &wire::RangeRequest {
                    prefix: prefix.to_owned(),
                },
                Duration::ZERO,
            )
            .map_err(store_failure)?;
        Ok(reply.into())
    }

    fn txn(&self, compares: &[Compare], ops: &[Op]) -> Result<(bool, i64), StoreError> {
        let query = wire::TxnRequest {
            compares: compares.iter().map(wire::WireCompare::from).collect(),
            ops: ops.iter().map(wire::WireOp::from).collect(),
        };
        let reply: wire::TxnReply = self
            .call(wire::TXN, &query, Duration::ZERO)
            .map_err(store_failure)?;
        Ok((reply.succeeded, reply.revision))
    }

    fn wait(&self, prefix: &str, after_revision: i64, timeout: Duration) -> Result<(), StoreError> {
        // The witness holds a wait at most MAX_WAIT; longer ones are asked
        // again until the caller's timeout.
        let until = Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let slice = left.min(MAX_WAIT);
            let query = wire::WaitRequest {
                prefix: prefix.to_owned(),
                after_revision,
                timeout_ms: u64::try_from(slice.as_millis()).unwrap_or(u64::MAX),
            };
            let reply: wire::WaitReply = self
                .call(wire::WAIT, &query, slice)
                .map_err(store_failure)?;
            if reply.revision > after_revision || Instant::now() >= until {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_host_and_port() {
        assert_eq!(
            base_url("10.0.3.1:7460").ok(),
            Some("http://10.0.3.1:7460".into())
        );
        assert_eq!(
            base_url("http://w:7460/").ok(),
            Some("http://w:7460".into())
        );
        assert_eq!(
            base_url("[::1]:7460").ok(),
            Some("http://[::1]:7460".into())
        );
        for bad in [
            "",
            "w",
            "w:0",
            "w:x",
            ":7460",
            "https://w:7460",
            "w:7460/v1",
        ] {
            assert!(base_url(bad).is_err(), "{bad:?} accepted");
        }
    }
}
