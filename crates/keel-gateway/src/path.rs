//! Request paths made safe before any decision is taken on them.
//!
//! A gateway authorises and routes on the path it reads, and the upstream acts on the path it
//! decodes. When the two can differ, a key scoped to `/api/inventory/` reaches
//! `/api/inventory/../../admin` on the upstream's port. [`normalize`] closes that gap: it
//! returns the one path the gateway authorises, routes *and* forwards, and refuses the
//! spellings whose meaning depends on who decodes them.
//!
//! | in the path | done |
//! |---|---|
//! | `.` and `..` segments, written plainly | resolved (RFC 3986 §5.2.4); a `..` that would climb above `/` is refused |
//! | a dot-segment spelled with escapes (`%2e`, `.%2E`) | refused: no client writes one except to slip past a check |
//! | a dot-segment with parameters (`..;x`, `.;`) | refused: some servers (Tomcat) read it as `..` |
//! | `%2F`, `%5C` (escaped `/` and `\`) | refused: whether they separate segments depends on the upstream |
//! | `\` | refused: some upstreams treat it as `/` |
//! | control bytes (below 0x20, 0x7F), raw or escaped; NUL included | refused |
//! | bytes above 0x7F, raw | refused: a path is ASCII on the wire (RFC 3986 §2); send UTF-8 escaped |
//! | `%C0`, `%C1`, `%F5`–`%FF`; `%E0` before `%80`–`%9F`, `%F0` before `%80`–`%8F` | refused: overlong UTF-8 (a lax decoder reads `%C0%AE` and `%E0%80%AE` as `.`) |
//! | a `%` not followed by two hex digits | refused |
//! | escapes of unreserved characters (`%41`, `%7E`) | decoded (RFC 3986 §6.2.2.2), so `/%75sers` routes as `/users` |
//! | other escapes | kept, hex digits made upper case (RFC 3986 §6.2.2.1) |
//! | `//` | merged into `/` when [`PathPolicy::merge_slashes`] (the default, as nginx) |
//!
//! The result is a fixed point (normalising it again changes nothing), and an upstream that
//! percent-decodes it once finds no dot-segment and no separator that the gateway did not
//! see: a route prefix that matches the normalised path also matches what the upstream acts
//! on. The property tests below hold both; `fuzz/fuzz_targets/gateway_path.rs` fuzzes them.
//!
//! A path that needs no rewriting (nearly all of them) is returned borrowed: no allocation.

use std::borrow::Cow;

use keel_core::codec::percent;

/// How paths are normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathPolicy {
    /// Collapse runs of `/` into one (`/a//b` → `/a/b`), as nginx's `merge_slashes on`.
    /// Default on: an empty segment is never a resource anyone meant, and an upstream that
    /// collapses slashes itself would otherwise see a different path than the one routed.
    pub merge_slashes: bool,
}

impl Default for PathPolicy {
    fn default() -> Self {
        PathPolicy {
            merge_slashes: true,
        }
    }
}

/// Why a path was refused (answer 400). `at` is the byte offset in the path as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not `/…` (an asterisk-form or empty target).
    #[error("the path must start with `/`")]
    NotOriginForm,
    /// A control byte, raw or escaped.
    #[error("control byte 0x{byte:02x} at byte {at}")]
    ControlByte {
        /// Offset.
        at: usize,
        /// The byte (after unescaping).
        byte: u8,
    },
    /// A raw byte above 0x7F.
    #[error("a byte above 0x7F at byte {at}: send non-ASCII characters percent-encoded")]
    NotAscii {
        /// Offset.
        at: usize,
    },
    /// A raw `\`.
    #[error("`\\` at byte {at}: some upstreams read it as `/`")]
    Backslash {
        /// Offset.
        at: usize,
    },
    /// `%2F` or `%5C`.
    #[error(
        "an escaped `/` or `\\` at byte {at}: whether it separates segments depends on the upstream"
    )]
    EscapedSeparator {
        /// Offset.
        at: usize,
    },
    /// `%` without two hex digits.
    #[error("a malformed escape at byte {at}: `%` must be followed by two hex digits")]
    BadEscape {
        /// Offset.
        at: usize,
    },
    /// An escape of a byte that is never part of valid UTF-8.
    #[error("an escape at byte {at} is never part of valid UTF-8 (overlong encodings use it)")]
    InvalidUtf8Escape {
        /// Offset.
        at: usize,
    },
    /// `.` or `..` spelled with escapes.
    #[error("a dot-segment spelled with escapes at byte {at}")]
    EscapedDotSegment {
        /// Offset of the segment.
        at: usize,
    },
    /// `.` or `..` followed by `;` parameters.
    #[error("a dot-segment with parameters at byte {at}")]
    DotSegmentParams {
        /// Offset of the segment.
        at: usize,
    },
    /// A `..` with nothing left to remove.
    #[error("`..` at byte {at} climbs above the root")]
    AboveRoot {
        /// Offset of the segment.
        at: usize,
    },
}

