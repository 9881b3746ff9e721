//! Priority failover: how much traffic each priority level (cluster, locality) receives, and
//! when a level is in panic.
//!
//! This module owns one pure function, [`distribute`], from the health of each level to a
//! traffic split, plus [`pick_level`] to apply the split to a request. It follows the algorithm
//! in Envoy's load-balancing documentation ("Priority levels", "Overprovisioning factor" and
//! "Panic threshold" in `arch_overview/upstream/load_balancing`), which lets a healthy enough
//! primary keep all traffic, spills load to the next level in proportion as the primary loses
//! endpoints, and returns it as soon as the primary heals.
//!
//! # What is computed
//!
//! For each level `P` with `total` endpoints of which `healthy` are usable:
//!
//! 1. **Health.** `health(P) = min(100, overprovisioning × 100 × healthy / total)`. The
//!    overprovisioning factor (1.4) says a level is provisioned with 40 % headroom, so it can
//!    lose about 28 % of its endpoints (100 / 1.4 ≈ 71.4 % healthy) before it sheds any load.
//!    An empty level has health 0.
//! 2. **Normalised total health.** `N = min(100, Σ health)`: below 100 there is not enough
//!    healthy capacity anywhere to carry all traffic.
//! 3. **Load.** In priority order each level takes `min(left, health(P) × 100 / N)`, where
//!    `left` is what the levels before it did not take. Dividing by `N` is the normalisation:
//!    when the levels together are short of healthy capacity, their shares are scaled up in
//!    proportion to their health so they still sum to 100.
//! 4. **Panic.** Only when `N < 100` (when `N` is 100 the lower levels can absorb everything,
//!    and Envoy disregards panic). Then a non-empty level is in panic when
//!    `healthy / total < panic_threshold`: the balancer should use *all* its endpoints, healthy
//!    or not, because the few healthy ones would be crushed by the load meant for the level
//!    (which is how one failure cascades into an outage).
//! 5. **Total panic.** When *every* non-empty level is in panic (this includes "nothing is
//!    healthy at all"), the load is instead split in proportion to each level's `total`
//!    endpoints, every non-empty level is marked in panic, and the traffic lands evenly on all
//!    endpoints we know. This is what Envoy's implementation does
//!    (`LoadBalancerBase::recalculateLoadInTotalPanic`); its prose docs still say everything
//!    goes to P0 when nothing is healthy, which predates that code.
//!
//! With `panic_threshold = 0` panic is off: if nothing is healthy, all load goes to the first
//! non-empty level, where the balancer finds no healthy endpoint and fails fast (Envoy's
//! "no healthy upstream").
//!
//! # Rounding
//!
//! Loads are computed exactly (in `f64`) and then rounded to whole percents that sum to
//! exactly 100 by the largest-remainder method (floors first, then one more point to the
//! levels with the largest fractions, higher priority first on ties). Envoy instead truncates
//! every health to an integer and gives the rounding leftover to the first level; the two agree
//! on every example in Envoy's docs except that ours reproduces the documented 7 % / 93 % for
//! "5 % and 65 % healthy" where Envoy's code gives 8 % / 92 %.
//!
//! Envoy's "degraded" hosts have no counterpart here: an endpoint is healthy or it is not.

#[cfg(test)]
mod tests;

/// Envoy's default overprovisioning factor (`overprovisioning_factor: 140`): a level is
/// assumed to have 40 % headroom, so it keeps all its traffic until fewer than ~71.4 % of its
/// endpoints are healthy.
pub const DEFAULT_OVERPROVISIONING: f64 = 1.4;

/// Envoy's default panic threshold (`healthy_panic_threshold: 50 %`): when fewer than half of
/// a level's endpoints are healthy, the healthy half could not carry the level's load anyway,
/// and spreading it over every endpoint gives the sick ones a chance to serve some of it.
pub const DEFAULT_PANIC_THRESHOLD: f64 = 0.5;

