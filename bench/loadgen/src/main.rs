//! `keel-loadgen`: the open-loop load generator Keel's benchmark suite uses for fixed-rate
//! latency (HTTP/1.1, h2c and gRPC health) and, with `--closed N`, for saturation sweeps.
//!
//! # Why open loop
//!
//! A closed-loop tool (wrk, `--closed N` here) sends the next request on a connection only
//! after the previous answer arrived. When the server stalls, the tool stalls with it and simply
//! does not send the requests a real client population would have sent meanwhile, so the stall
//! shows up as *one* slow sample instead of hundreds: the tail is hidden ("coordinated
//! omission"). Real users arrive at a rate that does not care how the server is doing.
//!
//! In open-loop mode each request `i` has a *scheduled* send time `start + i / rate`, fixed in
//! advance. Latency is measured from that scheduled time to the end of the response, so every
//! delay counts: a request that waits because all connections are busy, because the generator
//! itself was late, or because the server queued it. If the system cannot keep up, the queue
//! grows, the latencies grow with it, and the achieved rate falls below the target: BENCH.md
//! declares such a point invalid (achieved < 99 % of target) instead of quietly reporting the
//! closed-loop numbers.
//!
//! # How it works
//!
//! One tokio current-thread runtime (the runner pins the generator to one CPU). `--connections`
//! workers each own one HTTP/1.1 keep-alive connection (or share `--h2-connections` h2c
//! connections). A free worker claims the next request index from a shared counter, waits
//! until that index's scheduled time (tokio's timer has millisecond granularity, so the last
//! 2 ms are spent yielding to the runtime rather than sleeping) and sends. Claiming indices
//! in order makes the workers a FIFO queue with N servers: when every worker is busy the next
//! request's scheduled time passes while it waits, and that wait is part of its latency. The
//! gap between scheduled and actual send is also recorded separately (`send_lag_*`) so a late
//! generator is visible. Latencies go into an HdrHistogram (µs, 3 significant digits).
//!
//! HTTP/1.1 goes through a minimal built-in client (request bytes serialised once, only the
//! status line and framing of the answer parsed) because hyper's client costs about as much
//! CPU per request as a hyper server, so one generator core could not saturate one server
//! core; `--hyper-h1` switches to hyper's client for cross-checks. h2c and gRPC use hyper's
//! HTTP/2 client with prior knowledge.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http::header::{CONTENT_TYPE, HOST, TE};
use http::{HeaderValue, Method, Request, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Largest latency the histograms hold (one hour in µs); larger values are clamped.
const MAX_US: u64 = 3_600_000_000;
/// How long before a scheduled send a worker stops sleeping on tokio's (1 ms) timer and
/// starts yielding to the runtime until the exact instant.
const SPIN_WINDOW: Duration = Duration::from_millis(2);
/// Path of the gRPC health check.
const GRPC_HEALTH_PATH: &str = "/grpc.health.v1.Health/Check";
/// A gRPC message frame: not compressed, length 0 (an empty `HealthCheckRequest`, service "").
const GRPC_EMPTY_FRAME: &[u8] = &[0, 0, 0, 0, 0];

#[derive(Debug, Parser)]
#[command(
    name = "keel-loadgen",
    about = "Open-loop (fixed arrival rate) or closed-loop HTTP/1.1, h2c and gRPC load generator"
)]
struct Args {
    /// Target URL, `http://HOST:PORT/PATH` (HTTP/1.1 unless --h2c or --grpc-health).
    #[arg(long)]
    url: String,
    /// Open loop: requests per second, scheduled at fixed intervals of 1/rate.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Measured window (e.g. 30s, 500ms, 2m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// Load sent before the measured window and not recorded.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    warmup: Duration,
    /// Requests in flight at most. HTTP/1.1: that many keep-alive connections. h2c: that many
    /// concurrent streams spread over --h2-connections connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// h2c / gRPC: number of HTTP/2 connections.
    #[arg(long, default_value_t = 1)]
    h2_connections: usize,
    /// Request method (default GET, or POST when --body-bytes > 0).
    #[arg(long)]
    method: Option<String>,
    /// Request body size; the body is a JSON object padded to exactly this many bytes.
    #[arg(long, default_value_t = 0)]
    body_bytes: usize,
    /// HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
    #[arg(long)]
    h2c: bool,
    /// HTTP/1.1 through hyper's client instead of the built-in minimal client (which writes
    /// pre-serialised request bytes and parses only status and framing, so that one generator
    /// core can saturate a server core).
    #[arg(long)]
    hyper_h1: bool,
    /// Send unary grpc.health.v1.Health/Check over h2c; ok means `grpc-status: 0`.
    #[arg(long)]
    grpc_health: bool,
    /// Closed loop instead: N workers, each sending as soon as its previous answer arrived.
    #[arg(long, value_name = "N")]
    closed: Option<usize>,
    /// After the window, wait at most this long for requests still queued or in flight.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    drain: Duration,
    /// Also report the CPU time (utime+stime) these processes used over the measured window,
    /// summed (comma-separated or repeated: every hop of a chain).
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Print one JSON object line instead of the human-readable summary.
    #[arg(long)]
    json: bool,
    /// An extra request header, `name: value` (repeatable), e.g. an API key for a gateway.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
}

