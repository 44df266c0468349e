//! `tandem status [--json] [--local] [--watch]`: every group of the
//! cluster as its owner and replicas report it (the local agent gathers
//! the other sites' status over the peer port), or with `--local` this
//! site's own view; `--watch` redraws it every second until Ctrl-C.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tandem_agent::status::{ReplicaState, SiteStatus};

pub fn run(config_path: &Path, json: bool, local: bool, watch: bool) -> Result<()> {
    let config = crate::load_config(config_path)?;
    let path = if local {
        "/api/v1/status"
    } else {
        "/api/v1/status?scope=cluster"
    };
    if watch {
        return live(&config, path);
    }
    let body = api_get(&config, path)?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let status: SiteStatus =
        serde_json::from_str(&body).context("the agent's status is not valid JSON")?;
    print!("{}", table(&status, now_secs()));
    Ok(())
}

/// GET `path` from the local agent's API with its bearer token.
pub fn api_get(config: &tandem_config::Config, path: &str) -> Result<String> {
    api_request(config, "GET", path, None)
}

/// One request to the local agent's API with its bearer token; the body
/// of a 200 answer.
pub fn api_request(
    config: &tandem_config::Config,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<String> {
    let token_path = config.api_token_path();
    let token = std::fs::read_to_string(&token_path).with_context(|| {
        format!(
            "cannot read the API token {} (is the agent running on this site?)",
            token_path.display()
        )
    })?;
    let addr = &config.site.api;
    let mut s = TcpStream::connect(addr).with_context(|| {
        format!("cannot reach the agent's API at {addr} (site.api): is `tandem agent` running?")
    })?;
    // Long work (verify, failover, migrate) answers when it is done.
    let timeout = if method == "GET" { 10 } else { 6 * 3600 };
    s.set_read_timeout(Some(Duration::from_secs(timeout)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        token.trim(),
        body.len()
    )?;
    let mut response = String::new();
    s.read_to_string(&mut response)
        .context("reading the API response")?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head.split_whitespace().nth(1).unwrap_or("?");
    if code != "200" {
        // The API's errors are {"error": MESSAGE}: show the message.
        let message = serde_json::from_str::<serde_json::Value>(body.trim())
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| body.trim().to_owned());
        bail!("the agent's API answered {code}: {message}");
    }
    // tiny_http may use chunked encoding for large bodies.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(dechunk(body));
    }
    Ok(body.to_owned())
}

