//! Sizes, rates and durations as written in the configuration file.
//!
//! * Sizes are binary (1024-based): `512`, `512B`, `4K`/`4KiB`, `20G`/`20GiB`,
//!   `1.5TiB`. A fraction is allowed when the result is a whole number of bytes.
//! * Rates are decimal (1000-based) and stored in bits per second: `200Mbit`,
//!   `1Gbit`, `500Kbit`, or bytes per second `10MB`, `1GB` (× 8). An optional
//!   `/s` may follow (`10MB/s`), and `Mbps` is read as `Mbit`.
//! * Durations take `ms`, `s`, `m`, `h` (and `us`, `ns`): `1500ms`, `3s`,
//!   `1.5s`, `2m`, `1h`.
//!
//! The `format_*` functions print the shortest exact spelling, so that
//! `parse_size(&format_size(n)) == Ok(n)` for every `n` (and likewise for
//! rates and durations).

use std::fmt;
use std::time::Duration;

/// What kind of value failed to parse; used in [`UnitError`] messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnitKind {
    /// A size in bytes.
    Size,
    /// A rate in bits or bytes per second.
    Rate,
    /// A duration.
    Duration,
    /// A bandwidth schedule window.
    Schedule,
}

impl fmt::Display for UnitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UnitKind::Size => "size",
            UnitKind::Rate => "rate",
            UnitKind::Duration => "duration",
            UnitKind::Schedule => "schedule",
        })
    }
}

/// A value that could not be parsed, e.g.
/// `invalid size "20XB": expected a number with KiB/MiB/GiB/TiB (or K/M/G/T)`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {input:?}: {reason}")]
pub struct UnitError {
    /// What was being parsed.
    pub kind: UnitKind,
    /// The offending text (shortened if very long).
    pub input: String,
    /// Why it was rejected.
    pub reason: String,
}

impl UnitError {
    pub(crate) fn new(kind: UnitKind, input: &str, reason: impl Into<String>) -> Self {
        const MAX: usize = 64;
        let input = if input.chars().count() > MAX {
            let mut s: String = input.chars().take(MAX).collect();
            s.push('…');
            s
        } else {
            input.to_string()
        };
        UnitError {
            kind,
            input,
            reason: reason.into(),
        }
    }
}

/// A transfer rate, in bits per second.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rate(pub u64);

impl Rate {
    /// A rate of `bits` bits per second.
    pub const fn from_bits_per_sec(bits: u64) -> Rate {
        Rate(bits)
    }

    /// Bits per second.
    pub const fn bits_per_sec(self) -> u64 {
        self.0
    }

    /// Bytes per second (rounded down).
    pub const fn bytes_per_sec(self) -> u64 {
        self.0 / 8
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_rate(*self))
    }
}

impl std::str::FromStr for Rate {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_rate(s)
    }
}

pub(crate) const KIB: u64 = 1 << 10;
pub(crate) const MIB: u64 = 1 << 20;
pub(crate) const GIB: u64 = 1 << 30;
pub(crate) const TIB: u64 = 1 << 40;

const SIZE_EXPECTED: &str = "expected a number with KiB/MiB/GiB/TiB (or K/M/G/T)";
const RATE_EXPECTED: &str =
    "expected a number with Kbit/Mbit/Gbit (bits per second) or KB/MB/GB (bytes per second)";
const DURATION_EXPECTED: &str = "expected a number with ms, s, m or h (e.g. \"3s\", \"1500ms\")";

/// A non-negative decimal number as written: `mantissa / 10^scale`.
struct Decimal {
    mantissa: u128,
    scale: u32,
}

enum NumError {
    Missing,
    TooLarge,
    TooPrecise,
}

