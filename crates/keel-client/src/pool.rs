//! Per-endpoint connection pools, owned by Keel rather than delegated to a generic pool, for
//! three things a generic pool does not do:
//!
//! - **Adaptive idle capacity.** HTTP/1.1 keeps at most as many idle connections as a
//!   *decaying peak* of observed concurrency asks for. A burst of 50 leaves 50 connections that
//!   the next burst reuses; the peak halves every `idle_peak_half_life`, so a burst that does
//!   not come back releases its sockets gradually instead of all at once or never.
//! - **Learned keep-alive.** The idle timeout starts at `idle_timeout` and shrinks to the
//!   server's `Keep-Alive: timeout=N` minus a margin as soon as a response shows it
//!   (`Pool::learn_keepalive`): the client must give up an idle socket before the server
//!   closes it, or it writes a request into a connection being torn down.
//! - **HTTP/2 capacity.** The server's `SETTINGS_MAX_CONCURRENT_STREAMS` is read from its
//!   first SETTINGS frame on the wire (`Sniff`); a connection at that limit gets no more
//!   streams, and another connection is opened (up to `max_connections`) instead of queueing
//!   requests behind a full one.
//!
//! Checkout is LIFO (the most recently used socket is the least likely to have been closed by
//! the server), and a leased HTTP/1.1 connection returns to the pool when the response body
//! ends ([`crate::body::Body`]), not when the response headers arrive.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context as TaskCx, Poll};
use std::time::{Duration, Instant};

use crate::body::OutBody;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Notify;

/// The wire protocol to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// HTTP/1.1 with keep-alive pooling.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c): multiplexed connections; gRPC.
    H2c,
}

/// Pool settings for every endpoint of one upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// HTTP/1.1 or h2c.
    pub protocol: Protocol,
    /// TCP connect timeout. 1 s: far above an in-cluster handshake, short enough that a dead
    /// endpoint costs one retry, not the whole deadline.
    pub connect_timeout: Duration,
    /// Idle timeout until the server advertises its own. 30 s is below the keep-alive of
    /// common servers and proxies (Keel 75 s, nginx 75 s); shorter ones (Node's 5 s) are
    /// learned from their `Keep-Alive` header.
    pub idle_timeout: Duration,
    /// Subtracted from a learned server keep-alive. 1 s covers the skew between the two
    /// timers and a request in flight when the server's timer fires.
    pub keepalive_margin: Duration,
    /// Connections per endpoint, busy or idle. 1024 (Envoy's default `max_connections`): a
    /// bound against runaway fan-out, not a tuning knob.
    pub max_connections: usize,
    /// Upper bound of idle HTTP/1.1 connections kept per endpoint, whatever the peak says.
    pub max_idle: usize,
    /// Half-life of the concurrency peak that sizes the idle pool. 30 s rides out bursts a
    /// few seconds apart and releases a one-off burst's sockets within a couple of minutes.
    pub idle_peak_half_life: Duration,
    /// HTTP/2 streams per connection before another connection is opened, when the server's
    /// own `SETTINGS_MAX_CONCURRENT_STREAMS` is higher (or absent). 256: one connection is
    /// served by one task on most servers, so spreading very wide fan-out over connections
    /// also spreads it over the server's cores.
    pub max_streams_per_connection: u32,
    /// Connect with TCP Fast Open (`TCP_FASTOPEN_CONNECT`): the first request rides in the
    /// SYN once the server's cookie is cached. Off by default: middleboxes that drop SYN data
    /// exist, and it only pays off for short-lived connections.
    pub fastopen: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            protocol: Protocol::Http1,
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(30),
            keepalive_margin: Duration::from_secs(1),
            max_connections: 1024,
            max_idle: 256,
            idle_peak_half_life: Duration::from_secs(30),
            max_streams_per_connection: 256,
            fastopen: false,
        }
    }
}

/// Counters of one endpoint's pool (or, summed, of an upstream).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolSnapshot {
    /// Requests sent.
    pub requests: u64,
    /// Requests sent on a connection that already existed.
    pub reused: u64,
    /// Connections opened.
    pub connects: u64,
    /// Connection attempts that failed (refused, unreachable, timed out).
    pub connect_errors: u64,
    /// Connections open now (busy or idle).
    pub open: u64,
    /// HTTP/1.1 connections idle in the pool now.
    pub idle: u64,
}

