//! gRPC over HTTP/2, the few facts Keel's server, client and telemetry all need, written once:
//! is a message gRPC, the status codes Keel cares about, reading `grpc-status`, and encoding
//! `grpc-message`.

use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName};

/// `grpc-status`.
pub const STATUS: &str = "grpc-status";
/// `grpc-message`.
pub const MESSAGE: &str = "grpc-message";
/// [`STATUS`] as a header name, made once: a map looked up by a `&str` parses and checks the
/// name every time (about 300 instructions), and every gRPC answer is looked up for it.
pub static STATUS_HEADER: HeaderName = HeaderName::from_static(STATUS);
/// [`MESSAGE`] as a header name.
pub static MESSAGE_HEADER: HeaderName = HeaderName::from_static(MESSAGE);
/// The gRPC content type (`application/grpc`, optionally `+proto`, `+json`, `;…`).
pub const CONTENT_TYPE_PREFIX: &[u8] = b"application/grpc";

/// gRPC status codes (the numbering of `google.rpc.Code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Code {
    /// Success.
    Ok = 0,
    /// The operation was cancelled, typically by the caller.
    Cancelled = 1,
    /// A malformed argument (Keel: a malformed propagation header).
    InvalidArgument = 3,
    /// The deadline passed.
    DeadlineExceeded = 4,
    /// The caller lacks permission.
    PermissionDenied = 7,
    /// Out of a resource (quota, memory).
    ResourceExhausted = 8,
    /// The method is not implemented (gRPC's "no such route").
    Unimplemented = 12,
    /// An internal error.
    Internal = 13,
    /// The service cannot take the call now; safe to retry elsewhere.
    Unavailable = 14,
}

/// Is this message gRPC (by its `content-type`)?
#[inline]
pub fn is_grpc(h: &HeaderMap) -> bool {
    h.get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(CONTENT_TYPE_PREFIX))
}

/// The `grpc-status` in `h`, if present and numeric.
#[inline]
pub fn status(h: &HeaderMap) -> Option<i32> {
    parse_status(h.get(&STATUS_HEADER)?.as_bytes())
}

/// A `grpc-status` value: 1 to 3 decimal digits.
pub fn parse_status(v: &[u8]) -> Option<i32> {
    if v.is_empty() || v.len() > 3 {
        return None;
    }
    v.iter().try_fold(0i32, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + i32::from(b - b'0'))
    })
}

/// Codes that speak against the server rather than the request, so a client may count them
/// as failures (breakers, outlier detection) and retry them where safe: UNAVAILABLE,
/// DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL. INVALID_ARGUMENT or NOT_FOUND are the
/// caller's business.
pub fn is_server_failure(code: i32) -> bool {
    matches!(code, 14 | 4 | 8 | 13)
}

/// `grpc-message` is percent-encoded UTF-8 (gRPC over HTTP/2): everything outside printable
/// ASCII, and `%` itself, is escaped.
pub fn encode_message(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_is_recognised_by_content_type_prefix() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc;x=1",
        ] {
            h.insert(CONTENT_TYPE, http::HeaderValue::from_static(ct));
            assert!(is_grpc(&h), "{ct}");
        }
        h.insert(
            CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        assert!(!is_grpc(&h));
    }

    #[test]
    fn status_parses_only_short_decimal_values() {
        assert_eq!(parse_status(b"0"), Some(0));
        assert_eq!(parse_status(b"14"), Some(14));
        for bad in [&b""[..], b"-1", b"1a", b"1234", b" 1"] {
            assert_eq!(parse_status(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn message_is_percent_encoded() {
        assert_eq!(encode_message("a 100% ✓"), "a 100%25 %E2%9C%93");
    }
}
