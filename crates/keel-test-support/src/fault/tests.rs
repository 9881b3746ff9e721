//! Tests for the fault proxy over real loopback sockets, against tiny upstreams written here.
//! Timing assertions are lower bounds only; deadlines exist only so a broken proxy fails the
//! test instead of hanging it.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

use super::{Fault, FaultProxy, ProxyStats};

/// How long anything may take before the test calls it broken.
const DEADLINE: Duration = Duration::from_secs(10);

/// An upstream that echoes everything; the counter is the bytes it has received.
async fn echo_upstream() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let mut buf = vec![0; 8192];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    counter.fetch_add(n as u64, Ordering::SeqCst);
                    if s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, received)
}

/// An upstream that writes `greeting`, closes, and reports the instant it closed.
async fn closing_upstream(
    greeting: &'static [u8],
) -> (SocketAddr, mpsc::UnboundedReceiver<Instant>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind closer");
    let addr = listener.local_addr().expect("closer addr");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(greeting).await;
            drop(s);
            let _ = tx.send(Instant::now());
        }
    });
    (addr, rx)
}

async fn connect(proxy: &FaultProxy) -> TcpStream {
    TcpStream::connect(proxy.addr())
        .await
        .expect("connect to proxy")
}

/// Write `msg` and read back exactly as many bytes.
async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.expect("write");
    let mut back = vec![0; msg.len()];
    timeout(DEADLINE, s.read_exact(&mut back))
        .await
        .expect("echo within deadline")
        .expect("read echo");
    back
}

async fn read_to_end(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .expect("end of stream within deadline")?;
    Ok(out)
}

