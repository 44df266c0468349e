//! The REST API on `site.api` (SPEC §4.5): `/api/v1/status` (bearer token
//! from `<data_dir>/api.token`), `/api/v1/openapi.json`, and Prometheus
//! text at `/metrics`.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tiny_http::{Header, Method, Response, Server};

use crate::{AgentError, Layout, StatusView};

pub const OPENAPI: &str = include_str!("openapi.json");

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
    let server = Server::http(addr).map_err(|e| err(e.to_string()))?;
    tracing::info!(%addr, "API listening");
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                match server.recv_timeout(Duration::from_millis(200)) {
                    Ok(Some(request)) => handle(request, &view, &token),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!("API: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })
        .map_err(|e| err(e.to_string()))
}

fn handle(mut request: tiny_http::Request, view: &Arc<StatusView>, token: &str) {
    let path = request.url().split('?').next().unwrap_or("").to_owned();
    let authorized = request.headers().iter().any(|h| {
        h.field.equiv("Authorization")
            && h.value
                .as_str()
                .strip_prefix("Bearer ")
                .is_some_and(|t| t.trim() == token)
    });
    fn json(body: String, code: u16) -> Response<std::io::Cursor<Vec<u8>>> {
        with_type(
            Response::from_string(body).with_status_code(code),
            "application/json",
        )
    }
    let response = match (request.method(), path.as_str()) {
        (Method::Get, "/api/v1/openapi.json") => json(OPENAPI.to_owned(), 200),
        (Method::Get, "/metrics") => with_type(
            Response::from_string(crate::metrics::render(&view.status(), &view.nbd)),
            "text/plain; version=0.0.4",
        ),
        (_, p) if p.starts_with("/api/v1/") && !authorized => json(
            r#"{"error":"missing or wrong bearer token (see <data_dir>/api.token)"}"#.to_owned(),
            401,
        ),
        (Method::Get, "/api/v1/status") => match serde_json::to_string_pretty(&view.status()) {
            Ok(body) => json(body, 200),
            Err(e) => json(format!(r#"{{"error":"{e}"}}"#), 500),
        },
        (Method::Post, p) if p.starts_with("/api/v1/groups/") && p.ends_with("/verify") => {
            // Long work: answered from its own thread.
            let group = p
                .trim_start_matches("/api/v1/groups/")
                .trim_end_matches("/verify")
                .to_owned();
            let view = Arc::clone(view);
            let spawned = std::thread::Builder::new()
                .name("verify".into())
                .spawn(move || {
                    let response = match view.verify(&group) {
                        Ok(result) => json(
                            serde_json::to_string_pretty(&result).unwrap_or_default(),
                            200,
                        ),
                        Err(e) => json(serde_json::json!({ "error": e }).to_string(), 404),
                    };
                    if let Err(e) = request.respond(response) {
                        tracing::debug!("API response failed: {e}");
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!("cannot start a verify thread: {e}");
            }
            return;
        }
        (Method::Post, p)
            if p.starts_with("/api/v1/groups/")
                && (p.ends_with("/failover") || p.ends_with("/migrate")) =>
        {
            let migrate = p.ends_with("/migrate");
            let group = p
                .trim_start_matches("/api/v1/groups/")
                .trim_end_matches("/failover")
                .trim_end_matches("/migrate")
                .to_owned();
            let mut body = String::new();
            let read = std::io::Read::read_to_string(
                &mut std::io::Read::take(request.as_reader(), 64 << 10),
                &mut body,
            );
            let parsed: Result<OwnerChange, String> =
                read.map_err(|e| e.to_string()).and_then(|_| {
                    if body.trim().is_empty() {
                        Ok(OwnerChange::default())
                    } else {
                        serde_json::from_str(&body).map_err(|e| format!("bad request body: {e}"))
                    }
                });
            let view = Arc::clone(view);
            let spawned = std::thread::Builder::new()
                .name("owner-change".into())
                .spawn(move || {
                    let response = match parsed {
                        Err(e) => json(serde_json::json!({ "error": e }).to_string(), 400),
                        Ok(change) => {
                            match view.change_owner(&group, migrate, change.to, change.force) {
                                Ok(done) => json(
                                    serde_json::to_string_pretty(&done).unwrap_or_default(),
                                    200,
                                ),
                                Err(e) => json(serde_json::json!({ "error": e }).to_string(), 409),
                            }
                        }
                    };
                    if let Err(e) = request.respond(response) {
                        tracing::debug!("API response failed: {e}");
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!("cannot start an owner-change thread: {e}");
            }
            return;
        }
        (Method::Get, "/api/v1/peers") => {
            match serde_json::to_string_pretty(&view.bandwidth.status()) {
                Ok(body) => json(body, 200),
                Err(e) => json(format!(r#"{{"error":"{e}"}}"#), 500),
            }
        }
        (Method::Put, p) if p.starts_with("/api/v1/peers/") && p.ends_with("/bandwidth") => {
            let site = p
                .trim_start_matches("/api/v1/peers/")
                .trim_end_matches("/bandwidth")
                .to_owned();
            let mut request = request;
            let mut body = String::new();
            let read = request.as_reader().take(4096).read_to_string(&mut body);
            let result = read
                .map_err(|e| e.to_string())
                .and_then(|_| parse_bandwidth(&body))
                .and_then(|bps| view.bandwidth.set_override(&site, bps));
            let response = match result {
                Ok(()) => json(
                    serde_json::to_string(&view.bandwidth.status()).unwrap_or_default(),
                    200,
                ),
                Err(e) => json(serde_json::json!({ "error": e }).to_string(), 400),
            };
            if let Err(e) = request.respond(response) {
                tracing::debug!("API response failed: {e}");
            }
            return;
        }
        (_, p) => json(
            format!(r#"{{"error":"no such endpoint: {}"}}"#, p.escape_default()),
            404,
        ),
    };
    if let Err(e) = request.respond(response) {
        tracing::debug!("API response failed: {e}");
    }
}

fn with_type<R: Read>(response: Response<R>, content_type: &str) -> Response<R> {
    match Header::from_bytes(&b"Content-Type"[..], content_type.as_bytes()) {
        Ok(h) => response.with_header(h),
        Err(()) => response,
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
