//! The server's config sections: `[server]`, `[probes]`, `[readiness]`, `[admin]`, `[shutdown]`.
//!
//! Every default carries the reason for its value; `docs/operations.md` lists them all.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use keel_config::{ByteSize, Duration, Validate, Validator};
use serde::{Deserialize, Serialize};

/// `[server]`: the main listener and the HTTP limits applied to every connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ServerConfig {
    /// Address of the main (traffic) port.
    pub addr: SocketAddr,
    /// Number of `SO_REUSEPORT` sockets bound to `addr`. Unset = one per runtime worker
    /// (or per shard), so the kernel spreads new connections across them without a shared
    /// accept queue becoming a contention point.
    pub listeners: Option<usize>,
    /// Listen backlog. 1024 absorbs a burst of reconnects after a deploy; the kernel caps it
    /// at `net.core.somaxconn` (4096 on current kernels).
    pub backlog: u32,
    /// Disable Nagle on accepted sockets: request/response traffic is latency-bound and small
    /// writes must not wait for an ACK.
    pub tcp_nodelay: bool,
    /// TCP Fast Open queue length on the listeners; 0 turns it off. 256 bounds the number of
    /// pending TFO handshakes (a SYN flood with cookies cannot pin more than that).
    pub tcp_fastopen_queue: u32,
    /// Kernel keepalive on accepted sockets: after this long with nothing received, the
    /// kernel probes the peer, and closes the connection when `tcp_keepalive_probes` probes
    /// in a row go unanswered. It finds dead peers (a host that vanished, a NAT or middlebox
    /// that dropped its mapping) on every protocol, including a connection waiting on a
    /// long request, which the idle timeout does not cover (the kernel probes only a quiet
    /// connection: while a response is being sent, `send_timeout` watches the peer). The
    /// probes also keep such middleboxes' mappings alive; 20 s is below the 30–60 s idle
    /// timeouts typical of them.
    /// Set once on the listeners and inherited by every accepted socket, so it costs nothing
    /// per connection or request (HTTP/2 PINGs cost each request; see
    /// `http2_keepalive_interval`). Whole seconds; `0s` turns it off.
    pub tcp_keepalive_idle: Duration,
    /// Time between unanswered keepalive probes. With the defaults a dead peer is found
    /// 20 s + 2 × 5 s = 30 s after it last sent anything.
    pub tcp_keepalive_interval: Duration,
    /// Unanswered probes before the connection is closed.
    pub tcp_keepalive_probes: u32,
    /// Largest request header block (request line + headers). HTTP/1 answers 431 above it;
    /// HTTP/2 advertises it as `SETTINGS_MAX_HEADER_LIST_SIZE`. 16 KiB fits large cookies and
    /// JWTs (the 8 KiB of nginx's single buffer is a common source of surprise 431s) while
    /// keeping a slow client's buffered garbage small. Minimum 8 KiB (hyper's floor).
    pub max_header_bytes: ByteSize,
    /// Most header fields in one HTTP/1 request; more get 431. 100 is what hyper, Go and
    /// nginx effectively allow; real clients send 10–30.
    pub max_headers: usize,
    /// A client must deliver its whole request head within this time after its first byte,
    /// or the connection is closed (slowloris defence). 10 s lets a slow mobile link through
    /// and frees a stuck connection long before a load balancer's own timeouts.
    pub header_read_timeout: Duration,
    /// Largest request body; larger bodies get 413 (at once when `Content-Length` says so,
    /// otherwise when the limit is crossed while reading). 4 MiB equals gRPC's default maximum
    /// message size, so JSON and gRPC handlers share one ceiling.
    pub max_body_bytes: ByteSize,
    /// Close a connection that has had no request in flight for this long. Advertised to
    /// HTTP/1 clients as `Keep-Alive: timeout=N` so their pools expire sockets first.
    /// 75 s is longer than the 60 s idle timeout of common L7 load balancers, so the proxy in
    /// front (the client) always closes first and never reuses a socket we are closing.
    pub idle_timeout: Duration,
    /// Park an HTTP/1.1 connection that has had no request in flight for this long: the
    /// HTTP/1 state machine and its read and write buffers (16 KiB, held by hyper for the
    /// connection's whole life) are dropped, and the bare socket waits for its next request,
    /// which builds them again. An idle keep-alive connection then costs a few hundred bytes
    /// instead of ~20 KiB — what lets a gateway hold tens of thousands of them. 250 ms: a
    /// connection that is busy never parks (the rebuild, a few microseconds, is paid at most
    /// once per quiet spell of this length), while a burst of new connections that each sent
    /// one request gives its buffers back before the next burst needs them. `0s` = never
    /// park. A connection is parked only when nothing of a next request can be buffered (its
    /// last bytes read ended a request head); one whose last request carried a
    /// `Content-Length` body keeps its buffers until its next bodiless request.
    pub park_idle_after: Duration,
    /// Close a connection whose peer has not taken a single byte of a response for this long
    /// (the socket stayed unwritable): a client that stopped reading — or a proxy's slow
    /// reader — holds the connection, its response and whatever feeds it (an upstream
    /// connection, at a gateway) no longer than this. A reader that is slow but keeps taking
    /// bytes is never cut. 60 s, nginx's `send_timeout`: long enough for any live peer behind
    /// a congested link.
    pub send_timeout: Duration,
    /// Concurrent streams allowed per HTTP/2 connection. 256 keeps one connection from
    /// monopolising the server while leaving clients headroom (Go uses 250, hyper 200).
    pub http2_max_concurrent_streams: u32,
    /// Interval of HTTP/2 PING frames, which detect a dead peer the way the kernel's
    /// keepalive does (`tcp_keepalive_idle`) and also a peer whose TCP stack answers but
    /// whose HTTP/2 side does not. Off (`0s`) by default: hyper's PINGs read the clock and
    /// re-arm a timer on every frame, which measured 1,260 instructions of a 58,650-instruction
    /// unary gRPC call (2.2 %), while the kernel's keepalive finds dead peers for nothing.
    pub http2_keepalive_interval: Duration,
    /// How long to wait for a PING ACK before closing the connection (when PINGs are on). 10 s tolerates a
    /// congested but alive peer (many round trips) while freeing a dead one's streams well
    /// before clients' own request timeouts give up on them.
    pub http2_keepalive_timeout: Duration,
    /// HTTP/2 rapid-reset defence (CVE-2023-44487): streams a client may open and reset
    /// before the server accepted them. 20 is hyper's own default, ample for real clients.
    pub http2_max_pending_accept_reset_streams: usize,
    /// HTTP/2 reset-flood defence for the "MadeYouReset" family (CVE-2025-8671): stream
    /// resets the server itself had to send because of client misbehaviour, tolerated per
    /// connection before it is closed with ENHANCE_YOUR_CALM. 1024 is hyper's default: far above
    /// what a correct client ever provokes, far below what a flood needs to hurt.
    pub http2_max_local_error_reset_streams: usize,
    /// Advertise RFC 8441's extended CONNECT (`SETTINGS_ENABLE_CONNECT_PROTOCOL`), so a
    /// WebSocket can open over an HTTP/2 connection: the gateway tunnels it to an HTTP/1.1
    /// upstream, and axum's `WebSocketUpgrade` on an `any` route accepts it. On: a service
    /// that routes no `CONNECT` answers 405 to one, as to any method it does not serve.
    pub http2_extended_connect: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
            listeners: None,
            backlog: 1024,
            tcp_nodelay: true,
            tcp_fastopen_queue: 256,
            tcp_keepalive_idle: Duration::from_secs(20),
            tcp_keepalive_interval: Duration::from_secs(5),
            tcp_keepalive_probes: 2,
            max_header_bytes: ByteSize::kib(16),
            max_headers: 100,
            header_read_timeout: Duration::from_secs(10),
            max_body_bytes: ByteSize::mib(4),
            idle_timeout: Duration::from_secs(75),
            park_idle_after: Duration::from_millis(250),
            send_timeout: Duration::from_secs(60),
            http2_max_concurrent_streams: 256,
            http2_keepalive_interval: Duration::from_secs(0),
            http2_keepalive_timeout: Duration::from_secs(10),
            http2_max_pending_accept_reset_streams: 20,
            http2_max_local_error_reset_streams: 1024,
            http2_extended_connect: true,
        }
    }
}

