//! Keel's outbound client. This crate grows in layers; what is here now are the *policies* —
//! pure, deterministic decision logic with no I/O, each tested with paused time:
//!
//! - [`breaker`]: Google SRE adaptive throttling (client-side rejection probability from
//!   requests vs. accepts over a sliding window).
//! - [`retry`]: which failures are safe to retry, jittered exponential backoff, and a retry
//!   budget (a share of recent requests, with a floor) so retries cannot multiply an outage.
//! - [`endpoint`]: endpoints (address, priority, locality, labels), immutable endpoint sets
//!   published through a watch so discovery backends plug in, colour subsets with fallback.
//! - [`balance`]: power of two choices over peak-EWMA latency × (in-flight + 1), with a penalty
//!   for recent failures and `Retry-After`.
//! - [`outlier`]: Envoy-style consecutive-failure ejection with growing ejection times and a cap
//!   on the share of endpoints ejected at once.
//! - [`priority`]: Envoy-style priority spill-over (overprovisioning factor 1.4) and panic
//!   threshold across clusters/localities.
//! - [`upstream`]: the composition — colour subset → ejection-aware priority level → P2C —
//!   and outcome reporting back into the policies.
//!
//! [`client`] applies them to real calls over per-endpoint pools (HTTP/1.1 whose idle timeout
//! follows the server's advertised keep-alive, h2c that opens another connection at the
//! server's stream limit), on behalf of a request: [`client::Client::call`] takes the
//! request's [`keel_core::Context`] and propagates its deadline and trace; a call that finds
//! no context is counted and logged, never silently given a fresh one. [`client::Service`]
//! runs generated tonic clients over it. [`config`] is the `[clients.<name>]` section that
//! builds one, with the service's `[propagation]` margin and B3 format passed in.

pub mod balance;
pub mod body;
pub mod breaker;
pub mod client;
pub mod config;
pub mod endpoint;
pub mod outlier;
pub mod pool;
pub mod priority;
pub mod retry;
pub mod sockets;
pub mod upstream;
mod window;
