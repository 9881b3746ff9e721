//! Request ids (`x-request-id`): when to keep the caller's, and how to make a new one.
//!
//! There is no standard for `x-request-id`; Keel follows the common proxy practice (Envoy,
//! nginx) of trusting any short printable id a caller sends, so one id can follow a request
//! through services that generate ids differently. The bounds exist because the id is echoed
//! into logs and response headers: no control characters or spaces (log injection, header
//! splitting) and at most 200 bytes (log volume). New ids are 128 random bits as 32 lowercase hex,
//! the same shape as a W3C trace id, from the non-cryptographic [`super::rand`] generator: a
//! request id identifies, it does not authorise.

use std::sync::Arc;

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
    fill_hex(buf);
    // Every byte written is an ASCII hex digit.
    std::str::from_utf8(buf).unwrap_or_default()
}

/// 128 random bits as 32 lowercase hex digits, into `buf`.
fn fill_hex(buf: &mut [u8; 32]) {
    let words = [rand::next_u64(), rand::next_u64()];
    for (i, w) in words.iter().enumerate() {
        for (j, b) in w.to_be_bytes().iter().enumerate() {
            let at = (i * 8 + j) * 2;
            buf[at..at + 2].copy_from_slice(&HEX_PAIRS[usize::from(*b)]);
        }
    }
}

/// Each byte's two lowercase hex digits: one lookup a byte instead of two nibble lookups
/// (a new id is made for every request that arrives without one).
const HEX_PAIRS: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [HEX[i >> 4], HEX[i & 0x0f]];
        i += 1;
    }
    t
};

/// Ids up to this length live inline in [`RequestId`]: generated ids (32) and UUIDs (36) fit,
/// so the common request pays no allocation for its id.
const INLINE: usize = 48;

/// A request id, validated ([`is_valid`]) or generated. Cheap to clone; derefs to `str`.
#[derive(Clone)]
pub struct RequestId(Repr);

#[derive(Clone)]
enum Repr {
    Inline { len: u8, buf: [u8; INLINE] },
    Shared(Arc<str>),
}

impl RequestId {
    /// The caller's id when [`is_valid`], else a newly generated one.
    pub fn from_caller_or_new(caller: Option<&[u8]>) -> RequestId {
        match caller {
            Some(v) if is_valid(v) => RequestId::copy_of(v),
            _ => RequestId::generate(),
        }
    }

    /// A new random id (32 lowercase hex characters).
    pub fn generate() -> RequestId {
        let mut buf = [0u8; INLINE];
        let mut hex = [0u8; 32];
        fill_hex(&mut hex);
        buf[..32].copy_from_slice(&hex);
        RequestId(Repr::Inline { len: 32, buf })
    }

    /// `v` must already be valid (visible ASCII).
    fn copy_of(v: &[u8]) -> RequestId {
        if v.len() <= INLINE {
            let mut buf = [0u8; INLINE];
            buf[..v.len()].copy_from_slice(v);
            // INLINE < 256, so the length fits.
            RequestId(Repr::Inline {
                len: v.len() as u8,
                buf,
            })
        } else {
            RequestId(Repr::Shared(Arc::from(
                std::str::from_utf8(v).unwrap_or_default(),
            )))
        }
    }

    /// The id's bytes (visible ASCII): what a header value is made from, without the UTF-8
    /// check [`RequestId::as_str`] needs.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, buf } => &buf[..usize::from(*len)],
            Repr::Shared(s) => s.as_bytes(),
        }
    }

    /// The id as a header value, cut from a per-thread block rather than allocated (a new id
    /// is written on every response and every outbound call); the id is visible ASCII by
    /// construction, so it is not checked again.
    pub fn header_value(&self) -> http::HeaderValue {
        crate::header_value::visible_ascii(self.as_bytes())
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Only valid (visible ASCII) bytes are ever stored, so this cannot fail.
            Repr::Inline { len, buf } => {
                std::str::from_utf8(&buf[..usize::from(*len)]).unwrap_or_default()
            }
            Repr::Shared(s) => s,
        }
    }
}

impl std::ops::Deref for RequestId {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq for RequestId {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for RequestId {}

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
    fn request_ids_keep_short_and_long_caller_ids_and_replace_bad_ones() {
        let short = RequestId::from_caller_or_new(Some(b"f81d4fae-7dec-11d0-a765-00a0c91e6bf6"));
        assert_eq!(&*short, "f81d4fae-7dec-11d0-a765-00a0c91e6bf6");
        let long = "x".repeat(200);
        assert_eq!(
            RequestId::from_caller_or_new(Some(long.as_bytes())).as_str(),
            long
        );
        let replaced = RequestId::from_caller_or_new(Some(b"a b"));
        assert_eq!(replaced.len(), 32);
        assert_ne!(replaced, RequestId::from_caller_or_new(None));
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
