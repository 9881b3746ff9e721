//! The gateway as a configured proxy: `[gateway]` in a Keel service's config becomes a
//! router that takes every request through the same steps, in this order:
//!
//! 1. **Path safety** ([`crate::path::normalize`]): the normalised path is the one routed,
//!    authorised and forwarded; a path that cannot be made safe is 400, and so is an
//!    absolute-form target whose authority differs from `Host`.
//! 2. **Route** ([`crate::route`]): the first match; none is 404.
//! 3. **Credential** (unless the route is `public`): an API key (`x-api-key`, or
//!    `Authorization: Bearer <secret>` naming one), else a JWT bearer token when `jwt.jwks`
//!    is set (feature `jwt`). None or unknown → 401 with `WWW-Authenticate`; a credential
//!    without the route's scope (`<scope>:read` on GET/HEAD/OPTIONS, `<scope>:write`
//!    otherwise, `<scope>:*` for both) → 403.
//! 4. **Rate** per credential (key name, or `jwt:<sub>`): past it → 429 with `Retry-After`.
//!    Public routes have no credential to count by and are left to the server's overload
//!    control.
//! 5. **Forward** through the route's cluster (Keel's client: balancing, retries with a
//!    budget, breaking, deadlines and trace propagation), the body streamed both ways, a
//!    WebSocket upgrade tunnelled. Hop-by-hop headers, credentials and the identity headers a
//!    client sent are dropped; `Forwarded`/`X-Forwarded-*` are written from what the gateway
//!    saw (see [`crate::forwarded`]); the identity headers are set from the credential.
//!    An upstream's answer, a shed 503 with its `Retry-After` included, is passed on as it
//!    came; a call the cluster's breaker sheds is 503 with `Retry-After: 1`; a deadline
//!    passed is 504; any other failure to get an answer is 503.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use hyper::upgrade::OnUpgrade;
use keel_client::client::{Client, ClientError, RetryPolicy};
use keel_core::Context;
use keel_core::fasthash::FastMap;
use serde::{Deserialize, Serialize};

use crate::forwarded::{Forwarding, is_forwarding_header};
use crate::path::{PathPolicy, normalize};
use crate::ratelimit::{LocalLimiter, Rate, Verdict};
use crate::route::{RouteConfig, RouteRetry, Routes};
use crate::stream::{Capped, h2_websocket_connect, tunnel, websocket_key, websocket_upgrade};

/// `[gateway]`: routes, credentials, the rate per credential and whom to believe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// `[[gateway.routes]]`, tried in order (see [`crate::route`]).
    pub routes: Vec<RouteConfig>,
    /// API keys: `name:secret=scope,scope;name:secret=…` (scopes `service:read`,
    /// `service:write`, `service:*`). Redacted when the config is shown.
    pub api_keys: String,
    /// Bearer tokens (JWT), checked when no API key matched.
    pub jwt: JwtSettings,
    /// The headers that tell upstreams who called. A client's own copies are dropped.
    pub identity: IdentityHeaders,
    /// Requests per second per credential, sustained; 0 turns the limit off.
    pub rate: f64,
    /// Requests a credential may send at once above the rate.
    pub burst: f64,
    /// Redis URL of a rate limit shared by every replica (feature `redis`; empty: each
    /// replica limits on its own). When Redis cannot be asked, the local bucket decides and
    /// the fallback is counted.
    pub rate_redis: String,
    /// Merge `//` into `/` before routing (true), or keep empty segments.
    pub merge_slashes: bool,
    /// Addresses and ranges whose `Forwarded`/`X-Forwarded-*` are believed (default: none).
    pub trusted_proxies: Vec<String>,
    /// A WebSocket tunnel in which no byte moved either way for this long is closed. 5 min,
    /// Envoy's stream idle timeout: longer than any sane ping interval, short enough that
    /// vanished peers do not pile up.
    pub tunnel_idle_timeout: keel_config::Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            routes: Vec::new(),
            api_keys: String::new(),
            jwt: JwtSettings::default(),
            identity: IdentityHeaders::default(),
            // Per credential: far above one client's honest use, low enough that one leaked
            // key cannot take the upstreams' whole capacity.
            rate: 100.0,
            burst: 200.0,
            rate_redis: String::new(),
            merge_slashes: true,
            trusted_proxies: Vec::new(),
            tunnel_idle_timeout: keel_config::Duration::from(std::time::Duration::from_secs(300)),
        }
    }
}

