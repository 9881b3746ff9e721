//! One accepted connection: protocol detection, per-connection timers, graceful close.
//!
//! hyper has no idle timeout, and its HTTP/1 header-read timer also runs while a keep-alive
//! connection sits idle, which would make the header timeout the idle timeout. Keel keeps the
//! two apart with one lazily re-armed timer per connection:
//!
//! - *reading a request head* (from the first byte after idle, or from accept) — closed after
//!   `header_read_timeout` (slowloris defence, HTTP/1 only);
//! - *idle* (no request in flight) — closed gracefully after `idle_timeout`, the value
//!   advertised in `Keep-Alive: timeout=N`;
//! - *busy* — no timer of ours; request deadlines bound the work;
//! - *blocked on a write* (the socket stayed unwritable: the peer stopped reading) — closed
//!   after `send_timeout`, whatever else the connection is doing. The socket wrapper notes
//!   when a write first returned `Pending` and clears it when one goes through; the driver,
//!   polled in the same task, pulls its timer in to that deadline — so the hot path pays a
//!   load and a branch per write, and a clock read only when a write blocks.
//!
//! State lives in a few atomics shared with the request path (`ConnTracker`). The timer is
//! never touched by the request path: when it fires it recomputes the real deadline from the
//! atomics and re-arms, so a connection costs no timer churn per request. A new request head
//! can start at any moment while the timer sits on a later idle deadline; rather than move
//! the timer earlier on every request, the timer is never armed further out than one header
//! timeout while head reads are possible (HTTP/1), so it fires at the latest when a head that
//! started just after it was armed could first be overdue, and re-arms exactly on that head's
//! deadline. The price is one wake-up per header timeout (10 s) on a quiet connection.

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use keel_core::Phase;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tower::util::Oneshot;

use crate::body::GuardedBody;
use crate::shared::Shared;
use keel_core::BoxError;

/// Per-connection state shared between the driver and the request path.
#[derive(Debug)]
pub(crate) struct ConnTracker {
    pub(crate) shared: Arc<Shared>,
    in_flight: AtomicU32,
    /// Milliseconds since `shared.epoch` when the connection last became idle.
    idle_since: AtomicU64,
    /// Milliseconds since `shared.epoch` + 1 when the current request head started; 0 = none.
    head_started: AtomicU64,
    /// Set once a request arrived over HTTP/2: frames there (PINGs, window updates) are not
    /// request heads, so the head timer no longer applies.
    h2: AtomicBool,
    /// When the last bytes read reached the socket, by the kernel's receive timestamp
    /// (nanoseconds since the Unix epoch; 0 = not known). See [`crate::rxstamp`].
    rx_stamp_ns: AtomicU64,
    /// Milliseconds since `shared.epoch` + 1 when a write first found the socket full and
    /// no write has gone through since; 0 = not blocked.
    write_blocked: AtomicU64,
}

impl ConnTracker {
    fn new(shared: Arc<Shared>) -> Self {
        let now = shared.now_ms();
        ConnTracker {
            shared,
            in_flight: AtomicU32::new(0),
            idle_since: AtomicU64::new(now),
            // A fresh connection is waiting for its first request head: a client that
            // connects and sends nothing is held to the header timeout, not the idle one.
            head_started: AtomicU64::new(now + 1),
            h2: AtomicBool::new(false),
            rx_stamp_ns: AtomicU64::new(0),
            write_blocked: AtomicU64::new(0),
        }
    }

    /// A write returned `Pending`: the peer is not taking bytes (from now, if it was).
    fn write_pending(&self) {
        if self.write_blocked.load(Ordering::Relaxed) == 0 {
            self.write_blocked
                .store(self.shared.now_ms() + 1, Ordering::Relaxed);
        }
    }

    /// A write went through (or failed): the peer is not blocking us.
    #[inline]
    fn write_done(&self) {
        if self.write_blocked.load(Ordering::Relaxed) != 0 {
            self.write_blocked.store(0, Ordering::Relaxed);
        }
    }

    /// When a blocked write runs out of `send_timeout`, if one is blocked.
    fn send_deadline(&self) -> Option<u64> {
        match self.write_blocked.load(Ordering::Relaxed) {
            0 => None,
            since => Some(since - 1 + self.shared.limits.send_timeout_ms),
        }
    }

