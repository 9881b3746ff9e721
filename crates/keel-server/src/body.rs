//! The bodies of Keel's request path.
//!
//! - [`RequestBody`]: what a user's service reads — hyper's body capped at
//!   `server.max_body_bytes` (the limits layer puts the cap on).
//! - [`KeelBody`]: what a layer answers with — the service's own body, or a small fixed one
//!   (a probe, a refusal). Every layer above the service can build one from a [`Fixed`].
//! - [`Guarded`]: a body that carries a layer's per-request state (an in-flight slot, an
//!   overload permit, a telemetry record, the request's task scope) until the response has
//!   really ended — streamed to the end, failed, or dropped by a caller that went away.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Full, Limited};
use hyper::body::Incoming;
use keel_core::BoxError;

/// The request body handed to user services: hyper's body, capped at `server.max_body_bytes`.
/// Reading past the cap yields `http_body_util::LengthLimitError`, which axum's extractors turn
/// into 413.
pub type RequestBody = Limited<Incoming>;

/// A small body Keel writes itself (probe answers, refusals).
pub type Fixed = Full<Bytes>;

/// The response body as hyper sees it: the user's body under every layer's guard.
pub type ResponseBody<B> = Guarded<
    Guarded<
        Guarded<Guarded<KeelBody<B>, crate::layer::admission::Slot>, crate::layer::observe::Record>,
        crate::layer::context::RequestEnd,
    >,
    crate::conn::InFlight,
>;

pin_project_lite::pin_project! {
    /// The user's body or one of Keel's own.
    #[project = KeelBodyProj]
    #[derive(Debug)]
    pub enum KeelBody<B> {
        /// The service's body.
        Inner { #[pin] body: B },
        /// A body Keel wrote.
        Fixed { #[pin] body: Fixed },
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
        KeelBody::Fixed { body }
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
            KeelBodyProj::Fixed { body } => body.poll_frame(cx).map_err(|never| match never {}),
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

/// Per-request state a layer keeps until its response ends. Dropping it is the end: release
/// whatever it holds in `Drop`. The callbacks tell it how the body went before that.
pub trait BodyGuard {
    /// Trailers went by (gRPC puts its status there).
    fn trailers(&mut self, trailers: &HeaderMap) {
        let _ = trailers;
    }
    /// The body reached its end: `true` cleanly, `false` with an error. Not called when the
    /// body is dropped before its end (the caller went away).
    fn ended(&mut self, clean: bool) {
        let _ = clean;
    }
}

pin_project_lite::pin_project! {
    /// A body carrying a layer's [`BodyGuard`], dropped (with its state) as soon as the body
    /// ends — hyper may hold a finished body a while longer, and an in-flight count or an
    /// overload slot must not wait for that.
    #[derive(Debug)]
    pub struct Guarded<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B: Body, G: BodyGuard> Guarded<B, G> {
    /// Guard `inner`. An empty body is never polled (the head is the whole answer), so its
    /// end is reported here.
    pub fn new(inner: B, mut guard: Option<G>) -> Self {
        if inner.is_end_stream()
            && let Some(g) = guard.as_mut()
        {
            g.ended(true);
        }
        Guarded { inner, guard }
    }
}

impl<B: From<Fixed>, G> From<Fixed> for Guarded<B, G> {
    fn from(body: Fixed) -> Self {
        Guarded {
            inner: B::from(body),
            guard: None,
        }
    }
}

impl<B, G> Body for Guarded<B, G>
where
    B: Body<Data = Bytes>,
    G: BodyGuard,
{
    type Data = Bytes;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let res = ready!(this.inner.as_mut().poll_frame(cx));
        if let Some(g) = this.guard.as_mut() {
            let end = match &res {
                Some(Ok(frame)) => {
                    if let Some(t) = frame.trailers_ref() {
                        g.trailers(t);
                    }
                    // hyper stops polling once the body says it has ended, so the last frame
                    // is the moment the answer is complete.
                    this.inner.is_end_stream().then_some(true)
                }
                None => Some(true),
                Some(Err(_)) => Some(false),
            };
            if let Some(clean) = end {
                g.ended(clean);
                *this.guard = None;
            }
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
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};

    #[derive(Default, Clone)]
    struct Log(Arc<Mutex<Vec<&'static str>>>);

    struct G(Log);

    impl BodyGuard for G {
        fn trailers(&mut self, _: &HeaderMap) {
            self.0.0.lock().unwrap().push("trailers");
        }
        fn ended(&mut self, clean: bool) {
            self.0
                .0
                .lock()
                .unwrap()
                .push(if clean { "clean" } else { "error" });
        }
    }

    impl Drop for G {
        fn drop(&mut self) {
            self.0.0.lock().unwrap().push("dropped");
        }
    }

    #[tokio::test]
    async fn the_guard_goes_when_the_last_frame_is_read_not_when_the_body_is_dropped() {
        let log = Log::default();
        let mut body: Guarded<KeelBody<Fixed>, G> =
            Guarded::new(KeelBody::inner(Full::from("hi")), Some(G(log.clone())));
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "hi");
        assert_eq!(*log.0.lock().unwrap(), ["clean", "dropped"]);
        drop(body);
        assert_eq!(log.0.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn an_empty_body_ends_at_once_and_a_dropped_one_never_ends() {
        let log = Log::default();
        let empty: Guarded<Fixed, G> = Guarded::new(Full::new(Bytes::new()), Some(G(log.clone())));
        assert_eq!(*log.0.lock().unwrap(), ["clean"]);
        drop(empty);
        assert_eq!(*log.0.lock().unwrap(), ["clean", "dropped"]);

        let log = Log::default();
        let unread: Guarded<Fixed, G> = Guarded::new(Full::from("x"), Some(G(log.clone())));
        drop(unread);
        assert_eq!(*log.0.lock().unwrap(), ["dropped"]);
    }
}