impl keel_config::Validate for GatewayConfig {
    fn validate(&self, v: &mut keel_config::Validator) {
        if let Err(e) = Routes::new(&self.routes) {
            v.invalid(
                &format!("routes[{}].{}", e.index, e.field),
                format!("{:?}", e.value),
                e.reason,
            );
        }
        if let Err(reason) = parse_keys(&self.api_keys) {
            v.invalid("api_keys", "<redacted>", reason);
        }
        v.check(
            self.rate.is_finite() && self.rate >= 0.0,
            "rate",
            self.rate,
            "must be a number of requests per second, 0 for no limit",
        );
        v.check(
            self.rate == 0.0 || (self.burst.is_finite() && self.burst >= 1.0),
            "burst",
            self.burst,
            "must be at least 1 while a rate is set",
        );
        if let Err(reason) = Forwarding::parse(&self.trusted_proxies.join(",")) {
            v.invalid("trusted_proxies", self.trusted_proxies.join(","), reason);
        }
        for (key, name) in [
            ("identity.key", &self.identity.key),
            ("identity.scopes", &self.identity.scopes),
            ("identity.subject", &self.identity.subject),
        ] {
            v.check(
                HeaderName::from_bytes(name.as_bytes()).is_ok(),
                key,
                name,
                "must be a header name",
            );
        }
        v.check(
            !std::time::Duration::from(self.tunnel_idle_timeout).is_zero(),
            "tunnel_idle_timeout",
            self.tunnel_idle_timeout,
            "must be longer than zero",
        );
        if !self.jwt.jwks.is_empty() && !cfg!(feature = "jwt") {
            v.invalid(
                "jwt.jwks",
                &self.jwt.jwks,
                "this build has no JWT support (keel-gateway's feature `jwt`)",
            );
        }
        if !self.rate_redis.is_empty() && !cfg!(feature = "redis") {
            v.invalid(
                "rate_redis",
                &self.rate_redis,
                "this build has no Redis support (keel-gateway's feature `redis`)",
            );
        }
    }
}

/// `[gateway.jwt]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtSettings {
    /// A JWKS file path or `https://` (or `http://`) URL; empty: no JWTs.
    pub jwks: String,
    /// PEM certificates trusted for an `https://` JWKS besides the system's roots (a private
    /// CA); empty: the system's roots alone.
    pub ca_file: String,
    /// Required `iss`; empty: not checked.
    pub issuer: String,
    /// Accepted `aud` values; empty: not checked.
    pub audiences: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds. 60 s, as most verifiers do.
    pub leeway_secs: u64,
}

impl Default for JwtSettings {
    fn default() -> Self {
        JwtSettings {
            jwks: String::new(),
            ca_file: String::new(),
            issuer: String::new(),
            audiences: Vec::new(),
            leeway_secs: 60,
        }
    }
}

/// `[gateway.identity]`: header names set on forwarded requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityHeaders {
    /// The API key's name.
    pub key: String,
    /// The credential's scopes, comma-separated.
    pub scopes: String,
    /// A JWT's `sub`.
    pub subject: String,
}

impl Default for IdentityHeaders {
    fn default() -> Self {
        IdentityHeaders {
            key: "x-gateway-key".into(),
            scopes: "x-gateway-scopes".into(),
            subject: "x-gateway-subject".into(),
        }
    }
}

/// A config that does not make a gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A route.
    #[error("gateway.routes: {0}")]
    Route(#[from] crate::route::RouteError),
    /// Another key: its name, value and what is wrong.
    #[error("gateway.{key} = {value:?}: {reason}")]
    Invalid {
        /// The key under `gateway.`.
        key: &'static str,
        /// Its value (secrets left out).
        value: String,
        /// Why.
        reason: String,
    },
    /// A route names a cluster the service has no client for.
    #[error("gateway.routes: route {route:?} sends to cluster {cluster:?}: {reason}")]
    Cluster {
        /// The route.
        route: String,
        /// The cluster.
        cluster: String,
        /// Why it could not be made.
        reason: String,
    },
}

/// One API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// Its name (what upstreams see; never the secret).
    pub name: String,
    /// `service:read`, `service:write` or `service:*`.
    pub scopes: Vec<String>,
    /// The identity header values, made once (`None`: the name is not a header value).
    identity: Option<(HeaderValue, HeaderValue)>,
}

