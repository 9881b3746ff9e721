//! The exporter: the bounded span queue shared with the request path, the background task
//! that drains it in batches, and the two OTLP transports.
//!
//! Failure policy: a batch that cannot be delivered (collector down, slow, rejecting) is
//! counted and dropped, never retried; after a failure the task waits for the next interval
//! instead of reacting to full batches, so a dead collector costs one attempt per interval.
//! Spans arriving meanwhile fill the bounded queue and are dropped there. Memory is bounded
//! by `queue_capacity` plus one batch in flight, whatever the collector does.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};
use tonic::transport::Channel;

use super::TraceStats;
use super::config::{OtlpProtocol, TraceConfig};
use super::span::string;

/// The scope (and SDK) name every Keel span is reported under.
const SCOPE_NAME: &str = "keel";

/// Largest collector response body read: a response only carries a partial-success count
/// and a message, so anything bigger is not worth the memory.
const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// What the request path and the exporter task share.
pub(crate) struct Shared {
    queue: Mutex<Queue>,
    /// Mirror of the queue length, so `stats()` and the "already full" check on the request
    /// path need no lock.
    len: AtomicUsize,
    capacity: usize,
    max_batch: usize,
    /// The queue length at which the exporter is woken before its interval is up.
    wake_at: usize,
    /// A full batch is waiting.
    batch_ready: Notify,
    /// The queue was closed: flush once and stop.
    closing: Notify,
    exported: AtomicU64,
    dropped: AtomicU64,
    export_errors: AtomicU64,
    failed_spans: AtomicU64,
}

struct Queue {
    spans: VecDeque<Span>,
    /// Set (under the lock, so no push can slip in behind the final flush) when the tracer
    /// shuts down or its last handle is dropped.
    closed: bool,
}

