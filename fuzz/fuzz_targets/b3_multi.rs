//! Fuzzes the B3 (openzipkin/b3-propagation) multi-header parser: the input is split on `\n`
//! into the values of X-B3-TraceId, X-B3-SpanId, X-B3-ParentSpanId, X-B3-Sampled and X-B3-Flags,
//! where an empty line means "header absent".
#![no_main]

use keel_core::codec::b3;
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 5] = [
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

fuzz_target!(|data: &[u8]| {
    let mut values: [Option<&[u8]>; 5] = [None; 5];
    for (slot, v) in values.iter_mut().zip(data.split(|&b| b == b'\n')) {
        *slot = (!v.is_empty()).then_some(v);
    }
    let get = |name: &str| NAMES.iter().position(|n| *n == name).and_then(|i| values[i]);
    let _ = b3::parse_multi_sampling(get);
    if let Ok(Some(b)) = b3::parse_multi(get) {
        let enc = b3::encode_multi(&b);
        let again = b3::parse_multi(|name: &str| {
            enc.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_bytes())
        })
        .expect("encode output parses");
        assert_eq!(again, Some(b));
    }
});
