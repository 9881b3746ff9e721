//! `[clients.<name>]`: one upstream's endpoints and policies, as written in config.
//!
//! Every field has the default of the policy it configures (the reasons live on those
//! policies' docs and in `docs/operations.md`). Unknown keys inside an entry are rejected by
//! name, like everywhere else in Keel's config.

use std::sync::Arc;
use std::time::Duration as StdDuration;

use keel_config::{Duration, Validate, Validator};
use keel_core::propagation::Outbound;
use serde::{Deserialize, Serialize};

use crate::breaker::BreakerConfig;
use crate::client::{Client, ClientConfig};
use crate::endpoint::{Endpoint, EndpointError, Endpoints};
use crate::outlier::OutlierConfig;
use crate::pool::{PoolConfig, Protocol};
use crate::priority::PriorityConfig;
use crate::retry::{BackoffConfig, BudgetConfig};
use crate::upstream::{Upstream, UpstreamConfig};

/// One upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamSettings {
    /// Static endpoints, `ADDR[;priority=N][;locality=L][;label=value…]`.
    pub endpoints: Vec<String>,
    /// `http1` or `h2c` (HTTP/2 prior knowledge; required for gRPC).
    pub protocol: ProtocolSetting,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Upper bound of one attempt; unset = the request's deadline only.
    pub per_try_timeout: Option<Duration>,
    /// Pool idle timeout until the server advertises its keep-alive.
    pub idle_timeout: Duration,
    /// Subtracted from a learned server keep-alive.
    pub keepalive_margin: Duration,
    /// Connections per endpoint, busy or idle.
    pub max_connections_per_endpoint: usize,
    /// Upper bound of idle HTTP/1.1 connections per endpoint (the decaying peak of
    /// concurrency decides below it).
    pub max_idle_per_endpoint: usize,
    /// Half-life of the concurrency peak that sizes the idle pool.
    pub idle_peak_half_life: Duration,
    /// HTTP/2 streams per connection before another is opened (the server's own limit wins
    /// when lower).
    pub max_streams_per_connection: u32,
    /// Connect with TCP Fast Open.
    pub fastopen: bool,
    /// Calls to this upstream are idempotent: any failure may be retried.
    pub idempotent: bool,
    /// Hedge an idempotent call to a second endpoint after this long without an answer.
    pub hedge_after: Option<Duration>,
    /// Retries.
    pub retry: RetrySettings,
    /// Adaptive throttling.
    pub breaker: BreakerSettings,
    /// Outlier ejection.
    pub outlier: OutlierSettings,
    /// Priority spill-over.
    pub priority: PrioritySettings,
    /// Percent of uncoloured requests sent to each colour subset (`canary = 5`).
    pub subsets: std::collections::BTreeMap<String, u32>,
}

/// Wire protocol, as written in config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProtocolSetting {
    /// HTTP/1.1.
    #[default]
    Http1,
    /// HTTP/2 prior knowledge.
    H2c,
}

/// `retry` of an upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    /// Attempts including the first.
    pub max_attempts: u32,
    /// First backoff range.
    pub backoff_base: Duration,
    /// Backoff cap.
    pub backoff_max: Duration,
    /// Retries earned per request.
    pub budget_ratio: f64,
    /// Budget memory.
    pub budget_window: Duration,
    /// Retries per second always allowed.
    pub budget_min_per_sec: u32,
}

/// `breaker` of an upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerSettings {
    /// SRE throttling multiplier K.
    pub k: f64,
    /// Evidence window.
    pub window: Duration,
    /// Requests in the window before any rejection.
    pub min_requests: u64,
    /// Highest rejection probability.
    pub max_reject_probability: f64,
    /// Path prefixes that get a breaker of their own.
    pub routes: Vec<String>,
}

/// `outlier` of an upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierSettings {
    /// Failures in a row that eject an endpoint (0 disables).
    pub consecutive_failures: u32,
    /// First ejection time; multiplied by the times ejected.
    pub base_ejection: Duration,
    /// Longest ejection.
    pub max_ejection: Duration,
    /// Largest share of endpoints ejected at once.
    pub max_ejection_percent: u32,
}

