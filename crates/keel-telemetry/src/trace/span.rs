//! Turning server and client records into OTLP spans, following the OpenTelemetry semantic
//! conventions for HTTP and RPC spans.
//!
//! Names stay low-cardinality (backends index them): a server span is named after its route
//! template, or only its method when the router gave no template; a client span after its
//! method. Paths and peers go into attributes instead.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_core::Context;
use keel_core::observe::{ClientRecord, MessageRecord, MessageSide, Outcome, ServerRecord};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, Status, span::SpanKind, status::StatusCode};

/// W3C trace-flags bit 0.
const FLAG_SAMPLED: u32 = 0x01;
/// OTLP `SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK`: the next bit is meaningful.
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
/// OTLP `SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK`: the parent lives in another process.
const FLAG_IS_REMOTE: u32 = 0x200;

/// The span of one server request, or `None` when it is not to be recorded (no context:
/// a refusal or probe; or an unsampled trace).
pub(crate) fn server_span(r: &ServerRecord<'_>) -> Option<Span> {
    let ctx = r.ctx?;
    let trace = ctx.trace();
    if !trace.sampled {
        return None;
    }
    let start = r.start_time();
    let mut attrs = Vec::with_capacity(12);
    let method = Method::of(r.method);
    method.push_attrs(&mut attrs);
    if let Some(s) = r.status {
        attrs.push(int("http.response.status_code", i64::from(s)));
    }
    if r.route_is_template {
        attrs.push(string("http.route", r.route));
    } else if r.route != keel_core::observe::UNMATCHED_ROUTE {
        // Without a template the route *is* the request path (a service that labels its
        // requests itself); the shared `unmatched` label is no path at all.
        attrs.push(string("url.path", r.route));
    }
    if let Some(peer) = r.peer {
        attrs.push(string("network.peer.address", peer.ip().to_string()));
        attrs.push(int("network.peer.port", i64::from(peer.port())));
    }
    let name = if r.grpc {
        push_rpc_attrs(&mut attrs, r.route, r.grpc_status)
    } else if r.route_is_template {
        format!("{} {}", method.name, r.route)
    } else {
        method.name.to_owned()
    };
    push_common_attrs(&mut attrs, ctx, r.outcome);

    let error = outcome_error(r.outcome)
        .or_else(|| {
            r.grpc_status
                .filter(|c| r.grpc && SERVER_GRPC_ERRORS.contains(c))
                .map(grpc_error)
        })
        .or_else(|| r.status.filter(|s| *s >= 500).map(http_error));
    let status = finish_error(&mut attrs, error);

    let parent = trace
        .parent_span_id
        .map(|p| p.0.to_vec())
        .unwrap_or_default();
    // A server span's parent, when there is one, is the caller's span: remote.
    let remote = if trace.parent_span_id.is_some() {
        FLAG_IS_REMOTE
    } else {
        0
    };
    Some(Span {
        trace_id: trace.trace_id.0.to_vec(),
        span_id: trace.span_id.0.to_vec(),
        trace_state: trace_state(ctx),
        parent_span_id: parent,
        flags: FLAG_SAMPLED | FLAG_HAS_IS_REMOTE | remote,
        name,
        kind: SpanKind::Server as i32,
        start_time_unix_nano: unix_nanos(start),
        end_time_unix_nano: unix_nanos(start).saturating_add(nanos(r.duration)),
        attributes: attrs,
        status,
        ..Span::default()
    })
}

