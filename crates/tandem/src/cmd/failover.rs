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
    let path = format!("/api/v1/groups/{group}/{what}");
    let answer = match (migrate, to) {
        // A migration waits until the target holds every write: show how
        // far it has to go, at what rate, and when it should be there.
        (true, Some(target)) => std::thread::scope(|scope| {
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            let (config, path, body) = (&config, &path, &body);
            let request = scope.spawn(move || {
                let answer = super::status::api_request(config, "POST", path, Some(body));
                let _ = done_tx.send(());
                answer
            });
            watch_drain(config, group, target, &done_rx);
            request
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the request thread failed")))
        })?,
        _ => super::status::api_request(&config, "POST", &path, Some(&body))?,
    };
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

/// Until `done` says the request ended: the bytes `target` still lacks
/// (the cluster view's lag of that replica, as the owner reports it) as a
/// progress bar with rate and ETA. Shown only while there is something
/// to wait for; errors reading the status just skip a reading.
fn watch_drain(
    config: &tandem_config::Config,
    group: &str,
    target: &str,
    done: &std::sync::mpsc::Receiver<()>,
) {
    let mut progress: Option<(super::progress::Progress, u64)> = None;
    loop {
        let lag = super::status::api_request(config, "GET", "/api/v1/status?scope=cluster", None)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|status| {
                let groups = status["groups"].as_array()?.clone();
                let g = groups.into_iter().find(|g| g["name"] == group)?;
                let replicas = g["replicas"].as_array()?.clone();
                let r = replicas.into_iter().find(|r| r["site"] == target)?;
                r["lag_bytes"].as_u64()
            });
        if let Some(lag) = lag {
            match progress.as_mut() {
                None if lag > 0 => {
                    let mut p = super::progress::Progress::new(format!(
                        "migrate {group}: {target} catching up"
                    ));
                    p.set(0, lag);
                    progress = Some((p, lag));
                }
                Some((p, total)) => {
                    *total = (*total).max(lag);
                    p.set(*total - lag, *total);
                }
                None => {}
            }
        }
        if done.recv_timeout(std::time::Duration::from_secs(1)).is_ok() {
            break;
        }
    }
    if let Some((p, _)) = progress {
        p.finish(&format!("migrate {group}: {target} holds every write"));
    }
}
