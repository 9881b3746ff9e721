//! The bodies of Keel's request path.
//!
//! - [`RequestBody`]: what a user's service reads — hyper's body capped at
//!   `server.max_body_bytes` (the limits layer puts the cap on).
//! - [`ResponseBody`]: what every layer answers with — the service's own body, or a small
//!   fixed one (a probe, a refusal) — carrying [`Guards`]: each layer's per-request state that
//!   must live until the response has really ended (the in-flight count, the telemetry record,
//!   the overload slot, the request's task scope), released at the body's last frame, on its
//!   error, or when the caller goes away and the body is dropped.
//!
//! One body type with a slot per layer, rather than a wrapper per layer: a layer puts its
//! guard in place (`resp.body_mut().guards().slot = …`) instead of taking the response apart
//! and building a bigger one, so the response is not copied at every level on its way out.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Full, Limited};
use hyper::body::Incoming;
use keel_core::BoxError;

use crate::conn::InFlight;
use crate::layer::context::RequestEnd;
use crate::layer::observe::Record;
use crate::overload::Permit;

/// The request body handed to user services: hyper's body, capped at `server.max_body_bytes`.
/// Reading past the cap yields `http_body_util::LengthLimitError`, which axum's extractors turn
/// into 413.
pub type RequestBody = Limited<Incoming>;

/// A small body Keel writes itself (probe answers, refusals).
pub type Fixed = Full<Bytes>;

pin_project_lite::pin_project! {
    /// The user's body or one of Keel's own.
    #[project = KeelBodyProj]
    #[derive(Debug)]
    pub enum KeelBody<B> {
        /// The service's body.
        Inner { #[pin] body: B },
        /// A body Keel wrote. Boxed: it is the rare case (a probe, a refusal), and inline it
        /// would make every response 16 bytes bigger (see [`Guards`] for why that counts).
        Fixed { body: Box<Fixed> },
    }
}

impl<B> KeelBody<B> {
    /// Wrap the service's body.
    pub fn inner(body: B) -> Self {
        KeelBody::Inner { body }
    }
}

impl<B> From<Fixed> for KeelBody<B> {
    fn from(body: Fixed) -> Self {
        KeelBody::Fixed {
            body: Box::new(body),
        }
    }
}

impl<B> Body for KeelBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            KeelBodyProj::Inner { body } => body.poll_frame(cx).map_err(Into::into),
            KeelBodyProj::Fixed { body } => Pin::new(&mut **body)
                .poll_frame(cx)
                .map_err(|never| match never {}),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            KeelBody::Inner { body } => body.is_end_stream(),
            KeelBody::Fixed { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            KeelBody::Inner { body } => body.size_hint(),
            KeelBody::Fixed { body } => body.size_hint(),
        }
    }
}

/// The per-request state of the default stack's layers, held until the response ends.
/// Released in order: the overload slot first (the next request may start), then the
/// telemetry record (which sees the outcome), the request's scope, the in-flight count.
///
/// Kept small on purpose: it travels inside every response, and the response moves by
/// value a dozen times on its way out through the layers and hyper. Past 256 bytes each of
/// those `memcpy`s takes glibc's slower loop: shrinking the response from 344 to 256 bytes
/// saved 560 instructions per `GET /` (callgrind, `hello`). So no guard stores what it can
/// be handed when the body ends (the end time), and a test holds the size.
#[derive(Debug, Default)]
pub struct Guards {
    pub(crate) slot: Option<Permit>,
    pub(crate) record: Option<Record>,
    pub(crate) end: Option<RequestEnd>,
    pub(crate) in_flight: Option<InFlight>,
}

impl Guards {
    fn trailers(&mut self, trailers: &HeaderMap) {
        if let Some(r) = self.record.as_mut() {
            r.trailers(trailers);
        }
    }

    /// The body reached its end (`clean`, or with an error): let everything go, in order,
    /// with one clock read for every guard that wants the end time.
    fn ended(&mut self, clean: bool) {
        let now = tokio::time::Instant::now();
        self.slot = None;
        if let Some(r) = self.record.as_mut() {
            r.ended_at(clean, now);
        }
        self.record = None;
        self.end = None;
        if let Some(f) = self.in_flight.take() {
            f.finish(now);
        }
    }
}

/// A body whose [`Guards`] a layer can reach.
pub trait GuardedBody {
    /// The guard slots.
    fn guards(&mut self) -> &mut Guards;
}

pin_project_lite::pin_project! {
    /// The response body as hyper sees it: the service's body (or Keel's own) and the guards
    /// of the request it answers.
    #[derive(Debug)]
    pub struct ResponseBody<B> {
        #[pin]
        inner: KeelBody<B>,
        guards: Guards,
    }
}

impl<B> ResponseBody<B> {
    /// The service's body, no guards yet.
    pub fn new(inner: KeelBody<B>) -> Self {
        ResponseBody {
            inner,
            guards: Guards::default(),
        }
    }
}

impl<B> From<Fixed> for ResponseBody<B> {
    fn from(body: Fixed) -> Self {
        ResponseBody::new(KeelBody::from(body))
    }
}

impl<B> GuardedBody for ResponseBody<B> {
    fn guards(&mut self) -> &mut Guards {
        &mut self.guards
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let res = ready!(this.inner.as_mut().poll_frame(cx));
        let end = match &res {
            Some(Ok(frame)) => {
                if let Some(t) = frame.trailers_ref() {
                    this.guards.trailers(t);
                }
                // hyper stops polling once the body says it has ended, so the last frame
                // is the moment the answer is complete.
                this.inner.is_end_stream().then_some(true)
            }
            None => Some(true),
            Some(Err(_)) => Some(false),
        };
        if let Some(clean) = end {
            this.guards.ended(clean);
        }
        Poll::Ready(res)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::layer::observe::tests::{Seen, record};
    use http_body_util::BodyExt;
    use keel_core::observe::Outcome;
    use std::sync::Arc;

    /// The size budget [`Guards`] explains: a response around a boxed body (axum's) fits the
    /// 256 bytes that glibc's `memcpy` copies without its loop.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn a_response_carrying_the_guards_stays_within_256_bytes() {
        type Boxed = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
        let size = std::mem::size_of::<http::Response<ResponseBody<Boxed>>>();
        assert!(size <= 256, "a response is {size} bytes");
    }

    #[tokio::test]
    async fn the_guards_go_when_the_last_frame_is_read_not_when_the_body_is_dropped() {
        let seen = Arc::new(Seen::default());
        let mut body: ResponseBody<Fixed> = ResponseBody::new(KeelBody::inner(Full::from("hi")));
        body.guards().record = Some(record(&seen));
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "hi");
        assert_eq!(seen.outcomes(), [Outcome::Answered]);
        drop(body);
        assert_eq!(seen.outcomes().len(), 1, "reported once");
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_reports_the_caller_gone() {
        let seen = Arc::new(Seen::default());
        let mut unread: ResponseBody<Fixed> = ResponseBody::new(KeelBody::inner(Full::from("x")));
        unread.guards().record = Some(record(&seen));
        drop(unread);
        assert_eq!(seen.outcomes(), [Outcome::Cancelled]);
    }
}
