//! Wiring telemetry into an [`App`](crate::App): the App's own observer (metrics and span
//! export fed by its server's, clients' and consumers' records), `/metrics` on the admin
//! port, and the scrape-time collectors for what keeps its own counters (runtime, tasks,
//! server, client pools).

use std::sync::Arc;

use keel_core::tasks::Registry;
use keel_telemetry::trace::{TraceConfig, Tracer};
use keel_telemetry::{Metrics, MetricsConfig, Telemetry};

/// One App's telemetry: its own metrics registry (with its task families), recording only
/// when `[metrics] enabled`.
pub(crate) fn telemetry(cfg: &MetricsConfig, registry: &'static Registry) -> Telemetry {
    let metrics = Metrics::new(cfg.clone());
    keel_telemetry::collectors::tasks(&metrics, registry);
    Telemetry::new(metrics, cfg.enabled)
}

/// Whether `[tracing]` (with the `OTEL_*` environment) names an endpoint, i.e. whether spans
/// can be exported at all.
pub(crate) fn tracing_configured(cfg: &TraceConfig, service: &str) -> bool {
    let mut c = cfg.clone();
    c.service_name = service.to_string();
    let _ = c.apply_env(&|k| std::env::var(k).ok());
    c.enabled && c.endpoint.is_some()
}

/// Start `service`'s span exporter from `[tracing]` and the `OTEL_*` environment and connect
/// it to the App's telemetry. Needs the runtime (the exporter is a task).
pub(crate) fn start_tracer(cfg: &TraceConfig, service: &str, telemetry: &Telemetry) -> Tracer {
    let mut cfg = effective_trace_config(cfg, service, &|k| std::env::var(k).ok()).0;
    if cfg.endpoint.is_none() {
        cfg.enabled = false;
    }
    let tracer = Tracer::start(&cfg);
    if tracer.is_enabled() {
        tracing::info!(endpoint = ?cfg.endpoint, protocol = cfg.protocol.as_str(), service = %cfg.service_name, "exporting spans over OTLP");
    }
    if telemetry.spans.set(Arc::new(tracer.clone())).is_ok() {
        let stats = tracer.clone();
        telemetry
            .metrics
            .add_collector(move |e| trace_families(e, &stats));
    }
    tracer
}

