//! The REST API on `site.api` (SPEC §4.5): `/api/v1/status` (bearer token
//! from `<data_dir>/api.token`), `/api/v1/openapi.json`, Prometheus text at
//! `/metrics`, peers and bandwidth, verify, failover and migrate.
//!
//! Served by `tandem-http` (SPEC G8): bounded heads and bodies (an oversize
//! `Content-Length` is answered 413 and never allocated), timeouts, at most
//! 64 connections, each on its own thread.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tandem_http::{Handler, Limits, Options, Refusal, Request, Response};

use crate::{AgentError, Layout, StatusView};

pub const OPENAPI: &str = include_str!("openapi.json");

/// The largest request body taken: the API's bodies are a few bytes of
/// JSON. A larger one is refused (413) before it is read.
const MAX_BODY: usize = 64 << 10;
/// The largest `PUT /api/v1/peers/{site}/bandwidth` body looked at.
const MAX_BANDWIDTH_BODY: usize = 4096;

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
        max_connections: 64,
    }
}

/// Serves the API on `addr` until `stop` is set; the returned thread ends
/// once the listener is closed and connections have drained (a request
/// still running then is left to finish on its own).
pub fn start(
    addr: &str,
    layout: &Layout,
    view: Arc<StatusView>,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, AgentError> {
    let err = |reason: String| AgentError::Api {
        addr: addr.to_owned(),
        reason,
    };
    let token = load_or_create_token(&layout.data_dir.join("api.token")).map_err(&err)?;
    let listener = TcpListener::bind(addr).map_err(|e| err(e.to_string()))?;
    tracing::info!(%addr, "API listening");
    let options = Options {
        name: "api".into(),
        limits: limits(),
        stack_size: None,
        drain: Duration::from_secs(2),
    };
    let handler: Arc<dyn Handler> = Arc::new(Api { view, token });
    tandem_http::spawn(listener, options, stop, handler).map_err(|e| err(e.to_string()))
}

struct Api {
    view: Arc<StatusView>,
    token: String,
}

impl Handler for Api {
    fn handle(&self, request: Request, peer: SocketAddr) -> Response {
        let response = handle(&request, &self.view, &self.token);
        if response.status >= 400 {
            tracing::debug!(%peer, method = %request.method, path = %request.path, status = response.status, "API: refused");
        }
        response
    }

    fn refused(&self, refusal: &Refusal) -> Response {
        error(&refusal.message, refusal.problem.status())
    }
}

fn json(body: String, code: u16) -> Response {
    Response::json(code, body)
}

fn error(message: &str, code: u16) -> Response {
    json(serde_json::json!({ "error": message }).to_string(), code)
}

/// The body as text, at most `max` bytes of it (as the API always read).
fn body_text(request: &Request, max: usize) -> Result<String, String> {
    let body = &request.body[..request.body.len().min(max)];
    String::from_utf8(body.to_vec()).map_err(|_| "stream did not contain valid UTF-8".to_owned())
}

fn handle(request: &Request, view: &Arc<StatusView>, token: &str) -> Response {
    let path = request.path.as_str();
    let authorized = request
        .headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("Authorization"))
        .any(|(_, value)| {
            value
                .strip_prefix("Bearer ")
                .is_some_and(|t| t.trim() == token)
        });
    match (request.method.as_str(), path) {
        ("GET", "/api/v1/openapi.json") => json(OPENAPI.to_owned(), 200),
        ("GET", "/metrics") => Response::new(
            200,
            "text/plain; version=0.0.4",
            crate::metrics::render(&view.status(), &view.nbd),
        ),
        (_, p) if p.starts_with("/api/v1/") && !authorized => json(
            r#"{"error":"missing or wrong bearer token (see <data_dir>/api.token)"}"#.to_owned(),
            401,
        ),
        ("GET", "/api/v1/status") => match serde_json::to_string_pretty(&view.status()) {
            Ok(body) => json(body, 200),
            Err(e) => json(format!(r#"{{"error":"{e}"}}"#), 500),
        },
        ("POST", p) if p.starts_with("/api/v1/groups/") && p.ends_with("/verify") => {
            // Long work: this connection's thread waits for it.
            let group = p
                .trim_start_matches("/api/v1/groups/")
                .trim_end_matches("/verify");
            match view.verify(group) {
                Ok(result) => json(
                    serde_json::to_string_pretty(&result).unwrap_or_default(),
                    200,
                ),
                Err(e) => error(&e, 404),
            }
        }
        ("POST", p)
            if p.starts_with("/api/v1/groups/")
                && (p.ends_with("/failover") || p.ends_with("/migrate")) =>
        {
            // Long work too.
            let migrate = p.ends_with("/migrate");
            let group = p
                .trim_start_matches("/api/v1/groups/")
                .trim_end_matches("/failover")
                .trim_end_matches("/migrate");
            let parsed: Result<OwnerChange, String> =
                body_text(request, MAX_BODY).and_then(|body| {
                    if body.trim().is_empty() {
                        Ok(OwnerChange::default())
                    } else {
                        serde_json::from_str(&body).map_err(|e| format!("bad request body: {e}"))
                    }
                });
            match parsed {
                Err(e) => error(&e, 400),
                Ok(change) => match view.change_owner(group, migrate, change.to, change.force) {
                    Ok(done) => json(serde_json::to_string_pretty(&done).unwrap_or_default(), 200),
                    Err(e) => error(&e, 409),
                },
            }
        }
        ("GET", "/api/v1/peers") => match serde_json::to_string_pretty(&view.bandwidth.status()) {
            Ok(body) => json(body, 200),
            Err(e) => json(format!(r#"{{"error":"{e}"}}"#), 500),
        },
        ("PUT", p) if p.starts_with("/api/v1/peers/") && p.ends_with("/bandwidth") => {
            let site = p
                .trim_start_matches("/api/v1/peers/")
                .trim_end_matches("/bandwidth");
            let result = body_text(request, MAX_BANDWIDTH_BODY)
                .and_then(|body| parse_bandwidth(&body))
                .and_then(|bps| view.bandwidth.set_override(site, bps));
            match result {
                Ok(()) => json(
                    serde_json::to_string(&view.bandwidth.status()).unwrap_or_default(),
                    200,
                ),
                Err(e) => error(&e, 400),
            }
        }
        (_, p) => json(
            format!(r#"{{"error":"no such endpoint: {}"}}"#, p.escape_default()),
            404,
        ),
    }
}

/// `{"bandwidth": "50Mbit" | "unlimited" | "paused" | null}`: the override
/// to set, `None` to go back to the configuration.
fn parse_bandwidth(body: &str) -> Result<Option<u64>, String> {
    let v: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("body is not JSON: {e}"))?;
    match &v["bandwidth"] {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) if s == "unlimited" => Ok(Some(tandem_replication::throttle::UNLIMITED)),
        serde_json::Value::String(s) if s == "paused" => Ok(Some(0)),
        serde_json::Value::String(s) => tandem_config::parse_rate(s)
            .map(|r| Some(r.bits_per_sec()))
            .map_err(|e| e.to_string()),
        other => Err(format!("\"bandwidth\" must be a rate like \"50Mbit\", \"unlimited\", \"paused\" or null, not {other}")),
    }
}

/// The API token: created once (mode 0600), then reused.
fn load_or_create_token(path: &std::path::Path) -> Result<String, String> {
    if let Ok(mut f) = std::fs::File::open(path) {
        let mut token = String::new();
        f.read_to_string(&mut token)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let token = token.trim().to_owned();
        if !token.is_empty() {
            return Ok(token);
        }
    }
    let mut raw = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    writeln!(f, "{token}").map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(token)
}

/// Body of `POST /api/v1/groups/{group}/failover` and `/migrate`.
#[derive(Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OwnerChange {
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    force: bool,
}
