//! The physical-limit baseline for gRPC benchmarks (BENCH.md S1, gRPC): a bare tonic server
//! with the standard health service, nothing else — the same RPC the example service answers
//! (`grpc.health.v1.Health/Check` for the service `""`).
//!
//! Run with `cargo run --release -p keel-server --example bare_tonic -- 127.0.0.1:8083`
//! (one tokio worker, as BENCH.md asks of every system under test).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8083".into())
        .parse()?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(async move {
            let (_reporter, health) = tonic_health::server::health_reporter();
            eprintln!("bare tonic on {addr}");
            tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_service(health)
                .serve(addr)
                .await
        })?;
    Ok(())
}
