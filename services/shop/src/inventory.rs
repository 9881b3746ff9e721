//! The inventory service: stock per SKU over gRPC (`Reserve`, `Release`, `Stock`), a JSON
//! view at `GET /stock/{sku}`, and the consumer of `OrderPlaced` events (confirms the order's
//! reservation) and `OrderCancelled` events (gives it back to stock), through the messaging
//! inbox (exactly once per event).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use keel::BoxError;
use keel::Router;
use keel::messaging::consume::Handler;
use keel::messaging::message::Message;
use keel::messaging::store::{PgStore, PgTx, SqliteStore, SqliteTx};

use crate::db::Db;
use crate::with_db;
use tonic::{Request, Status};

use crate::events::{Bus, Counters, OrderCancelled, OrderPlaced};
use crate::http::error;
use crate::proto::inventory_server::{Inventory, InventoryServer};
use crate::proto::{
    ReleaseReply, ReleaseRequest, ReserveReply, ReserveRequest, StockReply, StockRequest,
};

const MIGRATIONS: &[&str] = &["CREATE TABLE stock (
        sku TEXT PRIMARY KEY,
        available BIGINT NOT NULL CHECK (available >= 0)
    );
    CREATE TABLE reservations (
        order_id TEXT PRIMARY KEY,
        sku TEXT NOT NULL,
        quantity BIGINT NOT NULL,
        state TEXT NOT NULL
    );
    CREATE TABLE confirmations (
        message_id TEXT NOT NULL,
        order_id TEXT NOT NULL,
        confirmed_at BIGINT NOT NULL
    )"];

/// The SKUs a fresh inventory starts with (the demo's catalogue).
pub const SEED: &[(&str, i64)] = &[
    ("keel-mug", 1_000),
    ("keel-tee", 500),
    ("keel-sticker", 100_000),
    ("keel-hoodie", 3),
];

/// The inventory service on `db`: migrations, seed stock, the store's readiness check, the
/// gRPC and HTTP routes, and the `OrderPlaced` consumer on `bus`.
pub async fn router(
    app: &keel::App,
    db: Db,
    bus: &Bus,
    counters: &Counters,
) -> Result<Router, BoxError> {
    crate::db::migrate(&db, "inventory", MIGRATIONS).await?;
    for (sku, available) in SEED {
        with_db!(&db, |pool, sql| sqlx::query(sql(
            "INSERT INTO stock (sku, available) VALUES ($1, $2) ON CONFLICT (sku) DO NOTHING"
        ))
        .bind(sku)
        .bind(available)
        .execute(pool)
        .await
        .map(|_| ()))?;
    }
    crate::db::check_readiness(app, &db);
    match &db {
        Db::Sqlite(pool) => {
            let store = SqliteStore::new(pool.clone());
            store.migrate().await?;
            consume(app, store, bus, counters);
        }
        Db::Postgres(pool) => {
            let store = PgStore::new(pool.clone());
            store.migrate().await?;
            consume(app, store, bus, counters);
        }
    }
    Ok(Router::new()
        .route("/stock/{sku}", get(stock_json))
        .with_state(db.clone())
        .grpc_service(InventoryServer::new(Service { db })))
}

/// Confirm reservations as `OrderPlaced` events arrive, and give them back to stock as
/// `OrderCancelled` events arrive, both through the inbox of `store`.
fn consume<S>(app: &keel::App, store: S, bus: &Bus, counters: &Counters)
where
    S: keel::messaging::consume::Inbox + Clone + 'static,
    Confirm: Handler<S::Tx>,
    Restock: Handler<S::Tx>,
{
    app.observe_consumer("inventory", counters.consumer.clone());
    subscribe(
        app,
        store.clone(),
        bus,
        counters,
        &bus.order_placed(),
        "inventory",
        Confirm,
    );
    subscribe(
        app,
        store,
        bus,
        counters,
        &bus.order_cancelled(),
        "inventory-cancel",
        Restock,
    );
}

/// One consumer named `name` of `destination` (a durable consumer on NATS).
fn subscribe<S, H>(
    app: &keel::App,
    store: S,
    bus: &Bus,
    counters: &Counters,
    destination: &str,
    name: &str,
    handler: H,
) where
    S: keel::messaging::consume::Inbox + 'static,
    H: Handler<S::Tx> + Send + Sync + 'static,
{
    let retry = app.config().messaging.consumer.retry();
    match bus {
        Bus::Embedded(e) => {
            e.subscribe(
                destination,
                name,
                store,
                handler,
                keel::messaging::embedded::Subscription {
                    retry,
                    stats: counters.consumer.clone(),
                    observer: app.observer(),
                },
            );
        }
        Bus::Nats(nats, _) => {
            let mut cfg =
                keel::messaging::nats::ConsumerConfig::new(&bus.stream().unwrap_or_default(), name);
            cfg.filter_subject = destination.to_string();
            cfg.retry = retry;
            cfg.observer = app.observer();
            let settings = &app.config().messaging.consumer;
            cfg.max_in_flight = settings.max_in_flight as usize;
            cfg.batch = settings.batch as usize;
            let (nats, stats, name) = (nats.clone(), counters.consumer.clone(), name.to_string());
            keel::messaging::transport::spawn_in_lifecycle(
                app.shutdown(),
                "inventory",
                move |stop| async move {
                    if let Err(e) =
                        keel::messaging::nats::run(&nats, &cfg, &store, &handler, stats, stop).await
                    {
                        tracing::error!(consumer = %name, error = %e, "inventory consumer stopped");
                    }
                },
            );
        }
    }
}

