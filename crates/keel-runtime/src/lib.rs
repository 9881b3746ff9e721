//! Runtime sizing for Keel services.
//!
//! Owns one decision: how many tokio worker threads a service gets and where they run. The
//! worker count comes from the container's cgroup CPU quota (rounded up, capped at the
//! affinity mask) unless the config overrides it; optionally the service runs one runtime per
//! core or per NUMA node with pinned threads, and the server crate opens one `SO_REUSEPORT`
//! listener per shard.
//!
//! Flow: [`detect`] (or [`decide`] from explicit inputs) → [`Sizing`] → [`build_runtime`] or
//! [`run_sharded`]. The [`Sizing`] is logged at start and served at `/debug/runtime`.

mod affinity;
mod cgroup;
mod config;
mod runtime;
mod shard;
mod sizing;
mod sysroot;
mod topology;

pub use affinity::{current_affinity, pin_current_thread};
pub use cgroup::{CgroupVersion, CpuLimit, cgroup_cpu_limit};
pub use config::{RuntimeConfig, ShardMode};
pub use runtime::build_runtime;
pub use shard::run_sharded;
pub use sizing::{ShardPlan, Sizing, decide, detect};
pub use sysroot::SysRoot;
pub use topology::{CpuListError, NumaNode, Topology, parse_cpu_list};
