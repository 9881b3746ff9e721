//! Request-scoped tasks end with their request; detached ones are tracked and, once alive
//! well past their owner's deadline, reported as leak suspects in `/debug/tasks`.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::Full;
use keel::tasks::Registry;
use keel::{App, Context, Sources};
use keel_test_support as ts;

async fn start() -> (SocketAddr, SocketAddr, &'static Registry) {
    let router = Router::new()
        .route(
            "/fanout",
            get(|ctx: Context| async move {
                for _ in 0..1000 {
                    ctx.spawn("never finishes", std::future::pending::<()>());
                }
                "spawned 1000"
            }),
        )
        .route(
            "/detach",
            get(|ctx: Context| async move {
                ctx.detach("audit write", std::future::pending::<()>());
                "detached"
            }),
        );
    let addr = ts::free_addr();
    let admin = ts::free_addr();
    let env = vec![
        ("KEEL_SERVER__ADDR".to_string(), addr.to_string()),
        ("KEEL_ADMIN__ADDR".to_string(), admin.to_string()),
        ("KEEL_TASKS__LEAK_GRACE".to_string(), "200ms".to_string()),
        (
            "KEEL_TASKS__SWEEP_INTERVAL".to_string(),
            "100ms".to_string(),
        ),
    ];
    let loaded = Sources::default().load_with_env(env).unwrap();
    let sizing = keel::runtime::detect(&loaded.value.runtime);
    let app = App::new("tasks", loaded, sizing);
    let registry = app.registry();
    tokio::spawn(app.serve_until(router, std::future::pending(), std::future::pending()));
    let up = tokio::task::spawn_blocking(move || {
        ts::wait_until(Duration::from_secs(10), || {
            ts::port_open(addr) && ts::port_open(admin)
        })
    })
    .await
    .unwrap();
    assert!(up);
    (addr, admin, registry)
}

async fn call(addr: SocketAddr, path: &str, request_id: &str, timeout: &str) -> u16 {
    let req = http::Request::get(format!("http://{addr}{path}"))
        .header("x-request-id", request_id)
        .header("keel-timeout", timeout)
        .body(Full::new(Bytes::new()))
        .unwrap();
    ts::http1_client()
        .request(req)
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn of_request(registry: &Registry, request_id: &str) -> usize {
    registry
        .snapshot()
        .iter()
        .filter(|t| t.request_id.as_deref() == Some(request_id))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_scoped_tasks_die_with_their_request_and_a_detached_one_becomes_a_leak_suspect() {
    let (addr, admin, registry) = start().await;
    let live_before = registry.live();

    // The deadline (60 s, capped at the route's 30 s) is far past the 5 s wait below, so only
    // the end of the request's body — its scope cancelled — can end the tasks in time.
    assert_eq!(call(addr, "/fanout", "fanout-1", "60S").await, 200);
    let clean = tokio::task::spawn_blocking(|| {
        ts::wait_until(Duration::from_secs(5), || {
            of_request(registry, "fanout-1") == 0
        })
    })
    .await
    .unwrap();
    assert!(
        clean,
        "{} tasks of the request still alive",
        of_request(registry, "fanout-1")
    );
    assert_eq!(registry.live(), live_before);

    // A detached task outlives its request on purpose, and stays visible.
    // A generous deadline so a loaded machine still answers in time; the suspect check below
    // waits for deadline + grace either way.
    assert_eq!(call(addr, "/detach", "detach-1", "500m").await, 200);
    let client = ts::http1_client();
    let (status, body) = ts::get(&client, &format!("http://{admin}/debug/tasks"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let task = v["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["request_id"] == "detach-1")
        .unwrap_or_else(|| panic!("detached task not listed: {body}"))
        .clone();
    assert_eq!(task["name"], "audit write");
    assert_eq!(task["kind"], "detached");
    assert_eq!(task["route"], "/detach");

    // Past its owner's 500 ms deadline plus the 200 ms grace, it is a leak suspect, listed first.
    let mut suspect = None;
    for _ in 0..300 {
        let (_, body) = ts::get(&client, &format!("http://{admin}/debug/tasks"))
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["tasks"][0]["leak_suspect"] == true {
            suspect = Some(v);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v = suspect.expect("the detached task never became a leak suspect");
    assert_eq!(v["tasks"][0]["request_id"], "detach-1");
    // Whole milliseconds, truncated: exactly at the grace boundary it reads -200.
    assert!(v["tasks"][0]["deadline_in_ms"].as_i64().unwrap() <= -200);
    assert!(v["leak_suspects_total"].as_u64().unwrap() >= 1);
    let (_, text) = ts::get(&client, &format!("http://{admin}/debug/tasks?format=text"))
        .await
        .unwrap();
    assert!(
        text.contains("LEAK?") && text.contains("audit write"),
        "{text}"
    );
}
