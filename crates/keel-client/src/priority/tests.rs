//! Worked examples. Each comment writes out the arithmetic with the defaults: overprovisioning
//! 1.4, panic threshold 50 %.

use super::{
    DEFAULT_OVERPROVISIONING, Distribution, LevelHealth, PriorityConfig, distribute,
    distribute_levels, one_level_in_panic, pick_level,
};

fn level(healthy: usize, total: usize) -> LevelHealth {
    LevelHealth { total, healthy }
}

fn split(levels: &[LevelHealth]) -> Distribution {
    distribute(&PriorityConfig::default(), levels)
}

fn dist(percent: &[u32], panic: &[bool]) -> Distribution {
    Distribution {
        percent: percent.to_vec(),
        panic: panic.to_vec(),
    }
}

#[test]
fn defaults_are_envoys() {
    let cfg = PriorityConfig::default();
    assert_eq!(cfg.overprovisioning, DEFAULT_OVERPROVISIONING);
    assert_eq!(cfg.overprovisioning, 1.4);
    assert_eq!(cfg.panic_threshold, 0.5);
}

#[test]
fn healthy_primary_keeps_everything() {
    // health(P0) = min(100, 1.4 × 100 × 10/10) = 100 → N = 100 → P0 takes 100, P1 nothing.
    assert_eq!(
        split(&[level(10, 10), level(10, 10)]),
        dist(&[100, 0], &[false, false])
    );
}

#[test]
fn overprovisioning_absorbs_moderate_loss() {
    // 80 % healthy: 1.4 × 80 = 112, capped at 100 → P0 still takes 100.
    assert_eq!(
        split(&[level(8, 10), level(10, 10)]),
        dist(&[100, 0], &[false, false])
    );
    // Envoy's table: 72 % → 1.4 × 72 = 100.8 → 100 / 0; 71 % → 99.4 → 99.4 / 0.6, which
    // rounds (largest remainder) to 99 / 1.
    assert_eq!(split(&[level(72, 100), level(1, 1)]).percent, [100, 0]);
    assert_eq!(split(&[level(71, 100), level(1, 1)]).percent, [99, 1]);
}

#[test]
fn load_spills_in_proportion() {
    // 60 % healthy: health(P0) = 1.4 × 60 = 84, health(P1) = 100, N = min(100, 184) = 100.
    // P0 = min(100, 84 × 100 / 100) = 84; P1 = min(100 − 84, 100) = 16.
    assert_eq!(
        split(&[level(6, 10), level(10, 10)]),
        dist(&[84, 16], &[false, false])
    );
    // 25 % healthy: 1.4 × 25 = 35 → 35 / 65 (Envoy's table).
    assert_eq!(split(&[level(1, 4), level(4, 4)]).percent, [35, 65]);
}

#[test]
fn dead_primary_sends_everything_down() {
    // health(P0) = 0, health(P1) = 100, N = 100 → 0 / 100. N is 100, so no panic: P1 can
    // carry it all, and P0 is simply skipped.
    assert_eq!(
        split(&[level(0, 10), level(10, 10)]),
        dist(&[0, 100], &[false, false])
    );
}

#[test]
fn both_half_healthy() {
    // health = 1.4 × 50 = 70 each, Σ = 140, N = min(100, 140) = 100: enough capacity overall,
    // so no normalisation and no panic. P0 = 70, P1 = min(100 − 70, 70) = 30.
    assert_eq!(
        split(&[level(5, 10), level(5, 10)]),
        dist(&[70, 30], &[false, false])
    );
}

#[test]
fn normalisation_scales_shares_up_when_capacity_is_short() {
    // health(P0) = 1.4 × 50 = 70, health(P1) = 1.4 × 10 = 14, N = 84 < 100.
    // P0 = 70 × 100 / 84 = 83.33…, P1 = 14 × 100 / 84 = 16.66… → 83 / 17.
    // Panic is checked because N < 100: P0 at 50 % is not below 50 %; P1 at 10 % is.
    assert_eq!(
        split(&[level(5, 10), level(1, 10)]),
        dist(&[83, 17], &[false, true])
    );
    // Envoy's table: 5 % and 65 % healthy → health 7 and 91, N = 98,
    // P0 = 700 / 98 = 7.14…, P1 = 9100 / 98 = 92.86… → 7 / 93; only P0 is in panic.
    assert_eq!(
        split(&[level(1, 20), level(13, 20)]),
        dist(&[7, 93], &[true, false])
    );
}

