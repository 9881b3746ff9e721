//! Client benchmark (not a test): the Keel client (pool + balancer + breaker + retry budget +
//! context propagation) against a bare hyper client on the same upstream, in the same run.
//! Driven by `bench/client.sh`, which puts the upstream in a network namespace behind a veth
//! pair and pins both processes.
//!
//! `bench_client upstream ADDR…`: a bare hyper HTTP/1.1 server answering `ok` on each ADDR.
//! `bench_client run TARGET_IP BASE_PORT SECONDS CONCURRENCY ROUNDS`: the measurements.
//!
//! Two scenarios, each system on a port of its own so TIME_WAIT counts do not mix:
//! - **steady**: CONCURRENCY closed-loop callers for SECONDS, alternating hyper/Keel for
//!   ROUNDS; throughput and client CPU (this process's utime+stime) per request.
//! - **churn**: callers swing between 64 and 4 in flight every 500 ms, the shape that makes a
//!   pool close and reopen connections; new connections, reuse ratio, and the TIME_WAIT and
//!   ESTABLISHED sockets towards the upstream afterwards.
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keel_client::client::{Client, ClientConfig};
use keel_client::endpoint::{Endpoint, Endpoints};
use keel_client::sockets::TcpState;
use keel_client::upstream::{Upstream, UpstreamConfig};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    match args.first().map(String::as_str) {
        Some("upstream") => rt.block_on(upstream(&args[1..])),
        Some("run") => rt.block_on(run(&args[1..])),
        Some("count") => rt.block_on(count(&args[1..])),
        _ => {
            eprintln!(
                "usage: bench_client upstream ADDR… | run IP BASE_PORT SECONDS CONC ROUNDS | count hyper|keel ADDR N CONC"
            );
            std::process::exit(2);
        }
    }
}

async fn upstream(addrs: &[String]) {
    for a in addrs {
        let l = tokio::net::TcpListener::bind(a.parse::<SocketAddr>().unwrap())
            .await
            .unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                s.set_nodelay(true).unwrap();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
    }
    println!("ready");
    std::future::pending::<()>().await;
}

/// A system under test: one call, and its connection count.
trait Sut: Send + Sync + 'static {
    fn call(&self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>>;
    fn connects(&self) -> u64;
}

/// hyper-util's pooled client at its defaults, with a connector that counts connects.
struct Hyper {
    client: HyperClient<Counting, Full<Bytes>>,
    uri: http::Uri,
    connects: Arc<AtomicU64>,
}

#[derive(Clone)]
struct Counting(HttpConnector, Arc<AtomicU64>);

impl tower::Service<http::Uri> for Counting {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = <HttpConnector as tower::Service<http::Uri>>::Error;
    type Future = <HttpConnector as tower::Service<http::Uri>>::Future;
    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }
    fn call(&mut self, uri: http::Uri) -> Self::Future {
        self.1.fetch_add(1, Ordering::Relaxed);
        self.0.call(uri)
    }
}

impl Hyper {
    /// At hyper-util's defaults (no idle cap, 90 s idle timeout), or with `max_idle` idle
    /// connections per host.
    fn new(addr: SocketAddr, max_idle: Option<usize>) -> Hyper {
        let connects = Arc::new(AtomicU64::new(0));
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        let mut builder = HyperClient::builder(TokioExecutor::new());
        if let Some(n) = max_idle {
            builder.pool_max_idle_per_host(n);
        }
        let client = builder.build(Counting(conn, connects.clone()));
        Hyper {
            client,
            uri: format!("http://{addr}/").parse().unwrap(),
            connects,
        }
    }
}

impl Sut for Hyper {
    fn call(&self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        Box::pin(async move {
            let req = http::Request::get(self.uri.clone())
                .body(Full::new(Bytes::new()))
                .unwrap();
            match self.client.request(req).await {
                Ok(r) => r.into_body().collect().await.is_ok(),
                Err(_) => false,
            }
        })
    }
    fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }
}

struct Keel(Client);

impl Keel {
    fn new(addr: SocketAddr) -> Keel {
        let eps = Endpoints::new(vec![Endpoint::new(addr)]);
        let up = Arc::new(Upstream::new(UpstreamConfig::default(), eps));
        Keel(Client::new("bench", ClientConfig::default(), up))
    }
}

impl Sut for Keel {
    fn call(&self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        Box::pin(async move {
            let req = http::Request::get("/").body(Bytes::new()).unwrap();
            match self.0.request(req).await {
                Ok(r) => r.into_body().collect().await.is_ok(),
                Err(e) => {
                    static SHOWN: AtomicUsize = AtomicUsize::new(0);
                    if SHOWN.fetch_add(1, Ordering::Relaxed) < 3 {
                        eprintln!("keel call failed: {e}");
                    }
                    false
                }
            }
        })
    }
    fn connects(&self) -> u64 {
        self.0.stats().pool.connects
    }
}

fn cpu_seconds() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

struct Outcome {
    ok: u64,
    failed: u64,
    secs: f64,
    cpu: f64,
    connects: u64,
}

