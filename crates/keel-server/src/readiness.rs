//! Readiness: a latch plus named dependency checks run in the background.
//!
//! Ready means: start-up finished, not draining, and every registered check passing. Checks
//! run on their own interval with a timeout; probes read the cached verdict (one atomic load on
//! the fast path), so a kubelet probing every second never turns into a query per probe
//! against the database.
//!
//! A new check starts out *pending* and counts as failing until its first success: a pod must
//! not receive traffic before it has proven it can reach what it needs.

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Response, StatusCode, Uri, header};
use http_body_util::Full;
use keel_core::{Phase, Shutdown};

use crate::config::ReadinessConfig;

/// A future returned by a check.
pub type CheckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'static>>;

/// A dependency check. Implemented for closures returning a future of `Result<(), E>`.
pub trait Check: Send + Sync + 'static {
    /// Probe the dependency once. The caller applies the timeout.
    fn check(&self) -> CheckFuture;
}

impl<F, Fut, E> Check for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    fn check(&self) -> CheckFuture {
        let fut = self();
        Box::pin(async move { fut.await.map_err(|e| e.to_string()) })
    }
}

#[derive(Debug, Clone, Default)]
struct Outcome {
    /// `None` until the first run finished.
    ok: Option<bool>,
    latency: Duration,
    last_error: Option<String>,
    last_run: Option<Instant>,
    consecutive_failures: u32,
}

struct CheckState {
    name: String,
    check: Box<dyn Check>,
    /// Counted as passing in `Inner::failing`.
    passing: AtomicBool,
    outcome: Mutex<Outcome>,
}

struct Inner {
    cfg: ReadinessConfig,
    shutdown: Shutdown,
    /// Where the check loops are listed (the service's own registry).
    registry: &'static keel_core::tasks::Registry,
    started: AtomicBool,
    /// Checks not currently passing (pending ones included).
    failing: AtomicUsize,
    checks: Mutex<Vec<Arc<CheckState>>>,
    /// Set by `start`: checks registered afterwards begin running at once.
    running: AtomicBool,
}

/// Shared readiness state. Cheap to clone.
#[derive(Clone)]
pub struct Readiness {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl Readiness {
    /// New readiness, not started; its check loops are listed in
    /// [`Registry::global`](keel_core::tasks::Registry::global).
    pub fn new(cfg: ReadinessConfig, shutdown: Shutdown) -> Self {
        Readiness::with_registry(cfg, shutdown, keel_core::tasks::Registry::global())
    }

    /// [`Readiness::new`] whose check loops are listed in `registry` (a service's own).
    pub fn with_registry(
        cfg: ReadinessConfig,
        shutdown: Shutdown,
        registry: &'static keel_core::tasks::Registry,
    ) -> Self {
        Readiness {
            inner: Arc::new(Inner {
                cfg,
                shutdown,
                registry,
                started: AtomicBool::new(false),
                failing: AtomicUsize::new(0),
                checks: Mutex::new(Vec::new()),
                running: AtomicBool::new(false),
            }),
        }
    }

    /// Register a named dependency check, e.g. `readiness.check("postgres", move || ping(pool.clone()))`.
    /// Registering the same name twice replaces nothing: both run, so pick unique names.
    pub fn check(&self, name: impl Into<String>, check: impl Check) -> &Self {
        let state = Arc::new(CheckState {
            name: name.into(),
            check: Box::new(check),
            passing: AtomicBool::new(false),
            outcome: Mutex::new(Outcome::default()),
        });
        self.inner.failing.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut checks) = self.inner.checks.lock() {
            checks.push(state.clone());
        }
        if self.inner.running.load(Ordering::SeqCst) {
            self.spawn_loop(state);
        }
        self
    }

    /// Start the background check loops on the current runtime.
    pub fn start(&self) {
        if self.inner.running.swap(true, Ordering::SeqCst) {
            return;
        }
        let checks = match self.inner.checks.lock() {
            Ok(c) => c.clone(),
            Err(_) => return,
        };
        for c in checks {
            self.spawn_loop(c);
        }
    }

    /// Start-up finished: the latch that lets readiness turn true.
    pub fn mark_started(&self) {
        self.inner.started.store(true, Ordering::SeqCst);
    }

    /// The verdict probes serve.
    pub fn is_ready(&self) -> bool {
        self.inner.started.load(Ordering::Relaxed)
            && self.inner.failing.load(Ordering::Relaxed) == 0
            && self.inner.shutdown.phase() == Phase::Running
    }

