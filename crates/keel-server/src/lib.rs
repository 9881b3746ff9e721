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
//! Hot-path claim: per request, Keel adds the probe path check, one atomic increment and
//! decrement on the connection and server counters, and the hop-by-hop scrub — no allocation.

pub mod admin;
pub mod config;
mod conn;
mod context;
pub mod listener;
pub mod overload;
pub mod readiness;
mod server;
mod service;
mod shared;

pub use admin::{AdminRoutes, serve_admin};
pub use config::{
    AdminConfig, DeadlineConfig, ProbesConfig, PropagationConfig, ReadinessConfig, ServerConfig,
    ShutdownConfig,
};
pub use readiness::{Check, Readiness, Report};
pub use server::{
    DrainOutcome, HttpSettings, Server, ServerHandle, ShardServer, drain, stop_signals,
};
pub use service::{RequestBody, ResponseBody, TrackedBody};
pub use shared::Stats;