impl Validate for ServerConfig {
    fn validate(&self, v: &mut Validator) {
        if let Some(n) = self.listeners {
            v.check(n >= 1, "listeners", n, "must be at least 1");
            v.check(n <= 1024, "listeners", n, "must be at most 1024");
        }
        v.check(
            self.backlog >= 1,
            "backlog",
            self.backlog,
            "must be at least 1",
        );
        if !self.tcp_keepalive_idle.get().is_zero() {
            // Linux's limits: TCP_KEEPIDLE and TCP_KEEPINTVL 1..=32767 s, TCP_KEEPCNT 1..=127.
            for (key, value) in [
                ("tcp_keepalive_idle", self.tcp_keepalive_idle),
                ("tcp_keepalive_interval", self.tcp_keepalive_interval),
            ] {
                v.check(
                    (1..=32767).contains(&value.get().as_secs()),
                    key,
                    value,
                    "must be between 1s and 32767s (the kernel counts whole seconds)",
                );
            }
            v.check(
                (1..=127).contains(&self.tcp_keepalive_probes),
                "tcp_keepalive_probes",
                self.tcp_keepalive_probes,
                "must be between 1 and 127",
            );
        }
        v.check(
            self.max_header_bytes.get() >= 8192,
            "max_header_bytes",
            self.max_header_bytes,
            "must be at least 8KiB (the HTTP/1 parser's smallest buffer)",
        );
        v.check(
            self.max_header_bytes.get() <= u64::from(u32::MAX),
            "max_header_bytes",
            self.max_header_bytes,
            "must fit in 32 bits (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE)",
        );
        v.check(
            self.max_headers >= 1,
            "max_headers",
            self.max_headers,
            "must be at least 1",
        );
        v.check(
            !self.header_read_timeout.get().is_zero(),
            "header_read_timeout",
            self.header_read_timeout,
            "must be greater than 0",
        );
        v.check(
            !self.idle_timeout.get().is_zero(),
            "idle_timeout",
            self.idle_timeout,
            "must be greater than 0",
        );
        v.check(
            self.idle_timeout.get() >= std::time::Duration::from_secs(1),
            "idle_timeout",
            self.idle_timeout,
            "must be at least 1s (it is advertised in whole seconds)",
        );
        v.check(
            !self.send_timeout.get().is_zero(),
            "send_timeout",
            self.send_timeout,
            "must be greater than 0",
        );
        v.check(
            self.http2_max_concurrent_streams >= 1,
            "http2_max_concurrent_streams",
            self.http2_max_concurrent_streams,
            "must be at least 1",
        );
        v.check(
            !self.http2_keepalive_timeout.get().is_zero(),
            "http2_keepalive_timeout",
            self.http2_keepalive_timeout,
            "must be greater than 0",
        );
    }
}

