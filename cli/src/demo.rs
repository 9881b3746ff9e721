//! `keel demo`: the shop on this machine, driven by a short mixed workload, then left
//! running for you to try.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keel_shop::local::{LocalShop, Options};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::{Value, json};

const KEY: &str = "demo-secret-key";

/// Step between a worker's requests: odd, so each worker walks every (user, SKU, kind)
/// combination rather than repeating a few.
const STRIDE: usize = 7;

/// What `keel demo` was asked to do.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// How long the workload runs.
    pub(crate) duration: Duration,
    /// Requests in flight.
    pub(crate) concurrency: usize,
    /// Exit after the summary (non-zero on any failure) instead of waiting for Ctrl-C.
    pub(crate) smoke: bool,
    /// Carry the order events over this NATS server instead of the embedded broker.
    pub(crate) nats: Option<String>,
    /// Keep the services' data in PostgreSQL (an admin URL; fresh databases are made on it).
    pub(crate) postgres: Option<String>,
}

/// Spans received by the demo's own OTLP endpoint (the services export to it).
#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[derive(Default)]
struct Stats {
    latencies: BTreeMap<&'static str, Vec<Duration>>,
    errors: BTreeMap<String, u64>,
    orders: Vec<String>,
    /// Orders refused with 409 because the SKU ran out.
    sold_out: u64,
    traced_order: Option<(String, String)>,
}

type Http = Client<HttpConnector, Full<Bytes>>;

async fn send(
    http: &Http,
    gateway: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
    extra: &[(&str, String)],
) -> Result<(u16, Value), String> {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{gateway}{path}"))
        .header("x-api-key", KEY);
    for (k, v) in extra {
        req = req.header(*k, v);
    }
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    if !bytes.is_empty() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(bytes)))
        .map_err(|e| e.to_string())?;
    let resp = http.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let raw = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, serde_json::from_slice(&raw).unwrap_or(Value::Null)))
}

