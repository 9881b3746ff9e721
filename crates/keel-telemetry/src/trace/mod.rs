//! OTLP trace export: one span per server request and one per outbound attempt, built from
//! the records the server and the client emit when a request ends, and sent to an
//! OpenTelemetry collector over gRPC or HTTP/protobuf.
//!
//! The request path only converts a record and pushes it into a bounded queue (a short
//! mutex, never an await); a background task sends batches. When the collector is slow or
//! gone, spans are dropped and counted ([`TraceStats`]) rather than held: tracing must
//! never cost the service memory or latency it cannot afford.
//!
//! ```no_run
//! # async fn demo() {
//! use keel_telemetry::trace::{TraceConfig, Tracer};
//!
//! let mut cfg = TraceConfig::default();
//! for warning in cfg.apply_env(&|k| std::env::var(k).ok()) {
//!     eprintln!("{warning}");
//! }
//! let tracer = Tracer::start(&cfg);
//! // … serve; the observer calls tracer.record_server / record_client …
//! tracer.shutdown(std::time::Duration::from_secs(5)).await;
//! # }
//! ```

mod config;
mod export;
mod span;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_core::observe::{ClientRecord, MessageRecord, Observer, ServerRecord};
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::task::JoinHandle;

pub use config::{OtlpProtocol, TraceConfig};
use export::{Exporter, Shared, Transport};

/// Counters of a [`Tracer`]. All but `queued` only ever grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TraceStats {
    /// Spans waiting in the queue now (at most `queue_capacity`).
    pub queued: usize,
    /// Spans the collector accepted.
    pub exported: u64,
    /// Spans dropped on the request path because the queue was full (or the tracer was shut
    /// down).
    pub dropped: u64,
    /// Export requests that failed (error, timeout, non-2xx); each one's batch is lost.
    pub export_errors: u64,
    /// Spans lost after leaving the queue: in failed or partially rejected exports, or still
    /// queued when a shutdown gave up.
    pub failed_spans: u64,
}

/// Records spans and exports them in the background. Cheap to clone (one `Arc`); every
/// clone feeds the same queue.
///
/// A disabled tracer (no endpoint, `enabled = false`, or no runtime at start) accepts every
/// call and does nothing.
#[derive(Clone)]
pub struct Tracer {
    inner: Option<Arc<Handle>>,
}

/// The live part of an enabled tracer. When the last clone of the tracer goes away without
/// a shutdown, dropping this closes the queue, so the exporter flushes and ends instead of
/// idling forever.
struct Handle {
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.close();
    }
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("enabled", &self.is_enabled())
            .field("stats", &self.stats())
            .finish()
    }
}

