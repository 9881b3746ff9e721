//! Bodies and connections through the gateway, end to end: a 1 GiB upload and a 1 GiB
//! download streamed through it while the process's memory stays put, the body cap answered
//! with 413, and a WebSocket conversation tunnelled to an upstream, which a drain waits for
//! and cuts when its grace period ends.
#![allow(clippy::unwrap_used)]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::Path;
use axum::routing::{get, post};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use keel_shop::gateway::{self, Settings};
use support::Gateway;

const GIB: u64 = 1 << 30;
const CHUNK: usize = 256 * 1024;
const KEY: &str = "demo-secret-key";

fn settings() -> Settings {
    gateway::settings(
        &Settings::default(),
        gateway::DEMO_KEYS,
        1_000_000.0,
        1_000_000.0,
    )
}

/// The process's peak resident memory so far (`VmHWM`), in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `n` bytes as a stream of shared chunks, made as they are asked for.
fn generated(
    n: u64,
) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>>> {
    StreamBody::new(chunks(n))
}

fn chunks(n: u64) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> {
    let chunk = Bytes::from(vec![b'g'; CHUNK]);
    futures_util::stream::unfold(n, move |left| {
        let chunk = chunk.clone();
        async move {
            (left > 0).then(|| {
                let take = left.min(CHUNK as u64);
                (Ok(Frame::data(chunk.slice(..take as usize))), left - take)
            })
        }
    })
}

/// Counts what it is sent (`POST /users/upload`, 400 if the body broke off) and sends what
/// it is asked for (`GET /users/download/{n}`).
async fn bulk_upstream() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let seen = outcomes.clone();
    let app = Router::new()
        .route(
            "/users/upload",
            post(move |body: axum::body::Body| {
                let seen = seen.clone();
                async move {
                    let mut body = body;
                    let mut n = 0u64;
                    while let Some(frame) = body.frame().await {
                        match frame {
                            Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                            Err(_) => {
                                seen.lock().unwrap().push(format!("broken after {n}"));
                                return (http::StatusCode::BAD_REQUEST, String::new());
                            }
                        }
                    }
                    seen.lock().unwrap().push(format!("complete {n}"));
                    (http::StatusCode::OK, n.to_string())
                }
            }),
        )
        .route(
            "/users/download/{n}",
            get(|Path(n): Path<u64>| async move { axum::body::Body::new(generated(n)) }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, outcomes)
}

/// A hyper HTTP/1.1 connection to the gateway.
async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<axum::body::Body> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

