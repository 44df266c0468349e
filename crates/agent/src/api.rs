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

fn handle(request: tiny_http::Request, view: &StatusView, token: &str) {
    let path = request.url().split('?').next().unwrap_or("").to_owned();
    let authorized = request.headers().iter().any(|h| {
        h.field.equiv("Authorization")
            && h.value
                .as_str()
                .strip_prefix("Bearer ")
                .is_some_and(|t| t.trim() == token)
    });
    let json = |body: String, code: u16| {
        with_type(
            Response::from_string(body).with_status_code(code),
            "application/json",
        )
    };
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
