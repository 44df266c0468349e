//! One connection: reading requests within [`Limits`], writing answers.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};

/// A connection's byte stream: plain TCP, or TLS over it.
pub trait Transport: Read + Write + Send + 'static {
    /// The socket underneath (for timeouts and shutdown; never read or
    /// write it directly under TLS).
    fn tcp(&self) -> &TcpStream;
}

impl Transport for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How far a peer may go.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Request line plus headers.
    pub max_head: usize,
    /// Request body.
    pub max_body: usize,
    /// From the first byte of a request to its last.
    pub request_time: Duration,
    /// Between requests on one connection.
    pub idle: Duration,
    /// Writing one answer.
    pub write_time: Duration,
    /// Connections served at once, all kinds; more are answered 503 and
    /// closed.
    pub max_connections: usize,
    /// Connections not (yet) authenticated: when this many are open, the
    /// oldest one not inside a request is closed to make room for a new
    /// one (so idle strangers can never lock everyone out).
    pub max_unauthenticated: usize,
    /// Connections of one authenticated identity (a site, a token): over
    /// it, that identity's oldest idle connection is closed.
    pub max_per_identity: usize,
    /// How long a connection not authenticated may idle (before its first
    /// request and between requests).
    pub unauthenticated_idle: Duration,
    /// A TLS handshake, from accept to done.
    pub handshake_time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: 16 * 1024,
            max_body: 1024 * 1024,
            request_time: Duration::from_secs(10),
            idle: Duration::from_secs(120),
            write_time: Duration::from_secs(10),
            max_connections: 1024,
            max_unauthenticated: 64,
            // An agent with many groups may claim many of them at once
            // (one request per group's actor).
            max_per_identity: 256,
            unauthenticated_idle: Duration::from_secs(5),
            handshake_time: Duration::from_secs(3),
        }
    }
}

/// How often a blocked read looks at the stop flag.
const SLICE: Duration = Duration::from_millis(200);
/// After refusing a request, how long the rest of what the peer sends is
/// read and discarded (so the refusal reaches it rather than a reset).
const LINGER: Duration = Duration::from_secs(2);
/// ... and how many bytes at most.
const LINGER_BYTES: usize = 64 << 20;

/// One request.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The path, without any query string (not percent-decoded).
    pub path: String,
    /// The query string after `?`, if any (not decoded).
    pub query: Option<String>,
    /// Header names and values in arrival order, values trimmed.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The peer asked to close the connection after the answer.
    pub close: bool,
    /// Who the connection proved to be: the name in its verified client
    /// certificate (TLS), else `None`.
    pub identity: Option<String>,
}

impl Request {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What is wrong with a request that cannot be handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// 400: malformed HTTP, or the connection ended mid-request.
    BadRequest,
    /// 408: the request did not arrive in time.
    Timeout,
    /// 413: the body is over [`Limits::max_body`].
    TooLarge,
    /// 431: the head is over [`Limits::max_head`].
    HeadTooLarge,
    /// 503: too many connections.
    Unavailable,
}

impl Problem {
    /// The HTTP status that says it.
    pub fn status(self) -> u16 {
        match self {
            Problem::BadRequest => 400,
            Problem::Timeout => 408,
            Problem::TooLarge => 413,
            Problem::HeadTooLarge => 431,
            Problem::Unavailable => 503,
        }
    }
}

/// A request that cannot be handled; it is answered, then the connection
/// is closed (the stream position is no longer trustworthy).
#[derive(Debug)]
pub struct Refusal {
    pub problem: Problem,
    pub message: String,
}

pub(crate) fn refuse(problem: Problem, message: impl Into<String>) -> Refusal {
    Refusal {
        problem,
        message: message.into(),
    }
}

/// What reading the next request gave.
#[derive(Debug)]
pub enum Next {
    Request(Request),
    /// The peer closed the connection, idled too long, or the server is
    /// stopping: close without an answer.
    Done,
    /// Answer this, then close.
    Refused(Refusal),
}

