//! The example service's routes, kept in a library so tests and `keel demo` can mount them.
//!
//! - `GET /` → 200 `hello from keel`
//! - `GET /slow?ms=N` → waits N ms (at most 60 000), then 200
//! - `GET /cpu?us=N` → burns N µs of CPU on the worker (at most 1 000 000), then 200 — for
//!   overload tests
//! - `POST /echo` → 200 with the request body (bounded by `server.max_body_bytes`)
//! - `GET /context` → the request's `keel::Context`: request id, remaining deadline, trace id,
//!   parent span, colour (try `-H 'keel-timeout: 2S' -H 'baggage: keel-color=canary'`)
//! - gRPC `grpc.health.v1.Health/Check` on the same port, serving while the process runs

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::Query;
use axum::routing::{get, post};
use keel::Router;
use serde::Deserialize;

#[derive(Deserialize)]
struct Ms {
    ms: Option<u64>,
}

#[derive(Deserialize)]
struct Us {
    us: Option<u64>,
}

/// The HTTP and gRPC routes of the example service.
pub fn routes() -> Router {
    let (reporter, health) = tonic_health::server::health_reporter();
    // The overall service ("") reports SERVING; Keel's readiness gates traffic via /readyz.
    drop(reporter);
    Router::new()
        .route("/", get(|| async { "hello from keel\n" }))
        .route("/slow", get(slow))
        .route("/cpu", get(cpu))
        .route("/echo", post(|body: Bytes| async move { body }))
        .route("/context", get(context))
        .grpc_service(health)
}

async fn context(ctx: keel::Context) -> String {
    let t = ctx.trace();
    format!(
        "request_id={}\nremaining_ms={}\ntrace_id={}\nparent_span_id={}\nspan_id={}\ncolor={}\nretry={}\n",
        ctx.request_id(),
        ctx.remaining().as_millis(),
        t.trace_id,
        t.parent_span_id
            .map(|s| s.to_string())
            .unwrap_or_else(|| "-".into()),
        t.span_id,
        ctx.color().unwrap_or("-"),
        ctx.is_retry(),
    )
}

async fn slow(Query(q): Query<Ms>) -> String {
    let ms = q.ms.unwrap_or(100).min(60_000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    format!("slept {ms}ms\n")
}

async fn cpu(Query(q): Query<Us>) -> String {
    let us = q.us.unwrap_or(100).min(1_000_000);
    let start = Instant::now();
    let budget = Duration::from_micros(us);
    let mut x: u64 = 0;
    // Deliberately on the worker thread: this endpoint exists to create CPU load.
    while start.elapsed() < budget {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        std::hint::black_box(x);
    }
    format!("burned {us}us\n")
}