    /// How long the request being dispatched waited since its bytes reached the socket, if
    /// the kernel dated them.
    fn queueing_delay_ns(&self) -> Option<u64> {
        match self.rx_stamp_ns.load(Ordering::Relaxed) {
            0 => None,
            at => Some(crate::rxstamp::now_ns().saturating_sub(at)),
        }
    }

    /// A request reached the service.
    pub(crate) fn request_started(&self, is_h2: bool) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_started.store(0, Ordering::Relaxed);
        if is_h2 {
            self.h2.store(true, Ordering::Relaxed);
        }
        self.shared.request_started();
    }

    /// A request's response finished (or was abandoned).
    pub(crate) fn request_finished(&self, now_ms: u64) {
        // Record idleness before the decrement so the driver never sees in_flight == 0 with a
        // stale idle_since.
        self.idle_since.store(now_ms, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Release);
        self.shared.request_finished();
    }

    fn on_bytes_read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && !self.h2.load(Ordering::Relaxed)
            && self.head_started.load(Ordering::Relaxed) == 0
        {
            self.head_started
                .store(self.shared.now_ms() + 1, Ordering::Relaxed);
        }
    }

    /// What the timer should do now.
    fn check(&self, now_ms: u64) -> TimerCheck {
        let reads = self.check_reads(now_ms);
        match self.send_deadline() {
            None => reads,
            Some(deadline) if now_ms >= deadline => TimerCheck::SendTimeout,
            Some(deadline) => match reads {
                TimerCheck::Wait(ms) => TimerCheck::Wait(ms.min(deadline)),
                other => other,
            },
        }
    }

    /// What the timer should do about the read side (heads and idleness).
    fn check_reads(&self, now_ms: u64) -> TimerCheck {
        let header_ms = self.shared.limits.header_read_timeout_ms;
        let idle_ms = self.shared.limits.idle_timeout_ms;
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return TimerCheck::Wait(now_ms + idle_ms);
        }
        let head = self.head_started.load(Ordering::Relaxed);
        if head != 0 && !self.h2.load(Ordering::Relaxed) {
            let deadline = head - 1 + header_ms;
            return if now_ms >= deadline {
                TimerCheck::HeadTimeout
            } else {
                // The head may complete, and its response finish, before `deadline`; the idle
                // deadline that follows can then be as early as `now + idle`. The armed timer
                // must never be later than the earliest real deadline, so take the minimum.
                TimerCheck::Wait(deadline.min(now_ms + idle_ms))
            };
        }
        let deadline = self.idle_since.load(Ordering::Relaxed) + idle_ms;
        if now_ms >= deadline {
            TimerCheck::Idle
        } else if self.h2.load(Ordering::Relaxed) {
            TimerCheck::Wait(deadline)
        } else {
            // A head may start at any moment without waking this timer (see the module doc).
            TimerCheck::Wait(deadline.min(now_ms + header_ms))
        }
    }
}

#[derive(Debug, PartialEq)]
enum TimerCheck {
    Wait(u64),
    HeadTimeout,
    SendTimeout,
    Idle,
}

pin_project_lite::pin_project! {
    /// The socket, instrumented to notice when a new request head starts arriving and, with
    /// `stamped`, to read the kernel's receive timestamps.
    struct TrackedIo {
        #[pin]
        inner: TcpStream,
        tracker: Arc<ConnTracker>,
        stamped: bool,
    }
}

impl AsyncRead for TrackedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = if *this.stamped {
            poll_read_stamped(&this.inner, this.tracker, cx, buf)
        } else {
            this.inner.poll_read(cx, buf)
        };
        if let Poll::Ready(Ok(())) = res {
            if buf.filled().len() > before {
                this.tracker.on_bytes_read();
            }
        }
        res
    }
}

