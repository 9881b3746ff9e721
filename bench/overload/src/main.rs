//! `keel-overload`: the overload scenario set of BENCH.md, driven by `bench/overload.sh`.
//!
//! Every hop is a `keel::App` with its defaults (shedding on, or `[overload] enabled = false`),
//! each on its own one-worker tokio runtime, pinned to CPU 1; the open-loop load generator runs
//! on CPU 0. Requests are sent at their scheduled times whatever happened to earlier ones, and
//! latency counts from the scheduled time (no coordinated omission); each carries a 1 s
//! deadline (`keel-timeout`), so goodput is "answered 200 within the deadline".
//!
//! - **async**: a handler that serves 8 requests at a time, 10 ms each (a pool, a semaphore):
//!   the queue forms inside the handler.
//! - **cpu**: 1 ms of CPU burnt on the worker per request: the queue forms in the socket
//!   buffers while the worker spins.
//! - **gateway**: a proxy (Keel's client) before an upstream serving 8 at a time at 10 ms; in
//!   the phase run the upstream slows tenfold for the middle third, then recovers.
//! - **chain**: three hops on one shared core (hop → hop → a leaf burning 1 ms of CPU).
//!
//! Service times are milliseconds so that three times saturation stays within what the
//! generator (one core, a task per request) sends on time; its lateness is reported
//! (`generator lag p99`) and a point where it is more than a few milliseconds measured the
//! generator, not the server.
//!
//! *Saturation* is measured first, per scenario, with shedding off: the throughput of 64
//! closed-loop connections. Each scenario is then offered 25, 50 and 80 % of it and three
//! times it, with shedding on and off. Sheds are counted at every hop (`/debug/server`).
//!
//! ```text
//! keel-overload [SECONDS_PER_POINT=3] [SCENARIO…]      prints a markdown report and JSON
//! ```
//!
//! `KEEL_OVERLOAD_CLOSED=1` runs only the closed-loop rows (saturation with shedding off and
//! on). `KEEL_OVERLOAD_SERIES=1` prints each 3× point over time on stderr (250 ms steps, with the
//! front hop's limit and standing-queue state polled every 50 ms); `KEEL_OVERLOAD_DUMP=DIR`
//! writes its every request (scheduled µs, status, latency µs, generator lag µs) to
//! `DIR/SCENARIO-MODE.txt`.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use keel::{App, Context, Sources};

/// The generator's CPU, and the one every hop shares.
const GENERATOR_CPU: usize = 0;
const HOP_CPU: usize = 1;

fn pin(cpu: usize) {
    // The CPUs this process may use, counted once, before any thread is pinned: counted after,
    // it is the one CPU the calling thread was pinned to (threads inherit their creator's
    // affinity), and every hop landed on the generator's CPU — as all runs before 2026-12-07
    // did.
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let n = *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and sched_setaffinity(0, …) act on
    // this thread only, with a set that lives across the call.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % n, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A port nothing listens on, never one this process handed out before: the kernel may give
/// a just-closed ephemeral port again, and a hop whose admin port equalled its traffic port
/// (or an earlier hop's) failed to start.
fn free_addr() -> SocketAddr {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        if !given.contains(&addr.port()) {
            given.push(addr.port());
            return addr;
        }
    }
}

/// A running hop: where it serves and where its admin port answers.
#[derive(Clone, Copy)]
struct Hop {
    addr: SocketAddr,
    admin: SocketAddr,
}

