//! The per-request wrapper between hyper and the user's `tower::Service`.
//!
//! In order, for every request: probes are answered before the user's service (so a wedged
//! handler cannot fail liveness), bodies declared larger than the limit get 413 without
//! running the handler, the body is capped for those that do not declare a length, and the
//! response is cleaned of hop-by-hop headers before Keel adds its own `Keep-Alive`.
//! No allocation happens here beyond what the user's service does; the future is a named type.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full, Limited};
use hyper::body::Incoming;
use keel_core::context::Context as RequestContext;
use keel_core::observe::{self, Outcome, RouteCell, ServerRecord};

use crate::overload::{Admission, Permit, Shed};
use keel_core::tasks::{Owner, TaskGuard, TaskKind};
use keel_core::{BoxError, Phase};
use tokio::time::Sleep;
use tower::ServiceExt;
use tower::util::Oneshot;

use crate::conn::ConnTracker;
use crate::context as ctxmod;
use crate::readiness;

/// The request body handed to user services: hyper's body, capped at `server.max_body_bytes`.
/// Reading past the cap yields `http_body_util::LengthLimitError`, which axum's extractors turn
/// into 413.
pub type RequestBody = Limited<Incoming>;

/// Response body produced by Keel: the service's own body or a small fixed one (probes, 413),
/// tracked so the connection knows when the response has really finished.
pub type ResponseBody<B> = TrackedBody<Either<B, Full<Bytes>>>;

/// Counts a request as in flight on its connection and server until dropped; ends the
/// request's task scope (cancelling its scoped tasks) and its task-registry entry with it.
#[derive(Debug)]
struct RequestGuard {
    tracker: Arc<ConnTracker>,
    ctx: Option<RequestContext>,
    _task: Option<TaskGuard>,
    /// What telemetry will be told when the request ends; `None` without an observer, and
    /// for probes (which are not traffic).
    obs: Option<Box<Observation>>,
    /// The request's slot under the concurrency limit, held until the response ends.
    permit: Option<Permit>,
}

/// The facts of one request gathered for [`keel_core::observe::Observer::server`].
#[derive(Debug)]
struct Observation {
    method: http::Method,
    path: Arc<str>,
    route: RouteCell,
    grpc: bool,
    start: std::time::Instant,
    wall: std::time::SystemTime,
    status: Option<u16>,
    grpc_status: Option<i32>,
    outcome: Option<Outcome>,
}

impl RequestGuard {
    fn start(tracker: Arc<ConnTracker>, is_h2: bool) -> Self {
        tracker.request_started(is_h2);
        RequestGuard {
            tracker,
            ctx: None,
            _task: None,
            obs: None,
            permit: None,
        }
    }

    fn observe<B>(&mut self, req: &Request<B>, path: &Arc<str>, grpc: bool) -> Option<RouteCell> {
        let observer = observe::observer()?;
        observer.server_started();
        let route = RouteCell::default();
        self.obs = Some(Box::new(Observation {
            method: req.method().clone(),
            path: path.clone(),
            route: route.clone(),
            grpc,
            start: std::time::Instant::now(),
            wall: std::time::SystemTime::now(),
            status: None,
            grpc_status: None,
            outcome: None,
        }));
        Some(route)
    }

    /// Record the response head (and a first outcome, for answers Keel made itself).
    fn responded(&mut self, status: StatusCode, headers: &HeaderMap, outcome: Option<Outcome>) {
        if let Some(o) = self.obs.as_mut() {
            o.status = Some(status.as_u16());
            if let Some(code) = grpc_status(headers) {
                o.grpc_status = Some(code);
            }
            if o.outcome.is_none() {
                o.outcome = outcome;
            }
        }
    }

    fn trailers(&mut self, trailers: &HeaderMap) {
        if let Some(o) = self.obs.as_mut()
            && let Some(code) = grpc_status(trailers)
        {
            o.grpc_status = Some(code);
        }
    }

