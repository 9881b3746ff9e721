//! Fuzzes the `grpc-timeout` and `x-envoy-expected-rq-timeout-ms` parsers (gRPC over HTTP/2).
#![no_main]

use keel_core::codec::timeout;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = timeout::parse("grpc-timeout", data) {
        // Re-encoding may pick a finer unit but must never claim more time.
        let back = timeout::parse("grpc-timeout", timeout::encode(d).as_str().as_bytes())
            .expect("encode output parses");
        assert!(back <= d);
    }
    let _ = timeout::parse_envoy_ms(data);
});
