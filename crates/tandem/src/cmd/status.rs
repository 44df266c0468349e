//! `tandem status [--json]`: the local agent's view of its groups.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tandem_agent::status::SiteStatus;

pub fn run(config_path: &Path, json: bool, watch: bool) -> Result<()> {
    let config = crate::load_config(config_path)?;
    if watch {
        return watch_resyncs(&config);
    }
    let body = api_get(&config, "/api/v1/status")?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let status: SiteStatus =
        serde_json::from_str(&body).context("the agent's status is not valid JSON")?;
    print!("{}", table(&status));
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

/// Shows resync progress until no replica is resyncing: a redrawn bar on
/// a terminal, plain lines otherwise.
fn watch_resyncs(config: &tandem_config::Config) -> Result<()> {
    use std::io::IsTerminal;
    let tty = std::io::stdout().is_terminal();
    loop {
        let body = api_get(config, "/api/v1/status")?;
        let status: SiteStatus =
            serde_json::from_str(&body).context("the agent's status is not valid JSON")?;
        let mut lines = Vec::new();
        for g in &status.groups {
            for r in g.replicas.iter().filter(|r| r.resyncing) {
                let (done, total) = r
                    .resync
                    .as_ref()
                    .map_or((0, 0), |p| (p.compared_bytes, p.total_bytes));
                let pct = if total == 0 {
                    0.0
                } else {
                    100.0 * done as f64 / total as f64
                };
                let bar: String = (0..30)
                    .map(|i| if (i as f64) < pct * 0.3 { '#' } else { '.' })
                    .collect();
                lines.push(format!(
                    "{}/{} [{bar}] {pct:5.1}%  {} of {} compared, lag {}",
                    g.name,
                    r.site,
                    tandem_config::format_size_approx(done),
                    tandem_config::format_size_approx(total),
                    tandem_config::format_size_approx(r.lag_bytes)
                ));
            }
        }
        if tty {
            print!("\x1b[2J\x1b[H");
        }
        if lines.is_empty() {
            println!("no resync running");
            return Ok(());
        }
        for l in &lines {
            println!("{l}");
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
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

fn table(s: &SiteStatus) -> String {
    let mut out = format!("site {}\n", s.site);
    for g in &s.groups {
        out += &format!(
            "\ngroup {}  role {}  epoch {}  primary {}  mode {}\n",
            g.name, g.role, g.epoch, g.primary, g.mode
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
            "  {:<12} {:<13} {:>12} {:>9} {:>12}  {}\n",
            "REPLICA", "STATE", "LAG", "LAG(s)", "DURABLE", "NOTE"
        );
        for r in &g.replicas {
            let note = match (&r.resync, &r.last_error) {
                (Some(p), _) if r.resyncing && p.total_bytes > 0 => {
                    format!(
                        "resync {:.0}% of {}",
                        100.0 * p.compared_bytes as f64 / p.total_bytes as f64,
                        tandem_config::format_size_approx(p.total_bytes)
                    )
                }
                (_, Some(e)) if r.state == tandem_agent::status::ReplicaState::Disconnected => {
                    e.clone()
                }
                _ => String::new(),
            };
            out += &format!(
                "  {:<12} {:<13} {:>12} {:>9.1} {:>12}  {}\n",
                r.site,
                r.state,
                tandem_config::format_size_approx(r.lag_bytes),
                r.lag_seconds,
                r.durable_seq,
                note
            );
        }
    }
    out
}
