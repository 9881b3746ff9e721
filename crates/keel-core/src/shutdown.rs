//! The process lifecycle as a one-way sequence of phases, shared by everything that must take
//! part in a graceful drain (listeners, connections, readiness, discovery, message consumers).
//!
//! ```text
//! Running ─signal─▶ Draining ─drain delay─▶ Closing ─grace period─▶ Stopped
//!            (not ready; hooks run)   (stop accepting, Connection: close / GOAWAY)   (cancel the rest)
//! ```
//!
//! Phases only move forward (a latch): once readiness has been withdrawn it is never re-offered
//! by a racing task.
//!
//! Work that outlives the request that started it but is still part of serving — a WebSocket
//! tunnel after its `101`, a long stream handed to a task — takes a [`Held`] guard with
//! [`Shutdown::hold`]: the drain waits for it as it waits for in-flight requests (up to the
//! grace period), and the work ends itself at [`Phase::Stopped`]. Observers read the current phase without locking and await changes through
//! a `tokio::sync::watch` channel, which works across runtimes — sharded servers run one runtime
//! per shard and all of them follow the same signal.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Where the process is in its life. Ordered: later phases compare greater.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// Serving normally.
    Running,
    /// A stop was requested: readiness is false and shutdown hooks run, but listeners still
    /// accept, so requests routed before load balancers noticed are still served.
    Draining,
    /// Listeners are closed; open connections finish their in-flight work and close
    /// (HTTP/1 `Connection: close`, HTTP/2 GOAWAY).
    Closing,
    /// The grace period is over: whatever still runs is cancelled.
    Stopped,
}

impl Phase {
    /// Lower-case name, as shown in logs and admin endpoints.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Draining => "draining",
            Phase::Closing => "closing",
            Phase::Stopped => "stopped",
        }
    }
}

/// A future returned by a shutdown hook.
pub type HookFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Work to run when draining starts, before the drain delay elapses — e.g. deregistering
/// from discovery so peers stop picking this instance.
pub struct ShutdownHook {
    name: String,
    run: Box<dyn FnOnce() -> HookFuture + Send>,
}

impl std::fmt::Debug for ShutdownHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownHook")
            .field("name", &self.name)
            .finish()
    }
}

impl ShutdownHook {
    /// The hook's name, used in logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Consume the hook and produce the future that does its work.
    pub fn into_future(self) -> HookFuture {
        (self.run)()
    }
}

/// The shared lifecycle handle. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Shutdown {
    tx: Arc<watch::Sender<Phase>>,
    /// The phase as a plain atomic, for the request path, which reads it on every response:
    /// a load instead of the watch channel's lock.
    now: Arc<std::sync::atomic::AtomicU8>,
    hooks: Arc<Mutex<Vec<ShutdownHook>>>,
    /// Work held open past its request ([`Shutdown::hold`]). Closed from the start, so
    /// `wait` resolves whenever nothing is held.
    held: tokio_util::task::TaskTracker,
}

