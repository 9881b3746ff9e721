//! The root config: every crate's section, composed, and how it is loaded.

use std::path::PathBuf;

use std::collections::BTreeMap;

use keel_client::config::UpstreamSettings;
use keel_config::Duration;
use keel_config::{ConfigError, Loaded, Loader, Validate, Validator};
use keel_runtime::RuntimeConfig;
use keel_server::{
    AdminConfig, DeadlineConfig, ProbesConfig, PropagationConfig, ReadinessConfig, ServerConfig,
    ShutdownConfig,
};
use serde::{Deserialize, Serialize};

/// Prefix of environment variables: `KEEL_<SECTION>__<KEY>`.
pub const ENV_PREFIX: &str = "KEEL";

/// Everything a Keel service is configured with. Each section belongs to the crate that
/// uses it; `docs/operations.md` lists every key with its default and the reason for it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Config {
    /// `[server]` — main listener and HTTP limits.
    pub server: ServerConfig,
    /// `[probes]` — liveness/readiness paths on the main port.
    pub probes: ProbesConfig,
    /// `[readiness]` — dependency check cadence.
    pub readiness: ReadinessConfig,
    /// `[admin]` — the operator's port.
    pub admin: AdminConfig,
    /// `[shutdown]` — drain delay and grace period.
    pub shutdown: ShutdownConfig,
    /// `[runtime]` — worker threads and sharding.
    pub runtime: RuntimeConfig,
    /// `[deadline]` — request deadlines per route.
    pub deadline: DeadlineConfig,
    /// `[propagation]` — what travels to the next hop.
    pub propagation: PropagationConfig,
    /// `[tasks]` — task registry and leak detection.
    pub tasks: TasksConfig,
    /// `[clients.<name>]` — upstreams this service calls, by name.
    pub clients: BTreeMap<String, UpstreamSettings>,
    /// `[log]` — log level and format.
    pub log: LogConfig,
    /// `[metrics]` — Prometheus `/metrics` on the admin port.
    pub metrics: keel_telemetry::MetricsConfig,
    /// `[tracing]` — OTLP span export (the `OTEL_*` variables override it).
    pub tracing: keel_telemetry::trace::TraceConfig,
    /// `[overload]` — adaptive concurrency limit and load shedding.
    pub overload: keel_server::overload::OverloadConfig,
    /// `[messaging]` — broker, outbox relay, consumers and retention.
    pub messaging: keel_messaging::config::MessagingConfig,
    /// `[gateway]` — routes, credentials and rate of a service run as Keel's proxy
    /// (`keel_gateway::proxy`); unused by other services.
    pub gateway: keel_gateway::proxy::GatewayConfig,
}

/// `[tasks]`: the task registry behind `/debug/tasks`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct TasksConfig {
    /// A task still alive this long after its owning request's deadline is a leak suspect:
    /// listed first in `/debug/tasks`, counted, and logged once. 5 s forgives a task that is
    /// merely finishing its cleanup, and still flags a real leak within seconds.
    pub leak_grace: Duration,
    /// How often the registry is swept for new leak suspects, so they are logged even when
    /// nobody reads `/debug/tasks`. A sweep walks every live task, so not more often than 1 s.
    pub sweep_interval: Duration,
}

