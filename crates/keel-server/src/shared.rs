//! State shared by every connection of one server, across all shards.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use http::HeaderValue;
use keel_core::Shutdown;
use tokio::time::Instant;

use keel_core::tasks::Registry;

use crate::config::ServerConfig;
use crate::context::DeadlinePolicy;
use crate::readiness::Readiness;
use crate::server::HttpSettings;

/// The limits in the form the hot path wants them (plain integers, no re-parsing).
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) max_header_bytes: usize,
    pub(crate) max_headers: usize,
    pub(crate) max_body_bytes: u64,
    pub(crate) header_read_timeout_ms: u64,
    pub(crate) idle_timeout_ms: u64,
    pub(crate) h2_max_concurrent_streams: u32,
    pub(crate) h2_keepalive_interval: std::time::Duration,
    pub(crate) h2_keepalive_timeout: std::time::Duration,
    pub(crate) h2_max_pending_accept_reset_streams: usize,
    pub(crate) h2_max_local_error_reset_streams: usize,
}

impl Limits {
    fn from_config(c: &ServerConfig) -> Self {
        Limits {
            max_header_bytes: usize::try_from(c.max_header_bytes.get()).unwrap_or(usize::MAX),
            max_headers: c.max_headers,
            max_body_bytes: c.max_body_bytes.get(),
            header_read_timeout_ms: millis(c.header_read_timeout.get()),
            idle_timeout_ms: millis(c.idle_timeout.get()),
            h2_max_concurrent_streams: c.http2_max_concurrent_streams,
            h2_keepalive_interval: c.http2_keepalive_interval.get(),
            h2_keepalive_timeout: c.http2_keepalive_timeout.get(),
            h2_max_pending_accept_reset_streams: c.http2_max_pending_accept_reset_streams,
            h2_max_local_error_reset_streams: c.http2_max_local_error_reset_streams,
        }
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 4)
}

/// Counters the server keeps about itself (exported as metrics by the telemetry issue).
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests currently being handled, across all connections.
    pub in_flight: AtomicUsize,
    /// Connections currently open.
    pub connections: AtomicUsize,
    /// Connections accepted since start.
    pub accepted: AtomicU64,
    /// Connections closed because a request head did not arrive within `header_read_timeout`.
    pub header_timeouts: AtomicU64,
    /// Requests refused with 413 before reaching the handler.
    pub body_too_large: AtomicU64,
    /// Requests refused on arrival: malformed propagation headers (400) or an already
    /// expired deadline (504).
    pub refused_on_arrival: AtomicU64,
    /// Handlers cancelled because their deadline passed (answered 504).
    pub deadline_exceeded: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct Shared {
    epoch: Instant,
    pub(crate) limits: Limits,
    pub(crate) probes: Option<ProbePaths>,
    pub(crate) readiness: Readiness,
    pub(crate) shutdown: Shutdown,
    pub(crate) stats: Arc<Stats>,
    /// `Keep-Alive: timeout=N`, precomputed once.
    pub(crate) keep_alive: HeaderValue,
    pub(crate) deadlines: DeadlinePolicy,
    pub(crate) registry: &'static Registry,
    /// The adaptive concurrency limit; `None` when `[overload]` is disabled.
    pub(crate) limiter: Option<crate::overload::Limiter>,
    /// `Retry-After` for shed responses, precomputed.
    pub(crate) retry_after: HeaderValue,
}

#[derive(Debug, Clone)]
pub(crate) struct ProbePaths {
    pub(crate) livez: String,
    pub(crate) readyz: String,
    pub(crate) healthz: String,
}

impl Shared {
    pub(crate) fn new(
        settings: &HttpSettings,
        readiness: Readiness,
        shutdown: Shutdown,
    ) -> Arc<Self> {
        let cfg = &settings.server;
        let probes = &settings.probes;
        let limits = Limits::from_config(cfg);
        let secs = (limits.idle_timeout_ms / 1000).max(1);
        let keep_alive = HeaderValue::try_from(format!("timeout={secs}"))
            .unwrap_or_else(|_| HeaderValue::from_static("timeout=60"));
        Arc::new(Shared {
            epoch: Instant::now(),
            limits,
            probes: probes.main_port.then(|| ProbePaths {
                livez: probes.livez_path.clone(),
                readyz: probes.readyz_path.clone(),
                healthz: probes.healthz_path.clone(),
            }),
            readiness,
            shutdown,
            stats: Arc::new(Stats::default()),
            keep_alive,
            deadlines: DeadlinePolicy::new(&settings.deadline, settings.propagation.sample_ratio),
            registry: Registry::global(),
            limiter: settings
                .overload
                .enabled
                .then(|| crate::overload::Limiter::new(&settings.overload)),
            retry_after: HeaderValue::from(settings.overload.retry_after_secs),
        })
    }

    /// Milliseconds since the server started; connection timers are kept in this unit so
    /// they fit in atomics.
    pub(crate) fn now_ms(&self) -> u64 {
        millis(Instant::now().saturating_duration_since(self.epoch))
    }

    pub(crate) fn instant_at(&self, ms: u64) -> Instant {
        self.epoch + std::time::Duration::from_millis(ms)
    }

    pub(crate) fn request_started(&self) {
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn request_finished(&self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    #[cfg(test)]
    pub(crate) fn for_tests(cfg: &ServerConfig) -> Arc<Self> {
        let shutdown = Shutdown::new();
        let readiness = Readiness::new(Default::default(), shutdown.clone());
        let settings = HttpSettings {
            server: cfg.clone(),
            ..HttpSettings::default()
        };
        Shared::new(&settings, readiness, shutdown)
    }
}
