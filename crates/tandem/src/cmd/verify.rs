//! `tandem verify GROUP`: compares every replica of a group with this
//! primary, chunk by chunk, while the VM keeps running. Exit 1 if any
//! differs (or cannot be compared).

use std::path::Path;

use anyhow::{Context, Result};
use tandem_agent::status::VerifyResult;

pub fn run(config_path: &Path, group: &str) -> Result<bool> {
    let config = crate::load_config(config_path)?;
    eprintln!(
        "verifying group {group}: comparing every 64 KiB chunk of the primary with each replica..."
    );
    let body = super::status::api_request(
        &config,
        "POST",
        &format!("/api/v1/groups/{group}/verify"),
        Some(""),
    )?;
    let result: VerifyResult =
        serde_json::from_str(&body).context("the agent's answer is not valid JSON")?;
    for r in &result.replicas {
        match &r.error {
            Some(e) => println!("{}: not compared: {e}", r.site),
            None if r.differing.is_empty() => println!(
                "{}: identical ({} compared, {} pass{})",
                r.site,
                tandem_config::format_size_approx(r.compared_bytes),
                r.passes,
                if r.passes == 1 { "" } else { "es" }
            ),
            None => {
                println!("{}: {} range(s) DIFFER:", r.site, r.differing.len());
                for d in &r.differing {
                    println!("  {}\toffset {}\tlength {}", d.volume, d.offset, d.length);
                }
            }
        }
    }
    Ok(result.identical)
}