/// `[probes]`: liveness/readiness endpoints on the main port (the admin port always has them).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ProbesConfig {
    /// Answer probes on the main port too. Kubernetes probes the pod IP, and the admin port
    /// is bound to loopback by default, so the main port is where kubelet can reach them.
    pub main_port: bool,
    /// Liveness: the process and its event loop respond.
    pub livez_path: String,
    /// Readiness: started, not draining, and every registered dependency check passing.
    pub readyz_path: String,
    /// Alias of liveness, for tools that expect the older name.
    pub healthz_path: String,
}

impl Default for ProbesConfig {
    fn default() -> Self {
        ProbesConfig {
            main_port: true,
            livez_path: "/livez".into(),
            readyz_path: "/readyz".into(),
            healthz_path: "/healthz".into(),
        }
    }
}

impl Validate for ProbesConfig {
    fn validate(&self, v: &mut Validator) {
        for (key, path) in [
            ("livez_path", &self.livez_path),
            ("readyz_path", &self.readyz_path),
            ("healthz_path", &self.healthz_path),
        ] {
            v.check(
                path.starts_with('/') && !path.contains(['?', '#', ' ']),
                key,
                format!("{path:?}"),
                "must be an absolute path without query or fragment, e.g. \"/livez\"",
            );
        }
    }
}

