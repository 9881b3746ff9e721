//! `keel-allocs`: heap allocations per request on `GET /` for bare hyper, axum and Keel,
//! counted in one run (issue 14's "Keel ≤ axum + 2").
//!
//! Run with `cargo run --release -p keel-allocs` (add `-- --json` for JSON, `-- --sites` for
//! the most frequent allocation call sites, `-- --path /echo --post-bytes 1024` for the echo
//! route, `-- --help` for the rest).
//!
//! # What it measures
//!
//! Each system serves on its own thread with a tokio current-thread runtime: bare hyper
//! (hyper-util's auto connection builder and a `service_fn`), the same with an axum `Router`,
//! and `examples/hello`'s routes served by `keel::App` with the default config (see
//! `servers.rs`). A load generator on other threads opens `--connections` keep-alive
//! HTTP/1.1 connections, sends `--warmup` requests, then the counters are reset and each
//! connection sends `--requests` more, every answer checked (status 200, body). The table
//! gives, per system, allocator calls (`alloc`, `alloc_zeroed`, `realloc`) and bytes asked for
//! during the measured requests, divided by their number, and the ratio to axum.
//!
//! Anything the server thread does in that window counts: the connection driver, the
//! service, and for Keel its background tasks on the same runtime (leak sweep, readiness
//! checks, the admin port) — part of its cost, though a few allocations a second are
//! nothing next to 20,000 requests.
//!
//! With one connection the figures are whole numbers and repeat exactly (4, 14 and 23 at the
//! time of issue 14, as callgrind counted). Of those, 2 allocations and 8 KiB are hyper's:
//! when it polls an idle keep-alive connection for the next request while the previous
//! request's head still shares its read buffer, the buffer is replaced
//! (`poll_read_keep_alive` → `BytesMut::reserve`, and the `split_to` that shares it). With
//! several connections on one thread that happens on most requests but, by timing, not all,
//! so the figures come out a few hundredths lower and vary from run to run — by the same
//! amount for every system. Compare systems within one run.
//!
//! # Why a per-thread filter
//!
//! A counting global allocator sees every allocation in the process, including the load
//! generator's (its threads run alongside) and those of the systems not being measured
//! (Keel's background tasks keep running). So only threads that opted in are counted, each
//! server thread into its own slot, and the generator uses blocking `std::net` sockets on
//! threads that never opt in. Counting itself is two relaxed atomic adds; nothing here
//! allocates on a counted thread except the system under test.
//!
//! # `--sites`
//!
//! After the measurement, a small run (`--sites-requests`) per system records a backtrace for
//! every counted allocation and prints the most frequent call sites (`--site-depth` frames,
//! innermost first) and, for Keel, the allocations its own code makes (innermost frame past
//! `std`, `http` and `bytes` in a Keel crate), by that frame. That run is slow (an
//! unwind per allocation) and its timing differs, so hyper's read-buffer allocations (above)
//! may show up less often than in the measurement. A release build has symbols but no line
//! tables, and inlined functions disappear into their callers; for `file:line` and inlined
//! frames build with `CARGO_PROFILE_RELEASE_DEBUG=line-tables-only` (a separate, full build;
//! the counts do not change).

mod counter;
mod load;
mod servers;
mod sites;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde_json::json;

use servers::System;

#[global_allocator]
static ALLOCATOR: counter::Counting = counter::Counting;