/// `priority` of an upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrioritySettings {
    /// Overprovisioning factor.
    pub overprovisioning: f64,
    /// Healthy share below which a level is in panic.
    pub panic_threshold: f64,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        let c = ClientConfig::default();
        let p = &c.pool;
        UpstreamSettings {
            endpoints: Vec::new(),
            protocol: ProtocolSetting::Http1,
            connect_timeout: p.connect_timeout.into(),
            per_try_timeout: c.per_try_timeout.map(Into::into),
            idle_timeout: p.idle_timeout.into(),
            keepalive_margin: p.keepalive_margin.into(),
            max_connections_per_endpoint: p.max_connections,
            max_idle_per_endpoint: p.max_idle,
            idle_peak_half_life: p.idle_peak_half_life.into(),
            max_streams_per_connection: p.max_streams_per_connection,
            fastopen: p.fastopen,
            idempotent: c.idempotent,
            hedge_after: c.hedge_after.map(Into::into),
            retry: RetrySettings::default(),
            breaker: BreakerSettings::default(),
            outlier: OutlierSettings::default(),
            priority: PrioritySettings::default(),
            subsets: std::collections::BTreeMap::new(),
        }
    }
}

impl Default for RetrySettings {
    fn default() -> Self {
        let (b, g) = (BackoffConfig::default(), BudgetConfig::default());
        RetrySettings {
            max_attempts: b.max_attempts,
            backoff_base: b.base.into(),
            backoff_max: b.max.into(),
            budget_ratio: g.ratio,
            budget_window: g.window.into(),
            budget_min_per_sec: g.min_per_sec,
        }
    }
}

impl Default for BreakerSettings {
    fn default() -> Self {
        let b = BreakerConfig::default();
        BreakerSettings {
            k: b.k,
            window: b.window.into(),
            min_requests: b.min_requests,
            max_reject_probability: b.max_reject_probability,
            routes: Vec::new(),
        }
    }
}

impl Default for OutlierSettings {
    fn default() -> Self {
        let o = OutlierConfig::default();
        OutlierSettings {
            consecutive_failures: o.consecutive_failures,
            base_ejection: o.base_ejection.into(),
            max_ejection: o.max_ejection.into(),
            max_ejection_percent: o.max_ejection_percent,
        }
    }
}

impl Default for PrioritySettings {
    fn default() -> Self {
        let p = PriorityConfig::default();
        PrioritySettings {
            overprovisioning: p.overprovisioning,
            panic_threshold: p.panic_threshold,
        }
    }
}

impl Validate for UpstreamSettings {
    fn validate(&self, v: &mut Validator) {
        for (i, e) in self.endpoints.iter().enumerate() {
            if let Err(err) = Endpoint::parse(e) {
                v.invalid(&format!("endpoints[{i}]"), format!("{e:?}"), err.reason);
            }
        }
        v.check(
            self.retry.max_attempts >= 1,
            "retry.max_attempts",
            self.retry.max_attempts,
            "must be at least 1 (the first attempt)",
        );
        v.check(
            (0.0..=1.0).contains(&self.retry.budget_ratio),
            "retry.budget_ratio",
            self.retry.budget_ratio,
            "must be between 0 and 1",
        );
        v.check(
            self.breaker.k >= 1.0,
            "breaker.k",
            self.breaker.k,
            "must be at least 1 (below 1 the breaker rejects healthy traffic)",
        );
        v.check(
            (0.0..=1.0).contains(&self.breaker.max_reject_probability),
            "breaker.max_reject_probability",
            self.breaker.max_reject_probability,
            "must be between 0 and 1",
        );
        v.check(
            self.outlier.max_ejection_percent <= 100,
            "outlier.max_ejection_percent",
            self.outlier.max_ejection_percent,
            "must be at most 100",
        );
        v.check(
            self.priority.overprovisioning >= 1.0,
            "priority.overprovisioning",
            self.priority.overprovisioning,
            "must be at least 1.0",
        );
        v.check(
            (0.0..=1.0).contains(&self.priority.panic_threshold),
            "priority.panic_threshold",
            self.priority.panic_threshold,
            "must be between 0 and 1",
        );
        v.check(
            !self.idle_timeout.get().is_zero(),
            "idle_timeout",
            self.idle_timeout,
            "must be greater than 0",
        );
        v.check(
            self.max_connections_per_endpoint >= 1,
            "max_connections_per_endpoint",
            self.max_connections_per_endpoint,
            "must be at least 1",
        );
        v.check(
            self.max_streams_per_connection >= 1,
            "max_streams_per_connection",
            self.max_streams_per_connection,
            "must be at least 1",
        );
        v.check(
            !self.idle_peak_half_life.get().is_zero(),
            "idle_peak_half_life",
            self.idle_peak_half_life,
            "must be greater than 0",
        );
        if let Some(h) = self.hedge_after {
            v.check(
                self.idempotent,
                "hedge_after",
                h,
                "hedging sends a request twice; set `idempotent = true` to allow it",
            );
        }
        let total: u32 = self.subsets.values().copied().fold(0, u32::saturating_add);
        v.check(
            total <= 100,
            "subsets",
            format!("{:?}", self.subsets),
            "the percentages add up to more than 100",
        );
        for (i, r) in self.breaker.routes.iter().enumerate() {
            v.check(
                r.starts_with('/'),
                &format!("breaker.routes[{i}]"),
                format!("{r:?}"),
                "must be a path prefix starting with '/'",
            );
        }
    }
}