    /// The body ended cleanly: an answer, unless Keel already said otherwise.
    fn responded_failed(&mut self) {
        if let Some(o) = self.obs.as_mut()
            && o.outcome.is_none()
        {
            o.outcome = Some(Outcome::Failed);
        }
    }

    fn completed(&mut self) {
        if let Some(o) = self.obs.as_mut()
            && o.outcome.is_none()
        {
            o.outcome = Some(Outcome::Answered);
        }
    }
}

fn grpc_status(h: &HeaderMap) -> Option<i32> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if let Some(ctx) = &self.ctx {
            ctx.task_scope().cancel();
        }
        self.tracker.request_finished();
        if let (Some(o), Some(observer)) = (self.obs.take(), observe::observer()) {
            let template = o.route.get();
            observer.server(&ServerRecord {
                ctx: self.ctx.as_ref(),
                route: template.as_deref().unwrap_or(&o.path),
                route_is_template: template.is_some(),
                method: &o.method,
                grpc: o.grpc,
                status: o.status,
                grpc_status: o.grpc_status,
                // Dropped before the body ended and with nothing recorded: the caller left.
                outcome: o.outcome.unwrap_or(Outcome::Cancelled),
                start: o.wall,
                duration: o.start.elapsed(),
                peer: None,
            });
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that releases its request's in-flight slot when it ends or is dropped.
    #[derive(Debug)]
    pub struct TrackedBody<B> {
        #[pin]
        inner: B,
        guard: Option<RequestGuard>,
    }
}

impl<B> Body for TrackedBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let res = ready!(this.inner.as_mut().poll_frame(cx));
        match &res {
            Some(Ok(frame)) => {
                if let Some(g) = this.guard.as_mut() {
                    if let Some(t) = frame.trailers_ref() {
                        g.trailers(t);
                    }
                    // hyper stops polling once the body says it has ended, so the last frame
                    // is the moment the answer is complete.
                    if this.inner.is_end_stream() {
                        g.completed();
                    }
                }
            }
            None => {
                if let Some(g) = this.guard.as_mut() {
                    g.completed();
                }
                // End of stream: the request is over even if hyper keeps the body a while.
                this.guard.take();
            }
            Some(Err(_)) => {
                if let Some(g) = this.guard.as_mut() {
                    g.responded_failed();
                }
                this.guard.take();
            }
        }
        Poll::Ready(res)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// hyper-facing service for one connection.
#[derive(Debug)]
pub(crate) struct KeelService<S> {
    inner: S,
    tracker: Arc<ConnTracker>,
}

impl<S: Clone> Clone for KeelService<S> {
    fn clone(&self) -> Self {
        KeelService {
            inner: self.inner.clone(),
            tracker: self.tracker.clone(),
        }
    }
}

impl<S> KeelService<S> {
    pub(crate) fn new(inner: S, tracker: Arc<ConnTracker>) -> Self {
        KeelService { inner, tracker }
    }
}

