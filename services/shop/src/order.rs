//! The order service (HTTP/JSON in, gRPC out).
//!
//! `POST /orders {"user_id", "sku", "quantity"}`:
//! 1. the user must exist (`GET /users/{id}` at the user service, through Keel's client);
//! 2. the stock is reserved at inventory over gRPC, with the request's remaining deadline;
//! 3. the order row and its `OrderPlaced` event (outbox) are written in one transaction —
//!    both or neither — and the relay publishes the event afterwards.
//!
//! Answers: 201 with the order; 400 malformed body; 422 unknown user, unknown SKU or a
//! non-positive quantity; 409 not enough stock; 503 with a JSON error when a dependency is
//! down (then no order row and no event exist). `GET /orders/{id}` → 200 / 404.
//!
//! `POST /orders/{id}/cancel`: the order becomes `cancelled` and its `OrderCancelled` event
//! is written in the same transaction (inventory gives the stock back when it consumes it).
//! Cancelling a cancelled order answers 200 again and publishes nothing; 404 for no order.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use keel::BoxError;
use keel::Router;
use keel::client::client::{Client, Service as ClientService, tonic_request};
use keel::messaging::consume::{Inbox, Tx};
use keel::messaging::store::{PgStore, SqliteStore};
use serde::{Deserialize, Serialize};

use crate::db::Db;
use crate::with_db;
use tonic::Code;

use crate::events::{Bus, Counters, OrderCancelled, OrderPlaced};
use crate::http::error;
use crate::proto::inventory_client::InventoryClient;
use crate::proto::{ReleaseRequest, ReserveRequest};

const MIGRATIONS: &[&str] = &["CREATE TABLE orders (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        sku TEXT NOT NULL,
        quantity BIGINT NOT NULL,
        state TEXT NOT NULL,
        created_at BIGINT NOT NULL
    )"];

/// An order as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Order {
    /// `ord_…`.
    pub id: String,
    /// The buyer.
    pub user_id: String,
    /// What.
    pub sku: String,
    /// How many.
    pub quantity: i64,
    /// `placed` or `cancelled`.
    pub state: String,
}

#[derive(Debug, Deserialize)]
struct NewOrder {
    user_id: String,
    sku: String,
    quantity: i64,
}

