//! A site's view of the witness: [`WitnessClient`] implements [`Store`] over
//! the witness's HTTP/1.1 JSON protocol.
//!
//! Every call is bounded by the request timeout (a wait by its own timeout
//! plus the request timeout). Several endpoints are several addresses of
//! *one* witness: the client moves to the next one only when a connection
//! could not be made (so a request is never sent twice), and it refuses an
//! endpoint that answers as a different witness than the one it has been
//! talking to.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tandem_tls::https::ClientStream;
use tandem_tls::rustls::ClientConfig;
use tandem_tls::TlsIdentity;

use super::server::{MAX_WAIT, SITE_HEADER};
use super::wire::{self, ErrorCode, ErrorReply};
use super::WitnessError;
use crate::{Compare, LeaseId, Op, Snapshot, Store, StoreError};

/// The largest answer read from a witness.
const MAX_ANSWER: usize = 64 * 1024 * 1024;
/// The largest answer head.
const MAX_HEAD: usize = 16 * 1024;
/// The shortest connect attempt per endpoint.
const MIN_CONNECT: Duration = Duration::from_millis(200);
/// Idle connections kept for reuse.
const POOL: usize = 4;
/// An idle connection older than this is not reused (the witness closes
/// idle connections after 2 minutes).
const POOL_AGE: Duration = Duration::from_secs(30);

/// A coordinator client talking to one `tandem witness`.
pub struct WitnessClient {
    /// `host:port` of each endpoint.
    endpoints: Vec<String>,
    /// The site's TLS client configuration; `None` speaks plain HTTP
    /// (`[tls] mode = "off"`, loopback only), naming the site in a header.
    tls: Option<Arc<ClientConfig>>,
    site: String,
    timeout: Duration,
    per_endpoint: Duration,
    /// The endpoint that answered last; calls start there.
    current: AtomicUsize,
    /// The `Tandem-Witness` identity first seen.
    witness_id: Mutex<Option<String>>,
    /// Idle connections: (endpoint index, connection, since).
    pool: Mutex<Vec<(usize, Conn, Instant)>>,
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

/// One connection to the witness.
enum Conn {
    Plain(TcpStream),
    Tls(Box<ClientStream>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => &s.sock,
        }
    }

