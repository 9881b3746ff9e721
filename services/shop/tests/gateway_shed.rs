//! The gateway in front of an upstream that sheds everything it is sent (503 with
//! `Retry-After`, as Keel's overload control answers): what reached the upstream comes back
//! as the upstream said it, and once the cluster's breaker sheds calls itself, those are
//! overloads too — 503 with `Retry-After` — never a bare failure a caller would read as the
//! gateway being broken.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use keel_shop::gateway::{self, Settings};

mod support;

use support::{Gateway, recording_upstream};

/// An upstream that answers every request 503 with `Retry-After: 7`, counting them.
async fn shedding_upstream() -> (SocketAddr, Arc<AtomicU64>) {
    let hits = Arc::new(AtomicU64::new(0));
    let counted = hits.clone();
    let app = Router::new().fallback(move || {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            (
                http::StatusCode::SERVICE_UNAVAILABLE,
                [(http::header::RETRY_AFTER, "7")],
                "overloaded (queue_delay); retry later\n",
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, hits)
}

/// The value of `name` in a raw HTTP/1 answer's head.
fn header<'a>(raw: &'a str, name: &str) -> Option<&'a str> {
    let head = raw.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shedding_upstream_and_the_breaker_that_spares_it_both_answer_503_with_retry_after() {
    let (users, _) = recording_upstream().await;
    let (orders, _) = recording_upstream().await;
    let (inventory, hits) = shedding_upstream().await;
    let settings = gateway::settings(
        &Settings::default(),
        gateway::DEMO_KEYS,
        1_000_000.0,
        1_000_000.0,
    );
    let gw = Gateway::start(settings, [users, orders, inventory]).await;

    const SENT: usize = 60;
    let (mut from_upstream, mut from_breaker) = (0, 0);
    for _ in 0..SENT {
        let addr = gw.addr;
        let raw = tokio::task::spawn_blocking(move || {
            keel_test_support::raw_exchange(
                addr,
                b"GET /api/inventory/sku-1 HTTP/1.1\r\nhost: x\r\nx-api-key: reader-secret-key\r\n\
                  connection: close\r\n\r\n",
                Duration::from_secs(5),
            )
        })
        .await
        .unwrap()
        .unwrap();
        let raw = String::from_utf8_lossy(&raw).into_owned();
        assert_eq!(
            keel_test_support::status_of(raw.as_bytes()),
            Some(503),
            "{raw}"
        );
        match header(&raw, "retry-after") {
            // The upstream's own answer, passed on as it came.
            Some("7") => from_upstream += 1,
            // Shed by the gateway's breaker, without calling the upstream.
            Some("1") => {
                assert!(raw.contains("inventory overloaded; retry later"), "{raw}");
                from_breaker += 1;
            }
            other => panic!("a 503 without the Retry-After expected ({other:?}): {raw}"),
        }
    }
    gw.stop().await;
    // The breaker needs 20 calls of evidence, then sheds up to nine in ten: some calls must
    // have been shed locally, and everything else reached the upstream (retries included,
    // hence "at least").
    assert_eq!(from_upstream + from_breaker, SENT);
    assert!(from_breaker > 0, "the breaker never shed");
    assert!(from_upstream >= 20, "{from_upstream} reached the upstream");
    assert!(
        hits.load(Ordering::SeqCst) >= from_upstream as u64,
        "every 503 with the upstream's Retry-After came from the upstream"
    );
}
