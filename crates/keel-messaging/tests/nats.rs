//! The NATS JetStream transport against the machine's NATS server (a fresh stream per test)
//! with the inbox and outbox in PostgreSQL (a fresh database per test): outbox → relay →
//! JetStream → consumer → exactly one effect each; a poison message is dead-lettered with its
//! error while the others go through; a clean stop leaves nothing to redeliver.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Ledger, PgDb, stream_name};
use futures_util::StreamExt;
use keel_messaging::nats::{ConsumerConfig, ConsumerStats, ERROR_HEADER, Nats, run};
use keel_messaging::retry::RetryPolicy;
use keel_messaging::store::PgStore;

const NATS: &str = "nats://127.0.0.1:4222";

/// The message ids a consumer processed, as applied or as duplicates (what its observer saw).
#[derive(Default)]
struct Outcomes(std::sync::Mutex<Vec<(String, bool)>>);

impl Outcomes {
    fn ids(&self, duplicate: bool) -> std::collections::HashSet<String> {
        let seen = self.0.lock().unwrap();
        seen.iter()
            .filter(|(_, d)| *d == duplicate)
            .map(|(id, _)| id.clone())
            .collect()
    }
}

impl keel_core::observe::Observer for Outcomes {
    fn server(&self, _: &keel_core::observe::ServerRecord<'_>) {}
    fn client(&self, _: &keel_core::observe::ClientRecord<'_>) {}
    fn message(&self, r: &keel_core::observe::MessageRecord<'_>) {
        if let Some(id) = r.message_id {
            self.0.lock().unwrap().push((id.to_string(), r.duplicate));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_to_consumer_applies_each_once_dead_letters_the_poison_and_stops_clean() {
    let db = PgDb::new().await;
    let store = PgStore::new(db.pool.clone());
    store.migrate().await.unwrap();
    Ledger::create(&store).await;
    let nats = Nats::connect(NATS).await.unwrap();
    let stream = stream_name();
    let subject = format!("{}.orders", stream.to_lowercase());
    let dlq = format!("{}.dlq", stream.to_lowercase());
    nats.ensure_stream(&stream, vec![format!("{}.>", stream.to_lowercase())])
        .await
        .unwrap();

    // 300 orders through the outbox, one of them poison (a negative amount).
    let n = 300i64;
    let amounts = (0..n).map(|i| if i == 137 { -1 } else { i });
    common::produce(&store, &nats, &subject, amounts).await;

    let mut cfg = ConsumerConfig::new(&stream, "billing");
    cfg.filter_subject = subject.clone();
    cfg.dead_letter_subject = dlq.clone();
    cfg.retry = RetryPolicy {
        max_attempts: 3,
        base: Duration::from_millis(20),
        max: Duration::from_millis(100),
    };
    let stats = Arc::new(ConsumerStats::default());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let consumer = {
        let (nats, cfg, store, stats) = (nats.clone(), cfg.clone(), store.clone(), stats.clone());
        tokio::spawn(async move {
            run(&nats, &cfg, &store, &Ledger, stats, async {
                let _ = stop_rx.await;
            })
            .await
        })
    };
    let done = common::wait_for(Duration::from_secs(30), || {
        let stats = stats.clone();
        async move {
            stats.applied.load(Ordering::SeqCst) == n as u64 - 1
                && stats.dead_lettered.load(Ordering::SeqCst) == 1
        }
    })
    .await;
    assert!(done, "{stats:?}");
    stop_tx.send(()).unwrap();
    consumer.await.unwrap().unwrap();

    let (rows, distinct, sum) = Ledger::totals(&store).await;
    assert_eq!(
        (rows, distinct),
        (n - 1, n - 1),
        "every good order applied exactly once"
    );
    assert_eq!(sum, (0..n).sum::<i64>() - 137);
    assert_eq!(
        stats.retries.load(Ordering::SeqCst),
        2,
        "two retries, then the dead letter"
    );

    // The dead letter carries the error.
    let js = nats.jetstream();
    let dead = js.get_stream(&stream).await.unwrap();
    let dl: async_nats::jetstream::consumer::PullConsumer = dead
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            filter_subject: dlq.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut batch = dl
        .fetch()
        .max_messages(5)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .unwrap();
    let m = batch.next().await.unwrap().unwrap();
    let err = m
        .headers
        .as_ref()
        .unwrap()
        .get(ERROR_HEADER)
        .unwrap()
        .to_string();
    assert!(err.contains("negative amount -1"), "{err}");
    assert_eq!(&m.payload[..], b"-1");

    // A clean stop committed and acked everything: a restarted consumer gets nothing.
    let stats2 = Arc::new(ConsumerStats::default());
    let again = {
        let (nats, cfg, store, stats2) = (nats.clone(), cfg.clone(), store.clone(), stats2.clone());
        tokio::spawn(async move {
            run(
                &nats,
                &cfg,
                &store,
                &Ledger,
                stats2,
                tokio::time::sleep(Duration::from_secs(2)),
            )
            .await
        })
    };
    again.await.unwrap().unwrap();
    assert_eq!(stats2.applied.load(Ordering::SeqCst), 0, "{stats2:?}");
    assert_eq!(
        stats2.duplicates.load(Ordering::SeqCst),
        0,
        "no redelivery after a clean stop"
    );

    nats.delete_stream(&stream).await.unwrap();
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_resets_during_consumption_lose_nothing_and_double_nothing() {
    use keel_test_support::fault::FaultProxy;

    let db = PgDb::new().await;
    let store = PgStore::new(db.pool.clone());
    store.migrate().await.unwrap();
    Ledger::create(&store).await;
    let direct = Nats::connect(NATS).await.unwrap();
    let stream = stream_name();
    let subject = format!("{}.orders", stream.to_lowercase());
    direct
        .ensure_stream(&stream, vec![format!("{}.>", stream.to_lowercase())])
        .await
        .unwrap();
    let n = 2000i64;
    common::produce(&store, &direct, &subject, 0..n).await;

    // The consumer talks to NATS through the fault proxy, whose connections are reset while
    // it works.
    let proxy = FaultProxy::start("127.0.0.1:4222".parse().unwrap())
        .await
        .unwrap();
    let nats = Nats::connect(&format!("nats://{}", proxy.addr()))
        .await
        .unwrap();
    let mut cfg = ConsumerConfig::new(&stream, "resets");
    cfg.filter_subject = subject.clone();
    cfg.ack_wait = Duration::from_secs(1);
    let stats = Arc::new(ConsumerStats::default());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let consumer = {
        let (cfg, store, stats) = (cfg.clone(), store.clone(), stats.clone());
        tokio::spawn(async move {
            run(&nats, &cfg, &store, &Ledger, stats, async {
                let _ = stop_rx.await;
            })
            .await
        })
    };
    let mut resets = 0;
    while resets < 3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        if Ledger::totals(&store).await.1 < n {
            proxy.reset_all();
            resets += 1;
        } else {
            break;
        }
    }
    let done = common::wait_for(Duration::from_secs(60), || {
        let store = store.clone();
        async move { Ledger::totals(&store).await.1 == n }
    })
    .await;
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), consumer).await;
    let (rows, distinct, sum) = Ledger::totals(&store).await;
    eprintln!("resets: {resets}, stats {stats:?}");
    assert!(
        done,
        "{distinct} of {n} processed after {resets} connection resets"
    );
    assert!(resets >= 1, "the connection was reset mid-stream");
    assert_eq!(
        (rows, distinct),
        (n, n),
        "nothing lost, nothing applied twice"
    );
    assert_eq!(sum, (0..n).sum::<i64>());
    direct.delete_stream(&stream).await.unwrap();
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_in_the_lifecycle_stops_at_the_drain_and_nothing_it_applied_comes_back() {
    use keel_core::{Phase, Shutdown};
    use keel_messaging::transport::spawn_in_lifecycle;

    let db = PgDb::new().await;
    let store = PgStore::new(db.pool.clone());
    store.migrate().await.unwrap();
    Ledger::create(&store).await;
    let nats = Nats::connect(NATS).await.unwrap();
    let stream = stream_name();
    let subject = format!("{}.orders", stream.to_lowercase());
    nats.ensure_stream(&stream, vec![format!("{}.>", stream.to_lowercase())])
        .await
        .unwrap();
    let n = 3000i64;
    common::produce(&store, &nats, &subject, 0..n).await;

    let mut cfg = ConsumerConfig::new(&stream, "drained");
    cfg.filter_subject = subject.clone();
    let drained = Arc::new(Outcomes::default());
    cfg.observer = Some(drained.clone());
    // Messages the stopped consumer had fetched but not started are handed back at the drain;
    // only those still on the wire wait out ack_wait. It must stay well above the time from
    // delivery to ack on a loaded machine: at 1 s a slow commit let an applied message's ack
    // land after its redelivery had been scheduled, and the next instance saw it again.
    cfg.ack_wait = Duration::from_secs(10);
    let shutdown = Shutdown::new();
    let stats = Arc::new(ConsumerStats::default());
    {
        let (nats, cfg, store, stats) = (nats.clone(), cfg.clone(), store.clone(), stats.clone());
        spawn_in_lifecycle(&shutdown, "ledger", move |stop| async move {
            run(&nats, &cfg, &store, &Ledger, stats, stop)
                .await
                .unwrap();
        });
    }
    // Drain mid-stream, as the server's drain sequence does: advance, then await the hooks.
    assert!(
        common::wait_for(Duration::from_secs(20), || {
            let stats = stats.clone();
            async move { stats.applied.load(Ordering::SeqCst) > 200 }
        })
        .await
    );
    shutdown.advance(Phase::Draining);
    for hook in shutdown.take_hooks() {
        tokio::time::timeout(Duration::from_secs(10), hook.into_future())
            .await
            .expect("the consumer finished its in-flight messages within the drain");
    }
    let applied = stats.applied.load(Ordering::SeqCst);
    assert!(applied < n as u64, "stopped mid-stream: {applied}");
    let returned = stats.returned.load(Ordering::SeqCst);
    assert!(
        returned > 0,
        "prefetched messages were handed back: {stats:?}"
    );
    assert_eq!(
        Ledger::totals(&store).await.1,
        applied as i64,
        "every processed message committed"
    );

    // A new instance picks up where the drained one stopped: nothing it applied comes back
    // (messages it had fetched without starting them are delivered again, unapplied).
    let again = Arc::new(ConsumerStats::default());
    let next_seen = Arc::new(Outcomes::default());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let next = {
        let (nats, store, again) = (nats.clone(), store.clone(), again.clone());
        let mut cfg = cfg.clone();
        cfg.observer = Some(next_seen.clone());
        tokio::spawn(async move {
            run(&nats, &cfg, &store, &Ledger, again, async {
                let _ = stop_rx.await;
            })
            .await
        })
    };
    assert!(
        common::wait_for(Duration::from_secs(30), || {
            let store = store.clone();
            async move { Ledger::totals(&store).await.1 == n }
        })
        .await
    );
    let _ = stop_tx.send(());
    next.await.unwrap().unwrap();
    // JetStream delivers at least once, and a handed-back message may reach the next instance
    // twice (seen: one `nak`ed delivery arrived both as a redelivery and with its first
    // delivery count, in one batch); the inbox makes the second a duplicate. What must never
    // happen is that a message the drained instance *applied* comes back.
    let applied_before = drained.ids(false);
    let came_back: Vec<String> = next_seen
        .ids(true)
        .into_iter()
        .filter(|id| applied_before.contains(id))
        .collect();
    assert!(
        came_back.is_empty(),
        "applied by the drained instance, delivered again: {came_back:?}; {again:?}; the drained instance: {stats:?}"
    );
    // Nor applied a second time: an id both instances applied would be a double effect the
    // inbox exists to prevent.
    let applied_after = next_seen.ids(false);
    let twice: Vec<&String> = applied_after.intersection(&applied_before).collect();
    assert!(twice.is_empty(), "applied by both instances: {twice:?}");
    // What each instance saw, for the count below when it fails: how many ids the next
    // instance applied, saw only as duplicates, and whether the ledger holds any id twice.
    let only_duplicates: Vec<String> = next_seen
        .ids(true)
        .difference(&applied_after)
        .cloned()
        .collect();
    let ledger = Ledger::totals(&store).await;
    let seen = format!(
        "next instance {again:?}, {} distinct ids applied, ids seen only as duplicates \
         {only_duplicates:?}; drained instance {stats:?}, {} distinct ids applied; ledger \
         (rows, distinct ids, sum) {ledger:?}",
        applied_after.len(),
        applied_before.len(),
    );
    assert_eq!(
        applied_before.len() as u64,
        applied,
        "every application observed"
    );
    // Each handed-back message reached the next instance as a redelivery.
    assert!(
        again.redelivered.load(Ordering::SeqCst) >= returned,
        "{seen}"
    );
    assert_eq!(
        again.applied.load(Ordering::SeqCst),
        n as u64 - applied,
        "{seen}"
    );
    assert_eq!(Ledger::totals(&store).await.0, n, "each applied once");
    nats.delete_stream(&stream).await.unwrap();
    db.drop_db().await;
}
