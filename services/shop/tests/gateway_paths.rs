//! The gateway at the edge, end to end — its path safety, forwarding headers and shared rate
//! limit. Path safety: a corpus of hostile request targets, sent as raw
//! bytes (an HTTP client would clean them up first), through the real gateway to recording
//! upstreams. A key scoped to `inventory:read` must reach nothing but inventory's `/stock`
//! paths, and the upstream must never find a dot-segment or a separator the gateway did
//! not see.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use keel_shop::gateway::{self, Settings};

mod support;

use support::{Gateway, Seen, recording_upstream};

const INVENTORY_ONLY: &str = "inventory-only-key";

/// The segments an upstream that percent-decodes the path once acts on.
fn decoded_segments(path: &str) -> Vec<Vec<u8>> {
    let bytes = keel::codec::percent::decode(path.as_bytes(), Default::default()).unwrap();
    bytes.split(|&b| b == b'/').map(<[u8]>::to_vec).collect()
}

/// What follows a route prefix in the corpus: dot-segments plain, escaped, double-escaped and
/// overlong; escaped and backslash separators; parameters; control bytes; bad escapes.
const TAILS: &[&str] = &[
    "sku-1",
    "..",
    "../",
    "../users/usr_1",
    "../../admin",
    "../../../../etc/passwd",
    "./../users/usr_1",
    "sku-1/../../users/usr_1",
    "sku-1/../sku-2",
    "sku-1/.",
    "sku-1/./..",
    "..%2f..%2fadmin",
    "..%2F..%2Fusers",
    "%2e%2e/%2e%2e/admin",
    "%2E%2E%2Fadmin",
    ".%2e/users/usr_1",
    "%2e./users/usr_1",
    "%2e/users",
    "%252e%252e/%252e%252e/admin",
    "%%32%65%%32%65/admin",
    "..;/users/usr_1",
    "..;x=1/users",
    ".;/users",
    "sku-1;/../../users",
    "..%5cadmin",
    "%5c..%5cusers",
    "..\\users",
    "%c0%ae%c0%ae/users",
    "%c0%af..%c0%afusers",
    "%e0%80%ae%e0%80%ae/users",
    "%f0%80%80%ae%f0%80%80%ae/users",
    "%u002e%u002e/users",
    "%00/../users",
    "sku%00",
    "%0d%0aX-Injected:%201",
    "%09",
    "%7f",
    "%",
    "%2",
    "%zz",
    "....//users",
    ".../users",
    "//users",
    "///../users",
    "sku-1?next=../../users",
    "%73ku-1",
    "%2e%2e%3b/users",
];

/// The ways a client might spell the route prefix `/api/inventory/`.
const PREFIXES: &[&str] = &[
    "/api/inventory/",
    "/api//inventory/",
    "/api/./inventory/",
    "/api/%69nventory/",
    "//api/inventory/",
    "/api/users/../inventory/",
];

/// The demo's keys and one that may only read inventory; no rate limit to speak of.
fn settings() -> Settings {
    gateway::settings(
        &Settings::default(),
        &format!("inv:{INVENTORY_ONLY}=inventory:read;{}", gateway::DEMO_KEYS),
        1_000_000.0,
        1_000_000.0,
    )
}