/// Wait (up to the deadline) until the proxy's counters satisfy `f`; connection tasks update
/// some counters after the client has already seen the effect.
async fn eventually(proxy: &FaultProxy, f: impl Fn(&ProxyStats) -> bool) -> ProxyStats {
    let end = Instant::now() + DEADLINE;
    loop {
        let stats = proxy.stats();
        if f(&stats) || Instant::now() > end {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Assert the next read fails with a reset. `ResetOnConnect` also allows a plain EOF: it is what
/// a client would see if setting a zero linger failed and the proxy fell back to closing.
async fn expect_reset(s: &mut TcpStream, allow_eof: bool) {
    let mut buf = [0; 64];
    match timeout(DEADLINE, s.read(&mut buf))
        .await
        .expect("reset within deadline")
    {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Ok(0) if allow_eof => {}
        other => panic!("expected a connection reset, got {other:?}"),
    }
}

#[tokio::test]
async fn none_passes_traffic_and_counts_bytes() {
    let (upstream, _) = echo_upstream().await;
    let proxy = FaultProxy::start(upstream).await.expect("start");
    assert_eq!(proxy.fault(), Fault::None);

    let mut c = connect(&proxy).await;
    assert_eq!(round_trip(&mut c, b"hello keel").await, b"hello keel");
    let stats = proxy.stats();
    assert_eq!((stats.accepted, stats.active), (1, 1));
    assert_eq!((stats.bytes_up, stats.bytes_down), (10, 10));

    drop(c);
    let stats = eventually(&proxy, |s| s.active == 0).await;
    assert_eq!(stats.active, 0);
    assert_eq!(stats.resets, 0);
}

#[tokio::test]
async fn latency_delays_each_direction() {
    let (upstream, _) = echo_upstream().await;
    let proxy = FaultProxy::start(upstream).await.expect("start");
    proxy.set(Fault::Latency(Duration::from_millis(200)));

    let mut c = connect(&proxy).await;
    let started = Instant::now();
    assert_eq!(round_trip(&mut c, b"ping").await, b"ping");
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn reset_on_connect_resets_without_contacting_upstream() {
    let (upstream, received) = echo_upstream().await;
    let proxy = FaultProxy::start(upstream).await.expect("start");
    proxy.set(Fault::ResetOnConnect);

    // The reset can race the client's connect: on a busy runtime the RST arrives before the
    // connect future checks the socket, and the connect itself reports the reset.
    match TcpStream::connect(proxy.addr()).await {
        Ok(mut c) => expect_reset(&mut c, true).await,
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
    }
    assert_eq!(eventually(&proxy, |s| s.resets == 1).await.resets, 1);
    assert_eq!(received.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn reset_after_bytes_forwards_only_the_first_n() {
    let (upstream, received) = echo_upstream().await;
    let proxy = FaultProxy::start(upstream).await.expect("start");
    proxy.set(Fault::ResetAfterBytes(5));

    let mut c = connect(&proxy).await;
    c.write_all(b"0123456789").await.expect("write");
    expect_reset(&mut c, false).await;
    assert!(received.load(Ordering::SeqCst) <= 5);
    let stats = eventually(&proxy, |s| s.resets == 1).await;
    assert_eq!((stats.resets, stats.bytes_up), (1, 5));
}

#[tokio::test]
async fn blackhole_neither_answers_nor_closes() {
    let (upstream, received) = echo_upstream().await;
    let proxy = FaultProxy::start(upstream).await.expect("start");
    proxy.set(Fault::Blackhole);

    let mut c = connect(&proxy).await;
    c.write_all(b"anyone there?").await.expect("write");
    let mut buf = [0; 64];
    let read = timeout(Duration::from_millis(300), c.read(&mut buf)).await;
    assert!(read.is_err(), "expected no data and no close, got {read:?}");
    assert_eq!(received.load(Ordering::SeqCst), 0);
    assert_eq!(proxy.stats().bytes_up, 0);
}

#[tokio::test]
async fn blackhole_on_an_open_connection_swallows_data_until_lifted() {
    let (upstream, _) = echo_upstream().await;
    let proxy = FaultProxy::start(upstream).await.expect("start");
    let mut c = connect(&proxy).await;
    assert_eq!(round_trip(&mut c, b"before").await, b"before");

    proxy.set(Fault::Blackhole);
    c.write_all(b"lost").await.expect("write");
    let mut buf = [0; 64];
    assert!(
        timeout(Duration::from_millis(300), c.read(&mut buf))
            .await
            .is_err()
    );

    proxy.set(Fault::None);
    assert_eq!(round_trip(&mut c, b"after").await, b"after");
}

#[tokio::test]
async fn refuse_closes_the_port_and_none_reopens_it() {
    let (upstream, _) = echo_upstream().await;
    let proxy = FaultProxy::start(upstream).await.expect("start");
    // A connection open across the refusal keeps working and keeps the port in use.
    let mut open = connect(&proxy).await;
    assert_eq!(round_trip(&mut open, b"one").await, b"one");

    proxy.set(Fault::Refuse);
    let err = TcpStream::connect(proxy.addr())
        .await
        .expect_err("connect must be refused");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    assert_eq!(round_trip(&mut open, b"two").await, b"two");

    proxy.set(Fault::None);
    let mut c = connect(&proxy).await;
    assert_eq!(round_trip(&mut c, b"three").await, b"three");
}

#[tokio::test]
async fn bandwidth_limits_throughput() {
    let (upstream, _) = echo_upstream().await;
    let proxy = FaultProxy::start(upstream).await.expect("start");
    proxy.set(Fault::Bandwidth(10_000));

    let mut c = connect(&proxy).await;
    let payload = vec![7u8; 20_000];
    let started = Instant::now();
    let (mut rx, mut tx) = c.split();
    let write = async { tx.write_all(&payload).await.expect("write") };
    let read = async {
        let mut back = vec![0; payload.len()];
        timeout(DEADLINE, rx.read_exact(&mut back))
            .await
            .expect("echo within deadline")
            .expect("read echo");
        back
    };
    let ((), back) = tokio::join!(write, read);
    assert!(back == payload);
    assert!(started.elapsed() >= Duration::from_millis(1500));
}

#[tokio::test]
async fn slow_close_holds_the_client_open_after_upstream_closes() {
    let (upstream, mut closed) = closing_upstream(b"bye").await;
    let proxy = FaultProxy::start(upstream).await.expect("start");
    proxy.set(Fault::SlowClose(Duration::from_millis(300)));

    let mut c = connect(&proxy).await;
    assert_eq!(read_to_end(&mut c).await.expect("clean close"), b"bye");
    let eof_at = Instant::now();
    let upstream_closed_at = closed.recv().await.expect("upstream close time");
    assert!(eof_at.duration_since(upstream_closed_at) >= Duration::from_millis(300));
}

#[tokio::test]
async fn reset_all_resets_open_connections() {
    let (upstream, _) = echo_upstream().await;
    let proxy = FaultProxy::start(upstream).await.expect("start");
    let mut c = connect(&proxy).await;
    assert_eq!(round_trip(&mut c, b"hi").await, b"hi");

    proxy.reset_all();
    expect_reset(&mut c, false).await;
    let stats = eventually(&proxy, |s| s.active == 0).await;
    assert_eq!((stats.resets, stats.active), (1, 0));

    // New connections are unaffected.
    let mut c = connect(&proxy).await;
    assert_eq!(round_trip(&mut c, b"again").await, b"again");
}

#[tokio::test]
async fn set_upstream_redirects_new_connections_only() {
    let (first, _) = echo_upstream().await;
    let (second, _) = closing_upstream(b"second").await;
    let proxy = FaultProxy::start(first).await.expect("start");
    let mut old = connect(&proxy).await;
    assert_eq!(round_trip(&mut old, b"first").await, b"first");

    proxy.set_upstream(second);
    let mut new = connect(&proxy).await;
    assert_eq!(read_to_end(&mut new).await.expect("clean close"), b"second");
    assert_eq!(round_trip(&mut old, b"still first").await, b"still first");
}

#[tokio::test]
async fn dropping_the_proxy_closes_the_listener() {
    let (upstream, _) = echo_upstream().await;
    let proxy = FaultProxy::start(upstream).await.expect("start");
    let addr = proxy.addr();
    let mut c = connect(&proxy).await;
    assert_eq!(round_trip(&mut c, b"x").await, b"x");

    drop(proxy);
    let err = TcpStream::connect(addr)
        .await
        .expect_err("connect must be refused");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    // The open connection is closed too, moments later.
    let mut buf = [0; 8];
    let read = timeout(DEADLINE, c.read(&mut buf))
        .await
        .expect("closed within deadline");
    assert!(matches!(read, Ok(0)) || read.is_err());
}
