//! `tandem points GROUP [--site SITE] [--json]` (SPEC §4.3): the recovery
//! points a replica keeps of a group, oldest first: the window as text
//! (oldest and newest point, their times, count, bytes held), or the
//! pinned JSON list. Without `--site`, this site's (the agent says which
//! sites keep them if this one does not); with it, another site's, asked
//! through the local agent (docs/PEER.md, "Forwarded API requests").

use std::path::Path;

use anyhow::{bail, Context, Result};
use tandem_agent::status::PointsAnswer;

/// The API path of `group`'s points, at `site` if given.
fn path(group: &str, site: Option<&str>) -> Result<String> {
    for (what, name) in [("group", Some(group)), ("site", site)] {
        let Some(name) = name else { continue };
        let ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            bail!("{name:?} is not a {what} name (A-Z, a-z, 0-9, '.', '_' and '-')");
        }
    }
    let mut path = format!("/api/v1/groups/{group}/points");
    if let Some(site) = site {
        path.push_str("?site=");
        path.push_str(site);
    }
    Ok(path)
}

pub fn run(config_path: &Path, group: &str, site: Option<&str>, json: bool) -> Result<()> {
    let config = crate::load_config(config_path)?;
    let body = super::status::api_get(&config, &path(group, site)?)?;
    let answer: PointsAnswer =
        serde_json::from_str(&body).context("the agent's answer is not valid JSON")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer.list)?);
        return Ok(());
    }
    print!("{}", text(&answer));
    Ok(())
}

/// The window in words.
fn text(a: &PointsAnswer) -> String {
    let (l, h) = (&a.list, &a.history);
    let mut out = format!(
        "group {} at {}: {} recovery point{}, {} of history held\n",
        l.group,
        l.site,
        l.points.len(),
        if l.points.len() == 1 { "" } else { "s" },
        tandem_config::format_size_approx(h.bytes)
    );
    match (l.points.first(), l.points.last()) {
        (Some(oldest), Some(newest)) => {
            out.push_str(&format!("  oldest  {}  seq {}\n", oldest.time, oldest.seq));
            out.push_str(&format!("  newest  {}  seq {}\n", newest.time, newest.seq));
        }
        _ => out.push_str("  no recovery point yet (points come with the primary's flushes, at least one per second of writes)\n"),
    }
    if h.dropped_bytes > 0 {
        out.push_str(&format!(
            "  {} of the oldest history dropped since the agent started (history_max)\n",
            tandem_config::format_size_approx(h.dropped_bytes)
        ));
    }
    if h.held_over_cap {
        out.push_str("  running test views hold the history past history_max\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_agent::status::{HistoryStatus, PointEntry, PointsList};

    #[test]
    fn paths_carry_the_site_and_refuse_odd_names() {
        assert_eq!(path("web01", None).unwrap(), "/api/v1/groups/web01/points");
        assert_eq!(
            path("web01", Some("chicago")).unwrap(),
            "/api/v1/groups/web01/points?site=chicago"
        );
        assert!(path("web01/../x", None).is_err());
        assert!(path("web01", Some("a&b")).is_err());
    }

    #[test]
    fn the_text_names_both_ends_and_the_bytes() {
        let a = PointsAnswer {
            list: PointsList {
                group: "web01".into(),
                site: "chicago".into(),
                points: vec![
                    PointEntry {
                        time: "2026-12-05T10:15:00.123Z".into(),
                        seq: 7,
                    },
                    PointEntry {
                        time: "2026-12-05T10:16:00.000Z".into(),
                        seq: 90,
                    },
                ],
            },
            history: HistoryStatus {
                bytes: 3 << 20,
                dropped_bytes: 0,
                held_over_cap: false,
                oldest_ms: None,
            },
        };
        let t = text(&a);
        assert!(
            t.starts_with("group web01 at chicago: 2 recovery points, "),
            "{t}"
        );
        assert!(t.contains("oldest  2026-12-05T10:15:00.123Z  seq 7"), "{t}");
        assert!(
            t.contains("newest  2026-12-05T10:16:00.000Z  seq 90"),
            "{t}"
        );
        assert!(t.contains("3"), "{t}");
    }
}