/// A read with `recvmsg`, keeping the receive timestamp it returns.
#[cfg(target_os = "linux")]
fn poll_read_stamped(
    stream: &TcpStream,
    tracker: &ConnTracker,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    use std::os::fd::AsRawFd;
    loop {
        ready!(stream.poll_read_ready(cx))?;
        // SAFETY: the kernel only writes initialised bytes into the unfilled part, and exactly
        // `n` of them, which is what `assume_init` below claims.
        let unfilled = unsafe { buf.unfilled_mut() };
        let room = unfilled.len();
        let fd = stream.as_raw_fd();
        let mut got = None;
        let res = stream.try_io(tokio::io::Interest::READABLE, || {
            let (n, stamp) = crate::rxstamp::recv(fd, unfilled)?;
            got = Some((n, stamp));
            // A read that did not fill the buffer drained the socket: say so, as tokio's own
            // read does, so the readiness seen *before* this read is cleared and the next read
            // waits for the next edge instead of spending a system call on EAGAIN (measured:
            // without this, every request cost a second, failing `recvmsg`).
            if n > 0 && n < room {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(())
            }
        });
        if let Some((n, stamp)) = got {
            // SAFETY: `recv` wrote `n` bytes at the start of the unfilled part.
            unsafe { buf.assume_init(n) };
            buf.advance(n);
            if stamp != 0 {
                tracker.rx_stamp_ns.store(stamp, Ordering::Relaxed);
            }
            return Poll::Ready(Ok(()));
        }
        match res {
            // Readiness was stale: `try_io` cleared it, so the next poll waits for the socket.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Poll::Ready(Err(e)),
            Ok(()) => return Poll::Ready(Ok(())),
        }
    }
}

/// Never called off Linux: `rxstamp::enable` says no there, so `stamped` stays false.
#[cfg(not(target_os = "linux"))]
fn poll_read_stamped(
    _stream: &TcpStream,
    _tracker: &ConnTracker,
    _cx: &mut Context<'_>,
    _buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    Poll::Ready(Err(io::Error::other("receive timestamps are Linux-only")))
}

thread_local! {
    /// The queueing delay (ns) of the request being dispatched on this thread, set by the
    /// connection around the synchronous `call` of the stack; `u64::MAX` = not known.
    static QUEUED_NS: std::cell::Cell<u64> = const { std::cell::Cell::new(u64::MAX) };
    /// The peer of the connection whose request is being dispatched on this thread, set
    /// like `QUEUED_NS`. A thread-local rather than a request extension: an extension
    /// costs every request a map insert, this costs two stores.
    static PEER: std::cell::Cell<Option<SocketAddr>> = const { std::cell::Cell::new(None) };
}

/// The TCP peer of the request whose `call` is running on this thread (the context layer
/// puts it in the request's [`keel_core::Context`]); `None` anywhere else, and for a
/// request that had to wait for the stack to be ready (never, with Keel's own layers and a
/// router, which are always ready).
pub(crate) fn peer() -> Option<SocketAddr> {
    PEER.get()
}

/// The queueing delay of the request whose `call` is running on this thread: how long its
/// bytes waited in the socket before Keel dispatched it, when the kernel dated them. Layers
/// read it in their `call` (the admission layer does); anywhere else it is `None`.
pub(crate) fn queueing_delay() -> Option<std::time::Duration> {
    match QUEUED_NS.get() {
        u64::MAX => None,
        ns => Some(std::time::Duration::from_nanos(ns)),
    }
}

