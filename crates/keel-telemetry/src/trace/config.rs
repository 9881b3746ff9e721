//! `[telemetry.trace]`: where spans go and how much of them the process may hold.
//!
//! The file/env/flag layers of `keel-config` fill this struct like every other section; on top
//! of that, [`TraceConfig::apply_env`] honours the standard `OTEL_*` variables, because
//! operators set those once per cluster and expect every OpenTelemetry-speaking process to
//! obey them.

use std::collections::BTreeMap;

use keel_config::{Duration, Validate, Validator};
use serde::{Deserialize, Serialize};

/// The signal path an OTLP/HTTP collector serves traces on.
const HTTP_TRACES_PATH: &str = "/v1/traces";

/// The wire protocol spoken to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum OtlpProtocol {
    /// OTLP over gRPC (collector port 4317 by convention).
    #[default]
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP over HTTP with protobuf bodies (collector port 4318 by convention).
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

impl OtlpProtocol {
    /// The name used in config and in `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub fn as_str(self) -> &'static str {
        match self {
            OtlpProtocol::Grpc => "grpc",
            OtlpProtocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// Trace export settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TraceConfig {
    /// Master switch. Default `true`: with no `endpoint` nothing is exported anyway, so the
    /// switch only matters for turning off an endpoint set elsewhere (`OTEL_SDK_DISABLED`).
    pub enabled: bool,
    /// Collector URL (`http://host:port`). For gRPC it is the base URL; for `http/protobuf` a
    /// URL without a path gets `/v1/traces` appended, one with a path is used as is. Default
    /// unset: no collector address is right for every deployment, and unset means spans are
    /// not even queued, so an unconfigured service pays nothing.
    pub endpoint: Option<String>,
    /// `grpc` or `http/protobuf`. Default `grpc`: Keel already speaks HTTP/2 for gRPC, and
    /// every collector accepts OTLP/gRPC.
    pub protocol: OtlpProtocol,
    /// The `service.name` resource attribute. Default `"keel"`: the semantic conventions
    /// require a value, and a constant is easier to spot as "forgot to set it" than a guess.
    pub service_name: String,
    /// Extra resource attributes (`deployment.environment`, `service.version`, …). Default
    /// empty: only the deployment knows them.
    pub resource_attributes: BTreeMap<String, String>,
    /// Share of *new* traces (no sampled flag from a caller) to record, in `[0, 1]`. A trace
    /// that arrives with a caller's decision keeps it, so a trace is never half-recorded
    /// across services. The decision is made when a request's context is built (the
    /// facade feeds this ratio there); the tracer itself only honours the context's sampled
    /// flag. Default `1.0`: record everything until volume says otherwise, the
    /// OpenTelemetry default.
    pub sample_ratio: f64,
    /// Spans held waiting for export; when full, new spans are dropped and counted. Default
    /// 2048 (the OpenTelemetry batch processor's): a few seconds of a busy service's spans,
    /// a few hundred kilobytes at most.
    pub queue_capacity: usize,
    /// Spans per export request; a full batch is sent without waiting for the interval.
    /// Default 512 (the OpenTelemetry default): requests stay well under collectors' 4 MiB
    /// message limits.
    pub max_batch: usize,
    /// How often the queue is flushed when batches do not fill up. Default 1s: spans show up
    /// in the backend quickly without one request per span.
    pub export_interval: Duration,
    /// Upper bound of one export request; a slower collector costs that batch, never the
    /// queue. Default 5s: generous for a collector on the same network, short enough that a
    /// hung one is noticed within a few intervals.
    pub export_timeout: Duration,
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig {
            enabled: true,
            endpoint: None,
            protocol: OtlpProtocol::Grpc,
            service_name: "keel".to_owned(),
            resource_attributes: BTreeMap::new(),
            sample_ratio: 1.0,
            queue_capacity: 2048,
            max_batch: 512,
            export_interval: Duration::from_secs(1),
            export_timeout: Duration::from_secs(5),
        }
    }
}

