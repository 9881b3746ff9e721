//! Body limits: a request that declares a body over `server.max_body_bytes` gets 413 without
//! reaching the handler, and every other body is capped, so one that does not declare its
//! length (chunked, HTTP/2) fails with `LengthLimitError` (413 from axum's extractors) when
//! it reads past the cap. Header size and count are hyper's (431), set on the connection.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;

use http::{Request, Response};
use http_body_util::Limited;

use crate::body::Fixed;
use crate::refusal;
use crate::stats::Stats;

/// Refuses and caps request bodies over `max_body_bytes`.
#[derive(Debug, Clone)]
pub struct LimitsLayer {
    max_body_bytes: u64,
    stats: Arc<Stats>,
}

impl LimitsLayer {
    /// Bodies up to `max_body_bytes`; refusals counted in `stats`.
    pub fn new(max_body_bytes: u64, stats: Arc<Stats>) -> Self {
        LimitsLayer {
            max_body_bytes,
            stats,
        }
    }
}

impl<S> tower::Layer<S> for LimitsLayer {
    type Service = Limits<S>;
    fn layer(&self, inner: S) -> Limits<S> {
        Limits {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`LimitsLayer`].
#[derive(Debug, Clone)]
pub struct Limits<S> {
    inner: S,
    layer: LimitsLayer,
}

impl<S, ReqB, RB> tower::Service<Request<ReqB>> for Limits<S>
where
    S: tower::Service<Request<Limited<ReqB>>, Response = Response<RB>, Error = Infallible>,
    ReqB: http_body::Body,
    RB: From<Fixed>,
{
    type Response = Response<RB>;
    type Error = Infallible;
    type Future = LimitsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let limit = self.layer.max_body_bytes;
        // The declared length as the body reports it: hyper's body carries the
        // `Content-Length` it parsed (and refused with 400 when malformed), so the header is
        // not looked up and parsed a second time.
        if req.body().size_hint().lower() > limit {
            self.layer
                .stats
                .body_too_large
                .fetch_add(1, Ordering::Relaxed);
            return LimitsFuture::Refused {
                resp: Some(refusal::too_large()),
            };
        }
        let cap = usize::try_from(limit).unwrap_or(usize::MAX);
        LimitsFuture::Inner {
            fut: self.inner.call(req.map(|b| Limited::new(b, cap))),
        }
    }
}

pin_project_lite::pin_project! {
    /// Future of [`Limits`].
    #[project = LimitsProj]
    #[derive(Debug)]
    pub enum LimitsFuture<F> {
        /// Within the limit.
        Inner { #[pin] fut: F },
        /// 413.
        Refused { resp: Option<Response<Fixed>> },
    }
}

impl<F, RB> Future for LimitsFuture<F>
where
    F: Future<Output = Result<Response<RB>, Infallible>>,
    RB: From<Fixed>,
{
    type Output = Result<Response<RB>, Infallible>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            LimitsProj::Inner { fut } => fut.poll(cx),
            LimitsProj::Refused { resp } => {
                let resp = resp.take().unwrap_or_else(refusal::internal_error);
                Poll::Ready(Ok(resp.map(RB::from)))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::layer::service::tests::{call_full, with_handler};
    use http_body_util::BodyExt;

    /// A body of `data` that declares its length (as hyper's does for `Content-Length`) or
    /// not (chunked, HTTP/2 without the header).
    struct Declared {
        data: Option<bytes::Bytes>,
        declared: bool,
    }

    fn body(data: &'static str, declared: bool) -> Declared {
        Declared {
            data: Some(bytes::Bytes::from_static(data.as_bytes())),
            declared,
        }
    }

    impl http_body::Body for Declared {
        type Data = bytes::Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Infallible>>> {
            Poll::Ready(self.data.take().map(|d| Ok(http_body::Frame::data(d))))
        }
        fn size_hint(&self) -> http_body::SizeHint {
            match &self.data {
                Some(d) if self.declared => http_body::SizeHint::with_exact(d.len() as u64),
                _ => http_body::SizeHint::default(),
            }
        }
    }

    #[tokio::test]
    async fn a_declared_body_over_the_limit_is_refused_and_others_are_capped() {
        let stats = Arc::new(Stats::default());
        let handler = with_handler(|req: Request<Limited<Declared>>| {
            // The cap travels with the body: 8 bytes allowed, 12 sent undeclared.
            let read = futures_util::FutureExt::now_or_never(req.into_body().collect());
            match read {
                Some(Ok(_)) => "read".to_string(),
                Some(Err(_)) => "capped".to_string(),
                None => "pending".to_string(),
            }
        });
        let mut svc = tower::Layer::layer(&LimitsLayer::new(8, stats.clone()), handler);
        let resp = call_full(&mut svc, Request::new(body("123456789", true))).await;
        assert_eq!(resp.status(), 413);
        assert!(
            resp.extensions()
                .get::<refusal::CloseConnection>()
                .is_some()
        );
        assert_eq!(stats.body_too_large.load(Ordering::Relaxed), 1);

        let undeclared = Request::new(body("123456789012", false));
        let body_of = call_full(&mut svc, undeclared).await.into_body();
        assert_eq!(body_of.collect().await.unwrap().to_bytes(), "capped");
        for declared in [true, false] {
            let small = Request::new(body("12345678", declared));
            let body_of = call_full(&mut svc, small).await.into_body();
            assert_eq!(body_of.collect().await.unwrap().to_bytes(), "read");
        }
        assert_eq!(stats.body_too_large.load(Ordering::Relaxed), 1);
    }
}
