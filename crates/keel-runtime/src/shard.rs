//! Thread-per-shard execution: one OS thread and one runtime per [`ShardPlan`], pinned to the
//! shard's CPUs.
//!
//! The shard's future is created and driven on the shard thread itself, so it need not be
//! `Send` (thread-per-core code can hold `Rc`s across awaits). Runtimes are built before any
//! thread starts and threads wait at a start gate, so `run_sharded` either starts every shard or
//! none: a caller never has to reason about half a fleet running.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::runtime::{Builder, Runtime};

use crate::{RuntimeConfig, ShardPlan, Sizing, pin_current_thread};

/// Runs `f(shard)` to completion on its own pinned runtime for every shard in `sizing.shards`,
/// returning one join handle per shard (in shard order).
///
/// Single-worker shards get a current-thread runtime; larger shards a multi-thread runtime
/// whose workers (and blocking threads) pin themselves on start. A pin failure is logged once
/// and ignored, because containers may forbid `sched_setaffinity` and an unpinned shard is
/// still a working shard.
///
/// Call it from plain (non-async) code such as `main`: on a spawn error the already-built
/// runtimes are dropped on the calling thread, which tokio forbids inside a runtime.
pub fn run_sharded<F, Fut>(
    sizing: &Sizing,
    cfg: &RuntimeConfig,
    f: F,
) -> std::io::Result<Vec<JoinHandle<Fut::Output>>>
where
    F: Fn(ShardPlan) -> Fut + Send + Sync + 'static,
    Fut: Future + 'static,
    Fut::Output: Send + 'static,
{
    let f = Arc::new(f);
    let warned = Arc::new(AtomicBool::new(false));
    // Each shard gets a share of the blocking pool so the process-wide ceiling stays what the
    // config says, whatever the shard count.
    let blocking = cfg
        .max_blocking_threads
        .div_ceil(sizing.shards.len().max(1))
        .max(1);

    let runtimes = sizing
        .shards
        .iter()
        .map(|plan| shard_runtime(plan, blocking, &warned))
        .collect::<std::io::Result<Vec<_>>>()?;

    let mut gates = Vec::with_capacity(runtimes.len());
    let mut handles = Vec::with_capacity(runtimes.len());
    for (plan, rt) in sizing.shards.iter().cloned().zip(runtimes) {
        let (go, wait) = mpsc::channel::<()>();
        let f = Arc::clone(&f);
        let warned = Arc::clone(&warned);
        let handle = std::thread::Builder::new()
            .name(format!("keel-shard-{}", plan.index))
            .spawn(move || {
                if wait.recv().is_err() {
                    // A later shard failed to spawn. Nobody joins this handle; unwinding
                    // without the panic hook ends the thread silently.
                    std::panic::resume_unwind(Box::new("keel shard start aborted"));
                }
                pin(&plan.cpus, &warned);
                rt.block_on(f(plan))
            })?;
        gates.push(go);
        handles.push(handle);
    }
    for go in gates {
        // The receiver lives until the thread has passed the gate, so this cannot fail.
        let _ = go.send(());
    }
    Ok(handles)
}

fn shard_runtime(
    plan: &ShardPlan,
    blocking: usize,
    warned: &Arc<AtomicBool>,
) -> std::io::Result<Runtime> {
    let mut builder = if plan.workers <= 1 {
        Builder::new_current_thread()
    } else {
        let mut b = Builder::new_multi_thread();
        b.worker_threads(plan.workers);
        b
    };
    let cpus = plan.cpus.clone();
    let warned = Arc::clone(warned);
    builder
        .thread_name(format!("keel-shard-{}-worker", plan.index))
        .max_blocking_threads(blocking)
        // Worker threads are spawned here, on the caller's thread, so they do not inherit the
        // shard thread's mask; each pins itself instead.
        .on_thread_start(move || pin(&cpus, &warned))
        .enable_all()
        .build()
}

fn pin(cpus: &[usize], warned: &AtomicBool) {
    if let Err(error) = pin_current_thread(cpus) {
        if !warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(%error, ?cpus, "could not pin shard thread to its CPUs; running unpinned");
        }
    }
}
