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
//!
//! *Parking* (`park_idle_after`): hyper keeps an HTTP/1 connection's 8 KiB read and 8 KiB
//! write buffers for the connection's whole life, so an idle keep-alive connection costs
//! ~20 KiB. Once idle for the delay with nothing buffered, the driver lets hyper's connection
//! go (hyper closes it; the socket wrapper turns that close into nothing) and waits on the
//! bare socket; the next request's bytes build a new one. While busy, the same timer comes
//! back once per delay to see whether the connection went idle — never once per request.

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
    /// Reads that returned bytes, wrapping: parking checks that none happened while hyper's
    /// connection was being let go (their bytes would have gone with its buffer).
    reads: AtomicU32,
    /// The bytes read so far end where a request head ends (`\r\n\r\n`), or none were read
    /// yet: hyper's read buffer then holds nothing of a next request (see [`Self::parkable`]).
    at_boundary: AtomicBool,
    /// An HTTP/1 request has been served here: the protocol is settled, so a parked
    /// connection can be handed to a new HTTP/1 state machine.
    h1: AtomicBool,
    /// Set while hyper's connection is being let go for parking: its close must leave the
    /// socket open (see [`TrackedIo`]'s `poll_shutdown`).
    parking: AtomicBool,
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
            reads: AtomicU32::new(0),
            at_boundary: AtomicBool::new(true),
            h1: AtomicBool::new(false),
            parking: AtomicBool::new(false),
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
        } else if !self.h1.load(Ordering::Relaxed) {
            self.h1.store(true, Ordering::Relaxed);
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

    /// Bytes arrived: when they start a request head, the header timeout starts. Not when
    /// they end where a head ends (`at_boundary`): hyper dispatches that head in this same
    /// poll, which clears the mark again, so the clock is not read for a request that came
    /// whole (most do). A client that sends only blank lines then waits for the idle
    /// timeout, as a silent one does.
    fn on_bytes_read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && !self.h2.load(Ordering::Relaxed)
            && !self.at_boundary.load(Ordering::Relaxed)
            && self.head_started.load(Ordering::Relaxed) == 0
        {
            self.head_started
                .store(self.shared.now_ms() + 1, Ordering::Relaxed);
        }
    }

    /// Whether hyper's connection can be dropped with nothing lost: no request in flight, no
    /// response bytes waiting for the socket, an HTTP/1 connection (or one that has read
    /// nothing yet), and no byte of a next request read into hyper's buffer. The last is
    /// judged by where the bytes read so far end: after a complete head every byte has been
    /// handed on (hyper dispatches a head the moment it has it), anywhere else — a partial
    /// pipelined head, or a `Content-Length` body whose end cannot be told from here — the
    /// connection keeps its buffers.
    fn parkable(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && !self.h2.load(Ordering::Relaxed)
            && self.write_blocked.load(Ordering::Relaxed) == 0
            && self.at_boundary.load(Ordering::Relaxed)
            && (self.h1.load(Ordering::Relaxed) || self.reads.load(Ordering::Relaxed) == 0)
    }

    /// What the timer should do now, with hyper's connection running: [`Self::check_parked`],
    /// and parking once the connection has been parkable for `park_idle_after`.
    fn check(&self, now_ms: u64) -> TimerCheck {
        let check = self.check_parked(now_ms);
        let park_ms = self.shared.limits.park_idle_after_ms;
        let TimerCheck::Wait(ms) = check else {
            return check;
        };
        if park_ms == 0 {
            return check;
        }
        if self.parkable() {
            let at = self.idle_since.load(Ordering::Relaxed) + park_ms;
            return if now_ms >= at {
                TimerCheck::Park
            } else {
                TimerCheck::Wait(ms.min(at))
            };
        }
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            // It will go idle without waking the timer: come back within one park delay
            // (one wake-up per `park_idle_after` on a busy connection, never per request).
            TimerCheck::Wait(ms.min(now_ms + park_ms))
        } else {
            // Not parkable until more bytes arrive: the driver watches for it
            // (`park_deadline`) rather than waking every delay.
            check
        }
    }

    /// When the connection may park, if it can now and parking is on.
    fn park_deadline(&self) -> Option<u64> {
        let park_ms = self.shared.limits.park_idle_after_ms;
        (park_ms != 0 && self.parkable()).then(|| self.idle_since.load(Ordering::Relaxed) + park_ms)
    }

    /// What the timer should do now about the connection's deadlines (whether or not hyper's
    /// connection is running).
    fn check_parked(&self, now_ms: u64) -> TimerCheck {
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
    /// Idle long enough: let hyper's connection go and keep the socket.
    Park,
}

