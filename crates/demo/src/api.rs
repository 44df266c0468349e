//! The calls the demo makes to an agent's API (SPEC §4.4): its status,
//! the migration of the group, and (`--vm`) `tandem protect`. One request per connection, the bearer
//! token from the site's data directory, a bounded answer.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use tandem_agent::status::SiteStatus;

use crate::cluster::SiteName;

/// Largest answer read (a status is a few KiB).
const MAX_RESPONSE: u64 = 4 << 20;
/// A status comes at once.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent gives up on a migration after 120 s.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(150);
/// `tandem protect` answers once it has checked the domain and defined the
/// group (a few libvirt calls).
const PROTECT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot read the API token {} (is the agent running on this site?)", path.display())]
    Token {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot reach the agent's API at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("talking to the agent's API at {addr}")]
    Io {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("the agent's answer is over {MAX_RESPONSE} bytes")]
    TooLarge,
    #[error("the agent's answer is not HTTP/1.1 with a status code")]
    Malformed,
    #[error("the agent's API answered {code}: {body}")]
    Refused { code: u16, body: String },
    #[error("the agent's answer is not the JSON expected")]
    Json(#[source] serde_json::Error),
    #[error("the agent does not report group {group}")]
    NoGroup { group: &'static str },
}

/// `GET /api/v1/status`.
pub(crate) fn status(config: &tandem_config::Config) -> Result<SiteStatus, ApiError> {
    let body = request(config, "GET", "/api/v1/status", "", STATUS_TIMEOUT)?;
    serde_json::from_slice(&body).map_err(ApiError::Json)
}

/// The answer to a migration.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct Migrated {
    pub owner: String,
    pub epoch: u64,
    pub elapsed_ms: Option<u64>,
}

/// `POST /api/v1/groups/{group}/migrate`: answers once `to` owns the group.
pub(crate) fn migrate(
    config: &tandem_config::Config,
    group: &str,
    to: SiteName,
) -> Result<Migrated, ApiError> {
    let path = format!("/api/v1/groups/{group}/migrate");
    let body = format!(r#"{{"to":"{to}"}}"#);
    let answer = request(config, "POST", &path, &body, MIGRATE_TIMEOUT)?;
    serde_json::from_slice(&answer).map_err(ApiError::Json)
}

/// `POST /api/v1/protect`: answers once the group is defined; the disks
/// move afterwards (the group's `vm.onboarding` in the status).
pub(crate) fn protect(
    config: &tandem_config::Config,
    protect: &tandem_agent::onboard::ProtectRequest,
) -> Result<tandem_agent::onboard::Accepted, ApiError> {
    let body = serde_json::to_string(protect).map_err(ApiError::Json)?;
    let answer = request(config, "POST", "/api/v1/protect", &body, PROTECT_TIMEOUT)?;
    serde_json::from_slice(&answer).map_err(ApiError::Json)
}

/// `PUT /api/v1/peers/{site}/bandwidth`: `rate` is a rate like
/// `"50Mbit"`, `"unlimited"` or `"paused"`.
pub(crate) fn set_bandwidth(
    config: &tandem_config::Config,
    site: &str,
    rate: &str,
) -> Result<(), ApiError> {
    let body = serde_json::json!({ "bandwidth": rate }).to_string();
    request(
        config,
        "PUT",
        &format!("/api/v1/peers/{site}/bandwidth"),
        &body,
        STATUS_TIMEOUT,
    )
    .map(|_| ())
}

/// One request to the site's agent; the body of a 200 answer.
fn request(
    config: &tandem_config::Config,
    method: &str,
    path: &str,
    body: &str,
    timeout: Duration,
) -> Result<Vec<u8>, ApiError> {
    let token_path = config.api_token_path();
    let token = std::fs::read_to_string(&token_path).map_err(|source| ApiError::Token {
        path: token_path,
        source,
    })?;
    let addr = &config.site.api;
    let io = |source| ApiError::Io {
        addr: addr.clone(),
        source,
    };
    let mut s = TcpStream::connect(addr).map_err(|source| ApiError::Connect {
        addr: addr.clone(),
        source,
    })?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        token.trim(),
        body.len()
    )
    .map_err(io)?;
    let mut response = Vec::new();
    s.take(MAX_RESPONSE + 1)
        .read_to_end(&mut response)
        .map_err(io)?;
    if response.len() as u64 > MAX_RESPONSE {
        return Err(ApiError::TooLarge);
    }
    let (code, body) = parse_response(&response)?;
    if code != 200 {
        return Err(ApiError::Refused {
            code,
            body: String::from_utf8_lossy(body).trim().to_owned(),
        });
    }
    Ok(body.to_vec())
}

/// The status code and body of a whole response (the connection closed
/// after it). The body ends where `Content-Length` says, if it says.
fn parse_response(response: &[u8]) -> Result<(u16, &[u8]), ApiError> {
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(ApiError::Malformed)?;
    let head = std::str::from_utf8(&response[..end]).map_err(|_| ApiError::Malformed)?;
    let body = &response[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut words = status_line.split(' ');
    let code = match (words.next(), words.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/1.") => {
            code.parse::<u16>().map_err(|_| ApiError::Malformed)?
        }
        _ => return Err(ApiError::Malformed),
    };
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .map(|(_, value)| value.trim().parse::<usize>())
        .transpose()
        .map_err(|_| ApiError::Malformed)?;
    let body = match length {
        Some(n) => body.get(..n).ok_or(ApiError::Malformed)?,
        None => body,
    };
    Ok((code, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_is_split_into_code_and_body() {
        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        let (code, body) = parse_response(r).expect("valid");
        assert_eq!((code, body), (200, &b"{}"[..]));
        let r = b"HTTP/1.1 409 Conflict\r\nContent-Length: 4\r\n\r\nbusyEXTRA";
        assert_eq!(parse_response(r).expect("valid").1, b"busy");
    }

    #[test]
    fn malformed_responses_are_errors() {
        for r in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\n",
            b"garbage\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"\xff\xfe\r\n\r\n",
        ] {
            assert!(
                matches!(parse_response(r), Err(ApiError::Malformed)),
                "{:?}",
                String::from_utf8_lossy(r)
            );
        }
    }
}
