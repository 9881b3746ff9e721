//! Fuzzes the gateway's path normaliser (`keel_gateway::path`): whatever the input, a path
//! it accepts is a fixed point, stays ASCII without controls or `\`, and decoding it once
//! (as an upstream does) yields the same number of segments and no dot-segment.
#![no_main]

use keel_core::codec::percent;
use keel_gateway::path::{PathPolicy, normalize};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Ok(path) = std::str::from_utf8(rest) else {
        return;
    };
    let policy = PathPolicy {
        merge_slashes: flags & 1 == 1,
    };
    let Ok(n) = normalize(path, &policy) else {
        return;
    };
    assert_eq!(normalize(&n, &policy).as_deref(), Ok(&*n), "not a fixed point");
    assert!(n.starts_with('/'));
    assert!(n.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\\'));
    let seen = percent::decode(n.as_bytes(), Default::default()).expect("escapes stay whole");
    let segments: Vec<&[u8]> = seen.split(|&b| b == b'/').collect();
    assert_eq!(segments.len(), n.split('/').count(), "decoding made a separator");
    for seg in segments {
        let name = seg.split(|&b| b == b';').next().unwrap_or(seg);
        assert!(name != b"." && name != b"..", "{path:?} -> {n:?}");
    }
});