impl PoolSnapshot {
    /// Share of requests that did not need a new connection (1.0 with no requests).
    pub fn reuse_ratio(&self) -> f64 {
        if self.requests == 0 {
            1.0
        } else {
            self.reused as f64 / self.requests as f64
        }
    }

    /// Add `other`'s counters to these.
    pub fn add(&mut self, other: &PoolSnapshot) {
        self.requests += other.requests;
        self.reused += other.reused;
        self.connects += other.connects;
        self.connect_errors += other.connect_errors;
        self.open += other.open;
        self.idle += other.idle;
    }
}

#[derive(Debug, Default)]
struct Stats {
    requests: AtomicU64,
    reused: AtomicU64,
    connects: AtomicU64,
    connect_errors: AtomicU64,
    open: AtomicU64,
    idle: AtomicU64,
}

/// Why a connection could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP connect failed or timed out: nothing was sent.
    #[error("connect to {addr}: {source}")]
    Io {
        /// The endpoint.
        addr: SocketAddr,
        /// The socket error (`TimedOut` for the connect timeout).
        source: io::Error,
    },
    /// The HTTP handshake on a fresh connection failed.
    #[error("handshake with {addr}: {source}")]
    Handshake {
        /// The endpoint.
        addr: SocketAddr,
        /// hyper's error.
        source: hyper::Error,
    },
}

/// A request that failed on a leased connection.
#[derive(Debug)]
pub(crate) struct SendError {
    /// hyper's error.
    pub error: keel_core::BoxError,
    /// Some of the request may have been written: the server may have acted on it.
    pub maybe_sent: bool,
    /// The request's body, when hyper handed the request back unsent.
    pub returned: Option<OutBody>,
}

/// A decaying maximum: jumps to any higher observation, otherwise halves every half-life.
#[derive(Debug, Clone, Copy)]
struct Peak {
    value: f64,
    at: Instant,
}

impl Peak {
    fn at(&self, now: Instant, half_life: Duration) -> f64 {
        // Read again at the instant it was set (a lease given back reads it right after
        // observing): no decay to compute.
        if now <= self.at {
            return self.value;
        }
        let dt = (now - self.at).as_secs_f64();
        let hl = half_life.as_secs_f64().max(1e-3);
        self.value * crate::window::decay(dt / hl * std::f64::consts::LN_2)
    }

    fn observe(&mut self, n: usize, now: Instant, half_life: Duration) {
        let n = n as f64;
        // A demand at or above the peak is the new peak whatever the decay, which then need
        // not be computed (the steady state of a busy pool).
        self.value = if n >= self.value {
            n
        } else {
            self.at(now, half_life).max(n)
        };
        self.at = now;
    }
}

struct Idle {
    tx: http1::SendRequest<OutBody>,
    since: Instant,
}

struct H2Slot {
    id: u64,
    tx: http2::SendRequest<OutBody>,
    streams: usize,
    /// The server's `SETTINGS_MAX_CONCURRENT_STREAMS`; `u32::MAX` until seen (or if absent).
    server_limit: Arc<AtomicU32>,
}

struct State {
    /// HTTP/1.1 idle connections, oldest first.
    idle: VecDeque<Idle>,
    /// HTTP/1.1 connections leased out.
    busy: usize,
    /// Connects in progress.
    connecting: usize,
    /// HTTP/2 connections.
    h2: Vec<H2Slot>,
    next_id: u64,
    peak: Peak,
    /// When idle connections the server closed were last swept out (see `evict_idle`).
    swept: Instant,
}

/// How often checkout looks through the whole idle list for connections the server closed.
/// Between sweeps a closed one costs nothing: checkout skips it when it comes to the top, and
/// age or the allowance takes it from the bottom (until then it still counts as idle in the
/// pool's figures).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The connections to one endpoint.
pub(crate) struct Pool {
    addr: SocketAddr,
    /// `addr` as a URI authority and as a `Host` value, formatted once, not per request.
    authority: http::uri::Authority,
    host: http::HeaderValue,
    cfg: Arc<PoolConfig>,
    /// The idle timeout in use, in milliseconds (shrinks when the server's is learned).
    idle_ms: AtomicU64,
    state: Mutex<State>,
    /// Woken when a connection or stream frees up, or a connect ends.
    freed: Notify,
    /// The server's stream limit as last seen on any connection: a new connection assumes it
    /// until its own SETTINGS arrive, so it is not overfilled in its first round trip.
    known_stream_limit: AtomicU32,
    stats: Arc<Stats>,
}