/// The last four bytes of a complete request head.
const HEAD_END: u32 = u32::from_be_bytes(*b"\r\n\r\n");

/// The socket as hyper sees it: shared with the connection's driver, so the driver keeps
/// it when it lets hyper's connection go (parking), and instrumented to notice when a new
/// request head starts arriving, where the bytes read end, and (with `stamped`) the kernel's
/// receive timestamps. Reads and writes go through the socket's readiness, as tokio's own
/// `TcpStream` does.
struct TrackedIo {
    inner: Arc<TcpStream>,
    tracker: Arc<ConnTracker>,
    stamped: bool,
    /// The last four bytes read, for [`ConnTracker::at_boundary`]; starts as a head end (a
    /// fresh state machine has nothing buffered).
    tail: u32,
}

impl TrackedIo {
    fn new(inner: Arc<TcpStream>, tracker: Arc<ConnTracker>, stamped: bool) -> Self {
        TrackedIo {
            inner,
            tracker,
            stamped,
            tail: HEAD_END,
        }
    }

    /// `bytes` were just read.
    #[inline]
    fn note_read(&mut self, bytes: &[u8]) {
        for &b in &bytes[bytes.len().saturating_sub(4)..] {
            self.tail = (self.tail << 8) | u32::from(b);
        }
        let t = &self.tracker;
        t.at_boundary
            .store(self.tail == HEAD_END, Ordering::Relaxed);
        // This is the only writer: a load and a store, not a locked add.
        t.reads.store(
            t.reads.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Relaxed,
        );
        t.on_bytes_read();
    }
}

impl AsyncRead for TrackedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = poll_read_socket(&this.inner, &this.tracker, this.stamped, cx, buf);
        if let Poll::Ready(Ok(())) = res {
            if buf.filled().len() > before {
                this.note_read(&buf.filled()[before..]);
            }
        }
        res
    }
}

