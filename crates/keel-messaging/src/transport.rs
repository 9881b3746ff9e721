//! What every broker transport shares: consumer counters and the crash-test failpoint.

use std::sync::atomic::AtomicU64;

/// Counters of a running consumer.
#[derive(Debug, Default)]
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
