//! The services' stores: SQLite files (the embedded default), opened with WAL so readers do
//! not block the writer, and a small migration runner.

use std::str::FromStr;
use std::time::Duration;

use keel::BoxError;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

/// Open (creating if missing) the SQLite database at `url` (`sqlite://path/to/file.db`).
pub async fn open(url: &str) -> Result<SqlitePool, BoxError> {
    let opts = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // WAL with NORMAL is durable across process crashes (the case the inbox is for);
        // only an OS crash may lose the last transactions.
        .synchronous(SqliteSynchronous::Normal)
        // Writers queue for the file lock instead of failing at once under load.
        .busy_timeout(Duration::from_secs(5));
    Ok(SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(opts)
        .await?)
}

/// Apply `steps` (numbered from 1) that `service`'s database has not seen yet, each in its own
/// transaction, recording them in `shop_migrations`. Idempotent; a step never runs twice.
pub async fn migrate(pool: &SqlitePool, service: &str, steps: &[&str]) -> Result<(), BoxError> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS shop_migrations \
         (service TEXT NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (service, version))",
    )
    .execute(pool)
    .await?;
    for (i, sql) in steps.iter().enumerate() {
        let version = i64::try_from(i + 1)?;
        let mut tx = pool.begin().await?;
        let done: Option<i64> = sqlx::query_scalar(
            "SELECT version FROM shop_migrations WHERE service = ?1 AND version = ?2",
        )
        .bind(service)
        .bind(version)
        .fetch_optional(&mut *tx)
        .await?;
        if done.is_some() {
            continue;
        }
        for stmt in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            sqlx::query(sqlx::AssertSqlSafe(stmt.to_string()))
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("INSERT INTO shop_migrations (service, version) VALUES (?1, ?2)")
            .bind(service)
            .bind(version)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok(())
}

/// Register a readiness check that the store answers.
pub fn check_readiness(app: &keel::App, pool: &SqlitePool) {
    let pool = pool.clone();
    app.readiness().check("store", move || {
        let pool = pool.clone();
        async move {
            sqlx::query("SELECT 1")
                .execute(&pool)
                .await
                .map(|_| ())
                .map_err(|e| format!("store: {e}"))
        }
    });
}

/// A fresh id: 64 random bits in hex.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{:016x}", keel::codec::rand::next_u64())
}
