//! Live tests on the machine running them: real cgroup files, real affinity, real threads.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;

use keel_runtime::{
    RuntimeConfig, ShardMode, build_runtime, current_affinity, detect, run_sharded,
};

#[test]
fn host_detection_is_within_the_affinity_mask() {
    let sizing = detect(&RuntimeConfig::default());
    let affinity = current_affinity().unwrap();
    assert!(sizing.workers >= 1, "{sizing:?}");
    assert!(sizing.workers <= affinity.len(), "{sizing:?}");
    assert!(sizing.shards.is_empty());
}

#[test]
fn build_runtime_uses_the_configured_worker_count() {
    let cfg = RuntimeConfig {
        worker_threads: Some(3),
        ..Default::default()
    };
    let sizing = detect(&cfg);
    let rt = build_runtime(&cfg, &sizing).unwrap();
    assert_eq!(rt.handle().metrics().num_workers(), 3);
    let name = rt.block_on(async {
        tokio::spawn(async { std::thread::current().name().map(str::to_owned) })
            .await
            .unwrap()
    });
    assert_eq!(name.as_deref(), Some("keel-worker"));
}

#[test]
fn per_core_shards_run_on_distinct_named_threads() {
    let cfg = RuntimeConfig {
        shards: ShardMode::PerCore,
        ..Default::default()
    };
    let sizing = detect(&cfg);
    assert!(!sizing.shards.is_empty(), "{sizing:?}");

    let handles = run_sharded(&sizing, &cfg, |plan| async move {
        // `Rc` is not `Send`: the shard future runs where it was created.
        let local = std::rc::Rc::new(plan.index);
        tokio::task::yield_now().await;
        let thread = std::thread::current().name().map(str::to_owned);
        (*local, thread)
    })
    .unwrap();

    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(results.len(), sizing.shards.len());
    let names: HashSet<_> = results.iter().map(|(_, name)| name.clone()).collect();
    assert_eq!(
        names.len(),
        results.len(),
        "threads must be distinct: {results:?}"
    );
    for (i, (index, name)) in results.into_iter().enumerate() {
        assert_eq!(index, i);
        assert_eq!(name, Some(format!("keel-shard-{i}")));
    }
}