/// `[readiness]`: how dependency checks are run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ReadinessConfig {
    /// How often each dependency check runs in the background. Probes read the cached result,
    /// so a kubelet probing every second costs the database one query per interval, not one
    /// per probe. 5 s notices an outage within one kubelet `periodSeconds` of the default 10 s.
    pub interval: Duration,
    /// A check that takes longer fails. 2 s is far above a healthy round trip to a
    /// dependency on the same network, and short enough that a hung dependency is reported
    /// within one interval instead of holding the check open.
    pub timeout: Duration,
    /// Consecutive failures before a check counts as failing. 1 reports the truth at once;
    /// kubelet's own `failureThreshold` already smooths blips on top of it.
    pub failure_threshold: u32,
}

impl Default for ReadinessConfig {
    fn default() -> Self {
        ReadinessConfig {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            failure_threshold: 1,
        }
    }
}

impl Validate for ReadinessConfig {
    fn validate(&self, v: &mut Validator) {
        v.check(
            self.interval.get() >= std::time::Duration::from_millis(10),
            "interval",
            self.interval,
            "must be at least 10ms",
        );
        v.check(
            !self.timeout.get().is_zero(),
            "timeout",
            self.timeout,
            "must be greater than 0",
        );
        v.check(
            self.failure_threshold >= 1,
            "failure_threshold",
            self.failure_threshold,
            "must be at least 1",
        );
    }
}

/// `[admin]`: the operator's port.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct AdminConfig {
    /// Serve the admin endpoints at all.
    pub enabled: bool,
    /// Loopback by default: `/debug/config` and friends are for operators (port-forward or a
    /// node-local agent), not for the network.
    pub addr: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            addr: SocketAddr::from(([127, 0, 0, 1], 9990)),
        }
    }
}

impl Validate for AdminConfig {}

/// `[shutdown]`: the graceful drain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ShutdownConfig {
    /// Time between withdrawing readiness and closing the listeners, so load balancers and
    /// kube-proxy see the endpoint removed before connections are refused. 5 s covers
    /// endpoint propagation in a typical cluster.
    pub drain_delay: Duration,
    /// Time in-flight requests get to finish after the listeners close; what still runs then
    /// is cancelled. 20 s + the 5 s delay fit Kubernetes' default 30 s
    /// `terminationGracePeriodSeconds` with room for the process to exit.
    pub grace_period: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_delay: Duration::from_secs(5),
            grace_period: Duration::from_secs(20),
        }
    }
}

impl Validate for ShutdownConfig {}

/// `[deadline]`: how long a request may run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DeadlineConfig {
    /// Deadline for a request whose caller sent none, and the most a caller may ask for on
    /// routes without their own entry. 30 s is longer than any interactive request should take
    /// and shorter than the 60 s at which common load balancers give up, so Keel answers 504
    /// itself — and cancels the work — instead of computing an answer nobody receives.
    pub default: Duration,
    /// Per path-prefix maximum (the longest matching prefix wins), e.g.
    /// `"/api/orders" = "2s"`. The effective deadline is the minimum of what the caller sent
    /// and this maximum. `"0s"` means no Keel deadline on that route — for server streams,
    /// long polls and websockets, which a default would cut — so only the caller's applies.
    pub routes: BTreeMap<String, Duration>,
}

impl Default for DeadlineConfig {
    fn default() -> Self {
        DeadlineConfig {
            default: Duration::from_secs(30),
            routes: BTreeMap::new(),
        }
    }
}

