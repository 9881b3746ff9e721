//! Kafka: a consumer-group consumer that commits an offset only when every message below it
//! has committed its inbox transaction, and a publisher for the outbox relay with the
//! idempotent producer (`acks=all`, no duplicates or reordering from the producer's own
//! retries).
//!
//! **Threads.** librdkafka's consumer must be polled regularly, and the rebalance callback
//! runs inside that poll. So one thread owns the consumer and only polls, dispatches and
//! commits; handlers run on the tokio runtime in *lanes*. That lets the revoke callback
//! block — waiting, up to [`ConsumerConfig::revoke_timeout`], for the revoked partitions'
//! messages to finish, then committing their offsets synchronously — without blocking any
//! handler.
//!
//! **Ordering.** A message goes to lane `hash(topic, partition, key) % lanes`: messages with
//! the same key are handled one after another in partition order; messages of different keys
//! run concurrently. Key-less messages are spread by offset, without an order.
//!
//! **Commits.** Messages finish out of order, so every partition has a
//! [`CommitTracker`]: the committed position never passes a message still in flight.
//! Commits are asynchronous every [`ConsumerConfig::commit_interval`], synchronous on revoke
//! and at the end of a clean stop.
//!
//! **Failures.** Kafka has no per-message negative ack, so a failed handler is retried in
//! place with the policy's backoff (holding back its partition's commit, not its other
//! lanes); after the last attempt the message goes to the dead-letter topic with
//! `keel-error`, and only then counts as done. A failed dead-letter publish is retried, never
//! skipped. Kafka does not count deliveries: `attempt` restarts at 1 after a crash, and
//! [`ConsumerStats::redelivered`] counts in-place retries and redeliveries the inbox caught.
//!
//! **Back-pressure.** At `max_in_flight` dispatched messages the poll thread takes no more
//! until one finishes; librdkafka's bounded prefetch queue then stops fetching by itself. A
//! rebalance waits for that (milliseconds); a consumer whose handlers all hang past
//! `max.poll.interval.ms` leaves the group, as a stuck Kafka consumer should.
//!
//! Message id: `keel-message-id`, else `<topic>/<partition>/<offset>`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_core::BoxError;
use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::{mpsc as tmpsc, watch};

use crate::consume::{Handler, Inbox, Processed, already_done, process};
use crate::message::{Message, kafka_id, message_id};
use crate::retry::RetryPolicy;
use crate::store::{Outgoing, Publisher};
use crate::tracker::CommitTracker;
pub use crate::transport::ConsumerStats;
use crate::transport::failpoint;

/// The header carrying a dead-lettered message's last error.
pub const ERROR_HEADER: &str = "keel-error";

/// A Kafka cluster: its bootstrap servers and an idempotent producer.
#[derive(Clone)]
pub struct Kafka {
    brokers: String,
    producer: FutureProducer,
}

impl std::fmt::Debug for Kafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kafka")
            .field("brokers", &self.brokers)
            .finish_non_exhaustive()
    }
}

impl Kafka {
    /// Connect to `brokers` (`host:port[,host:port…]`). The producer is idempotent
    /// (`enable.idempotence`, hence `acks=all`): its own retries neither duplicate nor
    /// reorder, so relay order is partition order.
    pub fn connect(brokers: &str) -> Result<Kafka, BoxError> {
        Self::connect_with(brokers, &[])
    }

