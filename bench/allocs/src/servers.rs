//! The three systems, each served on its own thread by a tokio current-thread runtime whose
//! thread counts its allocations into its own slot.
//!
//! - `hyper`: hyper-util's auto (HTTP/1.1 + h2c) connection builder and a `service_fn`, as
//!   `crates/keel-server/examples/bare_hyper.rs` writes the physical-limit peer.
//! - `axum`: the same connection builder serving an axum `Router` with the same routes
//!   (`bare_hyper.rs --axum`, plus `/echo` so the echo scenario has a peer too).
//! - `keel`: the example service's routes (`examples/hello`) served by `keel::App` with the
//!   default config `hello` runs with — probes, deadlines, metrics, tracing's default sampling,
//!   overload protection, the admin port, the leak sweep — except for the addresses, one
//!   listener (one runtime thread, as BENCH.md asks of every system) and logs at warn.
//!   `KEEL_*` variables in the environment apply, so other settings can be compared.

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::sync::oneshot;

use crate::counter;

/// The body of `GET /` on every system.
pub(crate) const HELLO: &[u8] = b"hello from keel\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum System {
    Hyper,
    Axum,
    Keel,
}

impl System {
    pub(crate) fn name(self) -> &'static str {
        match self {
            System::Hyper => "hyper",
            System::Axum => "axum",
            System::Keel => "keel",
        }
    }

    /// The counter slot of this system's server thread.
    pub(crate) fn slot(self) -> u8 {
        match self {
            System::Hyper => 1,
            System::Axum => 2,
            System::Keel => 3,
        }
    }
}

/// A system being served.
#[derive(Debug)]
pub(crate) struct Running {
    pub(crate) addr: SocketAddr,
    /// Stops the accept loop of a peer. Keel is left running until the process exits: its
    /// drain waits out `shutdown.drain_delay`, and nothing is measured after it anyway.
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl Running {
    pub(crate) fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

pub(crate) fn start(system: System) -> Result<Running, String> {
    let slot = system.slot();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (addr, body): (SocketAddr, Box<dyn FnOnce() -> Result<(), String> + Send>) = match system {
        System::Hyper | System::Axum => {
            // Bound here, so the port is known and taken before the thread starts.
            let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            l.set_nonblocking(true).map_err(|e| e.to_string())?;
            let addr = l.local_addr().map_err(|e| e.to_string())?;
            let use_axum = system == System::Axum;
            (
                addr,
                Box::new(move || runtime()?.block_on(serve_peer(l, use_axum, stop_rx))),
            )
        }
        System::Keel => {
            let addr = free_addr()?;
            let admin = free_addr()?;
            (
                addr,
                Box::new(move || {
                    drop(stop_rx);
                    runtime()?.block_on(Box::pin(serve_keel(addr, admin)))
                }),
            )
        }
    };
    let thread = std::thread::Builder::new()
        .name(format!("allocs-{}", system.name()))
        .spawn(move || {
            counter::count_this_thread(slot);
            body()
        })
        .map_err(|e| e.to_string())?;
    let mut running = Running {
        addr,
        stop: (system != System::Keel).then_some(stop_tx),
        thread: Some(thread),
    };
    wait_listening(&mut running, system)?;
    Ok(running)
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build the runtime: {e}"))
}

/// A port that was free a moment ago (Keel binds its own sockets from config).
fn free_addr() -> Result<SocketAddr, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))
}

fn wait_listening(r: &mut Running, system: System) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if TcpStream::connect(r.addr).is_ok() {
            return Ok(());
        }
        if r.thread.as_ref().is_some_and(|t| t.is_finished()) {
            let why = match r.thread.take().map(|t| t.join()) {
                Some(Ok(Err(e))) => e,
                _ => "its thread ended".into(),
            };
            return Err(format!("{} did not start: {why}", system.name()));
        }
        if Instant::now() > deadline {
            return Err(format!("{} is not listening on {}", system.name(), r.addr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn serve_peer(
    l: TcpListener,
    use_axum: bool,
    mut stop: oneshot::Receiver<()>,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::from_std(l).map_err(|e| e.to_string())?;
    let router = axum::Router::new()
        .route("/", axum::routing::get(|| async { HELLO }))
        .route(
            "/echo",
            axum::routing::post(|body: Bytes| async move { body }),
        )
        // Handlers turned into routes once, as `axum::serve` does.
        .with_state(());
    loop {
        let stream = tokio::select! {
            r = listener.accept() => r.map_err(|e| e.to_string())?.0,
            _ = &mut stop => return Ok(()),
        };
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let io = TokioIo::new(stream);
        if use_axum {
            let svc = hyper_util::service::TowerToHyperService::new(router.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(io, svc)
                    .await;
            });
        } else {
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(io, hyper::service::service_fn(bare))
                    .await;
            });
        }
    }
}

/// bare_hyper.rs's handler: `POST /echo` answers with the request body, anything else with
/// the example service's `GET /` bytes.
async fn bare(
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    if req.method() == http::Method::POST && req.uri().path() == "/echo" {
        let body = http_body_util::BodyExt::collect(req.into_body())
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let mut r = http::Response::new(Full::new(body));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/octet-stream"),
        );
        return Ok(r);
    }
    let mut r = http::Response::new(Full::new(Bytes::from_static(HELLO)));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(r)
}

async fn serve_keel(addr: SocketAddr, admin: SocketAddr) -> Result<(), String> {
    // The process environment first, so `KEEL_*` variables can try other settings; then what
    // this tool needs: its ports and one listener on this one thread. (Logs are set up at
    // warn by main, as `keel::run` would set them up from `[log]`.)
    let env = std::env::vars().chain([
        ("KEEL_SERVER__ADDR".to_string(), addr.to_string()),
        ("KEEL_ADMIN__ADDR".to_string(), admin.to_string()),
        ("KEEL_SERVER__LISTENERS".to_string(), "1".to_string()),
    ]);
    let loaded = keel::Sources::default()
        .load_with_env(env)
        .map_err(|e| format!("invalid configuration: {e}"))?;
    let sizing = keel::runtime::detect(&loaded.value.runtime);
    if !sizing.shards.is_empty() {
        // Shards serve on threads of their own, which this thread's flag does not cover.
        return Err("runtime.shards must be off for this tool".into());
    }
    let app = keel::App::new("hello", loaded, sizing);
    // As examples/hello's main does: a dependency check shows up in /readyz?verbose.
    app.readiness()
        .check("self", || async { Ok::<(), String>(()) });
    app.serve_until(
        keel_example_hello::routes(),
        std::future::pending(),
        std::future::pending(),
    )
    .await
    .map_err(|e| e.to_string())
}