/// Run the demo; the process's exit code.
pub(crate) async fn run(plan: Plan) -> std::process::ExitCode {
    match run_inner(plan).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("keel demo: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run_inner(plan: Plan) -> Result<bool, keel::BoxError> {
    let collector = Collector::default();
    // The collector keeps the listener it bound: a port found free and bound again later
    // could be taken in between (by the shop's own listeners, or anything else on the host).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let otlp = listener.local_addr()?;
    {
        let svc = TraceServiceServer::new(collector.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
    }
    let dir = std::env::temp_dir().join(format!("keel-demo-{}", std::process::id()));
    let mut opts = Options::new(&dir);
    // The workload runs as fast as the machine allows on one key: the per-key token bucket
    // would turn most of it into 429s, so the demo sets the rate out of reach (the shop's
    // gateway test exercises the limit; SHOP_RATE sets it for the gateway binary).
    opts.gateway.rate = 1e9;
    opts.gateway.burst = 1e9;
    opts.nats = plan.nats.clone();
    opts.postgres = plan.postgres.clone();
    // Every request traced, so the summary can lay one out hop by hop.
    opts.extra_config = format!(
        "[tracing]\nendpoint = \"http://{otlp}\"\nexport_interval = \"200ms\"\nsample_ratio = 1.0\n\n[log]\nlevel = \"warn\"\n"
    );
    let started = Instant::now();
    let shop = LocalShop::start(opts).await?;
    eprintln!(
        "keel demo: the shop is up in {:.1} s — gateway http://{}, user {}, order {}, inventory {} (gRPC)",
        started.elapsed().as_secs_f64(),
        shop.gateway.addr,
        shop.user.addr,
        shop.order.addr,
        shop.inventory.addr
    );
    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    let gw = shop.gateway.addr;

    // Seed: a few users.
    let mut users = Vec::new();
    for i in 0..20 {
        let (status, body) = send(&http, gw, "POST", "/api/users", Some(json!({"name": format!("Buyer {i}"), "email": format!("buyer{i}-{}@example.com", std::process::id())})), &[]).await?;
        if status != 201 {
            return Err(format!("seeding users: {status} {body}").into());
        }
        users.push(body["id"].as_str().unwrap_or_default().to_string());
    }

    // The workload: a mix of orders, reads and stock checks, `concurrency` at a time.
    let stats = Arc::new(Mutex::new(Stats::default()));
    let deadline = Instant::now() + plan.duration;
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..plan.concurrency.max(1) {
        let (http, users, stats, done) = (http.clone(), users.clone(), stats.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let mut i = w;
            while Instant::now() < deadline {
                i += STRIDE;
                let user = &users[i % users.len()];
                let skus = ["keel-mug", "keel-tee", "keel-sticker"];
                let sku = skus[i % skus.len()];
                let (route, method, path, body): (&'static str, &str, String, Option<Value>) =
                    match i % 4 {
                        0 | 1 => (
                            "POST /api/orders",
                            "POST",
                            "/api/orders".into(),
                            Some(json!({"user_id": user, "sku": sku, "quantity": 1})),
                        ),
                        2 => (
                            "GET /api/users/{id}",
                            "GET",
                            format!("/api/users/{user}"),
                            None,
                        ),
                        _ => (
                            "GET /api/inventory/{sku}",
                            "GET",
                            format!("/api/inventory/{sku}"),
                            None,
                        ),
                    };
                let trace = format!(
                    "{:016x}{:016x}",
                    keel::codec::rand::next_u64(),
                    keel::codec::rand::next_u64()
                );
                let extra = [(
                    "traceparent",
                    format!("00-{trace}-{:016x}-01", keel::codec::rand::next_u64() | 1),
                )];
                let t = Instant::now();
                let r = send(&http, gw, method, &path, body, &extra).await;
                let took = t.elapsed();
                let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
                s.latencies.entry(route).or_default().push(took);
                match r {
                    Ok((status, body)) if status < 400 => {
                        if route.starts_with("POST") {
                            let id = body["id"].as_str().unwrap_or_default().to_string();
                            if s.traced_order.is_none() {
                                s.traced_order = Some((trace.clone(), id.clone()));
                            }
                            s.orders.push(id);
                        }
                    }
                    // A sold-out SKU is the shop working, not failing: counted apart.
                    Ok((409, _)) if route.starts_with("POST") => s.sold_out += 1,
                    Ok((status, body)) => {
                        *s.errors
                            .entry(format!(
                                "{route} → {status} {}",
                                body["error"].as_str().unwrap_or("")
                            ))
                            .or_default() += 1;
                    }
                    Err(e) => *s.errors.entry(format!("{route} → {e}")).or_default() += 1,
                }
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    // A progress bar on stderr while the workload runs.
    let total = plan.duration.as_secs_f64();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    while tty && workers.iter().any(|w| !w.is_finished()) {
        let elapsed = (plan.duration.as_secs_f64()
            - deadline
                .saturating_duration_since(Instant::now())
                .as_secs_f64())
        .min(total);
        let filled = ((elapsed / total) * 30.0) as usize;
        eprint!(
            "\r  [{}{}] {:>3.0} %  {} requests",
            "#".repeat(filled),
            " ".repeat(30 - filled.min(30)),
            elapsed / total * 100.0,
            done.load(std::sync::atomic::Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if tty {
        eprintln!();
    }
    for w in workers {
        let _ = w.await;
    }

    // Every placed order's event is consumed exactly once.
    let (orders, traced) = {
        let s = stats.lock().unwrap_or_else(|p| p.into_inner());
        (s.orders.clone(), s.traced_order.clone())
    };
    let settle = Instant::now();
    let mut confirmed_once = 0;
    while settle.elapsed() < Duration::from_secs(10) {
        confirmed_once = 0;
        for id in &orders {
            if keel_shop::inventory::confirmations(&shop.inventory_db, id).await? == 1 {
                confirmed_once += 1;
            }
        }
        if confirmed_once == orders.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;

    // The workers are done: take the numbers out, so no lock is held across the awaits below.
    let s = std::mem::take(&mut *stats.lock().unwrap_or_else(|p| p.into_inner()));
    let requests: usize = s.latencies.values().map(Vec::len).sum();
    let errors: u64 = s.errors.values().sum();
    println!();
    println!(
        "Keel demo — the shop, {:.0} s of mixed traffic, {} in flight",
        plan.duration.as_secs_f64(),
        plan.concurrency
    );
    println!();
    println!(
        "  {requests} requests, {errors} errors, {:.0} req/s{}",
        requests as f64 / plan.duration.as_secs_f64(),
        if s.sold_out > 0 {
            format!(" ({} orders refused: sold out)", s.sold_out)
        } else {
            String::new()
        }
    );
    println!();
    println!(
        "  {:<28} {:>8} {:>9} {:>9} {:>9}",
        "route (through the gateway)", "count", "p50", "p99", "p99.9"
    );
    for (route, lat) in &s.latencies {
        let mut v = lat.clone();
        v.sort();
        let q = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
        println!(
            "  {:<28} {:>8} {:>9} {:>9} {:>9}",
            route,
            v.len(),
            ms(q(0.5)),
            ms(q(0.99)),
            ms(q(0.999))
        );
    }
    for (e, n) in &s.errors {
        println!("  error ×{n}: {e}");
    }
    let c = &shop.counters;
    use std::sync::atomic::Ordering::Relaxed;
    println!();
    println!(
        "  messaging: {} OrderPlaced published, {} applied by inventory, {} duplicates skipped, outbox backlog {}; {} of {} orders confirmed exactly once",
        c.outbox.published.load(Relaxed),
        c.consumer.applied.load(Relaxed),
        c.consumer.duplicates.load(Relaxed),
        c.outbox.backlog.load(Relaxed),
        confirmed_once,
        orders.len()
    );
    if let Some((trace, order)) = &traced {
        println!();
        println!("  one order, hop by hop (trace {trace}, order {order}):");
        let spans: Vec<Span> = collector
            .spans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|sp| hex(&sp.trace_id) == *trace)
            .cloned()
            .collect();
        print_trace(&spans);
    }
    let ok = errors == 0 && confirmed_once == orders.len() && !orders.is_empty();
    println!();
    if plan.smoke {
        println!("  smoke: {}", if ok { "passed" } else { "FAILED" });
        shop.stop().await?;
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(ok);
    }
    println!("  The shop keeps running. Try:");
    println!("    curl -s -H 'x-api-key: {KEY}' http://{gw}/api/inventory/keel-mug");
    println!(
        "    curl -s -H 'x-api-key: {KEY}' -H 'content-type: application/json' -d '{{\"name\":\"You\",\"email\":\"you@example.com\"}}' http://{gw}/api/users"
    );
    println!(
        "    curl -s -H 'x-api-key: {KEY}' -H 'content-type: application/json' -d '{{\"user_id\":\"{}\",\"sku\":\"keel-hoodie\",\"quantity\":1}}' http://{gw}/api/orders",
        users[0]
    );
    if let Some(order) = orders.first() {
        println!(
            "    curl -s -X POST -H 'x-api-key: {KEY}' http://{gw}/api/orders/{order}/cancel   # stock comes back via OrderCancelled"
        );
    }
    println!(
        "    curl -s http://{}/metrics | grep keel_messaging",
        shop.order.admin
    );
    println!("  Ctrl-C drains and stops every service.");
    let _ = tokio::signal::ctrl_c().await;
    eprintln!("keel demo: draining…");
    shop.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ok)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The spans of one trace as a tree, in start order, with their durations.
fn print_trace(spans: &[Span]) {
    if spans.is_empty() {
        println!("    (no spans arrived)");
        return;
    }
    let ids: std::collections::HashSet<Vec<u8>> = spans.iter().map(|s| s.span_id.clone()).collect();
    let mut roots: Vec<&Span> = spans
        .iter()
        .filter(|s| !ids.contains(&s.parent_span_id))
        .collect();
    roots.sort_by_key(|s| s.start_time_unix_nano);
    let t0 = roots.first().map_or(0, |s| s.start_time_unix_nano);
    fn walk(s: &Span, all: &[Span], depth: usize, t0: u64) {
        let kind = match s.kind {
            2 => "server",
            3 => "client",
            4 => "producer",
            5 => "consumer",
            _ => "internal",
        };
        let route = s
            .attributes
            .iter()
            .find(|a| {
                a.key == "http.route"
                    || a.key == "rpc.method"
                    || a.key == "messaging.destination.name"
            })
            .and_then(|a| a.value.as_ref())
            .and_then(|v| match &v.value {
                Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(x)) => {
                    Some(x.clone())
                }
                _ => None,
            })
            .unwrap_or_default();
        println!(
            "    {:>8} {}{} {} {} ({})",
            format!(
                "+{:.2}",
                (s.start_time_unix_nano.saturating_sub(t0)) as f64 / 1e6
            ),
            "  ".repeat(depth),
            kind,
            s.name,
            route,
            ms(Duration::from_nanos(
                s.end_time_unix_nano.saturating_sub(s.start_time_unix_nano)
            ))
        );
        let mut kids: Vec<&Span> = all
            .iter()
            .filter(|c| c.parent_span_id == s.span_id)
            .collect();
        kids.sort_by_key(|c| c.start_time_unix_nano);
        for k in kids {
            walk(k, all, depth + 1, t0);
        }
    }
    for r in roots {
        walk(r, spans, 0, t0);
    }
}
