//! Request ids (`x-request-id`): when to keep the caller's, and how to make a new one.
//!
//! There is no standard for `x-request-id`; Keel follows the common proxy practice (Envoy,
//! nginx) of trusting any short printable id a caller sends, so one id can follow a request
//! through services that generate ids differently. The bounds exist because the id is echoed
//! into logs and response headers: no control characters or spaces (log injection, header
//! splitting) and at most 200 bytes (log volume). New ids are 128 random bits as 32 lowercase hex,
//! the same shape as a W3C trace id, from the non-cryptographic [`super::rand`] generator: a
//! request id identifies, it does not authorise.

use super::rand;

/// The longest caller-supplied id Keel keeps.
pub const MAX_LEN: usize = 200;

/// True when a caller's id should be kept: 1 to 200 bytes of visible ASCII (`0x21..=0x7e`).
pub fn is_valid(v: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&v.len()) && v.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// A new id: 32 lowercase hex characters (128 random bits).
pub fn generate() -> String {
    generate_into(&mut [0u8; 32]).to_owned()
}

/// [`generate`] into a caller's stack buffer, so the hot path makes its one allocation where
/// the id is finally stored (an `Arc<str>`) and nowhere else.
pub fn generate_into(buf: &mut [u8; 32]) -> &str {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let words = [rand::next_u64(), rand::next_u64()];
    for (i, w) in words.iter().enumerate() {
        for (j, b) in w.to_be_bytes().iter().enumerate() {
            let at = (i * 8 + j) * 2;
            buf[at] = HEX[usize::from(b >> 4)];
            buf[at + 1] = HEX[usize::from(b & 0x0f)];
        }
    }
    // Every byte written above is an ASCII hex digit.
    std::str::from_utf8(buf).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_short_visible_ascii_ids() {
        assert!(is_valid(b"a"));
        assert!(is_valid(b"f81d4fae-7dec-11d0-a765-00a0c91e6bf6"));
        assert!(is_valid(b"!~{}[]\"'"));
        assert!(is_valid(&[b'x'; 200]));
    }

    #[test]
    fn replaces_empty_long_or_unprintable_ids() {
        assert!(!is_valid(b""));
        assert!(!is_valid(&[b'x'; 201]));
        for bad in [
            &b"a b"[..],
            b"a\tb",
            b"a\r\nb",
            b"a\x00",
            b"a\x7f",
            "é".as_bytes(),
        ] {
            assert!(!is_valid(bad), "{bad:?}");
        }
    }

    #[test]
    fn generated_ids_are_32_hex_valid_and_distinct() {
        let a = generate();
        let b = generate();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')));
        assert!(is_valid(a.as_bytes()));
        assert_ne!(a, b);
    }
}
