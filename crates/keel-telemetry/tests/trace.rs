//! The trace exporter end to end: real records → real exporter → a real OTLP receiver over
//! TCP (gRPC and HTTP/protobuf), plus the behaviour when the collector is down or failing.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use http::HeaderMap;
use keel_core::Context;
use keel_core::codec::SpanId;
use keel_core::context::InboundPolicy;
use keel_core::observe::{ClientRecord, Outcome, ServerRecord};
use keel_core::tasks::Registry;
use keel_telemetry::trace::{OtlpProtocol, TraceConfig, TraceStats, Tracer};
use keel_test_support::free_addr;
use keel_test_support::otlp::{OtlpReceiver, int_attr, str_attr};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{Span, Status};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
/// Generous bound for things that should take milliseconds, so a loaded machine does not
/// fail the test; nothing asserts on speed.
const PATIENCE: Duration = Duration::from_secs(10);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An inbound request's context, as the server would build it from `traceparent`.
fn context(sampled: bool) -> Context {
    let mut h = HeaderMap::new();
    let flags = if sampled { "01" } else { "00" };
    h.insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CALLER_SPAN}-{flags}")
            .parse()
            .unwrap(),
    );
    h.insert("tracestate", "congo=t61rcWkgMzE".parse().unwrap());
    let policy = InboundPolicy {
        route_timeout: Duration::from_secs(30),
        sample_roots: false,
    };
    Context::from_headers(&h, &policy, None, Registry::global()).unwrap()
}

fn server_record<'a>(ctx: Option<&'a Context>, method: &'a http::Method) -> ServerRecord<'a> {
    ServerRecord {
        ctx,
        route: "/orders/{id}",
        route_is_template: true,
        method,
        grpc: false,
        status: Some(200),
        grpc_status: None,
        outcome: Outcome::Answered,
        start: Some(SystemTime::now()),
        duration: Duration::from_millis(12),
        peer: Some(SocketAddr::from(([127, 0, 0, 1], 40000))),
    }
}

fn client_record<'a>(ctx: &'a Context, method: &'a http::Method) -> ClientRecord<'a> {
    ClientRecord {
        ctx,
        span_id: SpanId::random(),
        upstream: "inventory",
        addr: SocketAddr::from(([10, 1, 2, 3], 8443)),
        method,
        path: "/stock/7",
        grpc: false,
        status: Some(200),
        grpc_status: None,
        attempt: 0,
        outcome: Outcome::Answered,
        start: Some(SystemTime::now()),
        duration: Duration::from_millis(3),
    }
}

fn config(endpoint: String, protocol: OtlpProtocol) -> TraceConfig {
    TraceConfig {
        endpoint: Some(endpoint),
        protocol,
        service_name: "orders".into(),
        resource_attributes: BTreeMap::from([("deployment.environment".into(), "test".into())]),
        export_interval: Duration::from_millis(50).into(),
        export_timeout: Duration::from_secs(2).into(),
        ..TraceConfig::default()
    }
}