    fn spawn_loop(&self, state: Arc<CheckState>) {
        let inner = self.inner.clone();
        let name = format!("readiness check {}", state.name);
        // Registered so `/debug/tasks` shows every loop Keel runs, not only request work.
        keel_core::tasks::spawn_background_in(self.inner.registry, name, async move {
            let mut tick = tokio::time::interval(inner.cfg.interval.get());
            // After a slow check, wait a full interval rather than firing a burst.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let stopped = inner.shutdown.reached(Phase::Stopped);
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tick.tick() => {}
                }
                run_once(&inner, &state).await;
            }
        });
    }

    /// A point-in-time report of every check, for `?verbose` and `/debug` pages.
    pub fn report(&self) -> Report {
        let checks = match self.inner.checks.lock() {
            Ok(c) => c.clone(),
            Err(_) => Vec::new(),
        };
        let now = Instant::now();
        Report {
            ready: self.is_ready(),
            started: self.inner.started.load(Ordering::Relaxed),
            phase: self.inner.shutdown.phase(),
            checks: checks
                .iter()
                .map(|c| {
                    let o = c.outcome.lock().map(|o| o.clone()).unwrap_or_default();
                    CheckReport {
                        name: c.name.clone(),
                        status: match (c.passing.load(Ordering::Relaxed), o.ok) {
                            (true, _) => "ok",
                            (false, None) => "pending",
                            (false, Some(_)) => "failing",
                        },
                        latency: o.latency,
                        last_error: o.last_error,
                        since_last_run: o.last_run.map(|t| now.saturating_duration_since(t)),
                        consecutive_failures: o.consecutive_failures,
                    }
                })
                .collect(),
        }
    }
}

async fn run_once(inner: &Inner, state: &CheckState) {
    let started = Instant::now();
    let timeout = inner.cfg.timeout.get();
    let result = match tokio::time::timeout(timeout, state.check.check()).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {}", inner.cfg.timeout)),
    };
    let latency = started.elapsed();
    let ok_now = result.is_ok();
    let passing = {
        let Ok(mut o) = state.outcome.lock() else {
            return;
        };
        o.ok = Some(ok_now);
        o.latency = latency;
        o.last_run = Some(Instant::now());
        match result {
            Ok(()) => o.consecutive_failures = 0,
            Err(e) => {
                o.consecutive_failures = o.consecutive_failures.saturating_add(1);
                o.last_error = Some(e);
            }
        }
        // Failing only after `failure_threshold` failures in a row; a pending check that has
        // never passed stays not-passing either way.
        ok_now
            || (state.passing.load(Ordering::SeqCst)
                && o.consecutive_failures < inner.cfg.failure_threshold)
    };
    let was = state.passing.swap(passing, Ordering::SeqCst);
    match (was, passing) {
        (false, true) => {
            inner.failing.fetch_sub(1, Ordering::SeqCst);
            tracing::info!(check = %state.name, latency_ms = latency.as_secs_f64() * 1e3, "readiness check passing");
        }
        (true, false) => {
            inner.failing.fetch_add(1, Ordering::SeqCst);
            let err = state
                .outcome
                .lock()
                .ok()
                .and_then(|o| o.last_error.clone())
                .unwrap_or_default();
            tracing::warn!(check = %state.name, error = %err, "readiness check failing");
        }
        _ => {}
    }
}

/// Snapshot of readiness.
#[derive(Debug, Clone)]
pub struct Report {
    /// The verdict.
    pub ready: bool,
    /// Start-up finished.
    pub started: bool,
    /// Lifecycle phase.
    pub phase: Phase,
    /// Each check.
    pub checks: Vec<CheckReport>,
}

/// One check in a [`Report`].
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// Registered name.
    pub name: String,
    /// "ok", "failing" or "pending".
    pub status: &'static str,
    /// Duration of the last run.
    pub latency: Duration,
    /// Last error seen (kept after recovery, for the post-mortem).
    pub last_error: Option<String>,
    /// Time since the last run finished.
    pub since_last_run: Option<Duration>,
    /// Failures in a row.
    pub consecutive_failures: u32,
}

impl Report {
    /// Why not ready, in a few words (empty when ready).
    pub fn reason(&self) -> String {
        if !self.started {
            return "starting".into();
        }
        if self.phase != Phase::Running {
            return self.phase.as_str().into();
        }
        let bad: Vec<&str> = self
            .checks
            .iter()
            .filter(|c| c.status != "ok")
            .map(|c| c.name.as_str())
            .collect();
        if bad.is_empty() {
            String::new()
        } else {
            format!("checks not passing: {}", bad.join(", "))
        }
    }

