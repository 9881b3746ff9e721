//! Consumer benchmark (not a test), driven by `bench/consumer.sh`: BENCH.md scenario S4,
//! target T5.
//!
//! S4 is a message consumer whose effect is an idempotent insert in PostgreSQL, fed with 10 %
//! redeliveries. Keel's consumer can be no faster than the slower of its two halves, so its
//! ceiling is `min(broker-only consumer rate, pgbench running the same SQL)`, and T5 asks for
//! Keel ≥ 0.9 × that ceiling with zero duplicate effects. All three rates are measured in the
//! same run, on the same servers, with the same concurrency, because a ceiling measured on
//! another day (or under another load) says nothing about this run's ratio.
//!
//! 1. **Broker only**: N messages plus a redelivery of every tenth (D = N + ⌈N/10⌉
//!    deliveries) in a fresh JetStream stream, drained by a durable pull consumer with the
//!    same `max_ack_pending` and concurrency as Keel's, which acks and does nothing else.
//! 2. **pgbench**: per delivery, the statements Keel's path sends — `BEGIN`, the inbox claim
//!    (`ON CONFLICT DO NOTHING`), the ledger insert, `COMMIT` — and, for the redeliveries, the
//!    claim finding an existing row followed by `ROLLBACK` (Keel runs no handler then). The
//!    two scripts are weighted 10 : 1 like the deliveries, and run in prepared mode because
//!    sqlx prepares (and caches) its statements too: the ceiling is not lowered by extra
//!    parsing Keel does not do.
//! 3. **Keel**: the same deliveries through `keel_messaging::nats::run` with the inbox in
//!    PostgreSQL and a ledger handler, timed until every delivery was applied or recognised as
//!    a duplicate; then the ledger must hold exactly N rows with N distinct message ids.
//!
//! The redeliveries are published with only Keel's `keel-message-id` header: `Nats-Msg-Id`
//! would make JetStream drop them at publish time and the inbox would never see one. Each
//! redelivery follows its original by about [`REDELIVERY_LAG`] messages — far more than the
//! consumer's ack window — so, like a real redelivery, it arrives after the original
//! committed instead of waiting on its uncommitted claim.
//!
//! Usage: `consumer_bench [N=50000] [CONCURRENCY=16] [PGBENCH_SECONDS=10] [BATCH=16]`
//! (BATCH: deliveries per store transaction in Keel's consumer; 1 = one transaction each).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::AckPolicy, consumer::pull};
use futures_util::StreamExt;
use keel_core::BoxError;
use keel_messaging::consume::Handler;
use keel_messaging::message::Message;
use keel_messaging::nats::{ConsumerConfig, ConsumerStats, Nats, run};
use keel_messaging::store::{PgStore, PgTx};
use tokio::sync::Notify;

const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const NATS_URL: &str = "nats://127.0.0.1:4222";
/// The durable consumer name, which is also the inbox's consumer key.
const CONSUMER: &str = "bench";
/// How many messages after its original a redelivery is published.
const REDELIVERY_LAG: u64 = 1000;
/// A phase that has not finished by then is broken, not slow.
const PHASE_TIMEOUT: Duration = Duration::from_secs(600);

/// Books each message's amount as a row in `ledger`. No unique key, on purpose: a double
/// effect would be a second row, which the final check counts.
struct Ledger;

impl Handler<PgTx> for Ledger {
    async fn handle(&self, msg: &Message, tx: &mut PgTx) -> Result<(), BoxError> {
        let amount: i64 = std::str::from_utf8(&msg.payload)?.parse()?;
        sqlx::query("INSERT INTO ledger (message_id, amount) VALUES ($1, $2)")
            .bind(&msg.id)
            .bind(amount)
            .execute(tx.conn())
            .await?;
        Ok(())
    }
}

/// A fresh database for this run (its name carries the pid, so a crashed run's database is
/// recognised and dropped by the next one).
struct Db {
    admin: sqlx::PgPool,
    name: String,
    pool: sqlx::PgPool,
}

