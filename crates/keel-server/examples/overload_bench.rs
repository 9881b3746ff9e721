//! Overload benchmark (not a test), driven by `bench/overload.sh`.
//!
//! A Keel server whose handler serves `CAPACITY` requests at a time at `SERVICE` each (so its
//! capacity is CAPACITY / SERVICE per second) is offered load open-loop — each request sent at
//! its scheduled time whatever happened to the previous ones, latency timed from that
//! scheduled time — first at half capacity (the unloaded latency), then at three times
//! capacity with shedding on, then the same with shedding off. Every request carries a 1 s
//! deadline (`keel-timeout`), so goodput is "answered 200 within the deadline".
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use keel_core::Shutdown;
use keel_server::overload::OverloadConfig;
use keel_server::{HttpSettings, Readiness, Server, ServerConfig};
use tokio::sync::Semaphore;

const CAPACITY: usize = 8;
const SERVICE: Duration = Duration::from_millis(10);

fn start(rt: &tokio::runtime::Runtime, overload: OverloadConfig) -> SocketAddr {
    rt.block_on(async {
        let slots = Arc::new(Semaphore::new(CAPACITY));
        let router = Router::new().route(
            "/work",
            get(move || {
                let slots = slots.clone();
                async move {
                    let _slot = slots.acquire().await.unwrap();
                    tokio::time::sleep(SERVICE).await;
                    "done"
                }
            }),
        );
        let settings = HttpSettings {
            server: ServerConfig {
                addr: "127.0.0.1:0".parse().unwrap(),
                ..ServerConfig::default()
            },
            overload,
            ..HttpSettings::default()
        };
        let shutdown = Shutdown::new();
        let readiness = Readiness::new(Default::default(), shutdown.clone());
        let server = Server::bind(&settings, 1, readiness, shutdown).unwrap();
        let addr = server.local_addr();
        tokio::spawn(server.serve(router));
        addr
    })
}

struct Run {
    ok: Vec<Duration>,
    shed: Vec<Duration>,
    late: usize,
    errors: usize,
    offered: usize,
    secs: f64,
}

fn offer(rt: &tokio::runtime::Runtime, addr: SocketAddr, rate: f64, secs: f64) -> Run {
    rt.block_on(async move {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_max_idle_per_host(4096)
                .build_http::<Full<Bytes>>();
        let interval = Duration::from_secs_f64(1.0 / rate);
        let n = (rate * secs) as usize;
        let start = tokio::time::Instant::now();
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let at = start + interval * i as u32;
            tokio::time::sleep_until(at).await;
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let scheduled = Instant::now() - at.elapsed();
                let req = http::Request::get(format!("http://{addr}/work"))
                    .header("keel-timeout", "1S")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let status = match client.request(req).await {
                    Ok(resp) => {
                        let s = resp.status().as_u16();
                        let _ = resp.into_body().collect().await;
                        s
                    }
                    Err(_) => 0,
                };
                (status, scheduled.elapsed())
            }));
        }
        let mut run = Run {
            ok: Vec::new(),
            shed: Vec::new(),
            late: 0,
            errors: 0,
            offered: n,
            secs,
        };
        for t in tasks {
            match t.await.unwrap() {
                (200, d) if d <= Duration::from_secs(1) => run.ok.push(d),
                (200 | 504, _) => run.late += 1,
                (503, d) => run.shed.push(d),
                _ => run.errors += 1,
            }
        }
        run
    })
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let load_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let capacity = CAPACITY as f64 / SERVICE.as_secs_f64();
    let on = start(&server_rt, OverloadConfig::default());
    // The default floor (20) is above this handler's capacity (8): with it, admitted requests
    // still queue inside the handler. A floor under the capacity shows what the limit does
    // when it may go all the way down.
    let low_floor = start(
        &server_rt,
        OverloadConfig {
            min_limit: 4,
            ..OverloadConfig::default()
        },
    );
    // Tight: little latency growth tolerated and no queue — the latency-first end of the
    // trade-off.
    let tight = start(
        &server_rt,
        OverloadConfig {
            min_limit: 4,
            tolerance: 1.1,
            max_queue: 0,
            ..OverloadConfig::default()
        },
    );
    let off = start(
        &server_rt,
        OverloadConfig {
            enabled: false,
            ..OverloadConfig::default()
        },
    );

    // Warm both (connections, allocator), then the unloaded reference.
    offer(&load_rt, on, capacity * 0.5, 1.0);
    offer(&load_rt, off, capacity * 0.5, 1.0);
    offer(&load_rt, low_floor, capacity * 0.5, 1.0);
    offer(&load_rt, tight, capacity * 0.5, 1.0);
    let mut unloaded = offer(&load_rt, on, capacity * 0.5, secs / 2.0);
    let unloaded_p99 = pct(&mut unloaded.ok, 0.99);

    println!(
        "# Overload: capacity {capacity:.0} req/s ({CAPACITY} × {} ms), offered 3× = {:.0} req/s open-loop for {secs} s, 1 s deadlines\n",
        SERVICE.as_millis(),
        capacity * 3.0
    );
    println!(
        "unloaded (50 % of capacity): p50 {} ms, p99 {} ms\n",
        ms(pct(&mut unloaded.ok, 0.5)),
        ms(unloaded_p99)
    );
    println!(
        "| shedding | admitted p50 | admitted p99 | p99 ÷ unloaded p99 | shed | shed p50 / p99 | late or 504 | errors | goodput ÷ capacity |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, addr) in [
        ("on (defaults)", on),
        ("on, min_limit 4", low_floor),
        ("on, min_limit 4, tolerance 1.1, no queue", tight),
        ("off", off),
    ] {
        let mut r = offer(&load_rt, addr, capacity * 3.0, secs);
        let p99 = pct(&mut r.ok, 0.99);
        let goodput = r.ok.len() as f64 / r.secs / capacity;
        println!(
            "| {name} | {} ms | {} ms | {:.2}× | {} of {} | {} / {} ms | {} | {} | {:.0} % |",
            ms(pct(&mut r.ok, 0.5)),
            ms(p99),
            p99.as_secs_f64() / unloaded_p99.as_secs_f64().max(1e-9),
            r.shed.len(),
            r.offered,
            ms(pct(&mut r.shed, 0.5)),
            ms(pct(&mut r.shed, 0.99)),
            r.late,
            r.errors,
            goodput * 100.0
        );
    }
}
