//! The HTTP client: every policy of this crate applied to real calls, over pooled per-endpoint
//! connections, with the request [`Context`] propagated on every attempt.
//!
//! **Whose call is it?** Every call belongs to a request: its deadline bounds the call, its
//! trace is the call's parent. [`Client::call`] takes that [`Context`] as an argument;
//! [`Client::request`] finds it in the request's extensions (where Keel's server puts it, and
//! where tonic copies a `tonic::Request`'s extensions), else in the task
//! ([`Context::current`]). A call with no context anywhere still goes out — with a new trace
//! and a fallback deadline — but never silently: it is counted
//! ([`ClientStats::calls_without_context`]) and logged once per client, because it almost
//! always means a handler forgot to pass its context. Work that no request started says so
//! by passing [`Context::background`] to [`Client::call`].
//!
//! One call: breaker admission → budget deposit → for each attempt: pick an endpoint
//! ([`Upstream`]) → write the context's headers (remaining deadline minus the margin, trace,
//! baggage, request id, retry marker on retries) → send with a per-try timeout no later than
//! the deadline → classify → report to the balancer/outlier detector and breaker → retry only
//! when the failure is safe to retry, the backoff fits in the remaining time and the budget
//! has a token.
//!
//! **Connections** live in per-endpoint pools ([`crate::pool`]) that learn the server's
//! keep-alive, size their idle set by a decaying peak of concurrency, and open another HTTP/2
//! connection when one reaches the server's stream limit. A response's HTTP/1.1 connection
//! returns to its pool when the [`Body`] has been read to the end.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, Request, Response, StatusCode};
use keel_core::Context;
use keel_core::grpc::is_grpc;
use keel_core::observe;
use keel_core::propagation::{self, Carrier, Outbound};
use tokio::time::Instant;

use crate::body::{Body, GrpcOutcome, OutBody, Payload};
use crate::breaker::{Breaker, BreakerConfig, BreakerOpen, BreakerStats};
pub use crate::pool::Protocol;
use crate::pool::{ConnectError, Pool, PoolConfig, PoolSnapshot};
use crate::retry::{self, BackoffConfig, BudgetConfig, Failure, RetryBudget};
use crate::upstream::Upstream;
use keel_core::fasthash::FastMap;

/// How one call may be retried, over the client's own settings: a gateway route's policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetryPolicy {
    /// As the client is configured (`idempotent`, the backoff and the budget).
    #[default]
    Client,
    /// As if the upstream were idempotent: any failure may be retried (and hedged, when
    /// the client hedges), still within the backoff's time and the budget.
    Idempotent,
    /// One attempt only (no retry, no hedge).
    Never,
}

/// Client settings for one upstream.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClientConfig {
    /// Connections.
    pub pool: PoolConfig,
    /// Upper bound of one attempt (the remaining deadline may shorten it). None: deadline only.
    pub per_try_timeout: Option<Duration>,
    /// The route is idempotent: any failure may be retried.
    pub idempotent: bool,
    /// Hedging (idempotent upstreams only): when the first attempt has not answered after
    /// this long, send a second one to another endpoint and take whichever answers first.
    /// The hedge spends a retry-budget token. Off by default: it trades upstream load for
    /// tail latency, which is the service owner's call. A good value is the route's p95.
    pub hedge_after: Option<Duration>,
    /// Path prefixes with a breaker of their own: a failing route is throttled without
    /// throttling the others. Requests under no listed prefix share the upstream's breaker.
    pub route_breakers: Vec<String>,
    /// Deadline and trace propagation: the margin kept off the remaining time and the B3
    /// format. The `keel` facade fills it from `[propagation]`; `retry` and `span_id` are set
    /// per attempt and ignored here.
    pub outbound: Outbound,
    /// Retry backoff and attempts.
    pub backoff: BackoffConfig,
    /// Retry budget.
    pub budget: BudgetConfig,
    /// Adaptive throttling.
    pub breaker: BreakerConfig,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The breaker rejected the call locally.
    #[error(transparent)]
    BreakerOpen(#[from] BreakerOpen),
    /// Too little time was left to send (or to retry).
    #[error(transparent)]
    DeadlineExceeded(#[from] propagation::DeadlineExceeded),
    /// The upstream has no endpoints.
    #[error("upstream {0} has no endpoints")]
    NoEndpoints(String),
    /// The request could not be built (an invalid header value from the caller).
    #[error("upstream {upstream}: invalid request: {reason}")]
    InvalidRequest {
        /// Upstream name.
        upstream: String,
        /// What was wrong.
        reason: String,
    },
    /// The last attempt failed and no retry was possible.
    #[error("upstream {upstream}: {failure:?} from {addr} after {attempts} attempt(s)")]
    Failed {
        /// Upstream name.
        upstream: String,
        /// Endpoint of the last attempt.
        addr: SocketAddr,
        /// Classified failure.
        failure: Failure,
        /// Attempts made.
        attempts: u32,
    },
}

/// Counters of one upstream, for metrics and `/debug/clients`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientStats {
    /// Calls made (not attempts).
    pub calls: u64,
    /// Retries sent.
    pub retries: u64,
    /// Hedged attempts sent.
    pub hedges: u64,
    /// Calls that found no request context (none passed, none in the request's extensions,
    /// none in the task) and went out with a new trace and the fallback deadline. Anything
    /// above zero is a handler that forgot to pass its context.
    pub calls_without_context: u64,
    /// Connections, summed over endpoints.
    pub pool: PoolSnapshot,
    /// The upstream's breaker.
    pub breaker: BreakerStats,
    /// Per-route breakers, by prefix.
    pub route_breakers: Vec<(String, BreakerStats)>,
}

