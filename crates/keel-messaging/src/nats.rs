//! NATS JetStream: a durable pull consumer that acknowledges only after the inbox transaction
//! committed, and a publisher for the outbox relay that waits for JetStream's publish ack and
//! sets `Nats-Msg-Id` so the stream itself drops relay duplicates within its dedup window.
//!
//! Deliveries already waiting are settled together, up to [`ConsumerConfig::batch`], in one
//! store transaction ([`crate::consume::process_batch`]); then per delivery: applied or
//! duplicate → `ack`; handler failure →
//! `nak` with the policy's backoff (JetStream redelivers after it); last attempt → the message
//! is published to the dead-letter subject with its error, then `term`inated; store failure →
//! `nak` after a short delay. The consumer's own `max_deliver` is unlimited: Keel's policy
//! decides when to dead-letter, so nothing is dropped by the server silently.
//!
//! Message id: Keel's `keel-message-id` header, else `Nats-Msg-Id`, else
//! `<stream>/<stream sequence>` (stable across redeliveries).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::AckPolicy, consumer::pull};
use futures_util::{FutureExt, StreamExt};
use keel_core::BoxError;

use crate::consume::{
    Handler, Inbox, Processed, SettleLater, already_done, process_batch, settle_later,
};
use crate::message::{Message, message_id};
use crate::retry::RetryPolicy;
use crate::store::{Outgoing, Publisher};
pub use crate::transport::ConsumerStats;
use crate::transport::failpoint;

/// The header carrying a dead-lettered message's last error.
pub const ERROR_HEADER: &str = "keel-error";

/// A connection to NATS with JetStream.
#[derive(Debug, Clone)]
pub struct Nats {
    js: jetstream::Context,
}

impl Nats {
    /// Connect to `url` (`nats://127.0.0.1:4222`).
    pub async fn connect(url: &str) -> Result<Nats, BoxError> {
        let client = async_nats::connect(url).await?;
        Ok(Nats {
            js: jetstream::new(client),
        })
    }

