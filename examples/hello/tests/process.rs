//! The example service as a real process: drain under load, forced exit, grace expiry,
//! invalid config, SO_REUSEPORT listener count.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use keel_test_support::{self as ts, ChildGuard};

const BIN: &str = env!("CARGO_BIN_EXE_hello");

struct Proc {
    child: ChildGuard,
    addr: SocketAddr,
    admin: SocketAddr,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn spawn(extra: &[(&str, &str)]) -> Proc {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("hello.log");
    let addr = ts::free_addr();
    let admin = ts::free_addr();
    let mut env: Vec<(&str, String)> = vec![
        ("KEEL_SERVER__ADDR", addr.to_string()),
        ("KEEL_ADMIN__ADDR", admin.to_string()),
        ("KEEL_READINESS__INTERVAL", "100ms".into()),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    let child = ChildGuard::spawn_logged(BIN, &[], &env, &log);
    let p = Proc {
        child,
        addr,
        admin,
        log,
        _dir: dir,
    };
    let ok = ts::wait_until(Duration::from_secs(20), || {
        raw_status(p.admin, "/readyz") == Some(200)
    });
    assert!(ok, "service never became ready; log:\n{}", p.logs());
    p
}

impl Proc {
    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn in_flight(&self) -> u64 {
        let c = ts::http1_client();
        let (_, body) = ts::get(&c, &format!("http://{}/debug/server", self.admin))
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["in_flight"].as_u64().unwrap()
    }
}

/// GET over a fresh connection; None when the connection is refused or reset.
fn raw_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let req = format!("GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n");
    let out = ts::raw_exchange(addr, req.as_bytes(), Duration::from_secs(2)).ok()?;
    ts::status_of(&out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_100_in_flight_requests_over_http1_and_http2() {
    let drain_delay = Duration::from_millis(1500);
    let mut p = spawn(&[
        ("KEEL_SHUTDOWN__DRAIN_DELAY", "1500ms"),
        ("KEEL_SHUTDOWN__GRACE_PERIOD", "15s"),
    ]);
    // Long enough that every response is written after the listeners close, even on a busy
    // machine, so each HTTP/1.1 one must carry `Connection: close`.
    let slow = format!("http://{}/slow?ms=6000", p.addr);

    let h1 = ts::http1_client();
    let h2 = ts::h2c_client();
    let mut calls = Vec::new();
    for i in 0..100 {
        let client = if i % 2 == 0 { h1.clone() } else { h2.clone() };
        let url = slow.clone();
        calls.push(tokio::spawn(async move {
            let req = http::Request::get(&url)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = client.request(req).await?;
            let version = resp.version();
            let close = resp
                .headers()
                .get("connection")
                .is_some_and(|v| v == "close");
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((
                resp.status().as_u16(),
                version,
                close,
            ))
        }));
    }
    // Every request must be in the handler before the signal.
    let end = Instant::now() + Duration::from_secs(10);
    while p.in_flight().await < 100 {
        assert!(
            Instant::now() < end,
            "requests never all in flight; log:\n{}",
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let t0 = Instant::now();
    p.child.signal(libc::SIGTERM);
    let (addr, admin) = (p.addr, p.admin);

    // Readiness turns 503 first, while the main port still accepts (drain delay).
    let readyz = tokio::task::spawn_blocking(move || {
        let mut saw_503_on_main = None;
        while t0.elapsed() < drain_delay {
            if raw_status(addr, "/readyz") == Some(503) {
                saw_503_on_main = Some(t0.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let admin_503 = raw_status(admin, "/readyz") == Some(503);
        // Then the listeners close: new connections are refused.
        let refused = ts::wait_until(Duration::from_secs(3), || !ts::port_open(addr));
        (saw_503_on_main, admin_503, refused.then(|| t0.elapsed()))
    })
    .await
    .unwrap();
    let (main_503, admin_503, refused_at) = readyz;
    let main_503 = main_503.expect("main-port /readyz never answered 503 during the drain delay");
    assert!(main_503 < drain_delay);
    assert!(admin_503, "admin /readyz should be 503 while draining");
    let refused_at = refused_at.expect("new connections still accepted after the drain delay");
    assert!(
        refused_at >= drain_delay - Duration::from_millis(100),
        "refused before the drain delay: {refused_at:?}"
    );

    let mut h1_close = 0;
    for c in calls {
        let (status, version, close) = c
            .await
            .unwrap()
            .expect("in-flight request failed during drain");
        assert_eq!(status, 200);
        if version == http::Version::HTTP_11 && close {
            h1_close += 1;
        }
    }
    assert_eq!(
        h1_close, 50,
        "every HTTP/1.1 response finished while closing carries Connection: close"
    );

    let code = p.child.wait_exit(Duration::from_secs(15));
    assert_eq!(code, Some(Some(0)), "exit status; log:\n{}", p.logs());
    assert!(t0.elapsed() < Duration::from_secs(15) + drain_delay);
    assert!(p.logs().contains("drained cleanly"), "{}", p.logs());
}

#[test]
fn a_second_signal_exits_at_once() {
    let mut p = spawn(&[("KEEL_SHUTDOWN__DRAIN_DELAY", "30s")]);
    p.child.signal(libc::SIGTERM);
    assert!(ts::wait_until(Duration::from_secs(5), || raw_status(
        p.admin, "/readyz"
    ) == Some(503)));
    let t = Instant::now();
    p.child.signal(libc::SIGINT);
    let code = p.child.wait_exit(Duration::from_secs(5));
    assert_eq!(code, Some(Some(130)), "log:\n{}", p.logs());
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_still_running_after_the_grace_period_are_cancelled_and_counted() {
    let mut p = spawn(&[
        ("KEEL_SHUTDOWN__DRAIN_DELAY", "0s"),
        ("KEEL_SHUTDOWN__GRACE_PERIOD", "700ms"),
    ]);
    let url = format!("http://{}/slow?ms=30000", p.addr);
    let client = ts::http1_client();
    let mut calls = Vec::new();
    for _ in 0..3 {
        let (c, u) = (client.clone(), url.clone());
        calls.push(tokio::spawn(async move { ts::get(&c, &u).await }));
    }
    let end = Instant::now() + Duration::from_secs(10);
    while p.in_flight().await < 3 {
        assert!(Instant::now() < end);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t0 = Instant::now();
    p.child.signal(libc::SIGTERM);
    let code = tokio::task::spawn_blocking(move || {
        let code = p.child.wait_exit(Duration::from_secs(10));
        (code, p)
    })
    .await
    .unwrap();
    let (code, p) = code;
    assert_eq!(code, Some(Some(0)), "log:\n{}", p.logs());
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    let logs = p.logs();
    assert!(
        logs.contains("grace period over") && logs.contains("cancelled=3"),
        "{logs}"
    );
    for c in calls {
        assert!(
            c.await.unwrap().is_err(),
            "a cancelled request must not look successful"
        );
    }
}

#[test]
fn invalid_config_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("bad.log");
    let mut c = ChildGuard::spawn_logged(
        BIN,
        &["--set", "server.max_headers=0"],
        &[("KEEL_SERVER__IDLE_TIMEOUT", "soon".to_string())],
        &log,
    );
    assert_eq!(c.wait_exit(Duration::from_secs(10)), Some(Some(2)));
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(
        err.contains("server.idle_timeout")
            && err.contains("soon")
            && err.contains("env KEEL_SERVER__IDLE_TIMEOUT"),
        "{err}"
    );
}

#[test]
fn listeners_default_to_one_per_worker_and_follow_config() {
    let p = spawn(&[("KEEL_RUNTIME__WORKER_THREADS", "3")]);
    assert_eq!(
        ts::listening_sockets(p.addr.port()),
        3,
        "log:\n{}",
        p.logs()
    );
    drop(p);
    let p = spawn(&[("KEEL_SERVER__LISTENERS", "4")]);
    assert_eq!(ts::listening_sockets(p.addr.port()), 4);
}

#[test]
fn per_core_shards_each_get_a_listener_and_serve() {
    let p = spawn(&[("KEEL_RUNTIME__SHARDS", "per-core")]);
    let cpus = keel::runtime::current_affinity().unwrap().len();
    assert_eq!(
        ts::listening_sockets(p.addr.port()),
        cpus,
        "log:\n{}",
        p.logs()
    );
    for _ in 0..20 {
        assert_eq!(raw_status(p.addr, "/"), Some(200));
    }
    let body = ts::raw_exchange(
        p.admin,
        b"GET /debug/runtime HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
        Duration::from_secs(2),
    )
    .unwrap();
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("\"shard_mode\": \"per-core\""), "{text}");
}

#[tokio::test]
async fn context_endpoint_shows_what_the_caller_sent() {
    let p = spawn(&[]);
    let req = http::Request::get(format!("http://{}/context", p.addr))
        .header("keel-timeout", "2S")
        .header("baggage", "keel-color=canary")
        .header("b3", "463ac35c9f6413ad48485a3953bb6124-a2fb4a1d1a96d312-1")
        .header("x-request-id", "ctx-1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = ts::http1_client().request(req).await.unwrap();
    assert_eq!(resp.headers()["x-request-id"], "ctx-1");
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    for line in [
        "request_id=ctx-1",
        "trace_id=463ac35c9f6413ad48485a3953bb6124",
        "parent_span_id=a2fb4a1d1a96d312",
        "color=canary",
    ] {
        assert!(text.contains(line), "missing {line}: {text}");
    }
    let ms: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("remaining_ms="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(ms > 1000 && ms <= 2000, "{text}");
}

/// A request to `url` with `method`; returns the status and body.
async fn call(method: http::Method, url: String) -> (u16, String) {
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = ts::http1_client().request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_log_filter_changes_at_run_time_and_log_lines_carry_the_trace() {
    let p = spawn(&[("KEEL_LOG__FORMAT", "json"), ("KEEL_LOG__LEVEL", "info")]);
    let log_url = format!("http://{}/debug/log", p.admin);
    assert_eq!(
        call(http::Method::GET, log_url.clone()).await,
        (200, "info\n".into())
    );

    // A bad filter is refused and changes nothing.
    let (status, body) = call(http::Method::PUT, format!("{log_url}?filter=%3D%5Bnope")).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(call(http::Method::GET, log_url.clone()).await.1, "info\n");

    // Turn on debug for the server crate: the deadline cut-off below logs at debug.
    let filter = "info,keel_server=debug";
    let (status, body) = call(http::Method::PUT, format!("{log_url}?filter={filter}")).await;
    assert_eq!((status, body.as_str()), (200, "info,keel_server=debug\n"));
    assert_eq!(
        call(http::Method::GET, log_url).await.1,
        "info,keel_server=debug\n"
    );

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let req = http::Request::get(format!("http://{}/slow?ms=2000", p.addr))
        .header("keel-timeout", "100m")
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = ts::http1_client().request(req).await.unwrap();
    assert_eq!(resp.status(), 504);
    let found = ts::wait_until(Duration::from_secs(5), || {
        p.logs()
            .lines()
            .any(|l| l.contains("deadline exceeded; handler cancelled") && l.contains(trace))
    });
    assert!(
        found,
        "no debug line with the trace id after the filter change; log:\n{}",
        p.logs()
    );
}
