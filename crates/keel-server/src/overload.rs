//! Overload protection: an adaptive concurrency limit in front of the user's handlers, a short
//! bounded LIFO queue, deadline-aware admission, and an optional CPU guard. Probes and the
//! admin port never pass through it.
//!
//! **The limit** follows Gradient2 (Netflix concurrency-limits): after every answered request,
//!
//! ```text
//! gradient  = clamp(tolerance × baseline / recent, 0.5, 1.0)
//! new_limit = limit × gradient + queue_allowance          (queue_allowance = √limit)
//! limit     = (1 − smoothing) × limit + smoothing × new_limit,  clamped to [min, max]
//! ```
//!
//! `recent` is a short average of service times (about ten answers), `baseline` the service
//! time when not overloaded. While latency stays within `tolerance` × baseline the gradient is
//! 1 and the limit creeps up by √limit, probing for capacity; when latency rises (requests
//! queue inside the service, a dependency slows) the gradient falls towards 0.5 and the limit
//! shrinks, so fewer requests are admitted and those stay fast.
//!
//! One change from Gradient2, learned from this crate's overload test: Gradient2's long-run
//! RTT is an average over ~600 answers, so under *sustained* overload it drifts up to the
//! overloaded latency within a second or two, the gradient returns to 1 and the limit grows
//! back — shedding stops while the overload goes on. Keel's baseline drops at once to any
//! faster answer and rises only slowly with time (`baseline_window`, 60 s to follow the
//! slower answers fully), so a higher latency becomes "normal" only if it persists. And, as in
//! Gradient2, the limit is not moved while less than half of it is in use: light load says
//! nothing about capacity.
//!
//! **Over the limit**, a request waits in a LIFO queue for at most `queue_timeout`, twice the
//! recent service time (but at least 5 ms, a few scheduler slices), and a quarter of its
//! remaining deadline, whichever is least: LIFO serves the freshest requests, whose
//! callers are still waiting, while the oldest ones time out — under sustained overload FIFO
//! would serve only requests whose callers have given up. A full queue, or a wait that times
//! out, is answered at once with 503 + `Retry-After` (gRPC `RESOURCE_EXHAUSTED`), never a slow
//! timeout.
//!
//! **Deadline-aware admission:** a request whose remaining deadline is shorter than the
//! current expected service time (the long RTT) is refused at once with 504 /
//! `DEADLINE_EXCEEDED`: starting it would only burn capacity on an answer nobody will read.
//!
//! **Critical routes** (path prefixes) are shed last: they may use `critical_headroom` above
//! the limit, and a freed slot goes to a waiting critical request before any other.
//!
//! **CPU guard** (off by default): when the process's CPU usage over the last sampling period
//! is above `cpu_threshold`, non-critical requests beyond `min_limit` in flight are shed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use keel_config::{Validate, Validator};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// The least a request waits for a slot before it is shed (unless `queue_timeout` or its
/// deadline is shorter): see `admit`.
const MIN_QUEUE_WAIT: Duration = Duration::from_millis(5);

/// `[overload]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OverloadConfig {
    /// Shed under overload. On by default: the floor (`min_limit`) keeps a healthy service
    /// from ever being throttled below ordinary concurrency.
    pub enabled: bool,
    /// The limit at start. 100: no throttling until latency says so.
    pub initial_limit: u32,
    /// The limit never falls below this. 20: a slow dependency must not throttle a service
    /// to a handful of requests; Netflix's default.
    pub min_limit: u32,
    /// The limit never rises above this. 2000: far above what one instance should hold in
    /// flight; a bound on memory, not a tuning knob.
    pub max_limit: u32,
    /// Latency may grow to this multiple of its long-run level before the limit shrinks.
    /// 1.5 (Netflix's default): ordinary jitter does not throttle.
    pub tolerance: f64,
    /// How fast the limit follows its target: 0.2 moves a fifth of the way per answer.
    pub smoothing: f64,
    /// How long a higher latency must persist to become the new baseline (the baseline moves
    /// towards slower answers by `elapsed / baseline_window`; faster answers lower it at
    /// once). 60 s: an overload is shed for its whole length, while a deploy that really made
    /// the service slower is accepted within a minute or two.
    pub baseline_window: keel_config::Duration,
    /// Requests waiting for a slot before new ones are shed at once. 64 bounds memory and
    /// the wait of the last one.
    pub max_queue: usize,
    /// Longest wait for a slot. The wait is also capped at twice the recent service time, or
    /// 5 ms if that is more (a longer wait means the queue is not draining), and a quarter of
    /// the request's remaining time. 50 ms: bursts of slow requests are smoothed, sustained overload answers fast.
    pub queue_timeout: keel_config::Duration,
    /// `Retry-After` on shed responses, in seconds. 1: callers back off briefly; the client's
    /// balancer penalises this endpoint for that long.
    pub retry_after_secs: u32,
    /// Path prefixes shed last (health-critical or paid traffic).
    pub critical_routes: Vec<String>,
    /// Extra share of the limit critical requests may use (0.25 = 25 % above the limit).
    pub critical_headroom: f64,
    /// Shed on process CPU usage too.
    pub cpu_guard: bool,
    /// CPU usage (0–1 of the cores the process may use) above which the guard sheds. 0.9.
    pub cpu_threshold: f64,
}

