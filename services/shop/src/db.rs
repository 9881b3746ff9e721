//! The services' stores: SQLite (the embedded default: a file per service, WAL) or PostgreSQL
//! (`SHOP_DB=postgres://…`), behind one [`Db`] handle and one migration runner.
//!
//! Every statement is written once, in PostgreSQL's `$1` placeholder style, with types both
//! dialects accept (`TEXT`, `BIGINT`, `CAST(.. AS BIGINT)`), and times computed in Rust rather
//! than by a dialect's clock function. For SQLite the placeholders become `?1`, which SQLite
//! binds by the same position. [`with_db!`](crate::with_db) runs one block of sqlx code against whichever pool
//! is configured, so the two dialects cannot drift apart.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel::BoxError;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

/// A service's store.
#[derive(Debug, Clone)]
pub enum Db {
    /// A SQLite file.
    Sqlite(SqlitePool),
    /// A PostgreSQL database.
    Postgres(PgPool),
}

/// Run `$body` with `$pool` bound to the configured pool and `$sql` to a function turning a
/// `$1`-style statement into this dialect's.
#[macro_export]
macro_rules! with_db {
    ($db:expr, |$pool:ident, $sql:ident| $body:expr) => {
        match $db {
            $crate::db::Db::Sqlite($pool) => {
                let $sql = |s: &'static str| $crate::db::dialect(false, s);
                $body
            }
            $crate::db::Db::Postgres($pool) => {
                let $sql = |s: &'static str| $crate::db::dialect(true, s);
                $body
            }
        }
    };
}

/// `stmt` for PostgreSQL (as written) or SQLite (`$N` → `?N`), ready for `sqlx::query`.
pub fn dialect(postgres: bool, stmt: &'static str) -> sqlx::AssertSqlSafe<Cow<'static, str>> {
    if postgres {
        sqlx::AssertSqlSafe(Cow::Borrowed(stmt))
    } else {
        // The shop's statements hold no `$` other than placeholders (no literals with one).
        sqlx::AssertSqlSafe(Cow::Owned(stmt.replace('$', "?")))
    }
}

/// Unix seconds now (both dialects store times as numbers Keel computes).
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Open the store at `url`: `postgres://…` (the database must exist), or `sqlite://path`
/// (created if missing).
pub async fn open(url: &str) -> Result<Db, BoxError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        return Ok(Db::Postgres(pool));
    }
    let opts = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // WAL with NORMAL is durable across process crashes (the case the inbox is for);
        // only an OS crash may lose the last transactions.
        .synchronous(SqliteSynchronous::Normal)
        // Writers queue for the file lock instead of failing at once under load.
        .busy_timeout(Duration::from_secs(5));
    Ok(Db::Sqlite(
        SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(opts)
            .await?,
    ))
}

/// Apply `steps` (numbered from 1) that `service`'s database has not seen yet, each in its own
/// transaction, recording them in `shop_migrations`. Idempotent; a step never runs twice.
pub async fn migrate(db: &Db, service: &str, steps: &[&str]) -> Result<(), BoxError> {
    with_db!(db, |pool, sql| {
        sqlx::query(sql("CREATE TABLE IF NOT EXISTS shop_migrations \
             (service TEXT NOT NULL, version BIGINT NOT NULL, PRIMARY KEY (service, version))"))
        .execute(pool)
        .await?;
        for (i, steps_sql) in steps.iter().enumerate() {
            let version = i64::try_from(i + 1)?;
            let mut tx = pool.begin().await?;
            let done: Option<i64> = sqlx::query_scalar(sql(
                "SELECT version FROM shop_migrations WHERE service = $1 AND version = $2",
            ))
            .bind(service)
            .bind(version)
            .fetch_optional(&mut *tx)
            .await?;
            if done.is_some() {
                continue;
            }
            for stmt in steps_sql
                .split(';')
                .map(str::trim)
                .filter(|s| !s.is_empty())
            {
                sqlx::query(sqlx::AssertSqlSafe(stmt.to_string()))
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(sql(
                "INSERT INTO shop_migrations (service, version) VALUES ($1, $2)",
            ))
            .bind(service)
            .bind(version)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        }
        Ok(())
    })
}

impl Db {
    /// Close the pool (waits for connections to be returned).
    pub async fn close(&self) {
        match self {
            Db::Sqlite(p) => p.close().await,
            Db::Postgres(p) => p.close().await,
        }
    }
}

/// Register a readiness check that the store answers.
pub fn check_readiness(app: &keel::App, db: &Db) {
    let db = db.clone();
    app.readiness().check("store", move || {
        let db = db.clone();
        async move {
            let r = with_db!(&db, |pool, sql| sqlx::query(sql("SELECT 1"))
                .execute(pool)
                .await
                .map(|_| ()));
            r.map_err(|e| format!("store: {e}"))
        }
    });
}

/// A fresh id: 64 random bits in hex.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{:016x}", keel::codec::rand::next_u64())
}