enum Step {
    Lease(Lease),
    Connect,
    Wait,
}

impl Pool {
    pub(crate) fn new(addr: SocketAddr, cfg: Arc<PoolConfig>) -> Pool {
        let text = addr.to_string();
        Pool {
            addr,
            // A socket address always formats as a valid authority and header value.
            authority: text
                .parse()
                .unwrap_or_else(|_| http::uri::Authority::from_static("invalid")),
            host: http::HeaderValue::from_str(&text)
                .unwrap_or_else(|_| http::HeaderValue::from_static("invalid")),
            idle_ms: AtomicU64::new(millis(cfg.idle_timeout)),
            cfg,
            state: Mutex::new(State {
                idle: VecDeque::new(),
                busy: 0,
                connecting: 0,
                h2: Vec::new(),
                next_id: 0,
                peak: Peak {
                    value: 0.0,
                    at: Instant::now(),
                },
                swept: Instant::now(),
            }),
            freed: Notify::new(),
            known_stream_limit: AtomicU32::new(u32::MAX),
            stats: Arc::new(Stats::default()),
        }
    }

    /// Point `req` at this endpoint. HTTP/1.1 wants the origin form (`/path?q`) and a `Host`
    /// header (hyper's connection-level client adds neither; a caller's own `Host` wins);
    /// HTTP/2 wants the absolute form, from which hyper takes `:scheme` and `:authority`.
    pub(crate) fn target(
        &self,
        pq: Option<&http::uri::PathAndQuery>,
        headers: &mut http::HeaderMap,
    ) -> http::Uri {
        let pq = pq
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        match self.cfg.protocol {
            Protocol::Http1 => {
                headers
                    .entry(http::header::HOST)
                    .or_insert_with(|| self.host.clone());
                http::Uri::from(pq)
            }
            Protocol::H2c => {
                let mut parts = http::uri::Parts::default();
                parts.scheme = Some(http::uri::Scheme::HTTP);
                parts.authority = Some(self.authority.clone());
                parts.path_and_query = Some(pq);
                http::Uri::from_parts(parts).unwrap_or_default()
            }
        }
    }