impl Default for OverloadConfig {
    fn default() -> Self {
        OverloadConfig {
            enabled: true,
            initial_limit: 100,
            min_limit: 20,
            max_limit: 2000,
            tolerance: 1.5,
            smoothing: 0.2,
            baseline_window: keel_config::Duration::from_secs(60),
            max_queue: 64,
            queue_timeout: keel_config::Duration::from_millis(50),
            retry_after_secs: 1,
            critical_routes: Vec::new(),
            critical_headroom: 0.25,
            cpu_guard: false,
            cpu_threshold: 0.9,
        }
    }
}

impl Validate for OverloadConfig {
    fn validate(&self, v: &mut Validator) {
        v.check(
            self.min_limit >= 1,
            "min_limit",
            self.min_limit,
            "must be at least 1",
        );
        v.check(
            self.max_limit >= self.min_limit,
            "max_limit",
            self.max_limit,
            "must be at least min_limit",
        );
        v.check(
            (self.min_limit..=self.max_limit).contains(&self.initial_limit),
            "initial_limit",
            self.initial_limit,
            "must be between min_limit and max_limit",
        );
        v.check(
            self.tolerance >= 1.0,
            "tolerance",
            self.tolerance,
            "must be at least 1.0",
        );
        v.check(
            self.smoothing > 0.0 && self.smoothing <= 1.0,
            "smoothing",
            self.smoothing,
            "must be in (0, 1]",
        );
        v.check(
            !self.baseline_window.get().is_zero(),
            "baseline_window",
            self.baseline_window,
            "must be greater than 0",
        );
        v.check(
            (0.0..=1.0).contains(&self.cpu_threshold),
            "cpu_threshold",
            self.cpu_threshold,
            "must be between 0 and 1",
        );
        v.check(
            self.critical_headroom >= 0.0,
            "critical_headroom",
            self.critical_headroom,
            "must not be negative",
        );
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// Over the limit with the queue full.
    QueueFull,
    /// Waited `queue_timeout` (or its share of the deadline) without a slot.
    QueueTimeout,
    /// Less time left than the expected service time.
    Deadline,
    /// The CPU guard.
    Cpu,
}

impl Shed {
    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Shed::QueueFull => "queue_full",
            Shed::QueueTimeout => "queue_timeout",
            Shed::Deadline => "deadline",
            Shed::Cpu => "cpu",
        }
    }
}

/// What [`Limiter::admit`] decided.
pub enum Admission {
    /// Admitted: run the handler.
    Now(Permit),
    /// Over the limit: wait for a slot (bounded), then run or be shed.
    Wait(std::pin::Pin<Box<dyn std::future::Future<Output = Result<Permit, Shed>> + Send>>),
    /// Refused now.
    Shed(Shed),
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Admission::Now(_) => f.write_str("Now"),
            Admission::Wait(_) => f.write_str("Wait"),
            Admission::Shed(s) => write!(f, "Shed({s:?})"),
        }
    }
}