/// Implement a message handler for both stores' inbox transactions. `$body` runs with the
/// message, the transaction and `sql` (a statement in the store's dialect) under the names
/// the caller gives them.
macro_rules! handler_in_both_stores {
    ($handler:ty, |$msg:ident, $tx:ident, $sql:ident| $body:block) => {
        handler_in_both_stores!(@in $handler, SqliteTx, false, $msg, $tx, $sql, $body);
        handler_in_both_stores!(@in $handler, PgTx, true, $msg, $tx, $sql, $body);
    };
    (@in $handler:ty, $store_tx:ty, $postgres:expr, $msg:ident, $tx:ident, $sql:ident, $body:block) => {
        impl Handler<$store_tx> for $handler {
            async fn handle(&self, $msg: &Message, $tx: &mut $store_tx) -> Result<(), BoxError> {
                let $sql = |s: &'static str| crate::db::dialect($postgres, s);
                $body
            }
        }
    };
}

/// Stock given back (the SKU's row, by a quantity): by `Release` and by `Restock`.
const RESTOCK: &str = "UPDATE stock SET available = available + $1 WHERE sku = $2";

/// The `OrderPlaced` handler: confirm the order's reservation and record the confirmation,
/// in the inbox transaction (so a redelivered event changes nothing).
#[derive(Debug, Clone, Copy)]
pub struct Confirm;

handler_in_both_stores!(Confirm, |msg, tx, sql| {
    let event: OrderPlaced = serde_json::from_slice(&msg.payload)
        .map_err(|e| format!("not an OrderPlaced event: {e}"))?;
    sqlx::query(sql(
        "UPDATE reservations SET state = 'confirmed' WHERE order_id = $1 AND state = 'held'",
    ))
    .bind(&event.order_id)
    .execute(tx.conn())
    .await?;
    sqlx::query(sql(
        "INSERT INTO confirmations (message_id, order_id, confirmed_at) VALUES ($1, $2, $3)",
    ))
    .bind(&msg.id)
    .bind(&event.order_id)
    .bind(crate::db::now())
    .execute(tx.conn())
    .await?;
    Ok(())
});

/// The `OrderCancelled` handler: give the order's reservation back to stock, in the inbox
/// transaction. A reservation already given back (by order's compensating `Release`) changes
/// nothing, and a redelivered event is skipped by the inbox before it gets here.
#[derive(Debug, Clone, Copy)]
pub struct Restock;

handler_in_both_stores!(Restock, |msg, tx, sql| {
    let event: OrderCancelled = serde_json::from_slice(&msg.payload)
        .map_err(|e| format!("not an OrderCancelled event: {e}"))?;
    // The reservation's own SKU and quantity, not the event's: stock moves by what was
    // really held.
    let held: Option<(String, i64)> = sqlx::query_as(sql(
        "UPDATE reservations SET state = 'released' WHERE order_id = $1 AND state IN ('held', 'confirmed') RETURNING sku, quantity",
    ))
    .bind(&event.order_id)
    .fetch_optional(tx.conn())
    .await?;
    if let Some((sku, quantity)) = held {
        sqlx::query(sql(RESTOCK))
            .bind(quantity)
            .bind(&sku)
            .execute(tx.conn())
            .await?;
    }
    Ok(())
});

/// The gRPC service.
#[derive(Debug, Clone)]
struct Service {
    db: Db,
}

fn store_status(e: sqlx::Error) -> Status {
    tracing::warn!(error = %e, "inventory store failed");
    Status::unavailable("inventory store unavailable")
}

/// What a reservation attempt found.
enum Reserved {
    /// Held (now or by an earlier call for the same order); what is left.
    Available(i64),
    /// No such SKU.
    UnknownSku,
    /// Not enough: what there is.
    Short(i64),
}