#[derive(Debug, Parser)]
#[command(
    name = "keel-allocs",
    about = "Heap allocations per request for bare hyper, axum and Keel, in one run"
)]
struct Args {
    /// Systems to measure, in this order.
    #[arg(long, value_delimiter = ',', default_value = "hyper,axum,keel")]
    systems: Vec<System>,
    /// Keep-alive connections, each on its own load thread.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Measured requests per connection.
    #[arg(long, default_value_t = 5000)]
    requests: usize,
    /// Requests (in all) before the counters are reset: lazily built state, grown buffers.
    #[arg(long, default_value_t = 500)]
    warmup: usize,
    /// Request path.
    #[arg(long, default_value = "/")]
    path: String,
    /// Send a POST with a body of this many bytes, expecting it echoed (use with `/echo`).
    #[arg(long)]
    post_bytes: Option<usize>,
    /// Print JSON instead of a markdown table.
    #[arg(long)]
    json: bool,
    /// Also record a backtrace per allocation in a small run and print the top call sites.
    #[arg(long)]
    sites: bool,
    /// Requests (in all) of the `--sites` run: every allocation costs an unwind there.
    #[arg(long, default_value_t = 200)]
    sites_requests: usize,
    /// Frames per site.
    #[arg(long, default_value_t = 6)]
    site_depth: usize,
    /// Sites printed per system.
    #[arg(long, default_value_t = 25)]
    sites_top: usize,
    /// Log filter for the whole process (Keel's `[log] level`; `RUST_LOG` wins).
    #[arg(long, default_value = "warn")]
    log: String,
}

/// One system's result.
#[derive(Debug)]
struct Measured {
    system: System,
    requests: u64,
    counts: counter::Counts,
    elapsed: Duration,
}

impl Measured {
    fn per_request(&self, v: u64) -> f64 {
        v as f64 / self.requests.max(1) as f64
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.connections == 0 || args.requests == 0 {
        eprintln!("keel-allocs: --connections and --requests must be at least 1");
        return ExitCode::from(2);
    }
    init_logging(&args.log);
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel-allocs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let (request, echoed) = load::request_bytes(&args.path, args.post_bytes);
    let expect_body = match (&echoed, args.path.as_str()) {
        (Some(body), _) => Some(body.clone()),
        (None, "/") => Some(servers::HELLO.to_vec()),
        (None, _) => None,
    };
    let mut running = Vec::new();
    let mut results = Vec::new();
    for &system in &args.systems {
        let r = servers::start(system)?;
        let plan = load::Plan {
            addr: r.addr,
            connections: args.connections,
            warmup_per_conn: args.warmup.div_ceil(args.connections),
            measured_per_conn: args.requests,
            request: request.clone(),
            expect_body: expect_body.clone(),
        };
        let slot = system.slot();
        let elapsed = load::run(&plan, || settle_and_reset(slot))
            .map_err(|e| format!("{}: {e}", system.name()))?;
        std::thread::sleep(SETTLE);
        results.push(Measured {
            system,
            requests: (plan.measured_per_conn * plan.connections) as u64,
            counts: counter::read(slot),
            elapsed,
        });
        running.push((system, r, plan));
    }
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into());
    let method = if args.post_bytes.is_some() {
        "POST"
    } else {
        "GET"
    };
    if args.json {
        print_json(args, method, &loadavg, &results);
    } else {
        print_table(args, method, &loadavg, &results);
    }
    if args.sites {
        for (system, _, plan) in &running {
            print_sites(args, *system, plan)?;
        }
    }
    for (_, r, _) in running {
        r.stop();
    }
    Ok(())
}

/// The last answer is on the wire before its request's bookkeeping (drop guards, observation
/// records) has run on the server; this long is given to it before counters are reset or read,
/// so each window holds whole requests.
const SETTLE: Duration = Duration::from_millis(20);

fn settle_and_reset(slot: u8) {
    std::thread::sleep(SETTLE);
    counter::reset(slot);
}

fn axum_allocs(results: &[Measured]) -> Option<f64> {
    results
        .iter()
        .find(|m| m.system == System::Axum)
        .map(|m| m.per_request(m.counts.allocs))
}

fn print_table(args: &Args, method: &str, loadavg: &str, results: &[Measured]) {
    println!(
        "Allocations per request, {method} {}{}: {} connections × {} requests after {} warm-up, one current-thread runtime per system; load average {loadavg}",
        args.path,
        args.post_bytes
            .map(|n| format!(" ({n} B body)"))
            .unwrap_or_default(),
        args.connections,
        args.requests,
        args.warmup,
    );
    println!();
    println!("| system | allocations per request | bytes per request | ratio to axum |");
    println!("|---|---:|---:|---:|");
    let axum = axum_allocs(results);
    for m in results {
        let a = m.per_request(m.counts.allocs);
        let ratio = axum
            .filter(|x| *x > 0.0)
            .map_or_else(|| "–".to_string(), |x| format!("{:.2}×", a / x));
        println!(
            "| {} | {a:.2} | {:.0} | {ratio} |",
            m.system.name(),
            m.per_request(m.counts.bytes),
        );
    }
}

