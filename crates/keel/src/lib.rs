//! Keel: a Rust chassis for cloud-native microservices.
//!
//! A service is a `tower::Service` — a [`Router`] (axum's, recording its route templates so
//! requests are labelled by them without a layer on every route), a plain axum `Router`,
//! tonic routes merged into one; Keel supplies the rest — layered config, runtime sizing from the cgroup quota, `SO_REUSEPORT`
//! listeners, HTTP/1 + h2c + gRPC on one port with limits, probes with dependency checks, an
//! admin port, and a graceful drain.
//!
//! ```no_run
//! use axum::routing::get;
//! use keel::Router;
//!
//! fn main() -> std::process::ExitCode {
//!     keel::run("hello", |app| async move {
//!         app.readiness().check("self", || async { Ok::<(), String>(()) });
//!         app.serve(Router::new().route("/", get(|| async { "hi\n" }))).await
//!     })
//! }
//! ```
//! (The example above needs `axum` as a dependency of your crate.)

mod app;
pub mod config;
mod logging;
mod messaging_wiring;
pub mod routes;
mod wiring;

pub use app::{App, Error, run, run_with};
pub use config::{Config, LogConfig, LogFormat, Sources, TasksConfig};
pub use keel_client as client;
pub use keel_config as conf;
pub use keel_core::context::{self, Context};
pub use keel_core::{BoxError, Phase, Shutdown};
pub use keel_core::{codec, propagation, tasks};
pub use keel_messaging as messaging;
pub use keel_runtime as runtime;
pub use keel_server as server;
pub use keel_server::{Readiness, RequestBody};
pub use keel_telemetry as telemetry;
pub use routes::Router;

/// `Result` with Keel's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