/// Parses `30s`, `500ms`, `100us`, `2m`, `1.5s` or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" | "µs" => n / 1e6,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (use s, ms, us or m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("bad duration {s:?}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Scheduling and bookkeeping (no I/O; unit-tested below).

/// The time line of one run.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Scheduled send time of request 0.
    start: Instant,
    /// Requests scheduled (open loop) or started (closed loop) before this are not recorded.
    measure_start: Instant,
    /// End of the measured window: no request is scheduled or started at or after it.
    end: Instant,
    /// Requests still queued or in flight at this instant are abandoned.
    hard_stop: Instant,
    /// Open loop: requests per second.
    rate: f64,
}

impl Plan {
    fn new(
        start: Instant,
        warmup: Duration,
        duration: Duration,
        drain: Duration,
        rate: f64,
    ) -> Self {
        let measure_start = start + warmup;
        let end = measure_start + duration;
        Self {
            start,
            measure_start,
            end,
            hard_stop: end + drain,
            rate,
        }
    }

    /// Scheduled send time of request `i`: `start + i / rate`.
    fn scheduled(&self, i: u64) -> Instant {
        self.start + Duration::from_secs_f64(i as f64 / self.rate)
    }

    /// The smallest request index whose scheduled time is at or after `t`.
    fn first_index_at_or_after(&self, t: Instant) -> u64 {
        let off = t.saturating_duration_since(self.start).as_secs_f64();
        // A float → int `as` cast saturates; the loops below fix any rounding.
        let mut i = (off * self.rate).ceil() as u64;
        while i > 0 && self.scheduled(i - 1) >= t {
            i -= 1;
        }
        while self.scheduled(i) < t {
            i += 1;
        }
        i
    }

    /// How many requests are scheduled inside the measured window.
    fn scheduled_in_window(&self) -> u64 {
        self.first_index_at_or_after(self.end) - self.first_index_at_or_after(self.measure_start)
    }
}

/// The result of one request as the recorder sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// 2xx (and `grpc-status: 0` for gRPC); response body bytes.
    Ok(u64),
    /// An answer that is not a success; response body bytes.
    Failed(u64),
    /// Connection refused, reset, protocol error, or abandoned at the hard stop.
    Transport,
}

/// Per-worker bookkeeping; workers never share one, they are merged at the end.
#[derive(Debug)]
struct Recorder {
    measure_start: Instant,
    end: Instant,
    /// Scheduled send time → end of response, µs.
    latency: Histogram<u64>,
    /// Scheduled send time → actual send, µs: how late the generator (or queue) was.
    send_lag: Histogram<u64>,
    ok: u64,
    errors: u64,
    transport_errors: u64,
    /// Requests scheduled inside the measured window that also completed inside it. Backlog
    /// left over from the warm-up does not count, backlog still queued at the end is missing:
    /// this is below the target whenever the system (or the generator) falls behind.
    completed_in_window: u64,
    resp_bytes: u64,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Recorder {
    fn new(plan: &Plan) -> Result<Self, hdrhistogram::CreationError> {
        Ok(Self {
            measure_start: plan.measure_start,
            end: plan.end,
            latency: Histogram::new_with_bounds(1, MAX_US, 3)?,
            send_lag: Histogram::new_with_bounds(1, MAX_US, 3)?,
            ok: 0,
            errors: 0,
            transport_errors: 0,
            completed_in_window: 0,
            resp_bytes: 0,
        })
    }

    /// Records one request scheduled at `scheduled`, actually sent at `sent`, finished at
    /// `done`. Latency is `done - scheduled`, never `done - sent`.
    fn record(&mut self, scheduled: Instant, sent: Instant, done: Instant, outcome: Outcome) {
        if scheduled < self.measure_start || scheduled >= self.end {
            return;
        }
        if done < self.end {
            self.completed_in_window += 1;
        }
        self.latency
            .saturating_record(micros(done.saturating_duration_since(scheduled)));
        self.send_lag
            .saturating_record(micros(sent.saturating_duration_since(scheduled)));
        match outcome {
            Outcome::Ok(n) => {
                self.ok += 1;
                self.resp_bytes += n;
            }
            Outcome::Failed(n) => {
                self.errors += 1;
                self.resp_bytes += n;
            }
            Outcome::Transport => {
                self.errors += 1;
                self.transport_errors += 1;
            }
        }
    }

    fn merge(&mut self, other: &Recorder) -> Result<(), hdrhistogram::AdditionError> {
        self.latency.add(&other.latency)?;
        self.send_lag.add(&other.send_lag)?;
        self.ok += other.ok;
        self.errors += other.errors;
        self.transport_errors += other.transport_errors;
        self.completed_in_window += other.completed_in_window;
        self.resp_bytes += other.resp_bytes;
        Ok(())
    }
}

/// One request/response exchange; the workers only schedule and record.
trait Exchange {
    async fn exchange(&mut self) -> Outcome;
}

/// Waits until `t`: sleeps on tokio's timer until `SPIN_WINDOW` before, then yields to the
/// runtime (which keeps serving I/O) until the exact instant.
async fn wait_until(t: Instant) {
    if let Some(d) = t.checked_duration_since(Instant::now()) {
        if d > SPIN_WINDOW {
            tokio::time::sleep_until((t - SPIN_WINDOW).into()).await;
        }
    }
    while Instant::now() < t {
        tokio::task::yield_now().await;
    }
}

/// Open loop: claim the next index, wait for its scheduled time, send, record from the
/// scheduled time.
async fn open_worker<E: Exchange>(
    mut ex: E,
    next: Arc<AtomicU64>,
    plan: Plan,
    mut rec: Recorder,
) -> Recorder {
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let scheduled = plan.scheduled(i);
        if scheduled >= plan.end {
            break;
        }
        wait_until(scheduled).await;
        let sent = Instant::now();
        if sent >= plan.hard_stop {
            // Still queued at the hard stop: the runner sees it as `unsent`.
            break;
        }
        let outcome = tokio::time::timeout_at(plan.hard_stop.into(), ex.exchange())
            .await
            .unwrap_or(Outcome::Transport);
        rec.record(scheduled, sent, Instant::now(), outcome);
    }
    rec
}

