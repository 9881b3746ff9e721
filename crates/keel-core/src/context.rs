//! `Context`: what Keel knows about the request being served, carried to everything the
//! request causes — spawned tasks, outbound HTTP/gRPC calls, published messages.
//!
//! A context holds an absolute deadline (never a duration: time spent queueing, in the
//! handler and on the wire all count against it), the request id, the trace identity, W3C
//! baggage (which carries the traffic colour), whether the request is itself a retry, and the
//! [`TaskScope`] its spawned tasks belong to. It is cheap to clone (one `Arc`).
//!
//! Inbound parsing lives in [`Context::from_headers`]; outbound writing in
//! [`crate::propagation`]. While a request's future is polled (the server's context layer, or
//! [`Context::scope`]), [`Context::current`] returns it from a thread-local set for that poll,
//! so library code (clients, producers) finds it without it being passed by hand.

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

use crate::codec::request_id::RequestId;
use crate::codec::{self, Baggage, CodecError, SpanId, TraceId, TraceParent, TraceState};
use crate::propagation::{HeaderScan, names};
use crate::tasks::{Owner, Registry, TaskScope};

/// The baggage key that carries the traffic colour (e.g. `canary`).
pub const COLOR_BAGGAGE_KEY: &str = "keel-color";

/// Trace identity of this hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// The trace this request belongs to.
    pub trace_id: TraceId,
    /// This hop's span: outbound calls name it as their parent.
    pub span_id: SpanId,
    /// The caller's span, if the caller sent one.
    pub parent_span_id: Option<SpanId>,
    /// The caller's sampling decision (parent-based sampling honours it).
    pub sampled: bool,
    /// Vendor trace state, passed through unchanged.
    pub tracestate: Option<TraceState>,
}

impl Trace {
    /// A new root trace (no caller context).
    pub fn root(sampled: bool) -> Trace {
        Trace {
            trace_id: TraceId::random(),
            span_id: SpanId::random(),
            parent_span_id: None,
            sampled,
            tracestate: None,
        }
    }

    /// The `traceparent` an outbound call sends: this hop's span as the parent.
    pub fn outbound(&self) -> TraceParent {
        TraceParent {
            trace_id: self.trace_id,
            parent_id: self.span_id,
            flags: u8::from(self.sampled),
        }
    }
}

/// Where a deadline came from, for logs and error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadlineSource {
    /// The caller's `grpc-timeout`.
    GrpcTimeout,
    /// The caller's `keel-timeout`.
    KeelTimeout,
    /// Envoy's `x-envoy-expected-rq-timeout-ms`.
    Envoy,
    /// An absolute `keel-deadline` (message headers).
    Absolute,
    /// The route's configured maximum (the caller asked for more, or for nothing).
    Route,
}

/// Limits applied while building a context from inbound headers.
#[derive(Debug, Clone, Copy)]
pub struct InboundPolicy {
    /// The route's maximum; also the deadline when the caller sent none.
    pub route_timeout: Duration,
    /// Sampling decision for traces this hop starts.
    pub sample_roots: bool,
}

/// A rejected inbound request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InboundError {
    /// A propagation header did not parse; the request gets 400 / `INVALID_ARGUMENT`.
    #[error(transparent)]
    Malformed(#[from] CodecError),
    /// The deadline had already passed on arrival: 504 / `DEADLINE_EXCEEDED`.
    #[error("deadline already exceeded on arrival ({0:?})")]
    Expired(DeadlineSource),
}

struct Inner {
    /// When the request arrived (the clock read that also set the deadline): later layers
    /// measure from it instead of reading the clock again.
    arrived: Instant,
    deadline: Instant,
    deadline_source: DeadlineSource,
    request_id: RequestId,
    /// The route template the router matched, set once by the router's layer (for axum, the
    /// `keel` facade's route layer); metrics, spans and the task dump are labelled with it.
    route: OnceLock<Arc<str>>,
    trace: Trace,
    baggage: Baggage,
    retry: bool,
    /// The request is gRPC (by its `content-type`).
    grpc: bool,
    scope: TaskScope,
    /// Microseconds this request has spent waiting on Keel's client (its upstreams): not the
    /// service's own time, so the server's overload control leaves it out.
    upstream_wait_us: AtomicU64,
    /// The address the request came from (the TCP peer), when a server made the context.
    peer: Option<SocketAddr>,
    /// The request's own context, for one narrowed by [`Context::within`]: its upstream
    /// waits are the request's.
    parent: Option<Arc<Inner>>,
}

