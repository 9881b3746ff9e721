use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::*;

/// Each test gets its own registry: the global one is shared by every test in the binary.
fn registry(grace: Duration) -> &'static Registry {
    Box::leak(Box::new(Registry::new(grace)))
}

fn owner(deadline: Option<Instant>) -> Owner {
    Owner {
        route: Some(Arc::from("/orders/{id}")),
        request_id: Some(crate::codec::request_id::RequestId::from_caller_or_new(
            Some(b"req-1"),
        )),
        deadline,
    }
}

/// Let spawned tasks on a current-thread runtime run until they park.
async fn settle() {
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

#[test]
fn registering_and_dropping_changes_the_live_counts() {
    let reg = registry(Duration::from_secs(1));
    let a = reg.register("handler", TaskKind::Request, &Owner::default());
    let b = reg.register(
        String::from("refresh"),
        TaskKind::Background,
        &Owner::default(),
    );
    let c = reg.register("fan-out", TaskKind::Scoped, &Owner::default());
    assert_eq!(reg.live(), 3);
    assert_eq!(reg.live_by_kind(TaskKind::Request), 1);
    assert_eq!(reg.live_by_kind(TaskKind::Scoped), 1);
    assert_eq!(reg.live_by_kind(TaskKind::Detached), 0);
    assert_ne!(a.id(), b.id());

    drop(b);
    assert_eq!(reg.live(), 2);
    assert_eq!(reg.live_by_kind(TaskKind::Background), 0);
    drop(a);
    drop(c);
    assert_eq!(reg.live(), 0);
    assert!(reg.snapshot().is_empty());
}

#[test]
fn freed_slots_are_reused_without_confusing_guards() {
    let reg = registry(Duration::from_secs(1));
    let guards: Vec<_> = (0..100)
        .map(|_| reg.register("t", TaskKind::Scoped, &Owner::default()))
        .collect();
    let kept: Vec<_> = guards.into_iter().step_by(2).collect();
    let again: Vec<_> = (0..50)
        .map(|_| reg.register("u", TaskKind::Detached, &Owner::default()))
        .collect();
    assert_eq!(reg.live(), 100);
    kept[0].set_state(TaskState::Cancelling);
    let snap = reg.snapshot();
    let marked: Vec<_> = snap
        .iter()
        .filter(|t| t.state == TaskState::Cancelling)
        .collect();
    assert_eq!(marked.len(), 1);
    assert_eq!(marked[0].id, kept[0].id());
    drop(kept);
    assert_eq!(reg.live(), 50);
    assert_eq!(reg.live_by_kind(TaskKind::Detached), 50);
    drop(again);
    assert_eq!(reg.live(), 0);
}

#[tokio::test]
async fn cancelling_a_scope_drops_its_tasks_and_their_registrations() {
    let reg = registry(Duration::from_secs(1));
    let _request = reg.register("handler", TaskKind::Request, &Owner::default());
    let before = reg.live();
    let scope = TaskScope::new(reg, owner(None));

    let handles: Vec<_> = (0..1_000)
        .map(|_| scope.spawn("never-done", std::future::pending::<()>()))
        .collect();
    settle().await;
    assert_eq!(reg.live_by_kind(TaskKind::Scoped), 1_000);

    scope.cancel();
    scope.cancel(); // idempotent
    assert!(scope.is_cancelled());
    scope.cancelled().await;
    for h in handles {
        assert_eq!(h.await.expect("task must not panic"), None);
    }
    assert_eq!(reg.live(), before);
}

#[tokio::test]
async fn a_scoped_task_that_finishes_returns_its_output_and_deregisters() {
    let reg = registry(Duration::from_secs(1));
    let scope = TaskScope::new(reg, owner(None));
    let h = scope.spawn("answer", async { 42 });
    assert_eq!(reg.live_by_kind(TaskKind::Scoped), 1);
    assert_eq!(h.await.expect("task must not panic"), Some(42));
    assert_eq!(reg.live(), 0);
}

#[tokio::test]
async fn spawning_into_a_cancelled_scope_does_no_work() {
    let reg = registry(Duration::from_secs(1));
    let scope = TaskScope::new(reg, owner(None));
    scope.cancel();
    let h = scope.spawn("late", async { unreachable!("must not be polled") });
    assert_eq!(h.await.expect("task must not panic"), None::<()>);
    assert_eq!(reg.live(), 0);
}

#[tokio::test]
#[allow(clippy::unwrap_used)]
async fn clones_share_cancellation_whichever_side_cancels_and_whenever_the_token_is_made() {
    let reg = registry(Duration::from_secs(5));
    // Cancelled before any token exists: a clone made afterwards is cancelled too.
    let a = TaskScope::new(reg, owner(None));
    a.cancel();
    let a2 = a.clone();
    assert!(a2.is_cancelled());
    assert_eq!(a2.spawn("late", async { 1 }).await.unwrap(), None);

    // Cancelling a clone stops tasks spawned through the original.
    let b = TaskScope::new(reg, owner(None));
    let stuck = b.spawn("stuck", std::future::pending::<()>());
    let b2 = b.clone();
    assert!(!b.is_cancelled());
    b2.cancel();
    assert_eq!(stuck.await.unwrap(), None);
    assert!(b.is_cancelled());
    b.cancelled().await;
}

#[tokio::test(start_paused = true)]
async fn a_detached_task_outliving_its_owner_becomes_a_leak_suspect_once() {
    let reg = registry(Duration::from_secs(1));
    // Older than the detached task, and without a deadline: sorts after the suspect anyway.
    let _handler = reg.register("handler", TaskKind::Request, &Owner::default());
    tokio::time::advance(Duration::from_millis(10)).await;

    let deadline = Instant::now() + Duration::from_millis(100);
    let scope = TaskScope::new(reg, owner(Some(deadline)));
    let (finish, finished) = oneshot::channel::<()>();
    let detached = scope.detach("send-receipt", async move {
        let _ = finished.await;
        "sent"
    });
    scope.cancel();
    settle().await;

    let snap = reg.snapshot();
    let task = snap
        .iter()
        .find(|t| t.kind == TaskKind::Detached)
        .expect("a detached task survives its scope's cancellation");
    assert_eq!(task.name, "send-receipt");
    assert_eq!(task.route.as_deref(), Some("/orders/{id}"));
    assert_eq!(task.request_id.as_deref(), Some("req-1"));
    assert_eq!(task.deadline_in_ms, Some(100));
    assert!(!task.leak_suspect);

    // Exactly at deadline + grace is still within the grace.
    tokio::time::advance(Duration::from_millis(1_100)).await;
    reg.sweep();
    assert_eq!(reg.leak_suspects_total(), 0);

    tokio::time::advance(Duration::from_millis(1)).await;
    let snap = reg.snapshot();
    assert_eq!(snap.len(), 2);
    assert_eq!(snap[0].name, "send-receipt", "suspects are listed first");
    assert!(snap[0].leak_suspect);
    assert_eq!(snap[0].deadline_in_ms, Some(-1_001));
    assert!(!snap[1].leak_suspect);
    assert!(snap[1].age_ms > snap[0].age_ms);
    assert_eq!(reg.leak_suspects_total(), 1);

    reg.snapshot();
    reg.sweep();
    let text = reg.render_text();
    assert_eq!(reg.leak_suspects_total(), 1, "each suspect is counted once");
    let first_task_line = text.lines().nth(1).expect("a line per task");
    assert!(first_task_line.starts_with("LEAK? "), "{text}");
    assert!(first_task_line.contains("send-receipt"), "{text}");
    assert!(
        text.lines().next().is_some_and(|h| h.contains("2 live")),
        "{text}"
    );

    finish.send(()).expect("the detached task is still waiting");
    assert_eq!(detached.await.expect("task must not panic"), "sent");
    assert!(reg.snapshot().iter().all(|t| t.kind != TaskKind::Detached));
    assert_eq!(reg.leak_suspects_total(), 1, "the counter is monotonic");
}

#[tokio::test(start_paused = true)]
async fn a_request_without_a_deadline_is_never_a_suspect() {
    let reg = registry(Duration::from_millis(1));
    let _handler = reg.register("stream", TaskKind::Request, &owner(None));
    tokio::time::advance(Duration::from_secs(24 * 3600)).await;
    let snap = reg.snapshot();
    assert!(!snap[0].leak_suspect);
    assert_eq!(snap[0].deadline_in_ms, None);
    assert_eq!(reg.leak_suspects_total(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_request_running_past_its_deadline_is_a_suspect() {
    let reg = registry(Duration::from_millis(500));
    let _handler = reg.register(
        "slow-handler",
        TaskKind::Request,
        &owner(Some(Instant::now() + Duration::from_secs(1))),
    );
    tokio::time::advance(Duration::from_millis(1_501)).await;
    reg.sweep();
    assert_eq!(reg.leak_suspects_total(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_leak_grace_can_change_at_runtime() {
    let reg = registry(Duration::from_secs(60));
    let _handler = reg.register("h", TaskKind::Request, &owner(Some(Instant::now())));
    tokio::time::advance(Duration::from_secs(2)).await;
    reg.sweep();
    assert_eq!(reg.leak_suspects_total(), 0);
    reg.set_leak_grace(Duration::from_secs(1));
    reg.sweep();
    assert_eq!(reg.leak_suspects_total(), 1);
}

#[tokio::test]
async fn background_tasks_are_listed_in_the_global_registry() {
    let (stop, stopped) = oneshot::channel::<()>();
    let h = spawn_background("readiness-loop", async move {
        let _ = stopped.await;
    });
    settle().await;
    // Other tests may use the global registry concurrently, so look for this task only.
    let listed = Registry::global()
        .snapshot()
        .into_iter()
        .find(|t| t.name == "readiness-loop")
        .expect("listed while running");
    assert_eq!(listed.kind, TaskKind::Background);
    assert_eq!(listed.deadline_in_ms, None);
    stop.send(()).expect("still running");
    h.await.expect("task must not panic");
    assert!(
        Registry::global()
            .snapshot()
            .iter()
            .all(|t| t.id != listed.id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_register_and_drop_balances_out() {
    let reg = registry(Duration::from_secs(1));
    let workers: Vec<_> = (0..8)
        .map(|w| {
            tokio::spawn(async move {
                let owner = owner(Some(Instant::now() + Duration::from_secs(30)));
                for i in 0..10_000 {
                    let guard = reg.register("smoke", TaskKind::Request, &owner);
                    if (i + w) % 64 == 0 {
                        guard.set_state(TaskState::Cancelling);
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    // Readers race the writers; they must neither deadlock nor see a torn count.
    for _ in 0..20 {
        reg.sweep();
        assert!(reg.snapshot().len() <= 8);
        tokio::task::yield_now().await;
    }
    for w in workers {
        w.await.expect("worker must not panic");
    }
    assert_eq!(reg.live(), 0);
}
