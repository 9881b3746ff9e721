//! The server over real TCP: protocols on one port, limits, probes, readiness, keep-alive,
//! hop-by-hop hygiene, SO_REUSEPORT groups.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue};
use axum::routing::{get, post};
use http_body_util::{BodyExt, Full, StreamBody};
use keel_core::{Phase, Shutdown};
use keel_server::{
    AdminRoutes, HttpSettings, Readiness, ReadinessConfig, Server, ServerConfig, ServerHandle,
};
use keel_test_support as ts;

struct TestServer {
    addr: SocketAddr,
    shutdown: Shutdown,
    readiness: Readiness,
    handle: ServerHandle,
}

fn config() -> ServerConfig {
    ServerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        ..ServerConfig::default()
    }
}

fn router() -> Router {
    let (_reporter, health) = tonic_health::server::health_reporter();
    Router::new()
        .route("/", get(|| async { "hello" }))
        .route("/echo", post(|b: Bytes| async move { b }))
        .route(
            "/peer",
            get(|req: axum::extract::Request| async move {
                let ctx = req.extensions().get::<keel_core::Context>();
                format!("{:?}", ctx.and_then(keel_core::Context::peer))
            }),
        )
        .route(
            "/hop",
            get(|| async {
                let mut h = HeaderMap::new();
                h.insert("connection", HeaderValue::from_static("x-private"));
                h.insert("x-private", HeaderValue::from_static("1"));
                h.insert("keep-alive", HeaderValue::from_static("timeout=999"));
                h.insert("upgrade", HeaderValue::from_static("h2c"));
                h.insert("x-end-to-end", HeaderValue::from_static("kept"));
                (h, "hop")
            }),
        )
        .route(
            "/big/{mib}",
            get(
                |axum::extract::Path(mib): axum::extract::Path<usize>| async move {
                    // Streamed, never whole: made only as fast as the connection takes it.
                    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                    let frames = futures_util::stream::iter((0..mib * 16).map(move |_| {
                        Ok::<_, std::convert::Infallible>(http_body::Frame::data(chunk.clone()))
                    }));
                    axum::body::Body::new(StreamBody::new(frames))
                },
            ),
        )
        .merge(tonic::service::Routes::new(health).into_axum_router())
}

async fn start(cfg: ServerConfig, listeners: usize) -> TestServer {
    let shutdown = Shutdown::new();
    let readiness = Readiness::new(
        ReadinessConfig {
            interval: keel_config::Duration::from_millis(50),
            timeout: keel_config::Duration::from_millis(200),
            failure_threshold: 1,
        },
        shutdown.clone(),
    );
    let settings = HttpSettings {
        server: cfg,
        ..HttpSettings::default()
    };
    let server = Server::bind(&settings, listeners, readiness.clone(), shutdown.clone()).unwrap();
    let addr = server.local_addr();
    let handle = server.handle();
    readiness.start();
    tokio::spawn(server.serve(router()));
    readiness.mark_started();
    TestServer {
        addr,
        shutdown,
        readiness,
        handle,
    }
}

#[tokio::test]
async fn the_request_context_knows_the_address_it_came_from() {
    let srv = start(config(), 1).await;
    let addr = srv.addr;
    let (local, raw) = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let local = s.local_addr().unwrap();
        s.write_all(b"GET /peer HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        (local, out)
    })
    .await
    .unwrap();
    assert!(raw.ends_with(&format!("Some({local})")), "{raw}");

    // Over HTTP/2 each stream's context has it too.
    let resp = ts::h2c_client()
        .request(
            http::Request::get(format!("http://{addr}/peer"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.starts_with("Some(127.0.0.1:"), "{body}");
    srv.shutdown.advance(Phase::Stopped);
}

#[tokio::test]
async fn http1_h2c_and_grpc_share_one_port() {
    let s = start(config(), 1).await;
    let url = format!("http://{}/", s.addr);

    let h1 = ts::http1_client();
    let resp = h1
        .request(
            http::Request::get(&url)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_11);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["keep-alive"], "timeout=75");

    let h2 = ts::h2c_client();
    let resp = h2
        .request(
            http::Request::get(&url)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers().get("keep-alive").is_none(),
        "HTTP/2 has no Keep-Alive header"
    );
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        "hello"
    );

    let channel = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic_health::pb::health_client::HealthClient::new(channel);
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

