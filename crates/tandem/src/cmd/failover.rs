//! `tandem failover GROUP [--to SITE] [--force]` and `tandem migrate GROUP
//! --to SITE`: ask the coordinator, through the local agent, to move a
//! group, and wait for the new owner.

use std::path::Path;

use anyhow::{Context, Result};

pub fn run(
    config_path: &Path,
    group: &str,
    to: Option<&str>,
    force: bool,
    migrate: bool,
) -> Result<()> {
    let config = crate::load_config(config_path)?;
    let what = if migrate { "migrate" } else { "failover" };
    match to {
        Some(site) => eprintln!("{what}: moving group {group} to {site}..."),
        None => eprintln!(
            "{what}: moving group {group} to the first eligible replica in its failover order (never its current owner)..."
        ),
    }
    let body = serde_json::json!({ "to": to, "force": force }).to_string();
    let answer = super::status::api_request(
        &config,
        "POST",
        &format!("/api/v1/groups/{group}/{what}"),
        Some(&body),
    )?;
    let done: serde_json::Value =
        serde_json::from_str(&answer).context("the agent's answer is not valid JSON")?;
    let owner = done["owner"].as_str().unwrap_or("?");
    if done["moved"] == serde_json::Value::Bool(false) {
        println!(
            "group {group} is already at {owner} (epoch {}): nothing to do",
            done["epoch"]
        );
    } else {
        println!(
            "group {group}: owned by {owner} in epoch {} ({} ms)",
            done["epoch"], done["elapsed_ms"]
        );
    }
    Ok(())
}
