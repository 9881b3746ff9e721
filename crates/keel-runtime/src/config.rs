//! The `[runtime]` config section: worker override, shard mode, blocking-pool bound.
//!
//! Tokio's scheduler knobs (event interval, global queue interval) are deliberately absent:
//! their defaults are tuned by tokio itself and nobody has measured a Keel service that wants
//! different ones.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Config section `[runtime]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RuntimeConfig {
    /// Override the worker count. `None` = derive it from the cgroup CPU quota (or, without a
    /// quota, from the CPUs this process may run on).
    pub worker_threads: Option<usize>,
    /// Whether to run one runtime (`off`), one per CPU (`per-core`) or one per NUMA node
    /// (`per-numa`).
    pub shards: ShardMode,
    /// Upper bound for tokio's blocking pool (`spawn_blocking`, file I/O, DNS).
    ///
    /// 512 is tokio's own default. The pool only grows while blocking work is queued and shrinks
    /// again after idle threads time out, so a high ceiling costs nothing at rest; it exists so
    /// that a stuck dependency cannot grow the process without bound.
    pub max_blocking_threads: usize,
}

/// How the service's executor is split across CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShardMode {
    /// One multi-thread runtime shared by every CPU (tokio's work stealing balances load).
    #[default]
    Off,
    /// One single-thread runtime per CPU, each pinned to its CPU (thread-per-core).
    PerCore,
    /// One multi-thread runtime per NUMA node, its threads pinned to that node's CPUs, so
    /// memory stays node-local.
    PerNuma,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            worker_threads: None,
            shards: ShardMode::Off,
            max_blocking_threads: 512,
        }
    }
}

impl RuntimeConfig {
    /// Reports every invalid field as `(key relative to the section, value, reason)`.
    ///
    /// Reporting through a callback rather than returning errors lets the config crate collect
    /// the problems of all sections into one message at startup.
    pub fn validate_into(&self, report: &mut dyn FnMut(&str, String, String)) {
        if self.worker_threads == Some(0) {
            report("worker_threads", "0".into(), "must be at least 1".into());
        }
        if self.max_blocking_threads == 0 {
            report(
                "max_blocking_threads",
                "0".into(),
                "must be at least 1".into(),
            );
        }
    }
}

impl fmt::Display for ShardMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShardMode::Off => "off",
            ShardMode::PerCore => "per-core",
            ShardMode::PerNuma => "per-numa",
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn problems(cfg: &RuntimeConfig) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        cfg.validate_into(&mut |key, value, reason| out.push((key.to_owned(), value, reason)));
        out
    }

    #[test]
    fn default_is_valid_and_unsharded() {
        let cfg = RuntimeConfig::default();
        assert_eq!(cfg.shards, ShardMode::Off);
        assert_eq!(cfg.max_blocking_threads, 512);
        assert!(problems(&cfg).is_empty());
    }

    #[test]
    fn zero_counts_are_reported() {
        let cfg = RuntimeConfig {
            worker_threads: Some(0),
            max_blocking_threads: 0,
            ..Default::default()
        };
        let keys: Vec<_> = problems(&cfg).into_iter().map(|p| p.0).collect();
        assert_eq!(keys, ["worker_threads", "max_blocking_threads"]);
    }

    #[test]
    fn shard_mode_is_kebab_case_and_missing_keys_default() {
        let cfg: RuntimeConfig = serde_json::from_str(r#"{"shards":"per-numa"}"#).unwrap();
        assert_eq!(cfg.shards, ShardMode::PerNuma);
        assert_eq!(cfg.worker_threads, None);
        assert_eq!(
            serde_json::to_string(&ShardMode::PerCore).unwrap(),
            r#""per-core""#
        );
        assert_eq!(ShardMode::PerCore.to_string(), "per-core");
    }
}