/// Start a `keel::App` on its own one-worker runtime pinned to `HOP_CPU`, with `clients`
/// (name, address) as upstreams, serving the router `make` builds from the app.
fn hop(
    shedding: bool,
    clients: &[(&str, SocketAddr)],
    make: impl FnOnce(&App) -> Router + Send + 'static,
) -> Hop {
    let (addr, admin) = (free_addr(), free_addr());
    let mut toml = format!(
        "[server]\naddr = \"{addr}\"\n[admin]\naddr = \"{admin}\"\n[log]\nlevel = \"error\"\n\
         [overload]\nenabled = {shedding}\n"
    );
    for (name, up) in clients {
        // Retries would multiply the load on an overloaded upstream; the budget bounds them,
        // but a benchmark of shedding should see each request once.
        toml.push_str(&format!(
            "[clients.{name}]\nendpoints = [\"{up}\"]\n[clients.{name}.retry]\nmax_attempts = 1\n"
        ));
    }
    let file = std::env::temp_dir().join(format!("keel-overload-{}.toml", addr.port()));
    std::fs::write(&file, toml).unwrap();
    std::thread::spawn(move || {
        pin(HOP_CPU);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let sources = Sources {
            file: Some(file),
            sets: vec![],
        };
        // KEEL_* variables apply to every hop, to try a setting across the whole set
        // (e.g. KEEL_OVERLOAD__MIN_LIMIT=3 bench/overload.sh 5 async).
        let loaded = sources.load().unwrap();
        let sizing = keel::runtime::detect(&loaded.value.runtime);
        let app = App::new("bench", loaded, sizing);
        rt.block_on(async move {
            let router = make(&app);
            app.serve_until(router, std::future::pending(), std::future::pending())
                .await
                .unwrap();
        });
    });
    let start = Instant::now();
    while std::net::TcpStream::connect(addr).is_err()
        || std::net::TcpStream::connect(admin).is_err()
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "hop did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Hop { addr, admin }
}

/// Burn `d` of CPU on the calling thread.
fn spin(d: Duration) {
    let until = Instant::now() + d;
    let mut x = 0u64;
    while Instant::now() < until {
        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
    }
}

/// A handler serving 8 at a time, `base_us × factor` each.
fn pool_router(base_us: u64, factor: Arc<AtomicU64>) -> Router {
    let slots = Arc::new(tokio::sync::Semaphore::new(8));
    Router::new().route(
        "/",
        get(move || {
            let (slots, factor) = (slots.clone(), factor.clone());
            async move {
                let _slot = slots.acquire().await.unwrap();
                let us = base_us * factor.load(Ordering::Relaxed);
                tokio::time::sleep(Duration::from_micros(us)).await;
                "done"
            }
        }),
    )
}

fn cpu_router(d: Duration) -> Router {
    Router::new().route(
        "/",
        get(move || async move {
            spin(d);
            "done"
        }),
    )
}

fn proxy_router(app: &App) -> Router {
    let client = app.client("up").unwrap();
    Router::new().route(
        "/",
        get(move |ctx: Context| {
            let client = client.clone();
            async move {
                let req = http::Request::get("/").body(Bytes::new()).unwrap();
                match client.call(&ctx, req).await {
                    Ok(resp) => {
                        let status = resp.status();
                        let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                        (status, body.unwrap_or_default())
                    }
                    Err(_) => (http::StatusCode::BAD_GATEWAY, Bytes::new()),
                }
            }
        }),
    )
}

/// One system under test: its front door and every hop behind it.
struct System {
    front: SocketAddr,
    hops: Vec<Hop>,
    /// The upstream's slowdown factor (gateway scenario).
    factor: Arc<AtomicU64>,
}

fn build(scenario: &str, shedding: bool) -> System {
    let factor = Arc::new(AtomicU64::new(1));
    let hops = match scenario {
        "async" => {
            let f = factor.clone();
            vec![hop(shedding, &[], move |_| pool_router(10_000, f))]
        }
        "cpu" => vec![hop(shedding, &[], |_| cpu_router(Duration::from_millis(1)))],
        "gateway" => {
            let f = factor.clone();
            let up = hop(shedding, &[], move |_| pool_router(10_000, f));
            let gw = hop(shedding, &[("up", up.addr)], proxy_router);
            vec![gw, up]
        }
        "chain" => {
            let leaf = hop(shedding, &[], |_| cpu_router(Duration::from_millis(1)));
            let mid = hop(shedding, &[("up", leaf.addr)], proxy_router);
            let edge = hop(shedding, &[("up", mid.addr)], proxy_router);
            vec![edge, mid, leaf]
        }
        other => panic!("unknown scenario {other:?}: async, cpu, gateway, chain"),
    };
    System {
        front: hops[0].addr,
        hops,
        factor,
    }
}

type Http = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

fn http_client() -> Http {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(4096)
        .build_http()
}

