//! The circuit breaker: client-side adaptive throttling, one [`Breaker`] per upstream (and per
//! route where a route is configured to have its own).
//!
//! Source: Google, *Site Reliability Engineering*, ch. 21 "Handling Overload", section
//! "Client-Side Throttling". Each client remembers, over a recent window, how many requests the
//! application *attempted* and how many the upstream *accepted*, and rejects a new request
//! locally, before it costs a connection or a byte on the wire, with probability
//!
//! ```text
//! max(0, (requests − K·accepts) / (requests + 1))
//! ```
//!
//! While the upstream accepts at least `1/K` of what is sent the probability is zero; beyond
//! that, the client sheds exactly the excess, so a struggling upstream receives about `K` times
//! what it can handle instead of everything plus the retries. Unlike a three-state
//! (closed/open/half-open) breaker there is no timer to tune and no thundering herd when the
//! breaker "closes": the probability falls smoothly as accepts come back.
//!
//! **Why a local rejection still counts as a request** (as in the book): `requests` measures
//! *demand*, and `accepts` what the upstream can take. If throttled requests were not counted,
//! throttling would pull `requests` down towards `accepts`, the probability would collapse the
//! moment it took effect, and the client would oscillate between flooding the upstream and
//! shedding everything. Counting them keeps the estimate of the excess honest for as long as
//! the upstream stays overloaded.
//!
//! **When a request is counted**: at its outcome, together with its accept or failure; a local
//! rejection is an outcome at once. Counting at admission instead would make every request
//! in flight look refused: a burst of 64 concurrent calls to a fresh, healthy upstream would
//! show 64 requests and 0 accepts before the first answer, and the breaker would reject 90 %
//! of healthy traffic (observed in `bench/client.sh` before this rule). A call its caller
//! abandons counts nothing: it says nothing about the upstream.
//!
//! **What is an accept**: any answer from the upstream that is not an overload or availability
//! failure. A 404 or a 400 is an accept: the upstream was healthy enough to do the work of
//! saying no. Connection failures, timeouts, 503s and gRPC `UNAVAILABLE` are not. Deciding is the
//! transport's job; this module only counts what it is told via [`Admitted`].
//!
//! Differences from the book, each deliberate:
//! - the window defaults to 10 s, not two minutes: Keel's upstreams are per-service pools with
//!   far less traffic than the book's backends, and a short window notices recovery in seconds
//!   (it matches the retry budget's window, so both policies see the same recent past);
//! - the probability is capped ([`BreakerConfig::max_reject_probability`]) so that some probes
//!   always reach the upstream and recovery is seen; uncapped, `n/(n+1)` approaches 1 with load;
//! - no rejections below [`BreakerConfig::min_requests`]: a cold or quiet client has too little
//!   evidence, and `1/(1+1)` after a single failure would be absurd.
//!
//! Hot path: [`Breaker::admit`] takes one short `std::sync::Mutex` (rotate at most ten buckets,
//! read two sums, add one) and draws a random number only when the probability is non-zero.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

#[cfg(test)]
mod tests;

use crate::window::{Window, unit_draw};

/// Index of the "requests attempted" counter in the window.
const REQUESTS: usize = 0;
/// Index of the "accepted by the upstream" counter in the window.
const ACCEPTS: usize = 1;