/// `[tracing]` with the service name defaulted to the app's and the `OTEL_*` variables
/// applied; the warnings name each variable that was ignored and why.
pub(crate) fn effective_trace_config(
    cfg: &TraceConfig,
    service: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> (TraceConfig, Vec<String>) {
    let mut cfg = cfg.clone();
    if cfg.service_name == TraceConfig::default().service_name {
        cfg.service_name = service.to_string();
    }
    let warnings = cfg.apply_env(env);
    for w in &warnings {
        tracing::warn!("{w}");
    }
    (cfg, warnings)
}

/// The sampling ratio for new traces: `tracing.sample_ratio` unless `OTEL_TRACES_SAMPLER`
/// says otherwise.
pub(crate) fn sample_ratio(cfg: &TraceConfig, service: &str) -> f64 {
    let mut c = cfg.clone();
    c.service_name = service.to_string();
    // Warnings about the other variables were logged when the tracer started.
    let _ = c.apply_env(&|k| std::env::var(k).ok());
    c.sample_ratio
}

fn trace_families(e: &mut keel_telemetry::metrics::Exposition, t: &Tracer) {
    let s = t.stats();
    let fams: [(&str, &str, &str, f64); 5] = [
        (
            "keel_trace_spans_queued",
            "Spans waiting for export now.",
            "gauge",
            s.queued as f64,
        ),
        (
            "keel_trace_spans_exported_total",
            "Spans the collector accepted.",
            "counter",
            s.exported as f64,
        ),
        (
            "keel_trace_spans_dropped_total",
            "Spans dropped because the export queue was full (collector slow or down).",
            "counter",
            s.dropped as f64,
        ),
        (
            "keel_trace_export_errors_total",
            "Export requests that failed; their spans are lost.",
            "counter",
            s.export_errors as f64,
        ),
        (
            "keel_trace_spans_failed_total",
            "Spans lost after leaving the queue (failed exports, shutdown).",
            "counter",
            s.failed_spans as f64,
        ),
    ];
    for (name, help, kind, v) in fams {
        e.family(name, help, kind);
        e.sample(name, &[], v);
    }
}

/// Prometheus' text exposition content type.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Pool, retry and breaker figures of every client built so far, per upstream.
pub(crate) fn client_families(
    e: &mut keel_telemetry::metrics::Exposition,
    clients: &[Arc<keel_client::client::Client>],
) {
    let fams: [(&str, &str, &str); 13] = [
        (
            "keel_client_calls_total",
            "Calls made through the client (before retries).",
            "counter",
        ),
        (
            "keel_client_calls_without_context_total",
            "Calls that found no request context and went out with a new trace and a fallback deadline (a handler that did not pass its Context).",
            "counter",
        ),
        ("keel_client_retries_total", "Retries sent.", "counter"),
        (
            "keel_client_hedges_total",
            "Hedged attempts sent.",
            "counter",
        ),
        (
            "keel_client_connections_opened_total",
            "Connections opened to the upstream's endpoints.",
            "counter",
        ),
        (
            "keel_client_connect_errors_total",
            "Failed connection attempts.",
            "counter",
        ),
        (
            "keel_client_connection_reuse_ratio",
            "Share of requests sent on an existing connection.",
            "gauge",
        ),
        (
            "keel_client_connections",
            "Connections to the upstream now, by state (open includes idle).",
            "gauge",
        ),
        (
            "keel_client_time_wait_sockets",
            "This process's sockets in TIME_WAIT towards the upstream's endpoints.",
            "gauge",
        ),
        (
            "keel_client_retry_budget_exhausted_total",
            "Retries refused because the budget was empty.",
            "counter",
        ),
        (
            "keel_client_breaker_rejections_total",
            "Calls rejected locally by the adaptive breaker (route \"\" is the upstream's own).",
            "counter",
        ),
        (
            "keel_client_breaker_reject_probability",
            "Probability a call arriving now is rejected locally.",
            "gauge",
        ),
        (
            "keel_client_endpoints_ejected",
            "Endpoints ejected by outlier detection now.",
            "gauge",
        ),
    ];
    for (name, help, kind) in fams {
        e.family(name, help, kind);
    }
    for c in clients {
        let up = c.name();
        let l = [("upstream", up)];
        let s = c.stats();
        e.sample("keel_client_calls_total", &l, s.calls as f64);
        e.sample(
            "keel_client_calls_without_context_total",
            &l,
            s.calls_without_context as f64,
        );
        e.sample("keel_client_retries_total", &l, s.retries as f64);
        e.sample("keel_client_hedges_total", &l, s.hedges as f64);
        e.sample(
            "keel_client_connections_opened_total",
            &l,
            s.pool.connects as f64,
        );
        e.sample(
            "keel_client_connect_errors_total",
            &l,
            s.pool.connect_errors as f64,
        );
        e.sample(
            "keel_client_connection_reuse_ratio",
            &l,
            s.pool.reuse_ratio(),
        );
        e.sample(
            "keel_client_connections",
            &[("upstream", up), ("state", "open")],
            s.pool.open as f64,
        );
        e.sample(
            "keel_client_connections",
            &[("upstream", up), ("state", "idle")],
            s.pool.idle as f64,
        );
        let addrs: Vec<std::net::SocketAddr> = c
            .upstream()
            .endpoints()
            .snapshot()
            .endpoints
            .iter()
            .map(|ep| ep.addr)
            .collect();
        let tw: usize = keel_client::sockets::time_wait_towards(&addrs)
            .values()
            .sum();
        e.sample("keel_client_time_wait_sockets", &l, tw as f64);
        e.sample(
            "keel_client_retry_budget_exhausted_total",
            &l,
            c.budget().stats().exhausted as f64,
        );
        let mut breakers = vec![(String::new(), s.breaker)];
        breakers.extend(s.route_breakers.iter().cloned());
        for (route, b) in &breakers {
            let l = [("upstream", up), ("route", route.as_str())];
            e.sample(
                "keel_client_breaker_rejections_total",
                &l,
                b.local_rejects as f64,
            );
            e.sample(
                "keel_client_breaker_reject_probability",
                &l,
                b.reject_probability,
            );
        }
        e.sample(
            "keel_client_endpoints_ejected",
            &l,
            c.upstream().outlier().ejected().len() as f64,
        );
    }
}

/// The overload limiter's signals. `keel_overload_saturation` (in flight ÷ limit) is the
/// gauge an autoscaler should scale on: it rises before latency does and is already
/// normalised for instance size.
pub(crate) fn overload_families(
    e: &mut keel_telemetry::metrics::Exposition,
    o: &keel_server::overload::OverloadStats,
) {
    let gauges: [(&str, &str, f64); 12] = [
        (
            "keel_overload_limit",
            "The adaptive concurrency limit now.",
            o.limit,
        ),
        (
            "keel_overload_in_flight",
            "Requests holding a slot under the limit.",
            o.in_flight as f64,
        ),
        (
            "keel_overload_queued",
            "Requests waiting for a slot.",
            o.queued as f64,
        ),
        (
            "keel_overload_saturation",
            "In flight divided by the limit: scale out on this (HPA custom metric), not on CPU.",
            if o.limit > 0.0 {
                o.in_flight as f64 / o.limit
            } else {
                0.0
            },
        ),
        (
            "keel_overload_expected_service_seconds",
            "Expected service time now: requests with less time left are refused at admission.",
            o.expected.as_secs_f64(),
        ),
        (
            "keel_overload_baseline_service_seconds",
            "The service's own time (upstream waits left out) when not overloaded.",
            o.baseline.as_secs_f64(),
        ),
        (
            "keel_overload_queue_delay_seconds",
            "Queueing delay of the last request: from its bytes reaching the socket to admission.",
            o.queue_delay.as_secs_f64(),
        ),
        (
            "keel_overload_min_queue_delay_seconds",
            "Least queueing delay over the last CoDel interval: over the target means a standing queue.",
            o.min_queue_delay.as_secs_f64(),
        ),
        (
            "keel_overload_standing_queue",
            "1 while a standing queue is being shed (CoDel), else 0.",
            f64::from(u8::from(o.standing_queue)),
        ),
        (
            "keel_overload_queue_stalled",
            "1 while more waiters for a slot time out than are served (they then wait 1 ms, not queue_timeout), else 0.",
            f64::from(u8::from(o.queue_stalled)),
        ),
        (
            "keel_overload_cpu_usage",
            "Process CPU usage over the cores it may use, as last sampled.",
            o.cpu,
        ),
        (
            "keel_overload_cpu_hot",
            "1 while CPU usage is over the threshold or within its cool-off, else 0.",
            f64::from(u8::from(o.cpu_hot)),
        ),
    ];
    for (name, help, v) in gauges {
        e.family(name, help, "gauge");
        e.sample(name, &[], v);
    }
    e.family(
        "keel_overload_admitted_total",
        "Requests admitted under the limit.",
        "counter",
    );
    e.sample("keel_overload_admitted_total", &[], o.admitted as f64);
    e.family(
        "keel_overload_shed_total",
        "Requests shed, by reason: queue_full, queue_timeout (over the concurrency limit), \
         deadline (too little time left), cpu and queue_delay (a standing queue, with the CPU \
         hot or not).",
        "counter",
    );
    for (why, n) in keel_server::overload::Shed::ALL.iter().zip(o.shed) {
        e.sample(
            "keel_overload_shed_total",
            &[("reason", why.as_str())],
            n as f64,
        );
    }
}
