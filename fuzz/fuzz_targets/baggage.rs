//! Fuzzes the W3C Baggage parser.
#![no_main]

use keel_core::codec::Baggage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = Baggage::parse(data) {
        let enc = b.encode();
        // Re-encoding can grow the text (a stray `%` becomes `%25`, bytes that are not UTF-8
        // become an escaped U+FFFD), so only values still within the limit must round-trip.
        if enc.len() <= Baggage::MAX_BYTES {
            let again = Baggage::parse(enc.as_bytes()).expect("encode output parses");
            assert_eq!(again, b);
        }
    }
});
