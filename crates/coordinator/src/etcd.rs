//! The etcd backend of the coordinator (SPEC §2, §4.1 `[coordinator]`,
//! G6): [`EtcdStore`] implements [`Store`] over an existing etcd cluster
//! (3.4 or later), for users with many sites or who already run etcd.
//!
//! It speaks the etcd v3 API through etcd's JSON gateway on the client
//! URL (`/v3/kv/range`, `/v3/kv/txn`, `/v3/lease/grant`,
//! `/v3/lease/keepalive`, `/v3/lease/revoke`, `/v3/watch`) over HTTP or
//! HTTPS ([`crate::etcd_tls`]: etcd's CA and an optional client
//! certificate), so Tandem needs no gRPC stack. With a [`Login`] every
//! request carries the token of `/v3/auth/authenticate`; a token etcd no
//! longer accepts is replaced by a new login and the call retried once. Keys and values travel base64
//! encoded and 64-bit integers as JSON strings; both are decoded
//! defensively: an answer this client does not understand is
//! [`StoreError::Protocol`], never a panic.
//!
//! # Time bounds and endpoint failover
//!
//! Fencing (G6) depends on every coordinator call giving up in bounded
//! time, so each call of [`Store`] (except [`Store::wait`], bounded by
//! its own `timeout`) finishes within the request timeout given to
//! [`EtcdStore::new`], across all endpoints it tries:
//!
//! - Endpoints are tried starting with the one that last answered. The
//!   first gets half of the request timeout when others remain, each
//!   later one an equal share of what is left; a refused connection moves
//!   on at once.
//! - Every request carries the gateway header that maps to etcd's
//!   `hasleader` gRPC metadata: a member cut off from the cluster's
//!   leader answers "no leader" at once instead of stalling, and the next
//!   endpoint is tried. The same happens for "request timed out", "leader
//!   changed" and other transient etcd answers.
//! - When no endpoint answers, the call fails with
//!   [`StoreError::Unreachable`], naming what each endpoint did.
//! - HTTP connections are not pooled: one TCP connection per call, so a
//!   member killed between two calls never leaves a dead pooled
//!   connection behind.
//!
//! A transaction retried on another endpoint after a timeout may already
//! have been applied by the first (etcd cannot tell us): a compare-and-swap
//! can then report `false` although its own first attempt succeeded.
//! Callers re-read the ownership keys after a failed claim, which shows
//! the truth.
//!
//! # Mapping onto etcd
//!
//! - Leases: etcd TTLs are whole seconds, so [`Store::grant`] rounds the
//!   TTL up to a whole second (at least 1 s); etcd may raise it further
//!   to its own minimum (1.5 × its election timeout, 2 s with etcd's
//!   defaults). [`Store::keep_alive`] returns the TTL etcd reports. A
//!   lease etcd no longer knows is [`StoreError::LeaseNotFound`].
//! - [`Store::range`]`(prefix)` reads `[prefix, prefix+1)` where `prefix+1`
//!   is the prefix with its last byte incremented (the empty prefix reads
//!   every key).
//! - [`Compare::ModRevision`]`(key, 0)` is etcd's `MOD == 0`, which holds
//!   when the key does not exist; [`Compare::Value`] is a `VALUE ==`
//!   compare, false for a missing key. A put naming a lease etcd does not
//!   know is [`StoreError::Refused`].
//! - [`Store::wait`] opens a watch on the prefix from `after_revision + 1`
//!   and returns at the first event, when etcd cancels the watch (for
//!   instance because that revision was compacted away: the caller
//!   re-reads), or at the timeout.
//! - `https://` endpoints need TLS material ([`EtcdStore::secure`]); all
//!   endpoints of one store use the same scheme.

use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use crate::{Compare, KeyValue, LeaseId, Op, Snapshot, Store, StoreError};

/// Why an [`EtcdStore`] could not be set up from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum EtcdConfigError {
    #[error("no etcd endpoint given")]
    NoEndpoints,
    #[error("etcd endpoint {0:?} is https:// but no TLS material was given (etcd_ca)")]
    TlsUnsupported(String),
    #[error(
        "etcd endpoint {0:?} is plain HTTP while TLS material was given: write it as https://"
    )]
    PlainWithTls(String),
    #[error(transparent)]
    Tls(#[from] crate::etcd_tls::EtcdTlsError),
    #[error("{}: cannot read the etcd password (etcd_password_file): {source}", path.display())]
    PasswordFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("etcd endpoint {0:?}: expected host:port or http://host:port")]
    BadEndpoint(String),
    #[error("etcd request timeout must be greater than zero")]
    ZeroTimeout,
}

/// How a [`StoreError::Refused`] for a token etcd did not accept starts
/// (the call logs in again and retries once).
const AUTH_MARK: &str = "authentication: ";

/// The gateway header that becomes etcd's `hasleader` gRPC metadata: a
/// member without a leader then fails requests at once ("no leader").
const REQUIRE_LEADER_HEADER: &str = "Grpc-Metadata-Hasleader";

