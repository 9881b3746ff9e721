//! The HTTP client: every policy of this crate applied to real calls, over pooled per-endpoint
//! connections, with the request [`Context`] propagated on every attempt.
//!
//! One call: breaker admission → budget deposit → for each attempt: pick an endpoint
//! ([`Upstream`]) → write the context's headers (remaining deadline minus the margin, trace,
//! baggage, request id, retry marker on retries) → send with a per-try timeout no later than
//! the deadline → classify → report to the balancer/outlier detector and breaker → retry only
//! when the failure is safe to retry, the backoff fits in the remaining time and the budget
//! has a token.
//!
//! **Pools and keep-alive.** Each endpoint has its own pool whose idle timeout starts at
//! `idle_timeout` and *shrinks* to the server's advertised `Keep-Alive: timeout=N` minus
//! `keepalive_margin` as soon as a response shows it: a client must give up an idle socket
//! before the server closes it, or it sends a request into a connection being torn down. The
//! pool is rebuilt with the shorter timeout when that happens (rare: once per endpoint).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use keel_core::Context;
use keel_core::propagation::{self, Carrier, Outbound};

use crate::breaker::{Breaker, BreakerConfig, BreakerOpen};
use crate::retry::{self, BackoffConfig, BudgetConfig, Failure, RetryBudget};
use crate::upstream::Upstream;

/// The wire protocol to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// HTTP/1.1 with keep-alive pooling.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c): one multiplexed connection per endpoint; gRPC.
    H2c,
}

/// Client settings for one upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientConfig {
    /// HTTP/1.1 or h2c.
    pub protocol: Protocol,
    /// TCP connect timeout. 1 s: far above an in-cluster handshake, short enough that a dead
    /// endpoint costs one retry, not the whole deadline.
    pub connect_timeout: Duration,
    /// Upper bound of one attempt (the remaining deadline may shorten it). None: deadline only.
    pub per_try_timeout: Option<Duration>,
    /// Pool idle timeout until the server advertises its own. 30 s is below the keep-alive of
    /// common servers and proxies (Keel 75 s, nginx 75 s, Node 5 s is learned from its header).
    pub idle_timeout: Duration,
    /// Subtracted from a learned server keep-alive. 1 s covers the clock skew between the two
    /// timers and a request in flight when the server's timer fires.
    pub keepalive_margin: Duration,
    /// Idle connections kept per endpoint.
    pub max_idle_per_endpoint: usize,
    /// The route is idempotent: any failure may be retried.
    pub idempotent: bool,
    /// Deadline propagation.
    pub outbound: Outbound,
    /// Retry backoff and attempts.
    pub backoff: BackoffConfig,
    /// Retry budget.
    pub budget: BudgetConfig,
    /// Adaptive throttling.
    pub breaker: BreakerConfig,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            protocol: Protocol::Http1,
            connect_timeout: Duration::from_secs(1),
            per_try_timeout: None,
            idle_timeout: Duration::from_secs(30),
            keepalive_margin: Duration::from_secs(1),
            max_idle_per_endpoint: 64,
            idempotent: false,
            outbound: Outbound::default(),
            backoff: BackoffConfig::default(),
            budget: BudgetConfig::default(),
            breaker: BreakerConfig::default(),
        }
    }
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

struct EndpointPool {
    client: HyperClient<HttpConnector, Full<Bytes>>,
    idle: Duration,
}

/// An HTTP client for one upstream.
pub struct Client {
    name: String,
    cfg: ClientConfig,
    upstream: Arc<Upstream>,
    breaker: Breaker,
    budget: RetryBudget,
    pools: Mutex<HashMap<SocketAddr, Arc<EndpointPool>>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for `upstream`.
    pub fn new(name: impl Into<String>, cfg: ClientConfig, upstream: Arc<Upstream>) -> Client {
        Client {
            name: name.into(),
            breaker: Breaker::new(cfg.breaker.clone()),
            budget: RetryBudget::new(cfg.budget.clone()),
            cfg,
            upstream,
            pools: Mutex::new(HashMap::new()),
        }
    }

    /// The breaker (stats for metrics and tests).
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// The retry budget (stats for metrics and tests).
    pub fn budget(&self) -> &RetryBudget {
        &self.budget
    }