/// An HTTP client for one upstream.
pub struct Client {
    name: String,
    cfg: ClientConfig,
    pool_cfg: Arc<PoolConfig>,
    upstream: Arc<Upstream>,
    breaker: Breaker,
    /// Longest prefix first.
    route_breakers: Vec<(String, Breaker)>,
    budget: RetryBudget,
    pools: Mutex<Pools>,
    calls: AtomicU64,
    retries: AtomicU64,
    hedges: AtomicU64,
    /// The App's observer: every attempt is reported to it (a CLIENT span, the client
    /// metrics). `None` reports nothing.
    observer: Option<observe::SharedObserver>,
    calls_without_context: AtomicU64,
    /// The warning about a call without context has been logged (once per client: the
    /// counter tells how often, the log line tells where to look and what to do).
    warned_without_context: AtomicBool,
}

/// Deadline of a call that found no context and has no per-try timeout either: Keel's
/// default request deadline (`deadline.default`), so such a call is bounded like a request.
const FALLBACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Pools by address, pruned to the endpoint set when its version changes (discovery removes
/// an endpoint: its idle connections close with its pool).
#[derive(Default)]
struct Pools {
    version: Option<u64>,
    by_addr: FastMap<SocketAddr, Arc<Pool>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A call's request head, with what every attempt asks of it worked out once.
struct Call {
    parts: Parts,
    /// A gRPC call (by its `content-type`): its answer's status may be in `grpc-status`.
    grpc: bool,
}

/// What one attempt produced.
///
/// Each carries the clock reading taken when the attempt ended, which every policy that
/// hears of the outcome (balancer, outlier detection, breaker, telemetry, the caller's
/// upstream wait) shares instead of reading the clock again.
enum Outcome {
    /// An answer for the caller: a success, or an error the caller should see as is.
    Answer(Response<Body>, SocketAddr, Instant),
    /// A response that speaks against the endpoint (5xx, gRPC UNAVAILABLE…); retried when
    /// that is safe, otherwise handed to the caller.
    Refused(Response<Body>, Failure, SocketAddr, Instant),
    /// No response.
    Error(Failure, SocketAddr, Instant),
}

impl Client {
    /// A client for `upstream`.
    pub fn new(name: impl Into<String>, cfg: ClientConfig, upstream: Arc<Upstream>) -> Client {
        let mut route_breakers: Vec<(String, Breaker)> = cfg
            .route_breakers
            .iter()
            .map(|p| (p.clone(), Breaker::new(cfg.breaker.clone())))
            .collect();
        route_breakers.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        Client {
            name: name.into(),
            breaker: Breaker::new(cfg.breaker.clone()),
            route_breakers,
            budget: RetryBudget::new(cfg.budget.clone()),
            pool_cfg: Arc::new(cfg.pool.clone()),
            cfg,
            upstream,
            pools: Mutex::new(Pools::default()),
            calls: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            hedges: AtomicU64::new(0),
            observer: None,
            calls_without_context: AtomicU64::new(0),
            warned_without_context: AtomicBool::new(false),
        }
    }

    /// Report every attempt to `observer` (the `keel` facade passes its App's own).
    pub fn observed_by(mut self, observer: Option<observe::SharedObserver>) -> Client {
        self.observer = observer;
        self
    }

    /// The upstream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The settings it was built with.
    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    /// The routing state (endpoints, outlier detector, loads).
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// The upstream's breaker (stats for metrics and tests).
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// The breaker a request for `path` is admitted by: the longest matching route prefix,
    /// else the upstream's.
    pub fn breaker_for(&self, path: &str) -> &Breaker {
        self.route_breakers
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix.as_str()))
            .map_or(&self.breaker, |(_, b)| b)
    }

    /// The retry budget (stats for metrics and tests).
    pub fn budget(&self) -> &RetryBudget {
        &self.budget
    }

    /// The idle timeout currently used for `addr`'s pool.
    pub fn idle_timeout_of(&self, addr: SocketAddr) -> Option<Duration> {
        self.lock_pools()
            .by_addr
            .get(&addr)
            .map(|p| p.idle_timeout())
    }

    /// Connection counters of one endpoint.
    pub fn pool_stats_of(&self, addr: SocketAddr) -> Option<PoolSnapshot> {
        self.lock_pools().by_addr.get(&addr).map(|p| p.snapshot())
    }

    /// Counters of the whole upstream.
    pub fn stats(&self) -> ClientStats {
        let mut pool = PoolSnapshot::default();
        for p in self.lock_pools().by_addr.values() {
            pool.add(&p.snapshot());
        }
        ClientStats {
            calls: self.calls.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            hedges: self.hedges.load(Ordering::Relaxed),
            calls_without_context: self.calls_without_context.load(Ordering::Relaxed),
            pool,
            breaker: self.breaker.stats(),
            route_breakers: self
                .route_breakers
                .iter()
                .map(|(p, b)| (p.clone(), b.stats()))
                .collect(),
        }
    }

    /// Send `req` on behalf of the request `ctx`: its remaining deadline (minus the margin)
    /// bounds the call and travels with it, its trace is the call's parent, its baggage,
    /// colour and request id go along. Only the URI's path and query are used; the authority
    /// comes from the chosen endpoint.
    ///
    /// In a handler, pass the handler's `keel::Context`. For work no request started, name
    /// it: `client.call(&Context::background(timeout), req)`.
    ///
    /// **Upgrades** (WebSocket): a request with `Connection: upgrade` and `Upgrade` headers,
    /// sent over HTTP/1.1, may be answered `101 Switching Protocols`; that connection then
    /// leaves the pool and is the caller's through `hyper::upgrade::on(&mut response)`.
    pub async fn call(
        &self,
        ctx: &Context,
        req: Request<Bytes>,
    ) -> Result<Response<Body>, ClientError> {
        let (parts, body) = req.into_parts();
        self.send(ctx, parts, &Payload::Whole(body), RetryPolicy::Client)
            .await
    }

    /// [`Client::call`] with a body that streams: it is read as it is written to the
    /// upstream, never held whole, with hyper's backpressure both ways (a proxy forwarding
    /// an upload of any size holds a few frames of it at a time).
    ///
    /// A stream can be sent once, so a call that has started sending it is not retried or
    /// hedged: its failure (or the upstream's error answer) is the caller's. Failures before
    /// any of it was read — no connection, a refused stream, hyper handing the request back
    /// unsent — are retried as usual. A body that is already at its end (a `GET`) is sent as
    /// [`Client::call`] sends one.
    pub async fn call_streaming<B>(
        &self,
        ctx: &Context,
        req: Request<B>,
    ) -> Result<Response<Body>, ClientError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<keel_core::BoxError>,
    {
        self.call_streaming_with(ctx, req, RetryPolicy::Client)
            .await
    }

    /// [`Client::call_streaming`] retried as `retry` says rather than as the client's
    /// settings do (a gateway route's own policy).
    pub async fn call_streaming_with<B>(
        &self,
        ctx: &Context,
        req: Request<B>,
        retry: RetryPolicy,
    ) -> Result<Response<Body>, ClientError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<keel_core::BoxError>,
    {
        let (parts, body) = req.into_parts();
        let payload = if body.is_end_stream() {
            Payload::Whole(Bytes::new())
        } else {
            let body = http_body_util::BodyExt::map_err(body, Into::into);
            Payload::Stream(Mutex::new(Some(Box::pin(body))))
        };
        self.send(ctx, parts, &payload, retry).await
    }

    /// [`Client::call`] with the context found in `req`'s extensions (Keel's server puts it
    /// in the inbound request's; a forwarded request or a `tonic::Request` can carry it), else
    /// the task's ([`Context::current`]).
    ///
    /// With neither, the call is sent with a new trace and the per-try timeout (30 s without
    /// one) as its deadline, and that fallback is counted in
    /// [`ClientStats::calls_without_context`] and logged once per client at `warn`.
    pub async fn request(&self, req: Request<Bytes>) -> Result<Response<Body>, ClientError> {
        let (mut parts, body) = req.into_parts();
        // Taken out rather than cloned: the outgoing request is built from the method, URI
        // and headers only, so the extension has no further use.
        let ctx = match parts
            .extensions
            .remove::<Context>()
            .or_else(Context::current)
        {
            Some(ctx) => ctx,
            None => self.without_context(),
        };
        self.send(&ctx, parts, &Payload::Whole(body), RetryPolicy::Client)
            .await
    }

    /// The context of a call that found none: counted, logged once, and bounded.
    fn without_context(&self) -> Context {
        self.calls_without_context.fetch_add(1, Ordering::Relaxed);
        let timeout = self.cfg.per_try_timeout.unwrap_or(FALLBACK_TIMEOUT);
        // The load first: after the first warning, fallbacks only read the flag.
        if !self.warned_without_context.load(Ordering::Relaxed)
            && !self.warned_without_context.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                upstream = %self.name,
                fallback_deadline = ?timeout,
                "call made without a request context: sent with a new trace and the fallback \
                 deadline instead of the request's. In a handler, pass its context: \
                 `client.call(&ctx, req)`, or put the Context in the request's extensions; \
                 for work no request started, say so: \
                 `client.call(&Context::background(timeout), req)`. Counted in \
                 keel_client_calls_without_context_total; logged once per client."
            );
        }
        Context::background(timeout)
    }

    /// One call, its time counted in `ctx` as waiting on an upstream (the caller's overload
    /// control leaves it out of the caller's own service time).
    async fn send(
        &self,
        ctx: &Context,
        parts: Parts,
        body: &Payload,
        retry: RetryPolicy,
    ) -> Result<Response<Body>, ClientError> {
        // The call's clock: read here once for everything its first attempt decides, and
        // once more when each attempt ends (see `Outcome`).
        let started = Instant::now();
        let mut ended = None;
        let out = self
            .send_attempts(ctx, parts, body, retry, started, &mut ended)
            .await;
        let ended = ended.unwrap_or_else(Instant::now);
        ctx.add_upstream_wait(ended.saturating_duration_since(started));
        out
    }

    /// One call: admission, attempts, retries. `ended`: when the last attempt ended.
    async fn send_attempts(
        &self,
        ctx: &Context,
        parts: Parts,
        body: &Payload,
        retry: RetryPolicy,
        started: Instant,
        ended: &mut Option<Instant>,
    ) -> Result<Response<Body>, ClientError> {
        let idempotent = match retry {
            RetryPolicy::Client => self.cfg.idempotent,
            RetryPolicy::Idempotent => true,
            RetryPolicy::Never => false,
        };
        // Whether another attempt may follow a failure, and then only if its time and the
        // budget allow.
        let again = retry != RetryPolicy::Never;
        let call = Call {
            grpc: is_grpc(&parts.headers),
            parts,
        };
        let admitted = self.breaker_for(call.parts.uri.path()).admit_at(started)?;
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.budget.deposit_at(started);
        let mut attempt: u32 = 0;
        let mut now = started;
        loop {
            let (failure, addr) = match self
                .attempt_hedged(ctx, &call, body, attempt, idempotent && again, now)
                .await?
            {
                Outcome::Answer(mut resp, addr, at) => {
                    *ended = Some(at);
                    if call.grpc && status_in_trailers(resp.headers()) {
                        resp.body_mut().report_trailers_to(GrpcOutcome {
                            upstream: self.upstream.clone(),
                            addr,
                            admitted,
                        });
                    } else {
                        admitted.success_at(at);
                    }
                    return Ok(resp);
                }
                Outcome::Refused(resp, failure, addr, at) => {
                    *ended = Some(at);
                    if !again
                        || !body.replayable()
                        || !self.may_retry(failure, ctx, attempt, idempotent).await
                    {
                        admitted.failure_at(at);
                        // An answer is an answer: hand the 5xx (or gRPC error) to the caller.
                        return Ok(resp);
                    }
                    (failure, addr)
                }
                Outcome::Error(failure, addr, at) => {
                    *ended = Some(at);
                    if !again
                        || !body.replayable()
                        || !self.may_retry(failure, ctx, attempt, idempotent).await
                    {
                        admitted.failure_at(at);
                        return Err(ClientError::Failed {
                            upstream: self.name.clone(),
                            addr,
                            failure,
                            attempts: attempt + 1,
                        });
                    }
                    (failure, addr)
                }
            };
            tracing::debug!(upstream = %self.name, %addr, ?failure, attempt, "retrying");
            self.retries.fetch_add(1, Ordering::Relaxed);
            attempt += 1;
            // After the backoff: a new reading for the new attempt, and until it ends, the
            // call's end is whenever it returns (the backoff was time spent on the upstream).
            now = Instant::now();
            *ended = None;
        }
    }

    /// One attempt, with a hedge to another endpoint when configured and the first is slow.
    /// `now`: the clock when it starts.
    async fn attempt_hedged(
        &self,
        ctx: &Context,
        call: &Call,
        body: &Payload,
        attempt: u32,
        may_hedge: bool,
        now: Instant,
    ) -> Result<Outcome, ClientError> {
        match self.cfg.hedge_after {
            // A stream cannot be sent twice at once, nor should one upgrade open two tunnels.
            Some(d)
                if may_hedge
                    && !ctx.is_retry()
                    && !body.is_stream()
                    && !call.parts.headers.contains_key(http::header::UPGRADE)
                    && d < ctx.deadline().saturating_duration_since(now) =>
            {
                // Boxed: two attempts in flight would double the size of every call's future.
                Box::pin(self.hedged(ctx, call, body, attempt, d, now)).await
            }
            _ => self.attempt(ctx, call, body, attempt, false, now).await,
        }
    }

    async fn hedged(
        &self,
        ctx: &Context,
        call: &Call,
        body: &Payload,
        attempt: u32,
        hedge_after: Duration,
        now: Instant,
    ) -> Result<Outcome, ClientError> {
        let first = self.attempt(ctx, call, body, attempt, false, now);
        tokio::pin!(first);
        tokio::select! {
            out = &mut first => return out,
            () = tokio::time::sleep(hedge_after) => {}
        }
        if !self.budget.try_withdraw() {
            return first.await;
        }
        self.hedges.fetch_add(1, Ordering::Relaxed);
        let second = self.attempt(ctx, call, body, attempt + 1, true, Instant::now());
        tokio::pin!(second);
        // The first answer wins; a failure waits for the other attempt, whose answer (or
        // failure) then stands. The loser is dropped: its stream reset, or its HTTP/1.1
        // connection closed.
        tokio::select! {
            out = &mut first => match out? {
                answer @ Outcome::Answer(..) => Ok(answer),
                _ => second.await,
            },
            out = &mut second => match out? {
                answer @ Outcome::Answer(..) => Ok(answer),
                _ => first.await,
            },
        }
    }

    /// One attempt on one endpoint, starting at `now`. `hedge`: this attempt should not go
    /// where the first one went (best effort: a few draws).
    async fn attempt(
        &self,
        ctx: &Context,
        call: &Call,
        body: &Payload,
        attempt: u32,
        hedge: bool,
        now: Instant,
    ) -> Result<Outcome, ClientError> {
        let picked = self.pick(ctx, hedge, now)?;
        let addr = picked.endpoint.addr;
        let pool = self.pool(addr, picked.version);
        // Reported however this attempt ends, including dropped as a losing hedge.
        let mut obs = self.observer.as_deref().map(|observer| AttemptObs {
            observer,
            ctx,
            upstream: &self.name,
            addr,
            call,
            attempt,
            span_id: keel_core::codec::SpanId::random(),
            start: now.into_std(),
            ended: None,
            status: None,
            grpc_status: None,
            outcome: observe::Outcome::Cancelled,
        });
        let span_id = obs.as_ref().map(|o| o.span_id);
        let opts = Outbound {
            retry: attempt > 0,
            span_id,
            ..self.cfg.outbound
        };
        let out = self.build(ctx, call, body, &pool, &opts, now)?;
        let cut_off = self
            .cfg
            .per_try_timeout
            .map_or(ctx.deadline(), |t| ctx.deadline().min(now + t));
        let in_flight = picked.load.start_at(now);
        let sent = tokio::time::timeout_at(cut_off, async {
            let mut lease = match pool.checkout().await {
                Ok(lease) => lease,
                Err(e) => {
                    body.put_back(out.into_body());
                    return Err(Sent::Connect(e));
                }
            };
            match lease.send(out).await {
                Ok(resp) => Ok((resp, lease)),
                Err(e) => {
                    if let Some(unsent) = e.returned {
                        body.put_back(unsent);
                    }
                    Err(Sent::Send(e.maybe_sent, e.error))
                }
            }
        })
        .await;
        let at = Instant::now();
        if let Some(o) = obs.as_mut() {
            o.ended = Some(at.into_std());
        }
        let balance = self.upstream.balance_config();
        let failure = match sent {
            Ok(Ok((resp, lease))) => {
                if let Some(server) = keep_alive_timeout(resp.headers()) {
                    pool.learn_keepalive(server);
                }
                let classified = classify_status(resp.status(), resp.headers(), call.grpc);
                if let Some(o) = obs.as_mut() {
                    o.answered(resp.status(), resp.headers(), call.grpc);
                }
                let resp = if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    // The connection now belongs to whoever takes the upgrade from the
                    // response's extensions (`hyper::upgrade::on`); hyper has handed it over
                    // already, so dropping the lease unfinished keeps it out of the pool.
                    drop(lease);
                    resp.map(Body::detached)
                } else {
                    resp.map(|b| Body::new(b, lease))
                };
                return Ok(match classified {
                    None => {
                        in_flight.success_at(balance, at);
                        if !(call.grpc && status_in_trailers(resp.headers())) {
                            self.upstream.report_at(addr, true, None, at);
                        }
                        Outcome::Answer(resp, addr, at)
                    }
                    Some((f, retry_after)) => {
                        in_flight.failure_at(balance, retry_after, at);
                        // A `Retry-After` is an endpoint shedding load, alive and protecting
                        // itself: the balancer's penalty above steers calls elsewhere while a
                        // peer exists, but the run of failures that ejects a dead endpoint is
                        // not fed, so a lone endpoint (or every endpoint shedding at once)
                        // stays in rotation.
                        if retry_after.is_none() {
                            self.upstream.report_at(addr, false, None, at);
                        }
                        Outcome::Refused(resp, f, addr, at)
                    }
                });
            }
            Ok(Err(Sent::Connect(e))) => {
                tracing::debug!(upstream = %self.name, error = %e, "connect failed");
                Failure::ConnectRefused
            }
            Ok(Err(Sent::Send(maybe_sent, e))) => {
                tracing::debug!(upstream = %self.name, %addr, error = %e, maybe_sent, "send failed");
                if maybe_sent {
                    Failure::ResetAfterWrite
                } else {
                    Failure::ResetBeforeWrite
                }
            }
            Err(_) => Failure::Timeout,
        };
        if let Some(o) = obs.as_mut() {
            o.outcome = if failure == Failure::Timeout && ctx.deadline() <= at {
                observe::Outcome::DeadlineExceeded
            } else {
                observe::Outcome::Failed
            };
        }
        in_flight.failure_at(balance, None, at);
        self.upstream.report_at(addr, false, None, at);
        Ok(Outcome::Error(failure, addr, at))
    }

    fn pick(
        &self,
        ctx: &Context,
        avoid_busy: bool,
        now: Instant,
    ) -> Result<crate::upstream::Picked, ClientError> {
        let none = || ClientError::NoEndpoints(self.name.clone());
        let picked = self.upstream.pick_at(ctx.color(), now).ok_or_else(none)?;
        if !avoid_busy || picked.load.in_flight() == 0 {
            return Ok(picked);
        }
        // A hedge wants an endpoint other than the slow one, which is the one with a call in
        // flight; a couple more draws find another in all but tiny fleets.
        for _ in 0..2 {
            let again = self.upstream.pick_at(ctx.color(), now).ok_or_else(none)?;
            if again.load.in_flight() < picked.load.in_flight() {
                return Ok(again);
            }
        }
        Ok(picked)
    }

    /// The outgoing request for one attempt sent at `now`, with the context's headers as
    /// `opts` says.
    fn build(
        &self,
        ctx: &Context,
        call: &Call,
        body: &Payload,
        pool: &Pool,
        opts: &Outbound,
        now: Instant,
    ) -> Result<Request<OutBody>, ClientError> {
        let parts = &call.parts;
        let mut headers = parts.headers.clone();
        let carrier = if call.grpc {
            Carrier::Grpc
        } else {
            Carrier::Http
        };
        propagation::inject_at(ctx, carrier, opts, &mut headers, now)?;
        let uri = pool.target(parts.uri.path_and_query(), &mut headers);
        // Callers check `replayable` before another attempt, so a stream is still here.
        let body = body.take().ok_or_else(|| ClientError::InvalidRequest {
            upstream: self.name.clone(),
            reason: "the streaming body was already sent".to_string(),
        })?;
        let mut out = Request::builder()
            .method(parts.method.clone())
            .uri(uri)
            .body(body)
            .map_err(|e| ClientError::InvalidRequest {
                upstream: self.name.clone(),
                reason: e.to_string(),
            })?;
        *out.headers_mut() = headers;
        Ok(out)
    }

    /// Decide on a retry and sleep its backoff. False: give up.
    async fn may_retry(&self, f: Failure, ctx: &Context, attempt: u32, idempotent: bool) -> bool {
        if !retry::retryable(f, idempotent, ctx.is_retry()) {
            return false;
        }
        let min_try = self.cfg.outbound.margin * 2;
        let Some(delay) = retry::next_delay(&self.cfg.backoff, attempt, ctx.remaining(), min_try)
        else {
            return false;
        };
        if !self.budget.try_withdraw() {
            tracing::debug!(upstream = %self.name, "retry budget exhausted");
            return false;
        }
        tokio::time::sleep(delay).await;
        true
    }

    fn pool(&self, addr: SocketAddr, version: u64) -> Arc<Pool> {
        let mut pools = self.lock_pools();
        // Versions only grow; a pick made from an older set than the last prune changes
        // nothing (its endpoint may get a pool that the next prune removes).
        if pools.version.is_none_or(|v| v < version) {
            let set = self.upstream.endpoints().snapshot();
            pools
                .by_addr
                .retain(|a, _| set.endpoints.iter().any(|e| e.addr == *a));
            pools.version = Some(set.version);
        }
        pools
            .by_addr
            .entry(addr)
            .or_insert_with(|| Arc::new(Pool::new(addr, self.pool_cfg.clone())))
            .clone()
    }

    fn lock_pools(&self) -> MutexGuard<'_, Pools> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One attempt as telemetry sees it (only built when an observer is installed).
