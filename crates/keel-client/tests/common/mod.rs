//! Real Keel servers on loopback for the client's tests, with switches the tests flip.
#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use http_body_util::BodyExt;
use keel_client::client::{Client, ClientConfig};
use keel_client::endpoint::{Endpoint, Endpoints};
use keel_client::upstream::{Upstream, UpstreamConfig};
use keel_core::Shutdown;
use keel_server::{HttpSettings, Readiness, Server, ServerConfig, ServerHandle};

/// What one upstream saw, and how it should behave.
#[derive(Default)]
pub struct Upstreamish {
    /// Requests to any route.
    pub hits: AtomicUsize,
    /// `/` answers 503.
    pub failing: AtomicBool,
    /// The next request to `/` waits this long before answering (then it is reset to 0).
    pub delay_next_ms: AtomicU64,
    /// Handlers dropped before finishing (`/`, `/slow`).
    pub cancelled: AtomicUsize,
    /// The `grpc-status` that `/grpc` sends in its trailers.
    pub grpc_status: AtomicI32,
}

struct DropProbe(Arc<Upstreamish>, bool);
impl Drop for DropProbe {
    fn drop(&mut self) {
        if !self.1 {
            self.0.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn root(State(s): State<Arc<Upstreamish>>) -> (StatusCode, &'static str) {
    s.hits.fetch_add(1, Ordering::SeqCst);
    let delay = s.delay_next_ms.swap(0, Ordering::SeqCst);
    if delay > 0 {
        let mut probe = DropProbe(s.clone(), false);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        probe.1 = true;
    }
    if s.failing.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "down")
    } else {
        (StatusCode::OK, "ok")
    }
}

async fn slow(State(s): State<Arc<Upstreamish>>) -> &'static str {
    s.hits.fetch_add(1, Ordering::SeqCst);
    let mut probe = DropProbe(s.clone(), false);
    tokio::time::sleep(Duration::from_secs(5)).await;
    probe.1 = true;
    "slow"
}

async fn wait(State(s): State<Arc<Upstreamish>>, Path(ms): Path<u64>) -> &'static str {
    s.hits.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    "waited"
}

async fn bad(State(s): State<Arc<Upstreamish>>) -> StatusCode {
    s.hits.fetch_add(1, Ordering::SeqCst);
    StatusCode::SERVICE_UNAVAILABLE
}

/// A gRPC-shaped response whose status comes *after* a message, in trailers (the shape of a
/// streaming call that fails midway), which no header check can see.
async fn grpc(State(s): State<Arc<Upstreamish>>) -> Response {
    s.hits.fetch_add(1, Ordering::SeqCst);
    let status = s.grpc_status.load(Ordering::SeqCst);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", status.to_string().parse().unwrap());
    let frames = Frames(
        [
            http_body::Frame::data(Bytes::from_static(b"\x00\x00\x00\x00\x00")),
            http_body::Frame::trailers(trailers),
        ]
        .into(),
    );
    (
        [(http::header::CONTENT_TYPE, "application/grpc")],
        axum::body::Body::new(frames),
    )
        .into_response()
}

/// Reads the body frame by frame and answers how many bytes came (400 if it broke off).
async fn count(body: axum::body::Body) -> (StatusCode, String) {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()),
        }
    }
    (StatusCode::OK, n.to_string())
}

/// A body of ready-made frames.
struct Frames(std::collections::VecDeque<http_body::Frame<Bytes>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(Ok))
    }
}

/// A Keel server on a free loopback port with keep-alive `idle`.
pub async fn serve(idle: Duration) -> (SocketAddr, Arc<Upstreamish>, ServerHandle) {
    serve_with(|s| s.idle_timeout = keel_config::Duration::from(idle)).await
}

/// A Keel server whose config `tune` adjusts.
pub async fn serve_with(
    tune: impl FnOnce(&mut ServerConfig),
) -> (SocketAddr, Arc<Upstreamish>, ServerHandle) {
    let state = Arc::new(Upstreamish::default());
    let router = Router::new()
        .route("/", get(root))
        .route("/slow", get(slow))
        .route("/wait/{ms}", get(wait))
        .route("/bad", get(bad))
        .route(
            "/target",
            get(|req: http::Request<axum::body::Body>| async move {
                let host = req.headers().get(http::header::HOST).cloned();
                format!("{:?} {}", host, req.uri())
            }),
        )
        .route("/grpc", get(grpc).post(grpc))
        .route("/count", axum::routing::post(count))
        .with_state(state.clone());
    let mut server = ServerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        ..ServerConfig::default()
    };
    tune(&mut server);
    let settings = HttpSettings {
        server,
        ..HttpSettings::default()
    };
    let shutdown = Shutdown::new();
    let readiness = Readiness::new(Default::default(), shutdown.clone());
    let server = Server::bind(&settings, 1, readiness, shutdown).unwrap();
    let addr = server.local_addr();
    let handle = server.handle();
    tokio::spawn(server.serve(router));
    (addr, state, handle)
}

/// A client over static endpoints with default routing policies.
pub fn client(addrs: &[SocketAddr], cfg: ClientConfig) -> Client {
    let eps = Endpoints::new(addrs.iter().map(|a| Endpoint::new(*a)).collect());
    Client::new(
        "test",
        cfg,
        Arc::new(Upstream::new(UpstreamConfig::default(), eps)),
    )
}

/// Send `n` calls to `/`, reading each body so its connection returns to the pool; returns
/// how many did not end in 200.
pub async fn run(c: &Client, n: usize) -> usize {
    let mut failed = 0;
    for _ in 0..n {
        if !call(c, "/").await {
            failed += 1;
        }
    }
    failed
}

/// One GET of `path`, body read to the end. True: a 200.
pub async fn call(c: &Client, path: &str) -> bool {
    let req = http::Request::get(path).body(Bytes::new()).unwrap();
    match c.request(req).await {
        Ok(r) if r.status() == 200 => {
            r.into_body().collect().await.unwrap();
            true
        }
        _ => false,
    }
}

pub fn get_root() -> http::Request<Bytes> {
    http::Request::get("/").body(Bytes::new()).unwrap()
}
