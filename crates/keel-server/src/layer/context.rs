//! The request's [`Context`]: built from the propagation headers (deadline, trace, baggage,
//! request id, retry marker), put in the request's extensions (where handlers, tonic services
//! and the inner layers find it), listed in the App's task registry, and made the task-local
//! [`Context::current`] while the request is handled. A request whose headers are malformed
//! is refused with 400 / `INVALID_ARGUMENT` naming the header; one whose deadline already
//! passed gets 504 / `DEADLINE_EXCEEDED`. Either way the refusal is reported to telemetry here,
//! since no inner layer sees it.
//!
//! Every response carries `x-request-id` (the caller's, when well-formed), and when the
//! response ends the request's scoped tasks are cancelled and its task-dump entry goes.
//!
//! The task-dump entry is made lazily, the first time the handler does not answer at once:
//! a request answered in its first poll lives for microseconds, no dump would catch it alive,
//! and it cannot leak; one that waits (and so could outlive its deadline) is listed from
//! its arrival on.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Poll, ready};
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use keel_core::context::{InboundError, InboundPolicy};
use keel_core::observe::{Outcome, ServerRecord, SharedObserver};
use keel_core::propagation::names;
use keel_core::tasks::{Owner, Registry, TaskGuard, TaskKind};
use keel_core::{Context, grpc};

use crate::body::{Fixed, GuardedBody};
use crate::config::DeadlineConfig;
use crate::refusal;
use crate::stats::Stats;

/// `x-request-id`.
static REQUEST_ID: http::HeaderName = http::HeaderName::from_static(names::REQUEST_ID);

/// Builds each request's context or refuses the request.
#[derive(Debug, Clone)]
pub struct ContextLayer {
    state: Arc<State>,
}

struct State {
    deadlines: DeadlinePolicy,
    registry: &'static Registry,
    observer: Option<SharedObserver>,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("deadlines", &self.deadlines)
            .field("observer", &self.observer.is_some())
            .finish_non_exhaustive()
    }
}

impl ContextLayer {
    /// Contexts with the `[deadline]` policy and `sample_ratio` for the traces this hop
    /// starts, listed in `registry`; refusals counted in `stats` and told to `observer`.
    pub fn new(
        deadlines: &DeadlineConfig,
        sample_ratio: f64,
        registry: &'static Registry,
        observer: Option<SharedObserver>,
        stats: Arc<Stats>,
    ) -> Self {
        ContextLayer {
            state: Arc::new(State {
                deadlines: DeadlinePolicy::new(deadlines, sample_ratio),
                registry,
                observer,
                stats,
            }),
        }
    }
}

impl<S> tower::Layer<S> for ContextLayer {
    type Service = ContextService<S>;
    fn layer(&self, inner: S) -> ContextService<S> {
        ContextService {
            inner,
            state: self.state.clone(),
        }
    }
}

/// See [`ContextLayer`].
#[derive(Debug, Clone)]
pub struct ContextService<S> {
    inner: S,
    state: Arc<State>,
}

impl<S, ReqB, RB> tower::Service<Request<ReqB>> for ContextService<S>
where
    S: tower::Service<Request<ReqB>, Response = Response<RB>, Error = Infallible>,
    RB: From<Fixed> + GuardedBody,
{
    type Response = Response<RB>;
    type Error = Infallible;
    type Future = ContextFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let st = &*self.state;
        let policy = st.deadlines.for_path(req.uri().path());
        let ctx = match Context::from_headers(req.headers(), &policy, None, st.registry) {
            Ok(ctx) => ctx.with_peer(crate::conn::peer()),
            Err(e) => return ContextFuture::refused(st, &req, &e),
        };
        req.extensions_mut().insert(ctx.clone());
        // Every log line written while the request is handled (the handler's and Keel's)
        // carries the trace, span and request ids. A filter that turns `keel::request` off
        // makes this a disabled span: no formatting, nothing recorded.
        let span = tracing::info_span!(
            target: "keel::request",
            "request",
            trace_id = %ctx.trace().trace_id,
            span_id = %ctx.trace().span_id,
            request_id = %ctx.request_id(),
        );
        // The handler is called (and each poll of it made, below) with the context as the
        // task-local `Context::current`, for code that has no request at hand.
        let fut = ctx.enter(|| self.inner.call(req));
        ContextFuture::Inner {
            fut,
            end: Some(RequestEnd { ctx, task: None }),
            registry: st.registry,
            span,
        }
    }
}

