//! Percent-decoding (`%XX`), written once for every place Keel reads escaped text: W3C
//! baggage values, `OTEL_EXPORTER_OTLP_HEADERS`, admin query strings. The callers differ only
//! in what a malformed escape means and in whether `+` is a space, so those are options.

use super::hex;

/// How to decode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// `+` means a space (`application/x-www-form-urlencoded`: query strings).
    pub plus_as_space: bool,
    /// Keep a malformed escape (`%zz`, a trailing `%`) as it is, instead of refusing the whole
    /// input. W3C baggage asks for leniency; configuration is better refused with a message.
    pub keep_malformed: bool,
}

/// A `%` not followed by two hex digits, at this byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed percent-escape at byte {0}")]
pub struct Malformed(pub usize);

/// Decode `v`. The bytes are returned as decoded; whether they must be UTF-8 is the caller's
/// business.
pub fn decode(v: &[u8], opts: Options) -> Result<Vec<u8>, Malformed> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        match v[i] {
            b'%' => match escape_at(v, i) {
                Some(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                None if opts.keep_malformed => out.push(b'%'),
                None => return Err(Malformed(i)),
            },
            b'+' if opts.plus_as_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    Ok(out)
}

/// The byte that the escape starting at `v[i]` (a `%`) stands for; `None` when `v[i..]` is
/// not `%` followed by two hex digits (either case).
#[inline]
pub fn escape_at(v: &[u8], i: usize) -> Option<u8> {
    match v.get(i..i + 3) {
        Some([b'%', h, l]) => hex::nibble_any_case(*h)
            .zip(hex::nibble_any_case(*l))
            .map(|(h, l)| (h << 4) | l),
        _ => None,
    }
}

/// Decode into a `String`, replacing bytes that are not UTF-8 with U+FFFD.
pub fn decode_lossy(v: &[u8], opts: Options) -> Result<String, Malformed> {
    let bytes = decode(v, opts)?;
    Ok(match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: Options = Options {
        plus_as_space: false,
        keep_malformed: false,
    };
    const LENIENT_FORM: Options = Options {
        plus_as_space: true,
        keep_malformed: true,
    };

    #[test]
    fn decodes_escapes_in_either_case() {
        assert_eq!(decode(b"a%2Cb%2cc", STRICT), Ok(b"a,b,c".to_vec()));
        assert_eq!(decode(b"%E2%9C%93", STRICT), Ok("✓".as_bytes().to_vec()));
    }

    #[test]
    fn a_malformed_escape_is_refused_or_kept_as_asked() {
        for (bad, at) in [(&b"%"[..], 0), (b"a%2", 1), (b"%zz", 0), (b"ok%g1", 2)] {
            assert_eq!(decode(bad, STRICT), Err(Malformed(at)), "{bad:?}");
            assert_eq!(decode(bad, LENIENT_FORM), Ok(bad.to_vec()), "{bad:?}");
        }
    }

    #[test]
    fn plus_is_a_space_only_in_form_encoding() {
        assert_eq!(decode(b"a+b", STRICT), Ok(b"a+b".to_vec()));
        assert_eq!(decode(b"a+b%2B", LENIENT_FORM), Ok(b"a b+".to_vec()));
    }

    #[test]
    fn lossy_replaces_invalid_utf8() {
        assert_eq!(decode_lossy(b"a%FFb", STRICT), Ok("a\u{fffd}b".to_string()));
    }
}
