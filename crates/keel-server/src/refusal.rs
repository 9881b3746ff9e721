//! The answers Keel gives instead of the handler's: 400 / `INVALID_ARGUMENT` for a malformed
//! propagation header, 413 for a body over the limit, 503 / `UNAVAILABLE` for a request shed
//! by overload protection, 504 / `DEADLINE_EXCEEDED` for a deadline that passed, 500 for a
//! service that failed without an answer. gRPC callers get a trailers-only gRPC status,
//! since an HTTP status would read as a transport failure to them.
//!
//! Each refusal carries a [`Refused`] marker in its extensions, so the layers around it (the
//! observation layer, the response headers) know without re-deriving it from the status.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use keel_core::grpc::{self, Code};
use keel_core::observe::Outcome;

use crate::body::Fixed;

/// Marks a response Keel made in place of the handler's, with how the request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub Outcome);

/// Marks a response after which the connection must close (the refused body is still unread
/// on the wire), so no `Keep-Alive` is advertised with it.
#[derive(Debug, Clone, Copy)]
pub struct CloseConnection;

/// 400 (or `INVALID_ARGUMENT`) naming what did not parse.
pub fn malformed(message: &str, grpc: bool) -> Response<Fixed> {
    let r = if grpc {
        grpc_status(Code::InvalidArgument, message)
    } else {
        text(StatusCode::BAD_REQUEST, format!("{message}\n"))
    };
    marked(r, Outcome::Refused)
}

/// 504, or gRPC `DEADLINE_EXCEEDED`.
pub fn deadline_exceeded(grpc: bool) -> Response<Fixed> {
    let r = if grpc {
        grpc_status(Code::DeadlineExceeded, "deadline exceeded")
    } else {
        fixed(StatusCode::GATEWAY_TIMEOUT, "deadline exceeded\n")
    };
    marked(r, Outcome::DeadlineExceeded)
}

/// A request shed by overload protection: 503 with `Retry-After`, or gRPC `UNAVAILABLE` (the
/// request was not processed, so a client may retry it elsewhere). Too little time left
/// answers like an expired deadline.
pub fn overloaded(
    why: crate::overload::Shed,
    grpc: bool,
    retry_after: &HeaderValue,
) -> Response<Fixed> {
    if why == crate::overload::Shed::Deadline {
        return deadline_exceeded(grpc);
    }
    let msg = format!("overloaded ({}); retry later", why.as_str());
    let mut r = if grpc {
        grpc_status(Code::Unavailable, &msg)
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, format!("{msg}\n"))
    };
    r.headers_mut()
        .insert(header::RETRY_AFTER, retry_after.clone());
    marked(r, Outcome::Refused)
}

/// 413: the declared body is over `server.max_body_bytes`. The body is still on the wire, so
/// hyper closes the connection after this answer.
pub fn too_large() -> Response<Fixed> {
    let mut r = marked(
        fixed(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n"),
        Outcome::Refused,
    );
    r.extensions_mut().insert(CloseConnection);
    r
}

/// 500: the service returned an error instead of a response.
pub fn internal_error() -> Response<Fixed> {
    marked(
        fixed(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n"),
        Outcome::Failed,
    )
}

fn marked(mut r: Response<Fixed>, outcome: Outcome) -> Response<Fixed> {
    r.extensions_mut().insert(Refused(outcome));
    r
}

/// A small fixed plain-text response.
pub(crate) fn fixed(status: StatusCode, body: &'static str) -> Response<Fixed> {
    with_text(status, Full::new(Bytes::from_static(body.as_bytes())))
}

fn text(status: StatusCode, body: String) -> Response<Fixed> {
    with_text(status, Full::new(Bytes::from(body)))
}

fn with_text(status: StatusCode, body: Fixed) -> Response<Fixed> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A trailers-only gRPC response: HTTP 200 whose headers carry the status.
fn grpc_status(code: Code, message: &str) -> Response<Fixed> {
    let mut r = Response::new(Full::new(Bytes::new()));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(grpc::STATUS_HEADER.clone(), HeaderValue::from(code as u16));
    if let Ok(v) = HeaderValue::from_str(&grpc::encode_message(message)) {
        h.insert(grpc::MESSAGE_HEADER.clone(), v);
    }
    r
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn grpc_callers_get_a_trailers_only_status_and_others_a_status_code() {
        let r = deadline_exceeded(true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[grpc::STATUS], "4");
        assert_eq!(
            r.extensions().get::<Refused>(),
            Some(&Refused(Outcome::DeadlineExceeded))
        );
        let r = malformed("bad traceparent", false);
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let r = malformed("bad ✓", true);
        assert_eq!(r.headers()[grpc::MESSAGE], "bad %E2%9C%93");
    }

    #[test]
    fn shed_requests_say_when_to_come_back_and_too_large_closes() {
        let r = overloaded(
            crate::overload::Shed::QueueFull,
            false,
            &HeaderValue::from_static("2"),
        );
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        assert!(too_large().extensions().get::<CloseConnection>().is_some());
    }
}
