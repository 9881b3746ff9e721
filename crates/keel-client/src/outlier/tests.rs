use std::time::Duration;

use tokio::time::{Instant, advance};

use super::{OutlierConfig, OutlierDetector, OutlierStats};

const SECS: fn(u64) -> Duration = Duration::from_secs;

fn detector(endpoints: u32) -> OutlierDetector<u32> {
    let d = OutlierDetector::new(OutlierConfig::default());
    d.set_endpoints(0..endpoints);
    d
}

/// Reports `n` failures for `key`; returns what the last report returned.
fn fail(d: &OutlierDetector<u32>, key: u32, n: u32) -> Option<Instant> {
    let mut last = None;
    for _ in 0..n {
        last = d.report(&key, false);
    }
    last
}

#[tokio::test(start_paused = true)]
async fn five_consecutive_failures_eject() {
    let d = detector(3);
    assert_eq!(fail(&d, 0, 4), None, "four failures are not enough");
    assert!(!d.is_ejected(&0));

    let until = fail(&d, 0, 1).expect("the fifth failure ejects");
    assert_eq!(until, Instant::now() + SECS(30));
    assert!(d.is_ejected(&0));
    assert_eq!(d.ejected(), vec![0]);
    assert!(!d.is_ejected(&1));
}

#[tokio::test(start_paused = true)]
async fn a_success_resets_the_run() {
    let d = detector(3);
    fail(&d, 0, 4);
    assert_eq!(d.report(&0, true), None);
    assert_eq!(fail(&d, 0, 4), None, "4 + success + 4 is not 5 in a row");
    assert!(!d.is_ejected(&0));
    assert!(fail(&d, 0, 1).is_some());
}

#[tokio::test(start_paused = true)]
async fn ejection_ends_lazily_when_its_time_passes() {
    let d = detector(3);
    fail(&d, 0, 5);
    advance(SECS(29)).await;
    assert!(d.is_ejected(&0));
    advance(SECS(1)).await;
    assert!(!d.is_ejected(&0), "back at exactly base_ejection");
    assert!(d.ejected().is_empty());
    assert_eq!(d.stats().currently_ejected, 0);
}

#[tokio::test(start_paused = true)]
async fn reports_while_ejected_are_ignored() {
    let d = detector(3);
    fail(&d, 0, 5);
    // In-flight requests finishing after the ejection must not extend it or pre-load the next run.
    assert_eq!(fail(&d, 0, 10), None);
    advance(SECS(30)).await;
    assert!(!d.is_ejected(&0));
    assert_eq!(
        fail(&d, 0, 4),
        None,
        "a fresh run starts after the ejection"
    );
    assert_eq!(d.stats().ejections_total, 1);
}

#[tokio::test(start_paused = true)]
async fn ejection_time_grows_with_each_ejection_up_to_the_cap() {
    let d = detector(3);
    // Each ejection is followed immediately by five more failures, so no decay applies:
    // 30 s, 60 s, 90 s, …, 300 s, then 300 s again (10 × 30 s reaches max_ejection).
    let mut expected = Vec::new();
    let mut got = Vec::new();
    for n in 1..=12u64 {
        let until = fail(&d, 0, 5).expect("ejected");
        let length = until - Instant::now();
        got.push(length);
        expected.push(SECS((30 * n).min(300)));
        advance(length).await;
    }
    assert_eq!(got, expected);
}

#[tokio::test(start_paused = true)]
async fn ejection_count_decays_while_the_endpoint_behaves() {
    let d = detector(3);
    // First ejection: 30 s. Second, straight after: 60 s.
    fail(&d, 0, 5);
    advance(SECS(30)).await;
    let until = fail(&d, 0, 5).expect("ejected");
    assert_eq!(until - Instant::now(), SECS(60));
    advance(SECS(60)).await;

    // Count is 2. One decay step (30 s) in service brings it to 1: the next ejection is
    // 2 × 30 s = 60 s instead of 3 × 30 s = 90 s.
    advance(SECS(30)).await;
    let until = fail(&d, 0, 5).expect("ejected");
    assert_eq!(until - Instant::now(), SECS(60));
    advance(SECS(60)).await;

    // Count is 2 again. 29 s is not a full step; but steps accrue across reads, so 29 s + 31 s
    // are two steps and the count is back to 0: a first-time 30 s ejection.
    advance(SECS(29)).await;
    assert!(!d.is_ejected(&0));
    advance(SECS(31)).await;
    let until = fail(&d, 0, 5).expect("ejected");
    assert_eq!(until - Instant::now(), SECS(30));
}

