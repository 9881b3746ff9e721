//! Building each request's [`keel_core::Context`] and answering when it cannot be built or
//! its deadline passes: 400 / `INVALID_ARGUMENT` for a malformed propagation header,
//! 504 / `DEADLINE_EXCEEDED` for a deadline that passed (gRPC callers get a trailers-only
//! gRPC status, since an HTTP status would read as a transport failure to them).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use keel_core::context::{InboundError, InboundPolicy};

use crate::config::DeadlineConfig;

/// Per-route deadline maxima, longest path prefix first.
#[derive(Debug, Clone)]
pub(crate) struct DeadlinePolicy {
    default: Duration,
    routes: Vec<(String, Duration)>,
    sample_ratio: f64,
}

impl DeadlinePolicy {
    pub(crate) fn new(cfg: &DeadlineConfig, sample_ratio: f64) -> Self {
        let mut routes: Vec<(String, Duration)> = cfg
            .routes
            .iter()
            .map(|(p, d)| (p.clone(), unbounded_if_zero(d.get())))
            .collect();
        routes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        DeadlinePolicy {
            default: unbounded_if_zero(cfg.default.get()),
            routes,
            sample_ratio,
        }
    }

    /// The inbound policy for `path`.
    pub(crate) fn for_path(&self, path: &str) -> InboundPolicy {
        let route_timeout = self
            .routes
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix.as_str()))
            .map_or(self.default, |(_, d)| *d);
        // The draw decides only for traces this request starts; a caller's flag wins. Made per
        // request (not per trace id): the decision travels in the flag, so hops agree anyway.
        let sample_roots = self.sample_ratio >= 1.0
            || (self.sample_ratio > 0.0 && unit_draw() < self.sample_ratio);
        InboundPolicy {
            route_timeout,
            sample_roots,
        }
    }
}

/// What "no deadline" means: far enough that nothing real waits for it, near enough that
/// `Instant` arithmetic cannot overflow.
const UNBOUNDED: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// `0s` configures a route without a Keel deadline (streams, long polls, websockets): only
/// what the caller sends applies there.
fn unbounded_if_zero(d: Duration) -> Duration {
    if d.is_zero() { UNBOUNDED } else { d }
}

/// Is this a gRPC request? (`content-type: application/grpc[+proto|;...]`)
pub(crate) fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// gRPC status codes Keel answers with.
#[derive(Debug, Clone, Copy)]
pub(crate) enum GrpcCode {
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    Unavailable = 14,
}

/// The response for a request refused before its handler ran.
pub(crate) fn refusal(err: &InboundError, grpc: bool) -> Response<Full<Bytes>> {
    match err {
        InboundError::Malformed(e) => {
            let msg = e.to_string();
            if grpc {
                grpc_status(GrpcCode::InvalidArgument, &msg)
            } else {
                text(StatusCode::BAD_REQUEST, format!("{msg}\n"))
            }
        }
        InboundError::Expired(_) => deadline_exceeded(grpc),
    }
}

/// 504, or gRPC `DEADLINE_EXCEEDED`.
pub(crate) fn deadline_exceeded(grpc: bool) -> Response<Full<Bytes>> {
    if grpc {
        grpc_status(GrpcCode::DeadlineExceeded, "deadline exceeded")
    } else {
        text(StatusCode::GATEWAY_TIMEOUT, "deadline exceeded\n".into())
    }
}

/// A request shed by overload protection: 503 with `Retry-After`, or gRPC `UNAVAILABLE` (the
/// request was not processed, so a client may retry it elsewhere). Too little time left
/// answers like an expired deadline.
pub(crate) fn overloaded(
    why: crate::overload::Shed,
    grpc: bool,
    retry_after: &HeaderValue,
) -> Response<Full<Bytes>> {
    if why == crate::overload::Shed::Deadline {
        return deadline_exceeded(grpc);
    }
    let msg = format!("overloaded ({}); retry later", why.as_str());
    let mut r = if grpc {
        grpc_status(GrpcCode::Unavailable, &msg)
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, format!("{msg}\n"))
    };
    r.headers_mut()
        .insert(header::RETRY_AFTER, retry_after.clone());
    r
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A trailers-only gRPC response: HTTP 200 whose headers carry the status.
fn grpc_status(code: GrpcCode, message: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code as u16));
    if let Ok(v) = HeaderValue::from_str(&percent_encode_grpc_message(message)) {
        h.insert("grpc-message", v);
    }
    r
}

/// `grpc-message` is percent-encoded UTF-8 (gRPC over HTTP/2 spec): everything outside
/// printable ASCII, and `%` itself, is escaped.
fn percent_encode_grpc_message(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The request id as a response header value.
pub(crate) fn request_id_value(id: &Arc<str>) -> Option<HeaderValue> {
    HeaderValue::from_str(id).ok()
}

/// A uniform draw in `[0, 1)` from Keel's per-thread generator.
fn unit_draw() -> f64 {
    (keel_core::codec::rand::next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn longest_route_prefix_wins_and_default_applies_elsewhere() {
        let mut routes = BTreeMap::new();
        routes.insert("/api".to_string(), keel_config::Duration::from_secs(5));
        routes.insert(
            "/api/orders".to_string(),
            keel_config::Duration::from_secs(2),
        );
        let p = DeadlinePolicy::new(
            &DeadlineConfig {
                default: keel_config::Duration::from_secs(30),
                routes,
            },
            0.0,
        );
        assert_eq!(
            p.for_path("/api/orders/7").route_timeout,
            Duration::from_secs(2)
        );
        assert_eq!(
            p.for_path("/api/users").route_timeout,
            Duration::from_secs(5)
        );
        assert_eq!(p.for_path("/").route_timeout, Duration::from_secs(30));
    }

    #[test]
    fn zero_means_no_keel_deadline_on_that_route() {
        let mut routes = BTreeMap::new();
        routes.insert("/watch".to_string(), keel_config::Duration::from_secs(0));
        let p = DeadlinePolicy::new(
            &DeadlineConfig {
                default: keel_config::Duration::from_secs(30),
                routes,
            },
            0.0,
        );
        assert!(p.for_path("/watch/orders").route_timeout > Duration::from_secs(365 * 24 * 3600));
    }

    #[test]
    fn the_sample_ratio_decides_the_share_of_sampled_roots() {
        let p = |ratio| DeadlinePolicy::new(&DeadlineConfig::default(), ratio);
        let sampled = |ratio| {
            (0..10_000)
                .filter(|_| p(ratio).for_path("/").sample_roots)
                .count()
        };
        assert_eq!(sampled(0.0), 0);
        assert_eq!(sampled(1.0), 10_000);
        let quarter = sampled(0.25);
        assert!((2_200..=2_800).contains(&quarter), "{quarter}");
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(
            percent_encode_grpc_message("a 100% ✓"),
            "a 100%25 %E2%9C%93"
        );
    }
}
