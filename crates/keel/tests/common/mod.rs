//! Shared pieces of the chain tests: a hop that records what it received and whether its
//! handler was cancelled, HTTP and gRPC routers for it, and the assertions both chains share.
//! Each chain lives in its own test binary so the process-wide task count is theirs alone.
#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::Full;
use keel::propagation::{self, Carrier, Outbound};
use keel::tasks::Registry;
use keel::{App, Context, Sources};
use keel_test_support::{self as ts, grpc::RawCodec};

pub const TRACE_ID: &str = "463ac35c9f6413ad48485a3953bb6124";
pub const SPAN_ID: &str = "a2fb4a1d1a96d312";
pub const GRPC_PATH: &str = "/keel.test.Chain/Call";

/// What one hop saw, and what happened to its handler.
#[derive(Default)]
pub struct Hop {
    pub next: Option<SocketAddr>,
    /// After the downstream answers, keep working (a slow fallback, say) far past any deadline.
    pub stall_after_call: bool,
    pub seen: Mutex<Option<Seen>>,
    pub cancelled: AtomicUsize,
    pub completed: AtomicUsize,
    /// Pooled clients to `next`, warmed before the timed call so that connection set-up on a
    /// loaded machine does not eat the deadline under test.
    h1: Option<
        hyper_util::client::legacy::Client<
            hyper_util::client::legacy::connect::HttpConnector,
            Full<Bytes>,
        >,
    >,
    h2: Option<H2Client>,
}

#[derive(Clone, Debug)]
pub struct Seen {
    timeout: Option<Duration>,
    trace_id: String,
    parent: Option<String>,
    span: String,
    baggage: Vec<(String, String)>,
    request_id: String,
    raw_traceparent: Option<String>,
}

impl Hop {
    pub fn new(next: Option<SocketAddr>, stall_after_call: bool) -> Arc<Hop> {
        Arc::new(Hop {
            next,
            stall_after_call,
            h1: Some(ts::http1_client()),
            h2: Some(
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .http2_only(true)
                    .build_http(),
            ),
            ..Hop::default()
        })
    }

