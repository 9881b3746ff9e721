//! The task registry: every Keel-managed task — a request being handled, a task spawned for it,
//! a detached task, a background loop — is listed with its name, kind, owner and deadline, so an
//! operator can dump what is alive (`/debug/tasks` serves [`Registry::snapshot`]) and Keel can
//! flag **leak suspects**: tasks still alive after their owner's deadline plus a grace period.
//!
//! Registration sits on the request hot path (at least one per request), so it is built to stay
//! out of the way: ids come from one relaxed atomic, and entries live in 32 cache-line-aligned
//! shards chosen by id, each a mutex over a slab (`Vec<Option<Entry>>` plus a free list). The
//! guard remembers its slot, so deregistration is an index, not a hash lookup. No user code and
//! no `.await` ever runs under a shard lock, and readers (snapshot, sweep, counts) take one shard
//! at a time, so a dump of a busy process delays a registration by at most one shard's scan.
//!
//! [`TaskScope`] ties tasks spawned for a request to that request's cancellation; detaching a
//! task keeps the owner, which is how a forgotten detached task surfaces as a leak suspect.

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::codec::request_id::RequestId;

mod scope;

pub use scope::{TaskScope, spawn_background, spawn_background_in};

/// Number of shards. A power of two so the shard is the id's low bits; 32 comfortably exceeds
/// the worker count of the containers Keel targets, so concurrent registrations rarely meet.
const SHARDS: usize = 32;

/// Grace past the owner's deadline before a task is suspected of leaking. Five seconds covers
/// the cancellation latency of a well-behaved task (it must reach an `.await` to be dropped) and
/// a slow cleanup, while still catching a leak long before it shows up as memory growth.
const DEFAULT_LEAK_GRACE: Duration = Duration::from_secs(5);

/// What role a task plays, which decides how it is expected to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// A request being handled; the server cancels it at the request's deadline.
    Request,
    /// Spawned for a request through [`TaskScope::spawn`]; cancelled with the request.
    Scoped,
    /// Spawned for a request through [`TaskScope::detach`]; outlives it on purpose, but is still
    /// expected to finish soon after the owner's deadline.
    Detached,
    /// Owned by no request (readiness loops, refreshers); lives as long as the process.
    Background,
}

/// Whether a task is still doing its work or has been asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskState {
    /// Doing its work.
    Running,
    /// Asked to stop and not gone yet; a task stuck here is waiting on something that ignores
    /// cancellation.
    Cancelling,
}

/// Who a task belongs to. Cheap to clone (`Arc<str>` inside).
#[derive(Debug, Clone, Default)]
pub struct Owner {
    /// The route template the owning request matched.
    pub route: Option<Arc<str>>,
    /// The owning request's id (`x-request-id`).
    pub request_id: Option<RequestId>,
    /// The owning request's absolute deadline; `None` means the task is never a leak suspect.
    pub deadline: Option<Instant>,
}

/// One live task, as shown by `/debug/tasks`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskInfo {
    /// Registry-wide unique id, never reused within a process.
    pub id: u64,
    /// The name given at spawn time.
    pub name: String,
    /// The task's role.
    pub kind: TaskKind,
    /// The owner's route.
    pub route: Option<String>,
    /// The owner's request id.
    pub request_id: Option<String>,
    /// Time since registration.
    pub age_ms: u64,
    /// Milliseconds until the owner's deadline; negative when past. None = no deadline.
    pub deadline_in_ms: Option<i64>,
    /// Running or cancelling.
    pub state: TaskState,
    /// Alive past the owner's deadline plus the registry's leak grace.
    pub leak_suspect: bool,
}

/// The set of live Keel-managed tasks. See the module docs for the design.
pub struct Registry {
    shards: Box<[Shard; SHARDS]>,
    next_id: AtomicU64,
    /// Stored as nanoseconds so it can change at runtime without a lock.
    leak_grace_nanos: AtomicU64,
    leak_suspects_total: AtomicU64,
}