/// Most bytes read from one watch stream before giving up on it (the
/// caller then simply re-reads).
const MAX_WATCH_BYTES: u64 = 16 << 20;

/// Most bytes of one unary answer (ureq's own limit for a body read as a
/// string is 10 MiB).
const MAX_ANSWER_BYTES: u64 = 64 << 20;

/// How an [`EtcdStore`] proves who it is (docs/FAILOVER.md, "etcd
/// backend"): TLS for `https://` endpoints (etcd's CA, optionally a
/// client certificate), and etcd v3 user/password authentication.
#[derive(Clone, Debug, Default)]
pub struct Security {
    pub tls: Option<crate::etcd_tls::EtcdTls>,
    pub login: Option<Login>,
}

/// An etcd user and its password.
#[derive(Clone)]
pub struct Login {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Login {
    /// The user and the password in `path` (its first line, without
    /// the line end).
    pub fn from_file(user: &str, path: &std::path::Path) -> Result<Login, EtcdConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| EtcdConfigError::PasswordFile {
                path: path.to_path_buf(),
                source,
            })?;
        let password = text.lines().next().unwrap_or_default().to_owned();
        Ok(Login {
            user: user.to_owned(),
            password,
        })
    }
}

/// A [`Store`] backed by an etcd cluster, reached through the JSON
/// gateway of its members' client URLs.
pub struct EtcdStore {
    /// Base URLs, `http://host:port` or `https://host:port`.
    endpoints: Vec<String>,
    request_timeout: Duration,
    agent: ureq::Agent,
    /// Index of the endpoint that answered last; tried first.
    preferred: AtomicUsize,
    login: Option<Login>,
    /// The token of the last authentication (with a login).
    token: parking_lot::Mutex<Option<String>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

/// What one attempt on one endpoint came to.
enum Failure {
    /// This endpoint did not answer usefully; try the next.
    Endpoint(String),
    /// etcd did not accept the authentication token (none, expired or
    /// revoked): log in again.
    Auth(String),
    /// The cluster answered; no other endpoint would answer differently.
    Final(StoreError),
}

impl EtcdStore {
    /// A client for the etcd cluster at `endpoints` (`host:port` or
    /// `http://host:port`, in the order of preference), each call bounded
    /// by `request_timeout`. Nothing is contacted yet.
    pub fn new(
        endpoints: &[String],
        request_timeout: Duration,
    ) -> Result<EtcdStore, EtcdConfigError> {
        EtcdStore::secure(endpoints, request_timeout, Security::default())
    }