/// The request context. Cheap to clone.
#[derive(Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("request_id", &self.inner.request_id)
            .field("remaining", &self.remaining())
            .field("trace_id", &self.inner.trace.trace_id)
            .field("retry", &self.inner.retry)
            .finish()
    }
}

thread_local! {
    /// The context of the request being polled on this thread: a borrowed pointer, set by
    /// [`Context::enter`] for exactly as long as the `Context` it points to is borrowed there
    /// (so the allocation outlives every read), and put back to what it was on the way out,
    /// also when `f` panics. A task-local would do the same but clones the `Arc` and moves
    /// the closure's result through its own frame on every poll: this costs two stores.
    static CURRENT: Cell<*const Inner> = const { Cell::new(std::ptr::null()) };
}

/// Puts the previous [`CURRENT`] back when an [`Context::enter`] ends, however it ends.
struct Restore(*const Inner);

impl Drop for Restore {
    #[inline]
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.0));
    }
}

impl Context {
    /// Build the context of an inbound request from its headers.
    ///
    /// Deadline: the minimum of every timeout the caller sent (`grpc-timeout`,
    /// `keel-timeout`, `x-envoy-expected-rq-timeout-ms`, an absolute `keel-deadline`) and the
    /// route's maximum; the route's maximum alone when the caller sent none. Trace: W3C
    /// `traceparent` wins over B3 when both arrive (they should agree); B3 single wins over
    /// multi. A malformed header is an error naming it — a silently dropped deadline or trace
    /// is worse than a 400 the caller can fix.
    pub fn from_headers<R: HeaderScan + ?Sized>(
        headers: &R,
        policy: &InboundPolicy,
        route: Option<Arc<str>>,
        registry: &'static Registry,
    ) -> Result<Context, InboundError> {
        let now = Instant::now();
        let found = Found::scan(headers)?;
        let (deadline, source) = found.deadline(now, policy.route_timeout)?;
        if deadline <= now {
            return Err(InboundError::Expired(source));
        }
        let request_id = RequestId::from_caller_or_new(found.request_id);
        let trace = found.trace(policy.sample_roots)?;
        let mut baggage = found.baggage;
        if let Some(color) = found.color {
            if baggage.get(COLOR_BAGGAGE_KEY).is_none() {
                // Through the baggage parser, so a malformed colour is refused like any
                // other malformed header.
                let mut entry = format!("{COLOR_BAGGAGE_KEY}=").into_bytes();
                entry.extend_from_slice(color);
                baggage.extend_from(&entry)?;
            }
        }
        let retry = found
            .retry
            .is_some_and(|v| v == b"1" || v.eq_ignore_ascii_case(b"true"));
        let owner = Owner {
            route: None,
            request_id: Some(request_id.clone()),
            deadline: Some(deadline),
        };
        let route_cell = OnceLock::new();
        if let Some(r) = route {
            let _ = route_cell.set(r);
        }
        Ok(Context {
            inner: Arc::new(Inner {
                arrived: now,
                deadline,
                deadline_source: source,
                request_id,
                route: route_cell,
                trace,
                baggage,
                retry,
                grpc: found
                    .content_type
                    .is_some_and(|v| v.starts_with(crate::grpc::CONTENT_TYPE_PREFIX)),
                scope: TaskScope::new(registry, owner),
                upstream_wait_us: AtomicU64::new(0),
                peer: None,
                parent: None,
            }),
        })
    }