/// Tolerance when testing whether the normalised total health reached 100: the health values
/// are products of floats, and 70 + 30 must not come out as "not enough" because one of them
/// is 29.999999999999996.
const EPSILON: f64 = 1e-9;

/// Tuning of the priority split.
#[derive(Debug, Clone, PartialEq)]
pub struct PriorityConfig {
    /// Headroom a level is assumed to have; see [`DEFAULT_OVERPROVISIONING`]. Values that are
    /// not finite and positive are treated as the default.
    pub overprovisioning: f64,
    /// Healthy share (0.0–1.0) under which a level is in panic; see
    /// [`DEFAULT_PANIC_THRESHOLD`]. 0 disables panic. Clamped to 0.0–1.0; NaN is treated as
    /// the default.
    pub panic_threshold: f64,
}

impl Default for PriorityConfig {
    fn default() -> Self {
        PriorityConfig {
            overprovisioning: DEFAULT_OVERPROVISIONING,
            panic_threshold: DEFAULT_PANIC_THRESHOLD,
        }
    }
}

/// Health of one priority level: total endpoints and healthy (not ejected, passing checks)
/// endpoints. `healthy` larger than `total` is treated as `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LevelHealth {
    /// Endpoints in the level.
    pub total: usize,
    /// Of those, the ones that may receive traffic outside panic.
    pub healthy: usize,
}

/// The share of traffic each priority level gets, in percent summing to 100 (or all zeros when
/// there are no endpoints at all), and whether each level is in panic mode (then the balancer
/// uses ALL its endpoints, healthy or not, rather than none). Both vectors have one entry per
/// level, in priority order.
#[derive(Debug, Clone, PartialEq)]
pub struct Distribution {
    /// Percent of requests for each level.
    pub percent: Vec<u32>,
    /// Whether the balancer should ignore health in each level. Always false for empty levels.
    pub panic: Vec<bool>,
}

/// Computes the traffic split over `levels` (index 0 = highest priority) as described in the
/// [module documentation](self).
pub fn distribute(cfg: &PriorityConfig, levels: &[LevelHealth]) -> Distribution {
    if let [only] = levels {
        return Distribution {
            percent: vec![if only.total > 0 { 100 } else { 0 }],
            panic: vec![one_level_in_panic(cfg, only)],
        };
    }
    let (overprovisioning, panic_threshold) = settings(cfg);
    distribute_levels(levels, overprovisioning, panic_threshold)
}

/// Whether `only` — the one level there is, which takes all the traffic — is in panic: the
/// common case (every endpoint at one priority), answered without [`distribute`]'s vectors,
/// so a pick allocates nothing for it. Same answer as the general path (a test compares
/// them).
pub fn one_level_in_panic(cfg: &PriorityConfig, only: &LevelHealth) -> bool {
    let (overprovisioning, panic_threshold) = settings(cfg);
    only.total > 0
        && level_health(only, overprovisioning) < 100.0 - EPSILON
        && healthy_share(only) < panic_threshold
}

/// The overprovisioning factor and panic threshold of `cfg`, defaults where unusable.
fn settings(cfg: &PriorityConfig) -> (f64, f64) {
    let overprovisioning = if cfg.overprovisioning.is_finite() && cfg.overprovisioning > 0.0 {
        cfg.overprovisioning
    } else {
        DEFAULT_OVERPROVISIONING
    };
    let panic_threshold = if cfg.panic_threshold.is_nan() {
        DEFAULT_PANIC_THRESHOLD
    } else {
        cfg.panic_threshold.clamp(0.0, 1.0)
    };
    (overprovisioning, panic_threshold)
}