/// The order store with its outbox, in either dialect.
#[derive(Debug, Clone)]
enum Outbox {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

#[derive(Clone)]
struct Ctx {
    db: Db,
    outbox: Outbox,
    /// Where `OrderPlaced` events go.
    destination: String,
    /// Where `OrderCancelled` events go.
    cancellations: String,
    users: Arc<Client>,
    inventory: InventoryClient<ClientService>,
}

/// The order service on `db`: migrations (its table, the outbox), the store's readiness
/// check, the routes, and the outbox relay to `bus` (stopped by the drain). Calls the
/// `[clients.user]` and `[clients.inventory]` upstreams.
pub async fn router(
    app: &keel::App,
    db: Db,
    bus: Bus,
    counters: &Counters,
) -> Result<Router, BoxError> {
    crate::db::migrate(&db, "order", MIGRATIONS).await?;
    crate::db::check_readiness(app, &db);
    let outbox = match &db {
        Db::Sqlite(pool) => {
            let s = SqliteStore::new(pool.clone());
            s.migrate().await?;
            Outbox::Sqlite(s)
        }
        Db::Postgres(pool) => {
            let s = PgStore::new(pool.clone());
            s.migrate().await?;
            Outbox::Postgres(s)
        }
    };
    let users = app.client("user")?;
    let inventory = InventoryClient::new(ClientService::new(app.client("inventory")?));
    let destination = bus.order_placed();
    let cancellations = bus.order_cancelled();
    relay(app, outbox.clone(), bus, counters);
    Ok(Router::new()
        .route("/orders", post(create))
        .route("/orders/{id}", get(read))
        .route("/orders/{id}/cancel", post(cancel))
        .with_state(Ctx {
            db,
            outbox,
            destination,
            cancellations,
            users,
            inventory,
        }))
}

/// The outbox relay, part of the service's lifecycle: it stops when the drain begins.
fn relay(app: &keel::App, outbox: Outbox, bus: Bus, counters: &Counters) {
    let cfg = app.config().messaging.relay.clone();
    let stats = counters.outbox.clone();
    app.observe_store("order", stats.clone());
    keel::messaging::transport::spawn_in_lifecycle(
        app.shutdown(),
        "order-relay",
        move |stop| async move {
            let (batch, every) = (i64::from(cfg.batch), cfg.interval.get());
            match outbox {
                Outbox::Sqlite(s) => s.run_relay_observed(&bus, batch, every, &stats, stop).await,
                Outbox::Postgres(s) => s.run_relay_observed(&bus, batch, every, &stats, stop).await,
            }
        },
    );
}

async fn create(
    State(ctx): State<Ctx>,
    req_ctx: keel::Context,
    body: axum::body::Bytes,
) -> Response {
    let Ok(new) = serde_json::from_slice::<NewOrder>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected a JSON object {\"user_id\": string, \"sku\": string, \"quantity\": integer}",
        );
    };
    if new.quantity <= 0 || new.quantity > 1_000 {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "quantity must be 1 to 1000",
        );
    }
    // 1. The buyer exists.
    match crate::http::get(&req_ctx, &ctx.users, &format!("/users/{}", new.user_id)).await {
        Ok((StatusCode::OK, _)) => {}
        Ok((StatusCode::NOT_FOUND, _)) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("unknown user {}", new.user_id),
            );
        }
        Ok((status, _)) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("user service answered {status}"),
            );
        }
        Err(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("user service unavailable: {e}"),
            );
        }
    }
    // 2. Reserve the stock (Keel's client sends the remaining deadline as grpc-timeout).
    let order_id = crate::db::new_id("ord");
    let mut inventory = ctx.inventory.clone();
    let reserved = inventory
        .reserve(tonic_request(
            &req_ctx,
            ReserveRequest {
                order_id: order_id.clone(),
                sku: new.sku.clone(),
                quantity: new.quantity,
            },
        ))
        .await;
    if let Err(status) = reserved {
        return match status.code() {
            Code::FailedPrecondition => error(StatusCode::CONFLICT, status.message()),
            Code::NotFound => error(StatusCode::UNPROCESSABLE_ENTITY, status.message()),
            Code::InvalidArgument => error(StatusCode::UNPROCESSABLE_ENTITY, status.message()),
            Code::DeadlineExceeded => error(
                StatusCode::GATEWAY_TIMEOUT,
                "inventory did not answer in time",
            ),
            _ => error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("inventory unavailable: {}", status.message()),
            ),
        };
    }
    // 3. The order and its event, in one transaction.
    let order = Order {
        id: order_id,
        user_id: new.user_id,
        sku: new.sku,
        quantity: new.quantity,
        state: "placed".into(),
    };
    if let Err(e) = store_order(&ctx.outbox, &ctx.destination, &order).await {
        tracing::warn!(order = %order.id, error = %e, "order store failed; releasing the reservation");
        // Best effort: the reservation would otherwise hold stock for an order that does
        // not exist (a reconciliation job would find it by its missing order row).
        let _ = inventory
            .release(tonic_request(
                &req_ctx,
                ReleaseRequest {
                    order_id: order.id.clone(),
                },
            ))
            .await;
        return error(StatusCode::SERVICE_UNAVAILABLE, "order store unavailable");
    }
    (StatusCode::CREATED, Json(order)).into_response()
}

async fn store_order(outbox: &Outbox, destination: &str, order: &Order) -> Result<(), BoxError> {
    let event = serde_json::to_vec(&OrderPlaced {
        order_id: order.id.clone(),
        user_id: order.user_id.clone(),
        sku: order.sku.clone(),
        quantity: order.quantity,
    })?;
    let headers = event_headers();
    // The same steps for either store: the order row and the outbox row, one transaction.
    macro_rules! write {
        ($store:expr, $postgres:expr) => {{
            let mut tx = $store.begin().await?;
            sqlx::query(crate::db::dialect(
                $postgres,
                "INSERT INTO orders (id, user_id, sku, quantity, state, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
            ))
            .bind(&order.id)
            .bind(&order.user_id)
            .bind(&order.sku)
            .bind(order.quantity)
            .bind(&order.state)
            .bind(crate::db::now())
            .execute(tx.conn())
            .await?;
            tx.publish(destination, Some(order.id.as_bytes()), &event, headers)
                .await?;
            tx.commit().await?;
        }};
    }
    match outbox {
        Outbox::Sqlite(s) => write!(s, false),
        Outbox::Postgres(s) => write!(s, true),
    }
    Ok(())
}