impl Default for TasksConfig {
    fn default() -> Self {
        TasksConfig {
            leak_grace: Duration::from_secs(5),
            sweep_interval: Duration::from_secs(1),
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct LogConfig {
    /// A `tracing` filter, e.g. `info` or `info,keel_server=debug`. `RUST_LOG`, when set, wins.
    pub level: String,
    /// `pretty` for people, `json` for log pipelines.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Pretty,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

impl Validate for Config {
    fn validate(&self, v: &mut Validator) {
        v.nested("server", &self.server);
        v.nested("probes", &self.probes);
        v.nested("readiness", &self.readiness);
        v.nested("admin", &self.admin);
        v.nested("shutdown", &self.shutdown);
        v.nested("deadline", &self.deadline);
        v.nested("propagation", &self.propagation);
        v.nested("metrics", &self.metrics);
        v.nested("tracing", &self.tracing);
        v.nested("overload", &self.overload);
        v.nested("messaging", &self.messaging);
        v.nested("gateway", &self.gateway);
        for (name, c) in &self.clients {
            v.nested(&format!("clients.{name}"), c);
        }
        v.check(
            self.tasks.sweep_interval.get() >= std::time::Duration::from_millis(100),
            "tasks.sweep_interval",
            self.tasks.sweep_interval,
            "must be at least 100ms (a sweep walks every live task)",
        );
        self.runtime.validate_into(&mut |key, value, reason| {
            v.invalid(&format!("runtime.{key}"), value, reason);
        });
        if self.admin.enabled && self.admin.addr == self.server.addr && self.server.addr.port() != 0
        {
            v.invalid(
                "admin.addr",
                self.admin.addr,
                "must differ from server.addr (the admin port is separate from traffic)",
            );
        }
    }
}

/// Where the config comes from, besides defaults and `KEEL_*` variables.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// `--config FILE` (or `KEEL_CONFIG`).
    pub file: Option<PathBuf>,
    /// `--set key=value`, in order.
    pub sets: Vec<String>,
}

impl Sources {
    /// Parse Keel's own flags: `--config FILE`/`-c FILE`/`--config=FILE` and
    /// `--set key=value`/`--set=key=value`. Anything else is an error, so a typo never
    /// silently runs with defaults.
    pub fn from_args<I: IntoIterator<Item = String>>(args: I) -> Result<Sources, String> {
        let mut s = Sources::default();
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            if let Some(v) = a.strip_prefix("--config=") {
                s.file = Some(v.into());
            } else if a == "--config" || a == "-c" {
                s.file = Some(it.next().ok_or("--config needs a file path")?.into());
            } else if let Some(v) = a.strip_prefix("--set=") {
                s.sets.push(v.to_string());
            } else if a == "--set" {
                s.sets.push(it.next().ok_or("--set needs key=value")?);
            } else {
                return Err(format!(
                    "unknown argument {a:?}; expected --config FILE or --set key=value"
                ));
            }
        }
        Ok(s)
    }

    /// Add `KEEL_CONFIG` as the file when no `--config` was given.
    pub fn with_env_file(mut self) -> Sources {
        if self.file.is_none() {
            if let Some(p) = std::env::var_os("KEEL_CONFIG") {
                self.file = Some(p.into());
            }
        }
        self
    }

    /// Load: defaults → file → `KEEL_*` env → `--set` flags, then validate.
    pub fn load(&self) -> Result<Loaded<Config>, ConfigError> {
        self.load_with_env(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
    }

    /// [`Sources::load`] with explicit environment variables (tests).
    pub fn load_with_env<I: IntoIterator<Item = (String, String)>>(
        &self,
        env: I,
    ) -> Result<Loaded<Config>, ConfigError> {
        let mut l = Loader::defaults(&Config::default())?;
        if let Some(f) = &self.file {
            l = l.file(f)?;
        }
        l = l.env_vars(ENV_PREFIX, env);
        for s in &self.sets {
            l = l.set_arg(s)?;
        }
        l.load::<Config>()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use keel_config::{ConfigError, Loaded, Loader};

    #[test]
    fn flags_parse_and_reject_unknown() {
        let s = Sources::from_args(
            [
                "-c",
                "a.toml",
                "--set",
                "server.addr=1.2.3.4:5",
                "--set=log.level=debug",
            ]
            .map(String::from),
        )
        .unwrap();
        assert_eq!(s.file.as_deref(), Some(std::path::Path::new("a.toml")));
        assert_eq!(s.sets, vec!["server.addr=1.2.3.4:5", "log.level=debug"]);
        let e = Sources::from_args(["--port".to_string()]).unwrap_err();
        assert!(e.contains("--port"), "{e}");
    }

    #[test]
    fn defaults_load_and_validate() {
        let l = Sources::default().load_with_env(Vec::new()).unwrap();
        assert_eq!(l.value, Config::default());
    }

    #[test]
    fn env_overrides_and_admin_clash_is_caught() {
        let env = vec![
            (
                "KEEL_SERVER__ADDR".to_string(),
                "127.0.0.1:7000".to_string(),
            ),
            ("KEEL_ADMIN__ADDR".to_string(), "127.0.0.1:7000".to_string()),
        ];
        let e = Sources::default()
            .load_with_env(env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("admin.addr") && e.contains("must differ"), "{e}");
    }

    fn load_toml(toml: &str) -> Result<Loaded<Config>, ConfigError> {
        Loader::defaults(&Config::default())?
            .file_contents("test.toml", keel_config::Format::Toml, toml)?
            .load::<Config>()
    }

    #[test]
    fn clients_are_configured_by_name_with_policy_defaults() {
        let l = load_toml(
            "[clients.inventory]\nendpoints = [\"127.0.0.1:7001\", \"127.0.0.1:7002;priority=1\"]\nprotocol = \"h2c\"\nretry.max_attempts = 2\n",
        )
        .unwrap();
        let inv = &l.value.clients["inventory"];
        assert_eq!(inv.endpoints.len(), 2);
        assert_eq!(inv.retry.max_attempts, 2);
        assert_eq!(
            inv.outlier.consecutive_failures, 5,
            "unset keys keep the policy default"
        );
        assert!(
            inv.build("inventory", keel_core::propagation::Outbound::default())
                .is_ok()
        );
    }

    #[test]
    fn client_mistakes_name_the_key() {
        let e = load_toml("[clients.inventory]\nendpoints = [\"localhost\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("clients.inventory.endpoints[0]") && e.contains("localhost"),
            "{e}"
        );
        let e = load_toml("[clients.inventory]\nretries = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("retries"), "{e}");
    }
}
