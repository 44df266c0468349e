//! API requests forwarded to another site over the peer port (docs/PEER.md,
//! "Forwarded API requests"): `?site=SITE` on the local API (what a
//! client command's `--site SITE` sends) has SITE serve the request as its
//! own API would. The asking side is [`forward`]; the answering side is
//! [`answer`], for requests [`forwardable`] allows, from configured peer
//! sites only.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tandem_peer::{read_message_within, write_message, Message, Payload, PeerError};
use tandem_tls::TlsIdentity;

use crate::cluster::gather::{self, AskError, Reporter};

/// How long the asking site waits for the answer (a recovery's promotion
/// takes its time).
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(150);
/// How long connecting (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest answer frame read: the answer's bound and its encoding.
const MAX_ANSWER_FRAME: usize = tandem_peer::MAX_API_ANSWER as usize + 4096;
/// The time an answering site gives the asker to take the answer.
const ANSWER_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether another site may have `method path` served here: requests
/// that read or act on this site's own copy of a group (its recovery
/// points, its test views, its promotion at one of its points). Never one
/// that changes the configuration, another site's bandwidth, or moves a
/// group to another site (failover, migrate).
pub fn forwardable(method: &str, path: &str) -> bool {
    let Some((group, action)) = path
        .strip_prefix("/api/v1/groups/")
        .and_then(|rest| rest.split_once('/'))
    else {
        return false;
    };
    if group.is_empty() {
        return false;
    }
    match (method, action) {
        ("GET", "points") | ("POST", "recover") => true,
        ("GET" | "POST" | "DELETE", "tests") => true,
        ("DELETE", action) => action
            .strip_prefix("tests/")
            .is_some_and(|id| !id.is_empty() && !id.contains('/')),
        _ => false,
    }
}

/// Splits `site=SITE` out of a query string: (SITE, the rest of the query,
/// `None` when nothing is left). The last `site=` wins.
pub fn take_site(query: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(query) = query else {
        return (None, None);
    };
    let mut site = None;
    let mut rest = Vec::new();
    for part in query.split('&').filter(|p| !p.is_empty()) {
        match part.strip_prefix("site=") {
            Some(s) => site = Some(s.to_owned()),
            None => rest.push(part),
        }
    }
    let rest = (!rest.is_empty()).then(|| rest.join("&"));
    (site, rest)
}

/// Why a request could not be forwarded, or was not answered.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("{0:?} is not a site of this cluster (no [[peer]] of that name)")]
    UnknownSite(String),
    #[error("{method} {path} cannot be sent to another site (--site)")]
    NotForwardable { method: String, path: String },
    #[error("site {site}: {source}")]
    Ask {
        site: String,
        #[source]
        source: AskError,
    },
    #[error("site {site} refused the request: {reason}")]
    Refused { site: String, reason: String },
    #[error("site {site} answered with {what} instead of an API answer")]
    Unexpected { site: String, what: &'static str },
    #[error("site {site} did not answer within {waited:?}")]
    Timeout { site: String, waited: Duration },
}

impl ForwardError {
    /// The HTTP status the local API answers with.
    pub fn status(&self) -> u16 {
        match self {
            ForwardError::UnknownSite(_) | ForwardError::NotForwardable { .. } => 400,
            ForwardError::Timeout { .. } => 504,
            _ => 502,
        }
    }
}

/// What the other site's API answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// A request to forward.
#[derive(Clone, Debug)]
pub struct Forward<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// Without `site=`.
    pub query: Option<&'a str>,
    pub body: &'a [u8],
}

