//! The physical-limit baseline for the gateway benchmark (BENCH.md S3): a reverse proxy on
//! bare hyper — accept, forward the request to one upstream over hyper-util's pooled
//! HTTP/1.1 client, stream the answer back — with none of a gateway's work (no auth, rate
//! limit, retries, balancing, telemetry). Whatever Keel's gateway costs above this is the
//! price of what it does.
//!
//! Run with `cargo run --release -p keel-server --example bare_proxy -- LISTEN UPSTREAM [STRIP]`
//! (one tokio worker, as BENCH.md asks of every system under test). `STRIP` is a path prefix
//! removed before forwarding: `/api` makes it the bare gateway of the S2 chain
//! (`/api/orders/…` → `/orders/…`, as the shop's gateway maps it).

use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

type Body = http_body_util::combinators::BoxBody<bytes::Bytes, hyper::Error>;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:8082".into());
    let upstream = args.next().unwrap_or_else(|| "127.0.0.1:8081".into());
    let strip: &'static str = args.next().unwrap_or_default().leak();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(async move {
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(1024)
                .build(connector);
            let listener = tokio::net::TcpListener::bind(&listen).await?;
            eprintln!("bare proxy on {listen} → {upstream}");
            loop {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(true)?;
                let (client, upstream) = (client.clone(), upstream.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (client, upstream) = (client.clone(), upstream.clone());
                            async move {
                                let (mut parts, body) = req.into_parts();
                                let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                                let path = path.strip_prefix(strip).unwrap_or(path);
                                parts.uri = format!("http://{upstream}{path}")
                                    .parse()
                                    .unwrap_or_default();
                                parts.headers.remove(http::header::CONNECTION);
                                let req = http::Request::from_parts(parts, body.boxed());
                                match client.request(req).await {
                                    Ok(resp) => {
                                        Ok::<_, std::convert::Infallible>(resp.map(|b| b.boxed()))
                                    }
                                    Err(_) => {
                                        let mut r = http::Response::new(
                                            http_body_util::Empty::new()
                                                .map_err(|never| match never {})
                                                .boxed(),
                                        );
                                        *r.status_mut() = http::StatusCode::BAD_GATEWAY;
                                        Ok(r)
                                    }
                                }
                            }
                        },
                    );
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        })
}