    /// [`Kafka::connect`] with more librdkafka producer settings (`security.protocol`,
    /// `sasl.*`, `batch.num.messages`…), applied last.
    pub fn connect_with(brokers: &str, extra: &[(&str, &str)]) -> Result<Kafka, BoxError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // Small batches: the relay already sends in batches; this only groups a batch's
            // records per partition.
            .set("linger.ms", "2")
            .set("message.timeout.ms", "30000");
        for (k, v) in extra {
            config.set(*k, *v);
        }
        let producer: FutureProducer = config.create()?;
        Ok(Kafka {
            brokers: brokers.to_string(),
            producer,
        })
    }

    /// The bootstrap servers.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    fn admin(&self) -> Result<AdminClient<DefaultClientContext>, BoxError> {
        Ok(ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()?)
    }

    /// Create `topic` with `partitions` if absent (replication 1: for tests and the demo;
    /// production topics are the platform's to create).
    pub async fn ensure_topic(&self, topic: &str, partitions: i32) -> Result<(), BoxError> {
        let admin = self.admin()?;
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        for r in admin.create_topics([&new], &AdminOptions::new()).await? {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => return Err(format!("create topic {t}: {code}").into()),
            }
        }
        Ok(())
    }

    /// Delete `topic` (tests, teardown).
    pub async fn delete_topic(&self, topic: &str) -> Result<(), BoxError> {
        let admin = self.admin()?;
        for r in admin.delete_topics(&[topic], &AdminOptions::new()).await? {
            if let Err((t, code)) = r {
                return Err(format!("delete topic {t}: {code}").into());
            }
        }
        Ok(())
    }

    /// Enqueue one record; the returned future resolves with the broker's ack.
    fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &BTreeMap<String, String>,
    ) -> Result<rdkafka::producer::DeliveryFuture, BoxError> {
        let mut h = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            h = h.insert(Header {
                key: k.as_str(),
                value: Some(v.as_bytes()),
            });
        }
        let mut record = FutureRecord::to(topic).payload(payload).headers(h);
        if let Some(k) = key {
            record = record.key(k);
        }
        self.producer
            .send_result(record)
            .map_err(|(e, _)| Box::new(e) as BoxError)
    }
}

/// Wait for one delivery report.
async fn delivered(f: rdkafka::producer::DeliveryFuture) -> Result<(), BoxError> {
    match f.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(Box::new(e)),
        Err(_) => Err("kafka producer dropped the delivery report".into()),
    }
}

impl Publisher for Kafka {
    async fn publish(&self, msg: &Outgoing) -> Result<(), BoxError> {
        let f = self.send(
            &msg.destination,
            msg.key.as_deref(),
            &msg.payload,
            &msg.headers,
        )?;
        delivered(f).await
    }

    /// Pipelined: enqueue the batch, then collect the delivery reports in order.
    async fn publish_batch(&self, msgs: &[Outgoing]) -> (usize, Option<BoxError>) {
        let mut pending = Vec::with_capacity(msgs.len());
        let mut send_error = None;
        for m in msgs {
            match self.send(&m.destination, m.key.as_deref(), &m.payload, &m.headers) {
                Ok(f) => pending.push(f),
                Err(e) => {
                    send_error = Some(e);
                    break;
                }
            }
        }
        let sent = pending.len();
        for (i, f) in pending.into_iter().enumerate() {
            if let Err(e) = delivered(f).await {
                return (i, Some(e));
            }
        }
        (sent, send_error)
    }
}

/// A consumer's settings.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Consumer group (also the inbox's consumer key).
    pub group: String,
    /// Where messages go after their last failed attempt.
    pub dead_letter_topic: String,
    /// Messages dispatched and not finished, at most (then the partitions pause). 64.
    pub max_in_flight: usize,
    /// Handler lanes (concurrency). 16.
    pub lanes: usize,
    /// How long a revoke waits for the revoked partitions' messages before committing what
    /// is done and letting go. 10 s: past it, the new owner redelivers the rest and the
    /// inbox turns them into duplicates.
    pub revoke_timeout: Duration,
    /// How often finished offsets are committed. 200 ms.
    pub commit_interval: Duration,
    /// The group's session timeout: how soon a crashed member's partitions move. 10 s.
    pub session_timeout: Duration,
    /// Retries and dead-lettering.
    pub retry: RetryPolicy,
    /// The App's observer: each delivery is reported to it (a CONSUMER span, the message
    /// metrics). `None` reports nothing.
    pub observer: Option<keel_core::observe::SharedObserver>,
    /// More librdkafka consumer settings (`security.protocol`, `sasl.*`…).
    pub extra: Vec<(String, String)>,
}