/// How often `--watch` redraws.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// The live view: the status redrawn every second (the screen cleared on
/// a terminal, blocks one after the other otherwise) until SIGINT or
/// SIGTERM; an agent that does not answer is shown as such and asked
/// again.
fn live(config: &tandem_config::Config, path: &str) -> Result<()> {
    use std::io::IsTerminal;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    let tty = std::io::stdout().is_terminal();
    while !stop.load(Ordering::Acquire) {
        let started = Instant::now();
        let block = match api_get(config, path).and_then(|body| {
            serde_json::from_str::<SiteStatus>(&body)
                .context("the agent's status is not valid JSON")
        }) {
            Ok(status) => table(&status, now_secs()),
            Err(e) => format!("{e:#}\n"),
        };
        let mut out = std::io::stdout().lock();
        if tty {
            write!(out, "\x1b[2J\x1b[H")?;
        }
        writeln!(
            out,
            "{} (every {}s, Ctrl-C to stop)",
            utc_now(),
            WATCH_EVERY.as_secs()
        )?;
        write!(out, "{block}")?;
        if !tty {
            writeln!(out)?;
        }
        out.flush()?;
        drop(out);
        let until = started + WATCH_EVERY;
        while !stop.load(Ordering::Acquire) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn utc_now() -> String {
    tandem_coordinator::instance::utc(now_secs() * 1000)
}

/// Seconds since the Unix epoch of a `2024-05-01T12:00:00Z` time (what
/// status carries); `None` for anything else.
fn parse_utc(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[19] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<u64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || y < 1970 {
        return None;
    }
    // Howard Hinnant's days-from-civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// `12s`, `4m05s`, `3h10m`, `2d04h`: how long ago `since` was.
fn age(since: &str, now: u64) -> String {
    match parse_utc(since) {
        Some(t) if now >= t => {
            let s = now - t;
            if s < 86_400 {
                tandem_agent::rate::format_eta(s as f64)
            } else {
                format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600)
            }
        }
        Some(_) => "0s".into(),
        None => "?".into(),
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn table(s: &SiteStatus, now: u64) -> String {
    let mut out = format!("site {}", s.site);
    if s.sites.is_empty() {
        out += "  (this site's view only)\n";
    } else {
        let sites: Vec<String> = s
            .sites
            .iter()
            .map(|x| {
                if x.reachable {
                    format!("{} ok", x.name)
                } else {
                    format!(
                        "{} UNREACHABLE ({})",
                        x.name,
                        x.error.as_deref().unwrap_or("no answer")
                    )
                }
            })
            .collect();
        out += &format!("  sites: {}\n", sites.join(", "));
    }
    for g in &s.groups {
        let owner = match (&g.owner, s.sites.is_empty()) {
            (Some(o), _) => o.clone(),
            (None, true) => g.primary.clone(),
            (None, false) => format!("unknown (last {})", g.primary),
        };
        let here = if g.member == Some(false) {
            "no part".to_owned()
        } else {
            g.role.to_string()
        };
        out += &format!(
            "\ngroup {}  owner {}  epoch {}  mode {}  here {}\n",
            g.name, owner, g.epoch, g.mode, here
        );
        if let Some(f) = &g.fenced {
            out += &format!("  writes fenced since {}: {}\n", f.since, f.detail);
        }
        if let Some(vm) = &g.vm {
            out += &format!("  vm {}  {} here", vm.name, vm.state);
            if let Some(e) = &vm.error {
                out += &format!("  (libvirt: {e})");
            }
            let elsewhere: Vec<String> = vm
                .sites
                .iter()
                .filter(|v| v.site != s.site)
                .map(|v| format!("{} at {}", v.state, v.site))
                .collect();
            if !elsewhere.is_empty() {
                out += &format!("; {}", elsewhere.join(", "));
            }
            out += "\n";
        }
        out += &format!(
            "  {:<12} {:<13} {:>8} {:>10} {:>8} {:>12}  {}\n",
            "REPLICA", "STATE", "SINCE", "LAG", "RPO(s)", "DURABLE", "NOTE"
        );
        for r in &g.replicas {
            let note = match (&r.resync, &r.last_error) {
                (Some(p), _) if r.resyncing && p.total_bytes > 0 => {
                    let mut n = format!(
                        "resync {:.0}% of {}",
                        100.0 * p.compared_bytes as f64 / p.total_bytes as f64,
                        tandem_config::format_size_approx(p.total_bytes)
                    );
                    if let Some(rate) = p.rate_bytes_per_second {
                        n += &format!(", {}", tandem_agent::rate::format_rate(rate));
                    }
                    if let Some(eta) = p.eta_seconds {
                        n += &format!(", ETA {}", tandem_agent::rate::format_eta(eta));
                    }
                    n
                }
                (_, Some(e)) if r.state == ReplicaState::Disconnected => e.clone(),
                _ => String::new(),
            };
            let note = match (&r.reported_by, g.owner.as_deref()) {
                (Some(by), owner) if Some(by.as_str()) != owner => {
                    format!("(its own report) {note}")
                }
                _ => note,
            };
            let row = format!(
                "  {:<12} {:<13} {:>8} {:>10} {:>8} {:>12}  {}",
                r.site,
                r.state.as_str(),
                r.since
                    .as_deref()
                    .map_or_else(|| "-".into(), |t| age(t, now)),
                tandem_config::format_size_approx(r.lag_bytes),
                r.rpo_seconds
                    .map_or_else(|| "-".into(), |x| format!("{x:.1}")),
                r.durable_seq,
                note.trim_end()
            );
            out += row.trim_end();
            out += "\n";
        }
        for t in &g.tests {
            let state = match &t.error {
                Some(e) => format!("FAILED: {e}"),
                None => "running".to_owned(),
            };
            let sockets: Vec<&str> = t.exports.iter().map(|e| e.socket.as_str()).collect();
            out += &format!(
                "  test {}  point {} (seq {})  scratch {} of {}  {state}\n    {}\n",
                t.id,
                t.point.time,
                t.point.seq,
                tandem_config::format_size_approx(t.scratch_bytes),
                tandem_config::format_size_approx(t.scratch_max),
                sockets.join(" ")
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times_parse_back() {
        for ms in [0u64, 1_700_000_000_000, 1_780_000_123_000, 951_782_400_000] {
            let s = tandem_coordinator::instance::utc(ms);
            assert_eq!(parse_utc(&s), Some(ms / 1000), "{s}");
        }
        assert_eq!(parse_utc("yesterday"), None);
        assert_eq!(parse_utc("2024-13-01T00:00:00Z"), None);
        assert_eq!(
            age(
                "2024-05-01T12:00:00Z",
                parse_utc("2024-05-01T12:04:05Z").unwrap()
            ),
            "4m05s"
        );
        assert_eq!(
            age(
                "2024-05-01T12:00:00Z",
                parse_utc("2024-05-03T16:00:00Z").unwrap()
            ),
            "2d04h"
        );
    }
}