impl Validate for TraceConfig {
    fn validate(&self, v: &mut Validator) {
        v.check(
            (0.0..=1.0).contains(&self.sample_ratio),
            "sample_ratio",
            self.sample_ratio,
            "must be between 0 and 1",
        );
        v.check(
            self.queue_capacity >= 1,
            "queue_capacity",
            self.queue_capacity,
            "must be at least 1",
        );
        v.check(
            self.max_batch >= 1,
            "max_batch",
            self.max_batch,
            "must be at least 1",
        );
        v.check(
            !self.export_interval.is_zero(),
            "export_interval",
            self.export_interval,
            "must be more than zero (zero would spin the exporter)",
        );
        v.check(
            !self.export_timeout.is_zero(),
            "export_timeout",
            self.export_timeout,
            "must be more than zero (every export would time out)",
        );
        if let Some(e) = &self.endpoint {
            if let Err(reason) = parse_endpoint(e) {
                v.invalid("endpoint", format!("{e:?}"), reason);
            }
        }
    }
}

impl TraceConfig {
    /// Apply the standard OpenTelemetry environment variables on top of this config, reading
    /// them through `env` (pass `&|k| std::env::var(k).ok()` in production; tests pass a fake).
    ///
    /// Honoured: `OTEL_SDK_DISABLED`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
    /// `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`, `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`,
    /// `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`. An empty variable counts as unset,
    /// as the OpenTelemetry specification asks. A value that cannot be used is skipped and
    /// reported in the returned warnings (variable, value, reason), so a typo in one variable
    /// never stops the service or discards the others.
    ///
    /// Sampler names map to [`TraceConfig::sample_ratio`]: Keel always honours a caller's
    /// decision, so `always_on`/`traceidratio` behave as their `parentbased_` forms.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
        let get = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let mut warnings = Vec::new();
        let mut warn = |var: &str, value: &str, reason: &str| {
            warnings.push(format!("{var}={value:?} ignored: {reason}"));
        };

        if let Some(v) = get("OTEL_SDK_DISABLED") {
            match v.trim().to_ascii_lowercase().as_str() {
                "true" => self.enabled = false,
                // `false` means "do not disable", not "force on": config may still disable.
                "false" => {}
                _ => warn("OTEL_SDK_DISABLED", &v, "expected true or false"),
            }
        }

        if let Some(v) = get("OTEL_RESOURCE_ATTRIBUTES") {
            for (key, value) in parse_resource_attributes(&v, &mut |entry, reason| {
                warn("OTEL_RESOURCE_ATTRIBUTES", entry, reason)
            }) {
                if key == "service.name" {
                    // The specification makes OTEL_SERVICE_NAME win; it is applied below.
                    self.service_name = value;
                } else {
                    self.resource_attributes.insert(key, value);
                }
            }
        }
        if let Some(v) = get("OTEL_SERVICE_NAME") {
            self.service_name = v.trim().to_owned();
        }

        // The protocol first: it decides how the general endpoint is completed.
        for var in [
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ] {
            if let Some(v) = get(var) {
                match v.trim() {
                    "grpc" => self.protocol = OtlpProtocol::Grpc,
                    "http/protobuf" => self.protocol = OtlpProtocol::HttpProtobuf,
                    "http/json" => warn(var, &v, "http/json is not supported by Keel"),
                    _ => warn(var, &v, "expected grpc or http/protobuf"),
                }
            }
        }

