//! Outlier ejection: takes an endpoint out of rotation after a run of consecutive failures.
//!
//! This module owns the *passive* half of endpoint health: it never probes, it only watches the
//! outcomes of real requests that the caller reports (the caller decides what a failure is —
//! connect errors, 5xx, gRPC `UNAVAILABLE`). It follows the consecutive-5xx detector described in
//! Envoy's outlier detection documentation (`arch_overview/upstream/outlier`, and the
//! `config.cluster.v3.OutlierDetection` reference):
//!
//! - `consecutive_failures` failures in a row eject an endpoint; any success resets the run.
//! - The ejection lasts `base_ejection × times ejected`, never longer than `max_ejection`, so an
//!   endpoint that keeps failing after it comes back stays out longer each time.
//! - At most `max_ejection_percent` of the endpoints are ejected at once, so a fault that is
//!   really on *our* side (or a bad deploy everywhere) cannot empty the set.
//! - While an endpoint stays in service its ejection count fades, one step per `decay`, so an
//!   old incident stops lengthening its next ejection.
//!
//! Where Keel differs from Envoy, and why:
//!
//! - **No sweep timer.** Envoy un-ejects hosts on a periodic `interval` sweep; here an ejection
//!   simply ends when its time has passed, checked whenever the state is read. Nothing runs in the
//!   background, and an endpoint returns at exactly its deadline rather than up to one interval
//!   late.
//! - **At least one ejection when there are two or more endpoints.** Envoy's default cap is a
//!   strict `floor(n × percent / 100)`, which with the 10 % default ejects nothing at all in a set
//!   of fewer than ten hosts — most real deployments. Keel always allows one, which is Envoy with
//!   `always_eject_one_host` enabled, except that the sole endpoint of a one-endpoint set is never
//!   ejected: removing it would leave nothing to send to, and the priority panic logic would have
//!   to route to it anyway.
//! - **The ejection count stops growing at the cap** (`max_ejection / base_ejection`), as Envoy's
//!   does, so the decay starts shortening ejections as soon as the endpoint behaves.

use keel_core::fasthash::FastMap;
use std::fmt;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

#[cfg(test)]
mod tests;

/// Longest ejection ever scheduled, whatever the config says. Adding a larger duration to an
/// `Instant` can overflow (and panic); thirty years is "forever" for any real process.
const LONGEST_EJECTION: Duration = Duration::from_secs(30 * 365 * 24 * 60 * 60);

/// Outlier detection tuning. The defaults are Envoy's, so operators who know Envoy's outlier
/// detection get the behaviour they expect.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    /// Failures in a row that eject an endpoint. 5 (Envoy's `consecutive_5xx` default): enough
    /// that a few unlucky requests do not remove a healthy endpoint, few enough that a dead one
    /// costs only a handful of failed requests before it is skipped. 0 turns ejection off.
    pub consecutive_failures: u32,
    /// Ejection time for a first ejection; the n-th ejection lasts n times this. 30 s (Envoy's
    /// `base_ejection_time` default) is long enough for a restarting instance to come back and
    /// short enough that a transient fault does not halve capacity for minutes.
    pub base_ejection: Duration,
    /// Upper bound on any single ejection. 300 s (Envoy's `max_ejection_time` default): even an
    /// endpoint that has failed many times is retried every five minutes, so it is never lost
    /// for good because of a past incident.
    pub max_ejection: Duration,
    /// Largest share of the endpoints (in percent) ejected at the same time; one endpoint may
    /// always be ejected when there are at least two. 10 (Envoy's `max_ejection_percent`
    /// default): when many endpoints fail together the fault is usually shared (the network,
    /// a dependency, our own requests), and ejecting them all would only move the load onto
    /// fewer of them.
    pub max_ejection_percent: u32,
    /// After an ejection ends, the ejection count drops by one for each `decay` that passes
    /// without a new ejection, so a recovered endpoint's penalty fades and its next ejection is
    /// short again. 30 s, equal to `base_ejection`: the endpoint has to behave for as long as a
    /// first ejection lasts to earn one step back. (Envoy decrements once per 10 s sweep
    /// `interval`; without a sweep the slower step is the more cautious choice for endpoints
    /// that flap.) Zero forgets the count as soon as an ejection ends.
    pub decay: Duration,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 10,
            decay: Duration::from_secs(30),
        }
    }
}

/// Counters for metrics and the admin page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutlierStats {
    /// Ejections since the detector was created.
    pub ejections_total: u64,
    /// Endpoints ejected right now.
    pub currently_ejected: usize,
    /// Runs of failures long enough to eject that were refused because the cap on ejected
    /// endpoints was reached. Counted once per run, however long the run gets, so the number
    /// reads as "endpoints that should have been ejected".
    pub ejections_skipped_by_cap: u64,
}

