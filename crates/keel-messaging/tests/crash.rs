//! The crash test, for NATS JetStream, RabbitMQ and Kafka (tansu): 20,000 messages through the outbox and the
//! broker to a consumer *process*
//! that is killed at random moments — by SIGKILL, and by a failpoint that aborts exactly
//! between the database commit and the broker ack — at least ten times, until everything is
//! processed. Pass: every message applied exactly once (row count, distinct ids and sum), and
//! the redelivery and duplicate-skip counters above zero, proving the faults hit.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Ledger, PgDb, stream_name};
use keel_messaging::nats::Nats;
use keel_messaging::rabbitmq::Rabbit;
use keel_messaging::store::PgStore;
use keel_test_support::ChildGuard;

const NATS: &str = "nats://127.0.0.1:4222";
const RABBIT: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const MESSAGES: i64 = 20_000;

/// The consumer process is this test binary itself, running only
/// [`consumer_process`] (which does nothing unless `KEEL_CRASH_CONSUMER` is set).
fn consumer_bin() -> PathBuf {
    std::env::current_exe().unwrap()
}

const CONSUMER_ARGS: [&str; 5] = [
    "consumer_process",
    "--exact",
    "--ignored",
    "--nocapture",
    "--test-threads=1",
];

/// Not a test on its own (hence ignored): the crash test runs this binary with
/// `--ignored consumer_process` and `KEEL_CRASH_CONSUMER` set to
/// `nats URL STREAM SUBJECT POSTGRES_URL` or `rabbitmq URI QUEUE - POSTGRES_URL`, and then
/// this books each message's amount in
/// `ledger` (in the inbox transaction) until killed, printing its counters to stderr every
/// 100 ms so the parent can see redeliveries and skipped duplicates.
#[tokio::test]
#[ignore = "the consumer process of the crash test, started by it"]
async fn consumer_process() {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use keel_messaging::nats::{ConsumerConfig, ConsumerStats, run};

    let spec = std::env::var("KEEL_CRASH_CONSUMER")
        .expect("started by the crash scenario, which sets KEEL_CRASH_CONSUMER");
    let parts: Vec<&str> = spec.split_whitespace().collect();
    let (kind, url, name, subject, pg) = (parts[0], parts[1], parts[2], parts[3], parts[4]);
    let store = PgStore::new(sqlx::PgPool::connect(pg).await.unwrap());
    let stats = Arc::new(ConsumerStats::default());
    let reporter = stats.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            eprintln!(
                "stats applied={} duplicates={} redelivered={}",
                reporter.applied.load(Ordering::Relaxed),
                reporter.duplicates.load(Ordering::Relaxed),
                reporter.redelivered.load(Ordering::Relaxed)
            );
        }
    });
    if kind == "kafka" {
        let kafka = keel_messaging::kafka::Kafka::connect(url).unwrap();
        let mut cfg = keel_messaging::kafka::ConsumerConfig::new(name, "ledger");
        // Short, so a killed member's partitions move on quickly.
        cfg.session_timeout = Duration::from_secs(6);
        keel_messaging::kafka::run(&kafka, &cfg, &store, &Ledger, stats, std::future::pending())
            .await
            .unwrap();
    } else if kind == "rabbitmq" {
        let rabbit = Rabbit::connect(url).await.unwrap();
        let cfg = keel_messaging::rabbitmq::ConsumerConfig::new(name);
        keel_messaging::rabbitmq::run(
            &rabbit,
            &cfg,
            &store,
            &Ledger,
            stats,
            std::future::pending(),
        )
        .await
        .unwrap();
    } else {
        let nats = Nats::connect(url).await.unwrap();
        let mut cfg = ConsumerConfig::new(name, "ledger");
        cfg.filter_subject = subject.to_string();
        // Short, so the messages of a killed consumer come back quickly.
        cfg.ack_wait = Duration::from_secs(1);
        cfg.max_in_flight = 32;
        run(&nats, &cfg, &store, &Ledger, stats, std::future::pending())
            .await
            .unwrap();
    }
}

/// The broker side of the scenario.
enum Broker {
    Nats {
        nats: Nats,
        stream: String,
        subject: String,
    },
    Rabbit {
        rabbit: Rabbit,
        queue: String,
    },
    Kafka {
        kafka: keel_messaging::kafka::Kafka,
        topic: String,
        _broker: keel_test_support::tansu::Tansu,
    },
}

impl Broker {
    async fn nats() -> Broker {
        let nats = Nats::connect(NATS).await.unwrap();
        let stream = stream_name();
        let subject = format!("{}.orders", stream.to_lowercase());
        nats.ensure_stream(&stream, vec![format!("{}.>", stream.to_lowercase())])
            .await
            .unwrap();
        Broker::Nats {
            nats,
            stream,
            subject,
        }
    }

    async fn rabbit() -> Broker {
        let rabbit = Rabbit::connect(RABBIT).await.unwrap();
        let queue = format!("keel-crash-{}", stream_name().to_lowercase());
        rabbit.declare(&queue).await.unwrap();
        Broker::Rabbit { rabbit, queue }
    }

    async fn kafka() -> Broker {
        let broker = keel_test_support::tansu::Tansu::start();
        // One record per batch: tansu 0.6.0 skips the rest of a batch when a consumer
        // resumes inside it (see tests/kafka.rs).
        let kafka = keel_messaging::kafka::Kafka::connect_with(
            &broker.bootstrap(),
            &[("batch.num.messages", "1")],
        )
        .unwrap();
        let topic = format!("keel-crash-{}", stream_name().to_lowercase());
        kafka.ensure_topic(&topic, 4).await.unwrap();
        Broker::Kafka {
            kafka,
            topic,
            _broker: broker,
        }
    }

