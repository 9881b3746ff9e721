//! The inbox/outbox protocol against real stores: PostgreSQL (the machine's server, a fresh
//! database per test) and SQLite (a temporary file). Every delivery of a message applies its
//! effect once; a failing handler leaves neither effect nor outbox row; the relay publishes in
//! order and marks rows sent; retention prunes.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use common::PgDb;
use keel_core::BoxError;
use keel_messaging::consume::{Handler, Processed, process};
use keel_messaging::message::{IdSource, MESSAGE_ID_HEADER, Message};
use keel_messaging::retry::RetryPolicy;
use keel_messaging::store::{Outgoing, PgStore, PgTx, Publisher, SqliteStore, SqliteTx};

/// Collects what the relay publishes; fails while `failing`.
#[derive(Default)]
struct Collect {
    got: Mutex<Vec<Outgoing>>,
    failing: Mutex<bool>,
}

impl Publisher for Collect {
    async fn publish(&self, msg: &Outgoing) -> Result<(), BoxError> {
        if *self.failing.lock().unwrap() {
            return Err("broker unreachable".into());
        }
        self.got.lock().unwrap().push(msg.clone());
        Ok(())
    }
}

/// The handler: books the order's amount in `ledger` and announces it through the outbox,
/// both in the delivery's transaction. A negative amount is refused.
struct Book;

fn amount(msg: &Message) -> Result<i64, BoxError> {
    let v: i64 = String::from_utf8_lossy(&msg.payload).parse()?;
    if v < 0 {
        return Err(format!("negative amount {v}").into());
    }
    Ok(v)
}

impl Handler<PgTx> for Book {
    async fn handle(&self, msg: &Message, tx: &mut PgTx) -> Result<(), BoxError> {
        let v = amount(msg)?;
        sqlx::query("INSERT INTO ledger (order_id, amount) VALUES ($1, $2)")
            .bind(&msg.id)
            .bind(v)
            .execute(tx.conn())
            .await?;
        tx.publish("booked", None, msg.id.as_bytes(), BTreeMap::new())
            .await?;
        Ok(())
    }
}

impl Handler<SqliteTx> for Book {
    async fn handle(&self, msg: &Message, tx: &mut SqliteTx) -> Result<(), BoxError> {
        let v = amount(msg)?;
        sqlx::query("INSERT INTO ledger (order_id, amount) VALUES (?1, ?2)")
            .bind(&msg.id)
            .bind(v)
            .execute(tx.conn())
            .await?;
        tx.publish("booked", None, msg.id.as_bytes(), BTreeMap::new())
            .await?;
        Ok(())
    }
}

fn msg(id: &str, amount: i64, attempt: u32) -> Message {
    Message {
        id: id.to_string(),
        id_source: IdSource::Keel,
        system: "embedded",
        destination: "orders".into(),
        key: None,
        payload: Bytes::from(amount.to_string()),
        headers: BTreeMap::new(),
        attempt,
    }
}

