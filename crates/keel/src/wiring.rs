//! Wiring telemetry into an [`App`](crate::App): the process-wide observer (metrics and span
//! export fed by the server's and the client's records), `/metrics` on the admin port, and
//! the scrape-time collectors for what keeps its own counters (runtime, tasks, server,
//! client pools).

use std::sync::{Arc, OnceLock};

use keel_telemetry::{Metrics, MetricsConfig, Telemetry};

/// The process's telemetry. One per process: the observer hook is global, and several
/// `App`s in one process (tests) share it.
static TELEMETRY: OnceLock<Telemetry> = OnceLock::new();

/// The process's telemetry, installing it on first use with `cfg`.
pub(crate) fn global(cfg: &MetricsConfig) -> &'static Telemetry {
    TELEMETRY.get_or_init(|| {
        let metrics = Metrics::new(cfg.clone());
        keel_telemetry::collectors::tasks(&metrics);
        let t = Telemetry {
            metrics,
            spans: None,
        };
        // Only fails if something else installed an observer first; then that one stays.
        if keel_core::observe::install(Arc::new(t.clone())).is_err() {
            tracing::warn!("an observer was already installed; Keel's metrics will miss requests");
        }
        t
    })
}

/// Prometheus' text exposition content type.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Pool, retry and breaker figures of every client built so far, per upstream.
pub(crate) fn client_families(
    e: &mut keel_telemetry::metrics::Exposition,
    clients: &[Arc<keel_client::client::Client>],
) {
    let fams: [(&str, &str, &str); 12] = [
        (
            "keel_client_calls_total",
            "Calls made through the client (before retries).",
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