pin_project_lite::pin_project! {
    /// Future of [`ContextService`].
    #[project = ContextProj]
    pub enum ContextFuture<F> {
        /// The request goes on with its context.
        Inner {
            #[pin]
            fut: F,
            end: Option<RequestEnd>,
            registry: &'static Registry,
            span: tracing::Span,
        },
        /// Refused before a context could be made.
        Refused { resp: Option<Response<Fixed>> },
    }
}

impl<F> std::fmt::Debug for ContextFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContextFuture")
    }
}

impl<F> ContextFuture<F> {
    fn refused<B>(st: &State, req: &Request<B>, e: &InboundError) -> Self {
        st.stats.refused_on_arrival.fetch_add(1, Ordering::Relaxed);
        let grpc = grpc::is_grpc(req.headers());
        let mut resp = match e {
            InboundError::Malformed(e) => refusal::malformed(&e.to_string(), grpc),
            InboundError::Expired(_) => refusal::deadline_exceeded(grpc),
        };
        // Echo the caller's id (when well-formed) so it can report which request failed.
        if let Some(id) = req.headers().get(&REQUEST_ID)
            && keel_core::codec::request_id::is_valid(id.as_bytes())
        {
            resp.headers_mut().insert(REQUEST_ID.clone(), id.clone());
        }
        if let Some(observer) = &st.observer {
            observer.server(&ServerRecord {
                ctx: None,
                route: keel_core::observe::UNMATCHED_ROUTE,
                route_is_template: false,
                method: req.method(),
                grpc,
                status: Some(resp.status().as_u16()),
                grpc_status: grpc::status(resp.headers()),
                outcome: Outcome::Refused,
                start: None,
                duration: Duration::ZERO,
                peer: None,
            });
        }
        ContextFuture::Refused { resp: Some(resp) }
    }
}

impl<F, RB> Future for ContextFuture<F>
where
    F: Future<Output = Result<Response<RB>, Infallible>>,
    RB: From<Fixed> + GuardedBody,
{
    type Output = Result<Response<RB>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ContextProj::Inner {
                fut,
                end,
                registry,
                span,
            } => {
                let entered = span.enter();
                let polled = match end.as_ref() {
                    Some(e) => e.ctx.enter(|| fut.poll(cx)),
                    None => fut.poll(cx),
                };
                drop(entered);
                if polled.is_pending()
                    && let Some(e) = end.as_mut()
                {
                    e.listed(registry);
                }
                let Ok(mut resp) = ready!(polled);
                if let Some(e) = end.take() {
                    resp.headers_mut()
                        .insert(REQUEST_ID.clone(), request_id_value(&e.ctx));
                    resp.body_mut().guards().end = Some(e);
                }
                Poll::Ready(Ok(resp))
            }
            ContextProj::Refused { resp } => Poll::Ready(Ok(resp
                .take()
                .unwrap_or_else(refusal::internal_error)
                .map(RB::from))),
        }
    }
}

/// The `x-request-id` header value for `ctx`, marked never to be indexed by HPACK.
///
/// A request id is new on every response, so an HTTP/2 encoder that indexes it (h2 does by
/// default) fills the connection's dynamic table with ids nobody will send again: each
/// response then searches every earlier id for a match and evicts the entries that do repeat
/// (`content-type`, `grpc-status`), which must be sent in full again. Measured on unary gRPC
/// under callgrind, that was about 4,000 instructions a call. HTTP/1.1 ignores the mark.
/// The value shares a per-thread block
/// ([`keel_core::codec::request_id::RequestId::header_value`]): no allocation per response.
fn request_id_value(ctx: &Context) -> HeaderValue {
    let mut value = ctx.request_id_ref().header_value();
    value.set_sensitive(true);
    value
}

/// Held until the response ends: then the request's scoped tasks are cancelled (nobody waits
/// for them any more) and its task-dump entry goes.
#[derive(Debug)]
pub struct RequestEnd {
    ctx: Context,
    task: Option<TaskGuard>,
}

impl RequestEnd {
    /// List the request in the task dump (once), as alive since it arrived.
    fn listed(&mut self, registry: &'static Registry) {
        if self.task.is_none() {
            let ctx = &self.ctx;
            self.task = Some(registry.register_since(
                "request",
                TaskKind::Request,
                &Owner {
                    route: ctx.route().cloned(),
                    request_id: Some(ctx.request_id_ref().clone()),
                    deadline: Some(ctx.deadline()),
                },
                ctx.arrived(),
            ));
        }
    }
}

impl Drop for RequestEnd {
    fn drop(&mut self) {
        self.ctx.task_scope().cancel();
    }
}

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

