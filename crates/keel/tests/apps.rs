//! Two services in one process stay apart (each `App` owns its observer, metrics, tracer and
//! task registry), and every handler is labelled by its route template whether or not it
//! takes a `Context`.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use keel::{App, Sources};
use keel_test_support as ts;
use keel_test_support::otlp::OtlpReceiver;

async fn get_text(url: String, traceparent: Option<&str>) -> (u16, String) {
    let mut req = http::Request::get(url);
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    let req = req.body(Full::new(Bytes::new())).unwrap();
    let resp = ts::http1_client().request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Start `name` serving `router` with `config` (TOML) added; returns its main and admin
/// addresses.
async fn start<S, B>(name: &str, router: S, config: &str) -> (SocketAddr, SocketAddr)
where
    S: tower::Service<http::Request<keel::RequestBody>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Error: Into<keel::BoxError>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<keel::BoxError>,
{
    let dir = tempfile::tempdir().unwrap();
    let (addr, admin) = (ts::free_addr(), ts::free_addr());
    let file = dir.path().join(format!("{name}.toml"));
    std::fs::write(
        &file,
        format!("[server]\naddr = \"{addr}\"\n[admin]\naddr = \"{admin}\"\n{config}"),
    )
    .unwrap();
    let loaded = Sources {
        file: Some(file),
        sets: vec![],
    }
    .load_with_env(Vec::new())
    .unwrap();
    let sizing = keel::runtime::detect(&loaded.value.runtime);
    let app = App::new(name, loaded, sizing);
    tokio::spawn(app.serve_until(router, std::future::pending(), std::future::pending()));
    let up = tokio::task::spawn_blocking(move || {
        ts::wait_until(Duration::from_secs(10), || {
            ts::port_open(addr) && ts::port_open(admin)
        })
    })
    .await
    .unwrap();
    assert!(up);
    (addr, admin)
}

/// The value of the sample whose line starts with `prefix`.
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Handlers that never look at the request's `Context`.
fn routes(word: &'static str) -> Router {
    Router::new()
        .route("/users/{id}", get(move || async move { word }))
        .route("/hello", get(move || async move { word }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_apps_in_one_process_keep_their_own_metrics_and_service_names() {
    let receiver = OtlpReceiver::start_grpc().await;
    let tracing = format!(
        "[tracing]\nendpoint = \"{}\"\nexport_interval = \"100ms\"\n",
        receiver.endpoint()
    );
    let (alpha, alpha_admin) = start("alpha", routes("alpha"), &tracing).await;
    let (beta, beta_admin) = start("beta", routes("beta"), &tracing).await;

    let accepted = "keel_server_connections_accepted_total";
    let (_, a0) = get_text(format!("http://{alpha_admin}/metrics"), None).await;
    let (_, b0) = get_text(format!("http://{beta_admin}/metrics"), None).await;
    let alpha_trace = "0af7651916cd43dd8448eb211c80319c";
    let beta_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    for i in 0..3 {
        let tp = format!("00-{alpha_trace}-b7ad6b716920333{i}-01");
        assert_eq!(
            get_text(format!("http://{alpha}/users/{i}"), Some(&tp)).await,
            (200, "alpha".into())
        );
    }
    for i in 0..5 {
        let tp = format!("00-{beta_trace}-00f067aa0ba902b{i}-01");
        assert_eq!(
            get_text(format!("http://{beta}/hello"), Some(&tp)).await,
            (200, "beta".into())
        );
    }

    let users = "keel_server_requests_total{route=\"/users/{id}\",method=\"GET\",class=\"2xx\"}";
    let hello = "keel_server_requests_total{route=\"/hello\",method=\"GET\",class=\"2xx\"}";
    let (_, a) = get_text(format!("http://{alpha_admin}/metrics"), None).await;
    let (_, b) = get_text(format!("http://{beta_admin}/metrics"), None).await;
    assert_eq!(sample(&a, users), Some(3.0), "{a}");
    assert_eq!(sample(&a, hello), None, "{a}");
    assert_eq!(sample(&b, hello), Some(5.0), "{b}");
    assert_eq!(sample(&b, users), None, "{b}");
    // Each server's own connection counters, not the first app's: one new connection per
    // request above (every `get_text` is a new client).
    let grew = |before: &str, after: &str| {
        sample(after, accepted).unwrap_or(0.0) - sample(before, accepted).unwrap_or(0.0)
    };
    assert_eq!(grew(&a0, &a), 3.0, "{a}");
    assert_eq!(grew(&b0, &b), 5.0, "{b}");

    // Every span carries its own service's name.
    receiver.wait_for(8, Duration::from_secs(10)).await;
    assert_eq!(receiver.resources_of_trace(alpha_trace), ["alpha"]);
    assert_eq!(receiver.resources_of_trace(beta_trace), ["beta"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_ids_on_one_template_make_one_series_and_strays_share_unmatched() {
    // A plain axum router: labelled by the route layer `App::serve` puts on it.
    let (addr, admin) = start("labels", routes("x"), "").await;
    let text = ten_thousand_ids_and_strays(addr, admin).await;
    assert_eq!(requests_series(&text), [USERS_10K, STRAYS], "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_router_labels_by_its_own_templates_and_a_merged_plain_router_by_its_layer() {
    // `keel::Router` matches `/users/{id}` itself; `/hello` comes from a plain axum router
    // merged into it, labelled by the route layer.
    let router = keel::Router::new()
        .route("/users/{id}", get(|| async { "x" }))
        .merge(Router::new().route("/hello", get(|| async { "x" })));
    assert_eq!(router.templates().collect::<Vec<_>>(), ["/users/{id}"]);
    let (addr, admin) = start("keel-router", router, "").await;
    for _ in 0..3 {
        assert_eq!(
            get_text(format!("http://{addr}/hello"), None).await,
            (200, "x".into())
        );
    }
    let text = ten_thousand_ids_and_strays(addr, admin).await;
    let hello = "keel_server_requests_total{route=\"/hello\",method=\"GET\",class=\"2xx\"} 3";
    assert_eq!(requests_series(&text), [hello, USERS_10K, STRAYS], "{text}");
}

const USERS_10K: &str =
    "keel_server_requests_total{route=\"/users/{id}\",method=\"GET\",class=\"2xx\"} 10000";
const STRAYS: &str =
    "keel_server_requests_total{route=\"unmatched\",method=\"GET\",class=\"4xx\"} 3";

/// 10,000 distinct user ids on `/users/{id}` (all answered 200) and three paths no route
/// matches (404); returns the service's `/metrics` afterwards.
async fn ten_thousand_ids_and_strays(addr: SocketAddr, admin: SocketAddr) -> String {
    let client = ts::http1_client();
    let mut tasks = tokio::task::JoinSet::new();
    for lane in 0..8u32 {
        let client = client.clone();
        tasks.spawn(async move {
            for i in 0..1250u32 {
                let id = lane * 1250 + i;
                let req = http::Request::get(format!("http://{addr}/users/usr_{id}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let resp = client.request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                resp.into_body().collect().await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    for path in ["/nope", "/users", "/admin/../etc"] {
        assert_eq!(get_text(format!("http://{addr}{path}"), None).await.0, 404);
    }
    get_text(format!("http://{admin}/metrics"), None).await.1
}

/// The `keel_server_requests_total` samples of a `/metrics` text, sorted.
fn requests_series(text: &str) -> Vec<&str> {
    let mut series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("keel_server_requests_total{"))
        .collect();
    series.sort_unstable();
    series
}