impl Shared {
    pub(crate) fn new(capacity: usize, max_batch: usize) -> Shared {
        let capacity = capacity.max(1);
        let max_batch = max_batch.max(1);
        Shared {
            queue: Mutex::new(Queue {
                // Allocated up front: growing a VecDeque copies it, under the lock.
                spans: VecDeque::with_capacity(capacity),
                closed: false,
            }),
            len: AtomicUsize::new(0),
            capacity,
            max_batch,
            wake_at: max_batch.min(capacity),
            batch_ready: Notify::new(),
            closing: Notify::new(),
            exported: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            export_errors: AtomicU64::new(0),
            failed_spans: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding this lock cannot leave the deque inconsistent (push/drain
        // only), so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True when a span would be dropped anyway: lets the request path skip building it.
    /// Racy by design (the authoritative check is in [`Shared::push`]).
    pub(crate) fn looks_full(&self) -> bool {
        self.len.load(Ordering::Relaxed) >= self.capacity
    }

    pub(crate) fn count_dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Enqueue without blocking on anything but the short queue lock; drop the span when full
    /// or closed.
    pub(crate) fn push(&self, span: Span) {
        let mut q = self.lock();
        if q.closed || q.spans.len() >= self.capacity {
            drop(q);
            self.count_dropped();
            return;
        }
        q.spans.push_back(span);
        let n = q.spans.len();
        self.len.store(n, Ordering::Relaxed);
        drop(q);
        // Only the push that completes a batch wakes the exporter: one notification per
        // batch, not per span.
        if n == self.wake_at {
            self.batch_ready.notify_one();
        }
    }

    /// Take up to `max` spans from the front.
    fn take(&self, max: usize) -> Vec<Span> {
        let mut q = self.lock();
        let n = q.spans.len().min(max);
        let batch: Vec<Span> = q.spans.drain(..n).collect();
        self.len.store(q.spans.len(), Ordering::Relaxed);
        batch
    }

    fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Refuse further spans and tell the exporter to flush and stop.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.closing.notify_one();
    }

    /// Count whatever is still queued as lost (the exporter was stopped before sending it).
    pub(crate) fn discard_rest(&self) {
        let rest = self.take(usize::MAX).len();
        self.failed_spans.fetch_add(rest as u64, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> TraceStats {
        TraceStats {
            queued: self.len.load(Ordering::Relaxed),
            exported: self.exported.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            export_errors: self.export_errors.load(Ordering::Relaxed),
            failed_spans: self.failed_spans.load(Ordering::Relaxed),
        }
    }
}

/// Where batches go.
pub(crate) enum Transport {
    /// OTLP/gRPC over a lazily connected channel: no collector at start-up is not an error.
    Grpc(TraceServiceClient<Channel>),
    /// OTLP/HTTP with protobuf bodies (boxed: the hyper client is several times the size of
    /// the gRPC client).
    Http(Box<HttpTransport>),
}

/// OTLP/HTTP: protobuf bodies POSTed to `uri`.
pub(crate) struct HttpTransport {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: http::Uri,
}

impl Transport {
    /// Build the transport for `url` (from [`TraceConfig::export_url`]). Needs a tokio
    /// runtime for the gRPC channel's background worker.
    pub(crate) fn new(
        protocol: OtlpProtocol,
        url: &str,
        timeout: Duration,
    ) -> Result<Transport, String> {
        match protocol {
            OtlpProtocol::Grpc => {
                let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
                    .map_err(|e| error_chain(&e))?
                    .connect_timeout(timeout)
                    // Sent to the collector as `grpc-timeout`, so it stops work we gave up on.
                    .timeout(timeout);
                Ok(Transport::Grpc(TraceServiceClient::new(
                    endpoint.connect_lazy(),
                )))
            }
            OtlpProtocol::HttpProtobuf => {
                let uri: http::Uri = url.parse().map_err(|e| format!("{e}"))?;
                let mut connector = HttpConnector::new();
                connector.set_connect_timeout(Some(timeout));
                connector.set_nodelay(true);
                let client = Client::builder(TokioExecutor::new()).build(connector);
                Ok(Transport::Http(Box::new(HttpTransport { client, uri })))
            }
        }
    }

    /// Send one request. `Ok` carries the number of spans the collector said it rejected.
    async fn send(&mut self, req: ExportTraceServiceRequest) -> Result<i64, String> {
        let response = match self {
            Transport::Grpc(client) => client
                .export(req)
                .await
                .map_err(|s| format!("gRPC {:?}: {}", s.code(), s.message()))?
                .into_inner(),
            Transport::Http(h) => {
                let request = http::Request::post(h.uri.clone())
                    .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(Full::new(Bytes::from(req.encode_to_vec())))
                    .map_err(|e| e.to_string())?;
                let resp = h
                    .client
                    .request(request)
                    .await
                    .map_err(|e| error_chain(&e))?;
                let status = resp.status();
                // Read the body either way: it lets the connection be reused.
                let body = Limited::new(resp.into_body(), MAX_RESPONSE_BODY)
                    .collect()
                    .await
                    .map(|b| b.to_bytes());
                if !status.is_success() {
                    return Err(format!("HTTP {status}"));
                }
                // An empty or undecodable body on a 2xx is a full success.
                body.ok()
                    .and_then(|b| ExportTraceServiceResponse::decode(b).ok())
                    .unwrap_or_default()
            }
        };
        Ok(response.partial_success.map_or(0, |p| p.rejected_spans))
    }
}

/// The resource every batch is reported under.
pub(crate) fn resource(cfg: &TraceConfig) -> Resource {
    let mut attrs: BTreeMap<&str, &str> = cfg
        .resource_attributes
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    // Set last so the configured attributes cannot contradict them.
    attrs.insert("service.name", &cfg.service_name);
    attrs.insert("telemetry.sdk.name", SCOPE_NAME);
    attrs.insert("telemetry.sdk.language", "rust");
    attrs.insert("telemetry.sdk.version", env!("CARGO_PKG_VERSION"));
    Resource {
        attributes: attrs.into_iter().map(|(k, v)| string(k, v)).collect(),
        ..Resource::default()
    }
}

/// What the exporter task needs besides the queue.
pub(crate) struct Exporter {
    pub(crate) transport: Transport,
    pub(crate) resource: Resource,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    /// The last export failed: wait for the interval, and log only the change back.
    pub(crate) failing: bool,
}

impl Exporter {
    /// The background task: drain on every interval and on every full batch, until closed.
    pub(crate) async fn run(mut self, shared: std::sync::Arc<Shared>) {
        let interval = self.interval.max(Duration::from_millis(1));
        let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
        // After a slow export, wait a whole interval rather than firing the missed ticks.
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                // A failing collector gets one attempt per interval, not one per batch.
                _ = shared.batch_ready.notified(), if !self.failing => {}
                _ = shared.closing.notified() => {}
            }
            let closing = shared.is_closed();
            self.drain(&shared).await;
            if closing {
                // Flushed once; what a failure left behind is lost.
                shared.discard_rest();
                return;
            }
        }
    }

    /// Send full batches back to back until the queue is (nearly) empty; stop at the first
    /// failure.
    async fn drain(&mut self, shared: &Shared) {
        loop {
            let batch = shared.take(shared.max_batch);
            if batch.is_empty() {
                return;
            }
            let full = batch.len() == shared.max_batch;
            self.export(shared, batch).await;
            if self.failing || !full {
                return;
            }
        }
    }

    /// Export one batch, updating the counters and `failing`. Logs only on a change between
    /// working and failing, so a collector outage is one line, not one per interval.
    async fn export(&mut self, shared: &Shared, spans: Vec<Span>) {
        let n = spans.len() as u64;
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: SCOPE_NAME.to_owned(),
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                        ..InstrumentationScope::default()
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        let result = match tokio::time::timeout(self.timeout, self.transport.send(req)).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {:?}", self.timeout)),
        };
        match result {
            Ok(rejected) => {
                let rejected = u64::try_from(rejected).unwrap_or(0).min(n);
                shared.exported.fetch_add(n - rejected, Ordering::Relaxed);
                shared.failed_spans.fetch_add(rejected, Ordering::Relaxed);
                if rejected > 0 {
                    tracing::warn!(rejected, "trace collector rejected part of a batch");
                }
                if self.failing {
                    tracing::info!("trace export recovered");
                }
                self.failing = false;
            }
            Err(error) => {
                shared.export_errors.fetch_add(1, Ordering::Relaxed);
                shared.failed_spans.fetch_add(n, Ordering::Relaxed);
                if !self.failing {
                    tracing::warn!(%error, spans = n, "trace export failed; dropping the batch");
                }
                self.failing = true;
            }
        }
    }
}

/// An error with its sources, `outer: inner: root`: hyper's and tonic's top-level messages
/// ("client error (Connect)") say little without the cause.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}
