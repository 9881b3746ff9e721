//! Load balancing: power of two choices (P2C) over a peak-EWMA load estimate.
//!
//! Each endpoint keeps an exponentially weighted moving average of its response time that
//! jumps *up* to any slower observation at once and decays *down* gradually ("peak EWMA", as in
//! Finagle and Linkerd): a slowing endpoint is avoided immediately, a recovered one is trusted
//! again only as evidence accumulates. Its cost is that estimate × (requests in flight + 1), so
//! a fast endpoint that is already busy loses to an idle one that is a little slower.
//!
//! Picking two endpoints at random and taking the cheaper one gives nearly the load spread of
//! always picking the best, without the herd behaviour of every client choosing the same
//! "best" endpoint at once, and costs two lookups instead of a scan (Mitzenmacher, "The Power
//! of Two Choices in Randomized Load Balancing").
//!
//! A failure or a `Retry-After` puts the endpoint in a penalty period during which its cost is
//! multiplied, so it still serves when nothing better exists but loses every comparison
//! against a healthy peer.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::window::decay;

/// Balancer tuning.
#[derive(Debug, Clone, PartialEq)]
pub struct BalanceConfig {
    /// How fast the estimate decays towards faster observations: after `decay`, an old
    /// observation keeps 1/e of its weight. 10 s (Linkerd's default) forgets a slow spell
    /// within tens of seconds yet ignores one fast response.
    pub decay: Duration,
    /// Estimate for an endpoint with no observations yet. 30 ms sits in the range of a typical
    /// in-cluster call: a new endpoint is tried, but not flooded before it has proven itself.
    pub default_rtt: Duration,
    /// Penalty period after a failure. 1 s lets healthy peers absorb the next requests while
    /// a brief blip is forgotten almost at once.
    pub failure_penalty: Duration,
    /// Longest `Retry-After` honoured; longer values are clamped so a misconfigured upstream
    /// cannot remove itself for hours.
    pub max_retry_after: Duration,
    /// Cost multiplier while penalised.
    pub penalty_factor: f64,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            decay: Duration::from_secs(10),
            default_rtt: Duration::from_millis(30),
            failure_penalty: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(60),
            penalty_factor: 1000.0,
        }
    }
}

#[derive(Debug)]
struct Estimate {
    /// Peak-EWMA response time in nanoseconds.
    rtt_ns: f64,
    updated: Instant,
    penalty_until: Option<Instant>,
}

/// The load of one endpoint. Share it (`Arc`) between the balancer and the calls in flight.
#[derive(Debug)]
pub struct Load {
    in_flight: AtomicUsize,
    estimate: Mutex<Estimate>,
}

impl Load {
    /// A fresh endpoint, estimated at `cfg.default_rtt`.
    pub fn new(cfg: &BalanceConfig) -> Load {
        Load {
            in_flight: AtomicUsize::new(0),
            estimate: Mutex::new(Estimate {
                rtt_ns: nanos(cfg.default_rtt),
                updated: Instant::now(),
                penalty_until: None,
            }),
        }
    }

    /// Requests currently in flight to this endpoint.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The current response-time estimate.
    pub fn rtt_estimate(&self) -> Duration {
        let e = self.lock();
        Duration::from_nanos(e.rtt_ns as u64)
    }

    /// The comparison cost: estimate × (in flight + 1), multiplied while penalised. The
    /// estimate decays towards zero while nothing is observed (as if an instant answer had
    /// been seen, the same formula `observe` applies), so an endpoint the balancer stopped
    /// choosing — new, or once slow — is tried again instead of starving forever behind
    /// endpoints whose estimates are kept fresh by traffic.
    pub fn cost(&self, cfg: &BalanceConfig, now: Instant) -> f64 {
        let e = self.lock();
        let idle = now.saturating_duration_since(e.updated).as_secs_f64();
        let decayed = e.rtt_ns * decay(idle / cfg.decay.as_secs_f64().max(f64::MIN_POSITIVE));
        let base = decayed * (self.in_flight() as f64 + 1.0);
        match e.penalty_until {
            Some(until) if until > now => base * cfg.penalty_factor,
            _ => base,
        }
    }

