//! Fuzzes the W3C Trace Context `tracestate` validator.
#![no_main]

use keel_core::codec::TraceState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ts) = TraceState::parse(data) {
        let again = TraceState::parse(ts.as_str().as_bytes()).expect("kept value re-validates");
        assert_eq!(again, ts);
    }
});
