//! Tests for [`super`]: spec examples, malformed input, and property tests.

#![allow(clippy::unwrap_used)]
use super::*;
use proptest::prelude::*;
use std::collections::HashMap;

const T128: &str = "80f198ee56343ba864fe8b2a57d3eff7";
const T64: &str = "e457b5a2e4d86bd1";
const SPAN: &str = "e457b5a2e4d86bd1";
const PARENT: &str = "05e3ac9a4f6e3b90";

fn single(v: &str) -> Result<Option<B3>, CodecError> {
    parse_single(v.as_bytes())
}

fn span(v: &str) -> SpanId {
    SpanId::from_hex(v.as_bytes()).unwrap()
}

#[test]
fn single_header_documented_forms() {
    let full = single(&format!("{T128}-{SPAN}-1-{PARENT}"))
        .unwrap()
        .unwrap();
    assert_eq!(full.trace_id.to_string(), T128);
    assert_eq!(full.span_id, span(SPAN));
    assert_eq!(full.parent_span_id, Some(span(PARENT)));
    assert_eq!((full.sampled, full.debug), (Some(true), false));

    let ids_only = single(&format!("{T128}-{SPAN}")).unwrap().unwrap();
    assert_eq!((ids_only.sampled, ids_only.parent_span_id), (None, None));

    let deny = single(&format!("{T128}-{SPAN}-0")).unwrap().unwrap();
    assert_eq!(deny.sampled, Some(false));

    let debug = single(&format!("{T128}-{SPAN}-d-{PARENT}"))
        .unwrap()
        .unwrap();
    assert_eq!((debug.sampled, debug.debug), (Some(true), true));

    for b in [full, ids_only, deny, debug] {
        assert_eq!(single(&encode_single(&b)).unwrap().unwrap(), b);
    }
    assert_eq!(encode_single(&full), format!("{T128}-{SPAN}-1-{PARENT}"));
}

#[test]
fn sixty_four_bit_trace_ids_are_padded_and_written_back_short() {
    let b = single(&format!("{T64}-{SPAN}-1")).unwrap().unwrap();
    assert_eq!(b.trace_id.to_string(), format!("0000000000000000{T64}"));
    assert_eq!(encode_single(&b), format!("{T64}-{SPAN}-1"));
    assert_eq!(encode_multi(&b)[0], ("x-b3-traceid", T64.to_owned()));
}

#[test]
fn lone_sampling_states_carry_no_identity() {
    for (v, want) in [("0", Some(false)), ("1", Some(true)), ("d", Some(true))] {
        assert_eq!(single(v).unwrap(), None);
        assert_eq!(parse_single_sampling(v.as_bytes()), Some(want));
    }
    assert_eq!(parse_single_sampling(b"true"), None);
    assert_eq!(
        parse_single_sampling(format!("{T128}-{SPAN}-1").as_bytes()),
        None
    );
}

#[test]
fn single_header_rejects_malformed_values() {
    for v in [
        String::new(),
        "2".to_owned(),
        T128.to_owned(),
        format!("{T128}-"),
        format!("{}-{SPAN}", &T128[..31]),
        format!("{T128}0-{SPAN}"),
        format!("{}-{SPAN}", &T64[..15]),
        format!("{T128}-{}", &SPAN[..15]),
        format!("{T128}-{SPAN}0"),
        format!("{}-{SPAN}", T128.to_uppercase()),
        format!("{}-{SPAN}", "0".repeat(32)),
        format!("{T128}-{}", "0".repeat(16)),
        format!("{T128}-{SPAN}-2"),
        format!("{T128}-{SPAN}-true"),
        format!("{T128}-{SPAN}-"),
        format!("{T128}-{SPAN}-{PARENT}"),
        format!("{T128}-{SPAN}-1-{}", &PARENT[..15]),
        format!("{T128}-{SPAN}-1-{PARENT}-1"),
        format!("{T128}-{SPAN}-1-"),
        format!(" {T128}-{SPAN}"),
    ] {
        let e = single(&v).unwrap_err();
        assert_eq!(e.header, "b3", "{v:?}");
    }
}