    /// The idle timeout now in use.
    pub(crate) fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_ms.load(Ordering::Relaxed))
    }

    pub(crate) fn snapshot(&self) -> PoolSnapshot {
        let s = &self.stats;
        PoolSnapshot {
            requests: s.requests.load(Ordering::Relaxed),
            reused: s.reused.load(Ordering::Relaxed),
            connects: s.connects.load(Ordering::Relaxed),
            connect_errors: s.connect_errors.load(Ordering::Relaxed),
            open: s.open.load(Ordering::Relaxed),
            idle: s.idle.load(Ordering::Relaxed),
        }
    }

    /// Shrink the idle timeout below the server's advertised keep-alive. Keeps at least half
    /// the server's value: a 1 s keep-alive minus a 1 s margin would otherwise turn pooling off.
    pub(crate) fn learn_keepalive(&self, server: Duration) {
        let learned = server
            .saturating_sub(self.cfg.keepalive_margin)
            .max(server / 2);
        let prev = self.idle_ms.fetch_min(millis(learned), Ordering::Relaxed);
        if millis(learned) < prev {
            tracing::debug!(addr = %self.addr, ?server, ?learned, "idle timeout shortened to the server's keep-alive");
        }
    }

    /// A connection (HTTP/1.1) or a stream slot (HTTP/2) to send one request on. Waits while
    /// the endpoint is at `max_connections` with nothing free; the caller's timeout bounds it.
    pub(crate) async fn checkout(self: &Arc<Self>) -> Result<Lease, ConnectError> {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the state is read, so a release in between is not missed.
            freed.as_mut().enable();
            let step = match self.cfg.protocol {
                Protocol::Http1 => self.step_h1(),
                Protocol::H2c => self.step_h2(),
            };
            match step {
                Step::Lease(mut lease) => {
                    if lease.ready().await {
                        return Ok(lease);
                    }
                    // Closed by the server while idle: drop it (the lease does) and go on.
                }
                // Boxed: the connect and handshake futures are several KB, and keeping them
                // inline would make every request's future (and its memcpy) that large too.
                Step::Connect => return Box::pin(self.connect_lease()).await,
                Step::Wait => freed.await,
            }
        }
    }

    fn step_h1(self: &Arc<Self>) -> Step {
        let now = Instant::now();
        let mut st = self.lock();
        self.evict_idle(&mut st, now);
        let mut reuse = None;
        while let Some(idle) = st.idle.pop_back() {
            if !idle.tx.is_closed() {
                reuse = Some(idle.tx);
                break;
            }
        }
        let step = if let Some(tx) = reuse {
            st.busy += 1;
            Step::Lease(self.lease(Conn::H1(Some(tx)), true))
        } else if st.busy + st.connecting < self.cfg.max_connections {
            st.connecting += 1;
            Step::Connect
        } else {
            Step::Wait
        };
        let demand = st.busy + st.connecting;
        st.peak.observe(demand, now, self.cfg.idle_peak_half_life);
        self.publish_idle(&st);
        step
    }

    fn step_h2(self: &Arc<Self>) -> Step {
        let mut st = self.lock();
        st.h2.retain(|s| !s.tx.is_closed());
        let cap = self.cfg.max_streams_per_connection.max(1);
        let best = st
            .h2
            .iter_mut()
            .filter(|s| {
                let limit = s.server_limit.load(Ordering::Relaxed).clamp(1, cap);
                s.streams < limit as usize
            })
            .min_by_key(|s| s.streams);
        if let Some(slot) = best {
            slot.streams += 1;
            let conn = Conn::H2 {
                id: slot.id,
                tx: slot.tx.clone(),
            };
            return Step::Lease(self.lease(conn, true));
        }
        if st.connecting > 0 {
            // A connection is on its way; its streams are for the requests now waiting.
            return Step::Wait;
        }
        if st.h2.len() < self.cfg.max_connections {
            st.connecting += 1;
            return Step::Connect;
        }
        // Every connection full and no more allowed: queue on the least loaded one (hyper
        // holds the request until the server frees a stream).
        match st.h2.iter_mut().min_by_key(|s| s.streams) {
            Some(slot) => {
                slot.streams += 1;
                let conn = Conn::H2 {
                    id: slot.id,
                    tx: slot.tx.clone(),
                };
                Step::Lease(self.lease(conn, true))
            }
            None => Step::Wait,
        }
    }

    /// Drop expired idle connections, and those above what the decaying peak of concurrency
    /// (or `max_idle`) asks to keep, oldest first; once a [`SWEEP_EVERY`], those the server
    /// closed too.
    ///
    /// Runs on every checkout, so it is not a scan: the list is oldest first (connections go
    /// back at the top as they are released), so the expired ones are at the bottom. A scan per
    /// checkout was the gateway's largest pool cost with 64 connections idle (775 instructions
    /// a proxied request, callgrind).
    fn evict_idle(&self, st: &mut State, now: Instant) {
        // `None`: the clock has not run for a whole idle timeout yet, so nothing can have
        // expired.
        if let Some(cut_off) = now.checked_sub(self.idle_timeout()) {
            while st.idle.front().is_some_and(|i| i.since <= cut_off) {
                st.idle.pop_front();
            }
        }
        if now.saturating_duration_since(st.swept) >= SWEEP_EVERY {
            st.swept = now;
            st.idle.retain(|i| !i.tx.is_closed());
        }
        let keep = self.idle_allowance(st, now);
        while st.idle.len() > keep {
            st.idle.pop_front();
        }
    }

    fn idle_allowance(&self, st: &State, now: Instant) -> usize {
        let peak = st.peak.at(now, self.cfg.idle_peak_half_life).ceil() as usize;
        peak.max(1).saturating_sub(st.busy).min(self.cfg.max_idle)
    }

    async fn connect_lease(self: &Arc<Self>) -> Result<Lease, ConnectError> {
        // Undo `connecting` however this future ends, including being dropped by a timeout.
        let guard = Connecting(self);
        let result = self.connect().await;
        let mut st = self.lock();
        st.connecting -= 1;
        std::mem::forget(guard);
        let lease = match result {
            Ok(NewConn::H1(tx)) => {
                st.busy += 1;
                Ok(self.lease(Conn::H1(Some(tx)), false))
            }
            Ok(NewConn::H2(tx, server_limit)) => {
                let id = st.next_id;
                st.next_id += 1;
                st.h2.push(H2Slot {
                    id,
                    tx: tx.clone(),
                    streams: 1,
                    server_limit,
                });
                Ok(self.lease(Conn::H2 { id, tx }, false))
            }
            Err(e) => {
                self.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        };
        drop(st);
        // Waiters recheck: an HTTP/2 connection has room for them, or a failed connect left
        // a slot for another try.
        self.freed.notify_waiters();
        lease
    }

    async fn connect(&self) -> Result<NewConn, ConnectError> {
        let addr = self.addr;
        let stream = tokio::time::timeout(self.cfg.connect_timeout, self.tcp_connect())
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "connect timeout")))
            .map_err(|source| ConnectError::Io { addr, source })?;
        let stats = self.stats.clone();
        let conn = match self.cfg.protocol {
            Protocol::Http1 => {
                let (tx, conn) = http1::Builder::new()
                    .handshake(TokioIo::new(stream))
                    .await
                    .map_err(|source| ConnectError::Handshake { addr, source })?;
                // With upgrades: a `101 Switching Protocols` hands the connection over to
                // whoever asked for it (`Client::upgrade`); other requests see no change.
                spawn_driver(conn.with_upgrades(), stats);
                NewConn::H1(tx)
            }
            Protocol::H2c => {
                let known = self.known_stream_limit.load(Ordering::Relaxed);
                let server_limit = Arc::new(AtomicU32::new(known));
                let io = Sniff::new(stream, server_limit.clone());
                let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(TokioIo::new(io))
                    .await
                    .map_err(|source| ConnectError::Handshake { addr, source })?;
                spawn_driver(conn, stats);
                NewConn::H2(tx, server_limit)
            }
        };
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        Ok(conn)
    }

    async fn tcp_connect(&self) -> io::Result<TcpStream> {
        let socket = if self.addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_nodelay(true)?;
        if self.cfg.fastopen {
            set_fastopen_connect(&socket);
        }
        socket.connect(self.addr).await
    }

    fn lease(self: &Arc<Self>, conn: Conn, reused: bool) -> Lease {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        if reused {
            self.stats.reused.fetch_add(1, Ordering::Relaxed);
        }
        Lease {
            pool: self.clone(),
            conn,
            reusable: false,
        }
    }

    /// A lease ends: keep its HTTP/1.1 connection idle if it is reusable and the allowance has
    /// room, free its HTTP/2 stream.
    fn give_back(&self, conn: &mut Conn, reusable: bool) {
        let now = Instant::now();
        let mut st = self.lock();
        match conn {
            Conn::H1(tx) => {
                // The concurrency held until now counts too: a burst of long requests must not
                // see its peak decay while its connections are still busy.
                let held = st.busy + st.connecting;
                st.peak.observe(held, now, self.cfg.idle_peak_half_life);
                st.busy = st.busy.saturating_sub(1);
                if let Some(tx) = tx.take()
                    && reusable
                    && !tx.is_closed()
                    && st.idle.len() < self.idle_allowance(&st, now)
                {
                    st.idle.push_back(Idle { tx, since: now });
                }
                // Otherwise the sender drops here, and hyper closes the connection.
                self.publish_idle(&st);
                drop(st);
                self.freed.notify_one();
            }
            Conn::H2 { id, tx } => {
                let closed = tx.is_closed();
                if let Some(i) = st.h2.iter().position(|s| s.id == *id) {
                    let limit = st.h2[i].server_limit.load(Ordering::Relaxed);
                    self.known_stream_limit.store(limit, Ordering::Relaxed);
                    if closed {
                        st.h2.swap_remove(i);
                    } else {
                        st.h2[i].streams = st.h2[i].streams.saturating_sub(1);
                    }
                }
                drop(st);
                self.freed.notify_waiters();
            }
        }
    }

    fn publish_idle(&self, st: &State) {
        self.stats
            .idle
            .store(st.idle.len() as u64, Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Connecting<'a>(&'a Pool);

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        self.0.lock().connecting -= 1;
        self.0.freed.notify_waiters();
    }
}

