//! The client's connection pools against real Keel servers on loopback: reuse, keep-alive
//! races, adaptive idle capacity, HTTP/2 stream limits.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{call, client, run, serve, serve_with};
use keel_client::client::{Client, ClientConfig};
use keel_client::pool::{PoolConfig, Protocol};
use keel_client::sockets::time_wait_towards;

fn time_wait_sum(addrs: &[SocketAddr]) -> usize {
    time_wait_towards(addrs).values().sum()
}

/// `workers` tasks each making `per_worker` calls to `path`; returns how many failed.
async fn concurrent(c: &Arc<Client>, workers: usize, per_worker: usize, path: &str) -> usize {
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let c = c.clone();
        let path = path.to_string();
        tasks.push(tokio::spawn(async move {
            let mut failed = 0;
            for _ in 0..per_worker {
                if !call(&c, &path).await {
                    failed += 1;
                }
            }
            failed
        }));
    }
    let mut failed = 0;
    for t in tasks {
        failed += t.await.unwrap();
    }
    failed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_concurrent_load_on_three_upstreams_reuses_connections_opened_at_the_start() {
    let mut addrs = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..3 {
        let (a, _, h) = serve(Duration::from_secs(75)).await;
        addrs.push(a);
        handles.push(h);
    }
    let time_wait_before = time_wait_sum(&addrs);
    let c = Arc::new(client(&addrs, ClientConfig::default()));
    let workers = 8;
    assert_eq!(concurrent(&c, workers, 50, "/").await, 0);
    let warm = c.stats().pool;
    assert_eq!(concurrent(&c, workers, 250, "/").await, 0);
    let stats = c.stats().pool;
    let accepted: u64 = handles
        .iter()
        .map(|h| h.stats().accepted.load(Ordering::Relaxed))
        .sum();
    eprintln!("steady load: {stats:?}, warm-up opened {}", warm.connects);
    assert_eq!(stats.requests, (workers * 300) as u64);
    assert_eq!(accepted, stats.connects, "the servers agree on the count");
    // Never more connections than calls in flight, on any endpoint.
    assert!(stats.connects <= (workers * 3) as u64, "{stats:?}");
    assert!(
        stats.reuse_ratio() >= 0.99,
        "reuse ratio {}",
        stats.reuse_ratio()
    );
    // Steady state opens (almost) nothing: what the warm-up's 400 calls saw covers the next
    // 2000's concurrency.
    assert!(
        stats.connects - warm.connects <= 2,
        "{} connections opened after warm-up",
        stats.connects - warm.connects
    );
    assert_eq!(stats.connect_errors, 0);
    // Reused connections leave nothing behind in TIME_WAIT (closed ones would, for 60 s).
    assert!(time_wait_sum(&addrs) <= time_wait_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_of_idle_gaps_around_the_servers_two_second_keep_alive_fails_nothing() {
    let (addr, _, handle) = serve(Duration::from_secs(2)).await;
    let c = Arc::new(client(&[addr], ClientConfig::default()));
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut tasks = Vec::new();
    // Four callers whose gaps straddle the server's 2 s keep-alive (1.7–2.3 s), each with its
    // own phase, so pooled sockets are picked up just before, at, and after the server's
    // timer: before learning, a 30 s pool timeout would race the server's close every time.
    for worker in 0..4u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let (mut calls, mut failed) = (0, 0);
            let mut i = worker;
            tokio::time::sleep(Duration::from_millis(worker * 150)).await;
            while tokio::time::Instant::now() < until {
                calls += 1;
                if !call(&c, "/").await {
                    failed += 1;
                }
                i += 1;
                let gap = 1700 + (i * 97 + worker * 31) % 600;
                tokio::time::sleep(Duration::from_millis(gap)).await;
            }
            (calls, failed)
        }));
    }
    let (mut calls, mut failed) = (0, 0);
    for t in tasks {
        let (n, f) = t.await.unwrap();
        calls += n;
        failed += f;
    }
    let stats = c.stats();
    eprintln!("keep-alive minute: {calls} calls, {failed} failed, {stats:?}");
    assert_eq!(failed, 0, "{failed} of {calls} calls failed");
    assert!(calls >= 80, "{calls} calls");
    assert_eq!(stats.retries, 0, "no call needed a retry to succeed");
    assert_eq!(
        c.idle_timeout_of(addr),
        Some(Duration::from_secs(1)),
        "learned from `Keep-Alive: timeout=2` minus the margin"
    );
    assert!(
        handle.stats().accepted.load(Ordering::Relaxed) >= 2,
        "idle sockets were not kept past the learned timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_reuses_the_last_bursts_connections_and_idle_capacity_decays_afterwards() {
    let (addr, _, handle) = serve(Duration::from_secs(75)).await;
    let cfg = ClientConfig {
        pool: PoolConfig {
            idle_peak_half_life: Duration::from_millis(300),
            ..PoolConfig::default()
        },
        ..ClientConfig::default()
    };
    let c = Arc::new(client(&[addr], cfg));
    let burst = 16;
    assert_eq!(concurrent(&c, burst, 1, "/wait/100").await, 0);
    let first = c.pool_stats_of(addr).unwrap();
    assert!(first.connects >= 2, "the burst ran concurrently: {first:?}");
    assert_eq!(
        first.idle, first.connects,
        "the burst's connections are kept idle"
    );

    // The next burst, right away, finds them.
    assert_eq!(concurrent(&c, burst, 1, "/wait/100").await, 0);
    let second = c.pool_stats_of(addr).unwrap();
    assert!(
        second.connects - first.connects <= 1,
        "a repeat burst reopened connections: {first:?} → {second:?}"
    );

    // Quiet for 10 half-lives: the peak has decayed to nothing, so sequential traffic keeps a
    // single idle connection and the rest are closed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(run(&c, 3).await, 0);
    let after = c.pool_stats_of(addr).unwrap();
    assert_eq!(after.idle, 1, "{after:?}");
    let mut open = after.open;
    for _ in 0..100 {
        open = c.pool_stats_of(addr).unwrap().open;
        if open == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(open, 1, "surplus idle connections were closed");
    assert!(handle.stats().accepted.load(Ordering::Relaxed) >= first.connects);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_opens_another_connection_when_streams_reach_the_limit() {
    // The server's own limit, learned from its SETTINGS frame…
    let (addr, _, handle) = serve_with(|s| s.http2_max_concurrent_streams = 2).await;
    let h2 = |max_streams_per_connection| ClientConfig {
        pool: PoolConfig {
            protocol: Protocol::H2c,
            max_streams_per_connection,
            ..PoolConfig::default()
        },
        ..ClientConfig::default()
    };
    let c = Arc::new(client(&[addr], h2(256)));
    // One call first: the server's SETTINGS arrive on the first connection.
    assert_eq!(run(&c, 1).await, 0);
    assert_eq!(concurrent(&c, 6, 1, "/wait/300").await, 0);
    let accepted = handle.stats().accepted.load(Ordering::Relaxed);
    assert_eq!(accepted, 3, "6 concurrent streams at 2 per connection");
    assert_eq!(c.pool_stats_of(addr).unwrap().connects, 3);

    // Before a connection's SETTINGS arrive, a cold client may overfill it; the server refuses
    // the excess streams (REFUSED_STREAM: not processed), and those are retried.
    let cold = Arc::new(client(&[addr], h2(256)));
    assert_eq!(concurrent(&cold, 6, 1, "/wait/300").await, 0);
    eprintln!("cold h2 client: {:?}", cold.stats());

    // …or the client's cap when the server allows more.
    let (addr, _, handle) = serve(Duration::from_secs(75)).await;
    let c = Arc::new(client(&[addr], h2(2)));
    assert_eq!(run(&c, 1).await, 0);
    assert_eq!(concurrent(&c, 6, 1, "/wait/300").await, 0);
    assert_eq!(handle.stats().accepted.load(Ordering::Relaxed), 3);

    // And below the limit everything shares one connection.
    let (addr, _, handle) = serve(Duration::from_secs(75)).await;
    let c = Arc::new(client(&[addr], h2(256)));
    assert_eq!(concurrent(&c, 6, 5, "/wait/20").await, 0);
    assert_eq!(handle.stats().accepted.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn fast_open_connects_serve_calls_whether_or_not_the_kernel_grants_a_cookie() {
    let (addr, _, handle) = serve(Duration::from_secs(75)).await;
    let cfg = ClientConfig {
        pool: PoolConfig {
            fastopen: true,
            // No idle connections kept: every call connects, so the second and later ones
            // may carry data in the SYN once the first has fetched the server's cookie.
            max_idle: 0,
            ..PoolConfig::default()
        },
        ..ClientConfig::default()
    };
    let c = client(&[addr], cfg);
    assert_eq!(run(&c, 5).await, 0);
    let stats = c.pool_stats_of(addr).unwrap();
    assert_eq!(stats.connects, 5, "{stats:?}");
    assert_eq!(handle.stats().accepted.load(Ordering::Relaxed), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_reused_within_the_idle_timeout_and_replaced_after_it() {
    let (addr, _, _handle) = serve(Duration::from_secs(75)).await;
    let cfg = ClientConfig {
        pool: PoolConfig {
            idle_timeout: Duration::from_millis(300),
            ..PoolConfig::default()
        },
        ..ClientConfig::default()
    };
    let c = client(&[addr], cfg);
    assert!(call(&c, "/").await);
    assert!(call(&c, "/").await);
    let warm = c.pool_stats_of(addr).unwrap();
    assert_eq!(
        warm.connects, 1,
        "the second call reused the first's connection: {warm:?}"
    );
    // Past the timeout the idle connection is dropped at the next checkout, not handed out.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(call(&c, "/").await);
    let after = c.pool_stats_of(addr).unwrap();
    assert_eq!(
        after.connects, 2,
        "the expired connection was replaced: {after:?}"
    );
    assert_eq!(after.idle, 1, "only the new connection is idle: {after:?}");
}