impl Db {
    async fn create(max_connections: u32) -> Db {
        let admin = sqlx::PgPool::connect(PG_ADMIN)
            .await
            .expect("PostgreSQL on 127.0.0.1:5432 (trust auth)");
        let stale: Vec<String> =
            sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'keel_bench_%'")
                .fetch_all(&admin)
                .await
                .unwrap_or_default();
        for db in stale {
            let pid = db.split('_').nth(2).unwrap_or("");
            if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
                )))
                .execute(&admin)
                .await;
            }
        }
        let name = format!(
            "keel_bench_{}_{:x}",
            std::process::id(),
            keel_core::codec::rand::next_u64() >> 16
        );
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("create the bench database");
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(max_connections)
            .connect(&Self::url_of(&name))
            .await
            .expect("connect to the bench database");
        Db { admin, name, pool }
    }

    fn url_of(name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:5432/{name}")
    }

    async fn exec(&self, sql: &'static str) {
        sqlx::query(sql)
            .execute(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    async fn drop_db(self) {
        self.pool.close().await;
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&self.admin)
        .await;
    }
}

/// The order messages are published in: every message once, and every tenth again
/// [`REDELIVERY_LAG`] messages later (those near the end after the last original).
fn delivery_order(n: u64) -> Vec<u64> {
    let mut order = Vec::with_capacity(usize::try_from(n + n / 10 + 1).unwrap());
    for i in 0..n {
        order.push(i);
        if i >= REDELIVERY_LAG && (i - REDELIVERY_LAG) % 10 == 0 {
            order.push(i - REDELIVERY_LAG);
        }
    }
    order.extend((n.saturating_sub(REDELIVERY_LAG)..n).filter(|j| j % 10 == 0));
    order
}

/// A fresh stream holding `order` (message `i` has id `m-i` and amount 1). Publishes are
/// pipelined, 1000 acks outstanding at most; this is set-up, not measured.
async fn fill_stream(nats: &Nats, stream: &str, order: &[u64]) {
    let subject = format!("{}.orders", stream.to_lowercase());
    nats.ensure_stream(stream, vec![subject.clone()])
        .await
        .expect("create the stream");
    let js = nats.jetstream();
    let mut pending = Vec::with_capacity(1000);
    for i in order {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("keel-message-id", format!("m-{i}").as_str());
        pending.push(
            js.publish_with_headers(subject.clone(), headers, bytes::Bytes::from_static(b"1"))
                .await
                .expect("publish"),
        );
        if pending.len() == 1000 {
            for ack in pending.drain(..) {
                ack.await.expect("publish ack");
            }
        }
    }
    for ack in pending {
        ack.await.expect("publish ack");
    }
}

