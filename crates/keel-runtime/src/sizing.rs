//! The sizing decision: how many workers, and which shards on which CPUs.
//!
//! [`decide`] is a pure function of its inputs so every rule is unit-tested from fixtures;
//! [`detect`] only gathers those inputs from the host.

use std::fmt::Write as _;

use serde::Serialize;

use crate::{
    CpuLimit, RuntimeConfig, ShardMode, SysRoot, Topology, cgroup_cpu_limit, current_affinity,
};

/// What was decided and why; logged at start and served at `/debug/runtime`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sizing {
    /// Worker threads for the default (unsharded) runtime; also the budget shards share.
    pub workers: usize,
    /// A sentence naming the inputs that produced `workers` (and the shard layout).
    pub reason: String,
    /// The cgroup CPU limit, if one applies.
    pub cgroup: Option<CpuLimit>,
    /// The CPUs this process may run on.
    pub available_cpus: Vec<usize>,
    /// One entry per shard runtime; empty when sharding is off.
    pub shards: Vec<ShardPlan>,
}

/// One shard: a runtime whose threads are pinned to `cpus`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShardPlan {
    /// 0-based; also names the shard thread `keel-shard-{index}`.
    pub index: usize,
    /// CPUs the shard's threads are pinned to.
    pub cpus: Vec<usize>,
    /// Worker threads; 1 means a current-thread runtime.
    pub workers: usize,
    /// NUMA node the CPUs belong to, when known.
    pub node: Option<usize>,
}

impl Sizing {
    /// Emits the decision as one structured `info` event.
    pub fn log(&self) {
        tracing::info!(
            workers = self.workers,
            shards = self.shards.len(),
            available_cpus = self.available_cpus.len(),
            reason = %self.reason,
            "runtime sized"
        );
    }
}

/// Decides worker count and shard layout from config, the cgroup limit, the affinity mask and
/// the NUMA topology.
pub fn decide(
    cfg: &RuntimeConfig,
    cgroup: Option<CpuLimit>,
    affinity: &[usize],
    topo: &Topology,
) -> Sizing {
    let mut reason = String::new();
    // An unreadable mask (non-Linux, seccomp) falls back to the online CPUs so sharding still
    // has CPUs to place shards on.
    let mask: Vec<usize> = if affinity.is_empty() {
        topo.online.clone()
    } else {
        affinity.to_vec()
    };
    let available = mask.len().max(1);

    let workers = if let Some(n) = cfg.worker_threads {
        let _ = write!(reason, "worker_threads = {n} set in config");
        n
    } else if let Some(limit) = &cgroup {
        // Round UP, unlike `std::thread::available_parallelism` which floors: a 1.5-CPU pod
        // given one worker can never use the half CPU it pays for, while two workers merely
        // get throttled for part of each period.
        let ceil = limit.cpus_ceil();
        let _ = write!(
            reason,
            "cgroup {} quota {}/{} µs = {} CPUs",
            version_name(limit),
            limit.quota_us,
            limit.period_us,
            limit.cpus()
        );
        if limit.quota_us % limit.period_us != 0 {
            let _ = write!(reason, ", rounded up to {ceil}");
        }
        if ceil > available {
            let _ = write!(
                reason,
                ", capped at the {available} CPUs in the affinity mask"
            );
        }
        ceil.min(available)
    } else {
        let _ = write!(
            reason,
            "no cgroup CPU limit; {available} CPUs available to this process"
        );
        available
    }
    .max(1);

    let shards = match cfg.shards {
        ShardMode::Off => Vec::new(),
        ShardMode::PerCore => per_core(workers, &mask, topo),
        ShardMode::PerNuma => per_numa(workers, &mask, topo),
    };
    if !shards.is_empty() {
        let total: usize = shards.iter().map(|s| s.workers).sum();
        let _ = write!(
            reason,
            "; {}: {} shards, {total} workers in total",
            cfg.shards,
            shards.len()
        );
    }

    Sizing {
        workers,
        reason,
        cgroup,
        available_cpus: mask,
        shards,
    }
}

/// Reads the host (cgroup files, `sched_getaffinity`, sysfs topology) and decides.
pub fn detect(cfg: &RuntimeConfig) -> Sizing {
    let root = SysRoot::host();
    let topo = Topology::read(&root);
    let affinity = current_affinity().unwrap_or_else(|error| {
        tracing::warn!(%error, "sched_getaffinity failed; assuming every online CPU");
        Vec::new()
    });
    decide(cfg, cgroup_cpu_limit(&root), &affinity, &topo)
}

fn version_name(limit: &CpuLimit) -> &'static str {
    match limit.version {
        crate::CgroupVersion::V1 => "v1",
        crate::CgroupVersion::V2 => "v2",
    }
}

/// One single-worker shard per CPU, but never more shards than workers: a 2-CPU quota on a
/// 64-core host must not become 64 runtimes fighting over 2 CPUs of bandwidth.
fn per_core(workers: usize, mask: &[usize], topo: &Topology) -> Vec<ShardPlan> {
    mask.iter()
        .take(workers)
        .enumerate()
        .map(|(index, &cpu)| ShardPlan {
            index,
            cpus: vec![cpu],
            workers: 1,
            node: topo.node_of(cpu),
        })
        .collect()
}

/// One shard per NUMA node with CPUs in the mask, its workers scaled so the total fits the
/// worker budget.
fn per_numa(workers: usize, mask: &[usize], topo: &Topology) -> Vec<ShardPlan> {
    let mut groups: Vec<(Option<usize>, Vec<usize>)> = topo
        .nodes
        .iter()
        .map(|n| {
            let cpus = n
                .cpus
                .iter()
                .copied()
                .filter(|c| mask.contains(c))
                .collect();
            (Some(n.id), cpus)
        })
        .filter(|(_, cpus): &(_, Vec<usize>)| !cpus.is_empty())
        .collect();
    if groups.is_empty() && !mask.is_empty() {
        // The topology does not cover the mask (unreadable sysfs): one shard, node unknown.
        groups.push((None, mask.to_vec()));
    }
    let counts: Vec<usize> = groups.iter().map(|(_, cpus)| cpus.len()).collect();
    let shares = apportion(&counts, workers);
    groups
        .into_iter()
        .zip(shares)
        .enumerate()
        .map(|(index, ((node, cpus), workers))| ShardPlan {
            index,
            cpus,
            workers,
            node,
        })
        .collect()
}

/// Splits `budget` across groups in proportion to `counts`, each share at least 1 and at most
/// its count. Largest-remainder rounding keeps the total on budget where the minimum of one
/// per group allows it.
fn apportion(counts: &[usize], budget: usize) -> Vec<usize> {
    let total: usize = counts.iter().sum();
    if total <= budget {
        return counts.to_vec();
    }
    let mut shares: Vec<usize> = counts
        .iter()
        .map(|&c| (c * budget / total).max(1))
        .collect();
    let mut used: usize = shares.iter().sum();
    let mut order: Vec<usize> = (0..counts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(counts[i] * budget % total));
    for i in order {
        if used >= budget {
            break;
        }
        if shares[i] < counts[i] {
            shares[i] += 1;
            used += 1;
        }
    }
    shares
}

#[cfg(test)]
#[path = "sizing_tests.rs"]
mod tests;
