//! Lowercase hex, the id encoding shared by W3C Trace Context and B3.
//!
//! Both specs require *lowercase* hex on the wire (`HEXDIGLC` in W3C Trace Context, "lower-hex" in
//! openzipkin/b3-propagation), so decoding rejects `A-F` rather than quietly accepting ids that a
//! stricter peer further down the path would drop.

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// The value of one lowercase hex digit.
#[inline]
pub(crate) fn nibble(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// Decodes `src` (exactly `2 * N` lowercase hex digits) into bytes.
#[inline]
pub(crate) fn decode<const N: usize>(src: &[u8]) -> Option<[u8; N]> {
    if src.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(src.chunks_exact(2)) {
        *o = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

/// Writes `src` as lowercase hex into `dst`, which must be exactly twice as long.
#[inline]
pub(crate) fn encode_into(src: &[u8], dst: &mut [u8]) {
    debug_assert_eq!(dst.len(), 2 * src.len());
    for (b, pair) in src.iter().zip(dst.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
}

/// Appends `src` as lowercase hex to `out`.
#[inline]
pub(crate) fn push(out: &mut String, src: &[u8]) {
    // Through a stack buffer and one `push_str` per 32 bytes: `String::push` per digit costs
    // a UTF-8 encode and a capacity check each, and this runs for every outbound call's
    // trace headers.
    let mut buf = [0u8; 64];
    for chunk in src.chunks(32) {
        for (i, b) in chunk.iter().enumerate() {
            buf[2 * i] = DIGITS[usize::from(b >> 4)];
            buf[2 * i + 1] = DIGITS[usize::from(b & 0x0f)];
        }
        // Hex digits are ASCII: this cannot fail, and falls back to nothing rather than panic.
        out.push_str(std::str::from_utf8(&buf[..2 * chunk.len()]).unwrap_or_default());
    }
}

/// The uppercase hex digit for a nibble; percent-encoding (RFC 3986) prefers uppercase.
#[inline]
pub(crate) fn upper_digit(n: u8) -> char {
    char::from(b"0123456789ABCDEF"[usize::from(n & 0x0f)])
}

/// Decodes one hex digit of either case: percent-escapes (unlike ids) may be uppercase.
#[inline]
pub(crate) fn nibble_any_case(b: u8) -> Option<u8> {
    match b {
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => nibble(b),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trips_and_rejects_uppercase() {
        let bytes = [0x00, 0x1f, 0xab, 0xff];
        let mut buf = [0u8; 8];
        encode_into(&bytes, &mut buf);
        assert_eq!(&buf, b"001fabff");
        assert_eq!(decode::<4>(&buf).unwrap(), bytes);
        assert!(decode::<4>(b"001FABFF").is_none());
        assert!(decode::<4>(b"001fab").is_none());
        let mut s = String::new();
        push(&mut s, &bytes);
        assert_eq!(s, "001fabff");
    }
}