/// Splits `s` (already trimmed) into a decimal number and the unit text that
/// follows it (trimmed).
fn split_number(s: &str) -> Result<(Decimal, &str), NumError> {
    let bytes = s.as_bytes();
    let int_len = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if int_len == 0 {
        return Err(NumError::Missing);
    }
    let mut end = int_len;
    let mut frac_len = 0;
    if bytes.get(int_len) == Some(&b'.') {
        frac_len = bytes[int_len + 1..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if frac_len == 0 {
            return Err(NumError::Missing);
        }
        end = int_len + 1 + frac_len;
    }
    if frac_len > 30 {
        return Err(NumError::TooPrecise);
    }
    // Up to 30 significant digits keeps `mantissa * multiplier` within u128
    // for every multiplier used here (at most 2^42 ≈ 4.4e12).
    let digits = bytes[..end].iter().filter(|b| b.is_ascii_digit());
    let mut mantissa: u128 = 0;
    let mut significant = 0usize;
    for d in digits {
        if mantissa == 0 && *d == b'0' {
            continue;
        }
        significant += 1;
        if significant > 30 {
            return Err(NumError::TooLarge);
        }
        mantissa = mantissa * 10 + u128::from(d - b'0');
    }
    let rest = s[end..].trim_start();
    // frac_len <= 30 here.
    let scale = u32::try_from(frac_len).map_err(|_| NumError::TooPrecise)?;
    Ok((Decimal { mantissa, scale }, rest))
}

/// `number × multiplier`, which must be a whole number fitting in `u128`.
fn scale_exact(d: &Decimal, multiplier: u128) -> Result<u128, NumError> {
    let product = d
        .mantissa
        .checked_mul(multiplier)
        .ok_or(NumError::TooLarge)?;
    let div = 10u128.pow(d.scale);
    if product % div != 0 {
        return Err(NumError::TooPrecise);
    }
    Ok(product / div)
}

fn parse_with_units(
    kind: UnitKind,
    input: &str,
    expected: &str,
    unit_of: impl Fn(&str) -> Option<u128>,
    fraction_msg: &str,
) -> Result<u128, UnitError> {
    let s = input.trim();
    let (num, unit) = match split_number(s) {
        Ok(x) => x,
        Err(NumError::Missing) => return Err(UnitError::new(kind, input, expected)),
        Err(NumError::TooLarge) => return Err(UnitError::new(kind, input, "too large")),
        Err(NumError::TooPrecise) => return Err(UnitError::new(kind, input, fraction_msg)),
    };
    let Some(mult) = unit_of(unit) else {
        return Err(UnitError::new(kind, input, expected));
    };
    scale_exact(&num, mult).map_err(|e| {
        let reason = match e {
            NumError::TooPrecise => fraction_msg,
            NumError::TooLarge => "too large",
            NumError::Missing => expected,
        };
        UnitError::new(kind, input, reason)
    })
}

fn size_unit(unit: &str) -> Option<u128> {
    let m = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => KIB,
        "m" | "mib" => MIB,
        "g" | "gib" => GIB,
        "t" | "tib" => TIB,
        _ => return None,
    };
    Some(u128::from(m))
}

/// Parses a size such as `"20GiB"`, `"512"`, `"512B"`, `"4K"` or `"1.5TiB"`
/// into bytes. Units are binary (1 KiB = 1024 bytes) and case-insensitive;
/// `KB`/`MB`/… are rejected because they denote decimal rates elsewhere.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let v = parse_with_units(
        UnitKind::Size,
        s,
        SIZE_EXPECTED,
        size_unit,
        "not a whole number of bytes",
    )?;
    u64::try_from(v).map_err(|_| UnitError::new(UnitKind::Size, s, "too large"))
}

fn rate_unit(unit: &str) -> Option<u128> {
    let unit = unit
        .strip_suffix("/s")
        .or_else(|| unit.strip_suffix("/S"))
        .unwrap_or(unit)
        .trim_end();
    // Bits: "bit", "Kbit", "Mbps", ... (case-insensitive).
    let lower = unit.to_ascii_lowercase();
    let bit_prefix = lower
        .strip_suffix("bit")
        .or_else(|| lower.strip_suffix("bps"));
    if let Some(prefix) = bit_prefix {
        return prefix_mult(prefix);
    }
    // Bytes: "B", "KB", "MB", ... (the B must be upper case: "Mb" is ambiguous).
    if let Some(prefix) = unit.strip_suffix('B') {
        return prefix_mult(&prefix.to_ascii_lowercase()).map(|m| m * 8);
    }
    None
}

