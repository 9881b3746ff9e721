//! Fixture trees for every cgroup layout the detector must understand.

#![allow(clippy::unwrap_used)]

use std::fs;

use super::*;

/// A tempdir standing in for `/`, with files written relative to it.
struct Fixture(tempfile::TempDir);

impl Fixture {
    fn new(proc_self_cgroup: &str) -> Self {
        let f = Fixture(tempfile::tempdir().unwrap());
        f.write("proc/self/cgroup", proc_self_cgroup);
        f
    }

    fn write(&self, rel: &str, body: &str) -> &Self {
        let path = self.0.path().join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, body).unwrap();
        self
    }

    fn mkdir(&self, rel: &str) -> &Self {
        fs::create_dir_all(self.0.path().join(rel)).unwrap();
        self
    }

    fn limit(&self) -> Option<CpuLimit> {
        cgroup_cpu_limit(&SysRoot::new(self.0.path()))
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.path().join(rel)
    }
}

const V1_DOCKER: &str = "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n";

#[test]
fn v1_fractional_quota_rounds_up() {
    let f = Fixture::new(V1_DOCKER);
    f.write(
        "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us",
        "150000\n",
    )
    .write(
        "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us",
        "100000\n",
    );
    let limit = f.limit().unwrap();
    assert_eq!(limit.version, CgroupVersion::V1);
    assert_eq!((limit.quota_us, limit.period_us), (150_000, 100_000));
    assert_eq!(limit.cpus(), 1.5);
    assert_eq!(limit.cpus_ceil(), 2);
    assert_eq!(
        limit.path,
        f.path("sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us")
    );
}

#[test]
fn v1_minus_one_is_unlimited() {
    let f = Fixture::new(V1_DOCKER);
    f.write(
        "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us",
        "-1\n",
    )
    .write(
        "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us",
        "100000\n",
    )
    .write("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n")
    .write("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n");
    assert_eq!(f.limit(), None);
}

#[test]
fn v1_separate_cpu_mount_and_namespaced_root() {
    // `/docker/abc` is not visible inside the container; the mount root is its cgroup.
    let f = Fixture::new("2:cpuacct:/\n1:cpu:/docker/abc\n");
    f.write("sys/fs/cgroup/cpu/cpu.cfs_quota_us", "50000")
        .write("sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000");
    let limit = f.limit().unwrap();
    assert_eq!(limit.cpus_ceil(), 1);
    assert_eq!(limit.path, f.path("sys/fs/cgroup/cpu/cpu.cfs_quota_us"));
}

#[test]
fn v2_quota() {
    let f = Fixture::new("0::/kubepods/pod1/c1\n");
    f.write("sys/fs/cgroup/kubepods/pod1/c1/cpu.max", "200000 100000\n");
    let limit = f.limit().unwrap();
    assert_eq!(limit.version, CgroupVersion::V2);
    assert_eq!(limit.cpus(), 2.0);
    assert_eq!(limit.cpus_ceil(), 2);
}

#[test]
fn v2_max_is_unlimited() {
    let f = Fixture::new("0::/svc\n");
    f.write("sys/fs/cgroup/svc/cpu.max", "max 100000\n");
    assert_eq!(f.limit(), None);
}

#[test]
fn v2_nested_parent_limit_applies() {
    let f = Fixture::new("0::/pod/child\n");
    f.write("sys/fs/cgroup/pod/child/cpu.max", "max 100000\n")
        .write("sys/fs/cgroup/pod/cpu.max", "50000 100000\n");
    let limit = f.limit().unwrap();
    assert_eq!(limit.cpus(), 0.5);
    assert_eq!(limit.cpus_ceil(), 1);
    assert_eq!(limit.path, f.path("sys/fs/cgroup/pod/cpu.max"));
}

#[test]
fn v2_smallest_of_nested_limits_wins() {
    let f = Fixture::new("0::/pod/child\n");
    f.write("sys/fs/cgroup/pod/child/cpu.max", "300000 100000\n")
        .write("sys/fs/cgroup/pod/cpu.max", "400000 100000\n");
    assert_eq!(f.limit().unwrap().quota_us, 300_000);
}

#[test]
fn v2_missing_path_falls_back_to_mount_root() {
    let f = Fixture::new("0::/system.slice/docker-abc.scope\n");
    f.write("sys/fs/cgroup/cpu.max", "100000 100000\n");
    let limit = f.limit().unwrap();
    assert_eq!(limit.path, f.path("sys/fs/cgroup/cpu.max"));
    assert_eq!(limit.cpus_ceil(), 1);
}

#[test]
fn v2_path_cannot_escape_the_mount() {
    let f = Fixture::new("0::/../../etc\n");
    f.write("etc/cpu.max", "100000 100000\n");
    assert_eq!(f.limit(), None);
}

#[test]
fn hybrid_uses_v1_when_unified_is_empty() {
    // This is what a hybrid host looks like: v1 controllers plus an empty v2 `unified` mount.
    let f = Fixture::new("9:name=systemd:/\n2:cpuacct:/\n1:cpu:/\n0::/\n");
    f.mkdir("sys/fs/cgroup/unified")
        .write("sys/fs/cgroup/cpu/cpu.cfs_quota_us", "250000\n")
        .write("sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n");
    let limit = f.limit().unwrap();
    assert_eq!(limit.version, CgroupVersion::V1);
    assert_eq!(limit.cpus_ceil(), 3);
}

#[test]
fn v2_limit_is_preferred_over_v1() {
    let f = Fixture::new("1:cpu:/\n0::/\n");
    f.write("sys/fs/cgroup/unified/cpu.max", "100000 100000\n")
        .write("sys/fs/cgroup/cpu/cpu.cfs_quota_us", "400000\n")
        .write("sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n");
    assert_eq!(f.limit().unwrap().version, CgroupVersion::V2);
}

#[test]
fn no_proc_file_means_undetectable() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(cgroup_cpu_limit(&SysRoot::new(dir.path())), None);
}