    /// The idle timeout currently used for `addr`'s pool.
    pub fn idle_timeout_of(&self, addr: SocketAddr) -> Option<Duration> {
        self.lock_pools().get(&addr).map(|p| p.idle)
    }

    /// Send `req` (its URI's path and query are used; the authority comes from the chosen
    /// endpoint). The request context is `Context::current()`, or a fresh one with the
    /// client's per-try timeout when called outside a request.
    pub async fn request(&self, req: Request<Bytes>) -> Result<Response<Incoming>, ClientError> {
        let ctx = Context::current().unwrap_or_else(|| {
            Context::background(self.cfg.per_try_timeout.unwrap_or(Duration::from_secs(30)))
        });
        let admitted = self.breaker.admit()?;
        self.budget.deposit();
        let (parts, body) = req.into_parts();
        let mut attempt: u32 = 0;
        loop {
            let Some(picked) = self.upstream.pick(ctx.color()) else {
                return Err(ClientError::NoEndpoints(self.name.clone()));
            };
            let addr = picked.endpoint.addr;
            let mut headers = parts.headers.clone();
            let opts = Outbound {
                retry: attempt > 0,
                ..self.cfg.outbound
            };
            let carrier = if is_grpc(&headers) {
                Carrier::Grpc
            } else {
                Carrier::Http
            };
            propagation::inject(&ctx, carrier, &opts, &mut headers)?;
            let uri = format!(
                "http://{addr}{}",
                parts.uri.path_and_query().map_or("/", |p| p.as_str())
            );
            let mut out = Request::builder()
                .method(parts.method.clone())
                .uri(uri)
                .body(Full::new(body.clone()))
                .map_err(|_| ClientError::NoEndpoints(self.name.clone()))?;
            *out.headers_mut() = headers;

            let pool = self.pool(addr);
            let budget = self
                .cfg
                .per_try_timeout
                .map_or(ctx.remaining(), |t| t.min(ctx.remaining()));
            let call = picked.load.start();
            let result = tokio::time::timeout(budget, pool.client.request(out)).await;
            let failure = match result {
                Ok(Ok(resp)) => {
                    self.learn_keepalive(addr, &pool, resp.headers());
                    match classify_status(resp.status(), resp.headers()) {
                        None => {
                            call.success(self.upstream.balance_config());
                            self.upstream.report(addr, true, None);
                            admitted.success();
                            return Ok(resp);
                        }
                        Some((f, retry_after)) => {
                            call.failure(self.upstream.balance_config(), retry_after);
                            self.upstream.report(addr, false, retry_after);
                            if !self.may_retry(f, &ctx, attempt).await {
                                // An answer is an answer: hand the 5xx (or gRPC error) to
                                // the caller.
                                return Ok(resp);
                            }
                            attempt += 1;
                            continue;
                        }
                    }
                }
                Ok(Err(e)) => classify_error(&e),
                Err(_) => Failure::Timeout,
            };
            call.failure(self.upstream.balance_config(), None);
            self.upstream.report(addr, false, None);
            if !self.may_retry(failure, &ctx, attempt).await {
                return Err(ClientError::Failed {
                    upstream: self.name.clone(),
                    addr,
                    failure,
                    attempts: attempt + 1,
                });
            }
            attempt += 1;
        }
    }

