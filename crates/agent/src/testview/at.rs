//! Which recovery point a command names (`--at TIME|latest`): `latest`,
//! an RFC 3339 time (`2026-12-05T10:15:00Z`, `2026-12-05T11:15:00.250+01:00`)
//! or a time relative to now (`-15m`, `-2h`, `-30s`, `-1h30m`). The CLI
//! resolves relative times against its clock and sends an absolute one;
//! the API takes `latest` or RFC 3339 only. Pure: no clock is read here.

use tandem_replication::history::PointChoice;
use time::format_description::well_known::Rfc3339;

/// A `--at` that names no time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AtError {
    #[error("{0:?} is not a time: give \"latest\", an RFC 3339 time such as 2026-12-05T10:15:00Z, or a time back from now such as -15m, -2h, -30s")]
    NotATime(String),
    #[error("{0:?} is relative to now: the API takes \"latest\" or an RFC 3339 time")]
    Relative(String),
    #[error("{0:?} is before 1970")]
    BeforeEpoch(String),
    #[error("{text:?} goes back further than now ({now_ms} ms since 1970)")]
    TooFarBack { text: String, now_ms: u64 },
}

/// `text` as the API takes it: `latest` or an absolute time.
pub fn parse_absolute(text: &str) -> Result<PointChoice, AtError> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("latest") {
        return Ok(PointChoice::Latest);
    }
    if text.starts_with('-') {
        return Err(AtError::Relative(text.to_owned()));
    }
    let at = time::OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|_| AtError::NotATime(text.to_owned()))?;
    let ms = at.unix_timestamp_nanos().div_euclid(1_000_000);
    u64::try_from(ms)
        .map(PointChoice::AtOrBefore)
        .map_err(|_| AtError::BeforeEpoch(text.to_owned()))
}

/// `text` as the CLI takes it, relative times resolved against `now_ms`
/// (ms since the Unix epoch).
pub fn parse(text: &str, now_ms: u64) -> Result<PointChoice, AtError> {
    let trimmed = text.trim();
    let Some(back) = trimmed.strip_prefix('-') else {
        return parse_absolute(trimmed);
    };
    let back = humantime::parse_duration(back.trim())
        .map_err(|_| AtError::NotATime(trimmed.to_owned()))?;
    let back = u64::try_from(back.as_millis()).unwrap_or(u64::MAX);
    now_ms
        .checked_sub(back)
        .map(PointChoice::AtOrBefore)
        .ok_or_else(|| AtError::TooFarBack {
            text: trimmed.to_owned(),
            now_ms,
        })
}

/// What the API is sent for `choice`: `latest` or the time, RFC 3339 in
/// UTC with milliseconds.
pub fn to_api(choice: PointChoice) -> String {
    match choice {
        PointChoice::Latest => "latest".to_owned(),
        PointChoice::AtOrBefore(ms) => super::rfc3339_ms(ms),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: u64 = 1_796_465_700_123;

    #[test]
    fn the_forms_the_docs_show() {
        assert_eq!(parse("latest", NOW), Ok(PointChoice::Latest));
        assert_eq!(
            parse("2026-12-05T10:15:00Z", NOW),
            Ok(PointChoice::AtOrBefore(1_796_465_700_000))
        );
        assert_eq!(
            parse("2026-12-05T11:15:00.250+01:00", NOW),
            Ok(PointChoice::AtOrBefore(1_796_465_700_250))
        );
        assert_eq!(
            parse("-15m", NOW),
            Ok(PointChoice::AtOrBefore(NOW - 15 * 60_000))
        );
        assert_eq!(
            parse("-2h", NOW),
            Ok(PointChoice::AtOrBefore(NOW - 2 * 3_600_000))
        );
        assert_eq!(
            parse("-30s", NOW),
            Ok(PointChoice::AtOrBefore(NOW - 30_000))
        );
        assert_eq!(
            parse("-1h30m", NOW),
            Ok(PointChoice::AtOrBefore(NOW - 90 * 60_000))
        );
        assert!(matches!(parse("-15", NOW), Err(AtError::NotATime(_))));
        assert!(matches!(parse("yesterday", NOW), Err(AtError::NotATime(_))));
        assert!(matches!(
            parse("2026-12-05 10:15", NOW),
            Err(AtError::NotATime(_))
        ));
        assert!(matches!(
            parse("-100000000h", NOW),
            Err(AtError::TooFarBack { .. })
        ));
        assert!(matches!(parse_absolute("-15m"), Err(AtError::Relative(_))));
        assert!(matches!(
            parse_absolute("1969-12-31T23:59:59Z"),
            Err(AtError::BeforeEpoch(_))
        ));
    }

    proptest! {
        /// A point's time as status lists it selects exactly that time.
        #[test]
        fn listed_times_read_back_exactly(ms in 0u64..253_402_300_799_999) {
            let listed = super::super::rfc3339_ms(ms);
            prop_assert_eq!(parse(&listed, NOW), Ok(PointChoice::AtOrBefore(ms)));
            prop_assert_eq!(parse_absolute(&to_api(PointChoice::AtOrBefore(ms))), Ok(PointChoice::AtOrBefore(ms)));
        }

        /// `-N<unit>` is exactly N units before now.
        #[test]
        fn relative_times_count_back_from_now(n in 0u64..100_000, unit in 0usize..4) {
            let (suffix, ms) = [("s", 1_000), ("m", 60_000), ("h", 3_600_000), ("d", 86_400_000)][unit];
            let text = format!("-{n}{suffix}");
            let want = NOW.checked_sub(n * ms);
            match want {
                Some(at) => prop_assert_eq!(parse(&text, NOW), Ok(PointChoice::AtOrBefore(at))),
                None => prop_assert!(
                    matches!(parse(&text, NOW), Err(AtError::TooFarBack { .. })),
                    "unexpected result for {}",
                    text
                ),
            }
        }

        /// Nothing typed makes the parser panic.
        #[test]
        fn any_text_is_a_time_or_an_error(text in ".{0,40}") {
            let _ = parse(&text, NOW);
            let _ = parse_absolute(&text);
        }
    }
}