    /// A context for work no request started (a background job, a test): a new root trace,
    /// a generated request id, and `timeout` from now as the deadline. Its tasks are listed in
    /// [`Registry::global`]; inside a service prefer [`Context::background_in`] with the
    /// service's registry (the `keel` facade's `App::background_context`).
    pub fn background(timeout: Duration) -> Context {
        Context::background_in(Registry::global(), timeout)
    }

    /// [`Context::background`] whose tasks are listed in `registry`.
    pub fn background_in(registry: &'static Registry, timeout: Duration) -> Context {
        let now = Instant::now();
        let deadline = now + timeout;
        let request_id = RequestId::generate();
        let owner = Owner {
            route: None,
            request_id: Some(request_id.clone()),
            deadline: Some(deadline),
        };
        Context {
            inner: Arc::new(Inner {
                arrived: now,
                deadline,
                deadline_source: DeadlineSource::Route,
                request_id,
                route: OnceLock::new(),
                trace: Trace::root(false),
                baggage: Baggage::default(),
                retry: false,
                grpc: false,
                scope: TaskScope::new(registry, owner),
                upstream_wait_us: AtomicU64::new(0),
                peer: None,
                parent: None,
            }),
        }
    }

    /// The context of the request this task is serving, if any.
    pub fn current() -> Option<Context> {
        let ptr = CURRENT.try_with(Cell::get).ok()?;
        if ptr.is_null() {
            return None;
        }
        // SAFETY: a non-null `CURRENT` was set by `enter` from a live `Arc<Inner>` that `enter`
        // borrows until it restores the previous value, so the allocation is alive and its
        // strong count is at least one; taking one more reference for the returned clone
        // keeps the count balanced when that clone drops.
        unsafe {
            Arc::increment_strong_count(ptr);
            Some(Context {
                inner: Arc::from_raw(ptr),
            })
        }
    }

    /// Run `fut` with this context as [`Context::current`] during each of its polls.
    pub fn scope<F: Future>(&self, fut: F) -> Scoped<F> {
        Scoped {
            ctx: self.clone(),
            fut,
        }
    }

    /// Run `f` (one poll of a request's future, say) with this context as
    /// [`Context::current`]. What the server's context layer uses instead of
    /// [`Context::scope`]: it already has a future of its own around the handler's, and a
    /// second one would copy the handler's future and its response once more.
    #[inline]
    pub fn enter<R>(&self, f: impl FnOnce() -> R) -> R {
        let previous = CURRENT.with(|c| c.replace(Arc::as_ptr(&self.inner)));
        let _restore = Restore(previous);
        f()
    }

    /// Count `waited` as time this request spent waiting on an upstream (Keel's client does
    /// this for every call it makes with this context). Overload control subtracts it from
    /// the service time it learns from: a proxy is not overloaded because its upstream is slow.
    pub fn add_upstream_wait(&self, waited: Duration) {
        let us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        let own = self.inner.parent.as_ref().unwrap_or(&self.inner);
        own.upstream_wait_us.fetch_add(us, Ordering::Relaxed);
    }

    /// This context with its deadline brought forward to at most `limit` from now: the same
    /// request (id, trace, baggage, tasks, upstream waits), less time. A proxy's per-route
    /// timeout, or a call that must not take the whole of the caller's budget. A limit that
    /// leaves more time than the deadline already does changes nothing.
    pub fn within(&self, limit: Duration) -> Context {
        let deadline = Instant::now() + limit;
        if deadline >= self.inner.deadline {
            return self.clone();
        }
        let i = &self.inner;
        let route = OnceLock::new();
        if let Some(r) = i.route.get() {
            let _ = route.set(r.clone());
        }
        Context {
            inner: Arc::new(Inner {
                arrived: i.arrived,
                deadline,
                deadline_source: DeadlineSource::Route,
                request_id: i.request_id.clone(),
                route,
                trace: i.trace.clone(),
                baggage: i.baggage.clone(),
                retry: i.retry,
                grpc: i.grpc,
                scope: i.scope.clone(),
                upstream_wait_us: AtomicU64::new(0),
                peer: i.peer,
                parent: Some(i.parent.clone().unwrap_or_else(|| self.inner.clone())),
            }),
        }
    }