/// RAII registration. Dropping it removes the entry; `set_state(TaskState::Cancelling)` marks it.
pub struct TaskGuard {
    registry: &'static Registry,
    id: u64,
    slot: usize,
}

/// Padded to a cache line so that two workers locking neighbouring shards do not contend on
/// the same line anyway.
#[repr(align(64))]
#[derive(Default)]
struct Shard(Mutex<Slab>);

#[derive(Default)]
struct Slab {
    slots: Vec<Option<Entry>>,
    free: Vec<usize>,
    /// Live entries per [`TaskKind`], maintained under the lock already held, so counting costs
    /// the hot path nothing extra and readers need not walk the slots.
    by_kind: [usize; 4],
}

struct Entry {
    id: u64,
    name: Cow<'static, str>,
    kind: TaskKind,
    route: Option<Arc<str>>,
    request_id: Option<RequestId>,
    deadline: Option<Instant>,
    started: Instant,
    state: TaskState,
    /// Set the first time the entry is found past its deadline plus grace, so the counter and
    /// the warning fire once per task however often the registry is scanned.
    reported: bool,
}

/// A newly found suspect, copied out so it is logged after the shard lock is released (a
/// tracing subscriber may do I/O).
struct LeakReport {
    id: u64,
    name: String,
    kind: TaskKind,
    route: Option<Arc<str>>,
    request_id: Option<RequestId>,
    past_deadline_ms: u64,
}

impl TaskKind {
    const ALL: [TaskKind; 4] = [
        TaskKind::Request,
        TaskKind::Scoped,
        TaskKind::Detached,
        TaskKind::Background,
    ];

    /// Kebab-case name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Request => "request",
            TaskKind::Scoped => "scoped",
            TaskKind::Detached => "detached",
            TaskKind::Background => "background",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl TaskState {
    /// Kebab-case name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Running => "running",
            TaskState::Cancelling => "cancelling",
        }
    }
}

impl Registry {
    /// An empty registry that suspects tasks alive `leak_grace` past their owner's deadline.
    pub fn new(leak_grace: Duration) -> Registry {
        Registry {
            shards: Box::new(std::array::from_fn(|_| Shard::default())),
            next_id: AtomicU64::new(1),
            leak_grace_nanos: AtomicU64::new(duration_nanos(leak_grace)),
            leak_suspects_total: AtomicU64::new(0),
        }
    }