/// Counters and the current state, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OverloadStats {
    /// The current limit.
    pub limit: f64,
    /// Requests admitted and not yet finished.
    pub in_flight: usize,
    /// Requests waiting for a slot.
    pub queued: usize,
    /// Expected service time now (a short average): admission refuses less time than this.
    pub expected: Duration,
    /// Service time when not overloaded.
    pub baseline: Duration,
    /// Shed since start, by reason: queue full, queue timeout, deadline, CPU.
    pub shed: [u64; 4],
    /// Admitted since start.
    pub admitted: u64,
    /// Longest time any request waited in the queue.
    pub max_queue_wait: Duration,
    /// Times in-flight exceeded the limit in force when a request was admitted (must stay 0).
    pub over_limit: u64,
    /// CPU usage last sampled (0 when the guard is off).
    pub cpu: f64,
}

/// The limit, as pure arithmetic over answers and times (unit-tested on its own).
#[derive(Debug, Clone)]
pub struct Gradient2 {
    limit: f64,
    /// Seconds; the no-overload service time.
    baseline: Option<f64>,
    baseline_at: Option<Instant>,
    /// Seconds; a short average of recent service times.
    recent: Option<f64>,
    cfg: OverloadConfig,
}

impl Gradient2 {
    /// At `cfg.initial_limit`.
    pub fn new(cfg: &OverloadConfig) -> Gradient2 {
        Gradient2 {
            limit: f64::from(cfg.initial_limit),
            baseline: None,
            baseline_at: None,
            recent: None,
            cfg: cfg.clone(),
        }
    }

    /// The current limit.
    pub fn limit(&self) -> f64 {
        self.limit
    }

    /// The expected service time now (the recent average), once one answer has been seen.
    pub fn expected(&self) -> Option<Duration> {
        self.recent.map(Duration::from_secs_f64)
    }

    /// The no-overload service time.
    pub fn baseline(&self) -> Option<Duration> {
        self.baseline.map(Duration::from_secs_f64)
    }

    /// Fold in one answered request's service time, seen at `now` with `in_flight` requests
    /// holding slots.
    pub fn update(&mut self, rtt: Duration, now: Instant, in_flight: usize) {
        let sample = rtt.as_secs_f64().max(1e-6);
        let recent = self.recent.map_or(sample, |r| r + (sample - r) * 0.1);
        self.recent = Some(recent);
        let baseline = match (self.baseline, self.baseline_at) {
            (Some(b), Some(at)) if sample >= b => {
                let dt = now.saturating_duration_since(at).as_secs_f64();
                let w = (dt / self.cfg.baseline_window.get().as_secs_f64().max(1e-3)).min(1.0);
                b + (sample - b) * w
            }
            _ => sample,
        };
        self.baseline = Some(baseline);
        self.baseline_at = Some(now);
        if (in_flight as f64) < self.limit / 2.0 {
            return;
        }
        let gradient = (self.cfg.tolerance * baseline / recent).clamp(0.5, 1.0);
        let target = self.limit * gradient + self.limit.sqrt();
        let next = (1.0 - self.cfg.smoothing) * self.limit + self.cfg.smoothing * target;
        self.limit = next.clamp(f64::from(self.cfg.min_limit), f64::from(self.cfg.max_limit));
    }
}

struct Waiter {
    critical: bool,
    tx: oneshot::Sender<()>,
}

struct State {
    algo: Gradient2,
    in_flight: usize,
    /// Back = newest (LIFO).
    queue: VecDeque<Waiter>,
}

/// The server's limiter. Cheap to clone.
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: OverloadConfig,
    state: Mutex<State>,
    shed: [AtomicU64; 4],
    admitted: AtomicU64,
    over_limit: AtomicU64,
    max_wait_us: AtomicU64,
    /// CPU usage × 10⁴, written by the guard's sampler.
    cpu: AtomicU64,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// A slot: while it lives the request counts as in flight. Report the service time with
/// [`Permit::answered`]; dropping frees the slot (to the newest waiter, if any).
#[must_use = "dropping the permit frees the slot at once"]
pub struct Permit {
    limiter: Limiter,
    started: Instant,
    done: bool,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit").finish_non_exhaustive()
    }
}

impl Permit {
    /// The handler answered: its service time (admission to response head) updates the limit.
    pub fn answered(&mut self) {
        if !self.done {
            self.done = true;
            let now = Instant::now();
            let rtt = now.saturating_duration_since(self.started);
            let mut st = self.limiter.lock();
            let in_flight = st.in_flight;
            st.algo.update(rtt, now, in_flight);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.release();
    }
}

impl Limiter {
    /// A limiter with `cfg` (its `enabled` flag is the caller's business).
    pub fn new(cfg: &OverloadConfig) -> Limiter {
        Limiter {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    algo: Gradient2::new(cfg),
                    in_flight: 0,
                    queue: VecDeque::new(),
                }),
                cfg: cfg.clone(),
                shed: Default::default(),
                admitted: AtomicU64::new(0),
                over_limit: AtomicU64::new(0),
                max_wait_us: AtomicU64::new(0),
                cpu: AtomicU64::new(0),
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &OverloadConfig {
        &self.inner.cfg
    }

