//! RabbitMQ: a consumer that acknowledges only after the inbox transaction committed, and a
//! publisher for the outbox relay with publisher confirms and `mandatory` (an unroutable
//! message is an error, not a silent drop).
//!
//! Per delivery ([`crate::consume::process`]): applied or duplicate → `basic.ack`; handler
//! failure → the message is re-published to `<queue>.retry`, whose per-message TTL is the
//! policy's backoff and whose dead-letter target is `<queue>` again (RabbitMQ has no delayed
//! nack), with `keel-attempt` incremented, then the original is acked; last attempt → it is
//! published to `<queue>.dlq` with `keel-error`, then acked; store failure → `basic.nack` with
//! requeue. A delivery the broker redelivers after a crash keeps its attempt number (the
//! inbox makes it a duplicate if it was applied).
//!
//! Message id: Keel's `keel-message-id` header, else the AMQP `message_id` property, else
//! the message cannot be deduplicated and is dead-lettered with that reason.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use keel_core::BoxError;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::consume::{Handler, Inbox, Processed, SettleLater, already_done, process, settle_later};
use crate::message::{Message, message_id};
use crate::retry::RetryPolicy;
use crate::store::{Outgoing, Publisher};
pub use crate::transport::ConsumerStats;

/// The header carrying a dead-lettered message's last error.
pub const ERROR_HEADER: &str = "keel-error";
/// The header counting deliveries across Keel's retries.
pub const ATTEMPT_HEADER: &str = "keel-attempt";

/// A RabbitMQ connection with a confirming channel for publishing.
pub struct Rabbit {
    conn: Connection,
    publish: Channel,
}

impl std::fmt::Debug for Rabbit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rabbit").finish_non_exhaustive()
    }
}

impl Rabbit {
    /// Connect to `uri` (`amqp://guest:guest@127.0.0.1:5672/%2f`).
    pub async fn connect(uri: &str) -> Result<Rabbit, BoxError> {
        let conn = Connection::connect(uri, ConnectionProperties::default()).await?;
        let publish = conn.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Rabbit { conn, publish })
    }

    /// Declare `queue` with its `.retry` and `.dlq` companions (durable; idempotent).
    pub async fn declare(&self, queue: &str) -> Result<(), BoxError> {
        self.declare_with(queue, false).await
    }

    /// [`Rabbit::declare`], with `single_active_consumer`: RabbitMQ then delivers the queue to
    /// one consumer at a time (the others stand by), which with [`ConsumerConfig::ordered`]
    /// keeps the queue's order. Queue arguments cannot change once declared: declaring an
    /// existing queue the other way fails with the broker's `PRECONDITION_FAILED`.
    pub async fn declare_with(
        &self,
        queue: &str,
        single_active_consumer: bool,
    ) -> Result<(), BoxError> {
        let ch = &self.publish;
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let mut main_args = FieldTable::default();
        if single_active_consumer {
            main_args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        }
        ch.queue_declare(queue.into(), durable, main_args).await?;
        ch.queue_declare(
            format!("{queue}.dlq").into(),
            durable,
            FieldTable::default(),
        )
        .await?;
        // Expired retries flow back to the main queue through the default exchange.
        let mut retry_args = FieldTable::default();
        retry_args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from("")),
        );
        retry_args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(queue)),
        );
        ch.queue_declare(format!("{queue}.retry").into(), durable, retry_args)
            .await?;
        Ok(())
    }

    /// Delete `queue` and its companions (tests, teardown).
    pub async fn delete(&self, queue: &str) -> Result<(), BoxError> {
        for q in [
            queue.to_string(),
            format!("{queue}.retry"),
            format!("{queue}.dlq"),
        ] {
            self.publish
                .queue_delete(q.into(), QueueDeleteOptions::default())
                .await?;
        }
        Ok(())
    }

    /// Publish to `queue` through the default exchange and wait for the broker's confirm.
    async fn send(
        &self,
        queue: &str,
        payload: &[u8],
        message_id: Option<&str>,
        headers: &BTreeMap<String, String>,
        expiration: Option<Duration>,
    ) -> Result<(), BoxError> {
        let props = properties(message_id, headers, expiration);
        let publish = async {
            self.publish
                .basic_publish(
                    ShortString::from(""),
                    queue.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    payload,
                    props,
                )
                .await?
                .await
        };
        let confirm = tokio::time::timeout(BROKER_CALL_TIMEOUT, publish)
            .await
            .map_err(|_| {
                format!("no confirm for the message to {queue} within {BROKER_CALL_TIMEOUT:?}")
            })??;
        match confirm {
            lapin::Confirmation::Ack(None) => Ok(()),
            lapin::Confirmation::Ack(Some(_)) => {
                Err(format!("message to {queue} was unroutable (returned)").into())
            }
            other => {
                Err(format!("broker did not confirm the message to {queue}: {other:?}").into())
            }
        }
    }
}