    /// Where the outbox publishes.
    fn destination(&self) -> String {
        match self {
            Broker::Nats { subject, .. } => subject.clone(),
            Broker::Rabbit { queue, .. } => queue.clone(),
            Broker::Kafka { topic, .. } => topic.clone(),
        }
    }

    fn spec(&self, pg: &str) -> String {
        match self {
            Broker::Nats {
                stream, subject, ..
            } => format!("nats {NATS} {stream} {subject} {pg}"),
            Broker::Rabbit { queue, .. } => format!("rabbitmq {RABBIT} {queue} - {pg}"),
            Broker::Kafka { kafka, topic, .. } => {
                format!("kafka {} {topic} - {pg}", kafka.brokers())
            }
        }
    }

    async fn teardown(self) {
        match self {
            Broker::Nats { nats, stream, .. } => nats.delete_stream(&stream).await.unwrap(),
            Broker::Rabbit { rabbit, queue } => rabbit.delete(&queue).await.unwrap(),
            // The broker (in-memory storage) goes with its process.
            Broker::Kafka { .. } => {}
        }
    }
}

/// The last `stats` line a consumer process printed: (applied, duplicates, redelivered).
fn last_stats(log: &std::path::Path) -> (u64, u64, u64) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let Some(line) = text.lines().rev().find(|l| l.starts_with("stats ")) else {
        return (0, 0, 0);
    };
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("applied"), field("duplicates"), field("redelivered"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_nats_consumers_apply_every_message_exactly_once() {
    crash_scenario(Broker::nats().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_rabbitmq_consumers_apply_every_message_exactly_once() {
    crash_scenario(Broker::rabbit().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_kafka_consumers_apply_every_message_exactly_once() {
    crash_scenario(Broker::kafka().await).await;
}

async fn crash_scenario(broker: Broker) {
    let bin = consumer_bin();
    let db = PgDb::new().await;
    let store = PgStore::new(db.pool.clone());
    store.migrate().await.unwrap();
    Ledger::create(&store).await;
    let subject = broker.destination();

    // Produce through the outbox and relay it all.
    match &broker {
        Broker::Nats { nats, .. } => common::produce(&store, nats, &subject, 0..MESSAGES).await,
        Broker::Rabbit { rabbit, .. } => {
            common::produce(&store, rabbit, &subject, 0..MESSAGES).await
        }
        Broker::Kafka { kafka, .. } => common::produce(&store, kafka, &subject, 0..MESSAGES).await,
    }

    let dir = tempfile::tempdir().unwrap();
    let spec = broker.spec(&db.url());
    let (mut kills, mut duplicates, mut redelivered) = (0, 0, 0);
    let mut run = 0;
    // Kill consumers until at least ten have died mid-stream (and some work remains).
    while kills < 10 {
        run += 1;
        let log = dir.path().join(format!("consumer-{run}.log"));
        let mut child = ChildGuard::spawn_logged(
            bin.to_str().unwrap(),
            &CONSUMER_ARGS,
            &[
                ("KEEL_CRASH_CONSUMER", spec.clone()),
                (
                    "KEEL_FAILPOINTS",
                    "after-commit-before-ack:0.002".to_string(),
                ),
            ],
            &log,
        );
        // Kill it at a random moment once it is working (a Kafka member first has to join
        // its group, which waits out the killed member's session).
        let end = std::time::Instant::now() + Duration::from_secs(30);
        while last_stats(&log).0 == 0 && child.wait_exit(Duration::ZERO).is_none() {
            assert!(
                std::time::Instant::now() < end,
                "consumer {run} never applied anything"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let wait_ms = 100 + keel_core::codec::rand::next_u64() % 600;
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        let exited_alone = child.wait_exit(Duration::ZERO).is_some();
        if !exited_alone {
            child.signal(libc::SIGKILL);
        }
        let _ = child.wait_exit(Duration::from_secs(5));
        let (_, d, r) = last_stats(&log);
        duplicates += d;
        redelivered += r;
        let (_, done, _) = Ledger::totals(&store).await;
        if done < MESSAGES {
            kills += 1;
        } else {
            break;
        }
    }

    // A last consumer, left alone, finishes the rest.
    let log = dir.path().join("consumer-final.log");
    let _last = ChildGuard::spawn_logged(
        bin.to_str().unwrap(),
        &CONSUMER_ARGS,
        &[("KEEL_CRASH_CONSUMER", spec.clone())],
        &log,
    );
    let finished = common::wait_for(Duration::from_secs(180), || {
        let store = store.clone();
        async move { Ledger::totals(&store).await.1 == MESSAGES }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, d, r) = last_stats(&log);
    duplicates += d;
    redelivered += r;
    let (rows, distinct, sum) = Ledger::totals(&store).await;
    eprintln!(
        "crash test: {kills} consumers killed mid-stream, {redelivered} redeliveries, {duplicates} duplicates skipped, {rows} rows"
    );
    assert!(finished, "not all processed: {distinct} of {MESSAGES}");
    assert!(kills >= 10, "only {kills} consumers died mid-stream");
    assert_eq!(rows, MESSAGES, "no message applied twice (rows)");
    assert_eq!(distinct, MESSAGES, "every message applied (distinct ids)");
    assert_eq!(sum, (0..MESSAGES).sum::<i64>());
    assert!(redelivered > 0, "the kills caused redeliveries");
    assert!(
        duplicates > 0,
        "some redeliveries were already applied and skipped"
    );

    drop(_last);
    broker.teardown().await;
    db.drop_db().await;
}
