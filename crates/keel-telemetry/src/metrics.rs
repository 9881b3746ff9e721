//! Prometheus metrics in the text exposition format (version 0.0.4), served on the admin
//! port's `/metrics`.
//!
//! Request metrics (RED per route and per upstream) are updated from the observer's records:
//! one read-locked map lookup to find the series, then atomic increments. Everything that
//! already has its own counters — client pools, runtime, task registry, server stats, the
//! span exporter — is read by *collectors* when `/metrics` is scraped, so it costs nothing
//! between scrapes.
//!
//! Label cardinality is bounded: a route label is the router's template when it provided
//! one; raw paths (no template) are admitted up to [`MetricsConfig::max_routes`] distinct
//! values, after which they are counted under `route="other"`. Upstream names come from config.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use keel_core::fasthash::FastMap;
use keel_core::observe::{ClientRecord, MessageRecord, Outcome, ServerRecord};

/// Histogram bucket upper bounds, in seconds. Sub-millisecond services need resolution below
/// 1 ms (the first four buckets), while the tail up to 10 s still shows timeouts.
pub const BUCKETS: [f64; 16] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Label values of the `class` label: HTTP status classes, then gRPC codes by name, then
/// "none" (no status: cancelled or failed before an answer).
const HTTP_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// Index of the first gRPC class; code `c` is class `GRPC_CLASS + c`.
const GRPC_CLASS: usize = HTTP_CLASSES.len();
const NONE_CLASS: usize = GRPC_CLASS + GRPC_CODE_NAMES.len();
const CLASS_COUNT: usize = NONE_CLASS + 1;

/// The `class` label of class index `i`.
fn class_name(i: usize) -> &'static str {
    HTTP_CLASSES
        .get(i)
        .or_else(|| GRPC_CODE_NAMES.get(i.wrapping_sub(GRPC_CLASS)))
        .copied()
        .unwrap_or("none")
}

/// gRPC status codes' canonical names, indexed by code (0–16).
pub(crate) const GRPC_CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

const OUTCOMES: [Outcome; 5] = [
    Outcome::Answered,
    Outcome::DeadlineExceeded,
    Outcome::Cancelled,
    Outcome::Failed,
    Outcome::Refused,
];

fn class_index(grpc: bool, status: Option<u16>, grpc_status: Option<i32>) -> usize {
    if grpc && let Some(code) = grpc_status {
        return usize::try_from(code)
            .ok()
            .filter(|c| *c < GRPC_CODE_NAMES.len())
            // Codes outside the table count as UNKNOWN (2), as gRPC itself treats them.
            .map_or(GRPC_CLASS + 2, |c| GRPC_CLASS + c);
    }
    match status {
        Some(s @ 100..=599) => usize::from(s / 100) - 1,
        _ => NONE_CLASS,
    }
}

fn outcome_index(o: Outcome) -> usize {
    OUTCOMES.iter().position(|x| *x == o).unwrap_or(0)
}

/// Metrics settings (`[metrics]`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics` on the admin port.
    pub enabled: bool,
    /// Distinct raw-path route labels before further ones count as `other`. 200: more than
    /// any real service's route table, far below what makes Prometheus suffer.
    pub max_routes: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            max_routes: 200,
        }
    }
}

impl keel_config::Validate for MetricsConfig {
    fn validate(&self, v: &mut keel_config::Validator) {
        v.check(
            self.max_routes >= 1,
            "max_routes",
            self.max_routes,
            "must be at least 1",
        );
    }
}