impl Publisher for Rabbit {
    async fn publish(&self, msg: &Outgoing) -> Result<(), BoxError> {
        self.send(
            &msg.destination,
            &msg.payload,
            Some(&msg.message_id),
            &msg.headers,
            None,
        )
        .await
    }

    /// Pipelined: publish the whole batch, then collect the confirms in order. One round trip
    /// per batch instead of per message.
    async fn publish_batch(&self, msgs: &[Outgoing]) -> (usize, Option<BoxError>) {
        let mut pending = Vec::with_capacity(msgs.len());
        for m in msgs {
            let props = properties(Some(&m.message_id), &m.headers, None);
            match self
                .publish
                .basic_publish(
                    ShortString::from(""),
                    m.destination.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &m.payload,
                    props,
                )
                .await
            {
                Ok(confirm) => pending.push(confirm),
                Err(e) => {
                    return (
                        confirmed_prefix(pending).await.0,
                        Some(Box::new(e) as BoxError),
                    );
                }
            }
        }
        confirmed_prefix(pending).await
    }
}

/// The outbox relay's RabbitMQ publisher: connects on first use and again after the
/// connection died (lapin does not reconnect by itself), so a broker restart or a reset
/// costs the relay a failed pass, not its life.
pub struct RabbitPublisher {
    uri: String,
    current: tokio::sync::Mutex<Option<Arc<Rabbit>>>,
    connects: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for RabbitPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitPublisher").finish_non_exhaustive()
    }
}