    /// As [`EtcdStore::new`], with TLS (every endpoint `https://`) and/or
    /// a login. Nothing is contacted yet.
    pub fn secure(
        endpoints: &[String],
        request_timeout: Duration,
        security: Security,
    ) -> Result<EtcdStore, EtcdConfigError> {
        if endpoints.is_empty() {
            return Err(EtcdConfigError::NoEndpoints);
        }
        if request_timeout.is_zero() {
            return Err(EtcdConfigError::ZeroTimeout);
        }
        let tls = security.tls.is_some();
        let endpoints = endpoints
            .iter()
            .map(|e| {
                let url = normalize_endpoint(e)?;
                match (url.starts_with("https://"), tls) {
                    (true, false) => Err(EtcdConfigError::TlsUnsupported(e.clone())),
                    (false, true) => Err(EtcdConfigError::PlainWithTls(e.clone())),
                    _ => Ok(url),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut builder = ureq::AgentBuilder::new()
            .max_idle_connections(0)
            .max_idle_connections_per_host(0)
            .redirects(0);
        if let Some(t) = security.tls {
            builder = builder.tls_connector(Arc::new(t));
        }
        Ok(EtcdStore {
            endpoints,
            request_timeout,
            agent: builder.build(),
            preferred: AtomicUsize::new(0),
            login: security.login,
            token: parking_lot::Mutex::new(None),
        })
    }

    /// The members' base URLs (`http://host:port`), as configured.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The bound on each call.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// The token to send, logging in first if there is none (with a
    /// login; `None` without).
    fn token(&self, deadline: Instant) -> Result<Option<String>, StoreError> {
        let Some(login) = &self.login else {
            return Ok(None);
        };
        if let Some(t) = self.token.lock().clone() {
            return Ok(Some(t));
        }
        let body = json!({ "name": login.user, "password": login.password }).to_string();
        let token = self.call_with(
            "/v3/auth/authenticate",
            &body,
            None,
            deadline,
            |status, reader| {
                let text = read_answer(reader)?;
                let refused = |why: String| {
                    Failure::Final(StoreError::Refused(format!(
                        "etcd did not accept the login of user {:?} (etcd_user, \
                         etcd_password_file): {why}",
                        login.user
                    )))
                };
                let value = parse_answer(status, &text).map_err(|f| match f {
                    Failure::Final(StoreError::Refused(m) | StoreError::Protocol(m))
                    | Failure::Auth(m) => refused(m),
                    Failure::Final(e) => refused(e.to_string()),
                    other @ Failure::Endpoint(_) => other,
                })?;
                match value.get("token").and_then(Value::as_str) {
                    Some(t) if !t.is_empty() => Ok(t.to_owned()),
                    _ => Err(protocol(format!(
                        "etcd answered a login without a token: {}",
                        excerpt(&value)
                    ))),
                }
            },
        )?;
        *self.token.lock() = Some(token.clone());
        Ok(Some(token))
    }

    /// Runs one request against the endpoints in turn until one answers
    /// or the request timeout is spent. `answer` turns an HTTP answer
    /// (status, body reader) into the result, or says to try elsewhere.
    /// With a login, the request carries its token; a token etcd no
    /// longer accepts (expired) is replaced by a new login, once.
    fn call<T>(
        &self,
        path: &str,
        body: &Value,
        mut answer: impl FnMut(u16, &mut dyn Read) -> Result<T, Failure>,
    ) -> Result<T, StoreError> {
        let body = body.to_string();
        let deadline = Instant::now() + self.request_timeout;
        let token = self.token(deadline)?;
        match self.call_with(path, &body, token.as_deref(), deadline, &mut answer) {
            Err(StoreError::Refused(why)) if token.is_some() && why.starts_with(AUTH_MARK) => {
                tracing::debug!(path, %why, "etcd token not accepted: logging in again");
                *self.token.lock() = None;
                let token = self.token(deadline)?;
                self.call_with(path, &body, token.as_deref(), deadline, &mut answer)
            }
            other => other,
        }
    }

    fn call_with<T>(
        &self,
        path: &str,
        body: &str,
        token: Option<&str>,
        deadline: Instant,
        mut answer: impl FnMut(u16, &mut dyn Read) -> Result<T, Failure>,
    ) -> Result<T, StoreError> {
        let n = self.endpoints.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        let mut failures = Vec::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let now = Instant::now();
            let remaining = deadline.saturating_duration_since(now);
            if remaining.is_zero() {
                failures.push(format!("{}: not tried, time is up", self.endpoints[idx]));
                continue;
            }
            let left = u32::try_from(n - i).unwrap_or(u32::MAX);
            let share = if left == 1 {
                remaining
            } else if i == 0 {
                remaining / 2
            } else {
                remaining / left
            };
            let url = format!("{}{}", self.endpoints[idx], path);
            let outcome = match self.post(&url, body, token, share) {
                Ok((status, mut reader)) => answer(status, &mut reader),
                Err(e) => Err(Failure::Endpoint(e.what)),
            };
            match outcome {
                Ok(v) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(Failure::Final(e)) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Err(e);
                }
                Err(Failure::Auth(why)) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Err(StoreError::Refused(format!("{AUTH_MARK}{why}")));
                }
                Err(Failure::Endpoint(why)) => {
                    tracing::debug!(endpoint = %self.endpoints[idx], path, %why, "etcd endpoint failed");
                    failures.push(format!("{}: {why}", self.endpoints[idx]));
                }
            }
        }
        self.preferred.store((start + 1) % n, Ordering::Relaxed);
        Err(StoreError::Unreachable(format!(
            "no etcd endpoint answered {path} within {:?}: {}",
            self.request_timeout,
            failures.join("; ")
        )))
    }

    /// One POST with an overall deadline of `timeout` (connect, send and
    /// every later read of the body). Returns the status and the body of
    /// any answer, error statuses included.
    fn post(
        &self,
        url: &str,
        body: &str,
        token: Option<&str>,
        timeout: Duration,
    ) -> Result<(u16, Box<dyn Read + Send + Sync>), TransportError> {
        let mut request = self
            .agent
            .post(url)
            .timeout(timeout)
            .set("Content-Type", "application/json")
            .set(REQUIRE_LEADER_HEADER, "true");
        if let Some(t) = token {
            request = request.set("Authorization", t);
        }
        let result = request.send_string(body);
        match result {
            Ok(resp) => Ok((resp.status(), resp.into_reader())),
            Err(ureq::Error::Status(status, resp)) => Ok((status, resp.into_reader())),
            Err(ureq::Error::Transport(t)) => Err(TransportError::from(&t)),
        }
    }

