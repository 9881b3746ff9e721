//! What every connection of one server shares, across all shards: the connection-level limits
//! (in the form the connection driver wants them), the lifecycle, the counters, and the
//! request stack's layers (cloned into each connection's stack).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use keel_core::Shutdown;
use keel_core::observe::SharedObserver;
use keel_core::tasks::Registry;
use tokio::time::Instant;

use crate::config::{HttpSettings, ServerConfig};
use crate::layer::Layers;
use crate::readiness::Readiness;
use crate::stats::Stats;

/// The limits in the form the hot path wants them (plain integers, no re-parsing).
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) max_header_bytes: usize,
    pub(crate) max_headers: usize,
    pub(crate) header_read_timeout_ms: u64,
    pub(crate) idle_timeout_ms: u64,
    /// 0 = never park.
    pub(crate) park_idle_after_ms: u64,
    pub(crate) send_timeout_ms: u64,
    pub(crate) h2_max_concurrent_streams: u32,
    pub(crate) h2_keepalive_interval: std::time::Duration,
    pub(crate) h2_keepalive_timeout: std::time::Duration,
    pub(crate) h2_max_pending_accept_reset_streams: usize,
    pub(crate) h2_max_local_error_reset_streams: usize,
    pub(crate) h2_extended_connect: bool,
}

impl Limits {
    fn from_config(c: &ServerConfig) -> Self {
        Limits {
            max_header_bytes: usize::try_from(c.max_header_bytes.get()).unwrap_or(usize::MAX),
            max_headers: c.max_headers,
            header_read_timeout_ms: millis(c.header_read_timeout.get()),
            idle_timeout_ms: millis(c.idle_timeout.get()),
            park_idle_after_ms: millis(c.park_idle_after.get()),
            send_timeout_ms: millis(c.send_timeout.get()),
            h2_max_concurrent_streams: c.http2_max_concurrent_streams,
            h2_keepalive_interval: c.http2_keepalive_interval.get(),
            h2_keepalive_timeout: c.http2_keepalive_timeout.get(),
            h2_max_pending_accept_reset_streams: c.http2_max_pending_accept_reset_streams,
            h2_max_local_error_reset_streams: c.http2_max_local_error_reset_streams,
            h2_extended_connect: c.http2_extended_connect,
        }
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 4)
}

#[derive(Debug)]
pub(crate) struct Shared {
    epoch: Instant,
    pub(crate) limits: Limits,
    pub(crate) shutdown: Shutdown,
    pub(crate) stats: Arc<Stats>,
    /// The adaptive concurrency limit; `None` when `[overload]` is disabled.
    pub(crate) limiter: Option<crate::overload::Limiter>,
    /// The listening sockets ask the kernel to date received segments, so every accepted
    /// connection's reads carry receive timestamps (`crate::rxstamp`).
    pub(crate) rx_stamped: bool,
    /// The request path's layers, composed around the user's service once per listener.
    pub(crate) layers: Layers,
}

impl Shared {
    pub(crate) fn new(
        settings: &HttpSettings,
        readiness: Readiness,
        shutdown: Shutdown,
        registry: &'static Registry,
        observer: Option<SharedObserver>,
        rx_stamped: bool,
    ) -> Arc<Self> {
        let stats = Arc::new(Stats::default());
        let limiter = settings
            .overload
            .enabled
            .then(|| crate::overload::Limiter::new(&settings.overload));
        let layers = Layers::new(
            settings,
            readiness,
            shutdown.clone(),
            registry,
            observer,
            stats.clone(),
            limiter.clone(),
        );
        Arc::new(Shared {
            epoch: Instant::now(),
            limits: Limits::from_config(&settings.server),
            shutdown,
            stats,
            limiter,
            rx_stamped,
            layers,
        })
    }

    /// Milliseconds since the server started; connection timers are kept in this unit so
    /// they fit in atomics.
    pub(crate) fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// `at` as milliseconds since the epoch.
    pub(crate) fn ms_at(&self, at: Instant) -> u64 {
        millis(at.saturating_duration_since(self.epoch))
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
        Shared::new(
            &settings,
            readiness,
            shutdown,
            Registry::global(),
            None,
            false,
        )
    }
}
