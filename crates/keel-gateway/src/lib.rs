//! Keel's gateway: the decisions a proxy at the edge takes before anything is forwarded.
//!
//! - [`path`]: the request path made safe — dot-segments resolved, escapes that would change
//!   routing refused — so that the path that is authorised, routed and forwarded is one and
//!   the same string.
//! - [`forwarded`]: `Forwarded` / `X-Forwarded-*` written from what the gateway saw,
//!   believed from configured proxies only.
//! - [`ratelimit`]: per-key limits, local or shared by every replica through Redis.
//! - [`route`]: host, path (prefix, exact, template), method and header matches → a
//!   cluster, with the path rewritten; first match wins.
//! - [`stream`]: bodies streamed under a size cap, WebSocket upgrades tunnelled.
//! - `jwt` (feature `jwt`): bearer tokens verified against a JWKS from a file or an http://
//!   URL — RS256 and ES256 only, `exp`/`nbf`/`aud`/`iss` checked, keys cached and refetched
//!   at a bounded rate.
//!
//! - [`proxy`]: all of the above as one configured proxy (`[gateway]` in a service's config).
//!
//! The shop's gateway (`services/shop`) is built on it.

pub mod forwarded;
#[cfg(feature = "jwt")]
pub mod jwt;
pub mod path;
pub mod proxy;
pub mod ratelimit;
pub mod route;
pub mod stream;