struct AttemptObs<'a> {
    observer: &'a dyn observe::Observer,
    ctx: &'a Context,
    upstream: &'a str,
    addr: SocketAddr,
    call: &'a Call,
    attempt: u32,
    span_id: keel_core::codec::SpanId,
    start: std::time::Instant,
    /// When the attempt ended, if it got that far (a losing hedge is dropped before).
    ended: Option<std::time::Instant>,
    status: Option<u16>,
    grpc_status: Option<i32>,
    outcome: observe::Outcome,
}

impl AttemptObs<'_> {
    fn answered(&mut self, status: StatusCode, headers: &HeaderMap, grpc: bool) {
        self.status = Some(status.as_u16());
        self.grpc_status = if grpc {
            keel_core::grpc::status(headers)
        } else {
            None
        };
        self.outcome = observe::Outcome::Answered;
    }
}

impl Drop for AttemptObs<'_> {
    fn drop(&mut self) {
        {
            self.observer.client(&observe::ClientRecord {
                ctx: self.ctx,
                span_id: self.span_id,
                upstream: self.upstream,
                addr: self.addr,
                method: &self.call.parts.method,
                path: self.call.parts.uri.path(),
                grpc: self.call.grpc,
                status: self.status,
                grpc_status: self.grpc_status,
                attempt: self.attempt,
                outcome: self.outcome,
                // Reported as the attempt ends: the span recorder derives the wall-clock
                // start from `duration`, and only for a sampled trace.
                start: None,
                duration: self
                    .ended
                    .unwrap_or_else(std::time::Instant::now)
                    .saturating_duration_since(self.start),
            });
        }
    }
}

