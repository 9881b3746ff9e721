//! The embedded transport: no broker. The outbox relay hands each row straight to the
//! in-process consumers subscribed to its destination, through the same inbox protocol, and
//! the row is marked sent only once every consumer has settled it (applied, duplicate, or
//! dead-lettered). So the outbox table *is* the durable queue: a crash before settlement
//! leaves the row unsent, the next relay delivers it again, and the inbox turns what was
//! already applied into a duplicate.
//!
//! A handler failure makes the publish fail, so the relay stops there and retries that row
//! on its next pass (order is kept, as a partition would keep it; the relay's pace is the
//! backoff). After the policy's last attempt the message is dead-lettered — logged, and kept
//! in [`Embedded::dead_letters`] with its error (in memory: the embedded transport is for one
//! process, demos and tests) — and the row moves on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use keel_core::BoxError;

use crate::consume::{Handler, Inbox, Processed, process};
use crate::message::{IdSource, Message};
use crate::retry::RetryPolicy;
use crate::store::{Outgoing, Publisher};
use crate::transport::ConsumerStats;
use keel_core::observe::SharedObserver;

/// One in-process consumer: its name (the inbox key), what it consumes, and its settlement.
type Subscriber = Arc<dyn Fn(Message) -> SettleFuture + Send + Sync>;
type SettleFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Processed, BoxError>> + Send>>;

/// A dead letter: the message and its last error.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The message.
    pub message: Message,
    /// Why it was given up on.
    pub error: String,
}

/// The in-process broker. Register consumers with [`Embedded::subscribe`], then use it as the
/// outbox relay's [`Publisher`].
#[derive(Clone, Default)]
pub struct Embedded {
    subscribers: Arc<Mutex<HashMap<String, Vec<Subscriber>>>>,
    /// Attempts per message id, for the retry policy (in memory: a restart starts counting
    /// again, which only means a few more retries).
    attempts: Arc<Mutex<HashMap<String, u32>>>,
    dead: Arc<Mutex<Vec<DeadLetter>>>,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded").finish_non_exhaustive()
    }
}

/// How one embedded consumer runs.
#[derive(Debug, Clone, Default)]
pub struct Subscription {
    /// Retries and dead-lettering.
    pub retry: RetryPolicy,
    /// The consumer's counters.
    pub stats: Arc<ConsumerStats>,
    /// The consuming App's observer: each delivery is reported to it when given.
    pub observer: Option<SharedObserver>,
}

impl Embedded {
    /// An embedded broker with no consumers.
    pub fn new() -> Embedded {
        Embedded::default()
    }

    /// Deliver `destination`'s messages to `handler` as consumer `name`, through `inbox`,
    /// with the retries, counters and observer of `how`.
    pub fn subscribe<I, H>(
        &self,
        destination: &str,
        name: &str,
        inbox: I,
        handler: H,
        how: Subscription,
    ) where
        I: Inbox + 'static,
        H: Handler<I::Tx> + 'static,
    {
        let Subscription {
            retry,
            stats,
            observer,
        } = how;
        let shared = Arc::new((inbox, handler, retry, name.to_string(), stats, observer));
        let sub: Subscriber = Arc::new(move |msg: Message| {
            let shared = shared.clone();
            Box::pin(async move {
                let (inbox, handler, retry, name, stats, observer) = &*shared;
                let r = process(inbox, name, handler, &msg, retry, observer.as_deref()).await?;
                let counter = match &r {
                    Processed::Applied => &stats.applied,
                    Processed::Duplicate => &stats.duplicates,
                    Processed::Retry(..) => &stats.retries,
                    Processed::DeadLetter(_) => &stats.dead_lettered,
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(r)
            })
        });
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(destination.to_string())
            .or_default()
            .push(sub);
    }

    /// Messages given up on so far (their last error attached).
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.dead.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Publisher for Embedded {
    async fn publish(&self, row: &Outgoing) -> Result<(), BoxError> {
        let subs = self
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&row.destination)
            .cloned()
            .unwrap_or_default();
        let attempt = {
            let mut a = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
            let n = a.entry(row.message_id.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let msg = Message {
            id: row.message_id.clone(),
            id_source: IdSource::Keel,
            system: "embedded",
            destination: row.destination.clone(),
            key: row.key.clone(),
            payload: row.payload.clone(),
            headers: row.headers.clone(),
            attempt,
        };
        // Every subscriber must settle the message before the row counts as sent. One that
        // is already applied answers "duplicate" on the retry, so re-running all is safe.
        for sub in subs {
            match sub(msg.clone()).await? {
                Processed::Applied | Processed::Duplicate => {}
                Processed::Retry(_, e) => return Err(e),
                Processed::DeadLetter(e) => {
                    tracing::warn!(destination = %row.destination, error = %e, "message dead-lettered");
                    self.dead
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(DeadLetter {
                            message: msg.clone(),
                            error: e.to_string(),
                        });
                }
            }
        }
        self.attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&row.message_id);
        Ok(())
    }
}