        let traces = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .map(|v| ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", v, false));
        let general =
            get("OTEL_EXPORTER_OTLP_ENDPOINT").map(|v| ("OTEL_EXPORTER_OTLP_ENDPOINT", v, true));
        // The signal-specific variable wins; if it is unusable, the general one still applies.
        for (var, v, append_path) in traces.into_iter().chain(general) {
            let url = v.trim();
            match parse_endpoint(url) {
                Ok(()) => {
                    self.endpoint = Some(
                        if append_path && self.protocol == OtlpProtocol::HttpProtobuf {
                            // The general endpoint is a base for every signal: the
                            // specification appends the signal's path, even after a path.
                            format!("{}{HTTP_TRACES_PATH}", url.trim_end_matches('/'))
                        } else {
                            url.to_owned()
                        },
                    );
                    break;
                }
                Err(reason) => warn(var, &v, &reason),
            }
        }

        if let Some(v) = get("OTEL_TRACES_SAMPLER") {
            match v.trim() {
                "always_on" | "parentbased_always_on" => self.sample_ratio = 1.0,
                "always_off" | "parentbased_always_off" => self.sample_ratio = 0.0,
                "traceidratio" | "parentbased_traceidratio" => {
                    // A missing or unusable argument means 1.0, per the specification.
                    self.sample_ratio = 1.0;
                    if let Some(arg) = get("OTEL_TRACES_SAMPLER_ARG") {
                        match arg.trim().parse::<f64>() {
                            Ok(r) if (0.0..=1.0).contains(&r) => self.sample_ratio = r,
                            _ => warn(
                                "OTEL_TRACES_SAMPLER_ARG",
                                &arg,
                                "expected a ratio between 0 and 1; using 1.0",
                            ),
                        }
                    }
                }
                _ => warn(
                    "OTEL_TRACES_SAMPLER",
                    &v,
                    "expected always_on, always_off, traceidratio, parentbased_always_on, \
                     parentbased_always_off or parentbased_traceidratio",
                ),
            }
        }

        warnings
    }

    /// The URL export requests go to, if an endpoint is set: the endpoint itself for gRPC;
    /// for `http/protobuf`, the endpoint with `/v1/traces` appended when it has no path.
    pub fn export_url(&self) -> Option<String> {
        let e = self.endpoint.as_deref()?.trim();
        Some(match self.protocol {
            OtlpProtocol::Grpc => e.to_owned(),
            OtlpProtocol::HttpProtobuf => {
                let has_path = e
                    .parse::<http::Uri>()
                    .ok()
                    .is_some_and(|u| !matches!(u.path(), "" | "/"));
                if has_path {
                    e.to_owned()
                } else {
                    format!("{}{HTTP_TRACES_PATH}", e.trim_end_matches('/'))
                }
            }
        })
    }
}

/// Check that `s` is an absolute `http` or `https` URL with a host.
fn parse_endpoint(s: &str) -> Result<(), String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|e| format!("not a URL ({e}); expected e.g. http://collector:4317"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => return Err(format!("scheme {other:?} is not http or https")),
        None => return Err("no scheme; expected e.g. http://collector:4317".to_owned()),
    }
    match uri.host() {
        Some(h) if !h.is_empty() => Ok(()),
        _ => Err("no host".to_owned()),
    }
}

/// Parse `k=v,k2=v2` (W3C-baggage-like, values percent-encoded). Bad entries are reported
/// through `bad` and skipped, the rest are kept.
fn parse_resource_attributes(s: &str, bad: &mut dyn FnMut(&str, &str)) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in s.split(',') {
        let entry = entry.trim();
        if entry.is_empty() {
            continue;
        }
        let Some((k, v)) = entry.split_once('=') else {
            bad(entry, "expected key=value");
            continue;
        };
        let key = k.trim();
        if key.is_empty() {
            bad(entry, "empty key");
            continue;
        }
        match percent_decode(v.trim()) {
            Some(value) => out.push((key.to_owned(), value)),
            None => bad(entry, "invalid percent-encoding or not UTF-8"),
        }
    }
    out
}

