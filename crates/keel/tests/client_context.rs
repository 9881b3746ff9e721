//! What an App's clients put on the wire, checked at a real upstream that records the
//! headers it receives: `[propagation]` (margin, B3 form) reaches every client the App builds;
//! a handler's context reaches the upstream through a generated tonic client even from a task
//! that has lost the task-local one; a call with no context shows in `/metrics`.
#![allow(clippy::unwrap_used)]

mod apps_from_config;

use std::sync::Arc;
use std::time::Duration;

use apps_from_config::app_from;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Full};
use keel::client::client::{Client, Service, tonic_request};
use keel::{App, Context};
use keel_test_support::{self as ts, recorder::HeaderRecorder};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).map(|v| v.to_str().unwrap())
}

fn sent_timeout(h: &HeaderMap, name: &'static str) -> Duration {
    keel::codec::timeout::parse(name, h.get(name).unwrap().as_bytes()).unwrap()
}

/// One call from `app`'s client `up` with `ctx`; the headers the upstream received, and the
/// time `ctx` had left just before and just after the call.
async fn send(
    app: &App,
    ctx: &Context,
    upstream: &HeaderRecorder,
) -> (HeaderMap, Duration, Duration) {
    let client = app.client("up").unwrap();
    let req = http::Request::get("/").body(Bytes::new()).unwrap();
    let before = ctx.remaining();
    let resp = client.call(ctx, req).await.unwrap();
    let after = ctx.remaining();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    (upstream.last(), before, after)
}

/// The sent timeout is the remaining time minus exactly `margin`: no more than what was left
/// before the call, no less than what was left after it (plus the encoder's rounding down).
fn assert_margin(h: &HeaderMap, before: Duration, after: Duration, margin: Duration) {
    let sent = sent_timeout(h, "keel-timeout");
    assert!(
        sent <= before - margin,
        "sent {sent:?} with {before:?} left: more than remaining − {margin:?}"
    );
    assert!(
        sent + Duration::from_millis(1) >= after - margin,
        "sent {sent:?}, still {after:?} left after the call: less than remaining − {margin:?}"
    );
}

#[tokio::test]
async fn propagation_settings_change_what_an_apps_client_sends() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = HeaderRecorder::start().await;
    let clients = format!("[clients.up]\nendpoints = [\"{}\"]\n", upstream.addr());
    let default = app_from(&clients, dir.path());
    let tuned = app_from(
        &format!("[propagation]\nmargin = \"20ms\"\nb3 = \"multi\"\n{clients}"),
        dir.path(),
    );
    let ctx = Context::background(Duration::from_secs(10));
    let trace_id = ctx.trace().trace_id.to_string();

    // Defaults: 5 ms margin, the B3 single header.
    let (h, before, after) = send(&default, &ctx, &upstream).await;
    assert_margin(&h, before, after, Duration::from_millis(5));
    assert!(header(&h, "b3").unwrap().starts_with(&trace_id), "{h:?}");
    assert_eq!(header(&h, "x-b3-traceid"), None, "{h:?}");

    // `margin = "20ms"`, `b3 = "multi"`: 20 ms kept off the remaining time, and the X-B3-*
    // headers instead of `b3`; W3C trace context is sent either way.
    let (h, before, after) = send(&tuned, &ctx, &upstream).await;
    assert_margin(&h, before, after, Duration::from_millis(20));
    assert_eq!(header(&h, "x-b3-traceid"), Some(trace_id.as_str()), "{h:?}");
    assert!(header(&h, "x-b3-spanid").is_some(), "{h:?}");
    assert!(header(&h, "x-b3-sampled").is_some(), "{h:?}");
    assert_eq!(header(&h, "b3"), None, "{h:?}");
    assert!(
        header(&h, "traceparent").unwrap().contains(&trace_id),
        "{h:?}"
    );
}

struct Upstreams {
    http: Arc<Client>,
    grpc: Arc<Client>,
}

