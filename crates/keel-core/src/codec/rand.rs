//! The id generator: a thread-local SplitMix64 stream, **not cryptographic**.
//!
//! Trace ids, span ids and request ids only need to be unique with overwhelming probability, not
//! unpredictable (W3C Trace Context §"Considerations for trace-id field generation" asks for
//! randomness, not secrecy). So ids never touch the OS entropy source on the hot path: each thread
//! seeds once from `std`'s `RandomState` (which the standard library keys from OS randomness),
//! the wall clock and the thread id, then steps SplitMix64, which costs a few multiplies per
//! 64 bits and passes BigCrush. Never use it for tokens, nonces or anything an attacker must not
//! guess.
//!
//! A process that `fork`s without `exec` would duplicate the state into the child; Keel services
//! don't fork, so this is noted rather than defended against.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash, Hasher};
use std::time::{SystemTime, UNIX_EPOCH};

thread_local! {
    static STATE: Cell<u64> = Cell::new(seed());
}

/// Seeds a thread's stream. Each `RandomState::new()` is distinct per call and per thread, and the
/// clock and thread id are mixed in so two threads can't share a stream even if the hasher keys
/// were somehow equal.
fn seed() -> u64 {
    let mut h = RandomState::new().build_hasher();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    now.hash(&mut h);
    std::thread::current().id().hash(&mut h);
    h.finish()
}

/// The next 64 bits from this thread's SplitMix64 stream (not cryptographic; see the module doc).
pub fn next_u64() -> u64 {
    STATE.with(|s| {
        // SplitMix64 (Steele, Lea & Flood 2014): a Weyl sequence through a bijective finaliser,
        // so every seed yields a full-period stream.
        let x = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(x);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// Fills `buf` with bytes from [`next_u64`].
pub fn fill(buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        let r = next_u64().to_le_bytes();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successive_values_differ_and_fill_covers_odd_lengths() {
        let a = next_u64();
        let b = next_u64();
        assert_ne!(a, b);
        let mut buf = [0u8; 13];
        fill(&mut buf);
        // 104 random bits being all zero would mean the generator is broken.
        assert_ne!(buf, [0u8; 13]);
    }

    #[test]
    fn threads_get_different_streams() {
        let here = next_u64();
        let there = std::thread::spawn(next_u64).join().unwrap_or(here);
        assert_ne!(here, there);
    }
}
