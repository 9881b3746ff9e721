//! `Context` as an axum extractor: `async fn handler(ctx: keel::Context) { … }`.

use axum::extract::FromRequestParts;
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
        parts
            .extensions
            .get::<Context>()
            .cloned()
            .ok_or(MissingContext)
    }
}