/// `path` (the path of a request target, without its query) made safe, or why it cannot be.
/// See the module doc for every rule.
pub fn normalize<'a>(path: &'a str, policy: &PathPolicy) -> Result<Cow<'a, str>, PathError> {
    let raw = path.as_bytes();
    if raw.first() != Some(&b'/') {
        return Err(PathError::NotOriginForm);
    }
    if is_normal(raw, policy) {
        return Ok(Cow::Borrowed(path));
    }
    rewrite(raw, policy).map(Cow::Owned)
}

/// Whether `raw` is already what [`rewrite`] would make of it: one pass over the bytes and
/// the segments, so a clean path costs no allocation.
fn is_normal(raw: &[u8], policy: &PathPolicy) -> bool {
    if raw
        .iter()
        .any(|&b| b == b'%' || b == b'\\' || !(0x20..0x7f).contains(&b))
    {
        return false;
    }
    let mut segments = raw[1..].split(|&b| b == b'/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if is_dot(name(seg)) || (seg.is_empty() && !last && policy.merge_slashes) {
            return false;
        }
    }
    true
}

/// The part of a segment before its `;` parameters — `;` written plainly or escaped
/// (`%3B`: an upstream that decodes before it splits parameters reads `..%3B` as `..;`).
fn name(seg: &[u8]) -> &[u8] {
    let end = (0..seg.len())
        .find(|&i| seg[i] == b';' || (seg[i] == b'%' && percent::escape_at(seg, i) == Some(b';')))
        .unwrap_or(seg.len());
    &seg[..end]
}

fn is_dot(seg: &[u8]) -> bool {
    seg == b"." || seg == b".."
}

/// RFC 3986 §2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn rewrite(raw: &[u8], policy: &PathPolicy) -> Result<String, PathError> {
    // The decoded segments back to back, and the ranges of those kept so far (`..` pops).
    let mut buf = Vec::with_capacity(raw.len());
    let mut kept: Vec<std::ops::Range<usize>> = Vec::new();
    let mut trailing_slash;
    let mut start = 1;
    loop {
        let end = raw[start..]
            .iter()
            .position(|&b| b == b'/')
            .map_or(raw.len(), |p| start + p);
        let last = end == raw.len();
        let from = buf.len();
        let escaped = decode_segment(raw, start, end, &mut buf)?;
        let seg = &buf[from..];
        let (dot, up, empty) = (is_dot(seg), seg == b"..", seg.is_empty());
        if dot && escaped {
            return Err(PathError::EscapedDotSegment { at: start });
        }
        if !dot && is_dot(name(seg)) {
            return Err(PathError::DotSegmentParams { at: start });
        }
        // `/a/b/`, `/a/b/.` and `/a/b/..` name directories: the slash stays.
        trailing_slash = last && (dot || empty);
        if dot {
            buf.truncate(from);
            if up && kept.pop().is_none() {
                return Err(PathError::AboveRoot { at: start });
            }
        } else if !empty || (!last && !policy.merge_slashes) {
            kept.push(from..buf.len());
        }
        if last {
            break;
        }
        start = end + 1;
    }
    let mut path = String::with_capacity(buf.len() + kept.len() + 1);
    for r in kept.iter().cloned() {
        path.push('/');
        // Every byte in `buf` is ASCII: raw bytes were checked, other escapes kept as `%XX`.
        path.extend(buf[r].iter().map(|&b| char::from(b)));
    }
    if trailing_slash || kept.is_empty() {
        path.push('/');
    }
    Ok(path)
}

