//! Overload protection: admission in front of the user's handlers on the service's *own*
//! signals — how long a request waited before Keel started it, how long the service itself
//! takes (time spent waiting on upstreams left out), and how hot its CPU is. Probes and the
//! admin port never pass through it.
//!
//! The first version shed on a gradient of end-to-end latency (Netflix's Gradient2). Measured,
//! it failed both ways: a gateway in front of a fast upstream sat at its floor and answered a
//! third of healthy traffic 503 (the upstream's time and a shared core's jitter read as
//! overload), while a CPU-bound handler under three times its capacity shed nothing (the queue
//! formed in the kernel's socket buffers and the runtime's run queue, before the limiter's
//! clock started). What replaced it, and why:
//!
//! **1. Queueing delay, CoDel-style.** A request's *queueing delay* is the time from when its
//! bytes reached the socket to when admission looks at it. On Linux the kernel dates every
//! received segment (`SO_TIMESTAMPNS`, read with `recvmsg` by the connection; see
//! `crate::conn`), so a request that sat in the receive buffer while every worker was busy is
//! seen as late — also one that arrived with its connection and waited in the accept backlog
//! (the server asks for dates on its listening sockets, and accepted sockets inherit them).
//! The clock cannot see anything before the kernel (the NIC, the network); without kernel
//! timestamps (other systems, `rx_timestamps = false`) it starts when Keel
//! read the bytes and is blind to a backlog of ready connections. As in CoDel (Nichols &
//! Jacobson, RFC 8289; folly's server-side `Codel`), the service is *overloaded* only when
//! every request for a whole `queue_interval` (50 ms, and at least eight requests) waited
//! longer than `target_delay` (5 ms): a queue that never drains below 5 ms is a standing
//! queue, while a burst or a process descheduled for a few milliseconds on a shared core
//! leaves a fast request behind it, which starts the count again. While the queue stands,
//! requests that waited longer than `target_delay` are shed (they are the backlog); the others
//! run. It stops standing after a `queue_interval` in which at most a tenth of the requests
//! waited past the target. With `one_per_backlog` (off by default) a standing queue's
//! backlog gets one admission per worker thread, however short the others' waits: a
//! CPU-bound handler's admitted latency is then about one service time, not the target, at a
//! cost in goodput when callers resend at once (the trade-off is measured on the key).
//! Under a sustained overload the admitted requests' wait settles just under the target, so
//! it bounds their latency: a 1 ms CPU-bound handler at three times its capacity answered
//! admitted requests in 6–11 ms at p99 per 250 ms (once 14 ms) after the onset
//! (`KEEL_OVERLOAD_SERIES=1 bench/overload.sh 30 cpu`). The onset costs more: until the
//! queue has stood for a `queue_interval`, requests are admitted into the backlog, and the
//! backlog is then refused (a refusal's latency is the time its request already waited).
//!
//! **2. CPU, never alone.** The process's CPU usage against the cores it may use (the cgroup
//! quota counts) is sampled every 250 ms. A sample above `cpu_threshold` keeps the CPU "hot"
//! for `cpu_cooloff` (1 s), so a service flickering around the threshold does not flap. Hot
//! CPU alone sheds nothing — a service at 100 % whose requests wait a millisecond is busy,
//! not overloaded; a CoDel shed while it is hot is counted as `cpu` (the backlog is the CPU's),
//! otherwise as `queue_delay`.
//!
//! **3. A concurrency limit on the service's own time**, for queues Keel cannot see: a handler
//! waiting on a pool of eight connections queues *inside* the handler. The limit learns from
//! each answer's service time (admission to response head) **minus the time the request spent
//! waiting on Keel's client** ([`keel_core::Context::upstream_wait`]): a proxy is not
//! overloaded because its upstream is slow — the upstream's own limiter and the client's
//! breaker and balancer handle that. It applies CoDel's idea to service time: every
//! `interval` (100 ms, and at least eight answers), the **least** own time of the interval is
//! compared with the baseline (the least of a healthy interval), and its mean with the mean
//! of light-load intervals:
//!
//! ```text
//! threshold = max(tolerance × baseline, baseline + slack)
//! queued(t) = max((1 + tolerance) / 2 × t, t + slack / 2)          (halfway there)
//! least > threshold, or mean > 2 × threshold(light-load mean)
//!                    →  limit ← min(limit × clamp(threshold / least, 0.5, 1),
//!                                   answers per second × (queued(baseline) + mean upstream wait))
//! least > queued(baseline), or mean > queued(light-load mean)  →  limit held
//! otherwise          →  limit ← limit + 1 while answers queue a little, else + √limit
//! a cut after which, drained, the least is as slow  →  the least is the new baseline
//! ```
//!
//! each step taken `smoothing` of the way, and only after an interval in which half the limit
//! was in use (light load says nothing about capacity). The second term of a cut is Little's
//! law: when every answer queued, the service ran at its capacity, and the interval's answers
//! needed that many in flight at the time halfway to the threshold (a little queueing as
//! headroom), plus what their waits on upstreams hold (a proxy's slots are mostly those).
//! Halving alone took three intervals to bring a fresh limit of 100 down to a pool of eight,
//! admitting into the pool's queue all the while; at three times that pool's capacity the
//! cut took admitted p99 over 30 s from 58.8–72.5 ms (two runs) to 46.2 ms
//! (`bench/overload.sh 30 async`).
//!
//! The band in which the limit holds, and the careful probing after a cut, keep a saturated
//! service where its answers queue a little. Without them the limit grew by √limit whenever
//! the least was under the threshold, and a pool of eight held 13–16 in flight (the least
//! stays low while one answer an interval finds a free slot), its admitted p99 at 24–25 ms;
//! with the hold on the least alone it still crept from 11 to 16 over 30 s. The mean, held
//! against the mean of light-load intervals (never against the least: a service whose
//! answers vary has a mean far above its least with nothing queued), keeps that pool at
//! 11–12 in flight and its admitted p99 at 22.7–22.9 ms, 1.78–1.91× unloaded, in two runs
//! (`bench/overload.sh 30`; `bench/results/overload-20261207T053312Z.md`, `…054012Z.md`).
//! The floor of 20 this module once had held twelve requests queued behind that pool's
//! eight slots.
//!
//! A cut is for a queue; when the answers after one — once what it let in has drained — are
//! as slow as those that prompted it, there was no queue: the work itself got slower (a
//! dependency Keel's client does not see), and that time becomes the baseline at once. With
//! a floor of four and no such rule, a pool of eight whose answers went from 10 to 100 ms
//! was held at four in flight and served half of what it could.
//!
//! The cut rests on the least (the gross mean aside, whose bar is far above anything a busy
//! service's mean reaches): when even the fastest answer of an interval was slow, every
//! request queued; one fast answer shows the service can still be fast, so a service whose
//! time varies (1 to 30 ms, say), a slow answer or a scheduler's stall moves nothing.
//! Comparing an average with a minimum is what made Gradient2 throttle services with varied
//! answers (its javadoc warns of "an impractically low base RTT"; a first
//! version of this module, which compared a ten-answer average with a falling baseline,
//! throttled such an upstream in this crate's tests); a least with a least is like with like.
//! The slack keeps a fast service (tens of microseconds of its own) from reading a scheduler's
//! millisecond as a thirtyfold slowdown. The baseline falls at once to a lower healthy least,
//! rises towards a higher one over ~10 s under light load, and only over `baseline_window`
//! (60 s) while half the limit is in use or the least is over the threshold (a saturated
//! service's least holds the queue the limit admits) — so an overload is shed for its
//! length, and a release that really made the service slower becomes normal. A service
//! that starts overloaded still finds its baseline: the first requests, admitted into an
//! empty service, are fast.
//!
//! **Over the limit**, a request waits in a LIFO queue for at most `queue_timeout`, twice the
//! recent service time (but at least 5 ms, a few scheduler slices), and a quarter of its
//! remaining deadline, whichever is least: LIFO serves the freshest requests, whose callers are
//! still waiting. A full queue, or a wait that times out, is answered at once with 503 +
//! `Retry-After` (gRPC `UNAVAILABLE` with the same header). After an interval in which more
//! waiters timed out than were served, the queue is *stalled* — it holds the excess of a
//! sustained overload, not a burst — and a waiter waits 1 ms: refusals at three times an
//! async handler's capacity went from 9.6–10.2 ms at p99 to 5.1 ms (`bench/overload.sh 30
//! async`).
//!
//! **Deadline-aware admission:** a request whose remaining deadline is shorter than the
//! expected service time is refused at once with 504 / `DEADLINE_EXCEEDED`.
//!
//! **Critical routes** (path prefixes) are shed last: they may use `critical_headroom` above
//! the limit, are never shed for queueing delay, and a freed slot goes to a waiting critical
//! request before any other.
//!
//! **Cost.** Admission, answer and release are atomic operations on the fast path (a
//! compare-and-swap on the in-flight count; the CoDel window and the answers of the current
//! interval are a handful of atomics each). The queue's lock is taken only when a request has
//! to wait or a slot is handed to a waiter, and the limit's arithmetic (floating point) runs
//! under its lock once per interval, not per answer. Measured with callgrind on `hello`'s
//! `GET /` (release): shedding on costs 653 instructions per request over `enabled = false`
//! (3.3 %), of which the kernel timestamps (`recvmsg`, its control message, a clock read) are
//! about 300; with the arithmetic and its lock on every answer it cost 1,180.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use keel_config::{Validate, Validator};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// The least a request waits for a slot before it is shed (unless `queue_timeout` or its
/// deadline is shorter): see `admit`.
const MIN_QUEUE_WAIT: Duration = Duration::from_millis(5);

/// How long a request waits for a slot while the queue is stalled (most waiters of the last
/// interval timed out): long enough to catch a slot freed just after it arrived, short
/// enough that a refusal is answered within a couple of milliseconds. See [`QueueOutcomes`].
const STALLED_QUEUE_WAIT: Duration = Duration::from_millis(1);

/// While the service is healthy, a higher least service time becomes the baseline over this
/// long (weight `interval / HEALTHY_BASELINE_WINDOW` per interval).
const HEALTHY_BASELINE_WINDOW: Duration = Duration::from_secs(10);

/// How far a light-load interval's mean own time moves the healthy mean: a tenth, so one
/// interval's noise moves it little and a second of them most of the way.
const HEALTHY_MEAN_WEIGHT: f64 = 0.1;

/// A cut that left the least and the mean above this share of those that prompted it
/// removed no queue (see [`ConcurrencyLimit::judge`]): a queue's removal shows as a tenth
/// off either.
const FUTILE_CUT_GAIN: f64 = 0.9;