async fn sqlite() -> (SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("shop.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    (SqliteStore::new(pool), dir)
}

/// The scenario both stores must pass.
macro_rules! exactly_once_scenario {
    ($store:expr, $create_ledger:expr) => {{
        let store = $store;
        store.migrate().await.unwrap();
        store.migrate().await.unwrap(); // idempotent
        sqlx::query($create_ledger)
            .execute(store.pool())
            .await
            .unwrap();
        let policy = RetryPolicy {
            max_attempts: 2,
            ..RetryPolicy::default()
        };
        let count = |sql: &'static str| {
            let pool = store.pool().clone();
            async move {
                let n: i64 = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
                n
            }
        };

        // Three deliveries of one message (a redelivery after a crash, and a broker
        // duplicate): one ledger row, one outbox row.
        let first = process(
            &store,
            "billing",
            &Book,
            &msg("order-1", 40, 1),
            &policy,
            None,
        )
        .await
        .unwrap();
        assert!(matches!(first, Processed::Applied), "{first:?}");
        for attempt in 2..=3 {
            let again = process(
                &store,
                "billing",
                &Book,
                &msg("order-1", 40, attempt),
                &policy,
                None,
            )
            .await
            .unwrap();
            assert!(matches!(again, Processed::Duplicate), "{again:?}");
        }
        assert_eq!(count("SELECT COUNT(*) FROM ledger").await, 1);
        assert_eq!(
            count("SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM ledger").await,
            40
        );

        // A refused message: no effect, no outbox row, no claim; dead-lettered at the last attempt.
        let r = process(
            &store,
            "billing",
            &Book,
            &msg("order-2", -5, 1),
            &policy,
            None,
        )
        .await
        .unwrap();
        assert!(matches!(r, Processed::Retry(..)), "{r:?}");
        let r = process(
            &store,
            "billing",
            &Book,
            &msg("order-2", -5, 2),
            &policy,
            None,
        )
        .await
        .unwrap();
        assert!(matches!(r, Processed::DeadLetter(_)), "{r:?}");
        assert_eq!(count("SELECT COUNT(*) FROM ledger").await, 1);
        assert_eq!(count("SELECT COUNT(*) FROM keel_outbox").await, 1);
        assert_eq!(count("SELECT COUNT(*) FROM keel_inbox").await, 1);

        // More orders, then the relay: in order, marked sent, nothing twice; a broker outage
        // stops it without losing the row.
        for i in 3..6 {
            let id = format!("order-{i}");
            process(&store, "billing", &Book, &msg(&id, i, 1), &policy, None)
                .await
                .unwrap();
        }
        let broker = Collect::default();
        *broker.failing.lock().unwrap() = true;
        assert_eq!(store.relay_once(&broker, 100).await.unwrap(), 0);
        *broker.failing.lock().unwrap() = false;
        assert_eq!(store.relay_once(&broker, 2).await.unwrap(), 2);
        assert_eq!(store.relay_once(&broker, 100).await.unwrap(), 2);
        assert_eq!(store.relay_once(&broker, 100).await.unwrap(), 0);
        let got = broker.got.lock().unwrap().clone();
        let payloads: Vec<&[u8]> = got.iter().map(|m| m.payload.as_ref()).collect();
        assert_eq!(
            payloads,
            vec![&b"order-1"[..], b"order-3", b"order-4", b"order-5"]
        );
        assert!(got.windows(2).all(|w| w[0].seq < w[1].seq));
        for m in &got {
            assert_eq!(m.headers.get(MESSAGE_ID_HEADER), Some(&m.message_id));
            assert_eq!(m.destination, "booked");
        }

        // Retention: nothing is old yet; everything is once the horizon is zero.
        assert_eq!(store.prune(Duration::from_secs(3600)).await.unwrap(), 0);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(store.prune(Duration::ZERO).await.unwrap(), 4 + 4);
        assert_eq!(count("SELECT COUNT(*) FROM keel_inbox").await, 0);
    }};
}