/// Closed loop: send, wait for the answer, send again, until the window ends.
async fn closed_worker<E: Exchange>(mut ex: E, plan: Plan, mut rec: Recorder) -> Recorder {
    loop {
        let sent = Instant::now();
        if sent >= plan.end {
            break;
        }
        let outcome = tokio::time::timeout_at(plan.hard_stop.into(), ex.exchange())
            .await
            .unwrap_or(Outcome::Transport);
        rec.record(sent, sent, Instant::now(), outcome);
    }
    rec
}

// ---------------------------------------------------------------------------------------------
// HTTP.

/// The bytes of the request every exchange sends; cloning its parts only bumps refcounts.
#[derive(Debug)]
struct Template {
    method: Method,
    uri: Uri,
    host: HeaderValue,
    content_type: Option<HeaderValue>,
    /// `--header` values, sent on every request.
    extra: Vec<(http::HeaderName, HeaderValue)>,
    body: Bytes,
    h2: bool,
    grpc: bool,
}

impl Template {
    fn build(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        if self.h2 {
            *req.version_mut() = Version::HTTP_2;
        } else {
            req.headers_mut().insert(HOST, self.host.clone());
        }
        if let Some(ct) = &self.content_type {
            req.headers_mut().insert(CONTENT_TYPE, ct.clone());
        }
        if self.grpc {
            req.headers_mut()
                .insert(TE, HeaderValue::from_static("trailers"));
        }
        for (name, value) in &self.extra {
            req.headers_mut().append(name.clone(), value.clone());
        }
        req
    }
}