/// Answers an interval needs before it gives a verdict on the limit, and late requests a run
/// needs before the queueing-delay test calls the queue standing.
const MIN_INTERVAL_ANSWERS: u64 = 8;

/// `[overload]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OverloadConfig {
    /// Shed under overload. On by default: every signal needs a persistent, measured backlog
    /// before it sheds, so a healthy service is never throttled.
    pub enabled: bool,
    /// The limit at start. 100: no throttling until the service's own time says so.
    pub initial_limit: u32,
    /// The limit never falls below this. 4: the limit learns from the service's own time
    /// (waits on Keel's client left out), so a slow upstream cannot drag it down, and a
    /// higher floor would keep requests queued behind a small pool (Netflix's 20 held twelve
    /// behind a pool of eight).
    pub min_limit: u32,
    /// The limit never rises above this. 2000: far above what one instance should hold in
    /// flight; a bound on memory, not a tuning knob.
    pub max_limit: u32,
    /// The least own service time of an interval may grow to this multiple of its baseline
    /// (and by `slack`) before the limit shrinks. 1.5 (Netflix's default).
    pub tolerance: f64,
    /// The least own service time of an interval may grow by this much over its baseline
    /// (and to `tolerance` × it) before the limit shrinks. 5 ms: a few scheduler time slices,
    /// so a fast service on a shared core is not throttled by being descheduled.
    pub slack: keel_config::Duration,
    /// The concurrency limit's window: the answers of one interval are judged together (at
    /// least eight of them). 100 ms: a pool of eight 10 ms answers gives eighty, enough for a
    /// least and a mean to mean something. At 50 ms that pool, at three times its capacity,
    /// was cut sooner at the onset but held a little higher after it (admitted p99 per
    /// 250 ms 22.5–24.9 ms against 20.5–24.7 ms; `KEEL_OVERLOAD_SERIES=1 bench/overload.sh
    /// 10 async`, one run each).
    pub interval: keel_config::Duration,
    /// How long every request must have waited past `target_delay` (at least eight of them)
    /// before the queue counts as standing — CoDel's interval for the queueing-delay signal.
    /// 50 ms: longer than a scheduler stall (which leaves a fast request behind it and
    /// restarts the count), and the onset of an overload admits half as much backlog as with
    /// 100 ms: a CPU-bound handler at three times its capacity answered refusals in 8.0–15.2 ms
    /// at p99 over 10 s (three runs) instead of 42.6 ms, with nothing shed at 80 % load
    /// (`bench/overload.sh 10 cpu`).
    pub queue_interval: keel_config::Duration,
    /// Queueing delay that, when every request of a `queue_interval` waited longer, means a
    /// standing queue; while it stands, requests that waited longer are shed. 5 ms (CoDel's
    /// target): lower bounds an overloaded service's latency tighter (the admitted requests'
    /// wait settles just under it) but a debug build or a busy shared core waits 2–4.5 ms
    /// with no overload at all.
    pub target_delay: keel_config::Duration,
    /// While a queue stands, admit from each backlog — the requests that were waiting
    /// together — one request per worker thread, and shed the rest, however short their own
    /// wait. Off by default: it trades goodput under a closed loop for latency. A handler that
    /// computes 1 ms on its one worker, at three times its capacity over 30 s: admitted p99
    /// 2.2 ms with it against 6.8 ms without, refusals 4.6 against 7.3 ms; but 64 connections
    /// that resend the moment they are refused get 0.75× the goodput of shedding off with it,
    /// against 0.89× without — each backlog's refusals cost CPU the handler needed
    /// (`KEEL_OVERLOAD__ONE_PER_BACKLOG=true bench/overload.sh 30 cpu`; `docs/operations.md`
    /// has the chain and the per-250 ms figures). Worth it for a CPU-bound service whose
    /// callers back off on `Retry-After`.
    pub one_per_backlog: bool,
    /// Date requests by the kernel's receive timestamps (Linux), so time spent in the socket
    /// buffer while the workers were busy counts as queueing delay. On by default: its cost is
    /// a `recvmsg` instead of a `read` and one clock read per request (see BENCH.md).
    pub rx_timestamps: bool,
    /// How far the limit moves towards its target per interval. 1.0 (all the way): decisions
    /// are already one per interval on a persistent signal, and a slower descent would let a
    /// real overload queue for longer.
    pub smoothing: f64,
    /// How long a higher least service time must persist, while over its threshold or with
    /// half the limit in use, to become the new baseline. 60 s: an overload is shed for its whole length, while a deploy that
    /// really made the service slower is accepted within a minute or two.
    pub baseline_window: keel_config::Duration,
    /// Requests waiting for a slot before new ones are shed at once. 64 bounds memory and
    /// the wait of the last one.
    pub max_queue: usize,
    /// Longest wait for a slot. The wait is also capped at twice the recent service time, or
    /// 5 ms if that is more (a longer wait means the queue is not draining), and a quarter of
    /// the request's remaining time. 5 ms: a shed answer comes within a few milliseconds
    /// (measured with 50 ms, rejections under three times capacity took 53 ms at p99; with
    /// 5 ms, 9 ms), and a queue that has not moved in 5 ms is not a burst being smoothed.
    pub queue_timeout: keel_config::Duration,
    /// `Retry-After` on shed responses, in seconds. 1: callers back off briefly; Keel's
    /// client penalises this endpoint in its balancer for that long.
    pub retry_after_secs: u32,
    /// Path prefixes shed last (health-critical or paid traffic).
    pub critical_routes: Vec<String>,
    /// Extra share of the limit critical requests may use (0.25 = 25 % above the limit).
    pub critical_headroom: f64,
    /// Sample the process's CPU usage (every 250 ms). On by default: it costs one read of
    /// `/proc/self/stat` per sample, and it tells an operator whether a backlog is the CPU's.
    pub cpu_guard: bool,
    /// CPU usage (0–1 of the cores the process may use) above which the CPU is hot. 0.9.
    pub cpu_threshold: f64,
    /// How long the CPU stays hot after a sample above the threshold. 1 s (go-zero's shedder
    /// cools off for the same): a service flickering around the threshold does not flap.
    pub cpu_cooloff: keel_config::Duration,
}

impl Default for OverloadConfig {
    fn default() -> Self {
        OverloadConfig {
            enabled: true,
            initial_limit: 100,
            min_limit: 4,
            max_limit: 2000,
            tolerance: 1.5,
            slack: keel_config::Duration::from_millis(5),
            interval: keel_config::Duration::from_millis(100),
            queue_interval: keel_config::Duration::from_millis(50),
            target_delay: keel_config::Duration::from_millis(5),
            one_per_backlog: false,
            rx_timestamps: true,
            smoothing: 1.0,
            baseline_window: keel_config::Duration::from_secs(60),
            max_queue: 64,
            queue_timeout: keel_config::Duration::from_millis(5),
            retry_after_secs: 1,
            critical_routes: Vec::new(),
            critical_headroom: 0.25,
            cpu_guard: true,
            cpu_threshold: 0.9,
            cpu_cooloff: keel_config::Duration::from_secs(1),
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
        for (key, d) in [
            ("baseline_window", self.baseline_window),
            ("interval", self.interval),
            ("queue_interval", self.queue_interval),
            ("target_delay", self.target_delay),
        ] {
            v.check(!d.get().is_zero(), key, d, "must be greater than 0");
        }
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
    /// Over the concurrency limit with the queue full.
    QueueFull,
    /// Waited `queue_timeout` (or its share of the deadline) without a slot.
    QueueTimeout,
    /// Less time left than the expected service time.
    Deadline,
    /// A standing queue (CoDel) while the CPU is hot: the backlog is the CPU's.
    Cpu,
    /// A standing queue (CoDel) with the CPU not hot (starved by something else: another
    /// process on the core, a throttled quota, a blocked runtime).
    QueueDelay,
}

impl Shed {
    /// Every reason, in the order of [`OverloadStats::shed`].
    pub const ALL: [Shed; 5] = [
        Shed::QueueFull,
        Shed::QueueTimeout,
        Shed::Deadline,
        Shed::Cpu,
        Shed::QueueDelay,
    ];

    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Shed::QueueFull => "queue_full",
            Shed::QueueTimeout => "queue_timeout",
            Shed::Deadline => "deadline",
            Shed::Cpu => "cpu",
            Shed::QueueDelay => "queue_delay",
        }
    }

    fn index(self) -> usize {
        self as usize
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
    /// Expected service time now (a short average of the service's own time): admission
    /// refuses less time than this.
    pub expected: Duration,
    /// The service's own time when not overloaded.
    pub baseline: Duration,
    /// Shed since start, by reason, in the order of [`Shed::ALL`].
    pub shed: [u64; 5],
    /// Admitted since start.
    pub admitted: u64,
    /// Longest time any request waited in the queue.
    pub max_queue_wait: Duration,
    /// Times in-flight exceeded the limit in force when a request was admitted (must stay 0).
    pub over_limit: u64,
    /// CPU usage last sampled (0 when the guard is off).
    pub cpu: f64,
    /// Whether the CPU is hot now (a sample over the threshold within the cool-off).
    pub cpu_hot: bool,
    /// The last request's queueing delay (zero until one is measured).
    pub queue_delay: Duration,
    /// The least queueing delay of the last complete CoDel interval.
    pub min_queue_delay: Duration,
    /// Whether a standing queue was seen over the last interval (requests that waited longer
    /// than `target_delay` are being shed).
    pub standing_queue: bool,
    /// Whether more waiters timed out than were served over the last interval: they wait
    /// about a millisecond, not `queue_timeout`, while it lasts.
    pub queue_stalled: bool,
}

/// What an interval of answers says to the concurrency limit ([`ConcurrencyLimit::judge`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IntervalSummary {
    /// The least own service time (upstream waits left out).
    pub least: Duration,
    /// The mean own service time.
    pub mean: Duration,
    /// The mean time an answer spent waiting on upstreams.
    pub upstream: Duration,
    /// Answers a second; 0 when the interval says nothing about a rate (it stretched far
    /// past its length for want of answers).
    pub per_sec: f64,
    /// At least half the limit was in use at one of its answers (light load says nothing
    /// about capacity, so only then does the limit move).
    pub busy: bool,
    /// No more requests were in flight than the limit at any of its answers: what a cut
    /// before it let in has drained, so its answers show what that cut did.
    pub drained: bool,
}

