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
    let when = parse_time(at, SystemTime::now())?;
    let at = humantime::format_rfc3339_millis(when).to_string();
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

/// TIME: RFC 3339 (`2026-12-05T10:15:00Z`, fractions allowed) or a
/// duration before `now` (`-15m`, `-2h30m`, `-90s`).
pub fn parse_time(text: &str, now: SystemTime) -> Result<SystemTime> {
    let text = text.trim();
    if let Some(ago) = text.strip_prefix('-') {
        let d = humantime::parse_duration(ago)
            .with_context(|| format!("{text:?}: a relative time is like -15m, -2h or -90s"))?;
        return now
            .checked_sub(d)
            .with_context(|| format!("{text:?} is before the Unix epoch"));
    }
    humantime::parse_rfc3339_weak(text).with_context(|| {
        format!("{text:?}: TIME is RFC 3339 (2026-12-05T10:15:00Z) or relative (-15m)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_are_absolute_or_before_now() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            parse_time("-15m", now).unwrap(),
            now - Duration::from_secs(900)
        );
        assert_eq!(
            parse_time("-2h30m", now).unwrap(),
            now - Duration::from_secs(9000)
        );
        assert_eq!(
            parse_time("2026-12-05T10:15:00.123Z", now).unwrap(),
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_465_700_123)
        );
        assert!(parse_time("yesterday", now).is_err());
        assert!(parse_time("-", now).is_err());
        assert!(parse_time("-15 parsecs", now).is_err());
    }
}
