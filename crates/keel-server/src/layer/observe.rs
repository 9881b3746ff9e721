//! Telemetry for every request that got a context: one record handed to the App's observer
//! when the response has ended — answered, refused, cut off by its deadline, failed, or
//! abandoned by its caller — labelled with the route template the router recorded (or the
//! one shared `unmatched` label), plus a report of any poll of the handler that held its
//! worker past [`LONG_POLL_THRESHOLD`] (blocking code in async).
//!
//! With no observer (metrics and tracing both off) the layer passes requests through and
//! reads no clock.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use http::{HeaderMap, Method, Request, Response};
use keel_core::observe::{
    LONG_POLL_THRESHOLD, Outcome, ServerRecord, SharedObserver, UNMATCHED_ROUTE,
};
use keel_core::{Context, grpc};
use tokio::time::Instant;

use crate::body::{Fixed, GuardedBody};
use crate::overload::Permit;
use crate::refusal::Refused;

/// Records each request for the App's observer.
#[derive(Clone)]
pub struct ObserveLayer {
    observer: Option<SharedObserver>,
}

impl std::fmt::Debug for ObserveLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObserveLayer")
            .field("observer", &self.observer.is_some())
            .finish()
    }
}

impl ObserveLayer {
    /// Report to `observer`; `None` observes nothing.
    pub fn new(observer: Option<SharedObserver>) -> Self {
        ObserveLayer { observer }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            observer: self.observer.clone(),
        }
    }
}

/// See [`ObserveLayer`].
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    observer: Option<SharedObserver>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Observe<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observe")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<S, ReqB, RB> tower::Service<Request<ReqB>> for Observe<S>
where
    S: tower::Service<Request<ReqB>, Response = Response<RB>, Error = Infallible>,
    RB: From<Fixed> + http_body::Body + GuardedBody,
{
    type Response = Response<RB>;
    type Error = Infallible;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let record = self.observer.as_ref().map(|observer| {
            observer.server_started();
            let ctx = req.extensions().get::<Context>().cloned();
            let grpc = ctx
                .as_ref()
                .map_or_else(|| grpc::is_grpc(req.headers()), Context::is_grpc);
            Record {
                observer: Some(observer.clone()),
                ctx,
                method: req.method().clone(),
                grpc,
                status: None,
                grpc_status: None,
                outcome: None,
            }
        });
        // The first poll is timed from the request's arrival: the clock read that made its
        // context serves here too (what runs in between takes microseconds, far below the
        // long-poll threshold).
        let poll_started = record
            .as_ref()
            .and_then(|r| r.ctx.as_ref().map(Context::arrived));
        ObserveFuture {
            fut: self.inner.call(req),
            record,
            poll_started,
        }
    }
}

pin_project_lite::pin_project! {
    /// Future of [`Observe`].
    pub struct ObserveFuture<F> {
        #[pin]
        fut: F,
        record: Option<Record>,
        // When the next poll of the handler starts, if already known (the first one: arrival).
        poll_started: Option<Instant>,
    }
}

impl<F> std::fmt::Debug for ObserveFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ObserveFuture")
    }
}

impl<F, RB> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response<RB>, Infallible>>,
    RB: http_body::Body + GuardedBody,
{
    type Output = Result<Response<RB>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut out = match this.record.as_mut() {
            None => this.fut.poll(cx),
            Some(rec) => {
                let started = this.poll_started.take().unwrap_or_else(Instant::now);
                let mut res = this.fut.poll(cx);
                // A response counted by the admission layer carries the clock read taken when
                // the handler answered, moments ago in this same poll: no second read.
                let ended = match &mut res {
                    Poll::Ready(Ok(resp)) => resp.body_mut().guards().slot.as_ref(),
                    _ => None,
                }
                .and_then(Permit::answered_at)
                .unwrap_or_else(Instant::now);
                let held = ended.saturating_duration_since(started);
                if held > LONG_POLL_THRESHOLD
                    && let Some(observer) = &rec.observer
                {
                    observer.long_poll(rec.route(), held);
                }
                res
            }
        };
        // The response is finished where the inner future returned it, and that `Poll` is
        // returned as it is: binding the response out and wrapping it again cost one more
        // copy of it (three `memcpy` calls a request here against two, callgrind).
        let Poll::Ready(Ok(resp)) = &mut out else {
            return out;
        };
        if let Some(mut rec) = this.record.take() {
            rec.status = Some(resp.status().as_u16());
            if rec.grpc {
                rec.grpc_status = grpc::status(resp.headers());
            }
            rec.outcome = resp.extensions().get::<Refused>().map(|r| r.0);
            // An empty body is never polled: the head is the whole answer.
            if http_body::Body::is_end_stream(resp.body()) {
                rec.ended(true);
            }
            resp.body_mut().guards().record = Some(rec);
        }
        out
    }
}

/// One request's telemetry, handed over when its response ends (or in `Drop`, so on every
/// path). It rides in the response's [`crate::body::Guards`], so it holds only what the
/// report needs.
pub struct Record {
    /// `None` once reported.
    observer: Option<SharedObserver>,
    ctx: Option<Context>,
    method: Method,
    grpc: bool,
    status: Option<u16>,
    grpc_status: Option<i32>,
    outcome: Option<Outcome>,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("status", &self.status)
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}