fn unused() -> SocketAddr {
    keel_test_support::free_addr()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_goes_up_and_comes_down_through_the_gateway_in_bounded_memory() {
    let (users, outcomes) = bulk_upstream().await;
    let gw = Gateway::start_with(
        settings(),
        [users, unused(), unused()],
        "max_body_bytes = \"2GiB\"",
    )
    .await;
    let before = peak_rss_kib();

    // Up: no declared length, so nothing but the stream itself tells the gateway its size.
    let mut tx = connect(gw.addr).await;
    let req = http::Request::post("/api/users/upload")
        .header("x-api-key", KEY)
        .body(axum::body::Body::new(generated(GIB)))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let counted = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(counted, GIB.to_string());
    assert_eq!(*outcomes.lock().unwrap(), vec![format!("complete {GIB}")]);

    // Down, on the same connection: kept alive after a streamed upload. hyper's sender takes
    // the next request only once its connection task has finished the previous exchange.
    tx.ready()
        .await
        .expect("the connection stays open after the upload");
    let req = http::Request::get(format!("/api/users/download/{GIB}"))
        .header("x-api-key", KEY)
        .body(axum::body::Body::empty())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        received += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(received, GIB);

    // Client, gateway and upstream all live in this process: had any of them held the body
    // whole, the peak would have grown by a gibibyte.
    let grown_mib = peak_rss_kib().saturating_sub(before) / 1024;
    eprintln!("peak memory grew by {grown_mib} MiB over 2 GiB transferred");
    assert!(grown_mib < 64, "peak memory grew by {grown_mib} MiB");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_cap_is_refused_with_413_declared_or_not() {
    let (users, outcomes) = bulk_upstream().await;
    let gw = Gateway::start_with(
        settings(),
        [users, unused(), unused()],
        "max_body_bytes = \"1MiB\"",
    )
    .await;
    // Declared: refused before anything is forwarded (the head alone is enough).
    let addr = gw.addr;
    let raw = tokio::task::spawn_blocking(move || {
        let head = format!(
            "POST /api/users/upload HTTP/1.1\r\nhost: shop\r\nx-api-key: {KEY}\r\n\
             content-length: {}\r\n\r\n",
            2u64 << 20
        );
        keel_test_support::raw_exchange(addr, head.as_bytes(), std::time::Duration::from_secs(5))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(keel_test_support::status_of(&raw), Some(413));
    assert!(
        outcomes.lock().unwrap().is_empty(),
        "{:?}",
        outcomes.lock().unwrap()
    );

    // Undeclared: cut off as it crosses the cap; the upstream never gets a whole body. The
    // client sends a little over the cap and then waits, so the gateway has read everything
    // sent when it answers (a close with unread bytes would be a reset, not an answer).
    let mut tx = connect(gw.addr).await;
    let over = chunks((1 << 20) + CHUNK as u64).chain(futures_util::stream::pending());
    let req = http::Request::post("/api/users/upload")
        .header("x-api-key", KEY)
        .body(axum::body::Body::new(StreamBody::new(over)))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 413);
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&text).contains("larger than 1048576 bytes"),
        "{text:?}"
    );
    assert!(
        !outcomes
            .lock()
            .unwrap()
            .iter()
            .any(|o| o.starts_with("complete")),
        "{:?}",
        outcomes.lock().unwrap()
    );

    // Within the cap, the same route works.
    let mut tx = connect(gw.addr).await;
    let req = http::Request::post("/api/users/upload")
        .header("x-api-key", KEY)
        .body(axum::body::Body::new(generated(1 << 19)))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    gw.stop().await;
}

use tokio_tungstenite::tungstenite::handshake::server::Request;

/// A WebSocket server that echoes every message, recording the handshake's headers.
async fn echo_upstream() -> (SocketAddr, Arc<Mutex<Vec<http::HeaderMap>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = Arc::new(Mutex::new(Vec::new()));
    let seen = handshakes.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let seen = seen.clone();
            tokio::spawn(async move {
                #[allow(clippy::result_large_err)] // tungstenite's callback signature
                let record = |req: &Request, resp| {
                    seen.lock().unwrap().push(req.headers().clone());
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, record).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        break;
                    }
                    if ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, handshakes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_conversation_is_tunnelled_to_the_upstream() {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let (orders, handshakes) = echo_upstream().await;
    let gw = Gateway::start(settings(), [unused(), orders, unused()]).await;

    let mut req = format!("ws://{}/api/orders/live", gw.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("x-api-key", KEY.parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..20 {
        let text = format!("message {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed, Message::text(text));
    }
    let big = vec![7u8; 200_000];
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(big));
    ws.close(None).await.unwrap();

    // The upstream saw the gateway's request: the routed path, the identity it vouches for,
    // and none of the client's credentials.
    {
        let seen = handshakes.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0]["x-shop-key"], "demo");
        assert!(seen[0].get("x-api-key").is_none());
        assert!(seen[0].get("traceparent").is_some());
    }

    // Without a key the handshake is refused like any request, and nothing is tunnelled.
    let req = format!("ws://{}/api/orders/live", gw.addr)
        .into_client_request()
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    match tokio_tungstenite::client_async(req, tcp).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("expected 401, got {other:?}"),
    }
    assert_eq!(handshakes.lock().unwrap().len(), 1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_where_nothing_moves_is_closed_after_its_idle_timeout() {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let (orders, _) = echo_upstream().await;
    let mut s = settings();
    s.tunnel_idle_timeout = keel::conf::Duration::from(std::time::Duration::from_secs(1));
    let gw = Gateway::start(s, [unused(), orders, unused()]).await;
    let mut req = format!("ws://{}/api/orders/live", gw.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("x-api-key", KEY.parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    // Traffic keeps it open past the timeout...
    for _ in 0..4 {
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        ws.send(Message::text("tick")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("tick"));
    }
    // ...silence closes it: the next read ends instead of waiting forever.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
        .await
        .expect("the idle tunnel was closed");
    assert!(!matches!(ended, Some(Ok(Message::Text(_)))), "{ended:?}");
    gw.stop().await;
}

/// A WebSocket handshake through the gateway to `addr`'s orders route, and one echoed message.
async fn open_tunnel(
    addr: SocketAddr,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}/api/orders/live")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("x-api-key", KEY.parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    ws
}

/// `[shutdown]` with no drain delay and `grace`.
fn drain_in(grace: &str) -> String {
    format!("\n[shutdown]\ndrain_delay = \"0s\"\ngrace_period = \"{grace}\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_waits_for_an_open_tunnel_and_ends_when_it_closes() {
    use tokio_tungstenite::tungstenite::Message;

    let (orders, _) = echo_upstream().await;
    let mut gw =
        Gateway::start_with(settings(), [unused(), orders, unused()], &drain_in("60s")).await;
    let mut ws = open_tunnel(gw.addr).await;
    gw.signal_stop();
    // The listeners close (the drain is past its delay)...
    let addr = gw.addr;
    assert!(
        keel_test_support::wait_until(std::time::Duration::from_secs(10), || {
            !keel_test_support::port_open(addr)
        }),
        "the listeners closed"
    );
    // ...but the tunnel is in-flight work: it still carries messages, and the drain is not
    // over while it is open (its connection has left the server; the tunnel's own guard is
    // what the drain waits for).
    for i in 0..5 {
        let text = format!("during the drain {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
    }
    assert!(!gw.drained(), "the drain ended with a tunnel still open");
    let (status, body) = keel_test_support::get(
        &keel_test_support::http1_client(),
        &format!("http://{}/debug/server", gw.admin),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let server: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(server["held"], 1, "{server}");
    let (_, metrics) = keel_test_support::get(
        &keel_test_support::http1_client(),
        &format!("http://{}/metrics", gw.admin),
    )
    .await
    .unwrap();
    assert!(
        metrics.lines().any(|l| l == "keel_server_held 1"),
        "the open tunnel is the held gauge's: {}",
        metrics
            .lines()
            .filter(|l| l.contains("held"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The client closes and goes: the drain ends well inside its 60 s grace period.
    ws.close(None).await.unwrap();
    drop(ws);
    gw.wait_drained(std::time::Duration::from_secs(20))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_still_open_when_the_grace_period_ends_is_cut() {
    let (orders, _) = echo_upstream().await;
    let mut gw =
        Gateway::start_with(settings(), [unused(), orders, unused()], &drain_in("1s")).await;
    let mut ws = open_tunnel(gw.addr).await;
    gw.signal_stop();
    gw.wait_drained(std::time::Duration::from_secs(20))
        .await
        .unwrap();
    // The process would exit now; the tunnel is cut rather than left running, so the
    // client's next read ends instead of waiting for a message.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
        .await
        .expect("the tunnel was cut when the grace period ended");
    assert!(
        !matches!(
            ended,
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(_)))
        ),
        "{ended:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_over_http2_is_tunnelled_to_an_http1_upstream() {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;

    let (orders, handshakes) = echo_upstream().await;
    let gw = Gateway::start(settings(), [unused(), orders, unused()]).await;
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let connect = || {
        let mut req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("http://{}/api/orders/live", gw.addr))
            .header("x-api-key", KEY)
            .header("sec-websocket-version", "13")
            .body(axum::body::Body::empty())
            .unwrap();
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        req
    };
    // The client may only send `:protocol` once the server's SETTINGS allowed it; they come
    // with the connection's first exchange.
    h2.ready().await.unwrap();
    let mut resp = h2.send_request(connect()).await;
    for _ in 0..50 {
        if resp.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        resp = h2.send_request(connect()).await;
    }
    let resp = resp.expect("the gateway accepts an extended CONNECT");
    assert_eq!(resp.status(), 200, "RFC 8441: a 200 opens the tunnel");
    assert!(resp.headers().get("sec-websocket-accept").is_none());
    let stream = hyper::upgrade::on(resp).await.unwrap();
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(stream),
        Role::Client,
        None,
    )
    .await;
    for i in 0..10 {
        let text = format!("over h2 {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
    }
    ws.close(None).await.unwrap();
    // The upstream saw an HTTP/1.1 handshake made by the gateway: a key, the version, the
    // identity it vouches for, and none of the client's credentials.
    let seen = handshakes.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["sec-websocket-key"].len(), 24);
    assert_eq!(seen[0]["sec-websocket-version"], "13");
    assert_eq!(seen[0]["x-shop-key"], "demo");
    assert!(seen[0].get("x-api-key").is_none());

    // Without a key the CONNECT is refused like any request, and nothing is tunnelled.
    let mut anonymous = connect();
    anonymous.headers_mut().remove("x-api-key");
    let resp = h2.send_request(anonymous).await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(handshakes.lock().unwrap().len(), 1);
    drop((ws, h2));
    gw.stop().await;
}