fn prefix_mult(prefix: &str) -> Option<u128> {
    Some(match prefix {
        "" => 1,
        "k" => 1_000,
        "m" => 1_000_000,
        "g" => 1_000_000_000,
        "t" => 1_000_000_000_000,
        _ => return None,
    })
}

/// Parses a rate such as `"200Mbit"`, `"1Gbit"`, `"500Kbit"` (bits per
/// second) or `"10MB"` (bytes per second); decimal prefixes (1 Mbit =
/// 1,000,000 bits). Returns bits per second.
pub fn parse_rate(s: &str) -> Result<Rate, UnitError> {
    let v = parse_with_units(
        UnitKind::Rate,
        s,
        RATE_EXPECTED,
        rate_unit,
        "not a whole number of bits per second",
    )?;
    u64::try_from(v)
        .map(Rate)
        .map_err(|_| UnitError::new(UnitKind::Rate, s, "too large"))
}

const NANOS_PER_SEC: u128 = 1_000_000_000;

fn duration_unit(unit: &str) -> Option<u128> {
    Some(match unit {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" => NANOS_PER_SEC,
        "m" | "min" => 60 * NANOS_PER_SEC,
        "h" => 3600 * NANOS_PER_SEC,
        _ => return None,
    })
}

/// Parses a duration such as `"3s"`, `"1500ms"`, `"1.5s"`, `"2m"` or `"1h"`.
/// A unit is required.
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let nanos = parse_with_units(
        UnitKind::Duration,
        s,
        DURATION_EXPECTED,
        duration_unit,
        "more precise than a nanosecond",
    )?;
    let secs = u64::try_from(nanos / NANOS_PER_SEC)
        .map_err(|_| UnitError::new(UnitKind::Duration, s, "too large"))?;
    // The remainder is below 10^9 and fits in u32.
    let sub = (nanos % NANOS_PER_SEC) as u32;
    Ok(Duration::new(secs, sub))
}

/// Formats `value / unit` exactly with at most `max_decimals` decimals, or
/// `None` when that is not exact.
fn exact_decimal(value: u128, unit: u128, max_decimals: u32) -> Option<String> {
    let whole = value / unit;
    let rem = value % unit;
    if rem == 0 {
        return Some(whole.to_string());
    }
    let pow = 10u128.pow(max_decimals);
    let scaled = rem.checked_mul(pow)?;
    if scaled % unit != 0 {
        return None;
    }
    let frac = scaled / unit;
    let mut frac = format!("{frac:0width$}", width = max_decimals as usize);
    while frac.ends_with('0') {
        frac.pop();
    }
    Some(format!("{whole}.{frac}"))
}

fn format_exact(value: u128, units: &[(u128, &str)], max_decimals: u32, base: &str) -> String {
    for &(unit, name) in units {
        if value >= unit {
            if let Some(num) = exact_decimal(value, unit, max_decimals) {
                return format!("{num}{name}");
            }
        }
    }
    format!("{value}{base}")
}

const SIZE_UNITS: [(u128, &str); 4] = [
    (TIB as u128, "TiB"),
    (GIB as u128, "GiB"),
    (MIB as u128, "MiB"),
    (KIB as u128, "KiB"),
];

/// Formats a byte count exactly, with the largest binary unit that needs at
/// most two decimals: `20GiB`, `1.5GiB`, `512B`, `1000B`.
/// `parse_size(&format_size(n)) == Ok(n)` for every `n`.
pub fn format_size(bytes: u64) -> String {
    format_exact(u128::from(bytes), &SIZE_UNITS, 2, "B")
}