/// A latency histogram with [`BUCKETS`].
#[derive(Debug, Default)]
struct Histogram {
    /// Per-bucket (non-cumulative) counts; the last slot is `+Inf`.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counters of one (route, method) or one upstream.
#[derive(Debug, Default)]
struct Series {
    classes: [AtomicU64; CLASS_COUNT],
    outcomes: [AtomicU64; OUTCOMES.len()],
    duration: Histogram,
}

impl Series {
    fn record(&self, class: usize, outcome: Outcome, d: Duration) {
        self.classes[class].fetch_add(1, Ordering::Relaxed);
        self.outcomes[outcome_index(outcome)].fetch_add(1, Ordering::Relaxed);
        self.duration.observe(d);
    }
}

type Collector = Box<dyn Fn(&mut Exposition) + Send + Sync>;

/// One route's series, by method.
type MethodSeries = Vec<(String, Arc<Series>)>;

struct Inner {
    cfg: MetricsConfig,
    /// Route label → its methods' series (a handful), so a lookup borrows the route and
    /// allocates nothing. A fast hasher: the labels are bounded (templates, a capped set of
    /// raw paths or gRPC methods), and this lookup runs on every request.
    server: RwLock<FastMap<String, MethodSeries>>,
    /// Raw-path route labels admitted so far (templates are not counted against the cap).
    raw_routes: AtomicU64,
    client: RwLock<FastMap<String, Arc<Series>>>,
    /// `system destination side` → series (destinations come from config).
    messages: RwLock<FastMap<String, Arc<Series>>>,
    /// `system destination` → (redelivered, duplicates skipped).
    redeliveries: RwLock<HashMap<String, Arc<(AtomicU64, AtomicU64)>>>,
    in_flight: AtomicI64,
    long_polls: RwLock<HashMap<String, Arc<(AtomicU64, AtomicU64)>>>,
    collectors: Mutex<Vec<Collector>>,
}

/// The metrics of one process. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("config", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// Empty metrics.
    pub fn new(cfg: MetricsConfig) -> Metrics {
        Metrics {
            inner: Arc::new(Inner {
                cfg,
                server: RwLock::new(Default::default()),
                raw_routes: AtomicU64::new(0),
                client: RwLock::new(FastMap::default()),
                messages: RwLock::new(FastMap::default()),
                redeliveries: RwLock::new(HashMap::new()),
                in_flight: AtomicI64::new(0),
                long_polls: RwLock::new(HashMap::new()),
                collectors: Mutex::new(Vec::new()),
            }),
        }
    }