impl ConsumerConfig {
    /// Defaults for `group` on `topic`.
    pub fn new(topic: &str, group: &str) -> ConsumerConfig {
        ConsumerConfig {
            topics: vec![topic.to_string()],
            group: group.to_string(),
            dead_letter_topic: format!("{topic}.dlq"),
            max_in_flight: 64,
            lanes: 16,
            revoke_timeout: Duration::from_secs(10),
            commit_interval: Duration::from_millis(200),
            session_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            observer: None,
            extra: Vec::new(),
        }
    }
}

type Partition = (String, i32);

/// A lane's report on one dispatched message.
#[derive(Debug)]
enum Completion {
    /// Effect committed, duplicate acknowledged, or dead-lettered: its offset may be committed.
    Done(Partition, i64),
    /// Given up at stop (in a retry backoff): not done, so never committed past.
    Abandoned,
}

/// What the poll thread and the rebalance callback share.
#[derive(Default)]
struct State {
    trackers: HashMap<Partition, CommitTracker>,
    /// Dispatched and not yet completed or abandoned.
    in_flight: usize,
}

struct Ctx {
    state: Mutex<State>,
    completions: Mutex<mpsc::Receiver<Completion>>,
    revoke_timeout: Duration,
    stats: Arc<ConsumerStats>,
}

impl Ctx {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Apply the lanes' reports; with `wait`, block up to that long for the first one.
    fn drain(&self, wait: Option<Duration>) {
        let rx = self.completions.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = match wait {
            Some(w) => rx.recv_timeout(w).ok(),
            None => rx.try_recv().ok(),
        };
        let mut state = self.state();
        while let Some(c) = next {
            state.in_flight = state.in_flight.saturating_sub(1);
            if let Completion::Done(p, offset) = c {
                if let Some(t) = state.trackers.get_mut(&p) {
                    t.done(offset);
                }
            }
            next = rx.try_recv().ok();
        }
    }

    /// Offsets to commit: every tracked partition whose position moved (`all`: every one
    /// with a position, for a synchronous commit).
    fn positions(&self, only: Option<&[Partition]>, all: bool) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        let mut state = self.state();
        for (p, t) in &mut state.trackers {
            if only.is_some_and(|o| !o.contains(p)) {
                continue;
            }
            let pos = if all { t.position() } else { t.committable() };
            if let Some(pos) = pos {
                // Only fails for an invalid offset, which a tracker never produces.
                let _ = tpl.add_partition_offset(&p.0, p.1, Offset::Offset(pos));
            }
        }
        tpl
    }
}