#[test]
fn zero_parent_means_root() {
    let b = single(&format!("{T128}-{SPAN}-1-{}", "0".repeat(16)))
        .unwrap()
        .unwrap();
    assert_eq!(b.parent_span_id, None);
}

fn multi(headers: &[(&str, &str)]) -> Result<Option<B3>, CodecError> {
    let map: HashMap<String, Vec<u8>> = headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec()))
        .collect();
    parse_multi(|name| map.get(name).map(Vec::as_slice))
}

#[test]
fn multi_headers_both_present() {
    let b = multi(&[
        ("X-B3-TraceId", T128),
        ("X-B3-SpanId", SPAN),
        ("X-B3-ParentSpanId", PARENT),
        ("X-B3-Sampled", "1"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(
        b,
        single(&format!("{T128}-{SPAN}-1-{PARENT}"))
            .unwrap()
            .unwrap()
    );
    let encoded = encode_multi(&b);
    let back: Vec<(&str, &str)> = encoded.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(
        back,
        [
            ("x-b3-traceid", T128),
            ("x-b3-spanid", SPAN),
            ("x-b3-parentspanid", PARENT),
            ("x-b3-sampled", "1"),
        ]
    );
}

#[test]
fn multi_headers_neither_or_one_present() {
    assert_eq!(multi(&[]).unwrap(), None);
    assert_eq!(multi(&[("X-B3-Sampled", "0")]).unwrap(), None);
    assert_eq!(
        multi(&[("X-B3-TraceId", T128)]).unwrap_err().header,
        "x-b3-spanid"
    );
    assert_eq!(
        multi(&[("X-B3-SpanId", SPAN)]).unwrap_err().header,
        "x-b3-traceid"
    );
}

#[test]
fn multi_headers_sampling_and_flags() {
    let ids = [("X-B3-TraceId", T64), ("X-B3-SpanId", SPAN)];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut h = ids.to_vec();
        h.extend_from_slice(extra);
        multi(&h)
    };
    assert_eq!(
        with(&[("X-B3-Sampled", "true")]).unwrap().unwrap().sampled,
        Some(true)
    );
    assert_eq!(
        with(&[("X-B3-Sampled", "false")]).unwrap().unwrap().sampled,
        Some(false)
    );
    assert_eq!(with(&[]).unwrap().unwrap().sampled, None);
    let debug = with(&[("X-B3-Flags", "1"), ("X-B3-Sampled", "0")])
        .unwrap()
        .unwrap();
    assert_eq!((debug.sampled, debug.debug), (Some(true), true));
    assert!(!with(&[("X-B3-Flags", "0")]).unwrap().unwrap().debug);
    assert_eq!(
        with(&[("X-B3-Sampled", "yes")]).unwrap_err().header,
        "x-b3-sampled"
    );
    assert_eq!(
        with(&[("X-B3-ParentSpanId", "xyz")]).unwrap_err().header,
        "x-b3-parentspanid"
    );

    let enc = encode_multi(&debug);
    assert!(enc.contains(&("x-b3-flags", "1".to_owned())));
    assert!(!enc.iter().any(|(k, _)| *k == "x-b3-sampled"));
}

#[test]
fn multi_sampling_without_ids() {
    let get = |h: &'static [(&'static str, &'static [u8])]| {
        parse_multi_sampling(move |n| h.iter().find(|(k, _)| *k == n).map(|(_, v)| *v))
    };
    assert_eq!(get(&[]).unwrap(), None);
    assert_eq!(get(&[("x-b3-sampled", b"0")]).unwrap(), Some(false));
    assert_eq!(get(&[("x-b3-flags", b"1")]).unwrap(), Some(true));
    assert!(get(&[("x-b3-sampled", b"2")]).is_err());
}

#[test]
fn unknown_sampling_drops_the_parent_in_the_single_header() {
    let mut b = single(&format!("{T128}-{SPAN}-1-{PARENT}"))
        .unwrap()
        .unwrap();
    b.sampled = None;
    assert_eq!(encode_single(&b), format!("{T128}-{SPAN}"));
}

#[test]
fn conversions_keep_trace_and_span_ids() {
    let b = single(&format!("{T128}-{SPAN}-1-{PARENT}"))
        .unwrap()
        .unwrap();
    let tp = b.to_traceparent();
    assert_eq!(tp.trace_id, b.trace_id);
    assert_eq!(tp.parent_id, b.span_id);
    assert!(tp.sampled());
    let back = B3::from_traceparent(&tp);
    assert_eq!((back.trace_id, back.span_id), (b.trace_id, b.span_id));
    assert_eq!(back.sampled, Some(true));

    // A 64-bit B3 trace id is still a valid W3C trace id once padded.
    let short = single(&format!("{T64}-{SPAN}")).unwrap().unwrap();
    let tp = short.to_traceparent();
    assert_eq!(TraceParent::parse(tp.encode().as_bytes()).unwrap(), tp);
    assert!(!tp.sampled(), "unknown sampling maps to not sampled");
    let debug = single(&format!("{T64}-{SPAN}-d")).unwrap().unwrap();
    assert!(debug.to_traceparent().sampled());
}

proptest! {
    #[test]
    fn single_header_never_panics(v in proptest::collection::vec(any::<u8>(), 0..96)) {
        let _ = parse_single(&v);
        let _ = parse_single_sampling(&v);
    }

    #[test]
    fn near_miss_single_headers_never_panic(v in "[0-9a-fd-]{0,90}") {
        if let Ok(Some(b)) = parse_single(v.as_bytes()) {
            prop_assert_eq!(parse_single(encode_single(&b).as_bytes()).unwrap(), Some(b));
        }
    }

    #[test]
    fn any_b3_round_trips_through_both_encodings(
        t in any::<[u8; 16]>().prop_filter("valid", |t| *t != [0; 16]),
        s in any::<[u8; 8]>().prop_filter("valid", |s| *s != [0; 8]),
        p in proptest::option::of(any::<[u8; 8]>().prop_filter("valid", |s| *s != [0; 8])),
        sampled in any::<bool>(),
        debug in any::<bool>(),
    ) {
        let b = B3 {
            trace_id: TraceId(t),
            span_id: SpanId(s),
            parent_span_id: p.map(SpanId),
            sampled: Some(sampled || debug),
            debug,
        };
        prop_assert_eq!(parse_single(encode_single(&b).as_bytes()).unwrap(), Some(b));
        let m = encode_multi(&b);
        let got = parse_multi(|n| m.iter().find(|(k, _)| *k == n).map(|(_, v)| v.as_bytes()));
        prop_assert_eq!(got.unwrap(), Some(b));
        let tp = b.to_traceparent();
        let back = B3::from_traceparent(&tp);
        prop_assert_eq!((back.trace_id, back.span_id), (b.trace_id, b.span_id));
    }
}

#[test]
fn single_into_matches_the_full_encoding() {
    use crate::codec::trace::{SpanId, TraceId, TraceParent};
    for i in 0..500u32 {
        let mut trace_id = TraceId::random();
        if i % 3 == 0 {
            // A 64-bit trace id: b3 writes only its low half.
            trace_id.0[..8].fill(0);
        }
        let tp = TraceParent {
            trace_id,
            parent_id: SpanId::random(),
            flags: (i % 2) as u8,
        };
        assert_eq!(
            std::str::from_utf8(single_into(&tp, &mut [0; SINGLE_MAX])).unwrap(),
            encode_single(&B3::from_traceparent(&tp)),
            "{tp:?}"
        );
    }
}