    /// A registry of one's own for the life of the process: each `keel::App` makes one, so two
    /// services in one process list (and count) only their own tasks. Leaked on purpose:
    /// registration guards travel inside spawned `'static` futures, and a `&'static` costs the
    /// hot path no reference count; an App is made once per service, so the leak is bounded.
    pub fn leaked(leak_grace: Duration) -> &'static Registry {
        Box::leak(Box::new(Registry::new(leak_grace)))
    }

    /// The registry of work no `App` owns: contexts made with [`crate::Context::background`]
    /// and [`spawn_background`] outside any service (leak grace 5 s until
    /// [`Registry::set_leak_grace`] changes it). Services use their App's own registry.
    pub fn global() -> &'static Registry {
        static GLOBAL: OnceLock<Registry> = OnceLock::new();
        GLOBAL.get_or_init(|| Registry::new(DEFAULT_LEAK_GRACE))
    }

    /// Change the leak grace; applies from the next scan, including to tasks already listed.
    pub fn set_leak_grace(&self, grace: Duration) {
        self.leak_grace_nanos
            .store(duration_nanos(grace), Ordering::Relaxed);
    }

    fn leak_grace(&self) -> Duration {
        Duration::from_nanos(self.leak_grace_nanos.load(Ordering::Relaxed))
    }

    /// Register a task; it is listed until the returned guard drops.
    ///
    /// `&'static self` because the guard travels inside spawned `'static` futures; use
    /// [`Registry::global`] (or a leaked registry in tests).
    pub fn register(
        &'static self,
        name: impl Into<Cow<'static, str>>,
        kind: TaskKind,
        owner: &Owner,
    ) -> TaskGuard {
        self.register_since(name, kind, owner, Instant::now())
    }

    /// [`Registry::register`] for a task that began at `started` (a request registered only
    /// once it turned out not to answer at once).
    pub fn register_since(
        &'static self,
        name: impl Into<Cow<'static, str>>,
        kind: TaskKind,
        owner: &Owner,
        started: Instant,
    ) -> TaskGuard {
        // Relaxed: the id only has to be unique, it orders nothing.
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            id,
            name: name.into(),
            kind,
            route: owner.route.clone(),
            request_id: owner.request_id.clone(),
            deadline: owner.deadline,
            started,
            state: TaskState::Running,
            reported: false,
        };
        let mut slab = self.shard(id).lock();
        slab.by_kind[kind.index()] += 1;
        let slot = match slab.free.pop() {
            Some(slot) => {
                slab.slots[slot] = Some(entry);
                slot
            }
            None => {
                slab.slots.push(Some(entry));
                slab.slots.len() - 1
            }
        };
        TaskGuard {
            registry: self,
            id,
            slot,
        }
    }

    /// Live tasks.
    pub fn live(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().by_kind.iter().sum::<usize>())
            .sum()
    }

    /// Live tasks of one kind.
    pub fn live_by_kind(&self, kind: TaskKind) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().by_kind[kind.index()])
            .sum()
    }

    /// Leak suspects found so far (monotonic: a suspect that later finishes still counts).
    pub fn leak_suspects_total(&self) -> u64 {
        self.leak_suspects_total.load(Ordering::Relaxed)
    }

    /// Live tasks, leak suspects first, then oldest first.
    ///
    /// Also runs leak detection: each newly found suspect bumps
    /// [`Registry::leak_suspects_total`] and is logged once at `warn`.
    pub fn snapshot(&self) -> Vec<TaskInfo> {
        let mut out = Vec::new();
        self.scan(|entry, now, leak_suspect| out.push(entry.info(now, leak_suspect)));
        out.sort_by(|a, b| {
            b.leak_suspect
                .cmp(&a.leak_suspect)
                .then(b.age_ms.cmp(&a.age_ms))
                .then(a.id.cmp(&b.id))
        });
        out
    }

    /// The leak detection of [`Registry::snapshot`] without building the list, for a periodic
    /// sweep so suspects are counted even when nobody looks at `/debug/tasks`.
    pub fn sweep(&self) {
        self.scan(|_, _, _| {});
    }

    /// Human-readable dump: a header line with counts, then one line per task, suspects first
    /// and marked `LEAK?`.
    pub fn render_text(&self) -> String {
        use std::fmt::Write as _;

        let tasks = self.snapshot();
        let mut by_kind = [0usize; 4];
        for t in &tasks {
            by_kind[t.kind.index()] += 1;
        }
        let suspects = tasks.iter().filter(|t| t.leak_suspect).count();
        let mut out = format!("tasks: {} live", tasks.len());
        for kind in TaskKind::ALL {
            let _ = write!(out, ", {} {}", by_kind[kind.index()], kind.as_str());
        }
        let _ = writeln!(
            out,
            "; {suspects} leak suspects now, {} found since start",
            self.leak_suspects_total()
        );
        for t in &tasks {
            let mark = if t.leak_suspect { "LEAK? " } else { "" };
            let _ = write!(
                out,
                "{mark}#{} {} {} age={}ms state={}",
                t.id,
                t.kind.as_str(),
                t.name,
                t.age_ms,
                t.state.as_str()
            );
            if let Some(ms) = t.deadline_in_ms {
                let _ = write!(out, " deadline_in={ms}ms");
            }
            if let Some(route) = &t.route {
                let _ = write!(out, " route={route}");
            }
            if let Some(id) = &t.request_id {
                let _ = write!(out, " request_id={id}");
            }
            out.push('\n');
        }
        out
    }

    /// Visit every live entry with the scan time and whether it is a leak suspect, marking and
    /// reporting suspects not seen before.
    fn scan(&self, mut visit: impl FnMut(&Entry, Instant, bool)) {
        let now = Instant::now();
        let grace = self.leak_grace();
        let mut found = Vec::new();
        for shard in self.shards.iter() {
            let mut slab = shard.lock();
            for entry in slab.slots.iter_mut().flatten() {
                let suspect = entry.is_leak_suspect(now, grace);
                if suspect && !entry.reported {
                    entry.reported = true;
                    found.push(entry.report(now));
                }
                visit(entry, now, suspect);
            }
        }
        if found.is_empty() {
            return;
        }
        self.leak_suspects_total
            .fetch_add(found.len() as u64, Ordering::Relaxed);
        for r in found {
            tracing::warn!(
                task.id = r.id,
                task.name = %r.name,
                task.kind = r.kind.as_str(),
                route = r.route.as_deref(),
                request_id = r.request_id.as_deref(),
                past_deadline_ms = r.past_deadline_ms,
                "task alive past its owner's deadline plus grace; possible leak",
            );
        }
    }

    fn shard(&self, id: u64) -> &Shard {
        &self.shards[(id as usize) & (SHARDS - 1)]
    }
}