async fn send(client: &Http, addr: SocketAddr) -> u16 {
    let req = http::Request::get(format!("http://{addr}/"))
        .header("keel-timeout", "1S")
        .body(Full::new(Bytes::new()))
        .unwrap();
    match client.request(req).await {
        Ok(resp) => {
            let s = resp.status().as_u16();
            let _ = resp.into_body().collect().await;
            s
        }
        Err(_) => 0,
    }
}

/// One answer: when it was scheduled (since the run's start), its status, its latency, and how
/// late the generator was in sending it (part of the latency, reported so a late generator
/// is seen).
type Sample = (Duration, u16, Duration, Duration);

/// Offer `rate` requests a second for `secs`, open loop.
///
/// The schedule is kept by a thread of its own that sleeps to each instant (`nanosleep`,
/// tens of microseconds late) and hands the request to the runtime: tokio's timer has a
/// millisecond's grain and fires up to two ticks late, and that lateness would count in every
/// latency (they run from the scheduled time) — about 2 ms at p99 even unloaded. Spinning to
/// the instant instead (yielding to the runtime) halved a CPU-bound hop's throughput on the
/// other core, measured.
fn offer(rt: &tokio::runtime::Runtime, addr: SocketAddr, rate: f64, secs: f64) -> Vec<Sample> {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let n = (rate * secs) as u32;
    let handle = rt.handle().clone();
    let (done, pacer) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        pin(GENERATOR_CPU);
        let client = http_client();
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(n as usize);
        for i in 0..n {
            let at = start + interval * i;
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let client = client.clone();
            tasks.push(handle.spawn(async move {
                let lag = at.elapsed();
                let status = send(&client, addr).await;
                (at - start, status, at.elapsed(), lag)
            }));
        }
        let _ = done.send(tasks);
    });
    // The runtime runs the requests while this thread waits for the schedule's end.
    rt.block_on(async move {
        let tasks = pacer.await.unwrap();
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    })
}