/// The span of one outbound attempt, or `None` for an unsampled trace. Its parent is the
/// calling request's server span, which lives in this process.
pub(crate) fn client_span(r: &ClientRecord<'_>) -> Option<Span> {
    let ctx = r.ctx;
    let trace = ctx.trace();
    if !trace.sampled {
        return None;
    }
    let start = r.start_time();
    let mut attrs = Vec::with_capacity(14);
    let method = Method::of(r.method);
    method.push_attrs(&mut attrs);
    if let Some(s) = r.status {
        attrs.push(int("http.response.status_code", i64::from(s)));
    }
    attrs.push(string("server.address", r.addr.ip().to_string()));
    attrs.push(int("server.port", i64::from(r.addr.port())));
    attrs.push(string("keel.upstream", r.upstream));
    if r.attempt > 0 {
        attrs.push(int("http.request.resend_count", i64::from(r.attempt)));
    }
    let name = if r.grpc {
        push_rpc_attrs(&mut attrs, r.path, r.grpc_status)
    } else {
        method.name.to_owned()
    };
    push_common_attrs(&mut attrs, ctx, r.outcome);

    let error = outcome_error(r.outcome)
        .or_else(|| r.grpc_status.filter(|c| r.grpc && *c != 0).map(grpc_error))
        .or_else(|| match r.status {
            Some(s) if s >= 400 => Some(http_error(s)),
            Some(_) => None,
            None => Some(SpanError {
                message: "no response".to_owned(),
                error_type: "_OTHER".into(),
            }),
        });
    let status = finish_error(&mut attrs, error);

    Some(Span {
        trace_id: trace.trace_id.0.to_vec(),
        span_id: r.span_id.0.to_vec(),
        trace_state: trace_state(ctx),
        parent_span_id: trace.span_id.0.to_vec(),
        flags: FLAG_SAMPLED | FLAG_HAS_IS_REMOTE,
        name,
        kind: SpanKind::Client as i32,
        start_time_unix_nano: unix_nanos(start),
        end_time_unix_nano: unix_nanos(start).saturating_add(nanos(r.duration)),
        attributes: attrs,
        status,
        ..Span::default()
    })
}

/// gRPC codes that make a *server* span an error, per the RPC semantic conventions: the
/// others (NOT_FOUND, INVALID_ARGUMENT, …) are the caller's mistakes, not the server's.
/// UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
const SERVER_GRPC_ERRORS: [i32; 6] = [2, 4, 12, 13, 14, 15];

/// Why a span is an error: the status message and the `error.type` attribute.
struct SpanError {
    message: String,
    error_type: std::borrow::Cow<'static, str>,
}

/// The span of one published (PRODUCER) or processed (CONSUMER) message, or `None` for an
/// unsampled trace. A publish hangs under the publishing request's span and names its own id
/// in the message's `traceparent`; a processing span is the context built from the message
/// headers, whose parent is that publish span — so a trace crosses the broker.
pub(crate) fn message_span(r: &MessageRecord<'_>) -> Option<Span> {
    let ctx = r.ctx;
    let trace = ctx.trace();
    if !trace.sampled {
        return None;
    }
    let (span_id, parent, kind, op_type) = match (r.side, r.span_id) {
        (MessageSide::Publish, Some(own)) => (own, Some(trace.span_id), SpanKind::Producer, "send"),
        (MessageSide::Publish, None) => (
            trace.span_id,
            trace.parent_span_id,
            SpanKind::Producer,
            "send",
        ),
        (MessageSide::Process, _) => (
            trace.span_id,
            trace.parent_span_id,
            SpanKind::Consumer,
            "process",
        ),
    };
    let mut attrs = Vec::with_capacity(8);
    attrs.push(string("messaging.system", r.system));
    attrs.push(string("messaging.destination.name", r.destination));
    attrs.push(string("messaging.operation.name", r.side.as_str()));
    attrs.push(string("messaging.operation.type", op_type));
    if let Some(id) = r.message_id {
        attrs.push(string("messaging.message.id", id));
    }
    push_common_attrs(&mut attrs, ctx, r.outcome);
    let error = outcome_error(r.outcome);
    let status = finish_error(&mut attrs, error);
    Some(Span {
        trace_id: trace.trace_id.0.to_vec(),
        span_id: span_id.0.to_vec(),
        trace_state: trace_state(ctx),
        parent_span_id: parent.map(|p| p.0.to_vec()).unwrap_or_default(),
        flags: FLAG_SAMPLED | FLAG_HAS_IS_REMOTE,
        name: format!("{} {}", r.side.as_str(), r.destination),
        kind: kind as i32,
        start_time_unix_nano: unix_nanos(r.start),
        end_time_unix_nano: unix_nanos(r.start).saturating_add(nanos(r.duration)),
        attributes: attrs,
        status,
        ..Span::default()
    })
}

