//! Spawning through the registry: a request's [`TaskScope`] for the tasks it spawns, and
//! [`spawn_background`] for tasks no request owns.
//!
//! Each spawn registers first and moves the guard into the spawned future, so the listing ends
//! exactly when the task does — finished, dropped by cancellation, or dropped with its runtime.

use std::borrow::Cow;
use std::future::Future;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::{Owner, Registry, TaskKind};

/// A request's scope for the tasks it spawns. Clones share one cancellation.
///
/// Dropping a scope cancels nothing: the server calls [`TaskScope::cancel`] when the request
/// ends or its deadline passes, because a scope is cloned into handlers and the last clone can
/// outlive the response.
///
/// The cancellation token is created on first need: most requests spawn nothing, and a token
/// costs an allocation and a tree node on every request that would never use it. Until then a
/// flag records a cancel; whoever creates the token re-checks the flag (both sides use SeqCst,
/// so a `cancel` racing the creation is seen by one of them).
#[derive(Debug)]
pub struct TaskScope {
    token: OnceLock<CancellationToken>,
    cancelled: AtomicBool,
    owner: Owner,
    registry: &'static Registry,
}

impl Clone for TaskScope {
    fn clone(&self) -> Self {
        // Clones must share cancellation, so the token has to exist from here on.
        let token = OnceLock::new();
        let _ = token.set(self.token().clone());
        TaskScope {
            token,
            cancelled: AtomicBool::new(self.cancelled.load(Ordering::SeqCst)),
            owner: self.owner.clone(),
            registry: self.registry,
        }
    }
}

impl TaskScope {
    /// A fresh, uncancelled scope for tasks owned by `owner`.
    pub fn new(registry: &'static Registry, owner: Owner) -> TaskScope {
        TaskScope {
            token: OnceLock::new(),
            cancelled: AtomicBool::new(false),
            owner,
            registry,
        }
    }

    fn token(&self) -> &CancellationToken {
        let t = self.token.get_or_init(CancellationToken::new);
        if self.cancelled.load(Ordering::SeqCst) {
            t.cancel();
        }
        t
    }

    /// Who the scope's tasks belong to.
    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    /// Spawn a request-scoped task, registered as [`TaskKind::Scoped`]. It runs until it
    /// finishes (`Some(output)`), or until the scope is cancelled or the owner's deadline
    /// passes (the future is dropped, `None`), whichever comes first.
    ///
    /// The task runs in the caller's tracing span, so its logs carry the request's context.
    /// That is safe here because the task ends no later than the scope; a detached task does
    /// not inherit the span, or it would keep the request's span open past the response.
    pub fn spawn<F>(
        &self,
        name: impl Into<Cow<'static, str>>,
        fut: F,
    ) -> JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.spawn_as(name, &self.owner, fut)
    }

    /// [`TaskScope::spawn`], listed under `owner` (the request's context fills in the route
    /// it matched after the scope was made).
    pub(crate) fn spawn_as<F>(
        &self,
        name: impl Into<Cow<'static, str>>,
        owner: &Owner,
        fut: F,
    ) -> JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let guard = self.registry.register(name, TaskKind::Scoped, owner);
        let token = self.token().clone();
        let deadline = owner.deadline;
        let task = async move {
            let _guard = guard;
            tokio::select! {
                // Cancellation first: a task spawned into an already cancelled scope must not
                // get even one poll of work done.
                biased;
                () = token.cancelled() => None,
                // The owner's deadline ends its tasks even while the owner itself is still
                // streaming a response: nobody is waiting for their result any more.
                () = until(deadline) => None,
                out = fut => Some(out),
            }
        };
        tokio::spawn(task.in_current_span())
    }

    /// Spawn a task that outlives the scope, registered as [`TaskKind::Detached`] with the
    /// scope's owner: it is not cancelled with the scope, and becomes a leak suspect if still
    /// alive past the owner's deadline plus the registry's grace.
    pub fn detach<F>(&self, name: impl Into<Cow<'static, str>>, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.detach_as(name, &self.owner, fut)
    }

    /// [`TaskScope::detach`], listed under `owner`.
    pub(crate) fn detach_as<F>(
        &self,
        name: impl Into<Cow<'static, str>>,
        owner: &Owner,
        fut: F,
    ) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        spawn_registered(self.registry, name.into(), TaskKind::Detached, owner, fut)
    }

    /// The registry this scope's tasks are listed in.
    pub fn registry(&self) -> &'static Registry {
        self.registry
    }

    /// Cancel every scoped task (idempotent).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        if let Some(t) = self.token.get() {
            t.cancel();
        }
    }

    /// Whether [`TaskScope::cancel`] has been called (on this scope or a clone).
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst) || self.token.get().is_some_and(|t| t.is_cancelled())
    }

    /// Resolves when the scope is cancelled.
    pub async fn cancelled(&self) {
        self.token().cancelled().await;
    }
}

/// Spawn a task owned by no request (a readiness loop, a refresher), registered in
/// [`Registry::global`] as [`TaskKind::Background`]. With no deadline it is never a leak
/// suspect; it is listed so the dump shows everything Keel runs.
pub fn spawn_background<F>(name: impl Into<Cow<'static, str>>, fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    spawn_registered(
        Registry::global(),
        name.into(),
        TaskKind::Background,
        &Owner::default(),
        fut,
    )
}

/// [`spawn_background`] listed in `registry` (a service's own, rather than the one for work
/// no service owns).
pub fn spawn_background_in<F>(
    registry: &'static Registry,
    name: impl Into<Cow<'static, str>>,
    fut: F,
) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    spawn_registered(
        registry,
        name.into(),
        TaskKind::Background,
        &Owner::default(),
        fut,
    )
}

fn spawn_registered<F>(
    registry: &'static Registry,
    name: Cow<'static, str>,
    kind: TaskKind,
    owner: &Owner,
    fut: F,
) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let guard = registry.register(name, kind, owner);
    tokio::spawn(async move {
        let _guard = guard;
        fut.await
    })
}

/// Sleep until `deadline`, or forever without one.
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