enum NewConn {
    H1(http1::SendRequest<OutBody>),
    H2(http2::SendRequest<OutBody>, Arc<AtomicU32>),
}

enum Conn {
    H1(Option<http1::SendRequest<OutBody>>),
    H2 {
        id: u64,
        tx: http2::SendRequest<OutBody>,
    },
}

/// One request's hold on a connection (HTTP/1.1) or a stream slot (HTTP/2). Dropped without
/// [`Lease::finish`] (a body abandoned half-read, a failed send), an HTTP/1.1 connection is
/// closed rather than reused: its state is unknown.
pub(crate) struct Lease {
    pool: Arc<Pool>,
    conn: Conn,
    reusable: bool,
}

impl Lease {
    /// Wait until the connection can take a request. False: it closed while idle.
    async fn ready(&mut self) -> bool {
        match &mut self.conn {
            Conn::H1(Some(tx)) => tx.ready().await.is_ok(),
            Conn::H1(None) => false,
            Conn::H2 { tx, .. } => tx.ready().await.is_ok(),
        }
    }

    /// Send `req`.
    pub(crate) async fn send(
        &mut self,
        req: Request<OutBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let result = match &mut self.conn {
            Conn::H1(Some(tx)) => tx.try_send_request(req).await,
            Conn::H2 { tx, .. } => tx.try_send_request(req).await,
            // Only `give_back` (on drop) takes the sender, so a live lease always has one.
            Conn::H1(None) => {
                return Err(SendError {
                    error: "connection already released".into(),
                    maybe_sent: false,
                    returned: Some(req.into_body()),
                });
            }
        };
        result.map_err(|mut e| {
            // hyper hands the request back when it never reached the connection; an HTTP/2
            // server that refuses a stream (over its limit, or draining after GOAWAY) promises
            // it did not process it.
            let returned = e.take_message().map(Request::into_body);
            let maybe_sent = returned.is_none() && !refused_stream(e.error());
            SendError {
                error: Box::new(e.into_error()),
                maybe_sent,
                returned,
            }
        })
    }

