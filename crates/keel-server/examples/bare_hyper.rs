//! The physical-limit baseline for server benchmarks: hyper + hyper-util's auto (HTTP/1.1 and
//! h2c) connection builder, nothing else: `POST /echo` answers with the request body (like the
//! example service's `/echo`), every other request with the example service's `GET /` bytes.
//!
//! Run with `cargo run --release -p keel-server --example bare_hyper -- 127.0.0.1:8081 [--axum]`
//! (one tokio worker, as BENCH.md asks of every system under test). With `--axum` the same
//! bytes come from an axum `Router`, which separates the router's cost from Keel's.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8081".into());
    let use_axum = std::env::args().any(|a| a == "--axum");
    // `with_state` turns the handlers into routes once, as `axum::serve` does; a router
    // served without it rebuilds each handler's route on every request.
    let router = axum::Router::new()
        .route("/", axum::routing::get(|| async { "hello from keel\n" }))
        .with_state(());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(&addr).await?;
            eprintln!("bare {} on {addr}", if use_axum { "axum" } else { "hyper" });
            loop {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(true)?;
                if use_axum {
                    let svc = hyper_util::service::TowerToHyperService::new(router.clone());
                    tokio::spawn(async move {
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                    continue;
                }
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        |req: http::Request<hyper::body::Incoming>| async move {
                            // POST /echo answers with the request body, as the example service's
                            // /echo does (BENCH.md S1's 1 KiB JSON echo); anything else gets the
                            // example service's `GET /` bytes.
                            if req.method() == http::Method::POST && req.uri().path() == "/echo" {
                                let body = http_body_util::BodyExt::collect(req.into_body())
                                    .await
                                    .map(|c| c.to_bytes())
                                    .unwrap_or_default();
                                let mut r = http::Response::new(Full::new(body));
                                r.headers_mut().insert(
                                    http::header::CONTENT_TYPE,
                                    http::HeaderValue::from_static("application/octet-stream"),
                                );
                                return Ok::<_, Infallible>(r);
                            }
                            let mut r = http::Response::new(Full::new(Bytes::from_static(
                                b"hello from keel\n",
                            )));
                            r.headers_mut().insert(
                                http::header::CONTENT_TYPE,
                                http::HeaderValue::from_static("text/plain; charset=utf-8"),
                            );
                            Ok::<_, Infallible>(r)
                        },
                    );
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        })
}