fn print_json(args: &Args, method: &str, loadavg: &str, results: &[Measured]) {
    let axum = axum_allocs(results);
    let systems: Vec<_> = results
        .iter()
        .map(|m| {
            let a = m.per_request(m.counts.allocs);
            json!({
                "system": m.system.name(),
                "requests": m.requests,
                "allocs": m.counts.allocs,
                "bytes": m.counts.bytes,
                "frees": m.counts.frees,
                "allocs_per_request": a,
                "bytes_per_request": m.per_request(m.counts.bytes),
                "frees_per_request": m.per_request(m.counts.frees),
                "ratio_to_axum": axum.filter(|x| *x > 0.0).map(|x| a / x),
                "requests_per_second": m.requests as f64 / m.elapsed.as_secs_f64().max(1e-9),
            })
        })
        .collect();
    let v = json!({
        "method": method,
        "path": args.path,
        "post_bytes": args.post_bytes,
        "connections": args.connections,
        "requests_per_connection": args.requests,
        "warmup": args.warmup,
        "loadavg": loadavg,
        "systems": systems,
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    );
}

/// A small run with a backtrace recorded per counted allocation, then the top sites.
fn print_sites(args: &Args, system: System, plan: &load::Plan) -> Result<(), String> {
    let slot = system.slot();
    let mut plan = plan.clone();
    plan.measured_per_conn = args.sites_requests.div_ceil(plan.connections).max(1);
    let _ = counter::take_sites(slot);
    load::run(&plan, || {
        settle_and_reset(slot);
        counter::record_sites(true);
    })
    .map_err(|e| format!("{} (--sites): {e}", system.name()))?;
    std::thread::sleep(SETTLE);
    counter::record_sites(false);
    let counts = counter::read(slot);
    let bts = counter::take_sites(slot);
    let requests = (plan.measured_per_conn * plan.connections) as f64;
    let tops = sites::top(&bts, args.site_depth, args.sites_top);
    println!();
    println!(
        "### {}: top allocation sites ({} allocations over {requests} requests, {:.2} per request)",
        system.name(),
        counts.allocs,
        counts.allocs as f64 / requests,
    );
    println!();
    println!("| per request | site (innermost frame first) |");
    println!("|---:|---|");
    for s in &tops.stacks {
        println!(
            "| {:.2} | {} |",
            s.count as f64 / requests,
            s.frames
                .iter()
                .map(|f| format!("`{}`", short(&f.to_string())))
                .collect::<Vec<_>>()
                .join(" ← ")
        );
    }
    if system == System::Keel && !tops.has_lines {
        println!();
        println!(
            "(Keel's own allocations cannot be told apart without line tables: its request path \
             is inlined into hyper's frames. Build with \
             `CARGO_PROFILE_RELEASE_DEBUG=line-tables-only cargo run --release -p keel-allocs -- --sites`.)"
        );
    } else if system == System::Keel {
        println!();
        println!("#### keel: its own allocations, by the Keel frame that makes them");
        println!();
        println!("| per request | keel frame |");
        println!("|---:|---|");
        for s in &tops.keel {
            let f = s.frames.first().map(|f| f.to_string()).unwrap_or_default();
            println!("| {:.2} | `{}` |", s.count as f64 / requests, short(&f));
        }
    }
    Ok(())
}

/// A frame name cut to a readable length (closures and generics make some very long).
fn short(f: &str) -> String {
    const MAX: usize = 160;
    if f.chars().count() <= MAX {
        return f.replace('|', "\\|");
    }
    let cut: String = f.chars().take(MAX).collect();
    format!("{}…", cut.replace('|', "\\|"))
}

/// The subscriber `keel::run` installs (`[log] level`, compact format, reloadable filter), so
/// Keel's tracing callsites are filtered exactly as in `hello`. `RUST_LOG` wins, as there.
fn init_logging(level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .compact()
        .with_filter_reloading()
        .try_init();
}
