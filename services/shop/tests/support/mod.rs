//! What the gateway tests share: a real gateway (the shop's, on a Keel `App`) in front of
//! three upstreams, on free ports.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::{HeaderMap, Uri};
use keel::{App, Sources};
use keel_shop::gateway::{self, Settings};

/// A gateway in front of the three upstreams, with `settings`.
pub(crate) struct Gateway {
    pub(crate) addr: SocketAddr,
    pub(crate) admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<Result<(), keel::Error>>,
    _dir: tempfile::TempDir,
}

impl Gateway {
    pub(crate) async fn start(settings: Settings, upstreams: [SocketAddr; 3]) -> Gateway {
        Gateway::start_with(settings, upstreams, "").await
    }

    /// With `server` appended to the `[server]` table (TOML lines).
    pub(crate) async fn start_with(
        settings: Settings,
        [users, orders, inventory]: [SocketAddr; 3],
        server: &str,
    ) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let addr = keel_test_support::free_addr();
        let admin = keel_test_support::free_addr();
        let file = dir.path().join("gateway.toml");
        std::fs::write(
            &file,
            format!(
                "[server]\naddr = \"{addr}\"\n{server}\n[admin]\naddr = \"{}\"\n\n\
                 [clients.user]\nendpoints = [\"{users}\"]\n\n\
                 [clients.order]\nendpoints = [\"{orders}\"]\n\n\
                 [clients.inventory]\nendpoints = [\"{inventory}\"]\n",
                admin
            ),
        )
        .unwrap();
        let loaded = Sources {
            file: Some(file),
            sets: Vec::new(),
        }
        .load_with_env(Vec::new())
        .unwrap();
        let sizing = keel::runtime::detect(&loaded.value.runtime);
        let app = App::new("gateway", loaded, sizing);
        let router = gateway::router(&app, settings).await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(app.serve_until(
            router,
            async move {
                let _ = stopped.await;
            },
            std::future::pending(),
        ));
        assert!(
            keel_test_support::wait_until(Duration::from_secs(20), || {
                keel_test_support::port_open(addr)
            }),
            "the gateway did not start"
        );
        Gateway {
            addr,
            admin,
            stop: Some(stop),
            served,
            _dir: dir,
        }
    }

    pub(crate) async fn stop(mut self) {
        self.signal_stop();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.served).await;
    }

    /// Start the drain (as a SIGTERM would) without waiting for it.
    pub(crate) fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Whether the App has returned from its drain.
    pub(crate) fn drained(&self) -> bool {
        self.served.is_finished()
    }

    /// Wait (at most `within`) for the App to return from its drain.
    pub(crate) async fn wait_drained(self, within: Duration) -> Result<(), keel::Error> {
        tokio::time::timeout(within, self.served)
            .await
            .expect("the drain ended in time")
            .expect("the App's task did not panic")
    }
}

/// What a recording upstream saw: each request's path and headers.
pub(crate) type Seen = Arc<Mutex<Vec<(String, HeaderMap)>>>;

/// An upstream that answers 200 to everything and records the path and headers of each
/// request.
pub(crate) async fn recording_upstream() -> (SocketAddr, Seen) {
    let seen = Seen::default();
    let log = seen.clone();
    let app = Router::new().fallback(move |uri: Uri, headers: HeaderMap| {
        let log = log.clone();
        async move {
            log.lock().unwrap().push((uri.path().to_string(), headers));
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}
