#![allow(clippy::unwrap_used)]

use std::time::Duration;

use super::*;

/// A breaker that rejects as soon as there is any evidence, so the formula can be checked
/// from the first request.
fn eager(max_reject_probability: f64) -> Breaker {
    Breaker::new(BreakerConfig {
        min_requests: 0,
        max_reject_probability,
        ..BreakerConfig::default()
    })
}

/// Sends one request that the upstream fails, forcing admission with a draw of 1.0 (above
/// any probability) so the history is exactly what the test says it is.
fn failed_request(b: &Breaker) {
    b.admit_with(1.0).unwrap().failure();
}

#[test]
fn is_send_sync_and_matchable_through_a_boxed_error() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Breaker>();
    send_sync::<Admitted>();
    send_sync::<BreakerOpen>();

    let err: keel_core::BoxError = Box::new(BreakerOpen { probability: 0.5 });
    assert!(keel_core::is_caused_by::<BreakerOpen>(err.as_ref()));
    assert_eq!(
        err.to_string(),
        "circuit breaker open for this upstream: rejected locally (reject probability 0.50)"
    );
}

#[tokio::test(start_paused = true)]
async fn healthy_traffic_never_rejects() {
    let b = Breaker::new(BreakerConfig::default());
    for _ in 0..2_000 {
        b.admit().unwrap().success();
        tokio::time::advance(Duration::from_millis(7)).await;
    }
    let stats = b.stats();
    assert_eq!(stats.reject_probability, 0.0);
    assert_eq!(stats.local_rejects, 0);
    assert_eq!(stats.requests, stats.accepts);
}

#[tokio::test(start_paused = true)]
async fn total_failure_climbs_to_n_over_n_plus_one_then_the_cap() {
    let b = eager(0.9);
    for n in 0..200u64 {
        let expected = (n as f64 / (n as f64 + 1.0)).min(0.9);
        assert_eq!(b.reject_probability(), expected, "after {n} failures");
        failed_request(&b);
    }
    assert_eq!(b.reject_probability(), 0.9);
}

#[tokio::test(start_paused = true)]
async fn half_accepted_with_k_2_never_throttles() {
    let b = eager(0.9);
    for _ in 0..500 {
        b.admit_with(0.0).unwrap().success();
        assert_eq!(b.reject_probability(), 0.0);
        // K·accepts = requests exactly here: the formula's zero boundary.
        b.admit_with(0.0).unwrap().failure();
        assert_eq!(b.reject_probability(), 0.0);
    }
    assert_eq!(b.stats().local_rejects, 0);
}

#[tokio::test(start_paused = true)]
async fn probability_returns_to_zero_once_failures_leave_the_window() {
    let b = Breaker::new(BreakerConfig::default());
    for _ in 0..100 {
        failed_request(&b);
    }
    assert_eq!(b.reject_probability(), 0.9);

    // Halfway through the window the failures are still remembered.
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(b.reject_probability(), 0.9);

    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(b.reject_probability(), 0.0);
    assert_eq!(b.stats().requests, 0);
    b.admit_with(0.0).unwrap().success();
}

#[tokio::test(start_paused = true)]
async fn recovery_lowers_the_probability_as_accepts_return() {
    let b = Breaker::new(BreakerConfig::default());
    for _ in 0..100 {
        failed_request(&b);
    }
    let throttled = b.reject_probability();
    // The upstream heals: what gets through is accepted.
    for _ in 0..100 {
        if let Ok(ok) = b.admit_with(0.95) {
            ok.success();
        }
    }
    assert!(b.reject_probability() < throttled);
}

#[tokio::test(start_paused = true)]
async fn below_min_requests_never_rejects() {
    let b = Breaker::new(BreakerConfig::default());
    for _ in 0..19 {
        assert_eq!(b.reject_probability(), 0.0);
        b.admit_with(0.0).unwrap().failure();
    }
    assert_eq!(b.reject_probability(), 0.0);
    failed_request(&b);
    // 20 requests, no accepts: 20/21, capped.
    assert_eq!(b.reject_probability(), 0.9);
    assert!(b.admit_with(0.0).is_err());
}

#[tokio::test(start_paused = true)]
async fn draw_is_compared_strictly_below_the_probability() {
    let b = eager(1.0);
    for _ in 0..3 {
        failed_request(&b);
    }
    // 3 requests, 0 accepts: 3/4, exactly representable.
    assert_eq!(b.reject_probability(), 0.75);
    b.admit_with(0.75).unwrap().failure();

    // Now 4/5; a draw just under it is rejected, and the error carries the probability.
    let p = b.reject_probability();
    assert_eq!(p, 0.8);
    assert_eq!(
        b.admit_with(0.8 - 1e-12).unwrap_err(),
        BreakerOpen { probability: 0.8 }
    );
}

#[tokio::test(start_paused = true)]
async fn local_rejects_are_counted_and_still_count_as_requests() {
    let b = eager(0.9);
    for _ in 0..10 {
        failed_request(&b);
    }
    for _ in 0..5 {
        assert!(b.admit_with(0.0).is_err());
    }
    let stats = b.stats();
    assert_eq!(stats.local_rejects, 5);
    assert_eq!(stats.requests, 15);
    assert_eq!(stats.accepts, 0);

    // The counter is monotonic: it survives the window.
    tokio::time::advance(Duration::from_secs(60)).await;
    let stats = b.stats();
    assert_eq!(stats.local_rejects, 5);
    assert_eq!(stats.requests, 0);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_token_counts_nothing() {
    let b = eager(0.9);
    drop(b.admit_with(0.0).unwrap());
    let stats = b.stats();
    assert_eq!((stats.requests, stats.accepts), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_burst_in_flight_before_any_answer_is_not_mistaken_for_refusals() {
    let b = Breaker::new(BreakerConfig::default());
    // 64 concurrent calls to a fresh upstream, none answered yet.
    let in_flight: Vec<Admitted> = (0..64).map(|_| b.admit_with(0.0).unwrap()).collect();
    assert_eq!(b.reject_probability(), 0.0);
    assert!(b.admit_with(0.0).is_ok(), "the 65th call is admitted");
    for t in in_flight {
        t.success();
    }
    assert_eq!(b.stats().accepts, 64);
    assert_eq!(b.reject_probability(), 0.0);
}

#[test]
fn concurrent_admits_from_several_threads() {
    let b = Breaker::new(BreakerConfig {
        // Real time passes in this test; keep everything inside one window.
        window: Duration::from_secs(3600),
        ..BreakerConfig::default()
    });
    std::thread::scope(|s| {
        for _ in 0..8 {
            let b = b.clone();
            s.spawn(move || {
                // One failure in four keeps K·accepts well above requests at every
                // interleaving, so no rejection is legitimate here.
                for i in 0..5_000 {
                    let t = b.admit().unwrap();
                    if i % 4 == 3 { t.failure() } else { t.success() }
                }
            });
        }
    });
    let stats = b.stats();
    assert_eq!(stats.requests, 40_000);
    assert_eq!(stats.accepts, 30_000);
    assert_eq!(stats.local_rejects, 0);
    assert_eq!(stats.reject_probability, 0.0);
}

#[test]
fn unit_draw_stays_in_the_half_open_interval() {
    for _ in 0..10_000 {
        let d = unit_draw();
        assert!((0.0..1.0).contains(&d), "{d}");
    }
}
