//! Messaging in an [`App`]: the `[messaging]` section lives in [`Config`](crate::Config), and
//! a service's consumers and outbox report through the process's `/metrics`.
//!
//! The transports and stores themselves are `keel::messaging` (the `keel-messaging` crate);
//! the facade carries only its config and counters, so a service that sends no messages
//! compiles no broker client.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use keel_messaging::transport::{ConsumerStats, StoreStats};
use keel_telemetry::metrics::Exposition;

use crate::App;

impl App {
    /// Export a consumer's counters as `keel_messaging_consumer_*{consumer="name"}`:
    /// applied, duplicates skipped, redeliveries, retries, dead letters, store errors, and
    /// the lag where the broker reports one.
    pub fn observe_consumer(&self, name: &str, stats: Arc<ConsumerStats>) {
        let name = name.to_string();
        self.metrics()
            .add_collector(move |e| consumer_families(e, &name, &stats));
    }

    /// Export an outbox relay's and retention job's counters as `keel_messaging_outbox_*`
    /// (backlog, published, relay failures) and `keel_messaging_pruned_total`.
    pub fn observe_store(&self, name: &str, stats: Arc<StoreStats>) {
        let name = name.to_string();
        self.metrics()
            .add_collector(move |e| store_families(e, &name, &stats));
    }
}

fn consumer_families(e: &mut Exposition, name: &str, s: &ConsumerStats) {
    let counters: [(&str, &str, u64); 8] = [
        (
            "keel_messaging_consumer_applied_total",
            "Deliveries whose handler ran and committed.",
            s.applied.load(Ordering::Relaxed),
        ),
        (
            "keel_messaging_consumer_duplicates_total",
            "Redeliveries acknowledged without running the handler (the inbox had them).",
            s.duplicates.load(Ordering::Relaxed),
        ),
        (
            "keel_messaging_consumer_redelivered_total",
            "Deliveries the broker (or an in-place retry) made more than once.",
            s.redelivered.load(Ordering::Relaxed),
        ),
        (
            "keel_messaging_consumer_retries_total",
            "Handler failures sent back for another attempt.",
            s.retries.load(Ordering::Relaxed),
        ),
        (
            "keel_messaging_consumer_dead_lettered_total",
            "Messages sent to the dead-letter destination after their last attempt.",
            s.dead_lettered.load(Ordering::Relaxed),
        ),
        (
            "keel_messaging_consumer_store_errors_total",
            "Store failures; the delivery went back to the broker without using an attempt.",
            s.store_errors.load(Ordering::Relaxed),
        ),
        (
            "keel_messaging_consumer_returned_total",
            "Fetched deliveries handed back unstarted when the consumer stopped.",
            s.returned.load(Ordering::Relaxed),
        ),
        (
            "keel_messaging_consumer_assignments_total",
            "Partition assignments this consumer received (Kafka rebalances).",
            s.assignments.load(Ordering::Relaxed),
        ),
    ];
    let lag = s.lag.load(Ordering::Relaxed);
    let counters = counters
        .into_iter()
        .map(|(family, help, value)| (family, help, "counter", value as f64));
    // -1: the broker has not said (or never does); an absent series, not a false zero.
    let lag = (lag >= 0).then_some((
        "keel_messaging_consumer_lag",
        "Messages behind the end of the consumed partitions, as the broker reports it.",
        "gauge",
        lag as f64,
    ));
    emit(e, &[("consumer", name)], counters.chain(lag));
}

/// Declare each family and add its one sample with `labels`.
fn emit<'a>(
    e: &mut Exposition,
    labels: &[(&str, &str)],
    rows: impl IntoIterator<Item = (&'a str, &'a str, &'a str, f64)>,
) {
    for (family, help, kind, value) in rows {
        e.family(family, help, kind);
        e.sample(family, labels, value);
    }
}

fn store_families(e: &mut Exposition, name: &str, s: &StoreStats) {
    let labels = [("store", name)];
    let families: [(&str, &str, &str, f64); 4] = [
        (
            "keel_messaging_outbox_backlog",
            "Unsent outbox rows at the relay's last pass (growing: the broker is down or slow).",
            "gauge",
            s.backlog.load(Ordering::Relaxed) as f64,
        ),
        (
            "keel_messaging_outbox_published_total",
            "Outbox rows the broker confirmed.",
            "counter",
            s.published.load(Ordering::Relaxed) as f64,
        ),
        (
            "keel_messaging_outbox_relay_failures_total",
            "Relay passes that failed or stopped short on a store or broker error.",
            "counter",
            s.relay_failures.load(Ordering::Relaxed) as f64,
        ),
        (
            "keel_messaging_pruned_total",
            "Inbox claims and sent outbox rows deleted by the retention job.",
            "counter",
            s.pruned.load(Ordering::Relaxed) as f64,
        ),
    ];
    emit(e, &labels, families);
}
