//! `tandem bandwidth SITE RATE|unlimited|paused|auto`: changes the limit
//! towards a peer site at runtime (until the agent restarts; `auto` goes
//! back to the configured `bandwidth` and `schedule`).

use std::path::Path;

use anyhow::{bail, Result};

pub fn run(config_path: &Path, site: &str, value: &str) -> Result<()> {
    let config = crate::load_config(config_path)?;
    let setting = match value {
        "auto" => serde_json::Value::Null,
        "unlimited" | "paused" => serde_json::Value::String(value.to_owned()),
        rate => {
            if let Err(e) = tandem_config::parse_rate(rate) {
                bail!("{e} (or use unlimited, paused or auto)");
            }
            serde_json::Value::String(rate.to_owned())
        }
    };
    let body = serde_json::json!({ "bandwidth": setting }).to_string();
    let answer = super::status::api_request(
        &config,
        "PUT",
        &format!("/api/v1/peers/{site}/bandwidth"),
        Some(&body),
    )?;
    let peers: serde_json::Value = serde_json::from_str(&answer)?;
    if let Some(p) = peers
        .as_array()
        .and_then(|a| a.iter().find(|p| p["site"] == site))
    {
        let effective = match (&p["effective_bps"], p["paused"].as_bool()) {
            (_, Some(true)) => "paused".to_owned(),
            (serde_json::Value::Null, _) => "unlimited".to_owned(),
            (v, _) => tandem_config::format_rate(tandem_config::Rate(v.as_u64().unwrap_or(0))),
        };
        println!("bandwidth to {site}: {effective}");
    }
    Ok(())
}
