//! The server's request path as tower layers, outermost first — the order a request meets
//! them:
//!
//! | layer | answers itself with | keeps until the response ends |
//! |---|---|---|
//! | [`probes`] | `/livez`, `/readyz`, `/healthz` on the main port (before anything else, so a wedged handler cannot fail liveness) | — |
//! | [`headers`] | — (scrubs hop-by-hop headers from every response, advertises `Keep-Alive`) | — |
//! | [`context`] | 400 / `INVALID_ARGUMENT` (malformed propagation header), 504 (deadline passed on arrival) | the request's task scope and task-dump entry |
//! | [`observe`] | — (records every request that got a context: metrics, spans, long polls) | the telemetry record |
//! | [`limits`] | 413 (declared body over the limit); caps the body of the rest | — |
//! | [`admission`] | 503 / `UNAVAILABLE` (shed by the concurrency limit) | the overload slot |
//! | [`deadline`] | 504 / `DEADLINE_EXCEEDED` (handler cut off at the deadline) | — |
//! | [`service`] | 500 (the service returned an error) | — |
//!
//! [`crate::Server`] composes the stack once per listener ([`Layers::stack`]), and each connection
//! clones it once; no layer allocates per request unless it has something to say (a refusal,
//! a request that waits for a slot).
//!
//! Reordering: probes must stay outermost (liveness must not depend on anything inside);
//! the context layer must come before every layer that reads the [`keel_core::Context`]
//! from the request's extensions (observe, admission, deadline); the rest may move.

pub mod admission;
pub mod context;
pub mod deadline;
pub mod headers;
pub mod limits;
pub mod observe;
pub mod probes;
pub mod service;
mod stack;

pub use stack::{Layers, Stack};

use std::task::{Context, Poll};

/// Poll a service that is always ready in practice (every layer here, and routers such as
/// axum's) without a real waker. `false` means it was not ready: the caller falls back to a
/// clone driven by `oneshot`, which waits properly.
pub(crate) fn ready_now<S, R>(svc: &mut S) -> bool
where
    S: tower::Service<R>,
{
    let mut cx = Context::from_waker(std::task::Waker::noop());
    matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(())))
}
