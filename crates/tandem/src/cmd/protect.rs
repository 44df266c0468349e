//! `tandem protect DOMAIN --replica SITE[:PRIORITY]... [--mode async|sync]
//! [--group NAME]`: makes a domain of this host a protected VM
//! (docs/VMS.md, "Onboarding"). Shows the disks' copy (live: the mirror,
//! then the guest's pause at the pivot), then the initial sync to each
//! replica, and returns when every replica streams.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tandem_agent::onboard::{Accepted, ProtectRequest, ReplicaRequest};
use tandem_agent::status::{GroupStatus, OnboardingStage, ReplicaState, SiteStatus};

use super::progress::Progress;

const POLL: Duration = Duration::from_millis(500);

/// `SITE` or `SITE:PRIORITY`.
pub fn parse_replica(s: &str) -> Result<ReplicaRequest, String> {
    match s.split_once(':') {
        None => Ok(ReplicaRequest {
            site: s.to_owned(),
            priority: None,
        }),
        Some((site, p)) => Ok(ReplicaRequest {
            site: site.to_owned(),
            priority: Some(
                p.parse()
                    .map_err(|_| format!("priority {p:?} is not a whole number"))?,
            ),
        }),
    }
}

pub fn run(
    config_path: &Path,
    domain: &str,
    replicas: Vec<ReplicaRequest>,
    mode: Option<String>,
    group: Option<String>,
) -> Result<()> {
    let config = crate::load_config(config_path)?;
    let request = ProtectRequest {
        domain: domain.to_owned(),
        replicas,
        mode,
        group,
    };
    let body = super::status::api_request(
        &config,
        "POST",
        "/api/v1/protect",
        Some(&serde_json::to_string(&request)?),
    )?;
    let accepted: Accepted =
        serde_json::from_str(&body).context("the agent's answer is not valid JSON")?;
    let group = accepted.group;
    eprintln!(
        "{} {domain} as group {group}",
        if accepted.resumed {
            "resuming the protection of"
        } else {
            "protecting"
        }
    );
    copy_disks(&config, &group)?;
    initial_sync(&config, &group)?;
    println!("{domain} is protected by group {group}");
    Ok(())
}

fn group_status(config: &tandem_config::Config, group: &str) -> Result<GroupStatus> {
    let body = super::status::api_get(config, "/api/v1/status")?;
    let status: SiteStatus =
        serde_json::from_str(&body).context("the agent's status is not valid JSON")?;
    status
        .groups
        .into_iter()
        .find(|g| g.name == group)
        .with_context(|| format!("group {group} is not in the agent's status"))
}

fn copy_disks(config: &tandem_config::Config, group: &str) -> Result<()> {
    let mut bar: Option<(String, Progress)> = None;
    loop {
        let g = group_status(config, group)?;
        let Some(o) = g.vm.and_then(|v| v.onboarding) else {
            bail!("the agent shows no onboarding of group {group}");
        };
        if let Some(d) = o.disks.iter().find(|d| !d.done) {
            if bar.as_ref().map(|(t, _)| t.as_str()) != Some(d.target.as_str()) {
                if let Some((_, b)) = bar.take() {
                    b.finish("");
                }
                let how = if o.live { "mirroring" } else { "copying" };
                bar = Some((
                    d.target.clone(),
                    Progress::new(format!("{how} {} -> {}", d.target, d.volume)),
                ));
            }
            if let Some((_, b)) = bar.as_mut() {
                b.set(d.copied_bytes, d.total_bytes);
            }
        }
        match o.stage {
            OnboardingStage::Done => {
                if let Some((_, b)) = bar.take() {
                    b.finish("disks copied");
                }
                for d in &o.disks {
                    match d.pivot_ms {
                        Some(ms) => eprintln!(
                            "{}: on volume {} (the guest paused {ms:.1} ms at the pivot)",
                            d.target, d.volume
                        ),
                        None => eprintln!("{}: on volume {}", d.target, d.volume),
                    }
                }
                return Ok(());
            }
            OnboardingStage::Failed | OnboardingStage::Interrupted => {
                if let Some((_, b)) = bar.take() {
                    b.finish("");
                }
                bail!(
                    "onboarding of group {group} stopped: {}",
                    o.error.as_deref().unwrap_or("no reason given")
                );
            }
            _ => {}
        }
        std::thread::sleep(POLL);
    }
}

fn initial_sync(config: &tandem_config::Config, group: &str) -> Result<()> {
    let mut bar = Progress::new("initial sync to the replicas");
    loop {
        let g = group_status(config, group)?;
        let expected = config
            .group(group)
            .map(|c| c.replicas.len())
            .unwrap_or_default();
        let streaming = g
            .replicas
            .iter()
            .filter(|r| r.state == ReplicaState::Streaming && !r.resyncing)
            .count();
        if !g.replicas.is_empty() && streaming == g.replicas.len() && streaming >= expected {
            bar.finish(&format!("every replica streams ({streaming})"));
            return Ok(());
        }
        let (done, total) = g
            .replicas
            .iter()
            .filter_map(|r| r.resync.as_ref())
            .fold((0, 0), |(d, t), p| {
                (d + p.compared_bytes, t + p.total_bytes)
            });
        if total > 0 {
            bar.set(done, total);
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_take_an_optional_priority() {
        let r = parse_replica("chicago").unwrap();
        assert_eq!((r.site.as_str(), r.priority), ("chicago", None));
        let r = parse_replica("seattle:2").unwrap();
        assert_eq!((r.site.as_str(), r.priority), ("seattle", Some(2)));
        assert!(parse_replica("seattle:x").is_err());
    }
}
