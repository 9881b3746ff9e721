//! Header values Keel writes on every request or call (the request id, the time left, trace
//! ids), cut from a per-thread block instead of allocated one by one.
//!
//! `HeaderValue::from_bytes` copies its input into a new allocation and checks every byte.
//! Here each value is cut from a per-thread block (`split` of a `BytesMut`, then `freeze`):
//! the value shares the block and holds a reference count on it, so a block of [`BLOCK`]
//! bytes serves dozens of values for two allocations, and goes when the last value cut from
//! it is dropped. The bytes are not checked again: the callers hand over only what Keel's own
//! encoders produced ([`crate::propagation::Encoded`]) or a [`crate::codec::request_id::RequestId`],
//! visible ASCII by construction.

use bytes::{Bytes, BytesMut};
use http::HeaderValue;

/// Bytes per block: about a hundred values of the sizes Keel writes.
const BLOCK: usize = 4096;

/// `v` (visible ASCII, see the module doc) as a header value sharing a per-thread block.
pub(crate) fn visible_ascii(v: &[u8]) -> HeaderValue {
    thread_local! {
        static BLOCK_BUF: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
    }
    let bytes = BLOCK_BUF
        .try_with(|block| {
            let mut block = block.borrow_mut();
            if block.capacity() < v.len() {
                *block = BytesMut::with_capacity(BLOCK.max(v.len()));
            }
            block.extend_from_slice(v);
            block.split().freeze()
        })
        // Only while the thread is being torn down.
        .unwrap_or_else(|_| Bytes::copy_from_slice(v));
    // SAFETY: `HeaderValue`'s only requirement is bytes valid in a header value, which every
    // caller guarantees (see the module doc); `http` checks them itself in debug builds, so
    // every test does.
    unsafe { HeaderValue::from_maybe_shared_unchecked(bytes) }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn values_cut_from_shared_blocks_stay_whole_and_distinct() {
        // Enough values to fill several blocks, kept alive across block changes.
        let inputs: Vec<String> = (0..3 * BLOCK / 16).map(|i| format!("{i:032x}")).collect();
        let values: Vec<HeaderValue> = inputs.iter().map(|s| visible_ascii(s.as_bytes())).collect();
        for (s, v) in inputs.iter().zip(&values) {
            assert_eq!(v.as_bytes(), s.as_bytes());
        }
        // A value longer than a block gets a block of its own.
        let long = "x".repeat(BLOCK + 1);
        assert_eq!(visible_ascii(long.as_bytes()).as_bytes(), long.as_bytes());
    }
}