#[tokio::test(start_paused = true)]
async fn decay_starts_from_the_cap_without_wasted_steps() {
    let d = detector(3);
    // Twelve back-to-back ejections: the count stops at 10 (300 s), not 12.
    for _ in 0..12 {
        let until = fail(&d, 0, 5).expect("ejected");
        advance(until - Instant::now()).await;
    }
    // Two decay steps bring the count to 8, so the next ejection is 9 × 30 s = 270 s. Had the
    // count kept growing to 12, it would still be at 10 and the ejection still 300 s.
    advance(SECS(60)).await;
    let until = fail(&d, 0, 5).expect("ejected");
    assert_eq!(until - Instant::now(), SECS(270));
}

#[tokio::test(start_paused = true)]
async fn ten_percent_of_ten_endpoints_is_one() {
    let d = detector(10);
    assert!(fail(&d, 0, 5).is_some());
    assert_eq!(fail(&d, 1, 5), None, "a second ejection would exceed 10 %");
    assert_eq!(
        fail(&d, 1, 3),
        None,
        "a longer run is still refused, and counted once"
    );
    assert_eq!(
        d.stats(),
        OutlierStats {
            ejections_total: 1,
            currently_ejected: 1,
            ejections_skipped_by_cap: 1,
        }
    );
    assert_eq!(d.ejected(), vec![0]);

    // Once endpoint 0 is back there is room: endpoint 1's next failure ejects it.
    advance(SECS(30)).await;
    assert!(fail(&d, 1, 1).is_some());
    assert_eq!(d.ejected(), vec![1]);
}

#[tokio::test(start_paused = true)]
async fn small_sets_may_always_eject_one() {
    // floor(3 × 10 / 100) = 0, raised to 1: with Envoy's strict cap nothing could be ejected.
    let d = detector(3);
    assert!(fail(&d, 2, 5).is_some());
    assert_eq!(fail(&d, 1, 5), None);
    assert_eq!(d.stats().ejections_skipped_by_cap, 1);

    let d = detector(2);
    assert!(fail(&d, 0, 5).is_some());
}

#[tokio::test(start_paused = true)]
async fn the_only_endpoint_is_never_ejected() {
    let d = detector(1);
    assert_eq!(fail(&d, 0, 50), None);
    assert!(!d.is_ejected(&0));
    assert_eq!(d.stats().ejections_skipped_by_cap, 1);
}

#[tokio::test(start_paused = true)]
async fn percent_cap_scales_with_the_set() {
    let d = OutlierDetector::new(OutlierConfig {
        max_ejection_percent: 50,
        ..OutlierConfig::default()
    });
    d.set_endpoints(0..4u32);
    assert!(fail(&d, 0, 5).is_some());
    assert!(fail(&d, 1, 5).is_some());
    assert_eq!(fail(&d, 2, 5), None, "floor(4 × 50 / 100) = 2");
}

#[tokio::test(start_paused = true)]
async fn set_endpoints_keeps_survivors_and_drops_the_removed() {
    // No cap in the way: this test is about membership.
    let d = OutlierDetector::new(OutlierConfig {
        max_ejection_percent: 100,
        ..OutlierConfig::default()
    });
    d.set_endpoints(0..3u32);
    fail(&d, 0, 5);
    fail(&d, 1, 4);

    d.set_endpoints([0, 1, 7]);
    assert!(d.is_ejected(&0), "a survivor keeps its ejection");
    assert!(fail(&d, 1, 1).is_some(), "and its run of failures");
    assert!(!d.is_ejected(&7), "a new endpoint starts healthy");

    d.set_endpoints([2, 7]);
    assert!(
        d.ejected().is_empty(),
        "removed endpoints take their ejections with them"
    );
    assert_eq!(
        d.report(&0, false),
        None,
        "reports for unknown keys are ignored"
    );

    d.set_endpoints([0, 2, 7]);
    assert!(!d.is_ejected(&0));
    assert_eq!(
        fail(&d, 0, 4),
        None,
        "a returning endpoint starts with a clean slate"
    );
    // Its ejection count was forgotten too: a first ejection again.
    let until = fail(&d, 0, 1).expect("ejected");
    assert_eq!(until - Instant::now(), SECS(30));
}

#[tokio::test(start_paused = true)]
async fn zero_consecutive_failures_disables_ejection() {
    let d = OutlierDetector::new(OutlierConfig {
        consecutive_failures: 0,
        ..OutlierConfig::default()
    });
    d.set_endpoints(0..10u32);
    assert_eq!(fail(&d, 0, 100), None);
    assert_eq!(d.stats(), OutlierStats::default());
}

#[test]
fn detector_is_send_sync_and_debug() {
    fn check<T: Send + Sync + std::fmt::Debug>() {}
    check::<OutlierDetector<String>>();
    let d = OutlierDetector::<std::net::SocketAddr>::new(OutlierConfig::default());
    assert!(format!("{d:?}").contains("OutlierDetector"));
}
