//! The per-delivery protocol that turns at-least-once delivery into exactly-once effects.
//!
//! ```text
//! begin → claim (consumer, message id) in the inbox ─ already claimed → rollback → Duplicate (ack)
//!                                                 └─ new → handler(msg, tx) ─ Ok  → commit → Applied (ack)
//!                                                                           └─ Err → rollback → Retry / DeadLetter
//! ```
//!
//! The claim and the handler's writes share one transaction, so they commit together or not
//! at all. The broker is acknowledged only *after* the commit: a crash between commit and
//! ack redelivers the message, which then finds its claim and is acknowledged without running
//! the handler again. A crash before the commit loses nothing either: the transaction rolls
//! back and the message is redelivered.
//!
//! A store error (begin, claim or commit failing) is neither a handler failure nor a
//! duplicate: the delivery is returned to the broker for redelivery and does not use up an
//! attempt.

use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

use keel_core::BoxError;
use keel_core::observe::{MessageRecord, MessageSide, Observer, Outcome};

use crate::message::Message;
use crate::retry::{Decision, RetryPolicy};

/// A store failure (connection lost, serialization failure, disk full…).
#[derive(Debug, thiserror::Error)]
#[error("inbox store: {0}")]
pub struct StoreError(#[source] pub BoxError);

/// One transaction on the service's store, in which the inbox claim and the handler's writes
/// commit together.
pub trait Tx: Send {
    /// Claim `(consumer, message_id)`: insert it if absent. True when this transaction
    /// inserted it (the message is new), false when it was already there (a redelivery).
    fn claim(
        &mut self,
        consumer: &str,
        message_id: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Claim several ids in one go (a batch's claims): for each, true when this transaction
    /// inserted it. An id repeated in `ids` is new at most once. The default claims one at a
    /// time; a networked store overrides it with one statement.
    fn claim_many(
        &mut self,
        consumer: &str,
        ids: &[&str],
    ) -> impl Future<Output = Result<Vec<bool>, StoreError>> + Send {
        async move {
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                out.push(self.claim(consumer, id).await?);
            }
            Ok(out)
        }
    }

    /// Make the claim and the handler's writes durable.
    fn commit(self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Undo everything this transaction did.
    fn rollback(self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The store holding the inbox (and the service's own tables).
pub trait Inbox: Send + Sync {
    /// Its transaction type.
    type Tx: Tx;

    /// Start a transaction.
    fn begin(&self) -> impl Future<Output = Result<Self::Tx, StoreError>> + Send;
}

/// A consumer's handler: its effects go through `tx`, so they commit with the inbox claim.
pub trait Handler<T: Tx>: Send + Sync {
    /// Apply `msg`. An error rolls the transaction back; the delivery is retried or
    /// dead-lettered by the [`RetryPolicy`].
    fn handle(
        &self,
        msg: &Message,
        tx: &mut T,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// What became of one delivery; the transport acts on it.
#[derive(Debug)]
pub enum Processed {
    /// Applied and committed: acknowledge.
    Applied,
    /// Already applied earlier (a redelivery): acknowledge without doing anything.
    Duplicate,
    /// The handler failed: redeliver after this delay (nack / negative ack with delay).
    Retry(Duration, BoxError),
    /// The handler failed on its last attempt: send to the dead-letter destination with the
    /// error, then acknowledge the original.
    DeadLetter(BoxError),
}

/// Process one delivery for `consumer` (the inbox is keyed by consumer, so two consumers of
/// the same message each apply it once). `Err`: the store failed; return the delivery to the
/// broker for redelivery without counting an attempt.
pub async fn process<I, H>(
    inbox: &I,
    consumer: &str,
    handler: &H,
    msg: &Message,
    policy: &RetryPolicy,
    observer: Option<&dyn Observer>,
) -> Result<Processed, StoreError>
where
    I: Inbox,
    H: Handler<I::Tx>,
{
    let started = Instant::now();
    let wall = SystemTime::now();
    let mut tx = inbox.begin().await?;
    let claimed = match tx.claim(consumer, &msg.id).await {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.rollback().await;
            return Err(e);
        }
    };
    if !claimed {
        tx.rollback().await?;
        let result = Processed::Duplicate;
        report(observer, msg, &result, wall, started.elapsed());
        return Ok(result);
    }
    let result = match handler.handle(msg, &mut tx).await {
        Ok(()) => {
            tx.commit().await?;
            Processed::Applied
        }
        Err(e) => {
            tx.rollback().await?;
            match policy.decide(msg.attempt) {
                Decision::Retry(delay) => Processed::Retry(delay, e),
                Decision::DeadLetter => Processed::DeadLetter(e),
            }
        }
    };
    report(observer, msg, &result, wall, started.elapsed());
    Ok(result)
}

/// Record a dead-lettered message as done in `consumer`'s inbox, in a transaction of its own.
/// Transports call it after the dead letter was published and before the original is
/// acknowledged, so a redelivery of the original — its acknowledgement lost to a broken
/// connection — is a duplicate, not a second dead letter. Never before the publish: a
/// publish that then failed would leave the message claimed and nowhere. A failure here is
/// logged and otherwise ignored: the worst it allows is the duplicate dead letter at-least-once
/// delivery permits.
pub async fn settle_dead_letter<I: Inbox>(inbox: &I, consumer: &str, message_id: &str) {
    if let Err(e) = claim_alone(inbox, consumer, message_id, true).await {
        tracing::warn!(consumer, message_id, error = %e, "could not record a dead letter in the inbox; a redelivery would dead-letter it again");
    }
}

/// [`settle_dead_letter`] for later: what a transport hands its dead-letter publisher, which
/// runs it only once the dead letter is out. Boxed: it exists only on the dead-letter path.
pub type SettleLater<'a> = std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// [`settle_dead_letter`], run when the returned future is awaited.
pub fn settle_later<'a, I: Inbox>(
    inbox: &'a I,
    consumer: &'a str,
    message_id: &'a str,
) -> SettleLater<'a> {
    Box::pin(settle_dead_letter(inbox, consumer, message_id))
}

/// Whether `message_id` is already recorded in `consumer`'s inbox — applied, or dead-lettered
/// and settled. Transports ask before publishing a dead letter: two copies of one message (a
/// redelivery after a lost acknowledgement) can reach their last attempt in one batch, both
/// fail, and only the first may be dead-lettered. A store error answers `false` (the dead
/// letter goes out: a duplicate is better than a loss).
pub async fn already_done<I: Inbox>(inbox: &I, consumer: &str, message_id: &str) -> bool {
    matches!(
        claim_alone(inbox, consumer, message_id, false).await,
        Ok(false)
    )
}

/// Claim `message_id` for `consumer` in a transaction of its own, committed when `keep`,
/// rolled back otherwise (a question, then: is it claimed already?); whether the claim was new.
async fn claim_alone<I: Inbox>(
    inbox: &I,
    consumer: &str,
    message_id: &str,
    keep: bool,
) -> Result<bool, StoreError> {
    let mut tx = inbox.begin().await?;
    match tx.claim(consumer, message_id).await {
        Ok(new) if keep => tx.commit().await.map(|()| new),
        Ok(new) => tx.rollback().await.map(|()| new),
        Err(e) => {
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

/// Process several deliveries in one transaction: one claim statement for all of them, the
/// handlers of the new ones in order, one commit — so the store's round trips and its commit
/// (an fsync) are paid per batch, not per message. Results are in `msgs` order.
///
/// If any handler fails, the whole transaction is rolled back and the batch is processed
/// again one message at a time with [`process`], so a poison message costs its neighbours a
/// retry, never an effect or an attempt. `Err`: the store failed; return every delivery.
pub async fn process_batch<I, H>(
    inbox: &I,
    consumer: &str,
    handler: &H,
    msgs: &[Message],
    policy: &RetryPolicy,
    observer: Option<&dyn Observer>,
) -> Result<Vec<Processed>, StoreError>
where
    I: Inbox,
    H: Handler<I::Tx>,
{
    if msgs.len() == 1 {
        return Ok(vec![
            process(inbox, consumer, handler, &msgs[0], policy, observer).await?,
        ]);
    }
    let started = Instant::now();
    let wall = SystemTime::now();
    let mut tx = inbox.begin().await?;
    let ids: Vec<&str> = msgs.iter().map(|m| m.id.as_str()).collect();
    let claimed = match tx.claim_many(consumer, &ids).await {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.rollback().await;
            return Err(e);
        }
    };
    let mut failed = false;
    for (msg, new) in msgs.iter().zip(&claimed) {
        if *new && handler.handle(msg, &mut tx).await.is_err() {
            failed = true;
            break;
        }
    }
    if failed {
        tx.rollback().await?;
        let mut out = Vec::with_capacity(msgs.len());
        for msg in msgs {
            out.push(process(inbox, consumer, handler, msg, policy, observer).await?);
        }
        return Ok(out);
    }
    tx.commit().await?;
    let elapsed = started.elapsed();
    let out: Vec<Processed> = claimed
        .iter()
        .map(|new| {
            if *new {
                Processed::Applied
            } else {
                Processed::Duplicate
            }
        })
        .collect();
    for (msg, result) in msgs.iter().zip(&out) {
        report(observer, msg, result, wall, elapsed);
    }
    Ok(out)
}

/// Tell telemetry (a CONSUMER span under the producer's, and the message metrics).
fn report(
    observer: Option<&dyn Observer>,
    msg: &Message,
    result: &Processed,
    start: SystemTime,
    duration: Duration,
) {
    let Some(observer) = observer else {
        return;
    };
    // The context the producer sent (trace, baggage, deadline) travels in the headers.
    let policy = keel_core::context::InboundPolicy {
        route_timeout: Duration::from_secs(3600),
        sample_roots: false,
    };
    let Ok(ctx) = keel_core::Context::from_headers(
        &msg.headers,
        &policy,
        None,
        keel_core::tasks::Registry::global(),
    ) else {
        return;
    };
    let outcome = match result {
        Processed::Applied | Processed::Duplicate => Outcome::Answered,
        Processed::Retry(..) | Processed::DeadLetter(_) => Outcome::Failed,
    };
    observer.message(&MessageRecord {
        ctx: &ctx,
        span_id: None,
        side: MessageSide::Process,
        system: msg.system,
        destination: &msg.destination,
        message_id: Some(&msg.id),
        outcome,
        attempt: msg.attempt,
        duplicate: matches!(result, Processed::Duplicate),
        start,
        duration,
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::{BTreeMap, HashSet};
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;

    use super::*;
    use crate::message::IdSource;

    /// What a [`MemStore`] has committed: inbox claims and effects.
    type Committed = (HashSet<(String, String)>, Vec<String>);

    /// An in-memory store: claims and effects become visible only on commit.
    #[derive(Default, Clone)]
    struct MemStore {
        committed: Arc<Mutex<Committed>>,
        fail_commit: Arc<Mutex<bool>>,
    }

    struct MemTx {
        store: MemStore,
        claims: Vec<(String, String)>,
        effects: Vec<String>,
    }

    impl Tx for MemTx {
        async fn claim(&mut self, consumer: &str, id: &str) -> Result<bool, StoreError> {
            let key = (consumer.to_string(), id.to_string());
            let known = self.store.committed.lock().unwrap().0.contains(&key);
            if known || self.claims.contains(&key) {
                return Ok(false);
            }
            self.claims.push(key);
            Ok(true)
        }

        async fn commit(self) -> Result<(), StoreError> {
            if *self.store.fail_commit.lock().unwrap() {
                return Err(StoreError("disk full".into()));
            }
            let mut c = self.store.committed.lock().unwrap();
            c.0.extend(self.claims);
            c.1.extend(self.effects);
            Ok(())
        }

        async fn rollback(self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    impl Inbox for MemStore {
        type Tx = MemTx;

        async fn begin(&self) -> Result<MemTx, StoreError> {
            Ok(MemTx {
                store: self.clone(),
                claims: Vec::new(),
                effects: Vec::new(),
            })
        }
    }

    /// Records the payload as its effect; fails while `failing` is set.
    struct Apply {
        failing: Mutex<bool>,
    }

    impl Handler<MemTx> for Apply {
        async fn handle(&self, msg: &Message, tx: &mut MemTx) -> Result<(), BoxError> {
            tx.effects
                .push(String::from_utf8_lossy(&msg.payload).into_owned());
            if *self.failing.lock().unwrap() {
                return Err("downstream refused".into());
            }
            Ok(())
        }
    }

    fn msg(id: &str, attempt: u32) -> Message {
        Message {
            id: id.to_string(),
            id_source: IdSource::Keel,
            system: "embedded",
            destination: "orders".into(),
            key: None,
            payload: Bytes::from(format!("effect-{id}")),
            headers: BTreeMap::new(),
            attempt,
        }
    }

    fn handler(failing: bool) -> Apply {
        Apply {
            failing: Mutex::new(failing),
        }
    }

    #[tokio::test]
    async fn a_redelivery_is_acknowledged_without_a_second_effect() {
        let store = MemStore::default();
        let p = RetryPolicy::default();
        let h = handler(false);
        assert!(matches!(
            process(&store, "c", &h, &msg("m1", 1), &p, None)
                .await
                .unwrap(),
            Processed::Applied
        ));
        assert!(matches!(
            process(&store, "c", &h, &msg("m1", 2), &p, None)
                .await
                .unwrap(),
            Processed::Duplicate
        ));
        // Another consumer of the same message applies it once for itself.
        assert!(matches!(
            process(&store, "other", &h, &msg("m1", 1), &p, None)
                .await
                .unwrap(),
            Processed::Applied
        ));
        assert_eq!(
            store.committed.lock().unwrap().1,
            vec!["effect-m1", "effect-m1"]
        );
    }

    #[tokio::test]
    async fn twin_copies_that_both_reach_their_last_attempt_are_dead_lettered_once() {
        // A redelivery after a lost acknowledgement puts two copies of one message on their
        // last attempt, processed in one batch: both fail before either is settled.
        let store = MemStore::default();
        let p = RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        };
        let h = handler(true);
        let twins = [msg("m9", 3), msg("m9", 3)];
        let results = process_batch(&store, "c", &h, &twins, &p, None)
            .await
            .unwrap();
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Processed::DeadLetter(_)))
        );
        // What a transport does with each result, in order: ask, publish, settle.
        let mut published = 0;
        for m in &twins {
            if already_done(&store, "c", &m.id).await {
                continue;
            }
            published += 1;
            settle_dead_letter(&store, "c", &m.id).await;
        }
        assert_eq!(published, 1);
        // Asking left nothing behind for a message never settled.
        assert!(!already_done(&store, "c", "m10").await);
        assert!(!already_done(&store, "c", "m10").await);
        // And a settled message is not applied later by a fixed handler either.
        let fixed = handler(false);
        let again = process(&store, "c", &fixed, &msg("m9", 1), &p, None)
            .await
            .unwrap();
        assert!(matches!(again, Processed::Duplicate), "{again:?}");
    }

    #[tokio::test]
    async fn a_failing_handler_leaves_no_effect_and_retries_then_dead_letters() {
        let store = MemStore::default();
        let p = RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        };
        let h = handler(true);
        for attempt in 1..3 {
            let r = process(&store, "c", &h, &msg("m2", attempt), &p, None)
                .await
                .unwrap();
            assert!(matches!(r, Processed::Retry(..)), "{r:?}");
        }
        let r = process(&store, "c", &h, &msg("m2", 3), &p, None)
            .await
            .unwrap();
        match r {
            Processed::DeadLetter(e) => assert_eq!(e.to_string(), "downstream refused"),
            other => panic!("{other:?}"),
        }
        let c = store.committed.lock().unwrap();
        assert!(c.1.is_empty(), "no effect of a failed handler survives");
        assert!(
            c.0.is_empty(),
            "nor its claim, so a fixed handler can still apply it"
        );
    }

    #[tokio::test]
    async fn a_batch_applies_the_new_skips_the_known_and_falls_back_on_a_failure() {
        let store = MemStore::default();
        let p = RetryPolicy::default();
        let h = handler(false);
        process(&store, "c", &h, &msg("b1", 1), &p, None)
            .await
            .unwrap();
        // b1 is known, b2 appears twice in one batch: applied once, then a duplicate.
        let batch = [msg("b1", 2), msg("b2", 1), msg("b3", 1), msg("b2", 2)];
        let r = process_batch(&store, "c", &h, &batch, &p, None)
            .await
            .unwrap();
        let kinds: Vec<&str> = r
            .iter()
            .map(|x| match x {
                Processed::Applied => "applied",
                Processed::Duplicate => "duplicate",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, ["duplicate", "applied", "applied", "duplicate"]);
        assert_eq!(
            store.committed.lock().unwrap().1,
            vec!["effect-b1", "effect-b2", "effect-b3"]
        );

        // A failing handler rolls the batch back and each message is settled on its own.
        let failing = handler(true);
        let r = process_batch(
            &store,
            "c",
            &failing,
            &[msg("b4", 1), msg("b3", 3)],
            &p,
            None,
        )
        .await
        .unwrap();
        assert!(matches!(r[0], Processed::Retry(..)), "{r:?}");
        assert!(matches!(r[1], Processed::Duplicate), "{r:?}");
        assert_eq!(store.committed.lock().unwrap().1.len(), 3, "nothing more");
    }

    #[tokio::test]
    async fn a_failed_commit_applies_nothing_and_the_redelivery_applies_once() {
        let store = MemStore::default();
        let p = RetryPolicy::default();
        let h = handler(false);
        *store.fail_commit.lock().unwrap() = true;
        assert!(
            process(&store, "c", &h, &msg("m3", 1), &p, None)
                .await
                .is_err()
        );
        assert!(store.committed.lock().unwrap().1.is_empty());
        *store.fail_commit.lock().unwrap() = false;
        assert!(matches!(
            process(&store, "c", &h, &msg("m3", 1), &p, None)
                .await
                .unwrap(),
            Processed::Applied
        ));
        assert!(matches!(
            process(&store, "c", &h, &msg("m3", 2), &p, None)
                .await
                .unwrap(),
            Processed::Duplicate
        ));
        assert_eq!(store.committed.lock().unwrap().1, vec!["effect-m3"]);
    }
}