/// An answer: status, headers (`Content-Length` and `Connection` are
/// added when it is sent) and body.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Set by a handler that found the request authenticated (a valid
    /// token): the connection then keeps a slot of this identity's own
    /// (see [`Limits::max_unauthenticated`]). Not sent.
    pub authenticated: Option<String>,
}

impl Response {
    /// An answer with a body of type `content_type`.
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: body.into(),
            authenticated: None,
        }
    }

    /// Says the request was authenticated as `identity`.
    pub fn authenticated_as(mut self, identity: &str) -> Response {
        self.authenticated = Some(identity.to_owned());
        self
    }

    /// An `application/json` answer.
    pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Response {
        Response::new(status, "application/json", body)
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The head and body as sent.
    fn encode(&self, close: bool) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        for (name, value) in &self.headers {
            // A value must not end the header early: control characters
            // become blanks.
            let value: String = value
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

/// One accepted connection.
pub struct Conn {
    stream: Box<dyn Transport>,
    /// Bytes read past the end of the last request (pipelining).
    buf: Vec<u8>,
    limits: Limits,
    /// How long it may idle between requests.
    idle: Duration,
    identity: Option<String>,
}

impl Conn {
    pub fn new(stream: TcpStream, limits: Limits) -> io::Result<Conn> {
        stream.set_nonblocking(false)?;
        stream.set_nodelay(true)?;
        Conn::over(Box::new(stream), limits, None)
    }

    /// A connection over `stream` (e.g. TLS) of a peer known as
    /// `identity`.
    pub fn over(
        stream: Box<dyn Transport>,
        limits: Limits,
        identity: Option<String>,
    ) -> io::Result<Conn> {
        stream.tcp().set_write_timeout(Some(limits.write_time))?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
            limits,
            idle: limits.idle,
            identity,
        })
    }

    /// Sets how long the connection may idle between requests.
    pub fn set_idle(&mut self, idle: Duration) {
        self.idle = idle;
    }

    /// The identity its requests carry.
    pub fn set_identity(&mut self, identity: Option<String>) {
        self.identity = identity;
    }

    /// Reads the next request, giving up when `stop` is set.
    pub fn next(&mut self, stop: &AtomicBool) -> Next {
        match self.read_request(stop) {
            Ok(Some(request)) => Next::Request(request),
            Ok(None) => Next::Done,
            Err(refusal) => Next::Refused(refusal),
        }
    }

    fn read_request(&mut self, stop: &AtomicBool) -> Result<Option<Request>, Refusal> {
        let Some((head_end, deadline)) = self.read_head(stop)? else {
            return Ok(None);
        };
        let head = parse_head(&self.buf[..head_end])?;
        self.buf.drain(..head_end);
        if head.length > self.limits.max_body {
            return Err(refuse(
                Problem::TooLarge,
                format!(
                    "a body of {} bytes is over the limit of {} bytes",
                    head.length, self.limits.max_body
                ),
            ));
        }
        if head.expect_continue && self.buf.len() < head.length {
            self.write_raw(b"HTTP/1.1 100 Continue\r\n\r\n")
                .map_err(|e| refuse(Problem::BadRequest, format!("cannot answer: {e}")))?;
        }
        while self.buf.len() < head.length {
            if !self.fill(deadline, stop)? {
                return Err(refuse(
                    Problem::BadRequest,
                    "the connection closed before the whole body arrived",
                ));
            }
        }
        let body = self.buf.drain(..head.length).collect();
        Ok(Some(Request {
            method: head.method,
            path: head.path,
            query: head.query,
            headers: head.headers,
            body,
            close: head.close,
            identity: self.identity.clone(),
        }))
    }

    /// Reads until the buffer holds a whole head; returns its length with
    /// the blank line and the time by which the whole request must have
    /// arrived, or `None` if the connection ended between requests.
    fn read_head(&mut self, stop: &AtomicBool) -> Result<Option<(usize, Instant)>, Refusal> {
        // Set by the first byte of the request: the whole request must
        // arrive within `request_time` of it.
        let mut deadline: Option<Instant> = None;
        loop {
            // Empty lines before a request line are allowed (RFC 9112 §2.2).
            let blank = self
                .buf
                .iter()
                .take_while(|&&b| b == b'\r' || b == b'\n')
                .count();
            self.buf.drain(..blank);
            let end = find_head_end(&self.buf);
            if end.unwrap_or(self.buf.len()) > self.limits.max_head {
                return Err(refuse(
                    Problem::HeadTooLarge,
                    format!(
                        "the request head is over the limit of {} bytes",
                        self.limits.max_head
                    ),
                ));
            }
            if let Some(end) = end {
                let until = deadline.unwrap_or_else(|| Instant::now() + self.limits.request_time);
                return Ok(Some((end, until)));
            }
            if deadline.is_none() && self.buf.is_empty() {
                // Idle between requests: an idle timeout just closes.
                match self.fill(Instant::now() + self.idle, stop) {
                    Ok(true) => continue,
                    Ok(false) | Err(_) => return Ok(None),
                }
            }
            let until = *deadline.get_or_insert_with(|| Instant::now() + self.limits.request_time);
            if !self.fill(until, stop)? {
                return Ok(None);
            }
        }
    }

    /// Reads more bytes into the buffer before `deadline`. Returns false at
    /// end of stream; a refusal when the deadline passes or on an error.
    fn fill(&mut self, deadline: Instant, stop: &AtomicBool) -> Result<bool, Refusal> {
        let mut chunk = [0u8; 8192];
        loop {
            if stop.load(Ordering::Acquire) {
                return Ok(false);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(refuse(
                    Problem::Timeout,
                    "the request did not arrive in time",
                ));
            }
            let slice = (deadline - now).min(SLICE);
            self.stream
                .tcp()
                .set_read_timeout(Some(slice))
                .map_err(|e| refuse(Problem::BadRequest, e.to_string()))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => return Ok(false),
            }
        }
    }

    /// Sends one answer; with `close`, says the connection ends after it.
    pub fn answer(&mut self, response: &Response, close: bool) -> io::Result<()> {
        self.write_raw(&response.encode(close))
    }

    /// Sends the answer to a refused request and ends the connection:
    /// what the peer still sends (the rest of a body too large to take)
    /// is read and thrown away for a short, bounded while, so the peer
    /// reads the refusal instead of a connection reset.
    pub fn refuse(mut self, response: &Response) {
        if self.answer(response, true).is_err() {
            return;
        }
        let _ = self.stream.tcp().shutdown(Shutdown::Write);
        let until = Instant::now() + LINGER;
        let mut discarded = 0usize;
        let mut chunk = [0u8; 8192];
        while discarded < LINGER_BYTES {
            let now = Instant::now();
            if now >= until
                || self
                    .stream
                    .tcp()
                    .set_read_timeout(Some(until - now))
                    .is_err()
            {
                return;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => discarded += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }
}

struct Head {
    method: String,
    path: String,
    query: Option<String>,
    headers: Vec<(String, String)>,
    length: usize,
    close: bool,
    expect_continue: bool,
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn parse_head(bytes: &[u8]) -> Result<Head, Refusal> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| refuse(Problem::BadRequest, "the request head is not UTF-8"))?;
    let mut lines = text.lines().map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refuse(
            Problem::BadRequest,
            format!("bad request line \"{}\"", shorten(request_line)),
        ));
    };
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        other => {
            return Err(refuse(
                Problem::BadRequest,
                format!("unsupported HTTP version \"{}\"", shorten(other)),
            ))
        }
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(refuse(Problem::BadRequest, "bad request method"));
    }
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query.to_owned())),
        None => (target, None),
    };
    let mut head = Head {
        method: method.to_owned(),
        path: path.to_owned(),
        query,
        headers: Vec::new(),
        length: 0,
        close: http10,
        expect_continue: false,
    };
    let mut length = None;
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(refuse(Problem::BadRequest, "a header line has no colon"));
        };
        let value = value.trim();
        if name.is_empty() || name.contains([' ', '\t']) {
            return Err(refuse(Problem::BadRequest, "bad header name"));
        }
        match name.to_ascii_lowercase().as_str() {
            "content-length" => {
                let n = parse_length(value)?;
                if length.is_some_and(|old| old != n) {
                    return Err(refuse(Problem::BadRequest, "conflicting Content-Length"));
                }
                length = Some(n);
            }
            "transfer-encoding" => {
                return Err(refuse(
                    Problem::BadRequest,
                    "Transfer-Encoding is not accepted: send the body with a Content-Length",
                ))
            }
            "connection" => {
                let v = value.to_ascii_lowercase();
                if v.contains("close") {
                    head.close = true;
                } else if v.contains("keep-alive") {
                    head.close = false;
                }
            }
            "expect" => {
                if !value.eq_ignore_ascii_case("100-continue") {
                    return Err(refuse(Problem::BadRequest, "unsupported Expect header"));
                }
                head.expect_continue = true;
            }
            _ => {}
        }
        head.headers.push((name.to_owned(), value.to_owned()));
    }
    head.length = length.unwrap_or(0);
    Ok(head)
}

