//! Bandwidth schedule windows: `"Mon-Fri 08:00-18:00 50Mbit"`.
//!
//! Grammar: `DAYS START-END RATE`, separated by white space.
//!
//! * `DAYS` is a comma-separated list of days (`Mon`, `Tue`, … `Sun`, or full
//!   names, case-insensitive) and day ranges (`Mon-Fri`; a range may wrap:
//!   `Fri-Mon` is Fri, Sat, Sun, Mon), or `Daily` for every day.
//! * `START-END` are `HH:MM` times from `00:00` to `24:00` (`24:00` only as
//!   the end). The window is half-open: it covers `START` up to, not
//!   including, `END`. When `END` is before `START` the window wraps past
//!   midnight: `Mon 22:00-06:00` covers Monday 22:00 to Tuesday 06:00. The
//!   listed days are the days on which the window *starts*.
//! * `RATE` is a rate as taken by [`parse_rate`](crate::parse_rate); `0bit`
//!   pauses replication during the window.

use std::fmt;
use std::str::FromStr;

use crate::units::{parse_rate, Rate, UnitError, UnitKind};

const DAY_NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const FULL_DAY_NAMES: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];
const MINUTES_PER_DAY: u16 = 24 * 60;
const EXPECTED: &str = "expected \"DAYS HH:MM-HH:MM RATE\", e.g. \"Mon-Fri 08:00-18:00 50Mbit\"";

/// One window of a peer's bandwidth schedule, in the site's local time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScheduleWindow {
    /// The days on which the window starts, Monday first (`days[0]` = Monday).
    pub days: [bool; 7],
    /// Start, in minutes after midnight (0..1440).
    pub start_min: u16,
    /// End, in minutes after midnight (1..=1440). When `end_min <= start_min`
    /// the window wraps past midnight into the next day.
    pub end_min: u16,
    /// The rate limit in force during the window.
    pub rate: Rate,
}

impl ScheduleWindow {
    /// Whether the window wraps past midnight (e.g. `22:00-06:00`).
    pub fn wraps_midnight(&self) -> bool {
        self.end_min <= self.start_min
    }

    /// The rate in force at `minute_of_day` (0..1440) of `weekday`
    /// (0 = Monday … 6 = Sunday), or `None` when the window does not cover
    /// that moment (or the arguments are out of range).
    ///
    /// A window covers `[start, end)` on each listed day. A wrapping window
    /// listed for a day covers that day from `start` to midnight and the
    /// *following* day from midnight to `end`: `Mon 22:00-06:00` covers
    /// Monday 22:00–24:00 and Tuesday 00:00–06:00 (and `Sun 22:00-06:00`
    /// reaches into Monday).
    pub fn rate_at(&self, weekday: u8, minute_of_day: u16) -> Option<Rate> {
        if weekday >= 7 || minute_of_day >= MINUTES_PER_DAY {
            return None;
        }
        let day = usize::from(weekday);
        let prev = (day + 6) % 7;
        let m = minute_of_day;
        let covered = if self.wraps_midnight() {
            (self.days[day] && m >= self.start_min) || (self.days[prev] && m < self.end_min)
        } else {
            self.days[day] && m >= self.start_min && m < self.end_min
        };
        covered.then_some(self.rate)
    }
}

/// Now, as schedule windows see it: (weekday, minute of the day) in the
/// site's local time, Monday = 0. `(0, 0)` (Monday midnight) when the local
/// time cannot be found.
pub fn local_weekday_minute() -> (u8, u16) {
    crate::sys::local_day_hour_minute()
        .and_then(|(wday, hour, min)| {
            // C counts weekdays from Sunday.
            let weekday = u8::try_from((wday + 6) % 7).ok()?;
            let minute = u16::try_from(hour * 60 + min).ok()?;
            Some((weekday, minute))
        })
        .unwrap_or((0, 0))
}

fn err(input: &str, reason: impl Into<String>) -> UnitError {
    UnitError::new(UnitKind::Schedule, input, reason)
}