impl Record {
    fn route(&self) -> &str {
        self.ctx
            .as_ref()
            .and_then(Context::route)
            .map_or(UNMATCHED_ROUTE, |r| r)
    }
}

impl Record {
    /// Trailers went by (gRPC puts its status there).
    pub(crate) fn trailers(&mut self, trailers: &HeaderMap) {
        if let Some(code) = grpc::status(trailers) {
            self.grpc_status = Some(code);
        }
    }

    /// The body reached its end at `now` (the clock read the other guards share), cleanly or
    /// not: the record is reported now.
    pub(crate) fn ended_at(&mut self, clean: bool, now: Instant) {
        self.ended(clean);
        self.report(now);
    }

    /// The body reached its end, cleanly or not.
    pub(crate) fn ended(&mut self, clean: bool) {
        if self.outcome.is_none() {
            self.outcome = Some(if clean {
                Outcome::Answered
            } else {
                Outcome::Failed
            });
        }
    }
}

impl Record {
    /// Hand the record to the observer, once, as ended at `end`.
    fn report(&mut self, end: Instant) {
        let Some(observer) = self.observer.take() else {
            return;
        };
        let duration = self
            .ctx
            .as_ref()
            .map(|c| end.saturating_duration_since(c.arrived()))
            .unwrap_or_default();
        observer.server(&ServerRecord {
            ctx: self.ctx.as_ref(),
            route: self.route(),
            route_is_template: self.ctx.as_ref().and_then(Context::route).is_some(),
            method: &self.method,
            grpc: self.grpc,
            status: self.status,
            grpc_status: self.grpc_status,
            // Dropped before the body ended and with nothing recorded: the caller left.
            outcome: self.outcome.unwrap_or(Outcome::Cancelled),
            // Ends now: the span recorder (if any) reads the wall clock for its start.
            start: None,
            duration,
            peer: self.ctx.as_ref().and_then(Context::peer),
        });
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if self.observer.is_some() {
            self.report(Instant::now());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use crate::layer::service::tests::{call_full, with_handler};
    use keel_core::observe::{ClientRecord, Observer};
    use std::sync::{Arc, Mutex};

    /// Route, whether it is a template, status, outcome.
    type Row = (String, bool, Option<u16>, Outcome);

    /// Records what the observer was told.
    #[derive(Default)]
    pub(crate) struct Seen(Mutex<Vec<Row>>);

    impl Seen {
        pub(crate) fn outcomes(&self) -> Vec<Outcome> {
            self.0.lock().unwrap().iter().map(|r| r.3).collect()
        }
    }

    /// A record of a plain GET for `seen`.
    pub(crate) fn record(seen: &Arc<Seen>) -> Record {
        Record {
            observer: Some(seen.clone()),
            ctx: None,
            method: Method::GET,
            grpc: false,
            status: Some(200),
            grpc_status: None,
            outcome: None,
        }
    }

    impl Observer for Seen {
        fn server(&self, r: &ServerRecord<'_>) {
            self.0.lock().unwrap().push((
                r.route.to_string(),
                r.route_is_template,
                r.status,
                r.outcome,
            ));
        }
        fn client(&self, _: &ClientRecord<'_>) {}
    }

    fn ctx() -> Context {
        Context::background(std::time::Duration::from_secs(5))
    }

    #[tokio::test]
    async fn a_request_is_recorded_when_its_body_ends_with_the_routers_template() {
        let seen = Arc::new(Seen::default());
        let handler = with_handler(|req: Request<String>| {
            if let Some(c) = req.extensions().get::<Context>() {
                c.set_route("/users/{id}".into());
            }
            String::from("hi")
        });
        let mut svc = tower::Layer::layer(&ObserveLayer::new(Some(seen.clone())), handler);
        let mut req = Request::new(String::new());
        req.extensions_mut().insert(ctx());
        let resp = call_full(&mut svc, req).await;
        assert!(
            seen.0.lock().unwrap().is_empty(),
            "not before the body ends"
        );
        let body = http_body_util::BodyExt::collect(resp.into_body()).await;
        assert!(body.is_ok());
        assert_eq!(
            *seen.0.lock().unwrap(),
            [(
                "/users/{id}".to_string(),
                true,
                Some(200),
                Outcome::Answered
            )]
        );
    }

    #[tokio::test]
    async fn unrouted_refused_and_abandoned_requests_are_told_apart() {
        let seen = Arc::new(Seen::default());
        let refusing = crate::layer::service::tests::answered_with(|resp| {
            resp.extensions_mut().insert(Refused(Outcome::Refused));
        });
        let mut svc = tower::Layer::layer(&ObserveLayer::new(Some(seen.clone())), refusing);
        let mut req = Request::new(String::new());
        req.extensions_mut().insert(ctx());
        drop(call_full(&mut svc, req).await);
        let handler = with_handler(|_: Request<String>| String::from("unread"));
        let mut svc = tower::Layer::layer(&ObserveLayer::new(Some(seen.clone())), handler);
        drop(call_full(&mut svc, Request::new(String::new())).await);
        assert_eq!(
            *seen.0.lock().unwrap(),
            [
                (
                    UNMATCHED_ROUTE.to_string(),
                    false,
                    Some(200),
                    Outcome::Refused
                ),
                (
                    UNMATCHED_ROUTE.to_string(),
                    false,
                    Some(200),
                    Outcome::Cancelled
                ),
            ]
        );
    }
}
