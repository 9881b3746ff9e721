//! BENCH.md S2, the three-hop chain `gateway → order → inventory`, for `bench/suite/s2.py`.
//!
//! One request, `GET /api/orders/quote/{sku}`: the gateway checks the API key and forwards to
//! order's `GET /orders/quote/{sku}`; order asks inventory over gRPC (`Stock`, the shop's
//! proto) with a deadline and answers `{"sku":…,"available":…}`. Inventory keeps its stock in
//! memory, so the chain measures the framework on every hop and not a database.
//!
//! - Keel: the gateway is the shop's `gateway` binary; `keel-order` and `keel-inventory` here
//!   are the same handlers on a [`keel::App`] (config from `KEEL_CONFIG`: probes, metrics,
//!   deadlines, shedding, tracing at `tracing.sample_ratio`; order's `[clients.inventory]` is
//!   Keel's client over h2c, which sends the remaining deadline as `grpc-timeout`).
//! - Bare (the physical limit): the gateway is `keel-server`'s `bare_proxy` example; `bare-order`
//!   is hyper with a tonic client (a fixed 1 s `grpc-timeout`), `bare-inventory` plain tonic.
//! - `sink`: an OTLP/gRPC trace receiver that counts and drops, for the tracing variants.
//!
//! Every server here runs on one tokio worker, as BENCH.md asks of each system under test.
//!
//! ```text
//! keel-chain keel-order | keel-inventory          (KEEL_CONFIG names addresses and upstreams)
//! keel-chain bare-order LISTEN INVENTORY_ADDR
//! keel-chain bare-inventory LISTEN
//! keel-chain sink LISTEN
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keel_shop::proto::inventory_client::InventoryClient;
use keel_shop::proto::inventory_server::{Inventory, InventoryServer};
use keel_shop::proto::{
    ReleaseReply, ReleaseRequest, ReserveReply, ReserveRequest, StockReply, StockRequest,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tonic::{Code, Request, Status};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    let result = match arg(0).as_str() {
        "keel-order" => return keel_order(),
        "keel-inventory" => return keel_inventory(),
        "bare-order" => one_worker(bare_order(arg(1), arg(2))),
        "bare-inventory" => one_worker(bare_inventory(arg(1))),
        "sink" => one_worker(sink(arg(1))),
        other => Err(format!(
            "unknown role {other:?}: expected keel-order, keel-inventory, bare-order, \
             bare-inventory or sink"
        )
        .into()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel-chain: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn one_worker(f: impl Future<Output = Result<(), BoxError>>) -> Result<(), BoxError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(f)
}

/// Order's answer, byte for byte the same on every system.
fn quote_body(reply: &StockReply) -> Bytes {
    Bytes::from(format!(
        "{{\"sku\":\"{}\",\"available\":{}}}",
        reply.sku, reply.available
    ))
}

/// Order's answer for a failed `Stock` call.
fn quote_error(status: &Status) -> (StatusCode, Bytes) {
    let code = match status.code() {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let body = format!("{{\"error\":{:?}}}", status.message());
    (code, Bytes::from(body))
}

fn json(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// The SKU of an order-side path `/orders/quote/{sku}`.
fn quoted_sku(path: &str) -> Option<&str> {
    path.strip_prefix("/orders/quote/")
        .filter(|s| !s.is_empty() && !s.contains('/'))
}

/// Inventory's `Stock` over an in-memory catalogue (the shop's seed); the other methods are
/// not part of the chain.
#[derive(Debug, Clone)]
struct Stock(Arc<HashMap<&'static str, i64>>);

impl Stock {
    fn seeded() -> Stock {
        Stock(Arc::new(
            keel_shop::inventory::SEED.iter().copied().collect(),
        ))
    }
}

#[tonic::async_trait]
impl Inventory for Stock {
    async fn reserve(
        &self,
        _: Request<ReserveRequest>,
    ) -> Result<tonic::Response<ReserveReply>, Status> {
        Err(Status::unimplemented("not part of the S2 chain"))
    }

    async fn release(
        &self,
        _: Request<ReleaseRequest>,
    ) -> Result<tonic::Response<ReleaseReply>, Status> {
        Err(Status::unimplemented("not part of the S2 chain"))
    }

    async fn stock(
        &self,
        req: Request<StockRequest>,
    ) -> Result<tonic::Response<StockReply>, Status> {
        let sku = req.into_inner().sku;
        match self.0.get(sku.as_str()) {
            Some(&available) => Ok(tonic::Response::new(StockReply {
                sku,
                available,
                reserved: 0,
                confirmed: 0,
            })),
            None => Err(Status::not_found(format!("unknown SKU {sku}"))),
        }
    }
}

// ---- Keel ----

/// Keel's config sources without the role argument (`keel::run` would read it as a flag):
/// `KEEL_CONFIG` and `KEEL_*` variables.
fn keel_sources() -> keel::config::Sources {
    keel::config::Sources::default().with_env_file()
}

fn keel_order() -> std::process::ExitCode {
    use axum::extract::{Path, State};
    use axum::response::IntoResponse;
    type Inv = InventoryClient<keel::client::client::Service>;

    async fn quote(
        State(mut inv): State<Inv>,
        ctx: keel::Context,
        Path(sku): Path<String>,
    ) -> axum::response::Response {
        let call = keel::client::client::tonic_request(&ctx, StockRequest { sku });
        match inv.stock(call).await {
            Ok(reply) => json(StatusCode::OK, quote_body(reply.get_ref())).into_response(),
            Err(status) => {
                let (code, body) = quote_error(&status);
                json(code, body).into_response()
            }
        }
    }

    keel::run_with("order", &keel_sources(), |app| async move {
        let inventory =
            InventoryClient::new(keel::client::client::Service::new(app.client("inventory")?));
        let routes = axum::Router::new()
            .route("/orders/quote/{sku}", axum::routing::get(quote))
            .with_state(inventory);
        app.serve(routes).await
    })
}

fn keel_inventory() -> std::process::ExitCode {
    keel::run_with("inventory", &keel_sources(), |app| async move {
        let routes =
            tonic::service::Routes::new(InventoryServer::new(Stock::seeded())).into_axum_router();
        app.serve(routes).await
    })
}

// ---- bare hyper / tonic ----

async fn bare_order(listen: String, inventory: String) -> Result<(), BoxError> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{inventory}"))?
        .tcp_nodelay(true)
        .connect_lazy();
    let client = InventoryClient::new(channel);
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let client = client.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let mut client = client.clone();
                    async move {
                        let Some(sku) = quoted_sku(req.uri().path()) else {
                            return Ok::<_, Infallible>(json(StatusCode::NOT_FOUND, Bytes::new()));
                        };
                        let mut call = Request::new(StockRequest {
                            sku: sku.to_string(),
                        });
                        call.set_timeout(Duration::from_secs(1));
                        Ok(match client.stock(call).await {
                            Ok(reply) => json(StatusCode::OK, quote_body(reply.get_ref())),
                            Err(status) => {
                                let (code, body) = quote_error(&status);
                                json(code, body)
                            }
                        })
                    }
                });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn bare_inventory(listen: String) -> Result<(), BoxError> {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(InventoryServer::new(Stock::seeded()))
        .serve(listen.parse()?)
        .await?;
    Ok(())
}

// ---- OTLP sink ----

/// Accepts OTLP/gRPC trace exports and drops them, printing the span count every 10 s.
#[derive(Debug, Clone, Default)]
struct Sink(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, Status> {
        let spans: usize = req
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn sink(listen: String) -> Result<(), BoxError> {
    let sink = Sink::default();
    let count = sink.0.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(10));
        every.tick().await;
        loop {
            every.tick().await;
            eprintln!("sink: {} spans", count.load(Ordering::Relaxed));
        }
    });
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(sink))
        .serve(listen.parse()?)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quote_path_names_one_sku() {
        assert_eq!(quoted_sku("/orders/quote/keel-mug"), Some("keel-mug"));
        assert_eq!(quoted_sku("/orders/quote/"), None);
        assert_eq!(quoted_sku("/orders/quote/a/b"), None);
        assert_eq!(quoted_sku("/orders/1"), None);
    }

    #[tokio::test]
    async fn stock_answers_the_seed_and_refuses_unknown_skus() {
        let stock = Stock::seeded();
        let reply = stock
            .stock(Request::new(StockRequest {
                sku: "keel-mug".into(),
            }))
            .await
            .expect("a seeded SKU");
        assert_eq!(
            quote_body(reply.get_ref()),
            Bytes::from_static(b"{\"sku\":\"keel-mug\",\"available\":1000}")
        );
        let err = stock
            .stock(Request::new(StockRequest { sku: "nope".into() }))
            .await
            .expect_err("unknown SKU");
        assert_eq!(quote_error(&err).0, StatusCode::NOT_FOUND);
    }
}