    /// Decide on a retry and sleep its backoff. False: give up.
    async fn may_retry(&self, f: Failure, ctx: &Context, attempt: u32) -> bool {
        if !retry::retryable(f, self.cfg.idempotent, ctx.is_retry()) {
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

    fn pool(&self, addr: SocketAddr) -> Arc<EndpointPool> {
        let mut pools = self.lock_pools();
        pools
            .entry(addr)
            .or_insert_with(|| Arc::new(self.build_pool(self.cfg.idle_timeout)))
            .clone()
    }

    fn build_pool(&self, idle: Duration) -> EndpointPool {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(self.cfg.connect_timeout));
        let mut builder = HyperClient::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(idle)
            .pool_max_idle_per_host(self.cfg.max_idle_per_endpoint);
        if self.cfg.protocol == Protocol::H2c {
            builder.http2_only(true);
        }
        let client = builder.build(conn);
        EndpointPool { client, idle }
    }

    /// Shrink `addr`'s idle timeout below the server's advertised keep-alive.
    fn learn_keepalive(&self, addr: SocketAddr, pool: &EndpointPool, h: &HeaderMap) {
        let Some(server) = keep_alive_timeout(h) else {
            return;
        };
        // Keep at least half the server's value: a 1 s keep-alive minus a 1 s margin would
        // otherwise disable pooling altogether.
        let learned = server
            .saturating_sub(self.cfg.keepalive_margin)
            .max(server / 2);
        if learned >= pool.idle {
            return;
        }
        tracing::debug!(upstream = %self.name, %addr, ?server, ?learned, "shortening pool idle timeout to the server's keep-alive");
        let mut pools = self.lock_pools();
        let stale = pools.get(&addr).is_none_or(|p| p.idle > learned);
        if stale {
            pools.insert(addr, Arc::new(self.build_pool(learned)));
        }
    }

    fn lock_pools(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<EndpointPool>>> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn is_grpc(h: &HeaderMap) -> bool {
    h.get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The client as a `tower::Service`, so generated tonic clients run over it
/// (`HealthClient::new(keel_client::client::Service::new(client))`). Request bodies are
/// buffered so an attempt can be replayed on another endpoint; use it for unary calls.
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
    type Response = Response<Incoming>;
    type Error = keel_core::BoxError;
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<Response<Incoming>, keel_core::BoxError>>
                + Send,
        >,
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

/// `Keep-Alive: timeout=N[, max=M]` → N seconds.
pub fn keep_alive_timeout(h: &HeaderMap) -> Option<Duration> {
    let v = h.get("keep-alive")?.to_str().ok()?;
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
/// For gRPC, a *trailers-only* response (the usual shape of an error) carries `grpc-status`
/// in its headers and is classified here; a status in trailers after a body is not seen yet.
fn classify_status(s: StatusCode, h: &HeaderMap) -> Option<(Failure, Option<Duration>)> {
    if let Some(code) = h
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
    {
        return match code {
            0 => None,
            14 => Some((Failure::GrpcUnavailable, None)),
            // Only statuses that speak about the server's health count against it: an
            // INVALID_ARGUMENT or NOT_FOUND is the caller's business, not an outage.
            4 | 8 | 13 => Some((Failure::GrpcOther(code), None)),
            _ => None,
        };
    }
    if !s.is_server_error() {
        return None;
    }
    let retry_after = h
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let f = if s == StatusCode::SERVICE_UNAVAILABLE {
        // The body has not been read: a 503 is safe to send elsewhere.
        Failure::Status503NoBody
    } else {
        Failure::Status5xx(s.as_u16())
    };
    Some((f, retry_after))
}

fn classify_error(e: &hyper_util::client::legacy::Error) -> Failure {
    if e.is_connect() {
        return Failure::ConnectRefused;
    }
    // A connection reused from the pool that the server had closed: hyper reports the request
    // as not sent when it could tell, which is then safe to retry anywhere.
    let not_sent = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<hyper::Error>())
        .is_some_and(|h| h.is_canceled() || h.is_incomplete_message());
    if not_sent {
        Failure::ResetBeforeWrite
    } else {
        Failure::ResetAfterWrite
    }
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
        assert_eq!(classify_status(StatusCode::OK, &headers(&[])), None);
        assert_eq!(classify_status(StatusCode::NOT_FOUND, &headers(&[])), None);
        assert_eq!(
            classify_status(
                StatusCode::SERVICE_UNAVAILABLE,
                &headers(&[("retry-after", "3")])
            ),
            Some((Failure::Status503NoBody, Some(Duration::from_secs(3))))
        );
        assert_eq!(
            classify_status(StatusCode::BAD_GATEWAY, &headers(&[])),
            Some((Failure::Status5xx(502), None))
        );
        // gRPC trailers-only responses travel as HTTP 200.
        let grpc = |code: &str| classify_status(StatusCode::OK, &headers(&[("grpc-status", code)]));
        assert_eq!(grpc("0"), None);
        assert_eq!(grpc("14"), Some((Failure::GrpcUnavailable, None)));
        assert_eq!(grpc("4"), Some((Failure::GrpcOther(4), None)));
        assert_eq!(grpc("3"), None, "INVALID_ARGUMENT is the caller's fault");
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
