//! Admission under the adaptive concurrency limit ([`crate::overload`]): a request is
//! admitted now, waits (bounded) for a slot, or is shed at once with 503 / `UNAVAILABLE` and
//! `Retry-After` — or with 504 when it has less time left than the expected service time.
//! The slot is held until the response ends, so a streaming response counts as in flight.
//! With `[overload]` disabled the layer passes requests through.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Poll, ready};
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use keel_core::{Context, grpc};
use tower::util::Oneshot;

use crate::body::{Fixed, GuardedBody};
use crate::overload::{Admission as Decision, Limiter, Permit, Shed};
use crate::refusal;

/// Admits requests under a [`Limiter`].
#[derive(Debug, Clone)]
pub struct AdmissionLayer {
    limiter: Option<Limiter>,
    retry_after: HeaderValue,
}

impl AdmissionLayer {
    /// Admit under `limiter` (`None`: admit everything); shed answers say `Retry-After:
    /// retry_after_secs`.
    pub fn new(limiter: Option<Limiter>, retry_after_secs: u64) -> Self {
        AdmissionLayer {
            limiter,
            retry_after: HeaderValue::from(retry_after_secs),
        }
    }
}

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = Admission<S>;
    fn layer(&self, inner: S) -> Admission<S> {
        Admission {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`AdmissionLayer`].
#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    layer: AdmissionLayer,
}

impl<S, ReqB, RB> tower::Service<Request<ReqB>> for Admission<S>
where
    S: tower::Service<Request<ReqB>, Response = Response<RB>, Error = Infallible> + Clone,
    RB: From<Fixed> + GuardedBody,
{
    type Response = Response<RB>;
    type Error = Infallible;
    type Future = AdmissionFuture<S, Request<ReqB>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let Some(limiter) = &self.layer.limiter else {
            return AdmissionFuture::Now {
                fut: self.inner.call(req),
                slot: None,
            };
        };
        // Without a context (a stack reordered without one) the request has all the time in
        // the world as far as admission is concerned. Kept until the answer, for the time the
        // handler spent waiting on upstreams.
        let ctx = req.extensions().get::<Context>().cloned();
        // Time left as of arrival, microseconds ago: close enough to decide admission, and it
        // saves reading the clock again.
        let remaining = ctx.as_ref().map_or(Duration::MAX, |c| {
            c.deadline().saturating_duration_since(c.arrived())
        });
        let arrived = ctx
            .as_ref()
            .map_or_else(tokio::time::Instant::now, Context::arrived);
        let critical = limiter.is_critical(req.uri().path());
        // The time the request's bytes waited in the socket, when the connection knows it.
        let queued = crate::conn::queueing_delay();
        // Whether to answer a refusal as gRPC is looked up only when there is one to give.
        match limiter.admit_since(remaining, critical, arrived, queued) {
            Decision::Now(permit) => AdmissionFuture::Now {
                fut: self.inner.call(req),
                slot: Some(Slot(permit, ctx)),
            },
            // Only a request that has to wait pays for a clone of the service it will call.
            // Boxed: waiting is the exception, and inline its state (a clone of the service
            // and the request) would make every admitted request's future larger to move.
            Decision::Wait(wait) => AdmissionFuture::Queued {
                queued: Box::pin(Queued {
                    wait: Some(wait),
                    slot: None,
                    ctx,
                    grpc: grpc::is_grpc(req.headers()),
                    call: Oneshot::new(self.inner.clone(), req),
                    retry_after: self.layer.retry_after.clone(),
                }),
            },
            Decision::Shed(why) => AdmissionFuture::Shed {
                resp: Some(refusal::overloaded(
                    why,
                    grpc::is_grpc(req.headers()),
                    &self.layer.retry_after,
                )),
            },
        }
    }
}

type Waiting = Pin<Box<dyn Future<Output = Result<Permit, Shed>> + Send>>;

pin_project_lite::pin_project! {
    /// Future of [`Admission`].
    #[project = AdmissionProj]
    pub enum AdmissionFuture<S, R>
    where
        S: tower::Service<R>,
    {
        /// Admitted at once (or no limiter).
        Now { #[pin] fut: S::Future, slot: Option<Slot> },
        /// Waiting for a slot, then calling the service.
        Queued { queued: Pin<Box<Queued<S, R>>> },
        /// Shed.
        Shed { resp: Option<Response<Fixed>> },
    }
}

pin_project_lite::pin_project! {
    /// A request waiting for a slot, then calling the service.
    #[project = QueuedProj]
    pub struct Queued<S, R>
    where
        S: tower::Service<R>,
    {
        wait: Option<Waiting>,
        #[pin]
        call: Oneshot<S, R>,
        slot: Option<Slot>,
        ctx: Option<Context>,
        grpc: bool,
        retry_after: HeaderValue,
    }
}

impl<S: tower::Service<R>, R> std::fmt::Debug for AdmissionFuture<S, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdmissionFuture")
    }
}

