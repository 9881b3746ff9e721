//! Retry policy: which failures are safe to retry, how long to wait before retrying, and a
//! retry budget so retries cannot multiply an outage.
//!
//! Sources:
//! - classification follows the safety rule: retry what the upstream certainly did not
//!   process, and anything else only on routes declared idempotent;
//! - backoff is "full jitter" from the AWS Architecture Blog, *Exponential Backoff And Jitter*
//!   (Marc Brooker, 2015): sleep a uniform time in `[0, min(cap, base·2^n))`. Of the schemes
//!   compared there it spreads competing clients best for the least total work;
//! - the budget is Finagle's `RetryBudget`, as also used by Linkerd: retries may add at most a
//!   fixed share of the recent original traffic, plus a small floor, over a sliding window.
//!   The defaults (20 %, 10 s, 10/s) are the ones both projects ship.
//!
//! Why a budget and not just `max_attempts`: attempts-per-request bound one request, not the
//! fleet. When an upstream fails everything, 3 attempts triple its load exactly when it can
//! least take it. A budget caps the *extra* load at ~20 % however many requests fail, and the
//! chain stop (`keel_core::Context::is_retry`, passed to [`retryable`]) keeps hops from each
//! retrying the same request (3 hops × 3 attempts would be 27 calls at the bottom).
//!
//! The transport applies the pieces in this order, so that a budget token is only spent on a
//! retry that will actually be sent:
//!
//! 1. every original request: [`RetryBudget::deposit`];
//! 2. on failure: [`retryable`] → [`next_delay`] (attempts left and time before the deadline)
//!    → [`RetryBudget::try_withdraw`] → sleep → resend, marked as a retry for the next hop.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::window::{Window, unit_draw};

#[cfg(test)]
mod tests;

/// The gRPC status code `UNAVAILABLE`.
const GRPC_UNAVAILABLE: i32 = 14;

/// Index of the "original requests" counter in the budget's window.
const DEPOSITS: usize = 0;
/// Index of the "retries sent" counter in the budget's window.
const WITHDRAWALS: usize = 1;
/// Budget arithmetic is in millionths of a token, so a ratio like 0.2 or 0.29 adds up exactly
/// (summing `f64` fractions would let 100 × 0.29 come out as 28.999… and lose a retry).
const MICRO_TOKENS: u128 = 1_000_000;

/// Why an attempt failed, as the client sees it. The transport classifies; [`retryable`]
/// decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The TCP connect failed (refused, unreachable, timed out): nothing was sent.
    ConnectRefused,
    /// The connection was reset or closed before any byte of the request was written (e.g. a
    /// pooled socket the server had just closed): nothing reached the server.
    ResetBeforeWrite,
    /// The connection was reset after (part of) the request was written: the server may have
    /// acted on it.
    ResetAfterWrite,
    /// The per-try timeout fired: the server may still be processing the request.
    Timeout,
    /// `503 Service Unavailable` before the server read the request body: the request was
    /// refused (overload, draining, a proxy with no healthy backend), not processed.
    Status503NoBody,
    /// Any other 5xx response, including a 503 after the body was consumed.
    Status5xx(u16),
    /// gRPC `UNAVAILABLE` (14).
    GrpcUnavailable,
    /// Any other non-OK gRPC status code.
    GrpcOther(i32),
    /// Anything else (TLS, protocol, local errors): not known to be safe.
    Other,
}

/// Backoff between attempts of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct BackoffConfig {
    /// The first retry waits up to this long; each further retry doubles the range. 25 ms: a
    /// few intra-datacenter round trips, enough for a balancer to pick another endpoint and for
    /// a momentary blip to pass, while the expected first wait (12.5 ms with full jitter) stays
    /// small next to typical request deadlines.
    pub base: Duration,
    /// Cap on the backoff range. 1 s: beyond that the caller's deadline (usually a few seconds)
    /// is mostly spent waiting, and a longer pause no longer helps an upstream that the budget
    /// and breaker already protect.
    pub max: Duration,
    /// Total attempts per request, including the first. 3: two retries ride out a reset pooled
    /// connection plus one bad endpoint; more mostly adds latency, since the budget, not this
    /// number, limits the load retries add in an outage.
    pub max_attempts: u32,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(25),
            max: Duration::from_secs(1),
            max_attempts: 3,
        }
    }
}