impl Key {
    /// A key named `name` with `scopes`.
    pub fn new(name: String, scopes: Vec<String>) -> Key {
        let identity = HeaderValue::from_str(&name)
            .ok()
            .zip(HeaderValue::from_str(&scopes.join(",")).ok());
        Key {
            name,
            scopes,
            identity,
        }
    }
}

/// Parse `name:secret=scope,scope;name:secret=scope…` into secret → key.
pub fn parse_keys(spec: &str) -> Result<HashMap<String, Key>, String> {
    let mut keys = HashMap::new();
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (ident, scopes) = entry
            .split_once('=')
            .ok_or_else(|| "an entry is name:secret=scopes (no = found)".to_string())?;
        let (name, secret) = ident
            .split_once(':')
            .ok_or_else(|| "an entry is name:secret=scopes (no : before =)".to_string())?;
        if name.is_empty() || secret.len() < 8 {
            return Err(format!(
                "API key {name:?}: the name must be set and the secret at least 8 characters"
            ));
        }
        let scopes: Vec<String> = scopes.split(',').map(|s| s.trim().to_string()).collect();
        if let Some(bad) = scopes.iter().find(|s| {
            !matches!(s.split_once(':'), Some((svc, "read" | "write" | "*")) if !svc.is_empty())
        }) {
            return Err(format!(
                "API key {name:?}: scope {bad:?} must be service:read, service:write or service:*"
            ));
        }
        keys.insert(secret.to_string(), Key::new(name.to_string(), scopes));
    }
    Ok(keys)
}

/// Whether `scopes` grant `family:what`.
fn grants(scopes: &[String], (family, what): (&str, &str)) -> bool {
    scopes.iter().any(|s| {
        s.split_once(':')
            .is_some_and(|(f, w)| f == family && (w == what || w == "*"))
    })
}

/// How the per-credential rate is kept.
#[derive(Debug)]
pub enum Limiter {
    /// No limit.
    Off,
    /// In this process.
    Local(LocalLimiter),
    /// Shared by every replica through Redis.
    #[cfg(feature = "redis")]
    Shared(Arc<crate::ratelimit::RedisLimiter>),
}

impl Limiter {
    async fn admit(&self, who: &str) -> Verdict {
        match self {
            Limiter::Off => Verdict::Allowed,
            Limiter::Local(l) => l.admit(who, Instant::now()),
            #[cfg(feature = "redis")]
            Limiter::Shared(l) => l.admit(who).await,
        }
    }
}

/// The headers set on forwarded requests, prebuilt.
struct Identity {
    key: HeaderName,
    scopes: HeaderName,
    subject: HeaderName,
}

/// A credential that passed.
enum Caller<'a> {
    Anonymous,
    Key(&'a Key),
    #[cfg(feature = "jwt")]
    Token(crate::jwt::Claims),
}

impl Caller<'_> {
    /// What the credential grants; nothing without one.
    fn scopes(&self) -> &[String] {
        match self {
            Caller::Anonymous => &[],
            Caller::Key(k) => &k.scopes,
            #[cfg(feature = "jwt")]
            Caller::Token(c) => &c.scopes,
        }
    }
}