    /// Whether `path` is a critical route.
    pub fn is_critical(&self, path: &str) -> bool {
        self.inner
            .cfg
            .critical_routes
            .iter()
            .any(|p| path.starts_with(p.as_str()))
    }

    /// Admit a request with `remaining` time before its deadline, waiting in the queue if
    /// needed. `Err` is answered at once by the caller.
    pub async fn acquire(&self, remaining: Duration, critical: bool) -> Result<Permit, Shed> {
        match self.admit(remaining, critical) {
            Admission::Now(p) => Ok(p),
            Admission::Shed(why) => Err(why),
            Admission::Wait(w) => w.await,
        }
    }

    /// The synchronous part of [`Limiter::acquire`]: admitted now, shed now, or a wait to
    /// await (the only case that allocates or sleeps).
    pub fn admit(&self, remaining: Duration, critical: bool) -> Admission {
        self.admit_since(remaining, critical, Instant::now())
    }

    /// [`Limiter::admit`] for a request that arrived at `arrived` (the server's admission
    /// layer passes the time its context was made, so no clock is read here): an admitted
    /// request's service time counts from then.
    pub fn admit_since(&self, remaining: Duration, critical: bool, arrived: Instant) -> Admission {
        let rx = {
            let mut st = self.lock();
            if let Some(expected) = st.algo.expected()
                && remaining < expected
            {
                drop(st);
                return Admission::Shed(self.shed(Shed::Deadline));
            }
            let cpu_hot = self.inner.cfg.cpu_guard
                && self.cpu() > self.inner.cfg.cpu_threshold
                && st.in_flight >= self.inner.cfg.min_limit as usize;
            if cpu_hot && !critical {
                drop(st);
                return Admission::Shed(self.shed(Shed::Cpu));
            }
            let cap = self.capacity(&st, critical);
            if st.in_flight < cap {
                st.in_flight += 1;
                let over = st.in_flight > self.capacity(&st, true);
                drop(st);
                return Admission::Now(self.permit(over, arrived));
            }
            if st.queue.len() >= self.inner.cfg.max_queue {
                drop(st);
                return Admission::Shed(self.shed(Shed::QueueFull));
            }
            let (tx, rx) = oneshot::channel();
            st.queue.push_back(Waiter { critical, tx });
            rx
        };
        // Waiting longer than a couple of service times means the queue is not draining: the
        // request would only add its wait to its latency. Until a service time is known, the
        // configured bound applies. The floor is a few scheduler time slices: a process that
        // shares its core is descheduled for milliseconds at a time, and a burst that piles up
        // meanwhile is not an overload (S2's chain on one core shed at half load with a 1 ms
        // floor, services of ~100 µs).
        let expected = self.lock().algo.expected();
        let wait = expected
            .map_or(self.inner.cfg.queue_timeout.get(), |e| {
                (e * 2)
                    .max(MIN_QUEUE_WAIT)
                    .min(self.inner.cfg.queue_timeout.get())
            })
            .min(remaining / 4);
        let limiter = self.clone();
        Admission::Wait(Box::pin(async move {
            let queued = Instant::now();
            match tokio::time::timeout(wait, rx).await {
                // The slot was handed over by `release` (in-flight already counts it).
                Ok(Ok(())) => {
                    let waited = u64::try_from(queued.elapsed().as_micros()).unwrap_or(u64::MAX);
                    limiter
                        .inner
                        .max_wait_us
                        .fetch_max(waited, Ordering::Relaxed);
                    let over = {
                        let st = limiter.lock();
                        st.in_flight > limiter.capacity(&st, true)
                    };
                    Ok(limiter.permit(over, Instant::now()))
                }
                // Timed out (or the limiter went away): the waiter's sender is now closed, and
                // `release` skips closed senders.
                _ => Err(limiter.shed(Shed::QueueTimeout)),
            }
        }))
    }

