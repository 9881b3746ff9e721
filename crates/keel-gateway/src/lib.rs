//! Keel's gateway: the decisions a proxy at the edge takes before anything is forwarded.
//!
//! - [`path`]: the request path made safe — dot-segments resolved, escapes that would change
//!   routing refused — so that the path that is authorised, routed and forwarded is one and
//!   the same string.
//! - [`forwarded`]: `Forwarded` / `X-Forwarded-*` written from what the gateway saw,
//!   believed from configured proxies only.
//! - [`ratelimit`]: per-key limits, local or shared by every replica through Redis.
//! - [`stream`]: bodies streamed under a size cap, WebSocket upgrades tunnelled.
//!
//! The shop's gateway (`services/shop`) is built on it.

pub mod forwarded;
pub mod path;
pub mod ratelimit;
pub mod stream;
