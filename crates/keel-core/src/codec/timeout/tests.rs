//! Tests for [`super`]: spec examples, malformed input, and property tests.

#![allow(clippy::unwrap_used)]
use super::*;
use proptest::prelude::*;

fn p(v: &str) -> Result<Duration, CodecError> {
    parse("grpc-timeout", v.as_bytes())
}

#[test]
fn parses_every_unit() {
    assert_eq!(p("2H").unwrap(), Duration::from_secs(7200));
    assert_eq!(p("3M").unwrap(), Duration::from_secs(180));
    assert_eq!(p("4S").unwrap(), Duration::from_secs(4));
    assert_eq!(p("5m").unwrap(), Duration::from_millis(5));
    assert_eq!(p("6u").unwrap(), Duration::from_micros(6));
    assert_eq!(p("7n").unwrap(), Duration::from_nanos(7));
    assert_eq!(p("0S").unwrap(), Duration::ZERO);
    assert_eq!(p("00000010m").unwrap(), Duration::from_millis(10));
}

#[test]
fn eight_digits_is_the_limit() {
    assert_eq!(
        p("99999999H").unwrap(),
        Duration::from_secs(99_999_999 * 3600)
    );
    let e = p("123456789m").unwrap_err();
    assert_eq!(e.header, "grpc-timeout");
    assert!(e.reason.contains("8 digits"), "{e}");
}

#[test]
fn rejects_malformed_values() {
    for bad in [
        "", "S", "m", "10", "10x", "10s", "10h", "-1S", "+1S", " 1S", "1S ", "1 S", "1.5S", "0x1S",
        "1SS", "１S",
    ] {
        assert!(p(bad).is_err(), "{bad:?} should be rejected");
    }
    assert_eq!(p("10").unwrap_err().reason, "missing unit");
    assert_eq!(p("").unwrap_err().reason, "empty");
    assert_eq!(p("10x").unwrap_err().reason, "unknown unit");
}

#[test]
fn the_header_name_is_the_callers() {
    let e = parse("keel-timeout", b"x").unwrap_err();
    assert_eq!(
        e.to_string(),
        "malformed keel-timeout header: missing value or unit"
    );
}

#[test]
fn encode_picks_the_finest_unit_that_fits() {
    let cases = [
        (Duration::ZERO, "0n"),
        (Duration::from_nanos(1), "1n"),
        (Duration::from_nanos(99_999_999), "99999999n"),
        (Duration::from_millis(100), "100000u"),
        (Duration::from_millis(1500), "1500000u"),
        (Duration::from_secs(100), "100000m"),
        (Duration::from_secs(100_000), "100000S"),
        (Duration::from_secs(100_000_000), "1666666M"),
        (Duration::from_secs(6_000_000_000), "1666666H"),
    ];
    for (d, want) in cases {
        assert_eq!(encode(d).as_str(), want, "{d:?}");
    }
}

#[test]
fn encode_rounds_down() {
    // 100_000_001.999 µs: too many digits for `n` and `u`, so milliseconds, rounded down.
    assert_eq!(
        encode(Duration::from_nanos(100_000_001_999)).as_str(),
        "100000m"
    );
    assert_eq!(
        encode(Duration::from_nanos(99_999_999_999)).as_str(),
        "99999999u"
    );
    // 100_000_059 s is 1_666_667.65 minutes: the value must say 1666667, never 1666668.
    let d = Duration::from_secs(100_000_000 + 59);
    assert_eq!(encode(d).as_str(), "1666667M");
    assert!(p(encode(d).as_str()).unwrap() <= d);
}

#[test]
fn encode_saturates_huge_durations() {
    assert_eq!(encode(Duration::MAX).as_str(), "99999999H");
    assert_eq!(
        encode(Duration::from_secs(u64::MAX / 2)).to_string(),
        "99999999H"
    );
    let v = encode(Duration::from_secs(99_999_999 * 3600));
    assert_eq!(format!("{v:?}"), "\"99999999H\"");
    assert_eq!(v.as_ref(), "99999999H");
}

#[test]
fn envoy_milliseconds() {
    let e = |v: &str| parse_envoy_ms(v.as_bytes());
    assert_eq!(e("0").unwrap(), Duration::ZERO);
    assert_eq!(e("1500").unwrap(), Duration::from_millis(1500));
    assert_eq!(
        e("18446744073709551615").unwrap(),
        Duration::from_millis(u64::MAX)
    );
    for bad in [
        "",
        "-1",
        "1.5",
        " 1",
        "1 ",
        "1ms",
        "18446744073709551616",
        "123456789012345678901",
    ] {
        assert!(e(bad).is_err(), "{bad:?} should be rejected");
    }
    assert_eq!(
        e("99999999999999999999").unwrap_err().reason,
        "overflows u64 milliseconds"
    );
}

/// The largest duration `encode` represents without saturating.
const MAX: Duration = Duration::from_secs(MAX_VALUE * 3600);

proptest! {
    #[test]
    fn encode_never_promises_more_time(secs in 0..MAX.as_secs(), nanos in 0u32..1_000_000_000) {
        let d = Duration::new(secs, nanos);
        let v = encode(d);
        let back = p(v.as_str()).unwrap();
        let unit = UNITS
            .iter()
            .find(|(u, _)| Some(u) == v.as_str().as_bytes().last())
            .map(|&(_, len)| Duration::from_nanos(len as u64))
            .unwrap();
        prop_assert!(back <= d, "{d:?} encoded as {v} = {back:?}");
        prop_assert!(d - back < unit, "{d:?} encoded as {v} = {back:?}");
    }

    #[test]
    fn small_durations_round_trip_exactly(nanos in 0u64..=MAX_VALUE) {
        let d = Duration::from_nanos(nanos);
        prop_assert_eq!(p(encode(d).as_str()).unwrap(), d);
    }

    #[test]
    fn parsers_never_panic(v in proptest::collection::vec(any::<u8>(), 0..32)) {
        let _ = parse("grpc-timeout", &v);
        let _ = parse_envoy_ms(&v);
    }

    #[test]
    fn parse_accepts_any_well_formed_value(n in 0..=MAX_VALUE, unit in proptest::sample::select(&b"HMSmun"[..])) {
        let s = format!("{n}{}", char::from(unit));
        prop_assert!(p(&s).is_ok());
    }
}
