//! Observation hooks: what the server and the client tell telemetry about each request and
//! each outbound attempt. `keel-telemetry` implements [`Observer`] (metrics, trace export);
//! each `keel::App` hands its own [`SharedObserver`] to its server, clients and consumers,
//! which therefore depend on no telemetry crate, and pay nothing when they were given none.
//!
//! Records are handed over when a request or attempt *ends* — on every path: answered,
//! failed, cut off by its deadline, abandoned by its caller, panicked — because the guards
//! that emit them run in `Drop`. A span that is never ended cannot happen.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::Context;
use crate::codec::SpanId;

/// How a request or attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer went out (whatever its status).
    Answered,
    /// The deadline passed first: the handler (or the call) was cut off.
    DeadlineExceeded,
    /// The caller went away (connection closed, future dropped) before the end.
    Cancelled,
    /// Failed without an answer: the service errored or panicked, or the call got no response.
    Failed,
    /// Refused before reaching the handler: a malformed header (400), an expired deadline
    /// (504), an oversize body (413).
    Refused,
}

impl Outcome {
    /// Lower-case name, for labels and span attributes.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::DeadlineExceeded => "deadline_exceeded",
            Outcome::Cancelled => "cancelled",
            Outcome::Failed => "failed",
            Outcome::Refused => "refused",
        }
    }
}

/// One server request, at its end.
#[derive(Debug)]
pub struct ServerRecord<'a> {
    /// The request's context (trace, request id), when one was built (not for refusals and
    /// probes).
    pub ctx: Option<&'a Context>,
    /// Route label: the matched template when the router recorded one
    /// ([`Context::set_route`]), else the path (telemetry bounds its cardinality).
    pub route: &'a str,
    /// Whether the route came from the router (a template) or is the raw path.
    pub route_is_template: bool,
    /// HTTP method.
    pub method: &'a http::Method,
    /// gRPC request (`content-type: application/grpc…`).
    pub grpc: bool,
    /// Response status, if one was produced.
    pub status: Option<u16>,
    /// gRPC status from headers or trailers, if any.
    pub grpc_status: Option<i32>,
    /// How it ended.
    pub outcome: Outcome,
    /// Wall-clock start (span timestamps), when the record is made after the fact. `None`:
    /// the request ends as the record is made, and [`ServerRecord::start_time`] derives the
    /// start from the clock and `duration` — only when something asks, so a service that
    /// exports no spans reads no wall clock per request.
    pub start: Option<SystemTime>,
    /// Duration from arrival to the end of the response body (or to the cut-off).
    pub duration: Duration,
    /// The peer's address.
    pub peer: Option<SocketAddr>,
}

impl ServerRecord<'_> {
    /// When the request arrived, by the wall clock.
    pub fn start_time(&self) -> SystemTime {
        start_time(self.start, self.duration)
    }
}

/// One outbound attempt, at its end.
#[derive(Debug)]
pub struct ClientRecord<'a> {
    /// The calling request's context.
    pub ctx: &'a Context,
    /// This attempt's span id, sent to the upstream as the parent in `traceparent`.
    pub span_id: SpanId,
    /// Upstream name (`[clients.<name>]`).
    pub upstream: &'a str,
    /// The endpoint tried.
    pub addr: SocketAddr,
    /// HTTP method.
    pub method: &'a http::Method,
    /// Request path (the upstream's route; telemetry bounds cardinality).
    pub path: &'a str,
    /// gRPC call.
    pub grpc: bool,
    /// Response status, if one came back.
    pub status: Option<u16>,
    /// gRPC status from response headers, if any.
    pub grpc_status: Option<i32>,
    /// 0 for the first attempt, then retries and hedges.
    pub attempt: u32,
    /// How it ended.
    pub outcome: Outcome,
    /// Wall-clock start (span timestamps), when the record is made after the fact. `None`:
    /// the attempt ends as the record is made, and [`ClientRecord::start_time`] derives the
    /// start from the clock and `duration` — only when something asks, so a client whose
    /// calls export no spans reads no wall clock per attempt.
    pub start: Option<SystemTime>,
    /// Until the response headers (or the failure).
    pub duration: Duration,
}