/// The concurrency limit's arithmetic: one verdict per interval, from the interval's least
/// own service time (unit-tested on its own; the module doc gives the rule). The answers
/// themselves are counted lock-free (the limiter's `Answers`); only the verdict takes its lock.
#[derive(Debug, Clone)]
pub struct ConcurrencyLimit {
    limit: f64,
    /// Seconds; the least own service time of a healthy interval.
    baseline: Option<f64>,
    /// A cut has found the service's capacity and load has not fallen since: the limit
    /// probes upwards by one a verdict (see [`ConcurrencyLimit::judge`]).
    careful: bool,
    /// Seconds; the mean own service time of intervals under light load.
    healthy_mean: Option<f64>,
    /// Seconds; the least and mean that prompted the last verdict's cut, if it was one.
    cut_at: Option<(f64, f64)>,
    cfg: OverloadConfig,
}

impl ConcurrencyLimit {
    /// At `cfg.initial_limit`.
    pub fn new(cfg: &OverloadConfig) -> ConcurrencyLimit {
        ConcurrencyLimit {
            limit: f64::from(cfg.initial_limit),
            baseline: None,
            careful: false,
            healthy_mean: None,
            cut_at: None,
            cfg: cfg.clone(),
        }
    }

    /// The current limit.
    pub fn limit(&self) -> f64 {
        self.limit
    }

    /// The no-overload service time (the least of a healthy interval).
    pub fn baseline(&self) -> Option<Duration> {
        self.baseline.map(Duration::from_secs_f64)
    }

    /// Past this, a least (of `baseline`) means every answer queued: `tolerance` × it, or
    /// `slack` over it, whichever is more.
    fn threshold(&self, baseline: f64) -> f64 {
        (self.cfg.tolerance * baseline).max(baseline + self.cfg.slack.get().as_secs_f64())
    }

    /// Halfway to [`Self::threshold`] on both of its terms: an answer past it already waited
    /// a little inside the service, so more concurrency would only queue.
    fn queued(&self, time: f64) -> f64 {
        (time * (1.0 + self.cfg.tolerance) / 2.0)
            .max(time + self.cfg.slack.get().as_secs_f64() / 2.0)
    }

    /// Judge an interval of answers (see the module doc for the rule).
    pub fn judge(&mut self, summary: &IntervalSummary) {
        let IntervalSummary { per_sec, busy, .. } = *summary;
        let least = summary.least.as_secs_f64();
        let mean = summary.mean.as_secs_f64();
        let interval = self.cfg.interval.get();
        let baseline = self.baseline.unwrap_or(least);
        let threshold = self.threshold(baseline);
        let queued_above = self.queued(baseline);
        // Even the fastest answer of the interval was slow: every request queued somewhere
        // inside the service.
        // Or the mean answer was over twice the threshold of the light-load mean: a gross
        // queue, as at the onset of an overload, when the interval's first answers still
        // came from an empty service but the rest waited behind everything admitted since.
        // Cutting one interval sooner there halves what the onset admits; the bar is high
        // enough that a busy service's mean (a scheduler's milliseconds, varied answers)
        // never reaches it.
        let gross = self
            .healthy_mean
            .is_some_and(|m| mean > 2.0 * self.threshold(m));
        let over = least > threshold || gross;
        // A cut removes a queue. When the answers after it, with nothing admitted before it
        // still in flight, are as slow as those that prompted it, there was no queue to
        // remove: the work itself got slower (a dependency Keel's client does not see, a
        // slower disk). Cutting on would only idle what serves it — a pool of eight whose
        // answers went from 10 to 100 ms served half its capacity at a limit of four — so
        // that time becomes the baseline at once.
        let futile = over
            && summary.drained
            && self.cut_at.is_some_and(|(cut_least, cut_mean)| {
                least >= cut_least * FUTILE_CUT_GAIN && mean >= cut_mean * FUTILE_CUT_GAIN
            });
        self.cut_at = None;
        if futile {
            // Nothing queued in this interval (the cut drained it), so its mean is the new
            // unqueued mean too.
            self.baseline = Some(least);
            self.healthy_mean = Some(mean);
            self.careful = true;
            return;
        }
        self.baseline = Some(if least <= baseline {
            least
        } else {
            // While half the limit is in use, a slower least may be the queue the limit
            // admits — a saturated service holds there — so it rises into the baseline only
            // as slowly as an overloaded one: a baseline that followed it within seconds
            // would let the limit ratchet upwards. Light load shows the unqueued time.
            let window = if over || busy {
                self.cfg.baseline_window.get()
            } else {
                HEALTHY_BASELINE_WINDOW
            };
            let w = (interval.as_secs_f64() / window.as_secs_f64().max(1e-3)).min(1.0);
            baseline + (least - baseline) * w
        });
        if !busy {
            // Light load shows what an answer takes on average when nothing queues: a
            // service whose answers vary (1 to 30 ms, say) has a mean far above its least,
            // and only its own unloaded mean says whether its mean now holds a queue.
            if !over {
                self.healthy_mean = Some(match self.healthy_mean {
                    None => mean,
                    Some(m) => m + (mean - m) * HEALTHY_MEAN_WEIGHT,
                });
            }
            // Load fell below half the limit: whatever overload the last cut answered is
            // over, and the capacity it found may be stale.
            self.careful = false;
            return;
        }
        let target = if over {
            self.careful = true;
            self.cut_at = Some((least, mean));
            // At most what the interval's answers need in flight (Little's law: in flight =
            // rate × time) at the time halfway to the threshold, plus their waits on
            // upstreams, which hold a slot but are not this service's: every answer queued,
            // so the service ran at its capacity, and this is the concurrency that carries it
            // with a little queueing as headroom (see the module doc).
            let carried = per_sec * (queued_above + summary.upstream.as_secs_f64());
            let proportional = self.limit * (threshold / least).clamp(0.5, 1.0);
            if carried > 0.0 {
                proportional.min(carried)
            } else {
                proportional
            }
        } else if least > queued_above || self.healthy_mean.is_some_and(|m| mean > self.queued(m)) {
            // Answers queue a little inside the service — the fastest of them did, or on
            // average they took that much longer than under light load (the least, lenient
            // by design, can be one lucky answer that found a free slot) — which is where a
            // saturated service should sit. More concurrency would only lengthen that queue.
            self.limit
        } else {
            // Probe upwards: by one a verdict while answers already queue a little (on
            // average a tenth over their light-load mean, or a tenth of the slack — or, with no
            // light-load mean known, after a cut while the load lasts), where the limit sits
            // near the service's capacity and a √limit step overshoots into the queue a cut
            // removed; by √limit otherwise, to find a large capacity quickly.
            let some_queue = match self.healthy_mean {
                Some(m) => mean > (m * 1.1).max(m + self.cfg.slack.get().as_secs_f64() / 10.0),
                None => self.careful,
            };
            if some_queue {
                self.limit + 1.0
            } else {
                self.limit + self.limit.sqrt()
            }
        };
        let next = self.limit + (target - self.limit) * self.cfg.smoothing;
        self.limit = next.clamp(f64::from(self.cfg.min_limit), f64::from(self.cfg.max_limit));
    }
}

/// The answers of the current interval, on atomics, so an answer costs a few atomic
/// operations and no lock: the least own time, how many, whether half the limit was in use
/// at one of them, and a short average of all answers (the expected service time). The
/// answer that closes an interval (it ended, and it saw [`MIN_INTERVAL_ANSWERS`] — at a
/// handful per interval the least of them says little, so a slow trickle stretches the
/// interval instead) takes its summary for [`ConcurrencyLimit::judge`].
#[derive(Debug)]
struct Answers {
    interval_us: u64,
    /// End of the current interval, microseconds since the limiter's epoch; 0 before the
    /// first answer.
    end_us: AtomicU64,
    least_us: AtomicU64,
    count: AtomicU64,
    /// Sums of the answers' own times and of their waits on upstreams, microseconds: the
    /// interval's means.
    own_sum_us: AtomicU64,
    upstream_sum_us: AtomicU64,
    busy: AtomicBool,
    /// More requests were in flight than the limit at one of the answers (admitted before
    /// a cut).
    excess: AtomicBool,
    /// Microseconds; each answer moves it a tenth of the way (0: none seen yet). Answers
    /// racing on two threads may each miss the other's step: an average loses nothing by it.
    expected_us: AtomicU64,
}

impl Answers {
    fn new(interval: Duration) -> Answers {
        Answers {
            interval_us: micros(interval).max(1),
            end_us: AtomicU64::new(0),
            least_us: AtomicU64::new(u64::MAX),
            count: AtomicU64::new(0),
            own_sum_us: AtomicU64::new(0),
            upstream_sum_us: AtomicU64::new(0),
            busy: AtomicBool::new(false),
            excess: AtomicBool::new(false),
            expected_us: AtomicU64::new(0),
        }
    }

