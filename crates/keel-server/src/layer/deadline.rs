//! The request's deadline, enforced: when it passes before the handler has answered, the
//! handler's future is dropped — which cancels its outbound calls and queries at their next
//! `.await` — and the caller gets 504 / `DEADLINE_EXCEEDED` at once. The deadline is the
//! context's (the caller's remaining time, capped by the route's maximum).
//!
//! No timer is armed for a handler that answers on its first poll, the common case: the
//! sleep is made only when the handler first returns `Pending`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;

use http::{Request, Response};
use keel_core::{Context, grpc};
use tokio::time::{Instant, Sleep};

use crate::body::Fixed;
use crate::refusal;
use crate::stats::Stats;

/// Cuts handlers off at their request's deadline.
#[derive(Debug, Clone)]
pub struct DeadlineLayer {
    stats: Arc<Stats>,
}

impl DeadlineLayer {
    /// Cut-offs counted in `stats.deadline_exceeded`.
    pub fn new(stats: Arc<Stats>) -> Self {
        DeadlineLayer { stats }
    }
}

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline {
            inner,
            stats: self.stats.clone(),
        }
    }
}

/// See [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    stats: Arc<Stats>,
}

impl<S, ReqB, RB> tower::Service<Request<ReqB>> for Deadline<S>
where
    S: tower::Service<Request<ReqB>, Response = Response<RB>, Error = Infallible>,
    RB: From<Fixed>,
{
    type Response = Response<RB>;
    type Error = Infallible;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let ctx = req.extensions().get::<Context>();
        let deadline = ctx.map(Context::deadline);
        let grpc = ctx.map_or_else(|| grpc::is_grpc(req.headers()), Context::is_grpc);
        DeadlineFuture {
            fut: Some(self.inner.call(req)),
            deadline,
            sleep: None,
            grpc,
            stats: self.stats.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    /// Future of [`Deadline`].
    #[derive(Debug)]
    pub struct DeadlineFuture<F> {
        // `None` once the deadline has passed: the handler is dropped then, not later.
        #[pin]
        fut: Option<F>,
        deadline: Option<Instant>,
        // Armed at the handler's first `Pending`, and boxed. Inline, tokio's timer adds
        // about 130 bytes to every request's future, and over HTTP/2 each request is a task
        // of its own: that pushed the task past glibc's small-allocation caches, and every
        // other HTTP/2 request paid a `malloc_consolidate` (h2c `GET /` under callgrind:
        // 37,931 instructions a request inline, 37,540 boxed). The box costs one small
        // allocation, only for a handler that waits (one doing I/O, far costlier itself).
        sleep: Option<Pin<Box<Sleep>>>,
        grpc: bool,
        stats: Arc<Stats>,
    }
}

impl<F, RB> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<Response<RB>, Infallible>>,
    RB: From<Fixed>,
{
    type Output = Result<Response<RB>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let Some(fut) = this.fut.as_mut().as_pin_mut() else {
            // Polled again after the cut-off: the answer is still the same.
            return Poll::Ready(Ok(refusal::deadline_exceeded(*this.grpc).map(RB::from)));
        };
        if let Poll::Ready(out) = fut.poll(cx) {
            return Poll::Ready(out);
        }
        let Some(deadline) = *this.deadline else {
            return Poll::Pending;
        };
        let fired = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)))
            .as_mut()
            .poll(cx)
            .is_ready();
        if !fired {
            return Poll::Pending;
        }
        // Dropping the handler's future cancels its outbound calls and queries now.
        this.fut.set(None);
        this.stats.deadline_exceeded.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("deadline exceeded; handler cancelled");
        Poll::Ready(Ok(refusal::deadline_exceeded(*this.grpc).map(RB::from)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::layer::service::tests::{call_full, slow_handler};
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_handler_past_its_deadline_is_dropped_and_answered_504() {
        let stats = Arc::new(Stats::default());
        let (handler, dropped) = slow_handler(Duration::from_secs(10));
        let mut svc = tower::Layer::layer(&DeadlineLayer::new(stats.clone()), handler);
        let mut req = Request::new(String::new());
        req.extensions_mut()
            .insert(Context::background(Duration::from_millis(100)));
        let started = Instant::now();
        let resp = call_full(&mut svc, req).await;
        assert_eq!(resp.status(), 504);
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        assert!(
            dropped.load(Ordering::SeqCst),
            "the handler's future was dropped"
        );
        assert_eq!(stats.deadline_exceeded.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_handler_within_its_deadline_answers_and_nothing_is_counted() {
        let stats = Arc::new(Stats::default());
        let (handler, _) = slow_handler(Duration::from_millis(50));
        let mut svc = tower::Layer::layer(&DeadlineLayer::new(stats.clone()), handler);
        let mut req = Request::new(String::new());
        req.extensions_mut()
            .insert(Context::background(Duration::from_millis(100)));
        let resp = call_full(&mut svc, req).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(stats.deadline_exceeded.load(Ordering::Relaxed), 0);
    }
}
