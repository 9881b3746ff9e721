//! `Context` as an axum extractor: `async fn handler(ctx: keel::Context) { … }`.

use axum::extract::{FromRequestParts, MatchedPath};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::request::Parts;

use crate::context::Context;

/// The request did not come through a Keel server, so it has no context. A programming
/// error (a router served by something else), hence 500 rather than a client error.
#[derive(Debug, Clone, Copy)]
pub struct MissingContext;

impl IntoResponse for MissingContext {
    fn into_response(self) -> Response {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "keel::Context missing: this router is not being served by a Keel server\n",
        )
            .into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Context {
    type Rejection = MissingContext;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        // Handing out the context is also the moment to tell telemetry the matched route
        // template, so handlers that take a `Context` get `/orders/{id}` labels for free.
        if let (Some(cell), Some(path)) = (
            parts.extensions.get::<crate::observe::RouteCell>(),
            parts.extensions.get::<MatchedPath>(),
        ) {
            cell.set(path.as_str());
        }
        parts
            .extensions
            .get::<Context>()
            .cloned()
            .ok_or(MissingContext)
    }
}