impl<S, B> hyper::service::Service<Request<Incoming>> for KeelService<S>
where
    S: tower::Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<B>>;
    type Error = Infallible;
    type Future = KeelFuture<S, B>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let is_h2 = req.version() == Version::HTTP_2;
        let keep_alive = req.version() == Version::HTTP_11;
        let guard = RequestGuard::start(self.tracker.clone(), is_h2);
        let shared = &self.tracker.shared;

        if let Some(paths) = &shared.probes {
            if let Some(resp) = readiness::probe_response(
                req.uri(),
                &paths.livez,
                &paths.readyz,
                &paths.healthz,
                &shared.readiness,
            ) {
                return KeelFuture::fixed(resp, guard, keep_alive);
            }
        }

        let grpc = ctxmod::is_grpc(req.headers());
        let mut guard = guard;
        // One copy of the path serves the observation, the context and the task registry.
        let route: Arc<str> = Arc::from(req.uri().path());
        let route_cell = guard.observe(&req, &route, grpc);
        let limit = shared.limits.max_body_bytes;
        if declared_length(req.headers()).is_some_and(|n| n > limit) {
            shared.stats.body_too_large.fetch_add(1, Ordering::Relaxed);
            // The unread body is still on the wire: hyper closes the connection after this
            // response, so it must not advertise a keep-alive.
            let resp = fixed(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
            guard.responded(resp.status(), resp.headers(), Some(Outcome::Refused));
            return KeelFuture::fixed(resp, guard, false);
        }
        let policy = shared.deadlines.for_path(req.uri().path());
        let ctx = match RequestContext::from_headers(
            req.headers(),
            &policy,
            Some(route.clone()),
            shared.registry,
        ) {
            Ok(ctx) => ctx,
            Err(e) => {
                shared
                    .stats
                    .refused_on_arrival
                    .fetch_add(1, Ordering::Relaxed);
                let mut resp = ctxmod::refusal(&e, grpc);
                // Echo the caller's id (when well-formed) so it can report which request failed.
                if let Some(id) = req.headers().get("x-request-id") {
                    if keel_core::codec::request_id::is_valid(id.as_bytes()) {
                        resp.headers_mut().insert("x-request-id", id.clone());
                    }
                }
                guard.responded(resp.status(), resp.headers(), Some(Outcome::Refused));
                return KeelFuture::fixed(resp, guard, keep_alive);
            }
        };
        guard._task = Some(shared.registry.register(
            if grpc { "grpc request" } else { "http request" },
            TaskKind::Request,
            &Owner {
                route: Some(route),
                request_id: Some(ctx.request_id_arc().clone()),
                deadline: Some(ctx.deadline()),
            },
        ));
        let deadline = ctx.deadline();
        let mut waiting = None;
        if let Some(limiter) = &shared.limiter {
            let critical = limiter.is_critical(req.uri().path());
            match limiter.admit(ctx.remaining(), critical) {
                Admission::Now(p) => guard.permit = Some(p),
                Admission::Wait(w) => waiting = Some(w),
                Admission::Shed(why) => {
                    let resp = ctxmod::overloaded(why, grpc, &shared.retry_after);
                    guard.responded(resp.status(), resp.headers(), Some(Outcome::Refused));
                    guard.ctx = Some(ctx);
                    return KeelFuture::fixed(resp, guard, keep_alive);
                }
            }
        }
        let mut req = req.map(|b| Limited::new(b, usize::try_from(limit).unwrap_or(usize::MAX)));
        req.extensions_mut().insert(ctx.clone());
        if let Some(cell) = route_cell {
            req.extensions_mut().insert(cell);
        }
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
        let fut = ctx.scope(self.inner.clone().oneshot(req));
        guard.ctx = Some(ctx);
        KeelFuture {
            state: State::Inner {
                fut,
                sleep: tokio::time::sleep_until(deadline),
                waiting,
            },
            guard: Some(guard),
            keep_alive,
            grpc,
            span,
        }
    }
}

/// Poll the handler, timing the poll when an observer is installed: a poll that holds the
/// worker past [`observe::LONG_POLL_THRESHOLD`] is blocking code in async, reported with the
/// route so it can be found.
fn poll_timed<F: Future>(
    fut: Pin<&mut F>,
    cx: &mut Context<'_>,
    guard: Option<&RequestGuard>,
) -> Poll<F::Output> {
    let Some(obs) = guard.and_then(|g| g.obs.as_deref()) else {
        return fut.poll(cx);
    };
    let started = std::time::Instant::now();
    let res = fut.poll(cx);
    let held = started.elapsed();
    if held > observe::LONG_POLL_THRESHOLD
        && let Some(observer) = observe::observer()
    {
        let template = obs.route.get();
        observer.long_poll(template.as_deref().unwrap_or(&obs.path), held);
    }
    res
}

/// The bounded wait for a slot under the concurrency limit.
type Waiting = Pin<Box<dyn Future<Output = Result<Permit, Shed>> + Send>>;