/// Callers in a closed loop for `secs`; `level` (if given) says how many are active.
async fn drive(sut: Arc<dyn Sut>, callers: usize, secs: f64, swing: bool) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let active = Arc::new(AtomicUsize::new(callers));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let mut tasks = Vec::new();
    for id in 0..callers {
        let (sut, stop, active, ok, failed) = (
            sut.clone(),
            stop.clone(),
            active.clone(),
            ok.clone(),
            failed.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if id >= active.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                if sut.call().await {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let end = t0 + Duration::from_secs_f64(secs);
    let mut high = true;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if swing {
            high = !high;
            active.store(if high { callers } else { 4 }, Ordering::Relaxed);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    Outcome {
        ok: ok.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        secs: t0.elapsed().as_secs_f64(),
        cpu: cpu_seconds() - cpu0,
        connects: sut.connects(),
    }
}

/// This process's sockets in `state` towards `addr` (full address: ports repeat across runs).
fn sockets_towards(addr: SocketAddr, state: TcpState) -> usize {
    keel_client::sockets::sockets_towards(&[addr], state)[&addr]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A fixed number of calls after 1000 warm-up calls: `count hyper|keel ADDR N CONC`.
/// `bench/client-instructions.sh` runs it under callgrind with N and with 0, so the
/// difference divided by N is instructions per call, start-up and warm-up excluded.
async fn count(args: &[String]) {
    let addr: SocketAddr = args[1].parse().unwrap();
    let n: usize = args[2].parse().unwrap();
    let conc: usize = args[3].parse().unwrap();
    let sut: Arc<dyn Sut> = match args[0].as_str() {
        "keel" => Arc::new(Keel::new(addr)),
        _ => Arc::new(Hyper::new(addr, None)),
    };
    let calls = |total: usize| {
        let sut = sut.clone();
        async move {
            let per = total / conc;
            let tasks: Vec<_> = (0..conc)
                .map(|_| {
                    let sut = sut.clone();
                    tokio::spawn(async move {
                        for _ in 0..per {
                            assert!(sut.call().await);
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        }
    };
    calls(1000).await;
    calls(n).await;
    println!("done {n}");
}

async fn run(args: &[String]) {
    let ip: std::net::IpAddr = args[0].parse().unwrap();
    let base: u16 = args[1].parse().unwrap();
    let secs: f64 = args[2].parse().unwrap();
    let conc: usize = args[3].parse().unwrap();
    let rounds: usize = args[4].parse().unwrap();
    let mut port = base;
    let mut next = || {
        port += 1;
        SocketAddr::new(ip, port - 1)
    };

    println!("## steady: {conc} callers, {secs} s per system per round, {rounds} rounds\n");
    println!("| round | system | req/s | client CPU µs/req | connects | failed |");
    println!("|---|---|---|---|---|---|");
    let (mut tput_ratio, mut cpu_ratio) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let mut per = Vec::new();
        for name in ["hyper", "keel"] {
            let addr = next();
            let sut: Arc<dyn Sut> = if name == "hyper" {
                Arc::new(Hyper::new(addr, None))
            } else {
                Arc::new(Keel::new(addr))
            };
            // Warm-up: connections and allocator, not measured.
            drive(sut.clone(), conc, 1.0, false).await;
            let o = drive(sut, conc, secs, false).await;
            let rps = o.ok as f64 / o.secs;
            let cpu_us = o.cpu * 1e6 / o.ok.max(1) as f64;
            println!(
                "| {round} | {name} | {rps:.0} | {cpu_us:.1} | {} | {} |",
                o.connects, o.failed
            );
            per.push((rps, cpu_us));
        }
        tput_ratio.push(per[1].0 / per[0].0);
        cpu_ratio.push(per[1].1 / per[0].1);
    }
    println!(
        "\nmedian Keel/hyper: throughput {:.3}×, CPU per request {:.3}×\n",
        median(tput_ratio),
        median(cpu_ratio)
    );

    println!("## churn: 64 callers, swinging 64 ↔ 4 in flight every 500 ms, {secs} s\n");
    println!(
        "| system | requests | failed | new connections | reuse ratio | TIME_WAIT after | ESTABLISHED after |"
    );
    println!("|---|---|---|---|---|---|---|");
    for name in [
        "hyper (defaults)",
        "hyper, 2 idle per host (Go's default)",
        "keel",
    ] {
        let addr = next();
        let sut: Arc<dyn Sut> = match name {
            "keel" => Arc::new(Keel::new(addr)),
            "hyper (defaults)" => Arc::new(Hyper::new(addr, None)),
            _ => Arc::new(Hyper::new(addr, Some(2))),
        };
        let o = drive(sut.clone(), 64, secs, true).await;
        let requests = o.ok + o.failed;
        println!(
            "| {name} | {requests} | {} | {} | {:.4} | {} | {} |",
            o.failed,
            o.connects,
            1.0 - o.connects as f64 / requests.max(1) as f64,
            sockets_towards(addr, TcpState::TimeWait),
            sockets_towards(addr, TcpState::Established),
        );
        drop(sut);
    }
}