impl RabbitPublisher {
    /// A publisher for `uri`; nothing is connected until the first publish.
    pub fn new(uri: &str) -> RabbitPublisher {
        RabbitPublisher {
            uri: uri.to_string(),
            current: tokio::sync::Mutex::new(None),
            connects: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Connections made so far (more than one: it reconnected).
    pub fn connections(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    async fn connection(&self) -> Result<Arc<Rabbit>, BoxError> {
        let mut current = self.current.lock().await;
        if let Some(r) = current.as_ref().filter(|r| r.conn.status().connected()) {
            return Ok(r.clone());
        }
        let fresh = Arc::new(
            tokio::time::timeout(BROKER_CALL_TIMEOUT, Rabbit::connect(&self.uri))
                .await
                .map_err(|_| format!("no RabbitMQ connection within {BROKER_CALL_TIMEOUT:?}"))??,
        );
        self.connects.fetch_add(1, Ordering::Relaxed);
        *current = Some(fresh.clone());
        Ok(fresh)
    }

    /// After a failure: if the connection is gone, forget it so the next pass reconnects.
    async fn forget_if_dead(&self, used: &Arc<Rabbit>) {
        let mut current = self.current.lock().await;
        let same = current.as_ref().is_some_and(|c| Arc::ptr_eq(c, used));
        if same && !used.conn.status().connected() {
            *current = None;
        }
    }
}

impl Publisher for RabbitPublisher {
    async fn publish(&self, msg: &Outgoing) -> Result<(), BoxError> {
        let r = self.connection().await?;
        let result = r.publish(msg).await;
        if result.is_err() {
            self.forget_if_dead(&r).await;
        }
        result
    }

    async fn publish_batch(&self, msgs: &[Outgoing]) -> (usize, Option<BoxError>) {
        let r = match self.connection().await {
            Ok(r) => r,
            Err(e) => return (0, Some(e)),
        };
        let (confirmed, error) = r.publish_batch(msgs).await;
        if error.is_some() {
            self.forget_if_dead(&r).await;
        }
        (confirmed, error)
    }
}

/// Await confirms in order: how many leading ones were positive, and the first failure.
async fn confirmed_prefix(pending: Vec<lapin::PublisherConfirm>) -> (usize, Option<BoxError>) {
    let n = pending.len();
    for (i, confirm) in pending.into_iter().enumerate() {
        match tokio::time::timeout(BROKER_CALL_TIMEOUT, confirm).await {
            Ok(Ok(lapin::Confirmation::Ack(None))) => {}
            Ok(Ok(other)) => return (i, Some(format!("broker did not accept: {other:?}").into())),
            Ok(Err(e)) => return (i, Some(Box::new(e))),
            Err(_) => return (i, Some("no confirm within the timeout".into())),
        }
    }
    (n, None)
}

fn properties(
    message_id: Option<&str>,
    headers: &BTreeMap<String, String>,
    expiration: Option<Duration>,
) -> BasicProperties {
    let mut table = FieldTable::default();
    for (k, v) in headers {
        table.insert(
            k.as_str().into(),
            AMQPValue::LongString(LongString::from(v.as_str())),
        );
    }
    let mut props = BasicProperties::default()
        .with_headers(table)
        .with_delivery_mode(2);
    if let Some(id) = message_id {
        props = props.with_message_id(id.into());
    }
    if let Some(ttl) = expiration {
        props = props.with_expiration(ttl.as_millis().max(1).to_string().into());
    }
    props
}

/// A consumer's settings.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The queue (declared with [`Rabbit::declare`]); also the inbox's consumer key.
    pub queue: String,
    /// Unacked deliveries at once (`basic.qos` prefetch).
    pub prefetch: u16,
    /// Retries and dead-lettering.
    pub retry: RetryPolicy,
    /// The App's observer: each delivery is reported to it (a CONSUMER span, the message
    /// metrics). `None` reports nothing.
    pub observer: Option<keel_core::observe::SharedObserver>,
    /// Per-queue ordering: the queue is declared with the single-active-consumer option
    /// (one consumer of the queue receives at a time, others take over when it goes) and
    /// deliveries are processed one at a time, in queue order. A message that fails waits its
    /// backoff in the retry queue and comes back behind later ones; where that matters, set
    /// `retry.max_attempts` to 1 so it goes to the dead-letter queue instead. Off: deliveries
    /// run `prefetch` at a time.
    pub ordered: bool,
}

impl ConsumerConfig {
    /// Defaults for `queue`.
    pub fn new(queue: &str) -> ConsumerConfig {
        ConsumerConfig {
            queue: queue.to_string(),
            prefetch: 32,
            retry: RetryPolicy::default(),
            observer: None,
            ordered: false,
        }
    }
}

/// Consume `cfg.queue` until `stop` resolves, then finish the deliveries in flight and return.
pub async fn run<I, H>(
    rabbit: &Rabbit,
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
    let ch = rabbit.conn.create_channel().await?;
    ch.basic_qos(cfg.prefetch.max(1), BasicQosOptions::default())
        .await?;
    let concurrency = if cfg.ordered {
        1
    } else {
        usize::from(cfg.prefetch.max(1))
    };
    let consumer = ch
        .basic_consume(
            cfg.queue.as_str().into(),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    consumer
        .take_until(stop)
        .for_each_concurrent(concurrency, |delivery| {
            let stats = stats.clone();
            async move {
                match delivery {
                    Ok(d) => handle_one(rabbit, cfg, inbox, handler, &stats, d).await,
                    Err(e) => tracing::warn!(error = %e, "rabbitmq delivery error"),
                }
            }
        })
        .await;
    Ok(())
}

/// [`run`] over a connection that is re-established (and the queues re-declared) whenever it
/// breaks — a broker restart, a reset connection — with backoff from 100 ms to 5 s, until
/// `stop` resolves. lapin does not reconnect by itself, and a consumer that silently stops on
/// a broken connection is a consumer that loses throughput without anyone noticing.
/// Deliveries in flight when the connection broke are redelivered by the broker; those
/// already committed are then skipped by the inbox.
pub async fn run_reconnecting<I, H>(
    uri: &str,
    cfg: &ConsumerConfig,
    inbox: &I,
    handler: &H,
    stats: Arc<ConsumerStats>,
    stop: impl Future<Output = ()>,
) where
    I: Inbox,
    H: Handler<I::Tx>,
{
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tx, rx) = tokio::sync::watch::channel(false);
    let flag = stopped.clone();
    let stop = async move {
        stop.await;
        flag.store(true, Ordering::SeqCst);
        let _ = tx.send(true);
    };
    let work = async {
        let mut backoff = Duration::from_millis(100);
        while !stopped.load(Ordering::SeqCst) {
            let attempt = async {
                let rabbit = Rabbit::connect(uri).await?;
                rabbit.declare_with(&cfg.queue, cfg.ordered).await?;
                let mut rx = rx.clone();
                run(&rabbit, cfg, inbox, handler, stats.clone(), async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await
            };
            match attempt.await {
                Ok(()) if stopped.load(Ordering::SeqCst) => return,
                Ok(()) => {
                    tracing::warn!(queue = %cfg.queue, "rabbitmq consumer stream ended; reconnecting");
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    tracing::warn!(queue = %cfg.queue, error = %e, ?backoff, "rabbitmq connection failed; reconnecting");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    };
    tokio::join!(stop, work);
}

fn headers_of(props: &BasicProperties) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(t) = props.headers() {
        for (k, v) in t.inner() {
            let value = match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_string(),
                AMQPValue::LongLongInt(n) => n.to_string(),
                AMQPValue::LongInt(n) => n.to_string(),
                _ => continue,
            };
            out.insert(k.as_str().to_ascii_lowercase(), value);
        }
    }
    out
}

async fn handle_one<I, H>(
    rabbit: &Rabbit,
    cfg: &ConsumerConfig,
    inbox: &I,
    handler: &H,
    stats: &ConsumerStats,
    d: lapin::message::Delivery,
) where
    I: Inbox,
    H: Handler<I::Tx>,
{
    let headers = headers_of(&d.properties);
    let attempt: u32 = headers
        .get(ATTEMPT_HEADER)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    if d.redelivered {
        stats.redelivered.fetch_add(1, Ordering::Relaxed);
    }
    let native = d
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_string());
    let Some((id, id_source)) = message_id(&headers, native.as_deref()) else {
        dead_letter(
            rabbit,
            cfg,
            stats,
            &d,
            &headers,
            "message has no usable id",
            None,
        )
        .await;
        return;
    };
    let msg = Message {
        id,
        id_source,
        system: "rabbitmq",
        destination: cfg.queue.clone(),
        key: None,
        payload: bytes::Bytes::copy_from_slice(&d.data),
        headers,
        attempt,
    };
    match process(
        inbox,
        &cfg.queue,
        handler,
        &msg,
        &cfg.retry,
        cfg.observer.as_deref(),
    )
    .await
    {
        Ok(Processed::Applied) => {
            crate::transport::failpoint("after-commit-before-ack");
            stats.applied.fetch_add(1, Ordering::Relaxed);
            ack(&d).await;
        }
        Ok(Processed::Duplicate) => {
            stats.duplicates.fetch_add(1, Ordering::Relaxed);
            ack(&d).await;
        }
        Ok(Processed::Retry(delay, e)) => {
            tracing::debug!(id = %msg.id, attempt, error = %e, ?delay, "handler failed; will retry");
            let mut headers = msg.headers.clone();
            headers.insert(ATTEMPT_HEADER.to_string(), (attempt + 1).to_string());
            let retry_queue = format!("{}.retry", cfg.queue);
            match rabbit
                .send(
                    &retry_queue,
                    &d.data,
                    native.as_deref(),
                    &headers,
                    Some(delay),
                )
                .await
            {
                Ok(()) => {
                    stats.retries.fetch_add(1, Ordering::Relaxed);
                    ack(&d).await;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "retry publish failed; message requeued");
                    nack(&d).await;
                }
            }
        }
        Ok(Processed::DeadLetter(_)) if already_done(inbox, &cfg.queue, &msg.id).await => {
            // A twin of this message was dead-lettered already (see `already_done`).
            stats.duplicates.fetch_add(1, Ordering::Relaxed);
            ack(&d).await;
        }
        Ok(Processed::DeadLetter(e)) => {
            dead_letter(
                rabbit,
                cfg,
                stats,
                &d,
                &msg.headers,
                &e.to_string(),
                Some(settle_later(inbox, &cfg.queue, &msg.id)),
            )
            .await;
        }
        Err(e) => {
            tracing::warn!(id = %msg.id, error = %e, "inbox store failed; delivery requeued");
            stats.store_errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
            nack(&d).await;
        }
    }
}

/// Publish to the dead-letter queue with the error; then, when the message has an id, record
/// it in the inbox (`settle`, see [`crate::consume::settle_dead_letter`]), and acknowledge.
async fn dead_letter(
    rabbit: &Rabbit,
    cfg: &ConsumerConfig,
    stats: &ConsumerStats,
    d: &lapin::message::Delivery,
    headers: &BTreeMap<String, String>,
    error: &str,
    settle: Option<SettleLater<'_>>,
) {
    let mut headers = headers.clone();
    headers.insert(ERROR_HEADER.to_string(), error.to_string());
    let id = d
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_string());
    let dlq = format!("{}.dlq", cfg.queue);
    match rabbit
        .send(&dlq, &d.data, id.as_deref(), &headers, None)
        .await
    {
        Ok(()) => {
            tracing::warn!(queue = %cfg.queue, error, "message dead-lettered");
            if let Some(settle) = settle {
                settle.await;
            }
            stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            ack(d).await;
        }
        Err(e) => {
            tracing::error!(error = %e, "dead-letter publish failed; message requeued");
            nack(d).await;
        }
    }
}

/// How long an ack, nack or publish may wait on the broker. A connection that died without
/// lapin noticing yet must not hold a delivery (and a clean stop) forever; a lost ack only
/// means a redelivery, which the inbox turns into a duplicate.
const BROKER_CALL_TIMEOUT: Duration = Duration::from_secs(5);

async fn ack(d: &lapin::message::Delivery) {
    match tokio::time::timeout(BROKER_CALL_TIMEOUT, d.acker.ack(BasicAckOptions::default())).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "rabbitmq ack failed; the message will be redelivered")
        }
        Err(_) => tracing::debug!("rabbitmq ack timed out; the message will be redelivered"),
    }
}

async fn nack(d: &lapin::message::Delivery) {
    let requeue = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    match tokio::time::timeout(BROKER_CALL_TIMEOUT, d.acker.nack(requeue)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "rabbitmq nack failed; the message will be redelivered")
        }
        Err(_) => tracing::debug!("rabbitmq nack timed out; the message will be redelivered"),
    }
}
