//! A bucketed sliding window of counters, shared by the breaker and the retry budget, and the
//! uniform random draw both use.
//!
//! Both policies need "how many X happened in the last `window`" on every request. Keeping a
//! timestamp per event would cost memory proportional to traffic, and an exponential decay
//! would never fully forget a past outage. A ring of [`BUCKETS`] buckets costs a few words, and
//! history ages out one bucket at a time, so a burst leaves the window in steps of
//! `window / BUCKETS` instead of all at once (no cliff where every old event vanishes together).
//!
//! The window is therefore between `window − window/BUCKETS` and `window` long, depending on
//! where in the newest bucket "now" falls. That imprecision is the price of O(1) memory and is
//! well below the noise of the signals it measures.
//!
//! Not synchronised: the owners wrap it in a short `std::sync::Mutex`.

use std::time::Duration;

use tokio::time::Instant;

/// Buckets per window. Ten gives 1 s steps for the default 10 s windows: fine enough that
/// recovery is seen within a second of the bad period leaving the window, coarse enough that
/// rotating (at most ten cleared buckets) and summing stay trivial.
pub(crate) const BUCKETS: usize = 10;

/// `N` counters, each summed over the last `window`.
#[derive(Debug)]
pub(crate) struct Window<const N: usize> {
    /// Time the window was created; bucket numbers count from here.
    origin: Instant,
    /// Length of one bucket in nanoseconds, at least 1 so a zero window cannot divide by zero
    /// (it then degenerates to "the last nanosecond", i.e. almost no memory).
    bucket_nanos: u128,
    /// Absolute number of the newest bucket (`(now − origin) / bucket`).
    head: u64,
    /// When the bucket after `head` starts: until then `advance` has nothing to do, and says
    /// so with one comparison instead of a subtraction and a 128-bit division (it runs on
    /// every call through the breaker and the retry budget).
    next: Instant,
    buckets: [[u64; N]; BUCKETS],
    /// Sum of `buckets`, maintained incrementally so reading the window is O(1).
    totals: [u64; N],
}

impl<const N: usize> Window<N> {
    pub(crate) fn new(window: Duration, now: Instant) -> Self {
        let bucket_nanos = (window.as_nanos() / BUCKETS as u128).max(1);
        Self {
            origin: now,
            bucket_nanos,
            head: 0,
            next: bucket_start(now, bucket_nanos, 1),
            buckets: [[0; N]; BUCKETS],
            totals: [0; N],
        }
    }

    /// Adds `n` to counter `counter` at time `now`.
    pub(crate) fn add(&mut self, now: Instant, counter: usize, n: u64) {
        self.advance(now);
        let slot = (self.head % BUCKETS as u64) as usize;
        self.buckets[slot][counter] = self.buckets[slot][counter].saturating_add(n);
        self.totals[counter] = self.totals[counter].saturating_add(n);
    }

    /// Every counter summed over the window ending at `now`.
    pub(crate) fn totals(&mut self, now: Instant) -> [u64; N] {
        self.advance(now);
        self.totals
    }

    /// Moves the head to the bucket containing `now`, clearing the buckets that fell out.
    ///
    /// A `now` older than the head (a thread that read the clock just before another one took
    /// the lock with a later reading) lands in the newest bucket: a few microseconds of skew,
    /// never a panic or a lost event.
    fn advance(&mut self, now: Instant) {
        if now < self.next {
            return;
        }
        let elapsed = now.saturating_duration_since(self.origin).as_nanos();
        let slot = u64::try_from(elapsed / self.bucket_nanos).unwrap_or(u64::MAX);
        if slot <= self.head {
            return;
        }
        // After a long idle period only the whole ring needs clearing, however many buckets
        // passed.
        let steps = (slot - self.head).min(BUCKETS as u64);
        for i in 1..=steps {
            let idx = ((self.head + i) % BUCKETS as u64) as usize;
            for (total, count) in self.totals.iter_mut().zip(self.buckets[idx].iter_mut()) {
                *total = total.saturating_sub(*count);
                *count = 0;
            }
        }
        self.head = slot;
        self.next = bucket_start(self.origin, self.bucket_nanos, slot.saturating_add(1));
    }
}