impl ClientContext for Ctx {
    fn stats(&self, statistics: Statistics) {
        // librdkafka reports -1 for partitions it has no lag for yet.
        let lag: i64 = statistics
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
            .map(|p| p.consumer_lag)
            .sum();
        self.stats.lag.store(lag, Ordering::Relaxed);
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Ctx>, rebalance: &Rebalance<'_>) {
        let tpl = match rebalance {
            Rebalance::Revoke(tpl) => tpl,
            Rebalance::Assign(_) => {
                self.stats.assignments.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Rebalance::Error(_) => return,
        };
        let revoked: Vec<Partition> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        // Let the revoked partitions' messages finish (bounded), so their offsets are
        // committed now rather than redelivered to the next owner.
        let deadline = Instant::now() + self.revoke_timeout;
        loop {
            self.drain(None);
            let busy = {
                let state = self.state();
                revoked
                    .iter()
                    .any(|p| state.trackers.get(p).is_some_and(|t| t.in_flight() > 0))
            };
            if !busy || Instant::now() >= deadline {
                break;
            }
            self.drain(Some(Duration::from_millis(20)));
        }
        let offsets = self.positions(Some(&revoked), true);
        if offsets.count() > 0 {
            if let Err(e) = consumer.commit(&offsets, CommitMode::Sync) {
                tracing::warn!(error = %e, "kafka commit on revoke failed; the next owner redelivers");
            }
        }
        let mut state = self.state();
        for p in &revoked {
            state.trackers.remove(p);
        }
    }
}

/// One message on its way to a lane.
struct Work {
    partition: Partition,
    offset: i64,
    msg: Message,
}

/// Consume until `stop` resolves, then finish the messages in flight, commit their offsets
/// and leave the group: nothing a clean stop applied is delivered again.
pub async fn run<I, H>(
    kafka: &Kafka,
    cfg: &ConsumerConfig,
    inbox: &I,
    handler: &H,
    stats: Arc<ConsumerStats>,
    stop: impl Future<Output = ()>,
) -> Result<(), BoxError>
where
    I: Inbox,
    H: Handler<I::Tx>,
{
    let (done_tx, done_rx) = mpsc::channel();
    let ctx = Ctx {
        state: Mutex::new(State::default()),
        completions: Mutex::new(done_rx),
        revoke_timeout: cfg.revoke_timeout,
        stats: stats.clone(),
    };
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", &cfg.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            cfg.session_timeout.as_millis().to_string(),
        )
        .set("statistics.interval.ms", "5000");
    for (k, v) in &cfg.extra {
        client.set(k, v);
    }
    let consumer: BaseConsumer<Ctx> = client.create_with_context(ctx)?;
    let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;

    let lanes = cfg.lanes.max(1);
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..lanes)
        .map(|_| tmpsc::unbounded_channel::<Work>())
        .unzip();
    let stopping = Arc::new(AtomicBool::new(false));
    let (abandon_tx, abandon_rx) = watch::channel(false);
    let (ended_tx, ended_rx) = tokio::sync::oneshot::channel::<()>();
    let poller = {
        let stopping = stopping.clone();
        let max = cfg.max_in_flight.max(1);
        let interval = cfg.commit_interval;
        std::thread::Builder::new()
            .name(format!("keel-kafka-{}", cfg.group))
            .spawn(move || {
                poll_loop(&consumer, &senders, &stopping, max, interval);
                drop(senders);
                // Leaving the group (the drop) runs the revoke callback: a last commit.
                drop(consumer);
                let _ = ended_tx.send(());
            })?
    };

    let lane_futures: Vec<_> = receivers
        .into_iter()
        .map(|rx| {
            let done = done_tx.clone();
            lane(
                kafka,
                cfg,
                inbox,
                handler,
                &stats,
                rx,
                done,
                abandon_rx.clone(),
            )
        })
        .collect();
    drop(done_tx);
    let stopper = async {
        tokio::select! {
            () = stop => {
                stopping.store(true, Ordering::Relaxed);
                // Messages in a retry backoff are given up (not committed): they are
                // redelivered after the restart rather than holding the drain.
                let _ = abandon_tx.send(true);
            }
            _ = ended_rx => {}
        }
    };
    futures_util::future::join(futures_util::future::join_all(lane_futures), stopper).await;
    let _ = tokio::task::spawn_blocking(move || poller.join()).await;
    Ok(())
}

