//! The client against real Keel servers on loopback, with faults from the in-repo proxy.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::{Upstreamish, call, client, get_root, run, serve};
use http_body_util::BodyExt;
use keel_client::client::{Client, ClientConfig, ClientError};
use keel_client::endpoint::{Endpoint, Endpoints};
use keel_client::pool::{PoolConfig, Protocol};
use keel_client::upstream::{Upstream, UpstreamConfig};
use keel_core::Shutdown;
use keel_server::{HttpSettings, Readiness, Server, ServerConfig};
use keel_test_support::fault::{Fault, FaultProxy};

#[tokio::test]
async fn a_503_endpoint_is_ejected_after_its_consecutive_failures_gets_nothing_then_returns() {
    let mut addrs = Vec::new();
    let mut states = Vec::new();
    for _ in 0..3 {
        let (a, s, _) = serve(Duration::from_secs(75)).await;
        addrs.push(a);
        states.push(s);
    }
    let upstream_cfg = UpstreamConfig {
        outlier: keel_client::outlier::OutlierConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(1),
            max_ejection_percent: 34,
            ..Default::default()
        },
        ..UpstreamConfig::default()
    };
    let eps = Endpoints::new(addrs.iter().map(|a| Endpoint::new(*a)).collect());
    let upstream = Arc::new(Upstream::new(upstream_cfg, eps));
    let c = Client::new("test", ClientConfig::default(), upstream.clone());
    assert_eq!(run(&c, 30).await, 0);
    let hits = |i: usize| states[i].hits.load(Ordering::SeqCst);

    // Endpoint 1 starts answering 503. Every such answer is retried elsewhere (a 503 before
    // the body is safe to resend), and each one penalises it in the balancer for 1 s, so it
    // sees about one request a second until its third failure in a row ejects it.
    states[1].failing.store(true, Ordering::SeqCst);
    let bad = addrs[1];
    let started = tokio::time::Instant::now();
    let (mut calls, mut failed) = (0, 0);
    while !upstream.outlier().is_ejected(&bad) {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "not ejected after {calls} calls ({} hits)",
            hits(1)
        );
        failed += run(&c, 10).await;
        calls += 10;
    }
    eprintln!("ejected after {calls} calls, {:?}", started.elapsed());
    assert_eq!(failed, 0, "503s were retried on healthy endpoints");
    let hits_at_ejection = hits(1);
    assert!(
        hits_at_ejection >= 3,
        "ejected after 3 consecutive failures"
    );

    // While ejected it gets nothing.
    assert_eq!(run(&c, 150).await, 0);
    assert!(
        upstream.outlier().is_ejected(&bad),
        "still inside its 1 s ejection"
    );
    assert_eq!(hits(1), hits_at_ejection, "no traffic while ejected");

    // Healed, and back after the ejection time.
    states[1].failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(!upstream.outlier().is_ejected(&bad));
    let before = hits(1);
    // Traffic returns through the balancer, which still holds the endpoint's peak response
    // time from before its ejection, decaying over `decay` (10 s). On a busy machine one of
    // its three 503s can have taken a few times the healthy peers' time, and sequential
    // calls (nothing in flight anywhere) would then choose the peers until that decays —
    // tens of seconds; once in CI, 300 sequential calls gave it nothing. Calls sixteen at a
    // time load the peers, and an idle endpoint wins against a busy one (cost = estimate ×
    // (in flight + 1)), as it would in service; the bound covers the decay.
    let healed = tokio::time::Instant::now();
    while hits(1) == before {
        assert!(
            healed.elapsed() < Duration::from_secs(30),
            "no traffic returned to the healed endpoint"
        );
        let batch = (0..16).map(|_| call(&c, "/"));
        let ok = futures_util::future::join_all(batch).await;
        assert!(
            ok.iter().all(|&ok| ok),
            "a call failed after the endpoint healed"
        );
    }
}

