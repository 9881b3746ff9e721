//! `/metrics` on the admin port: RED per route template, long polls, runtime and client
//! families; the output passes `promtool check metrics`, and a real Prometheus server scrapes
//! it and answers a PromQL query for the requests this test made.
//! (`scripts/test.sh` installs Debian's `prometheus` package, which brings `promtool`.)
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use keel::{App, Context, Sources};
use keel_test_support as ts;

async fn get_text(url: String) -> (u16, String) {
    let req = http::Request::get(url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = ts::http1_client().request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn start() -> (SocketAddr, SocketAddr) {
    let router = Router::new()
        .route(
            "/items/{id}",
            get(|ctx: Context| async move { format!("{}\n", ctx.request_id()) }),
        )
        .route(
            "/block",
            get(|| async {
                // Blocking code in async: holds the worker thread for 50 ms.
                std::thread::sleep(Duration::from_millis(50));
                "blocked\n"
            }),
        );
    let addr = ts::free_addr();
    let admin = ts::free_addr();
    let env = vec![
        ("KEEL_SERVER__ADDR".to_string(), addr.to_string()),
        ("KEEL_ADMIN__ADDR".to_string(), admin.to_string()),
    ];
    let loaded = Sources::default().load_with_env(env).unwrap();
    let sizing = keel::runtime::detect(&loaded.value.runtime);
    let app = App::new("metrics", loaded, sizing);
    // A consumer's and an outbox's counters, as the messaging transports keep them.
    let consumer = Arc::new(keel::messaging::transport::ConsumerStats::default());
    consumer.applied.store(7, Ordering::Relaxed);
    consumer.duplicates.store(2, Ordering::Relaxed);
    consumer.lag.store(5, Ordering::Relaxed);
    app.observe_consumer("ledger", consumer);
    let outbox = Arc::new(keel::messaging::transport::StoreStats::default());
    outbox.backlog.store(3, Ordering::Relaxed);
    app.observe_store("orders", outbox);
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

fn sample(text: &str, line_prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_valid_and_scraped_by_a_real_prometheus() {
    let (addr, admin) = start().await;
    for i in 0..25 {
        let (status, _) = get_text(format!("http://{addr}/items/{i}")).await;
        assert_eq!(status, 200);
    }
    let (status, _) = get_text(format!("http://{addr}/block")).await;
    assert_eq!(status, 200);
    let (status, _) = get_text(format!("http://{addr}/missing")).await;
    assert_eq!(status, 404);

    let (status, text) = get_text(format!("http://{admin}/metrics")).await;
    assert_eq!(status, 200);
    // RED by route template (the router's label layer recorded the matched route).
    assert_eq!(
        sample(
            &text,
            "keel_server_requests_total{route=\"/items/{id}\",method=\"GET\",class=\"2xx\"}"
        ),
        Some(25.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "keel_server_request_duration_seconds_count{route=\"/items/{id}\",method=\"GET\"}"
        ),
        Some(25.0)
    );
    assert_eq!(
        sample(
            &text,
            "keel_server_requests_total{route=\"unmatched\",method=\"GET\",class=\"4xx\"}"
        ),
        Some(1.0)
    );
    // The blocking handler held its worker: a long poll on its route.
    assert!(
        sample(&text, "keel_runtime_long_polls_total{route=\"/block\"}").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    assert!(sample(&text, "keel_runtime_workers").is_some(), "{text}");
    assert!(sample(&text, "keel_server_connections_accepted_total").is_some());
    assert!(text.contains("# TYPE keel_tasks_live gauge"));
    // Messaging: consumer counters and lag, outbox backlog.
    assert_eq!(
        sample(
            &text,
            "keel_messaging_consumer_applied_total{consumer=\"ledger\"}"
        ),
        Some(7.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "keel_messaging_consumer_duplicates_total{consumer=\"ledger\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "keel_messaging_consumer_lag{consumer=\"ledger\"}"),
        Some(5.0)
    );
    assert_eq!(
        sample(&text, "keel_messaging_outbox_backlog{store=\"orders\"}"),
        Some(3.0)
    );

    // promtool's linter accepts the exposition.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, &text).unwrap();
    let check = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("promtool check metrics < {}", file.display()))
        .output()
        .expect("promtool (Debian package `prometheus`; scripts/test.sh installs it)");
    assert!(
        check.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // A real Prometheus scrapes the admin port and answers PromQL over what it stored.
    let prom = ts::free_addr();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: keel\n    static_configs:\n      - targets: ['{admin}']\n"
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let _prometheus = ts::ChildGuard::spawn_logged(
        "prometheus",
        &[
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", data.display()),
            &format!("--web.listen-address={prom}"),
        ],
        &[],
        &dir.path().join("prometheus.log"),
    );
    let query = "sum(keel_server_requests_total%7Broute%3D%22%2Fitems%2F%7Bid%7D%22%7D)";
    let mut answer = String::new();
    for _ in 0..300 {
        if ts::port_open(prom) {
            let (status, body) =
                get_text(format!("http://{prom}/api/v1/query?query={query}")).await;
            if status == 200 && body.contains("\"value\"") {
                answer = body;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        answer.contains("\"25\""),
        "Prometheus did not return the 25 requests: {answer:?}\nlog: {}",
        std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
    );
}
