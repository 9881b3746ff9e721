//! Building the default (unsharded) multi-thread runtime from a [`Sizing`].

use crate::{RuntimeConfig, Sizing};

/// Builds the default multi-thread runtime: `sizing.workers` workers named `keel-worker`, all
/// drivers enabled, the blocking pool bounded by `cfg.max_blocking_threads`.
pub fn build_runtime(
    cfg: &RuntimeConfig,
    sizing: &Sizing,
) -> std::io::Result<tokio::runtime::Runtime> {
    // tokio panics on zero for both; validation rejects zero, but a hand-built config may not
    // have been validated and a panic at startup is a worse message than a clamp.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(sizing.workers.max(1))
        .max_blocking_threads(cfg.max_blocking_threads.max(1))
        .thread_name("keel-worker")
        .enable_all()
        .build()
}
