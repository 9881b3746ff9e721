//! Tests for [`super`]: spec examples, malformed input, and property tests.

#![allow(clippy::unwrap_used)]
use super::*;
use proptest::prelude::*;

fn parse(v: &str) -> Result<Baggage, CodecError> {
    Baggage::parse(v.as_bytes())
}

#[test]
fn spec_example_with_properties_and_whitespace() {
    let b = parse(
        "key1=value1;property1;property2, key2 = value2, key3=value3; propertyKey=propertyValue",
    )
    .unwrap();
    let pairs: Vec<_> = b.iter().collect();
    assert_eq!(
        pairs,
        [("key1", "value1"), ("key2", "value2"), ("key3", "value3")]
    );
    assert_eq!(b.properties("key1"), Some("property1;property2"));
    assert_eq!(b.properties("key2"), None);
    assert_eq!(b.properties("key3"), Some("propertyKey=propertyValue"));
    let enc = b.encode();
    assert_eq!(
        enc,
        "key1=value1;property1;property2,key2=value2,key3=value3;propertyKey=propertyValue"
    );
    assert_eq!(enc.capacity(), enc.len());
    assert_eq!(parse(&enc).unwrap(), b);
}

#[test]
fn values_are_percent_decoded() {
    let b = parse("userId=alice,serverNode=DF%2028,isProduction=false,pct=100%25").unwrap();
    assert_eq!(b.get("serverNode"), Some("DF 28"));
    assert_eq!(b.get("pct"), Some("100%"));
    assert_eq!(parse("k=%e2%9c%93%E2%9C%93").unwrap().get("k"), Some("✓✓"));
    // Not UTF-8: replaced, not rejected.
    assert_eq!(parse("k=a%FFb").unwrap().get("k"), Some("a\u{fffd}b"));
    // A stray '%' is kept as written.
    assert_eq!(parse("k=50%,j=%4").unwrap().get("k"), Some("50%"));
    assert_eq!(parse("k=50%,j=%4").unwrap().get("j"), Some("%4"));
    assert_eq!(parse("k=").unwrap().get("k"), Some(""));
}

#[test]
fn unicode_values_round_trip() {
    let mut b = Baggage::default();
    b.set("greeting", "héllo, wörld; \"quoted\" \\ 100% 🦀");
    b.set("empty", "");
    let enc = b.encode();
    assert!(enc.is_ascii());
    assert!(!enc.contains(' '));
    assert_eq!(enc.capacity(), enc.len());
    assert_eq!(parse(&enc).unwrap(), b);
}

#[test]
fn set_replaces_in_place_and_remove_keeps_order() {
    let mut b = parse("a=1;p,b=2,c=3").unwrap();
    b.set("a", "10");
    b.set("d", "4");
    assert_eq!(b.encode(), "a=10,b=2,c=3,d=4");
    assert_eq!(b.remove("b"), Some("2".to_owned()));
    assert_eq!(b.remove("b"), None);
    assert_eq!(b.encode(), "a=10,c=3,d=4");
    assert_eq!(b.len(), 3);
    assert!(!b.is_empty());
    assert_eq!(b.get("A"), None);
}

#[test]
fn repeated_keys_keep_the_first_position_and_last_value() {
    let b = parse("a=1,b=2,a=3").unwrap();
    assert_eq!(b.encode(), "a=3,b=2");
}

#[test]
fn extend_from_merges_header_lines() {
    let mut b = parse("a=1,b=2").unwrap();
    b.extend_from(b"b=20, c=3").unwrap();
    assert_eq!(b.encode(), "a=1,b=20,c=3");
    let before = b.clone();
    assert!(b.extend_from(b"d=4,bad key=5").is_err());
    assert_eq!(b, before, "a failed merge changes nothing");
}

#[test]
fn empty_members_and_headers_are_fine() {
    assert!(parse("").unwrap().is_empty());
    assert!(parse(" , ").unwrap().is_empty());
    assert_eq!(parse("a=1,").unwrap().len(), 1);
    assert_eq!(Baggage::default().encode(), "");
}

#[test]
fn rejects_invalid_keys_values_and_properties() {
    for (v, why) in [
        ("bad key=1", "(\"bad key\") has an invalid key"),
        ("=1", "invalid key"),
        ("k(=1", "invalid key"),
        ("ké=1", "invalid key"),
        ("k=a b", "invalid value"),
        ("k=\"q\"", "invalid value"),
        ("k=a\\b", "invalid value"),
        ("k=é", "invalid value"),
        ("ok=1,k", "list-member 2 (\"k\") has no '='"),
        ("k=1;", "invalid property"),
        ("k=1;p q", "invalid property"),
        ("k=1;p=a b", "invalid property"),
        ("k=1;=v", "invalid property"),
    ] {
        let e = parse(v).unwrap_err();
        assert_eq!(e.header, "baggage");
        assert!(e.reason.contains(why), "{v:?}: {e}");
    }
    assert!(parse("k=1;p = v ; q").is_ok());
}

#[test]
fn limits() {
    let members = |n: usize| {
        (0..n)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",")
    };
    assert_eq!(parse(&members(180)).unwrap().len(), 180);
    assert!(parse(&members(181)).unwrap_err().reason.contains("180"));

    let mut b = parse(&members(100)).unwrap();
    assert!(
        b.extend_from(members(81).replace('k', "j").as_bytes())
            .is_err()
    );
    assert_eq!(b.len(), 100);
    // Repeating held keys does not count twice.
    b.extend_from(members(100).as_bytes()).unwrap();
    assert_eq!(b.len(), 100);

    let exactly = format!("k={}", "v".repeat(Baggage::MAX_BYTES - 2));
    assert!(parse(&exactly).is_ok());
    let over = format!("{exactly}v");
    assert_eq!(over.len(), 8193);
    assert!(parse(&over).unwrap_err().reason.contains("8192"));

    // The byte limit covers every line of a multi-line header.
    let mut b = parse(&format!("k={}", "v".repeat(5000))).unwrap();
    assert!(
        b.extend_from(format!("j={}", "v".repeat(4000)).as_bytes())
            .is_err()
    );
}

#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "not an RFC 7230 token")]
fn set_with_an_invalid_key_is_a_bug() {
    Baggage::default().set("bad key", "v");
}

fn token() -> impl Strategy<Value = String> {
    "[!#$%&'*+.^_`|~0-9A-Za-z-]{1,16}"
}

fn any_text() -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..16).prop_map(String::from_iter)
}

proptest! {
    #[test]
    fn any_baggage_round_trips(pairs in proptest::collection::vec((token(), any_text()), 0..24)) {
        let mut b = Baggage::default();
        for (k, v) in pairs {
            b.set(k, v);
        }
        let enc = b.encode();
        prop_assert_eq!(enc.len(), enc.capacity());
        prop_assert_eq!(Baggage::parse(enc.as_bytes()).unwrap(), b);
    }

    #[test]
    fn parse_never_panics(v in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = Baggage::parse(&v);
    }

    #[test]
    fn near_miss_headers_never_panic_and_reencode_stably(v in "[a-z%0-9A-F=;, ]{0,64}") {
        if let Ok(b) = Baggage::parse(v.as_bytes()) {
            prop_assert_eq!(Baggage::parse(b.encode().as_bytes()).unwrap(), b);
        }
    }
}