/// Tracks endpoints by a caller-chosen key `K: Eq + Hash + Clone` (an address, an id).
///
/// One short mutex guards all state: every operation is a hash lookup plus a few integer
/// updates, and the full scan over the set happens only when an endpoint is about to be ejected
/// (a rare event) or when [`ejected`](Self::ejected) / [`stats`](Self::stats) are read.
pub struct OutlierDetector<K> {
    cfg: OutlierConfig,
    inner: Mutex<Inner<K>>,
}

struct Inner<K> {
    endpoints: FastMap<K, Endpoint>,
    ejections_total: u64,
    skipped_by_cap: u64,
}

#[derive(Debug, Default)]
struct Endpoint {
    /// Failures in a row since the last success or ejection.
    streak: u32,
    /// This run already counted in `skipped_by_cap`.
    skip_counted: bool,
    /// Ejection multiplier: grows with each ejection, fades with `decay`.
    times_ejected: u32,
    /// Set while ejected; cleared lazily once the time has passed.
    ejected_until: Option<Instant>,
    /// Start of the current decay step: when the last ejection ended, moved forward one step
    /// each time the count is decremented, so partial steps are not lost between reads.
    decay_from: Option<Instant>,
}

impl<K: Eq + Hash + Clone> OutlierDetector<K> {
    /// A detector with no endpoints; call [`set_endpoints`](Self::set_endpoints) first.
    pub fn new(cfg: OutlierConfig) -> Self {
        OutlierDetector {
            cfg,
            inner: Mutex::new(Inner {
                endpoints: FastMap::default(),
                ejections_total: 0,
                skipped_by_cap: 0,
            }),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &OutlierConfig {
        &self.cfg
    }

    /// Replaces the set of endpoints. Endpoints that stay keep their state (a discovery update
    /// must not pardon an ejected endpoint); removed ones are forgotten, so one that comes back
    /// later starts healthy; new ones start healthy.
    pub fn set_endpoints(&self, keys: impl IntoIterator<Item = K>) {
        let mut inner = self.lock();
        let mut next: FastMap<K, Endpoint> = FastMap::default();
        for key in keys {
            let state = inner.endpoints.remove(&key).unwrap_or_default();
            next.entry(key).or_insert(state);
        }
        inner.endpoints = next;
    }

    /// Reports the outcome of one request to `key`. A failure extends the endpoint's run of
    /// failures, a success ends it. Returns `Some(until)` when this report ejected the endpoint.
    ///
    /// Reports for an endpoint that is currently ejected are ignored: they come from requests
    /// that were already in flight (or from panic routing), and must neither lengthen the
    /// ejection nor start the next run before the endpoint is back. Reports for keys that are
    /// not in the set (a response arriving after the endpoint was removed) are ignored too.
    pub fn report(&self, key: &K, success: bool) -> Option<Instant> {
        self.report_at(key, success, Instant::now())
    }

    /// [`report`](Self::report) of an outcome seen at `now`.
    pub fn report_at(&self, key: &K, success: bool, now: Instant) -> Option<Instant> {
        let mut guard = self.lock();
        let inner = &mut *guard;

        let endpoint = inner.endpoints.get_mut(key)?;
        endpoint.refresh(now, &self.cfg);
        if endpoint.is_ejected() {
            return None;
        }
        if success {
            endpoint.streak = 0;
            endpoint.skip_counted = false;
            return None;
        }
        endpoint.streak = endpoint.streak.saturating_add(1);
        if self.cfg.consecutive_failures == 0 || endpoint.streak < self.cfg.consecutive_failures {
            return None;
        }

        // The run is long enough. Failures past the threshold keep trying, so an endpoint that
        // was refused by the cap is ejected as soon as another ejection ends.
        let total = inner.endpoints.len();
        let ejected_now = count_ejected(&mut inner.endpoints, now, &self.cfg);
        let endpoint = inner.endpoints.get_mut(key)?;
        if ejected_now >= self.ejection_cap(total) {
            if !endpoint.skip_counted {
                endpoint.skip_counted = true;
                inner.skipped_by_cap += 1;
                tracing::debug!(
                    ejected_now,
                    endpoints = total,
                    "outlier ejection skipped: ejection cap reached"
                );
            }
            return None;
        }

        endpoint.times_ejected = endpoint
            .times_ejected
            .saturating_add(1)
            .min(self.max_multiplier());
        let ejection = self
            .cfg
            .base_ejection
            .saturating_mul(endpoint.times_ejected)
            .min(self.cfg.max_ejection)
            .min(LONGEST_EJECTION);
        let until = now + ejection;
        endpoint.ejected_until = Some(until);
        endpoint.decay_from = None;
        endpoint.streak = 0;
        endpoint.skip_counted = false;
        inner.ejections_total += 1;
        tracing::info!(
            ejection_secs = ejection.as_secs_f64(),
            times_ejected = endpoint.times_ejected,
            "outlier ejected an endpoint"
        );
        Some(until)
    }

    /// Whether `key` is ejected now. An ejection ends on its own once its time has passed;
    /// unknown keys are not ejected.
    pub fn is_ejected(&self, key: &K) -> bool {
        self.is_ejected_at(key, Instant::now())
    }

    /// [`is_ejected`](Self::is_ejected) at `now`.
    pub fn is_ejected_at(&self, key: &K, now: Instant) -> bool {
        let mut inner = self.lock();
        match inner.endpoints.get_mut(key) {
            Some(endpoint) => {
                endpoint.refresh(now, &self.cfg);
                endpoint.is_ejected()
            }
            None => false,
        }
    }

    /// The endpoints ejected now, in no particular order.
    pub fn ejected(&self) -> Vec<K> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner
            .endpoints
            .iter_mut()
            .filter_map(|(key, e)| {
                e.refresh(now, &self.cfg);
                e.is_ejected().then(|| key.clone())
            })
            .collect()
    }

    /// Current counters.
    pub fn stats(&self) -> OutlierStats {
        let now = Instant::now();
        let mut inner = self.lock();
        let currently_ejected = count_ejected(&mut inner.endpoints, now, &self.cfg);
        OutlierStats {
            ejections_total: inner.ejections_total,
            currently_ejected,
            ejections_skipped_by_cap: inner.skipped_by_cap,
        }
    }

    /// How many of `total` endpoints may be ejected at once: `floor(total × percent / 100)`,
    /// but at least one when there are two or more, and none of a set of one.
    fn ejection_cap(&self, total: usize) -> usize {
        if total < 2 {
            return 0;
        }
        let percent = self.cfg.max_ejection_percent.min(100) as usize;
        (total * percent / 100).max(1)
    }

    /// The multiplier at which `base × multiplier` reaches `max_ejection`. Growing past it
    /// would not lengthen ejections, only delay the decay from taking effect.
    fn max_multiplier(&self) -> u32 {
        let base = self.cfg.base_ejection.as_nanos();
        if base == 0 {
            return 1;
        }
        let steps = self.cfg.max_ejection.as_nanos().div_ceil(base);
        u32::try_from(steps).unwrap_or(u32::MAX).max(1)
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K>> {
        // Every critical section leaves the state consistent between statements that could
        // panic, so a poisoned lock still guards usable data; refusing it would turn one
        // panicking caller into failures for every request.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Endpoint {
    fn is_ejected(&self) -> bool {
        self.ejected_until.is_some()
    }

    /// Ends an ejection whose time has passed and applies the decay that has accrued since.
    fn refresh(&mut self, now: Instant, cfg: &OutlierConfig) {
        if let Some(until) = self.ejected_until {
            if now < until {
                return;
            }
            self.ejected_until = None;
            self.decay_from = Some(until);
        }
        let Some(from) = self.decay_from else {
            return;
        };
        if self.times_ejected == 0 {
            self.decay_from = None;
            return;
        }
        if cfg.decay.is_zero() {
            self.times_ejected = 0;
            self.decay_from = None;
            return;
        }
        let steps = now.saturating_duration_since(from).as_nanos() / cfg.decay.as_nanos();
        // `steps` is capped by `times_ejected`, a u32, so the conversion cannot fail.
        let steps = u32::try_from(steps.min(u128::from(self.times_ejected))).unwrap_or(0);
        self.times_ejected -= steps;
        self.decay_from = match self.times_ejected {
            0 => None,
            _ => Some(from + cfg.decay * steps),
        };
    }
}

/// Ends the ejections that are due, then counts the ones still running.
fn count_ejected<K>(
    endpoints: &mut FastMap<K, Endpoint>,
    now: Instant,
    cfg: &OutlierConfig,
) -> usize {
    let mut ejected = 0;
    for endpoint in endpoints.values_mut() {
        endpoint.refresh(now, cfg);
        ejected += usize::from(endpoint.is_ejected());
    }
    ejected
}

impl<K> fmt::Debug for OutlierDetector<K> {
    // Written by hand so that any key type works, Debug or not; the per-endpoint map would be
    // noise in logs anyway.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `try_lock`: formatting must never block, nor deadlock a thread that holds the lock.
        let mut d = f.debug_struct("OutlierDetector");
        d.field("cfg", &self.cfg);
        match self.inner.try_lock() {
            Ok(inner) => d
                .field("endpoints", &inner.endpoints.len())
                .field("ejections_total", &inner.ejections_total)
                .field("skipped_by_cap", &inner.skipped_by_cap),
            Err(_) => d.field("state", &"<locked>"),
        };
        d.finish()
    }
}