impl Validate for DeadlineConfig {
    fn validate(&self, v: &mut Validator) {
        // Zero is allowed everywhere: it means "no Keel deadline" (streams, long polls).
        for prefix in self.routes.keys() {
            v.check(
                prefix.starts_with('/'),
                &format!("routes.{prefix}"),
                format!("{prefix:?}"),
                "a route prefix must start with '/'",
            );
        }
    }
}

/// `[propagation]`: what travels to the next hop.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct PropagationConfig {
    /// Subtracted from the remaining time sent downstream, so the callee gives up (and frees
    /// its resources) slightly before the caller does and a late answer is not wasted. 5 ms
    /// covers a loopback or same-zone round trip plus scheduling jitter.
    pub margin: Duration,
    /// B3 written next to W3C `traceparent`: `single` (the `b3` header), `multi`
    /// (`X-B3-*`), or `off`. Single by default so Zipkin-era services keep the trace.
    pub b3: keel_core::propagation::B3Format,
    /// Share of the traces this service starts itself that are sampled (recorded and
    /// exported, and flagged so to the next hops). A caller's decision is always honoured
    /// (parent-based sampling). Not a config key of its own: the `keel` facade sets it from
    /// `tracing.sample_ratio` (and `OTEL_TRACES_SAMPLER`), where sampling is configured.
    #[serde(skip, default = "sample_everything")]
    pub sample_ratio: f64,
}

impl Default for PropagationConfig {
    fn default() -> Self {
        PropagationConfig {
            margin: Duration::from_millis(5),
            b3: keel_core::propagation::B3Format::Single,
            sample_ratio: 1.0,
        }
    }
}

fn sample_everything() -> f64 {
    1.0
}

impl Validate for PropagationConfig {
    fn validate(&self, v: &mut Validator) {
        v.check(
            (0.0..=1.0).contains(&self.sample_ratio),
            "sample_ratio",
            self.sample_ratio,
            "must be between 0 and 1",
        );
    }
}

impl PropagationConfig {
    /// The outbound options for one attempt.
    pub fn outbound(&self, retry: bool) -> keel_core::propagation::Outbound {
        keel_core::propagation::Outbound {
            margin: self.margin.get(),
            b3: self.b3,
            retry,
            span_id: None,
        }
    }
}

/// Everything that shapes how the main port serves HTTP.
#[derive(Debug, Clone, Default)]
pub struct HttpSettings {
    /// `[server]`.
    pub server: ServerConfig,
    /// `[probes]`.
    pub probes: ProbesConfig,
    /// `[deadline]`.
    pub deadline: DeadlineConfig,
    /// `[propagation]`.
    pub propagation: PropagationConfig,
    /// `[overload]`.
    pub overload: crate::overload::OverloadConfig,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let mut v = Validator::default();
        v.nested("server", &ServerConfig::default());
        v.nested("probes", &ProbesConfig::default());
        v.nested("readiness", &ReadinessConfig::default());
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn tiny_header_limit_is_rejected() {
        let cfg = ServerConfig {
            max_header_bytes: ByteSize::kib(4),
            ..ServerConfig::default()
        };
        let mut v = Validator::default();
        v.nested("server", &cfg);
        assert!(!v.is_empty());
    }

    #[test]
    fn keepalive_values_the_kernel_would_refuse_are_named_and_off_needs_nothing_else() {
        let cfg = ServerConfig {
            tcp_keepalive_idle: Duration::from_millis(500),
            tcp_keepalive_interval: Duration::from_secs(40_000),
            tcp_keepalive_probes: 0,
            ..ServerConfig::default()
        };
        let mut v = Validator::default();
        v.nested("server", &cfg);
        let keys: Vec<_> = v.problems().iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "server.tcp_keepalive_idle",
                "server.tcp_keepalive_interval",
                "server.tcp_keepalive_probes"
            ]
        );
        assert!(v.problems()[0].reason.contains("whole seconds"), "{v:?}");

        // Off: the other two keys are not looked at.
        let off = ServerConfig {
            tcp_keepalive_idle: Duration::from_secs(0),
            ..cfg
        };
        let mut v = Validator::default();
        v.nested("server", &off);
        assert!(v.is_empty(), "{v:?}");
    }
}
