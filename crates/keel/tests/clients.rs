//! `app.client(name)`: built from `[clients.<name>]`, shared, and a clear error for a typo.
#![allow(clippy::unwrap_used)]

mod apps_from_config;

use std::sync::Arc;
use std::time::Duration;

use apps_from_config::{app_from, start};
use keel::{App, Error, Sources};
use keel_test_support as ts;

#[test]
fn clients_come_from_config_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keel.toml");
    std::fs::write(
        &file,
        "[clients.inventory]\nendpoints = [\"127.0.0.1:7001\"]\nprotocol = \"h2c\"\n",
    )
    .unwrap();
    let sources = Sources {
        file: Some(file),
        sets: vec![],
    };
    let loaded = sources.load_with_env(Vec::new()).unwrap();
    let sizing = keel::runtime::detect(&loaded.value.runtime);
    let app = App::new("t", loaded, sizing);

    let a = app.client("inventory").unwrap();
    let b = app.client("inventory").unwrap();
    assert!(Arc::ptr_eq(&a, &b), "one client per upstream, shared");

    let err = app.client("inventroy").unwrap_err();
    assert!(matches!(err, Error::UnknownClient(..)));
    let msg = err.to_string();
    assert!(
        msg.contains("inventroy") && msg.contains("inventory"),
        "{msg}"
    );
}

#[tokio::test]
async fn debug_clients_reports_each_upstreams_pool_and_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (up, up_admin) = (ts::free_addr(), ts::free_addr());
    let upstream = app_from(
        &format!("[server]\naddr = \"{up}\"\n[admin]\naddr = \"{up_admin}\"\n"),
        dir.path(),
    );
    start(
        upstream,
        axum::Router::new().route("/", axum::routing::get(|| async { "ok" })),
        &[up],
    )
    .await;

    let (edge, admin) = (ts::free_addr(), ts::free_addr());
    let app = app_from(
        &format!(
            "[server]\naddr = \"{edge}\"\n[admin]\naddr = \"{admin}\"\n\
             [clients.up]\nendpoints = [\"{up}\"]\n"
        ),
        dir.path(),
    );
    let client = app.client("up").unwrap();
    start(app, axum::Router::new(), &[edge, admin]).await;
    // No request started these calls: the test says so.
    let ctx = keel::Context::background(Duration::from_secs(10));
    for _ in 0..20 {
        let resp = client
            .call(
                &ctx,
                http::Request::get("/").body(bytes::Bytes::new()).unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
    }

    let req = http::Request::get(format!("http://{admin}/debug/clients"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = ts::http1_client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    eprintln!("/debug/clients: {}", String::from_utf8_lossy(&body));
    let c = &v[0];
    assert_eq!(c["name"], "up", "{v}");
    assert_eq!(c["calls"], 20, "{v}");
    assert_eq!(c["connects"], 1, "{v}");
    assert_eq!(c["reuse_ratio"], 0.95, "{v}");
    // Counted from /proc/net/tcp (its logic has tests of its own); the port may have been
    // used by an earlier test, so only its presence is checked here.
    assert!(c["time_wait"].is_u64(), "{v}");
    assert_eq!(c["breaker"]["accepts"], 20, "{v}");
    let ep = &c["endpoints"][0];
    assert_eq!(ep["addr"], up.to_string(), "{v}");
    assert_eq!(ep["requests"], 20, "{v}");
    assert_eq!(ep["idle"], 1, "{v}");
    assert_eq!(ep["ejected"], false, "{v}");
}
