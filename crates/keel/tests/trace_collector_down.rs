//! With the OTLP collector down, requests still succeed; spans beyond the bounded queue are
//! dropped and counted in `/metrics`, and the queue never grows past its capacity.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use keel::{App, Context, Sources};
use keel_test_support as ts;

fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_costs_spans_not_requests_or_memory() {
    let (addr, admin, dead) = (ts::free_addr(), ts::free_addr(), ts::free_addr());
    let env = vec![
        ("KEEL_SERVER__ADDR".to_string(), addr.to_string()),
        ("KEEL_ADMIN__ADDR".to_string(), admin.to_string()),
        (
            "KEEL_TRACING__ENDPOINT".to_string(),
            format!("http://{dead}"),
        ),
        (
            "KEEL_TRACING__QUEUE_CAPACITY".to_string(),
            "100".to_string(),
        ),
        (
            "KEEL_TRACING__EXPORT_INTERVAL".to_string(),
            "50ms".to_string(),
        ),
    ];
    let loaded = Sources::default().load_with_env(env).unwrap();
    let sizing = keel::runtime::detect(&loaded.value.runtime);
    let app = App::new("dead-collector", loaded, sizing);
    let router = Router::new().route("/", get(|_ctx: Context| async { "ok\n" }));
    tokio::spawn(app.serve_until(router, std::future::pending(), std::future::pending()));
    assert!(
        tokio::task::spawn_blocking(move || ts::wait_until(Duration::from_secs(10), || {
            ts::port_open(addr) && ts::port_open(admin)
        }))
        .await
        .unwrap()
    );

    let client = ts::http1_client();
    let requests = 3000;
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for i in 0..(requests / 4) as u64 {
                let req = http::Request::get(format!("http://{addr}/"))
                    // Sampled: every request makes a span for the dead collector.
                    .header(
                        "traceparent",
                        format!("00-{:032x}-{:016x}-01", (w << 32) + i + 1, i + 1),
                    )
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let resp = client.request(req).await.unwrap();
                if resp.status() == 200 {
                    ok += 1;
                }
                resp.into_body().collect().await.unwrap();
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    assert_eq!(ok, requests, "every request succeeded");

    let (status, text) = ts::get(&client, &format!("http://{admin}/metrics"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let dropped = sample(&text, "keel_trace_spans_dropped_total");
    let queued = sample(&text, "keel_trace_spans_queued");
    let failed = sample(&text, "keel_trace_spans_failed_total");
    assert!(dropped > 0.0, "spans beyond the queue were dropped: {text}");
    assert!(
        queued <= 100.0,
        "the queue stayed within its capacity: {queued}"
    );
    assert_eq!(sample(&text, "keel_trace_spans_exported_total"), 0.0);
    // Every span is accounted for: dropped on arrival, lost with a failed export, or still
    // waiting.
    assert!(dropped + failed + queued <= requests as f64 + 0.5);
    let mut errors = 0.0;
    for _ in 0..100 {
        let (_, text) = ts::get(&client, &format!("http://{admin}/metrics"))
            .await
            .unwrap();
        errors = sample(&text, "keel_trace_export_errors_total");
        if errors > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        errors > 0.0,
        "exports to the dead collector failed and were counted"
    );
}