/// `/http` calls the upstream with the handler's context as an argument. `/grpc` calls it
/// through a generated tonic client from a plain `tokio::spawn` — where the task-local
/// context is gone — with the context in the tonic request.
fn router(upstreams: Upstreams) -> Router {
    Router::new()
        .route(
            "/http",
            get(|State(u): State<Arc<Upstreams>>, ctx: Context| async move {
                let req = http::Request::get("/").body(Bytes::new()).unwrap();
                let resp = u.http.call(&ctx, req).await.unwrap();
                resp.into_body().collect().await.unwrap();
                "called\n"
            }),
        )
        .route(
            "/grpc",
            get(|State(u): State<Arc<Upstreams>>, ctx: Context| async move {
                let mut health = HealthClient::new(Service::new(u.grpc.clone()));
                let call = tonic_request(&ctx, HealthCheckRequest::default());
                let answer = tokio::spawn(async move { health.check(call).await })
                    .await
                    .unwrap();
                // The recorder answers UNIMPLEMENTED: what it received is what counts.
                assert_eq!(answer.unwrap_err().code(), tonic::Code::Unimplemented);
                "called\n"
            }),
        )
        .with_state(Arc::new(upstreams))
}

async fn get_text(url: String, headers: &[(&str, &str)]) -> (u16, String) {
    let mut req = http::Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::new())).unwrap();
    let resp = ts::http1_client().request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn a_handlers_context_reaches_the_upstream_and_a_call_without_one_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = HeaderRecorder::start().await;
    let (addr, admin) = (ts::free_addr(), ts::free_addr());
    let up = upstream.addr();
    let app = app_from(
        &format!(
            "[server]\naddr = \"{addr}\"\n[admin]\naddr = \"{admin}\"\n\
             [clients.up]\nendpoints = [\"{up}\"]\n\
             [clients.grpc]\nendpoints = [\"{up}\"]\nprotocol = \"h2c\"\n"
        ),
        dir.path(),
    );
    let http_client = app.client("up").unwrap();
    let upstreams = Upstreams {
        http: http_client.clone(),
        grpc: app.client("grpc").unwrap(),
    };
    tokio::spawn(app.serve_until(
        router(upstreams),
        std::future::pending(),
        std::future::pending(),
    ));
    let ready = tokio::task::spawn_blocking(move || {
        ts::wait_until(Duration::from_secs(10), || {
            ts::port_open(addr) && ts::port_open(admin)
        })
    })
    .await
    .unwrap();
    assert!(ready, "service did not start");

    // The caller allows 2 s: each hop receives less than that, minus the margin, and the
    // caller's trace — not the 30 s and new trace of a call without context.
    let inbound = [
        ("traceparent", &*format!("00-{TRACE}-00f067aa0ba902b7-01")),
        ("keel-timeout", "2S"),
    ];
    let ceiling = Duration::from_secs(2) - Duration::from_millis(5);
    for (path, timeout_header) in [("/http", "keel-timeout"), ("/grpc", "grpc-timeout")] {
        let (status, body) = get_text(format!("http://{addr}{path}"), &inbound).await;
        assert_eq!(status, 200, "{path}: {body}");
        let h = upstream.last();
        let sent = sent_timeout(&h, timeout_header);
        assert!(sent > Duration::ZERO && sent <= ceiling, "{path}: {sent:?}");
        let tp = header(&h, "traceparent").unwrap();
        assert!(tp.starts_with(&format!("00-{TRACE}-")), "{path}: {tp}");
    }

    // No context at all: still sent, but counted per upstream in /metrics.
    let c = http_client.clone();
    tokio::spawn(async move {
        let req = http::Request::get("/").body(Bytes::new()).unwrap();
        c.request(req).await.unwrap().into_body().collect().await
    })
    .await
    .unwrap()
    .unwrap();
    let (status, metrics) = get_text(format!("http://{admin}/metrics"), &[]).await;
    assert_eq!(status, 200);
    let without = |up: &str| {
        sample(
            &metrics,
            &format!("keel_client_calls_without_context_total{{upstream=\"{up}\"}}"),
        )
    };
    assert_eq!(without("up"), Some(1.0), "{metrics}");
    assert_eq!(without("grpc"), Some(0.0), "{metrics}");
    assert_eq!(
        sample(&metrics, "keel_client_calls_total{upstream=\"up\"}"),
        Some(2.0)
    );
}
