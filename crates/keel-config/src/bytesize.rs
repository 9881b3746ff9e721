//! `ByteSize`: a byte count that reads as `"64KiB"` or `"10MB"` and writes back exactly.
//!
//! Both binary (KiB = 1024) and decimal (kB = 1000) units are accepted because operators copy
//! limits from places that use either; the value is always kept in whole bytes.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A size in bytes, written in config as an integer or as text such as `"512"`, `"64KiB"`,
/// `"1MiB"` or `"10MB"` (units are case-insensitive).
///
/// It serializes as the largest binary unit that divides it exactly (`"64KiB"`), otherwise as
/// a plain integer of bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(u64);

/// Why a string is not a valid [`ByteSize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseByteSizeError {
    reason: String,
}

const BINARY_UNITS: [(u32, &str); 6] = [
    (60, "EiB"),
    (50, "PiB"),
    (40, "TiB"),
    (30, "GiB"),
    (20, "MiB"),
    (10, "KiB"),
];

impl ByteSize {
    /// `n` bytes.
    pub const fn b(n: u64) -> Self {
        Self(n)
    }

    /// `n` kibibytes (`n * 1024` bytes). Panics (at compile time in a `const`) on overflow.
    pub const fn kib(n: u64) -> Self {
        Self::scaled(n, 1 << 10)
    }

    /// `n` mebibytes.
    pub const fn mib(n: u64) -> Self {
        Self::scaled(n, 1 << 20)
    }

    /// `n` gibibytes.
    pub const fn gib(n: u64) -> Self {
        Self::scaled(n, 1 << 30)
    }

    /// The number of bytes.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The number of bytes as a `usize`, saturating on 32-bit targets: these values are used
    /// as limits, and "more than addressable" behaves the same as "everything".
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }

    const fn scaled(n: u64, unit: u64) -> Self {
        match n.checked_mul(unit) {
            Some(bytes) => Self(bytes),
            None => panic!("byte size overflows u64"),
        }
    }

    /// The exact binary-unit form, if there is one (never for zero).
    fn binary_unit(self) -> Option<(u64, &'static str)> {
        if self.0 == 0 {
            return None;
        }
        BINARY_UNITS
            .iter()
            .find(|(shift, _)| self.0 % (1u64 << shift) == 0)
            .map(|&(shift, name)| (self.0 >> shift, name))
    }
}

impl From<u64> for ByteSize {
    fn from(n: u64) -> Self {
        Self(n)
    }
}

impl From<ByteSize> for u64 {
    fn from(size: ByteSize) -> Self {
        size.0
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.binary_unit() {
            Some((n, unit)) => write!(f, "{n}{unit}"),
            None => write!(f, "{}B", self.0),
        }
    }
}

impl FromStr for ByteSize {
    type Err = ParseByteSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s).map(Self)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.binary_unit() {
            Some(_) => serializer.collect_str(self),
            None => serializer.serialize_u64(self.0),
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ByteSizeVisitor)
    }
}

struct ByteSizeVisitor;

impl Visitor<'_> for ByteSizeVisitor {
    type Value = ByteSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte size such as 1024, \"64KiB\" or \"10MB\"")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
        Ok(ByteSize(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
        u64::try_from(v)
            .map(ByteSize)
            .map_err(|_| E::custom("a byte size cannot be negative"))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<ByteSize, E> {
        if v < 0.0 {
            return Err(E::custom("a byte size cannot be negative"));
        }
        // 2^64 is exactly representable as f64; anything at or above it overflows.
        if v.fract() != 0.0 || !v.is_finite() || v >= 18_446_744_073_709_551_616.0 {
            return Err(E::custom("a byte size must be a whole number of bytes"));
        }
        Ok(ByteSize(v as u64))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
        v.parse().map_err(E::custom)
    }
}

impl ParseByteSizeError {
    fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ParseByteSizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for ParseByteSizeError {}

fn parse(input: &str) -> Result<u64, ParseByteSizeError> {
    let s = input.trim();
    if s.starts_with('-') {
        return Err(ParseByteSizeError::new("a byte size cannot be negative"));
    }
    let num_len = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(num_len);
    let unit = unit.trim();
    let invalid = || {
        ParseByteSizeError::new(format!(
            "invalid byte size {s:?}: expected a number such as 512, \"64KiB\" or \"10MB\""
        ))
    };
    if number.is_empty() {
        return Err(invalid());
    }
    let multiplier = unit_multiplier(unit).ok_or_else(|| {
        ParseByteSizeError::new(format!(
            "unknown unit {unit:?} in byte size {s:?}; use B, kB, KiB, MB, MiB, GB, GiB, TB or TiB"
        ))
    })?;

    let too_large = || ParseByteSizeError::new(format!("byte size {s:?} does not fit in 64 bits"));
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if frac.contains('.') || (int.is_empty() && frac.is_empty()) {
        return Err(invalid());
    }
    let int_value: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| too_large())?
    };
    let mut total = int_value
        .checked_mul(u128::from(multiplier))
        .ok_or_else(too_large)?;
    if !frac.is_empty() {
        // Bounded so `frac_value * multiplier` (multiplier <= 2^60) stays inside u128.
        if frac.len() > 18 {
            return Err(invalid());
        }
        let frac_value: u128 = frac.parse().map_err(|_| invalid())?;
        let scale = 10u128.pow(frac.len() as u32);
        let scaled = frac_value * u128::from(multiplier);
        if scaled % scale != 0 {
            return Err(ParseByteSizeError::new(format!(
                "byte size {s:?} is not a whole number of bytes"
            )));
        }
        total += scaled / scale;
    }
    u64::try_from(total).map_err(|_| too_large())
}

