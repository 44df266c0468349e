//! The REST API on `site.api` (SPEC §4.5): `/api/v1/status` (bearer token
//! from `<data_dir>/api.token`), `/api/v1/openapi.json`, Prometheus text at
//! `/metrics` (token too, unless `[api] metrics_auth = "none"`), peers and
//! bandwidth, verify, failover and migrate.
//!
//! Each request is parsed once into an [`ApiRequest`]; whatever goes wrong
//! is an [`ApiError`], and each error has one status code
//! ([`ApiError::status`]): a bad request 400, no token 401, an unknown
//! endpoint, group or peer 404, a transition the cluster refuses 409, the
//! coordinator unreachable 503, no new owner in time 504. Every endpoint
//! and code is in `openapi.json` (checked by a test).
//!
//! Served by `tandem-http` (SPEC G8): bounded heads and bodies (an oversize
//! `Content-Length` is answered 413 and never allocated), timeouts, at most
//! 64 connections, each on its own thread.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tandem_config::MetricsAuth;
use tandem_coordinator::StoreError;
use tandem_http::{Handler, Limits, Options, Refusal, Request, Response};

use crate::bandwidth::UnknownPeer;
use crate::ownership::RequestError;
use crate::view::{OwnerChangeError, VerifyGroupError};
use crate::{AgentError, Layout, StatusView};

pub const OPENAPI: &str = include_str!("openapi.json");

/// The largest request body taken: the API's bodies are a few bytes of
/// JSON. A larger one is refused (413) before it is read.
const MAX_BODY: usize = 64 << 10;

/// What a client of the API may do (SPEC G8): bounded heads and bodies,
/// requests that must arrive in time, and a bounded number of
/// connections, each with its own thread (verify, failover and migrate
/// hold theirs until the work is done).
fn limits() -> Limits {
    Limits {
        max_head: 16 * 1024,
        max_body: MAX_BODY,
        request_time: Duration::from_secs(10),
        idle: Duration::from_secs(60),
        write_time: Duration::from_secs(10),
        // Strangers (no token yet) share their own slots, the oldest
        // closed for a newcomer; a connection that sent the token keeps
        // one of the token's slots (tandem-http, docs/WITNESS.md).
        max_connections: 96,
        max_unauthenticated: 32,
        max_per_identity: 48,
        ..Limits::default()
    }
}