fn declared_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// A small fixed plain-text response.
pub(crate) fn fixed(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: tower::Service<Request<RequestBody>, Response = Response<B>>,
    {
        Inner {
            #[pin] fut: tokio::task::futures::TaskLocalFuture<RequestContext, Oneshot<S, Request<RequestBody>>>,
            // The request's deadline: when it fires first, the handler future is dropped.
            #[pin] sleep: Sleep,
            // Over the concurrency limit: the wait for a slot, before the handler starts.
            waiting: Option<Waiting>,
        },
        Fixed { resp: Option<Response<Full<Bytes>>> },
    }
}

pin_project_lite::pin_project! {
    /// Future of [`KeelService`].
    pub(crate) struct KeelFuture<S, B>
    where
        S: tower::Service<Request<RequestBody>, Response = Response<B>>,
    {
        #[pin]
        state: State<S, B>,
        guard: Option<RequestGuard>,
        keep_alive: bool,
        grpc: bool,
        span: tracing::Span,
    }
}

impl<S, B> KeelFuture<S, B>
where
    S: tower::Service<Request<RequestBody>, Response = Response<B>>,
{
    fn fixed(resp: Response<Full<Bytes>>, guard: RequestGuard, keep_alive: bool) -> Self {
        KeelFuture {
            state: State::Fixed { resp: Some(resp) },
            guard: Some(guard),
            keep_alive,
            grpc: false,
            span: tracing::Span::none(),
        }
    }
}