/// A uniform draw in `[0, 1)` from Keel's per-thread generator.
fn unit_draw() -> f64 {
    (keel_core::codec::rand::next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::layer::service::tests::{call_full, with_handler};
    use std::collections::BTreeMap;

    #[test]
    fn request_id_values_cut_from_shared_blocks_stay_whole_and_distinct() {
        // Enough ids to fill several 4 KiB blocks, and values kept alive across block changes.
        let ctxs: Vec<Context> = (0..3 * 4096 / 16)
            .map(|_| Context::background(std::time::Duration::from_secs(1)))
            .collect();
        let values: Vec<HeaderValue> = ctxs.iter().map(request_id_value).collect();
        for (c, v) in ctxs.iter().zip(&values) {
            assert_eq!(v.as_bytes(), c.request_id_ref().as_bytes());
        }
        let distinct: std::collections::HashSet<&[u8]> =
            values.iter().map(HeaderValue::as_bytes).collect();
        assert_eq!(distinct.len(), values.len());
        // Never indexed by HPACK: each id is sent once.
        assert!(values.iter().all(HeaderValue::is_sensitive));
    }

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

    fn layer(stats: Arc<Stats>) -> ContextLayer {
        ContextLayer::new(
            &DeadlineConfig::default(),
            0.0,
            Registry::leaked(Duration::from_secs(5)),
            None,
            stats,
        )
    }

    #[tokio::test]
    async fn the_handler_sees_the_context_in_its_extensions_and_as_current() {
        let stats = Arc::new(Stats::default());
        let handler = with_handler(|req: Request<String>| {
            let from_ext = req
                .extensions()
                .get::<Context>()
                .map(|c| c.request_id().to_owned());
            let current = Context::current().map(|c| c.request_id().to_owned());
            assert_eq!(from_ext, current);
            from_ext.unwrap_or_default()
        });
        let mut svc = tower::Layer::layer(&layer(stats.clone()), handler);
        let req = Request::builder()
            .header("x-request-id", "abc-123")
            .body(String::new())
            .unwrap();
        let resp = call_full(&mut svc, req).await;
        assert_eq!(resp.headers()["x-request-id"], "abc-123");
        let generated = call_full(&mut svc, Request::new(String::new())).await;
        assert_eq!(generated.headers()["x-request-id"].len(), 32);
        assert_eq!(stats.refused_on_arrival.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn malformed_headers_are_refused_naming_the_header_and_echoing_the_id() {
        let stats = Arc::new(Stats::default());
        let handler = with_handler(|_: Request<String>| -> String { panic!("must not run") });
        let mut svc = tower::Layer::layer(&layer(stats.clone()), handler);
        for (name, value) in [
            ("traceparent", "00-zz-zz-01"),
            ("grpc-timeout", "1x"),
            ("keel-timeout", "999999999S"),
            ("baggage", "=novalue"),
        ] {
            let req = Request::builder()
                .header(name, value)
                .header("x-request-id", "r-1")
                .body(String::new())
                .unwrap();
            let resp = call_full(&mut svc, req).await;
            assert_eq!(resp.status(), 400, "{name}: {value}");
            assert_eq!(resp.headers()["x-request-id"], "r-1");
        }
        let req = Request::builder()
            .header("grpc-timeout", "0m")
            .header("content-type", "application/grpc")
            .body(String::new())
            .unwrap();
        let resp = call_full(&mut svc, req).await;
        assert_eq!(resp.headers()["grpc-status"], "4");
        assert_eq!(stats.refused_on_arrival.load(Ordering::Relaxed), 5);
    }

    #[tokio::test]
    async fn the_end_of_the_response_cancels_the_requests_tasks() {
        let (tx, rx) = tokio::sync::oneshot::channel::<Context>();
        let tx = Arc::new(std::sync::Mutex::new(Some(tx)));
        let handler = with_handler(move |req: Request<String>| {
            if let (Some(ctx), Some(tx)) =
                (req.extensions().get::<Context>(), tx.lock().unwrap().take())
            {
                let _ = tx.send(ctx.clone());
            }
            String::from("ok")
        });
        let mut svc = tower::Layer::layer(&layer(Arc::new(Stats::default())), handler);
        let resp = call_full(&mut svc, Request::new(String::new())).await;
        let ctx = rx.await.unwrap();
        assert!(!ctx.task_scope().is_cancelled(), "the body is still unread");
        drop(resp);
        assert!(ctx.task_scope().is_cancelled());
    }
}