/// Drain `deliveries` messages from `stream` with a pull consumer configured like Keel's
/// (explicit acks, `max_ack_pending` = 4 × concurrency), acking each and nothing else.
/// Returns the seconds from consumer creation to the last ack.
async fn broker_only(nats: &Nats, stream: &str, deliveries: u64, concurrency: usize) -> f64 {
    let start = Instant::now();
    let consumer: jetstream::consumer::PullConsumer = nats
        .jetstream()
        .get_stream(stream)
        .await
        .expect("get the stream")
        .get_or_create_consumer(
            CONSUMER,
            pull::Config {
                durable_name: Some(CONSUMER.to_string()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_deliver: -1,
                max_ack_pending: i64::try_from(concurrency * 4).unwrap(),
                ..Default::default()
            },
        )
        .await
        .expect("create the consumer");
    let acked = AtomicU64::new(0);
    let done = Notify::new();
    let messages = consumer.messages().await.expect("consume");
    let finished = tokio::time::timeout(
        PHASE_TIMEOUT,
        messages
            .take_until(done.notified())
            .for_each_concurrent(concurrency, |delivery| {
                let (acked, done) = (&acked, &done);
                async move {
                    let Ok(m) = delivery else { return };
                    if m.ack().await.is_ok()
                        && acked.fetch_add(1, Ordering::Relaxed) + 1 == deliveries
                    {
                        done.notify_one();
                    }
                }
            }),
    )
    .await;
    assert!(
        finished.is_ok(),
        "broker-only consumer: {} of {deliveries} acked after {PHASE_TIMEOUT:?}",
        acked.load(Ordering::Relaxed)
    );
    start.elapsed().as_secs_f64()
}

/// pgbench's result: (transactions, seconds, tps without connection time).
struct Pgbench {
    transactions: u64,
    seconds: f64,
    tps: f64,
}

/// Run Keel's per-delivery SQL through pgbench against `db` for `seconds`.
fn pgbench(db: &str, concurrency: usize, seconds: u64) -> Pgbench {
    let dir = tempfile::tempdir().expect("temp dir");
    let apply = dir.path().join("apply.sql");
    let duplicate = dir.path().join("duplicate.sql");
    // A new message: claim, effect, commit. The ids are random, so (like Keel's) the claim
    // almost never conflicts.
    std::fs::write(
        &apply,
        "\\set id random(1, 1000000000)\n\
         BEGIN;\n\
         INSERT INTO keel_inbox (consumer, message_id, received_at) VALUES ('bench', :id::text, 0) ON CONFLICT DO NOTHING;\n\
         INSERT INTO ledger (message_id, amount) VALUES (:id::text, 1);\n\
         COMMIT;\n",
    )
    .expect("write the apply script");
    // A redelivery: the claim finds the existing row (seeded `dup-1` … `dup-1000`), and Keel
    // rolls back without running the handler.
    std::fs::write(
        &duplicate,
        "\\set d random(1, 1000)\n\
         BEGIN;\n\
         INSERT INTO keel_inbox (consumer, message_id, received_at) VALUES ('bench', 'dup-' || :d::text, 0) ON CONFLICT DO NOTHING;\n\
         ROLLBACK;\n",
    )
    .expect("write the duplicate script");
    let out = std::process::Command::new(pgbench_binary())
        .args(["-n", "-M", "prepared", "-j", "2"])
        .args(["-c", &concurrency.to_string(), "-T", &seconds.to_string()])
        .arg("-f")
        .arg(format!("{}@10", apply.display()))
        .arg("-f")
        .arg(format!("{}@1", duplicate.display()))
        .arg(db)
        .output()
        .expect("run pgbench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench failed: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |prefix: &str| -> f64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("pgbench output without `{prefix}`:\n{stdout}"))
    };
    let failed = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of failed transactions: "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert_eq!(failed, 0, "pgbench transactions failed:\n{stdout}");
    let tps = stdout
        .lines()
        .find(|l| l.contains("without initial connection time"))
        .and_then(|l| l.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("pgbench output without tps:\n{stdout}"));
    let transactions = field("number of transactions actually processed: ") as u64;
    Pgbench {
        transactions,
        seconds: transactions as f64 / tps,
        tps,
    }
}

/// `pgbench` on the PATH, else the newest PostgreSQL's own (Debian keeps it there).
fn pgbench_binary() -> String {
    let on_path = std::process::Command::new("pgbench")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if on_path {
        return "pgbench".into();
    }
    let mut found: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin/pgbench"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found
        .pop()
        .map(|p| p.display().to_string())
        .expect("pgbench (PATH or /usr/lib/postgresql/*/bin)")
}

/// Run Keel's consumer over `stream` until `deliveries` were applied or found duplicate.
/// Returns the seconds from start to the last one, and the consumer's counters.
async fn keel(
    nats: &Nats,
    store: &PgStore,
    stream: &str,
    deliveries: u64,
    concurrency: usize,
    batch: usize,
) -> (f64, Arc<ConsumerStats>) {
    let mut cfg = ConsumerConfig::new(stream, CONSUMER);
    cfg.max_in_flight = concurrency;
    cfg.batch = batch;
    let stats = Arc::new(ConsumerStats::default());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let start = Instant::now();
    let consumer = {
        let (nats, store, stats) = (nats.clone(), store.clone(), stats.clone());
        tokio::spawn(async move {
            run(&nats, &cfg, &store, &Ledger, stats, async {
                let _ = stop_rx.await;
            })
            .await
        })
    };
    let seen = || stats.applied.load(Ordering::Relaxed) + stats.duplicates.load(Ordering::Relaxed);
    // Polling every millisecond costs nothing measurable and bounds the timing error far
    // below a run's length.
    while seen() < deliveries {
        assert!(
            start.elapsed() < PHASE_TIMEOUT,
            "Keel consumer: {} of {deliveries} after {PHASE_TIMEOUT:?}: {stats:?}",
            seen()
        );
        assert!(!consumer.is_finished(), "Keel consumer stopped: {stats:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = stop_tx.send(());
    consumer
        .await
        .expect("consumer task")
        .expect("consumer run");
    (secs, stats)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().map_or(50_000, |a| a.parse().expect("N"));
    let concurrency: usize = args.next().map_or(16, |a| a.parse().expect("CONCURRENCY"));
    let pgbench_secs: u64 = args
        .next()
        .map_or(10, |a| a.parse().expect("PGBENCH_SECONDS"));
    let batch: usize = args.next().map_or(16, |a| a.parse().expect("BATCH"));
    let load_start = loadavg();

    let db = Db::create(u32::try_from(concurrency).unwrap()).await;
    let store = PgStore::new(db.pool.clone());
    store.migrate().await.expect("migrate the inbox");
    db.exec("CREATE TABLE ledger (message_id TEXT NOT NULL, amount BIGINT NOT NULL)")
        .await;
    let pg_version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&db.pool)
        .await
        .expect("server version");
    let nats = Nats::connect(NATS_URL)
        .await
        .expect("NATS JetStream on 127.0.0.1:4222");
    let nats_version = nats.jetstream().client().server_info().version;

    let order = delivery_order(n);
    let deliveries = order.len() as u64;
    let tag = format!(
        "{}X{:X}",
        std::process::id(),
        keel_core::codec::rand::next_u64() >> 24
    );
    let (broker_stream, keel_stream) = (format!("KEELBB{tag}"), format!("KEELBK{tag}"));

    // 1. Broker only.
    fill_stream(&nats, &broker_stream, &order).await;
    let broker_secs = broker_only(&nats, &broker_stream, deliveries, concurrency).await;
    let _ = nats.delete_stream(&broker_stream).await;

    // 2. pgbench. A checkpoint before each database phase, so neither inherits the other's
    // dirty pages to flush.
    db.exec(
        "INSERT INTO keel_inbox (consumer, message_id, received_at) \
         SELECT 'bench', 'dup-' || g, 0 FROM generate_series(1, 1000) g",
    )
    .await;
    db.exec("CHECKPOINT").await;
    let pg = pgbench(&Db::url_of(&db.name), concurrency, pgbench_secs);
    db.exec("TRUNCATE keel_inbox, ledger").await;
    db.exec("CHECKPOINT").await;

    // 3. Keel.
    fill_stream(&nats, &keel_stream, &order).await;
    let (keel_secs, stats) =
        keel(&nats, &store, &keel_stream, deliveries, concurrency, batch).await;
    let _ = nats.delete_stream(&keel_stream).await;
    let (rows, distinct, sum): (i64, i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COUNT(DISTINCT message_id), CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM ledger",
    )
    .fetch_one(&db.pool)
    .await
    .expect("ledger totals");
    let n_i64 = i64::try_from(n).unwrap();
    let exactly_once = rows == n_i64 && distinct == n_i64 && sum == n_i64;

    let broker_rate = deliveries as f64 / broker_secs;
    let keel_rate = deliveries as f64 / keel_secs;
    let (ceiling_name, ceiling) = if broker_rate <= pg.tps {
        ("broker only", broker_rate)
    } else {
        ("pgbench", pg.tps)
    };
    let ratio = keel_rate / ceiling;
    let load_end = loadavg();

    println!("## S4 — message consumer, idempotent insert in PostgreSQL, 10 % redeliveries");
    println!();
    println!(
        "N = {n} messages, {deliveries} deliveries ({} redeliveries), concurrency {concurrency}, batch {batch}; \
         PostgreSQL {pg_version}, NATS {nats_version}, {} CPUs",
        deliveries - n,
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    println!();
    println!("load average at start: {load_start}");
    println!();
    println!("| system | deliveries | seconds | rate/s |");
    println!("|---|---:|---:|---:|");
    println!(
        "| broker only (JetStream pull consumer, ack only) | {deliveries} | {broker_secs:.2} | {broker_rate:.0} |"
    );
    println!(
        "| pgbench (same SQL, apply : redelivery = 10 : 1) | {} | {:.2} | {:.0} |",
        pg.transactions, pg.seconds, pg.tps
    );
    println!(
        "| Keel consumer (nats::run, PostgreSQL inbox) | {deliveries} | {keel_secs:.2} | {keel_rate:.0} |"
    );
    println!();
    println!("ceiling = min(broker, pgbench) = {ceiling:.0}/s ({ceiling_name})");
    println!(
        "ratio = keel / ceiling = {ratio:.3} → T5 (≥ 0.9): {}",
        if ratio >= 0.9 { "met" } else { "NOT met" }
    );
    println!(
        "duplicate effects: ledger rows {rows}, distinct ids {distinct}, sum {sum} (expected {n} each) → {}",
        if exactly_once {
            "zero duplicate effects"
        } else {
            "DUPLICATE OR MISSING EFFECTS"
        }
    );
    println!(
        "Keel counters: applied {}, duplicates {}, broker redeliveries {}, store errors {}, retries {}",
        stats.applied.load(Ordering::Relaxed),
        stats.duplicates.load(Ordering::Relaxed),
        stats.redelivered.load(Ordering::Relaxed),
        stats.store_errors.load(Ordering::Relaxed),
        stats.retries.load(Ordering::Relaxed),
    );
    println!();
    println!("load average at end: {load_end}");

    db.drop_db().await;
    if !exactly_once {
        std::process::exit(1);
    }
}