/// Tuning for one [`Breaker`].
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// The multiplier `K`: the client tolerates sending `K × accepts` requests before it starts
    /// rejecting. 2.0 is the SRE book's recommendation: it wastes at most one request per accept
    /// on an overloaded upstream, yet is lenient enough that ordinary error rates (well under
    /// 50 %) never trigger throttling. Lower is more aggressive (1.1 would shed almost at once);
    /// below 1 healthy traffic would be rejected, so don't.
    pub k: f64,
    /// How far back requests and accepts are remembered, kept in ten buckets so that history
    /// ages out in steps of `window / 10` rather than all at once. 10 s: long enough to hold
    /// a statistically useful number of requests at modest rates, short enough that the
    /// probability returns to zero within seconds of the upstream healing.
    pub window: Duration,
    /// Below this many requests in the window the breaker never rejects. 20: with fewer, one
    /// or two failures would already mean a large probability — a client that has barely
    /// talked to the upstream has no evidence it is overloaded.
    pub min_requests: u64,
    /// Upper bound on the rejection probability, in `[0, 1]`. 0.9: at least one request in ten
    /// still goes through even when the upstream has failed everything, so its recovery is
    /// seen (through new accepts) without a separate probing timer; and 10 % of the demand is
    /// little enough load on a struggling upstream.
    pub max_reject_probability: f64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            k: 2.0,
            window: Duration::from_secs(10),
            min_requests: 20,
            max_reject_probability: 0.9,
        }
    }
}

/// Adaptive throttling state for one upstream (or one route).
///
/// Cheap to clone: clones share the same history, so the transport can hand one to every
/// request future without a lifetime.
#[derive(Clone)]
pub struct Breaker {
    shared: Arc<Shared>,
}

struct Shared {
    config: BreakerConfig,
    /// `max_reject_probability` clamped to `[0, 1]` once, so a bad config cannot make every
    /// request fail (or the cap meaningless).
    max_probability: f64,
    /// Requests and accepts over the window.
    window: Mutex<Window<2>>,
    /// Local rejections since creation: a monotonic counter for metrics.
    local_rejects: AtomicU64,
}

/// Permission to send one request, returned by [`Breaker::admit`].
///
/// Report the upstream's answer with [`Admitted::success`] (the upstream accepted the request)
/// or [`Admitted::failure`] (it failed for overload or availability reasons); either counts
/// the request. Dropping the token counts nothing: a call cancelled by its caller (deadline,
/// client went away) says nothing about the upstream's health.
#[must_use = "report the outcome with .success() or .failure(); dropping counts as neither"]
pub struct Admitted {
    shared: Arc<Shared>,
}

/// A request rejected locally by the [`Breaker`]: the upstream has been refusing a large share
/// of recent requests, and this one was not sent at all.
///
/// It is never worth retrying against the same upstream; callers match on it with
/// `keel_core::is_caused_by::<BreakerOpen>(&err)` to fail fast or fall back.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error(
    "circuit breaker open for this upstream: rejected locally (reject probability {probability:.2})"
)]
pub struct BreakerOpen {
    /// The rejection probability in force when this request was rejected.
    pub probability: f64,
}

/// A snapshot of a [`Breaker`] for metrics and the admin endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BreakerStats {
    /// Requests attempted in the current window, including local rejections.
    pub requests: u64,
    /// Requests the upstream accepted in the current window.
    pub accepts: u64,
    /// Local rejections since the breaker was created (monotonic).
    pub local_rejects: u64,
    /// The rejection probability a request arriving now would face.
    pub reject_probability: f64,
}

impl Breaker {
    /// A breaker with empty history: it admits everything until it has evidence.
    pub fn new(config: BreakerConfig) -> Breaker {
        let max_probability = match config.max_reject_probability {
            p if p.is_nan() => 0.0,
            p => p.clamp(0.0, 1.0),
        };
        Breaker {
            shared: Arc::new(Shared {
                max_probability,
                window: Mutex::new(Window::new(config.window, Instant::now())),
                local_rejects: AtomicU64::new(0),
                config,
            }),
        }
    }

    /// The configuration this breaker was built with.
    pub fn config(&self) -> &BreakerConfig {
        &self.shared.config
    }

    /// Decides locally, before sending, whether this request may go to the upstream.
    ///
    /// Returns [`BreakerOpen`] when a uniform draw in `[0, 1)` falls under the current
    /// rejection probability (see the module doc for the formula and the cap). Either way the
    /// request is counted as attempted: a rejected request is still demand (module doc).
    pub fn admit(&self) -> Result<Admitted, BreakerOpen> {
        self.decide(Instant::now(), unit_draw)
    }