    /// Time spent waiting on upstreams so far (the sum over calls; concurrent calls overlap,
    /// so the sum can exceed the wall-clock time they took).
    pub fn upstream_wait(&self) -> Duration {
        let own = self.inner.parent.as_ref().unwrap_or(&self.inner);
        Duration::from_micros(own.upstream_wait_us.load(Ordering::Relaxed))
    }

    /// Whether the request this context was made for is gRPC (its `content-type`), so a
    /// layer that answers in the handler's place knows which protocol to answer in without
    /// looking the header up again.
    pub fn is_grpc(&self) -> bool {
        self.inner.grpc
    }

    /// The address the request came from: the TCP peer of the connection it arrived on —
    /// a client, or the proxy in front (a gateway decides which to believe; see the shop's
    /// `X-Forwarded-For` handling). `None` for a context no server made.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.inner.peer
    }

    /// This context with its peer address set. For the server that makes the context: it
    /// takes effect only while nobody else holds a clone (which is how a server has it, so
    /// it costs no copy); on a shared context it is ignored.
    pub fn with_peer(mut self, peer: Option<SocketAddr>) -> Context {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.peer = peer;
        }
        self
    }

    /// When the request arrived (or the background context was made).
    pub fn arrived(&self) -> Instant {
        self.inner.arrived
    }

    /// The absolute deadline.
    pub fn deadline(&self) -> Instant {
        self.inner.deadline
    }

    /// Where the deadline came from.
    pub fn deadline_source(&self) -> DeadlineSource {
        self.inner.deadline_source
    }

    /// Time left (zero once past).
    pub fn remaining(&self) -> Duration {
        self.inner
            .deadline
            .saturating_duration_since(Instant::now())
    }

    /// The request id (kept from `x-request-id` when well-formed, generated otherwise).
    pub fn request_id(&self) -> &str {
        &self.inner.request_id
    }

    /// The request id as its own value (cheap to clone).
    pub fn request_id_ref(&self) -> &RequestId {
        &self.inner.request_id
    }

    /// Record the route template the router matched (`/orders/{id}`). The first template
    /// recorded stays: an outer router's match is the request's route.
    pub fn set_route(&self, template: Arc<str>) {
        let _ = self.inner.route.set(template);
    }

    /// The matched route template, if a router recorded one.
    pub fn route(&self) -> Option<&Arc<str>> {
        self.inner.route.get()
    }

    /// The owner this request's tasks are listed under: its id, deadline and (by now) route.
    fn owner(&self) -> Owner {
        Owner {
            route: self.route().cloned(),
            ..self.inner.scope.owner().clone()
        }
    }

    /// Trace identity.
    pub fn trace(&self) -> &Trace {
        &self.inner.trace
    }

    /// W3C baggage as received.
    pub fn baggage(&self) -> &Baggage {
        &self.inner.baggage
    }

    /// The traffic colour (`keel-color` baggage entry), e.g. `canary`.
    pub fn color(&self) -> Option<&str> {
        self.inner.baggage.get(COLOR_BAGGAGE_KEY)
    }

    /// Whether the caller marked this request as a retry (`keel-retry: 1`): such a request
    /// must not be retried again downstream, or retries multiply across hops.
    pub fn is_retry(&self) -> bool {
        self.inner.retry
    }

    /// The scope that owns this request's tasks.
    pub fn task_scope(&self) -> &TaskScope {
        &self.inner.scope
    }

    /// Spawn a task owned by this request: cancelled when the request finishes or its
    /// deadline passes, whichever comes first (the join handle then yields `None`). The task
    /// sees this context as [`Context::current`], so its outbound calls propagate correctly.
    pub fn spawn<F>(
        &self,
        name: impl Into<std::borrow::Cow<'static, str>>,
        fut: F,
    ) -> tokio::task::JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner
            .scope
            .spawn_as(name, &self.owner(), self.scope(fut))
    }

    /// Spawn a task that must outlive the request (an audit write, a cache fill). It is not
    /// cancelled with the request but stays listed in `/debug/tasks`, and becomes a leak
    /// suspect if it is still alive well past the request's deadline.
    pub fn detach<F>(
        &self,
        name: impl Into<std::borrow::Cow<'static, str>>,
        fut: F,
    ) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner
            .scope
            .detach_as(name, &self.owner(), self.scope(fut))
    }
}