fn distribute_levels(
    levels: &[LevelHealth],
    overprovisioning: f64,
    panic_threshold: f64,
) -> Distribution {
    let mut panic = vec![false; levels.len()];
    let endpoints: usize = levels.iter().map(|l| l.total).sum();
    if endpoints == 0 {
        return Distribution {
            percent: vec![0; levels.len()],
            panic,
        };
    }

    let health: Vec<f64> = levels
        .iter()
        .map(|l| level_health(l, overprovisioning))
        .collect();
    let normalized_total = health.iter().sum::<f64>().min(100.0);

    if normalized_total < 100.0 - EPSILON {
        for (flag, level) in panic.iter_mut().zip(levels) {
            *flag = level.total > 0 && healthy_share(level) < panic_threshold;
        }
        let every_level_in_panic = levels
            .iter()
            .zip(&panic)
            .all(|(level, &in_panic)| level.total == 0 || in_panic);
        if every_level_in_panic {
            // Total panic: health says nothing useful any more, so spread by size.
            let shares: Vec<f64> = levels
                .iter()
                .map(|l| 100.0 * l.total as f64 / endpoints as f64)
                .collect();
            return Distribution {
                percent: round_to_100(&shares),
                panic,
            };
        }
    }

    if normalized_total <= 0.0 {
        // Nothing healthy and panic disabled: send everything to the first level that has
        // endpoints, where the balancer finds none healthy and fails the request at once.
        let mut percent = vec![0; levels.len()];
        if let Some(first) = levels.iter().position(|l| l.total > 0) {
            percent[first] = 100;
        }
        return Distribution { percent, panic };
    }

    let mut left = 100.0_f64;
    let shares: Vec<f64> = health
        .iter()
        .map(|&h| {
            let load = (h * 100.0 / normalized_total).min(left).max(0.0);
            left -= load;
            load
        })
        .collect();
    Distribution {
        percent: round_to_100(&shares),
        panic,
    }
}

/// Picks a level for one request given a uniform draw in `[0, 100)`: level `i` is chosen when
/// the draw falls in its band of the cumulative percentages, so a level with 0 % is never
/// chosen. `None` when there is nothing to pick (all zeros) or the draw is out of range.
pub fn pick_level(d: &Distribution, draw: u32) -> Option<usize> {
    let mut upper = 0u32;
    for (level, &percent) in d.percent.iter().enumerate() {
        upper = upper.saturating_add(percent);
        if draw < upper {
            return Some(level);
        }
    }
    None
}

/// `min(100, overprovisioning × 100 × healthy / total)`, 0 for an empty level.
fn level_health(level: &LevelHealth, overprovisioning: f64) -> f64 {
    if level.total == 0 {
        return 0.0;
    }
    (overprovisioning * 100.0 * healthy_share(level)).min(100.0)
}

fn healthy_share(level: &LevelHealth) -> f64 {
    if level.total == 0 {
        return 0.0;
    }
    level.healthy.min(level.total) as f64 / level.total as f64
}

/// Rounds non-negative shares that sum to (about) 100 to whole percents summing to exactly 100:
/// floors, then one extra point each to the largest remainders (earlier level first on a tie).
/// Only levels with a positive share receive extra points, so a level with nothing stays at 0.
fn round_to_100(shares: &[f64]) -> Vec<u32> {
    // Shares are within 0..=100 by construction, so the casts cannot truncate.
    let mut percent: Vec<u32> = shares.iter().map(|s| s.floor() as u32).collect();
    let assigned: u32 = percent.iter().sum();
    let mut leftover = 100u32.saturating_sub(assigned);

    let mut candidates: Vec<usize> = (0..shares.len()).filter(|&i| shares[i] > 0.0).collect();
    // Stable sort keeps priority order among equal remainders.
    candidates.sort_by(|&a, &b| {
        let (ra, rb) = (shares[a] - shares[a].floor(), shares[b] - shares[b].floor());
        rb.total_cmp(&ra)
    });
    // The leftover is the sum of the fractions, so it never exceeds the number of candidates;
    // cycling only guards against float error.
    for &i in candidates.iter().cycle() {
        if leftover == 0 {
            break;
        }
        percent[i] += 1;
        leftover -= 1;
    }
    percent
}
