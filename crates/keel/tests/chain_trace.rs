//! One trace across three hops — gateway (HTTP) → order (HTTP, Keel client) → inventory
//! (gRPC, a generated tonic client over the Keel client) — exported over OTLP/gRPC to a real
//! receiver: one trace id, parent links through client spans, span kinds, HTTP/RPC attributes,
//! error status, and spans ended as `deadline_exceeded` when the deadline cuts the chain off.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use keel::{App, Context, Sources};
use keel_test_support::otlp::{OtlpReceiver, int_attr, str_attr};
use keel_test_support::{self as ts};
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode as OtlpStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";

async fn start(
    name: &str,
    router: Router,
    config: &str,
    dir: &std::path::Path,
) -> (App, SocketAddr) {
    let addr = ts::free_addr();
    let admin = ts::free_addr();
    let file = dir.join(format!("{name}.toml"));
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
    let serving = app.clone();
    tokio::spawn(serving.serve_until(router, std::future::pending(), std::future::pending()));
    let ok = tokio::task::spawn_blocking(move || {
        ts::wait_until(Duration::from_secs(10), || ts::port_open(addr))
    })
    .await
    .unwrap();
    assert!(ok);
    (app, addr)
}

fn id(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn find(spans: &[Span], kind: SpanKind, pred: impl Fn(&Span) -> bool) -> &Span {
    spans
        .iter()
        .find(|s| s.kind == kind as i32 && pred(s))
        .unwrap_or_else(|| panic!("no {kind:?} span matching; spans: {spans:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_hop_chain_exports_one_connected_trace() {
    let receiver = OtlpReceiver::start_grpc().await;
    let dir = tempfile::tempdir().unwrap();
    let tracing = format!(
        "[tracing]\nendpoint = \"{}\"\nexport_interval = \"100ms\"\n",
        receiver.endpoint()
    );

    // inventory: gRPC health (tonic), which knows the service "" and nothing else.
    let (_reporter, health) = tonic_health::server::health_reporter();
    let (_, inventory) = start(
        "inventory",
        tonic::service::Routes::new(health).into_axum_router(),
        &tracing,
        dir.path(),
    )
    .await;

    // order: HTTP; asks inventory over gRPC through the Keel client.
    let order_cfg = format!(
        "{tracing}[clients.inventory]\nendpoints = [\"{inventory}\"]\nprotocol = \"h2c\"\n"
    );
    let order_router = |client: Arc<keel::client::client::Client>| {
        Router::new()
            .route(
                "/stock/{sku}",
                get(
                    |State(c): State<Arc<keel::client::client::Client>>,
                     _ctx: Context,
                     Path(sku): Path<String>| async move {
                        let mut grpc = HealthClient::new(keel::client::client::Service::new(c));
                        let service = if sku == "missing" {
                            "nope".to_string()
                        } else {
                            String::new()
                        };
                        match grpc.check(HealthCheckRequest { service }).await {
                            Ok(_) => (http::StatusCode::OK, "in stock\n".to_string()),
                            Err(s) => (http::StatusCode::NOT_FOUND, format!("{}\n", s.message())),
                        }
                    },
                ),
            )
            .route(
                "/slow",
                get(|_ctx: Context| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    "slow\n"
                }),
            )
            .with_state(client)
    };
    let order_addr = ts::free_addr();
    let order_admin = ts::free_addr();
    let order_file = dir.path().join("order.toml");
    std::fs::write(
        &order_file,
        format!(
            "[server]\naddr = \"{order_addr}\"\n[admin]\naddr = \"{order_admin}\"\n{order_cfg}"
        ),
    )
    .unwrap();
    let loaded = Sources {
        file: Some(order_file),
        sets: vec![],
    }
    .load_with_env(Vec::new())
    .unwrap();
    let sizing = keel::runtime::detect(&loaded.value.runtime);
    let order = App::new("order", loaded, sizing);
    let inventory_client = order.client("inventory").unwrap();
    tokio::spawn(order.clone().serve_until(
        order_router(inventory_client),
        std::future::pending(),
        std::future::pending(),
    ));
    assert!(
        tokio::task::spawn_blocking(move || ts::wait_until(Duration::from_secs(10), || {
            ts::port_open(order_addr)
        }))
        .await
        .unwrap()
    );

    // gateway: HTTP; forwards to order through the Keel client.
    let gw_cfg = format!("{tracing}[clients.order]\nendpoints = [\"{order_addr}\"]\n");
    let gw_file = dir.path().join("gateway.toml");
    let gw_addr = ts::free_addr();
    let gw_admin = ts::free_addr();
    std::fs::write(
        &gw_file,
        format!("[server]\naddr = \"{gw_addr}\"\n[admin]\naddr = \"{gw_admin}\"\n{gw_cfg}"),
    )
    .unwrap();
    let loaded = Sources {
        file: Some(gw_file),
        sets: vec![],
    }
    .load_with_env(Vec::new())
    .unwrap();
    let sizing = keel::runtime::detect(&loaded.value.runtime);
    let gateway = App::new("gateway", loaded, sizing);
    let order_client = gateway.client("order").unwrap();
    let gw_router = Router::new()
        .route(
            "/orders/{sku}",
            get(
                |State(c): State<Arc<keel::client::client::Client>>,
                 _ctx: Context,
                 Path(sku): Path<String>| async move {
                    let req = http::Request::get(format!("/stock/{sku}"))
                        .body(Bytes::new())
                        .unwrap();
                    match c.request(req).await {
                        Ok(r) => r.status(),
                        Err(_) => http::StatusCode::BAD_GATEWAY,
                    }
                },
            ),
        )
        .route(
            "/slow",
            get(
                |State(c): State<Arc<keel::client::client::Client>>, _ctx: Context| async move {
                    let req = http::Request::get("/slow").body(Bytes::new()).unwrap();
                    match c.request(req).await {
                        Ok(r) => r.status(),
                        Err(_) => http::StatusCode::BAD_GATEWAY,
                    }
                },
            ),
        )
        .with_state(order_client);
    tokio::spawn(gateway.clone().serve_until(
        gw_router,
        std::future::pending(),
        std::future::pending(),
    ));
    assert!(
        tokio::task::spawn_blocking(move || ts::wait_until(Duration::from_secs(10), || {
            ts::port_open(gw_addr)
        }))
        .await
        .unwrap()
    );

    let call = |path: &str, trace: &str, timeout: Option<&str>| {
        let mut req = http::Request::get(format!("http://{gw_addr}{path}"))
            .header("traceparent", format!("00-{trace}-{CALLER_SPAN}-01"));
        if let Some(t) = timeout {
            req = req.header("keel-timeout", t);
        }
        let req = req.body(Full::new(Bytes::new())).unwrap();
        async move {
            let resp = ts::http1_client().request(req).await.unwrap();
            let status = resp.status();
            resp.into_body().collect().await.unwrap();
            status
        }
    };

    // 1. The happy path: five spans, one trace.
    assert_eq!(call("/orders/42", TRACE, None).await, 200);
    let spans = receiver.wait_for(5, Duration::from_secs(10)).await;
    let ours: Vec<Span> = spans
        .into_iter()
        .filter(|s| id(&s.trace_id) == TRACE)
        .collect();
    assert_eq!(ours.len(), 5, "{ours:#?}");
    let gw_server = find(&ours, SpanKind::Server, |s| {
        str_attr(&s.attributes, "http.route") == Some("/orders/{sku}")
    });
    assert_eq!(id(&gw_server.parent_span_id), CALLER_SPAN);
    assert_eq!(gw_server.name, "GET /orders/{sku}");
    assert_eq!(
        int_attr(&gw_server.attributes, "http.response.status_code"),
        Some(200)
    );
    let gw_client = find(&ours, SpanKind::Client, |s| {
        str_attr(&s.attributes, "keel.upstream") == Some("order")
    });
    assert_eq!(
        gw_client.parent_span_id, gw_server.span_id,
        "client span under the server span"
    );
    let order_server = find(&ours, SpanKind::Server, |s| {
        str_attr(&s.attributes, "http.route") == Some("/stock/{sku}")
    });
    assert_eq!(
        order_server.parent_span_id, gw_client.span_id,
        "next hop under the client span"
    );
    let order_client = find(&ours, SpanKind::Client, |s| {
        str_attr(&s.attributes, "keel.upstream") == Some("inventory")
    });
    assert_eq!(order_client.parent_span_id, order_server.span_id);
    assert_eq!(
        str_attr(&order_client.attributes, "rpc.system"),
        Some("grpc")
    );
    let inv_server = find(&ours, SpanKind::Server, |s| {
        str_attr(&s.attributes, "rpc.system") == Some("grpc")
    });
    assert_eq!(inv_server.parent_span_id, order_client.span_id);
    assert_eq!(inv_server.name, "grpc.health.v1.Health/Check");
    assert_eq!(
        str_attr(&inv_server.attributes, "rpc.service"),
        Some("grpc.health.v1.Health")
    );
    assert_eq!(
        int_attr(&inv_server.attributes, "rpc.grpc.status_code"),
        Some(0)
    );
    for s in [gw_server, gw_client, order_server, order_client, inv_server] {
        assert!(s.end_time_unix_nano >= s.start_time_unix_nano, "{s:?}");
        let status = s.status.as_ref().map_or(0, |st| st.code);
        assert_ne!(
            status,
            OtlpStatus::Error as i32,
            "no error on the happy path: {s:?}"
        );
    }

    // 2. An error deep down: NOT_FOUND from inventory marks the gRPC client span ERROR.
    let trace2 = "1af7651916cd43dd8448eb211c80319c";
    assert_eq!(call("/orders/missing", trace2, None).await, 404);
    let spans = receiver.wait_for(10, Duration::from_secs(10)).await;
    let ours: Vec<Span> = spans
        .into_iter()
        .filter(|s| id(&s.trace_id) == trace2)
        .collect();
    assert_eq!(ours.len(), 5, "{ours:#?}");
    let grpc_client = find(&ours, SpanKind::Client, |s| {
        str_attr(&s.attributes, "keel.upstream") == Some("inventory")
    });
    assert_eq!(
        int_attr(&grpc_client.attributes, "rpc.grpc.status_code"),
        Some(5)
    );
    assert_eq!(
        grpc_client.status.as_ref().map(|s| s.code),
        Some(OtlpStatus::Error as i32)
    );

    // 3. The deadline cuts the chain: every span still ends, marked as a timeout.
    let trace3 = "2af7651916cd43dd8448eb211c80319c";
    assert_eq!(call("/slow", trace3, Some("300m")).await, 504);
    let mut ours = Vec::new();
    for _ in 0..100 {
        ours = receiver
            .spans()
            .into_iter()
            .filter(|s| id(&s.trace_id) == trace3)
            .collect();
        if ours.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        ours.len(),
        3,
        "gateway server + client, order server: {ours:#?}"
    );
    for s in &ours {
        assert_eq!(
            s.status.as_ref().map(|st| st.code),
            Some(OtlpStatus::Error as i32),
            "{s:?}"
        );
    }
    // The inner hop's deadline is shorter by the propagation margin, so order cuts its own
    // handler off first and answers 504; the gateway relays that answer.
    let gw = find(&ours, SpanKind::Server, |s| {
        id(&s.parent_span_id) == CALLER_SPAN
    });
    assert_eq!(
        int_attr(&gw.attributes, "http.response.status_code"),
        Some(504)
    );
    let order_srv = find(&ours, SpanKind::Server, |s| {
        id(&s.parent_span_id) != CALLER_SPAN
    });
    assert_eq!(
        str_attr(&order_srv.attributes, "keel.outcome"),
        Some("deadline_exceeded")
    );
    assert_eq!(
        str_attr(&order_srv.attributes, "error.type"),
        Some("timeout")
    );
    receiver.stop().await;
}
