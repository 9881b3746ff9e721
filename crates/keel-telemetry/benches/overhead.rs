//! What telemetry costs (BENCH.md T4): an unsampled request's record, a sampled one (its
//! span built and queued), and a whole HTTP request through a Keel server with and without
//! the telemetry observer installed.
//!
//! `cargo bench -p keel-telemetry --bench overhead`. The request groups compare two servers
//! in one process: one without an observer, one whose observer is the telemetry.
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
        start: None,
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

    let metrics_only = Telemetry::new(Metrics::new(MetricsConfig::default()), true);
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
            let t = Telemetry::new(Metrics::new(MetricsConfig::default()), true);
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
fn serve(
    rt: &tokio::runtime::Runtime,
    observer: Option<keel_core::observe::SharedObserver>,
) -> SocketAddr {
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
        let server = keel_server::Server::bind_with(
            &settings,
            1,
            readiness,
            shutdown,
            keel_core::tasks::Registry::global(),
            observer,
        )
        .unwrap();
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
    // The second server observes every request: metrics, and a sampled span built and queued.
    let tracer = {
        let _guard = rt.enter();
        Tracer::start(&TraceConfig {
            endpoint: Some("http://127.0.0.1:9".into()),
            queue_capacity: 1 << 20,
            export_interval: keel_config::Duration::from_secs(3600),
            ..TraceConfig::default()
        })
    };
    let telemetry = Telemetry::new(Metrics::new(MetricsConfig::default()), true);
    let _ = telemetry.spans.set(Arc::new(tracer));
    let plain = serve(&rt, None);
    let observed = serve(&rt, Some(Arc::new(telemetry)));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let one = |addr: SocketAddr| {
        let client = client.clone();
        async move {
            let url: http::Uri = format!("http://{addr}/orders/7").parse().unwrap();
            let req = http::Request::get(url)
                .header(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = client.request(req).await.unwrap();
            resp.into_body().collect().await.unwrap();
        }
    };
    let mut g = c.benchmark_group("request");
    g.sample_size(30);
    g.bench_function("without telemetry", |b| {
        b.iter(|| rt.block_on(one(plain)));
    });
    g.bench_function("with telemetry (metrics + sampled span)", |b| {
        b.iter(|| rt.block_on(one(observed)));
    });
    g.finish();
}

criterion_group!(benches, requests, records);
criterion_main!(benches);