#[tokio::test]
async fn postgres_applies_each_message_once_and_relays_the_outbox_in_order() {
    let db = PgDb::new().await;
    exactly_once_scenario!(
        PgStore::new(db.pool.clone()),
        "CREATE TABLE ledger (order_id TEXT PRIMARY KEY, amount BIGINT NOT NULL)"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn sqlite_applies_each_message_once_and_relays_the_outbox_in_order() {
    let (store, _dir) = sqlite().await;
    exactly_once_scenario!(
        store,
        "CREATE TABLE ledger (order_id TEXT PRIMARY KEY, amount INTEGER NOT NULL)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deliveries_of_one_message_apply_it_once_in_postgres() {
    let db = PgDb::new().await;
    let store = PgStore::new(db.pool.clone());
    store.migrate().await.unwrap();
    sqlx::query("CREATE TABLE ledger (order_id TEXT NOT NULL, amount BIGINT NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap();
    let policy = RetryPolicy::default();
    // Eight consumers race on the same delivery (a rebalance handing it to several at once):
    // the inbox's primary key lets exactly one apply it.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        let policy = policy.clone();
        tasks.push(tokio::spawn(async move {
            process(
                &store,
                "billing",
                &Book,
                &msg("order-race", 7, 1),
                &policy,
                None,
            )
            .await
        }));
    }
    let mut applied = 0;
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Processed::Applied => applied += 1,
            Processed::Duplicate => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(applied, 1);
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ledger")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(rows, 1, "one effect, however many raced");
    db.drop_db().await;
}

/// Confirms the first `n` messages it is ever given, then fails.
struct FailAfter {
    left: Mutex<usize>,
    got: Mutex<Vec<Outgoing>>,
}

impl Publisher for FailAfter {
    async fn publish(&self, msg: &Outgoing) -> Result<(), BoxError> {
        let mut left = self.left.lock().unwrap();
        if *left == 0 {
            return Err("connection reset".into());
        }
        *left -= 1;
        self.got.lock().unwrap().push(msg.clone());
        Ok(())
    }
}

#[tokio::test]
async fn a_failure_mid_batch_marks_exactly_the_confirmed_rows_and_the_next_pass_resumes() {
    use keel_messaging::consume::{Inbox, Tx};
    let (store, _dir) = sqlite().await;
    store.migrate().await.unwrap();
    let mut tx = store.begin().await.unwrap();
    for i in 0..5 {
        tx.publish("orders", None, format!("m{i}").as_bytes(), BTreeMap::new())
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let broker = FailAfter {
        left: Mutex::new(2),
        got: Mutex::new(Vec::new()),
    };
    assert_eq!(store.relay_once(&broker, 100).await.unwrap(), 2);
    assert_eq!(store.backlog().await.unwrap(), 3);
    *broker.left.lock().unwrap() = 10;
    assert_eq!(store.relay_once(&broker, 100).await.unwrap(), 3);
    let got: Vec<Vec<u8>> = broker
        .got
        .lock()
        .unwrap()
        .iter()
        .map(|m| m.payload.to_vec())
        .collect();
    let want: Vec<Vec<u8>> = (0..5).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(got, want, "in order, each once");
}

#[tokio::test]
async fn the_relay_loop_counts_backlog_and_refusals_and_retention_prunes_what_is_old() {
    use keel_messaging::consume::{Inbox, Tx};
    use keel_messaging::transport::StoreStats;
    use std::sync::atomic::Ordering;
    let (store, _dir) = sqlite().await;
    store.migrate().await.unwrap();
    let mut tx = store.begin().await.unwrap();
    assert!(tx.claim("billing", "seen-1").await.unwrap());
    for i in 0..6 {
        tx.publish("orders", None, format!("m{i}").as_bytes(), BTreeMap::new())
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    // The broker confirms two, refuses, then takes everything.
    let broker = FailAfter {
        left: Mutex::new(2),
        got: Mutex::new(Vec::new()),
    };
    let stats = StoreStats::default();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let relay = store.run_relay_observed(&broker, 100, Duration::from_millis(10), &stats, async {
        let _ = stop_rx.await;
    });
    let drive = async {
        assert!(
            common::wait_for(Duration::from_secs(5), || async {
                stats.relay_failures.load(Ordering::SeqCst) >= 1
            })
            .await
        );
        assert_eq!(
            stats.backlog.load(Ordering::SeqCst),
            4,
            "seen after the refusal"
        );
        *broker.left.lock().unwrap() = 100;
        assert!(
            common::wait_for(Duration::from_secs(5), || async {
                stats.published.load(Ordering::SeqCst) == 6
                    && stats.backlog.load(Ordering::SeqCst) == 0
            })
            .await,
            "{stats:?}"
        );
        let _ = stop_tx.send(());
    };
    tokio::join!(relay, drive);
    assert_eq!(broker.got.lock().unwrap().len(), 6, "each sent once");

    // Retention: nothing is old enough at a week; at zero age the sent rows and the claim go.
    let week = Duration::from_secs(7 * 24 * 3600);
    // A stop that is already there: one pass, then return.
    store
        .run_retention(
            week,
            Duration::from_secs(3600),
            &stats,
            std::future::ready(()),
        )
        .await;
    assert_eq!(stats.pruned.load(Ordering::SeqCst), 0);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let retention = store.run_retention(Duration::ZERO, Duration::from_millis(5), &stats, async {
        let _ = stop_rx.await;
    });
    let drive = async {
        assert!(
            common::wait_for(Duration::from_secs(5), || async {
                stats.pruned.load(Ordering::SeqCst) == 7
            })
            .await,
            "{stats:?}"
        );
        let _ = stop_tx.send(());
    };
    tokio::join!(retention, drive);
}

#[tokio::test]
async fn a_postgres_batch_claims_in_one_statement_and_applies_each_new_message_once() {
    use common::Ledger;
    use keel_messaging::consume::process_batch;
    let db = PgDb::new().await;
    let store = PgStore::new(db.pool.clone());
    store.migrate().await.unwrap();
    Ledger::create(&store).await;
    let policy = RetryPolicy::default();
    let amount_msg = msg;
    process(
        &store,
        "ledger",
        &Ledger,
        &amount_msg("p1", 1, 1),
        &policy,
        None,
    )
    .await
    .unwrap();
    // p1 is known; p2 arrives twice in the batch; p3 is new.
    let batch = [
        amount_msg("p1", 1, 2),
        amount_msg("p2", 10, 1),
        amount_msg("p2", 10, 2),
        amount_msg("p3", 100, 1),
    ];
    let r = process_batch(&store, "ledger", &Ledger, &batch, &policy, None)
        .await
        .unwrap();
    let applied: Vec<bool> = r.iter().map(|x| matches!(x, Processed::Applied)).collect();
    assert_eq!(applied, [false, true, false, true], "{r:?}");
    assert!(matches!(r[0], Processed::Duplicate) && matches!(r[2], Processed::Duplicate));
    assert_eq!(Ledger::totals(&store).await, (3, 3, 111));

    // A poison message in a batch: the others are applied, it alone is retried.
    let batch = [amount_msg("p4", 1000, 1), amount_msg("p5", -1, 1)];
    let r = process_batch(&store, "ledger", &Ledger, &batch, &policy, None)
        .await
        .unwrap();
    assert!(matches!(r[0], Processed::Applied), "{r:?}");
    assert!(matches!(r[1], Processed::Retry(..)), "{r:?}");
    assert_eq!(Ledger::totals(&store).await, (4, 4, 1111));
    db.drop_db().await;
}