/// The retry budget's tuning.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetConfig {
    /// Retry tokens earned per original request. 0.2 (Finagle's and Linkerd's default): in a
    /// total outage retries add at most 20 % load, while a healthy service's rare failures
    /// (well under 20 %) are all retried.
    pub ratio: f64,
    /// How long deposits and withdrawals are remembered. 10 s (Finagle's TTL): long enough to
    /// smooth bursts, short enough that a recovered upstream gets its retries back quickly.
    pub window: Duration,
    /// A floor of retries per second always available on top of the earned tokens, so a
    /// quiet client (a few requests a minute earn almost nothing) can still retry a transient
    /// failure. 10 per second (Finagle's default) is negligible load for any upstream.
    pub min_per_sec: u32,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            window: Duration::from_secs(10),
            min_per_sec: 10,
        }
    }
}

/// A Finagle-style retry budget, one per upstream.
///
/// Invariant: over any window, retries ≤ `ratio × original requests + min_per_sec × window`.
/// Deposits and withdrawals both live in the same bucketed sliding window, so once an outage
/// leaves the window, both its requests and its retries are forgotten and the budget is back to
/// what recent traffic earns.
pub struct RetryBudget {
    config: BudgetConfig,
    /// Micro-tokens one deposit adds (`ratio` scaled).
    deposit_micro: u128,
    /// Micro-tokens of the floor (`min_per_sec × window` scaled).
    reserve_micro: u128,
    /// Deposits and withdrawals over the window.
    window: Mutex<Window<2>>,
    /// Failed withdrawals since creation: a monotonic counter for metrics.
    exhausted: AtomicU64,
}

/// A snapshot of a [`RetryBudget`] for metrics and the admin endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BudgetStats {
    /// Original requests in the current window.
    pub deposits: u64,
    /// Retries allowed in the current window.
    pub withdrawals: u64,
    /// Retries refused because the budget was empty, since creation (monotonic).
    pub exhausted: u64,
    /// Whole retries available right now.
    pub available: u64,
}

/// Whether a failed attempt may be retried.
///
/// | failure | any route | idempotent route |
/// |---|---|---|
/// | `ConnectRefused`, `ResetBeforeWrite`, `Status503NoBody`, `GrpcUnavailable` | yes | yes |
/// | everything else | no | yes |
///
/// The first row is what the upstream certainly did not process (or, for gRPC `UNAVAILABLE`,
/// what gRPC's status guide defines as transient with retrying as the remedy). Anything else
/// may have been processed, which only a route declared idempotent tolerates — and there any
/// error is retried, as Envoy's `5xx` policy does: a 500 from one endpoint may not recur on
/// another, and the retry budget bounds the cost when it does. `GrpcOther(14)` is treated as
/// `GrpcUnavailable`.
///
/// Never retry when `is_chain_retry` (the request is itself a retry from the hop upstream,
/// `keel_core::Context::is_retry`): only one hop in a chain retries, so attempts add up
/// instead of multiplying.
pub fn retryable(failure: Failure, idempotent: bool, is_chain_retry: bool) -> bool {
    if is_chain_retry {
        return false;
    }
    match failure {
        Failure::ConnectRefused
        | Failure::ResetBeforeWrite
        | Failure::Status503NoBody
        | Failure::GrpcUnavailable
        | Failure::GrpcOther(GRPC_UNAVAILABLE) => true,
        Failure::ResetAfterWrite
        | Failure::Timeout
        | Failure::Status5xx(_)
        | Failure::GrpcOther(_)
        | Failure::Other => idempotent,
    }
}

/// A random full-jitter backoff: uniform in `[0, min(max, base·2^attempt))`, where `attempt`
/// counts retries already made (0 before the first retry).
pub fn backoff(config: &BackoffConfig, attempt: u32) -> Duration {
    backoff_with(config, attempt, unit_draw())
}

/// [`backoff`] with an explicit draw in `[0, 1)`: the delay is `draw × ceiling`, rounded down
/// to the nanosecond and always below the ceiling (a draw outside the range is clamped).
pub fn backoff_with(config: &BackoffConfig, attempt: u32, draw: f64) -> Duration {
    jitter(ceiling(config, attempt), draw)
}