impl ClientRecord<'_> {
    /// When the attempt started, by the wall clock.
    pub fn start_time(&self) -> SystemTime {
        start_time(self.start, self.duration)
    }
}

/// `start` if known, else the wall clock now less `duration`: for a record made as its
/// request or attempt ends.
fn start_time(start: Option<SystemTime>, duration: Duration) -> SystemTime {
    start.unwrap_or_else(|| {
        SystemTime::now()
            .checked_sub(duration)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    })
}

/// Which side of a broker a [`MessageRecord`] comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageSide {
    /// A message was published (a PRODUCER span).
    Publish,
    /// A consumed message was processed (a CONSUMER span).
    Process,
}

impl MessageSide {
    /// The OpenTelemetry `messaging.operation.name`.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageSide::Publish => "publish",
            MessageSide::Process => "process",
        }
    }
}

/// One message published or processed, at its end. Emitted by the messaging adapters.
#[derive(Debug)]
pub struct MessageRecord<'a> {
    /// Publish: the publishing request's context. Process: the context built from the
    /// message's headers, whose span is this processing's and whose parent is the producer's.
    pub ctx: &'a Context,
    /// Publish: this publish's span id, sent in the message's `traceparent` as the consumer's
    /// parent. Process: `None` (the context's own span is the processing span).
    pub span_id: Option<SpanId>,
    /// Publish or process.
    pub side: MessageSide,
    /// `messaging.system`: `rabbitmq`, `kafka`, `nats`.
    pub system: &'a str,
    /// Queue, topic or subject (from configuration, so bounded).
    pub destination: &'a str,
    /// The broker's or the producer's message id, if any.
    pub message_id: Option<&'a str>,
    /// `Answered`: published (confirmed) or processed and acknowledged; `Failed`: refused,
    /// nacked or dead-lettered; `DeadlineExceeded`, `Cancelled` as for requests.
    pub outcome: Outcome,
    /// Delivery attempt (1 = first delivery; processing only).
    pub attempt: u32,
    /// A redelivery of a message already applied: acknowledged without running the handler.
    pub duplicate: bool,
    /// Wall-clock start.
    pub start: SystemTime,
    /// Duration of the publish (until confirmed) or of the processing.
    pub duration: Duration,
}

/// Receives records. Implementations must be cheap and must not block: they run on the
/// request path (in `Drop`).
pub trait Observer: Send + Sync + 'static {
    /// A server request started (in-flight gauges).
    fn server_started(&self) {}
    /// A server request ended.
    fn server(&self, record: &ServerRecord<'_>);
    /// An outbound attempt ended.
    fn client(&self, record: &ClientRecord<'_>);
    /// A message was published or processed (the messaging adapters call this).
    fn message(&self, record: &MessageRecord<'_>) {
        let _ = record;
    }
    /// A poll of a request's future held its worker thread for `held` (reported only above
    /// the installer's threshold): blocking code in async.
    fn long_poll(&self, route: &str, held: Duration) {
        let _ = (route, held);
    }
}

impl std::fmt::Debug for dyn Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dyn Observer")
    }
}

/// An App's observer, handed to everything of that App that reports: its server layers, its
/// clients, its message consumers. Never process-global, so two Apps in one process keep
/// separate metrics and spans.
pub type SharedObserver = Arc<dyn Observer>;

/// The route label of requests no router matched (a 404 fallback, a refusal before routing):
/// one label for all of them, so a scan of random paths cannot grow the series count.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Polls longer than this are reported as long polls. 10 ms: far beyond any legitimate
/// non-blocking poll (microseconds), short enough to catch a blocking call before it shows
/// up as everybody's latency.
pub const LONG_POLL_THRESHOLD: Duration = Duration::from_millis(10);
