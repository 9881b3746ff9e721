//! `Duration`: a `std::time::Duration` that reads and writes as human text (`"1m30s"`).
//!
//! Config files are read by people, so a bare number is rejected: `timeout = 30` is ambiguous
//! (seconds? milliseconds?) and that ambiguity has caused real outages. Only zero may omit the
//! unit, because zero means the same thing in every unit.

use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

const NANOS_PER_SEC: u128 = 1_000_000_000;
const NEEDS_UNIT: &str = "a duration needs a unit, e.g. \"30s\" or \"250ms\"";

/// A span of time that (de)serializes as text such as `"30s"`, `"250ms"` or `"1m30s"`.
///
/// Accepted units are `ns`, `us` (or `µs`), `ms`, `s`, `m` and `h`; components may be combined
/// (`"1h30m"`) and may have decimals (`"1.5s"`). It serializes in the shortest exact form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(std::time::Duration);

/// Why a string is not a valid [`Duration`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseDurationError {
    reason: String,
}

impl Duration {
    /// The empty duration.
    pub const ZERO: Duration = Duration(std::time::Duration::ZERO);

    /// A duration of whole seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self(std::time::Duration::from_secs(secs))
    }

    /// A duration of whole milliseconds.
    pub const fn from_millis(millis: u64) -> Self {
        Self(std::time::Duration::from_millis(millis))
    }

    /// The standard-library duration this wraps.
    pub const fn get(self) -> std::time::Duration {
        self.0
    }
}

impl From<std::time::Duration> for Duration {
    fn from(d: std::time::Duration) -> Self {
        Self(d)
    }
}

impl From<Duration> for std::time::Duration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

impl Deref for Duration {
    type Target = std::time::Duration;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s).map(Self)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs();
        let nanos = self.0.subsec_nanos();
        if secs == 0 {
            // Below a second the largest unit that keeps the number >= 1 reads best.
            return match nanos {
                0 => f.write_str("0s"),
                n if n >= 1_000_000 => write_scaled(f, n, 1_000_000, 6, "ms"),
                n if n >= 1_000 => write_scaled(f, n, 1_000, 3, "us"),
                n => write!(f, "{n}ns"),
            };
        }
        let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        if s > 0 || nanos > 0 {
            write!(f, "{s}")?;
            if nanos > 0 {
                let frac = format!("{nanos:09}");
                write!(f, ".{}", frac.trim_end_matches('0'))?;
            }
            f.write_str("s")?;
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DurationVisitor)
    }
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as \"30s\" or \"250ms\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        v.parse().map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        if v == 0 {
            Ok(Duration::ZERO)
        } else {
            Err(E::custom(NEEDS_UNIT))
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        match v {
            0 => Ok(Duration::ZERO),
            v if v < 0 => Err(E::custom("a duration cannot be negative")),
            _ => Err(E::custom(NEEDS_UNIT)),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
        if v == 0.0 {
            Ok(Duration::ZERO)
        } else {
            Err(E::custom(NEEDS_UNIT))
        }
    }
}

impl ParseDurationError {
    fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ParseDurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for ParseDurationError {}

/// Writes `n / unit` with up to `digits` decimals, dropping trailing zeros.
fn write_scaled(
    f: &mut fmt::Formatter<'_>,
    n: u32,
    unit: u32,
    digits: usize,
    suffix: &str,
) -> fmt::Result {
    let (whole, rem) = (n / unit, n % unit);
    if rem == 0 {
        return write!(f, "{whole}{suffix}");
    }
    let frac = format!("{rem:0digits$}");
    write!(f, "{whole}.{}{suffix}", frac.trim_end_matches('0'))
}

fn parse(input: &str) -> Result<std::time::Duration, ParseDurationError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(ParseDurationError::new(
            "a duration cannot be empty; use e.g. \"30s\" or \"0s\"",
        ));
    }
    if s == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    if s.starts_with('-') {
        return Err(ParseDurationError::new("a duration cannot be negative"));
    }
    // Words like "fast" or "never" are the common mistake; showing the format helps most.
    if !s.contains(|c: char| c.is_ascii_digit()) {
        return Err(ParseDurationError::new(NEEDS_UNIT));
    }

    // Sum in integer nanoseconds so "0.1s" is exactly 100ms, never 99.999…ms.
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        rest = rest.trim_start();
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(num_len);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.' || c.is_whitespace())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        rest = after;

        if number.is_empty() {
            return Err(ParseDurationError::new(format!(
                "invalid duration {s:?}: expected a number before {unit:?}"
            )));
        }
        if unit.is_empty() {
            return Err(ParseDurationError::new(NEEDS_UNIT));
        }
        let per = unit_nanos(unit).ok_or_else(|| {
            ParseDurationError::new(format!(
                "unknown unit {unit:?} in duration {s:?}; use ns, us, ms, s, m or h"
            ))
        })?;
        let part = component(s, number, per)?;
        total = total.checked_add(part).ok_or_else(|| too_large(s))?;
    }

    let secs = u64::try_from(total / NANOS_PER_SEC).map_err(|_| too_large(s))?;
    // The remainder is below one billion, so it always fits.
    let nanos = (total % NANOS_PER_SEC) as u32;
    Ok(std::time::Duration::new(secs, nanos))
}