/// Formats a byte count for people, rounded to one decimal: `117.7MiB`,
/// `20GiB`, `512B`. Not exact; use [`format_size`] for values that are read back.
pub fn format_size_approx(bytes: u64) -> String {
    for &(unit, name) in &SIZE_UNITS {
        if u128::from(bytes) >= unit {
            // Precision loss is acceptable for display.
            let v = bytes as f64 / unit as f64;
            let s = format!("{v:.1}");
            let s = s.strip_suffix(".0").unwrap_or(&s);
            return format!("{s}{name}");
        }
    }
    format!("{bytes}B")
}

/// Formats a rate exactly in bits per second: `200Mbit`, `1.5Gbit`, `64bit`.
/// `parse_rate(&format_rate(r)) == Ok(r)` for every `r`.
pub fn format_rate(rate: Rate) -> String {
    const UNITS: [(u128, &str); 4] = [
        (1_000_000_000_000, "Tbit"),
        (1_000_000_000, "Gbit"),
        (1_000_000, "Mbit"),
        (1_000, "Kbit"),
    ];
    format_exact(u128::from(rate.0), &UNITS, 2, "bit")
}

/// Formats a duration exactly: `3s`, `1.5s`, `1500us`, `2m`, `1h`, `0s`.
/// `parse_duration(&format_duration(d)) == Ok(d)` for every `d`.
pub fn format_duration(d: Duration) -> String {
    const UNITS: [(u128, &str); 5] = [
        (3600 * NANOS_PER_SEC, "h"),
        (60 * NANOS_PER_SEC, "m"),
        (NANOS_PER_SEC, "s"),
        (1_000_000, "ms"),
        (1_000, "us"),
    ];
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    format_exact(nanos, &UNITS, 3, "ns")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("20GiB"), Ok(20 * GIB));
        assert_eq!(parse_size("20 gib"), Ok(20 * GIB));
        assert_eq!(parse_size(" 1M "), Ok(MIB));
        assert_eq!(parse_size("1.5GiB"), Ok(GIB + GIB / 2));
        assert_eq!(parse_size("2T"), Ok(2 * TIB));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn bad_sizes() {
        let e = parse_size("20XB").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid size \"20XB\": expected a number with KiB/MiB/GiB/TiB (or K/M/G/T)"
        );
        for s in [
            "", "GiB", "-1", "1.", ".5K", "1e3", "20KB", "20MB", "1,5G", "0x10", "1 2",
        ] {
            assert!(parse_size(s).is_err(), "{s:?}");
        }
        assert_eq!(
            parse_size("0.3K").unwrap_err().reason,
            "not a whole number of bytes"
        );
        assert_eq!(
            parse_size("18446744073709551616").unwrap_err().reason,
            "too large"
        );
        assert_eq!(parse_size("16777216TiB").unwrap_err().reason, "too large");
        assert_eq!(
            parse_size("99999999999999999999999999999999999999999")
                .unwrap_err()
                .reason,
            "too large"
        );
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("200Mbit"), Ok(Rate(200_000_000)));
        assert_eq!(parse_rate("1Gbit"), Ok(Rate(1_000_000_000)));
        assert_eq!(parse_rate("500Kbit"), Ok(Rate(500_000)));
        assert_eq!(parse_rate("500kbit"), Ok(Rate(500_000)));
        assert_eq!(parse_rate("10MB"), Ok(Rate(80_000_000)));
        assert_eq!(parse_rate("10MB/s"), Ok(Rate(80_000_000)));
        assert_eq!(parse_rate("1GB"), Ok(Rate(8_000_000_000)));
        assert_eq!(parse_rate("3KB"), Ok(Rate(24_000)));
        assert_eq!(parse_rate("100Mbps"), Ok(Rate(100_000_000)));
        assert_eq!(parse_rate("1.5Gbit"), Ok(Rate(1_500_000_000)));
        assert_eq!(parse_rate("0Mbit"), Ok(Rate(0)));
        assert_eq!(Rate(80).bytes_per_sec(), 10);
    }

    #[test]
    fn bad_rates() {
        for s in [
            "",
            "100",
            "10Mb",
            "10 MiB",
            "Mbit",
            "1.0000000001Kbit",
            "-1Mbit",
            "10XB",
        ] {
            assert!(parse_rate(s).is_err(), "{s:?}");
        }
        assert!(parse_rate("100")
            .unwrap_err()
            .to_string()
            .contains("Kbit/Mbit/Gbit"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for s in ["", "3", "s", "3 sec", "3S", "-1s", "1.5", "0.0000000001s"] {
            assert!(parse_duration(s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(20 * GIB), "20GiB");
        assert_eq!(format_size(GIB + GIB / 2), "1.5GiB");
        assert_eq!(format_size(512), "512B");
        assert_eq!(format_size(1000), "1000B");
        assert_eq!(format_size(0), "0B");
        assert_eq!(format_size(1536), "1.5KiB");
        assert_eq!(format_size_approx(123_456_789), "117.7MiB");
        assert_eq!(format_size_approx(20 * GIB), "20GiB");
        assert_eq!(format_size_approx(100), "100B");
        assert_eq!(format_rate(Rate(200_000_000)), "200Mbit");
        assert_eq!(format_rate(Rate(1_500_000_000)), "1.5Gbit");
        assert_eq!(format_rate(Rate(7)), "7bit");
        assert_eq!(format_duration(Duration::from_secs(3)), "3s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(format_duration(Duration::from_secs(90)), "1.5m");
        assert_eq!(format_duration(Duration::from_nanos(7)), "7ns");
    }

    fn size_unit_strategy() -> impl Strategy<Value = (&'static str, u64)> {
        prop_oneof![
            Just(("", 1)),
            Just(("B", 1)),
            Just(("K", KIB)),
            Just(("KiB", KIB)),
            Just(("M", MIB)),
            Just(("MiB", MIB)),
            Just(("G", GIB)),
            Just(("GiB", GIB)),
            Just(("T", TIB)),
            Just(("TiB", TIB)),
        ]
    }

    proptest! {
        #[test]
        fn size_roundtrip(n in any::<u64>()) {
            prop_assert_eq!(parse_size(&format_size(n)), Ok(n));
        }

        #[test]
        fn size_format_stable((unit, mult) in size_unit_strategy(), n in 0u64..1_000_000) {
            let s = format!("{n}{unit}");
            let v = parse_size(&s).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(v, n * mult);
            let f = format_size(v);
            prop_assert_eq!(parse_size(&f), Ok(v));
            prop_assert_eq!(format_size(parse_size(&f).unwrap_or(0)), f);
        }

        #[test]
        fn size_times_unit((unit, mult) in size_unit_strategy(), n in any::<u64>()) {
            let s = format!("{n}{unit}");
            match n.checked_mul(mult) {
                Some(v) => prop_assert_eq!(parse_size(&s), Ok(v)),
                None => prop_assert!(parse_size(&s).is_err()),
            }
        }

        #[test]
        fn rate_roundtrip(n in any::<u64>()) {
            prop_assert_eq!(parse_rate(&format_rate(Rate(n))), Ok(Rate(n)));
        }

        #[test]
        fn duration_roundtrip(secs in 0u64..(1u64 << 40), nanos in 0u32..1_000_000_000) {
            let d = Duration::new(secs, nanos);
            prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }

        #[test]
        fn parsers_never_panic(s in ".{0,40}") {
            let _ = parse_size(&s);
            let _ = parse_rate(&s);
            let _ = parse_duration(&s);
        }

        #[test]
        fn parsers_never_panic_unitish(s in "[0-9. ]{0,45}[KMGTBkmgtibsh/µu ]{0,6}") {
            let _ = parse_size(&s);
            let _ = parse_rate(&s);
            let _ = parse_duration(&s);
        }
    }
}
