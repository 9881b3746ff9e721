//! Header codecs for the context Keel propagates on every request: deadlines, trace identity,
//! baggage and request ids.
//!
//! Each submodule owns one wire format and cites the spec it implements:
//!
//! - [`timeout`]: `grpc-timeout` from *gRPC over HTTP/2* (also used for `keel-timeout`), and
//!   Envoy's `x-envoy-expected-rq-timeout-ms`.
//! - [`trace`]: `traceparent` / `tracestate` from *W3C Trace Context* (level 1).
//! - [`b3`]: Zipkin's `b3` single header and `X-B3-*` multi headers from *openzipkin/b3-propagation*.
//! - [`baggage`]: `baggage` from *W3C Baggage*.
//! - [`request_id`]: the `x-request-id` acceptance rule and generator.
//! - [`rand`]: the fast, **non-cryptographic** generator behind new trace, span and request ids.
//!
//! These run on the request hot path, so parsers take the raw header bytes (`&[u8]`, exactly what
//! `http::HeaderValue::as_bytes` gives) and only allocate for what they keep; encoders write into
//! a stack buffer or a `String` sized exactly once. Fuzz targets for every parser live in the
//! separate `fuzz/` package at the workspace root.

mod hex;

pub mod b3;
pub mod baggage;
pub mod percent;
pub mod rand;
pub mod request_id;
pub mod timeout;
pub mod trace;

pub use baggage::Baggage;
pub use trace::{SpanId, TraceId, TraceParent, TraceState};

use std::fmt;

/// A malformed header: which header, and why.
///
/// It is a leaf error: the usual reaction is to ignore the header (start a new trace, use the
/// default deadline), so callers mostly log it rather than propagate it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError {
    /// The header's lowercase name, e.g. `"traceparent"`.
    pub header: &'static str,
    /// What was wrong with it, for logs.
    pub reason: String,
}

impl CodecError {
    pub(crate) fn new(header: &'static str, reason: impl Into<String>) -> Self {
        Self {
            header,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed {} header: {}", self.header, self.reason)
    }
}

impl std::error::Error for CodecError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_display_names_the_header_and_the_reason() {
        let e = CodecError::new("traceparent", "too short");
        assert_eq!(e.to_string(), "malformed traceparent header: too short");
        let boxed: crate::BoxError = Box::new(e);
        assert!(crate::is_caused_by::<CodecError>(boxed.as_ref()));
    }
}
