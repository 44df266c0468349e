//! The agent's side of a replica's recovery-point history
//! (docs/HISTORY.md): the retention a group's configuration asks for,
//! reload's changes to it, and the history as status, metrics and `tandem
//! points` show it (times as RFC 3339 with milliseconds, UTC). No I/O.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tandem_replication::history::{History, Point, Retention, Summary};

use crate::status::{HistoryStatus, PointEntry, PointsList, PointsWindow};

/// The history a group's replicas keep: `None` with `retention = "0s"`.
pub(crate) fn retention(group: &tandem_config::Group) -> Option<Retention> {
    group.keeps_history().then_some(Retention {
        keep: group.retention,
        max_bytes: group.history_max,
    })
}

/// A reload changed the group's `retention` or `history_max`: the running
/// history takes the new values (a shorter window or a smaller cap drops
/// the oldest points at its next commit).
pub(crate) fn set_retention(history: &History, retention: Retention) {
    history.set_retention(retention);
}

/// `ms` since the Unix epoch as RFC 3339 with milliseconds, UTC
/// (`2026-12-05T10:15:00.123Z`).
pub fn utc_ms(ms: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(at).to_string()
}

/// A point as `tandem points --json` lists it.
pub(crate) fn entry(p: &Point) -> PointEntry {
    PointEntry {
        time: utc_ms(p.time_ms),
        seq: p.seq,
    }
}

/// The window of SPEC §4.4 `points`.
pub(crate) fn window(s: &Summary) -> PointsWindow {
    PointsWindow {
        oldest: s.oldest.map(|p| utc_ms(p.time_ms)),
        newest: s.newest.map(|p| utc_ms(p.time_ms)),
        count: s.count as u64,
    }
}

/// The history's bytes, for status.
pub(crate) fn bytes(s: &Summary) -> HistoryStatus {
    HistoryStatus {
        bytes: s.bytes,
        dropped_bytes: s.dropped_bytes,
        held_over_cap: s.held_over_cap,
        oldest_ms: s.oldest.map(|p| p.time_ms),
    }
}

/// The list `tandem points` prints, oldest first.
pub(crate) fn list(group: &str, site: &str, points: &[Point]) -> PointsList {
    let mut points: Vec<&Point> = points.iter().collect();
    points.sort_by_key(|p| (p.pos, p.seq));
    PointsList {
        group: group.to_owned(),
        site: site.to_owned(),
        points: points.into_iter().map(entry).collect(),
    }
}

/// Seconds from `oldest_ms` to `now` (0 when the point is in the future
/// of this clock: the primary's clock may be ahead).
pub(crate) fn age_seconds(oldest_ms: u64, now: SystemTime) -> f64 {
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    now_ms.saturating_sub(oldest_ms) as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(seq: u64, time_ms: u64, pos: u64) -> Point {
        Point {
            epoch: 1,
            seq,
            time_ms,
            pos,
        }
    }

    #[test]
    fn times_are_rfc3339_with_milliseconds_in_utc() {
        assert_eq!(utc_ms(0), "1970-01-01T00:00:00.000Z");
        // 2026-12-05T10:15:00.123Z
        assert_eq!(utc_ms(1_796_465_700_123), "2026-12-05T10:15:00.123Z");
        assert_eq!(
            humantime::parse_rfc3339(&utc_ms(1_796_465_700_123))
                .unwrap()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis(),
            1_796_465_700_123
        );
    }

    #[test]
    fn retention_follows_the_configuration() {
        let text = "[site]\nname = \"a\"\ndata_dir = \"/tmp/x\"\nlisten = \"127.0.0.1:1\"\n\
                    api = \"127.0.0.1:2\"\n[tls]\nmode = \"off\"\n\
                    [[peer]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n\
                    [[peer]]\nname = \"b\"\naddress = \"127.0.0.1:3\"\n\
                    [[group]]\nname = \"g\"\nprimary = \"a\"\nreplicas = [ { site = \"b\" } ]\n\
                    volumes = [ { name = \"v\", size = \"1MiB\" } ]\n";
        let parse = |extra: &str| {
            tandem_config::parse(&format!("{text}{extra}"), std::path::Path::new("/t.toml"))
                .unwrap()
                .groups[0]
                .clone()
        };
        assert_eq!(
            retention(&parse("")),
            Some(Retention {
                keep: Duration::from_secs(86_400),
                max_bytes: 10 << 30
            })
        );
        assert_eq!(
            retention(&parse("retention = \"2h\"\nhistory_max = \"1GiB\"\n")),
            Some(Retention {
                keep: Duration::from_secs(7200),
                max_bytes: 1 << 30
            })
        );
        assert_eq!(retention(&parse("retention = \"0s\"\n")), None);
    }

    #[test]
    fn the_list_is_oldest_first_and_the_window_names_its_ends() {
        let points = [
            point(30, 3_000, 300),
            point(10, 1_000, 100),
            point(20, 2_000, 200),
        ];
        let l = list("web01", "chicago", &points);
        let seqs: Vec<u64> = l.points.iter().map(|p| p.seq).collect();
        assert_eq!(seqs, [10, 20, 30]);
        assert_eq!(l.points[0].time, "1970-01-01T00:00:01.000Z");
        let json = serde_json::to_value(&l).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"group": "web01", "site": "chicago", "points": [
                {"time": "1970-01-01T00:00:01.000Z", "seq": 10},
                {"time": "1970-01-01T00:00:02.000Z", "seq": 20},
                {"time": "1970-01-01T00:00:03.000Z", "seq": 30},
            ]})
        );
        let s = Summary {
            count: 3,
            oldest: Some(points[1]),
            newest: Some(points[0]),
            bytes: 4096,
            dropped_bytes: 0,
            held_over_cap: false,
        };
        let w = serde_json::to_value(window(&s)).unwrap();
        assert_eq!(
            w,
            serde_json::json!({"oldest": "1970-01-01T00:00:01.000Z",
                               "newest": "1970-01-01T00:00:03.000Z", "count": 3})
        );
        let empty = serde_json::to_value(window(&Summary::default())).unwrap();
        assert_eq!(empty, serde_json::json!({"count": 0}));
        assert_eq!(bytes(&s).oldest_ms, Some(1_000));
        assert_eq!(age_seconds(1_000, UNIX_EPOCH + Duration::from_secs(3)), 2.0);
        assert_eq!(age_seconds(9_000, UNIX_EPOCH), 0.0);
    }
}