/// Has `site` (at its peer `address`) serve `request` as its own API
/// would; `me` is this site's name. Waits at most `timeout` for the
/// answer.
pub fn forward(
    me: &str,
    site: &str,
    address: &str,
    tls: Option<&TlsIdentity>,
    request: &Forward<'_>,
    timeout: Duration,
) -> Result<Answer, ForwardError> {
    if !forwardable(request.method, request.path) {
        return Err(ForwardError::NotForwardable {
            method: request.method.to_owned(),
            path: request.path.escape_default().to_string(),
        });
    }
    let ask = |source: AskError| ForwardError::Ask {
        site: site.to_owned(),
        source,
    };
    let socket = Mutex::new(None);
    let mut stream = gather::dial(
        site,
        address,
        tls,
        Instant::now() + CONNECT_TIMEOUT,
        &socket,
    )
    .map_err(ask)?;
    stream
        .tcp()
        .set_read_timeout(Some(timeout))
        .map_err(|e| ask(AskError::Socket(e)))?;
    let mut scratch = Vec::new();
    let message = Message::ApiRequest {
        site: me.to_owned(),
        method: request.method.to_owned(),
        path: request.path.to_owned(),
        query: request.query.unwrap_or_default().to_owned(),
        body: Payload::raw(request.body.to_vec()),
    };
    write_message(&mut stream, &message, &mut scratch).map_err(|e| ask(AskError::Peer(e)))?;
    let started = Instant::now();
    match read_message_within(&mut stream, &mut scratch, MAX_ANSWER_FRAME) {
        Ok(Message::ApiAnswer { status, body }) => {
            let body = body.decode().map_err(|e| ask(AskError::Peer(e)))?;
            Ok(Answer { status, body })
        }
        Ok(Message::Refuse { reason }) => Err(ForwardError::Refused {
            site: site.to_owned(),
            reason,
        }),
        Ok(other) => Err(ForwardError::Unexpected {
            site: site.to_owned(),
            what: other.kind(),
        }),
        Err(PeerError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(ForwardError::Timeout {
                site: site.to_owned(),
                waited: started.elapsed(),
            })
        }
        Err(e) => Err(ask(AskError::Peer(e))),
    }
}

