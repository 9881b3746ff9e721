//! Shared pieces of the messaging tests: a fresh PostgreSQL database, a ledger handler whose
//! effects can be counted (no unique key: a double effect would show), unique stream names.
#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use std::time::Duration;

use keel_core::BoxError;
use keel_messaging::consume::Handler;
use keel_messaging::message::Message;
use keel_messaging::store::{PgStore, PgTx};

/// A fresh PostgreSQL database, dropped by [`PgDb::drop_db`].
pub struct PgDb {
    admin: sqlx::PgPool,
    pub name: String,
    pub pool: sqlx::PgPool,
}

impl PgDb {
    pub async fn new() -> PgDb {
        let admin = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres")
            .await
            .expect("PostgreSQL on 127.0.0.1:5432 (trust auth)");
        // Databases left behind by test processes that died (a failed assertion skips
        // `drop_db`): the name carries the pid, so dead owners are recognisable.
        let stale: Vec<String> =
            sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'keel_msg_%'")
                .fetch_all(&admin)
                .await
                .unwrap_or_default();
        for db in stale {
            let pid = db.split('_').nth(2).unwrap_or("");
            if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
                )))
                .execute(&admin)
                .await;
            }
        }
        let name = format!(
            "keel_msg_{}_{:x}",
            std::process::id(),
            keel_core::codec::rand::next_u64()
        );
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .unwrap();
        let pool = sqlx::PgPool::connect(&Self::url_of(&name)).await.unwrap();
        PgDb { admin, name, pool }
    }

    pub fn url_of(name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:5432/{name}")
    }

    pub fn url(&self) -> String {
        Self::url_of(&self.name)
    }

    pub async fn drop_db(self) {
        self.pool.close().await;
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&self.admin)
        .await;
    }
}

/// Books each message's amount as a row in `ledger` (no unique key, so a double effect would
/// be a second row). A negative amount is refused.
pub struct Ledger;

impl Ledger {
    pub async fn create(store: &PgStore) {
        sqlx::query("CREATE TABLE ledger (message_id TEXT NOT NULL, amount BIGINT NOT NULL)")
            .execute(store.pool())
            .await
            .unwrap();
    }

    /// (rows, distinct message ids, sum of amounts).
    pub async fn totals(store: &PgStore) -> (i64, i64, i64) {
        sqlx::query_as(
            "SELECT COUNT(*), COUNT(DISTINCT message_id), CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM ledger",
        )
        .fetch_one(store.pool())
        .await
        .unwrap()
    }
}

impl Handler<PgTx> for Ledger {
    async fn handle(&self, msg: &Message, tx: &mut PgTx) -> Result<(), BoxError> {
        let amount: i64 = String::from_utf8_lossy(&msg.payload).parse()?;
        if amount < 0 {
            return Err(format!("negative amount {amount}").into());
        }
        sqlx::query("INSERT INTO ledger (message_id, amount) VALUES ($1, $2)")
            .bind(&msg.id)
            .bind(amount)
            .execute(tx.conn())
            .await?;
        Ok(())
    }
}

/// Write `amounts` (one message each, the amount as the payload; keyed by the amount when
/// `keyed`) to `destination` through the outbox, in transactions of 500, without relaying.
pub async fn write_outbox(
    store: &PgStore,
    destination: &str,
    amounts: impl IntoIterator<Item = i64>,
    keyed: bool,
) -> usize {
    use keel_messaging::consume::{Inbox, Tx};
    let amounts: Vec<i64> = amounts.into_iter().collect();
    for chunk in amounts.chunks(500) {
        let mut tx = store.begin().await.unwrap();
        for amount in chunk {
            let text = amount.to_string();
            let key = keyed.then_some(text.as_bytes());
            tx.publish(
                destination,
                key,
                text.as_bytes(),
                std::collections::BTreeMap::new(),
            )
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
    }
    amounts.len()
}

/// [`write_outbox`] (unkeyed), then relay everything through `publisher`.
pub async fn produce<P: keel_messaging::store::Publisher>(
    store: &PgStore,
    publisher: &P,
    destination: &str,
    amounts: impl IntoIterator<Item = i64>,
) {
    let n = write_outbox(store, destination, amounts, false).await;
    let mut relayed = 0;
    while relayed < n {
        relayed += store.relay_once(publisher, 1000).await.unwrap();
    }
}

/// A stream name no other test (or program) on this machine uses.
pub fn stream_name() -> String {
    format!(
        "KEELT{}X{:X}",
        std::process::id(),
        keel_core::codec::rand::next_u64() >> 20
    )
}

/// Poll `f` until true or `timeout`.
pub async fn wait_for<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
