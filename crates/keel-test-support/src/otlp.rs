//! A minimal OTLP trace collector for tests: it accepts exports over gRPC or HTTP/protobuf on
//! a loopback port and keeps every request, so tests can check what an exporter really put
//! on the wire.
//!
//! It can also be told to fail ([`OtlpReceiver::set_failing`]): gRPC `UNAVAILABLE` or HTTP
//! 503, like a collector that is up but overloaded.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

/// The path OTLP/HTTP trace exports are POSTed to.
pub const HTTP_TRACES_PATH: &str = "/v1/traces";

/// A running test collector. Dropping it stops the server.
pub struct OtlpReceiver {
    addr: SocketAddr,
    protocol: &'static str,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<ExportTraceServiceRequest>>,
    failing: AtomicBool,
    refused: AtomicU64,
}

impl State {
    /// Keep `req` unless set to fail; returns whether it was accepted.
    fn accept(&self, req: ExportTraceServiceRequest) -> bool {
        if self.failing.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return false;
        }
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(req);
        true
    }
}

impl std::fmt::Debug for OtlpReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpReceiver")
            .field("addr", &self.addr)
            .field("protocol", &self.protocol)
            .field("requests", &self.requests().len())
            .finish()
    }
}

struct GrpcService(Arc<State>);

#[tonic::async_trait]
impl TraceService for GrpcService {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self.0.accept(request.into_inner()) {
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        } else {
            Err(tonic::Status::unavailable("test receiver set to fail"))
        }
    }
}

impl OtlpReceiver {
    /// Start an OTLP/gRPC receiver on a free loopback port (bound to port 0, so no other
    /// process can take it between choosing and binding).
    pub async fn start_grpc() -> OtlpReceiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the OTLP/gRPC receiver");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let service = TraceServiceServer::new(GrpcService(state.clone()));
        let task = tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        OtlpReceiver {
            addr,
            protocol: "grpc",
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Start an OTLP/HTTP receiver (protobuf bodies, `POST /v1/traces`) on a free loopback
    /// port. Other paths get 404, other methods 405, other content types 415.
    pub async fn start_http() -> OtlpReceiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the OTLP/HTTP receiver");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State::default());
        let (stop, mut stopped) = oneshot::channel::<()>();
        let shared = state.clone();
        let task = tokio::spawn(async move {
            // Connections live in the set, so stopping the receiver closes them too (a
            // stopped collector must look stopped to a client holding a keep-alive).
            let mut conns = JoinSet::new();
            loop {
                let (io, _) = tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                let state = shared.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| handle_http(req, state.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(io), svc)
                        .await;
                });
                // Reap finished connections so the set does not grow over a long test.
                while conns.try_join_next().is_some() {}
            }
        });
        OtlpReceiver {
            addr,
            protocol: "http/protobuf",
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL to configure an exporter with, `http://127.0.0.1:PORT` (for HTTP/protobuf
    /// the exporter adds `/v1/traces`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `grpc` or `http/protobuf`.
    pub fn protocol(&self) -> &'static str {
        self.protocol
    }

    /// Every accepted export request, in arrival order.
    pub fn requests(&self) -> Vec<ExportTraceServiceRequest> {
        self.state
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every span received, flattened across requests, resources and scopes.
    pub fn spans(&self) -> Vec<Span> {
        self.requests()
            .into_iter()
            .flat_map(|r| r.resource_spans)
            .flat_map(|rs| rs.scope_spans)
            .flat_map(|ss| ss.spans)
            .collect()
    }

    /// The resource of every `ResourceSpans` received, in arrival order.
    pub fn resources(&self) -> Vec<Resource> {
        self.requests()
            .into_iter()
            .flat_map(|r| r.resource_spans)
            .filter_map(|rs| rs.resource)
            .collect()
    }

    /// The `service.name` of every resource that sent a span of `trace_id` (lower-case
    /// hex), once each.
    pub fn resources_of_trace(&self, trace_id: &str) -> Vec<String> {
        let mut names = Vec::new();
        for rs in self.requests().into_iter().flat_map(|r| r.resource_spans) {
            let has = rs.scope_spans.iter().flat_map(|ss| &ss.spans).any(|sp| {
                sp.trace_id
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
                    == trace_id
            });
            let name = rs.resource.as_ref().and_then(|r| {
                r.attributes
                    .iter()
                    .find(|a| a.key == "service.name")
                    .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(
                            s,
                        ) => Some(s.clone()),
                        _ => None,
                    })
            });
            if let (true, Some(n)) = (has, name) {
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        names
    }

    /// Export requests refused while [`OtlpReceiver::set_failing`] was on.
    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// Make every export fail (gRPC `UNAVAILABLE`, HTTP 503) until set back to `false`.
    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::SeqCst);
    }

    /// Wait until at least `n` spans have arrived or `timeout` passes; returns the spans
    /// received by then (the caller asserts on the count).
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Span> {
        let end = tokio::time::Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if spans.len() >= n || tokio::time::Instant::now() >= end {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stop listening and close connections (gracefully for up to a second, then by force).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(1), &mut task)
                .await
                .is_err()
            {
                task.abort();
                let _ = task.await;
            }
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn handle_http(
    req: http::Request<Incoming>,
    state: Arc<State>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    let reply = |status: u16, body: Bytes| {
        let mut resp = http::Response::new(Full::new(body));
        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-protobuf"),
        );
        Ok(resp)
    };
    if req.uri().path() != HTTP_TRACES_PATH {
        return reply(404, Bytes::new());
    }
    if req.method() != http::Method::POST {
        return reply(405, Bytes::new());
    }
    let protobuf = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/x-protobuf");
    if !protobuf {
        return reply(415, Bytes::new());
    }
    let Ok(body) = req.into_body().collect().await else {
        return reply(400, Bytes::new());
    };
    let Ok(export) = ExportTraceServiceRequest::decode(body.to_bytes()) else {
        return reply(400, Bytes::new());
    };
    if state.accept(export) {
        reply(
            200,
            Bytes::from(ExportTraceServiceResponse::default().encode_to_vec()),
        )
    } else {
        reply(503, Bytes::new())
    }
}

/// The value of attribute `key`, if present.
pub fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

/// The string value of attribute `key`, if present and a string.
pub fn str_attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match attr(attrs, key)? {
        any_value::Value::StringValue(s) => Some(s),
        _ => None,
    }
}

/// The integer value of attribute `key`, if present and an integer.
pub fn int_attr(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attrs, key)? {
        any_value::Value::IntValue(v) => Some(*v),
        _ => None,
    }
}