fn unit_multiplier(unit: &str) -> Option<u64> {
    Some(match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "ki" | "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mi" | "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gi" | "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "ti" | "tib" => 1 << 40,
        "p" | "pb" => 1_000_000_000_000_000,
        "pi" | "pib" => 1 << 50,
        "e" | "eb" => 1_000_000_000_000_000_000,
        "ei" | "eib" => 1 << 60,
        _ => return None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn size(s: &str) -> u64 {
        s.parse::<ByteSize>().unwrap().get()
    }

    fn reject(s: &str) -> String {
        s.parse::<ByteSize>().unwrap_err().to_string()
    }

    #[test]
    fn parses_binary_and_decimal_units() {
        assert_eq!(size("512"), 512);
        assert_eq!(size("512B"), 512);
        assert_eq!(size("64KiB"), 64 * 1024);
        assert_eq!(size("64kib"), 64 * 1024);
        assert_eq!(size("1MiB"), 1 << 20);
        assert_eq!(size("1GiB"), 1 << 30);
        assert_eq!(size("10kB"), 10_000);
        assert_eq!(size("10KB"), 10_000);
        assert_eq!(size("10MB"), 10_000_000);
        assert_eq!(size("1.5KiB"), 1536);
        assert_eq!(size(" 2 MiB "), 2 << 20);
        assert_eq!(size("6EiB"), 6 << 60);
    }

    #[test]
    fn rejects_negative_overflow_and_fractions() {
        assert!(reject("-1").contains("negative"));
        assert!(reject("16EiB").contains("does not fit in 64 bits"));
        assert!(reject("99999999999999999999999").contains("does not fit"));
        assert!(reject("1.3B").contains("whole number of bytes"));
        assert!(reject("10 parsecs").contains("unknown unit"));
        assert!(reject("MiB").contains("expected a number"));
        let err = serde_json::from_value::<ByteSize>(json!(-5)).unwrap_err();
        assert!(err.to_string().contains("negative"));
    }

    #[test]
    fn prints_exact_binary_unit_or_bytes() {
        assert_eq!(ByteSize::kib(64).to_string(), "64KiB");
        assert_eq!(ByteSize::mib(1).to_string(), "1MiB");
        assert_eq!(ByteSize::kib(1536).to_string(), "1536KiB");
        assert_eq!(ByteSize::b(1000).to_string(), "1000B");
        assert_eq!(ByteSize::b(0).to_string(), "0B");

        assert_eq!(
            serde_json::to_value(ByteSize::kib(64)).unwrap(),
            json!("64KiB")
        );
        assert_eq!(
            serde_json::to_value(ByteSize::b(1000)).unwrap(),
            json!(1000)
        );
        assert_eq!(serde_json::to_value(ByteSize::b(0)).unwrap(), json!(0));
    }

    #[test]
    fn serde_round_trips() {
        for size in [
            ByteSize::b(0),
            ByteSize::b(1000),
            ByteSize::kib(64),
            ByteSize::gib(3),
            ByteSize::b(u64::MAX),
        ] {
            let json = serde_json::to_value(size).unwrap();
            assert_eq!(serde_json::from_value::<ByteSize>(json).unwrap(), size);
            assert_eq!(size.to_string().parse::<ByteSize>().unwrap(), size);
        }
        assert_eq!(ByteSize::mib(2).as_usize(), 2 << 20);
    }
}
