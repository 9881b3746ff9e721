//! Tests for [`super`]: spec examples, malformed input, and property tests.

#![allow(clippy::unwrap_used)]
use super::*;
use proptest::prelude::*;

const SAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn tp(v: &str) -> Result<TraceParent, CodecError> {
    TraceParent::parse(v.as_bytes())
}

#[test]
fn parses_the_spec_sample_and_encodes_it_back() {
    let p = tp(SAMPLE).unwrap();
    assert_eq!(p.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(format!("{:?}", p.parent_id), "00f067aa0ba902b7");
    assert_eq!(p.flags, 1);
    assert!(p.sampled());
    assert_eq!(p.encode(), SAMPLE);

    let unsampled = tp("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
    assert!(!unsampled.sampled());
}

#[test]
fn version_00_keeps_unknown_flags_for_newer_peers() {
    // Level 2 defines bit 1 ("random"); a level-1 hop must not strip it.
    let p = tp("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03").unwrap();
    assert_eq!(p.flags, 3);
    assert!(p.encode().ends_with("-03"));
}

#[test]
fn rejects_uppercase_zero_ids_bad_versions_and_lengths() {
    let cases = [
        (
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "trace-id",
        ),
        (
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
            "parent-id",
        ),
        (
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A",
            "trace-flags",
        ),
        (
            "0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "version",
        ),
        (
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "trace-id is all zeros",
        ),
        (
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "parent-id is all zeros",
        ),
        (
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "version ff",
        ),
        (
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "exactly 55",
        ),
        (
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "shorter",
        ),
        (
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "separated",
        ),
        (
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "separated",
        ),
        (
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
            "parent-id",
        ),
        ("", "shorter"),
    ];
    for (v, why) in cases {
        let e = tp(v).unwrap_err();
        assert_eq!(e.header, "traceparent");
        assert!(e.reason.contains(why), "{v:?}: {e}");
    }
    assert!(tp(&format!(" {SAMPLE}")).is_err());
    assert!(tp(&format!("{SAMPLE} ")).is_err());
}

#[test]
fn future_versions_parse_by_the_version_00_layout() {
    let p =
        tp("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-will-be-like")
            .unwrap();
    assert!(p.sampled());
    assert_eq!(p.encode(), SAMPLE);
    // Exactly 55 characters is fine for a future version too.
    assert!(tp("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_ok());
    // Unknown flag bits of another version are not carried over into version 00.
    assert_eq!(
        tp("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff")
            .unwrap()
            .flags,
        1
    );
    // The flags must be followed by the end or a dash.
    let e = tp("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01.what").unwrap_err();
    assert!(e.reason.contains("after trace-flags"), "{e}");
}

#[test]
fn child_keeps_the_trace_and_flags_but_not_the_span() {
    let p = tp(SAMPLE).unwrap();
    let c = p.child();
    assert_eq!(c.trace_id, p.trace_id);
    assert_eq!(c.flags, p.flags);
    assert_ne!(c.parent_id, p.parent_id);
    assert!(c.parent_id.is_valid());
    assert_eq!(tp(&c.encode()).unwrap(), c);
}

#[test]
fn ids_from_hex_and_random() {
    assert_eq!(SpanId::from_hex(b"00f067aa0ba902b7").unwrap().0[1], 0xf0);
    assert!(SpanId::from_hex(b"00f067aa0ba902b").is_none());
    assert!(TraceId::from_hex(b"4BF92F3577B34DA6A3CE929D0E0E4736").is_none());
    assert!(!TraceId::from_hex(&[b'0'; 32]).unwrap().is_valid());
    let (a, b) = (TraceId::random(), TraceId::random());
    assert!(a.is_valid() && b.is_valid());
    assert_ne!(a, b);
    assert!(SpanId::random().is_valid());
}

fn ts(v: &str) -> Result<TraceState, CodecError> {
    TraceState::parse(v.as_bytes())
}

#[test]
fn tracestate_spec_examples() {
    for v in [
        "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
        "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
        "fw529a3039@dt=ZmFjZTAwMA,dd=s:1;o:rum",
        "a=b c",
        "0tenant@sys=v",
        "k/x*_-1=~!",
    ] {
        assert_eq!(ts(v).unwrap().as_str(), v);
    }
}

#[test]
fn tracestate_is_trimmed_and_skips_empty_members() {
    let s = ts("  rojo=1 ,\t, congo=2,  ").unwrap();
    assert_eq!(s.as_str(), "rojo=1 ,\t, congo=2,");
    assert!(ts("").unwrap().is_empty());
    assert!(ts(" , ,").unwrap().is_empty());
    assert!(!s.is_empty());
}

#[test]
fn tracestate_rejects_bad_members() {
    for (v, why) in [
        ("Rojo=1", "invalid key"),
        ("1abc=1", "invalid key"),
        ("rojo =1", "invalid key"),
        ("a@B=1", "invalid key"),
        ("a@1b=1", "invalid key"),
        ("a@bcdefghijklmnop=1", "invalid key"),
        ("@b=1", "invalid key"),
        ("rojo=", "invalid value"),
        ("rojo=a=b", "invalid value"),
        ("rojo=\u{e9}", "invalid value"),
        ("rojo", "no '='"),
        ("rojo=1,rojo=2", "repeats"),
    ] {
        let e = ts(v).unwrap_err();
        assert!(e.reason.contains(why), "{v:?}: {e}");
    }
    assert!(ts(&format!("k={}", "v".repeat(256))).is_ok());
    assert!(ts(&format!("k={}", "v".repeat(257))).is_err());
    assert!(ts(&format!("{}=v", "k".repeat(256))).is_ok());
    assert!(ts(&format!("{}=v", "k".repeat(257))).is_err());
    assert!(ts(&format!("a@{}=v", "s".repeat(14))).is_ok());
}

#[test]
fn tracestate_limits() {
    let members = |n: usize| {
        (0..n)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",")
    };
    assert!(ts(&members(32)).is_ok());
    assert!(ts(&members(33)).unwrap_err().reason.contains("32"));
    // 8192 bytes of mostly whitespace and empty members is still within the limit...
    let padded = format!("a=b{}", ",".repeat(8192 - 3));
    assert!(ts(&padded).is_ok());
    // ...one more byte is not.
    assert!(
        ts(&format!("{padded},"))
            .unwrap_err()
            .reason
            .contains("8192")
    );
}

proptest! {
    #[test]
    fn any_valid_traceparent_round_trips(
        t in any::<[u8; 16]>().prop_filter("valid", |t| *t != [0; 16]),
        s in any::<[u8; 8]>().prop_filter("valid", |s| *s != [0; 8]),
        flags in any::<u8>(),
    ) {
        let p = TraceParent { trace_id: TraceId(t), parent_id: SpanId(s), flags };
        let e = p.encode();
        prop_assert_eq!(e.len(), 55);
        prop_assert_eq!(TraceParent::parse(e.as_bytes()).unwrap(), p);
    }

    #[test]
    fn parsers_never_panic(v in proptest::collection::vec(any::<u8>(), 0..128)) {
        let _ = TraceParent::parse(&v);
        let _ = TraceState::parse(&v);
    }

    #[test]
    fn near_miss_traceparents_never_panic(v in "[0-9a-fA-F-]{50,60}") {
        let _ = TraceParent::parse(v.as_bytes());
    }

    #[test]
    fn near_miss_tracestates_never_panic(v in "[a-z0-9@=, ]{0,200}") {
        if let Ok(s) = TraceState::parse(v.as_bytes()) {
            prop_assert_eq!(TraceState::parse(s.as_str().as_bytes()).unwrap(), s);
        }
    }
}