    /// A unary request: the whole answer is one JSON object.
    fn unary<T>(
        &self,
        path: &str,
        body: &Value,
        mut decode: impl FnMut(Value) -> Result<T, Failure>,
    ) -> Result<T, StoreError> {
        self.call(path, body, |status, reader| {
            let text = read_answer(reader)?;
            let value = parse_answer(status, &text)?;
            decode(value)
        })
    }
}

impl Store for EtcdStore {
    fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let secs = ttl_seconds(ttl);
        self.unary(
            "/v3/lease/grant",
            &json!({ "TTL": secs.to_string() }),
            |v| {
                let r: GrantAnswer = decode(v)?;
                if !r.error.is_empty() {
                    return Err(Failure::Final(StoreError::Refused(format!(
                        "lease grant: {}",
                        r.error
                    ))));
                }
                if r.id.0 == 0 {
                    return Err(protocol("lease grant answered without a lease id"));
                }
                Ok(r.id.0)
            },
        )
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        // The gateway serves the keep-alive stream as one JSON object per
        // line, `{"result": ...}` or `{"error": ...}`; one request gets one
        // answer.
        let body = json!({ "ID": lease.to_string() });
        self.call("/v3/lease/keepalive", &body, |status, reader| {
            let mut lines = BufReader::new(reader.take(MAX_ANSWER_BYTES));
            let line = read_message(&mut lines)
                .map_err(|e| Failure::Endpoint(format!("reading keep-alive answer: {e}")))?
                .unwrap_or_default();
            if line.trim().is_empty() {
                return Err(Failure::Endpoint(format!(
                    "empty keep-alive answer (HTTP {status})"
                )));
            }
            let value = parse_answer(status, &line).map_err(|f| lease_missing(f, lease))?;
            let value = unwrap_stream_result(value).map_err(|f| lease_missing(f, lease))?;
            let r: KeepAliveAnswer = decode(value)?;
            if r.ttl.0 <= 0 {
                return Err(Failure::Final(StoreError::LeaseNotFound(lease)));
            }
            Ok(Duration::from_secs(r.ttl.0 as u64))
        })
    }

    fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.call(
            "/v3/lease/revoke",
            &json!({ "ID": lease.to_string() }),
            |status, reader| {
                let text = read_answer(reader)?;
                parse_answer(status, &text).map_err(|f| lease_missing(f, lease))?;
                Ok(())
            },
        )
    }

    fn range(&self, prefix: &str) -> Result<Snapshot, StoreError> {
        let (key, range_end) = prefix_range(prefix.as_bytes());
        let body = json!({ "key": B64.encode(key), "range_end": B64.encode(range_end) });
        self.unary("/v3/kv/range", &body, |v| {
            let r: RangeAnswer = decode(v)?;
            if r.more {
                return Err(protocol("range answered only part of the keys"));
            }
            let kvs = r
                .kvs
                .into_iter()
                .map(WireKv::into_key_value)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Snapshot {
                revision: r.header.revision.0,
                kvs,
            })
        })
    }

    fn txn(&self, compares: &[Compare], ops: &[Op]) -> Result<(bool, i64), StoreError> {
        let compare: Vec<Value> = compares.iter().map(compare_json).collect();
        let success: Vec<Value> = ops.iter().map(op_json).collect();
        let body = json!({ "compare": compare, "success": success, "failure": [] });
        self.call("/v3/kv/txn", &body, |status, reader| {
            let text = read_answer(reader)?;
            let value = parse_answer(status, &text).map_err(|f| match f {
                Failure::Final(StoreError::LeaseNotFound(_)) => {
                    Failure::Final(StoreError::Refused(format!(
                        "a put names a lease etcd does not know: {}",
                        describe_leases(ops)
                    )))
                }
                other => other,
            })?;
            let r: TxnAnswer = decode(value)?;
            Ok((r.succeeded, r.header.revision.0))
        })
    }

    fn wait(&self, prefix: &str, after_revision: i64, timeout: Duration) -> Result<(), StoreError> {
        let until = Instant::now() + timeout;
        let (key, range_end) = prefix_range(prefix.as_bytes());
        let body = json!({ "create_request": {
            "key": B64.encode(key),
            "range_end": B64.encode(range_end),
            "start_revision": after_revision.saturating_add(1).max(1).to_string(),
        }})
        .to_string();
        let n = self.endpoints.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        let mut failures = Vec::new();
        let token = self.token((Instant::now() + self.request_timeout).min(until))?;
        for i in 0..n {
            let idx = (start + i) % n;
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            let url = format!("{}/v3/watch", self.endpoints[idx]);
            let stream_timeout = until - now;
            match self.watch_once(&url, &body, token.as_deref(), stream_timeout) {
                WatchEnd::Done => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok(());
                }
                WatchEnd::Failed(why) => {
                    tracing::debug!(endpoint = %self.endpoints[idx], %why, "etcd watch failed");
                    failures.push(format!("{}: {why}", self.endpoints[idx]));
                }
                WatchEnd::Bad(e) => return Err(e),
                WatchEnd::Auth(why) => {
                    // The caller re-reads, which logs in again.
                    tracing::debug!(%why, "etcd token not accepted by a watch");
                    *self.token.lock() = None;
                    return Ok(());
                }
            }
        }
        if Instant::now() >= until {
            return Ok(());
        }
        self.preferred.store((start + 1) % n, Ordering::Relaxed);
        Err(StoreError::Unreachable(format!(
            "no etcd endpoint accepted a watch: {}",
            failures.join("; ")
        )))
    }
}