    /// Open the pooled connections to `next` (HTTP/1.1 and HTTP/2) with a probe request.
    pub async fn warm(&self) {
        let Some(next) = self.next else { return };
        let url = format!("http://{next}/livez");
        let r = self
            .h1
            .as_ref()
            .unwrap()
            .request(
                http::Request::get(&url)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = self
            .h2
            .as_ref()
            .unwrap()
            .request(
                http::Request::get(&url)
                    .body(tonic::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    async fn maybe_stall(&self) {
        if self.stall_after_call {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    }

    fn record(&self, ctx: &Context, headers: &HeaderMap, timeout_header: &'static str) {
        let timeout = headers
            .get(timeout_header)
            .map(|v| keel::codec::timeout::parse(timeout_header, v.as_bytes()).unwrap());
        *self.seen.lock().unwrap() = Some(Seen {
            timeout,
            trace_id: ctx.trace().trace_id.to_string(),
            parent: ctx.trace().parent_span_id.map(|s| s.to_string()),
            span: ctx.trace().span_id.to_string(),
            baggage: ctx
                .baggage()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            request_id: ctx.request_id().to_string(),
            raw_traceparent: headers
                .get("traceparent")
                .map(|v| v.to_str().unwrap().to_string()),
        });
    }

    fn seen(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .clone()
            .expect("hop was never called")
    }
}

/// Counts a handler future dropped before it finished.
pub struct Probe {
    hop: Arc<Hop>,
    done: bool,
}

impl Drop for Probe {
    fn drop(&mut self) {
        let counter = if self.done {
            &self.hop.completed
        } else {
            &self.hop.cancelled
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

pub async fn start(router: Router) -> SocketAddr {
    let addr = ts::free_addr();
    let admin = ts::free_addr();
    let env = vec![
        ("KEEL_SERVER__ADDR".to_string(), addr.to_string()),
        ("KEEL_ADMIN__ADDR".to_string(), admin.to_string()),
        ("KEEL_SERVER__LISTENERS".to_string(), "1".to_string()),
    ];
    let loaded = Sources::default().load_with_env(env).unwrap();
    let sizing = keel::runtime::detect(&loaded.value.runtime);
    let app = App::new("chain", loaded, sizing);
    REGISTRIES.lock().unwrap().push(app.registry());
    tokio::spawn(app.serve_until(router, std::future::pending(), std::future::pending()));
    let ok = tokio::task::spawn_blocking(move || {
        ts::wait_until(Duration::from_secs(10), || ts::port_open(addr))
    })
    .await
    .unwrap();
    assert!(ok, "service on {addr} did not start");
    addr
}

pub async fn http_hop(State(hop): State<Arc<Hop>>, ctx: Context, headers: HeaderMap) -> Response {
    hop.record(&ctx, &headers, "keel-timeout");
    let mut probe = Probe {
        hop: hop.clone(),
        done: false,
    };
    let resp = match hop.next {
        None => {
            // The leaf waits far longer than any deadline in these tests.
            tokio::time::sleep(Duration::from_secs(30)).await;
            (StatusCode::OK, "leaf").into_response()
        }
        Some(next) => {
            let mut req = http::Request::get(format!("http://{next}/hop"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            if let Err(e) =
                propagation::inject(&ctx, Carrier::Http, &Outbound::default(), req.headers_mut())
            {
                return (StatusCode::GATEWAY_TIMEOUT, e.to_string()).into_response();
            }
            let resp = match hop.h1.as_ref().unwrap().request(req).await {
                Ok(r) => r.status().into_response(),
                Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
            };
            hop.maybe_stall().await;
            resp
        }
    };
    probe.done = true;
    resp
}

pub fn grpc_router(hop: Arc<Hop>) -> Router {
    Router::new().route(
        GRPC_PATH,
        post(move |req: axum::extract::Request| {
            let hop = hop.clone();
            async move {
                let svc =
                    tower::service_fn(move |r: tonic::Request<Bytes>| grpc_hop(hop.clone(), r));
                tonic::server::Grpc::new(RawCodec).unary(svc, req).await
            }
        }),
    )
}

pub async fn grpc_hop(
    hop: Arc<Hop>,
    r: tonic::Request<Bytes>,
) -> Result<tonic::Response<Bytes>, tonic::Status> {
    let ctx = r
        .extensions()
        .get::<Context>()
        .cloned()
        .expect("Keel puts the Context in tonic's extensions");
    hop.record(
        &ctx,
        r.metadata().clone().into_headers().as_ref_headers(),
        "grpc-timeout",
    );
    let mut probe = Probe {
        hop: hop.clone(),
        done: false,
    };
    let out = match hop.next {
        None => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(tonic::Response::new(Bytes::from_static(b"leaf")))
        }
        Some(next) => {
            let out = call_grpc(&ctx, &hop, next).await;
            hop.maybe_stall().await;
            out
        }
    };
    probe.done = true;
    out
}

pub trait AsRefHeaders {
    fn as_ref_headers(&self) -> &HeaderMap;
}
impl AsRefHeaders for HeaderMap {
    fn as_ref_headers(&self) -> &HeaderMap {
        self
    }
}

/// A gRPC call over a plain hyper HTTP/2 client: tonic's `Channel` would also enforce the
/// `grpc-timeout` it sends with a local timer, racing the server's own answer; here the
/// callee's answer (or Keel's deadline on this side) decides.
pub async fn call_grpc(
    ctx: &Context,
    hop: &Hop,
    next: SocketAddr,
) -> Result<tonic::Response<Bytes>, tonic::Status> {
    let mut headers = HeaderMap::new();
    propagation::inject(ctx, Carrier::Grpc, &Outbound::default(), &mut headers)
        .map_err(|e| tonic::Status::deadline_exceeded(e.to_string()))?;
    let mut req = tonic::Request::new(Bytes::new());
    *req.metadata_mut() = tonic::metadata::MetadataMap::from_headers(headers);
    let origin = format!("http://{next}").parse().unwrap();
    tonic::client::Grpc::with_origin(hop.h2.clone().unwrap(), origin)
        .unary(
            req,
            http::uri::PathAndQuery::from_static(GRPC_PATH),
            RawCodec,
        )
        .await
}

pub type H2Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    tonic::body::Body,
>;

pub fn grpc_client(addr: SocketAddr) -> tonic::client::Grpc<H2Client> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    tonic::client::Grpc::with_origin(client, format!("http://{addr}").parse().unwrap())
}

/// The task registries of every hop `start` made in this test process: each App lists its
/// requests' tasks in its own.
static REGISTRIES: std::sync::Mutex<Vec<&'static Registry>> = std::sync::Mutex::new(Vec::new());

fn registries() -> Vec<&'static Registry> {
    REGISTRIES.lock().unwrap().clone()
}

/// Tasks of `request_id` alive in any hop.
pub fn own_tasks(request_id: &str) -> usize {
    registries()
        .iter()
        .flat_map(|r| r.snapshot())
        .filter(|t| t.request_id.as_deref() == Some(request_id))
        .count()
}

/// Live tasks of every hop.
pub fn live_tasks() -> usize {
    registries().iter().map(|r| r.live()).sum()
}

fn render_tasks() -> String {
    registries().iter().map(|r| r.render_text()).collect()
}

/// The assertions both chains share.
pub async fn check_chain(hops: [&Arc<Hop>; 3], request_id: &str, live_before: usize) {
    let [a, b, c] = hops;
    // B (stalling after its call) and C (the slow leaf) had their handler futures dropped when
    // their deadlines passed; neither ran to completion. A may finish normally: B's answer
    // reaches it a propagation margin before A's own deadline, which is what the margin is for.
    let cancelled = tokio::task::spawn_blocking({
        let (b, c) = (b.clone(), c.clone());
        move || {
            ts::wait_until(Duration::from_secs(5), || {
                b.cancelled.load(Ordering::SeqCst) == 1 && c.cancelled.load(Ordering::SeqCst) == 1
            })
        }
    })
    .await
    .unwrap();
    assert!(
        cancelled,
        "cancelled: b={} c={}",
        b.cancelled.load(Ordering::SeqCst),
        c.cancelled.load(Ordering::SeqCst)
    );
    for h in [b, c] {
        assert_eq!(h.completed.load(Ordering::SeqCst), 0);
    }
    assert_eq!(
        a.cancelled.load(Ordering::SeqCst) + a.completed.load(Ordering::SeqCst),
        1
    );

    // Each hop was told less time than the hop before it.
    let (sa, sb, sc) = (a.seen(), b.seen(), c.seen());
    let (ta, tb, tc) = (
        sa.timeout.unwrap(),
        sb.timeout.unwrap(),
        sc.timeout.unwrap(),
    );
    assert_eq!(ta, Duration::from_millis(500));
    assert!(
        tb < ta && tc < tb,
        "remaining times a={ta:?} b={tb:?} c={tc:?}"
    );

    // One trace, B3 in at A, W3C by C; every parent is the previous hop's span.
    for s in [&sa, &sb, &sc] {
        assert_eq!(s.trace_id, TRACE_ID);
        assert_eq!(s.request_id, request_id);
    }
    assert_eq!(sa.parent.as_deref(), Some(SPAN_ID));
    assert_eq!(sb.parent.as_deref(), Some(sa.span.as_str()));
    assert_eq!(sc.parent.as_deref(), Some(sb.span.as_str()));
    let tp = sc.raw_traceparent.expect("C received a traceparent");
    assert!(
        tp.starts_with(&format!("00-{TRACE_ID}-{}-", sb.span)),
        "{tp}"
    );
    assert_eq!(sa.raw_traceparent, None, "A only got B3");

    // Baggage, colour included, arrives unchanged.
    let want = vec![
        ("keel-color".to_string(), "canary".to_string()),
        ("tenant".to_string(), "acme corp".to_string()),
    ];
    assert_eq!(sc.baggage, want);
    assert_eq!(sb.baggage, want);

    // No Keel task of this request survives it, and the process is back where it started.
    let clean = tokio::task::spawn_blocking({
        let id = request_id.to_string();
        move || {
            ts::wait_until(Duration::from_secs(5), || {
                own_tasks(&id) == 0 && live_tasks() == live_before
            })
        }
    })
    .await
    .unwrap();
    assert!(
        clean,
        "tasks left: {} of this request, {} live vs {live_before} before:\n{}",
        own_tasks(request_id),
        live_tasks(),
        render_tasks()
    );
}

pub fn inbound_headers(request_id: &str) -> Vec<(&'static str, String)> {
    vec![
        ("b3", format!("{TRACE_ID}-{SPAN_ID}-1")),
        (
            "baggage",
            "keel-color=canary,tenant=acme%20corp".to_string(),
        ),
        ("x-request-id", request_id.to_string()),
    ]
}
