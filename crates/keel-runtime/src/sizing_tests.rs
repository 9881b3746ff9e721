//! The decision rules, one spec per rule.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use super::*;
use crate::{CgroupVersion, NumaNode};

fn quota(version: CgroupVersion, quota_us: u64, period_us: u64) -> Option<CpuLimit> {
    Some(CpuLimit {
        version,
        quota_us,
        period_us,
        path: PathBuf::from("/sys/fs/cgroup/cpu.max"),
    })
}

fn cpus(n: usize) -> Vec<usize> {
    (0..n).collect()
}

/// node0 = 0-3, node1 = 4-7.
fn two_nodes() -> Topology {
    Topology {
        online: cpus(8),
        nodes: vec![
            NumaNode {
                id: 0,
                cpus: vec![0, 1, 2, 3],
            },
            NumaNode {
                id: 1,
                cpus: vec![4, 5, 6, 7],
            },
        ],
    }
}

fn cfg(worker_threads: Option<usize>, shards: ShardMode) -> RuntimeConfig {
    RuntimeConfig {
        worker_threads,
        shards,
        ..Default::default()
    }
}

fn shard_layout(s: &Sizing) -> Vec<(Vec<usize>, usize, Option<usize>)> {
    s.shards
        .iter()
        .map(|p| (p.cpus.clone(), p.workers, p.node))
        .collect()
}

#[test]
fn fractional_quota_rounds_up() {
    let s = decide(
        &RuntimeConfig::default(),
        quota(CgroupVersion::V1, 150_000, 100_000),
        &cpus(8),
        &two_nodes(),
    );
    assert_eq!(s.workers, 2);
    assert_eq!(
        s.reason,
        "cgroup v1 quota 150000/100000 µs = 1.5 CPUs, rounded up to 2"
    );
    assert!(s.shards.is_empty());
}

#[test]
fn half_cpu_quota_still_gets_one_worker() {
    let s = decide(
        &RuntimeConfig::default(),
        quota(CgroupVersion::V2, 50_000, 100_000),
        &cpus(8),
        &two_nodes(),
    );
    assert_eq!(s.workers, 1);
}

#[test]
fn whole_quota_is_not_described_as_rounded() {
    let s = decide(
        &RuntimeConfig::default(),
        quota(CgroupVersion::V2, 200_000, 100_000),
        &cpus(8),
        &two_nodes(),
    );
    assert_eq!(s.workers, 2);
    assert_eq!(s.reason, "cgroup v2 quota 200000/100000 µs = 2 CPUs");
}

#[test]
fn no_quota_uses_the_affinity_mask() {
    let s = decide(&RuntimeConfig::default(), None, &[2, 3], &two_nodes());
    assert_eq!(s.workers, 2);
    assert_eq!(s.available_cpus, [2, 3]);
    assert_eq!(
        s.reason,
        "no cgroup CPU limit; 2 CPUs available to this process"
    );
}

#[test]
fn override_wins_over_quota_and_mask() {
    let s = decide(
        &cfg(Some(4), ShardMode::Off),
        quota(CgroupVersion::V2, 100_000, 100_000),
        &cpus(2),
        &two_nodes(),
    );
    assert_eq!(s.workers, 4);
    assert_eq!(s.reason, "worker_threads = 4 set in config");
}

#[test]
fn quota_is_capped_at_the_affinity_mask() {
    let s = decide(
        &RuntimeConfig::default(),
        quota(CgroupVersion::V2, 800_000, 100_000),
        &[0, 1, 2],
        &two_nodes(),
    );
    assert_eq!(s.workers, 3);
    assert!(
        s.reason
            .ends_with("capped at the 3 CPUs in the affinity mask"),
        "{}",
        s.reason
    );
}

#[test]
fn empty_mask_falls_back_to_online_cpus() {
    let s = decide(&RuntimeConfig::default(), None, &[], &two_nodes());
    assert_eq!(s.workers, 8);
    assert_eq!(s.available_cpus, cpus(8));
}

#[test]
fn nothing_known_still_gives_one_worker() {
    let s = decide(
        &cfg(None, ShardMode::PerNuma),
        None,
        &[],
        &Topology::default(),
    );
    assert_eq!(s.workers, 1);
    assert!(s.shards.is_empty());
}

#[test]
fn per_numa_two_nodes_full_budget() {
    let s = decide(
        &cfg(Some(8), ShardMode::PerNuma),
        None,
        &cpus(8),
        &two_nodes(),
    );
    assert_eq!(
        shard_layout(&s),
        [
            (vec![0, 1, 2, 3], 4, Some(0)),
            (vec![4, 5, 6, 7], 4, Some(1)),
        ]
    );
    assert_eq!(s.shards[1].index, 1);
    assert!(
        s.reason
            .ends_with("; per-numa: 2 shards, 8 workers in total"),
        "{}",
        s.reason
    );
}

#[test]
fn per_numa_with_two_cpu_quota_scales_each_node_down() {
    let s = decide(
        &cfg(None, ShardMode::PerNuma),
        quota(CgroupVersion::V2, 200_000, 100_000),
        &cpus(8),
        &two_nodes(),
    );
    assert_eq!(s.workers, 2);
    assert_eq!(
        shard_layout(&s),
        [
            (vec![0, 1, 2, 3], 1, Some(0)),
            (vec![4, 5, 6, 7], 1, Some(1)),
        ]
    );
}

#[test]
fn per_numa_skips_nodes_outside_the_mask() {
    let s = decide(&cfg(None, ShardMode::PerNuma), None, &[4, 5], &two_nodes());
    assert_eq!(shard_layout(&s), [(vec![4, 5], 2, Some(1))]);
    assert_eq!(s.shards[0].index, 0);
}

#[test]
fn per_core_is_limited_to_the_worker_count() {
    let s = decide(
        &cfg(Some(2), ShardMode::PerCore),
        None,
        &cpus(8),
        &two_nodes(),
    );
    assert_eq!(
        shard_layout(&s),
        [(vec![0], 1, Some(0)), (vec![1], 1, Some(0))]
    );
}

#[test]
fn per_core_uses_every_cpu_in_the_mask_without_quota() {
    let s = decide(
        &cfg(None, ShardMode::PerCore),
        None,
        &[1, 5, 6],
        &two_nodes(),
    );
    assert_eq!(
        shard_layout(&s),
        [
            (vec![1], 1, Some(0)),
            (vec![5], 1, Some(1)),
            (vec![6], 1, Some(1)),
        ]
    );
}

#[test]
fn apportion_keeps_the_total_on_budget() {
    assert_eq!(apportion(&[4, 4], 8), [4, 4]);
    assert_eq!(apportion(&[4, 4], 2), [1, 1]);
    assert_eq!(apportion(&[3, 5], 4), [2, 2]);
    assert_eq!(apportion(&[2, 6], 4), [1, 3]);
    // More nodes than workers: every shard still needs a thread.
    assert_eq!(apportion(&[4, 4, 4], 2), [1, 1, 1]);
}

#[test]
fn sizing_serializes_for_the_debug_endpoint() {
    let s = decide(
        &cfg(None, ShardMode::PerCore),
        quota(CgroupVersion::V1, 100_000, 100_000),
        &cpus(2),
        &two_nodes(),
    );
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["workers"], 1);
    assert_eq!(json["cgroup"]["version"], "v1");
    assert_eq!(json["shards"][0]["cpus"], serde_json::json!([0]));
}