#[test]
fn three_levels_spill_in_order() {
    // health 70, 14, 100 → N = 100. P0 = 70, P1 = min(30, 14) = 14, P2 = min(16, 100) = 16.
    assert_eq!(
        split(&[level(5, 10), level(1, 10), level(10, 10)]),
        dist(&[70, 14, 16], &[false, false, false])
    );
}

#[test]
fn every_level_in_panic_spreads_by_size() {
    // Envoy's table: 25 % and 25 % → health 35 + 35, N = 70 < 100; both levels are below 50 %,
    // so this is total panic: split by endpoint count, 4 : 4 → 50 / 50, both in panic.
    assert_eq!(
        split(&[level(1, 4), level(1, 4)]),
        dist(&[50, 50], &[true, true])
    );
    // Nothing healthy: N = 0, every level in panic. Sizes 4 and 6 → 40 / 60.
    assert_eq!(
        split(&[level(0, 4), level(0, 6)]),
        dist(&[40, 60], &[true, true])
    );
    // Sizes 1 and 2 → 33.33… / 66.66… → floors 33 + 66, the spare point goes to the larger
    // remainder → 33 / 67.
    assert_eq!(
        split(&[level(0, 1), level(0, 2)]),
        dist(&[33, 67], &[true, true])
    );
    // An empty level neither receives load nor counts against "every level in panic".
    assert_eq!(
        split(&[level(0, 0), level(0, 3)]),
        dist(&[0, 100], &[false, true])
    );
}

#[test]
fn panic_disabled_fails_fast_on_the_first_level() {
    let cfg = PriorityConfig {
        panic_threshold: 0.0,
        ..PriorityConfig::default()
    };
    // Nothing healthy, panic off: all load to P0, no panic, so the balancer finds no healthy
    // endpoint and fails the request at once.
    assert_eq!(
        distribute(&cfg, &[level(0, 4), level(0, 6)]),
        dist(&[100, 0], &[false, false])
    );
    assert_eq!(
        distribute(&cfg, &[level(0, 0), level(0, 6)]),
        dist(&[0, 100], &[false, false])
    );
    // Short of capacity but panic off: plain normalisation, 25 % / 25 % → 50 / 50, no panic.
    assert_eq!(
        distribute(&cfg, &[level(1, 4), level(1, 4)]),
        dist(&[50, 50], &[false, false])
    );
}

#[test]
fn traffic_returns_when_the_primary_heals() {
    let p1 = level(10, 10);
    let steps = [
        (10, [100, 0]), // healthy
        (6, [84, 16]),  // losing endpoints: 1.4 × 60 = 84
        (0, [0, 100]),  // dead
        (6, [84, 16]),  // coming back
        (8, [100, 0]),  // 1.4 × 80 ≥ 100: all traffic is home again
        (10, [100, 0]),
    ];
    for (healthy, expected) in steps {
        assert_eq!(
            split(&[level(healthy, 10), p1]).percent,
            expected,
            "P0 {healthy}/10 healthy"
        );
    }
}

#[test]
fn single_level() {
    // Healthy: 100.
    assert_eq!(split(&[level(3, 3)]), dist(&[100], &[false]));
    // 60 % healthy: health 84, N = 84 → 84 × 100 / 84 = 100; 60 % is not below 50 %.
    assert_eq!(split(&[level(6, 10)]), dist(&[100], &[false]));
    // 40 % healthy: health 56, N = 56 < 100, 40 % < 50 % → the only level is in panic.
    assert_eq!(split(&[level(4, 10)]), dist(&[100], &[true]));
    // Nothing healthy: panic, use every endpoint rather than none.
    assert_eq!(split(&[level(0, 10)]), dist(&[100], &[true]));
}

#[test]
fn empty_sets() {
    assert_eq!(split(&[]), dist(&[], &[]));
    let d = split(&[level(0, 0), level(0, 0)]);
    assert_eq!(d, dist(&[0, 0], &[false, false]));
    assert_eq!(pick_level(&d, 0), None);
    // An empty primary is skipped.
    assert_eq!(split(&[level(0, 0), level(2, 2)]).percent, [0, 100]);
}