/// The configured proxy. Build it once, then [`Gateway::router`].
pub struct Gateway {
    routes: Routes,
    /// By cluster name (from configuration): looked up on every request.
    clusters: FastMap<String, Arc<Client>>,
    keys: HashMap<String, Key>,
    #[cfg(feature = "jwt")]
    jwt: Option<crate::jwt::Verifier>,
    identity: Identity,
    limiter: Limiter,
    path: PathPolicy,
    forwarding: Forwarding,
    max_body: u64,
    tunnel_idle: std::time::Duration,
    /// The process's lifecycle: a tunnel holds its drain open, and ends when it stops.
    lifecycle: keel_core::Shutdown,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("routes", &self.routes)
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// The gateway `cfg` describes. `client` makes the client of a cluster (a service's
    /// `[clients.<name>]`); `max_body` is the request-body cap (the server's
    /// `server.max_body_bytes`); `lifecycle` is the process's (`App::shutdown`): the drain
    /// waits for open WebSocket tunnels up to its grace period, and cuts those still open
    /// when it ends. Every problem with the config names its key.
    pub async fn new<E: std::fmt::Display>(
        cfg: &GatewayConfig,
        mut client: impl FnMut(&str) -> Result<Arc<Client>, E>,
        max_body: u64,
        lifecycle: &keel_core::Shutdown,
    ) -> Result<Gateway, GatewayError> {
        let invalid = |key: &'static str, value: &str, reason: String| GatewayError::Invalid {
            key,
            value: value.to_string(),
            reason,
        };
        let routes = Routes::new(&cfg.routes)?;
        let mut clusters = FastMap::default();
        for route in routes.iter() {
            if clusters.contains_key(route.cluster()) {
                continue;
            }
            let made = client(route.cluster()).map_err(|e| GatewayError::Cluster {
                route: route.name().to_string(),
                cluster: route.cluster().to_string(),
                reason: e.to_string(),
            })?;
            clusters.insert(route.cluster().to_string(), made);
        }
        // The secrets stay out of the error.
        let keys = parse_keys(&cfg.api_keys).map_err(|e| invalid("api_keys", "<redacted>", e))?;
        let header = |key: &'static str, name: &str| {
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(key, name, "not a header name".into()))
        };
        let identity = Identity {
            key: header("identity.key", &cfg.identity.key)?,
            scopes: header("identity.scopes", &cfg.identity.scopes)?,
            subject: header("identity.subject", &cfg.identity.subject)?,
        };
        let limiter = if cfg.rate <= 0.0 {
            Limiter::Off
        } else if !cfg.burst.is_finite() || cfg.burst < 1.0 {
            return Err(invalid(
                "burst",
                &cfg.burst.to_string(),
                "must be at least 1 while a rate is set".into(),
            ));
        } else {
            let rate = Rate {
                per_second: cfg.rate,
                burst: cfg.burst,
            };
            if cfg.rate_redis.is_empty() {
                Limiter::Local(LocalLimiter::new(rate))
            } else {
                shared_limiter(&cfg.rate_redis, rate)
                    .map_err(|e| invalid("rate_redis", &cfg.rate_redis, e))?
            }
        };
        let forwarding = Forwarding::parse(&cfg.trusted_proxies.join(","))
            .map_err(|e| invalid("trusted_proxies", &cfg.trusted_proxies.join(","), e))?;
        #[cfg(feature = "jwt")]
        let jwt = if cfg.jwt.jwks.is_empty() {
            None
        } else {
            let mut jc = crate::jwt::JwtConfig::new(crate::jwt::JwksLocation::parse(&cfg.jwt.jwks));
            jc.issuer = (!cfg.jwt.issuer.is_empty()).then(|| cfg.jwt.issuer.clone());
            jc.audiences = cfg.jwt.audiences.clone();
            jc.leeway = std::time::Duration::from_secs(cfg.jwt.leeway_secs);
            jc.ca_file = (!cfg.jwt.ca_file.is_empty()).then(|| cfg.jwt.ca_file.clone().into());
            Some(
                crate::jwt::Verifier::new(jc)
                    .await
                    .map_err(|e| match e.key() {
                        "ca_file" => {
                            invalid("jwt.ca_file", &cfg.jwt.ca_file, e.reason().to_owned())
                        }
                        _ => invalid("jwt.jwks", &cfg.jwt.jwks, e.to_string()),
                    })?,
            )
        };
        #[cfg(not(feature = "jwt"))]
        if !cfg.jwt.jwks.is_empty() {
            return Err(invalid(
                "jwt.jwks",
                &cfg.jwt.jwks,
                "this build has no JWT support (keel-gateway's feature `jwt`)".into(),
            ));
        }
        Ok(Gateway {
            routes,
            clusters,
            keys,
            #[cfg(feature = "jwt")]
            jwt,
            identity,
            limiter,
            path: PathPolicy {
                merge_slashes: cfg.merge_slashes,
            },
            forwarding,
            max_body,
            tunnel_idle: cfg.tunnel_idle_timeout.into(),
            lifecycle: lifecycle.clone(),
        })
    }

    /// The rate limiter (for its fallback count and state when it is shared).
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// The routes.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// An axum router answering every request through this gateway.
    pub fn router(self) -> axum::Router {
        let gw = Arc::new(self);
        axum::Router::new().fallback(move |req: axum::extract::Request| {
            let gw = gw.clone();
            async move {
                // Keel's server puts the request's context in its extensions.
                let Some(ctx) = req.extensions().get::<Context>().cloned() else {
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the gateway runs behind Keel's server, which gives each request a context",
                    );
                };
                gw.handle(ctx, req).await
            }
        })
    }

    async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller<'_>, Response> {
        // A static name: looked up by `&str`, the name would be parsed on every request.
        static API_KEY: http::HeaderName = http::HeaderName::from_static("x-api-key");
        let api_key = headers
            .get(&API_KEY)
            .and_then(|v| v.to_str().ok())
            .map(str::trim);
        if let Some(key) = api_key.and_then(|s| self.keys.get(s)) {
            return Ok(Caller::Key(key));
        }
        // Only when no known `x-api-key` came: one header lookup fewer for the usual caller.
        let bearer = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if api_key.is_none()
            && let Some(key) = bearer.and_then(|s| self.keys.get(s))
        {
            return Ok(Caller::Key(key));
        }
        #[cfg(feature = "jwt")]
        if let (Some(verifier), Some(token)) = (&self.jwt, bearer) {
            return match verifier.verify(token).await {
                Ok(claims) => Ok(Caller::Token(claims)),
                Err(rejection) => {
                    let mut resp = error(rejection.status(), rejection.to_string());
                    resp.headers_mut()
                        .insert(http::header::WWW_AUTHENTICATE, rejection.www_authenticate());
                    Err(resp)
                }
            };
        }
        let mut resp = error(
            StatusCode::UNAUTHORIZED,
            "missing or unknown credential (an API key or a bearer token)",
        );
        resp.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
        Err(resp)
    }

    /// One request, through every step of the module docs.
    pub async fn handle(&self, ctx: Context, req: axum::extract::Request) -> Response {
        // Taken apart, not extracted piece by piece: axum's `HeaderMap` extractor clones.
        let (parts, body) = req.into_parts();
        let http::request::Parts {
            mut method,
            uri,
            version,
            mut headers,
            mut extensions,
            ..
        } = parts;
        // A WebSocket over HTTP/2 (RFC 8441's extended CONNECT) is the same conversation as an
        // HTTP/1.1 `GET` + `Upgrade`: routed, authorised and forwarded as that.
        let h2_websocket = h2_websocket_connect(version, &method, &extensions);
        if h2_websocket {
            method = http::Method::GET;
        }
        let path = match normalize(uri.path(), &self.path) {
            Ok(p) => p,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("malformed path: {e}")),
        };
        let host_header = headers.get(http::header::HOST);
        if let Some(authority) = uri.authority()
            && let Some(host) = host_header
            && !host
                .as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes())
        {
            // An absolute-form target naming another host than `Host`: which one was meant
            // depends on who reads it (RFC 9112 §3.2.2 says the target; caches said Host).
            return error(
                StatusCode::BAD_REQUEST,
                "the request target's authority and the Host header differ",
            );
        }
        let host = host_header
            .and_then(|h| h.to_str().ok())
            .or_else(|| uri.authority().map(|a| a.as_str()));
        let Some(matched) = self.routes.find(host, &method, &path, &headers) else {
            return error(StatusCode::NOT_FOUND, "no route");
        };
        let route = matched.route;
        // A route's own limit narrows the request's deadline for everything from here on.
        let ctx = match route.timeout() {
            Some(limit) => ctx.within(limit),
            None => ctx,
        };
        let caller = if route.is_public() {
            Caller::Anonymous
        } else {
            match self.authenticate(&headers).await {
                Ok(c) => c,
                Err(resp) => return resp,
            }
        };
        if let Some(need) = route.needs(&method)
            && !grants(caller.scopes(), need)
        {
            return error(
                StatusCode::FORBIDDEN,
                format!("the credential lacks {}:{}", need.0, need.1),
            );
        }
        // The rate is kept per credential. Public routes have none to keep it by: they are
        // left to the server's overload control (one shared bucket would throttle every
        // caller of a public route together, a sidecar's whole inbound traffic among them).
        let (who, identity): (std::borrow::Cow<'_, str>, [Option<HeaderValue>; 3]) = match &caller {
            Caller::Anonymous => ("".into(), [None, None, None]),
            Caller::Key(k) => {
                let (name, scopes) = k.identity.clone().unzip();
                (k.name.as_str().into(), [name, scopes, None])
            }
            #[cfg(feature = "jwt")]
            Caller::Token(c) => {
                let sub = c.subject.as_deref().unwrap_or("");
                (
                    format!("jwt:{sub}").into(),
                    [
                        None,
                        HeaderValue::from_str(&c.scopes.join(",")).ok(),
                        HeaderValue::from_str(sub).ok(),
                    ],
                )
            }
        };
        if !matches!(caller, Caller::Anonymous)
            && let Some(wait) = self.limiter.admit(&who).await.retry_after_secs()
        {
            let mut resp = error(
                StatusCode::TOO_MANY_REQUESTS,
                format!("{who} is over its rate"),
            );
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(wait));
            return resp;
        }
        let Some(client) = self.clusters.get(route.cluster()) else {
            // Every route's cluster was made in `new`.
            return error(StatusCode::BAD_GATEWAY, "no client for the route's cluster");
        };
        // The rewritten path, when the route made one, becomes the target without a copy.
        let mut target = matched.path.into_owned();
        if let Some(q) = uri.query() {
            target.reserve(q.len() + 1);
            target.push(if target.contains('?') { '&' } else { '?' });
            target.push_str(q);
        }
        // A WebSocket handshake keeps the two headers that ask for it; every other hop-by-hop
        // header (and any other `Upgrade`) stays here.
        let upgrade = if h2_websocket {
            Some(HeaderValue::from_static("websocket"))
        } else {
            websocket_upgrade(version, &method, &headers)
        }
        .and_then(|proto| Some((proto, extensions.remove::<OnUpgrade>()?)));
        let mut req = match http::Request::builder().method(method).uri(target).body(()) {
            Ok(r) => r,
            Err(_) => return error(StatusCode::BAD_REQUEST, "malformed request target"),
        };
        keel_server::layer::headers::strip_connection_headers(&mut headers);
        let host = headers.get(http::header::HOST).cloned();
        let earlier = self.forwarding.capture(&headers, ctx.peer());
        let out = req.headers_mut();
        out.reserve(headers.len() + 6);
        // The caller's headers move across (no copies), less those that stay here.
        let mut name: Option<HeaderName> = None;
        for (n, value) in headers.drain() {
            if n.is_some() {
                name = n;
            }
            if let Some(n) = &name
                && self.forwarded(n)
            {
                out.append(n.clone(), value);
            }
        }
        self.forwarding
            .write(out, earlier, ctx.peer(), host.as_ref(), "http");
        let [key, scopes, subject] = identity;
        for (name, value) in [
            (&self.identity.key, key),
            (&self.identity.scopes, scopes),
            (&self.identity.subject, subject),
        ] {
            if let Some(v) = value {
                out.insert(name.clone(), v);
            }
        }
        let client_side = upgrade.map(|(proto, on_upgrade)| {
            out.insert(
                http::header::CONNECTION,
                HeaderValue::from_static("upgrade"),
            );
            out.insert(http::header::UPGRADE, proto);
            // RFC 8441 has no key (the stream is the handshake's proof); an HTTP/1.1 upstream
            // requires one.
            if h2_websocket {
                out.insert(http::header::SEC_WEBSOCKET_KEY, websocket_key());
            }
            on_upgrade
        });
        // The body streams through under the cap (a larger declared length was refused with
        // 413 by the server before this ran; an undeclared one is cut off, answered below).
        // A request without one (a GET) is sent as it is, without the cap's flag.
        let retry = match route.retry() {
            RouteRetry::Client => RetryPolicy::Client,
            RouteRetry::Idempotent => RetryPolicy::Idempotent,
            RouteRetry::Never => RetryPolicy::Never,
        };
        let exceeded;
        let answer = if http_body::Body::is_end_stream(&body) {
            exceeded = None;
            client
                .call_streaming_with(
                    &ctx,
                    req.map(|()| http_body_util::Empty::<bytes::Bytes>::new()),
                    retry,
                )
                .await
        } else {
            let body = Capped::new(body, self.max_body);
            exceeded = Some(body.exceeded());
            client
                .call_streaming_with(&ctx, req.map(|()| body), retry)
                .await
        };
        match answer {
            // The upstream's hop-by-hop headers are scrubbed from every response by Keel's
            // headers layer, in one pass — except a 101's `Connection` and `Upgrade`.
            Ok(mut resp) => {
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    let Some(client_side) = client_side else {
                        return error(
                            StatusCode::BAD_GATEWAY,
                            "the upstream switched protocols unasked",
                        );
                    };
                    let upstream_side = hyper::upgrade::on(&mut resp);
                    if h2_websocket {
                        // Over HTTP/2 the tunnel opens with a 200 (RFC 8441 §5), without the
                        // HTTP/1.1 handshake's headers.
                        *resp.status_mut() = StatusCode::OK;
                        let h = resp.headers_mut();
                        for name in [
                            http::header::CONNECTION,
                            http::header::UPGRADE,
                            http::header::SEC_WEBSOCKET_ACCEPT,
                        ] {
                            h.remove(name);
                        }
                    }
                    let cluster = route.cluster().to_string();
                    let idle = self.tunnel_idle;
                    // The tunnel outlives this request, and its connection has left the
                    // server: it holds the drain open itself, and is cut when the grace
                    // period ends (a WebSocket cannot be closed cleanly by a proxy that does
                    // not speak it; the peers see the connection end, as on any restart).
                    let lifecycle = self.lifecycle.clone();
                    let held = lifecycle.hold();
                    tokio::spawn(async move {
                        let _held = held;
                        tokio::select! {
                            done = tunnel(client_side, upstream_side, idle) => match done {
                                Ok((up, down)) => {
                                    tracing::debug!(%cluster, up, down, "gateway: tunnel closed")
                                }
                                Err(e) => {
                                    tracing::debug!(%cluster, error = %e, "gateway: tunnel ended with an error")
                                }
                            },
                            () = lifecycle.reached(keel_core::Phase::Stopped) => {
                                tracing::info!(%cluster, "gateway: tunnel cut at the end of the drain");
                            }
                        }
                    });
                }
                resp.map(Body::new)
            }
            Err(_) if exceeded.is_some_and(|e| e.load(Ordering::Relaxed)) => error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than {} bytes", self.max_body),
            ),
            Err(e)
                if ctx.remaining().is_zero() || matches!(e, ClientError::DeadlineExceeded(_)) =>
            {
                tracing::debug!(route = route.name(), cluster = route.cluster(), error = %e, "gateway: deadline passed upstream");
                error(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("{} did not answer in time", route.cluster()),
                )
            }
            Err(ClientError::BreakerOpen(e)) => {
                // The cluster's breaker shed the call to spare an upstream that has been
                // refusing: an overload, passed on as one — 503 with `Retry-After`, which a
                // caller backs off for (Keel's client penalises the gateway without ejecting
                // it), not a failure that feeds ejection. At debug level: under overload this
                // is most requests, and a warning each would be a log storm.
                tracing::debug!(route = route.name(), cluster = route.cluster(), error = %e, "gateway: shed by the cluster's breaker");
                let mut resp = error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{} overloaded; retry later", route.cluster()),
                );
                resp.headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
                resp
            }
            Err(e) => {
                tracing::warn!(route = route.name(), cluster = route.cluster(), error = %e, "gateway: upstream call failed");
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{} unavailable", route.cluster()),
                )
            }
        }
    }

    /// Whether a request header (hop-by-hop ones already gone) goes on as it came: not the
    /// target's `host`, not a credential, not an identity header only the gateway may set,
    /// not a forwarding header (written afresh).
    fn forwarded(&self, name: &HeaderName) -> bool {
        !(matches!(
            name.as_str(),
            "host" | "authorization" | "proxy-authorization" | "x-api-key"
        ) || *name == self.identity.key
            || *name == self.identity.scopes
            || *name == self.identity.subject
            || is_forwarding_header(name))
    }
}

/// A JSON error body, as every refusal of the gateway has.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "error": message.into() }).to_string();
    (
        status,
        [(http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

#[cfg(feature = "redis")]
fn shared_limiter(url: &str, rate: Rate) -> Result<Limiter, String> {
    crate::ratelimit::RedisLimiter::start(url, REDIS_PREFIX, rate, REDIS_TIMEOUT)
        .map(|l| Limiter::Shared(Arc::new(l)))
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "redis"))]
fn shared_limiter(_url: &str, _rate: Rate) -> Result<Limiter, String> {
    Err("this build has no Redis support (keel-gateway's feature `redis`)".into())
}

/// Keys of the shared rate limit in Redis: this prefix, then the credential.
#[cfg(feature = "redis")]
pub const REDIS_PREFIX: &str = "keel-gateway:rate:";

/// How long a rate-limit call may wait on Redis before the local bucket decides.
#[cfg(feature = "redis")]
pub const REDIS_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(100);
