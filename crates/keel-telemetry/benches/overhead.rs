//! What telemetry costs (BENCH.md T4): an unsampled request's record, a sampled one (its
//! span built and queued), and a whole HTTP request through a Keel server with and without
//! the telemetry observer installed.
//!
//! `cargo bench -p keel-telemetry --bench overhead`. The request groups run in order:
//! baseline first, then the observer is installed (it is process-wide and cannot be removed).
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::{BodyExt, Full};
use keel_core::Context;
use keel_core::context::InboundPolicy;
use keel_core::observe::{Outcome, ServerRecord};
use keel_telemetry::trace::{TraceConfig, Tracer};
use keel_telemetry::{Metrics, MetricsConfig, Telemetry};

fn context(sampled: bool) -> Context {
    let mut h = http::HeaderMap::new();
    let flags = if sampled { "01" } else { "00" };
    h.insert(
        "traceparent",
        format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}")
            .parse()
            .unwrap(),
    );
    let policy = InboundPolicy {
        route_timeout: Duration::from_secs(30),
        sample_roots: false,
    };
    Context::from_headers(&h, &policy, None, keel_core::tasks::Registry::global()).unwrap()
}

fn record<'a>(ctx: &'a Context, method: &'a http::Method) -> ServerRecord<'a> {
    ServerRecord {
        ctx: Some(ctx),
        route: "/orders/{id}",
        route_is_template: true,
        method,
        grpc: false,
        status: Some(200),
        grpc_status: None,
        outcome: Outcome::Answered,
        start: SystemTime::now(),
        duration: Duration::from_micros(420),
        peer: None,
    }
}

fn records(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let method = http::Method::GET;
    let mut g = c.benchmark_group("record");

    let metrics_only = Telemetry {
        metrics: Metrics::new(MetricsConfig::default()),
        spans: Arc::default(),
    };
    let unsampled = context(false);
    g.bench_function("metrics only", |b| {
        b.iter(|| {
            keel_core::observe::Observer::server(&metrics_only, &record(&unsampled, &method));
        });
    });

    // A tracer with an endpoint, so spans are really built and queued; the interval is long
    // enough that nothing is exported while measuring, and each measurement gets a fresh
    // queue big enough to never drop.
    let tracer_for = |capacity: usize| {
        let _guard = rt.enter();
        Tracer::start(&TraceConfig {
            endpoint: Some("http://127.0.0.1:9".into()),
            queue_capacity: capacity.max(1),
            max_batch: capacity.max(1),
            export_interval: keel_config::Duration::from_secs(3600),
            ..TraceConfig::default()
        })
    };
    g.bench_function("unsampled span (metrics + tracer)", |b| {
        b.iter_custom(|iters| {
            let t = Telemetry {
                metrics: Metrics::new(MetricsConfig::default()),
                spans: Arc::default(),
            };
            let _ = t.spans.set(Arc::new(tracer_for(1)));
            let start = Instant::now();
            for _ in 0..iters {
                keel_core::observe::Observer::server(&t, &record(&unsampled, &method));
            }
            start.elapsed()
        });
    });
    // A sampled record: the metrics, plus its OTLP span built (the queue push that follows
    // in `record_server` is one short mutex section; measuring it here would measure page
    // faults of an ever-growing queue instead).
    let sampled = context(true);
    g.bench_function("sampled span built (metrics + OTLP span)", |b| {
        b.iter(|| {
            let r = record(&sampled, &method);
            metrics_only.metrics.server_started();
            metrics_only.metrics.record_server(&r);
            std::hint::black_box(Tracer::server_span(&r))
        });
    });
    g.finish();
}

/// A Keel server on loopback with one route, and a keep-alive client.
fn serve(rt: &tokio::runtime::Runtime) -> SocketAddr {
    rt.block_on(async {
        let router = axum::Router::new().route(
            "/orders/{id}",
            axum::routing::get(|_ctx: Context| async { "ok" }),
        );
        let settings = keel_server::HttpSettings {
            server: keel_server::ServerConfig {
                addr: "127.0.0.1:0".parse().unwrap(),
                ..keel_server::ServerConfig::default()
            },
            ..keel_server::HttpSettings::default()
        };
        let shutdown = keel_core::Shutdown::new();
        let readiness = keel_server::Readiness::new(Default::default(), shutdown.clone());
        let server = keel_server::Server::bind(&settings, 1, readiness, shutdown).unwrap();
        let addr = server.local_addr();
        tokio::spawn(server.serve(router));
        addr
    })
}

fn requests(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let addr = serve(&rt);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let url: http::Uri = format!("http://{addr}/orders/7").parse().unwrap();
    let one = || async {
        let req = http::Request::get(url.clone())
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        resp.into_body().collect().await.unwrap();
    };
    let mut g = c.benchmark_group("request");
    g.sample_size(30);
    g.bench_function("without telemetry", |b| {
        b.iter(|| rt.block_on(one()));
    });
    // From here on every request is observed: metrics, and a sampled span built and queued.
    let tracer = {
        let _guard = rt.enter();
        Tracer::start(&TraceConfig {
            endpoint: Some("http://127.0.0.1:9".into()),
            queue_capacity: 1 << 20,
            export_interval: keel_config::Duration::from_secs(3600),
            ..TraceConfig::default()
        })
    };
    let telemetry = Telemetry {
        metrics: Metrics::new(MetricsConfig::default()),
        spans: Arc::default(),
    };
    let _ = telemetry.spans.set(Arc::new(tracer));
    assert!(keel_core::observe::install(Arc::new(telemetry)).is_ok());
    g.bench_function("with telemetry (metrics + sampled span)", |b| {
        b.iter(|| rt.block_on(one()));
    });
    g.finish();
}

criterion_group!(benches, requests, records);
criterion_main!(benches);
