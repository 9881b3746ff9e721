//! Deadline headers: gRPC's `grpc-timeout` syntax (also Keel's own `keel-timeout`) and Envoy's
//! `x-envoy-expected-rq-timeout-ms`.
//!
//! Implements `Timeout` from *gRPC over HTTP/2* (grpc/grpc `doc/PROTOCOL-HTTP2.md`):
//! `Timeout → TimeoutValue TimeoutUnit`, where `TimeoutValue` is 1 to 8 ASCII digits and
//! `TimeoutUnit` is one of `H` (hours), `M` (minutes), `S`, `m` (milliseconds), `u`
//! (microseconds), `n` (nanoseconds).
//!
//! Parsing is strict, including about whitespace: `http`/`hyper` already strip the optional
//! whitespace around a field value, so a space that reaches us is inside the value and means the
//! sender is broken. Encoding rounds *down*, because a callee told it has more time than its
//! caller will wait does work nobody collects.

use std::fmt;
use std::time::Duration;

use super::CodecError;

/// The largest `TimeoutValue` the gRPC grammar allows (8 digits).
const MAX_VALUE: u64 = 99_999_999;

/// Units from finest to coarsest with their length in nanoseconds; [`encode`] picks the first
/// that keeps the value within 8 digits, which is also the most precise.
const UNITS: [(u8, u128); 6] = [
    (b'n', 1),
    (b'u', 1_000),
    (b'm', 1_000_000),
    (b'S', 1_000_000_000),
    (b'M', 60_000_000_000),
    (b'H', 3_600_000_000_000),
];

/// An encoded `grpc-timeout` value (at most 8 digits and a unit) held on the stack.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TimeoutValue {
    buf: [u8; 9],
    len: u8,
}

impl TimeoutValue {
    /// The header value's bytes (ASCII digits and a unit letter).
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }

    /// The header value, e.g. `"1500000u"`.
    pub fn as_str(&self) -> &str {
        // The buffer only ever holds ASCII digits and a unit letter, so this cannot fail.
        std::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl AsRef<str> for TimeoutValue {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for TimeoutValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for TimeoutValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// Parses a `grpc-timeout`-syntax value. `header` names the header in the error (`"grpc-timeout"`
/// or `"keel-timeout"`).
pub fn parse(header: &'static str, v: &[u8]) -> Result<Duration, CodecError> {
    let Some((&unit, digits)) = v.split_last() else {
        return Err(CodecError::new(header, "empty"));
    };
    if digits.is_empty() {
        return Err(CodecError::new(header, "missing value or unit"));
    }
    if digits.len() > 8 {
        return Err(CodecError::new(header, "value longer than 8 digits"));
    }
    let mut n: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(CodecError::new(header, "value is not ASCII digits"));
        }
        n = n * 10 + u64::from(d - b'0');
    }
    // At most 99_999_999 hours is ~3.6e11 seconds: every product below fits in a u64.
    Ok(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ if unit.is_ascii_digit() => return Err(CodecError::new(header, "missing unit")),
        _ => return Err(CodecError::new(header, "unknown unit")),
    })
}

/// Encodes `d` with the finest unit whose value fits in 8 digits (`n`, `u`, `m`, `S`, `M`, `H` in
/// that order), rounding down. Zero is `"0n"`; anything from 99,999,999 hours up saturates to
/// `"99999999H"`.
pub fn encode(d: Duration) -> TimeoutValue {
    let nanos = d.as_nanos();
    let (unit, value) = UNITS
        .iter()
        .find_map(|&(unit, len)| {
            let v = nanos / len;
            (v <= u128::from(MAX_VALUE)).then_some((unit, v as u64))
        })
        .unwrap_or((b'H', MAX_VALUE));

    let mut digits = [0u8; 8];
    let mut i = digits.len();
    let mut rest = value;
    loop {
        i -= 1;
        digits[i] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let n = digits.len() - i;
    let mut buf = [0u8; 9];
    buf[..n].copy_from_slice(&digits[i..]);
    buf[n] = unit;
    TimeoutValue {
        buf,
        len: (n + 1) as u8,
    }
}

/// Parses Envoy's `x-envoy-expected-rq-timeout-ms`: plain non-negative decimal milliseconds, at
/// most 20 digits; a value that overflows `u64` milliseconds is an error rather than "forever".
pub fn parse_envoy_ms(v: &[u8]) -> Result<Duration, CodecError> {
    const HEADER: &str = "x-envoy-expected-rq-timeout-ms";
    if v.is_empty() {
        return Err(CodecError::new(HEADER, "empty"));
    }
    if v.len() > 20 {
        return Err(CodecError::new(HEADER, "longer than 20 digits"));
    }
    let mut ms: u64 = 0;
    for &d in v {
        if !d.is_ascii_digit() {
            return Err(CodecError::new(HEADER, "not ASCII digits"));
        }
        ms = ms
            .checked_mul(10)
            .and_then(|m| m.checked_add(u64::from(d - b'0')))
            .ok_or_else(|| CodecError::new(HEADER, "overflows u64 milliseconds"))?;
    }
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests;