    /// Whether an idle pooled connection is still open (nothing to read,
    /// no end of stream).
    fn alive(&self) -> bool {
        let tcp = self.tcp();
        if tcp.set_nonblocking(true).is_err() {
            return false;
        }
        let mut byte = [0u8; 1];
        let open =
            matches!(tcp.peek(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        tcp.set_nonblocking(false).is_ok() && open
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// An answer: status, witness id, body.
struct Answer {
    status: u16,
    witness: Option<String>,
    body: Vec<u8>,
}

/// How an exchange failed.
enum Attempt {
    /// The request surely did not reach the witness (no connection, TLS
    /// refused): another endpoint may be tried.
    NotConnected(String),
    /// A reused connection was found closed before the answer began.
    Stale(String),
    Failed(String),
}

impl WitnessClient {
    /// A client speaking plain HTTP for `site` (`[tls] mode = "off"`):
    /// `endpoints` are `host:port` or `http://host:port`, all addresses
    /// of one witness; any call gives up after `request_timeout`.
    pub fn plain(
        endpoints: &[String],
        site: &str,
        request_timeout: Duration,
    ) -> Result<Self, WitnessError> {
        WitnessClient::build(endpoints, None, site, request_timeout)
    }

    /// A client speaking HTTPS with the site's certificate: it checks that
    /// the witness's certificate names `witness` and is the CA's.
    /// `endpoints` are `host:port` or `https://host:port`.
    pub fn tls(
        endpoints: &[String],
        identity: &TlsIdentity,
        request_timeout: Duration,
    ) -> Result<Self, WitnessError> {
        WitnessClient::build(
            endpoints,
            Some(identity.client_config()),
            identity.site(),
            request_timeout,
        )
    }

    fn build(
        endpoints: &[String],
        tls: Option<Arc<ClientConfig>>,
        site: &str,
        request_timeout: Duration,
    ) -> Result<Self, WitnessError> {
        if endpoints.is_empty() {
            return Err(WitnessError::Endpoint {
                endpoint: String::new(),
                reason: "no witness endpoint configured".into(),
            });
        }
        let endpoints = endpoints
            .iter()
            .map(|e| host_port(e, tls.is_some()))
            .collect::<Result<Vec<_>, _>>()?;
        let per_endpoint =
            request_timeout / u32::try_from(endpoints.len().max(1)).unwrap_or(u32::MAX);
        Ok(WitnessClient {
            endpoints,
            tls,
            site: site.to_owned(),
            timeout: request_timeout,
            per_endpoint: per_endpoint.max(MIN_CONNECT).min(request_timeout),
            current: AtomicUsize::new(0),
            witness_id: Mutex::new(None),
            pool: Mutex::new(Vec::new()),
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
            if Instant::now() >= deadline {
                break;
            }
            match self.exchange(index, path, &body, deadline) {
                Ok(answer) => {
                    self.current.store(index, Ordering::Relaxed);
                    return self.read_answer(endpoint, answer);
                }
                Err(Attempt::NotConnected(why)) => failures.push(format!("{endpoint}: {why}")),
                Err(Attempt::Stale(why) | Attempt::Failed(why)) => {
                    return Err(StoreError::Unreachable(format!("{endpoint}{path}: {why}")).into());
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

    /// One request on a pooled connection (once more on a new one if the
    /// pooled one turns out closed before any answer), else a new one.
    fn exchange(
        &self,
        index: usize,
        path: &str,
        body: &[u8],
        deadline: Instant,
    ) -> Result<Answer, Attempt> {
        if let Some(conn) = self.pooled(index) {
            match self.send(conn, index, path, body, deadline) {
                Err(Attempt::Stale(_)) => {}
                other => return other,
            }
        }
        let conn = self.connect(index, deadline)?;
        self.send(conn, index, path, body, deadline)
            .map_err(|e| match e {
                Attempt::Stale(why) => Attempt::Failed(why),
                other => other,
            })
    }

    fn pooled(&self, index: usize) -> Option<Conn> {
        let mut pool = self.pool.lock();
        while let Some(at) = pool.iter().position(|(i, _, _)| *i == index) {
            let (_, conn, since) = pool.swap_remove(at);
            if since.elapsed() < POOL_AGE && conn.alive() {
                return Some(conn);
            }
        }
        None
    }

    fn connect(&self, index: usize, deadline: Instant) -> Result<Conn, Attempt> {
        let endpoint = &self.endpoints[index];
        let addrs: Vec<SocketAddr> = endpoint
            .to_socket_addrs()
            .map_err(|e| Attempt::NotConnected(format!("cannot resolve: {e}")))?
            .collect();
        let mut last = String::from("no address");
        for addr in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match TcpStream::connect_timeout(&addr, left.min(self.per_endpoint)) {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    return match &self.tls {
                        None => Ok(Conn::Plain(tcp)),
                        Some(config) => {
                            let until = deadline.min(
                                Instant::now() + self.per_endpoint.max(Duration::from_secs(1)),
                            );
                            tandem_tls::https::connect(tcp, Arc::clone(config), until)
                                .map(|s| Conn::Tls(Box::new(s)))
                                .map_err(|e| Attempt::NotConnected(e.to_string()))
                        }
                    };
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(Attempt::NotConnected(last))
    }

    /// Writes the request and reads the answer; a connection that may be
    /// used again goes back to the pool.
    fn send(
        &self,
        mut conn: Conn,
        index: usize,
        path: &str,
        body: &[u8],
        deadline: Instant,
    ) -> Result<Answer, Attempt> {
        let endpoint = &self.endpoints[index];
        let mut head = format!(
            "POST {path} HTTP/1.1\r\nHost: {endpoint}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nUser-Agent: tandem/{}\r\n",
            body.len(),
            env!("CARGO_PKG_VERSION")
        );
        if self.tls.is_none() {
            head.push_str(&format!("{SITE_HEADER}: {}\r\n", self.site));
        }
        head.push_str("\r\n");
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        let timeouts = |conn: &Conn| {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Attempt::Failed("timed out".into()));
            }
            conn.tcp()
                .set_read_timeout(Some(left))
                .and_then(|()| conn.tcp().set_write_timeout(Some(left)))
                .map_err(|e| Attempt::Failed(e.to_string()))
        };
        timeouts(&conn)?;
        if let Err(e) = conn.write_all(&request).and_then(|()| conn.flush()) {
            return Err(Attempt::Stale(format!("sending the request: {e}")));
        }
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            if buf.len() > MAX_HEAD {
                return Err(Attempt::Failed("the answer's head is too large".into()));
            }
            timeouts(&conn)?;
            match conn.read(&mut chunk) {
                Ok(0) if buf.is_empty() => {
                    return Err(Attempt::Stale("the witness closed the connection".into()))
                }
                Ok(0) => return Err(Attempt::Failed("the answer ended early".into())),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if buf.is_empty() && is_reset(&e) => {
                    return Err(Attempt::Stale(format!("reading the answer: {e}")))
                }
                Err(e) => return Err(Attempt::Failed(format!("reading the answer: {e}"))),
            }
        };
        let Head {
            status,
            length,
            witness,
            close,
        } = parse_head(&buf[..head_end]).map_err(Attempt::Failed)?;
        if length > MAX_ANSWER {
            return Err(Attempt::Failed(format!(
                "an answer of {length} bytes is over {MAX_ANSWER}"
            )));
        }
        let mut body = buf.split_off(head_end);
        while body.len() < length {
            timeouts(&conn)?;
            match conn.read(&mut chunk) {
                Ok(0) => return Err(Attempt::Failed("the answer ended early".into())),
                Ok(n) => body.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(Attempt::Failed(format!("reading the answer: {e}"))),
            }
        }
        let keep = !close && body.len() == length;
        body.truncate(length);
        if keep {
            let mut pool = self.pool.lock();
            if pool.len() < POOL {
                pool.push((index, conn, Instant::now()));
            }
        }
        Ok(Answer {
            status,
            witness,
            body,
        })
    }

    /// Reads an answer: a 200's JSON, or an error's code.
    fn read_answer<A: DeserializeOwned>(
        &self,
        endpoint: &str,
        answer: Answer,
    ) -> Result<A, Failure> {
        self.check_identity(endpoint, answer.witness.as_deref())?;
        if answer.status == 200 {
            return serde_json::from_slice(&answer.body).map_err(|e| {
                StoreError::Protocol(format!("{endpoint} answered unreadable JSON: {e}")).into()
            });
        }
        match serde_json::from_slice::<ErrorReply>(&answer.body) {
            Ok(reply) => Err(Failure::Answer(reply.code, reply.error)),
            Err(_) => Err(StoreError::Protocol(format!(
                "{endpoint} answered HTTP {}: {}",
                answer.status,
                String::from_utf8_lossy(&answer.body[..answer.body.len().min(200)])
            ))
            .into()),
        }
    }

    /// Learns the witness's identity from its first answer and refuses
    /// answers from any other witness afterwards.
    fn check_identity(&self, endpoint: &str, id: Option<&str>) -> Result<(), Failure> {
        let Some(id) = id else {
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

/// What an answer's head says.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    status: u16,
    length: usize,
    witness: Option<String>,
    close: bool,
}

/// Parses an answer's head (status line and headers, up to the blank
/// line). Pure: the witness's bytes, whatever they are, give a head or a
/// reason.
fn parse_head(bytes: &[u8]) -> Result<Head, String> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| "an answer head that is not UTF-8".to_owned())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let status = match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") && code.len() == 3 => code
            .parse::<u16>()
            .map_err(|_| "not an HTTP answer".to_owned())?,
        _ => return Err("not an HTTP answer".to_owned()),
    };
    let (mut length, mut witness, mut close) = (None, None, false);
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err("a header line without a colon".to_owned());
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<usize>()
                .map_err(|_| "a bad Content-Length".to_owned())?;
            if length.is_some_and(|l| l != n) {
                return Err("two different Content-Lengths".to_owned());
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(wire::WITNESS_HEADER) {
            witness = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            close = true;
        }
    }
    let length = length.ok_or_else(|| "an answer without Content-Length".to_owned())?;
    Ok(Head {
        status,
        length,
        witness,
        close,
    })
}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::UnexpectedEof
    )
}

/// `host:port`, or with the scheme this client speaks, as `host:port`.
fn host_port(endpoint: &str, tls: bool) -> Result<String, WitnessError> {
    let bad = |reason: &str| WitnessError::Endpoint {
        endpoint: endpoint.to_owned(),
        reason: reason.to_owned(),
    };
    let trimmed = endpoint.trim().trim_end_matches('/');
    let rest = match (trimmed.split_once("://"), tls) {
        (Some(("http", rest)), false) | (Some(("https", rest)), true) => rest,
        (Some((scheme, _)), _) => {
            return Err(bad(&format!(
                "scheme {scheme:?} does not match [tls] mode (the witness speaks {} here)",
                if tls { "https" } else { "plain http" }
            )))
        }
        (None, _) => trimmed,
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
    Ok(rest.to_owned())
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
        Failure::Answer(code, msg) if code.is_policy() || code == ErrorCode::NoIdentity => {
            StoreError::Refused(format!("witness policy ({code:?}): {msg}"))
        }
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
            host_port("10.0.3.1:7460", false).ok(),
            Some("10.0.3.1:7460".into())
        );
        assert_eq!(
            host_port("http://w:7460/", false).ok(),
            Some("w:7460".into())
        );
        assert_eq!(
            host_port("https://w:7460", true).ok(),
            Some("w:7460".into())
        );
        assert_eq!(
            host_port("[::1]:7460", true).ok(),
            Some("[::1]:7460".into())
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
            assert!(host_port(bad, false).is_err(), "{bad:?} accepted");
        }
        assert!(host_port("http://w:7460", true).is_err());
    }

    #[test]
    fn an_answer_head_reads_as_sent() {
        let head = parse_head(
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n\
              Tandem-Witness: abc\r\nContent-Length: 12\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(
            head,
            Ok(Head {
                status: 403,
                length: 12,
                witness: Some("abc".into()),
                close: true
            })
        );
        for bad in [
            &b"HTTP/1.1 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 20 OK\r\nContent-Length: 1\r\n\r\n",
            b"\xff\xfe\r\n\r\n",
        ] {
            assert!(
                parse_head(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    proptest::proptest! {
        /// Any bytes give a head or a reason, never a panic.
        #[test]
        fn any_bytes_give_a_head_or_a_reason(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse_head(&bytes);
        }

        /// A head written by a server reads back as written.
        #[test]
        fn written_heads_read_back(
            status in 100u16..600,
            length in 0usize..(1 << 40),
            witness in proptest::option::of("[0-9a-f]{1,32}"),
            close in proptest::bool::ANY,
        ) {
            let mut text = format!("HTTP/1.1 {status} Whatever\r\nContent-Length: {length}\r\n");
            if let Some(w) = &witness {
                text.push_str(&format!("Tandem-Witness: {w}\r\n"));
            }
            if close {
                text.push_str("Connection: close\r\n");
            }
            text.push_str("\r\n");
            proptest::prop_assert_eq!(
                parse_head(text.as_bytes()),
                Ok(Head { status, length, witness, close })
            );
        }
    }
}
