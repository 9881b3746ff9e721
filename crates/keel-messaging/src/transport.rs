//! What every broker transport shares: consumer counters and the crash-test failpoint.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64};

use keel_core::{Phase, Shutdown};

/// The stop signal handed to a consumer run by [`spawn_in_lifecycle`].
pub type Stop = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Run a consumer as part of a service's lifecycle: it stops fetching as soon as the drain
/// begins (readiness withdrawn), and the drain sequence waits — within its drain delay — for
/// the messages it already has to be committed and acknowledged, so a clean shutdown leaves
/// nothing to redeliver. `make` receives the stop signal and returns the consumer's future,
/// e.g. `|stop| async move { let _ = nats::run(&n, &cfg, &store, &h, stats, stop).await; }`.
pub fn spawn_in_lifecycle<F, Fut>(shutdown: &Shutdown, name: &str, make: F)
where
    F: FnOnce(Stop) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let lifecycle = shutdown.clone();
    let stop: Stop = Box::pin(async move { lifecycle.reached(Phase::Draining).await });
    let consumer = tokio::spawn(make(stop));
    let label = name.to_string();
    shutdown.on_drain(format!("consumer {name}"), move || async move {
        if let Err(e) = consumer.await {
            tracing::error!(consumer = %label, error = %e, "consumer task failed during drain");
        }
    });
}

/// Counters of a running consumer.
#[derive(Debug)]
pub struct ConsumerStats {
    /// Deliveries applied (handler ran, committed, acked).
    pub applied: AtomicU64,
    /// Redeliveries acknowledged without running the handler.
    pub duplicates: AtomicU64,
    /// Deliveries whose broker attempt count was above 1.
    pub redelivered: AtomicU64,
    /// Handler failures sent back for a retry.
    pub retries: AtomicU64,
    /// Messages sent to the dead-letter subject.
    pub dead_lettered: AtomicU64,
    /// Store failures (delivery returned to the broker).
    pub store_errors: AtomicU64,
    /// Fetched deliveries handed back unstarted when the consumer stopped (NATS: `nak`ed at
    /// the drain, so another instance runs them without waiting out `ack_wait`).
    pub returned: AtomicU64,
    /// Partition assignments received (Kafka: one per rebalance that gave this member
    /// partitions).
    pub assignments: AtomicU64,
    /// Messages behind the end of the consumed partitions or queue, where the broker tells
    /// (Kafka: the client's statistics; -1 until known).
    pub lag: AtomicI64,
}

impl Default for ConsumerStats {
    /// Zero counters, lag unknown.
    fn default() -> ConsumerStats {
        ConsumerStats {
            applied: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            redelivered: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            store_errors: AtomicU64::new(0),
            returned: AtomicU64::new(0),
            assignments: AtomicU64::new(0),
            lag: AtomicI64::new(-1),
        }
    }
}

/// Counters of an outbox relay and retention job (the `*_observed` loops of the stores).
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Unsent outbox rows at the relay's last look (a growing number: the broker is down or
    /// slower than the producers).
    pub backlog: AtomicI64,
    /// Outbox rows the broker confirmed.
    pub published: AtomicU64,
    /// Relay passes that failed or stopped short (store or broker errors).
    pub relay_failures: AtomicU64,
    /// Inbox claims and sent outbox rows deleted by the retention job.
    pub pruned: AtomicU64,
}

/// Test-only crash points: `KEEL_FAILPOINTS=after-commit-before-ack:0.01` aborts the process
/// at that point with that probability, so the crash test can kill a consumer exactly between
/// its commit and its ack. Unset (always, in production) it costs one load of a static.
pub fn failpoint(name: &str) {
    use std::sync::OnceLock;
    static POINTS: OnceLock<Vec<(String, f64)>> = OnceLock::new();
    let points = POINTS.get_or_init(|| {
        std::env::var("KEEL_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .filter_map(|p| {
                let (n, prob) = p.split_once(':')?;
                Some((n.trim().to_string(), prob.trim().parse().ok()?))
            })
            .collect()
    });
    if points.is_empty() {
        return;
    }
    if let Some((_, p)) = points.iter().find(|(n, _)| n == name) {
        let draw = (keel_core::codec::rand::next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        if draw < *p {
            eprintln!("failpoint {name}: aborting");
            std::process::abort();
        }
    }
}