fn outcome_error(o: Outcome) -> Option<SpanError> {
    let (message, error_type) = match o {
        Outcome::DeadlineExceeded => ("deadline exceeded", "timeout"),
        Outcome::Cancelled => ("cancelled", "cancelled"),
        // The conventions' fallback when no more specific type is known.
        Outcome::Failed => ("failed", "_OTHER"),
        Outcome::Answered | Outcome::Refused => return None,
    };
    Some(SpanError {
        message: message.to_owned(),
        error_type: error_type.into(),
    })
}

fn http_error(status: u16) -> SpanError {
    SpanError {
        message: format!("HTTP {status}"),
        // The conventions use the status code itself as the error type.
        error_type: status.to_string().into(),
    }
}

fn grpc_error(code: i32) -> SpanError {
    let name = grpc_code_name(code);
    SpanError {
        message: format!("gRPC {name}"),
        error_type: name,
    }
}

/// Record `error` (if any) as `error.type` and return the span status. Successful spans keep
/// status UNSET, as the conventions ask: OK is reserved for an application's explicit say.
fn finish_error(attrs: &mut Vec<KeyValue>, error: Option<SpanError>) -> Option<Status> {
    let e = error?;
    attrs.push(string("error.type", e.error_type));
    Some(Status {
        message: e.message,
        code: StatusCode::Error as i32,
    })
}

/// `rpc.*` attributes from a gRPC path (`/pkg.Service/Method`); returns the span name
/// (`pkg.Service/Method`).
fn push_rpc_attrs(attrs: &mut Vec<KeyValue>, path: &str, grpc_status: Option<i32>) -> String {
    let full = path.strip_prefix('/').unwrap_or(path);
    attrs.push(string("rpc.system", "grpc"));
    if let Some((service, method)) = full.split_once('/') {
        attrs.push(string("rpc.service", service));
        attrs.push(string("rpc.method", method));
    }
    if let Some(code) = grpc_status {
        attrs.push(int("rpc.grpc.status_code", i64::from(code)));
    }
    full.to_owned()
}

fn push_common_attrs(attrs: &mut Vec<KeyValue>, ctx: &Context, outcome: Outcome) {
    attrs.push(string("keel.request_id", ctx.request_id()));
    attrs.push(string("keel.outcome", outcome.as_str()));
}

/// The HTTP method as the conventions want it: known methods verbatim, anything else as
/// `_OTHER` (with the original kept aside), so a client inventing methods cannot blow up
/// span-name cardinality.
struct Method<'a> {
    name: &'static str,
    original: Option<&'a str>,
}

impl<'a> Method<'a> {
    fn of(m: &'a http::Method) -> Method<'a> {
        const KNOWN: [&str; 9] = [
            "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
        ];
        match KNOWN.iter().find(|k| **k == m.as_str()) {
            Some(k) => Method {
                name: k,
                original: None,
            },
            None => Method {
                name: "_OTHER",
                original: Some(m.as_str()),
            },
        }
    }

    fn push_attrs(&self, attrs: &mut Vec<KeyValue>) {
        attrs.push(string("http.request.method", self.name));
        if let Some(o) = self.original {
            attrs.push(string("http.request.method_original", o));
        }
    }
}

fn trace_state(ctx: &Context) -> String {
    ctx.trace()
        .tracestate
        .as_ref()
        .map(|t| t.as_str().to_owned())
        .unwrap_or_default()
}

fn unix_nanos(t: SystemTime) -> u64 {
    // A clock before 1970 is a broken clock; 0 makes the span obviously wrong, not invisible.
    t.duration_since(UNIX_EPOCH).map(nanos).unwrap_or(0)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A string attribute.
pub(crate) fn string(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..KeyValue::default()
    }
}

fn int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..KeyValue::default()
    }
}

