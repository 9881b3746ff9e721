//! The RabbitMQ transport against the machine's RabbitMQ (fresh queues per test) with the
//! inbox and outbox in PostgreSQL: connection resets mid-stream (through the in-repo fault
//! proxy) lose nothing and apply nothing twice; a poison message goes through the retry queue
//! and ends in the dead-letter queue with its error, while the rest are applied.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Ledger, PgDb, stream_name};
use keel_messaging::rabbitmq::{
    ConsumerConfig, ConsumerStats, ERROR_HEADER, Rabbit, run_reconnecting,
};
use keel_messaging::retry::RetryPolicy;
use keel_messaging::store::PgStore;
use keel_test_support::fault::FaultProxy;

const RABBIT: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_poison_and_retries_end_with_every_good_message_applied_once() {
    let db = PgDb::new().await;
    let store = PgStore::new(db.pool.clone());
    store.migrate().await.unwrap();
    Ledger::create(&store).await;
    let direct = Rabbit::connect(RABBIT).await.unwrap();
    let queue = format!("keel-test-{}", stream_name().to_lowercase());
    direct.declare(&queue).await.unwrap();

    let n = 1500i64;
    let poison = 700;
    let amounts = (0..n).map(|i| if i == poison { -1 } else { i });
    common::produce(&store, &direct, &queue, amounts).await;

    let proxy = FaultProxy::start("127.0.0.1:5672".parse().unwrap())
        .await
        .unwrap();
    let uri = format!("amqp://guest:guest@{}/%2f", proxy.addr());
    let mut cfg = ConsumerConfig::new(&queue);
    cfg.retry = RetryPolicy {
        max_attempts: 3,
        base: Duration::from_millis(20),
        max: Duration::from_millis(100),
    };
    let stats = Arc::new(ConsumerStats::default());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let consumer = {
        let (cfg, store, stats) = (cfg.clone(), store.clone(), stats.clone());
        tokio::spawn(async move {
            run_reconnecting(&uri, &cfg, &store, &Ledger, stats, async {
                let _ = stop_rx.await;
            })
            .await;
        })
    };
    let mut resets = 0;
    while resets < 3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if Ledger::totals(&store).await.1 < n - 1 {
            proxy.reset_all();
            resets += 1;
        } else {
            break;
        }
    }
    let done = common::wait_for(Duration::from_secs(60), || {
        let (store, stats) = (store.clone(), stats.clone());
        async move {
            Ledger::totals(&store).await.1 == n - 1
                && stats.dead_lettered.load(Ordering::SeqCst) == 1
        }
    })
    .await;
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(10), consumer)
        .await
        .expect("a clean stop returns")
        .unwrap();
    let (rows, distinct, sum) = Ledger::totals(&store).await;
    eprintln!("resets: {resets}, stats {stats:?}");
    assert!(done, "{distinct} of {} applied; {stats:?}", n - 1);
    assert!(resets >= 1);
    assert_eq!(
        (rows, distinct),
        (n - 1, n - 1),
        "nothing lost, nothing applied twice"
    );
    assert_eq!(sum, (0..n).sum::<i64>() - poison);
    assert!(stats.retries.load(Ordering::SeqCst) >= 2, "{stats:?}");

    // The dead-letter queue holds the poison with its error.
    let ch = {
        let c = lapin::Connection::connect(RABBIT, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        c.create_channel().await.unwrap()
    };
    let got = ch
        .basic_get(
            format!("{queue}.dlq").into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("one dead letter");
    assert_eq!(&got.delivery.data[..], b"-1");
    let headers = got.delivery.properties.headers().clone().unwrap();
    let err = match headers.inner().get(ERROR_HEADER) {
        Some(lapin::types::AMQPValue::LongString(s)) => {
            String::from_utf8_lossy(s.as_bytes()).into_owned()
        }
        other => format!("{other:?}"),
    };
    assert!(err.contains("negative amount -1"), "{err}");

    direct.delete(&queue).await.unwrap();
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_resets_during_relay_publishing_lose_nothing_and_double_nothing() {
    use keel_messaging::rabbitmq::RabbitPublisher;

    let db = PgDb::new().await;
    let store = PgStore::new(db.pool.clone());
    store.migrate().await.unwrap();
    Ledger::create(&store).await;
    let direct = Rabbit::connect(RABBIT).await.unwrap();
    let queue = format!("keel-test-{}", stream_name().to_lowercase());
    direct.declare(&queue).await.unwrap();
    let n = 3000i64;
    common::write_outbox(&store, &queue, 0..n, false).await;

    // The relay publishes through the fault proxy, whose connections are reset under it.
    let proxy = FaultProxy::start("127.0.0.1:5672".parse().unwrap())
        .await
        .unwrap();
    let publisher = RabbitPublisher::new(&format!("amqp://guest:guest@{}/%2f", proxy.addr()));
    let stats = keel_messaging::transport::StoreStats::default();
    let relay = store.run_relay_observed(&publisher, 50, Duration::from_millis(5), &stats, async {
        // Reset the connections as the relay passes these marks.
        let mut marks = vec![2 * n as u64 / 3, n as u64 / 3, 100];
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
            if store.backlog().await.unwrap_or(1) == 0 {
                return;
            }
            if marks
                .last()
                .is_some_and(|m| stats.published.load(Ordering::SeqCst) >= *m)
            {
                marks.pop();
                proxy.reset_all();
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(60), relay)
        .await
        .expect("the relay drained the outbox despite the resets");
    eprintln!("relay {stats:?}, {} connections", publisher.connections());
    assert!(
        publisher.connections() >= 2,
        "the resets cut the relay's connection and it reconnected: {stats:?}"
    );

    // Whatever the resets made the relay publish twice, the consumer applies once.
    let cfg = ConsumerConfig::new(&queue);
    let cstats = Arc::new(ConsumerStats::default());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let consumer = {
        let (cfg, store, cstats) = (cfg.clone(), store.clone(), cstats.clone());
        tokio::spawn(async move {
            run_reconnecting(RABBIT, &cfg, &store, &Ledger, cstats, async {
                let _ = stop_rx.await;
            })
            .await;
        })
    };
    let done = common::wait_for(Duration::from_secs(60), || {
        let store = store.clone();
        async move { Ledger::totals(&store).await.1 == n }
    })
    .await;
    // Let any late duplicate arrive before counting rows.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(10), consumer)
        .await
        .unwrap()
        .unwrap();
    let (rows, distinct, sum) = Ledger::totals(&store).await;
    assert!(done, "{distinct} of {n} applied; {cstats:?}");
    assert_eq!(
        (rows, distinct),
        (n, n),
        "nothing lost, nothing applied twice"
    );
    assert_eq!(sum, (0..n).sum::<i64>());
    direct.delete(&queue).await.unwrap();
    db.drop_db().await;
}

/// Logs each message's amount with a sequence number, in the inbox transaction.
struct SeqLog;

impl keel_messaging::consume::Handler<keel_messaging::store::PgTx> for SeqLog {
    async fn handle(
        &self,
        msg: &keel_messaging::message::Message,
        tx: &mut keel_messaging::store::PgTx,
    ) -> Result<(), keel_core::BoxError> {
        let amount: i64 = String::from_utf8_lossy(&msg.payload).parse()?;
        sqlx::query("INSERT INTO seq_log (amount) VALUES ($1)")
            .bind(amount)
            .execute(tx.conn())
            .await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_queue_is_applied_in_order_by_one_active_consumer_of_two() {
    let db = PgDb::new().await;
    let store = PgStore::new(db.pool.clone());
    store.migrate().await.unwrap();
    sqlx::query("CREATE TABLE seq_log (pos BIGSERIAL PRIMARY KEY, amount BIGINT NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap();
    let rabbit = Rabbit::connect(RABBIT).await.unwrap();
    let queue = format!("keel-test-{}", stream_name().to_lowercase());
    rabbit.declare_with(&queue, true).await.unwrap();
    let n = 400i64;
    common::produce(&store, &rabbit, &queue, 0..n).await;

    let mut cfg = ConsumerConfig::new(&queue);
    cfg.ordered = true;
    let mut consumers = Vec::new();
    let mut stops = Vec::new();
    let mut all_stats = Vec::new();
    for _ in 0..2 {
        let stats = Arc::new(ConsumerStats::default());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (cfg, store, s) = (cfg.clone(), store.clone(), stats.clone());
        consumers.push(tokio::spawn(async move {
            run_reconnecting(RABBIT, &cfg, &store, &SeqLog, s, async {
                let _ = stop_rx.await;
            })
            .await;
        }));
        stops.push(stop_tx);
        all_stats.push(stats);
    }
    let done = common::wait_for(Duration::from_secs(60), || {
        let pool = store.pool().clone();
        async move {
            let c: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM seq_log")
                .fetch_one(&pool)
                .await
                .unwrap();
            c >= n
        }
    })
    .await;
    for s in stops {
        let _ = s.send(());
    }
    for c in consumers {
        tokio::time::timeout(Duration::from_secs(10), c)
            .await
            .unwrap()
            .unwrap();
    }
    assert!(done);
    let amounts: Vec<i64> = sqlx::query_scalar("SELECT amount FROM seq_log ORDER BY pos")
        .fetch_all(store.pool())
        .await
        .unwrap();
    assert_eq!(
        amounts,
        (0..n).collect::<Vec<_>>(),
        "applied in queue order"
    );
    let applied: Vec<u64> = all_stats
        .iter()
        .map(|s| s.applied.load(Ordering::SeqCst))
        .collect();
    assert!(
        applied.contains(&0) && applied.contains(&(n as u64)),
        "one consumer was active, the other stood by: {applied:?}"
    );
    rabbit.delete(&queue).await.unwrap();
    db.drop_db().await;
}