enum Sent {
    Connect(ConnectError),
    Send(bool, keel_core::BoxError),
}

/// A gRPC response whose status is not in its headers: it comes in trailers after the
/// messages, and the body reports it.
fn status_in_trailers(h: &HeaderMap) -> bool {
    is_grpc(h) && !h.contains_key(&keel_core::grpc::STATUS_HEADER)
}

/// The client as a `tower::Service`, so generated tonic clients run over it
/// (`HealthClient::new(keel_client::client::Service::new(client))`). Request bodies are
/// buffered so an attempt can be replayed on another endpoint; use it for unary calls.
///
/// Calls go through [`Client::request`], so the context comes from the request's
/// extensions: tonic copies a `tonic::Request`'s extensions into the HTTP request, so
/// `req.extensions_mut().insert(ctx.clone())` on the `tonic::Request` is how a handler hands
/// its context to a generated client.
#[derive(Debug, Clone)]
pub struct Service {
    client: Arc<Client>,
}

impl Service {
    /// Wrap a shared client.
    pub fn new(client: Arc<Client>) -> Service {
        Service { client }
    }
}

impl<B> tower::Service<Request<B>> for Service
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<keel_core::BoxError>,
{
    type Response = Response<Body>;
    type Error = keel_core::BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<Body>, keel_core::BoxError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let client = self.client.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let bytes = http_body_util::BodyExt::collect(body)
                .await
                .map_err(Into::into)?
                .to_bytes();
            Ok(client.request(Request::from_parts(parts, bytes)).await?)
        })
    }
}