/// The delay before retry number `attempt + 1`, or `None` when it should not happen.
///
/// `None` when the attempts are used up (`attempt + 2 > max_attempts`: the first attempt plus
/// `attempt` retries already made) or when no useful time is left: less than `min_try` (the
/// shortest per-try time in which the upstream can answer) remains before the deadline, or
/// nothing remains at all. Otherwise the delay is drawn with full jitter from
/// `[0, min(max, base·2^attempt, remaining − min_try))`: the sleep never eats the time the
/// retry needs, and near the deadline the range narrows instead of giving up on an unlucky draw.
pub fn next_delay(
    config: &BackoffConfig,
    attempt: u32,
    remaining: Duration,
    min_try: Duration,
) -> Option<Duration> {
    next_delay_with(config, attempt, remaining, min_try, unit_draw())
}

/// [`next_delay`] with an explicit draw in `[0, 1)`, for deterministic tests.
pub fn next_delay_with(
    config: &BackoffConfig,
    attempt: u32,
    remaining: Duration,
    min_try: Duration,
    draw: f64,
) -> Option<Duration> {
    if attempt.saturating_add(2) > config.max_attempts || remaining.is_zero() {
        return None;
    }
    let spare = remaining.checked_sub(min_try)?;
    Some(jitter(ceiling(config, attempt).min(spare), draw))
}

/// `min(max, base·2^attempt)`, saturating instead of overflowing for large attempts.
fn ceiling(config: &BackoffConfig, attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt).unwrap_or(u32::MAX);
    config.base.saturating_mul(factor).min(config.max)
}

/// A point `draw` of the way into `[0, ceiling)`.
fn jitter(ceiling: Duration, draw: f64) -> Duration {
    let draw = if draw.is_nan() {
        0.0
    } else {
        draw.clamp(0.0, 1.0)
    };
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    // `as` truncates towards zero; the `min` keeps the interval half-open even for a draw of
    // 1.0 or a rounding up in the product.
    let delay = (nanos as f64 * draw) as u64;
    Duration::from_nanos(delay.min(nanos.saturating_sub(1)))
}

impl RetryBudget {
    /// An empty budget: only the floor is available until traffic deposits.
    pub fn new(config: BudgetConfig) -> Self {
        // `as` saturates: a negative or NaN ratio earns nothing rather than wrapping.
        let deposit_micro = (config.ratio * MICRO_TOKENS as f64).round() as u128;
        // tokens × 10⁶ = per-second × seconds × 10⁶ = per-second × microseconds.
        let reserve_micro = u128::from(config.min_per_sec) * config.window.as_micros();
        Self {
            deposit_micro,
            reserve_micro,
            window: Mutex::new(Window::new(config.window, Instant::now())),
            exhausted: AtomicU64::new(0),
            config,
        }
    }

    /// The configuration this budget was built with.
    pub fn config(&self) -> &BudgetConfig {
        &self.config
    }

    /// Records one original request (never a retry: retries must not fund themselves).
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// [`deposit`](Self::deposit) at `now`, a clock reading the caller already has.
    pub fn deposit_at(&self, now: Instant) {
        self.lock().add(now, DEPOSITS, 1);
    }

    /// Takes one token for a retry. `false` means the budget is exhausted: don't retry; the
    /// refusal is counted in [`BudgetStats::exhausted`].
    pub fn try_withdraw(&self) -> bool {
        let now = Instant::now();
        let mut window = self.lock();
        let [deposits, withdrawals] = window.totals(now);
        if self.balance_micro(deposits, withdrawals) >= MICRO_TOKENS {
            window.add(now, WITHDRAWALS, 1);
            true
        } else {
            drop(window);
            self.exhausted.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Window counts, the monotonic exhaustion count and the tokens available now.
    pub fn stats(&self) -> BudgetStats {
        let [deposits, withdrawals] = self.lock().totals(Instant::now());
        let available = self.balance_micro(deposits, withdrawals) / MICRO_TOKENS;
        BudgetStats {
            deposits,
            withdrawals,
            exhausted: self.exhausted.load(Ordering::Relaxed),
            available: u64::try_from(available).unwrap_or(u64::MAX),
        }
    }

    /// Earned tokens plus the floor, minus what was spent, in micro-tokens (zero when
    /// overdrawn, which happens when deposits age out before the withdrawals they paid for).
    fn balance_micro(&self, deposits: u64, withdrawals: u64) -> u128 {
        let earned = u128::from(deposits)
            .saturating_mul(self.deposit_micro)
            .saturating_add(self.reserve_micro);
        earned.saturating_sub(u128::from(withdrawals) * MICRO_TOKENS)
    }

    /// The window lock; poisoning is ignored because every update leaves the window
    /// consistent.
    fn lock(&self) -> MutexGuard<'_, Window<2>> {
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish()
    }
}
