//! The user service: create and read users (HTTP/JSON, SQLite).
//!
//! - `POST /users {"name", "email"}` → 201 with the user; 400 for a malformed body, 422 for
//!   an empty name or an email without `@`, 409 when the email is taken.
//! - `GET /users/{id}` → 200 with the user, 404.
//! - `GET /users/whoami` → the identity the gateway vouched for.

use crate::db::Db;
use crate::with_db;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use keel::BoxError;
use keel::Router;
use serde::{Deserialize, Serialize};

use crate::http::error;

const MIGRATIONS: &[&str] = &["CREATE TABLE users (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        email TEXT NOT NULL UNIQUE,
        created_at BIGINT NOT NULL
    )"];

/// A user as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct User {
    /// `usr_…`.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Unique.
    pub email: String,
}

#[derive(Debug, Deserialize)]
struct NewUser {
    name: String,
    email: String,
}

/// The user service on `db`: migrations, the store's readiness check, the routes.
pub async fn router(app: &keel::App, db: Db) -> Result<Router, BoxError> {
    crate::db::migrate(&db, "user", MIGRATIONS).await?;
    crate::db::check_readiness(app, &db);
    Ok(Router::new()
        .route("/users", post(create))
        .route("/users/{id}", get(read))
        .route("/users/whoami", get(whoami))
        .with_state(db))
}

async fn create(State(db): State<Db>, body: axum::body::Bytes) -> Response {
    let Ok(new) = serde_json::from_slice::<NewUser>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected a JSON object {\"name\": string, \"email\": string}",
        );
    };
    let name = new.name.trim();
    let email = new.email.trim().to_ascii_lowercase();
    if name.is_empty() || name.len() > 200 {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "name must be 1 to 200 characters",
        );
    }
    if !email.contains('@') || email.len() > 320 {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "email must contain @");
    }
    let user = User {
        id: crate::db::new_id("usr"),
        name: name.to_string(),
        email,
    };
    let inserted = with_db!(&db, |pool, sql| {
        sqlx::query(sql(
            "INSERT INTO users (id, name, email, created_at) VALUES ($1, $2, $3, $4)",
        ))
        .bind(&user.id)
        .bind(&user.name)
        .bind(&user.email)
        .bind(crate::db::now())
        .execute(pool)
        .await
        .map(|_| ())
    });
    match inserted {
        Ok(_) => (StatusCode::CREATED, Json(user)).into_response(),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            error(StatusCode::CONFLICT, "a user with this email exists")
        }
        Err(e) => {
            tracing::warn!(error = %e, "user store failed");
            error(StatusCode::SERVICE_UNAVAILABLE, "user store unavailable")
        }
    }
}

/// Who the gateway says the caller is (`x-shop-key`, `x-shop-scopes`): what a service
/// behind the gateway may trust, since the gateway strips these headers from clients.
async fn whoami(headers: axum::http::HeaderMap) -> Response {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    Json(serde_json::json!({ "key": h("x-shop-key"), "scopes": h("x-shop-scopes") }))
        .into_response()
}

async fn read(State(db): State<Db>, Path(id): Path<String>) -> Response {
    let found: Result<Option<(String, String, String)>, _> = with_db!(&db, |pool, sql| {
        sqlx::query_as(sql("SELECT id, name, email FROM users WHERE id = $1"))
            .bind(&id)
            .fetch_optional(pool)
            .await
    });
    match found {
        Ok(Some((id, name, email))) => Json(User { id, name, email }).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no user {id}")),
        Err(e) => {
            tracing::warn!(error = %e, "user store failed");
            error(StatusCode::SERVICE_UNAVAILABLE, "user store unavailable")
        }
    }
}