/// The consumer thread: poll, dispatch to lanes, apply completions, commit, pause/resume.
fn poll_loop(
    consumer: &BaseConsumer<Ctx>,
    lanes: &[tmpsc::UnboundedSender<Work>],
    stopping: &AtomicBool,
    max_in_flight: usize,
    commit_interval: Duration,
) {
    let ctx = consumer.context();
    let mut last_commit = Instant::now();
    loop {
        let stop = stopping.load(Ordering::Relaxed);
        ctx.drain(None);
        let in_flight = ctx.state().in_flight;
        if last_commit.elapsed() >= commit_interval {
            commit(consumer, &ctx.positions(None, false), CommitMode::Async);
            last_commit = Instant::now();
        }
        if stop && in_flight == 0 {
            break;
        }
        if !stop && in_flight >= max_in_flight {
            // Back-pressure: take no more until something finishes. librdkafka's prefetch
            // queue fills and its fetching stops on its own. (Pausing the partitions instead
            // stalled fetching after the resume on the Kafka-API broker the tests run.)
            ctx.drain(Some(Duration::from_millis(20)));
            continue;
        }
        let Some(polled) = consumer.poll(Duration::from_millis(50)) else {
            continue;
        };
        let m = match polled {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "kafka consumer error");
                continue;
            }
        };
        if stopping.load(Ordering::Relaxed) {
            // Not started, so not tracked: its offset is never committed past.
            continue;
        }
        let work = to_work(&m);
        let lane = lane_of(&work, lanes.len());
        {
            let mut state = ctx.state();
            state
                .trackers
                .entry(work.partition.clone())
                .or_default()
                .start(work.offset);
            state.in_flight += 1;
        }
        if lanes[lane].send(work).is_err() {
            // Lanes gone means `run` is over; nothing more can be processed.
            break;
        }
    }
    ctx.drain(None);
    commit(consumer, &ctx.positions(None, true), CommitMode::Sync);
}

fn commit(consumer: &BaseConsumer<Ctx>, offsets: &TopicPartitionList, mode: CommitMode) {
    if offsets.count() == 0 {
        return;
    }
    match consumer.commit(offsets, mode) {
        Ok(()) => {}
        // Nothing to commit / rebalance in progress: the next commit carries it.
        Err(KafkaError::ConsumerCommit(code)) => {
            tracing::debug!(%code, "kafka offset commit not taken; retried with the next one");
        }
        Err(e) => tracing::warn!(error = %e, "kafka offset commit failed"),
    }
}

fn to_work(m: &BorrowedMessage<'_>) -> Work {
    let mut headers = BTreeMap::new();
    if let Some(h) = m.headers() {
        for header in h.iter() {
            if let Some(v) = header.value {
                headers.insert(
                    header.key.to_ascii_lowercase(),
                    String::from_utf8_lossy(v).into_owned(),
                );
            }
        }
    }
    let native = kafka_id(m.topic(), m.partition(), m.offset());
    let (id, id_source) =
        message_id(&headers, Some(&native)).unwrap_or((native, crate::message::IdSource::Broker));
    Work {
        partition: (m.topic().to_string(), m.partition()),
        offset: m.offset(),
        msg: Message {
            id,
            id_source,
            system: "kafka",
            destination: m.topic().to_string(),
            key: m.key().map(Bytes::copy_from_slice),
            payload: m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
            headers,
            attempt: 1,
        },
    }
}

/// Same key → same lane (ordered); no key → spread by offset.
fn lane_of(w: &Work, lanes: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    w.partition.hash(&mut h);
    match &w.msg.key {
        Some(k) => k.hash(&mut h),
        None => w.offset.hash(&mut h),
    }
    usize::try_from(h.finish() % lanes as u64).unwrap_or(0)
}

/// One lane: its messages one at a time, each to a final outcome (or abandoned at stop).
#[allow(clippy::too_many_arguments)]
async fn lane<I, H>(
    kafka: &Kafka,
    cfg: &ConsumerConfig,
    inbox: &I,
    handler: &H,
    stats: &ConsumerStats,
    mut rx: tmpsc::UnboundedReceiver<Work>,
    done: mpsc::Sender<Completion>,
    mut abandon: watch::Receiver<bool>,
) where
    I: Inbox,
    H: Handler<I::Tx>,
{
    while let Some(mut w) = rx.recv().await {
        let finished = settle(kafka, cfg, inbox, handler, stats, &mut w.msg, &mut abandon).await;
        let c = if finished {
            Completion::Done(w.partition, w.offset)
        } else {
            Completion::Abandoned
        };
        if done.send(c).is_err() {
            return;
        }
    }
}

