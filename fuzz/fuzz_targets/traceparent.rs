//! Fuzzes the W3C Trace Context `traceparent` parser.
#![no_main]

use keel_core::codec::TraceParent;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(tp) = TraceParent::parse(data) {
        let again = TraceParent::parse(tp.encode().as_bytes()).expect("encode output parses");
        assert_eq!(again, tp);
    }
});
