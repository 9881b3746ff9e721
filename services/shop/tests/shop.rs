//! The shop end to end, in one process (four Keel apps on loopback ports, SQLite, the
//! embedded broker): an order through the gateway is stored, its stock reserved over gRPC,
//! its event consumed exactly once, all in one trace; the gateway's keys, scopes, rate limit
//! and colour routing; an order while inventory is down leaves nothing behind; a cancelled
//! order gives its stock back once.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use keel_shop::local::{LocalShop, Options};
use keel_test_support::otlp::OtlpReceiver;
use serde_json::{Value, json};

const KEY: &str = "demo-secret-key";
const READER: &str = "reader-secret-key";

struct Answer {
    status: u16,
    body: Value,
    headers: http::HeaderMap,
}

async fn call(
    shop: &LocalShop,
    method: &str,
    path: &str,
    key: Option<&str>,
    extra: &[(&str, &str)],
    body: Option<Value>,
) -> Answer {
    let client = keel_test_support::http1_client();
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", shop.gateway.addr));
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    if !bytes.is_empty() {
        req = req.header("content-type", "application/json");
    }
    let resp = client
        .request(req.body(Full::new(Bytes::from(bytes))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let raw = resp.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&raw)
        .unwrap_or(Value::String(String::from_utf8_lossy(&raw).into_owned()));
    Answer {
        status,
        body,
        headers,
    }
}

async fn new_user(shop: &LocalShop, email: &str) -> String {
    let a = call(
        shop,
        "POST",
        "/api/users",
        Some(KEY),
        &[],
        Some(json!({"name": "Ada", "email": email})),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    a.body["id"].as_str().unwrap().to_string()
}

/// `POST /api/orders` with the all-scopes key.
async fn place(shop: &LocalShop, user: &str, sku: &str, quantity: i64) -> Answer {
    call(
        shop,
        "POST",
        "/api/orders",
        Some(KEY),
        &[],
        Some(json!({"user_id": user, "sku": sku, "quantity": quantity})),
    )
    .await
}

/// `GET /api/inventory/{sku}` with the reader key: the stock's JSON.
async fn stock(shop: &LocalShop, sku: &str) -> Value {
    let a = call(
        shop,
        "GET",
        &format!("/api/inventory/{sku}"),
        Some(READER),
        &[],
        None,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    a.body
}

/// Whether inventory confirms `order_id` exactly once within 10 s (its `OrderPlaced` event
/// was consumed).
async fn confirmed_once(shop: &LocalShop, order_id: &str) -> bool {
    eventually(Duration::from_secs(10), || async {
        keel_shop::inventory::confirmations(&shop.inventory_db, order_id)
            .await
            .unwrap()
            == 1
    })
    .await
}

async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_stored_reserved_and_confirmed_once_in_one_trace() {
    let receiver = OtlpReceiver::start_grpc().await;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = Options::new(dir.path());
    opts.extra_config = format!(
        "[tracing]\nendpoint = \"{}\"\nexport_interval = \"100ms\"\n",
        receiver.endpoint()
    );
    let shop = LocalShop::start(opts).await.unwrap();
    let user = new_user(&shop, "ada@example.com").await;

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let placed = call(
        &shop,
        "POST",
        "/api/orders",
        Some(KEY),
        &[("traceparent", &format!("00-{trace}-00f067aa0ba902b7-01"))],
        Some(json!({"user_id": user, "sku": "keel-mug", "quantity": 2})),
    )
    .await;
    assert_eq!(placed.status, 201, "{}", placed.body);
    let order_id = placed.body["id"].as_str().unwrap().to_string();
    assert!(placed.headers.contains_key("x-request-id"));

    // Stored, readable through the gateway.
    let read = call(
        &shop,
        "GET",
        &format!("/api/orders/{order_id}"),
        Some(READER),
        &[],
        None,
    )
    .await;
    assert_eq!(read.status, 200, "{}", read.body);
    assert_eq!(read.body["quantity"], 2);
    // Reserved, then confirmed by the consumed event: exactly one confirmation.
    assert!(
        confirmed_once(&shop, &order_id).await,
        "the OrderPlaced event was consumed"
    );
    let mug = stock(&shop, "keel-mug").await;
    assert_eq!(mug["available"], 998);
    assert_eq!(mug["confirmed"], 2);
    assert_eq!(mug["reserved"], 0);
    // The relay's next passes find nothing new: still one confirmation, one outbox row.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        keel_shop::inventory::confirmations(&shop.inventory_db, &order_id)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        keel_shop::order::counts(&shop.order_db).await.unwrap(),
        (1, 1)
    );

    // One trace across gateway → order → user, order → inventory (gRPC), and the consumer.
    let names = || {
        receiver
            .spans()
            .into_iter()
            .filter(|s| hex(&s.trace_id) == trace)
            .map(|s| s.name)
            .collect::<Vec<_>>()
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            let n = names();
            // Gateway and order (POST), user (GET), inventory (gRPC), the consumer.
            n.iter().filter(|s| *s == "POST").count() >= 2
                && ["GET", "Inventory/Reserve", "process shop.orders.placed"]
                    .iter()
                    .all(|part| n.iter().any(|s| s.contains(part)))
        })
        .await,
        "spans of trace {trace}: {:?}",
        names()
    );
    shop.stop().await.unwrap();
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_checks_keys_scopes_and_rates_and_strips_identity_headers() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = Options::new(dir.path());
    opts.gateway.rate = 1.0;
    opts.gateway.burst = 5.0;
    let shop = LocalShop::start(opts).await.unwrap();

    let none = call(&shop, "GET", "/api/users/usr_x", None, &[], None).await;
    assert_eq!(none.status, 401, "{}", none.body);
    assert!(none.body["error"].as_str().unwrap().contains("API key"));
    let wrong = call(
        &shop,
        "GET",
        "/api/users/usr_x",
        Some("not-a-key-at-all"),
        &[],
        None,
    )
    .await;
    assert_eq!(wrong.status, 401);
    let forbidden = call(
        &shop,
        "POST",
        "/api/users",
        Some(READER),
        &[],
        Some(json!({"name": "Eve", "email": "eve@example.com"})),
    )
    .await;
    assert_eq!(forbidden.status, 403, "{}", forbidden.body);

    // The reader's bucket: a burst of 5 at 1/s (the 403 above was refused before the rate).
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..6 {
        let a = call(
            &shop,
            "GET",
            "/api/users/usr_missing",
            Some(READER),
            &[("x-shop-key", "admin")],
            None,
        )
        .await;
        if a.status == 429 {
            retry_after = a.headers.get("retry-after").cloned();
        }
        statuses.push(a.status);
    }
    assert_eq!(statuses, [404, 404, 404, 404, 404, 429]);
    assert_eq!(retry_after.unwrap(), "1");
    // Upstreams see the identity the gateway vouched for, not what the client claimed.
    let who = call(
        &shop,
        "GET",
        "/api/users/whoami",
        Some(KEY),
        &[("x-shop-key", "admin"), ("x-shop-scopes", "everything")],
        None,
    )
    .await;
    assert_eq!(who.status, 200, "{}", who.body);
    assert_eq!(who.body["key"], "demo");
    assert_eq!(who.body["scopes"], "users:*,orders:*,inventory:*");
    // Another key has its own bucket.
    let other = call(&shop, "GET", "/api/users/usr_missing", Some(KEY), &[], None).await;
    assert_eq!(other.status, 404);
    shop.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colour_reaches_the_canary_and_weights_split_uncoloured_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = Options::new(dir.path());
    opts.canary_user = true;
    opts.canary_weight = 20;
    opts.gateway.rate = 100_000.0;
    opts.gateway.burst = 100_000.0;
    let shop = LocalShop::start(opts).await.unwrap();

    for _ in 0..20 {
        let a = call(
            &shop,
            "GET",
            "/api/users/usr_x",
            Some(KEY),
            &[("keel-color", "canary")],
            None,
        )
        .await;
        assert_eq!(
            a.headers["x-shop-instance"], "user-canary",
            "a coloured request goes to the canary"
        );
    }
    let mut canary = 0;
    let n = 1000;
    for _ in 0..n {
        let a = call(&shop, "GET", "/api/users/usr_x", Some(KEY), &[], None).await;
        assert_eq!(a.status, 404);
        if a.headers["x-shop-instance"] == "user-canary" {
            canary += 1;
        }
    }
    // 20 % of 1000: a binomial with σ ≈ 12.6; ±5σ can fail once in millions of runs.
    assert!(
        (137..=263).contains(&canary),
        "{canary} of {n} went to the canary"
    );
    shop.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_while_inventory_is_down_is_a_clear_503_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = Options::new(dir.path());
    opts.inventory_down = true;
    let shop = LocalShop::start(opts).await.unwrap();
    let user = new_user(&shop, "grace@example.com").await;
    let a = place(&shop, &user, "keel-mug", 1).await;
    assert_eq!(a.status, 503, "{}", a.body);
    assert_eq!(a.headers["content-type"], "application/json");
    assert!(
        a.body["error"]
            .as_str()
            .unwrap()
            .contains("inventory unavailable"),
        "{}",
        a.body
    );
    assert_eq!(
        keel_shop::order::counts(&shop.order_db).await.unwrap(),
        (0, 0),
        "no order row, no outbox row"
    );
    // Malformed and invalid orders are the caller's to fix.
    let bad = call(
        &shop,
        "POST",
        "/api/orders",
        Some(KEY),
        &[],
        Some(json!({"sku": 1})),
    )
    .await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    let unknown = call(
        &shop,
        "POST",
        "/api/orders",
        Some(KEY),
        &[],
        Some(json!({"user_id": "usr_nobody", "sku": "keel-mug", "quantity": 1})),
    )
    .await;
    assert_eq!(unknown.status, 422, "{}", unknown.body);
    shop.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_stores_an_order_is_stored_reserved_and_confirmed_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = Options::new(dir.path());
    opts.postgres = Some("postgres://postgres@127.0.0.1:5432/postgres".into());
    let shop = LocalShop::start(opts).await.unwrap();
    assert!(matches!(shop.order_db, keel_shop::db::Db::Postgres(_)));
    let user = new_user(&shop, "pg@example.com").await;
    let dup = call(
        &shop,
        "POST",
        "/api/users",
        Some(KEY),
        &[],
        Some(json!({"name": "Again", "email": "pg@example.com"})),
    )
    .await;
    assert_eq!(
        dup.status, 409,
        "a unique violation is a conflict in PostgreSQL too"
    );
    let mut ids = Vec::new();
    for _ in 0..3 {
        let placed = place(&shop, &user, "keel-hoodie", 1).await;
        assert_eq!(placed.status, 201, "{}", placed.body);
        ids.push(placed.body["id"].as_str().unwrap().to_string());
    }
    // Three hoodies were in stock: the fourth order is refused, and nothing is written.
    let short = place(&shop, &user, "keel-hoodie", 1).await;
    assert_eq!(short.status, 409, "{}", short.body);
    for id in &ids {
        assert!(confirmed_once(&shop, id).await);
    }
    assert_eq!(
        keel_shop::order::counts(&shop.order_db).await.unwrap(),
        (3, 3)
    );
    let hoodie = stock(&shop, "keel-hoodie").await;
    assert_eq!(hoodie["available"], 0);
    assert_eq!(hoodie["confirmed"], 3);

    // A cancelled order gives its hoodie back (OrderCancelled through PostgreSQL's inbox),
    // and the order that was refused now goes through.
    let cancelled = call(
        &shop,
        "POST",
        &format!("/api/orders/{}/cancel", ids[0]),
        Some(KEY),
        &[],
        None,
    )
    .await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.body);
    assert!(
        eventually(Duration::from_secs(10), || async {
            stock(&shop, "keel-hoodie").await["available"] == 1
        })
        .await,
        "the cancelled hoodie is back in stock"
    );
    let again = place(&shop, &user, "keel-hoodie", 1).await;
    assert_eq!(again.status, 201, "{}", again.body);
    shop.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_order_gives_its_stock_back_once() {
    let dir = tempfile::tempdir().unwrap();
    let shop = LocalShop::start(Options::new(dir.path())).await.unwrap();
    let user = new_user(&shop, "linus@example.com").await;
    let placed = place(&shop, &user, "keel-tee", 3).await;
    assert_eq!(placed.status, 201, "{}", placed.body);
    let id = placed.body["id"].as_str().unwrap().to_string();
    assert!(confirmed_once(&shop, &id).await);
    let tee = || stock(&shop, "keel-tee");
    assert_eq!(tee().await["available"], 497);

    let path = format!("/api/orders/{id}/cancel");
    // Cancelling needs the write scope.
    let denied = call(&shop, "POST", &path, Some(READER), &[], None).await;
    assert_eq!(denied.status, 403, "{}", denied.body);
    let first = call(&shop, "POST", &path, Some(KEY), &[], None).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.body["state"], "cancelled");
    // A client's retry: the same answer, and no second event.
    let second = call(&shop, "POST", &path, Some(KEY), &[], None).await;
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(second.body["state"], "cancelled");
    let missing = call(
        &shop,
        "POST",
        "/api/orders/ord_nope/cancel",
        Some(KEY),
        &[],
        None,
    )
    .await;
    assert_eq!(missing.status, 404, "{}", missing.body);
    assert_eq!(
        keel_shop::order::counts(&shop.order_db).await.unwrap(),
        (1, 2),
        "one order; its OrderPlaced and one OrderCancelled in the outbox"
    );

    assert!(
        eventually(Duration::from_secs(10), || async {
            tee().await["available"] == 500
        })
        .await,
        "the three tees are back: {}",
        tee().await
    );
    // Given back once: later relay and consumer passes change nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = tee().await;
    assert_eq!(after["available"], 500, "{after}");
    assert_eq!(after["confirmed"], 0, "{after}");
    assert_eq!(after["reserved"], 0, "{after}");
    let read = call(
        &shop,
        "GET",
        &format!("/api/orders/{id}"),
        Some(READER),
        &[],
        None,
    )
    .await;
    assert_eq!(read.body["state"], "cancelled");
    shop.stop().await.unwrap();
}
