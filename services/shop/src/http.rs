//! What the shop's HTTP handlers share: JSON errors, and calls through Keel's client.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::json;

/// A JSON error answer: `{"error": message}` with `status`.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// GET `path` through `client` on behalf of the request `ctx`; the status and body, or the
/// transport error.
pub async fn get(
    ctx: &keel::Context,
    client: &keel::client::client::Client,
    path: &str,
) -> Result<(StatusCode, Bytes), keel::BoxError> {
    let req = http::Request::get(path).body(Bytes::new())?;
    let resp = client.call(ctx, req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// Tag every answer with `x-shop-instance: name` (which copy of a service answered: the
/// gateway's colour routing is visible from outside). A proxied answer keeps the upstream's
/// tag: it says who really answered.
pub fn tag_instance(router: impl Into<keel::Router>, name: String) -> keel::Router {
    let value = http::HeaderValue::from_str(&name)
        .unwrap_or_else(|_| http::HeaderValue::from_static("invalid-instance-name"));
    router
        .into()
        .response_header(http::HeaderName::from_static("x-shop-instance"), value)
}