    /// The response body ended cleanly: the connection may serve another request.
    pub(crate) fn finish(mut self) {
        self.reusable = true;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.give_back(&mut self.conn, self.reusable);
    }
}

fn refused_stream(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = err.source();
    }
    false
}

fn spawn_driver<F>(conn: F, stats: Arc<Stats>)
where
    F: Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    stats.open.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
        stats.open.fetch_sub(1, Ordering::Relaxed);
    });
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `TCP_FASTOPEN_CONNECT` (Linux ≥ 4.11). A kernel that refuses it gets a warning once and a
/// plain connect: Fast Open is an optimisation, never a reason to fail.
fn set_fastopen_connect(socket: &TcpSocket) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        static WARNED: AtomicBool = AtomicBool::new(false);
        let one: libc::c_int = 1;
        // SAFETY: a valid socket fd, a c_int option value of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_FASTOPEN_CONNECT,
                (&raw const one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 && !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %io::Error::last_os_error(), "TCP_FASTOPEN_CONNECT refused; connecting without Fast Open");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
}

/// A TCP stream that reads the server's first HTTP/2 SETTINGS frame as it passes and publishes
/// its `SETTINGS_MAX_CONCURRENT_STREAMS` (hyper does not expose the peer's settings). After
/// that frame it is a plain pass-through.
pub(crate) struct Sniff<S> {
    io: S,
    settings: Option<SettingsReader>,
}

impl<S> Sniff<S> {
    pub(crate) fn new(io: S, out: Arc<AtomicU32>) -> Sniff<S> {
        Sniff {
            io,
            settings: Some(SettingsReader {
                buf: Vec::new(),
                out,
            }),
        }
    }
}

/// Accumulates the first frame from the server (which HTTP/2 requires to be SETTINGS).
pub(crate) struct SettingsReader {
    buf: Vec<u8>,
    out: Arc<AtomicU32>,
}

const FRAME_HEADER: usize = 9;
const SETTINGS: u8 = 0x4;
const MAX_CONCURRENT_STREAMS: u16 = 0x3;
/// A SETTINGS frame has a handful of 6-byte entries; anything larger is not worth buffering.
const MAX_SETTINGS_LEN: usize = 1024;