impl TrackedIo {
    /// Note whether a write got through, for `send_timeout`.
    #[inline]
    fn wrote<T>(tracker: &ConnTracker, out: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match out {
            Poll::Pending => tracker.write_pending(),
            Poll::Ready(_) => tracker.write_done(),
        }
        out
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        TrackedIo::wrote(this.tracker, this.inner.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        TrackedIo::wrote(this.tracker, this.inner.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// How long a connection with nothing in flight may keep writing once the server has stopped
/// (its last frames, its close), and how long `serve` waits for that.
pub(crate) const FLUSH_AFTER_STOP: std::time::Duration = std::time::Duration::from_secs(1);

/// hyper's built-in HTTP/1 header-count limit.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// Build the HTTP/1 + HTTP/2 connection builder from the configured limits.
pub(crate) fn builder(shared: &Shared) -> auto::Builder<TokioExecutor> {
    let l = &shared.limits;
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        // Keel runs its own head timer (see the module doc); hyper's would also fire on idle
        // keep-alive connections.
        .header_read_timeout(None)
        .max_buf_size(l.max_header_bytes)
        .keep_alive(true);
    // Setting max_headers moves hyper's header parsing buffer from the stack to the heap (an
    // allocation per request, ~5 % by hyper's own measure); at hyper's default of 100 the
    // limit is identical without the cost.
    if l.max_headers != HYPER_DEFAULT_MAX_HEADERS {
        b.http1().max_headers(l.max_headers);
    }
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(l.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(l.h2_max_concurrent_streams)
        .keep_alive_interval(Some(l.h2_keepalive_interval))
        .keep_alive_timeout(l.h2_keepalive_timeout)
        .max_pending_accept_reset_streams(l.h2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(l.h2_max_local_error_reset_streams);
    if l.h2_extended_connect {
        b.http2().enable_connect_protocol();
    }
    b
}

/// Serve one accepted connection until it closes, times out, or shutdown ends it. `stack` is
/// the server's request path (cloned once per connection, not per request).
pub(crate) async fn serve_connection<T, B>(
    stream: TcpStream,
    peer: SocketAddr,
    builder: Arc<auto::Builder<TokioExecutor>>,
    shared: Arc<Shared>,
    stack: T,
) where
    T: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    T::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + GuardedBody + Send + 'static,
    B::Error: Into<BoxError>,
{
    let tracker = Arc::new(ConnTracker::new(shared.clone()));
    // Receive timestamps only feed overload control; the listener asked for them (see
    // `Server::bind_with`) and this socket inherited the option.
    let stamped = shared.rx_stamped;
    let io = TokioIo::new(TrackedIo {
        inner: stream,
        tracker: tracker.clone(),
        stamped,
    });
    let svc = ConnService {
        stack: RefCell::new(stack),
        tracker: tracker.clone(),
        peer,
    };
    let conn = builder.serve_connection_with_upgrades(io, svc);
    let mut conn = pin!(conn);

    let first = match tracker.check(shared.now_ms()) {
        TimerCheck::Wait(ms) => ms,
        _ => shared.now_ms(),
    };
    let mut timer: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep_until(shared.instant_at(first)));
    let mut phase_rx = shared.shutdown.subscribe();
    let mut closing = false;

    loop {
        if !closing && *phase_rx.borrow_and_update() >= Phase::Closing {
            closing = true;
            conn.as_mut().graceful_shutdown();
        }
        if *phase_rx.borrow() >= Phase::Stopped {
            if tracker.in_flight.load(Ordering::Acquire) == 0 {
                // A clean drain reaches `Stopped` the moment the last response body ends —
                // which can be before this connection wrote that body's last frame (seen as
                // an HTTP/2 client's stream cut off mid-response under load). Nothing is in
                // flight here, so let it finish writing, briefly.
                let _ = tokio::time::timeout(FLUSH_AFTER_STOP, conn.as_mut()).await;
            }
            // Otherwise the grace period is over: dropping the connection cancels its
            // in-flight work.
            return;
        }
        let changed = phase_rx.changed();
        let mut changed = pin!(changed);
        let event = poll_fn(|cx| {
            if let Poll::Ready(res) = conn.as_mut().poll(cx) {
                return Poll::Ready(Event::Done(res.err()));
            }
            // A write that just blocked may run out before the timer's deadline: pull the
            // timer in (only while blocked; a load otherwise).
            if let Some(deadline) = tracker.send_deadline() {
                let at = shared.instant_at(deadline);
                if at < timer.deadline() {
                    timer.as_mut().reset(at);
                }
            }
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Timer);
            }
            if let Poll::Ready(r) = changed.as_mut().poll(cx) {
                return Poll::Ready(if r.is_ok() {
                    Event::Phase
                } else {
                    Event::Timer
                });
            }
            Poll::Pending
        })
        .await;
        match event {
            Event::Done(err) => {
                if let Some(err) = err {
                    tracing::debug!(error = %err, "connection ended with an error");
                }
                return;
            }
            Event::Phase => {}
            Event::Timer => match tracker.check(shared.now_ms()) {
                TimerCheck::Wait(ms) => timer.as_mut().reset(shared.instant_at(ms)),
                TimerCheck::HeadTimeout => {
                    tracing::debug!(
                        "closing connection: request head not received within header_read_timeout"
                    );
                    shared.stats.header_timeouts.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                TimerCheck::SendTimeout => {
                    tracing::debug!(
                        "closing connection: the peer took no byte of a response within send_timeout"
                    );
                    shared.stats.send_timeouts.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                TimerCheck::Idle => {
                    if closing {
                        // Already asked to close and still idle after the wait: the peer is
                        // not finishing the close handshake; drop it.
                        return;
                    }
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                    // HTTP/1 closes at once; HTTP/2 sends GOAWAY and waits for the peer.
                    timer
                        .as_mut()
                        .reset(Instant::now() + shared.limits.h2_keepalive_timeout);
                }
            },
        }
    }
}

/// hyper's view of the request path on one connection: counts each request in flight on the
/// connection (for its idle timer) and the server (for the drain) until its response ends.
///
/// hyper calls services through `&self`; the stack's layers want `&mut self`. The stack lives
/// in a `RefCell` for the connection's lifetime instead of being cloned per request: calls
/// are synchronous and never nested, so the borrow cannot conflict.
struct ConnService<T> {
    stack: RefCell<T>,
    tracker: Arc<ConnTracker>,
    /// The connection's peer, handed to each request's context (see [`peer`]).
    peer: SocketAddr,
}

impl<T, B> hyper::service::Service<Request<Incoming>> for ConnService<T>
where
    T: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body + GuardedBody,
{
    type Response = Response<B>;
    type Error = Infallible;
    type Future = ConnFuture<T>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.tracker
            .request_started(req.version() == Version::HTTP_2);
        let in_flight = Some(InFlight {
            tracker: Some(self.tracker.clone()),
        });
        let mut stack = self.stack.borrow_mut();
        if crate::layer::ready_now(&mut *stack) {
            // The stack's `call` runs synchronously on this thread: its layers see this
            // request's queueing delay and peer through `queueing_delay()` and `peer()`, and
            // nothing else does.
            let queued = self.tracker.queueing_delay_ns();
            if let Some(ns) = queued {
                QUEUED_NS.set(ns);
            }
            PEER.set(Some(self.peer));
            let fut = stack.call(req);
            PEER.set(None);
            if queued.is_some() {
                QUEUED_NS.set(u64::MAX);
            }
            ConnFuture::Direct { fut, in_flight }
        } else {
            ConnFuture::Waiting {
                fut: Oneshot::new(stack.clone(), req),
                in_flight,
            }
        }
    }
}

pin_project_lite::pin_project! {
    #[project = ConnFutureProj]
    pub(crate) enum ConnFuture<T>
    where
        T: tower::Service<Request<Incoming>>,
    {
        Direct { #[pin] fut: T::Future, in_flight: Option<InFlight> },
        Waiting { #[pin] fut: Oneshot<T, Request<Incoming>>, in_flight: Option<InFlight> },
    }
}

impl<T, B> Future for ConnFuture<T>
where
    T: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>,
    B: http_body::Body + GuardedBody,
{
    type Output = Result<Response<B>, Infallible>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (resp, in_flight) = match self.project() {
            ConnFutureProj::Direct { fut, in_flight } => (ready!(fut.poll(cx)), in_flight),
            ConnFutureProj::Waiting { fut, in_flight } => (ready!(fut.poll(cx)), in_flight),
        };
        let Ok(mut resp) = resp;
        resp.body_mut().guards().in_flight = in_flight.take();
        Poll::Ready(Ok(resp))
    }
}

/// A request in flight on its connection and server, until its response ends (or the
/// response future is dropped: the caller went away).
#[derive(Debug)]
pub struct InFlight {
    /// `None` once the end has been counted.
    tracker: Option<Arc<ConnTracker>>,
}

impl InFlight {
    /// The response ended at `now` (a clock read the other guards share).
    pub(crate) fn finish(mut self, now: Instant) {
        if let Some(t) = self.tracker.take() {
            t.request_finished(t.shared.ms_at(now));
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(t) = self.tracker.take() {
            t.request_finished(t.shared.now_ms());
        }
    }
}

enum Event {
    Done(Option<Box<dyn std::error::Error + Send + Sync>>),
    Timer,
    Phase,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::ServerConfig;

    fn tracker() -> ConnTracker {
        let shared = Shared::for_tests(&ServerConfig {
            header_read_timeout: keel_config::Duration::from_secs(10),
            idle_timeout: keel_config::Duration::from_secs(75),
            ..ServerConfig::default()
        });
        ConnTracker::new(shared)
    }

    #[tokio::test(start_paused = true)]
    async fn fresh_connection_is_held_to_the_header_timeout() {
        let t = tracker();
        let now = t.shared.now_ms();
        assert_eq!(t.check(now), TimerCheck::Wait(now + 10_000));
        assert_eq!(t.check(now + 10_000), TimerCheck::HeadTimeout);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keepalive_uses_the_idle_timeout_not_the_header_timeout() {
        let t = tracker();
        t.request_started(false);
        assert!(
            matches!(t.check(t.shared.now_ms() + 500_000), TimerCheck::Wait(_)),
            "busy never expires"
        );
        t.request_finished(t.shared.now_ms());
        let idle = t.shared.now_ms();
        // Re-armed at most one header timeout ahead (a head could start unseen), but the
        // connection only closes at the idle timeout.
        assert_eq!(t.check(idle + 20_000), TimerCheck::Wait(idle + 30_000));
        assert_eq!(t.check(idle + 70_000), TimerCheck::Wait(idle + 75_000));
        assert_eq!(t.check(idle + 75_000), TimerCheck::Idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_blocked_for_the_send_timeout_closes_a_busy_connection() {
        let t = tracker(); // send_timeout: the default 60 s
        t.request_started(false);
        let start = t.shared.now_ms();
        // Writes that go through leave the busy connection alone.
        t.write_done();
        assert_eq!(t.check(start), TimerCheck::Wait(start + 75_000));
        // A write blocks: the timer comes in to its deadline; a later block does not move it.
        t.write_pending();
        assert_eq!(t.check(start), TimerCheck::Wait(start + 60_000));
        tokio::time::advance(std::time::Duration::from_secs(30)).await;
        t.write_pending();
        assert_eq!(t.check(start + 30_000), TimerCheck::Wait(start + 60_000));
        // One byte taken restarts the clock: a slow reader is never cut.
        t.write_done();
        t.write_pending();
        assert_eq!(
            t.check(start + 30_000),
            TimerCheck::Wait(start + 90_000),
            "re-armed from the new block"
        );
        assert_eq!(t.check(start + 90_000), TimerCheck::SendTimeout);
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_starts_unseen_is_still_held_to_the_header_timeout() {
        let t = tracker();
        t.request_started(false);
        t.request_finished(t.shared.now_ms());
        let armed = t.shared.now_ms();
        assert_eq!(t.check(armed), TimerCheck::Wait(armed + 10_000));
        // Bytes of a new head arrive 5 s later; nobody touches the timer.
        tokio::time::advance(std::time::Duration::from_secs(5)).await;
        t.on_bytes_read();
        // When the timer fires it re-arms on that head's own deadline, and closes then.
        assert_eq!(t.check(armed + 10_000), TimerCheck::Wait(armed + 15_000));
        assert_eq!(t.check(armed + 15_000), TimerCheck::HeadTimeout);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_timeout_shorter_than_the_header_timeout_is_not_delayed() {
        let shared = Shared::for_tests(&ServerConfig {
            header_read_timeout: keel_config::Duration::from_secs(10),
            idle_timeout: keel_config::Duration::from_secs(2),
            ..ServerConfig::default()
        });
        let t = ConnTracker::new(shared);
        let now = t.shared.now_ms();
        // Reading the first head: armed no later than an idle deadline could fall.
        assert_eq!(t.check(now), TimerCheck::Wait(now + 2_000));
        t.request_started(false);
        t.request_finished(t.shared.now_ms());
        assert_eq!(t.check(now + 2_000), TimerCheck::Idle);
    }

    #[tokio::test(start_paused = true)]
    async fn http2_frames_while_idle_are_not_request_heads() {
        let t = tracker();
        t.request_started(true);
        t.request_finished(t.shared.now_ms());
        t.on_bytes_read();
        let now = t.shared.now_ms();
        assert_eq!(t.check(now), TimerCheck::Wait(now + 75_000));
    }
}