    /// Create `stream` over `subjects` if absent (file storage, limits retention).
    pub async fn ensure_stream(&self, stream: &str, subjects: Vec<String>) -> Result<(), BoxError> {
        self.js
            .get_or_create_stream(jetstream::stream::Config {
                name: stream.to_string(),
                subjects,
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    /// Delete `stream` (tests, teardown).
    pub async fn delete_stream(&self, stream: &str) -> Result<(), BoxError> {
        self.js.delete_stream(stream).await?;
        Ok(())
    }

    /// The underlying JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }
}

impl Nats {
    /// Send one outbox row; the returned future resolves with JetStream's ack.
    async fn send(&self, msg: &Outgoing) -> Result<jetstream::context::PublishAckFuture, BoxError> {
        let mut headers = async_nats::HeaderMap::new();
        for (k, v) in &msg.headers {
            headers.insert(k.as_str(), v.as_str());
        }
        // JetStream drops a second publish with the same id inside the stream's duplicate
        // window: a relay that crashed between publish and marking the row sent does not
        // even reach consumers twice (and if it does, the inbox catches it).
        headers.insert("Nats-Msg-Id", msg.message_id.as_str());
        Ok(self
            .js
            .publish_with_headers(msg.destination.clone(), headers, msg.payload.clone())
            .await?)
    }
}

impl Publisher for Nats {
    async fn publish(&self, msg: &Outgoing) -> Result<(), BoxError> {
        self.send(msg).await?.await?;
        Ok(())
    }

    /// Pipelined: send the batch, then collect the acks in order.
    async fn publish_batch(&self, msgs: &[Outgoing]) -> (usize, Option<BoxError>) {
        let mut pending = Vec::with_capacity(msgs.len());
        let mut send_error = None;
        for m in msgs {
            match self.send(m).await {
                Ok(ack) => pending.push(ack),
                Err(e) => {
                    send_error = Some(e);
                    break;
                }
            }
        }
        let sent = pending.len();
        for (i, ack) in pending.into_iter().enumerate() {
            if let Err(e) = ack.await {
                return (i, Some(Box::new(e)));
            }
        }
        // Every message sent was acked; a send error (if any) stopped the rest.
        (sent, send_error)
    }
}

/// A consumer's settings.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The stream to read.
    pub stream: String,
    /// Durable consumer name (also the inbox's consumer key).
    pub durable: String,
    /// Subject filter (empty: the whole stream).
    pub filter_subject: String,
    /// Where messages go after their last failed attempt.
    pub dead_letter_subject: String,
    /// Messages processed at once (in `max_in_flight / batch` concurrent transactions). 64.
    pub max_in_flight: usize,
    /// Most deliveries settled in one store transaction (one claim statement, one commit):
    /// the deliveries already waiting are taken together, up to this many, so a busy
    /// consumer pays the store's commit per batch and an idle one adds no wait. 16.
    pub batch: usize,
    /// How long JetStream waits for an ack before redelivering. 30 s: longer than any
    /// handler should run; a crashed consumer's messages come back after it.
    pub ack_wait: Duration,
    /// Retries and dead-lettering.
    pub retry: RetryPolicy,
    /// The App's observer: each delivery is reported to it (a CONSUMER span, the message
    /// metrics). `None` reports nothing.
    pub observer: Option<keel_core::observe::SharedObserver>,
}

impl ConsumerConfig {
    /// Defaults for `durable` on `stream`.
    pub fn new(stream: &str, durable: &str) -> ConsumerConfig {
        ConsumerConfig {
            stream: stream.to_string(),
            durable: durable.to_string(),
            filter_subject: String::new(),
            dead_letter_subject: format!("{stream}.dlq"),
            max_in_flight: 64,
            batch: 16,
            ack_wait: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            observer: None,
        }
    }
}

/// Consume until `stop` resolves, then finish the messages in flight (commit and ack them)
/// and return: nothing a clean stop applied is delivered again. Messages the client had
/// fetched but not started are handed back with a `nak`, so another instance takes them at
/// once rather than after `ack_wait` (counted in [`ConsumerStats::returned`]); the few still
/// on the wire when the subscription closes come back after `ack_wait`. Either way the
/// redelivery counts as an attempt, as JetStream counts deliveries, not handler runs.
pub async fn run<I, H>(
    nats: &Nats,
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
    let stream = nats.js.get_stream(&cfg.stream).await?;
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            &cfg.durable,
            pull::Config {
                durable_name: Some(cfg.durable.clone()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: cfg.ack_wait,
                max_deliver: -1,
                filter_subject: cfg.filter_subject.clone(),
                max_ack_pending: i64::try_from(cfg.max_in_flight.max(1) * 4).unwrap_or(64),
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.messages().await?;
    let batch = cfg.batch.clamp(1, cfg.max_in_flight.max(1));
    // `max_in_flight` messages at once: that many / `batch` transactions of up to `batch`.
    let transactions = (cfg.max_in_flight.max(1) / batch).max(1);
    messages
        .by_ref()
        .take_until(stop)
        .ready_chunks(batch)
        .for_each_concurrent(transactions, |deliveries| {
            let stats = stats.clone();
            async move {
                // Two parallel vectors, so the batch is handed to the store without copying
                // any message.
                let mut acks = Vec::with_capacity(deliveries.len());
                let mut msgs = Vec::with_capacity(deliveries.len());
                for delivery in deliveries {
                    match delivery {
                        Ok(m) => {
                            if let Some(msg) = prepare(nats, cfg, &stats, &m).await {
                                acks.push(m);
                                msgs.push(msg);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "jetstream delivery error"),
                    }
                }
                handle_batch(nats, cfg, inbox, handler, &stats, &acks, &msgs).await;
            }
        })
        .await;
    // What the client prefetched and never started goes back now: left alone it would wait
    // out `ack_wait` (30 s by default) in a drained instance before anyone else could run it.
    // Only what is already buffered is taken; an error ends the hand-back (the rest returns
    // after `ack_wait`, as a crash's would).
    while let Some(Some(Ok(m))) = messages.next().now_or_never() {
        ack(&m, AckKind::Nak(None)).await;
        stats.returned.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Settle a batch: one store transaction for all of it, then each delivery's ack.
async fn handle_batch<I, H>(
    nats: &Nats,
    cfg: &ConsumerConfig,
    inbox: &I,
    handler: &H,
    stats: &ConsumerStats,
    deliveries: &[jetstream::Message],
    msgs: &[Message],
) where
    I: Inbox,
    H: Handler<I::Tx>,
{
    if msgs.is_empty() {
        return;
    }
    match process_batch(
        inbox,
        &cfg.durable,
        handler,
        msgs,
        &cfg.retry,
        cfg.observer.as_deref(),
    )
    .await
    {
        Ok(results) => {
            for ((m, msg), result) in deliveries.iter().zip(msgs).zip(results) {
                settle(nats, cfg, inbox, stats, m, msg, result).await;
            }
        }
        Err(e) => {
            tracing::warn!(deliveries = msgs.len(), error = %e, "inbox store failed; deliveries returned");
            for m in deliveries {
                stats.store_errors.fetch_add(1, Ordering::Relaxed);
                ack(m, AckKind::Nak(Some(Duration::from_secs(1)))).await;
            }
        }
    }
}

/// The delivery as a [`Message`]; `None` when it cannot be processed (no ack metadata, or
/// no usable id — then it has been dead-lettered).
async fn prepare(
    nats: &Nats,
    cfg: &ConsumerConfig,
    stats: &ConsumerStats,
    m: &jetstream::Message,
) -> Option<Message> {
    let (seq, delivered) = match m.info() {
        Ok(i) => (i.stream_sequence, i.delivered),
        Err(e) => {
            tracing::warn!(error = %e, "jetstream message without ack metadata");
            return None;
        }
    };
    let mut headers = BTreeMap::new();
    if let Some(h) = &m.headers {
        for (k, values) in h.iter() {
            if let Some(v) = values.first() {
                headers.insert(k.to_string().to_ascii_lowercase(), v.to_string());
            }
        }
    }
    let native = headers
        .get("nats-msg-id")
        .cloned()
        .unwrap_or_else(|| format!("{}/{seq}", cfg.stream));
    let attempt = u32::try_from(delivered.max(1)).unwrap_or(u32::MAX);
    if attempt > 1 {
        stats.redelivered.fetch_add(1, Ordering::Relaxed);
    }
    let Some((id, id_source)) = message_id(&headers, Some(&native)) else {
        dead_letter(
            nats,
            cfg,
            stats,
            m,
            &headers,
            "message has no usable id",
            None,
        )
        .await;
        return None;
    };
    Some(Message {
        id,
        id_source,
        system: "nats",
        destination: m.subject.to_string(),
        key: None,
        payload: m.payload.clone(),
        headers,
        attempt,
    })
}

/// Act on one delivery's outcome: ack, nak with the backoff, or dead-letter.
async fn settle<I: Inbox>(
    nats: &Nats,
    cfg: &ConsumerConfig,
    inbox: &I,
    stats: &ConsumerStats,
    m: &jetstream::Message,
    msg: &Message,
    result: Processed,
) {
    match result {
        Processed::Applied => {
            failpoint("after-commit-before-ack");
            stats.applied.fetch_add(1, Ordering::Relaxed);
            ack(m, AckKind::Ack).await;
        }
        Processed::Duplicate => {
            stats.duplicates.fetch_add(1, Ordering::Relaxed);
            ack(m, AckKind::Ack).await;
        }
        Processed::Retry(delay, e) => {
            tracing::debug!(id = %msg.id, attempt = msg.attempt, error = %e, ?delay, "handler failed; will retry");
            stats.retries.fetch_add(1, Ordering::Relaxed);
            ack(m, AckKind::Nak(Some(delay))).await;
        }
        Processed::DeadLetter(_) if already_done(inbox, &cfg.durable, &msg.id).await => {
            // A twin of this message was dead-lettered already (see `already_done`).
            stats.duplicates.fetch_add(1, Ordering::Relaxed);
            ack(m, AckKind::Ack).await;
        }
        Processed::DeadLetter(e) => {
            let settle = settle_later(inbox, &cfg.durable, &msg.id);
            dead_letter(
                nats,
                cfg,
                stats,
                m,
                &msg.headers,
                &e.to_string(),
                Some(settle),
            )
            .await;
        }
    }
}

/// Publish to the dead-letter subject with the error, record it in the inbox when it has an
/// id (`settle`), then stop redelivery. If the dead-letter publish fails the message is `nak`ed instead: it is never dropped silently.
async fn dead_letter(
    nats: &Nats,
    cfg: &ConsumerConfig,
    stats: &ConsumerStats,
    m: &jetstream::Message,
    headers: &BTreeMap<String, String>,
    error: &str,
    settle: Option<SettleLater<'_>>,
) {
    let mut h = async_nats::HeaderMap::new();
    for (k, v) in headers {
        h.insert(k.as_str(), v.as_str());
    }
    h.insert(ERROR_HEADER, error);
    h.insert("keel-original-subject", m.subject.as_str());
    let published = match nats
        .js
        .publish_with_headers(cfg.dead_letter_subject.clone(), h, m.payload.clone())
        .await
    {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match published {
        Ok(()) => {
            tracing::warn!(subject = %m.subject, error, "message dead-lettered");
            if let Some(settle) = settle {
                settle.await;
            }
            stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            ack(m, AckKind::Term).await;
        }
        Err(e) => {
            tracing::error!(error = %e, "dead-letter publish failed; message returned");
            ack(m, AckKind::Nak(Some(Duration::from_secs(1)))).await;
        }
    }
}

async fn ack(m: &jetstream::Message, kind: AckKind) {
    // A lost ack means a redelivery, which the inbox turns into a duplicate: log, go on.
    if let Err(e) = m.ack_with(kind).await {
        tracing::debug!(error = %e, "jetstream ack failed; the message will be redelivered");
    }
}