    /// Mark a call started; the guard ends it (observed or abandoned).
    pub fn start(&self) -> InFlight<'_> {
        self.start_at(Instant::now())
    }

    /// [`start`](Self::start) for a call sent at `now`.
    pub fn start_at(&self, now: Instant) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            load: self,
            started: now,
        }
    }

    /// Fold in one observed response time.
    fn observe(&self, cfg: &BalanceConfig, rtt: Duration, now: Instant) {
        let mut e = self.lock();
        let sample = nanos(rtt);
        if sample > e.rtt_ns {
            // Peak sensitivity: slowness counts at once.
            e.rtt_ns = sample;
        } else {
            let elapsed = now.saturating_duration_since(e.updated).as_secs_f64();
            let w = decay(elapsed / cfg.decay.as_secs_f64().max(f64::MIN_POSITIVE));
            e.rtt_ns = e.rtt_ns * w + sample * (1.0 - w);
        }
        e.updated = now;
    }

    /// Penalise after a failure, or for an upstream's `Retry-After`.
    pub fn penalize(&self, cfg: &BalanceConfig, retry_after: Option<Duration>) {
        self.penalize_at(cfg, retry_after, Instant::now());
    }

    /// [`penalize`](Self::penalize) from `now` on.
    pub fn penalize_at(&self, cfg: &BalanceConfig, retry_after: Option<Duration>, now: Instant) {
        let d = retry_after.map_or(cfg.failure_penalty, |r| r.min(cfg.max_retry_after));
        let mut e = self.lock();
        let until = now + d;
        // Never shorten a longer penalty already in force.
        if e.penalty_until.is_none_or(|cur| cur < until) {
            e.penalty_until = Some(until);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Estimate> {
        // The estimate is plain data: a panic elsewhere cannot leave it inconsistent.
        self.estimate.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A call in flight; report how it went, or drop it (cancelled: counts as neither).
#[derive(Debug)]
pub struct InFlight<'a> {
    load: &'a Load,
    started: Instant,
}

impl InFlight<'_> {
    /// The call answered: fold its response time into the estimate.
    pub fn success(self, cfg: &BalanceConfig) {
        self.success_at(cfg, Instant::now());
    }

    /// [`success`](Self::success), the answer having come at `now`.
    pub fn success_at(self, cfg: &BalanceConfig, now: Instant) {
        self.load
            .observe(cfg, now.saturating_duration_since(self.started), now);
    }

    /// The call failed: its time counts (a slow failure is slowness) and a penalty starts.
    pub fn failure(self, cfg: &BalanceConfig, retry_after: Option<Duration>) {
        self.failure_at(cfg, retry_after, Instant::now());
    }

    /// [`failure`](Self::failure), the failure having come at `now`.
    pub fn failure_at(self, cfg: &BalanceConfig, retry_after: Option<Duration>, now: Instant) {
        self.load
            .observe(cfg, now.saturating_duration_since(self.started), now);
        self.load.penalize_at(cfg, retry_after, now);
    }
}

#[cfg(test)]
impl InFlight<'_> {
    /// [`InFlight::success`] as if the call had taken `rtt` (tests with paused time).
    fn success_after(self, cfg: &BalanceConfig, rtt: Duration) {
        let now = Instant::now();
        self.load.observe(cfg, rtt, now);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Choose between two random candidates by cost. `draws` are two uniform random numbers (the
/// caller's generator; tests pass fixed ones). With one candidate it is returned; with none,
/// `None`.
pub fn p2c<'a, T>(
    cfg: &BalanceConfig,
    candidates: &'a [T],
    load: impl Fn(&T) -> &Load,
    draws: (u64, u64),
) -> Option<&'a T> {
    p2c_when(cfg, candidates, load, draws, Instant::now)
}

/// [`p2c`] with the costs taken at `now`.
pub fn p2c_at<'a, T>(
    cfg: &BalanceConfig,
    candidates: &'a [T],
    load: impl Fn(&T) -> &Load,
    draws: (u64, u64),
    now: Instant,
) -> Option<&'a T> {
    p2c_when(cfg, candidates, load, draws, || now)
}