/// Decode `%XX` escapes; `None` for a malformed escape or a result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let strict = keel_core::codec::percent::Options::default();
    let bytes = keel_core::codec::percent::decode(s.as_bytes(), strict).ok()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashMap;

    use super::*;

    /// Apply `vars` to the default config; return it with the warnings.
    fn apply(vars: &[(&str, &str)]) -> (TraceConfig, Vec<String>) {
        apply_to(TraceConfig::default(), vars)
    }

    fn apply_to(mut cfg: TraceConfig, vars: &[(&str, &str)]) -> (TraceConfig, Vec<String>) {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let warnings = cfg.apply_env(&|k| map.get(k).cloned());
        (cfg, warnings)
    }

    fn problems(cfg: &TraceConfig) -> Vec<String> {
        let mut v = Validator::new();
        cfg.validate(&mut v);
        v.into_problems().into_iter().map(|p| p.key).collect()
    }

    #[test]
    fn no_variables_change_nothing() {
        let (cfg, w) = apply(&[]);
        assert_eq!(cfg, TraceConfig::default());
        assert!(w.is_empty());
    }

    #[test]
    fn service_name_and_its_precedence_over_resource_attributes() {
        let (cfg, w) = apply(&[("OTEL_SERVICE_NAME", "orders")]);
        assert_eq!(cfg.service_name, "orders");
        assert!(w.is_empty());

        let (cfg, _) = apply(&[("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs")]);
        assert_eq!(cfg.service_name, "from-attrs");
        assert!(!cfg.resource_attributes.contains_key("service.name"));

        let (cfg, _) = apply(&[
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs"),
            ("OTEL_SERVICE_NAME", "orders"),
        ]);
        assert_eq!(cfg.service_name, "orders");
    }

    #[test]
    fn grpc_endpoint_is_used_as_given() {
        let (cfg, w) = apply(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")]);
        assert_eq!(cfg.endpoint.as_deref(), Some("http://collector:4317"));
        assert_eq!(cfg.protocol, OtlpProtocol::Grpc);
        assert_eq!(cfg.export_url().as_deref(), Some("http://collector:4317"));
        assert!(w.is_empty());
    }

    #[test]
    fn http_general_endpoint_gets_the_traces_path() {
        let (cfg, w) = apply(&[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
        ]);
        assert_eq!(cfg.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(
            cfg.endpoint.as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(
            cfg.export_url().as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert!(w.is_empty());

        // Even after a base path, as the specification says.
        let (cfg, _) = apply(&[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://gw.example/otlp"),
        ]);
        assert_eq!(
            cfg.endpoint.as_deref(),
            Some("https://gw.example/otlp/v1/traces")
        );
    }

    #[test]
    fn traces_endpoint_wins_and_is_used_as_is() {
        let (cfg, w) = apply(&[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://traces:4318/custom/path",
            ),
        ]);
        assert_eq!(
            cfg.endpoint.as_deref(),
            Some("http://traces:4318/custom/path")
        );
        assert!(w.is_empty());
    }

    #[test]
    fn an_unusable_traces_endpoint_falls_back_to_the_general_one() {
        let (cfg, w) = apply(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "collector:4317"),
        ]);
        assert_eq!(cfg.endpoint.as_deref(), Some("http://general:4317"));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), "{w:?}");
        assert!(w[0].contains("collector:4317"), "{w:?}");
    }

    #[test]
    fn bad_endpoints_are_warnings_and_leave_config_alone() {
        let base = TraceConfig {
            endpoint: Some("http://configured:4317".into()),
            ..TraceConfig::default()
        };
        for bad in ["ftp://collector:21", "not a url", "/just/a/path"] {
            let (cfg, w) = apply_to(base.clone(), &[("OTEL_EXPORTER_OTLP_ENDPOINT", bad)]);
            assert_eq!(cfg.endpoint.as_deref(), Some("http://configured:4317"));
            assert_eq!(w.len(), 1, "{bad}: {w:?}");
            assert!(w[0].starts_with("OTEL_EXPORTER_OTLP_ENDPOINT="), "{w:?}");
            assert!(w[0].contains(bad), "{w:?}");
        }
    }

    #[test]
    fn protocol_variables_and_precedence() {
        let (cfg, _) = apply(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]);
        assert_eq!(cfg.protocol, OtlpProtocol::HttpProtobuf);

        let (cfg, _) = apply(&[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
        ]);
        assert_eq!(cfg.protocol, OtlpProtocol::Grpc);

        // The traces protocol decides how the general endpoint is completed.
        let (cfg, _) = apply(&[
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
        ]);
        assert_eq!(cfg.endpoint.as_deref(), Some("http://c:4318/v1/traces"));

        for bad in ["http/json", "thrift"] {
            let (cfg, w) = apply(&[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", bad)]);
            assert_eq!(cfg.protocol, OtlpProtocol::Grpc);
            assert_eq!(w.len(), 1);
            assert!(w[0].contains("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"), "{w:?}");
            assert!(w[0].contains(bad), "{w:?}");
        }
    }

    #[test]
    fn samplers_map_to_ratios() {
        let start = TraceConfig {
            sample_ratio: 0.5,
            ..TraceConfig::default()
        };
        for (sampler, arg, want) in [
            ("always_on", None, 1.0),
            ("always_off", None, 0.0),
            ("parentbased_always_on", None, 1.0),
            ("parentbased_always_off", None, 0.0),
            ("traceidratio", Some("0.25"), 0.25),
            ("parentbased_traceidratio", Some("0.1"), 0.1),
            ("traceidratio", None, 1.0),
        ] {
            let mut vars = vec![("OTEL_TRACES_SAMPLER", sampler)];
            if let Some(a) = arg {
                vars.push(("OTEL_TRACES_SAMPLER_ARG", a));
            }
            let (cfg, w) = apply_to(start.clone(), &vars);
            assert_eq!(cfg.sample_ratio, want, "{sampler} {arg:?}");
            assert!(w.is_empty(), "{sampler}: {w:?}");
        }
    }

    #[test]
    fn bad_sampler_values_warn() {
        let (cfg, w) = apply(&[("OTEL_TRACES_SAMPLER", "jaeger_remote")]);
        assert_eq!(cfg.sample_ratio, 1.0);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("OTEL_TRACES_SAMPLER") && w[0].contains("jaeger_remote"));

        for arg in ["1.5", "-0.1", "half", "NaN"] {
            let (cfg, w) = apply(&[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", arg),
            ]);
            assert_eq!(cfg.sample_ratio, 1.0, "{arg}");
            assert_eq!(w.len(), 1, "{arg}: {w:?}");
            assert!(w[0].starts_with("OTEL_TRACES_SAMPLER_ARG="), "{w:?}");
            assert!(w[0].contains(arg), "{w:?}");
        }
    }

    #[test]
    fn resource_attributes_are_split_and_percent_decoded() {
        let (cfg, w) = apply(&[(
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=prod, team=pay%20ments ,note=a%2Cb%3Dc,,",
        )]);
        assert!(w.is_empty(), "{w:?}");
        let attrs = &cfg.resource_attributes;
        assert_eq!(attrs["deployment.environment"], "prod");
        assert_eq!(attrs["team"], "pay ments");
        assert_eq!(attrs["note"], "a,b=c");
        assert_eq!(attrs.len(), 3);
    }

    #[test]
    fn bad_resource_attribute_entries_are_skipped_with_warnings() {
        let (cfg, w) = apply(&[(
            "OTEL_RESOURCE_ATTRIBUTES",
            "good=1,novalue,=nokey,bad=%zz,cut=%4,utf=%ff,also.good=2",
        )]);
        let keys: Vec<_> = cfg.resource_attributes.keys().cloned().collect();
        assert_eq!(keys, ["also.good", "good"]);
        assert_eq!(w.len(), 5, "{w:?}");
        for (warning, entry) in w
            .iter()
            .zip(["novalue", "=nokey", "bad=%zz", "cut=%4", "utf=%ff"])
        {
            assert!(
                warning.starts_with("OTEL_RESOURCE_ATTRIBUTES="),
                "{warning}"
            );
            assert!(warning.contains(entry), "{warning}");
        }
    }

    #[test]
    fn sdk_disabled() {
        let (cfg, w) = apply(&[("OTEL_SDK_DISABLED", "true")]);
        assert!(!cfg.enabled);
        assert!(w.is_empty());

        let (cfg, _) = apply(&[("OTEL_SDK_DISABLED", "TRUE")]);
        assert!(!cfg.enabled);

        let (cfg, w) = apply(&[("OTEL_SDK_DISABLED", "false")]);
        assert!(cfg.enabled);
        assert!(w.is_empty());

        let (cfg, w) = apply(&[("OTEL_SDK_DISABLED", "yes")]);
        assert!(cfg.enabled);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("OTEL_SDK_DISABLED") && w[0].contains("yes"));
    }

    #[test]
    fn empty_variables_count_as_unset() {
        let (cfg, w) = apply(&[
            ("OTEL_SERVICE_NAME", ""),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "  "),
            ("OTEL_TRACES_SAMPLER", ""),
            ("OTEL_SDK_DISABLED", ""),
        ]);
        assert_eq!(cfg, TraceConfig::default());
        assert!(w.is_empty());
    }

    #[test]
    fn export_url_for_http_config_endpoints() {
        let mut cfg = TraceConfig {
            protocol: OtlpProtocol::HttpProtobuf,
            endpoint: Some("http://c:4318".into()),
            ..TraceConfig::default()
        };
        assert_eq!(cfg.export_url().as_deref(), Some("http://c:4318/v1/traces"));
        cfg.endpoint = Some("http://c:4318/ingest".into());
        assert_eq!(cfg.export_url().as_deref(), Some("http://c:4318/ingest"));
        cfg.endpoint = None;
        assert_eq!(cfg.export_url(), None);
    }

    #[test]
    fn validation() {
        assert!(problems(&TraceConfig::default()).is_empty());
        let ok = TraceConfig {
            endpoint: Some("https://collector.example:4317".into()),
            ..TraceConfig::default()
        };
        assert!(problems(&ok).is_empty());

        let bad = TraceConfig {
            endpoint: Some("collector:4317".into()),
            sample_ratio: 1.5,
            queue_capacity: 0,
            max_batch: 0,
            export_interval: Duration::ZERO,
            export_timeout: Duration::ZERO,
            ..TraceConfig::default()
        };
        assert_eq!(
            problems(&bad),
            [
                "sample_ratio",
                "queue_capacity",
                "max_batch",
                "export_interval",
                "export_timeout",
                "endpoint"
            ]
        );
        let negative = TraceConfig {
            sample_ratio: -0.1,
            ..TraceConfig::default()
        };
        assert_eq!(problems(&negative), ["sample_ratio"]);
    }

    #[test]
    fn loads_from_a_config_file() {
        use keel_config::{Format, Loader};
        let toml = r#"
            endpoint = "http://collector:4318"
            protocol = "http/protobuf"
            service_name = "orders"
            sample_ratio = 0.25
            export_interval = "250ms"
            [resource_attributes]
            "deployment.environment" = "prod"
        "#;
        let cfg = Loader::defaults(&TraceConfig::default())
            .unwrap()
            .file_contents("trace.toml", Format::Toml, toml)
            .unwrap()
            .load::<TraceConfig>()
            .unwrap()
            .value;
        assert_eq!(cfg.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(cfg.endpoint.as_deref(), Some("http://collector:4318"));
        assert_eq!(cfg.sample_ratio, 0.25);
        assert_eq!(
            cfg.export_interval.get(),
            std::time::Duration::from_millis(250)
        );
        assert_eq!(cfg.resource_attributes["deployment.environment"], "prod");
        assert_eq!(cfg.queue_capacity, 2048);

        let typo = Loader::defaults(&TraceConfig::default())
            .unwrap()
            .file_contents("trace.toml", Format::Toml, "protocl = \"grpc\"\n")
            .unwrap()
            .load::<TraceConfig>();
        assert!(typo.is_err());
    }

    #[test]
    fn protocol_names_in_config() {
        #[derive(Deserialize)]
        struct W {
            p: OtlpProtocol,
        }
        let w: W = toml_like("grpc");
        assert_eq!(w.p, OtlpProtocol::Grpc);
        let w: W = toml_like("http/protobuf");
        assert_eq!(w.p, OtlpProtocol::HttpProtobuf);

        fn toml_like(v: &str) -> W {
            use serde::de::value::{Error, MapDeserializer};
            W::deserialize(MapDeserializer::<_, Error>::new([("p", v)].into_iter())).unwrap()
        }
    }
}