    fn capacity(&self, st: &State, critical: bool) -> usize {
        let limit = st.algo.limit();
        let limit = if critical {
            limit * (1.0 + self.inner.cfg.critical_headroom)
        } else {
            limit
        };
        limit.floor().max(1.0) as usize
    }

    /// A permit for a request admitted while `over` the (critical) limit or not.
    fn permit(&self, over: bool, started: Instant) -> Permit {
        self.inner.admitted.fetch_add(1, Ordering::Relaxed);
        if over {
            self.inner.over_limit.fetch_add(1, Ordering::Relaxed);
        }
        Permit {
            limiter: self.clone(),
            started,
            done: false,
        }
    }

    /// A slot frees: hand it to a waiting critical request, else to the newest waiter, if
    /// the limit still allows; otherwise it is released.
    fn release(&self) {
        let mut st = self.lock();
        loop {
            let cap = self.capacity(&st, false);
            // Over the (possibly shrunken) limit: do not hand the slot on.
            if st.in_flight > cap {
                break;
            }
            let pos = st
                .queue
                .iter()
                .rposition(|w| w.critical)
                .or_else(|| st.queue.len().checked_sub(1));
            let Some(pos) = pos else { break };
            let Some(w) = st.queue.remove(pos) else { break };
            if w.tx.send(()).is_ok() {
                // The slot passes to the waiter: in-flight is unchanged.
                return;
            }
            // That waiter timed out already; try the next.
        }
        st.in_flight = st.in_flight.saturating_sub(1);
    }

    fn shed(&self, why: Shed) -> Shed {
        let i = match why {
            Shed::QueueFull => 0,
            Shed::QueueTimeout => 1,
            Shed::Deadline => 2,
            Shed::Cpu => 3,
        };
        self.inner.shed[i].fetch_add(1, Ordering::Relaxed);
        why
    }

    fn cpu(&self) -> f64 {
        self.inner.cpu.load(Ordering::Relaxed) as f64 / 1e4
    }

    /// Record the process's CPU usage (0–1), from the guard's sampler.
    pub fn set_cpu(&self, usage: f64) {
        let v = (usage.clamp(0.0, 1.0) * 1e4) as u64;
        self.inner.cpu.store(v, Ordering::Relaxed);
    }