/// Send `request` (raw bytes) to `addr` and read the whole answer.
async fn exchange(addr: SocketAddr, request: String) -> Vec<u8> {
    tokio::task::spawn_blocking(move || {
        keel_test_support::raw_exchange(addr, request.as_bytes(), Duration::from_secs(5))
    })
    .await
    .unwrap()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_hostile_path_reaches_beyond_the_route_it_was_authorised_for() {
    let (users, users_seen) = recording_upstream().await;
    let (orders, orders_seen) = recording_upstream().await;
    let (inventory, inventory_seen) = recording_upstream().await;

    let gw = Gateway::start(settings(), [users, orders, inventory]).await;
    let addr = gw.addr;

    let send = |target: String| async move {
        let request = format!(
            "GET {target} HTTP/1.1\r\nhost: shop\r\nx-api-key: {INVENTORY_ONLY}\r\nconnection: close\r\n\r\n"
        );
        keel_test_support::status_of(&exchange(addr, request).await)
    };

    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut sent = 0;
    for prefix in PREFIXES {
        for tail in TAILS {
            let target = format!("{prefix}{tail}");
            let status = send(target.clone()).await;
            let status = status.unwrap_or_else(|| panic!("{target:?}: no HTTP answer"));
            assert!(
                status < 500,
                "{target:?}: answered {status}, a hostile path is the client's error"
            );
            *statuses.entry(status).or_default() += 1;
            sent += 1;
        }
    }

    // The key may read inventory only: nothing else was reached, however the path was spelled.
    let paths = |seen: &Seen| -> Vec<String> {
        seen.lock()
            .unwrap()
            .iter()
            .map(|(p, _)| p.clone())
            .collect()
    };
    assert_eq!(paths(&users_seen), Vec::<String>::new());
    assert_eq!(paths(&orders_seen), Vec::<String>::new());
    let reached = paths(&inventory_seen);
    assert!(!reached.is_empty(), "the clean paths must get through");
    for path in &reached {
        assert!(
            path == "/stock" || path.starts_with("/stock/"),
            "inventory was asked for {path:?}"
        );
        let segments = decoded_segments(path);
        for seg in &segments {
            let name = seg.split(|&b| b == b';').next().unwrap_or(seg);
            assert!(
                name != b"." && name != b"..",
                "after one decoding, {path:?} still holds a dot-segment"
            );
        }
        assert_eq!(
            segments.len(),
            path.split('/').count(),
            "decoding {path:?} made new separators"
        );
    }

    // And the answers were the right ones for a few that matter.
    for (target, want) in [
        ("/api/inventory/sku-1", 200),
        ("/api/%69nventory/sku-1", 200),
        // Normalised to /api/users/…: authorised as users, which this key may not read.
        ("/api/inventory/../users/usr_1", 403),
        ("/api/inventory/%2e%2e/%2e%2e/admin", 400),
        ("/api/inventory/..%2fusers", 400),
        ("/api/inventory/..;/users", 400),
        ("/api/../../admin", 400),
        ("/api/inventory/%c0%ae%c0%ae/users", 400),
    ] {
        assert_eq!(send(target.to_string()).await, Some(want), "{target}");
    }
    assert!(reached.iter().any(|p| p == "/stock/sku-1"), "{reached:?}");

    // An absolute-form target naming another host than Host is refused.
    let raw = tokio::task::spawn_blocking(move || {
        keel_test_support::raw_exchange(
            addr,
            format!(
                "GET http://elsewhere/api/inventory/sku-1 HTTP/1.1\r\nhost: shop\r\nx-api-key: {INVENTORY_ONLY}\r\nconnection: close\r\n\r\n"
            )
            .as_bytes(),
            Duration::from_secs(5),
        )
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(keel_test_support::status_of(&raw), Some(400));

    // Headers about this hop, credentials and identity stay here; the rest goes on.
    inventory_seen.lock().unwrap().clear();
    let raw = tokio::task::spawn_blocking(move || {
        keel_test_support::raw_exchange(
            addr,
            format!(
                "GET /api/inventory/sku-1 HTTP/1.1\r\nhost: shop\r\nx-api-key: {INVENTORY_ONLY}\r\n\
                 connection: close, x-this-hop\r\nx-this-hop: 1\r\nte: trailers\r\n\
                 keep-alive: timeout=5\r\nproxy-authorization: Basic eDp5\r\n\
                 x-shop-user: usr_admin\r\nx-shop-scopes: users:*\r\nx-end-to-end: kept\r\n\r\n"
            )
            .as_bytes(),
            Duration::from_secs(5),
        )
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(keel_test_support::status_of(&raw), Some(200));
    let (path, headers) = inventory_seen.lock().unwrap()[0].clone();
    assert_eq!(path, "/stock/sku-1");
    assert_eq!(headers["x-end-to-end"], "kept");
    assert_eq!(headers["x-shop-key"], "inv");
    assert_eq!(headers["x-shop-scopes"], "inventory:read");
    for gone in [
        "x-this-hop",
        "te",
        "keep-alive",
        "proxy-authorization",
        "x-shop-user",
        "x-api-key",
    ] {
        assert!(!headers.contains_key(gone), "{gone} reached the upstream");
    }

    eprintln!("{sent} hostile targets, answers by status: {statuses:?}");
    gw.stop().await;
}

/// A request carrying a spoofed client address and forwarding headers, with the reader key.
fn spoofing(addr: SocketAddr) -> impl std::future::Future<Output = Vec<u8>> {
    exchange(
        addr,
        format!(
            "GET /api/inventory/sku-1 HTTP/1.1\r\nhost: shop.example\r\nx-api-key: {INVENTORY_ONLY}\r\n\
             x-forwarded-for: 6.6.6.6\r\nx-forwarded-host: evil.example\r\n\
             x-forwarded-proto: https\r\nforwarded: for=6.6.6.6\r\nconnection: close\r\n\r\n"
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_learns_who_called_and_only_a_trusted_proxy_is_believed() {
    let (users, _) = recording_upstream().await;
    let (orders, _) = recording_upstream().await;
    let (inventory, seen) = recording_upstream().await;

    // By default nobody is trusted: what the client claims is replaced by what the gateway saw.
    let gw = Gateway::start(settings(), [users, orders, inventory]).await;
    assert_eq!(
        keel_test_support::status_of(&spoofing(gw.addr).await),
        Some(200)
    );
    let (_, h) = seen.lock().unwrap().pop().unwrap();
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    assert_eq!(h["x-forwarded-host"], "shop.example");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["forwarded"], "for=127.0.0.1;host=shop.example;proto=http");
    gw.stop().await;

    // Behind a trusted proxy (here, loopback), its account is kept and the proxy appended.
    let mut trusting = settings();
    trusting.trusted_proxies = vec!["127.0.0.0/8".to_string()];
    let gw = Gateway::start(trusting, [users, orders, inventory]).await;
    assert_eq!(
        keel_test_support::status_of(&spoofing(gw.addr).await),
        Some(200)
    );
    let (_, h) = seen.lock().unwrap().pop().unwrap();
    assert_eq!(h["x-forwarded-for"], "6.6.6.6, 127.0.0.1");
    assert_eq!(h["x-forwarded-host"], "evil.example");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(
        h["forwarded"],
        "for=6.6.6.6, for=127.0.0.1;host=shop.example;proto=http"
    );
    gw.stop().await;
}

/// GET `path` on `addr`, the body as text.
async fn get_text(addr: SocketAddr, path: &str) -> String {
    let raw = exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
    )
    .await;
    String::from_utf8_lossy(&raw).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_hold_one_rate_limit_between_them_in_redis() {
    let (users, _) = recording_upstream().await;
    let (orders, _) = recording_upstream().await;
    let (inventory, _) = recording_upstream().await;
    // A key of its own per run (the limit is kept under the key's name), a burst of 5 and a
    // refill too slow to matter during the test: the count below is exact.
    let name = format!("rl{:x}", keel::codec::rand::next_u64());
    let secret = format!("{name}-secret");
    let shared = || Settings {
        rate_redis: "redis://127.0.0.1:6379/".to_string(),
        ..gateway::settings(
            &Settings::default(),
            &format!("{name}:{secret}=inventory:read"),
            0.01,
            5.0,
        )
    };
    let a = Gateway::start(shared(), [users, orders, inventory]).await;
    let b = Gateway::start(shared(), [users, orders, inventory]).await;
    for gw in [&a, &b] {
        let connected = keel_test_support::wait_until(Duration::from_secs(10), || {
            let admin = gw.admin;
            std::thread::spawn(move || {
                let raw = keel_test_support::raw_exchange(
                    admin,
                    b"GET /debug/ratelimit HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
                    Duration::from_secs(2),
                )
                .unwrap_or_default();
                String::from_utf8_lossy(&raw).contains("\"state\":\"redis\"")
            })
            .join()
            .unwrap()
        });
        assert!(
            connected,
            "{}",
            get_text(gw.admin, "/debug/ratelimit").await
        );
    }
    let mut statuses = Vec::new();
    for i in 0..12 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let raw = exchange(
            gw.addr,
            format!(
                "GET /api/inventory/sku-1 HTTP/1.1\r\nhost: shop\r\nx-api-key: {secret}\r\nconnection: close\r\n\r\n"
            ),
        )
        .await;
        statuses.push(keel_test_support::status_of(&raw).unwrap());
    }
    // One allowance of 5 between the two (each alone would have allowed 5: 10 in all).
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        7,
        "{statuses:?}"
    );
    for gw in [&a, &b] {
        let metrics = get_text(gw.admin, "/metrics").await;
        assert!(
            metrics.contains("shop_gateway_rate_limit_fallbacks_total 0"),
            "{metrics}"
        );
    }
    a.stop().await;
    b.stop().await;
}
