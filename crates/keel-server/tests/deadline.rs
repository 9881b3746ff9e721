//! Deadlines at the server edge: refused on arrival without running the handler, cancelled
//! mid-handler with an immediate 504, malformed headers named in a 400 (or gRPC
//! `INVALID_ARGUMENT`), request ids kept or generated and echoed.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use keel_core::{Context, Shutdown};
use keel_server::{DeadlineConfig, HttpSettings, Readiness, Server, ServerConfig};
use keel_test_support as ts;

#[derive(Default)]
struct Counters {
    ran: AtomicUsize,
    dropped: AtomicUsize,
}

struct DropCount(Arc<Counters>);
impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

async fn start(
    routes: std::collections::BTreeMap<String, keel_config::Duration>,
) -> (SocketAddr, Arc<Counters>) {
    let counters = Arc::new(Counters::default());
    let router = Router::new()
        .route(
            "/run",
            get(|State(c): State<Arc<Counters>>, ctx: Context| async move {
                c.ran.fetch_add(1, Ordering::SeqCst);
                format!("{}ms", ctx.remaining().as_millis())
            }),
        )
        .route(
            "/slow",
            get(|State(c): State<Arc<Counters>>| async move {
                c.ran.fetch_add(1, Ordering::SeqCst);
                let _guard = DropCount(c.clone());
                tokio::time::sleep(Duration::from_secs(30)).await;
                "done"
            }),
        )
        .route(
            "/grpc",
            axum::routing::post(|State(c): State<Arc<Counters>>| async move {
                c.ran.fetch_add(1, Ordering::SeqCst);
                "unreachable in these tests"
            }),
        )
        .with_state(counters.clone());
    let settings = HttpSettings {
        server: ServerConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            ..ServerConfig::default()
        },
        deadline: DeadlineConfig {
            default: keel_config::Duration::from_secs(30),
            routes,
        },
        ..HttpSettings::default()
    };
    let shutdown = Shutdown::new();
    let readiness = Readiness::new(Default::default(), shutdown.clone());
    let server = Server::bind(&settings, 1, readiness.clone(), shutdown).unwrap();
    let addr = server.local_addr();
    tokio::spawn(server.serve(router));
    readiness.mark_started();
    (addr, counters)
}

async fn get_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, String) {
    let mut req = http::Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = ts::http1_client()
        .request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn malformed_propagation_headers_get_400_naming_the_header_and_skip_the_handler() {
    let (addr, c) = start(Default::default()).await;
    for (name, value) in [
        ("keel-timeout", "soon"),
        ("grpc-timeout", "1x"),
        ("x-envoy-expected-rq-timeout-ms", "1.5"),
        (
            "traceparent",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ),
        ("baggage", "k=v;"),
    ] {
        let (status, _, body) = get_with(addr, "/run", &[(name, value)]).await;
        assert_eq!(status, 400, "{name}: {body}");
        assert!(body.contains(name), "400 body must name {name}: {body}");
    }
    assert_eq!(c.ran.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_expired_deadline_is_refused_without_running_the_handler() {
    let (addr, c) = start(Default::default()).await;
    let (status, _, _) = get_with(addr, "/run", &[("grpc-timeout", "0n")]).await;
    assert_eq!(status, 504);
    assert_eq!(c.ran.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_deadline_passing_mid_handler_answers_504_at_once_and_drops_the_handler() {
    let (addr, c) = start(Default::default()).await;
    let t = Instant::now();
    let (status, _, body) = get_with(addr, "/slow", &[("keel-timeout", "150m")]).await;
    let took = t.elapsed();
    assert_eq!(status, 504, "{body}");
    assert!(
        took >= Duration::from_millis(140) && took < Duration::from_millis(150 + 750),
        "{took:?}"
    );
    assert_eq!(c.ran.load(Ordering::SeqCst), 1);
    assert_eq!(
        c.dropped.load(Ordering::SeqCst),
        1,
        "the handler future was dropped"
    );
}

#[tokio::test]
async fn route_maximum_caps_the_caller_and_applies_by_default() {
    let mut routes = std::collections::BTreeMap::new();
    routes.insert("/slow".to_string(), keel_config::Duration::from_millis(100));
    let (addr, c) = start(routes).await;
    // The caller asks for 10 s; the route allows 100 ms.
    let t = Instant::now();
    let (status, _, _) = get_with(addr, "/slow", &[("keel-timeout", "10S")]).await;
    assert_eq!(status, 504);
    assert!(t.elapsed() < Duration::from_millis(100 + 750));
    // Other routes get the 30 s default.
    let (status, _, body) = get_with(addr, "/run", &[]).await;
    assert_eq!(status, 200);
    let ms: u64 = body.trim_end_matches("ms").parse().unwrap();
    assert!(ms > 29_000 && ms <= 30_000, "{body}");
    assert_eq!(c.dropped.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn request_ids_are_kept_or_generated_and_always_echoed() {
    let (addr, _) = start(Default::default()).await;
    let (_, h, _) = get_with(addr, "/run", &[("x-request-id", "order-42")]).await;
    assert_eq!(h["x-request-id"], "order-42");
    let (_, h1, _) = get_with(addr, "/run", &[]).await;
    let (_, h2, _) = get_with(addr, "/run", &[("x-request-id", "bad id with spaces")]).await;
    let (g1, g2) = (
        h1["x-request-id"].to_str().unwrap(),
        h2["x-request-id"].to_str().unwrap(),
    );
    assert_eq!(g1.len(), 32);
    assert_ne!(g1, g2);
    assert_ne!(g2, "bad id with spaces");
    // Refusals carry it too, so a client can report which request failed.
    let (status, h, _) = get_with(
        addr,
        "/run",
        &[("x-request-id", "r-7"), ("keel-timeout", "x")],
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(h["x-request-id"], "r-7");
}

#[tokio::test]
async fn grpc_callers_get_grpc_statuses() {
    let (addr, c) = start(Default::default()).await;
    let client = ts::h2c_client();
    for (timeout, code) in [("bogus", "3"), ("0n", "4")] {
        let req = http::Request::post(format!("http://{addr}/grpc"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("grpc-timeout", timeout)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(
            resp.status(),
            200,
            "gRPC errors travel as HTTP 200 + grpc-status"
        );
        assert_eq!(resp.headers()["grpc-status"], code, "{timeout}");
        if code == "3" {
            let msg = resp.headers()["grpc-message"].to_str().unwrap();
            assert!(msg.contains("grpc-timeout"), "{msg}");
        }
    }
    assert_eq!(c.ran.load(Ordering::SeqCst), 0);
}