    /// Count an answer of `own_us` (after `upstream_us` spent on upstreams) at `now_us`; the
    /// interval's summary when this answer closes it.
    fn answer(
        &self,
        own_us: u64,
        upstream_us: u64,
        now_us: u64,
        busy: bool,
        excess: bool,
    ) -> Option<IntervalSummary> {
        let e = self.expected_us.load(Ordering::Relaxed);
        let next = if e == 0 {
            own_us
        } else {
            // e + (own − e) / 10, in integers.
            (e * 9 + own_us) / 10
        };
        self.expected_us.store(next.max(1), Ordering::Relaxed);
        self.least_us.fetch_min(own_us, Ordering::Relaxed);
        let count = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        self.own_sum_us.fetch_add(own_us, Ordering::Relaxed);
        if upstream_us > 0 {
            self.upstream_sum_us
                .fetch_add(upstream_us, Ordering::Relaxed);
        }
        if busy {
            self.busy.store(true, Ordering::Relaxed);
        }
        if excess {
            self.excess.store(true, Ordering::Relaxed);
        }
        let end = self.end_us.load(Ordering::Acquire);
        if end == 0 {
            // The first answer starts the first interval.
            let _ = self.end_us.compare_exchange(
                0,
                now_us + self.interval_us,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            return None;
        }
        if now_us < end
            || count < MIN_INTERVAL_ANSWERS
            || self
                .end_us
                .compare_exchange(
                    end,
                    now_us + self.interval_us,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_err()
        {
            return None;
        }
        // This answer closed the interval (a racing one lost the exchange above). Answers
        // racing with the reset below land in either interval: one answer more or less.
        let least = self.least_us.swap(u64::MAX, Ordering::AcqRel);
        let count = self.count.swap(0, Ordering::Relaxed);
        let own_sum = self.own_sum_us.swap(0, Ordering::Relaxed);
        let upstream_sum = self.upstream_sum_us.swap(0, Ordering::Relaxed);
        let busy = self.busy.swap(false, Ordering::AcqRel);
        let excess = self.excess.swap(false, Ordering::AcqRel);
        // The interval began where the last one closed (`end` was set then, one interval on).
        let began_us = end.saturating_sub(self.interval_us);
        let took_us = now_us.saturating_sub(began_us).max(1);
        // An interval stretched far past its length waited for answers through a quiet spell:
        // its count over its length is no rate at which the service was loaded.
        let per_sec = if took_us <= 2 * self.interval_us {
            count as f64 / (took_us as f64 / 1e6)
        } else {
            0.0
        };
        let n = count.max(1);
        Some(IntervalSummary {
            least: Duration::from_micros(least),
            mean: Duration::from_micros(own_sum / n),
            upstream: Duration::from_micros(upstream_sum / n),
            per_sec,
            busy,
            drained: !excess,
        })
    }

    /// The expected service time, once an answer has been seen.
    fn expected(&self) -> Option<Duration> {
        match self.expected_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }
}

/// A lock-free interval that rolls over at the first event past its end: of the events
/// racing there, exactly one wins the roll and judges the interval that ended.
#[derive(Debug)]
struct Window {
    interval_us: u64,
    /// End of the current interval, microseconds since the limiter's epoch; 0 before the
    /// first event.
    end_us: AtomicU64,
}

impl Window {
    fn new(interval_us: u64) -> Window {
        Window {
            interval_us: interval_us.max(1),
            end_us: AtomicU64::new(0),
        }
    }

    /// `Some` when the event at `now_us` closed the interval and opened the next one; `true`
    /// inside when the closed interval is the one just before (after a quiet gap, or before
    /// the first interval, nothing recent was seen, so nothing is known).
    fn roll(&self, now_us: u64) -> Option<bool> {
        let end = self.end_us.load(Ordering::Acquire);
        if now_us < end {
            return None;
        }
        self.end_us
            .compare_exchange(
                end,
                now_us + self.interval_us,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .ok()?;
        Some(end != 0 && now_us < end.saturating_add(self.interval_us))
    }
}

/// CoDel's standing-queue detector over queueing delays, on atomics.
///
/// A queue *starts* standing when every request for a whole `interval` waited past the target
/// (CoDel's test, RFC 8289: the delay "stayed above target for at least interval"; one fast
/// request resets the clock, so bursts and stalls, which leave a fast request behind them,
/// never trip it). The window slides: the queue is seen standing one interval after it began
/// to stand. A first version judged fixed windows by their least delay, which took one to two
/// intervals: under three times a CPU-bound capacity its onset admitted requests into a
/// backlog of up to ~220 ms at p99 over the first 250 ms, against ~100 ms with the sliding
/// window (`KEEL_OVERLOAD_SERIES=1 bench/overload.sh 10 cpu`).
///
/// It *stops* standing only after an interval in which at most a tenth of the requests waited
/// past the target; that is judged per fixed window, by the first request after a window
/// ends. The asymmetry was measured: with one test for both, the requests admitted while
/// shedding (those under the target) ended the standing state after every shedding interval,
/// the next interval admitted everything, and under three times a CPU-bound capacity the
/// queue swung between 5 and 400 ms.
#[derive(Debug)]
struct Codel {
    target_us: u64,
    window: Window,
    /// When the current run of requests that all waited past the target began (microseconds
    /// since the epoch, at least 1); 0 when the last request was under the target.
    above_since_us: AtomicU64,
    /// Requests in that run.
    above_count: AtomicU64,
    /// Least delay seen in the current window (a gauge's source).
    min_us: AtomicU64,
    /// Requests seen in the current window, and those that waited past the target.
    seen: AtomicU64,
    late: AtomicU64,
    /// Least delay of the last complete window (a gauge).
    last_min_us: AtomicU64,
    /// The last delay seen (a gauge).
    last_us: AtomicU64,
    standing: AtomicBool,
    /// While the queue stands: when the last admissions were decided (microseconds since the
    /// epoch), one slot per worker thread, written round-robin (see [`Codel::overtaken`]).
    admitted_at: Box<[AtomicU64]>,
    next_admitted: AtomicUsize,
}

/// The most admissions [`Codel::overtaken`] remembers (one per worker thread, up to this).
const MAX_BACKLOG_ADMISSIONS: usize = 64;

impl Codel {
    /// CoDel for a runtime of `workers` threads.
    fn new(cfg: &OverloadConfig, workers: usize) -> Codel {
        let us = |d: keel_config::Duration| u64::try_from(d.get().as_micros()).unwrap_or(u64::MAX);
        // No slots: the rule is off.
        let slots = if cfg.one_per_backlog {
            workers.clamp(1, MAX_BACKLOG_ADMISSIONS)
        } else {
            0
        };
        Codel {
            admitted_at: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            next_admitted: AtomicUsize::new(0),
            target_us: us(cfg.target_delay),
            window: Window::new(us(cfg.queue_interval)),
            above_since_us: AtomicU64::new(0),
            above_count: AtomicU64::new(0),
            min_us: AtomicU64::new(u64::MAX),
            seen: AtomicU64::new(0),
            late: AtomicU64::new(0),
            last_min_us: AtomicU64::new(0),
            last_us: AtomicU64::new(0),
            standing: AtomicBool::new(false),
        }
    }

    /// Record a request that waited `delay_us`, seen at `now_us`; whether it is to be shed as
    /// part of a standing queue.
    fn observe(&self, now_us: u64, delay_us: u64) -> bool {
        self.last_us.store(delay_us, Ordering::Relaxed);
        let late = u64::from(delay_us > self.target_us);
        if let Some(recent) = self.window.roll(now_us) {
            // This request opens the next window and judges the one that ended — if it really
            // was the last one (after a gap with no requests, nothing is known, and a run of
            // late requests before the gap is not one with this request).
            let min = self.min_us.swap(delay_us, Ordering::AcqRel);
            let seen = self.seen.swap(1, Ordering::AcqRel);
            let was_late = self.late.swap(late, Ordering::AcqRel);
            let fresh = recent && min != u64::MAX;
            self.last_min_us
                .store(if fresh { min } else { 0 }, Ordering::Relaxed);
            if !fresh {
                self.above_since_us.store(0, Ordering::Relaxed);
            }
            let standing = fresh && self.standing.load(Ordering::Acquire) && was_late * 10 > seen;
            self.standing.store(standing, Ordering::Release);
        } else {
            self.min_us.fetch_min(delay_us, Ordering::AcqRel);
            self.seen.fetch_add(1, Ordering::Relaxed);
            self.late.fetch_add(late, Ordering::Relaxed);
        }
        let since = self.above_since_us.load(Ordering::Relaxed);
        if late == 0 {
            if since != 0 {
                self.above_since_us.store(0, Ordering::Relaxed);
            }
            return false;
        }
        if since == 0 {
            // Racing requests may each start the run; which start wins moves it by a few
            // microseconds.
            self.above_since_us.store(now_us.max(1), Ordering::Relaxed);
            self.above_count.store(1, Ordering::Relaxed);
            return self.standing.load(Ordering::Acquire);
        }
        let run = self.above_count.fetch_add(1, Ordering::Relaxed) + 1;
        // A run of a few requests says little (two late requests a tenth of a second apart
        // are two stalls, not a queue): it needs as many as an interval's verdict on the limit.
        if run >= MIN_INTERVAL_ANSWERS
            && now_us.saturating_sub(since) >= self.window.interval_us
            && !self.standing.load(Ordering::Relaxed)
        {
            self.standing.store(true, Ordering::Release);
        }
        self.standing.load(Ordering::Acquire)
    }

    /// Whether a request whose bytes reached the socket at `socket_us` is, while the queue
    /// stands, part of a backlog that has already had its share: as many admissions as there
    /// are worker threads were decided after it arrived. Then it queued behind them and its
    /// turn has passed; admitting it too would put its service time behind theirs.
    ///
    /// Only with `overload.one_per_backlog` (its doc has the measurements). Why: the target
    /// alone admits every request of a backlog that waited less than `target_delay`. A
    /// handler that computes on the worker holds every other request of its backlog for its
    /// whole service time, so a run of them admitted together makes the next backlog wait
    /// longer. With the rule each backlog of one worker gets one admission, so the worker
    /// always has work and nothing waits behind more than one service time. A service that
    /// awaits reads its requests as they come, so they seldom share a backlog with an
    /// admission.
    ///
    /// Such a request counts as late in its window's verdict on whether the queue still
    /// stands: it is backlog, whatever its own wait. Counted as on time, the backlog this
    /// rule drains made the next window look healthy, the queue stopped standing, and the
    /// window after it admitted a whole backlog again (measured: admitted p99 83.5 ms).
    fn overtaken(&self, socket_us: u64) -> bool {
        let overtaken = !self.admitted_at.is_empty()
            && self.standing.load(Ordering::Relaxed)
            && self
                .admitted_at
                .iter()
                .all(|t| t.load(Ordering::Relaxed) > socket_us);
        if overtaken {
            self.late.fetch_add(1, Ordering::Relaxed);
        }
        overtaken
    }

    /// A request seen at `now_us` was admitted: remembered while the queue stands (the only
    /// time [`Codel::overtaken`] asks), so a healthy service pays for the check alone.
    fn admitted(&self, now_us: u64) {
        if !self.admitted_at.is_empty() && self.standing.load(Ordering::Relaxed) {
            let i = self.next_admitted.fetch_add(1, Ordering::Relaxed) % self.admitted_at.len();
            self.admitted_at[i].store(now_us, Ordering::Relaxed);
        }
    }
}

/// What became of the requests that waited for a slot, per `interval`: handed one, or timed
/// out. An interval in which more waiters timed out than were served means the queue is not
/// smoothing a burst but holding the excess of a sustained overload — every extra
/// millisecond there only delays a refusal. While that is so (it is judged again every
/// interval), a waiter waits [`STALLED_QUEUE_WAIT`] instead of `queue_timeout`, so refusals
/// come in about a millisecond rather than five. A healthy service's waiters are all served,
/// so it never enters this state: it needs at least one timeout, that is, a shed.
#[derive(Debug)]
struct QueueOutcomes {
    window: Window,
    handed: AtomicU64,
    timed_out: AtomicU64,
    stalled: AtomicBool,
}

impl QueueOutcomes {
    fn new(interval: Duration) -> QueueOutcomes {
        QueueOutcomes {
            window: Window::new(micros(interval)),
            handed: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
        }
    }

    /// A waiter ended at `now_us`, `handed` a slot or not.
    fn record(&self, handed: bool, now_us: u64) {
        if let Some(recent) = self.window.roll(now_us) {
            // Judge the interval that ended — if it was the last one (after a quiet gap
            // nothing is known about the queue, and it is not stalled).
            let served = self.handed.swap(u64::from(handed), Ordering::AcqRel);
            let late = self.timed_out.swap(u64::from(!handed), Ordering::AcqRel);
            self.stalled
                .store(recent && late > served, Ordering::Release);
            return;
        }
        if handed {
            self.handed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.timed_out.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }
}

/// The state that changes under a lock: the limit's arithmetic, and the CPU's cool-off.
struct Algo {
    limit: ConcurrencyLimit,
    /// Microseconds since the epoch until which the CPU counts as hot.
    cpu_hot_until: Option<u64>,
}

struct Waiter {
    critical: bool,
    tx: oneshot::Sender<()>,
}

/// The server's limiter. Cheap to clone.
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: OverloadConfig,
    epoch: Instant,
    in_flight: AtomicUsize,
    /// ⌊limit⌋ and ⌊limit × (1 + critical_headroom)⌋, published by the limit's arithmetic.
    cap: AtomicUsize,
    cap_critical: AtomicUsize,
    /// This interval's answers, and the expected service time.
    answers: Answers,
    /// Entries in `queue` (including ones whose waiter has given up): a release looks at the
    /// queue's lock only when this is non-zero.
    waiting: AtomicUsize,
    /// Back = newest (LIFO).
    queue: Mutex<VecDeque<Waiter>>,
    algo: Mutex<Algo>,
    codel: Codel,
    outcomes: QueueOutcomes,
    shed: [AtomicU64; 5],
    admitted: AtomicU64,
    over_limit: AtomicU64,
    max_wait_us: AtomicU64,
    /// CPU usage × 10⁴, written by the sampler.
    cpu: AtomicU64,
    cpu_hot: AtomicBool,
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
    /// When the request was admitted, microseconds since the limiter's epoch; once its
    /// service time has been reported, when it answered, marked with [`ANSWERED`] (a field
    /// of its own would make the permit, and every response that carries it, a word bigger).
    started_us: u64,
}

/// The mark on [`Permit::started_us`] of a permit whose answer has been counted; the rest of
/// the word is the answer's time (microseconds since the epoch never reach bit 63).
const ANSWERED: u64 = 1 << 63;

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit").finish_non_exhaustive()
    }
}

impl Permit {
    /// The handler answered: its service time (admission to response head) updates the limit.
    pub fn answered(&mut self) {
        self.answered_waiting(Duration::ZERO);
    }

