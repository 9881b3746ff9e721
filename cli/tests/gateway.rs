//! `keel gateway` as a user runs it: a config file with routes, the proxy in front of an
//! upstream, and a config mistake refused at start with the key that is wrong.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

use keel_test_support::{ChildGuard, raw_exchange, status_of};

const KEEL: &str = env!("CARGO_BIN_EXE_keel");

/// An upstream that answers every request with its request line, on its own thread.
fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut first = String::new();
            if reader.read_line(&mut first).is_err() {
                continue;
            }
            let mut headers = Vec::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                headers.push(line.trim().to_ascii_lowercase());
            }
            let key = headers
                .iter()
                .find_map(|h| h.strip_prefix("x-gateway-key: "))
                .unwrap_or("-")
                .to_string();
            let timeout = headers
                .iter()
                .find_map(|h| h.strip_prefix("keel-timeout: "))
                .unwrap_or("-")
                .to_string();
            let body = format!("{} key={key} timeout={timeout}", first.trim());
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

/// A listener that accepts and never answers (the backlog holds its connections).
fn stuck_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::mem::forget(listener);
    addr
}

/// The time in a `keel-timeout` value echoed back (`timeout=249000u`), in milliseconds.
fn millis(body: &str) -> u64 {
    let v = body.rsplit("timeout=").next().unwrap().trim();
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().unwrap();
    match unit {
        "n" => n / 1_000_000,
        "u" => n / 1_000,
        "m" => n,
        "S" => n * 1_000,
        "M" => n * 60_000,
        other => panic!("unit {other} in {body}"),
    }
}

fn config(addr: SocketAddr, admin: SocketAddr, upstream: SocketAddr, routes: &str) -> String {
    format!(
        "[server]\naddr = \"{addr}\"\n\n[admin]\naddr = \"{admin}\"\n\n\
         [clients.echo]\nendpoints = [\"{upstream}\"]\n\n\
         [clients.stuck]\nendpoints = [\"{}\"]\n\n\
         [gateway]\napi_keys = \"ops:ops-secret-key=echo:read\"\n\n{routes}",
        stuck_upstream()
    )
}

fn get(addr: SocketAddr, path: &str, key: Option<&str>) -> (u16, String) {
    let key = key.map_or(String::new(), |k| format!("x-api-key: {k}\r\n"));
    let req = format!("GET {path} HTTP/1.1\r\nhost: gw\r\n{key}connection: close\r\n\r\n");
    let raw = raw_exchange(addr, req.as_bytes(), Duration::from_secs(5)).unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status_of(&raw).unwrap(), body)
}

#[test]
fn the_gateway_proxies_what_its_config_routes_and_nothing_else() {
    let upstream = echo_upstream();
    let addr = keel_test_support::free_addr();
    let admin = keel_test_support::free_addr();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        config(
            addr,
            admin,
            upstream,
            "[[gateway.routes]]\nprefix = \"/echo\"\nrewrite = \"/v1\"\ncluster = \"echo\"\nscope = \"echo\"\n\n\
             [[gateway.routes]]\nexact = \"/open\"\ncluster = \"echo\"\npublic = true\n\n\
             [[gateway.routes]]\nexact = \"/quick\"\ncluster = \"echo\"\npublic = true\ntimeout = \"250ms\"\n\n\
             [[gateway.routes]]\nexact = \"/stuck\"\ncluster = \"stuck\"\npublic = true\ntimeout = \"300ms\"\n",
        ),
    )
    .unwrap();
    let _gw = ChildGuard::spawn(KEEL, &["gateway", "--config", file.to_str().unwrap()], &[]);
    assert!(
        keel_test_support::wait_until(Duration::from_secs(20), || keel_test_support::port_open(
            addr
        )),
        "keel gateway did not start"
    );
    let (status, body) = get(addr, "/echo/a/../b?x=1", Some("ops-secret-key"));
    assert_eq!(status, 200);
    assert!(
        body.starts_with("GET /v1/b?x=1 HTTP/1.1 key=ops timeout="),
        "{body}"
    );
    // Without a route timeout the request's own deadline (30 s by default) travels on.
    assert!(millis(&body) > 25_000, "{body}");
    assert_eq!(get(addr, "/echo/b", None).0, 401);
    assert_eq!(get(addr, "/echo/b", Some("wrong-secret-key")).0, 401);
    assert_eq!(get(addr, "/echoes", Some("ops-secret-key")).0, 404);
    let (status, body) = get(addr, "/open", None);
    assert_eq!(status, 200);
    assert!(
        body.starts_with("GET /open HTTP/1.1 key=- timeout="),
        "{body}"
    );
    // Past the default burst of 200: a public route has no credential to be counted by, so
    // no caller is refused for others' traffic.
    for _ in 0..250 {
        assert_eq!(get(addr, "/open", None).0, 200);
    }
    // A route's timeout is the deadline the upstream is told of...
    let (status, body) = get(addr, "/quick", None);
    assert_eq!(status, 200);
    assert!(millis(&body) <= 250, "{body}");
    // ...and the gateway's own: an upstream that never answers gets 504 at it.
    assert_eq!(get(addr, "/stuck", None).0, 504);
    assert_eq!(get(addr, "/echo/%2e%2e/x", Some("ops-secret-key")).0, 400);
}

