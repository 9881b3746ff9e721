//! The container's CPU limit from cgroup v2 `cpu.max` or cgroup v1 `cpu.cfs_quota_us`.
//!
//! CFS bandwidth limits are hierarchical in both versions: a pod-level limit constrains every
//! container cgroup below it even when the container's own file says `max`. So from the
//! process's cgroup we walk up to the mount root and keep the smallest limit found.
//!
//! With cgroup namespaces (the default in Docker and Kubernetes on v2) `/proc/self/cgroup`
//! says `0::/` while the container's cgroup is mounted at `/sys/fs/cgroup` itself; when the
//! named directory does not exist we therefore read the mount root.

use std::path::{Component, Path, PathBuf};

use serde::Serialize;

use crate::SysRoot;

/// Which cgroup hierarchy a limit came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    /// Legacy per-controller hierarchies (`cpu.cfs_quota_us`).
    V1,
    /// The unified hierarchy (`cpu.max`).
    V2,
}

/// A cgroup CPU bandwidth limit: `quota_us` of CPU time per `period_us` of wall time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CpuLimit {
    /// Hierarchy the limit was read from.
    pub version: CgroupVersion,
    /// CPU time allowed per period, in microseconds.
    pub quota_us: u64,
    /// Length of the accounting period, in microseconds.
    pub period_us: u64,
    /// The file the limit was read from.
    pub path: PathBuf,
}

/// v2 mount points, in order. Hybrid systems mount v2 at `unified/`, where the CPU controller is
/// normally absent (it is bound to v1), but a v2-only controller setup there is still honoured.
const V2_MOUNTS: [&str; 2] = ["sys/fs/cgroup", "sys/fs/cgroup/unified"];
/// v1 mount points of the cpu controller; distributions differ in how they co-mount cpuacct.
const V1_MOUNTS: [&str; 3] = [
    "sys/fs/cgroup/cpu,cpuacct",
    "sys/fs/cgroup/cpu",
    "sys/fs/cgroup/cpuacct,cpu",
];

impl CpuLimit {
    /// The limit as a (possibly fractional) number of CPUs.
    pub fn cpus(&self) -> f64 {
        self.quota_us as f64 / self.period_us as f64
    }

    /// The limit rounded up to whole CPUs (at least 1). Integer arithmetic, so `150000/100000`
    /// is exactly 2 without float rounding surprises.
    pub fn cpus_ceil(&self) -> usize {
        let whole = self.quota_us.div_ceil(self.period_us).max(1);
        usize::try_from(whole).unwrap_or(usize::MAX)
    }

    /// True when `self` allows less CPU than `other` (compared exactly by cross-multiplying).
    fn tighter_than(&self, other: &CpuLimit) -> bool {
        u128::from(self.quota_us) * u128::from(other.period_us)
            < u128::from(other.quota_us) * u128::from(self.period_us)
    }
}

/// The CPU limit that applies to this process, or `None` when it is unlimited or cannot be
/// determined. A v2 limit wins over a v1 one.
pub fn cgroup_cpu_limit(root: &SysRoot) -> Option<CpuLimit> {
    let membership = root.read("proc/self/cgroup")?;
    let mut v2_path = None;
    let mut v1_path = None;
    for line in membership.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2_path = Some(path);
        } else if controllers.split(',').any(|c| c == "cpu") {
            v1_path = Some(path);
        }
    }
    v2_path
        .and_then(|p| v2_limit(root, p))
        .or_else(|| v1_path.and_then(|p| v1_limit(root, p)))
}

fn v2_limit(root: &SysRoot, cgroup: &str) -> Option<CpuLimit> {
    V2_MOUNTS.iter().find_map(|mount| {
        let mount = root.join(mount);
        let start = own_dir(&mount, cgroup).or_else(|| mount.is_dir().then(|| mount.clone()))?;
        tightest(&mount, start, read_cpu_max)
    })
}

fn v1_limit(root: &SysRoot, cgroup: &str) -> Option<CpuLimit> {
    let mounts = V1_MOUNTS.map(|m| root.join(m));
    // The process's own directory under any mount first; only then the mount roots, which is
    // what a namespaced container sees as its own cgroup.
    let own = mounts
        .iter()
        .find_map(|m| own_dir(m, cgroup).map(|dir| (m, dir)));
    let (mount, start) =
        own.or_else(|| mounts.iter().find(|m| m.is_dir()).map(|m| (m, m.clone())))?;
    tightest(mount, start, read_cfs)
}

/// `mount/<cgroup>` if it exists. Only normal components are kept, so a hostile or odd path
/// cannot walk outside the mount.
fn own_dir(mount: &Path, cgroup: &str) -> Option<PathBuf> {
    let rel: PathBuf = Path::new(cgroup)
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    let dir = mount.join(rel);
    dir.is_dir().then_some(dir)
}

/// Walks from `start` up to and including `mount`, returning the smallest limit seen.
fn tightest(mount: &Path, start: PathBuf, read: fn(&Path) -> Option<CpuLimit>) -> Option<CpuLimit> {
    let mut best: Option<CpuLimit> = None;
    let mut dir = start;
    while dir.starts_with(mount) {
        if let Some(limit) = read(&dir) {
            if best.as_ref().is_none_or(|b| limit.tighter_than(b)) {
                best = Some(limit);
            }
        }
        if !dir.pop() {
            break;
        }
    }
    best
}

/// `cpu.max` is `"<quota|max> <period>"`.
fn read_cpu_max(dir: &Path) -> Option<CpuLimit> {
    let path = dir.join("cpu.max");
    let text = std::fs::read_to_string(&path).ok()?;
    let mut fields = text.split_whitespace();
    let quota = fields.next()?;
    let period_us = fields.next().map_or(Some(100_000), |p| p.parse().ok())?;
    if quota == "max" {
        return None;
    }
    limit(CgroupVersion::V2, quota.parse().ok()?, period_us, path)
}

/// `cpu.cfs_quota_us` is `-1` when unlimited; the period sits in `cpu.cfs_period_us`.
fn read_cfs(dir: &Path) -> Option<CpuLimit> {
    let path = dir.join("cpu.cfs_quota_us");
    let quota: i64 = std::fs::read_to_string(&path).ok()?.trim().parse().ok()?;
    let period = std::fs::read_to_string(dir.join("cpu.cfs_period_us")).ok()?;
    let quota = u64::try_from(quota).ok()?;
    limit(CgroupVersion::V1, quota, period.trim().parse().ok()?, path)
}

fn limit(version: CgroupVersion, quota_us: u64, period_us: u64, path: PathBuf) -> Option<CpuLimit> {
    // A zero quota or period is not a limit the kernel would accept; ignore rather than divide
    // by zero or size the runtime to nothing.
    (quota_us > 0 && period_us > 0).then_some(CpuLimit {
        version,
        quota_us,
        period_us,
        path,
    })
}

#[cfg(test)]
#[path = "cgroup_tests.rs"]
mod tests;