    /// The handler answered after spending `upstream` of its time waiting on upstreams: the
    /// rest is the service's own time, which updates the limit.
    pub fn answered_waiting(&mut self, upstream: Duration) {
        if self.started_us & ANSWERED != 0 {
            return;
        }
        let inner = &*self.limiter.inner;
        let now_us = inner.now_us(Instant::now()) & !ANSWERED;
        let started_us = std::mem::replace(&mut self.started_us, ANSWERED | now_us);
        let own_us = now_us
            .saturating_sub(started_us)
            .saturating_sub(micros(upstream));
        let (in_flight, cap) = (inner.in_flight.load(Ordering::Relaxed), inner.cap(false));
        let busy = half_in_use(in_flight, cap);
        if let Some(summary) =
            inner
                .answers
                .answer(own_us, micros(upstream), now_us, busy, in_flight > cap)
        {
            let mut algo = self.limiter.algo();
            algo.limit.judge(&summary);
            let limit = algo.limit.limit();
            drop(algo);
            inner.publish(limit);
        }
    }

    /// When the answer was counted (the clock read [`Permit::answered_waiting`] took, to the
    /// microsecond), if it was: the layers above reuse it instead of reading the clock again.
    pub fn answered_at(&self) -> Option<Instant> {
        (self.started_us & ANSWERED != 0)
            .then(|| self.limiter.inner.epoch + Duration::from_micros(self.started_us & !ANSWERED))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.release();
    }
}

impl Inner {
    fn publish(&self, limit: f64) {
        let cap = limit.floor().max(1.0) as usize;
        let critical = (limit * (1.0 + self.cfg.critical_headroom))
            .floor()
            .max(1.0) as usize;
        self.cap.store(cap, Ordering::Relaxed);
        self.cap_critical.store(critical, Ordering::Relaxed);
    }

    /// `at` in microseconds since the epoch.
    fn now_us(&self, at: Instant) -> u64 {
        micros(at.saturating_duration_since(self.epoch))
    }

    fn cap(&self, critical: bool) -> usize {
        if critical {
            self.cap_critical.load(Ordering::Relaxed)
        } else {
            self.cap.load(Ordering::Relaxed)
        }
    }