/// Serves the API on `addr` until `stop` is set; the returned thread ends
/// once the listener is closed and connections have drained (a request
/// still running then is left to finish on its own).
pub fn start(
    addr: &str,
    layout: &Layout,
    view: Arc<StatusView>,
    metrics_auth: MetricsAuth,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, AgentError> {
    let err = |source| AgentError::Api {
        addr: addr.to_owned(),
        source,
    };
    let token_path = layout.data_dir.join("api.token");
    let token = load_or_create_token(&token_path).map_err(|source| AgentError::Token {
        path: token_path,
        source,
    })?;
    let listener = TcpListener::bind(addr).map_err(err)?;
    tracing::info!(%addr, "API listening");
    let options = Options {
        name: "api".into(),
        limits: limits(),
        stack_size: None,
        drain: Duration::from_secs(2),
        secure: None,
    };
    if metrics_auth == MetricsAuth::None {
        tracing::info!(%addr, "/metrics answers without the API token ([api] metrics_auth = \"none\")");
    }
    let handler: Arc<dyn Handler> = Arc::new(Api {
        view,
        guard: Guard {
            token,
            metrics_auth,
        },
    });
    tandem_http::spawn(listener, options, stop, handler).map_err(err)
}

/// One request of the API, parsed.
#[derive(Debug, PartialEq)]
enum ApiRequest {
    OpenApi,
    Metrics,
    Status,
    /// `?scope=cluster`: every site's status, merged.
    ClusterStatus,
    Vms,
    DefineGroup {
        text: String,
    },
    Peers,
    SetBandwidth {
        site: String,
        bps: Option<u64>,
    },
    Verify {
        group: String,
    },
    /// `tandem points GROUP`: this site's recovery points of the group.
    Points {
        group: String,
    },
    Protect(crate::onboard::ProtectRequest),
    Unprotect {
        group: String,
        request: crate::onboard::UnprotectRequest,
    },
    ChangeOwner {
        group: String,
        migrate: bool,
        to: Option<String>,
        force: bool,
    },
    StartTest {
        group: String,
        request: crate::testview::StartRequest,
    },
    Tests {
        group: String,
    },
    StopTests {
        group: String,
        id: Option<u64>,
    },
    /// `tandem recover`: fail over to this site at a point in time.
    Recover {
        group: String,
        at: tandem_replication::history::PointChoice,
    },
}

/// Why a request was not served. Each has one status code.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("missing or wrong bearer token (see <data_dir>/api.token)")]
    Unauthorized,
    #[error("no such endpoint: {method} {path}")]
    NoEndpoint { method: String, path: String },
    #[error("request body is not UTF-8")]
    NotUtf8,
    #[error("unknown query {0:?} (status takes scope=local or scope=cluster)")]
    BadQuery(String),
    #[error("bad request body: {0}")]
    BadBody(#[source] serde_json::Error),
    #[error(
        "\"bandwidth\" must be a rate like \"50Mbit\", \"unlimited\", \"paused\" or null, not {0}"
    )]
    BadBandwidth(serde_json::Value),
    #[error(
        "the body has no \"bandwidth\": give a rate like \"50Mbit\", \"unlimited\", \"paused\", \
         or null to clear the override"
    )]
    NoBandwidth,
    #[error(transparent)]
    BadRate(#[from] tandem_config::UnitError),
    #[error(transparent)]
    UnknownPeer(#[from] UnknownPeer),
    #[error(transparent)]
    Verify(#[from] VerifyGroupError),
    #[error(transparent)]
    OwnerChange(#[from] OwnerChangeError),
    #[error(transparent)]
    Define(#[from] crate::runtime_groups::DefineError),
    #[error("the hypervisor is not available: {0}")]
    Hypervisor(#[from] tandem_hypervisor::HypervisorError),
    #[error(transparent)]
    Protect(#[from] crate::onboard::ProtectError),
    #[error(transparent)]
    Unprotect(#[from] crate::onboard::UnprotectError),
    #[error(transparent)]
    Points(#[from] crate::view::PointsError),
    #[error(transparent)]
    Forward(#[from] crate::forward::ForwardError),
    #[error(transparent)]
    Test(#[from] crate::testview::TestRequestError),
    #[error("{0:?} is not a test id (tests are numbered 1, 2, ...)")]
    BadTestId(String),
    #[error("{0:?}: this endpoint takes no query (another site's tests are asked with ?site=SITE where the agent forwards requests)")]
    TestQuery(String),
    #[error("cannot encode the answer: {0}")]
    Encode(#[source] serde_json::Error),
    #[error(
        "\"at\" must be \"latest\" or an RFC 3339 time like \"2026-12-05T10:15:00Z\", not {0:?}"
    )]
    BadTime(String),
    #[error(transparent)]
    Recover(#[from] crate::recover::RecoverError),
}

impl ApiError {
    /// The HTTP status code of this error.
    fn status(&self) -> u16 {
        match self {
            ApiError::Unauthorized => 401,
            ApiError::NoEndpoint { .. } => 404,
            ApiError::NotUtf8
            | ApiError::BadQuery(_)
            | ApiError::BadBody(_)
            | ApiError::BadBandwidth(_)
            | ApiError::NoBandwidth
            | ApiError::BadRate(_)
            | ApiError::BadTestId(_)
            | ApiError::TestQuery(_) => 400,
            ApiError::Test(e) => e.status(),
            ApiError::UnknownPeer(_) => 404,
            ApiError::Verify(VerifyGroupError::NotPrimary(_)) => 404,
            ApiError::OwnerChange(e) => match e {
                OwnerChangeError::NoCoordinator => 409,
                OwnerChangeError::NoTarget => 400,
                OwnerChangeError::Request(r) => match r {
                    RequestError::UnknownGroup(_) => 404,
                    RequestError::NotMember { .. } => 400,
                    RequestError::Refused(_) | RequestError::TargetUnable { .. } => 409,
                    RequestError::TimedOut { .. } => 504,
                    RequestError::Store(StoreError::Unreachable(_)) => 503,
                    RequestError::Store(_) => 502,
                },
            },
            ApiError::Define(e) => match e {
                crate::runtime_groups::DefineError::Config(_)
                | crate::runtime_groups::DefineError::NotMember { .. } => 400,
                crate::runtime_groups::DefineError::Agent(_) => 500,
            },
            ApiError::Hypervisor(_) => 503,
            ApiError::Protect(e) => e.status(),
            ApiError::Unprotect(e) => e.status(),
            ApiError::Points(e) => e.status(),
            ApiError::Forward(e) => e.status(),
            ApiError::Encode(_) => 500,
            ApiError::BadTime(_) => 400,
            ApiError::Recover(e) => {
                use crate::recover::RecoverError as R;
                match e {
                    R::UnknownGroup(_) => 404,
                    R::NoCoordinator | R::NotReplica { .. } | R::NoHistory { .. } => 409,
                    R::NotPromoted { .. } => 504,
                    R::Point(_) => 404,
                    R::Request(r) => match r {
                        RequestError::UnknownGroup(_) => 404,
                        RequestError::NotMember { .. } => 400,
                        RequestError::Refused(_) | RequestError::TargetUnable { .. } => 409,
                        RequestError::TimedOut { .. } => 504,
                        RequestError::Store(StoreError::Unreachable(_)) => 503,
                        RequestError::Store(_) => 502,
                    },
                }
            }
        }
    }
}

/// Every endpoint: method, path (as in `openapi.json`) and the status
/// codes it answers with besides 200 (what the OpenAPI test checks).
#[cfg(test)]
const ENDPOINTS: &[(&str, &str, &[u16])] = &[
    ("GET", "/api/v1/openapi.json", &[]),
    ("GET", "/metrics", &[]),
    ("GET", "/api/v1/status", &[400, 401]),
    ("GET", "/api/v1/peers", &[401]),
    ("GET", "/api/v1/vms", &[401, 503]),
    ("POST", "/api/v1/groups", &[400, 401, 413, 500]),
    (
        "POST",
        "/api/v1/protect",
        &[400, 401, 404, 409, 413, 500, 503],
    ),
    (
        "PUT",
        "/api/v1/peers/{site}/bandwidth",
        &[400, 401, 404, 413],
    ),
    ("POST", "/api/v1/groups/{group}/verify", &[401, 404]),
    (
        "GET",
        "/api/v1/groups/{group}/points",
        &[400, 401, 404, 409, 502, 504],
    ),
    (
        "POST",
        "/api/v1/groups/{group}/unprotect",
        &[400, 401, 404, 409, 413, 500, 503],
    ),
    (
        "POST",
        "/api/v1/groups/{group}/failover",
        &[400, 401, 404, 409, 413, 502, 503, 504],
    ),
    (
        "POST",
        "/api/v1/groups/{group}/migrate",
        &[400, 401, 404, 409, 413, 502, 503, 504],
    ),
    (
        "POST",
        "/api/v1/groups/{group}/tests",
        &[400, 401, 404, 409, 413, 500],
    ),
    ("GET", "/api/v1/groups/{group}/tests", &[400, 401, 404]),
    ("DELETE", "/api/v1/groups/{group}/tests", &[400, 401, 404]),
    (
        "DELETE",
        "/api/v1/groups/{group}/tests/{id}",
        &[400, 401, 404],
    ),
    (
        "POST",
        "/api/v1/groups/{group}/recover",
        &[400, 401, 404, 409, 413, 502, 503, 504],
    ),
];

/// Body of `POST /api/v1/groups/{group}/failover` and `/migrate`.
#[derive(Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OwnerChange {
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    force: bool,
}

/// `/api/v1/groups/{group}/{action}` -> (group, action).
fn group_action(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/api/v1/groups/")?;
    let (group, action) = rest.split_once('/')?;
    (!group.is_empty() && !action.contains('/')).then_some((group, action))
}

/// `/api/v1/groups/{group}/tests[/{id}]` -> (group, id).
fn group_tests(path: &str) -> Option<(&str, Option<&str>)> {
    let rest = path.strip_prefix("/api/v1/groups/")?;
    let (group, rest) = rest.split_once('/')?;
    if group.is_empty() {
        return None;
    }
    match rest.strip_prefix("tests")? {
        "" => Some((group, None)),
        id => {
            let id = id.strip_prefix('/')?;
            (!id.is_empty() && !id.contains('/')).then_some((group, Some(id)))
        }
    }
}

/// `/api/v1/peers/{site}/bandwidth` -> site.
fn peer_bandwidth(path: &str) -> Option<&str> {
    let site = path
        .strip_prefix("/api/v1/peers/")?
        .strip_suffix("/bandwidth")?;
    (!site.is_empty() && !site.contains('/')).then_some(site)
}

/// The test endpoints take no query: one left here (`site=` where no
/// forwarding took it) is refused, never ignored.
fn no_query(request: &Request) -> Result<(), ApiError> {
    match request.query.as_deref() {
        None | Some("") => Ok(()),
        Some(q) => Err(ApiError::TestQuery(q.escape_default().to_string())),
    }
}

fn body_text(request: &Request) -> Result<&str, ApiError> {
    std::str::from_utf8(&request.body).map_err(|_| ApiError::NotUtf8)
}

/// `{"bandwidth": "50Mbit" | "unlimited" | "paused" | null}`: the override
/// to set, `None` to go back to the configuration.
fn parse_bandwidth(body: &str) -> Result<Option<u64>, ApiError> {
    let v: serde_json::Value = serde_json::from_str(body).map_err(ApiError::BadBody)?;
    let Some(rate) = v.get("bandwidth") else {
        return Err(ApiError::NoBandwidth);
    };
    match rate {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) if s == "unlimited" => {
            Ok(Some(tandem_replication::throttle::UNLIMITED))
        }
        serde_json::Value::String(s) if s == "paused" => Ok(Some(0)),
        serde_json::Value::String(s) => Ok(Some(tandem_config::parse_rate(s)?.bits_per_sec())),
        other => Err(ApiError::BadBandwidth(other.clone())),
    }
}

/// What a request must show to be served.
struct Guard {
    /// The bearer token (`<data_dir>/api.token`).
    token: String,
    /// Whether `/metrics` needs it too (`[api] metrics_auth`).
    metrics_auth: MetricsAuth,
}

impl Guard {
    /// Whether `request` carries the token.
    fn authorized(&self, request: &Request) -> bool {
        request
            .headers
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case("Authorization"))
            .any(|(_, value)| {
                value
                    .strip_prefix("Bearer ")
                    .is_some_and(|t| t.trim() == self.token)
            })
    }
}

/// Parses a request: what it asks, or why it cannot be served.
fn parse(request: &Request, guard: &Guard) -> Result<ApiRequest, ApiError> {
    let (method, path) = (request.method.as_str(), request.path.as_str());
    let no_endpoint = || ApiError::NoEndpoint {
        method: method.to_owned(),
        path: path.escape_default().to_string(),
    };
    match (method, path) {
        ("GET", "/api/v1/openapi.json") => return Ok(ApiRequest::OpenApi),
        ("GET", "/metrics") => {
            return match guard.metrics_auth {
                MetricsAuth::None => Ok(ApiRequest::Metrics),
                MetricsAuth::Token if guard.authorized(request) => Ok(ApiRequest::Metrics),
                MetricsAuth::Token => Err(ApiError::Unauthorized),
            }
        }
        _ => {}
    }
    if !path.starts_with("/api/v1/") {
        return Err(no_endpoint());
    }
    if !guard.authorized(request) {
        return Err(ApiError::Unauthorized);
    }
    parse_authorized(request)
}

/// Parses a request under `/api/v1/` whose token was checked (or that
/// another site forwarded: docs/PEER.md, "Forwarded API requests").
fn parse_authorized(request: &Request) -> Result<ApiRequest, ApiError> {
    let (method, path) = (request.method.as_str(), request.path.as_str());
    let no_endpoint = || ApiError::NoEndpoint {
        method: method.to_owned(),
        path: path.escape_default().to_string(),
    };
    match method {
        "GET" if path == "/api/v1/status" => match request.query.as_deref() {
            None | Some("" | "scope=local") => Ok(ApiRequest::Status),
            Some("scope=cluster") => Ok(ApiRequest::ClusterStatus),
            Some(other) => Err(ApiError::BadQuery(other.escape_default().to_string())),
        },
        "GET" if path == "/api/v1/peers" => Ok(ApiRequest::Peers),
        "GET" if path == "/api/v1/vms" => Ok(ApiRequest::Vms),
        "GET" if matches!(group_action(path), Some((_, "points"))) => {
            let (group, _) = group_action(path).ok_or_else(no_endpoint)?;
            Ok(ApiRequest::Points {
                group: group.to_owned(),
            })
        }
        "GET" | "DELETE" => {
            let (group, id) = group_tests(path).ok_or_else(no_endpoint)?;
            no_query(request)?;
            let group = group.to_owned();
            match (method, id) {
                ("GET", None) => Ok(ApiRequest::Tests { group }),
                ("DELETE", id) => Ok(ApiRequest::StopTests {
                    group,
                    id: id
                        .map(|id| {
                            id.parse::<u64>()
                                .map_err(|_| ApiError::BadTestId(id.escape_default().to_string()))
                        })
                        .transpose()?,
                }),
                _ => Err(no_endpoint()),
            }
        }
        "PUT" => {
            let site = peer_bandwidth(path).ok_or_else(no_endpoint)?;
            Ok(ApiRequest::SetBandwidth {
                site: site.to_owned(),
                bps: parse_bandwidth(body_text(request)?)?,
            })
        }
        "POST" if path == "/api/v1/groups" => Ok(ApiRequest::DefineGroup {
            text: body_text(request)?.to_owned(),
        }),
        "POST" if path == "/api/v1/protect" => Ok(ApiRequest::Protect(
            serde_json::from_str(body_text(request)?).map_err(ApiError::BadBody)?,
        )),
        "POST" => {
            let (group, action) = group_action(path).ok_or_else(no_endpoint)?;
            let group = group.to_owned();
            match action {
                "verify" => Ok(ApiRequest::Verify { group }),
                "tests" => {
                    no_query(request)?;
                    let body = body_text(request)?;
                    Ok(ApiRequest::StartTest {
                        group,
                        request: if body.trim().is_empty() {
                            crate::testview::StartRequest::default()
                        } else {
                            serde_json::from_str(body).map_err(ApiError::BadBody)?
                        },
                    })
                }
                "unprotect" => {
                    let body = body_text(request)?;
                    Ok(ApiRequest::Unprotect {
                        group,
                        request: if body.trim().is_empty() {
                            crate::onboard::UnprotectRequest::default()
                        } else {
                            serde_json::from_str(body).map_err(ApiError::BadBody)?
                        },
                    })
                }
                "failover" | "migrate" => {
                    let body = body_text(request)?;
                    let change: OwnerChange = if body.trim().is_empty() {
                        OwnerChange::default()
                    } else {
                        serde_json::from_str(body).map_err(ApiError::BadBody)?
                    };
                    Ok(ApiRequest::ChangeOwner {
                        group,
                        migrate: action == "migrate",
                        to: change.to,
                        force: change.force,
                    })
                }
                "recover" => {
                    #[derive(serde::Deserialize)]
                    #[serde(deny_unknown_fields)]
                    struct At {
                        at: String,
                    }
                    let at: At =
                        serde_json::from_str(body_text(request)?).map_err(ApiError::BadBody)?;
                    let at = crate::testview::at::parse_absolute(&at.at)
                        .map_err(|_| ApiError::BadTime(at.at.clone()))?;
                    Ok(ApiRequest::Recover { group, at })
                }
                _ => Err(no_endpoint()),
            }
        }
        _ => Err(no_endpoint()),
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Response, ApiError> {
    serde_json::to_string_pretty(value)
        .map(|body| Response::json(200, body))
        .map_err(ApiError::Encode)
}

/// Carries a request out (verify, failover and migrate hold this
/// connection's thread until the work is done).
fn serve(request: ApiRequest, view: &StatusView) -> Result<Response, ApiError> {
    match request {
        ApiRequest::OpenApi => Ok(Response::json(200, OPENAPI.to_owned())),
        ApiRequest::Metrics => Ok(Response::new(
            200,
            "text/plain; version=0.0.4",
            view.metrics(),
        )),
        ApiRequest::Status => to_json(&view.status()),
        ApiRequest::ClusterStatus => to_json(&view.cluster_status()),
        ApiRequest::Peers => to_json(&view.bandwidth.status()),
        ApiRequest::Vms => to_json(&view.vms()?),
        ApiRequest::DefineGroup { text } => {
            let group = view.define_group(&text)?;
            to_json(&serde_json::json!({ "group": group }))
        }
        ApiRequest::SetBandwidth { site, bps } => {
            view.bandwidth.set_override(&site, bps)?;
            to_json(&view.bandwidth.status())
        }
        ApiRequest::Verify { group } => to_json(&view.verify(&group)?),
        ApiRequest::Points { group } => to_json(&view.points(&group)?),
        ApiRequest::Protect(request) => to_json(&view.protect(&request)?),
        ApiRequest::Unprotect { group, request } => to_json(&view.unprotect(&group, &request)?),
        ApiRequest::ChangeOwner {
            group,
            migrate,
            to,
            force,
        } => to_json(&view.change_owner(&group, migrate, to, force)?),
        ApiRequest::StartTest { group, request } => to_json(&view.start_test(&group, &request)?),
        ApiRequest::Tests { group } => to_json(&view.tests(&group)?),
        ApiRequest::StopTests { group, id } => {
            to_json(&serde_json::json!({ "stopped": view.stop_tests(&group, id)? }))
        }
        ApiRequest::Recover { group, at } => to_json(&view.recover(&group, at)?),
    }
}

fn error(message: &str, code: u16) -> Response {
    Response::json(code, serde_json::json!({ "error": message }).to_string())
}

fn error_body(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

/// Serves a request another site forwarded (docs/PEER.md, "Forwarded API
/// requests"), as if it came with this site's token: (HTTP status, JSON
/// body).
pub(crate) fn serve_forwarded(view: &StatusView, request: Request) -> (u16, String) {
    match parse_authorized(&request).and_then(|r| serve(r, view)) {
        Ok(response) => (
            response.status,
            String::from_utf8_lossy(&response.body).into_owned(),
        ),
        Err(e) => (e.status(), error_body(&e.to_string())),
    }
}

/// `?site=SITE` naming another site: has SITE serve the request
/// (`crate::forward`). The token was checked.
fn forward_to(view: &StatusView, site: &str, request: &Request) -> Result<Response, ApiError> {
    let config = view.shared.config();
    let peer = config
        .peer(site)
        .ok_or_else(|| crate::forward::ForwardError::UnknownSite(site.to_owned()))?;
    let (_, query) = crate::forward::take_site(request.query.as_deref());
    let answer = crate::forward::forward(
        &view.shared.site,
        site,
        &peer.address,
        view.shared.tls.as_deref(),
        &crate::forward::Forward {
            method: &request.method,
            path: &request.path,
            query: query.as_deref(),
            body: &request.body,
        },
        crate::forward::FORWARD_TIMEOUT,
    )?;
    Ok(Response::json(
        answer.status,
        String::from_utf8_lossy(&answer.body).into_owned(),
    ))
}

struct Api {
    view: Arc<StatusView>,
    guard: Guard,
}

impl Handler for Api {
    fn handle(&self, mut request: Request, peer: SocketAddr) -> Response {
        // `?site=`: this site's own, or another's (forwarded).
        let (site, rest) = crate::forward::take_site(request.query.as_deref());
        let elsewhere = site.filter(|s| *s != self.view.shared.site);
        let outcome = match elsewhere {
            Some(site) if request.path.starts_with("/api/v1/") => {
                if self.guard.authorized(&request) {
                    forward_to(&self.view, &site, &request)
                } else {
                    Err(ApiError::Unauthorized)
                }
            }
            _ => {
                request.query = rest;
                parse(&request, &self.guard).and_then(|r| serve(r, &self.view))
            }
        };
        let response = match outcome {
            Ok(response) => response,
            Err(e) => {
                let status = e.status();
                tracing::debug!(%peer, method = %request.method, path = %request.path, status, "API: {e}");
                error(&e.to_string(), status)
            }
        };
        // A client that showed the token keeps its connection slot.
        if self.guard.authorized(&request) {
            response.authenticated_as("token")
        } else {
            response
        }
    }

    fn refused(&self, refusal: &Refusal) -> Response {
        error(&refusal.message, refusal.problem.status())
    }
}

/// The API token: created once (mode 0600), then reused.
fn load_or_create_token(path: &Path) -> Result<String, std::io::Error> {
    match std::fs::read_to_string(path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut raw = [0u8; 24];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut raw))?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    writeln!(f, "{token}")?;
    f.sync_all()?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_coordinator::decide::Refusal;

    fn request(method: &str, path: &str, token: Option<&str>, body: &str) -> Request {
        Request {
            method: method.to_owned(),
            path: path.to_owned(),
            query: None,
            headers: token
                .map(|t| vec![("Authorization".to_owned(), format!("Bearer {t}"))])
                .unwrap_or_default(),
            body: body.as_bytes().to_vec(),
            close: false,
            identity: None,
        }
    }

    fn guard(metrics_auth: MetricsAuth) -> Guard {
        Guard {
            token: "secret".into(),
            metrics_auth,
        }
    }

    fn status_of(method: &str, path: &str, token: Option<&str>, body: &str) -> u16 {
        match parse(
            &request(method, path, token, body),
            &guard(MetricsAuth::Token),
        ) {
            Ok(_) => 200,
            Err(e) => e.status(),
        }
    }

    #[test]
    fn requests_parse_into_their_actions() {
        let p = |m, path, body| {
            parse(
                &request(m, path, Some("secret"), body),
                &guard(MetricsAuth::Token),
            )
            .ok()
        };
        assert_eq!(p("GET", "/api/v1/status", ""), Some(ApiRequest::Status));
        let with_query = |q: &str| {
            let mut r = request("GET", "/api/v1/status", Some("secret"), "");
            r.query = Some(q.to_owned());
            parse(&r, &guard(MetricsAuth::Token)).map_err(|e| e.status())
        };
        assert_eq!(with_query("scope=cluster"), Ok(ApiRequest::ClusterStatus));
        assert_eq!(with_query("scope=local"), Ok(ApiRequest::Status));
        assert_eq!(with_query("scope=everything"), Err(400));
        assert_eq!(
            p(
                "POST",
                "/api/v1/groups/web01/migrate",
                r#"{"to":"chicago"}"#
            ),
            Some(ApiRequest::ChangeOwner {
                group: "web01".into(),
                migrate: true,
                to: Some("chicago".into()),
                force: false
            })
        );
        assert_eq!(
            p("POST", "/api/v1/groups/web01/failover", ""),
            Some(ApiRequest::ChangeOwner {
                group: "web01".into(),
                migrate: false,
                to: None,
                force: false
            })
        );
        assert_eq!(
            p(
                "PUT",
                "/api/v1/peers/chicago/bandwidth",
                r#"{"bandwidth":"paused"}"#
            ),
            Some(ApiRequest::SetBandwidth {
                site: "chicago".into(),
                bps: Some(0)
            })
        );
        assert_eq!(
            p("POST", "/api/v1/groups/web01/verify", ""),
            Some(ApiRequest::Verify {
                group: "web01".into()
            })
        );
    }

    #[test]
    fn bad_requests_get_their_status_codes() {
        assert_eq!(status_of("GET", "/api/v1/status", None, ""), 401);
        assert_eq!(status_of("GET", "/api/v1/status", Some("wrong"), ""), 401);
        assert_eq!(status_of("GET", "/metrics", None, ""), 401);
        assert_eq!(status_of("GET", "/metrics", Some("wrong"), ""), 401);
        assert_eq!(status_of("GET", "/metrics", Some("secret"), ""), 200);
        let open = |token| {
            parse(
                &request("GET", "/metrics", token, ""),
                &guard(MetricsAuth::None),
            )
            .ok()
        };
        assert_eq!(open(None), Some(ApiRequest::Metrics));
        assert_eq!(open(Some("wrong")), Some(ApiRequest::Metrics));
        assert_eq!(status_of("GET", "/nothing", None, ""), 404);
        assert_eq!(
            status_of("DELETE", "/api/v1/status", Some("secret"), ""),
            404
        );
        assert_eq!(
            status_of("POST", "/api/v1/groups/a/b/failover", Some("secret"), ""),
            404
        );
        assert_eq!(
            status_of("POST", "/api/v1/groups/g/failover", Some("secret"), "{"),
            400
        );
        assert_eq!(
            status_of(
                "POST",
                "/api/v1/groups/g/failover",
                Some("secret"),
                r#"{"to":1}"#
            ),
            400
        );
        assert_eq!(
            status_of(
                "POST",
                "/api/v1/groups/g/migrate",
                Some("secret"),
                r#"{"bogus":1}"#
            ),
            400
        );
        assert_eq!(
            status_of(
                "PUT",
                "/api/v1/peers/ny/bandwidth",
                Some("secret"),
                r#"{"bandwidth":7}"#
            ),
            400
        );
        assert_eq!(
            status_of(
                "PUT",
                "/api/v1/peers/ny/bandwidth",
                Some("secret"),
                r#"{"bandwidth":"fast"}"#
            ),
            400
        );
        // No rate at all is not "clear the override".
        for body in ["{}", r#"{"bandwith":"paused"}"#] {
            assert_eq!(
                status_of("PUT", "/api/v1/peers/ny/bandwidth", Some("secret"), body),
                400,
                "{body}"
            );
        }
    }

    #[test]
    fn every_error_maps_to_a_status_the_openapi_document_lists() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        let paths = doc["paths"].as_object().expect("paths");
        let mut listed = 0;
        for (path, ops) in paths {
            for method in ops.as_object().expect("operations").keys() {
                listed += 1;
                assert!(
                    ENDPOINTS
                        .iter()
                        .any(|(m, p, _)| m.eq_ignore_ascii_case(method) && p == path),
                    "openapi.json lists {method} {path}, which the API does not serve"
                );
            }
        }
        assert_eq!(listed, ENDPOINTS.len(), "every endpoint is in openapi.json");
        for (method, path, codes) in ENDPOINTS {
            let op = &doc["paths"][path][method.to_ascii_lowercase()];
            assert!(op.is_object(), "openapi.json lacks {method} {path}");
            for code in std::iter::once(&200).chain(codes.iter()) {
                assert!(
                    op["responses"][code.to_string()].is_object(),
                    "openapi.json: {method} {path} lacks response {code}"
                );
            }
        }
        // Each error's code is one its endpoint declares.
        let change = |e: RequestError| ApiError::OwnerChange(OwnerChangeError::Request(e));
        let owner_errors = [
            ApiError::OwnerChange(OwnerChangeError::NoCoordinator),
            ApiError::OwnerChange(OwnerChangeError::NoTarget),
            change(RequestError::UnknownGroup("g".into())),
            change(RequestError::NotMember {
                site: "x".into(),
                group: "g".into(),
            }),
            change(RequestError::Refused(Refusal::NoOwner {
                group: "g".into(),
            })),
            change(RequestError::Refused(Refusal::OwnerAlive {
                owner: "ny".into(),
                group: "g".into(),
                epoch: 1,
            })),
            change(RequestError::Refused(Refusal::TargetIsOwner {
                owner: "ny".into(),
                group: "g".into(),
                epoch: 1,
            })),
            change(RequestError::Refused(Refusal::NoCandidate {
                owner: "ny".into(),
                group: "g".into(),
            })),
            change(RequestError::TargetUnable {
                site: "seattle".into(),
                group: "g".into(),
                why: crate::ownership::Unable::Inconsistent,
            }),
            change(RequestError::TimedOut {
                group: "g".into(),
                waited: Duration::from_secs(1),
            }),
            change(RequestError::Store(StoreError::Unreachable("down".into()))),
            change(RequestError::Store(StoreError::Protocol("bad".into()))),
            ApiError::Unauthorized,
        ];
        let failover = ENDPOINTS
            .iter()
            .find(|(_, p, _)| p.ends_with("/failover"))
            .map(|(_, _, c)| *c)
            .unwrap_or_default();
        for e in &owner_errors {
            assert!(
                failover.contains(&e.status()),
                "{e}: status {} is not declared for failover",
                e.status()
            );
        }
        let verify = ApiError::Verify(VerifyGroupError::NotPrimary("g".into()));
        assert_eq!(verify.status(), 404);
        assert_eq!(ApiError::UnknownPeer(UnknownPeer("x".into())).status(), 404);
        // Starting a test: every error's code is declared.
        use crate::testview::{at::AtError, TestError, TestRequestError};
        use tandem_replication::history::HistoryError;
        let start = ENDPOINTS
            .iter()
            .find(|(m, p, _)| *m == "POST" && p.ends_with("/tests"))
            .map(|(_, _, c)| *c)
            .unwrap_or_default();
        let test_errors = [
            TestRequestError::UnknownGroup("g".into()),
            TestRequestError::At(AtError::NotATime("x".into())),
            TestError::NotReplica("g".into()).into(),
            TestError::NoHistory("g".into()).into(),
            TestError::History {
                group: "g".into(),
                source: HistoryError::NoPoint("t".into()),
            }
            .into(),
            TestError::Io {
                path: "/x".into(),
                what: "create",
                source: std::io::Error::other("full"),
            }
            .into(),
        ];
        for e in test_errors {
            let e = ApiError::Test(e);
            assert!(start.contains(&e.status()), "{e}: status {}", e.status());
        }
        let stop = ApiError::Test(
            TestError::NoTest {
                group: "g".into(),
                id: 3,
            }
            .into(),
        );
        assert_eq!(stop.status(), 404);
    }

    #[test]
    fn test_paths_parse() {
        assert_eq!(group_tests("/api/v1/groups/g/tests"), Some(("g", None)));
        assert_eq!(
            group_tests("/api/v1/groups/g/tests/12"),
            Some(("g", Some("12")))
        );
        assert_eq!(group_tests("/api/v1/groups/g/tests/"), None);
        assert_eq!(group_tests("/api/v1/groups/g/testsx"), None);
        assert_eq!(group_tests("/api/v1/groups/g/tests/1/2"), None);
        assert_eq!(group_tests("/api/v1/groups//tests"), None);
    }
}