impl SettingsReader {
    /// Feed bytes read from the server. True once the first frame has been read (or is not
    /// a SETTINGS frame): stop feeding.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) -> bool {
        loop {
            let want = if self.buf.len() < FRAME_HEADER {
                FRAME_HEADER
            } else {
                FRAME_HEADER + self.frame_len()
            };
            let take = want.saturating_sub(self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.buf.len() < FRAME_HEADER {
                return false;
            }
            let len = self.frame_len();
            if self.buf[3] != SETTINGS || len > MAX_SETTINGS_LEN || len % 6 != 0 {
                return true;
            }
            if self.buf.len() < FRAME_HEADER + len {
                if bytes.is_empty() {
                    return false;
                }
                // The header completed in this read; its payload follows in the same bytes.
                continue;
            }
            for entry in self.buf[FRAME_HEADER..].chunks_exact(6) {
                let id = u16::from_be_bytes([entry[0], entry[1]]);
                if id == MAX_CONCURRENT_STREAMS {
                    let v = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
                    self.out.store(v, Ordering::Relaxed);
                }
            }
            return true;
        }
    }

    fn frame_len(&self) -> usize {
        (usize::from(self.buf[0]) << 16)
            | (usize::from(self.buf[1]) << 8)
            | usize::from(self.buf[2])
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Sniff<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let res = Pin::new(&mut this.io).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(reader)) = (&res, this.settings.as_mut())
            && reader.feed(&buf.filled()[before..])
        {
            this.settings = None;
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sniff<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn settings_frame(entries: &[(u16, u32)]) -> Vec<u8> {
        let len = entries.len() * 6;
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            SETTINGS,
            0,
            0,
            0,
            0,
            0,
        ];
        for (id, v) in entries {
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(&v.to_be_bytes());
        }
        f
    }

    #[test]
    fn the_servers_stream_limit_is_read_from_its_first_settings_frame_however_it_is_split() {
        let frame = settings_frame(&[(0x1, 4096), (MAX_CONCURRENT_STREAMS, 7), (0x4, 65535)]);
        let mut tail = frame.clone();
        tail.extend_from_slice(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"); // the ACK after it
        for split in 0..frame.len() {
            let out = Arc::new(AtomicU32::new(u32::MAX));
            let mut r = SettingsReader {
                buf: Vec::new(),
                out: out.clone(),
            };
            let done = r.feed(&tail[..split]) || r.feed(&tail[split..]);
            assert!(done, "split at {split}");
            assert_eq!(out.load(Ordering::Relaxed), 7, "split at {split}");
        }
        // Byte by byte.
        let out = Arc::new(AtomicU32::new(u32::MAX));
        let mut r = SettingsReader {
            buf: Vec::new(),
            out: out.clone(),
        };
        let fed = frame.iter().position(|b| r.feed(std::slice::from_ref(b)));
        assert_eq!(fed, Some(frame.len() - 1));
        assert_eq!(out.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn no_limit_or_a_frame_that_is_not_settings_leaves_the_limit_unknown() {
        for bytes in [
            settings_frame(&[(0x4, 65535)]),
            b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x10\x00".to_vec(), // WINDOW_UPDATE
        ] {
            let out = Arc::new(AtomicU32::new(u32::MAX));
            let mut r = SettingsReader {
                buf: Vec::new(),
                out: out.clone(),
            };
            assert!(r.feed(&bytes));
            assert_eq!(out.load(Ordering::Relaxed), u32::MAX);
        }
    }

    #[test]
    fn the_peak_jumps_up_and_halves_each_half_life() {
        let t0 = Instant::now();
        let hl = Duration::from_secs(30);
        let mut p = Peak { value: 0.0, at: t0 };
        p.observe(40, t0, hl);
        assert_eq!(p.at(t0, hl), 40.0);
        let later = t0 + hl;
        assert!((p.at(later, hl) - 20.0).abs() < 1e-9);
        p.observe(3, later, hl);
        assert!(
            (p.at(later, hl) - 20.0).abs() < 1e-9,
            "a lower observation does not reset it"
        );
        p.observe(50, later, hl);
        assert_eq!(p.at(later, hl), 50.0);
        // Below the stored peak but above its decay: the observation is the new peak.
        p.observe(30, later + hl, hl);
        assert_eq!(p.at(later + hl, hl), 30.0);
        // Below both: the decay stands.
        p.observe(10, later + 2 * hl, hl);
        assert!((p.at(later + 2 * hl, hl) - 15.0).abs() < 1e-9);
    }
}