/// [`p2c`], the time asked for only when there are two candidates to compare.
fn p2c_when<'a, T>(
    cfg: &BalanceConfig,
    candidates: &'a [T],
    load: impl Fn(&T) -> &Load,
    draws: (u64, u64),
    now: impl FnOnce() -> Instant,
) -> Option<&'a T> {
    match candidates.len() {
        0 => None,
        1 => candidates.first(),
        n => {
            let a = (draws.0 % n as u64) as usize;
            // A second index distinct from the first: offset by 1..n.
            let b = (a + 1 + (draws.1 % (n as u64 - 1)) as usize) % n;
            let now = now();
            let (ca, cb) = (
                load(&candidates[a]).cost(cfg, now),
                load(&candidates[b]).cost(cfg, now),
            );
            // Costs within 1 % are a tie, settled by the random draw (`a`): otherwise two
            // unmeasured endpoints would always go to the one created a moment earlier, whose
            // estimate has decayed a hair further.
            Some(if cb < ca * 0.99 {
                &candidates[b]
            } else {
                &candidates[a]
            })
        }
    }
}

/// [`p2c`] with draws from Keel's per-thread generator.
pub fn pick<'a, T>(
    cfg: &BalanceConfig,
    candidates: &'a [T],
    load: impl Fn(&T) -> &Load,
) -> Option<&'a T> {
    use keel_core::codec::rand::next_u64;
    p2c(cfg, candidates, load, (next_u64(), next_u64()))
}