impl Tracer {
    /// Start exporting as `cfg` says: with `enabled` and an `endpoint`, spawn the exporter
    /// task on the current tokio runtime; otherwise return a disabled tracer.
    ///
    /// Start-up never fails on the collector's account: the gRPC channel connects lazily and
    /// an unreachable collector only shows up in [`Tracer::stats`] and the logs. An endpoint
    /// that is not a URL, or a call outside a tokio runtime, logs a warning and yields a
    /// disabled tracer (validate the config first to catch the former at load time).
    /// Sizes below 1 are treated as 1, a zero interval as 1 ms.
    pub fn start(cfg: &TraceConfig) -> Tracer {
        let disabled = Tracer { inner: None };
        if !cfg.enabled {
            return disabled;
        }
        let Some(url) = cfg.export_url() else {
            return disabled;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                "trace export disabled: Tracer::start was called outside a tokio runtime"
            );
            return disabled;
        };
        if url.starts_with("https:") {
            tracing::warn!(
                endpoint = %url,
                "this build of Keel has no TLS for trace export; exports to https will fail"
            );
        }
        let transport = match Transport::new(cfg.protocol, &url, cfg.export_timeout.get()) {
            Ok(t) => t,
            Err(error) => {
                tracing::warn!(endpoint = %url, %error, "trace export disabled: bad endpoint");
                return disabled;
            }
        };
        let shared = Arc::new(Shared::new(cfg.queue_capacity, cfg.max_batch));
        let exporter = Exporter {
            transport,
            resource: export::resource(cfg),
            interval: cfg.export_interval.get(),
            timeout: cfg.export_timeout.get(),
            failing: false,
        };
        let task = runtime.spawn(exporter.run(shared.clone()));
        Tracer {
            inner: Some(Arc::new(Handle {
                shared,
                task: Mutex::new(Some(task)),
            })),
        }
    }

    /// A tracer that records nothing.
    pub fn disabled() -> Tracer {
        Tracer { inner: None }
    }

    /// Whether spans are being recorded and exported.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Record the server span of a finished request. Skipped when the record has no context
    /// (refusals, probes) or its trace is not sampled. Never blocks: a full queue drops the
    /// span and counts it.
    pub fn record_server(&self, record: &ServerRecord<'_>) {
        let sampled = record.ctx.is_some_and(|c| c.trace().sampled);
        self.enqueue(sampled, || span::server_span(record));
    }

    /// The one path into the queue: nothing for a disabled tracer or an unsampled trace, and
    /// no span built only to be dropped — under a collector outage that is most calls.
    fn enqueue(&self, sampled: bool, build: impl FnOnce() -> Option<Span>) {
        let Some(h) = &self.inner else { return };
        if !sampled {
            return;
        }
        if h.shared.looks_full() {
            h.shared.count_dropped();
            return;
        }
        if let Some(span) = build() {
            h.shared.push(span);
        }
    }

    /// Record the PRODUCER or CONSUMER span of a published or processed message. Same rules
    /// as [`Tracer::record_server`].
    pub fn record_message(&self, record: &MessageRecord<'_>) {
        self.enqueue(record.ctx.trace().sampled, || span::message_span(record));
    }

    /// The OTLP span [`Tracer::record_message`] would queue (benchmarks and tests).
    pub fn message_span(record: &MessageRecord<'_>) -> Option<Span> {
        span::message_span(record)
    }

    /// The OTLP span [`Tracer::record_server`] would queue for `record` (`None` when it would
    /// queue nothing). For benchmarks and tests of span content; costs what recording does.
    pub fn server_span(record: &ServerRecord<'_>) -> Option<Span> {
        span::server_span(record)
    }

    /// Record the client span of a finished outbound attempt (child of the calling request's
    /// server span). Same rules as [`Tracer::record_server`].
    pub fn record_client(&self, record: &ClientRecord<'_>) {
        self.enqueue(record.ctx.trace().sampled, || span::client_span(record));
    }

    /// Current counters (all zero for a disabled tracer).
    pub fn stats(&self) -> TraceStats {
        self.inner
            .as_ref()
            .map(|h| h.shared.stats())
            .unwrap_or_default()
    }

    /// Stop recording, send what is queued (one attempt per batch), and stop the exporter,
    /// waiting at most `timeout`; past it the exporter is aborted and the spans still queued
    /// are counted in `failed_spans`. Spans recorded afterwards are dropped. For the
    /// drain phase of a graceful shutdown. A second call returns at once.
    pub async fn shutdown(&self, timeout: Duration) {
        let Some(h) = &self.inner else { return };
        h.shared.close();
        let task = h.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(mut task) = task else { return };
        if tokio::time::timeout(timeout, &mut task).await.is_err() {
            task.abort();
            // Wait for the abort to land so the queue is no longer touched, then account for
            // what was left in it.
            let _ = task.await;
            h.shared.discard_rest();
        }
    }
}

/// The tracer is the span sink of the process's [`crate::Telemetry`] observer.
impl crate::SpanSink for Tracer {
    fn record_server(&self, record: &ServerRecord<'_>) {
        Tracer::record_server(self, record);
    }

    fn record_client(&self, record: &ClientRecord<'_>) {
        Tracer::record_client(self, record);
    }

    fn record_message(&self, record: &MessageRecord<'_>) {
        Tracer::record_message(self, record);
    }
}

/// Lets a tracer serve as an observer on its own (spans, no metrics).
impl Observer for Tracer {
    fn server(&self, record: &ServerRecord<'_>) {
        self.record_server(record);
    }

    fn client(&self, record: &ClientRecord<'_>) {
        self.record_client(record);
    }
}