fn parse_day(s: &str) -> Option<usize> {
    let lower = s.to_ascii_lowercase();
    DAY_NAMES
        .iter()
        .position(|d| d.eq_ignore_ascii_case(&lower))
        .or_else(|| FULL_DAY_NAMES.iter().position(|d| *d == lower))
}

fn parse_days(input: &str, s: &str) -> Result<[bool; 7], UnitError> {
    let mut days = [false; 7];
    if s.eq_ignore_ascii_case("daily") {
        return Ok([true; 7]);
    }
    for part in s.split(',') {
        let bad = || {
            err(
                input,
                format!("unknown day {part:?}: use Mon, Tue, Wed, Thu, Fri, Sat, Sun, ranges like Mon-Fri, or Daily"),
            )
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let a = parse_day(a).ok_or_else(bad)?;
                let b = parse_day(b).ok_or_else(bad)?;
                let mut d = a;
                loop {
                    days[d] = true;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days[parse_day(part).ok_or_else(bad)?] = true,
        }
    }
    Ok(days)
}

/// Parses `HH:MM` (hour 0-24, minutes 00-59, 24:00 only when `allow_24`).
fn parse_time(s: &str, allow_24: bool) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return None;
    }
    if !h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let h: u16 = h.parse().ok()?;
    let m: u16 = m.parse().ok()?;
    if m >= 60 || h > 24 || (h == 24 && (m != 0 || !allow_24)) {
        return None;
    }
    Some(h * 60 + m)
}

impl FromStr for ScheduleWindow {
    type Err = UnitError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let mut tokens = input.split_whitespace();
        let (Some(days), Some(times)) = (tokens.next(), tokens.next()) else {
            return Err(err(input, EXPECTED));
        };
        let rate_text: Vec<&str> = tokens.collect();
        if rate_text.is_empty() {
            return Err(err(input, format!("missing rate; {EXPECTED}")));
        }
        let days = parse_days(input, days)?;
        let Some((start, end)) = times.split_once('-') else {
            return Err(err(
                input,
                format!("bad time range {times:?}: expected HH:MM-HH:MM"),
            ));
        };
        let start_min = parse_time(start, false).ok_or_else(|| {
            err(
                input,
                format!("bad start time {start:?}: expected HH:MM from 00:00 to 23:59"),
            )
        })?;
        let end_min = parse_time(end, true).ok_or_else(|| {
            err(
                input,
                format!("bad end time {end:?}: expected HH:MM from 00:00 to 24:00"),
            )
        })?;
        if start_min == end_min {
            return Err(err(
                input,
                "start and end are the same time; use 00:00-24:00 for a whole day",
            ));
        }
        let rate = parse_rate(&rate_text.join(" "))
            .map_err(|e| err(input, format!("bad rate {:?}: {}", e.input, e.reason)))?;
        Ok(ScheduleWindow {
            days,
            start_min,
            end_min,
            rate,
        })
    }
}

