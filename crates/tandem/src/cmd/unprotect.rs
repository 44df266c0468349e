//! `tandem unprotect GROUP [--to DIR]`: the group's VM keeps running on
//! plain local raw files (`DIR/<vm>-<target>.raw`, DIR by default
//! libvirt's image directory) and the group is removed from every site
//! (docs/VMS.md, "Unprotect"). Run on the site serving the group.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tandem_agent::onboard::{UnprotectRequest, Unprotected, DEFAULT_DIR};

pub fn run(config_path: &Path, group: &str, to: Option<PathBuf>) -> Result<()> {
    let config = crate::load_config(config_path)?;
    let to = match to {
        // The agent resolves paths itself: give it an absolute one.
        Some(dir) if dir.is_relative() => Some(std::env::current_dir()?.join(dir)),
        other => other,
    };
    eprintln!(
        "unprotecting group {group}: moving its VM's disks to {} ...",
        to.as_deref()
            .map_or_else(|| DEFAULT_DIR.to_owned(), |d| d.display().to_string())
    );
    let body = super::status::api_request(
        &config,
        "POST",
        &format!("/api/v1/groups/{group}/unprotect"),
        Some(&serde_json::to_string(&UnprotectRequest { to })?),
    )?;
    let done: Unprotected =
        serde_json::from_str(&body).context("the agent's answer is not valid JSON")?;
    for d in &done.disks {
        println!("{}: {}", d.target, d.file.display());
    }
    if !done.replicas_not_told.is_empty() {
        eprintln!(
            "warning: replica site(s) {} could not be told to drop group {group}: they keep it \
             (and its images) until they are told again",
            done.replicas_not_told.join(", ")
        );
    }
    println!("{} runs on local files; group {group} is removed", done.vm);
    Ok(())
}
