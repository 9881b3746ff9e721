//! The response body the client hands out. It does two jobs at the end of the body, which is
//! the first moment either can be done right:
//!
//! - returns the HTTP/1.1 connection to its pool (a connection is reusable only once the
//!   response has been read to its end; dropped half-read, it is closed);
//! - for gRPC responses whose status travels in trailers after the messages, reads
//!   `grpc-status` there and reports it to the outlier detector and the breaker, which a
//!   status check on the response headers cannot see.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskCx, Poll, ready};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

use crate::breaker::Admitted;
use crate::pool::Lease;
use crate::upstream::Upstream;

/// A response body from the Keel client.
pub struct Body {
    inner: Incoming,
    lease: Option<Lease>,
    trailers: Option<GrpcOutcome>,
}

/// What to report when a gRPC status arrives in trailers.
pub(crate) struct GrpcOutcome {
    pub upstream: Arc<Upstream>,
    pub addr: SocketAddr,
    pub admitted: Admitted,
}

impl Body {
    pub(crate) fn new(inner: Incoming, lease: Lease) -> Body {
        let mut body = Body {
            inner,
            lease: Some(lease),
            trailers: None,
        };
        // No body at all (204, HEAD, `Content-Length: 0`): callers need not poll it, so the
        // connection goes back now.
        if http_body::Body::is_end_stream(&body.inner) {
            body.finish();
        }
        body
    }

    /// A body whose connection is not the pool's any more (a `101 Switching Protocols`).
    pub(crate) fn detached(inner: Incoming) -> Body {
        Body {
            inner,
            lease: None,
            trailers: None,
        }
    }

    pub(crate) fn report_trailers_to(&mut self, outcome: GrpcOutcome) {
        self.trailers = Some(outcome);
    }

    fn finish(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.finish();
        }
    }

    fn on_trailers(&mut self, t: &HeaderMap) {
        let Some(o) = self.trailers.take() else {
            return;
        };
        let code = keel_core::grpc::status(t);
        // No status at all is a broken response (gRPC says INTERNAL); count it as a failure.
        let healthy = code.is_some_and(|c| !keel_core::grpc::is_server_failure(c));
        o.upstream.report(o.addr, healthy, None);
        if healthy {
            o.admitted.success();
        } else {
            o.admitted.failure();
        }
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("leased", &self.lease.is_some())
            .finish_non_exhaustive()
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(t) = f.trailers_ref() {
                    this.on_trailers(t);
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            None => {
                if this.trailers.is_some() {
                    // Ended without trailers: no gRPC status was ever sent.
                    this.on_trailers(&HeaderMap::new());
                }
                this.finish();
            }
            // The lease drops with the body and closes the connection.
            Some(Err(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A streaming request body, boxed once per call.
pub(crate) type BoxedBody =
    Pin<Box<dyn http_body::Body<Data = Bytes, Error = keel_core::BoxError> + Send>>;

/// The body of an outgoing request as the connection sees it: the whole thing at once (the
/// usual case, cheap to resend) or a stream read as it is written.
pub(crate) enum OutBody {
    /// `None` once sent (or when empty from the start).
    Full(Option<Bytes>),
    Stream(BoxedBody),
}

impl std::fmt::Debug for OutBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OutBody::Full(b) => write!(f, "Full({} bytes)", b.as_ref().map_or(0, Bytes::len)),
            OutBody::Stream(_) => f.write_str("Stream"),
        }
    }
}

impl OutBody {
    pub(crate) fn full(bytes: Bytes) -> OutBody {
        OutBody::Full((!bytes.is_empty()).then_some(bytes))
    }
}

impl http_body::Body for OutBody {
    type Data = Bytes;
    type Error = keel_core::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            OutBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            OutBody::Stream(body) => body.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OutBody::Full(bytes) => bytes.is_none(),
            OutBody::Stream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OutBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            OutBody::Stream(body) => body.size_hint(),
        }
    }
}

/// What a call sends, attempt after attempt.
pub(crate) enum Payload {
    /// Held whole: every attempt sends a copy (a reference count, not the bytes).
    Whole(Bytes),
    /// A stream, which can be sent once. It sits here until an attempt takes it, and comes
    /// back when the attempt failed before reading any of it (no connection, or hyper
    /// handing the request back), so such failures may still be retried.
    Stream(std::sync::Mutex<Option<BoxedBody>>),
}

impl Payload {
    /// The body for the next attempt; `None`: a stream already taken by an earlier one.
    pub(crate) fn take(&self) -> Option<OutBody> {
        match self {
            Payload::Whole(b) => Some(OutBody::full(b.clone())),
            Payload::Stream(slot) => lock(slot).take().map(OutBody::Stream),
        }
    }

    /// An attempt's body that was never read: the next attempt may send it.
    pub(crate) fn put_back(&self, body: OutBody) {
        if let (Payload::Stream(slot), OutBody::Stream(b)) = (self, body) {
            *lock(slot) = Some(b);
        }
    }

    /// Whether another attempt has something to send.
    pub(crate) fn replayable(&self) -> bool {
        match self {
            Payload::Whole(_) => true,
            Payload::Stream(slot) => lock(slot).is_some(),
        }
    }

    pub(crate) fn is_stream(&self) -> bool {
        matches!(self, Payload::Stream(_))
    }
}

fn lock(
    slot: &std::sync::Mutex<Option<BoxedBody>>,
) -> std::sync::MutexGuard<'_, Option<BoxedBody>> {
    slot.lock().unwrap_or_else(|p| p.into_inner())
}