#[test]
fn overprovisioning_is_configurable() {
    let cfg = PriorityConfig {
        overprovisioning: 1.0,
        ..PriorityConfig::default()
    };
    // No headroom: 90 % healthy → health 90 → 90 / 10.
    assert_eq!(
        distribute(&cfg, &[level(9, 10), level(1, 1)]).percent,
        [90, 10]
    );
    // A nonsensical factor falls back to the default rather than poisoning the maths.
    let bad = PriorityConfig {
        overprovisioning: f64::NAN,
        ..PriorityConfig::default()
    };
    assert_eq!(
        distribute(&bad, &[level(6, 10), level(1, 1)]).percent,
        [84, 16]
    );
}

#[test]
fn healthy_above_total_counts_as_total() {
    assert_eq!(split(&[level(20, 10), level(1, 1)]).percent, [100, 0]);
}

#[test]
fn every_split_sums_to_100_and_panics_only_non_empty_levels() {
    for t0 in 0..=5 {
        for t1 in 0..=5 {
            for t2 in 0..=3 {
                for h0 in 0..=t0 {
                    for h1 in 0..=t1 {
                        for h2 in 0..=t2 {
                            let levels = [level(h0, t0), level(h1, t1), level(h2, t2)];
                            let d = split(&levels);
                            let sum: u32 = d.percent.iter().sum();
                            let expected = if t0 + t1 + t2 == 0 { 0 } else { 100 };
                            assert_eq!(sum, expected, "{levels:?} → {d:?}");
                            for (l, (&p, &panic)) in
                                levels.iter().zip(d.percent.iter().zip(&d.panic))
                            {
                                if l.total == 0 {
                                    assert_eq!((p, panic), (0, false), "{levels:?} → {d:?}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn pick_level_boundaries() {
    let d = dist(&[84, 16], &[false, false]);
    assert_eq!(pick_level(&d, 0), Some(0));
    assert_eq!(pick_level(&d, 83), Some(0));
    assert_eq!(pick_level(&d, 84), Some(1));
    assert_eq!(pick_level(&d, 99), Some(1));
    assert_eq!(pick_level(&d, 100), None, "out of range");

    // Levels with 0 % are never picked, at either end or in the middle.
    assert_eq!(pick_level(&dist(&[0, 100], &[false; 2]), 0), Some(1));
    assert_eq!(pick_level(&dist(&[100, 0], &[false; 2]), 99), Some(0));
    let gap = dist(&[50, 0, 50], &[false; 3]);
    assert_eq!(pick_level(&gap, 49), Some(0));
    assert_eq!(pick_level(&gap, 50), Some(2));

    assert_eq!(pick_level(&dist(&[], &[]), 0), None);
}

#[test]
fn draws_follow_the_percentages() {
    // Every draw in [0, 100) lands in exactly the number of slots its level owns.
    let d = split(&[level(5, 10), level(1, 10), level(10, 10)]); // 70 / 14 / 16
    let mut counts = [0u32; 3];
    for draw in 0..100 {
        let level = pick_level(&d, draw).expect("a level");
        counts[level] += 1;
    }
    assert_eq!(counts.to_vec(), d.percent);
}

#[test]
fn the_single_level_shortcut_agrees_with_the_general_split() {
    for (over, threshold) in [(1.4, 0.5), (1.0, 0.0), (2.0, 1.0), (1.4, 0.7)] {
        let cfg = PriorityConfig {
            overprovisioning: over,
            panic_threshold: threshold,
        };
        for total in 0..=20 {
            for healthy in 0..=total {
                let levels = [level(healthy, total)];
                assert_eq!(
                    distribute(&cfg, &levels),
                    distribute_levels(&levels, over, threshold),
                    "{healthy}/{total} healthy, overprovisioning {over}, threshold {threshold}"
                );
                // The same level behind empty higher-priority ones — what a pick over
                // endpoints that all have priority 2 asks — takes everything the same way.
                let behind = [level(0, 0), level(0, 0), level(healthy, total)];
                let general = distribute_levels(&behind, over, threshold);
                if total > 0 {
                    assert_eq!(general.percent, [0, 0, 100], "{healthy}/{total}");
                }
                assert_eq!(
                    general.panic[2],
                    one_level_in_panic(&cfg, &levels[0]),
                    "{healthy}/{total} healthy, overprovisioning {over}, threshold {threshold}"
                );
            }
        }
    }
}
