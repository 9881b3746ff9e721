//! Fuzzes the B3 (openzipkin/b3-propagation) single-header parser.
#![no_main]

use keel_core::codec::b3;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = b3::parse_single_sampling(data);
    if let Ok(Some(b)) = b3::parse_single(data) {
        let mut expected = b;
        // The single header can only carry a parent after a sampling state.
        if b.sampled.is_none() {
            expected.parent_span_id = None;
        }
        let again = b3::parse_single(b3::encode_single(&b).as_bytes()).expect("encode output parses");
        assert_eq!(again, Some(expected));
    }
});