/// Throughput of 64 closed-loop connections for `secs` (answers 200 per second), and how many
/// other answers they got (refusals, 502s, failures: each comes straight back as a new
/// request, since this client ignores `Retry-After`).
fn saturation(rt: &tokio::runtime::Runtime, addr: SocketAddr, secs: f64) -> (f64, u64) {
    rt.block_on(async move {
        let client = http_client();
        let until = tokio::time::Instant::now() + Duration::from_secs_f64(secs);
        let done = Arc::new(AtomicU64::new(0));
        let other = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (client, done, other) = (client.clone(), done.clone(), other.clone());
            tasks.push(tokio::spawn(async move {
                while tokio::time::Instant::now() < until {
                    let counter = if send(&client, addr).await == 200 {
                        &done
                    } else {
                        &other
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        (
            done.load(Ordering::Relaxed) as f64 / secs,
            other.load(Ordering::Relaxed),
        )
    })
}

/// Requests shed so far at `hop`, by its admin page.
fn shed_at(rt: &tokio::runtime::Runtime, hop: Hop) -> u64 {
    rt.block_on(async move {
        let o = overload_state(&http_client(), hop).await.unwrap();
        [
            "shed_queue_full",
            "shed_queue_timeout",
            "shed_deadline",
            "shed_cpu",
            "shed_queue_delay",
        ]
        .iter()
        .map(|k| o[*k].as_u64().unwrap_or(0))
        .sum()
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

/// What one point measured.
struct Point {
    ok: Vec<Duration>,
    lag: Vec<Duration>,
    refused: Vec<Duration>,
    late: usize,
    offered: usize,
    hop_sheds: u64,
}

fn summarise(samples: &[Sample], hop_sheds: u64) -> Point {
    let mut p = Point {
        ok: Vec::new(),
        lag: Vec::new(),
        refused: Vec::new(),
        late: 0,
        offered: samples.len(),
        hop_sheds,
    };
    for &(_, status, d, lag) in samples {
        p.lag.push(lag);
        match status {
            200 if d <= Duration::from_secs(1) => p.ok.push(d),
            503 | 502 => p.refused.push(d),
            _ => p.late += 1,
        }
    }
    p
}

fn main() {
    let mut args = std::env::args().skip(1);
    let secs: f64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let mut scenarios: Vec<String> = args.collect();
    if scenarios.is_empty() {
        scenarios = ["async", "cpu", "gateway", "chain"]
            .map(String::from)
            .to_vec();
    }
    pin(GENERATOR_CPU);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut json = Vec::new();
    println!(
        "# Overload scenarios: {secs} s per point, open loop, 1 s deadlines; hops on CPU {HOP_CPU}, generator on CPU {GENERATOR_CPU}\n"
    );
    println!(
        "| scenario | shedding | offered ÷ saturation | goodput ÷ saturation | admitted p50 | admitted p99 | p99 ÷ unloaded p99 | refused (503/502) | refused p99 | shed at each hop, front first | late or failed | generator lag p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for scenario in &scenarios {
        // What "saturated" is, with shedding off (after a second of warming up).
        let probe = build(scenario, false);
        saturation(&rt, probe.front, 1.0);
        let (sat, _) = saturation(&rt, probe.front, secs.max(2.0));
        let mut unloaded_p99 = Duration::ZERO;
        // `KEEL_OVERLOAD_CLOSED=1`: the closed-loop rows only (a quick check of shedding's cost
        // at saturation).
        let loads: &[f64] = if std::env::var_os("KEEL_OVERLOAD_CLOSED").is_some() {
            &[]
        } else {
            &[0.25, 0.5, 0.8, 3.0]
        };
        for &load in loads {
            for mode in ["on", "off"] {
                // A fresh system for every point: what an earlier point did (an overload the
                // clients' breakers still remember, a limit still low) must not colour this one.
                let sys = build(scenario, mode == "on");
                offer(&rt, sys.front, sat * 0.25, 0.5);
                let before: Vec<u64> = sys.hops.iter().map(|h| shed_at(&rt, *h)).collect();
                let watch = (load == 3.0 && std::env::var_os("KEEL_OVERLOAD_SERIES").is_some())
                    .then(|| {
                        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
                        (rt.spawn(watch_front(sys.hops[0], stop.clone())), stop)
                    });
                let samples = offer(&rt, sys.front, sat * load, secs);
                let by_hop: Vec<u64> = sys
                    .hops
                    .iter()
                    .zip(&before)
                    .map(|(h, b)| shed_at(&rt, *h) - b)
                    .collect();
                if let Some(watch) = watch {
                    watch.1.store(true, Ordering::Relaxed);
                    let states = rt.block_on(watch.0).unwrap();
                    series(scenario, mode, &samples, &states);
                    if let Some(dir) = std::env::var_os("KEEL_OVERLOAD_DUMP") {
                        let lines: Vec<String> = samples
                            .iter()
                            .map(|s| {
                                format!(
                                    "{} {} {} {}",
                                    s.0.as_micros(),
                                    s.1,
                                    s.2.as_micros(),
                                    s.3.as_micros()
                                )
                            })
                            .collect();
                        let f = std::path::Path::new(&dir).join(format!("{scenario}-{mode}.txt"));
                        std::fs::write(f, lines.join("\n")).unwrap();
                    }
                }
                let mut p = summarise(&samples, by_hop.iter().sum());
                let by_hop = by_hop
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(" / ");
                let p99 = pct(&mut p.ok, 0.99);
                if load == 0.25 && mode == "on" {
                    unloaded_p99 = p99;
                }
                let goodput = p.ok.len() as f64 / secs / sat;
                println!(
                    "| {scenario} | {mode} | {:.2} | {:.2} | {} ms | {} ms | {:.2}× | {} of {} | {} ms | {} | {} | {} ms |",
                    load,
                    goodput,
                    ms(pct(&mut p.ok, 0.5)),
                    ms(p99),
                    p99.as_secs_f64() / unloaded_p99.as_secs_f64().max(1e-9),
                    p.refused.len(),
                    p.offered,
                    ms(pct(&mut p.refused, 0.99)),
                    by_hop,
                    p.late,
                    ms(pct(&mut p.lag, 0.99)),
                );
                json.push(serde_json::json!({
                    "scenario": scenario, "shedding": mode, "saturation_rps": sat,
                    "offered": load, "goodput": goodput,
                    "p50_ms": pct(&mut p.ok, 0.5).as_secs_f64() * 1e3,
                    "p99_ms": p99.as_secs_f64() * 1e3,
                    "unloaded_p99_ms": unloaded_p99.as_secs_f64() * 1e3,
                    "refused": p.refused.len(), "refused_p99_ms": pct(&mut p.refused, 0.99).as_secs_f64() * 1e3,
                    "hop_sheds": p.hop_sheds, "late": p.late, "requests": p.offered,
                    "generator_lag_p99_ms": pct(&mut p.lag, 0.99).as_secs_f64() * 1e3,
                }));
            }
        }
        // The same closed loop with shedding on: 64 clients cannot build an unbounded queue,
        // so goodput must stay with shedding off's (the issue's ≥ 0.98×).
        let on = build(scenario, true);
        saturation(&rt, on.front, 1.0);
        let before: Vec<u64> = on.hops.iter().map(|h| shed_at(&rt, *h)).collect();
        let (sat_on, not_ok) = saturation(&rt, on.front, secs.max(2.0));
        let sheds: Vec<u64> = on
            .hops
            .iter()
            .zip(&before)
            .map(|(h, b)| shed_at(&rt, *h) - b)
            .collect();
        let shed_on: u64 = sheds.iter().sum();
        let per_hop = sheds
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(" / ");
        println!(
            "|  |  | saturation (64 closed-loop connections), shedding off | {sat:.0} req/s |  |  |  |  |  |  |  |"
        );
        println!(
            "|  |  | saturation (64 closed-loop connections), shedding on | {sat_on:.0} req/s ({:.3}× off) |  |  |  | {not_ok} not 200 |  | {per_hop} |  |  |",
            sat_on / sat
        );
        json.push(serde_json::json!({
            "scenario": scenario, "closed_loop": 64, "saturation_rps": sat,
            "saturation_on_rps": sat_on, "closed_loop_sheds": shed_on,
            "closed_loop_not_ok": not_ok, "closed_loop_hop_sheds": sheds,
        }));
        if scenario == "gateway" && !loads.is_empty() {
            phases(&rt, sat, secs, &mut json);
        }
    }
    let out = std::env::var("KEEL_OVERLOAD_JSON").unwrap_or_default();
    if !out.is_empty() {
        std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    }
}

/// The `overload` object of `hop`'s `/debug/server`.
async fn overload_state(
    client: &Http,
    hop: Hop,
) -> Result<serde_json::Value, hyper_util::client::legacy::Error> {
    let req = http::Request::get(format!("http://{}/debug/server", hop.admin))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await?;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    Ok(v["overload"].take())
}

/// The front hop's overload state, polled every 50 ms: (since the start, limit, in flight,
/// standing queue, baseline ms).
type State = (Duration, f64, u64, bool, f64);

async fn watch_front(hop: Hop, stop: Arc<std::sync::atomic::AtomicBool>) -> Vec<State> {
    let client = http_client();
    let start = Instant::now();
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(o) = overload_state(&client, hop).await {
            out.push((
                start.elapsed(),
                o["limit"].as_f64().unwrap_or(0.0),
                o["in_flight"].as_u64().unwrap_or(0),
                o["standing_queue"].as_bool().unwrap_or(false),
                o["baseline_ms"].as_f64().unwrap_or(0.0),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    out
}

/// The 3× point over time, on stderr (`KEEL_OVERLOAD_SERIES=1`): per 250 ms of schedule, the
/// admitted and refused requests and their p99, and the front hop's limit, in-flight count
/// and standing-queue share — tells an onset transient from a steady state.
fn series(scenario: &str, mode: &str, samples: &[Sample], states: &[State]) {
    let bucket = Duration::from_millis(250);
    let end = samples.iter().map(|s| s.0).max().unwrap_or_default();
    let mut at = Duration::ZERO;
    eprintln!(
        "{scenario} {mode}: from ms | admitted | p99 ms | refused | p99 ms | late | limit | in flight | standing | baseline ms"
    );
    while at <= end {
        let part: Vec<Sample> = samples
            .iter()
            .filter(|s| s.0 >= at && s.0 < at + bucket)
            .copied()
            .collect();
        let p = summarise(&part, 0);
        let (mut ok, mut refused) = (p.ok, p.refused);
        let st: Vec<&State> = states
            .iter()
            .filter(|s| s.0 >= at && s.0 < at + bucket)
            .collect();
        let n = st.len().max(1) as f64;
        eprintln!(
            "{scenario} {mode}: {:>6} | {:>5} | {:>7} | {:>5} | {:>7} | {} | {:.1} | {:.1} | {:.0} % | {:.1}",
            at.as_millis(),
            ok.len(),
            ms(pct(&mut ok, 0.99)),
            refused.len(),
            ms(pct(&mut refused, 0.99)),
            p.late,
            st.iter().map(|s| s.1).sum::<f64>() / n,
            st.iter().map(|s| s.2 as f64).sum::<f64>() / n,
            st.iter().filter(|s| s.3).count() as f64 / n * 100.0,
            st.iter().map(|s| s.4).sum::<f64>() / n,
        );
        at += bucket;
    }
}

/// The gateway before an upstream that slows tenfold for the middle third of the run, at
/// half the healthy saturation: does the gateway answer fast, and how soon does it recover?
fn phases(rt: &tokio::runtime::Runtime, sat: f64, secs: f64, json: &mut Vec<serde_json::Value>) {
    let third = secs.max(2.0);
    println!(
        "\n**Gateway, upstream 10× slower for the middle {third} s** (offered 0.5 × saturation):\n"
    );
    println!(
        "| shedding | phase | 200 within deadline | admitted p99 | refused | refused p99 | late or failed | 90 % goodput again after |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for mode in ["on", "off"] {
        let sys = build("gateway", mode == "on");
        offer(rt, sys.front, sat * 0.25, 0.5);
        let factor = sys.factor.clone();
        let flip = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(third));
            factor.store(10, Ordering::Relaxed);
            std::thread::sleep(Duration::from_secs_f64(third));
            factor.store(1, Ordering::Relaxed);
        });
        let samples = offer(rt, sys.front, sat * 0.5, third * 3.0);
        flip.join().unwrap();
        for (i, name) in ["before", "slow", "after"].iter().enumerate() {
            let lo = Duration::from_secs_f64(third * i as f64);
            let hi = Duration::from_secs_f64(third * (i + 1) as f64);
            let part: Vec<Sample> = samples
                .iter()
                .copied()
                .filter(|s| s.0 >= lo && s.0 < hi)
                .collect();
            let mut p = summarise(&part, 0);
            // Recovery: the first 100 ms window after the upstream recovered from which every
            // window has ≥ 90 % of its requests answered 200 in time.
            let recovered = (i == 2).then(|| recovery(&part, lo)).flatten();
            println!(
                "| {mode} | {name} | {} of {} | {} ms | {} | {} ms | {} | {} |",
                p.ok.len(),
                p.offered,
                ms(pct(&mut p.ok, 0.99)),
                p.refused.len(),
                ms(pct(&mut p.refused, 0.99)),
                p.late,
                match (i, recovered) {
                    (2, Some(d)) => format!("{} ms", d.as_millis()),
                    (2, None) => "not within the phase".into(),
                    _ => String::new(),
                }
            );
            json.push(serde_json::json!({
                "scenario": "gateway-phases", "shedding": mode, "phase": name,
                "ok": p.ok.len(), "requests": p.offered, "refused": p.refused.len(),
                "p99_ms": pct(&mut p.ok, 0.99).as_secs_f64() * 1e3,
                "refused_p99_ms": pct(&mut p.refused, 0.99).as_secs_f64() * 1e3,
                "recovered_ms": recovered.map(|d| d.as_millis() as u64),
            }));
        }
    }
}

fn recovery(part: &[Sample], from: Duration) -> Option<Duration> {
    let window = Duration::from_millis(100);
    let end = part.iter().map(|s| s.0).max()?;
    let windows = ((end - from).as_millis() / window.as_millis()) as usize + 1;
    let good: Vec<bool> = (0..windows)
        .map(|w| {
            let lo = from + window * w as u32;
            let inside: Vec<&Sample> = part
                .iter()
                .filter(|s| s.0 >= lo && s.0 < lo + window)
                .collect();
            let ok = inside
                .iter()
                .filter(|s| s.1 == 200 && s.2 <= Duration::from_secs(1))
                .count();
            !inside.is_empty() && ok * 10 >= inside.len() * 9
        })
        .collect();
    (0..windows)
        .find(|&w| good[w..].iter().all(|g| *g))
        .map(|w| window * w as u32)
}