/// How one watch attempt ended.
enum WatchEnd {
    /// A change, a cancelled watch, the end of the stream once the watch
    /// existed, or the timeout: the caller re-reads.
    Done,
    /// The watch could not be set up on this endpoint.
    Failed(String),
    /// etcd refused the watch request itself.
    Bad(StoreError),
    /// etcd did not accept the token.
    Auth(String),
}

impl EtcdStore {
    fn watch_once(
        &self,
        url: &str,
        body: &str,
        token: Option<&str>,
        timeout: Duration,
    ) -> WatchEnd {
        let (status, reader) = match self.post(url, body, token, timeout) {
            Ok(answer) => answer,
            Err(e) if e.timed_out => return WatchEnd::Done,
            Err(e) => return WatchEnd::Failed(e.what),
        };
        let mut lines = BufReader::new(reader.take(MAX_WATCH_BYTES));
        let mut created = false;
        loop {
            let line = match read_message(&mut lines) {
                Ok(None) if created => return WatchEnd::Done,
                Ok(None) => return WatchEnd::Failed(format!("watch stream ended (HTTP {status})")),
                Ok(Some(line)) => line,
                Err(e) if is_timeout(&e) => return WatchEnd::Done,
                Err(e) if created => {
                    tracing::debug!(%url, error = %e, "etcd watch stream broke");
                    return WatchEnd::Done;
                }
                Err(e) => return WatchEnd::Failed(format!("reading watch stream: {e}")),
            };
            if line.trim().is_empty() {
                continue;
            }
            let value = match parse_answer(status, &line).and_then(unwrap_stream_result) {
                Ok(v) => v,
                Err(Failure::Endpoint(why)) if !created => return WatchEnd::Failed(why),
                Err(Failure::Endpoint(_)) => return WatchEnd::Done,
                Err(Failure::Final(e)) => return WatchEnd::Bad(e),
                Err(Failure::Auth(why)) => return WatchEnd::Auth(why),
            };
            let r: WatchAnswer = match decode(value) {
                Ok(r) => r,
                Err(Failure::Final(e)) => return WatchEnd::Bad(e),
                Err(Failure::Endpoint(why) | Failure::Auth(why)) => return WatchEnd::Failed(why),
            };
            if !r.events.is_empty() || r.canceled {
                if r.canceled && !r.cancel_reason.is_empty() {
                    tracing::debug!(%url, reason = %r.cancel_reason, compact = r.compact_revision.0, "etcd cancelled a watch");
                }
                return WatchEnd::Done;
            }
            created |= r.created;
        }
    }
}

/// `host:port` or `http(s)://host:port[/]` -> `http(s)://host:port`.
fn normalize_endpoint(e: &str) -> Result<String, EtcdConfigError> {
    let t = e.trim();
    let lower = t.to_ascii_lowercase();
    let (scheme, rest) = if lower.starts_with("https://") {
        ("https", &t["https://".len()..])
    } else if lower.starts_with("http://") {
        ("http", &t["http://".len()..])
    } else {
        ("http", t)
    };
    let rest = rest.trim_end_matches('/');
    let ok = !rest.is_empty()
        && !rest.contains(['/', ' ', '\t', '?', '#', '@'])
        && rest
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !ok {
        return Err(EtcdConfigError::BadEndpoint(e.to_string()));
    }
    Ok(format!("{scheme}://{rest}"))
}

/// The TTL sent to etcd: whole seconds, rounded up, at least one.
pub fn ttl_seconds(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    secs.clamp(1, i64::MAX as u64) as i64
}

/// The etcd key range holding every key that starts with `prefix`:
/// `[prefix, prefix with its last byte below 0xff incremented)`; the
/// empty prefix (or one of only 0xff bytes) reaches to the end of the key
/// space (`range_end` "\0").
pub fn prefix_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    if prefix.is_empty() {
        return (vec![0], vec![0]);
    }
    let mut end = prefix.to_vec();
    while let Some(&last) = end.last() {
        if last < 0xff {
            if let Some(b) = end.last_mut() {
                *b += 1;
            }
            return (prefix.to_vec(), end);
        }
        end.pop();
    }
    (prefix.to_vec(), vec![0])
}

fn compare_json(c: &Compare) -> Value {
    match c {
        Compare::ModRevision(key, rev) => json!({
            "key": B64.encode(key.as_bytes()),
            "target": "MOD",
            "result": "EQUAL",
            "mod_revision": rev.to_string(),
        }),
        Compare::Value(key, value) => json!({
            "key": B64.encode(key.as_bytes()),
            "target": "VALUE",
            "result": "EQUAL",
            "value": B64.encode(value),
        }),
    }
}