#[test]
fn a_bad_route_stops_the_gateway_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    let free = keel_test_support::free_addr;
    std::fs::write(
        &file,
        config(
            free(),
            free(),
            free(),
            "[[gateway.routes]]\nprefix = \"/a/../b\"\ncluster = \"echo\"\n",
        ),
    )
    .unwrap();
    let out = Command::new(KEEL)
        .args(["gateway", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("gateway.routes[0].prefix"), "{stderr}");
    assert!(stderr.contains("normalised"), "{stderr}");

    std::fs::write(&file, config(free(), free(), free(), "")).unwrap();
    let out = Command::new(KEEL)
        .args(["gateway", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("gateway.routes is empty"), "{stderr}");
}

/// gRPC through the gateway over HTTP/2 both ways: a unary call, and a server stream whose
/// messages arrive one by one as the upstream sends them (nothing waits for the stream's
/// end), trailers and all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_server_streams_pass_through_the_gateway() {
    use tonic_health::ServingStatus;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus as Status;
    use tonic_health::pb::health_client::HealthClient;

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("shop.Orders", ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let addr = keel_test_support::free_addr();
    let admin = keel_test_support::free_addr();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        format!(
            "[server]\naddr = \"{addr}\"\n\n[admin]\naddr = \"{admin}\"\n\n\
             [clients.health]\nendpoints = [\"{upstream}\"]\nprotocol = \"h2c\"\n\n\
             [deadline.routes]\n\"/grpc.health.v1.Health/Watch\" = \"0s\"\n\n\
             [[gateway.routes]]\nprefix = \"/grpc.health.v1.Health\"\ncluster = \"health\"\n\
             public = true\nheaders = {{ \"content-type\" = \"application/grpc\" }}\n"
        ),
    )
    .unwrap();
    let _gw = ChildGuard::spawn(KEEL, &["gateway", "--config", file.to_str().unwrap()], &[]);
    assert!(
        keel_test_support::wait_until(Duration::from_secs(20), || keel_test_support::port_open(
            addr
        )),
        "keel gateway did not start"
    );
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = HealthClient::new(channel);
    let asked = |service: &str| HealthCheckRequest {
        service: service.to_string(),
    };
    let status = grpc
        .check(asked("shop.Orders"))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, Status::Serving as i32);
    // A gRPC error travels in trailers, through the gateway untouched.
    let err = grpc.check(asked("shop.Nothing")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    let mut watch = grpc.watch(asked("shop.Orders")).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, Status::Serving as i32);
    // The next message exists only after this change: it can only arrive if the gateway
    // passes the stream on as it flows.
    reporter
        .set_service_status("shop.Orders", ServingStatus::NotServing)
        .await;
    let second = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the second message came through while the stream was open")
        .unwrap()
        .unwrap();
    assert_eq!(second.status, Status::NotServing as i32);
}
