//! `tandem verify GROUP`: compares every replica of a group with this
//! primary, chunk by chunk, while the VM keeps running, with a progress
//! bar (rate and time left, from the agent's status). Exit 1 if any
//! differs (or cannot be compared).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use tandem_agent::status::{SiteStatus, VerifyResult};

use super::progress::Progress;

/// How often the bar is brought up to date.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Compared and total bytes of the running verification of `group`, from
/// the agent's status (None when it shows none).
fn verify_progress(config: &tandem_config::Config, group: &str) -> Option<(u64, u64)> {
    let body = super::status::api_get(config, "/api/v1/status").ok()?;
    let status: SiteStatus = serde_json::from_str(&body).ok()?;
    let g = status.groups.iter().find(|g| g.name == group)?;
    let (mut done, mut total) = (0, 0);
    let mut any = false;
    for r in &g.replicas {
        if let Some(v) = &r.verify {
            any = true;
            done += v.compared_bytes;
            total += v.total_bytes;
        }
    }
    any.then_some((done, total))
}

pub fn run(config_path: &Path, group: &str) -> Result<bool> {
    let config = crate::load_config(config_path)?;
    eprintln!(
        "verifying group {group}: comparing every 64 KiB chunk of the primary with each replica..."
    );
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let (config, path) = (config.clone(), format!("/api/v1/groups/{group}/verify"));
        std::thread::spawn(move || {
            let _ = tx.send(super::status::api_request(&config, "POST", &path, Some("")));
        });
    }
    // Replicas are verified one after the other: the bar shows the one
    // being compared.
    let mut bar: Option<Progress> = None;
    let body = loop {
        match rx.recv_timeout(PROGRESS_EVERY) {
            Ok(answer) => break answer,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Some((done, total)) = verify_progress(&config, group) {
                    bar.get_or_insert_with(|| Progress::new(format!("verify {group}")))
                        .set(done, total);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                anyhow::bail!("the verification request ended without an answer")
            }
        }
    };
    if let Some(bar) = bar {
        bar.finish(&format!("verify {group}: compared"));
    }
    let body = body?;
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