    /// Current state and counters.
    pub fn stats(&self) -> OverloadStats {
        let st = self.lock();
        OverloadStats {
            limit: st.algo.limit(),
            in_flight: st.in_flight,
            queued: st.queue.iter().filter(|w| !w.tx.is_closed()).count(),
            expected: st.algo.expected().unwrap_or_default(),
            baseline: st.algo.baseline().unwrap_or_default(),
            shed: [0, 1, 2, 3].map(|i| self.inner.shed[i].load(Ordering::Relaxed)),
            admitted: self.inner.admitted.load(Ordering::Relaxed),
            max_queue_wait: Duration::from_micros(self.inner.max_wait_us.load(Ordering::Relaxed)),
            over_limit: self.inner.over_limit.load(Ordering::Relaxed),
            cpu: self.cpu(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Samples this process's CPU usage every `period` into `limiter` (the CPU guard). Usage is
/// CPU time over wall time over the cores available to the process.
pub async fn sample_cpu(limiter: Limiter, cores: usize, period: Duration) {
    let mut last = (std::time::Instant::now(), process_cpu_seconds());
    loop {
        tokio::time::sleep(period).await;
        let now = (std::time::Instant::now(), process_cpu_seconds());
        let wall = now.0.saturating_duration_since(last.0).as_secs_f64();
        if let (Some(a), Some(b)) = (last.1, now.1)
            && wall > 0.0
        {
            limiter.set_cpu((b - a) / wall / cores.max(1) as f64);
        }
        last = now;
    }
}

/// utime + stime of this process, from `/proc/self/stat` (Linux; `None` elsewhere).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux configuration in use.
    Some((utime + stime) / 100.0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cfg() -> OverloadConfig {
        OverloadConfig {
            initial_limit: 50,
            min_limit: 5,
            max_limit: 200,
            ..OverloadConfig::default()
        }
    }

    /// Feed `n` answers of `rtt`, 10 ms apart, with the limit fully in use.
    fn feed(g: &mut Gradient2, t: &mut Instant, n: usize, rtt: Duration) {
        for _ in 0..n {
            *t += Duration::from_millis(10);
            let busy = g.limit().ceil() as usize;
            g.update(rtt, *t, busy);
        }
    }

    #[test]
    fn the_limit_grows_at_steady_latency_falls_when_latency_rises_and_recovers() {
        let mut g = Gradient2::new(&cfg());
        let mut t = Instant::now();
        feed(&mut g, &mut t, 200, Duration::from_millis(10));
        let steady = g.limit();
        assert_eq!(steady, 200.0, "probes up to the cap while latency is flat");

        // Latency triples (requests queue inside the service): the limit falls, and stays
        // down for as long as the overload lasts (here 30 s of answers).
        feed(&mut g, &mut t, 50, Duration::from_millis(30));
        let loaded = g.limit();
        assert!(loaded < steady * 0.5, "{loaded} vs {steady}");
        feed(&mut g, &mut t, 3000, Duration::from_millis(30));
        assert!(
            g.limit() < steady * 0.5,
            "still shedding after 30 s: {}",
            g.limit()
        );

        // Back to normal: it recovers.
        feed(&mut g, &mut t, 300, Duration::from_millis(10));
        assert!(g.limit() > loaded * 2.0, "{} after recovery", g.limit());
    }

    #[test]
    fn a_slower_latency_that_persists_becomes_the_new_normal() {
        let mut g = Gradient2::new(&cfg());
        let mut t = Instant::now();
        feed(&mut g, &mut t, 100, Duration::from_millis(10));
        // Three minutes at 30 ms (a slower release, say): the baseline follows.
        feed(&mut g, &mut t, 18_000, Duration::from_millis(30));
        assert!(
            g.baseline().unwrap() > Duration::from_millis(25),
            "{:?}",
            g.baseline()
        );
        assert_eq!(g.limit(), 200.0, "no longer shedding");
    }

    #[test]
    fn light_load_does_not_move_the_limit() {
        let mut g = Gradient2::new(&cfg());
        let t = Instant::now();
        for i in 0..100 {
            g.update(Duration::from_millis(500), t + Duration::from_millis(i), 1);
        }
        assert_eq!(g.limit(), 50.0);
    }

    #[test]
    fn the_limit_stays_between_its_floor_and_cap() {
        let mut g = Gradient2::new(&cfg());
        let mut t = Instant::now();
        for i in 0..5000u64 {
            // Wild latency: 1 ms to 2 s.
            feed(
                &mut g,
                &mut t,
                1,
                Duration::from_millis(1 + (i * 7919) % 2000),
            );
            assert!((5.0..=200.0).contains(&g.limit()), "{}", g.limit());
        }
        // Latency that keeps climbing keeps the gradient at its minimum: the limit sinks to
        // the floor and stays there.
        let mut rtt = 0.001;
        for _ in 0..600 {
            rtt *= 1.02;
            feed(&mut g, &mut t, 1, Duration::from_secs_f64(rtt));
            assert!(g.limit() >= 5.0);
        }
        assert_eq!(g.limit(), 5.0, "down to the floor, not below");
    }

    #[tokio::test(start_paused = true)]
    async fn over_the_limit_requests_queue_then_are_shed_fast_and_lifo_serves_the_newest() {
        let c = OverloadConfig {
            initial_limit: 2,
            min_limit: 2,
            max_limit: 2,
            max_queue: 2,
            queue_timeout: keel_config::Duration::from_millis(50),
            ..OverloadConfig::default()
        };
        let l = Limiter::new(&c);
        let long = Duration::from_secs(10);
        let a = l.acquire(long, false).await.unwrap();
        let _b = l.acquire(long, false).await.unwrap();
        assert_eq!(l.stats().in_flight, 2);

        // Two wait; a third finds the queue full and is shed at once.
        let l1 = l.clone();
        let older = tokio::spawn(async move { l1.acquire(long, false).await });
        tokio::task::yield_now().await;
        let l2 = l.clone();
        let newer = tokio::spawn(async move { l2.acquire(long, false).await });
        tokio::task::yield_now().await;
        assert_eq!(l.stats().queued, 2);
        assert_eq!(l.acquire(long, false).await.unwrap_err(), Shed::QueueFull);

        // A slot frees: the newest waiter gets it (LIFO), the older one times out.
        drop(a);
        let newer = newer.await.unwrap();
        assert!(newer.is_ok());
        tokio::time::advance(Duration::from_millis(60)).await;
        assert_eq!(older.await.unwrap().unwrap_err(), Shed::QueueTimeout);
        let s = l.stats();
        assert_eq!(s.in_flight, 2);
        assert_eq!(s.shed, [1, 1, 0, 0]);
        assert_eq!(s.over_limit, 0);
        assert!(s.max_queue_wait <= Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_service_waits_out_a_scheduler_stall_before_shedding() {
        let c = OverloadConfig {
            initial_limit: 1,
            min_limit: 1,
            max_limit: 1,
            ..OverloadConfig::default()
        };
        let l = Limiter::new(&c);
        let long = Duration::from_secs(10);
        // A service answering in 100 µs: twice its service time would be a 200 µs wait.
        let mut p = l.acquire(long, false).await.unwrap();
        tokio::time::advance(Duration::from_micros(100)).await;
        p.answered();
        drop(p);

        // The slot is held across a 3 ms stall: the waiter still gets it.
        let held = l.acquire(long, false).await.unwrap();
        let l1 = l.clone();
        let waiter = tokio::spawn(async move { l1.acquire(long, false).await });
        tokio::task::yield_now().await;
        tokio::time::advance(Duration::from_millis(3)).await;
        // Let the waiter see its timer (if it had fired) before the slot is handed over.
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        drop(held);
        let got = waiter
            .await
            .unwrap()
            .expect("admitted after the stall, not shed");

        // A queue that does not move for longer than the floor is shed.
        let l2 = l.clone();
        let waiter = tokio::spawn(async move { l2.acquire(long, false).await });
        tokio::task::yield_now().await;
        tokio::time::advance(MIN_QUEUE_WAIT + Duration::from_millis(1)).await;
        assert_eq!(waiter.await.unwrap().unwrap_err(), Shed::QueueTimeout);
        drop(got);
    }

    #[tokio::test(start_paused = true)]
    async fn too_little_time_left_is_refused_at_admission_and_critical_routes_go_first() {
        let c = OverloadConfig {
            initial_limit: 1,
            min_limit: 1,
            max_limit: 1,
            critical_routes: vec!["/pay".into()],
            critical_headroom: 0.0,
            ..OverloadConfig::default()
        };
        let l = Limiter::new(&c);
        assert!(l.is_critical("/pay/now") && !l.is_critical("/browse"));
        let mut p = l.acquire(Duration::from_secs(1), false).await.unwrap();
        tokio::time::advance(Duration::from_millis(100)).await;
        p.answered();
        // Expected service time is now 100 ms: 50 ms left is refused without queueing.
        assert_eq!(
            l.acquire(Duration::from_millis(50), false)
                .await
                .unwrap_err(),
            Shed::Deadline
        );

        let l1 = l.clone();
        let plain = tokio::spawn(async move { l1.acquire(Duration::from_secs(10), false).await });
        tokio::task::yield_now().await;
        let l2 = l.clone();
        let critical = tokio::spawn(async move { l2.acquire(Duration::from_secs(10), true).await });
        tokio::task::yield_now().await;
        drop(p);
        // Held, so its slot is not handed on to the plain waiter.
        let _slot = critical
            .await
            .unwrap()
            .expect("the critical waiter got the slot");
        tokio::time::advance(Duration::from_millis(60)).await;
        assert_eq!(plain.await.unwrap().unwrap_err(), Shed::QueueTimeout);
    }

    #[tokio::test]
    async fn the_cpu_guard_sheds_non_critical_requests_when_hot() {
        let c = OverloadConfig {
            cpu_guard: true,
            min_limit: 1,
            initial_limit: 10,
            ..OverloadConfig::default()
        };
        let l = Limiter::new(&c);
        let _one = l.acquire(Duration::from_secs(1), false).await.unwrap();
        l.set_cpu(0.95);
        assert_eq!(
            l.acquire(Duration::from_secs(1), false).await.unwrap_err(),
            Shed::Cpu
        );
        assert!(
            l.acquire(Duration::from_secs(1), true).await.is_ok(),
            "critical passes"
        );
        l.set_cpu(0.5);
        assert!(l.acquire(Duration::from_secs(1), false).await.is_ok());
        assert!(process_cpu_seconds().is_some());
    }
}
