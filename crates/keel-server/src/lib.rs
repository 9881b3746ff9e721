//! Keel's server: everything between a TCP socket and the user's `tower::Service`.
//!
//! - [`listener`]: `SO_REUSEPORT` groups (one socket per runtime shard), `TCP_NODELAY`,
//!   TCP Fast Open, backlog.
//! - [`Server`]: HTTP/1.1 and h2c (prior knowledge) on one port with protocol detection, so
//!   gRPC and plain HTTP share it; limits on header size and count (431), header-read time,
//!   body size (413), idle keep-alive (advertised as `Keep-Alive: timeout=N`), HTTP/2 streams,
//!   pings and reset floods; hop-by-hop headers never leak from handlers.
//! - [`Readiness`]: the started/draining latch plus named dependency checks with cached results.
//! - [`admin`]: the operator's port (`/livez`, `/readyz`, `/healthz`, plus registered routes).
//! - [`drain`]: the graceful shutdown sequence over a [`keel_core::Shutdown`].
//! - [`overload`]: the adaptive concurrency limit and load shedding in front of handlers.
//!
//! - [`layer`]: the request path as tower layers, in the order a request meets them: probes,
//!   response headers, context (and its refusals), observation, limits, admission, deadline,
//!   then the user's service. [`refusal`] holds the answers Keel gives in the handler's place.
//!
//! What the request path costs per request is measured, not claimed: `bench/gate.sh` counts
//! its instructions against bare hyper and axum, and `keel-allocs` its allocations.

pub mod admin;
pub mod body;
pub mod config;
mod conn;
pub mod layer;
pub mod listener;
pub mod overload;
pub mod readiness;
pub mod refusal;
mod rxstamp;
mod server;
mod shared;
mod stats;

pub use admin::{AdminRoutes, serve_admin};
pub use body::{RequestBody, ResponseBody};
pub use config::{
    AdminConfig, DeadlineConfig, HttpSettings, ProbesConfig, PropagationConfig, ReadinessConfig,
    ServerConfig, ShutdownConfig,
};
pub use conn::InFlight;
pub use readiness::{Check, Readiness, Report};
pub use server::{DrainOutcome, Server, ServerHandle, ShardServer, drain, stop_signals};
pub use stats::Stats;
