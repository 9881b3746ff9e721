#![allow(clippy::unwrap_used)]

use super::*;

const MS: Duration = Duration::from_millis(1);

/// Every variant, with each interesting payload: all 5xx statuses and all gRPC codes.
fn every_failure() -> Vec<Failure> {
    let mut all = vec![
        Failure::ConnectRefused,
        Failure::ResetBeforeWrite,
        Failure::ResetAfterWrite,
        Failure::Timeout,
        Failure::Status503NoBody,
        Failure::GrpcUnavailable,
        Failure::Other,
    ];
    all.extend((500..=599).map(Failure::Status5xx));
    all.extend((0..=16).map(Failure::GrpcOther));
    all
}

/// The specification, as (any route, idempotent route). Written as an exhaustive match so a new
/// variant does not compile until it has a row here.
fn expected(f: Failure) -> (bool, bool) {
    match f {
        Failure::ConnectRefused => (true, true),
        Failure::ResetBeforeWrite => (true, true),
        Failure::Status503NoBody => (true, true),
        Failure::GrpcUnavailable => (true, true),
        Failure::GrpcOther(14) => (true, true),
        Failure::ResetAfterWrite => (false, true),
        Failure::Timeout => (false, true),
        Failure::Status5xx(_) => (false, true),
        Failure::GrpcOther(_) => (false, true),
        Failure::Other => (false, true),
    }
}

#[test]
fn retryable_table_is_exhaustive() {
    for f in every_failure() {
        let (any, idempotent) = expected(f);
        assert_eq!(retryable(f, false, false), any, "{f:?} on any route");
        assert_eq!(retryable(f, true, false), idempotent, "{f:?} on idempotent");
        // Chain stop wins over everything.
        assert!(!retryable(f, false, true), "{f:?} chain retry");
        assert!(!retryable(f, true, true), "{f:?} chain retry, idempotent");
    }
}

#[test]
fn backoff_ceiling_doubles_then_caps_at_max() {
    let cfg = BackoffConfig::default();
    // With a draw just under 1 the delay approaches the ceiling from below.
    let expected_ceilings_ms = [25, 50, 100, 200, 400, 800, 1000, 1000];
    for (attempt, ceiling) in expected_ceilings_ms.into_iter().enumerate() {
        let ceiling = ceiling * MS;
        let d = backoff_with(&cfg, attempt as u32, 0.999);
        assert!(d < ceiling, "attempt {attempt}: {d:?}");
        assert!(d >= ceiling.mul_f64(0.998), "attempt {attempt}: {d:?}");
        assert_eq!(backoff_with(&cfg, attempt as u32, 0.0), Duration::ZERO);
    }
    assert_eq!(backoff_with(&cfg, 0, 0.999), Duration::from_micros(24_975));
    assert_eq!(backoff_with(&cfg, 0, 0.5), Duration::from_micros(12_500));
}

#[test]
fn backoff_survives_extreme_inputs() {
    let cfg = BackoffConfig::default();
    assert!(backoff_with(&cfg, u32::MAX, 0.999) < cfg.max);
    // Out-of-range draws are clamped; the interval stays half-open.
    assert!(backoff_with(&cfg, 0, 1.0) < 25 * MS);
    assert!(backoff_with(&cfg, 0, 7.0) < 25 * MS);
    assert_eq!(backoff_with(&cfg, 0, -1.0), Duration::ZERO);
    assert_eq!(backoff_with(&cfg, 0, f64::NAN), Duration::ZERO);
    let zero = BackoffConfig {
        base: Duration::ZERO,
        ..cfg
    };
    assert_eq!(backoff_with(&zero, 3, 0.9), Duration::ZERO);
}

#[test]
fn random_backoff_stays_in_the_full_jitter_range() {
    let cfg = BackoffConfig::default();
    for attempt in 0..8 {
        let ceiling = (cfg.base * (1 << attempt)).min(cfg.max);
        for _ in 0..1_000 {
            assert!(backoff(&cfg, attempt) < ceiling);
        }
    }
}

#[test]
fn next_delay_stops_when_attempts_are_used_up() {
    let cfg = BackoffConfig::default();
    let plenty = Duration::from_secs(10);
    assert!(next_delay_with(&cfg, 0, plenty, 10 * MS, 0.5).is_some());
    assert!(next_delay_with(&cfg, 1, plenty, 10 * MS, 0.5).is_some());
    // First attempt + 2 retries = 3 attempts: no third retry.
    assert_eq!(next_delay_with(&cfg, 2, plenty, 10 * MS, 0.5), None);
    let single = BackoffConfig {
        max_attempts: 1,
        ..cfg.clone()
    };
    assert_eq!(next_delay_with(&single, 0, plenty, 10 * MS, 0.5), None);
    assert!(next_delay(&cfg, 0, plenty, 10 * MS).unwrap() < 25 * MS);
}