/// The canonical upper-case name of a gRPC status code.
fn grpc_code_name(code: i32) -> std::borrow::Cow<'static, str> {
    const NAMES: [&str; 17] = crate::metrics::GRPC_CODE_NAMES;
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .map(|n| std::borrow::Cow::Borrowed(*n))
        .unwrap_or_else(|| format!("code {code}").into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::SocketAddr;

    use http::HeaderMap;
    use keel_core::codec::SpanId;
    use keel_core::context::InboundPolicy;
    use keel_core::tasks::Registry;

    use super::*;

    const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    const PARENT: &str = "b7ad6b7169203331";

    fn ctx(sampled: bool) -> Context {
        let mut h = HeaderMap::new();
        let flags = if sampled { "01" } else { "00" };
        h.insert(
            "traceparent",
            format!("00-{TRACE}-{PARENT}-{flags}").parse().unwrap(),
        );
        h.insert("tracestate", "vendor=abc".parse().unwrap());
        let policy = InboundPolicy {
            route_timeout: Duration::from_secs(5),
            sample_roots: false,
        };
        Context::from_headers(&h, &policy, None, Registry::global()).unwrap()
    }

    fn server<'a>(ctx: Option<&'a Context>, method: &'a http::Method) -> ServerRecord<'a> {
        ServerRecord {
            ctx,
            route: "/orders/{id}",
            route_is_template: true,
            method,
            grpc: false,
            status: Some(200),
            grpc_status: None,
            outcome: Outcome::Answered,
            start: Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            duration: Duration::from_millis(15),
            peer: Some(SocketAddr::from(([10, 0, 0, 7], 51000))),
        }
    }

    fn client<'a>(ctx: &'a Context, method: &'a http::Method) -> ClientRecord<'a> {
        ClientRecord {
            ctx,
            span_id: SpanId([9; 8]),
            upstream: "inventory",
            addr: SocketAddr::from(([10, 0, 0, 9], 8080)),
            method,
            path: "/stock/42",
            grpc: false,
            status: Some(200),
            grpc_status: None,
            attempt: 0,
            outcome: Outcome::Answered,
            start: Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            duration: Duration::from_millis(4),
        }
    }

    fn attr<'a>(s: &'a Span, key: &str) -> Option<&'a any_value::Value> {
        s.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
    }

    fn str_attr<'a>(s: &'a Span, key: &str) -> Option<&'a str> {
        match attr(s, key)? {
            any_value::Value::StringValue(v) => Some(v),
            _ => None,
        }
    }

    fn int_attr(s: &Span, key: &str) -> Option<i64> {
        match attr(s, key)? {
            any_value::Value::IntValue(v) => Some(*v),
            _ => None,
        }
    }

    fn is_error(s: &Span) -> bool {
        s.status
            .as_ref()
            .is_some_and(|st| st.code == StatusCode::Error as i32)
    }

    #[test]
    fn server_http_span() {
        let c = ctx(true);
        let get = http::Method::GET;
        let s = server_span(&server(Some(&c), &get)).unwrap();
        assert_eq!(s.name, "GET /orders/{id}");
        assert_eq!(s.kind, SpanKind::Server as i32);
        assert_eq!(s.trace_id, c.trace().trace_id.0);
        assert_eq!(s.span_id, c.trace().span_id.0);
        assert_eq!(s.parent_span_id, c.trace().parent_span_id.unwrap().0);
        assert_eq!(s.flags, FLAG_SAMPLED | FLAG_HAS_IS_REMOTE | FLAG_IS_REMOTE);
        assert_eq!(s.trace_state, "vendor=abc");
        assert_eq!(s.start_time_unix_nano, 1_700_000_000 * 1_000_000_000);
        assert_eq!(s.end_time_unix_nano - s.start_time_unix_nano, 15_000_000);
        assert_eq!(str_attr(&s, "http.request.method"), Some("GET"));
        assert_eq!(int_attr(&s, "http.response.status_code"), Some(200));
        assert_eq!(str_attr(&s, "http.route"), Some("/orders/{id}"));
        assert_eq!(str_attr(&s, "url.path"), None);
        assert_eq!(str_attr(&s, "keel.request_id"), Some(c.request_id()));
        assert_eq!(str_attr(&s, "keel.outcome"), Some("answered"));
        assert_eq!(str_attr(&s, "network.peer.address"), Some("10.0.0.7"));
        assert_eq!(str_attr(&s, "rpc.system"), None);
        assert!(s.status.is_none());
    }

    #[test]
    fn server_names_stay_low_cardinality() {
        let c = ctx(true);
        let get = http::Method::GET;
        let mut r = server(Some(&c), &get);
        r.route = "/orders/8812";
        r.route_is_template = false;
        let s = server_span(&r).unwrap();
        assert_eq!(s.name, "GET");
        assert_eq!(str_attr(&s, "url.path"), Some("/orders/8812"));
        assert_eq!(str_attr(&s, "http.route"), None);

        let odd = http::Method::from_bytes(b"PURGE").unwrap();
        let s = server_span(&server(Some(&c), &odd)).unwrap();
        assert_eq!(s.name, "_OTHER /orders/{id}");
        assert_eq!(str_attr(&s, "http.request.method"), Some("_OTHER"));
        assert_eq!(str_attr(&s, "http.request.method_original"), Some("PURGE"));
    }

    #[test]
    fn server_errors() {
        let c = ctx(true);
        let get = http::Method::GET;
        let mut r = server(Some(&c), &get);

        r.status = Some(404);
        assert!(!is_error(&server_span(&r).unwrap()), "4xx is the caller's");

        r.status = Some(503);
        let s = server_span(&r).unwrap();
        assert!(is_error(&s));
        assert_eq!(s.status.unwrap().message, "HTTP 503");

        r.status = None;
        r.outcome = Outcome::DeadlineExceeded;
        let s = server_span(&r).unwrap();
        assert_eq!(s.status.as_ref().unwrap().message, "deadline exceeded");
        assert_eq!(str_attr(&s, "error.type"), Some("timeout"));
        assert_eq!(str_attr(&s, "keel.outcome"), Some("deadline_exceeded"));
        assert_eq!(int_attr(&s, "http.response.status_code"), None);

        r.outcome = Outcome::Cancelled;
        let s = server_span(&r).unwrap();
        assert_eq!(s.status.as_ref().unwrap().message, "cancelled");
        assert_eq!(str_attr(&s, "error.type"), Some("cancelled"));

        r.outcome = Outcome::Failed;
        let s = server_span(&r).unwrap();
        assert_eq!(s.status.as_ref().unwrap().message, "failed");
    }

    #[test]
    fn server_grpc_span_and_errors() {
        let c = ctx(true);
        let post = http::Method::POST;
        let mut r = server(Some(&c), &post);
        r.grpc = true;
        r.route = "/shop.v1.Orders/Get";
        r.route_is_template = false;
        r.grpc_status = Some(0);
        let s = server_span(&r).unwrap();
        assert_eq!(s.name, "shop.v1.Orders/Get");
        assert_eq!(str_attr(&s, "rpc.system"), Some("grpc"));
        assert_eq!(str_attr(&s, "rpc.service"), Some("shop.v1.Orders"));
        assert_eq!(str_attr(&s, "rpc.method"), Some("Get"));
        assert_eq!(int_attr(&s, "rpc.grpc.status_code"), Some(0));
        assert!(!is_error(&s));

        // NOT_FOUND is the caller's problem on the server side…
        r.grpc_status = Some(5);
        assert!(!is_error(&server_span(&r).unwrap()));
        // …UNAVAILABLE is the server's.
        r.grpc_status = Some(14);
        let s = server_span(&r).unwrap();
        assert!(is_error(&s));
        assert_eq!(s.status.as_ref().unwrap().message, "gRPC UNAVAILABLE");
        assert_eq!(str_attr(&s, "error.type"), Some("UNAVAILABLE"));
    }

    #[test]
    fn server_records_without_context_or_unsampled_are_skipped() {
        let get = http::Method::GET;
        assert!(server_span(&server(None, &get)).is_none());
        let c = ctx(false);
        assert!(server_span(&server(Some(&c), &get)).is_none());
    }

    #[test]
    fn root_server_span_has_no_parent() {
        let policy = InboundPolicy {
            route_timeout: Duration::from_secs(5),
            sample_roots: true,
        };
        let c =
            Context::from_headers(&HeaderMap::new(), &policy, None, Registry::global()).unwrap();
        let get = http::Method::GET;
        let s = server_span(&server(Some(&c), &get)).unwrap();
        assert!(s.parent_span_id.is_empty());
        assert_eq!(s.flags, FLAG_SAMPLED | FLAG_HAS_IS_REMOTE);
        assert_eq!(s.trace_state, "");
    }

    #[test]
    fn client_http_span() {
        let c = ctx(true);
        let put = http::Method::PUT;
        let mut r = client(&c, &put);
        r.attempt = 2;
        let s = client_span(&r).unwrap();
        assert_eq!(s.name, "PUT");
        assert_eq!(s.kind, SpanKind::Client as i32);
        assert_eq!(s.trace_id, c.trace().trace_id.0);
        assert_eq!(s.span_id, [9; 8]);
        assert_eq!(s.parent_span_id, c.trace().span_id.0);
        assert_eq!(s.flags, FLAG_SAMPLED | FLAG_HAS_IS_REMOTE);
        assert_eq!(str_attr(&s, "server.address"), Some("10.0.0.9"));
        assert_eq!(int_attr(&s, "server.port"), Some(8080));
        assert_eq!(str_attr(&s, "keel.upstream"), Some("inventory"));
        assert_eq!(int_attr(&s, "http.request.resend_count"), Some(2));
        assert_eq!(str_attr(&s, "keel.outcome"), Some("answered"));
        assert!(!is_error(&s));

        r.attempt = 0;
        let s = client_span(&r).unwrap();
        assert_eq!(int_attr(&s, "http.request.resend_count"), None);
    }

    #[test]
    fn client_errors() {
        let c = ctx(true);
        let get = http::Method::GET;
        let mut r = client(&c, &get);
        r.status = Some(404);
        let s = client_span(&r).unwrap();
        assert!(is_error(&s), "4xx is an error for the caller");
        assert_eq!(s.status.as_ref().unwrap().message, "HTTP 404");
        assert_eq!(str_attr(&s, "error.type"), Some("404"));

        r.status = None;
        r.outcome = Outcome::Failed;
        let s = client_span(&r).unwrap();
        assert_eq!(s.status.as_ref().unwrap().message, "failed");

        r.outcome = Outcome::Answered;
        let s = client_span(&r).unwrap();
        assert_eq!(s.status.as_ref().unwrap().message, "no response");

        r.grpc = true;
        r.path = "/shop.v1.Stock/Reserve";
        r.status = Some(200);
        r.grpc_status = Some(5);
        let s = client_span(&r).unwrap();
        assert_eq!(s.name, "shop.v1.Stock/Reserve");
        assert!(is_error(&s), "any non-zero code fails the client span");
        assert_eq!(s.status.as_ref().unwrap().message, "gRPC NOT_FOUND");
        assert_eq!(int_attr(&s, "rpc.grpc.status_code"), Some(5));

        r.grpc_status = Some(0);
        assert!(!is_error(&client_span(&r).unwrap()));

        let u = ctx(false);
        assert!(client_span(&client(&u, &get)).is_none());
    }

    #[test]
    fn grpc_code_names() {
        assert_eq!(grpc_code_name(0), "OK");
        assert_eq!(grpc_code_name(16), "UNAUTHENTICATED");
        assert_eq!(grpc_code_name(42), "code 42");
        assert_eq!(grpc_code_name(-1), "code -1");
    }
}
