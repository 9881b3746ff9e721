//! The bottom of the stack: the user's `tower::Service` (an axum `Router`, tonic routes,
//! anything), adapted so the layers above see one body type ([`KeelBody`]) and no errors: a
//! service that returns an error instead of a response is answered 500 and the error logged.
//!
//! A service that is ready (routers always are) is called in place; one that is not is
//! cloned and driven to readiness first, as `tower::ServiceExt::oneshot` would.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use keel_core::BoxError;
use tower::util::Oneshot;

use crate::body::{KeelBody, ResponseBody};
use crate::refusal;

/// Adapts the user's service (see the module doc).
#[derive(Debug, Clone, Copy, Default)]
pub struct ServiceLayer;

impl<S> tower::Layer<S> for ServiceLayer {
    type Service = UserService<S>;
    fn layer(&self, inner: S) -> UserService<S> {
        UserService { inner }
    }
}

/// See [`ServiceLayer`].
#[derive(Debug, Clone)]
pub struct UserService<S> {
    inner: S,
}

impl<S, ReqB, B> tower::Service<Request<ReqB>> for UserService<S>
where
    S: tower::Service<Request<ReqB>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes>,
{
    type Response = Response<ResponseBody<B>>;
    type Error = Infallible;
    type Future = UserFuture<S, Request<ReqB>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        // Readiness of the user's service is handled per call (see `call`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        if super::ready_now(&mut self.inner) {
            UserFuture::Direct {
                fut: self.inner.call(req),
            }
        } else {
            // Boxed: a router is always ready, so this is the rare path, and keeping the
            // clone and the request inline would make every request's future (and each
            // layer's around it) that much larger to move.
            UserFuture::Waiting {
                fut: Box::pin(Oneshot::new(self.inner.clone(), req)),
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// Future of [`UserService`].
    #[project = UserProj]
    pub enum UserFuture<S, R>
    where
        S: tower::Service<R>,
    {
        /// The service was ready and has been called.
        Direct { #[pin] fut: S::Future },
        /// Waiting for the service to be ready, then calling it.
        Waiting { fut: Pin<Box<Oneshot<S, R>>> },
    }
}

impl<S: tower::Service<R>, R> std::fmt::Debug for UserFuture<S, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UserFuture")
    }
}

impl<S, R, B> Future for UserFuture<S, R>
where
    S: tower::Service<R, Response = Response<B>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<B>>, Infallible>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let out = match self.project() {
            UserProj::Direct { fut } => ready!(fut.poll(cx)),
            UserProj::Waiting { fut } => ready!(fut.as_mut().poll(cx)),
        };
        Poll::Ready(Ok(match out {
            Ok(resp) => resp.map(|b| ResponseBody::new(KeelBody::inner(b))),
            Err(err) => {
                let err: BoxError = err.into();
                tracing::error!(error = %err, "service returned an error; answering 500");
                refusal::internal_error().map(ResponseBody::from)
            }
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    //! Small services and helpers the layers' tests share, in the style of tower's own.

    use super::*;
    use crate::body::{Fixed, ResponseBody};

    /// What the test services answer with: a fixed body with guard slots, as in the stack.
    pub(crate) type TestBody = ResponseBody<Fixed>;
    use http_body_util::{BodyExt, Full};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;
    use tower::{Service, ServiceExt};

    /// A handler `f` run when the response future is first polled (so it sees what the
    /// layers set up around the poll, like the task-local context).
    pub(crate) fn with_handler<ReqB, F>(
        f: F,
    ) -> impl Service<Request<ReqB>, Response = Response<TestBody>, Error = Infallible> + Clone
    where
        F: Fn(Request<ReqB>) -> String + Clone,
    {
        tower::service_fn(move |req: Request<ReqB>| {
            let f = f.clone();
            async move { Ok::<_, Infallible>(Response::new(TestBody::from(Full::from(f(req))))) }
        })
    }

    /// Counts its calls.
    #[derive(Clone, Default)]
    pub(crate) struct Calls(Arc<AtomicUsize>);

    impl Calls {
        pub(crate) fn get(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// Answers `text`, counting calls.
    pub(crate) fn answered_by(
        text: &'static str,
    ) -> (
        impl Service<Request<String>, Response = Response<TestBody>, Error = Infallible> + Clone,
        Calls,
    ) {
        let calls = Calls::default();
        let c = calls.clone();
        let svc = with_handler(move |_: Request<String>| {
            c.0.fetch_add(1, Ordering::SeqCst);
            text.to_string()
        });
        (svc, calls)
    }

    /// Answers 200 "ok", after `shape` adjusted the response.
    pub(crate) fn answered_with<ReqB, F>(
        shape: F,
    ) -> impl Service<Request<ReqB>, Response = Response<TestBody>, Error = Infallible> + Clone
    where
        F: Fn(&mut Response<TestBody>) + Clone,
    {
        tower::service_fn(move |_: Request<ReqB>| {
            let mut resp = Response::new(TestBody::from(Full::from("ok")));
            shape(&mut resp);
            async move { Ok::<_, Infallible>(resp) }
        })
    }

    struct SetOnDrop(Arc<AtomicBool>);

    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// Answers after `delay`; the flag is set when its future is dropped (finished or not).
    pub(crate) fn slow_handler(
        delay: Duration,
    ) -> (
        impl Service<Request<String>, Response = Response<TestBody>, Error = Infallible> + Clone,
        Arc<AtomicBool>,
    ) {
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = dropped.clone();
        let svc = tower::service_fn(move |_: Request<String>| {
            let guard = SetOnDrop(flag.clone());
            async move {
                let _guard = guard;
                tokio::time::sleep(delay).await;
                Ok::<_, Infallible>(Response::new(TestBody::from(Full::from("slow"))))
            }
        });
        (svc, dropped)
    }

    /// A request for `path`.
    pub(crate) fn request(path: &str) -> Request<String> {
        Request::builder().uri(path).body(String::new()).unwrap()
    }

    /// Drive one call to its response head.
    pub(crate) async fn call_full<S, R>(svc: &mut S, req: R) -> S::Response
    where
        S: Service<R, Error = Infallible>,
    {
        let Ok(resp) = svc.ready().await.unwrap().call(req).await;
        resp
    }

    /// Drive one call and read the whole body.
    pub(crate) async fn call<S, R, B>(svc: &mut S, req: R) -> (u16, String)
    where
        S: Service<R, Response = Response<B>, Error = Infallible>,
        B: http_body::Body,
        B::Error: std::fmt::Debug,
    {
        let resp = call_full(svc, req).await;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn errors_become_500_and_bodies_pass_through() {
        let failing = tower::service_fn(|_: Request<String>| async {
            Err::<Response<Full<Bytes>>, _>(std::io::Error::other("boom"))
        });
        let mut svc = tower::Layer::layer(&ServiceLayer, failing);
        assert_eq!(
            call(&mut svc, request("/")).await,
            (500, "internal server error\n".into())
        );
        let fine = tower::service_fn(|_: Request<String>| async {
            Ok::<_, Infallible>(Response::new(Full::from("fine")))
        });
        let mut svc = tower::Layer::layer(&ServiceLayer, fine);
        assert_eq!(call(&mut svc, request("/")).await, (200, "fine".into()));
    }
}