/// The start of bucket number `slot`; `origin` itself when that is past what an `Instant`
/// holds (then every `advance` computes the slot, as if there were no shortcut).
fn bucket_start(origin: Instant, bucket_nanos: u128, slot: u64) -> Instant {
    let nanos = u64::try_from(u128::from(slot).saturating_mul(bucket_nanos)).unwrap_or(u64::MAX);
    origin
        .checked_add(Duration::from_nanos(nanos))
        .unwrap_or(origin)
}

/// `e^(−x)` for `x ≥ 0`: the factor by which an exponentially decaying value shrinks over
/// `x` time constants (the balancer's estimates, the pool's peak).
///
/// These decays are taken on every call, microseconds apart, where `x` is tiny: there
/// `1 − x` is exact to within `x²/2` (under 5·10⁻⁷ below `x = 10⁻³`) and costs one
/// subtraction where libm's `exp` costs about fifty instructions.
pub(crate) fn decay(x: f64) -> f64 {
    if x < 1e-3 { 1.0 - x } else { (-x).exp() }
}

/// A uniform draw in `[0, 1)` from the per-thread non-cryptographic generator: the top 53 bits
/// of a `u64` are exactly the precision of an `f64` mantissa, so every value is equally likely
/// and 1.0 is never produced.
pub(crate) fn unit_draw() -> f64 {
    (keel_core::codec::rand::next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decay_is_exp_within_its_stated_error() {
        for x in [0.0, 1e-9, 1e-6, 1e-4, 9.99e-4, 1e-3, 0.5, 3.0, 50.0] {
            let err = (decay(x) - (-x).exp()).abs();
            assert!(err <= x * x / 2.0 + 1e-15, "x = {x}: off by {err}");
        }
        // Continuous where the two formulas meet, and never above 1 or below 0.
        assert!((decay(1e-3 - 1e-12) - decay(1e-3)).abs() < 1e-6);
        assert_eq!(decay(0.0), 1.0);
        assert!(decay(1e6) >= 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn events_age_out_one_bucket_at_a_time() {
        let mut w = Window::<1>::new(Duration::from_secs(10), Instant::now());
        w.add(Instant::now(), 0, 5);
        tokio::time::advance(Duration::from_secs(3)).await;
        w.add(Instant::now(), 0, 7);
        assert_eq!(w.totals(Instant::now()), [12]);

        // The first 5 were in bucket 0; at t = 10 s bucket 10 reuses its slot.
        tokio::time::advance(Duration::from_secs(7)).await;
        assert_eq!(w.totals(Instant::now()), [7]);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(w.totals(Instant::now()), [0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_ends_exactly_at_its_boundary() {
        let bucket = Duration::from_secs(1);
        let mut w = Window::<1>::new(10 * bucket, Instant::now());
        w.add(Instant::now(), 0, 5);
        // Within bucket 0 and then within each later one: nothing ages out early.
        tokio::time::advance(bucket - Duration::from_nanos(1)).await;
        w.add(Instant::now(), 0, 1);
        tokio::time::advance(Duration::from_nanos(1)).await;
        w.add(Instant::now(), 0, 2);
        tokio::time::advance(9 * bucket - Duration::from_nanos(1)).await;
        assert_eq!(w.totals(Instant::now()), [8]);
        // Bucket 10 takes bucket 0's slot at its first nanosecond, not later.
        tokio::time::advance(Duration::from_nanos(1)).await;
        assert_eq!(w.totals(Instant::now()), [2]);
    }

    #[tokio::test(start_paused = true)]
    async fn long_idle_clears_everything_and_stale_readings_are_kept() {
        let start = Instant::now();
        let mut w = Window::<2>::new(Duration::from_secs(10), start);
        tokio::time::advance(Duration::from_secs(2)).await;
        w.add(Instant::now(), 1, 3);
        // A reading from before the head still counts, in the newest bucket.
        w.add(start, 0, 1);
        assert_eq!(w.totals(Instant::now()), [1, 3]);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(w.totals(Instant::now()), [0, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_window_does_not_panic() {
        let mut w = Window::<1>::new(Duration::ZERO, Instant::now());
        w.add(Instant::now(), 0, 1);
        assert_eq!(w.totals(Instant::now()), [1]);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(w.totals(Instant::now()), [0]);
    }
}
