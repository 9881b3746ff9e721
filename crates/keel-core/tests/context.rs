//! Context from inbound headers and back out: the model every hop relies on.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use http::HeaderMap;
use keel_core::codec::{self, TraceParent};
use keel_core::context::{Context, DeadlineSource, InboundError, InboundPolicy};
use keel_core::propagation::{self, B3Format, Carrier, Outbound, names};
use keel_core::tasks::Registry;

fn registry() -> &'static Registry {
    Box::leak(Box::new(Registry::new(Duration::from_secs(5))))
}

fn policy(route: Duration) -> InboundPolicy {
    InboundPolicy {
        route_timeout: route,
        sample_roots: false,
    }
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, v.parse().unwrap());
    }
    h
}

fn ctx(pairs: &[(&'static str, &str)], route: Duration) -> Result<Context, InboundError> {
    Context::from_headers(&headers(pairs), &policy(route), None, registry())
}

#[tokio::test(start_paused = true)]
async fn the_deadline_is_the_minimum_of_caller_and_route() {
    let c = ctx(&[("keel-timeout", "200m")], Duration::from_secs(30)).unwrap();
    assert_eq!(c.remaining(), Duration::from_millis(200));
    assert_eq!(c.deadline_source(), DeadlineSource::KeelTimeout);

    // The route caps a caller asking for more.
    let c = ctx(&[("grpc-timeout", "10S")], Duration::from_secs(2)).unwrap();
    assert_eq!(c.remaining(), Duration::from_secs(2));
    assert_eq!(c.deadline_source(), DeadlineSource::Route);

    // Nothing sent: the route's value applies.
    let c = ctx(&[], Duration::from_secs(3)).unwrap();
    assert_eq!(c.remaining(), Duration::from_secs(3));

    // Several sent: the smallest wins, Envoy's included.
    let c = ctx(
        &[
            ("grpc-timeout", "900m"),
            ("keel-timeout", "800m"),
            ("x-envoy-expected-rq-timeout-ms", "700"),
        ],
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(c.remaining(), Duration::from_millis(700));
    assert_eq!(c.deadline_source(), DeadlineSource::Envoy);
}

#[tokio::test]
async fn malformed_headers_are_errors_naming_the_header() {
    for (name, value) in [
        ("keel-timeout", "fast"),
        ("grpc-timeout", "123456789S"),
        ("x-envoy-expected-rq-timeout-ms", "-5"),
        ("traceparent", "00-zz-00-01"),
        ("baggage", "=novalue"),
        ("b3", "not-a-b3"),
    ] {
        let err = ctx(&[(name, value)], Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, InboundError::Malformed(_)), "{name}: {err:?}");
        assert!(err.to_string().contains(name), "{name}: {err}");
    }
}

#[tokio::test]
async fn a_deadline_already_passed_is_refused() {
    let err = ctx(&[("grpc-timeout", "0n")], Duration::from_secs(1)).unwrap_err();
    assert_eq!(err, InboundError::Expired(DeadlineSource::GrpcTimeout));
}

#[tokio::test]
async fn request_id_kept_when_well_formed_generated_otherwise() {
    let c = ctx(&[("x-request-id", "abc-123")], Duration::from_secs(1)).unwrap();
    assert_eq!(c.request_id(), "abc-123");
    let c = ctx(&[("x-request-id", "has space")], Duration::from_secs(1)).unwrap();
    assert_ne!(c.request_id(), "has space");
    assert_eq!(c.request_id().len(), 32);
    let c2 = ctx(&[], Duration::from_secs(1)).unwrap();
    assert_ne!(c.request_id(), c2.request_id());
}

#[tokio::test]
async fn b3_only_continues_the_same_trace_in_w3c_and_back() {
    let tid = "463ac35c9f6413ad48485a3953bb6124";
    let sid = "a2fb4a1d1a96d312";
    let c = ctx(&[("b3", &format!("{tid}-{sid}-1"))], Duration::from_secs(1)).unwrap();
    assert_eq!(c.trace().trace_id.to_string(), tid);
    assert_eq!(c.trace().parent_span_id.unwrap().to_string(), sid);
    assert!(c.trace().sampled);

    let mut out = HeaderMap::new();
    propagation::inject(&c, Carrier::Http, &Outbound::default(), &mut out).unwrap();
    let tp = TraceParent::parse(out["traceparent"].as_bytes()).unwrap();
    assert_eq!(tp.trace_id.to_string(), tid);
    assert_eq!(
        tp.parent_id,
        c.trace().span_id,
        "the next hop's parent is this hop's span"
    );
    assert!(tp.sampled());
    let b3 = codec::b3::parse_single(out["b3"].as_bytes())
        .unwrap()
        .unwrap();
    assert_eq!(b3.trace_id.to_string(), tid);
    assert_eq!(b3.span_id, c.trace().span_id);

    // W3C only in: B3 out carries the same trace.
    let c = ctx(
        &[("traceparent", &format!("00-{tid}-{sid}-00"))],
        Duration::from_secs(1),
    )
    .unwrap();
    let mut out = HeaderMap::new();
    propagation::inject(&c, Carrier::Http, &Outbound::default(), &mut out).unwrap();
    let b3 = codec::b3::parse_single(out["b3"].as_bytes())
        .unwrap()
        .unwrap();
    assert_eq!(b3.trace_id.to_string(), tid);
    assert_eq!(b3.sampled, Some(false));
}

#[tokio::test]
async fn b3_multi_headers_are_read() {
    let c = ctx(
        &[
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
        ],
        Duration::from_secs(1),
    )
    .unwrap();
    assert_eq!(
        c.trace().trace_id.to_string(),
        "463ac35c9f6413ad48485a3953bb6124"
    );
    let mut out = HeaderMap::new();
    let opts = Outbound {
        b3: B3Format::Multi,
        ..Outbound::default()
    };
    propagation::inject(&c, Carrier::Http, &opts, &mut out).unwrap();
    assert_eq!(out["x-b3-traceid"], "463ac35c9f6413ad48485a3953bb6124");
    assert!(out.get("b3").is_none());
}

#[tokio::test]
async fn values_new_on_every_call_are_never_indexed_by_hpack_and_the_rest_may_be() {
    let c = ctx(
        &[
            ("baggage", "keel-color=canary"),
            ("tracestate", "vendor=1"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        ],
        Duration::from_secs(1),
    )
    .unwrap();
    for b3 in [B3Format::Single, B3Format::Multi] {
        let mut out = HeaderMap::new();
        let opts = Outbound {
            b3,
            retry: true,
            ..Outbound::default()
        };
        propagation::inject(&c, Carrier::Http, &opts, &mut out).unwrap();
        let mut never: Vec<&str> = out
            .iter()
            .filter(|(_, v)| v.is_sensitive())
            .map(|(n, _)| n.as_str())
            .collect();
        never.sort_unstable();
        let mut indexable: Vec<&str> = out
            .iter()
            .filter(|(_, v)| !v.is_sensitive())
            .map(|(n, _)| n.as_str())
            .collect();
        indexable.sort_unstable();
        match b3 {
            B3Format::Single => {
                assert_eq!(never, ["b3", "keel-timeout", "traceparent", "x-request-id"]);
            }
            _ => assert_eq!(
                never,
                [
                    "keel-timeout",
                    "traceparent",
                    "x-b3-spanid",
                    "x-b3-traceid",
                    "x-request-id"
                ]
            ),
        }
        let mut repeats = vec!["baggage", "keel-retry", "tracestate"];
        if b3 == B3Format::Multi {
            repeats.push("x-b3-sampled");
            repeats.sort_unstable();
        }
        assert_eq!(indexable, repeats, "{b3:?}");
    }
    let mut out = HeaderMap::new();
    propagation::inject(&c, Carrier::Grpc, &Outbound::default(), &mut out).unwrap();
    assert!(out["grpc-timeout"].is_sensitive());
}

#[tokio::test(start_paused = true)]
async fn outbound_sends_remaining_minus_margin_and_fails_fast_below_it() {
    let c = ctx(
        &[
            ("keel-timeout", "100m"),
            ("baggage", "keel-color=canary,user=ann%20lee"),
        ],
        Duration::from_secs(30),
    )
    .unwrap();
    tokio::time::advance(Duration::from_millis(30)).await;
    let opts = Outbound {
        margin: Duration::from_millis(5),
        ..Outbound::default()
    };
    let mut h = HeaderMap::new();
    propagation::inject(&c, Carrier::Http, &opts, &mut h).unwrap();
    let sent = codec::timeout::parse("keel-timeout", h["keel-timeout"].as_bytes()).unwrap();
    assert_eq!(sent, Duration::from_millis(65));
    assert!(h.get("grpc-timeout").is_none());
    assert_eq!(h["x-request-id"], c.request_id());
    assert_eq!(c.color(), Some("canary"));
    let bag = codec::Baggage::parse(h["baggage"].as_bytes()).unwrap();
    assert_eq!(bag.get("user"), Some("ann lee"));
    assert_eq!(bag.get("keel-color"), Some("canary"));

    let mut g = HeaderMap::new();
    propagation::inject(&c, Carrier::Grpc, &opts, &mut g).unwrap();
    assert!(g.get("grpc-timeout").is_some() && g.get("keel-timeout").is_none());

    tokio::time::advance(Duration::from_millis(66)).await;
    let mut h = HeaderMap::new();
    let err = propagation::inject(&c, Carrier::Http, &opts, &mut h).unwrap_err();
    assert!(err.remaining < opts.margin);
    assert!(
        h.is_empty(),
        "nothing is written for a call that is not made"
    );
}

#[tokio::test]
async fn retry_marker_in_and_out() {
    let c = ctx(&[("keel-retry", "1")], Duration::from_secs(1)).unwrap();
    assert!(c.is_retry());
    let mut h = HeaderMap::new();
    let opts = Outbound {
        retry: true,
        ..Outbound::default()
    };
    propagation::inject(
        &ctx(&[], Duration::from_secs(1)).unwrap(),
        Carrier::Http,
        &opts,
        &mut h,
    )
    .unwrap();
    assert_eq!(h[names::RETRY], "1");
}

#[tokio::test]
async fn message_headers_round_trip_through_a_string_map() {
    let c = ctx(
        &[
            ("keel-timeout", "5S"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("baggage", "keel-color=blue"),
            ("x-request-id", "req-1"),
        ],
        Duration::from_secs(30),
    )
    .unwrap();
    let mut msg: HashMap<String, String> = HashMap::new();
    propagation::inject(&c, Carrier::Message, &Outbound::default(), &mut msg).unwrap();
    assert!(msg.contains_key("keel-deadline"));

    // A consumer with a generous default still inherits the producer's deadline.
    let consumed =
        Context::from_headers(&msg, &policy(Duration::from_secs(60)), None, registry()).unwrap();
    assert_eq!(consumed.deadline_source(), DeadlineSource::Absolute);
    assert!(consumed.remaining() <= Duration::from_secs(5));
    assert!(consumed.remaining() > Duration::from_secs(3));
    assert_eq!(consumed.trace().trace_id, c.trace().trace_id);
    assert_eq!(consumed.trace().parent_span_id, Some(c.trace().span_id));
    assert_eq!(consumed.color(), Some("blue"));
    assert_eq!(consumed.request_id(), "req-1");

    // Case-insensitive lookups: brokers disagree on header case.
    let mut upper = HashMap::new();
    upper.insert("X-Request-Id".to_string(), "req-2".to_string());
    let c =
        Context::from_headers(&upper, &policy(Duration::from_secs(1)), None, registry()).unwrap();
    assert_eq!(c.request_id(), "req-2");
}

#[tokio::test(start_paused = true)]
async fn scoped_tasks_see_the_context_and_end_at_the_deadline() {
    let reg = registry();
    let c = Context::from_headers(
        &headers(&[("keel-timeout", "50m")]),
        &policy(Duration::from_secs(1)),
        None,
        reg,
    )
    .unwrap();
    let id = c.request_id().to_string();
    let seen = c.spawn("reads current", async move {
        Context::current().map(|c| c.request_id().to_string())
    });
    assert_eq!(seen.await.unwrap(), Some(Some(id)));

    let forever = c.spawn("never finishes", std::future::pending::<()>());
    tokio::time::advance(Duration::from_millis(60)).await;
    assert_eq!(
        forever.await.unwrap(),
        None,
        "the deadline cancels it though the request still runs"
    );
    assert!(Context::current().is_none(), "no context outside a request");
}

#[test]
fn a_keel_color_header_colours_the_request_unless_baggage_already_does() {
    let route = Duration::from_secs(5);
    let c = ctx(&[("keel-color", "canary")], route).unwrap();
    assert_eq!(c.color(), Some("canary"));
    // Outbound, it travels as the baggage entry, so every later hop sees it.
    let mut h = HeaderMap::new();
    propagation::inject(&c, Carrier::Http, &Outbound::default(), &mut h).unwrap();
    let bag = codec::Baggage::parse(h["baggage"].as_bytes()).unwrap();
    assert_eq!(bag.get("keel-color"), Some("canary"));

    let both = ctx(
        &[("baggage", "keel-color=blue"), ("keel-color", "canary")],
        route,
    )
    .unwrap();
    assert_eq!(both.color(), Some("blue"), "the baggage entry wins");
    assert!(
        matches!(
            ctx(&[("keel-color", "a b;c")], route),
            Err(InboundError::Malformed(_))
        ),
        "a malformed colour is refused like any malformed header"
    );
}

#[test]
fn current_is_set_for_exactly_the_span_of_enter_and_restored_after_a_panic() {
    let outer = ctx(&[("x-request-id", "outer")], Duration::from_secs(5)).unwrap();
    let inner = ctx(&[("x-request-id", "inner")], Duration::from_secs(5)).unwrap();
    let id = || Context::current().map(|c| c.request_id().to_string());
    assert_eq!(id(), None);
    outer.enter(|| {
        assert_eq!(id().as_deref(), Some("outer"));
        inner.enter(|| assert_eq!(id().as_deref(), Some("inner")));
        assert_eq!(id().as_deref(), Some("outer"), "the outer one is back");
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            inner.enter(|| panic!("handler panicked"));
        }));
        assert!(panicked.is_err());
        assert_eq!(id().as_deref(), Some("outer"), "restored on unwind too");
    });
    assert_eq!(id(), None);
    // A clone taken inside outlives the enter that lent it (the count was taken for it).
    let kept = inner.enter(|| Context::current().unwrap());
    drop(inner);
    assert_eq!(kept.request_id(), "inner");
}

#[tokio::test]
async fn a_scoped_future_sees_its_context_in_each_poll_and_nothing_leaks_between_polls() {
    let c = ctx(&[("x-request-id", "scoped")], Duration::from_secs(5)).unwrap();
    let polls = c.scope(async {
        let first = Context::current().map(|c| c.request_id().to_string());
        tokio::task::yield_now().await;
        let second = Context::current().map(|c| c.request_id().to_string());
        (first, second)
    });
    let other = tokio::spawn(async { Context::current().is_none() });
    let (first, second) = polls.await;
    assert_eq!(first.as_deref(), Some("scoped"));
    assert_eq!(second.as_deref(), Some("scoped"));
    assert!(
        other.await.unwrap(),
        "another task on the runtime sees none"
    );
    assert!(Context::current().is_none());
}

#[test]
fn a_grpc_content_type_marks_the_context_grpc() {
    let route = Duration::from_secs(5);
    assert!(
        ctx(&[("content-type", "application/grpc+proto")], route)
            .unwrap()
            .is_grpc()
    );
    assert!(
        !ctx(&[("content-type", "application/json")], route)
            .unwrap()
            .is_grpc()
    );
    assert!(!ctx(&[], route).unwrap().is_grpc());
}