impl<S, B> Future for KeelFuture<S, B>
where
    S: tower::Service<Request<RequestBody>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
{
    type Output = Result<Response<ResponseBody<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = this.span.enter();
        let resp = match this.state.as_mut().project() {
            StateProj::Inner {
                fut,
                mut sleep,
                waiting,
            } => {
                let step = {
                    // First the wait for a slot (if the request is queued), then the handler.
                    let admission = match waiting.as_mut() {
                        None => Poll::Ready(Ok(())),
                        Some(w) => match w.as_mut().poll(cx) {
                            Poll::Ready(Ok(permit)) => {
                                *waiting = None;
                                if let Some(g) = this.guard.as_mut() {
                                    g.permit = Some(permit);
                                }
                                Poll::Ready(Ok(()))
                            }
                            Poll::Ready(Err(why)) => {
                                *waiting = None;
                                Poll::Ready(Err(why))
                            }
                            Poll::Pending => Poll::Pending,
                        },
                    };
                    match admission {
                        Poll::Ready(Ok(())) => {
                            Poll::Ready(Ok(poll_timed(fut, cx, this.guard.as_ref())))
                        }
                        Poll::Ready(Err(why)) => Poll::Ready(Err(why)),
                        Poll::Pending => Poll::Pending,
                    }
                };
                match step {
                    // Over the limit and not admitted in time (or the queue was full).
                    Poll::Ready(Err(why)) => {
                        this.state.set(State::Fixed { resp: None });
                        let retry_after = this
                            .guard
                            .as_ref()
                            .map(|g| g.tracker.shared.retry_after.clone())
                            .unwrap_or_else(|| header::HeaderValue::from_static("1"));
                        let resp = ctxmod::overloaded(why, *this.grpc, &retry_after);
                        if let Some(g) = this.guard.as_mut() {
                            g.responded(resp.status(), resp.headers(), Some(Outcome::Refused));
                        }
                        resp.map(Either::Right)
                    }
                    Poll::Ready(Ok(Poll::Ready(Ok(resp)))) => {
                        if let Some(p) = this.guard.as_mut().and_then(|g| g.permit.as_mut()) {
                            p.answered();
                        }
                        resp.map(Either::Left)
                    }
                    Poll::Ready(Ok(Poll::Ready(Err(err)))) => {
                        let err: BoxError = err.into();
                        tracing::error!(error = %err, "service returned an error; answering 500");
                        let resp =
                            fixed(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n");
                        if let Some(g) = this.guard.as_mut() {
                            g.responded(resp.status(), resp.headers(), Some(Outcome::Failed));
                        }
                        resp.map(Either::Right)
                    }
                    Poll::Pending | Poll::Ready(Ok(Poll::Pending)) => {
                        ready!(sleep.as_mut().poll(cx));
                        // Deadline passed mid-handler: drop the handler future now, which cancels
                        // its outbound calls and queries, and answer at once.
                        this.state.set(State::Fixed { resp: None });
                        if let Some(g) = this.guard.as_ref() {
                            g.tracker
                                .shared
                                .stats
                                .deadline_exceeded
                                .fetch_add(1, Ordering::Relaxed);
                            if let Some(ctx) = &g.ctx {
                                tracing::debug!(
                                    request_id = ctx.request_id(),
                                    "deadline exceeded; handler cancelled"
                                );
                            }
                        }
                        let resp = ctxmod::deadline_exceeded(*this.grpc);
                        if let Some(g) = this.guard.as_mut() {
                            g.responded(
                                resp.status(),
                                resp.headers(),
                                Some(Outcome::DeadlineExceeded),
                            );
                        }
                        resp.map(Either::Right)
                    }
                }
            }
            StateProj::Fixed { resp } => match resp.take() {
                Some(r) => r.map(Either::Right),
                None => fixed(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "polled after completion\n",
                )
                .map(Either::Right),
            },
        };
        let mut guard = this.guard.take();
        let (mut parts, body) = resp.into_parts();
        if let Some(g) = guard.as_mut() {
            g.responded(parts.status, &parts.headers, None);
        }
        strip_hop_by_hop(&mut parts.headers, parts.status);
        if let Some(ctx) = guard.as_ref().and_then(|g| g.ctx.as_ref()) {
            if let Some(v) = ctxmod::request_id_value(ctx.request_id_arc()) {
                parts
                    .headers
                    .insert(HeaderName::from_static("x-request-id"), v);
            }
        }
        if *this.keep_alive {
            if let Some(g) = &guard {
                let shared = &g.tracker.shared;
                // While closing hyper answers `Connection: close`; advertising a keep-alive
                // then would contradict it.
                if shared.shutdown.phase() < Phase::Closing {
                    parts.headers.insert(
                        HeaderName::from_static("keep-alive"),
                        shared.keep_alive.clone(),
                    );
                }
            }
        }
        let empty = match &body {
            Either::Left(b) => b.is_end_stream(),
            Either::Right(b) => b.is_end_stream(),
        };
        if empty && let Some(g) = guard.as_mut() {
            // An empty body is never polled: the head is the whole answer.
            g.completed();
        }
        Poll::Ready(Ok(Response::from_parts(
            parts,
            TrackedBody { inner: body, guard },
        )))
    }
}

/// Headers that describe one hop's connection, never the end-to-end message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// Remove hop-by-hop headers from a handler's response, including any named by its
/// `Connection` header. A `101 Switching Protocols` keeps `Connection`/`Upgrade`: they *are*
/// the protocol switch.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, status: StatusCode) {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    // Nearly every response has none: one pass over its few names beats seven hashed removals.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Names listed in `Connection` are hop-by-hop too; collect them before removing it.
    let mut listed: Vec<HeaderName> = Vec::new();
    for v in headers.get_all(header::CONNECTION) {
        if let Ok(s) = v.to_str() {
            for name in s.split(',') {
                if let Ok(n) = HeaderName::from_bytes(name.trim().as_bytes()) {
                    listed.push(n);
                }
            }
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    for n in listed {
        headers.remove(n);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_including_connection_listed_ones() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-secret-hop".parse().unwrap());
        h.insert("keep-alive", "timeout=1".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("x-end-to-end", "1".parse().unwrap());
        strip_hop_by_hop(&mut h, StatusCode::OK);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-end-to-end"));
    }

    #[test]
    fn switching_protocols_keeps_upgrade_headers() {
        let mut h = HeaderMap::new();
        h.insert("connection", "upgrade".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        strip_hop_by_hop(&mut h, StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(h.len(), 2);
    }
}