fn op_json(op: &Op) -> Value {
    match op {
        Op::Put { key, value, lease } => json!({ "request_put": {
            "key": B64.encode(key.as_bytes()),
            "value": B64.encode(value),
            "lease": lease.to_string(),
        }}),
        Op::Delete { key } => json!({ "request_delete_range": {
            "key": B64.encode(key.as_bytes()),
        }}),
    }
}

fn describe_leases(ops: &[Op]) -> String {
    let named: Vec<String> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Put { key, lease, .. } if *lease != 0 => {
                Some(format!("{key} with lease {lease:x}"))
            }
            _ => None,
        })
        .collect();
    named.join(", ")
}

fn protocol(what: impl Into<String>) -> Failure {
    Failure::Final(StoreError::Protocol(what.into()))
}

/// Turns "no such lease" into [`StoreError::LeaseNotFound`] for `lease`.
fn lease_missing(f: Failure, lease: LeaseId) -> Failure {
    match f {
        Failure::Final(StoreError::LeaseNotFound(_)) => {
            Failure::Final(StoreError::LeaseNotFound(lease))
        }
        other => other,
    }
}

/// A request that got no HTTP answer.
struct TransportError {
    what: String,
    /// The deadline passed (as opposed to a refused or broken connection).
    timed_out: bool,
}

impl From<&ureq::Transport> for TransportError {
    fn from(t: &ureq::Transport) -> TransportError {
        let mut timed_out = false;
        let mut source = std::error::Error::source(t);
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                timed_out |= is_timeout(io);
            }
            source = e.source();
        }
        let mut what = t
            .to_string()
            .replace("Network Error: Network Error: ", "Network Error: ");
        // The caller names the endpoint already.
        if let Some(url) = t.url() {
            what = what.replace(&format!("{url}: "), "");
        }
        let lower = what.to_ascii_lowercase();
        timed_out |= lower.contains("timed out") || lower.contains("timeout");
        TransportError { what, timed_out }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    )
}

/// Reads a whole answer body (bounded in size; the read is bounded in
/// time by the request's deadline).
///
/// The gateway sends its error answers chunked with HTTP trailers, which
/// ureq's chunk decoder rejects after the body has arrived: a read error
/// after a complete JSON document is therefore not a failure.
fn read_answer(reader: &mut dyn Read) -> Result<String, Failure> {
    let mut buf = Vec::new();
    let read = reader.take(MAX_ANSWER_BYTES + 1).read_to_end(&mut buf);
    if buf.len() as u64 > MAX_ANSWER_BYTES {
        return Err(protocol(format!(
            "answer larger than {MAX_ANSWER_BYTES} bytes"
        )));
    }
    if let Err(e) = read {
        if buf.is_empty() || serde_json::from_slice::<Value>(&buf).is_err() {
            return Err(Failure::Endpoint(format!("reading answer: {e}")));
        }
    }
    String::from_utf8(buf).map_err(|_| protocol("answer is not UTF-8"))
}

/// Reads one message of a gateway stream (one JSON document per line);
/// `None` at the end of the stream. As in [`read_answer`], a read error
/// right after a complete document (the trailers of an error answer)
/// still yields that document.
fn read_message(lines: &mut impl BufRead) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    match lines.read_until(b'\n', &mut line) {
        Ok(0) => Ok(None),
        Ok(_) => Ok(Some(String::from_utf8_lossy(&line).into_owned())),
        Err(e) => {
            if !line.is_empty() && serde_json::from_slice::<Value>(&line).is_ok() {
                Ok(Some(String::from_utf8_lossy(&line).into_owned()))
            } else {
                Err(e)
            }
        }
    }
}

/// Parses one JSON answer and sorts out etcd's errors: a gateway error
/// object (`{"error": "...", "code": N}` or, in streams,
/// `{"error": {"grpc_code": N, "message": "..."}}`) becomes the matching
/// [`Failure`]; a non-2xx status without one is an endpoint failure for
/// 5xx and a protocol error otherwise.
fn parse_answer(status: u16, text: &str) -> Result<Value, Failure> {
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let excerpt: String = text.chars().take(200).collect();
            return Err(if status >= 500 {
                Failure::Endpoint(format!("HTTP {status}: {excerpt}"))
            } else {
                protocol(format!(
                    "HTTP {status}, answer is not JSON ({e}): {excerpt:?}"
                ))
            });
        }
    };
    if let Some(err) = value.get("error") {
        if !err.is_null() {
            return Err(etcd_error(status, &value, err));
        }
    }
    if !(200..300).contains(&status) {
        return Err(if status >= 500 {
            Failure::Endpoint(format!("HTTP {status}"))
        } else {
            protocol(format!("HTTP {status}: {value}"))
        });
    }
    Ok(value)
}

/// Streams wrap each message in `{"result": ...}`.
fn unwrap_stream_result(mut value: Value) -> Result<Value, Failure> {
    match value.get_mut("result") {
        Some(inner) if inner.is_object() => Ok(inner.take()),
        _ => Err(protocol(format!(
            "stream message without a result: {}",
            excerpt(&value)
        ))),
    }
}