/// One read from the socket when it is readable: `read(2)`, or `recvmsg(2)` keeping the
/// receive timestamp it returns when `stamped`.
fn poll_read_socket(
    stream: &TcpStream,
    tracker: &ConnTracker,
    stamped: bool,
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
            let (n, stamp) = if stamped {
                recv_stamped(fd, unfilled)?
            } else {
                (read_fd(fd, unfilled)?, 0)
            };
            got = Some((n, stamp));
            // A read that did not fill the buffer drained the socket: say so, as tokio's own
            // read does, so the readiness seen *before* this read is cleared and the next read
            // waits for the next edge instead of spending a system call on EAGAIN (measured:
            // without this, every request cost a second, failing read).
            if n > 0 && n < room {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(())
            }
        });
        if let Some((n, stamp)) = got {
            // SAFETY: the read wrote `n` bytes at the start of the unfilled part.
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

/// `read(2)` into `buf` from the non-blocking socket `fd`.
fn read_fd(fd: std::os::fd::RawFd, buf: &mut [std::mem::MaybeUninit<u8>]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call,
    // and `fd` is an open socket its owner keeps open across it.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

#[cfg(target_os = "linux")]
fn recv_stamped(
    fd: std::os::fd::RawFd,
    buf: &mut [std::mem::MaybeUninit<u8>],
) -> io::Result<(usize, u64)> {
    crate::rxstamp::recv(fd, buf)
}

/// Never called off Linux: `rxstamp::enable` says no there, so `stamped` stays false.
#[cfg(not(target_os = "linux"))]
fn recv_stamped(
    _fd: std::os::fd::RawFd,
    _buf: &mut [std::mem::MaybeUninit<u8>],
) -> io::Result<(usize, u64)> {
    Err(io::Error::other("receive timestamps are Linux-only"))
}

/// One write to the socket when it is writable.
fn poll_write_socket<R>(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    mut write: impl FnMut(&TcpStream) -> io::Result<R>,
) -> Poll<io::Result<R>> {
    loop {
        ready!(stream.poll_write_ready(cx))?;
        // `try_write*` clears the readiness it found stale, so the next round waits.
        match write(stream) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            res => return Poll::Ready(res),
        }
    }
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
        let this = self.get_mut();
        let out = poll_write_socket(&this.inner, cx, |s| s.try_write(buf));
        TrackedIo::wrote(&this.tracker, out)
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Writes go straight to the socket: nothing to flush.
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.tracker.parking.load(Ordering::Relaxed) {
            // hyper is closing its (idle) connection because the driver is parking it: the
            // socket stays open for the next request.
            return Poll::Ready(Ok(()));
        }
        Poll::Ready(socket2::SockRef::from(&*self.inner).shutdown(std::net::Shutdown::Write))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let out = poll_write_socket(&this.inner, cx, |s| s.try_write_vectored(bufs));
        TrackedIo::wrote(&this.tracker, out)
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
}

/// How long a connection with nothing in flight may keep writing once the server has stopped
/// (its last frames, its close), and how long `serve` waits for that.
pub(crate) const FLUSH_AFTER_STOP: std::time::Duration = std::time::Duration::from_secs(1);

/// hyper's built-in HTTP/1 header-count limit.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// The connection builders, made once per listener from the configured limits.
pub(crate) struct Builders {
    /// HTTP/1 or HTTP/2, told apart by the first bytes: every new connection.
    auto: auto::Builder<TokioExecutor>,
    /// HTTP/1 alone, with the same settings: a parked connection waking up (its protocol is
    /// settled, so the detection's read and copy are skipped).
    http1: hyper::server::conn::http1::Builder,
}

/// The same HTTP/1 settings on hyper's builder and on the auto builder's HTTP/1 part (two
/// types with the same methods).
macro_rules! http1_settings {
    ($b:expr, $l:expr) => {{
        $b.timer(TokioTimer::new())
            // Keel runs its own head timer (see the module doc); hyper's would also fire on
            // idle keep-alive connections.
            .header_read_timeout(None)
            .max_buf_size($l.max_header_bytes)
            .keep_alive(true);
        // Setting max_headers moves hyper's header parsing buffer from the stack to the heap
        // (an allocation per request, ~5 % by hyper's own measure); at hyper's default of
        // 100 the limit is identical without the cost.
        if $l.max_headers != HYPER_DEFAULT_MAX_HEADERS {
            $b.max_headers($l.max_headers);
        }
    }};
}

/// Build the connection builders from the configured limits.
pub(crate) fn builders(shared: &Shared) -> Builders {
    let l = &shared.limits;
    let mut b = auto::Builder::new(TokioExecutor::new());
    http1_settings!(b.http1(), l);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(l.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(l.h2_max_concurrent_streams)
        // `0s` = no PINGs (see `server.http2_keepalive_interval`).
        .keep_alive_interval(
            (!l.h2_keepalive_interval.is_zero()).then_some(l.h2_keepalive_interval),
        )
        .keep_alive_timeout(l.h2_keepalive_timeout)
        .max_pending_accept_reset_streams(l.h2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(l.h2_max_local_error_reset_streams);
    if l.h2_extended_connect {
        b.http2().enable_connect_protocol();
    }
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1_settings!(http1, l);
    Builders { auto: b, http1 }
}

/// What a connection asks of the request stack it drives (the bounds its driver, its
/// running loop and [`Http`] share).
pub(crate) trait ConnStack<B>:
    tower::Service<
        Request<Incoming>,
        Response = Response<B>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<T, B> ConnStack<B> for T where
    T: tower::Service<
            Request<Incoming>,
            Response = Response<B>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// What a connection asks of its responses' bodies.
pub(crate) trait ConnBody:
    http_body::Body<Data = bytes::Bytes, Error: Into<BoxError>> + GuardedBody + Send + 'static
{
}

impl<B> ConnBody for B where
    B: http_body::Body<Data = bytes::Bytes, Error: Into<BoxError>> + GuardedBody + Send + 'static
{
}

/// Serve one accepted connection until it closes, times out, or shutdown ends it. `stack` is
/// the server's request path, cloned for each HTTP state machine the connection gets: once,
/// and once more each time it wakes from being parked — never per request.
///
/// The connection alternates between two states. *Running*: hyper's connection (the HTTP/1
/// or HTTP/2 state machine with its buffers) serves requests, under the timers of the module
/// doc. *Parked* (HTTP/1 only, after `park_idle_after` with nothing in flight and nothing
/// buffered): hyper's connection has been let go — closed with the socket left open — and
/// only the socket, this task and the tracker remain, waiting for the next request's bytes,
/// which build a new one. The idle and header timers run the same in both states.
pub(crate) async fn serve_connection<T, B>(
    stream: TcpStream,
    peer: SocketAddr,
    builders: Arc<Builders>,
    shared: Arc<Shared>,
    stack: T,
) where
    T: ConnStack<B>,
    B: ConnBody,
{
    let tracker = Arc::new(ConnTracker::new(shared.clone()));
    let stream = Arc::new(stream);
    let mut timer: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep_until(Instant::now()));
    let mut phase_rx = shared.shutdown.subscribe();
    loop {
        let first = match tracker.check(shared.now_ms()) {
            TimerCheck::Wait(ms) => ms,
            _ => shared.now_ms(),
        };
        timer.as_mut().reset(shared.instant_at(first));
        // Boxed: a running connection's future (its timers, its drain wait) is most of this
        // task's size, and a parked connection then holds none of it.
        if !Box::pin(run(
            &stream,
            peer,
            &builders,
            &shared,
            &tracker,
            stack.clone(),
            &mut timer,
            &mut phase_rx,
        ))
        .await
        {
            return;
        }
        shared.stats.parked.fetch_add(1, Ordering::Relaxed);
        let woke = parked(&stream, &shared, &tracker, &mut timer, &mut phase_rx).await;
        shared.stats.parked.fetch_sub(1, Ordering::Relaxed);
        if !woke {
            return;
        }
    }
}

/// Run one hyper connection on `stream` until the connection ends (`false`) or has been let
/// go for parking (`true`).
#[allow(clippy::too_many_arguments)]
async fn run<T, B>(
    stream: &Arc<TcpStream>,
    peer: SocketAddr,
    builders: &Builders,
    shared: &Shared,
    tracker: &Arc<ConnTracker>,
    stack: T,
    timer: &mut Pin<Box<Sleep>>,
    phase_rx: &mut tokio::sync::watch::Receiver<Phase>,
) -> bool
where
    T: ConnStack<B>,
    B: ConnBody,
{
    let io = TokioIo::new(TrackedIo::new(
        stream.clone(),
        tracker.clone(),
        // Receive timestamps only feed overload control; the listener asked for them (see
        // `Server::bind_with`) and this socket inherited the option.
        shared.rx_stamped,
    ));
    let svc = ConnService {
        stack: RefCell::new(stack),
        tracker: tracker.clone(),
        peer,
    };
    // Boxed, so that what a parked connection keeps (this task) does not include room for
    // hyper's state: that lives, and goes, with this box.
    let mut conn = if tracker.h1.load(Ordering::Relaxed) {
        Http::H1(Box::pin(
            builders.http1.serve_connection(io, svc).with_upgrades(),
        ))
    } else {
        Http::Auto(Box::pin(
            builders.auto.serve_connection_with_upgrades(io, svc),
        ))
    };
    let mut closing = false;
    // While parking: the read count when hyper's connection was asked to close.
    let mut parking: Option<u32> = None;
    // See the poll below.
    let mut watch_park = false;

    loop {
        if !closing && *phase_rx.borrow_and_update() >= Phase::Closing {
            closing = true;
            conn.graceful_shutdown();
        }
        if *phase_rx.borrow() >= Phase::Stopped {
            if tracker.in_flight.load(Ordering::Acquire) == 0 {
                // A clean drain reaches `Stopped` the moment the last response body ends —
                // which can be before this connection wrote that body's last frame (seen as
                // an HTTP/2 client's stream cut off mid-response under load). Nothing is in
                // flight here, so let it finish writing, briefly.
                let _ = tokio::time::timeout(FLUSH_AFTER_STOP, poll_fn(|cx| conn.poll(cx))).await;
            }
            // Otherwise the grace period is over: dropping the connection cancels its
            // in-flight work.
            return false;
        }
        // The timer and the phase are polled only when they may have something to say:
        // once to register this task's waker, then when the timer wheel has fired the timer
        // (it wakes the task) or the phase's version moved (its sender wakes the task). This
        // task is woken for every request; re-polling both each time took a lock and an
        // atomic swap for nothing, about 200 instructions a request (callgrind, `hello`).
        let phase = phase_rx.clone();
        let changed = phase_rx.changed();
        let mut changed = pin!(changed);
        let mut timer_waits = false;
        let mut phase_waits = false;
        let event = poll_fn(|cx| {
            if let Poll::Ready(err) = conn.poll(cx) {
                return Poll::Ready(Event::Done(err));
            }
            // A write that just blocked may run out before the timer's deadline: pull the
            // timer in (only while blocked; a load otherwise).
            if let Some(deadline) = tracker.send_deadline() {
                let at = shared.instant_at(deadline);
                if at < timer.deadline() {
                    timer.as_mut().reset(at);
                    timer_waits = false;
                }
            }
            // The timer was left beyond the park delay while the connection could not park
            // (part of a head, or a body, read): once it can, bring the timer in. A flag
            // test otherwise.
            if watch_park && let Some(ms) = tracker.park_deadline() {
                watch_park = false;
                let at = shared.instant_at(ms);
                if at < timer.deadline() {
                    timer.as_mut().reset(at);
                    timer_waits = false;
                }
            }
            if !timer_waits || timer.is_elapsed() {
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Timer);
                }
                timer_waits = true;
            }
            if !phase_waits || phase.has_changed().unwrap_or(true) {
                if let Poll::Ready(r) = changed.as_mut().poll(cx) {
                    return Poll::Ready(if r.is_ok() {
                        Event::Phase
                    } else {
                        Event::Timer
                    });
                }
                phase_waits = true;
            }
            Poll::Pending
        })
        .await;
        match event {
            Event::Done(err) => {
                let Some(reads) = parking else {
                    if let Some(err) = err {
                        tracing::debug!(error = %err, "connection ended with an error");
                    }
                    return false;
                };
                tracker.parking.store(false, Ordering::Relaxed);
                // Nothing may have been read since the close was asked for: those bytes
                // went with hyper's buffer. Never seen (the close of an idle HTTP/1
                // connection reads nothing), but if it happened, closing is the only answer
                // that cannot misread a request.
                return if tracker.reads.load(Ordering::Relaxed) == reads
                    && tracker.at_boundary.load(Ordering::Relaxed)
                {
                    true
                } else {
                    tracing::debug!("closing connection: bytes arrived while it was parked");
                    false
                };
            }
            Event::Phase => {}
            Event::Timer => match tracker.check(shared.now_ms()) {
                TimerCheck::Wait(ms) => {
                    watch_park = shared.limits.park_idle_after_ms != 0
                        && !closing
                        && tracker.in_flight.load(Ordering::Relaxed) == 0
                        && !tracker.parkable();
                    timer.as_mut().reset(shared.instant_at(ms));
                }
                TimerCheck::HeadTimeout => {
                    tracing::debug!(
                        "closing connection: request head not received within header_read_timeout"
                    );
                    shared.stats.header_timeouts.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
                TimerCheck::SendTimeout => {
                    tracing::debug!(
                        "closing connection: the peer took no byte of a response within send_timeout"
                    );
                    shared.stats.send_timeouts.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
                TimerCheck::Park if !closing && parking.is_none() => {
                    parking = Some(tracker.reads.load(Ordering::Relaxed));
                    tracker.parking.store(true, Ordering::Relaxed);
                    // Idle HTTP/1 closes at once, before reading anything more; a connection
                    // still reading its protocol's first bytes (none have come) stops. The
                    // timer stays as a guard.
                    conn.graceful_shutdown();
                    timer
                        .as_mut()
                        .reset(Instant::now() + shared.limits.h2_keepalive_timeout);
                }
                // Asked to close or to park and still not done after the wait: drop it.
                TimerCheck::Park => return false,
                TimerCheck::Idle => {
                    if closing {
                        // Already asked to close and still idle after the wait: the peer is
                        // not finishing the close handshake; drop it.
                        return false;
                    }
                    closing = true;
                    conn.graceful_shutdown();
                    // HTTP/1 closes at once; HTTP/2 sends GOAWAY and waits for the peer.
                    timer
                        .as_mut()
                        .reset(Instant::now() + shared.limits.h2_keepalive_timeout);
                }
            },
        }
    }
}

/// The socket as hyper's connections take it.
type Io = TokioIo<TrackedIo>;

/// hyper's connection on one socket: protocol detection first, or HTTP/1 alone once known.
enum Http<'a, T, B>
where
    T: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body + GuardedBody,
{
    Auto(Pin<Box<auto::UpgradeableConnection<'a, Io, ConnService<T>, TokioExecutor>>>),
    H1(Pin<Box<hyper::server::conn::http1::UpgradeableConnection<Io, ConnService<T>>>>),
}

impl<T, B> Http<'_, T, B>
where
    T: ConnStack<B>,
    B: ConnBody,
{
    /// Drive the connection; `Ready` when it has ended, with its error if it failed.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<BoxError>> {
        match self {
            Http::Auto(c) => c.as_mut().poll(cx).map(Result::err),
            Http::H1(c) => c.as_mut().poll(cx).map(|r| r.err().map(Into::into)),
        }
    }

    fn graceful_shutdown(&mut self) {
        match self {
            Http::Auto(c) => c.as_mut().graceful_shutdown(),
            Http::H1(c) => c.as_mut().graceful_shutdown(),
        }
    }
}

/// Wait, parked, until the next request's bytes arrive (`true`: build a new hyper connection)
/// or the connection ends: the peer closed it, a timer ran out, or the server is closing
/// (`false`; an idle HTTP/1 connection has nothing to finish).
async fn parked(
    stream: &TcpStream,
    shared: &Shared,
    tracker: &ConnTracker,
    timer: &mut Pin<Box<Sleep>>,
    phase_rx: &mut tokio::sync::watch::Receiver<Phase>,
) -> bool {
    // The timer was last set while hyper's connection was closing; from here only the
    // connection's own deadlines count.
    match tracker.check_parked(shared.now_ms()) {
        TimerCheck::Wait(ms) => timer.as_mut().reset(shared.instant_at(ms)),
        _ => return false,
    }
    loop {
        if *phase_rx.borrow_and_update() >= Phase::Closing {
            return false;
        }
        let changed = phase_rx.changed();
        let mut changed = pin!(changed);
        let mut byte = [std::mem::MaybeUninit::uninit(); 1];
        let event = poll_fn(|cx| {
            // A peek, not a read: the bytes stay in the socket for the new connection. The
            // usual end of an idle connection, the peer's close, reads as 0 and costs no
            // state machine.
            let mut peek = ReadBuf::uninit(&mut byte);
            if let Poll::Ready(res) = stream.poll_peek(cx, &mut peek) {
                return Poll::Ready(Some(matches!(res, Ok(n) if n > 0)));
            }
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            if changed.as_mut().poll(cx).is_ready() {
                // A phase change (or the lifecycle gone): the loop's check decides.
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        if let Some(woke) = event {
            return woke;
        }
        match tracker.check_parked(shared.now_ms()) {
            TimerCheck::Wait(ms) => timer.as_mut().reset(shared.instant_at(ms)),
            TimerCheck::HeadTimeout => {
                // Parked before its first byte: held to the header timeout from accept.
                shared.stats.header_timeouts.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            TimerCheck::Idle | TimerCheck::SendTimeout | TimerCheck::Park => return false,
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
    Done(Option<BoxError>),
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
            // These tests are about the timeouts; parking has its own below.
            park_idle_after: keel_config::Duration::from_millis(0),
            ..ServerConfig::default()
        });
        ConnTracker::new(shared)
    }

    /// A tracker whose connection has served one request (over HTTP/2 with `h2`) and is idle.
    fn idle_after_one_request(h2: bool) -> ConnTracker {
        let t = tracker();
        t.request_started(h2);
        t.request_finished(t.shared.now_ms());
        t
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
        let t = idle_after_one_request(false);
        let armed = t.shared.now_ms();
        assert_eq!(t.check(armed), TimerCheck::Wait(armed + 10_000));
        // Bytes of a new head arrive 5 s later; nobody touches the timer.
        tokio::time::advance(std::time::Duration::from_secs(5)).await;
        read(&t, b"GET / HTTP/1.1\r\nhost");
        // When the timer fires it re-arms on that head's own deadline, and closes then.
        assert_eq!(t.check(armed + 10_000), TimerCheck::Wait(armed + 15_000));
        assert_eq!(t.check(armed + 15_000), TimerCheck::HeadTimeout);
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_comes_whole_starts_no_header_timer_and_one_in_pieces_does() {
        let t = idle_after_one_request(false);
        let idle = t.shared.now_ms();
        // Whole: hyper dispatches it in the same poll, so no clock is read for it.
        read(&t, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n");
        assert_eq!(t.head_started.load(Ordering::Relaxed), 0);
        assert_eq!(t.check(idle + 10_000), TimerCheck::Wait(idle + 20_000));
        // In pieces: the header timeout runs from the first piece.
        read(&t, b"GET / HTTP/1.1\r\n");
        assert_eq!(t.check(idle + 10_000), TimerCheck::HeadTimeout);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_timeout_shorter_than_the_header_timeout_is_not_delayed() {
        let shared = Shared::for_tests(&ServerConfig {
            header_read_timeout: keel_config::Duration::from_secs(10),
            idle_timeout: keel_config::Duration::from_secs(2),
            park_idle_after: keel_config::Duration::from_millis(0),
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
        let t = idle_after_one_request(true);
        read(&t, b"\0\0\0\x04\0\0\0\0\0");
        let now = t.shared.now_ms();
        assert_eq!(t.check(now), TimerCheck::Wait(now + 75_000));
    }

    fn parking_tracker(park_ms: u64) -> ConnTracker {
        let shared = Shared::for_tests(&ServerConfig {
            header_read_timeout: keel_config::Duration::from_secs(10),
            idle_timeout: keel_config::Duration::from_secs(75),
            park_idle_after: keel_config::Duration::from_millis(park_ms),
            ..ServerConfig::default()
        });
        ConnTracker::new(shared)
    }

    /// What `TrackedIo::note_read` records, without a socket.
    fn read(t: &ConnTracker, bytes: &[u8]) {
        let at_end = bytes.ends_with(b"\r\n\r\n");
        t.at_boundary.store(at_end, Ordering::Relaxed);
        t.reads.fetch_add(1, Ordering::Relaxed);
        t.on_bytes_read();
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_http1_connection_parks_after_the_delay_and_a_busy_one_is_checked_once_per_delay()
     {
        let t = parking_tracker(250);
        let now = t.shared.now_ms();
        // A fresh connection that has read nothing is parkable from accept.
        assert_eq!(t.check(now), TimerCheck::Wait(now + 250));
        read(&t, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n");
        t.request_started(false);
        // Busy: the timer comes back within one delay, not at the idle timeout.
        assert_eq!(t.check(now + 100), TimerCheck::Wait(now + 350));
        t.request_finished(now + 200);
        assert_eq!(t.check(now + 300), TimerCheck::Wait(now + 450));
        assert_eq!(t.check(now + 450), TimerCheck::Park);
        // Parked, only the connection's own deadlines count.
        assert_eq!(t.check_parked(now + 450), TimerCheck::Wait(now + 10_450));
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_that_may_hold_bytes_or_state_parks() {
        let t = parking_tracker(250);
        let later = t.shared.now_ms() + 1_000;
        read(&t, b"GET / HTTP/1.1\r\nhost: x\r\n\r\nGET / HT");
        t.request_started(false);
        t.request_finished(t.shared.now_ms());
        assert!(!t.parkable(), "part of a pipelined head is buffered");
        assert!(matches!(t.check(later), TimerCheck::Wait(_)));
        read(&t, b"TP/1.1\r\n\r\n");
        assert!(t.parkable(), "the head completed");
        t.write_pending();
        assert!(!t.parkable(), "response bytes wait for the socket");
        t.write_done();
        t.request_started(false);
        assert!(!t.parkable(), "a request in flight");
        t.request_finished(t.shared.now_ms());
        assert!(t.parkable());

        let h2 = parking_tracker(250);
        read(&h2, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert!(
            !h2.parkable(),
            "bytes read, but no HTTP/1 request: the protocol is not settled"
        );
        h2.request_started(true);
        h2.request_finished(h2.shared.now_ms());
        assert!(!h2.parkable(), "HTTP/2 keeps its connection state");

        let off = parking_tracker(0);
        let now = off.shared.now_ms();
        assert_eq!(
            off.check(now + 5_000),
            TimerCheck::Wait(now + 10_000),
            "0s = never park"
        );
    }
}