#[tonic::async_trait]
impl Inventory for Service {
    async fn reserve(
        &self,
        req: Request<ReserveRequest>,
    ) -> Result<tonic::Response<ReserveReply>, Status> {
        let r = req.into_inner();
        if r.quantity <= 0 || r.order_id.is_empty() {
            return Err(Status::invalid_argument(
                "quantity must be positive and order_id set",
            ));
        }
        let outcome: Result<Reserved, sqlx::Error> = with_db!(&self.db, |pool, sql| {
            async {
            let mut tx = pool.begin().await?;
            // The write comes first, so the transaction takes the write lock at once (in
            // SQLite a read first would have to upgrade, which fails under contention). A
            // repeated Reserve for the same order inserts nothing and changes nothing.
            let new = sqlx::query(sql(
                "INSERT INTO reservations (order_id, sku, quantity, state) VALUES ($1, $2, $3, 'held') ON CONFLICT (order_id) DO NOTHING",
            ))
            .bind(&r.order_id)
            .bind(&r.sku)
            .bind(r.quantity)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if new {
                let took = sqlx::query(sql(
                    "UPDATE stock SET available = available - $1 WHERE sku = $2 AND available >= $1",
                ))
                .bind(r.quantity)
                .bind(&r.sku)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if took == 0 {
                    let known: Option<i64> =
                        sqlx::query_scalar(sql("SELECT available FROM stock WHERE sku = $1"))
                            .bind(&r.sku)
                            .fetch_optional(&mut *tx)
                            .await?;
                    // Dropping the transaction rolls the reservation row back.
                    return Ok(known.map_or(Reserved::UnknownSku, Reserved::Short));
                }
            }
            let available: i64 =
                sqlx::query_scalar(sql("SELECT available FROM stock WHERE sku = $1"))
                    .bind(&r.sku)
                    .fetch_one(&mut *tx)
                    .await?;
            tx.commit().await?;
            Ok(Reserved::Available(available))
        }
        .await
        });
        match outcome.map_err(store_status)? {
            Reserved::Available(available) => Ok(tonic::Response::new(ReserveReply { available })),
            Reserved::UnknownSku => Err(Status::not_found(format!("unknown sku {}", r.sku))),
            Reserved::Short(a) => Err(Status::failed_precondition(format!(
                "only {a} of {} available",
                r.sku
            ))),
        }
    }

    async fn release(
        &self,
        req: Request<ReleaseRequest>,
    ) -> Result<tonic::Response<ReleaseReply>, Status> {
        let r = req.into_inner();
        let released: Result<bool, sqlx::Error> = with_db!(&self.db, |pool, sql| {
            async {
            let mut tx = pool.begin().await?;
            let held: Option<(String, i64)> = sqlx::query_as(sql(
                "UPDATE reservations SET state = 'released' WHERE order_id = $1 AND state = 'held' RETURNING sku, quantity",
            ))
            .bind(&r.order_id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((sku, quantity)) = &held {
                sqlx::query(sql(RESTOCK))
                    .bind(quantity)
                    .bind(sku)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(held.is_some())
        }
        .await
        });
        Ok(tonic::Response::new(ReleaseReply {
            released: released.map_err(store_status)?,
        }))
    }

    async fn stock(
        &self,
        req: Request<StockRequest>,
    ) -> Result<tonic::Response<StockReply>, Status> {
        let sku = req.into_inner().sku;
        match read_stock(&self.db, &sku).await.map_err(store_status)? {
            Some(s) => Ok(tonic::Response::new(s)),
            None => Err(Status::not_found(format!("unknown sku {sku}"))),
        }
    }
}

async fn read_stock(db: &Db, sku: &str) -> Result<Option<StockReply>, sqlx::Error> {
    with_db!(db, |pool, sql| {
        let available: Option<i64> =
            sqlx::query_scalar(sql("SELECT available FROM stock WHERE sku = $1"))
                .bind(sku)
                .fetch_optional(pool)
                .await?;
        let Some(available) = available else {
            return Ok(None);
        };
        let held = |state: &'static str| {
            sqlx::query_scalar::<_, i64>(sql(
                "SELECT CAST(COALESCE(SUM(quantity), 0) AS BIGINT) FROM reservations WHERE sku = $1 AND state = $2",
            ))
            .bind(sku)
            .bind(state)
            .fetch_one(pool)
        };
        Ok(Some(StockReply {
            sku: sku.to_string(),
            available,
            reserved: held("held").await?,
            confirmed: held("confirmed").await?,
        }))
    })
}

async fn stock_json(State(db): State<Db>, Path(sku): Path<String>) -> Response {
    match read_stock(&db, &sku).await {
        Ok(Some(s)) => Json(serde_json::json!({
            "sku": s.sku,
            "available": s.available,
            "reserved": s.reserved,
            "confirmed": s.confirmed,
        }))
        .into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("unknown sku {sku}")),
        Err(e) => {
            tracing::warn!(error = %e, "inventory store failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "inventory store unavailable",
            )
        }
    }
}

/// How many confirmations `order_id` has (exactly one once its event was consumed).
pub async fn confirmations(db: &Db, order_id: &str) -> Result<i64, sqlx::Error> {
    with_db!(db, |pool, sql| sqlx::query_scalar(sql(
        "SELECT COUNT(*) FROM confirmations WHERE order_id = $1"
    ))
    .bind(order_id)
    .fetch_one(pool)
    .await)
}