fn excerpt(v: &Value) -> String {
    v.to_string().chars().take(200).collect()
}

/// gRPC status codes that mean "this member cannot answer now".
const GRPC_CANCELLED: i64 = 1;
const GRPC_UNKNOWN: i64 = 2;
const GRPC_DEADLINE_EXCEEDED: i64 = 4;
const GRPC_NOT_FOUND: i64 = 5;
const GRPC_RESOURCE_EXHAUSTED: i64 = 8;
const GRPC_ABORTED: i64 = 10;
const GRPC_UNAVAILABLE: i64 = 14;

fn etcd_error(status: u16, whole: &Value, err: &Value) -> Failure {
    let (message, code) = match err {
        Value::String(s) => (
            whole
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or(s)
                .to_string(),
            whole.get("code").and_then(Value::as_i64),
        ),
        Value::Object(o) => (
            o.get("message")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            o.get("grpc_code")
                .or_else(|| o.get("code"))
                .and_then(Value::as_i64),
        ),
        other => (other.to_string(), None),
    };
    let lower = message.to_ascii_lowercase();
    if lower.contains("invalid auth token") || lower.contains("user name is empty") {
        return Failure::Auth(format!("etcd: {message}"));
    }
    if lower.contains("requested lease not found") || lower.contains("lease not found") {
        // The lease id is filled in by the caller.
        return Failure::Final(StoreError::LeaseNotFound(0));
    }
    let transient_text = [
        "no leader",
        "timed out",
        "timeout",
        "deadline exceeded",
        "leader changed",
        "not capable",
        "too many requests",
        "stopped",
        "unhealthy",
        "transport is closing",
    ]
    .iter()
    .any(|t| lower.contains(t));
    let transient_code = matches!(
        code,
        Some(
            GRPC_CANCELLED
                | GRPC_DEADLINE_EXCEEDED
                | GRPC_RESOURCE_EXHAUSTED
                | GRPC_ABORTED
                | GRPC_UNAVAILABLE
        )
    );
    let what = format!(
        "etcd: {message} (grpc code {}, HTTP {status})",
        code.map_or_else(|| "?".to_string(), |c| c.to_string())
    );
    if transient_code || transient_text || (code == Some(GRPC_UNKNOWN) && status >= 500) {
        Failure::Endpoint(what)
    } else if code == Some(GRPC_NOT_FOUND) {
        Failure::Final(StoreError::Refused(what))
    } else {
        Failure::Final(StoreError::Protocol(what))
    }
}

fn decode<T: for<'de> Deserialize<'de>>(value: Value) -> Result<T, Failure> {
    let shown = excerpt(&value);
    serde_json::from_value(value).map_err(|e| protocol(format!("unexpected answer ({e}): {shown}")))
}

// ---- The gateway's JSON, decoded leniently: missing fields are etcd's
// zero values (the gateway omits them), int64 fields come as strings.

/// An int64 the gateway sends as a JSON string (numbers accepted too).
#[derive(Clone, Copy, Debug, Default)]
struct Int(i64);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Int, D::Error> {
        match Value::deserialize(d)? {
            Value::Null => Ok(Int(0)),
            Value::String(s) => s
                .parse()
                .map(Int)
                .map_err(|_| D::Error::custom(format!("not an integer: {s:?}"))),
            Value::Number(n) => n
                .as_i64()
                .map(Int)
                .ok_or_else(|| D::Error::custom(format!("not an int64: {n}"))),
            other => Err(D::Error::custom(format!("not an integer: {other}"))),
        }
    }
}