    /// A server request started.
    pub fn server_started(&self) {
        self.inner.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A server request ended.
    pub fn record_server(&self, r: &ServerRecord<'_>) {
        self.inner.in_flight.fetch_sub(1, Ordering::Relaxed);
        let class = class_index(r.grpc, r.status, r.grpc_status);
        let method = r.method.as_str();
        // The common case records under the read lock: a lookup and a few atomics, no
        // reference count touched.
        if let Some(s) = read(&self.inner.server)
            .get(r.route)
            .and_then(|methods| methods.iter().find(|(m, _)| m == method))
        {
            s.1.record(class, r.outcome, r.duration);
            return;
        }
        let series = self.server_series(r.route, r.route_is_template, method);
        series.record(class, r.outcome, r.duration);
    }

    /// An outbound attempt ended.
    pub fn record_client(&self, r: &ClientRecord<'_>) {
        let class = class_index(r.grpc, r.status, r.grpc_status);
        let series = lookup(&self.inner.client, r.upstream, || r.upstream.to_string());
        series.record(class, r.outcome, r.duration);
    }

    /// A message published or processed.
    pub fn record_message(&self, r: &MessageRecord<'_>) {
        let key = format!("{} {} {}", r.system, r.destination, r.side.as_str());
        let series = lookup(&self.inner.messages, &key, || key.clone());
        series.record(NONE_CLASS, r.outcome, r.duration);
        if r.attempt > 1 || r.duplicate {
            let key = format!("{} {}", r.system, r.destination);
            let found = read(&self.inner.redeliveries).get(&key).cloned();
            let entry = found.unwrap_or_else(|| {
                write(&self.inner.redeliveries)
                    .entry(key)
                    .or_default()
                    .clone()
            });
            if r.attempt > 1 {
                entry.0.fetch_add(1, Ordering::Relaxed);
            }
            if r.duplicate {
                entry.1.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A long poll (blocking code in async) on `route`.
    pub fn record_long_poll(&self, route: &str, held: Duration) {
        let route = self.bounded_route(route, false);
        let entry = {
            let map = read(&self.inner.long_polls);
            map.get(route.as_str()).cloned()
        };
        let entry = entry.unwrap_or_else(|| {
            write(&self.inner.long_polls)
                .entry(route)
                .or_default()
                .clone()
        });
        entry.0.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(held.as_nanos()).unwrap_or(u64::MAX);
        entry.1.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Register a scrape-time collector: called on every `/metrics` render to append
    /// families read from elsewhere (pools, runtime, tasks).
    pub fn add_collector(&self, f: impl Fn(&mut Exposition) + Send + Sync + 'static) {
        self.inner
            .collectors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(f));
    }

    fn server_series(&self, route: &str, template: bool, method: &str) -> Arc<Series> {
        let found = read(&self.inner.server)
            .get(route)
            .and_then(|methods| methods.iter().find(|(m, _)| m == method))
            .map(|(_, s)| s.clone());
        if let Some(s) = found {
            return s;
        }
        let route = self.bounded_route(route, template);
        let mut map = write(&self.inner.server);
        let methods = map.entry(route).or_default();
        if let Some((_, s)) = methods.iter().find(|(m, _)| m == method) {
            return s.clone();
        }
        let s = Arc::new(Series::default());
        methods.push((method.to_string(), s.clone()));
        s
    }

    /// The label for `route`: itself while under the raw-path cap (or a template), else
    /// `other`.
    fn bounded_route(&self, route: &str, template: bool) -> String {
        if template {
            return route.to_string();
        }
        if read(&self.inner.server).contains_key(route) {
            return route.to_string();
        }
        let admitted = self.inner.raw_routes.fetch_add(1, Ordering::Relaxed);
        if admitted < self.inner.cfg.max_routes as u64 {
            route.to_string()
        } else {
            self.inner.raw_routes.fetch_sub(1, Ordering::Relaxed);
            "other".to_string()
        }
    }

    /// The whole exposition, as served on `/metrics`.
    pub fn render(&self) -> String {
        let mut e = Exposition::default();
        self.render_requests(&mut e);
        for c in self
            .inner
            .collectors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            c(&mut e);
        }
        e.finish()
    }

    fn render_requests(&self, e: &mut Exposition) {
        let server: Vec<((String, String), Arc<Series>)> = read(&self.inner.server)
            .iter()
            .flat_map(|(route, methods)| {
                methods
                    .iter()
                    .map(|(m, s)| ((route.clone(), m.clone()), s.clone()))
            })
            .collect();
        e.family(
            "keel_server_requests_total",
            "Server requests by route template, method and status class (HTTP class or gRPC code; none = no answer).",
            "counter",
        );
        for ((route, method), s) in &server {
            for (i, class) in (0..CLASS_COUNT).map(|i| (i, class_name(i))) {
                let n = s.classes[i].load(Ordering::Relaxed);
                if n > 0 {
                    e.sample(
                        "keel_server_requests_total",
                        &[("route", route), ("method", method), ("class", class)],
                        n as f64,
                    );
                }
            }
        }
        e.family(
            "keel_server_request_outcomes_total",
            "How server requests ended: answered, deadline_exceeded, cancelled, failed, refused.",
            "counter",
        );
        for ((route, method), s) in &server {
            for (i, o) in OUTCOMES.iter().enumerate() {
                let n = s.outcomes[i].load(Ordering::Relaxed);
                if n > 0 {
                    e.sample(
                        "keel_server_request_outcomes_total",
                        &[
                            ("route", route),
                            ("method", method),
                            ("outcome", o.as_str()),
                        ],
                        n as f64,
                    );
                }
            }
        }
        e.family(
            "keel_server_request_duration_seconds",
            "Server request duration, arrival to end of response body.",
            "histogram",
        );
        for ((route, method), s) in &server {
            e.histogram(
                "keel_server_request_duration_seconds",
                &[("route", route), ("method", method)],
                &s.duration,
            );
        }
        e.family(
            "keel_server_requests_in_flight",
            "Server requests being handled now.",
            "gauge",
        );
        e.sample(
            "keel_server_requests_in_flight",
            &[],
            self.inner.in_flight.load(Ordering::Relaxed).max(0) as f64,
        );

        let client: Vec<(String, Arc<Series>)> = read(&self.inner.client)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        e.family(
            "keel_client_requests_total",
            "Outbound attempts (retries and hedges included) by upstream and status class.",
            "counter",
        );
        for (up, s) in &client {
            for (i, class) in (0..CLASS_COUNT).map(|i| (i, class_name(i))) {
                let n = s.classes[i].load(Ordering::Relaxed);
                if n > 0 {
                    e.sample(
                        "keel_client_requests_total",
                        &[("upstream", up), ("class", class)],
                        n as f64,
                    );
                }
            }
        }
        e.family(
            "keel_client_request_outcomes_total",
            "How outbound attempts ended: answered, deadline_exceeded, cancelled (a losing hedge, an abandoned call), failed.",
            "counter",
        );
        for (up, s) in &client {
            for (i, o) in OUTCOMES.iter().enumerate() {
                let n = s.outcomes[i].load(Ordering::Relaxed);
                if n > 0 {
                    e.sample(
                        "keel_client_request_outcomes_total",
                        &[("upstream", up), ("outcome", o.as_str())],
                        n as f64,
                    );
                }
            }
        }
        e.family(
            "keel_client_request_duration_seconds",
            "Outbound attempt duration, until the response head (or the failure).",
            "histogram",
        );
        for (up, s) in &client {
            e.histogram(
                "keel_client_request_duration_seconds",
                &[("upstream", up)],
                &s.duration,
            );
        }

        let messages: Vec<(String, Arc<Series>)> = read(&self.inner.messages)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        e.family(
            "keel_messages_total",
            "Messages published or processed, by system, destination, side and outcome (answered = confirmed or acknowledged).",
            "counter",
        );
        e.family(
            "keel_message_duration_seconds",
            "Publish (until confirmed) or processing duration.",
            "histogram",
        );
        for (key, s) in &messages {
            let mut parts = key.splitn(3, ' ');
            let (system, destination, side) = (
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
            );
            for (i, o) in OUTCOMES.iter().enumerate() {
                let n = s.outcomes[i].load(Ordering::Relaxed);
                if n > 0 {
                    e.sample(
                        "keel_messages_total",
                        &[
                            ("system", system),
                            ("destination", destination),
                            ("side", side),
                            ("outcome", o.as_str()),
                        ],
                        n as f64,
                    );
                }
            }
            e.histogram(
                "keel_message_duration_seconds",
                &[
                    ("system", system),
                    ("destination", destination),
                    ("side", side),
                ],
                &s.duration,
            );
        }

        let redeliveries: Vec<(String, Arc<(AtomicU64, AtomicU64)>)> =
            read(&self.inner.redeliveries)
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
        e.family(
            "keel_messages_redelivered_total",
            "Deliveries that were not the first (after a crash, a lost ack, a retry).",
            "counter",
        );
        e.family(
            "keel_messages_duplicates_skipped_total",
            "Redeliveries of messages already applied: acknowledged without running the handler.",
            "counter",
        );
        for (key, c) in &redeliveries {
            let (system, destination) = key.split_once(' ').unwrap_or((key.as_str(), ""));
            let labels = [("system", system), ("destination", destination)];
            e.sample(
                "keel_messages_redelivered_total",
                &labels,
                c.0.load(Ordering::Relaxed) as f64,
            );
            e.sample(
                "keel_messages_duplicates_skipped_total",
                &labels,
                c.1.load(Ordering::Relaxed) as f64,
            );
        }

        let polls: Vec<(String, Arc<(AtomicU64, AtomicU64)>)> = read(&self.inner.long_polls)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        e.family(
            "keel_runtime_long_polls_total",
            "Polls of a request's future that held a worker thread longer than 10 ms: blocking code in async.",
            "counter",
        );
        e.family(
            "keel_runtime_long_poll_seconds_total",
            "Time worker threads were held by those long polls.",
            "counter",
        );
        for (route, p) in &polls {
            e.sample(
                "keel_runtime_long_polls_total",
                &[("route", route)],
                p.0.load(Ordering::Relaxed) as f64,
            );
            e.sample(
                "keel_runtime_long_poll_seconds_total",
                &[("route", route)],
                p.1.load(Ordering::Relaxed) as f64 / 1e9,
            );
        }
    }
}

fn lookup(
    map: &RwLock<FastMap<String, Arc<Series>>>,
    key: &str,
    owned: impl FnOnce() -> String,
) -> Arc<Series> {
    if let Some(s) = read(map).get(key) {
        return s.clone();
    }
    write(map).entry(owned()).or_default().clone()
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// A Prometheus text exposition being written. Families are declared once (`# HELP`,
/// `# TYPE`) and their samples grouped under them, whatever order they are added in.
#[derive(Debug, Default)]
pub struct Exposition {
    order: Vec<String>,
    families: HashMap<String, (String, String, String)>,
}

impl Exposition {
    /// Declare a family: `kind` is `counter`, `gauge` or `histogram`. Declaring it again is
    /// harmless.
    pub fn family(&mut self, name: &str, help: &str, kind: &str) {
        if !self.families.contains_key(name) {
            self.order.push(name.to_string());
            self.families.insert(
                name.to_string(),
                (help.to_string(), kind.to_string(), String::new()),
            );
        }
    }

    /// One sample of a declared family (`name` may carry a suffix such as `_bucket`).
    pub fn sample(&mut self, family: &str, labels: &[(&str, &str)], value: f64) {
        let Some((_, _, body)) = self.families.get_mut(family) else {
            return;
        };
        write_sample(body, family, labels, value);
    }

    fn histogram(&mut self, family: &str, labels: &[(&str, &str)], h: &Histogram) {
        let Some((_, _, body)) = self.families.get_mut(family) else {
            return;
        };
        let mut cumulative = 0u64;
        let bucket = format!("{family}_bucket");
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += h.buckets[i].load(Ordering::Relaxed);
            let le = format_float(*bound);
            let mut with_le: Vec<(&str, &str)> = labels.to_vec();
            with_le.push(("le", &le));
            write_sample(body, &bucket, &with_le, cumulative as f64);
        }
        cumulative += h.buckets[BUCKETS.len()].load(Ordering::Relaxed);
        let mut with_le: Vec<(&str, &str)> = labels.to_vec();
        with_le.push(("le", "+Inf"));
        write_sample(body, &bucket, &with_le, cumulative as f64);
        write_sample(
            body,
            &format!("{family}_sum"),
            labels,
            h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        );
        // The count is the +Inf bucket: reading it separately could disagree by a
        // concurrent observation, which promtool rejects.
        write_sample(body, &format!("{family}_count"), labels, cumulative as f64);
    }

    fn finish(self) -> String {
        let mut out = String::new();
        for name in &self.order {
            let Some((help, kind, body)) = self.families.get(name) else {
                continue;
            };
            let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
            let _ = writeln!(out, "# TYPE {name} {kind}");
            out.push_str(body);
        }
        out
    }
}

fn write_sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(&format_float(value));
    out.push('\n');
}

fn format_float(v: f64) -> String {
    if v.is_infinite() {
        return if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
    }
    if v.is_nan() {
        return "NaN".into();
    }
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn server(route: &str, template: bool, status: Option<u16>, outcome: Outcome) -> String {
        let m = Metrics::new(MetricsConfig::default());
        let method = http::Method::GET;
        m.server_started();
        m.record_server(&ServerRecord {
            ctx: None,
            route,
            route_is_template: template,
            method: &method,
            grpc: false,
            status,
            grpc_status: None,
            outcome,
            start: None,
            duration: Duration::from_micros(700),
            peer: None,
        });
        m.render()
    }

    #[test]
    fn a_request_is_counted_by_class_and_outcome_with_a_histogram() {
        let text = server("/orders/{id}", true, Some(503), Outcome::Answered);
        assert!(text.contains(
            "keel_server_requests_total{route=\"/orders/{id}\",method=\"GET\",class=\"5xx\"} 1\n"
        ));
        assert!(text.contains(
            "keel_server_request_outcomes_total{route=\"/orders/{id}\",method=\"GET\",outcome=\"answered\"} 1\n"
        ));
        // 700 µs: not in the 0.5 ms bucket, in the 1 ms one.
        assert!(text.contains(
            "keel_server_request_duration_seconds_bucket{route=\"/orders/{id}\",method=\"GET\",le=\"0.0005\"} 0\n"
        ));
        assert!(text.contains(
            "keel_server_request_duration_seconds_bucket{route=\"/orders/{id}\",method=\"GET\",le=\"0.001\"} 1\n"
        ));
        assert!(text.contains("keel_server_requests_in_flight 0\n"));
        assert!(text.contains("# TYPE keel_server_request_duration_seconds histogram\n"));
    }

    #[test]
    fn a_cut_off_request_has_class_none() {
        let text = server("/slow", false, None, Outcome::DeadlineExceeded);
        assert!(text.contains("class=\"none\"} 1\n"), "{text}");
        assert!(
            text.contains("outcome=\"deadline_exceeded\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn raw_paths_beyond_the_cap_count_as_other() {
        let m = Metrics::new(MetricsConfig {
            max_routes: 3,
            ..MetricsConfig::default()
        });
        let method = http::Method::GET;
        for i in 0..10 {
            let path = format!("/items/{i}");
            m.server_started();
            m.record_server(&ServerRecord {
                ctx: None,
                route: &path,
                route_is_template: false,
                method: &method,
                grpc: false,
                status: Some(200),
                grpc_status: None,
                outcome: Outcome::Answered,
                start: None,
                duration: Duration::from_millis(1),
                peer: None,
            });
        }
        let text = m.render();
        let routes: std::collections::BTreeSet<&str> = text
            .lines()
            .filter(|l| l.starts_with("keel_server_requests_total{"))
            .filter_map(|l| l.split("route=\"").nth(1)?.split('"').next())
            .collect();
        assert_eq!(routes.len(), 4, "{routes:?}");
        assert!(routes.contains("other"));
        assert!(
            text.contains("route=\"other\",method=\"GET\",class=\"2xx\"} 7\n"),
            "{text}"
        );
    }

    #[test]
    fn grpc_statuses_are_classes_by_name_and_labels_are_escaped() {
        assert_eq!(
            class_name(class_index(true, Some(200), Some(14))),
            "UNAVAILABLE"
        );
        assert_eq!(class_name(class_index(true, Some(200), Some(0))), "OK");
        assert_eq!(
            class_name(class_index(true, Some(200), Some(99))),
            "UNKNOWN"
        );
        assert_eq!(class_name(class_index(false, Some(404), None)), "4xx");
        assert_eq!(class_name(class_index(false, None, None)), "none");
        assert_eq!(
            class_name(class_index(true, None, Some(16))),
            "UNAUTHENTICATED"
        );
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn messages_are_counted_by_system_destination_side_and_outcome() {
        use keel_core::observe::{MessageRecord, MessageSide};
        let m = Metrics::new(MetricsConfig::default());
        let ctx = keel_core::Context::background(Duration::from_secs(1));
        for outcome in [Outcome::Answered, Outcome::Answered, Outcome::Failed] {
            m.record_message(&MessageRecord {
                ctx: &ctx,
                span_id: None,
                side: MessageSide::Process,
                system: "nats",
                destination: "orders.created",
                message_id: None,
                outcome,
                attempt: 1,
                duplicate: false,
                start: std::time::SystemTime::now(),
                duration: Duration::from_micros(300),
            });
        }
        // A redelivery of an applied message, skipped.
        m.record_message(&MessageRecord {
            ctx: &ctx,
            span_id: None,
            side: MessageSide::Process,
            system: "nats",
            destination: "orders.created",
            message_id: None,
            outcome: Outcome::Answered,
            attempt: 2,
            duplicate: true,
            start: std::time::SystemTime::now(),
            duration: Duration::from_micros(100),
        });
        let text = m.render();
        assert!(text.contains(
            "keel_messages_total{system=\"nats\",destination=\"orders.created\",side=\"process\",outcome=\"answered\"} 3\n"
        ), "{text}");
        assert!(text.contains(
            "keel_messages_duplicates_skipped_total{system=\"nats\",destination=\"orders.created\"} 1\n"
        ), "{text}");
        assert!(text.contains(
            "keel_messages_redelivered_total{system=\"nats\",destination=\"orders.created\"} 1\n"
        ), "{text}");
        assert!(text.contains("outcome=\"failed\"} 1\n"), "{text}");
        assert!(text.contains(
            "keel_message_duration_seconds_count{system=\"nats\",destination=\"orders.created\",side=\"process\"} 4\n"
        ), "{text}");
    }

    #[test]
    fn collectors_add_families_at_render_time() {
        let m = Metrics::new(MetricsConfig::default());
        let n = Arc::new(AtomicU64::new(3));
        let seen = n.clone();
        m.add_collector(move |e| {
            e.family("keel_test_things", "Things.", "gauge");
            e.sample(
                "keel_test_things",
                &[("kind", "a")],
                seen.load(Ordering::Relaxed) as f64,
            );
        });
        assert!(m.render().contains("keel_test_things{kind=\"a\"} 3\n"));
        n.store(5, Ordering::Relaxed);
        assert!(m.render().contains("keel_test_things{kind=\"a\"} 5\n"));
    }
}