fn unit_nanos(unit: &str) -> Option<u128> {
    Some(match unit {
        "ns" => 1,
        "us" | "µs" | "μs" => 1_000,
        "ms" => 1_000_000,
        "s" => NANOS_PER_SEC,
        "m" => 60 * NANOS_PER_SEC,
        "h" => 3600 * NANOS_PER_SEC,
        _ => return None,
    })
}

/// One `<number><unit>` component in nanoseconds; `per` is the unit's size in nanoseconds.
fn component(input: &str, number: &str, per: u128) -> Result<u128, ParseDurationError> {
    let invalid =
        || ParseDurationError::new(format!("invalid number {number:?} in duration {input:?}"));
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if frac.contains('.') || (int.is_empty() && frac.is_empty()) {
        return Err(invalid());
    }
    let int_value = if int.is_empty() {
        0
    } else {
        int.parse::<u128>().map_err(|_| too_large(input))?
    };
    let mut nanos = int_value.checked_mul(per).ok_or_else(|| too_large(input))?;
    if !frac.is_empty() {
        // 20 decimals is far past nanosecond precision for any unit and keeps the
        // arithmetic below inside u128.
        if frac.len() > 20 {
            return Err(invalid());
        }
        let frac_value: u128 = frac.parse().map_err(|_| invalid())?;
        let scale = 10u128.pow(frac.len() as u32);
        let scaled = frac_value * per;
        if scaled % scale != 0 {
            return Err(ParseDurationError::new(format!(
                "duration {input:?} is finer than one nanosecond"
            )));
        }
        nanos = nanos
            .checked_add(scaled / scale)
            .ok_or_else(|| too_large(input))?;
    }
    Ok(nanos)
}

fn too_large(input: &str) -> ParseDurationError {
    ParseDurationError::new(format!("duration {input:?} is too large"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn d(s: &str) -> Duration {
        s.parse().unwrap()
    }

    fn reject(s: &str) -> String {
        s.parse::<Duration>().unwrap_err().to_string()
    }

    #[test]
    fn parses_units_composites_and_decimals() {
        assert_eq!(d("30s"), Duration::from_secs(30));
        assert_eq!(d("250ms"), Duration::from_millis(250));
        assert_eq!(d("1m30s"), Duration::from_secs(90));
        assert_eq!(d("1h"), Duration::from_secs(3600));
        assert_eq!(d("1.5s"), Duration::from_millis(1500));
        assert_eq!(d("0.1s"), Duration::from_millis(100));
        assert_eq!(d("10us").get(), std::time::Duration::from_micros(10));
        assert_eq!(d("10µs").get(), std::time::Duration::from_micros(10));
        assert_eq!(d("7ns").get(), std::time::Duration::from_nanos(7));
        assert_eq!(d("1h 2m 3s"), Duration::from_secs(3723));
        assert_eq!(d("0"), Duration::ZERO);
        assert_eq!(d("0s"), Duration::ZERO);
    }

    #[test]
    fn rejects_bare_numbers_and_nonsense() {
        assert!(reject("30").contains("needs a unit"));
        assert!(reject("1m30").contains("needs a unit"));
        assert!(reject("-1s").contains("negative"));
        assert!(reject("5x").contains("unknown unit \"x\""));
        assert!(reject("").contains("empty"));
        assert!(reject("fast").contains("needs a unit"));
        assert!(reject("1ms s").contains("expected a number"));
        assert!(reject("1.2.3s").contains("invalid number"));
        assert!(reject("1.5ns").contains("finer than one nanosecond"));
        assert!(reject("99999999999999999999999h").contains("too large"));
    }

    #[test]
    fn prints_shortest_exact_form() {
        for (text, expected) in [
            ("30s", "30s"),
            ("250ms", "250ms"),
            ("90s", "1m30s"),
            ("0", "0s"),
            ("3600s", "1h"),
            ("1500ms", "1.5s"),
            ("1h0.5s", "1h0.5s"),
            ("1500us", "1.5ms"),
            ("2000ns", "2us"),
            ("1001ns", "1.001us"),
            ("12ns", "12ns"),
            ("25h", "25h"),
        ] {
            let parsed = d(text);
            assert_eq!(parsed.to_string(), expected, "printing {text}");
            assert_eq!(d(expected), parsed, "round trip of {expected}");
        }
    }

    #[test]
    fn serde_round_trip_and_numbers() {
        let json = serde_json::to_value(Duration::from_secs(90)).unwrap();
        assert_eq!(json, serde_json::json!("1m30s"));
        let back: Duration = serde_json::from_value(json).unwrap();
        assert_eq!(back, Duration::from_secs(90));

        let zero: Duration = serde_json::from_value(serde_json::json!(0)).unwrap();
        assert_eq!(zero, Duration::ZERO);
        let err = serde_json::from_value::<Duration>(serde_json::json!(30)).unwrap_err();
        assert_eq!(err.to_string(), NEEDS_UNIT);
    }
}