/// A piece of work the drain waits for; see [`Shutdown::hold`]. Released when dropped.
#[derive(Debug)]
#[must_use = "the work is held only while the guard lives"]
pub struct Held {
    _token: tokio_util::task::task_tracker::TaskTrackerToken,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A new lifecycle in [`Phase::Running`].
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Phase::Running);
        Shutdown {
            tx: Arc::new(tx),
            now: Arc::new(std::sync::atomic::AtomicU8::new(Phase::Running as u8)),
            hooks: Arc::new(Mutex::new(Vec::new())),
            held: {
                let t = tokio_util::task::TaskTracker::new();
                t.close();
                t
            },
        }
    }

    /// Hold the drain open for a piece of work until the guard is dropped: after the
    /// listeners close, the drain waits for held work as for in-flight requests, up to the
    /// grace period. The holder should end its work once [`Phase::Stopped`] is reached
    /// (`reached(Phase::Stopped)`), when the process is about to exit.
    pub fn hold(&self) -> Held {
        Held {
            _token: self.held.token(),
        }
    }

    /// How many [`Held`] guards are alive.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Resolves once no work is held (at once if none is).
    pub async fn released(&self) {
        self.held.wait().await;
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.tx.borrow()
    }

    /// Whether the lifecycle has reached `phase`: one atomic load, for hot paths. Set just
    /// after the phase changes, so a reader racing [`Shutdown::advance`] may see it one
    /// request late — harmless where it is used (whether to advertise a keep-alive).
    #[inline]
    pub fn has_reached(&self, phase: Phase) -> bool {
        self.now.load(std::sync::atomic::Ordering::Relaxed) >= phase as u8
    }

    /// Move to `phase` if it is later than the current one; earlier phases are ignored so the
    /// sequence stays a latch. Returns whether the phase changed.
    pub fn advance(&self, phase: Phase) -> bool {
        let changed = self.tx.send_if_modified(|cur| {
            if phase > *cur {
                *cur = phase;
                true
            } else {
                false
            }
        });
        if changed {
            self.now
                .fetch_max(phase as u8, std::sync::atomic::Ordering::Relaxed);
        }
        changed
    }

    /// Resolves once the phase is `phase` or later.
    pub async fn reached(&self, phase: Phase) {
        let mut rx = self.tx.subscribe();
        // `wait_for` checks the current value first, so a phase reached before the call
        // resolves at once. The sender lives in `self`, so the channel cannot close here.
        let _ = rx.wait_for(|p| *p >= phase).await;
    }

    /// A receiver for callers that want to select on phase changes themselves.
    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.tx.subscribe()
    }

    /// Register work to run when draining starts. Hooks run concurrently; the drain delay
    /// bounds how long they may take.
    pub fn on_drain<F, Fut>(&self, name: impl Into<String>, f: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let hook = ShutdownHook {
            name: name.into(),
            run: Box::new(move || Box::pin(f())),
        };
        // The lock is never held across an await: hooks are moved out before they run.
        if let Ok(mut hooks) = self.hooks.lock() {
            hooks.push(hook);
        }
    }

    /// Take the registered hooks (each runs once).
    pub fn take_hooks(&self) -> Vec<ShutdownHook> {
        match self.hooks.lock() {
            Ok(mut hooks) => std::mem::take(&mut *hooks),
            Err(_) => Vec::new(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn phases_only_move_forward() {
        let s = Shutdown::new();
        assert_eq!(s.phase(), Phase::Running);
        assert!(s.advance(Phase::Closing));
        assert!(!s.advance(Phase::Draining), "going back must be refused");
        assert_eq!(s.phase(), Phase::Closing);
        assert!(!s.advance(Phase::Closing));
        assert!(s.advance(Phase::Stopped));
    }

    #[tokio::test]
    async fn reached_resolves_for_past_and_future_phases() {
        let s = Shutdown::new();
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.reached(Phase::Closing).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        s.advance(Phase::Draining);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "draining is not closing");
        s.advance(Phase::Closing);
        waiter.await.unwrap();
        // Already past: resolves immediately.
        s.reached(Phase::Draining).await;
    }

    #[tokio::test]
    async fn released_waits_for_every_held_guard() {
        let s = Shutdown::new();
        s.released().await; // nothing held: at once
        let a = s.hold();
        let b = s.clone().hold();
        assert_eq!(s.held(), 2);
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.released().await })
        };
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one guard is still held");
        drop(b);
        waiter.await.unwrap();
        assert_eq!(s.held(), 0);
    }

    #[tokio::test]
    async fn hooks_run_once() {
        let s = Shutdown::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        s.on_drain("deregister", move || async move {
            let _ = tx.send(());
        });
        let hooks = s.take_hooks();
        assert_eq!(hooks.len(), 1);
        assert_eq!(hooks[0].name(), "deregister");
        assert!(s.take_hooks().is_empty());
        for h in hooks {
            h.into_future().await;
        }
        rx.await.unwrap();
    }
}
