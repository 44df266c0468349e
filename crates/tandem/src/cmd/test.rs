//! `tandem test start GROUP [--at TIME|latest]` and `tandem test stop
//! GROUP [--id ID]`: test failover of unlimited length on a replica
//! (docs/HISTORY.md, "Test views"). Relative times (`-15m`) are resolved
//! here, against this host's clock, and sent as absolute ones. `--boot`
//! has the agent boot a copy of the group's VM on the view.

use std::path::Path;

use anyhow::{bail, Context, Result};
use tandem_agent::status::TestStatus;
use tandem_agent::testview::at;

/// The API path of `group`'s tests (`rest`: `""` or `/ID`), asked of
/// `site` through the local agent when it is another site (`?site=`,
/// forwarded over the peer port).
fn tests_path(
    config: &tandem_config::Config,
    group: &str,
    rest: &str,
    site: Option<&str>,
) -> Result<String> {
    for (what, name) in [("group", Some(group)), ("site", site)] {
        if let Some(name) = name {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                bail!("{what} {name:?} is not a valid name");
            }
        }
    }
    let mut path = format!("/api/v1/groups/{group}/tests{rest}");
    if let Some(site) = site.filter(|s| *s != config.site.name) {
        path.push_str("?site=");
        path.push_str(site);
    }
    Ok(path)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub fn start(
    config_path: &Path,
    group: &str,
    site: Option<&str>,
    at_text: &str,
    boot: bool,
    json: bool,
) -> Result<()> {
    let config = crate::load_config(config_path)?;
    let path = tests_path(&config, group, "", site)?;
    let choice = at::parse(at_text, now_ms())?;
    let body = if boot {
        serde_json::json!({ "at": at::to_api(choice), "boot": true })
    } else {
        serde_json::json!({ "at": at::to_api(choice) })
    }
    .to_string();
    let answer = super::status::api_request(&config, "POST", &path, Some(&body))?;
    if json {
        println!("{}", answer.trim());
        return Ok(());
    }
    let test: TestStatus =
        serde_json::from_str(&answer).context("the agent's answer is not a test")?;
    println!(
        "test {} of {group} started at point seq {} ({})",
        test.id, test.point.seq, test.point.time
    );
    for e in &test.exports {
        println!("  {}: {}", e.volume, e.socket);
    }
    if let Some(vm) = &test.vm {
        println!(
            "  VM copy {} booted on the view ({}), its network detached",
            vm.name, vm.state
        );
    }
    println!(
        "writes go to scratch (at most {}); replication goes on. Stop with: tandem test stop {group}{}",
        tandem_config::format_size_approx(test.scratch_max),
        if test.id == 1 { String::new() } else { format!(" --id {}", test.id) }
    );
    Ok(())
}

pub fn stop(config_path: &Path, group: &str, site: Option<&str>, id: Option<u64>) -> Result<()> {
    let config = crate::load_config(config_path)?;
    let rest = id.map(|id| format!("/{id}")).unwrap_or_default();
    let path = tests_path(&config, group, &rest, site)?;
    let answer = super::status::api_request(&config, "DELETE", &path, None)?;
    let v: serde_json::Value =
        serde_json::from_str(&answer).context("the agent's answer is not JSON")?;
    let stopped: Vec<u64> = v["stopped"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
        .unwrap_or_default();
    if stopped.is_empty() {
        println!("{group}: no test running");
    } else {
        for id in stopped {
            println!("test {id} of {group} stopped: sockets and scratch removed");
        }
    }
    Ok(())
}