impl fmt::Debug for Registry {
    // Deliberately lock-free: formatting a registry must not contend with registrations.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("leak_grace", &self.leak_grace())
            .field("leak_suspects_total", &self.leak_suspects_total())
            .finish_non_exhaustive()
    }
}

impl TaskGuard {
    /// The registered task's id, as listed in snapshots.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Record whether the task is running or being cancelled.
    pub fn set_state(&self, state: TaskState) {
        let mut slab = self.registry.shard(self.id).lock();
        if let Some(entry) = slab.slots.get_mut(self.slot).and_then(Option::as_mut) {
            debug_assert_eq!(
                entry.id, self.id,
                "a guard's slot is only reused after it drops"
            );
            entry.state = state;
        }
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        let mut slab = self.registry.shard(self.id).lock();
        if let Some(entry) = slab.slots.get_mut(self.slot).and_then(Option::take) {
            debug_assert_eq!(
                entry.id, self.id,
                "a guard's slot is only reused after it drops"
            );
            slab.by_kind[entry.kind.index()] -= 1;
            slab.free.push(self.slot);
        }
    }
}

impl fmt::Debug for TaskGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskGuard").field("id", &self.id).finish()
    }
}

impl Shard {
    /// A poisoned shard is still consistent: no user code runs under the lock, and every
    /// critical section leaves the slab whole before anything that could panic. Recovering
    /// (rather than panicking) also keeps a guard dropped during unwinding from aborting.
    fn lock(&self) -> MutexGuard<'_, Slab> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Entry {
    fn is_leak_suspect(&self, now: Instant, grace: Duration) -> bool {
        // `checked_add` fails only for an absurd grace, which means "never suspect".
        self.deadline
            .and_then(|d| d.checked_add(grace))
            .is_some_and(|limit| now > limit)
    }

    fn info(&self, now: Instant, leak_suspect: bool) -> TaskInfo {
        TaskInfo {
            id: self.id,
            name: self.name.to_string(),
            kind: self.kind,
            route: self.route.as_deref().map(str::to_owned),
            request_id: self.request_id.as_deref().map(str::to_owned),
            age_ms: millis(now.saturating_duration_since(self.started)),
            deadline_in_ms: self.deadline.map(|d| signed_millis_until(now, d)),
            state: self.state,
            leak_suspect,
        }
    }

    fn report(&self, now: Instant) -> LeakReport {
        LeakReport {
            id: self.id,
            name: self.name.to_string(),
            kind: self.kind,
            route: self.route.clone(),
            request_id: self.request_id.clone(),
            past_deadline_ms: self
                .deadline
                .map_or(0, |d| millis(now.saturating_duration_since(d))),
        }
    }
}

fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn signed_millis_until(now: Instant, deadline: Instant) -> i64 {
    if deadline >= now {
        i64::try_from(millis(deadline - now)).unwrap_or(i64::MAX)
    } else {
        i64::try_from(millis(now - deadline)).map_or(i64::MIN, |ms| -ms)
    }
}

#[cfg(test)]
mod tests;