#[tokio::test]
async fn oversized_header_block_and_too_many_headers_get_431() {
    let s = start(config(), 1).await;
    let addr = s.addr;
    tokio::task::spawn_blocking(move || {
        let big = "a".repeat(20 * 1024);
        let req = format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n");
        let out = ts::raw_exchange(addr, req.as_bytes(), Duration::from_secs(5)).unwrap();
        assert_eq!(
            ts::status_of(&out),
            Some(431),
            "{}",
            String::from_utf8_lossy(&out)
        );

        let mut req = String::from("GET / HTTP/1.1\r\nhost: x\r\n");
        for i in 0..150 {
            req.push_str(&format!("x-h{i}: v\r\n"));
        }
        req.push_str("\r\n");
        let out = ts::raw_exchange(addr, req.as_bytes(), Duration::from_secs(5)).unwrap();
        assert_eq!(
            ts::status_of(&out),
            Some(431),
            "{}",
            String::from_utf8_lossy(&out)
        );

        // Just under both limits is fine.
        let mut req = String::from("GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
        for i in 0..90 {
            req.push_str(&format!("x-h{i}: v\r\n"));
        }
        req.push_str("\r\n");
        let out = ts::raw_exchange(addr, req.as_bytes(), Duration::from_secs(5)).unwrap();
        assert_eq!(ts::status_of(&out), Some(200));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn oversized_body_gets_413_declared_or_streamed() {
    let mut cfg = config();
    cfg.max_body_bytes = keel_config::ByteSize::kib(64);
    let s = start(cfg, 1).await;
    let url = format!("http://{}/echo", s.addr);
    let client = ts::http1_client();

    // Declared by Content-Length: refused before the handler runs.
    let body = Bytes::from(vec![b'x'; 100 * 1024]);
    let resp = client
        .request(http::Request::post(&url).body(Full::new(body)).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    // The same over HTTP/2, where the length is the `content-length` header of the HEADERS
    // frame.
    let body = Bytes::from(vec![b'x'; 100 * 1024]);
    let resp = ts::h2c_client()
        .request(http::Request::post(&url).body(Full::new(body)).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);

    // Streamed (chunked, no length): refused once the limit is crossed while reading.
    let chunks = (0..10).map(|_| {
        Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from(vec![b'y'; 16 * 1024])))
    });
    let stream = futures_util::stream::iter(chunks);
    let client2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<StreamBody<_>>();
    let resp = client2
        .request(
            http::Request::post(&url)
                .body(StreamBody::new(stream))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);

    // Within the limit: echoed.
    let body = Bytes::from(vec![b'z'; 1000]);
    let resp = client
        .request(
            http::Request::post(&url)
                .body(Full::new(body.clone()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), body);
    assert_eq!(s.handle.stats().body_too_large.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn slow_header_client_is_disconnected_after_header_read_timeout() {
    let mut cfg = config();
    cfg.header_read_timeout = keel_config::Duration::from_millis(800);
    let s = start(cfg, 1).await;
    let addr = s.addr;
    let elapsed = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut sock = std::net::TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let start = Instant::now();
        // One byte every 100 ms: the whole head would take ~4 s.
        for b in b"GET / HTTP/1.1\r\nhost: x\r\nuser-agent: slowloris\r\n\r\n" {
            if sock.write_all(&[*b]).is_err() {
                break;
            }
            let mut buf = [0u8; 256];
            match sock.read(&mut buf) {
                Ok(0) => break, // closed by the server
                Ok(n) => {
                    let got = String::from_utf8_lossy(&buf[..n]);
                    assert!(got.starts_with("HTTP/1.1 408"), "unexpected response {got}");
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => break, // reset by the server
            }
        }
        start.elapsed()
    })
    .await
    .unwrap();
    assert!(
        elapsed >= Duration::from_millis(700),
        "closed too early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_millis(800 + 1500),
        "not closed within the timeout plus margin: {elapsed:?}"
    );
    assert_eq!(s.handle.stats().header_timeouts.load(Ordering::Relaxed), 1);
}

/// GET `/big/{mib}` on a fresh connection, then `read` the response with the socket; returns
/// the bytes read.
async fn download(
    addr: SocketAddr,
    mib: usize,
    read: impl FnOnce(&mut std::net::TcpStream) -> usize + Send + 'static,
) -> usize {
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut sock = std::net::TcpStream::connect(addr).unwrap();
        let head = format!("GET /big/{mib} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        sock.write_all(head.as_bytes()).unwrap();
        read(&mut sock)
    })
    .await
    .unwrap()
}

/// Read until the end of the stream or an error, `pause` after each read; the bytes read.
fn read_all(sock: &mut std::net::TcpStream, pause: Duration) -> usize {
    use std::io::Read;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    while let Ok(n @ 1..) = sock.read(&mut buf) {
        total += n;
        std::thread::sleep(pause);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_after_send_timeout() {
    let mut cfg = config();
    cfg.send_timeout = keel_config::Duration::from_secs(1);
    let s = start(cfg, 1).await;
    let stats = s.handle.clone();
    let closed = Arc::new(AtomicBool::new(false));
    let seen = closed.clone();
    let read = download(s.addr, 64, move |sock| {
        // Take nothing until the server has given up on us (the kernel's buffers hold a few
        // MiB of the 64; the rest waits on us)...
        let _ = ts::wait_until(Duration::from_secs(30), || seen.load(Ordering::Relaxed));
        // ...then what is left is what the buffers held before the connection was closed.
        read_all(sock, Duration::ZERO)
    });
    let watch = tokio::task::spawn_blocking(move || {
        let timed_out = ts::wait_until(Duration::from_secs(20), || {
            stats.stats().send_timeouts.load(Ordering::Relaxed) == 1
        });
        closed.store(true, Ordering::Relaxed);
        timed_out
    });
    let read = read.await;
    assert!(
        watch.await.unwrap(),
        "the stalled connection was not closed"
    );
    assert!(
        read < 64 << 20,
        "the whole body arrived ({read} bytes): nothing was cut"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_that_keeps_reading_is_never_cut() {
    let mut cfg = config();
    cfg.send_timeout = keel_config::Duration::from_secs(2);
    let s = start(cfg, 1).await;
    let started = Instant::now();
    // 256 KiB every 50 ms: 16 MiB take over 3 s, longer than send_timeout in total, but no
    // write ever waits near it.
    let read = download(s.addr, 16, |sock| read_all(sock, Duration::from_millis(50))).await;
    assert!(read > 16 << 20, "only {read} bytes arrived");
    assert!(
        started.elapsed() > Duration::from_secs(2),
        "the download outlasted send_timeout (else this proves nothing)"
    );
    assert_eq!(s.handle.stats().send_timeouts.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn idle_keepalive_connection_outlives_the_header_timeout_and_closes_at_idle_timeout() {
    let mut cfg = config();
    cfg.header_read_timeout = keel_config::Duration::from_millis(300);
    cfg.idle_timeout = keel_config::Duration::from_millis(1200);
    let s = start(cfg, 1).await;
    let addr = s.addr;
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut sock = std::net::TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let req = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
        let mut buf = [0u8; 1024];
        sock.write_all(req).unwrap();
        let n = sock.read(&mut buf).unwrap();
        assert_eq!(ts::status_of(&buf[..n]), Some(200));
        // Idle for longer than the header timeout: still usable.
        std::thread::sleep(Duration::from_millis(600));
        sock.write_all(req).unwrap();
        let n = sock.read(&mut buf).unwrap();
        assert_eq!(
            ts::status_of(&buf[..n]),
            Some(200),
            "keep-alive survived past the header timeout"
        );
        // Idle past the idle timeout: the server closes.
        let idle_start = Instant::now();
        let n = sock.read(&mut buf).unwrap_or(0);
        assert_eq!(
            n,
            0,
            "expected close, got {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
        let waited = idle_start.elapsed();
        assert!(
            waited >= Duration::from_millis(1000),
            "closed too early: {waited:?}"
        );
        assert!(
            waited < Duration::from_millis(3000),
            "closed too late: {waited:?}"
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn hop_by_hop_headers_from_handlers_never_reach_the_client() {
    let s = start(config(), 1).await;
    let addr = s.addr;
    let out = tokio::task::spawn_blocking(move || {
        ts::raw_exchange(
            addr,
            b"GET /hop HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("x-end-to-end: kept"), "{text}");
    assert!(!text.contains("x-private"), "{text}");
    assert!(!text.contains("timeout=999"), "{text}");
    assert!(!text.contains("upgrade"), "{text}");
}

#[tokio::test]
async fn reuseport_group_has_n_listening_sockets() {
    let s = start(config(), 3).await;
    assert_eq!(ts::listening_sockets(s.addr.port()), 3);
    // And they all serve.
    let client = ts::http1_client();
    for _ in 0..10 {
        let (st, _) = ts::get(&client, &format!("http://{}/", s.addr))
            .await
            .unwrap();
        assert_eq!(st, 200);
    }
}

/// This process's server-side socket of the connection whose client end is `client`.
fn server_end(client: &std::net::TcpStream) -> std::net::TcpStream {
    use std::os::fd::{AsRawFd, BorrowedFd};
    let local = client.local_addr().unwrap();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let Ok(fd) = entry.unwrap().file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if fd == client.as_raw_fd() {
            continue;
        }
        // SAFETY: the descriptor is open (listed just now) and only borrowed for the calls
        // below; the server keeps the connection open while the client holds its end.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        if sock.peer_addr().ok().and_then(|a| a.as_socket()) == Some(local) {
            return sock.try_clone().unwrap().into();
        }
    }
    panic!("no server-side socket for {local}");
}

/// A client connection to `addr` that has had one request answered (so the server has
/// accepted it).
async fn answered_connection(addr: SocketAddr) -> std::net::TcpStream {
    tokio::task::spawn_blocking(move || {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        assert_eq!(
            exchange(&mut c, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"),
            Some(200)
        );
        c
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn accepted_connections_get_the_kernels_keepalive_from_config() {
    // Defaults: on, 20 s / 5 s / 2 probes.
    let s = start(config(), 1).await;
    let client = answered_connection(s.addr).await;
    let server = server_end(&client);
    let server = socket2::SockRef::from(&server);
    assert!(server.keepalive().unwrap());
    assert_eq!(
        server.tcp_keepalive_time().unwrap(),
        Duration::from_secs(20)
    );
    assert_eq!(
        server.tcp_keepalive_interval().unwrap(),
        Duration::from_secs(5)
    );
    assert_eq!(server.tcp_keepalive_retries().unwrap(), 2);

    // `0s` turns it off.
    let s = start(
        ServerConfig {
            tcp_keepalive_idle: keel_config::Duration::from_secs(0),
            ..config()
        },
        1,
    )
    .await;
    let client = answered_connection(s.addr).await;
    assert!(
        !socket2::SockRef::from(&server_end(&client))
            .keepalive()
            .unwrap()
    );
}

/// Reads HTTP/2 frames from `sock` until one of type `kind` arrives (its flags), or the
/// connection ends or `within` passes (`None`).
fn h2_frame_of_type(sock: &mut std::net::TcpStream, kind: u8, within: Duration) -> Option<u8> {
    use std::io::Read;
    let until = Instant::now() + within;
    let mut head = [0u8; 9];
    loop {
        sock.set_read_timeout(Some(until.checked_duration_since(Instant::now())?))
            .unwrap();
        sock.read_exact(&mut head).ok()?;
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        sock.read_exact(&mut payload).ok()?;
        if head[3] == kind {
            return Some(head[4]);
        }
    }
}

#[tokio::test]
async fn http2_pings_are_sent_only_when_configured() {
    const PING: u8 = 0x6;
    // The client preface and an empty SETTINGS frame: an idle HTTP/2 connection.
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    let on = start(
        ServerConfig {
            http2_keepalive_interval: keel_config::Duration::from_millis(300),
            ..config()
        },
        1,
    )
    .await;
    let off = start(config(), 1).await;
    let (on_ping, off_ping) = tokio::task::spawn_blocking(move || {
        let ping = |addr| {
            use std::io::Write;
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.write_all(PREFACE).unwrap();
            h2_frame_of_type(&mut c, PING, Duration::from_secs(3))
        };
        (ping(on.addr), ping(off.addr))
    })
    .await
    .unwrap();
    // A PING, not a PING ACK (flag 0x1).
    assert_eq!(on_ping, Some(0), "configured PINGs arrive");
    assert_eq!(off_ping, None, "no PING by default");
}

#[tokio::test]
async fn readiness_follows_a_dependency_that_fails_and_recovers() {
    let s = start(config(), 1).await;
    let healthy = Arc::new(AtomicBool::new(true));
    let h = healthy.clone();
    s.readiness.check("postgres", move || {
        let ok = h.load(Ordering::SeqCst);
        async move {
            if ok {
                Ok(())
            } else {
                Err("connection refused (os error 111)")
            }
        }
    });
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    tokio::spawn(keel_server::serve_admin(
        admin,
        s.readiness.clone(),
        AdminRoutes::default(),
        s.shutdown.clone(),
    ));

    let client = ts::http1_client();
    let ready = |c: &hyper_util::client::legacy::Client<_, _>, addr: SocketAddr| {
        let c = c.clone();
        async move {
            ts::get(&c, &format!("http://{addr}/readyz"))
                .await
                .unwrap()
                .0
        }
    };
    let wait_for = |status: u16| {
        let client = client.clone();
        async move {
            let end = Instant::now() + Duration::from_secs(5);
            loop {
                let main = ready(&client, s.addr).await;
                let adm = ready(&client, admin_addr).await;
                if main == status && adm == status {
                    return;
                }
                assert!(
                    Instant::now() < end,
                    "readyz stuck at main={main} admin={adm}, wanted {status}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(200).await;

    healthy.store(false, Ordering::SeqCst);
    wait_for(503).await;
    let (st, body) = ts::get(&client, &format!("http://{}/readyz?verbose", s.addr))
        .await
        .unwrap();
    assert_eq!(st, 503);
    assert!(body.contains("[-]postgres failing"), "{body}");
    assert!(body.contains("connection refused"), "{body}");
    let (_, short) = ts::get(&client, &format!("http://{admin_addr}/readyz"))
        .await
        .unwrap();
    assert!(short.contains("postgres"), "{short}");
    // Liveness is not readiness: the process is alive even while a dependency is down.
    assert_eq!(
        ts::get(&client, &format!("http://{}/livez", s.addr))
            .await
            .unwrap()
            .0,
        200
    );
    assert_eq!(
        ts::get(&client, &format!("http://{admin_addr}/healthz"))
            .await
            .unwrap()
            .0,
        200
    );

    healthy.store(true, Ordering::SeqCst);
    wait_for(200).await;
    let (_, body) = ts::get(&client, &format!("http://{}/readyz?verbose", s.addr))
        .await
        .unwrap();
    assert!(body.contains("[+]postgres ok"), "{body}");

    s.shutdown.advance(Phase::Draining);
    wait_for(503).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_that_ended_before_the_server_stopped_still_reaches_the_client_whole() {
    // The client opens a 64 KiB HTTP/2 window and reads nothing yet: the handler's 200 KB
    // body is handed over whole and ends (nothing in flight), but most of it still waits in
    // the server's send buffer when the server stops — as when a drain's grace period ends
    // on a connection that finished its work but not its writes. Dropping the connection
    // then would cut the response short.
    const LEN: usize = 200_000;
    let shutdown = Shutdown::new();
    let readiness = Readiness::new(ReadinessConfig::default(), shutdown.clone());
    let settings = HttpSettings {
        server: ServerConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            ..ServerConfig::default()
        },
        ..HttpSettings::default()
    };
    let server = Server::bind(&settings, 1, readiness, shutdown.clone()).unwrap();
    let addr = server.local_addr();
    let handle = server.handle();
    let router = Router::new().route(
        "/big",
        get(|| async { axum::body::Body::new(Full::new(Bytes::from(vec![b'x'; LEN]))) }),
    );
    let serving = tokio::spawn(server.serve(router));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .http2_initial_stream_window_size(65_535)
        .http2_initial_connection_window_size(65_535)
        .build_http::<Full<Bytes>>();
    let resp = client
        .request(
            http::Request::get(format!("http://{addr}/big"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The response has ended on the server's side: its body was handed over whole.
    let deadline = Instant::now() + Duration::from_secs(5);
    while handle.stats().in_flight.load(Ordering::SeqCst) != 0 {
        assert!(Instant::now() < deadline, "the response never ended");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    shutdown.advance(Phase::Stopped);
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("the whole body, not a stream cut off by the stop")
        .to_bytes();
    assert_eq!(body.len(), LEN);
    serving.await.unwrap().unwrap();
}

/// Write `bytes`, then read one whole small response (`hello`, `echo`) and return its status.
fn exchange(sock: &mut std::net::TcpStream, bytes: &[u8]) -> Option<u16> {
    use std::io::{Read, Write};
    sock.write_all(bytes).unwrap();
    let mut buf = [0u8; 1024];
    let n = sock.read(&mut buf).unwrap();
    ts::status_of(&buf[..n])
}

#[tokio::test]
async fn idle_http1_connections_park_and_wake_without_losing_a_byte() {
    let mut cfg = config();
    cfg.park_idle_after = keel_config::Duration::from_millis(100);
    let s = start(cfg, 1).await;
    tokio::task::spawn_blocking(move || {
        let addr = s.addr;
        let parked = || s.handle.stats().parked.load(Ordering::Relaxed);
        let settle = || std::thread::sleep(Duration::from_millis(500));
        let get = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
        let connect = || {
            let sock = std::net::TcpStream::connect(addr).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            sock
        };
        // A keep-alive connection parks once idle, and its next request wakes it.
        let mut a = connect();
        assert_eq!(exchange(&mut a, get), Some(200));
        settle();
        assert_eq!(parked(), 1, "idle connection parked");
        assert_eq!(
            exchange(&mut a, get),
            Some(200),
            "woken by its next request"
        );
        settle();
        assert_eq!(parked(), 1, "and parked again");

        // A pipelined head cut short is in hyper's buffer: that connection must not park,
        // and its head completes.
        let mut b = connect();
        assert_eq!(
            exchange(&mut b, b"GET / HTTP/1.1\r\nhost: x\r\n\r\nGET / HT"),
            Some(200)
        );
        settle();
        assert_eq!(
            parked(),
            1,
            "a connection holding part of a head stays as it is"
        );
        assert_eq!(exchange(&mut b, b"TP/1.1\r\nhost: x\r\n\r\n"), Some(200));

        // After a body with Content-Length its end cannot be told: not parked either.
        let mut c = connect();
        assert_eq!(
            exchange(
                &mut c,
                b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello"
            ),
            Some(200)
        );
        settle();
        // `b` has parked meanwhile (its last bytes ended a head); `c` has not.
        assert_eq!(
            parked(),
            2,
            "a connection whose last request had a body stays as it is"
        );
        assert_eq!(exchange(&mut c, get), Some(200));
        settle();
        assert_eq!(parked(), 3, "its next bodiless request lets it park");

        // A connection that has sent nothing parks too, and serves its first request.
        let mut d = connect();
        settle();
        assert_eq!(parked(), 4, "a silent new connection parks");
        assert_eq!(exchange(&mut d, get), Some(200));

        // Every connection still serves.
        for sock in [&mut a, &mut b, &mut c, &mut d] {
            assert_eq!(exchange(sock, get), Some(200));
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn parked_connections_keep_their_timeouts_and_close_at_drain() {
    let mut cfg = config();
    cfg.park_idle_after = keel_config::Duration::from_millis(50);
    cfg.header_read_timeout = keel_config::Duration::from_millis(600);
    cfg.idle_timeout = keel_config::Duration::from_secs(1);
    let s = start(cfg, 1).await;
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let (addr, stats, shutdown) = (s.addr, s.handle.stats(), &s.shutdown);
        let connect = || {
            let sock = std::net::TcpStream::connect(addr).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            sock
        };
        let closed_after = |sock: &mut std::net::TcpStream| {
            let start = Instant::now();
            let mut buf = [0u8; 64];
            assert_eq!(sock.read(&mut buf).unwrap_or(0), 0, "closed, nothing sent");
            start.elapsed()
        };
        // Parked before its first byte: still held to the header timeout from accept.
        let mut silent = connect();
        let waited = closed_after(&mut silent);
        assert!(
            waited >= Duration::from_millis(500) && waited < Duration::from_millis(2500),
            "header timeout while parked: {waited:?}"
        );
        assert_eq!(stats.header_timeouts.load(Ordering::Relaxed), 1);
        // Parked after a request: closed at the idle timeout.
        let mut idle = connect();
        assert_eq!(
            exchange(&mut idle, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"),
            Some(200)
        );
        let waited = closed_after(&mut idle);
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_millis(3000),
            "idle timeout while parked: {waited:?}"
        );
        assert_eq!(
            stats.parked.load(Ordering::Relaxed),
            0,
            "closed, not parked"
        );
        // Parked at a drain: closed at once.
        let mut drained = connect();
        assert_eq!(
            exchange(&mut drained, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"),
            Some(200)
        );
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(stats.parked.load(Ordering::Relaxed), 1);
        shutdown.advance(Phase::Closing);
        let waited = closed_after(&mut drained);
        assert!(
            waited < Duration::from_millis(900),
            "drain closes a parked connection: {waited:?}"
        );
    })
    .await
    .unwrap();
}
