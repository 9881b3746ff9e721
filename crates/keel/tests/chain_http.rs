//! A → B → C over HTTP with `keel-timeout`: see `common` for what is checked.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::Full;
use keel_test_support as ts;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_chain_propagates_remaining_deadline_and_cancels_every_hop() {
    let c = Hop::new(None, false);
    let c_addr = start(
        Router::new()
            .route("/hop", get(http_hop))
            .with_state(c.clone()),
    )
    .await;
    let b = Hop::new(Some(c_addr), true);
    let b_addr = start(
        Router::new()
            .route("/hop", get(http_hop))
            .with_state(b.clone()),
    )
    .await;
    let a = Hop::new(Some(b_addr), false);
    let a_addr = start(
        Router::new()
            .route("/hop", get(http_hop))
            .with_state(a.clone()),
    )
    .await;
    for hop in [&a, &b] {
        hop.warm().await;
    }
    let live_before = live_tasks();

    let request_id = "chain-http-1";
    let mut req = http::Request::get(format!("http://{a_addr}/hop"));
    req = req.header("keel-timeout", "500m");
    for (k, v) in inbound_headers(request_id) {
        req = req.header(k, v);
    }
    let started = Instant::now();
    let resp = ts::http1_client()
        .request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(resp.headers()["x-request-id"], request_id);
    assert!(
        took >= Duration::from_millis(450),
        "answered long before the deadline: {took:?}"
    );
    assert!(
        took < Duration::from_millis(500 + 750),
        "504 not within the deadline plus a margin: {took:?}"
    );

    check_chain([&a, &b, &c], request_id, live_before).await;
}