impl<S, R, RB> Future for AdmissionFuture<S, R>
where
    S: tower::Service<R, Response = Response<RB>, Error = Infallible>,
    RB: From<Fixed> + GuardedBody,
{
    type Output = Result<Response<RB>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let (resp, slot) = match self.project() {
            AdmissionProj::Now { fut, slot } => {
                let Ok(resp) = ready!(fut.poll(cx));
                (resp, slot.take())
            }
            AdmissionProj::Queued { queued } => {
                let QueuedProj {
                    wait,
                    call,
                    slot,
                    ctx,
                    grpc,
                    retry_after,
                } = queued.as_mut().project();
                if let Some(w) = wait.as_mut() {
                    match ready!(w.as_mut().poll(cx)) {
                        Ok(permit) => {
                            *wait = None;
                            *slot = Some(Slot(permit, ctx.take()));
                        }
                        Err(why) => {
                            *wait = None;
                            let resp = refusal::overloaded(why, *grpc, retry_after);
                            return Poll::Ready(Ok(resp.map(RB::from)));
                        }
                    }
                }
                let Ok(resp) = ready!(call.poll(cx));
                (resp, slot.take())
            }
            AdmissionProj::Shed { resp } => {
                let resp = resp.take().unwrap_or_else(refusal::internal_error);
                return Poll::Ready(Ok(resp.map(RB::from)));
            }
        };
        let mut resp = resp;
        if let Some(Slot(mut permit, ctx)) = slot {
            // The handler's own service time (admission to response head, less its time
            // waiting on upstreams) feeds the limit.
            let upstream = ctx.map_or(Duration::ZERO, |c| c.upstream_wait());
            permit.answered_waiting(upstream);
            resp.body_mut().guards().slot = Some(permit);
        }
        Poll::Ready(Ok(resp))
    }
}

/// A request's slot under the limit, with the request's context until the answer (for its
/// time spent on upstreams); the permit alone then stays with the response until it ends.
#[derive(Debug)]
pub struct Slot(Permit, Option<Context>);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::layer::service::tests::{call_full, slow_handler};
    use crate::overload::OverloadConfig;
    use http_body_util::BodyExt;

    fn one_slot() -> Limiter {
        Limiter::new(&OverloadConfig {
            initial_limit: 1,
            min_limit: 1,
            max_limit: 1,
            max_queue: 1,
            ..OverloadConfig::default()
        })
    }

    fn request() -> Request<String> {
        let mut req = Request::new(String::new());
        req.extensions_mut()
            .insert(Context::background(Duration::from_secs(30)));
        req
    }

    #[tokio::test(start_paused = true)]
    async fn over_the_limit_a_request_waits_then_is_shed_with_retry_after() {
        let limiter = one_slot();
        let (handler, _) = slow_handler(Duration::from_secs(1));
        let layer = AdmissionLayer::new(Some(limiter.clone()), 3);
        let mut first = tower::Layer::layer(&layer, handler.clone());
        let mut second = tower::Layer::layer(&layer, handler);
        // The first holds the only slot for a second; the second queues, and gives up long
        // before that (the queue wait is bounded), answered 503 with Retry-After.
        let holder = call_full(&mut first, request());
        let queued = async {
            tokio::task::yield_now().await;
            let started = tokio::time::Instant::now();
            let resp = call_full(&mut second, request()).await;
            (resp, started.elapsed())
        };
        let (held, (shed, waited)) = tokio::join!(holder, queued);
        assert_eq!(shed.status(), 503);
        assert_eq!(shed.headers()["retry-after"], "3");
        assert!(waited < Duration::from_secs(1), "{waited:?}");
        assert_eq!(limiter.stats().shed[1], 1, "shed for its queue timeout");
        assert_eq!(held.status(), 200);
    }

    #[tokio::test(start_paused = true)]
    async fn the_slot_is_held_until_the_body_ends_and_no_limiter_admits_all() {
        let limiter = one_slot();
        let (handler, _) = slow_handler(Duration::from_millis(1));
        let mut svc = tower::Layer::layer(&AdmissionLayer::new(Some(limiter.clone()), 1), handler);
        let resp = call_full(&mut svc, request()).await;
        assert_eq!(limiter.stats().in_flight, 1, "the body is still being sent");
        resp.into_body().collect().await.unwrap();
        assert_eq!(limiter.stats().in_flight, 0);
        assert_eq!(limiter.stats().admitted, 1);

        let (handler, _) = slow_handler(Duration::from_millis(1));
        let mut open = tower::Layer::layer(&AdmissionLayer::new(None, 1), handler);
        for _ in 0..3 {
            assert_eq!(call_full(&mut open, request()).await.status(), 200);
        }
    }
}