/// Sleep `d` unless the stop comes first: false when it did.
async fn pause_or_abandon(d: Duration, abandon: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        _ = abandon.wait_for(|a| *a) => false,
    }
}

/// Process `msg` until it is applied, a duplicate, or dead-lettered (true), or the stop
/// abandons it during a backoff (false).
async fn settle<I, H>(
    kafka: &Kafka,
    cfg: &ConsumerConfig,
    inbox: &I,
    handler: &H,
    stats: &ConsumerStats,
    msg: &mut Message,
    abandon: &mut watch::Receiver<bool>,
) -> bool
where
    I: Inbox,
    H: Handler<I::Tx>,
{
    loop {
        match process(
            inbox,
            &cfg.group,
            handler,
            msg,
            &cfg.retry,
            cfg.observer.as_deref(),
        )
        .await
        {
            Ok(Processed::Applied) => {
                failpoint("after-commit-before-ack");
                stats.applied.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Ok(Processed::Duplicate) => {
                stats.duplicates.fetch_add(1, Ordering::Relaxed);
                stats.redelivered.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Ok(Processed::Retry(delay, e)) => {
                tracing::debug!(id = %msg.id, attempt = msg.attempt, error = %e, ?delay, "handler failed; will retry");
                stats.retries.fetch_add(1, Ordering::Relaxed);
                stats.redelivered.fetch_add(1, Ordering::Relaxed);
                if !pause_or_abandon(delay, abandon).await {
                    return false;
                }
                msg.attempt += 1;
            }
            Ok(Processed::DeadLetter(_)) if already_done(inbox, &cfg.group, &msg.id).await => {
                // A twin of this message was dead-lettered already (see `already_done`).
                stats.duplicates.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Ok(Processed::DeadLetter(e)) => {
                let sent = dead_letter(kafka, cfg, stats, msg, &e.to_string(), abandon).await;
                if sent {
                    // Before the offset is committed: a redelivery after a rebalance is then
                    // a duplicate, not a second dead letter.
                    crate::consume::settle_dead_letter(inbox, &cfg.group, &msg.id).await;
                }
                return sent;
            }
            Err(e) => {
                tracing::warn!(id = %msg.id, error = %e, "inbox store failed; retrying the message");
                stats.store_errors.fetch_add(1, Ordering::Relaxed);
                if !pause_or_abandon(Duration::from_secs(1), abandon).await {
                    return false;
                }
            }
        }
    }
}

/// Publish to the dead-letter topic with the error; retried until the broker has it (or the
/// stop abandons it, uncommitted): a message is never skipped silently.
async fn dead_letter(
    kafka: &Kafka,
    cfg: &ConsumerConfig,
    stats: &ConsumerStats,
    msg: &Message,
    error: &str,
    abandon: &mut watch::Receiver<bool>,
) -> bool {
    let mut headers = msg.headers.clone();
    headers.insert(ERROR_HEADER.to_string(), error.to_string());
    headers.insert("keel-original-topic".to_string(), msg.destination.clone());
    headers
        .entry(crate::message::MESSAGE_ID_HEADER.to_string())
        .or_insert_with(|| msg.id.clone());
    let mut backoff = Duration::from_millis(200);
    loop {
        let sent = match kafka.send(
            &cfg.dead_letter_topic,
            msg.key.as_deref(),
            &msg.payload,
            &headers,
        ) {
            Ok(f) => delivered(f).await,
            Err(e) => Err(e),
        };
        match sent {
            Ok(()) => {
                tracing::warn!(topic = %msg.destination, id = %msg.id, error, "message dead-lettered");
                stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Err(e) => {
                tracing::error!(error = %e, "dead-letter publish failed; retrying");
                if !pause_or_abandon(backoff, abandon).await {
                    return false;
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}