#[tokio::test]
async fn refused_endpoints_are_retried_around_and_a_dead_upstream_is_bounded_by_budget_and_breaker()
{
    let mut proxies = Vec::new();
    for _ in 0..3 {
        let (a, _, _) = serve(Duration::from_secs(75)).await;
        proxies.push(FaultProxy::start(a).await.unwrap());
    }
    let addrs: Vec<SocketAddr> = proxies.iter().map(FaultProxy::addr).collect();
    // GET / is idempotent: a connection reset after the request went out may be resent too.
    let cfg = ClientConfig {
        idempotent: true,
        ..ClientConfig::default()
    };
    let c = client(&addrs, cfg);
    proxies[0].set(Fault::ResetOnConnect);
    proxies[0].reset_all();
    assert_eq!(
        run(&c, 50).await,
        0,
        "calls to the endpoint that resets every connection are retried elsewhere"
    );
    assert!(c.stats().retries > 0, "{:?}", c.stats());
    let c = client(&addrs, ClientConfig::default());
    proxies[0].set(Fault::Refuse);
    assert_eq!(
        run(&c, 50).await,
        0,
        "refused connections are retried elsewhere"
    );

    // Everything down: every call fails, retries stay within the budget, the breaker opens.
    for p in &proxies {
        p.set(Fault::Refuse);
        // Pooled connections would otherwise keep working through a refusing proxy.
        p.reset_all();
    }
    // The resets happen in the proxy's connection tasks: wait until they are done.
    for _ in 0..200 {
        if proxies.iter().all(|p| p.stats().active == 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(proxies.iter().all(|p| p.stats().active == 0));
    let calls = 300;
    let mut failed = 0;
    let mut fast_rejects = 0;
    for _ in 0..calls {
        match c.request(get_root()).await {
            Ok(r) => panic!("unexpected success {}", r.status()),
            Err(ClientError::BreakerOpen(_)) => fast_rejects += 1,
            Err(_) => failed += 1,
        }
    }
    assert_eq!(failed + fast_rejects, calls);
    let budget = c.budget().stats();
    // 20 % of the window's requests plus the floor (10/s × 10 s).
    let allowed = (budget.deposits as f64 * 0.2) as u64 + 100;
    assert!(budget.withdrawals <= allowed, "{budget:?}");
    assert!(budget.exhausted > 0, "the budget ran out: {budget:?}");
    assert!(fast_rejects > 0, "the breaker opened and failed calls fast");
    assert!(c.breaker().stats().local_rejects > 0);
}

#[tokio::test]
async fn no_call_is_made_with_less_than_the_margin_left() {
    let (addr, state, _) = serve(Duration::from_secs(75)).await;
    let c = client(&[addr], ClientConfig::default());
    let ctx = keel_core::Context::background(Duration::from_millis(2));
    let err = ctx.scope(c.request(get_root())).await.unwrap_err();
    assert!(matches!(err, ClientError::DeadlineExceeded(_)), "{err}");
    assert_eq!(state.hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_slow_upstream_fails_at_the_deadline_is_cancelled_there_and_is_not_retried() {
    let (addr, state, _) = serve(Duration::from_secs(75)).await;
    let cfg = ClientConfig {
        // Even where a retry would be allowed, none happens without time left for it.
        idempotent: true,
        ..ClientConfig::default()
    };
    let c = client(&[addr], cfg);
    let ctx = keel_core::Context::background(Duration::from_millis(300));
    let started = tokio::time::Instant::now();
    let req = http::Request::get("/slow").body(Bytes::new()).unwrap();
    let result = ctx.scope(c.request(req)).await;
    let took = started.elapsed();
    // The upstream was sent the remaining time minus the margin, so it gives up first and its
    // 504 arrives just before this side's deadline: the caller gets that answer (a timeout
    // error here would only be a slower way of saying the same).
    match result {
        Ok(r) => assert_eq!(r.status(), 504),
        Err(e) => assert!(
            matches!(e, ClientError::Failed { attempts: 1, .. }),
            "one attempt, then no time for another: {e}"
        ),
    }
    assert!(
        took >= Duration::from_millis(280),
        "failed before the deadline: {took:?}"
    );
    assert!(
        took < Duration::from_millis(300 + 700),
        "not at the deadline: {took:?}"
    );
    // The upstream got the remaining time minus the margin and dropped its handler itself.
    let mut cancelled = 0;
    for _ in 0..100 {
        cancelled = state.cancelled.load(Ordering::SeqCst);
        if cancelled == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(cancelled, 1, "the upstream saw the request cancelled");
    assert_eq!(state.hits.load(Ordering::SeqCst), 1, "no retry");
}

#[tokio::test]
async fn a_generated_tonic_client_runs_over_the_keel_client() {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let router = tonic::service::Routes::new(health).into_axum_router();
    let settings = HttpSettings {
        server: ServerConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            ..ServerConfig::default()
        },
        ..HttpSettings::default()
    };
    let shutdown = Shutdown::new();
    let readiness = Readiness::new(Default::default(), shutdown.clone());
    let server = Server::bind(&settings, 1, readiness, shutdown).unwrap();
    let addr = server.local_addr();
    let handle = server.handle();
    tokio::spawn(server.serve(router));

    let cfg = ClientConfig {
        pool: PoolConfig {
            protocol: Protocol::H2c,
            ..PoolConfig::default()
        },
        ..ClientConfig::default()
    };
    let c = Arc::new(client(&[addr], cfg));
    let mut grpc =
        tonic_health::pb::health_client::HealthClient::new(keel_client::client::Service::new(c));
    for _ in 0..20 {
        let r = grpc
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
        assert_eq!(
            r.into_inner().status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
    assert_eq!(
        handle.stats().accepted.load(Ordering::Relaxed),
        1,
        "all calls multiplexed on one HTTP/2 connection"
    );
}

#[tokio::test]
async fn losing_priority_zero_fails_over_to_priority_one_and_traffic_returns_when_it_heals() {
    let mut states = Vec::new();
    let mut proxies = Vec::new();
    for _ in 0..4 {
        let (a, s, _) = serve(Duration::from_secs(75)).await;
        states.push(s);
        proxies.push(FaultProxy::start(a).await.unwrap());
    }
    // P0 = proxies 0 and 1 ("cluster A"), P1 = proxies 2 and 3 ("cluster B").
    let eps: Vec<Endpoint> = proxies
        .iter()
        .enumerate()
        .map(|(i, p)| Endpoint::parse(&format!("{};priority={}", p.addr(), i / 2)).unwrap())
        .collect();
    let upstream_cfg = UpstreamConfig {
        outlier: keel_client::outlier::OutlierConfig {
            consecutive_failures: 2,
            base_ejection: Duration::from_secs(1),
            // A whole cluster must be able to go.
            max_ejection_percent: 50,
            ..Default::default()
        },
        ..UpstreamConfig::default()
    };
    let c = Client::new(
        "failover",
        ClientConfig::default(),
        Arc::new(Upstream::new(upstream_cfg, Endpoints::new(eps))),
    );
    let hits = |states: &[Arc<Upstreamish>]| -> Vec<usize> {
        states
            .iter()
            .map(|s| s.hits.load(Ordering::SeqCst))
            .collect()
    };

    assert_eq!(run(&c, 100).await, 0);
    let h0 = hits(&states);
    assert_eq!(
        h0[2] + h0[3],
        0,
        "healthy priority 0 takes everything: {h0:?}"
    );

    // Cluster A goes away.
    for p in &proxies[..2] {
        p.set(Fault::Refuse);
        p.reset_all();
    }
    let failed_during_switch = run(&c, 200).await;
    let h1 = hits(&states);
    let to_b = (h1[2] + h1[3]) - (h0[2] + h0[3]);
    // New connections to cluster A are refused, which is retried elsewhere. What can fail is at
    // most one request per cluster-A endpoint: the one sent on its pooled connection as the
    // reset hit it — not retried, since the upstream may have processed it (the route is not
    // declared idempotent). Observed: 1–2.
    assert!(
        failed_during_switch <= 2,
        "{failed_during_switch} failed during the switch"
    );
    assert_eq!(to_b, 200 - failed_during_switch, "cluster B served: {h1:?}");

    // Cluster A heals; after its ejections end, traffic returns to priority 0.
    for p in &proxies[..2] {
        p.set(Fault::None);
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(run(&c, 100).await, 0);
    let h2 = hits(&states);
    let back_to_a = (h2[0] + h2[1]) - (h1[0] + h1[1]);
    assert!(back_to_a >= 95, "traffic returned to priority 0: {h2:?}");
    eprintln!("failover: {failed_during_switch} failed requests during the switch");
}

/// A gRPC call to `/grpc` on `c`, its body read to the trailers.
async fn grpc_call(c: &Client) {
    let req = http::Request::post("/grpc")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Bytes::new())
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let trailers = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .trailers()
        .cloned();
    assert!(trailers.is_some_and(|t| t.contains_key("grpc-status")));
}

#[tokio::test]
async fn a_grpc_status_in_trailers_after_the_messages_counts_for_or_against_the_endpoint() {
    for (status, counts_against) in [(14, true), (13, true), (0, false), (3, false)] {
        let (addr, state, _) = serve(Duration::from_secs(75)).await;
        state.grpc_status.store(status, Ordering::SeqCst);
        // A fallback at priority 1, so that all traffic goes to `addr` while it is healthy
        // and it can be ejected (a lone endpoint never is).
        let (fallback, _, _) = serve(Duration::from_secs(75)).await;
        let eps = Endpoints::new(vec![
            Endpoint::new(addr),
            Endpoint::parse(&format!("{fallback};priority=1")).unwrap(),
        ]);
        let upstream_cfg = UpstreamConfig {
            outlier: keel_client::outlier::OutlierConfig {
                consecutive_failures: 3,
                max_ejection_percent: 100,
                ..Default::default()
            },
            ..UpstreamConfig::default()
        };
        let c = Client::new(
            "grpc",
            ClientConfig {
                pool: PoolConfig {
                    protocol: Protocol::H2c,
                    ..PoolConfig::default()
                },
                ..ClientConfig::default()
            },
            Arc::new(Upstream::new(upstream_cfg, eps)),
        );
        for _ in 0..3 {
            grpc_call(&c).await;
        }
        let ejected = c.upstream().outlier().is_ejected(&addr);
        let breaker = c.breaker().stats();
        assert_eq!(ejected, counts_against, "grpc-status {status}");
        let accepts = if counts_against { 0 } else { 3 };
        assert_eq!(
            breaker.accepts, accepts,
            "grpc-status {status}: {breaker:?}"
        );
        assert_eq!(
            state.hits.load(Ordering::SeqCst),
            3,
            "no retries after a body"
        );
    }
}

#[tokio::test]
async fn a_route_with_its_own_breaker_is_throttled_without_throttling_the_rest() {
    let (addr, _, _) = serve(Duration::from_secs(75)).await;
    let cfg = ClientConfig {
        route_breakers: vec!["/bad".into()],
        ..ClientConfig::default()
    };
    let c = client(&[addr], cfg);
    let mut rejected = 0;
    for _ in 0..200 {
        let req = http::Request::get("/bad").body(Bytes::new()).unwrap();
        match c.request(req).await {
            Err(ClientError::BreakerOpen(_)) => rejected += 1,
            Ok(r) => assert_eq!(r.status(), 503),
            Err(e) => panic!("{e}"),
        }
    }
    assert!(rejected > 0, "the /bad breaker opened");
    assert_eq!(run(&c, 50).await, 0, "other routes are not throttled");
    let stats = c.stats();
    assert_eq!(stats.breaker.local_rejects, 0, "{stats:?}");
    assert_eq!(stats.route_breakers[0].0, "/bad");
    assert_eq!(stats.route_breakers[0].1.local_rejects, rejected);
}

#[tokio::test]
async fn a_slow_first_attempt_is_hedged_on_idempotent_routes_only() {
    let (addr, state, _) = serve(Duration::from_secs(75)).await;
    let hedging = |idempotent| ClientConfig {
        idempotent,
        hedge_after: Some(Duration::from_millis(50)),
        ..ClientConfig::default()
    };
    let c = client(&[addr], hedging(true));
    state.delay_next_ms.store(3000, Ordering::SeqCst);
    assert!(call(&c, "/").await);
    assert_eq!(c.stats().hedges, 1);
    assert_eq!(
        state.hits.load(Ordering::SeqCst),
        2,
        "the first attempt and its hedge"
    );
    // The hedge answered first, so the slow attempt was abandoned: its connection closed and
    // the server dropped the handler.
    let mut cancelled = 0;
    for _ in 0..200 {
        cancelled = state.cancelled.load(Ordering::SeqCst);
        if cancelled == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(cancelled, 1, "the slow attempt was cancelled");

    // Not idempotent: never sent twice, the call waits for its only attempt.
    let c = client(&[addr], hedging(false));
    state.delay_next_ms.store(300, Ordering::SeqCst);
    assert!(call(&c, "/").await);
    assert_eq!(c.stats().hedges, 0);
    assert_eq!(state.hits.load(Ordering::SeqCst), 3);
    assert_eq!(state.cancelled.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn http1_requests_carry_host_and_the_origin_form_and_h2_the_authority() {
    let (addr, _, _) = serve(Duration::from_secs(75)).await;
    for (protocol, expected) in [
        (Protocol::Http1, format!("Some(\"{addr}\") /target?x=1")),
        // HTTP/2 carries the authority in `:authority`; hyper's server shows the full URI.
        (Protocol::H2c, format!("None http://{addr}/target?x=1")),
    ] {
        let cfg = ClientConfig {
            pool: PoolConfig {
                protocol,
                ..PoolConfig::default()
            },
            ..ClientConfig::default()
        };
        let c = client(&[addr], cfg);
        let req = http::Request::get("/target?x=1")
            .body(Bytes::new())
            .unwrap();
        let resp = c.request(req).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(String::from_utf8_lossy(&body), expected, "{protocol:?}");
    }
    // A caller's own Host is kept.
    let c = client(&[addr], ClientConfig::default());
    let req = http::Request::get("/target")
        .header("host", "orders.internal")
        .body(Bytes::new())
        .unwrap();
    let body = c
        .request(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(
        String::from_utf8_lossy(&body),
        "Some(\"orders.internal\") /target"
    );
}
