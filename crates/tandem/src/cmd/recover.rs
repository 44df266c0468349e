//! `tandem recover GROUP --at TIME [--site SITE]`: fail a group over to a
//! replica site at a point in time (docs/HISTORY.md, "Recovery").

use std::path::Path;
use std::time::SystemTime;

use anyhow::{bail, Context, Result};

pub fn run(config_path: &Path, group: &str, at: &str, site: Option<&str>) -> Result<()> {
    let config = crate::load_config(config_path)?;
    // Another site is asked through this one's agent (docs/PEER.md,
    // "Forwarded API requests").
    let target = site.unwrap_or(&config.site.name);
    if !target
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        bail!("{target:?} is not a site name (A-Z, a-z, 0-9, '.', '_' and '-')");
    }
    let now_ms = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let at = tandem_agent::testview::at::to_api(tandem_agent::testview::at::parse(at, now_ms)?);
    eprintln!("recover: failing group {group} over to {target} at the newest recovery point at or before {at}...");
    let body = serde_json::json!({ "at": at }).to_string();
    let answer = super::status::api_request(
        &config,
        "POST",
        &format!("/api/v1/groups/{group}/recover?site={target}"),
        Some(&body),
    )?;
    let done: serde_json::Value =
        serde_json::from_str(&answer).context("the agent's answer is not valid JSON")?;
    println!(
        "group {group}: owned by {} in epoch {} from the point of {} (seq {}) ({} ms); what came after it is kept as rollback data (`tandem rollback list`)",
        done["owner"].as_str().unwrap_or("?"),
        done["epoch"],
        done["point"]["time"].as_str().unwrap_or("?"),
        done["point"]["seq"],
        done["elapsed_ms"]
    );
    Ok(())
}
