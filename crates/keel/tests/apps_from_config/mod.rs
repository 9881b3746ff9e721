//! Apps for tests, built from a TOML snippet the way a service is built from its file, and
//! served on the test's runtime until the test ends.
#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use keel::{App, Sources};
use keel_test_support as ts;

/// An app named `t` from `toml`, written to a file of its own in `dir`.
pub fn app_from(toml: &str, dir: &Path) -> App {
    let file = dir.join(format!("{}.toml", ts::free_addr().port()));
    std::fs::write(&file, toml).unwrap();
    let sources = Sources {
        file: Some(file),
        sets: vec![],
    };
    let loaded = sources.load_with_env(Vec::new()).unwrap();
    let sizing = keel::runtime::detect(&loaded.value.runtime);
    App::new("t", loaded, sizing)
}

/// Serve `router` on `app` in the background; returns once every address in `addrs` accepts
/// connections.
pub async fn start(app: App, router: axum::Router, addrs: &[SocketAddr]) {
    tokio::spawn(app.serve_until(router, std::future::pending(), std::future::pending()));
    let waiting = addrs.to_vec();
    let up = tokio::task::spawn_blocking(move || {
        ts::wait_until(Duration::from_secs(10), || {
            waiting.iter().all(|a| ts::port_open(*a))
        })
    })
    .await
    .unwrap();
    assert!(up, "the app did not start listening on {addrs:?}");
}