/// The propagation headers of one request, found in a single pass over its header map.
///
/// A request carries a handful of headers and Keel looks for about fifteen names; one walk
/// comparing names beats fifteen hashed lookups (each of which also re-parses its name).
#[derive(Default)]
struct Found<'a> {
    grpc_timeout: Option<&'a [u8]>,
    keel_timeout: Option<&'a [u8]>,
    envoy_timeout: Option<&'a [u8]>,
    deadline: Option<&'a [u8]>,
    request_id: Option<&'a [u8]>,
    traceparent: Option<&'a [u8]>,
    tracestate: Option<&'a [u8]>,
    b3: Option<&'a [u8]>,
    b3_multi: [Option<&'a [u8]>; 5],
    retry: Option<&'a [u8]>,
    color: Option<&'a [u8]>,
    content_type: Option<&'a [u8]>,
    baggage: Baggage,
}

/// `x-b3-*` names in `Found::b3_multi` order.
const B3_MULTI: [&str; 5] = [
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

impl<'a> Found<'a> {
    fn scan<R: HeaderScan + ?Sized>(h: &'a R) -> Result<Found<'a>, CodecError> {
        let mut f = Found::default();
        let mut err = None;
        h.for_each_header(&mut |name, value| {
            // Names from an http::HeaderMap are already lower-case; message maps may not be.
            let slot = match name.len() {
                1..=40 => f.slot(name),
                _ => None,
            };
            match slot {
                // The first value wins for single-valued headers.
                Some(Slot::One(s)) if s.is_none() => *s = Some(value),
                Some(Slot::Baggage) if err.is_none() => {
                    if let Err(e) = f.baggage.extend_from(value) {
                        err = Some(e);
                    }
                }
                _ => {}
            }
        });
        match err {
            Some(e) => Err(e),
            None => Ok(f),
        }
    }

    fn slot<'s>(&'s mut self, name: &str) -> Option<Slot<'s, 'a>> {
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        Some(Slot::One(if is(names::GRPC_TIMEOUT) {
            &mut self.grpc_timeout
        } else if is(names::KEEL_TIMEOUT) {
            &mut self.keel_timeout
        } else if is(names::ENVOY_TIMEOUT) {
            &mut self.envoy_timeout
        } else if is(names::DEADLINE) {
            &mut self.deadline
        } else if is(names::REQUEST_ID) {
            &mut self.request_id
        } else if is(names::TRACEPARENT) {
            &mut self.traceparent
        } else if is(names::TRACESTATE) {
            &mut self.tracestate
        } else if is(names::B3) {
            &mut self.b3
        } else if is(names::RETRY) {
            &mut self.retry
        } else if is(names::COLOR) {
            &mut self.color
        } else if is(http::header::CONTENT_TYPE.as_str()) {
            &mut self.content_type
        } else if is(names::BAGGAGE) {
            return Some(Slot::Baggage);
        } else if let Some(i) = B3_MULTI.iter().position(|n| is(n)) {
            &mut self.b3_multi[i]
        } else {
            return None;
        }))
    }

    fn deadline(
        &self,
        now: Instant,
        route_timeout: Duration,
    ) -> Result<(Instant, DeadlineSource), CodecError> {
        let mut best = (now + route_timeout, DeadlineSource::Route);
        let mut offer = |d: Instant, s: DeadlineSource| {
            if d < best.0 {
                best = (d, s);
            }
        };
        if let Some(v) = self.grpc_timeout {
            offer(
                now + codec::timeout::parse(names::GRPC_TIMEOUT, v)?,
                DeadlineSource::GrpcTimeout,
            );
        }
        if let Some(v) = self.keel_timeout {
            offer(
                now + codec::timeout::parse(names::KEEL_TIMEOUT, v)?,
                DeadlineSource::KeelTimeout,
            );
        }
        if let Some(v) = self.envoy_timeout {
            offer(
                now + codec::timeout::parse_envoy_ms(v)?,
                DeadlineSource::Envoy,
            );
        }
        if let Some(v) = self.deadline {
            offer(
                crate::propagation::parse_absolute(v, now)?,
                DeadlineSource::Absolute,
            );
        }
        Ok(best)
    }

    fn trace(&self, sample_roots: bool) -> Result<Trace, CodecError> {
        let tracestate = match self.tracestate {
            Some(v) => Some(TraceState::parse(v)?),
            None => None,
        };
        if let Some(v) = self.traceparent {
            let tp = TraceParent::parse(v)?;
            return Ok(Trace {
                trace_id: tp.trace_id,
                span_id: SpanId::random(),
                parent_span_id: Some(tp.parent_id),
                sampled: tp.sampled(),
                tracestate,
            });
        }
        let b3 = match self.b3 {
            Some(v) => match codec::b3::parse_single(v)? {
                Some(b) => Some(b),
                // A lone sampling decision carries no identity: start a trace that honours it.
                None => {
                    let sampled = codec::b3::parse_single_sampling(v)
                        .flatten()
                        .unwrap_or(sample_roots);
                    return Ok(Trace::root(sampled));
                }
            },
            // The common request carries no B3 at all: no lookup by name then.
            None if self.b3_multi.iter().all(Option::is_none) => None,
            None => codec::b3::parse_multi(|name| {
                B3_MULTI
                    .iter()
                    .position(|n| n.eq_ignore_ascii_case(name))
                    .and_then(|i| self.b3_multi[i])
            })?,
        };
        Ok(match b3 {
            Some(b) => Trace {
                trace_id: b.trace_id,
                span_id: SpanId::random(),
                parent_span_id: Some(b.span_id),
                sampled: b.sampled.unwrap_or(false) || b.debug,
                tracestate,
            },
            None => Trace::root(sample_roots),
        })
    }
}

enum Slot<'s, 'a> {
    One(&'s mut Option<&'a [u8]>),
    Baggage,
}

pin_project_lite::pin_project! {
    /// A future polled with a [`Context`] as [`Context::current`] (see [`Context::scope`]).
    #[derive(Debug)]
    pub struct Scoped<F> {
        ctx: Context,
        #[pin]
        fut: F,
    }
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let fut = this.fut;
        this.ctx.enter(|| fut.poll(cx))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod within_tests {
    use super::*;

    #[test]
    fn a_narrowed_context_is_the_same_request_with_less_time() {
        let ctx = Context::background(Duration::from_secs(30));
        let narrow = ctx.within(Duration::from_secs(2));
        assert!(narrow.remaining() <= Duration::from_secs(2));
        assert!(ctx.remaining() > Duration::from_secs(29));
        assert_eq!(narrow.request_id(), ctx.request_id());
        assert_eq!(narrow.trace(), ctx.trace());
        assert_eq!(narrow.deadline_source(), DeadlineSource::Route);
        // Waits on upstreams are the request's, whichever context the call was made with.
        narrow.add_upstream_wait(Duration::from_millis(7));
        narrow
            .within(Duration::from_secs(1))
            .add_upstream_wait(Duration::from_millis(3));
        assert_eq!(ctx.upstream_wait(), Duration::from_millis(10));
        assert_eq!(narrow.upstream_wait(), Duration::from_millis(10));
    }

    #[test]
    fn a_limit_beyond_the_deadline_changes_nothing() {
        let ctx = Context::background(Duration::from_secs(1));
        let same = ctx.within(Duration::from_secs(60));
        assert!(Arc::ptr_eq(&same.inner, &ctx.inner));
    }
}