impl fmt::Display for ScheduleWindow {
    /// Prints the canonical spelling, e.g. `Mon-Fri 08:00-18:00 50Mbit`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.days == [true; 7] {
            f.write_str("Daily")?;
        } else {
            // Runs of consecutive days (no wrap), joined by commas.
            let mut first = true;
            let mut d = 0;
            while d < 7 {
                if !self.days[d] {
                    d += 1;
                    continue;
                }
                let start = d;
                while d + 1 < 7 && self.days[d + 1] {
                    d += 1;
                }
                if !first {
                    f.write_str(",")?;
                }
                first = false;
                if start == d {
                    f.write_str(DAY_NAMES[start])?;
                } else {
                    write!(f, "{}-{}", DAY_NAMES[start], DAY_NAMES[d])?;
                }
                d += 1;
            }
        }
        write!(
            f,
            " {:02}:{:02}-{:02}:{:02} {}",
            self.start_min / 60,
            self.start_min % 60,
            self.end_min / 60,
            self.end_min % 60,
            self.rate
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The local time agrees with `date` (same TZ, same zone database);
    /// read twice around it in case a minute turns meanwhile.
    #[test]
    fn local_weekday_minute_agrees_with_date() {
        let before = local_weekday_minute();
        let out = std::process::Command::new("date")
            .arg("+%u %H %M")
            .output()
            .unwrap();
        let after = local_weekday_minute();
        let text = String::from_utf8(out.stdout).unwrap();
        let f: Vec<u16> = text
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        // `date +%u`: Monday = 1 … Sunday = 7.
        let date = (u8::try_from(f[0] - 1).unwrap(), f[1] * 60 + f[2]);
        assert!(
            date == before || date == after,
            "{date:?} {before:?} {after:?}"
        );
        assert!(before.0 < 7 && before.1 < MINUTES_PER_DAY);
    }

    fn w(s: &str) -> ScheduleWindow {
        match s.parse() {
            Ok(w) => w,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    const MBIT: u64 = 1_000_000;

    #[test]
    fn parses_examples() {
        let a = w("Mon-Fri 08:00-18:00 50Mbit");
        assert_eq!(a.days, [true, true, true, true, true, false, false]);
        assert_eq!((a.start_min, a.end_min), (480, 1080));
        assert_eq!(a.rate, Rate(50 * MBIT));
        assert!(!a.wraps_midnight());

        let b = w("Sat 00:00-24:00 1Gbit");
        assert_eq!(b.days, [false, false, false, false, false, true, false]);
        assert_eq!((b.start_min, b.end_min), (0, 1440));
        assert_eq!(b.rate, Rate(1000 * MBIT));

        let c = w("Mon,Wed 22:00-06:00 10MB");
        assert_eq!(c.days, [true, false, true, false, false, false, false]);
        assert!(c.wraps_midnight());
        assert_eq!(c.rate, Rate(80 * MBIT));

        let d = w("fri-mon 8:30-09:00 0bit");
        assert_eq!(d.days, [true, false, false, false, true, true, true]);
        assert_eq!(d.start_min, 510);
        assert_eq!(w("Daily 01:00-02:00 1Mbit").days, [true; 7]);
        assert!(w("Sunday 01:00-02:00 1 Mbit").days[6]);
    }

    #[test]
    fn display_is_canonical() {
        assert_eq!(
            w("mon-fri 8:00-18:00 50Mbit").to_string(),
            "Mon-Fri 08:00-18:00 50Mbit"
        );
        assert_eq!(
            w("Fri-Mon 22:00-06:00 10MB").to_string(),
            "Mon,Fri-Sun 22:00-06:00 80Mbit"
        );
        assert_eq!(
            w("Sat 00:00-24:00 1Gbit").to_string(),
            "Sat 00:00-24:00 1Gbit"
        );
    }

    #[test]
    fn rejects_bad_windows() {
        for s in [
            "",
            "Mon-Fri",
            "Mon-Fri 08:00-18:00",
            "Mon-Fry 08:00-18:00 1Mbit",
            "Mon 8-18 1Mbit",
            "Mon 08:00 1Mbit",
            "Mon 24:00-01:00 1Mbit",
            "Mon 08:60-09:00 1Mbit",
            "Mon 08:00-24:01 1Mbit",
            "Mon 08:00-08:00 1Mbit",
            "Mon 00:00-00:00 1Mbit",
            "Mon 08:00-18:00 50",
            "Mon 08:00-18:00 50XB",
            "Mon,,Tue 08:00-18:00 1Mbit",
            "Mon 08:000-18:00 1Mbit",
            "Mon +8:00-18:00 1Mbit",
        ] {
            assert!(s.parse::<ScheduleWindow>().is_err(), "{s:?}");
        }
        let e = "Mon 08:00-18:00 50".parse::<ScheduleWindow>().unwrap_err();
        assert!(e
            .to_string()
            .starts_with("invalid schedule \"Mon 08:00-18:00 50\": bad rate"));
    }

    #[test]
    fn plain_window_semantics() {
        let a = w("Mon-Fri 08:00-18:00 50Mbit");
        let r = Some(Rate(50 * MBIT));
        assert_eq!(a.rate_at(0, 8 * 60), r); // start is inclusive
        assert_eq!(a.rate_at(0, 18 * 60 - 1), r);
        assert_eq!(a.rate_at(0, 18 * 60), None); // end is exclusive
        assert_eq!(a.rate_at(0, 7 * 60 + 59), None);
        assert_eq!(a.rate_at(4, 12 * 60), r); // Friday
        assert_eq!(a.rate_at(5, 12 * 60), None); // Saturday
        assert_eq!(a.rate_at(7, 12 * 60), None); // out of range
        assert_eq!(a.rate_at(0, 1440), None);

        let whole = w("Sat 00:00-24:00 1Gbit");
        assert_eq!(whole.rate_at(5, 0), Some(Rate(1000 * MBIT)));
        assert_eq!(whole.rate_at(5, 1439), Some(Rate(1000 * MBIT)));
        assert_eq!(whole.rate_at(6, 0), None);
        assert_eq!(whole.rate_at(4, 1439), None);
    }

    #[test]
    fn midnight_wrap_semantics() {
        let c = w("Mon,Wed 22:00-06:00 10MB");
        let r = Some(Rate(80 * MBIT));
        assert_eq!(c.rate_at(0, 21 * 60 + 59), None); // Mon 21:59
        assert_eq!(c.rate_at(0, 22 * 60), r); // Mon 22:00
        assert_eq!(c.rate_at(0, 1439), r); // Mon 23:59
        assert_eq!(c.rate_at(1, 0), r); // Tue 00:00
        assert_eq!(c.rate_at(1, 5 * 60 + 59), r); // Tue 05:59
        assert_eq!(c.rate_at(1, 6 * 60), None); // Tue 06:00
        assert_eq!(c.rate_at(0, 3 * 60), None); // Mon 03:00: Sun not listed
        assert_eq!(c.rate_at(1, 22 * 60), None); // Tue 22:00: Tue not listed
        assert_eq!(c.rate_at(3, 60), r); // Thu 01:00 (from Wed)
        assert_eq!(c.rate_at(2, 60), None); // Wed 01:00 (Tue not listed)

        let sun = w("Sun 23:00-01:00 1Mbit");
        assert_eq!(sun.rate_at(0, 30), Some(Rate(MBIT))); // reaches into Monday
        assert_eq!(sun.rate_at(6, 30), None);
    }

    proptest! {
        #[test]
        fn display_roundtrip(days in any::<[bool; 7]>(), start in 0u16..1440, end in 1u16..=1440, rate in any::<u64>()) {
            prop_assume!(days.iter().any(|d| *d) && start != end);
            let win = ScheduleWindow { days, start_min: start, end_min: end, rate: Rate(rate) };
            prop_assert_eq!(win.to_string().parse::<ScheduleWindow>(), Ok(win));
        }

        #[test]
        fn never_panics(s in ".{0,40}", day in any::<u8>(), minute in any::<u16>()) {
            if let Ok(win) = s.parse::<ScheduleWindow>() {
                let _ = win.rate_at(day, minute);
            }
        }

        #[test]
        fn coverage_matches_minutes(days in any::<[bool; 7]>(), start in 0u16..1440, end in 1u16..=1440) {
            prop_assume!(start != end);
            let win = ScheduleWindow { days, start_min: start, end_min: end, rate: Rate(1) };
            let len = if end > start { end - start } else { 1440 - start + end };
            let covered: usize = (0..7u8)
                .map(|d| (0..1440u16).filter(|m| win.rate_at(d, *m).is_some()).count())
                .sum();
            let listed = days.iter().filter(|d| **d).count();
            prop_assert_eq!(covered, listed * usize::from(len));
        }
    }
}