/// A `tonic::Request` for `message` on behalf of `ctx`, for a generated client running over
/// [`Service`]: `inventory.reserve(tonic_request(&ctx, ReserveRequest { .. }))`. tonic copies
/// the request's extensions into the HTTP request, where [`Client::request`] finds the
/// context.
#[cfg(feature = "tonic")]
pub fn tonic_request<T>(ctx: &Context, message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.extensions_mut().insert(ctx.clone());
    req
}

/// `Keep-Alive: timeout=N[, max=M]` → N seconds.
pub fn keep_alive_timeout(h: &HeaderMap) -> Option<Duration> {
    let v = h.get(&keel_core::headers::KEEP_ALIVE)?.to_str().ok()?;
    v.split(',').find_map(|p| {
        let (k, n) = p.trim().split_once('=')?;
        if k.trim().eq_ignore_ascii_case("timeout") {
            n.trim().parse::<u64>().ok().map(Duration::from_secs)
        } else {
            None
        }
    })
}

/// A response status that counts as a failure of the endpoint, with its `Retry-After`.
/// For gRPC (`grpc`: the call was), a *trailers-only* response (the usual shape of an error)
/// carries `grpc-status` in its headers and is classified here; a status in trailers after a
/// body is not seen yet. An HTTP call's answer is judged by its status alone.
fn classify_status(
    s: StatusCode,
    h: &HeaderMap,
    grpc: bool,
) -> Option<(Failure, Option<Duration>)> {
    let retry_after = || {
        h.get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs)
    };
    if let Some(code) = grpc.then(|| keel_core::grpc::status(h)).flatten() {
        return match code {
            // Keel's server sheds gRPC calls as UNAVAILABLE with a `Retry-After` header.
            14 => Some((Failure::GrpcUnavailable, retry_after())),
            c if keel_core::grpc::is_server_failure(c) => Some((Failure::GrpcOther(c), None)),
            _ => None,
        };
    }
    if !s.is_server_error() {
        return None;
    }
    let retry_after = retry_after();
    let f = if s == StatusCode::SERVICE_UNAVAILABLE {
        // The body has not been read: a 503 is safe to send elsewhere.
        Failure::Status503NoBody
    } else {
        Failure::Status5xx(s.as_u16())
    };
    Some((f, retry_after))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn statuses_that_speak_about_the_server_count_as_failures() {
        assert_eq!(classify_status(StatusCode::OK, &headers(&[]), false), None);
        assert_eq!(
            classify_status(StatusCode::NOT_FOUND, &headers(&[]), false),
            None
        );
        assert_eq!(
            classify_status(
                StatusCode::SERVICE_UNAVAILABLE,
                &headers(&[("retry-after", "3")]),
                false
            ),
            Some((Failure::Status503NoBody, Some(Duration::from_secs(3))))
        );
        assert_eq!(
            classify_status(StatusCode::BAD_GATEWAY, &headers(&[]), false),
            Some((Failure::Status5xx(502), None))
        );
        // gRPC trailers-only responses travel as HTTP 200.
        let grpc =
            |code: &str| classify_status(StatusCode::OK, &headers(&[("grpc-status", code)]), true);
        assert_eq!(grpc("0"), None);
        assert_eq!(grpc("14"), Some((Failure::GrpcUnavailable, None)));
        // A shedding Keel server says when to come back, over gRPC too.
        assert_eq!(
            classify_status(
                StatusCode::OK,
                &headers(&[("grpc-status", "14"), ("retry-after", "1")]),
                true
            ),
            Some((Failure::GrpcUnavailable, Some(Duration::from_secs(1))))
        );
        assert_eq!(grpc("4"), Some((Failure::GrpcOther(4), None)));
        assert_eq!(grpc("3"), None, "INVALID_ARGUMENT is the caller's fault");
        // An HTTP call is judged by its status: a `grpc-status` it happens to carry is not
        // read.
        assert_eq!(
            classify_status(StatusCode::OK, &headers(&[("grpc-status", "14")]), false),
            None
        );
        assert_eq!(grpc("5"), None, "NOT_FOUND is an answer");
    }

    #[test]
    fn keep_alive_timeout_is_read_from_the_header() {
        assert_eq!(
            keep_alive_timeout(&headers(&[("keep-alive", "timeout=5, max=100")])),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            keep_alive_timeout(&headers(&[("keep-alive", "max=100")])),
            None
        );
        assert_eq!(keep_alive_timeout(&headers(&[])), None);
    }
}