/// Append `raw[start..end]` (one segment) to `out`, checked and with unreserved escapes
/// decoded; whether any escape was decoded.
fn decode_segment(
    raw: &[u8],
    start: usize,
    end: usize,
    out: &mut Vec<u8>,
) -> Result<bool, PathError> {
    let mut decoded = false;
    // The byte the previous escape stood for, when the previous character was an escape.
    let mut lead: Option<u8> = None;
    let mut i = start;
    while i < end {
        let b = raw[i];
        if b != b'%' {
            lead = None;
        }
        match b {
            b'%' => {
                let Some(v) = percent::escape_at(&raw[..end], i) else {
                    return Err(PathError::BadEscape { at: i });
                };
                // Overlong three- and four-byte forms (`%E0%80%AE` is a `.` to a lax decoder).
                if matches!(
                    (lead, v),
                    (Some(0xe0), 0x80..=0x9f) | (Some(0xf0), 0x80..=0x8f)
                ) {
                    return Err(PathError::InvalidUtf8Escape { at: i });
                }
                lead = Some(v);
                if v < 0x20 || v == 0x7f {
                    return Err(PathError::ControlByte { at: i, byte: v });
                }
                if v == b'/' || v == b'\\' {
                    return Err(PathError::EscapedSeparator { at: i });
                }
                if matches!(v, 0xc0 | 0xc1 | 0xf5..=0xff) {
                    return Err(PathError::InvalidUtf8Escape { at: i });
                }
                if is_unreserved(v) {
                    out.push(v);
                    decoded = true;
                } else {
                    out.extend_from_slice(&[
                        b'%',
                        HEX_UPPER[usize::from(v >> 4)],
                        HEX_UPPER[usize::from(v & 0xf)],
                    ]);
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(PathError::Backslash { at: i }),
            0x80.. => return Err(PathError::NotAscii { at: i }),
            _ if b < 0x20 || b == 0x7f => return Err(PathError::ControlByte { at: i, byte: b }),
            _ => out.push(b),
        }
        i += 1;
    }
    Ok(decoded)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MERGE: PathPolicy = PathPolicy {
        merge_slashes: true,
    };
    const KEEP: PathPolicy = PathPolicy {
        merge_slashes: false,
    };

    fn ok(p: &str) -> String {
        normalize(p, &MERGE)
            .unwrap_or_else(|e| panic!("{p:?}: {e}"))
            .into_owned()
    }

    fn refused(p: &str) -> PathError {
        match normalize(p, &MERGE) {
            Err(e) => e,
            Ok(n) => panic!("{p:?} was accepted as {n:?}"),
        }
    }

    #[test]
    fn clean_paths_come_back_borrowed_and_unchanged() {
        for p in [
            "/",
            "/api/users/usr_1",
            "/api/users/",
            "/a/b.c/.d/..e/...",
            "/a;b=c/d",
            "/~user/-_.",
        ] {
            let n = normalize(p, &MERGE).unwrap();
            assert!(matches!(n, Cow::Borrowed(_)), "{p}");
            assert_eq!(n, p);
        }
    }

    #[test]
    fn plain_dot_segments_are_resolved_as_rfc_3986_says() {
        // RFC 3986 §5.4 examples, and the directory forms.
        assert_eq!(ok("/a/b/c/./../../g"), "/a/g");
        assert_eq!(ok("/mid/content=5/../6"), "/mid/6");
        assert_eq!(ok("/a/./b"), "/a/b");
        assert_eq!(ok("/a/b/."), "/a/b/");
        assert_eq!(ok("/a/b/.."), "/a/");
        assert_eq!(ok("/a/.."), "/");
        assert_eq!(ok("/."), "/");
        assert_eq!(ok("/api/inventory/../users/x"), "/api/users/x");
    }

    #[test]
    fn slashes_merge_by_default_and_stay_when_asked() {
        assert_eq!(ok("//a///b//"), "/a/b/");
        assert_eq!(ok("//"), "/");
        assert_eq!(normalize("//a//b", &KEEP).unwrap(), "//a//b");
        assert_eq!(normalize("/a//..", &KEEP).unwrap(), "/a/");
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_upper_cased() {
        assert_eq!(ok("/api/%75sers/%41%7e"), "/api/users/A~");
        assert_eq!(ok("/a%2eb"), "/a.b");
        assert_eq!(ok("/q%3fx%2a%25"), "/q%3Fx%2A%25");
        assert_eq!(ok("/%E2%9C%93"), "/%E2%9C%93");
        // Three- and four-byte forms that are not overlong pass.
        assert_eq!(ok("/%e0%a4%85%f0%9f%98%80"), "/%E0%A4%85%F0%9F%98%80");
    }

    /// The refusal corpus: each spelling some server somewhere reads differently.
    #[test]
    fn a_corpus_of_hostile_paths_is_refused_for_the_right_reason() {
        use PathError::*;
        type Expect = fn(PathError) -> bool;
        let cases: &[(&str, Expect)] = &[
            ("", |e| e == NotOriginForm),
            ("*", |e| e == NotOriginForm),
            ("api/users", |e| e == NotOriginForm),
            ("/..", |e| matches!(e, AboveRoot { .. })),
            ("/api/../../admin", |e| matches!(e, AboveRoot { .. })),
            ("/a/../../b", |e| matches!(e, AboveRoot { .. })),
            ("/api/inventory/%2e%2e/%2e%2e/admin", |e| {
                matches!(e, EscapedDotSegment { at: 15 })
            }),
            ("/api/%2E%2E/admin", |e| {
                matches!(e, EscapedDotSegment { .. })
            }),
            ("/api/.%2e/admin", |e| matches!(e, EscapedDotSegment { .. })),
            ("/api/%2e./admin", |e| matches!(e, EscapedDotSegment { .. })),
            ("/api/%2e/admin", |e| matches!(e, EscapedDotSegment { .. })),
            ("/api/..;/admin", |e| matches!(e, DotSegmentParams { .. })),
            ("/api/..;x=1/admin", |e| {
                matches!(e, DotSegmentParams { .. })
            }),
            ("/api/.;/admin", |e| matches!(e, DotSegmentParams { .. })),
            ("/api/%2e%2e;/admin", |e| {
                matches!(e, DotSegmentParams { .. })
            }),
            ("/api/..%3b/admin", |e| matches!(e, DotSegmentParams { .. })),
            ("/api/%2e%2e%3B/admin", |e| {
                matches!(e, DotSegmentParams { .. })
            }),
            ("/api/users%2f..%2f..%2fadmin", |e| {
                matches!(e, EscapedSeparator { at: 10 })
            }),
            ("/api/users%2F..", |e| matches!(e, EscapedSeparator { .. })),
            ("/api/users%5c..%5cadmin", |e| {
                matches!(e, EscapedSeparator { .. })
            }),
            ("/api/users\\..\\admin", |e| {
                matches!(e, Backslash { at: 10 })
            }),
            ("/api/users/%00", |e| {
                matches!(e, ControlByte { byte: 0, .. })
            }),
            ("/api/users/\0", |e| {
                matches!(e, ControlByte { byte: 0, .. })
            }),
            ("/api/users/%0d%0aX-Injected:1", |e| {
                matches!(e, ControlByte { byte: 0x0d, .. })
            }),
            ("/api/users/\t", |e| {
                matches!(e, ControlByte { byte: 9, .. })
            }),
            ("/api/users/%7f", |e| {
                matches!(e, ControlByte { byte: 0x7f, .. })
            }),
            ("/api/users/%", |e| matches!(e, BadEscape { at: 11 })),
            ("/api/users/%2", |e| matches!(e, BadEscape { .. })),
            ("/api/users/%zz", |e| matches!(e, BadEscape { .. })),
            ("/api/users/%%32%65", |e| matches!(e, BadEscape { .. })),
            // Overlong UTF-8 for `.` and `/`: two, three and four bytes long.
            ("/api/%c0%ae%c0%ae/admin", |e| {
                matches!(e, InvalidUtf8Escape { .. })
            }),
            ("/api/%e0%80%ae%e0%80%ae/admin", |e| {
                matches!(e, InvalidUtf8Escape { at: 8 })
            }),
            ("/api/%f0%80%80%af", |e| {
                matches!(e, InvalidUtf8Escape { at: 8 })
            }),
            ("/api/%c0%af", |e| matches!(e, InvalidUtf8Escape { .. })),
            ("/api/%c1%9c", |e| matches!(e, InvalidUtf8Escape { .. })),
            ("/api/%ff", |e| matches!(e, InvalidUtf8Escape { .. })),
            ("/api/users/é", |e| matches!(e, NotAscii { .. })),
        ];
        for (path, right) in cases {
            let e = refused(path);
            assert!(right(e), "{path:?} refused as {e:?} ({e})");
        }
    }

    #[test]
    fn double_encoding_is_decoded_once_only() {
        // `%252e` is an escaped `%` followed by `2e`: forwarded as it came, and an upstream
        // that decodes once sees the text `%2e`, not a dot.
        assert_eq!(ok("/a/%252e%252e/b"), "/a/%252e%252e/b");
    }

    /// Decode every escape once, as an upstream would.
    fn upstream_view(p: &str) -> Vec<u8> {
        keel_core::codec::percent::decode(p.as_bytes(), Default::default()).unwrap()
    }

    fn tokens() -> impl Strategy<Value = String> {
        let token = prop_oneof![
            Just("/".to_string()),
            Just(".".to_string()),
            Just("..".to_string()),
            Just("%2e".to_string()),
            Just("%2E".to_string()),
            Just("%2f".to_string()),
            Just("%5C".to_string()),
            Just("\\".to_string()),
            Just(";".to_string()),
            Just("%3b".to_string()),
            Just("%25".to_string()),
            Just("%".to_string()),
            Just("%41".to_string()),
            Just("%c0%ae".to_string()),
            Just("%00".to_string()),
            Just("a".to_string()),
            Just("api".to_string()),
            Just("users".to_string()),
            "[ -~]{0,3}",
        ];
        proptest::collection::vec(token, 0..16).prop_map(|t| format!("/{}", t.concat()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn normalising_is_idempotent(p in tokens(), merge in any::<bool>()) {
            let policy = PathPolicy { merge_slashes: merge };
            if let Ok(n) = normalize(&p, &policy) {
                let again = normalize(&n, &policy);
                prop_assert_eq!(again.as_deref(), Ok(&*n));
            }
        }

        #[test]
        fn the_upstream_sees_no_dot_segment_and_the_same_segments(
            p in tokens(),
            merge in any::<bool>(),
        ) {
            let policy = PathPolicy { merge_slashes: merge };
            if let Ok(n) = normalize(&p, &policy) {
                prop_assert!(n.starts_with('/'));
                prop_assert!(n.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\\'));
                let seen = upstream_view(&n);
                let ours: Vec<&str> = n.split('/').collect();
                let theirs: Vec<&[u8]> = seen.split(|&b| b == b'/').collect();
                // Decoding once adds no separator: a prefix of segments is the same prefix.
                prop_assert_eq!(ours.len(), theirs.len());
                for seg in &theirs {
                    prop_assert!(!is_dot(name(seg)), "{:?} -> {:?}", p, n);
                }
            }
        }

        #[test]
        fn a_prefix_is_never_widened(tail in tokens()) {
            // Whatever follows a route's prefix, the normalised path is either still under
            // the prefix, or names the parent it climbed to, which the router sees as well.
            let p = format!("/api/inventory{tail}");
            if let Ok(n) = normalize(&p, &MERGE) {
                let under = n == "/api/inventory" || n.starts_with("/api/inventory/");
                let climbed = tail.contains("..");
                prop_assert!(under || climbed, "{:?} -> {:?}", p, n);
                if under {
                    // The upstream's own decoding stays under the prefix too.
                    let seen = upstream_view(&n);
                    prop_assert!(seen.starts_with(b"/api/inventory"));
                }
            }
        }
    }
}