/// A Content-Length as digits; anything too large for memory is simply
/// "too large" (413), never allocated.
fn parse_length(value: &str) -> Result<usize, Refusal> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(refuse(Problem::BadRequest, "bad Content-Length"));
    }
    Ok(value.parse::<usize>().unwrap_or(usize::MAX))
}

/// A peer-supplied string, printable and short, for an error message.
pub fn shorten(text: &str) -> String {
    let mut shown: String = text.chars().take(80).collect();
    if shown.len() < text.len() {
        shown.push('…');
    }
    shown.escape_default().to_string()
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Head, Refusal> {
        parse_head(text.as_bytes())
    }

    #[test]
    fn a_plain_post_parses() {
        let h = head("POST /v1/txn?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n")
            .expect("valid");
        assert_eq!(
            (h.method.as_str(), h.path.as_str(), h.length),
            ("POST", "/v1/txn", 12)
        );
        assert_eq!(h.query.as_deref(), Some("x=1"));
        assert_eq!(
            h.headers,
            vec![
                ("Host".to_owned(), "a".to_owned()),
                ("Content-Length".to_owned(), "12".to_owned())
            ]
        );
        assert!(!h.close);
    }

    #[test]
    fn http10_closes_unless_kept_alive() {
        assert!(head("GET / HTTP/1.0\r\n\r\n").expect("valid").close);
        let kept = head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").expect("valid");
        assert!(!kept.close);
    }

    #[test]
    fn a_huge_length_is_just_too_large() {
        let h = head("POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n")
            .expect("parsed");
        assert_eq!(h.length, usize::MAX);
    }

    #[test]
    fn malformed_heads_are_refused() {
        for bad in [
            "POST\r\n\r\n",
            "POST / HTTP/2\r\n\r\n",
            "post / HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nno colon\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let refusal = head(bad)
                .err()
                .unwrap_or_else(|| panic!("accepted {bad:?}"));
            assert_eq!(refusal.problem, Problem::BadRequest, "{bad:?}");
        }
    }

    #[test]
    fn the_head_ends_at_the_first_blank_line() {
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\n\nbody"), Some(16));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
    }

    #[test]
    fn header_lookup_ignores_case() {
        let h = head("GET / HTTP/1.1\r\nAuthorization: Bearer x\r\n\r\n").expect("valid");
        let request = Request {
            method: h.method,
            path: h.path,
            query: h.query,
            headers: h.headers,
            body: Vec::new(),
            close: h.close,
            identity: None,
        };
        assert_eq!(request.header("authorization"), Some("Bearer x"));
        assert_eq!(request.header("host"), None);
    }

    #[test]
    fn an_answer_has_its_length_and_no_injected_header() {
        let r = Response::json(404, "{}").with_header("X-Id", "a\r\nEvil: 1");
        let text = String::from_utf8(r.encode(true)).expect("utf-8");
        assert_eq!(
            text,
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nX-Id: a  Evil: 1\r\n\
             Content-Length: 2\r\nConnection: close\r\n\r\n{}"
        );
    }
}