/// Bytes the gateway sends base64 encoded.
#[derive(Clone, Debug, Default)]
struct Bytes(Vec<u8>);

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(Bytes(Vec::new())),
            Some(s) => B64
                .decode(s.as_bytes())
                .map(Bytes)
                .map_err(|e| D::Error::custom(format!("bad base64: {e}"))),
        }
    }
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
struct Header {
    revision: Int,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
struct GrantAnswer {
    #[serde(rename = "ID")]
    id: Int,
    error: String,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
struct KeepAliveAnswer {
    #[serde(rename = "TTL")]
    ttl: Int,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
struct RangeAnswer {
    header: Header,
    kvs: Vec<WireKv>,
    more: bool,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
struct WireKv {
    key: Bytes,
    value: Bytes,
    create_revision: Int,
    mod_revision: Int,
    lease: Int,
}

impl WireKv {
    fn into_key_value(self) -> Result<KeyValue, Failure> {
        let key = String::from_utf8(self.key.0).map_err(|e| {
            protocol(format!(
                "key is not UTF-8: {:?}",
                String::from_utf8_lossy(e.as_bytes())
            ))
        })?;
        Ok(KeyValue {
            key,
            value: self.value.0,
            mod_revision: self.mod_revision.0,
            create_revision: self.create_revision.0,
            lease: self.lease.0,
        })
    }
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
struct TxnAnswer {
    header: Header,
    succeeded: bool,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
struct WatchAnswer {
    created: bool,
    canceled: bool,
    compact_revision: Int,
    cancel_reason: String,
    events: Vec<Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_normalized() {
        assert_eq!(
            normalize_endpoint("127.0.0.1:2379").ok(),
            Some("http://127.0.0.1:2379".into())
        );
        assert_eq!(
            normalize_endpoint("http://etcd.example:2379/").ok(),
            Some("http://etcd.example:2379".into())
        );
        assert_eq!(
            normalize_endpoint("[::1]:2379").ok(),
            Some("http://[::1]:2379".into())
        );
        assert_eq!(
            normalize_endpoint("HTTPS://etcd:2379/").ok(),
            Some("https://etcd:2379".into())
        );
        assert!(matches!(
            EtcdStore::new(&["https://etcd:2379".into()], Duration::from_secs(1)),
            Err(EtcdConfigError::TlsUnsupported(_))
        ));
        for bad in [
            "",
            "etcd",
            "etcd:",
            ":2379",
            "etcd:99999",
            "http://etcd:2379/x",
        ] {
            assert!(
                matches!(
                    normalize_endpoint(bad),
                    Err(EtcdConfigError::BadEndpoint(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn ttls_round_up_to_whole_seconds() {
        assert_eq!(ttl_seconds(Duration::ZERO), 1);
        assert_eq!(ttl_seconds(Duration::from_millis(1)), 1);
        assert_eq!(ttl_seconds(Duration::from_secs(1)), 1);
        assert_eq!(ttl_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(ttl_seconds(Duration::from_secs(3)), 3);
    }

    #[test]
    fn prefix_ranges_end_after_the_last_key_with_the_prefix() {
        assert_eq!(prefix_range(b"a/"), (b"a/".to_vec(), b"a0".to_vec()));
        assert_eq!(prefix_range(b""), (vec![0], vec![0]));
        assert_eq!(prefix_range(b"a\xff"), (b"a\xff".to_vec(), b"b".to_vec()));
        assert_eq!(prefix_range(b"\xff\xff"), (b"\xff\xff".to_vec(), vec![0]));
    }

    #[test]
    fn etcd_errors_are_sorted() {
        let v: Value = serde_json::from_str(
            r#"{"error":"etcdserver: no leader","message":"etcdserver: no leader","code":14}"#,
        )
        .unwrap_or_default();
        assert!(matches!(
            parse_answer(503, &v.to_string()),
            Err(Failure::Endpoint(_))
        ));
        let s = r#"{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader","http_status":"Service Unavailable"}}"#;
        assert!(matches!(parse_answer(200, s), Err(Failure::Endpoint(_))));
        let s = r#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#;
        assert!(matches!(
            parse_answer(404, s),
            Err(Failure::Final(StoreError::LeaseNotFound(_)))
        ));
        let s = r#"{"error":"etcdserver: key is not provided","code":3}"#;
        assert!(matches!(
            parse_answer(400, s),
            Err(Failure::Final(StoreError::Protocol(_)))
        ));
        assert!(matches!(
            parse_answer(502, "<html>"),
            Err(Failure::Endpoint(_))
        ));
        assert!(matches!(
            parse_answer(200, "<html>"),
            Err(Failure::Final(StoreError::Protocol(_)))
        ));
    }

    #[test]
    fn answers_decode_leniently_and_reject_nonsense() {
        let r: Result<RangeAnswer, _> = decode(json!({
            "header": {"revision": "7"},
            "kvs": [{"key": "Zy9vd25lcg==", "value": "bnk=", "mod_revision": "5", "create_revision": 4, "lease": "12"}],
            "count": "1"
        }));
        let Ok(r) = r else {
            panic!("range answer did not decode")
        };
        assert_eq!(r.header.revision.0, 7);
        let kv = r.kvs.into_iter().next().map(WireKv::into_key_value);
        let Some(Ok(kv)) = kv else { panic!("no key") };
        assert_eq!(
            (
                kv.key.as_str(),
                kv.value.as_slice(),
                kv.mod_revision,
                kv.create_revision,
                kv.lease
            ),
            ("g/owner", &b"ny"[..], 5, 4, 12)
        );
        let bad: Result<RangeAnswer, _> = decode(json!({"header": {"revision": "seven"}}));
        assert!(matches!(bad, Err(Failure::Final(StoreError::Protocol(_)))));
        let bad: Result<RangeAnswer, _> = decode(json!({"kvs": [{"key": "!!"}]}));
        assert!(matches!(bad, Err(Failure::Final(StoreError::Protocol(_)))));
        let empty: Result<TxnAnswer, _> = decode(json!({"header": {"revision": "3"}}));
        assert!(matches!(
            empty,
            Ok(TxnAnswer {
                succeeded: false,
                ..
            })
        ));
    }
}