#[test]
fn next_delay_never_sleeps_past_the_deadline() {
    // Enough attempts that only time limits the retries here.
    let cfg = BackoffConfig {
        max_attempts: 10,
        ..BackoffConfig::default()
    };
    // Too little time for even one useful try.
    assert_eq!(next_delay_with(&cfg, 0, 9 * MS, 10 * MS, 0.0), None);
    assert_eq!(
        next_delay_with(&cfg, 0, Duration::ZERO, Duration::ZERO, 0.0),
        None
    );
    // Exactly enough: retry at once.
    assert_eq!(
        next_delay_with(&cfg, 0, 10 * MS, 10 * MS, 0.999),
        Some(Duration::ZERO)
    );
    // Near the deadline the jitter range narrows to what is left after the try.
    let d = next_delay_with(&cfg, 5, 100 * MS, 40 * MS, 0.999).unwrap();
    assert!(d < 60 * MS && d >= 59 * MS, "{d:?}");
    // With room to spare the ordinary ceiling applies.
    let d = next_delay_with(&cfg, 1, Duration::from_secs(5), 40 * MS, 0.999).unwrap();
    assert!(d < 50 * MS && d >= 49 * MS, "{d:?}");
    for _ in 0..1_000 {
        let d = next_delay(&cfg, 5, 100 * MS, 40 * MS).unwrap();
        assert!(d + 40 * MS <= 100 * MS);
    }
}

fn budget(min_per_sec: u32) -> RetryBudget {
    RetryBudget::new(BudgetConfig {
        min_per_sec,
        ..BudgetConfig::default()
    })
}

#[tokio::test(start_paused = true)]
async fn hundred_requests_earn_twenty_retries_plus_the_floor() {
    let b = RetryBudget::new(BudgetConfig::default());
    for _ in 0..100 {
        b.deposit();
    }
    // 20 % of 100, plus 10/s × 10 s of floor.
    assert_eq!(b.stats().available, 120);
    for i in 0..120 {
        assert!(b.try_withdraw(), "retry {i}");
    }
    assert!(!b.try_withdraw());
    assert_eq!(
        b.stats(),
        BudgetStats {
            deposits: 100,
            withdrawals: 120,
            exhausted: 1,
            available: 0
        }
    );
}

#[tokio::test(start_paused = true)]
async fn without_floor_the_twenty_first_retry_is_refused() {
    let b = budget(0);
    for _ in 0..100 {
        b.deposit();
    }
    for _ in 0..20 {
        assert!(b.try_withdraw());
    }
    for _ in 0..3 {
        assert!(!b.try_withdraw());
    }
    assert_eq!(b.stats().exhausted, 3);
    assert_eq!(b.stats().withdrawals, 20);
}

#[tokio::test(start_paused = true)]
async fn fractional_ratio_adds_up_exactly() {
    let b = RetryBudget::new(BudgetConfig {
        ratio: 0.29,
        min_per_sec: 0,
        ..BudgetConfig::default()
    });
    for _ in 0..100 {
        b.deposit();
    }
    // 100 × 0.29 in f64 is 28.999…; the budget must still allow 29.
    assert_eq!(b.stats().available, 29);
}

#[tokio::test(start_paused = true)]
async fn floor_alone_allows_min_per_sec_times_window() {
    let b = RetryBudget::new(BudgetConfig::default());
    for i in 0..100 {
        assert!(b.try_withdraw(), "retry {i}");
    }
    assert!(!b.try_withdraw());
    assert_eq!(b.stats().deposits, 0);
}

#[tokio::test(start_paused = true)]
async fn window_expiry_restores_the_budget() {
    let b = RetryBudget::new(BudgetConfig::default());
    for _ in 0..100 {
        b.deposit();
    }
    while b.try_withdraw() {}
    assert_eq!(b.stats().exhausted, 1);

    // Still exhausted within the window.
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(!b.try_withdraw());

    tokio::time::advance(Duration::from_secs(5)).await;
    let stats = b.stats();
    assert_eq!((stats.deposits, stats.withdrawals), (0, 0));
    assert_eq!(stats.available, 100);
    // The exhaustion count is monotonic.
    assert_eq!(stats.exhausted, 2);
    assert!(b.try_withdraw());
}

#[tokio::test(start_paused = true)]
async fn retries_outliving_their_deposits_overdraw_the_floor() {
    let b = budget(1);
    for _ in 0..100 {
        b.deposit();
    }
    tokio::time::advance(Duration::from_secs(5)).await;
    // 20 earned + 10 floor.
    for _ in 0..30 {
        assert!(b.try_withdraw());
    }
    // The deposits leave the window, the 30 retries are still in it: nothing is available
    // until they leave too.
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(b.stats().available, 0);
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(b.stats().available, 10);
}

#[test]
fn concurrent_deposits_and_withdrawals_keep_the_invariant() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<RetryBudget>();

    let b = RetryBudget::new(BudgetConfig {
        // Real time passes in this test; keep everything inside one window.
        window: Duration::from_secs(3600),
        min_per_sec: 0,
        ..BudgetConfig::default()
    });
    let granted = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..1_000 {
                    b.deposit();
                    if b.try_withdraw() {
                        granted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let stats = b.stats();
    assert_eq!(stats.deposits, 8_000);
    assert_eq!(granted.load(Ordering::Relaxed), 1_600);
    assert_eq!(stats.withdrawals, 1_600);
    assert_eq!(stats.exhausted, 8_000 - 1_600);
}
