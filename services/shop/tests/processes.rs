//! The shop as four real processes (the service binaries), NATS JetStream between order and
//! inventory (a stream and subjects of this test's own), SQLite files per service, spans
//! exported to an in-test OTLP receiver: create a user and place an order through the
//! gateway; the order is stored, its stock reserved, its `OrderPlaced` event consumed exactly
//! once (checked in inventory's store), and one trace id spans every process; cancelling it
//! gives the stock back through the `OrderCancelled` event.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use keel_test_support::otlp::OtlpReceiver;
use keel_test_support::{ChildGuard, free_addr};
use serde_json::{Value, json};

struct Service {
    addr: SocketAddr,
    admin: SocketAddr,
}

fn service() -> Service {
    Service {
        addr: free_addr(),
        admin: free_addr(),
    }
}

fn spawn(
    bin: &str,
    name: &str,
    s: &Service,
    dir: &Path,
    common: &str,
    env: &[(&str, String)],
) -> ChildGuard {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[server]\naddr = \"{}\"\n\n[admin]\naddr = \"{}\"\n\n[shutdown]\ndrain_delay = \"100ms\"\n\n{common}",
            s.addr, s.admin
        ),
    )
    .unwrap();
    let mut vars = vec![
        ("KEEL_CONFIG", config.display().to_string()),
        (
            "SHOP_DB",
            format!("sqlite://{}", dir.join(format!("{name}.db")).display()),
        ),
        ("KEEL_LOG__LEVEL", "warn".to_string()),
    ];
    vars.extend(env.iter().cloned());
    ChildGuard::spawn(bin, &[], &vars)
}

async fn ready(s: &Service) -> bool {
    let url = format!("http://{}/readyz", s.admin);
    for _ in 0..400 {
        if let Ok((200, _)) = get(&url).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn get(url: &str) -> Result<(u16, Bytes), String> {
    let req = http::Request::get(url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = keel_test_support::http1_client()
        .request(req)
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    Ok((status, resp.into_body().collect().await.unwrap().to_bytes()))
}

async fn call(
    gateway: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> (u16, Value) {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{gateway}{path}"))
        .header("x-api-key", "demo-secret-key")
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = keel_test_support::http1_client()
        .request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let raw = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&raw).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_across_four_processes_is_consumed_once_in_one_trace() {
    let receiver = OtlpReceiver::start_grpc().await;
    let dir = tempfile::tempdir().unwrap();
    let (gateway, user, order, inventory) = (service(), service(), service(), service());
    let prefix = format!(
        "shoptest{}x{:x}",
        std::process::id(),
        keel::codec::rand::next_u64() >> 24
    );
    let common = format!(
        "[tracing]\nendpoint = \"{}\"\nexport_interval = \"100ms\"\n\n[messaging]\nbroker = \"nats\"\n\n\
         [clients.user]\nendpoints = [\"{}\"]\n\n[clients.order]\nendpoints = [\"{}\"]\n\n\
         [clients.inventory]\nendpoints = [\"{}\"]\nprotocol = \"h2c\"\n",
        receiver.endpoint(),
        user.addr,
        order.addr,
        inventory.addr
    );
    let env = [("SHOP_NATS_PREFIX", prefix.clone())];
    let _procs = [
        spawn(
            env!("CARGO_BIN_EXE_inventory"),
            "inventory",
            &inventory,
            dir.path(),
            &common,
            &env,
        ),
        spawn(
            env!("CARGO_BIN_EXE_user"),
            "user",
            &user,
            dir.path(),
            &common,
            &env,
        ),
        spawn(
            env!("CARGO_BIN_EXE_order"),
            "order",
            &order,
            dir.path(),
            &common,
            &env,
        ),
        spawn(
            env!("CARGO_BIN_EXE_gateway"),
            "gateway",
            &gateway,
            dir.path(),
            &common,
            &env,
        ),
    ];
    for s in [&inventory, &user, &order, &gateway] {
        assert!(ready(s).await, "service on {} never became ready", s.addr);
    }

    let (status, created) = call(
        gateway.addr,
        "POST",
        "/api/users",
        &[],
        json!({"name": "Lin", "email": "lin@example.com"}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let trace = "5bf92f3577b34da6a3ce929d0e0e4736";
    let parent = format!("00-{trace}-00f067aa0ba902b7-01");
    let (status, placed) = call(
        gateway.addr,
        "POST",
        "/api/orders",
        &[("traceparent", &parent)],
        json!({"user_id": created["id"], "sku": "keel-tee", "quantity": 3}),
    )
    .await;
    assert_eq!(status, 201, "{placed}");
    let order_id = placed["id"].as_str().unwrap().to_string();

    // Stored at order, reserved and then confirmed at inventory: one confirmation.
    let (status, _) = call(
        gateway.addr,
        "GET",
        &format!("/api/orders/{order_id}"),
        &[],
        Value::Null,
    )
    .await;
    assert_eq!(status, 200);
    let inventory_db = keel_shop::db::open(&format!(
        "sqlite://{}",
        dir.path().join("inventory.db").display()
    ))
    .await
    .unwrap();
    let mut confirmed = 0;
    for _ in 0..200 {
        confirmed = keel_shop::inventory::confirmations(&inventory_db, &order_id)
            .await
            .unwrap();
        if confirmed > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(confirmed, 1, "the OrderPlaced event was consumed once");
    let tees = || {
        call(
            gateway.addr,
            "GET",
            "/api/inventory/keel-tee",
            &[],
            Value::Null,
        )
    };
    let (status, stock) = tees().await;
    assert_eq!(status, 200);
    assert_eq!(stock["available"], 497);
    assert_eq!(stock["confirmed"], 3);

    // One trace across the four processes (each exports under its own service name).
    let mut services = BTreeSet::new();
    for _ in 0..200 {
        services = receiver
            .resources_of_trace(trace)
            .into_iter()
            .collect::<BTreeSet<String>>();
        if services.len() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        services,
        ["gateway", "inventory", "order", "user"]
            .map(String::from)
            .into_iter()
            .collect(),
        "services in trace {trace}"
    );
    // A second look finds no second confirmation (no redelivery applied twice).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        keel_shop::inventory::confirmations(&inventory_db, &order_id)
            .await
            .unwrap(),
        1
    );
    // Cancelled: its OrderCancelled event crosses NATS to inventory's second consumer, which
    // gives the three tees back.
    let (status, cancelled) = call(
        gateway.addr,
        "POST",
        &format!("/api/orders/{order_id}/cancel"),
        &[],
        Value::Null,
    )
    .await;
    assert_eq!(status, 200, "{cancelled}");
    let mut available = Value::Null;
    for _ in 0..200 {
        available = tees().await.1["available"].clone();
        if available == 500 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(available, 500, "the cancelled order's stock is back");
    let nats = keel::messaging::nats::Nats::connect("nats://127.0.0.1:4222")
        .await
        .unwrap();
    let _ = nats.delete_stream(&prefix.to_ascii_uppercase()).await;
}