impl UpstreamSettings {
    /// The client these settings describe. `outbound` is the service's propagation policy
    /// (`[propagation]`: the margin kept off the remaining time, the B3 format): a parameter
    /// rather than a default so that no client can be built that ignores it.
    pub fn build(&self, name: &str, outbound: Outbound) -> Result<Client, EndpointError> {
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| Endpoint::parse(e))
            .collect::<Result<Vec<_>, _>>()?;
        let d = |x: Duration| -> StdDuration { x.get() };
        let outlier_default = OutlierConfig::default();
        let upstream = Upstream::new(
            UpstreamConfig {
                balance: Default::default(),
                outlier: OutlierConfig {
                    consecutive_failures: self.outlier.consecutive_failures,
                    base_ejection: d(self.outlier.base_ejection),
                    max_ejection: d(self.outlier.max_ejection),
                    max_ejection_percent: self.outlier.max_ejection_percent,
                    decay: outlier_default.decay,
                },
                priority: PriorityConfig {
                    overprovisioning: self.priority.overprovisioning,
                    panic_threshold: self.priority.panic_threshold,
                },
                subset_weights: self.subsets.iter().map(|(c, p)| (c.clone(), *p)).collect(),
            },
            Endpoints::new(endpoints),
        );
        let cfg = ClientConfig {
            pool: PoolConfig {
                protocol: match self.protocol {
                    ProtocolSetting::Http1 => Protocol::Http1,
                    ProtocolSetting::H2c => Protocol::H2c,
                },
                connect_timeout: d(self.connect_timeout),
                idle_timeout: d(self.idle_timeout),
                keepalive_margin: d(self.keepalive_margin),
                max_connections: self.max_connections_per_endpoint,
                max_idle: self.max_idle_per_endpoint,
                idle_peak_half_life: d(self.idle_peak_half_life),
                max_streams_per_connection: self.max_streams_per_connection,
                fastopen: self.fastopen,
            },
            per_try_timeout: self.per_try_timeout.map(d),
            idempotent: self.idempotent,
            hedge_after: self.hedge_after.map(d),
            route_breakers: self.breaker.routes.clone(),
            outbound: Outbound {
                // Per attempt, set by the client itself.
                retry: false,
                span_id: None,
                ..outbound
            },
            backoff: BackoffConfig {
                base: d(self.retry.backoff_base),
                max: d(self.retry.backoff_max),
                max_attempts: self.retry.max_attempts,
            },
            budget: BudgetConfig {
                ratio: self.retry.budget_ratio,
                window: d(self.retry.budget_window),
                min_per_sec: self.retry.budget_min_per_sec,
            },
            breaker: BreakerConfig {
                k: self.breaker.k,
                window: d(self.breaker.window),
                min_requests: self.breaker.min_requests,
                max_reject_probability: self.breaker.max_reject_probability,
            },
        };
        Ok(Client::new(name, cfg, Arc::new(upstream)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_mirror_the_policies_and_validate() {
        let s = UpstreamSettings::default();
        let mut v = Validator::default();
        s.validate(&mut v);
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(s.retry.max_attempts, BackoffConfig::default().max_attempts);
        assert_eq!(s.outlier.consecutive_failures, 5);
        assert!(s.build("x", Outbound::default()).is_ok());
    }

    #[test]
    fn the_propagation_policy_given_is_the_one_the_client_uses() {
        let outbound = Outbound {
            margin: StdDuration::from_millis(20),
            b3: keel_core::propagation::B3Format::Multi,
            // Per-attempt fields are the client's business, whatever the caller passes.
            retry: true,
            span_id: None,
        };
        let c = UpstreamSettings::default().build("x", outbound).unwrap();
        let got = c.config().outbound;
        assert_eq!(got.margin, StdDuration::from_millis(20));
        assert_eq!(got.b3, keel_core::propagation::B3Format::Multi);
        assert!(!got.retry);
    }

    #[test]
    fn bad_endpoints_and_ranges_are_reported_by_key() {
        let s = UpstreamSettings {
            endpoints: vec!["127.0.0.1:80".into(), "nonsense".into()],
            retry: RetrySettings {
                budget_ratio: 1.5,
                ..RetrySettings::default()
            },
            ..UpstreamSettings::default()
        };
        let mut v = Validator::default();
        s.validate(&mut v);
        let keys: Vec<&str> = v.problems().iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, vec!["endpoints[1]", "retry.budget_ratio"]);
    }
}