    /// [`admit`](Self::admit) at `now`, a clock reading the caller already has (the client
    /// reads the clock once when a call starts and passes it to every policy).
    pub fn admit_at(&self, now: Instant) -> Result<Admitted, BreakerOpen> {
        self.decide(now, unit_draw)
    }

    /// [`admit`](Self::admit) with an explicit draw in `[0, 1)`, for deterministic tests: the
    /// request is rejected exactly when `draw < probability`, so a draw equal to the
    /// probability is admitted and a zero probability admits every draw.
    pub fn admit_with(&self, draw: f64) -> Result<Admitted, BreakerOpen> {
        self.decide(Instant::now(), || draw)
    }

    /// The probability with which a request arriving now would be rejected.
    pub fn reject_probability(&self) -> f64 {
        let totals = self.shared.lock().totals(Instant::now());
        self.shared.probability(totals)
    }

    /// Window counts, the monotonic rejection count and the current probability.
    pub fn stats(&self) -> BreakerStats {
        let [requests, accepts] = self.shared.lock().totals(Instant::now());
        BreakerStats {
            requests,
            accepts,
            local_rejects: self.shared.local_rejects.load(Ordering::Relaxed),
            reject_probability: self.shared.probability([requests, accepts]),
        }
    }

    fn decide(&self, now: Instant, draw: impl FnOnce() -> f64) -> Result<Admitted, BreakerOpen> {
        // The clock is read before locking, so the critical section stays a few additions long.
        let probability = {
            let mut window = self.shared.lock();
            // The decision uses the history *before* this request; an admitted request joins
            // it with its outcome.
            self.shared.probability(window.totals(now))
        };
        // With a zero probability skip the draw: healthy traffic pays for no random numbers.
        if probability > 0.0 && draw() < probability {
            self.shared.lock().add(now, REQUESTS, 1);
            self.shared.local_rejects.fetch_add(1, Ordering::Relaxed);
            return Err(BreakerOpen { probability });
        }
        Ok(Admitted {
            shared: Arc::clone(&self.shared),
        })
    }
}

impl Shared {
    /// The SRE formula over window totals, with the `min_requests` floor and the cap.
    fn probability(&self, [requests, accepts]: [u64; 2]) -> f64 {
        if requests < self.config.min_requests {
            return 0.0;
        }
        let requests = requests as f64;
        let excess = requests - self.config.k * accepts as f64;
        // Healthy traffic makes the excess negative (so can an accept landing in a newer bucket
        // than its request, which already aged out); `max(0)` turns that into "never reject",
        // and also absorbs a NaN from a nonsensical `k`.
        (excess / (requests + 1.0))
            .max(0.0)
            .min(self.max_probability)
    }

    /// The window lock. Poisoning is ignored: every update leaves the window consistent, so a
    /// panic elsewhere while it was held cannot have left it half-written.
    fn lock(&self) -> MutexGuard<'_, Window<2>> {
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("config", &self.shared.config)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Admitted {
    /// The upstream accepted the request: any answer that is not an overload or availability
    /// failure (module doc).
    pub fn success(self) {
        self.success_at(Instant::now());
    }

    /// [`success`](Self::success), the answer having come at `now`.
    pub fn success_at(self, now: Instant) {
        let mut window = self.shared.lock();
        window.add(now, REQUESTS, 1);
        window.add(now, ACCEPTS, 1);
    }

    /// The request failed for overload or availability reasons: it counts as a request with
    /// no accept, which is what raises the probability.
    pub fn failure(self) {
        self.failure_at(Instant::now());
    }

    /// [`failure`](Self::failure), the failure having come at `now`.
    pub fn failure_at(self, now: Instant) {
        self.shared.lock().add(now, REQUESTS, 1);
    }
}

impl fmt::Debug for Admitted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admitted").finish_non_exhaustive()
    }
}