fn nanos(d: Duration) -> f64 {
    d.as_nanos() as f64
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cfg() -> BalanceConfig {
        BalanceConfig::default()
    }

    #[tokio::test(start_paused = true)]
    async fn a_slower_observation_counts_at_once_and_fades_with_the_decay() {
        let c = cfg();
        let l = Load::new(&c);
        assert_eq!(l.rtt_estimate(), Duration::from_millis(30));
        let call = l.start();
        tokio::time::advance(Duration::from_millis(200)).await;
        call.success(&c);
        assert_eq!(
            l.rtt_estimate(),
            Duration::from_millis(200),
            "peak: jumps up"
        );

        // Fast answers bring it down gradually: after one decay period about 1/e of the
        // excess remains.
        tokio::time::advance(Duration::from_secs(10)).await;
        let call = l.start();
        call.success(&c); // 0 ms observed
        let est = l.rtt_estimate().as_secs_f64() * 1e3;
        assert!((est - 200.0 / std::f64::consts::E).abs() < 1.0, "{est}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_nobody_picks_is_tried_again_once_its_estimate_has_decayed() {
        let c = cfg();
        // An endpoint that has answered in 1 ms for a minute…
        let busy = Load::new(&c);
        for _ in 0..600 {
            tokio::time::advance(Duration::from_millis(100)).await;
            busy.start().success_after(&c, Duration::from_millis(1));
        }
        assert!(busy.rtt_estimate() < Duration::from_millis(2));
        // …and one that joins now, estimated at the 30 ms default and never observed.
        let fresh = Load::new(&c);
        let loads = [&fresh, &busy];
        let mut first_pick_of_fresh = None;
        for second in 0..120u64 {
            // The busy endpoint answers in 1 ms all the time, so its estimate stays fresh.
            busy.start().success_after(&c, Duration::from_millis(1));
            let picked = p2c(&c, &loads, |l| l, (0, 0)).unwrap();
            if std::ptr::eq(*picked, &fresh) {
                first_pick_of_fresh = Some(second);
                break;
            }
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // 30 ms decays to 1 ms in ln(30) ≈ 3.4 decay periods of 10 s.
        let s = first_pick_of_fresh.expect("the unmeasured endpoint was never picked");
        assert!((30..=40).contains(&s), "picked after {s} s");
    }

    #[tokio::test(start_paused = true)]
    async fn cost_grows_with_in_flight_and_drops_when_calls_end() {
        let c = cfg();
        let l = Load::new(&c);
        let now = Instant::now();
        let idle = l.cost(&c, now);
        let a = l.start();
        let b = l.start();
        assert_eq!(l.in_flight(), 2);
        assert!((l.cost(&c, now) - 3.0 * idle).abs() < 1.0);
        drop(a);
        drop(b);
        assert_eq!(
            l.in_flight(),
            0,
            "a cancelled call still leaves the in-flight count"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_prefers_the_cheaper_of_the_two_and_never_picks_the_same_index_twice() {
        let c = cfg();
        let loads = [Load::new(&c), Load::new(&c), Load::new(&c)];
        let _busy: Vec<_> = (0..5).map(|_| loads[0].start()).collect();
        // Draws selecting indices 0 and 1: index 1 (idle) wins over busy 0.
        let picked = p2c(&c, &loads, |l| l, (0, 0)).unwrap();
        assert!(std::ptr::eq(picked, &loads[1]));
        // Every pair of draws yields two distinct indices.
        for d0 in 0..3u64 {
            for d1 in 0..2u64 {
                let a = (d0 % 3) as usize;
                let b = (a + 1 + (d1 % 2) as usize) % 3;
                assert_ne!(a, b);
            }
        }
        assert!(p2c(&c, &loads[..0], |l| l, (1, 2)).is_none());
        assert!(std::ptr::eq(
            p2c(&c, &loads[..1], |l| l, (7, 9)).unwrap(),
            &loads[0]
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_or_retry_after_penalises_until_it_expires() {
        let c = cfg();
        let loads = [Load::new(&c), Load::new(&c)];
        loads[0].start().failure(&c, None);
        assert!(std::ptr::eq(
            p2c(&c, &loads, |l| l, (0, 0)).unwrap(),
            &loads[1]
        ));
        tokio::time::advance(Duration::from_millis(1001)).await;
        // Penalty over: equal costs, the first draw wins again.
        assert!(std::ptr::eq(
            p2c(&c, &loads, |l| l, (0, 0)).unwrap(),
            &loads[0]
        ));

        // Retry-After is honoured, clamped to the maximum.
        loads[0]
            .start()
            .failure(&c, Some(Duration::from_secs(3600)));
        // Both estimates have decayed alike by then, so compare costs rather than picks:
        // penalised, endpoint 0 costs a multiple of endpoint 1; afterwards about the same.
        let costs = || {
            let now = Instant::now();
            (loads[0].cost(&c, now), loads[1].cost(&c, now))
        };
        tokio::time::advance(Duration::from_secs(59)).await;
        let (penalised, other) = costs();
        assert!(penalised > 10.0 * other, "{penalised} vs {other}");
        tokio::time::advance(Duration::from_secs(2)).await;
        let (healed, other) = costs();
        assert!(healed < 1.2 * other, "{healed} vs {other}");
    }

    #[tokio::test(start_paused = true)]
    async fn under_skewed_latency_the_fast_endpoint_gets_most_picks() {
        let c = cfg();
        let loads = [Load::new(&c), Load::new(&c)];
        // Endpoint 0 answers in 100 ms, endpoint 1 in 10 ms.
        for (l, ms) in loads.iter().zip([100u64, 10]) {
            let call = l.start();
            tokio::time::advance(Duration::from_millis(ms)).await;
            call.success(&c);
        }
        let mut picks = [0usize; 2];
        for _ in 0..1000 {
            let p = pick(&c, &loads, |l| l).unwrap();
            picks[usize::from(std::ptr::eq(p, &loads[1]))] += 1;
        }
        // With two endpoints P2C always compares both, so the cheaper always wins.
        assert_eq!(picks, [0, 1000]);
    }
}
