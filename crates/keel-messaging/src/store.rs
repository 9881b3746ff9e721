//! Inbox and outbox in the service's own SQL store: PostgreSQL, or SQLite (the embedded
//! default). Both dialects share one schema and the same statements apart from types and
//! placeholders; a macro writes the two implementations so they cannot drift apart.
//!
//! **Schema and index plan.**
//! - `keel_inbox (consumer, message_id) PRIMARY KEY, received_at`: the claim is one
//!   primary-key insert (`ON CONFLICT DO NOTHING`), the cheapest write the store has; the
//!   `received_at` index serves only the retention job.
//! - `keel_outbox (id, message_id UNIQUE, destination, msg_key, payload, headers,
//!   created_at, sent_at)`: the relay reads unsent rows in `id` order through a partial index
//!   on unsent rows (PostgreSQL) or the primary key (SQLite), so its scan does not grow with
//!   the sent history.
//!
//! Times are unix milliseconds computed by Keel, identical in both stores.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use std::sync::atomic::Ordering;

use crate::consume::{Inbox, StoreError, Tx};
use crate::message::MESSAGE_ID_HEADER;
use crate::transport::StoreStats;

/// An outbox row on its way to the broker.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// The outbox row's id (its order).
    pub seq: i64,
    /// The message id consumers deduplicate on (also in `headers` as `keel-message-id`).
    pub message_id: String,
    /// Queue, topic or subject.
    pub destination: String,
    /// Partitioning key.
    pub key: Option<Bytes>,
    /// The body.
    pub payload: Bytes,
    /// Headers, including `keel-message-id` and the publishing request's trace context.
    pub headers: BTreeMap<String, String>,
}

/// Sends outbox rows to a broker (RabbitMQ with confirms, Kafka with acks=all, JetStream
/// with publish acks, or the embedded transport). `Ok` means the broker has the message.
pub trait Publisher: Send + Sync {
    /// Publish one message; resolve once the broker confirmed it.
    fn publish(
        &self,
        msg: &Outgoing,
    ) -> impl std::future::Future<Output = Result<(), keel_core::BoxError>> + Send;