    /// The `?verbose` text, in the `[+]name ok` style Kubernetes' own components use.
    pub fn verbose(&self) -> String {
        let mut s = String::new();
        let mark = |ok: bool| if ok { "[+]" } else { "[-]" };
        let _ = writeln!(
            s,
            "{}started {}",
            mark(self.started),
            if self.started { "ok" } else { "no" }
        );
        let running = self.phase == Phase::Running;
        let _ = writeln!(s, "{}lifecycle {}", mark(running), self.phase.as_str());
        for c in &self.checks {
            let _ = write!(
                s,
                "{}{} {} latency={:.1}ms",
                mark(c.status == "ok"),
                c.name,
                c.status,
                c.latency.as_secs_f64() * 1e3
            );
            if let Some(t) = c.since_last_run {
                let _ = write!(s, " checked={:.1}s_ago", t.as_secs_f64());
            }
            if c.consecutive_failures > 0 {
                let _ = write!(s, " consecutive_failures={}", c.consecutive_failures);
            }
            if let Some(e) = &c.last_error {
                let _ = write!(s, " last_error={e:?}");
            }
            s.push('\n');
        }
        let _ = writeln!(
            s,
            "readyz check {}",
            if self.ready { "passed" } else { "failed" }
        );
        s
    }
}

/// Answer a probe path, or `None` if `uri` is not one. Shared by the main and admin ports.
pub(crate) fn probe_response(
    uri: &Uri,
    livez: &str,
    readyz: &str,
    healthz: &str,
    readiness: &Readiness,
) -> Option<Response<Full<Bytes>>> {
    let path = uri.path();
    if path == livez || path == healthz {
        // Answering at all proves the process and its event loop are alive.
        return Some(text(StatusCode::OK, "ok\n".into()));
    }
    if path != readyz {
        return None;
    }
    let verbose = uri.query().is_some_and(|q| {
        q.split('&')
            .any(|kv| kv == "verbose" || kv.starts_with("verbose="))
    });
    let ready = readiness.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = if verbose {
        readiness.report().verbose()
    } else if ready {
        "ok\n".into()
    } else {
        format!("not ready: {}\n", readiness.report().reason())
    };
    Some(text(status, body))
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // Probe answers are live state; a cache in between would lie.
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn cfg() -> ReadinessConfig {
        ReadinessConfig {
            interval: keel_config::Duration::from_millis(100),
            timeout: keel_config::Duration::from_millis(50),
            failure_threshold: 1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn latch_checks_and_draining_all_gate_readiness() {
        let shutdown = Shutdown::new();
        let r = Readiness::new(cfg(), shutdown.clone());
        let healthy = Arc::new(AtomicBool::new(true));
        let h = healthy.clone();
        r.check("db", move || {
            let ok = h.load(Ordering::SeqCst);
            async move {
                if ok {
                    Ok(())
                } else {
                    Err("connection refused")
                }
            }
        });
        assert!(!r.is_ready(), "not started");
        r.start();
        r.mark_started();
        assert!(!r.is_ready(), "check pending until its first run");
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(r.is_ready());

        healthy.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(110)).await;
        assert!(!r.is_ready());
        let rep = r.report();
        assert_eq!(rep.checks[0].status, "failing");
        assert!(rep.verbose().contains("[-]db failing"), "{}", rep.verbose());
        assert!(rep.verbose().contains("connection refused"));

        healthy.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(110)).await;
        assert!(r.is_ready());

        shutdown.advance(Phase::Draining);
        assert!(!r.is_ready(), "draining withdraws readiness");
        assert_eq!(r.report().reason(), "draining");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_check_times_out_and_fails() {
        let r = Readiness::new(cfg(), Shutdown::new());
        r.check("stuck", || async {
            std::future::pending::<()>().await;
            Ok::<(), String>(())
        });
        r.start();
        r.mark_started();
        tokio::time::sleep(Duration::from_millis(60)).await;
        let rep = r.report();
        assert_eq!(rep.checks[0].status, "failing");
        assert!(
            rep.checks[0]
                .last_error
                .as_deref()
                .unwrap()
                .contains("timed out")
        );
        assert!(!r.is_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn failure_threshold_tolerates_a_blip() {
        let mut c = cfg();
        c.failure_threshold = 2;
        let r = Readiness::new(c, Shutdown::new());
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        // Fails on the second run only.
        r.check("flaky", move || {
            let i = n2.fetch_add(1, Ordering::SeqCst);
            async move { if i == 1 { Err("blip") } else { Ok(()) } }
        });
        r.start();
        r.mark_started();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(r.is_ready());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(n.load(Ordering::SeqCst), 2);
        assert!(
            r.is_ready(),
            "one failure below the threshold keeps it ready"
        );
    }
}