/// Why a forwarded request is not served here.
#[derive(Debug, thiserror::Error)]
pub enum RefuseForward {
    #[error(transparent)]
    Site(#[from] gather::RefuseStatus),
    #[error("{method} {path} cannot be sent to another site")]
    NotForwardable { method: String, path: String },
    #[error("a forwarded request is not forwarded again (site={0})")]
    Again(String),
}

/// A forwarded request as it arrived.
pub struct Incoming {
    pub asker: String,
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Payload,
}

/// Serves a connection that opened with `ApiRequest` (`incoming`):
/// `cert_site` is the site of the asker's TLS certificate (None without
/// TLS). One answer, then the connection ends.
pub fn answer<W: Write>(
    reporter: &Arc<Reporter>,
    writer: &mut W,
    incoming: Incoming,
    cert_site: Option<&str>,
) {
    let asker = incoming.asker.clone();
    let reply = match serve(reporter, incoming, cert_site) {
        Ok((status, body)) if body.len() > tandem_peer::MAX_API_ANSWER as usize => {
            let _ = status;
            Message::Refuse {
                reason: format!(
                    "the answer ({} bytes) exceeds the {} bytes of a forwarded answer",
                    body.len(),
                    tandem_peer::MAX_API_ANSWER
                ),
            }
        }
        Ok((status, body)) => Message::ApiAnswer {
            status,
            body: Payload::encode(body.as_bytes(), &mut tandem_peer::Compressor::new(1)),
        },
        Err(e) => {
            tracing::warn!(site = %asker, "forwarded API request refused: {e}");
            Message::Refuse {
                reason: e.to_string(),
            }
        }
    };
    let mut scratch = Vec::new();
    if let Err(e) = write_message(writer, &reply, &mut scratch) {
        tracing::debug!(site = %asker, "forwarded API answer not sent: {e}");
    }
}

fn serve(
    reporter: &Reporter,
    incoming: Incoming,
    cert_site: Option<&str>,
) -> Result<(u16, String), RefuseForward> {
    let view = reporter.view().ok_or(gather::RefuseStatus::Starting)?;
    let config = view.shared.config();
    let peers: Vec<&str> = config.peers.iter().map(|p| p.name.as_str()).collect();
    gather::admit(&incoming.asker, cert_site, &peers, &view.shared.site)?;
    if !forwardable(&incoming.method, &incoming.path) {
        return Err(RefuseForward::NotForwardable {
            method: incoming.method.escape_default().to_string(),
            path: incoming.path.escape_default().to_string(),
        });
    }
    let query = (!incoming.query.is_empty()).then_some(incoming.query.as_str());
    let (site, query) = take_site(query);
    if let Some(site) = site.filter(|s| *s != view.shared.site) {
        return Err(RefuseForward::Again(site));
    }
    // A body that does not decode is served as none (the API then says
    // what it lacks).
    let body = incoming.body.decode().unwrap_or_default();
    tracing::info!(site = %incoming.asker, method = %incoming.method, path = %incoming.path, "serving an API request forwarded by another site");
    Ok(crate::api::serve_forwarded(
        &view,
        tandem_http::Request {
            method: incoming.method,
            path: incoming.path,
            query,
            headers: Vec::new(),
            body,
            close: true,
            identity: None,
        },
    ))
}

/// How long an answering site may take to write its answer.
pub fn answer_write_timeout() -> Duration {
    ANSWER_WRITE_TIMEOUT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_requests_are_forwarded() {
        assert!(forwardable("GET", "/api/v1/groups/web01/points"));
        assert!(forwardable("POST", "/api/v1/groups/web01/recover"));
        assert!(forwardable("POST", "/api/v1/groups/web01/tests"));
        assert!(forwardable("GET", "/api/v1/groups/web01/tests"));
        assert!(forwardable("DELETE", "/api/v1/groups/web01/tests"));
        assert!(forwardable("DELETE", "/api/v1/groups/web01/tests/3"));
        assert!(!forwardable("DELETE", "/api/v1/groups/web01/tests/3/x"));
        assert!(!forwardable("PUT", "/api/v1/groups/web01/tests"));
        for (method, path) in [
            ("POST", "/api/v1/groups/web01/points"),
            ("GET", "/api/v1/groups//points"),
            ("GET", "/api/v1/groups/a/b/points"),
            ("POST", "/api/v1/groups/web01/failover"),
            ("POST", "/api/v1/groups/web01/migrate"),
            ("POST", "/api/v1/groups/web01/unprotect"),
            ("POST", "/api/v1/groups"),
            ("GET", "/api/v1/status"),
            ("PUT", "/api/v1/peers/ny/bandwidth"),
            ("GET", "/metrics"),
        ] {
            assert!(!forwardable(method, path), "{method} {path}");
        }
    }

    #[test]
    fn the_site_is_taken_out_of_the_query() {
        assert_eq!(take_site(None), (None, None));
        assert_eq!(take_site(Some("")), (None, None));
        assert_eq!(
            take_site(Some("site=chicago")),
            (Some("chicago".into()), None)
        );
        assert_eq!(
            take_site(Some("at=latest&site=chicago&x=1")),
            (Some("chicago".into()), Some("at=latest&x=1".into()))
        );
        assert_eq!(
            take_site(Some("scope=cluster")),
            (None, Some("scope=cluster".into()))
        );
    }

    #[test]
    fn errors_have_their_status_codes() {
        assert_eq!(ForwardError::UnknownSite("x".into()).status(), 400);
        let not = ForwardError::NotForwardable {
            method: "POST".into(),
            path: "/api/v1/groups/g/failover".into(),
        };
        assert_eq!(not.status(), 400);
        assert_eq!(
            ForwardError::Timeout {
                site: "b".into(),
                waited: Duration::from_secs(1)
            }
            .status(),
            504
        );
        assert_eq!(
            ForwardError::Refused {
                site: "b".into(),
                reason: "no".into()
            }
            .status(),
            502
        );
    }

    #[test]
    fn an_unreachable_site_is_a_bad_gateway() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap().to_string();
        drop(closed);
        let e = forward(
            "a",
            "b",
            &addr,
            None,
            &Forward {
                method: "GET",
                path: "/api/v1/groups/g/points",
                query: None,
                body: b"",
            },
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert_eq!(e.status(), 502, "{e}");
        assert!(e.to_string().contains("cannot connect"), "{e}");
    }
}