/// Poll `f` until true or `PATIENCE` passes; returns the last stats for the message.
async fn eventually(tracer: &Tracer, f: impl Fn(&TraceStats) -> bool) -> TraceStats {
    let end = tokio::time::Instant::now() + PATIENCE;
    loop {
        let s = tracer.stats();
        if f(&s) || tokio::time::Instant::now() >= end {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn is_error(status: &Option<Status>) -> bool {
    status
        .as_ref()
        .is_some_and(|s| s.code == StatusCode::Error as i32)
}

fn find<'a>(spans: &'a [Span], span_id: &[u8]) -> &'a Span {
    spans
        .iter()
        .find(|s| s.span_id == span_id)
        .unwrap_or_else(|| panic!("no span {} in {spans:#?}", hex(span_id)))
}

/// One request that made two attempts upstream (the first cut off by its deadline, the
/// retry answered): three spans, one trace, correctly linked.
async fn exports_a_request_and_its_calls(receiver: OtlpReceiver, protocol: OtlpProtocol) {
    let tracer = Tracer::start(&config(receiver.endpoint(), protocol));
    assert!(tracer.is_enabled());
    let ctx = context(true);
    let (get, post) = (http::Method::GET, http::Method::POST);

    let mut timed_out = client_record(&ctx, &post);
    timed_out.status = None;
    timed_out.outcome = Outcome::DeadlineExceeded;
    let mut retried = client_record(&ctx, &post);
    retried.attempt = 1;
    retried.status = Some(201);
    let server = server_record(Some(&ctx), &get);

    tracer.record_client(&timed_out);
    tracer.record_client(&retried);
    tracer.record_server(&server);

    let spans = receiver.wait_for(3, PATIENCE).await;
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let stats = eventually(&tracer, |s| s.exported == 3).await;
    assert_eq!(stats.exported, 3, "{stats:?}");
    assert_eq!(stats.queued, 0);
    assert_eq!((stats.dropped, stats.export_errors), (0, 0), "{stats:?}");

    let trace = ctx.trace();
    for s in &spans {
        assert_eq!(hex(&s.trace_id), TRACE_ID, "{}", s.name);
        assert_eq!(s.trace_state, "congo=t61rcWkgMzE");
        assert_eq!(s.flags & 0x01, 0x01, "sampled flag");
        assert!(s.end_time_unix_nano > s.start_time_unix_nano);
        assert_eq!(
            str_attr(&s.attributes, "keel.request_id"),
            Some(ctx.request_id())
        );
    }

    // The server span is this hop's span, child of the caller's.
    let srv = find(&spans, &trace.span_id.0);
    assert_eq!(srv.kind, SpanKind::Server as i32);
    assert_eq!(hex(&srv.parent_span_id), CALLER_SPAN);
    assert_eq!(srv.name, "GET /orders/{id}");
    assert_eq!(
        str_attr(&srv.attributes, "http.request.method"),
        Some("GET")
    );
    assert_eq!(
        str_attr(&srv.attributes, "http.route"),
        Some("/orders/{id}")
    );
    assert_eq!(
        int_attr(&srv.attributes, "http.response.status_code"),
        Some(200)
    );
    assert_eq!(str_attr(&srv.attributes, "keel.outcome"), Some("answered"));
    assert!(!is_error(&srv.status));

    // Both attempts are client spans under the server span.
    let cut = find(&spans, &timed_out.span_id.0);
    let ok = find(&spans, &retried.span_id.0);
    for c in [cut, ok] {
        assert_eq!(c.kind, SpanKind::Client as i32);
        assert_eq!(
            c.parent_span_id, trace.span_id.0,
            "client parent = server span"
        );
        assert_eq!(c.name, "POST");
        assert_eq!(str_attr(&c.attributes, "keel.upstream"), Some("inventory"));
        assert_eq!(str_attr(&c.attributes, "server.address"), Some("10.1.2.3"));
        assert_eq!(int_attr(&c.attributes, "server.port"), Some(8443));
    }
    assert!(is_error(&cut.status), "{:?}", cut.status);
    assert_eq!(cut.status.as_ref().unwrap().message, "deadline exceeded");
    assert_eq!(str_attr(&cut.attributes, "error.type"), Some("timeout"));
    assert_eq!(
        str_attr(&cut.attributes, "keel.outcome"),
        Some("deadline_exceeded")
    );
    assert_eq!(int_attr(&cut.attributes, "http.request.resend_count"), None);
    assert!(!is_error(&ok.status), "{:?}", ok.status);
    assert_eq!(
        int_attr(&ok.attributes, "http.request.resend_count"),
        Some(1)
    );
    assert_eq!(
        int_attr(&ok.attributes, "http.response.status_code"),
        Some(201)
    );

    // Resource and scope.
    let resources = receiver.resources();
    assert!(!resources.is_empty());
    for r in &resources {
        assert_eq!(str_attr(&r.attributes, "service.name"), Some("orders"));
        assert_eq!(
            str_attr(&r.attributes, "deployment.environment"),
            Some("test")
        );
        assert_eq!(str_attr(&r.attributes, "telemetry.sdk.name"), Some("keel"));
        assert_eq!(
            str_attr(&r.attributes, "telemetry.sdk.language"),
            Some("rust")
        );
    }
    for req in receiver.requests() {
        for rs in req.resource_spans {
            assert_eq!(rs.scope_spans.len(), 1);
            assert_eq!(rs.scope_spans[0].scope.as_ref().unwrap().name, "keel");
        }
    }

    tracer.shutdown(PATIENCE).await;
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_a_grpc_collector() {
    exports_a_request_and_its_calls(OtlpReceiver::start_grpc().await, OtlpProtocol::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_http_protobuf_collector() {
    exports_a_request_and_its_calls(OtlpReceiver::start_http().await, OtlpProtocol::HttpProtobuf)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_server_spans_carry_rpc_attributes() {
    let receiver = OtlpReceiver::start_grpc().await;
    let tracer = Tracer::start(&config(receiver.endpoint(), OtlpProtocol::Grpc));
    let ctx = context(true);
    let post = http::Method::POST;
    let mut r = server_record(Some(&ctx), &post);
    r.grpc = true;
    r.route = "/shop.v1.Orders/Create";
    r.route_is_template = false;
    r.grpc_status = Some(13);
    tracer.record_server(&r);

    let spans = receiver.wait_for(1, PATIENCE).await;
    assert_eq!(spans.len(), 1);
    let s = &spans[0];
    assert_eq!(s.name, "shop.v1.Orders/Create");
    assert_eq!(str_attr(&s.attributes, "rpc.system"), Some("grpc"));
    assert_eq!(
        str_attr(&s.attributes, "rpc.service"),
        Some("shop.v1.Orders")
    );
    assert_eq!(str_attr(&s.attributes, "rpc.method"), Some("Create"));
    assert_eq!(int_attr(&s.attributes, "rpc.grpc.status_code"), Some(13));
    assert!(is_error(&s.status), "INTERNAL is a server error");
    tracer.shutdown(PATIENCE).await;
}

/// Nothing listens on the endpoint: recording must neither block nor grow, and the failure
/// must be visible in the counters.
async fn a_dead_collector_costs_dropped_spans(protocol: OtlpProtocol) {
    const CAPACITY: usize = 100;
    const RECORDS: u64 = 100_000;
    let cfg = TraceConfig {
        queue_capacity: CAPACITY,
        max_batch: 10,
        export_interval: Duration::from_millis(20).into(),
        export_timeout: Duration::from_millis(500).into(),
        ..config(format!("http://{}", free_addr()), protocol)
    };
    let tracer = Tracer::start(&cfg);
    let ctx = context(true);
    let get = http::Method::GET;
    let record = server_record(Some(&ctx), &get);

    let mut max_queued = 0;
    for i in 0..RECORDS {
        tracer.record_server(&record);
        if i % 1000 == 0 {
            max_queued = max_queued.max(tracer.stats().queued);
        }
    }
    let after = tracer.stats();
    max_queued = max_queued.max(after.queued);
    assert!(max_queued <= CAPACITY, "queue grew to {max_queued}");
    assert!(after.dropped > 0, "{after:?}");
    assert_eq!(after.exported, 0);

    let s = eventually(&tracer, |s| s.export_errors > 0).await;
    assert!(s.export_errors > 0, "{s:?}");
    assert!(s.queued <= CAPACITY, "{s:?}");

    // After the final flush every span is accounted for: none exported, each either dropped
    // at the queue or lost with a failed batch.
    tracer.shutdown(PATIENCE).await;
    let s = tracer.stats();
    assert_eq!(s.queued, 0, "{s:?}");
    assert_eq!(s.exported, 0, "{s:?}");
    assert_eq!(s.dropped + s.failed_spans, RECORDS, "{s:?}");

    // A shut-down tracer refuses new spans.
    tracer.record_server(&record);
    assert_eq!(tracer.stats().dropped, s.dropped + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_grpc_collector_never_blocks_or_grows_the_queue() {
    a_dead_collector_costs_dropped_spans(OtlpProtocol::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_http_collector_never_blocks_or_grows_the_queue() {
    a_dead_collector_costs_dropped_spans(OtlpProtocol::HttpProtobuf).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsampled_and_context_less_requests_produce_no_spans() {
    let receiver = OtlpReceiver::start_grpc().await;
    let tracer = Tracer::start(&config(receiver.endpoint(), OtlpProtocol::Grpc));
    let unsampled = context(false);
    let background = Context::background(Duration::from_secs(5));
    assert!(!background.trace().sampled);
    let get = http::Method::GET;
    for ctx in [&unsampled, &background] {
        for _ in 0..50 {
            tracer.record_server(&server_record(Some(ctx), &get));
            tracer.record_client(&client_record(ctx, &get));
        }
    }
    // Refusals and probes carry no context.
    tracer.record_server(&server_record(None, &get));
    // One sampled request as a marker: once it has arrived, anything recorded before it
    // would have too (the shutdown flushes the whole queue).
    let sampled = context(true);
    tracer.record_server(&server_record(Some(&sampled), &get));
    tracer.shutdown(PATIENCE).await;

    let spans = receiver.spans();
    assert_eq!(spans.len(), 1, "{spans:#?}");
    assert_eq!(spans[0].span_id, sampled.trace().span_id.0);
    let s = tracer.stats();
    assert_eq!((s.exported, s.dropped, s.failed_spans), (1, 0, 0), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_the_queue_without_waiting_for_the_interval() {
    let receiver = OtlpReceiver::start_http().await;
    let cfg = TraceConfig {
        // Only the shutdown can send these.
        export_interval: Duration::from_secs(3600).into(),
        max_batch: 4,
        ..config(receiver.endpoint(), OtlpProtocol::HttpProtobuf)
    };
    let tracer = Tracer::start(&cfg);
    let ctx = context(true);
    let get = http::Method::GET;
    for _ in 0..3 {
        tracer.record_client(&client_record(&ctx, &get));
    }
    assert_eq!(tracer.stats().queued, 3);
    tracer.shutdown(PATIENCE).await;
    assert_eq!(receiver.spans().len(), 3);
    assert_eq!(tracer.stats().exported, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_batch_is_sent_before_the_interval() {
    let receiver = OtlpReceiver::start_grpc().await;
    let cfg = TraceConfig {
        export_interval: Duration::from_secs(3600).into(),
        max_batch: 5,
        ..config(receiver.endpoint(), OtlpProtocol::Grpc)
    };
    let tracer = Tracer::start(&cfg);
    let ctx = context(true);
    let get = http::Method::GET;
    for _ in 0..5 {
        tracer.record_client(&client_record(&ctx, &get));
    }
    let spans = receiver.wait_for(5, PATIENCE).await;
    assert_eq!(spans.len(), 5);
    assert_eq!(receiver.requests().len(), 1, "one batch of five");
    tracer.shutdown(PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_collector_costs_the_batch_then_recovers() {
    let receiver = OtlpReceiver::start_grpc().await;
    receiver.set_failing(true);
    let tracer = Tracer::start(&config(receiver.endpoint(), OtlpProtocol::Grpc));
    let ctx = context(true);
    let get = http::Method::GET;
    for _ in 0..5 {
        tracer.record_server(&server_record(Some(&ctx), &get));
    }
    let s = eventually(&tracer, |s| s.failed_spans == 5).await;
    assert_eq!(s.failed_spans, 5, "{s:?}");
    assert!(s.export_errors >= 1, "{s:?}");
    assert!(receiver.refused() >= 1);
    assert_eq!(s.queued, 0, "failed batches are dropped, not kept");

    receiver.set_failing(false);
    tracer.record_server(&server_record(Some(&ctx), &get));
    let spans = receiver.wait_for(1, PATIENCE).await;
    assert_eq!(spans.len(), 1, "only the span recorded after recovery");
    let s = eventually(&tracer, |s| s.exported == 1).await;
    assert_eq!((s.exported, s.failed_spans), (1, 5), "{s:?}");
    tracer.shutdown(PATIENCE).await;
}

#[tokio::test]
async fn without_an_endpoint_or_when_disabled_nothing_is_recorded() {
    let ctx = context(true);
    let get = http::Method::GET;
    let off = TraceConfig {
        enabled: false,
        ..config(format!("http://{}", free_addr()), OtlpProtocol::Grpc)
    };
    for cfg in [TraceConfig::default(), off] {
        let tracer = Tracer::start(&cfg);
        assert!(!tracer.is_enabled(), "{cfg:?}");
        tracer.record_server(&server_record(Some(&ctx), &get));
        tracer.record_client(&client_record(&ctx, &get));
        assert_eq!(tracer.stats(), TraceStats::default());
        tracer.shutdown(Duration::from_secs(1)).await;
    }
}

#[test]
fn starting_outside_a_runtime_yields_a_disabled_tracer() {
    let cfg = config(format!("http://{}", free_addr()), OtlpProtocol::Grpc);
    let tracer = Tracer::start(&cfg);
    assert!(!tracer.is_enabled());
}

#[test]
fn a_message_trace_crosses_the_broker_from_producer_to_consumer() {
    use keel_core::observe::{MessageRecord, MessageSide, Outcome};
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let policy = keel_core::context::InboundPolicy {
        route_timeout: Duration::from_secs(5),
        sample_roots: false,
    };
    let mut h = http::HeaderMap::new();
    h.insert("traceparent", tp.parse().unwrap());
    let request =
        keel_core::Context::from_headers(&h, &policy, None, keel_core::tasks::Registry::global())
            .unwrap();
    let publish_span = keel_core::codec::SpanId::random();
    let published = Tracer::message_span(&MessageRecord {
        ctx: &request,
        span_id: Some(publish_span),
        side: MessageSide::Publish,
        system: "rabbitmq",
        destination: "orders",
        message_id: Some("m-1"),
        outcome: Outcome::Answered,
        attempt: 1,
        duplicate: false,
        start: std::time::SystemTime::now(),
        duration: Duration::from_millis(2),
    })
    .unwrap();
    assert_eq!(published.kind, SpanKind::Producer as i32);
    assert_eq!(published.name, "publish orders");
    assert_eq!(published.span_id, publish_span.0.to_vec());
    assert_eq!(published.parent_span_id, request.trace().span_id.0.to_vec());

    // The consumer's context comes from the message headers the producer wrote.
    let mut headers = std::collections::HashMap::<String, String>::new();
    let opts = keel_core::propagation::Outbound {
        span_id: Some(publish_span),
        ..Default::default()
    };
    keel_core::propagation::inject(
        &request,
        keel_core::propagation::Carrier::Message,
        &opts,
        &mut headers,
    )
    .unwrap();
    let consumer = keel_core::Context::from_headers(
        &headers,
        &policy,
        None,
        keel_core::tasks::Registry::global(),
    )
    .unwrap();
    let processed = Tracer::message_span(&MessageRecord {
        ctx: &consumer,
        span_id: None,
        side: MessageSide::Process,
        system: "rabbitmq",
        destination: "orders",
        message_id: Some("m-1"),
        outcome: Outcome::Failed,
        attempt: 1,
        duplicate: false,
        start: std::time::SystemTime::now(),
        duration: Duration::from_millis(3),
    })
    .unwrap();
    assert_eq!(processed.kind, SpanKind::Consumer as i32);
    assert_eq!(
        processed.trace_id, published.trace_id,
        "one trace across the broker"
    );
    assert_eq!(
        processed.parent_span_id,
        publish_span.0.to_vec(),
        "consumer under producer"
    );
    assert_eq!(
        processed.status.as_ref().map(|s| s.code),
        Some(opentelemetry_proto::tonic::trace::v1::status::StatusCode::Error as i32)
    );
    let attr = |k: &str| {
        processed
            .attributes
            .iter()
            .find(|kv| kv.key == k)
            .and_then(|kv| kv.value.as_ref())
            .cloned()
    };
    assert!(attr("messaging.system").is_some() && attr("messaging.destination.name").is_some());
}