/// The request's trace context and baggage, for an event's headers: the consumer's span joins
/// this trace.
fn event_headers() -> std::collections::BTreeMap<String, String> {
    let mut headers = std::collections::BTreeMap::new();
    if let Some(ctx) = keel::Context::current() {
        let _ = keel::propagation::inject(
            &ctx,
            keel::propagation::Carrier::Message,
            &keel::propagation::Outbound::default(),
            &mut headers,
        );
        // An event outlives the request: its consumer is not bound by the caller's deadline.
        headers.remove("keel-deadline");
    }
    headers
}

/// `orders` as stored: id, user_id, sku, quantity, state.
type OrderRow = (String, String, String, i64, String);

/// One order as an [`OrderRow`].
const SELECT_ORDER: &str = "SELECT id, user_id, sku, quantity, state FROM orders WHERE id = $1";

fn order_of((id, user_id, sku, quantity, state): OrderRow) -> Order {
    Order {
        id,
        user_id,
        sku,
        quantity,
        state,
    }
}

/// What a cancellation found.
enum Cancelled {
    /// Cancelled now; its event is in the outbox.
    Now(Order),
    /// Cancelled before: nothing changed.
    Already(Order),
    /// No such order.
    Missing,
}

async fn cancel(State(ctx): State<Ctx>, Path(id): Path<String>) -> Response {
    match cancel_order(&ctx.outbox, &ctx.cancellations, &id).await {
        Ok(Cancelled::Now(order) | Cancelled::Already(order)) => Json(order).into_response(),
        Ok(Cancelled::Missing) => error(StatusCode::NOT_FOUND, format!("no order {id}")),
        Err(e) => {
            tracing::warn!(order = %id, error = %e, "order store failed");
            error(StatusCode::SERVICE_UNAVAILABLE, "order store unavailable")
        }
    }
}

/// Mark `id` cancelled and queue its `OrderCancelled` event, both or neither. Only a `placed`
/// order changes, so a repeated cancel (a client's retry) publishes nothing.
async fn cancel_order(outbox: &Outbox, destination: &str, id: &str) -> Result<Cancelled, BoxError> {
    macro_rules! cancel {
        ($store:expr, $postgres:expr) => {{
            let sql = |s: &'static str| crate::db::dialect($postgres, s);
            let mut tx = $store.begin().await?;
            let changed: Option<OrderRow> = sqlx::query_as(sql(
                "UPDATE orders SET state = 'cancelled' WHERE id = $1 AND state = 'placed' RETURNING id, user_id, sku, quantity, state",
            ))
            .bind(id)
            .fetch_optional(tx.conn())
            .await?;
            match changed {
                Some(row) => {
                    let order = order_of(row);
                    let event = serde_json::to_vec(&OrderCancelled {
                        order_id: order.id.clone(),
                        sku: order.sku.clone(),
                        quantity: order.quantity,
                    })?;
                    tx.publish(destination, Some(order.id.as_bytes()), &event, event_headers())
                        .await?;
                    tx.commit().await?;
                    Cancelled::Now(order)
                }
                None => {
                    let found: Option<OrderRow> = sqlx::query_as(sql(SELECT_ORDER))
                    .bind(id)
                    .fetch_optional(tx.conn())
                    .await?;
                    found.map_or(Cancelled::Missing, |row| Cancelled::Already(order_of(row)))
                }
            }
        }};
    }
    Ok(match outbox {
        Outbox::Sqlite(s) => cancel!(s, false),
        Outbox::Postgres(s) => cancel!(s, true),
    })
}

async fn read(State(ctx): State<Ctx>, Path(id): Path<String>) -> Response {
    let found: Result<Option<OrderRow>, _> = with_db!(&ctx.db, |pool, sql| {
        sqlx::query_as(sql(SELECT_ORDER))
            .bind(&id)
            .fetch_optional(pool)
            .await
    });
    match found {
        Ok(Some(row)) => Json(order_of(row)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no order {id}")),
        Err(e) => {
            tracing::warn!(error = %e, "order store failed");
            error(StatusCode::SERVICE_UNAVAILABLE, "order store unavailable")
        }
    }
}

/// Orders and outbox rows in `db` (what a failed order must leave at zero).
pub async fn counts(db: &Db) -> Result<(i64, i64), sqlx::Error> {
    with_db!(db, |pool, sql| {
        let orders = sqlx::query_scalar(sql("SELECT COUNT(*) FROM orders"))
            .fetch_one(pool)
            .await?;
        let outbox = sqlx::query_scalar(sql("SELECT COUNT(*) FROM keel_outbox"))
            .fetch_one(pool)
            .await?;
        Ok((orders, outbox))
    })
}
