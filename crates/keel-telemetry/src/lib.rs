//! Keel's telemetry: Prometheus metrics (`metrics`), OTLP trace export (`trace`), and the
//! [`keel_core::observe::Observer`] that feeds both from the server's and the client's records.
//!
//! Nothing here is on the request path beyond the observer's record handling: metric updates
//! are atomic increments on pre-resolved series, spans go into a bounded queue that a
//! background task drains, and everything else (client pools, runtime, tasks) is read when
//! `/metrics` is scraped.

pub mod collectors;
pub mod metrics;
pub mod trace;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keel_core::observe::{ClientRecord, MessageRecord, Observer, ServerRecord};

pub use metrics::{Metrics, MetricsConfig};

/// Where finished spans go (the OTLP exporter implements it).
pub trait SpanSink: Send + Sync + std::fmt::Debug + 'static {
    /// A server request ended.
    fn record_server(&self, record: &ServerRecord<'_>);
    /// An outbound attempt ended.
    fn record_client(&self, record: &ClientRecord<'_>);
    /// A message was published or processed.
    fn record_message(&self, record: &MessageRecord<'_>);
}

/// One service's observer: every record goes to its metrics (unless `[metrics] enabled =
/// false`) and to its span sink, if any (which keeps only sampled traces). Each `keel::App`
/// has its own, so two services in one process keep separate series and span resources.
#[derive(Debug, Clone)]
pub struct Telemetry {
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Whether records update `metrics` (`[metrics] enabled`); spans are exported either way.
    pub record_metrics: bool,
    /// Span export, set once the exporter has started (it needs a runtime, which the
    /// observer does not).
    pub spans: std::sync::Arc<std::sync::OnceLock<std::sync::Arc<dyn SpanSink>>>,
    /// When the last long-poll warning was logged (unix seconds), to keep it to one a 10 s.
    last_long_poll_log: std::sync::Arc<AtomicU64>,
}

impl Telemetry {
    /// Telemetry recording into `metrics` when `record_metrics`, with no span sink yet.
    pub fn new(metrics: Metrics, record_metrics: bool) -> Telemetry {
        Telemetry {
            metrics,
            record_metrics,
            spans: Default::default(),
            last_long_poll_log: Default::default(),
        }
    }
}

impl Observer for Telemetry {
    fn server_started(&self) {
        if self.record_metrics {
            self.metrics.server_started();
        }
    }

    fn server(&self, record: &ServerRecord<'_>) {
        if self.record_metrics {
            self.metrics.record_server(record);
        }
        if let Some(s) = self.spans.get() {
            s.record_server(record);
        }
    }

    fn client(&self, record: &ClientRecord<'_>) {
        if self.record_metrics {
            self.metrics.record_client(record);
        }
        if let Some(s) = self.spans.get() {
            s.record_client(record);
        }
    }

    fn message(&self, record: &MessageRecord<'_>) {
        if self.record_metrics {
            self.metrics.record_message(record);
        }
        if let Some(s) = self.spans.get() {
            s.record_message(record);
        }
    }

    fn long_poll(&self, route: &str, held: Duration) {
        if self.record_metrics {
            self.metrics.record_long_poll(route, held);
        }
        // One line per 10 s at most: a blocking handler under load would otherwise log at
        // its request rate; the counter has the full story.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_long_poll_log.load(Ordering::Relaxed);
        if now >= last + 10
            && self
                .last_long_poll_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                route,
                held_ms = u64::try_from(held.as_millis()).unwrap_or(u64::MAX),
                "a request's poll held a worker thread past 10 ms: blocking code in async?"
            );
        }
    }
}