    /// Take a slot if one is free under `cap`.
    fn try_take(&self, cap: usize) -> bool {
        let mut cur = self.in_flight.load(Ordering::SeqCst);
        while cur < cap {
            match self.in_flight.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
        false
    }
}

impl Limiter {
    /// A limiter with `cfg` (its `enabled` flag is the caller's business).
    pub fn new(cfg: &OverloadConfig) -> Limiter {
        let algo = ConcurrencyLimit::new(cfg);
        let limit = algo.limit();
        let inner = Inner {
            cfg: cfg.clone(),
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            cap: AtomicUsize::new(0),
            cap_critical: AtomicUsize::new(0),
            answers: Answers::new(cfg.interval.get()),
            waiting: AtomicUsize::new(0),
            queue: Mutex::new(VecDeque::new()),
            algo: Mutex::new(Algo {
                limit: algo,
                cpu_hot_until: None,
            }),
            // Outside a runtime (a test's plain thread) the machine's parallelism stands in.
            codel: Codel::new(
                cfg,
                tokio::runtime::Handle::try_current().map_or_else(
                    |_| std::thread::available_parallelism().map_or(1, |n| n.get()),
                    |h| h.metrics().num_workers(),
                ),
            ),
            outcomes: QueueOutcomes::new(cfg.interval.get()),
            shed: Default::default(),
            admitted: AtomicU64::new(0),
            over_limit: AtomicU64::new(0),
            max_wait_us: AtomicU64::new(0),
            cpu: AtomicU64::new(0),
            cpu_hot: AtomicBool::new(false),
        };
        // No service time is known yet: deadline admission waits for the first answer.
        inner.publish(limit);
        Limiter {
            inner: Arc::new(inner),
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
        self.admit_since(remaining, critical, Instant::now(), None)
    }

    /// [`Limiter::admit`] for a request that Keel read at `arrived` (the server's admission
    /// layer passes the time its context was made, so no clock is read here) after it had
    /// waited `queued` since its bytes reached the socket, when the kernel said so. An
    /// admitted request's service time counts from `arrived`.
    pub fn admit_since(
        &self,
        remaining: Duration,
        critical: bool,
        arrived: Instant,
        queued: Option<Duration>,
    ) -> Admission {
        let inner = &*self.inner;
        let expected = inner.answers.expected_us.load(Ordering::Relaxed);
        if expected != 0 && micros(remaining) < expected {
            return Admission::Shed(self.shed(Shed::Deadline));
        }
        // One conversion of the arrival time serves the queue detector and the permit.
        let arrived_us = inner.now_us(arrived);
        if let Some(queued) = queued {
            let queued_us = micros(queued);
            let late = inner.codel.observe(arrived_us, queued_us);
            if !critical && (late || inner.codel.overtaken(arrived_us.saturating_sub(queued_us))) {
                let why = if inner.cpu_hot.load(Ordering::Relaxed) {
                    Shed::Cpu
                } else {
                    Shed::QueueDelay
                };
                return Admission::Shed(self.shed(why));
            }
        }
        let cap = inner.cap(critical);
        if inner.try_take(cap) {
            if queued.is_some() {
                inner.codel.admitted(arrived_us);
            }
            return Admission::Now(self.permit(arrived_us));
        }
        let rx = {
            let mut q = self.queue();
            if q.len() >= inner.cfg.max_queue {
                drop(q);
                return Admission::Shed(self.shed(Shed::QueueFull));
            }
            let (tx, rx) = oneshot::channel();
            q.push_back(Waiter { critical, tx });
            inner.waiting.fetch_add(1, Ordering::SeqCst);
            // A release that decremented the count before it saw this waiter would hand it
            // nothing: look again now that the waiter is published.
            if inner.try_take(cap) {
                q.pop_back();
                inner.waiting.fetch_sub(1, Ordering::SeqCst);
                drop(q);
                return Admission::Now(self.permit(arrived_us));
            }
            rx
        };
        // Waiting longer than a couple of service times means the queue is not draining: the
        // request would only add its wait to its latency. Until a service time is known, the
        // configured bound applies. The floor is a few scheduler time slices: a process that
        // shares its core is descheduled for milliseconds at a time, and a burst that piles up
        // meanwhile is not an overload.
        let wait = if inner.outcomes.stalled() {
            STALLED_QUEUE_WAIT.min(inner.cfg.queue_timeout.get())
        } else {
            match expected {
                0 => inner.cfg.queue_timeout.get(),
                e => (Duration::from_micros(e) * 2)
                    .max(MIN_QUEUE_WAIT)
                    .min(inner.cfg.queue_timeout.get()),
            }
        }
        .min(remaining / 4);
        let limiter = self.clone();
        Admission::Wait(Box::pin(async move {
            let queued = Instant::now();
            let mut rx = rx;
            let handed = match tokio::time::timeout(wait, &mut rx).await {
                Ok(r) => r.is_ok(),
                Err(_) => {
                    // Timed out — unless a release handed the slot over in the meantime:
                    // closing first makes any later hand-over fail, and what arrived before
                    // is taken, so a slot is never lost.
                    rx.close();
                    rx.try_recv().is_ok()
                }
            };
            let now = Instant::now();
            let inner = &*limiter.inner;
            inner.outcomes.record(handed, inner.now_us(now));
            if !handed {
                return Err(limiter.shed(Shed::QueueTimeout));
            }
            let waited = micros(now.saturating_duration_since(queued));
            limiter
                .inner
                .max_wait_us
                .fetch_max(waited, Ordering::Relaxed);
            // The slot was handed over by `release` (in-flight already counts it).
            Ok(limiter.permit(inner.now_us(now)))
        }))
    }

    /// A permit for an admitted request.
    fn permit(&self, started_us: u64) -> Permit {
        let inner = &*self.inner;
        inner.admitted.fetch_add(1, Ordering::Relaxed);
        if inner.in_flight.load(Ordering::Relaxed) > inner.cap(true) {
            inner.over_limit.fetch_add(1, Ordering::Relaxed);
        }
        Permit {
            limiter: self.clone(),
            started_us,
        }
    }

    /// A slot frees: hand it to a waiting critical request, else to the newest waiter, if
    /// the limit still allows; otherwise it is released.
    fn release(&self) {
        let inner = &*self.inner;
        inner.in_flight.fetch_sub(1, Ordering::SeqCst);
        if inner.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut q = self.queue();
        loop {
            let pos = q
                .iter()
                .rposition(|w| w.critical)
                .or_else(|| q.len().checked_sub(1));
            let Some(pos) = pos else { return };
            let critical = q.get(pos).is_some_and(|w| w.critical);
            // Over the (possibly shrunken) limit, or the slot already taken by a newcomer:
            // nothing to hand on.
            if !inner.try_take(inner.cap(critical)) {
                return;
            }
            let Some(w) = q.remove(pos) else {
                inner.in_flight.fetch_sub(1, Ordering::SeqCst);
                return;
            };
            inner.waiting.fetch_sub(1, Ordering::SeqCst);
            if w.tx.send(()).is_ok() {
                return;
            }
            // That waiter gave up already: give the slot back and try the next.
            inner.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn shed(&self, why: Shed) -> Shed {
        self.inner.shed[why.index()].fetch_add(1, Ordering::Relaxed);
        why
    }

    /// Record the process's CPU usage (0–1), from the sampler: over the threshold, the CPU
    /// is hot for the cool-off that follows.
    pub fn set_cpu(&self, usage: f64) {
        let inner = &*self.inner;
        let v = (usage.clamp(0.0, 1.0) * 1e4) as u64;
        inner.cpu.store(v, Ordering::Relaxed);
        let now = micros(Instant::now().saturating_duration_since(inner.epoch));
        let mut algo = self.algo();
        if usage > inner.cfg.cpu_threshold {
            algo.cpu_hot_until = Some(now.saturating_add(micros(inner.cfg.cpu_cooloff.get())));
        }
        let hot = algo.cpu_hot_until.is_some_and(|until| now < until);
        inner.cpu_hot.store(hot, Ordering::Relaxed);
    }

    /// Current state and counters.
    pub fn stats(&self) -> OverloadStats {
        let inner = &*self.inner;
        let (limit, baseline) = {
            let a = self.algo();
            (a.limit.limit(), a.limit.baseline())
        };
        let expected = inner.answers.expected();
        let queued = self.queue().iter().filter(|w| !w.tx.is_closed()).count();
        OverloadStats {
            limit,
            in_flight: inner.in_flight.load(Ordering::Relaxed),
            queued,
            expected: expected.unwrap_or_default(),
            baseline: baseline.unwrap_or_default(),
            shed: Shed::ALL.map(|s| inner.shed[s.index()].load(Ordering::Relaxed)),
            admitted: inner.admitted.load(Ordering::Relaxed),
            max_queue_wait: Duration::from_micros(inner.max_wait_us.load(Ordering::Relaxed)),
            over_limit: inner.over_limit.load(Ordering::Relaxed),
            cpu: inner.cpu.load(Ordering::Relaxed) as f64 / 1e4,
            cpu_hot: inner.cpu_hot.load(Ordering::Relaxed),
            queue_delay: Duration::from_micros(inner.codel.last_us.load(Ordering::Relaxed)),
            min_queue_delay: Duration::from_micros(inner.codel.last_min_us.load(Ordering::Relaxed)),
            standing_queue: inner.codel.standing.load(Ordering::Relaxed),
            queue_stalled: inner.outcomes.stalled(),
        }
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<Waiter>> {
        self.inner.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn algo(&self) -> MutexGuard<'_, Algo> {
        self.inner.algo.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether `in_flight` requests use half the limit, by its floor `cap` as published (what
/// makes an interval "busy": light load says nothing about capacity).
fn half_in_use(in_flight: usize, cap: usize) -> bool {
    in_flight * 2 >= cap
}

/// Microseconds, saturating.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Samples this process's CPU usage every `period` into `limiter`. Usage is CPU time over
/// wall time over the cores available to the process.
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

    /// A limiter of one slot that stays one (`cfg` otherwise as given).
    fn one_slot(cfg: OverloadConfig) -> Limiter {
        Limiter::new(&OverloadConfig {
            initial_limit: 1,
            min_limit: 1,
            max_limit: 1,
            ..cfg
        })
    }

    #[test]
    fn a_zero_interval_of_either_kind_is_refused_by_name() {
        let mut v = Validator::default();
        v.nested("overload", &OverloadConfig::default());
        assert!(v.is_empty(), "{v:?}");
        for (key, cfg) in [
            (
                "overload.queue_interval",
                OverloadConfig {
                    queue_interval: keel_config::Duration::from_millis(0),
                    ..OverloadConfig::default()
                },
            ),
            (
                "overload.interval",
                OverloadConfig {
                    interval: keel_config::Duration::from_millis(0),
                    ..OverloadConfig::default()
                },
            ),
        ] {
            let mut v = Validator::default();
            v.nested("overload", &cfg);
            let said = format!("{v:?}");
            assert!(
                said.contains(key) && said.contains("greater than 0"),
                "{said}"
            );
        }
    }

    fn cfg() -> OverloadConfig {
        OverloadConfig {
            initial_limit: 50,
            min_limit: 5,
            max_limit: 200,
            ..OverloadConfig::default()
        }
    }

    /// The limit's whole rule on one thread, as the limiter runs it: answers counted by
    /// [`Answers`], each interval they close judged by [`ConcurrencyLimit`].
    struct Sim {
        limit: ConcurrencyLimit,
        answers: Answers,
        epoch: Instant,
    }

    impl Sim {
        fn new(cfg: &OverloadConfig) -> Sim {
            Sim {
                limit: ConcurrencyLimit::new(cfg),
                answers: Answers::new(cfg.interval.get()),
                epoch: Instant::now(),
            }
        }

        /// One answer of `own` at `now`, with `in_flight` requests holding slots.
        fn update(&mut self, own: Duration, now: Instant, in_flight: usize) {
            let now_us = micros(now.saturating_duration_since(self.epoch));
            let cap = self.limit.limit().floor().max(1.0) as usize;
            let busy = half_in_use(in_flight, cap);
            if let Some(summary) =
                self.answers
                    .answer(micros(own), 0, now_us, busy, in_flight > cap)
            {
                self.limit.judge(&summary);
            }
        }

        fn limit(&self) -> f64 {
            self.limit.limit()
        }

        fn baseline(&self) -> Option<Duration> {
            self.limit.baseline()
        }
    }

    /// Feed `n` answers of `rtt`, 10 ms apart, with the limit fully in use.
    fn feed(g: &mut Sim, t: &mut Instant, n: usize, rtt: Duration) {
        for _ in 0..n {
            *t += Duration::from_millis(10);
            let busy = g.limit().ceil() as usize;
            g.update(rtt, *t, busy);
        }
    }

    /// A second of light load (four in flight, no queue) at `base`: the healthy baseline and
    /// mean.
    fn light_load(g: &mut Sim, t: &mut Instant, base: Duration) {
        for _ in 0..400 {
            *t += Duration::from_micros(2500);
            g.update(base, *t, 4);
        }
    }

    /// `steps` of a handler serving `slots` at a time, `base` each, offered far more than it
    /// can do: the limit is always in use, and an answer's own time is `base` stretched by
    /// the requests queued behind the slots (a fluid model of a FIFO semaphore). Each step
    /// lasts `base`; `each` sees the limit and that step's own time.
    fn saturated_pool(
        g: &mut Sim,
        t: &mut Instant,
        steps: u32,
        slots: f64,
        base: Duration,
        mut each: impl FnMut(f64, Duration),
    ) {
        for _ in 0..steps {
            let n = g.limit().floor().max(1.0);
            let own = base.mul_f64((n / slots).max(1.0));
            let k = n.min(slots) as u32;
            for i in 0..k {
                g.update(own, *t + base / k * i, n as usize);
            }
            *t += base;
            each(g.limit(), own);
        }
    }

    #[test]
    fn the_limit_grows_while_answers_do_not_queue_falls_when_a_queue_forms_and_recovers() {
        let ms = Duration::from_millis;
        let mut g = Sim::new(&cfg());
        let mut t = Instant::now();
        light_load(&mut g, &mut t, ms(10));
        saturated_pool(&mut g, &mut t, 300, 1000.0, ms(10), |_, _| {});
        assert_eq!(
            g.limit(),
            200.0,
            "probes up to the cap while nothing queues"
        );

        // The pool shrinks to eight (its other connections lost): requests queue inside the
        // service. The limit falls, and stays down for as long as that lasts (30 s).
        let mut highest = 0.0f64;
        let mut step = 0;
        saturated_pool(&mut g, &mut t, 3000, 8.0, ms(10), |limit, _| {
            step += 1;
            if step > 100 {
                highest = highest.max(limit);
            }
        });
        assert!(
            highest < 13.0,
            "held near the pool after the first second: {highest}"
        );

        // The pool is whole again: the limit recovers quickly, as nothing queues.
        saturated_pool(&mut g, &mut t, 300, 1000.0, ms(10), |_, _| {});
        assert!(g.limit() > 150.0, "{} after 3 s", g.limit());
    }

    #[test]
    fn a_service_whose_work_got_slower_keeps_its_capacity_in_use() {
        // A pool of eight whose answers go from 10 to 100 ms (a dependency Keel's client does
        // not see): the first cut removes no queue, so the slower time becomes the baseline
        // and the limit keeps all eight slots busy — cutting on would serve half of them.
        let ms = Duration::from_millis;
        let mut g = Sim::new(&cfg());
        let mut t = Instant::now();
        light_load(&mut g, &mut t, ms(10));
        saturated_pool(&mut g, &mut t, 300, 8.0, ms(10), |_, _| {});
        let mut lowest_late = f64::MAX;
        let mut worst_own = Duration::ZERO;
        let mut step = 0;
        saturated_pool(&mut g, &mut t, 300, 8.0, ms(100), |limit, own| {
            step += 1;
            if step > 20 {
                lowest_late = lowest_late.min(limit);
                worst_own = worst_own.max(own);
            }
        });
        assert!(lowest_late >= 8.0, "idled the pool: {lowest_late}");
        assert!(worst_own <= ms(150), "and still held it: {worst_own:?}");
    }

    #[test]
    fn a_slower_latency_that_persists_becomes_the_new_normal() {
        let mut g = Sim::new(&cfg());
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

    /// An interval whose answers all took `least` (none waiting on upstreams).
    fn iv(least: Duration, per_sec: f64, busy: bool) -> IntervalSummary {
        IntervalSummary {
            least,
            mean: least,
            upstream: Duration::ZERO,
            per_sec,
            busy,
            drained: true,
        }
    }

    #[test]
    fn an_overloaded_interval_cuts_the_limit_to_what_its_answers_need() {
        let ms = Duration::from_millis;
        let mut l = ConcurrencyLimit::new(&cfg());
        l.judge(&iv(ms(10), 800.0, false));
        assert_eq!(l.limit(), 50.0, "light load moves nothing");
        // A pool of eight at 10 ms answers 800 a second; every answer waited behind others.
        l.judge(&iv(ms(60), 800.0, true));
        // 800/s × 12.5 ms (halfway to the 15 ms threshold) = 10 at once, where halving would
        // have left 25.
        assert!((l.limit() - 10.0).abs() < 1e-9, "{}", l.limit());
        // The cut is never deeper than the floor, nor shallower than the proportional one.
        let mut l = ConcurrencyLimit::new(&cfg());
        l.judge(&iv(ms(10), 100.0, false));
        l.judge(&iv(ms(60), 100.0, true));
        assert_eq!(l.limit(), 5.0, "down to the floor");
        let mut l = ConcurrencyLimit::new(&cfg());
        l.judge(&iv(ms(10), 100_000.0, false));
        l.judge(&iv(ms(60), 100_000.0, true));
        assert_eq!(l.limit(), 25.0, "halved");
    }

    #[test]
    fn a_saturated_pool_holds_its_limit_where_answers_queue_a_little_and_never_overshoots() {
        let ms = Duration::from_millis;
        let mut g = Sim::new(&cfg());
        let mut t = Instant::now();
        light_load(&mut g, &mut t, ms(10));
        saturated_pool(&mut g, &mut t, 1000, 8.0, ms(10), |_, _| {});
        let mut worst_own = Duration::ZERO;
        let (mut low, mut high) = (f64::MAX, 0.0f64);
        saturated_pool(&mut g, &mut t, 1000, 8.0, ms(10), |limit, own| {
            worst_own = worst_own.max(own);
            low = low.min(limit);
            high = high.max(limit);
        });
        // Over the last 10 s: never past the 15 ms threshold (each crossing is an interval in
        // which every admitted request queued a full half service time), and at least the
        // pool itself in flight (less would idle its slots).
        assert!(worst_own <= ms(15), "{worst_own:?}");
        assert!(low >= 8.0 && high < 13.0, "limit between {low} and {high}");
    }

    #[test]
    fn a_proxys_cut_keeps_the_slots_its_upstream_waits_hold() {
        let ms = Duration::from_millis;
        let mut l = ConcurrencyLimit::new(&OverloadConfig {
            initial_limit: 200,
            ..cfg()
        });
        l.judge(&iv(Duration::from_micros(50), 1000.0, false));
        // 12,000 answers a second, each 10 ms on its upstream: 120 in flight are upstream
        // waits. The proxy's own time went from 50 µs to at least 6 ms (its core is busy), so
        // the limit is cut — but not below what the waits on its upstream hold.
        l.judge(&IntervalSummary {
            least: ms(6),
            mean: ms(7),
            upstream: ms(10),
            per_sec: 12_000.0,
            busy: true,
            drained: true,
        });
        // 12,000/s × (2.55 ms + 10 ms) = 150.6; without the upstream's share it would be 30.6.
        assert!((l.limit() - 150.6).abs() < 1e-6, "{}", l.limit());
    }

    #[test]
    fn a_mean_past_its_light_load_mean_holds_the_limit_and_a_varied_service_still_grows() {
        let ms = Duration::from_millis;
        let interval = |least, mean, busy| IntervalSummary {
            least,
            mean,
            upstream: Duration::ZERO,
            per_sec: 800.0,
            busy,
            drained: true,
        };
        // A service whose answers vary from 1 to 30 ms: its mean is always far above its
        // least, and that is no queue — under load it still grows.
        let mut l = ConcurrencyLimit::new(&cfg());
        for _ in 0..20 {
            l.judge(&interval(ms(1), ms(15), false));
        }
        l.judge(&interval(ms(1), ms(16), true));
        assert!(l.limit() > 50.0, "{}", l.limit());
        // Even a mean half as long again (a busy core) is no gross queue.
        let grown = l.limit();
        l.judge(&interval(ms(1), ms(24), true));
        assert!(l.limit() >= grown, "{} after {grown}", l.limit());

        // A pool at 10 ms whose least is one lucky answer that found a free slot while the
        // rest queued: the mean, 14 ms against 10 under light load, holds the limit.
        let mut l = ConcurrencyLimit::new(&cfg());
        for _ in 0..20 {
            l.judge(&interval(ms(10), ms(10), false));
        }
        for _ in 0..10 {
            l.judge(&interval(ms(10), ms(14), true));
        }
        assert_eq!(l.limit(), 50.0, "held");
        l.judge(&interval(ms(10), ms(11), true));
        assert!(
            l.limit() > 50.0,
            "grows again once answers stop queueing: {}",
            l.limit()
        );

        // The onset of an overload: the first answers of the interval came from an empty
        // pool, the rest waited behind all that was admitted. The least is fine; the mean,
        // 50 ms against 10, is a gross queue, and the limit is cut at once to what 800
        // answers a second need (800 × 12.5 ms = 10).
        l.judge(&interval(ms(10), ms(50), true));
        assert!((l.limit() - 10.0).abs() < 1e-9, "{}", l.limit());
    }

    #[test]
    fn light_load_does_not_move_the_limit() {
        let mut g = Sim::new(&cfg());
        let t = Instant::now();
        for i in 0..100 {
            g.update(Duration::from_millis(500), t + Duration::from_millis(i), 1);
        }
        assert_eq!(g.limit(), 50.0);
    }

    #[test]
    fn the_limit_stays_between_its_floor_and_cap() {
        let mut g = Sim::new(&cfg());
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
        assert_eq!(s.shed, [1, 1, 0, 0, 0]);
        assert_eq!(s.over_limit, 0);
        assert!(s.max_queue_wait <= Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn a_permit_knows_when_its_answer_was_counted_and_counts_it_once() {
        let l = one_slot(OverloadConfig::default());
        let mut p = l.acquire(Duration::from_secs(10), false).await.unwrap();
        assert_eq!(p.answered_at(), None);
        tokio::time::advance(Duration::from_millis(7)).await;
        let before = Instant::now();
        p.answered();
        let at = p.answered_at().unwrap();
        // To the microsecond the epoch-relative reading keeps.
        assert!(
            at <= before && before - at < Duration::from_micros(1),
            "{at:?} {before:?}"
        );
        // A second answer changes nothing, not even the time.
        tokio::time::advance(Duration::from_millis(5)).await;
        p.answered();
        assert_eq!(p.answered_at(), Some(at));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_service_waits_out_a_scheduler_stall_before_shedding() {
        let l = one_slot(OverloadConfig::default());
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
    async fn a_queue_whose_waiters_time_out_refuses_within_a_millisecond_until_it_serves_again() {
        let c = OverloadConfig::default();
        let l = one_slot(c.clone());
        let long = Duration::from_secs(10);
        let wait_of = |l: &Limiter| {
            let l = l.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                let r = l.acquire(long, false).await;
                (r.map(drop), start.elapsed())
            })
        };
        // The slot is held: every waiter times out after the usual wait...
        let held = l.acquire(long, false).await.unwrap();
        for _ in 0..3 {
            let w = wait_of(&l);
            tokio::time::advance(Duration::from_millis(6)).await;
            let (r, waited) = w.await.unwrap();
            assert_eq!(r.unwrap_err(), Shed::QueueTimeout);
            assert!(waited >= MIN_QUEUE_WAIT, "{waited:?}");
        }
        assert!(!l.stats().queue_stalled, "judged once its interval is over");
        // ...and once an interval has seen only timeouts, the queue counts as stalled: the
        // next waiters are refused after a millisecond, not five.
        tokio::time::advance(c.interval.get()).await;
        let w = wait_of(&l);
        tokio::time::advance(Duration::from_millis(6)).await;
        let (r, waited) = w.await.unwrap();
        assert_eq!(r.unwrap_err(), Shed::QueueTimeout);
        assert!(l.stats().queue_stalled);
        let w = wait_of(&l);
        tokio::time::advance(Duration::from_millis(2)).await;
        let (r, waited_stalled) = w.await.unwrap();
        assert_eq!(r.unwrap_err(), Shed::QueueTimeout);
        assert!(waited >= MIN_QUEUE_WAIT, "{waited:?}");
        assert!(
            waited_stalled <= Duration::from_millis(2),
            "{waited_stalled:?}"
        );

        // Slots flow again: waiters are served, and after an interval of that the usual
        // wait is back.
        drop(held);
        tokio::time::advance(c.interval.get()).await;
        let mut served = 0;
        for _ in 0..4 {
            let held = l.acquire(long, false).await.unwrap();
            let w = wait_of(&l);
            tokio::task::yield_now().await;
            drop(held);
            let (r, _) = w.await.unwrap();
            served += usize::from(r.is_ok());
        }
        assert_eq!(served, 4);
        tokio::time::advance(c.interval.get()).await;
        let held = l.acquire(long, false).await.unwrap();
        let w = wait_of(&l);
        tokio::task::yield_now().await;
        drop(held);
        assert!(w.await.unwrap().0.is_ok());
        assert!(!l.stats().queue_stalled, "served waiters end the stall");
    }

    #[tokio::test(start_paused = true)]
    async fn too_little_time_left_is_refused_at_admission_and_critical_routes_go_first() {
        let l = one_slot(OverloadConfig {
            critical_routes: vec!["/pay".into()],
            critical_headroom: 0.0,
            ..OverloadConfig::default()
        });
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

    #[test]
    fn a_noisy_but_unloaded_fast_service_never_loses_limit() {
        // A 50 µs service on a shared core: one answer in twenty is descheduled for 3 ms,
        // one in two hundred for 15 ms. Nothing queues; the limit must only grow.
        let mut g = Sim::new(&cfg());
        let mut t = Instant::now();
        let mut lowest = g.limit();
        for i in 0..20_000u64 {
            let rtt = match i {
                i if i % 200 == 7 => Duration::from_millis(15),
                i if i % 20 == 3 => Duration::from_millis(3),
                _ => Duration::from_micros(50),
            };
            feed(&mut g, &mut t, 1, rtt);
            lowest = lowest.min(g.limit());
        }
        assert_eq!(lowest, 50.0, "never below where it started");
        assert_eq!(g.limit(), 200.0);
    }

    #[test]
    fn a_short_slow_spell_holds_the_limit_and_only_a_persistent_one_lowers_it() {
        let mut g = Sim::new(&cfg());
        let mut t = Instant::now();
        feed(&mut g, &mut t, 300, Duration::from_millis(2));
        let steady = g.limit();
        // 80 ms of answers at 40 ms: over the threshold, but for less than an interval.
        feed(&mut g, &mut t, 8, Duration::from_millis(40));
        assert_eq!(g.limit(), steady, "held, not lowered");
        feed(&mut g, &mut t, 30, Duration::from_millis(40));
        assert!(g.limit() < steady * 0.6, "{} vs {steady}", g.limit());
    }

    #[tokio::test(start_paused = true)]
    async fn time_waiting_on_upstreams_is_not_the_services_own() {
        let c = OverloadConfig {
            initial_limit: 4,
            min_limit: 1,
            max_limit: 4,
            ..OverloadConfig::default()
        };
        // A proxy: 1 ms of its own, then its upstream slows from 1 ms to 50 ms.
        let run = |exclude: bool| {
            let l = Limiter::new(&c);
            async move {
                let long = Duration::from_secs(10);
                let mut lowest = f64::MAX;
                for i in 0..400u32 {
                    let upstream = if i < 100 { 1 } else { 50 };
                    // As many as the limit allows, so the limit is in full use.
                    let mut held = Vec::new();
                    for _ in 0..l.stats().limit.floor() as usize {
                        held.push(l.acquire(long, false).await.unwrap());
                    }
                    tokio::time::advance(Duration::from_millis(1 + upstream)).await;
                    for p in &mut held {
                        if exclude {
                            p.answered_waiting(Duration::from_millis(upstream));
                        } else {
                            p.answered();
                        }
                    }
                    lowest = lowest.min(l.stats().limit);
                }
                lowest
            }
        };
        assert_eq!(
            run(true).await,
            4.0,
            "the upstream's time is left out: never cut"
        );
        assert!(run(false).await < 4.0, "counted in, it would have been cut");
    }

    /// Microseconds at `ms` milliseconds.
    fn at(ms: u64) -> u64 {
        ms * 1000
    }

    #[test]
    fn codel_ignores_bursts_and_stalls_that_leave_a_fast_request_in_each_interval() {
        let c = Codel::new(&OverloadConfig::default(), 1);
        // Mostly 200 µs waits; every tenth request caught behind a 20 ms stall.
        for i in 0..10_000u64 {
            let delay = if i % 10 == 0 { 20_000 } else { 200 };
            assert!(!c.observe(at(i), delay), "request {i} shed");
        }
        assert!(!c.standing.load(Ordering::Relaxed));
    }

    #[test]
    fn codel_sheds_a_standing_queue_and_only_its_backlog_and_recovers() {
        let c = Codel::new(&OverloadConfig::default(), 1);
        let mut t = 0;
        let mut shed = 0;
        // Every request waits 20-30 ms for 1 s: the first interval only measures, then the
        // queue stands and the requests over the target are shed.
        for i in 0..1000u64 {
            t += 1;
            if c.observe(at(t), 20_000 + (i % 10) * 1000) {
                shed += 1;
            }
        }
        assert!(shed >= 880, "{shed} of 1000");
        // Standing, a request that waited under the target still runs.
        t += 1;
        assert!(!c.observe(at(t), 1_000));
        // The queue drains: one interval of short waits and shedding stops.
        for _ in 0..200 {
            t += 1;
            c.observe(at(t), 300);
        }
        t += 1;
        assert!(!c.observe(at(t), 30_000), "no longer standing");
        // A gap with no requests says nothing about the next interval.
        let c = Codel::new(&OverloadConfig::default(), 1);
        for i in 0..200 {
            c.observe(at(i), 30_000);
        }
        assert!(!c.observe(at(10_000), 30_000), "stale interval");
    }

    #[test]
    fn a_standing_backlog_gets_one_admission_per_worker_and_a_healthy_one_is_untouched() {
        let on = OverloadConfig {
            one_per_backlog: true,
            ..OverloadConfig::default()
        };
        // Off (the default): a standing queue's backlog is judged by the target alone.
        let c = Codel::new(&OverloadConfig::default(), 1);
        let mut t = 1000;
        while !c.standing.load(Ordering::Relaxed) {
            c.observe(at(t), 20_000);
            t += 1;
        }
        c.admitted(at(t));
        assert!(!c.overtaken(0), "the rule is off");
        // Not standing: however many admissions came after a request arrived, it is not
        // overtaken, and admissions are not even written down.
        let c = Codel::new(&on, 1);
        for t in 0..100 {
            assert!(!c.observe(at(t), 300));
            c.admitted(at(t));
        }
        assert!(!c.overtaken(0));
        assert!(c.admitted_at.iter().all(|t| t.load(Ordering::Relaxed) == 0));
        // A standing queue (every request waited 20 ms for longer than an interval).
        let mut t = 1000;
        while !c.standing.load(Ordering::Relaxed) {
            c.observe(at(t), 20_000);
            t += 1;
        }
        // One worker: a request admitted at `t` (it waited 1 ms, under the target) takes the
        // backlog's turn; another that was already in the socket then has had its turn...
        c.admitted(at(t));
        assert!(c.overtaken(at(t) - 1), "arrived before the admission");
        // ...but one that came after the admission was decided has not.
        assert!(!c.overtaken(at(t) + 1));
        // Two workers: a backlog gets two admissions before it is overtaken.
        let c = Codel::new(&on, 2);
        let mut t = 1000;
        while !c.standing.load(Ordering::Relaxed) {
            c.observe(at(t), 20_000);
            t += 1;
        }
        c.admitted(at(t));
        assert!(!c.overtaken(at(t) - 1), "one admission of two");
        c.admitted(at(t) + 500);
        assert!(c.overtaken(at(t) - 1));
        assert!(!c.overtaken(at(t) + 1), "only one admission came after it");
    }

    #[test]
    fn codel_sees_a_queue_stand_one_interval_after_it_began_and_not_before() {
        let cfg = OverloadConfig::default();
        let q = u64::try_from(cfg.queue_interval.get().as_millis()).unwrap();
        let c = Codel::new(&cfg, 1);
        // Healthy for a while, then from 1000 ms on every request (one per ms) waits 20 ms.
        for t in 0..1000 {
            assert!(!c.observe(at(t), 300));
        }
        let mut first_shed = None;
        for t in 1000..1400 {
            if c.observe(at(t), 20_000) && first_shed.is_none() {
                first_shed = Some(t);
            }
        }
        // Fixed windows judged by their least delay would have waited for the first whole
        // window of late requests to end.
        assert_eq!(
            first_shed,
            Some(1000 + q),
            "standing one interval after the run began"
        );
        // A run that an on-time request breaks just before the interval is up starts over.
        let c = Codel::new(&cfg, 1);
        for t in 0..1000 {
            c.observe(at(t), 300);
        }
        for t in 1000..1000 + q - 1 {
            assert!(!c.observe(at(t), 20_000));
        }
        assert!(!c.observe(at(1000 + q - 1), 300));
        for t in 1000 + q..1000 + 2 * q - 1 {
            assert!(!c.observe(at(t), 20_000), "shed at {t} ms");
        }
        // Late requests too few to be a queue: seven over 140 ms (stalls of a sparse service)
        // shed nothing; the eighth makes a run long enough to judge.
        let c = Codel::new(&cfg, 1);
        for t in 0..1000 {
            c.observe(at(t), 300);
        }
        for i in 0..7u64 {
            assert!(!c.observe(at(1000 + i * 20), 20_000), "shed the {i}th");
        }
        assert!(c.observe(at(1140), 20_000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_standing_queue_is_shed_as_cpu_while_the_cpu_is_hot_and_hot_cpu_alone_sheds_nothing()
    {
        let l = Limiter::new(&OverloadConfig::default());
        let long = Duration::from_secs(10);
        let admit = |delay_ms: u64| {
            l.admit_since(
                long,
                false,
                Instant::now(),
                Some(Duration::from_millis(delay_ms)),
            )
        };
        // At 100 % CPU with 1 ms waits: busy, not overloaded.
        l.set_cpu(1.0);
        for _ in 0..300 {
            tokio::time::advance(Duration::from_millis(1)).await;
            assert!(matches!(admit(1), Admission::Now(_)));
        }
        // A standing 40 ms queue while hot: shed as `cpu`.
        let mut reasons = Vec::new();
        for _ in 0..300 {
            tokio::time::advance(Duration::from_millis(1)).await;
            if let Admission::Shed(why) = admit(40) {
                reasons.push(why);
            }
        }
        assert!(reasons.len() > 150, "{}", reasons.len());
        assert!(reasons.iter().all(|r| *r == Shed::Cpu));
        // The CPU cools (a sample under the threshold does not end the cool-off at once).
        l.set_cpu(0.3);
        assert!(l.stats().cpu_hot, "still within the cool-off");
        tokio::time::advance(Duration::from_secs(1)).await;
        l.set_cpu(0.3);
        assert!(!l.stats().cpu_hot);
        // After that second without requests the queue must be seen standing afresh (one
        // interval); then its backlog is shed as queueing delay.
        let mut delay_sheds = 0;
        for _ in 0..300 {
            tokio::time::advance(Duration::from_millis(1)).await;
            if let Admission::Shed(why) = admit(40) {
                assert_eq!(why, Shed::QueueDelay);
                delay_sheds += 1;
            }
        }
        assert!(delay_sheds > 150, "{delay_sheds}");
        // Critical routes are never shed for queueing delay.
        assert!(matches!(
            l.admit_since(long, true, Instant::now(), Some(Duration::from_millis(40))),
            Admission::Now(_)
        ));
        let s = l.stats();
        assert_eq!(s.shed[Shed::Cpu.index()], reasons.len() as u64);
        assert_eq!(s.shed[Shed::QueueDelay.index()], delay_sheds);
        assert!(s.standing_queue);
        assert!(s.min_queue_delay >= Duration::from_millis(40));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slots_are_never_lost_or_overdrawn_under_racing_admissions_and_releases() {
        let c = OverloadConfig {
            initial_limit: 3,
            min_limit: 3,
            max_limit: 3,
            max_queue: 1000,
            queue_timeout: keel_config::Duration::from_secs(5),
            ..OverloadConfig::default()
        };
        let l = Limiter::new(&c);
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let l = l.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..500 {
                    let p = l.acquire(Duration::from_secs(60), false).await.unwrap();
                    assert!(l.stats().in_flight <= 3);
                    tokio::task::yield_now().await;
                    drop(p);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let s = l.stats();
        assert_eq!(s.in_flight, 0, "every slot came back");
        assert_eq!(s.admitted, 4000);
        assert_eq!(s.over_limit, 0);
        assert_eq!(s.shed, [0; 5]);
    }
}