/// A JSON object of exactly `n` bytes (`{"pad":"xxx…"}`), or `n` `x`s when `n` is too small.
fn json_body(n: usize) -> Bytes {
    const FRAME: usize = r#"{"pad":""}"#.len();
    if n < FRAME {
        return Bytes::from(vec![b'x'; n]);
    }
    let mut s = String::with_capacity(n);
    s.push_str(r#"{"pad":""#);
    s.extend(std::iter::repeat_n('x', n - FRAME));
    s.push_str(r#""}"#);
    Bytes::from(s)
}

#[derive(Debug)]
enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

#[derive(Debug)]
struct Connector {
    addr: String,
    h2: bool,
}

impl Connector {
    async fn connect(&self) -> Result<Conn, BoxError> {
        let stream = tokio::net::TcpStream::connect(&self.addr).await?;
        stream.set_nodelay(true)?;
        let io = TokioIo::new(stream);
        if self.h2 {
            let (send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(Conn::H2(send))
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(Conn::H1(send))
        }
    }
}

/// Sends one request and reads the whole response, keeping only its length and status.
async fn send_one(conn: &mut Conn, tpl: &Template) -> Result<Outcome, BoxError> {
    let req = tpl.build();
    let resp = match conn {
        Conn::H1(s) => {
            s.ready().await?;
            s.send_request(req).await?
        }
        Conn::H2(s) => {
            s.ready().await?;
            s.send_request(req).await?
        }
    };
    let mut success = resp.status().is_success();
    let mut grpc_ok = resp.headers().get("grpc-status").map(|v| v == "0");
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Some(d) = frame.data_ref() {
            n += d.len() as u64;
        } else if let Some(t) = frame.trailers_ref() {
            if let Some(v) = t.get("grpc-status") {
                grpc_ok = Some(v == "0");
            }
        }
    }
    if tpl.grpc {
        success &= grpc_ok == Some(true);
    }
    Ok(if success {
        Outcome::Ok(n)
    } else {
        Outcome::Failed(n)
    })
}

#[derive(Debug)]
struct Client {
    conn: Option<Conn>,
    connector: Arc<Connector>,
    tpl: Arc<Template>,
}

impl Exchange for Client {
    async fn exchange(&mut self) -> Outcome {
        if self.conn.is_none() {
            match self.connector.connect().await {
                Ok(c) => self.conn = Some(c),
                Err(_) => {
                    // Keep a dead server from turning the closed loop into a busy loop.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    return Outcome::Transport;
                }
            }
        }
        let Some(conn) = self.conn.as_mut() else {
            return Outcome::Transport;
        };
        match send_one(conn, &self.tpl).await {
            Ok(o) => o,
            Err(_) => {
                // An HTTP/1.1 error leaves the connection unusable; an h2 stream error does
                // not, unless the connection itself went away.
                let dead = match conn {
                    Conn::H1(_) => true,
                    Conn::H2(s) => s.is_closed(),
                };
                if dead {
                    self.conn = None;
                }
                Outcome::Transport
            }
        }
    }
}

/// The minimal HTTP/1.1 keep-alive client: the request is serialised once, the response is
/// read into a reused buffer and only its status line and framing (Content-Length or chunked,
/// `Connection: close`) are parsed.
#[derive(Debug)]
struct RawH1 {
    stream: Option<tokio::net::TcpStream>,
    connector: Arc<Connector>,
    request: Bytes,
    buf: Vec<u8>,
}

/// Serialises the template as HTTP/1.1 request bytes.
fn h1_request_bytes(tpl: &Template) -> Bytes {
    let mut r = Vec::with_capacity(256 + tpl.body.len());
    r.extend_from_slice(tpl.method.as_str().as_bytes());
    r.push(b' ');
    r.extend_from_slice(
        tpl.uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    r.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    r.extend_from_slice(tpl.host.as_bytes());
    r.extend_from_slice(b"\r\n");
    if let Some(ct) = &tpl.content_type {
        r.extend_from_slice(b"content-type: ");
        r.extend_from_slice(ct.as_bytes());
        r.extend_from_slice(b"\r\n");
    }
    for (name, value) in &tpl.extra {
        r.extend_from_slice(name.as_str().as_bytes());
        r.extend_from_slice(b": ");
        r.extend_from_slice(value.as_bytes());
        r.extend_from_slice(b"\r\n");
    }
    if !tpl.body.is_empty() || tpl.method == Method::POST || tpl.method == Method::PUT {
        r.extend_from_slice(format!("content-length: {}\r\n", tpl.body.len()).as_bytes());
    }
    r.extend_from_slice(b"\r\n");
    r.extend_from_slice(&tpl.body);
    Bytes::from(r)
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Reads more bytes into `buf`; end of stream is an error (a response was expected).
async fn read_more<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<(), BoxError> {
    use tokio::io::AsyncReadExt;
    buf.reserve(4096);
    if r.read_buf(buf).await? == 0 {
        return Err("connection closed mid-response".into());
    }
    Ok(())
}

/// A response as the minimal client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RawResponse {
    status: u16,
    body_bytes: u64,
    close: bool,
}

/// Reads exactly one HTTP/1.1 response from `r`, using `buf` (cleared first) as scratch.
async fn read_response<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<RawResponse, BoxError> {
    buf.clear();
    let mut scanned = 0;
    let head_end = loop {
        if let Some(p) = find(buf, b"\r\n\r\n", scanned) {
            break p + 4;
        }
        scanned = buf.len().saturating_sub(3);
        read_more(r, buf).await?;
    };
    let head = &buf[..head_end];
    let status: u16 = head
        .get(9..12)
        .filter(|_| head.starts_with(b"HTTP/1."))
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse().ok())
        .ok_or("malformed status line")?;
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    let mut close = false;
    for line in head.split(|&b| b == b'\n').skip(1) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") {
            let v = std::str::from_utf8(value)?.parse()?;
            content_length = Some(v);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = value.eq_ignore_ascii_case(b"chunked");
        } else if name.eq_ignore_ascii_case(b"connection") {
            close = value.eq_ignore_ascii_case(b"close");
        }
    }
    let body_bytes = if (100..200).contains(&status) || status == 204 || status == 304 {
        0
    } else if chunked {
        let mut pos = head_end;
        let mut total = 0u64;
        loop {
            let line_end = loop {
                if let Some(p) = find(buf, b"\r\n", pos) {
                    break p;
                }
                read_more(r, buf).await?;
            };
            let size_field = buf[pos..line_end]
                .split(|&b| b == b';')
                .next()
                .unwrap_or_default()
                .trim_ascii();
            let size = usize::from_str_radix(std::str::from_utf8(size_field)?, 16)?;
            pos = line_end + 2;
            if size == 0 {
                // Trailers, if any, then an empty line.
                loop {
                    let e = loop {
                        if let Some(p) = find(buf, b"\r\n", pos) {
                            break p;
                        }
                        read_more(r, buf).await?;
                    };
                    let empty = e == pos;
                    pos = e + 2;
                    if empty {
                        break;
                    }
                }
                break;
            }
            while buf.len() < pos + size + 2 {
                read_more(r, buf).await?;
            }
            total += size as u64;
            pos += size + 2;
        }
        if buf.len() != pos {
            return Err("unexpected bytes after a chunked response".into());
        }
        total
    } else if let Some(n) = content_length {
        while buf.len() < head_end + n {
            read_more(r, buf).await?;
        }
        if buf.len() != head_end + n {
            return Err("unexpected bytes after a response".into());
        }
        n as u64
    } else {
        return Err("response without Content-Length or chunked framing".into());
    };
    Ok(RawResponse {
        status,
        body_bytes,
        close,
    })
}