    /// Publish `msgs` in order; return how many *leading* messages the broker confirmed, and
    /// the error that stopped the rest. The default sends one at a time; a broker with
    /// pipelined confirms overrides it to send the batch and then collect the confirms.
    fn publish_batch(
        &self,
        msgs: &[Outgoing],
    ) -> impl std::future::Future<Output = (usize, Option<keel_core::BoxError>)> + Send {
        async move {
            for (i, m) in msgs.iter().enumerate() {
                if let Err(e) = self.publish(m).await {
                    return (i, Some(e));
                }
            }
            (msgs.len(), None)
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn store_err(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError(Box::new(e))
}

/// A fresh message id: 128 random bits in hex.
fn new_message_id() -> String {
    let a = keel_core::codec::rand::next_u64();
    let b = keel_core::codec::rand::next_u64();
    format!("{a:016x}{b:016x}")
}

macro_rules! sql_store {
    (
        $(#[$doc:meta])* store: $store:ident,
        $(#[$txdoc:meta])* tx: $tx:ident,
        db: $db:ty,
        pool: $pool:ty,
        conn: $conn:ty,
        schema: $schema:expr,
        claim: $claim:expr,
        publish: $publish:expr,
        unsent: $unsent:expr,
        mark_sent: $mark:expr,
        prune_inbox: $prune_in:expr,
        prune_outbox: $prune_out:expr,
        backlog: $backlog:expr,
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $store {
            pool: $pool,
        }

        $(#[$txdoc])*
        #[derive(Debug)]
        pub struct $tx {
            tx: sqlx::Transaction<'static, $db>,
        }

        impl $store {
            /// Over an existing pool (the service's own).
            pub fn new(pool: $pool) -> Self {
                Self { pool }
            }

            /// The pool, for the service's own queries.
            pub fn pool(&self) -> &$pool {
                &self.pool
            }

            /// Create the inbox and outbox tables and indexes if absent (idempotent).
            pub async fn migrate(&self) -> Result<(), StoreError> {
                for stmt in $schema {
                    sqlx::query(stmt)
                        .execute(&self.pool)
                        .await
                        .map_err(store_err)?;
                }
                Ok(())
            }

            /// Up to `batch` unsent outbox rows, oldest first.
            pub async fn unsent(&self, batch: i64) -> Result<Vec<Outgoing>, StoreError> {
                use sqlx::Row;
                let rows = sqlx::query($unsent)
                    .bind(batch)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(store_err)?;
                let mut out = Vec::with_capacity(rows.len());
                for r in rows {
                    let headers: String = r.try_get("headers").map_err(store_err)?;
                    let headers: BTreeMap<String, String> =
                        serde_json::from_str(&headers).map_err(store_err)?;
                    let key: Option<Vec<u8>> = r.try_get("msg_key").map_err(store_err)?;
                    let payload: Vec<u8> = r.try_get("payload").map_err(store_err)?;
                    out.push(Outgoing {
                        seq: r.try_get("id").map_err(store_err)?,
                        message_id: r.try_get("message_id").map_err(store_err)?,
                        destination: r.try_get("destination").map_err(store_err)?,
                        key: key.map(Bytes::from),
                        payload: Bytes::from(payload),
                        headers,
                    });
                }
                Ok(out)
            }

            /// Publish unsent rows in order through `publisher`, marking each sent once the
            /// broker confirmed it. Stops at the first failure so order is kept; the next
            /// call resumes there. Returns how many were sent.
            pub async fn relay_once<P: Publisher>(
                &self,
                publisher: &P,
                batch: i64,
            ) -> Result<usize, StoreError> {
                Ok(self.relay_pass(publisher, batch).await?.1)
            }

            /// One relay pass: (rows read, rows confirmed, whether a broker error stopped it
            /// short).
            async fn relay_pass<P: Publisher>(
                &self,
                publisher: &P,
                batch: i64,
            ) -> Result<(usize, usize, bool), StoreError> {
                let rows = self.unsent(batch).await?;
                if rows.is_empty() {
                    // Idle: no publish and no empty marking transaction.
                    return Ok((0, 0, false));
                }
                let (confirmed, error) = publisher.publish_batch(&rows).await;
                let refused = error.is_some();
                if let Some(e) = error {
                    tracing::warn!(error = %e, confirmed, "outbox relay: publish failed; will retry");
                }
                // Mark exactly the confirmed rows (by id: a row with a smaller id committed
                // after this read must not be swept along). A crash before this commit
                // re-publishes them later; consumers deduplicate on their message ids.
                let confirmed = confirmed.min(rows.len());
                let mut tx = self.pool.begin().await.map_err(store_err)?;
                let now = now_ms();
                for row in &rows[..confirmed] {
                    sqlx::query($mark)
                        .bind(now)
                        .bind(row.seq)
                        .execute(&mut *tx)
                        .await
                        .map_err(store_err)?;
                }
                tx.commit().await.map_err(store_err)?;
                Ok((rows.len(), confirmed, refused))
            }

            /// Unsent outbox rows (the relay's backlog: a growing number means the broker is
            /// down or slower than the producers).
            pub async fn backlog(&self) -> Result<i64, StoreError> {
                sqlx::query_scalar($backlog)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(store_err)
            }

            /// Relay until `stop` resolves: a pass after every `interval` while the outbox is
            /// empty, back-to-back while rows keep coming, and a backoff (up to 5 s) while the
            /// store or broker fails. Rows left at the stop are sent by the next relay.
            pub async fn run_relay<P: Publisher>(
                &self,
                publisher: &P,
                interval: Duration,
                stop: impl std::future::Future<Output = ()>,
            ) {
                self.run_relay_observed(publisher, 500, interval, &StoreStats::default(), stop)
                    .await;
            }

            /// [`Self::run_relay`] with `batch` rows per pass, counting into `stats`
            /// (backlog, published, failures) for the metrics.
            pub async fn run_relay_observed<P: Publisher>(
                &self,
                publisher: &P,
                batch: i64,
                interval: Duration,
                stats: &StoreStats,
                stop: impl std::future::Future<Output = ()>,
            ) {
                tokio::pin!(stop);
                let mut failing = Duration::ZERO;
                loop {
                    let relayed = self.relay_pass(publisher, batch).await;
                    // A pass that read nothing saw an empty outbox: no need to count it.
                    let backlog = match &relayed {
                        Ok((0, _, _)) => Ok(0),
                        _ => self.backlog().await,
                    };
                    if let Ok(b) = &backlog {
                        stats.backlog.store(*b, Ordering::Relaxed);
                    }
                    let pause = match relayed {
                        Ok((_, n, refused)) => {
                            stats.published.fetch_add(n as u64, Ordering::Relaxed);
                            let more = backlog.as_ref().is_ok_and(|b| *b > 0);
                            if refused {
                                // The broker refused mid-batch (logged above). Back off.
                                stats.relay_failures.fetch_add(1, Ordering::Relaxed);
                                failing = (failing * 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
                                failing
                            } else if more {
                                failing = Duration::ZERO;
                                // A full batch and more waiting: go again at once.
                                Duration::from_millis(1)
                            } else {
                                failing = Duration::ZERO;
                                interval
                            }
                        }
                        Err(e) => {
                            stats.relay_failures.fetch_add(1, Ordering::Relaxed);
                            failing = (failing * 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
                            tracing::warn!(error = %e, backoff = ?failing, "outbox relay failed");
                            failing
                        }
                    };
                    tokio::select! {
                        () = &mut stop => return,
                        () = tokio::time::sleep(pause) => {}
                    }
                }
            }

            /// The retention job: [`Self::prune`] with `age` every `interval` until `stop`
            /// resolves, counting the rows removed into `stats`.
            pub async fn run_retention(
                &self,
                age: Duration,
                interval: Duration,
                stats: &StoreStats,
                stop: impl std::future::Future<Output = ()>,
            ) {
                tokio::pin!(stop);
                loop {
                    match self.prune(age).await {
                        Ok(n) => {
                            stats.pruned.fetch_add(n, Ordering::Relaxed);
                            if n > 0 {
                                tracing::info!(rows = n, ?age, "messaging retention: pruned old inbox and outbox rows");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "messaging retention failed; retried next interval"),
                    }
                    tokio::select! {
                        () = &mut stop => return,
                        () = tokio::time::sleep(interval) => {}
                    }
                }
            }

            /// Delete inbox claims and sent outbox rows older than `age`. Returns the rows
            /// removed. Claims must outlive the broker's redelivery horizon (a redelivery of
            /// a pruned message would be applied again): keep `age` well above it.
            pub async fn prune(&self, age: Duration) -> Result<u64, StoreError> {
                let cutoff = now_ms() - i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
                let a = sqlx::query($prune_in)
                    .bind(cutoff)
                    .execute(&self.pool)
                    .await
                    .map_err(store_err)?
                    .rows_affected();
                let b = sqlx::query($prune_out)
                    .bind(cutoff)
                    .execute(&self.pool)
                    .await
                    .map_err(store_err)?
                    .rows_affected();
                Ok(a + b)
            }
        }

        impl Inbox for $store {
            type Tx = $tx;

            async fn begin(&self) -> Result<$tx, StoreError> {
                Ok($tx {
                    tx: self.pool.begin().await.map_err(store_err)?,
                })
            }
        }

        impl $tx {
            /// The transaction's connection, for the handler's own queries: they commit (or
            /// roll back) with the inbox claim and the outbox rows.
            pub fn conn(&mut self) -> &mut $conn {
                &mut self.tx
            }

            /// Queue a message for `destination` in the outbox, in this transaction: it is
            /// published (by the relay) if and only if the transaction commits. Returns its
            /// message id.
            pub async fn publish(
                &mut self,
                destination: &str,
                key: Option<&[u8]>,
                payload: &[u8],
                mut headers: BTreeMap<String, String>,
            ) -> Result<String, StoreError> {
                let id = new_message_id();
                headers.insert(MESSAGE_ID_HEADER.to_string(), id.clone());
                let headers = serde_json::to_string(&headers).map_err(store_err)?;
                sqlx::query($publish)
                    .bind(&id)
                    .bind(destination)
                    .bind(key)
                    .bind(payload)
                    .bind(headers)
                    .bind(now_ms())
                    .execute(&mut *self.tx)
                    .await
                    .map_err(store_err)?;
                Ok(id)
            }
        }

        impl Tx for $tx {
            async fn claim(&mut self, consumer: &str, message_id: &str) -> Result<bool, StoreError> {
                let r = sqlx::query($claim)
                    .bind(consumer)
                    .bind(message_id)
                    .bind(now_ms())
                    .execute(&mut *self.tx)
                    .await
                    .map_err(store_err)?;
                Ok(r.rows_affected() == 1)
            }

            async fn claim_many(
                &mut self,
                consumer: &str,
                ids: &[&str],
            ) -> Result<Vec<bool>, StoreError> {
                self.claim_all(consumer, ids).await
            }

            async fn commit(self) -> Result<(), StoreError> {
                self.tx.commit().await.map_err(store_err)
            }

            async fn rollback(self) -> Result<(), StoreError> {
                self.tx.rollback().await.map_err(store_err)
            }
        }
    };
}

#[cfg(feature = "postgres")]
sql_store! {
    /// Inbox and outbox in PostgreSQL.
    store: PgStore,
    /// A PostgreSQL transaction carrying an inbox claim, the handler's writes and outbox rows.
    tx: PgTx,
    db: sqlx::Postgres,
    pool: sqlx::PgPool,
    conn: sqlx::PgConnection,
    schema: [
        "CREATE TABLE IF NOT EXISTS keel_inbox (consumer TEXT NOT NULL, message_id TEXT NOT NULL, received_at BIGINT NOT NULL, PRIMARY KEY (consumer, message_id))",
        "CREATE INDEX IF NOT EXISTS keel_inbox_received ON keel_inbox (received_at)",
        "CREATE TABLE IF NOT EXISTS keel_outbox (id BIGSERIAL PRIMARY KEY, message_id TEXT NOT NULL UNIQUE, destination TEXT NOT NULL, msg_key BYTEA, payload BYTEA NOT NULL, headers TEXT NOT NULL, created_at BIGINT NOT NULL, sent_at BIGINT)",
        "CREATE INDEX IF NOT EXISTS keel_outbox_unsent ON keel_outbox (id) WHERE sent_at IS NULL",
    ],
    claim: "INSERT INTO keel_inbox (consumer, message_id, received_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
    publish: "INSERT INTO keel_outbox (message_id, destination, msg_key, payload, headers, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
    unsent: "SELECT id, message_id, destination, msg_key, payload, headers FROM keel_outbox WHERE sent_at IS NULL ORDER BY id LIMIT $1",
    mark_sent: "UPDATE keel_outbox SET sent_at = $1 WHERE id = $2",
    prune_inbox: "DELETE FROM keel_inbox WHERE received_at < $1",
    prune_outbox: "DELETE FROM keel_outbox WHERE sent_at IS NOT NULL AND sent_at < $1",
    backlog: "SELECT COUNT(*) FROM keel_outbox WHERE sent_at IS NULL",
}

#[cfg(feature = "sqlite")]
sql_store! {
    /// Inbox and outbox in SQLite (the embedded default).
    store: SqliteStore,
    /// A SQLite transaction carrying an inbox claim, the handler's writes and outbox rows.
    tx: SqliteTx,
    db: sqlx::Sqlite,
    pool: sqlx::SqlitePool,
    conn: sqlx::SqliteConnection,
    schema: [
        "CREATE TABLE IF NOT EXISTS keel_inbox (consumer TEXT NOT NULL, message_id TEXT NOT NULL, received_at INTEGER NOT NULL, PRIMARY KEY (consumer, message_id)) WITHOUT ROWID",
        "CREATE INDEX IF NOT EXISTS keel_inbox_received ON keel_inbox (received_at)",
        "CREATE TABLE IF NOT EXISTS keel_outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL UNIQUE, destination TEXT NOT NULL, msg_key BLOB, payload BLOB NOT NULL, headers TEXT NOT NULL, created_at INTEGER NOT NULL, sent_at INTEGER)",
    ],
    claim: "INSERT INTO keel_inbox (consumer, message_id, received_at) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
    publish: "INSERT INTO keel_outbox (message_id, destination, msg_key, payload, headers, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    unsent: "SELECT id, message_id, destination, msg_key, payload, headers FROM keel_outbox WHERE sent_at IS NULL ORDER BY id LIMIT ?1",
    mark_sent: "UPDATE keel_outbox SET sent_at = ?1 WHERE id = ?2",
    prune_inbox: "DELETE FROM keel_inbox WHERE received_at < ?1",
    prune_outbox: "DELETE FROM keel_outbox WHERE sent_at IS NOT NULL AND sent_at < ?1",
    backlog: "SELECT COUNT(*) FROM keel_outbox WHERE sent_at IS NULL",
}

#[cfg(feature = "postgres")]
impl PgTx {
    /// All claims in one statement: the ids this transaction inserted come back.
    async fn claim_all(&mut self, consumer: &str, ids: &[&str]) -> Result<Vec<bool>, StoreError> {
        let inserted: Vec<String> = sqlx::query_scalar(
            "INSERT INTO keel_inbox (consumer, message_id, received_at) \
             SELECT $1, id, $3 FROM UNNEST($2::text[]) AS id \
             ON CONFLICT DO NOTHING RETURNING message_id",
        )
        .bind(consumer)
        .bind(ids)
        .bind(now_ms())
        .fetch_all(&mut *self.tx)
        .await
        .map_err(store_err)?;
        Ok(first_claims(ids, inserted))
    }
}

#[cfg(feature = "sqlite")]
impl SqliteTx {
    /// SQLite is in-process: one statement per claim costs no round trip.
    async fn claim_all(&mut self, consumer: &str, ids: &[&str]) -> Result<Vec<bool>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(self.claim(consumer, id).await?);
        }
        Ok(out)
    }
}

/// Map the inserted ids back onto `ids`: an id is new at its first occurrence only.
#[cfg(feature = "postgres")]
fn first_claims(ids: &[&str], inserted: Vec<String>) -> Vec<bool> {
    let mut fresh: std::collections::HashSet<String> = inserted.into_iter().collect();
    ids.iter().map(|id| fresh.remove(*id)).collect()
}