impl RawH1 {
    async fn roundtrip(&mut self) -> Result<Outcome, BoxError> {
        use tokio::io::AsyncWriteExt;
        if self.stream.is_none() {
            let s = tokio::net::TcpStream::connect(&self.connector.addr).await?;
            s.set_nodelay(true)?;
            self.stream = Some(s);
        }
        let stream = self.stream.as_mut().ok_or("no connection")?;
        stream.write_all(&self.request).await?;
        let resp = read_response(stream, &mut self.buf).await?;
        if resp.close {
            self.stream = None;
        }
        Ok(if (200..300).contains(&resp.status) {
            Outcome::Ok(resp.body_bytes)
        } else {
            Outcome::Failed(resp.body_bytes)
        })
    }
}

impl Exchange for RawH1 {
    async fn exchange(&mut self) -> Outcome {
        let had_conn = self.stream.is_some();
        match self.roundtrip().await {
            Ok(o) => o,
            Err(_) => {
                self.stream = None;
                if !had_conn {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Outcome::Transport
            }
        }
    }
}

/// Either client, so that one worker type serves every protocol.
#[derive(Debug)]
enum AnyClient {
    Hyper(Client),
    Raw(RawH1),
}

impl Exchange for AnyClient {
    async fn exchange(&mut self) -> Outcome {
        match self {
            AnyClient::Hyper(c) => c.exchange().await,
            AnyClient::Raw(c) => c.exchange().await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CPU accounting and the report.

/// utime+stime of a process, in clock ticks (/proc/PID/stat fields 14 and 15).
fn cpu_ticks(pid: &str) -> Result<u64, BoxError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces and parentheses: skip past the last ')'.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or("malformed /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so field 14 is index 11.
    let utime: u64 = f.get(11).ok_or("short /proc stat")?.parse()?;
    let stime: u64 = f.get(12).ok_or("short /proc stat")?.parse()?;
    Ok(utime + stime)
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[derive(Debug, Serialize)]
struct Report {
    mode: &'static str,
    protocol: &'static str,
    url: String,
    /// Open loop: the target rate; closed loop: null.
    target_rps: Option<f64>,
    /// Requests scheduled (closed loop: started) and completed inside the measured window /
    /// window length.
    achieved_rps: f64,
    /// Open loop: achieved ≥ 99 % of target and nothing left unsent; closed loop: no errors.
    valid: bool,
    /// Requests in flight at most (workers).
    concurrency: usize,
    warmup_s: f64,
    duration_s: f64,
    ok: u64,
    errors: u64,
    transport_errors: u64,
    /// Open loop: requests scheduled in the window that were still queued at the hard stop.
    unsent: u64,
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
    mean_us: f64,
    send_lag_p99_us: u64,
    send_lag_max_us: u64,
    resp_bytes_mean: f64,
    server_cpu_us: Option<f64>,
    server_cpu_us_per_req: Option<f64>,
    /// The generator's own CPU over the window as a fraction of one core (open loop spins
    /// just before each send, so this is only meaningful in closed loop).
    loadgen_cpu_util: Option<f64>,
    loadavg: String,
}

impl Report {
    fn print_human(&self) {
        match self.target_rps {
            Some(t) => println!(
                "open loop, {}: target {t:.1} req/s, achieved {:.1} req/s{} over {:.1} s, {} in flight at most",
                self.protocol,
                self.achieved_rps,
                if self.valid {
                    ""
                } else {
                    " (INVALID: < 99 % of target)"
                },
                self.duration_s,
                self.concurrency
            ),
            None => println!(
                "closed loop, {}: {} workers, achieved {:.1} req/s over {:.1} s",
                self.protocol, self.concurrency, self.achieved_rps, self.duration_s
            ),
        }
        println!(
            "ok {}, errors {} (transport {}), unsent {}, mean response body {:.0} B",
            self.ok, self.errors, self.transport_errors, self.unsent, self.resp_bytes_mean
        );
        println!(
            "latency{} µs: p50 {} p90 {} p99 {} p99.9 {} max {} (mean {:.1})",
            if self.target_rps.is_some() {
                " from scheduled send time,"
            } else {
                ","
            },
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
            self.mean_us
        );
        println!(
            "send lag µs: p99 {} max {}",
            self.send_lag_p99_us, self.send_lag_max_us
        );
        if let Some(c) = self.server_cpu_us_per_req {
            println!("server CPU {c:.2} µs/request");
        }
        println!("load average {}", self.loadavg);
    }
}

// ---------------------------------------------------------------------------------------------
// Startup.

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build the tokio current-thread runtime");
    match rt.block_on(run(args)) {
        Ok(report) => {
            if report.json {
                println!("{}", report.line);
            } else {
                report.report.print_human();
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keel-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug)]
struct Printed {
    json: bool,
    line: String,
    report: Report,
}

async fn run(args: Args) -> Result<Printed, BoxError> {
    let uri: Uri = args.url.parse()?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// URLs are supported".into());
    }
    let host = uri.host().ok_or("URL has no host")?;
    let port = uri.port_u16().unwrap_or(80);
    let authority = uri.authority().ok_or("URL has no authority")?.clone();
    let h2 = args.h2c || args.grpc_health;
    let path = if args.grpc_health {
        GRPC_HEALTH_PATH.to_string()
    } else {
        uri.path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.as_str().to_string())
    };
    let req_uri: Uri = if h2 {
        Uri::builder()
            .scheme("http")
            .authority(authority.clone())
            .path_and_query(path.as_str())
            .build()?
    } else {
        path.parse()?
    };
    let (body, content_type, default_method) = if args.grpc_health {
        (
            Bytes::from_static(GRPC_EMPTY_FRAME),
            Some(HeaderValue::from_static("application/grpc")),
            Method::POST,
        )
    } else if args.body_bytes > 0 {
        (
            json_body(args.body_bytes),
            Some(HeaderValue::from_static("application/json")),
            Method::POST,
        )
    } else {
        (Bytes::new(), None, Method::GET)
    };
    let method = match &args.method {
        Some(m) => Method::from_bytes(m.to_ascii_uppercase().as_bytes())?,
        None => default_method,
    };
    let tpl = Arc::new(Template {
        method,
        uri: req_uri,
        host: HeaderValue::from_str(authority.as_str())?,
        content_type,
        extra: args
            .headers
            .iter()
            .map(|h| {
                let (n, v) = h
                    .split_once(':')
                    .ok_or_else(|| format!("--header {h:?}: expected NAME: VALUE"))?;
                Ok((
                    http::HeaderName::from_bytes(n.trim().as_bytes())?,
                    HeaderValue::from_str(v.trim())?,
                ))
            })
            .collect::<Result<Vec<_>, BoxError>>()?,
        body,
        h2,
        grpc: args.grpc_health,
    });
    let open = args.closed.is_none();
    if open && !(args.rate.is_finite() && args.rate > 0.0) {
        return Err("--rate must be a positive number".into());
    }
    let workers = args.closed.unwrap_or(args.connections).max(1);
    let connector = Arc::new(Connector {
        addr: format!("{host}:{port}"),
        h2,
    });

    // Connect everything before the clock starts.
    let mut clients = Vec::with_capacity(workers);
    if h2 {
        let mut shared = Vec::new();
        for _ in 0..args.h2_connections.max(1) {
            match connector.connect().await? {
                Conn::H2(s) => shared.push(s),
                Conn::H1(_) => return Err("expected an h2 connection".into()),
            }
        }
        for w in 0..workers {
            clients.push(AnyClient::Hyper(Client {
                conn: Some(Conn::H2(shared[w % shared.len()].clone())),
                connector: connector.clone(),
                tpl: tpl.clone(),
            }));
        }
    } else if args.hyper_h1 {
        for _ in 0..workers {
            clients.push(AnyClient::Hyper(Client {
                conn: Some(connector.connect().await?),
                connector: connector.clone(),
                tpl: tpl.clone(),
            }));
        }
    } else {
        let request = h1_request_bytes(&tpl);
        for _ in 0..workers {
            let stream = tokio::net::TcpStream::connect(&connector.addr).await?;
            stream.set_nodelay(true)?;
            clients.push(AnyClient::Raw(RawH1 {
                stream: Some(stream),
                connector: connector.clone(),
                request: request.clone(),
                buf: Vec::with_capacity(4096 + tpl.body.len()),
            }));
        }
    }

    let plan = Plan::new(
        Instant::now() + Duration::from_millis(20),
        args.warmup,
        args.duration,
        args.drain,
        args.rate,
    );

    // CPU of the server and of the generator at the window's edges.
    let server_pids: Vec<String> = args.server_pid.iter().map(u32::to_string).collect();
    let sampler = tokio::spawn(async move {
        let servers = |pids: &[String]| -> Result<Option<u64>, BoxError> {
            if pids.is_empty() {
                return Ok(None);
            }
            let mut sum = 0;
            for pid in pids {
                sum += cpu_ticks(pid)?;
            }
            Ok(Some(sum))
        };
        tokio::time::sleep_until(plan.measure_start.into()).await;
        let s0 = servers(&server_pids)?;
        let g0 = cpu_ticks("self")?;
        tokio::time::sleep_until(plan.end.into()).await;
        let s1 = servers(&server_pids)?;
        let g1 = cpu_ticks("self")?;
        Ok::<_, BoxError>((s0.zip(s1).map(|(a, b)| b.saturating_sub(a)), g1 - g0))
    });

    let next = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::with_capacity(workers);
    for c in clients {
        let rec = Recorder::new(&plan)?;
        handles.push(if open {
            tokio::spawn(open_worker(c, next.clone(), plan, rec))
        } else {
            tokio::spawn(closed_worker(c, plan, rec))
        });
    }
    let mut total = Recorder::new(&plan)?;
    for h in handles {
        total.merge(&h.await?)?;
    }
    let (server_ticks, gen_ticks) = sampler.await??;

    let tck = clk_tck();
    let secs = args.duration.as_secs_f64();
    let achieved = total.completed_in_window as f64 / secs;
    let recorded = total.ok + total.errors;
    let unsent = if open {
        plan.scheduled_in_window().saturating_sub(recorded)
    } else {
        0
    };
    let valid = if open {
        achieved >= 0.99 * args.rate && unsent == 0
    } else {
        total.errors == 0
    };
    let server_cpu_us = server_ticks.map(|t| t as f64 / tck * 1e6);
    let report = Report {
        mode: if open { "open" } else { "closed" },
        protocol: if args.grpc_health {
            "grpc"
        } else if h2 {
            "h2c"
        } else if args.hyper_h1 {
            "http1-hyper"
        } else {
            "http1"
        },
        url: args.url.clone(),
        target_rps: open.then_some(args.rate),
        achieved_rps: achieved,
        valid,
        concurrency: workers,
        warmup_s: args.warmup.as_secs_f64(),
        duration_s: secs,
        ok: total.ok,
        errors: total.errors,
        transport_errors: total.transport_errors,
        unsent,
        p50_us: total.latency.value_at_quantile(0.50),
        p90_us: total.latency.value_at_quantile(0.90),
        p99_us: total.latency.value_at_quantile(0.99),
        p999_us: total.latency.value_at_quantile(0.999),
        max_us: total.latency.max(),
        mean_us: total.latency.mean(),
        send_lag_p99_us: total.send_lag.value_at_quantile(0.99),
        send_lag_max_us: total.send_lag.max(),
        resp_bytes_mean: if recorded > 0 {
            total.resp_bytes as f64 / recorded as f64
        } else {
            0.0
        },
        server_cpu_us,
        server_cpu_us_per_req: server_cpu_us
            .filter(|_| total.completed_in_window > 0)
            .map(|c| c / total.completed_in_window as f64),
        loadgen_cpu_util: Some(gen_ticks as f64 / tck / secs),
        loadavg: loadavg(),
    };
    Ok(Printed {
        json: args.json,
        line: serde_json::to_string(&report)?,
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_at(t0: Instant, warmup_ms: u64, dur_ms: u64, rate: f64) -> Plan {
        Plan::new(
            t0,
            Duration::from_millis(warmup_ms),
            Duration::from_millis(dur_ms),
            Duration::from_secs(1),
            rate,
        )
    }

    #[test]
    fn latency_counts_from_the_scheduled_time_when_the_sender_is_late() {
        let t0 = Instant::now();
        let plan = plan_at(t0, 0, 10_000, 1000.0);
        let mut rec = Recorder::new(&plan).expect("histogram");
        // Scheduled at 1 ms, sent 5 ms late, answered 100 µs after sending.
        let scheduled = t0 + Duration::from_millis(1);
        let sent = scheduled + Duration::from_millis(5);
        let done = sent + Duration::from_micros(100);
        rec.record(scheduled, sent, done, Outcome::Ok(16));
        let p50 = rec.latency.value_at_quantile(0.5);
        assert!(
            (5_095..=5_105).contains(&p50),
            "latency must include the 5 ms the request waited: p50 = {p50} µs"
        );
        let lag = rec.send_lag.value_at_quantile(0.5);
        assert!((4_995..=5_005).contains(&lag), "send lag = {lag} µs");
        assert_eq!((rec.ok, rec.errors, rec.resp_bytes), (1, 0, 16));
    }

    #[test]
    fn only_requests_scheduled_and_completed_in_the_window_count_as_throughput() {
        let t0 = Instant::now();
        let plan = plan_at(t0, 1_000, 2_000, 1000.0);
        let mut rec = Recorder::new(&plan).expect("histogram");
        // Warm-up backlog completing inside the window: neither latency nor throughput.
        let s = t0 + Duration::from_millis(999);
        rec.record(s, s, t0 + Duration::from_millis(1_001), Outcome::Ok(1));
        assert_eq!(
            (rec.latency.len(), rec.completed_in_window, rec.ok),
            (0, 0, 0)
        );
        // Scheduled and completed inside the window.
        let s = t0 + Duration::from_millis(1_500);
        rec.record(s, s, s + Duration::from_millis(1), Outcome::Ok(1));
        assert_eq!((rec.latency.len(), rec.completed_in_window), (1, 1));
        // Scheduled inside the window, completes after it: latency, not throughput.
        let s = t0 + Duration::from_millis(2_999);
        rec.record(s, s, t0 + Duration::from_millis(3_002), Outcome::Failed(0));
        assert_eq!(rec.latency.len(), 2);
        assert_eq!(rec.completed_in_window, 1);
        assert_eq!((rec.ok, rec.errors, rec.transport_errors), (1, 1, 0));
        rec.record(s, s, s, Outcome::Transport);
        assert_eq!((rec.errors, rec.transport_errors), (2, 1));
    }

    #[test]
    fn schedule_is_evenly_spaced_and_window_counts_are_exact() {
        let t0 = Instant::now();
        let plan = plan_at(t0, 1_000, 2_000, 3000.0);
        let gap = plan.scheduled(31) - plan.scheduled(30);
        assert!(gap.as_nanos().abs_diff(333_333) <= 1, "gap {gap:?}");
        assert_eq!(plan.first_index_at_or_after(t0), 0);
        assert_eq!(plan.first_index_at_or_after(plan.measure_start), 3_000);
        assert_eq!(plan.scheduled_in_window(), 6_000);
        let odd = plan_at(t0, 0, 1_000, 7.3);
        // 0, 1/7.3, …, 7/7.3 s are inside one second.
        assert_eq!(odd.scheduled_in_window(), 8);
    }

    #[test]
    fn merged_percentiles_cover_all_workers() {
        let t0 = Instant::now();
        let plan = plan_at(t0, 0, 10_000, 1000.0);
        let mut a = Recorder::new(&plan).expect("histogram");
        let mut b = Recorder::new(&plan).expect("histogram");
        for i in 0..99u64 {
            let s = t0 + Duration::from_millis(i);
            a.record(s, s, s + Duration::from_micros(100), Outcome::Ok(0));
        }
        let s = t0 + Duration::from_millis(500);
        b.record(s, s, s + Duration::from_millis(50), Outcome::Ok(0));
        a.merge(&b).expect("merge");
        assert_eq!(a.ok, 100);
        assert!(a.latency.value_at_quantile(0.5) < 110);
        assert!(a.latency.max() >= 49_900, "max {}", a.latency.max());
    }

    #[test]
    fn json_body_has_the_exact_size_and_parses() {
        for n in [0, 5, 10, 11, 1024] {
            let b = json_body(n);
            assert_eq!(b.len(), n);
            if n >= 10 {
                let v: serde_json::Value = serde_json::from_slice(&b).expect("valid JSON");
                assert!(v.get("pad").is_some());
            }
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("s").is_err());
    }

    /// A fake server that takes 2 ms per request, with no network.
    #[derive(Debug)]
    struct Slow;

    impl Exchange for Slow {
        async fn exchange(&mut self) -> Outcome {
            tokio::time::sleep(Duration::from_millis(2)).await;
            Outcome::Ok(0)
        }
    }

    /// One worker, a request scheduled every 1 ms, each taking at least 2 ms: request k
    /// cannot finish before `start + 2 ms × (k + 1)` although it was scheduled at
    /// `start + k ms`, so its latency is at least `k + 2` ms. A generator timing from the
    /// actual send would report about 2 ms for all of them. (Only lower bounds are asserted:
    /// a slow machine makes the latencies larger, never smaller.)
    #[tokio::test(flavor = "current_thread")]
    async fn open_loop_queueing_delay_is_part_of_the_latency() {
        let plan = Plan::new(
            Instant::now() + Duration::from_millis(1),
            Duration::ZERO,
            Duration::from_millis(20),
            Duration::from_secs(30),
            1000.0,
        );
        let rec = Recorder::new(&plan).expect("histogram");
        let rec = open_worker(Slow, Arc::new(AtomicU64::new(0)), plan, rec).await;
        assert_eq!(rec.ok, 20, "every request scheduled in the window is sent");
        assert!(
            rec.latency.max() >= 21_000,
            "the last request queued ≥ 19 ms: max = {} µs",
            rec.latency.max()
        );
        assert!(rec.latency.value_at_quantile(0.5) >= 11_000);
        assert!(rec.send_lag.max() >= 19_000);
    }

    /// Hands out its bytes a few at a time, like a socket under load.
    #[derive(Debug)]
    struct Trickle(Vec<u8>, usize, usize);

    impl tokio::io::AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let (pos, step) = (self.1, self.2);
            let n = step.min(self.0.len() - pos).min(buf.remaining());
            buf.put_slice(&self.0[pos..pos + n]);
            self.1 += n;
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn raw_client_parses_length_and_chunked_framing_across_split_reads() {
        let mut buf = Vec::new();
        for step in [1, 3, 7, 4096] {
            let mut r = Trickle(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nContent-Length: 16\r\n\r\nhello from keel\n"
                    .to_vec(),
                0,
                step,
            );
            let resp = read_response(&mut r, &mut buf).await.expect("length");
            assert_eq!((resp.status, resp.body_bytes, resp.close), (200, 16, false));

            let mut r = Trickle(
                b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
                  4\r\nabcd\r\na;ext=1\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n"
                    .to_vec(),
                0,
                step,
            );
            let resp = read_response(&mut r, &mut buf).await.expect("chunked");
            assert_eq!((resp.status, resp.body_bytes, resp.close), (503, 14, true));
        }
        // A truncated body is an error, not a short success.
        let mut r = Trickle(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab".to_vec(),
            0,
            64,
        );
        assert!(read_response(&mut r, &mut buf).await.is_err());
    }

    #[test]
    fn raw_request_bytes_frame_the_body() {
        let tpl = Template {
            method: Method::POST,
            uri: "/echo".parse().expect("uri"),
            host: HeaderValue::from_static("127.0.0.1:8080"),
            content_type: Some(HeaderValue::from_static("application/json")),
            extra: vec![(
                http::HeaderName::from_static("x-api-key"),
                HeaderValue::from_static("k"),
            )],
            body: json_body(1024),
            h2: false,
            grpc: false,
        };
        let r = h1_request_bytes(&tpl);
        let head_end = find(&r, b"\r\n\r\n", 0).expect("head") + 4;
        let head = std::str::from_utf8(&r[..head_end]).expect("ascii");
        assert!(head.starts_with("POST /echo HTTP/1.1\r\nhost: 127.0.0.1:8080\r\n"));
        assert!(head.contains("content-length: 1024\r\n"));
        assert!(head.contains("x-api-key: k\r\n"), "{head}");
        assert_eq!(r.len() - head_end, 1024);
    }
}
