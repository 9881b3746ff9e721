//! The gateway: the shop's one public door.
//!
//! - Routes `/api/users/*` → user (`/users/*`), `/api/orders/*` → order (`/orders/*`),
//!   `/api/inventory/*` → inventory (`/stock/*`), through Keel's client (`[clients.user]`,
//!   `[clients.order]`, `[clients.inventory]`: balancing, retries with a budget, breaking,
//!   outlier ejection, deadlines).
//! - API keys (`x-api-key` or `Authorization: Bearer`): no or unknown key → 401; a key
//!   without the scope `<service>:read` (GET, HEAD) or `<service>:write` (other methods) →
//!   403. Identity headers a client sends (`x-shop-*`) are stripped; the gateway sets
//!   `x-shop-key` and `x-shop-scopes` from the key it checked.
//! - A token bucket per key: past its rate → 429 with `Retry-After`.
//! - Traffic colour: a `keel-color: canary` header (or the baggage entry) sends the request
//!   to instances labelled `keel.color=canary`; `subsets = { canary = N }` on a client sends
//!   N % of uncoloured requests there.
//! - `X-Forwarded-For`/`-Proto`/`-Host` and `Forwarded` are set from what the gateway saw;
//!   a client's own are dropped unless it is a trusted proxy (`keel_gateway::forwarded`).
//! - Paths are normalised first (`keel_gateway::path`): dot-segments resolved, escaped
//!   separators, escaped dot-segments, control bytes and the like refused with 400 — the
//!   normalised path is the one authorised, routed and forwarded.
//! - Bodies stream both ways, never held whole (`Client::call_streaming`): a request body
//!   is capped by `server.max_body_bytes` (413), and a call whose body has started going out
//!   is not retried. A WebSocket handshake (HTTP/1.1 `Upgrade: websocket`) is forwarded and,
//!   once the upstream answers 101, tunnelled byte for byte (`keel_gateway::stream`).
//! - Request ids, trace context and the remaining deadline are Keel's, on every hop.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use hyper::upgrade::OnUpgrade;
use keel::BoxError;
use keel::client::client::Client;
use keel_gateway::forwarded::{Forwarding, is_forwarding_header};
use keel_gateway::path::{PathPolicy, normalize};
use keel_gateway::ratelimit::{LocalLimiter, Rate, RedisLimiter};
use keel_gateway::stream::{Capped, tunnel, websocket_upgrade};
use std::sync::atomic::Ordering;

use crate::http::error;

/// One API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// Its name (what the upstreams see in `x-shop-key`; never the secret).
    pub name: String,
    /// `service:read`, `service:write` or `service:*`.
    pub scopes: Vec<String>,
    /// The `x-shop-key` and `x-shop-scopes` values, made once when the key is read rather
    /// than on every request (`None`: the name is not a valid header value).
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

/// The gateway's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Secret → key.
    pub keys: HashMap<String, Key>,
    /// Requests per second per key, sustained.
    pub rate: f64,
    /// Requests a key may send at once above the rate.
    pub burst: f64,
    /// How request paths are normalised before anything else (`SHOP_MERGE_SLASHES=false`
    /// keeps empty segments).
    pub path: PathPolicy,
    /// Whose `X-Forwarded-*` / `Forwarded` headers are believed (`SHOP_TRUSTED_PROXIES`,
    /// addresses and ranges, comma-separated; default: nobody's).
    pub forwarding: Forwarding,
    /// Redis URL of a rate limit shared by every replica (`SHOP_RATE_REDIS`); `None`: each
    /// replica limits on its own.
    pub shared_rate: Option<String>,
}

impl Settings {
    /// Parse `name:secret=scope,scope;name:secret=scope…` (the `SHOP_API_KEYS` format).
    pub fn parse_keys(spec: &str) -> Result<HashMap<String, Key>, String> {
        let mut keys = HashMap::new();
        for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            let (ident, scopes) = entry
                .split_once('=')
                .ok_or_else(|| format!("API key entry {entry:?}: expected name:secret=scopes"))?;
            let (name, secret) = ident
                .split_once(':')
                .ok_or_else(|| format!("API key entry {entry:?}: expected name:secret before ="))?;
            if name.is_empty() || secret.len() < 8 {
                return Err(format!(
                    "API key {name:?}: the name must be set and the secret at least 8 characters"
                ));
            }
            let scopes: Vec<String> = scopes.split(',').map(|s| s.trim().to_string()).collect();
            if let Some(bad) = scopes
                .iter()
                .find(|s| !matches!(s.split_once(':'), Some((svc, "read" | "write" | "*")) if !svc.is_empty()))
            {
                return Err(format!(
                    "API key {name:?}: scope {bad:?} must be service:read, service:write or service:*"
                ));
            }
            keys.insert(secret.to_string(), Key::new(name.to_string(), scopes));
        }
        Ok(keys)
    }

    /// From the environment: `SHOP_API_KEYS` (default: the demo's keys), `SHOP_RATE`
    /// (requests per second per key, default 100) and `SHOP_BURST` (default 200).
    pub fn from_env() -> Result<Settings, String> {
        let keys = std::env::var("SHOP_API_KEYS").unwrap_or_else(|_| DEMO_KEYS.to_string());
        let number = |var: &str, default: f64| -> Result<f64, String> {
            match std::env::var(var) {
                Ok(v) => v
                    .parse::<f64>()
                    .ok()
                    .filter(|x| *x > 0.0)
                    .ok_or_else(|| format!("{var}={v:?}: must be a positive number")),
                Err(_) => Ok(default),
            }
        };
        let merge_slashes = match std::env::var("SHOP_MERGE_SLASHES").as_deref() {
            Err(_) | Ok("true") => true,
            Ok("false") => false,
            Ok(v) => return Err(format!("SHOP_MERGE_SLASHES={v:?}: must be true or false")),
        };
        let forwarding =
            Forwarding::parse(&std::env::var("SHOP_TRUSTED_PROXIES").unwrap_or_default())
                .map_err(|e| format!("SHOP_TRUSTED_PROXIES: {e}"))?;
        Ok(Settings {
            keys: Self::parse_keys(&keys)?,
            rate: number("SHOP_RATE", 100.0)?,
            burst: number("SHOP_BURST", 200.0)?,
            path: PathPolicy { merge_slashes },
            forwarding,
            shared_rate: std::env::var("SHOP_RATE_REDIS")
                .ok()
                .filter(|u| !u.is_empty()),
        })
    }
}

/// The demo's keys: `demo-secret-key` may do everything, `reader-secret-key` only read.
pub const DEMO_KEYS: &str = "demo:demo-secret-key=users:*,orders:*,inventory:*;reader:reader-secret-key=users:read,orders:read,inventory:read";

/// Headers a client may not set: the gateway vouches for identity, nobody else.
const IDENTITY: [&str; 3] = ["x-shop-key", "x-shop-scopes", "x-shop-user"];

static SHOP_KEY: HeaderName = HeaderName::from_static("x-shop-key");
static SHOP_SCOPES: HeaderName = HeaderName::from_static("x-shop-scopes");

/// Request headers not forwarded besides the hop-by-hop ones (removed by
/// `keel_server`'s catalogue, with those `Connection` names): the target's own `host`,
/// and the credentials — the client's to this gateway (`proxy-authorization` is one
/// hop's), and the key (upstreams get its name instead).
const NOT_FORWARDED: [&str; 4] = ["host", "authorization", "proxy-authorization", "x-api-key"];

/// How the per-key rate is kept.
enum Limiter {
    /// In this process.
    Local(LocalLimiter),
    /// Shared by every replica, in Redis.
    Shared(Arc<RedisLimiter>),
}

struct Inner {
    settings: Settings,
    users: Arc<Client>,
    orders: Arc<Client>,
    inventory: Arc<Client>,
    limiter: Limiter,
    /// `server.max_body_bytes`.
    max_body: u64,
}

/// Keys of the shared rate limit in Redis: this prefix, then the API key's name.
const REDIS_PREFIX: &str = "keel-shop:gateway:rate:";

/// How long a rate-limit call may wait on Redis before the local bucket decides.
const REDIS_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(100);

/// The gateway's routes. With [`Settings::shared_rate`] the rate limit lives in Redis: its
/// fallbacks are counted in `/metrics` (`shop_gateway_rate_limit_fallbacks_total`) and its
/// state is shown at `/debug/ratelimit` on the admin port.
pub fn router(app: &keel::App, settings: Settings) -> Result<Router, BoxError> {
    let rate = Rate {
        per_second: settings.rate,
        burst: settings.burst,
    };
    let limiter = match &settings.shared_rate {
        None => Limiter::Local(LocalLimiter::new(rate)),
        Some(url) => {
            let shared = Arc::new(RedisLimiter::start(url, REDIS_PREFIX, rate, REDIS_TIMEOUT)?);
            let seen = shared.clone();
            app.metrics().add_collector(move |e| {
                let name = "shop_gateway_rate_limit_fallbacks_total";
                e.family(
                    name,
                    "Rate-limit decisions taken by the local bucket because Redis could not be asked.",
                    "counter",
                );
                e.sample(name, &[], seen.fallbacks() as f64);
            });
            let seen = shared.clone();
            app.admin_route(
                "/debug/ratelimit",
                "the gateway's rate limit: who decides (redis or the local fallback), fallbacks",
                move |_| {
                    (
                        "application/json",
                        format!(
                            "{{\"state\":\"{}\",\"fallbacks\":{}}}\n",
                            seen.state(),
                            seen.fallbacks()
                        ),
                    )
                },
            );
            Limiter::Shared(shared)
        }
    };
    let inner = Arc::new(Inner {
        settings,
        users: app.client("user")?,
        orders: app.client("order")?,
        inventory: app.client("inventory")?,
        limiter,
        max_body: app.config().server.max_body_bytes.get(),
    });
    Ok(Router::new().fallback(forward).with_state(inner))
}

impl Inner {
    /// Take a token for `key`; `Err(seconds)` until the next one when there is none.
    async fn admit(&self, key: &str) -> Result<(), u64> {
        let verdict = match &self.limiter {
            Limiter::Local(l) => l.admit(key, Instant::now()),
            Limiter::Shared(l) => l.admit(key).await,
        };
        verdict.retry_after_secs().map_or(Ok(()), Err)
    }
}

fn allowed(key: &Key, service: &str, method: &Method) -> bool {
    let need = if matches!(*method, Method::GET | Method::HEAD) {
        "read"
    } else {
        "write"
    };
    key.scopes.iter().any(|s| {
        s.split_once(':')
            .is_some_and(|(svc, what)| svc == service && (what == need || what == "*"))
    })
}

/// Whether a request header (hop-by-hop ones already gone) goes on to the upstream as it
/// came: not credentials or the target's `host`, not an identity header only the gateway may
/// set, not a forwarding header (written afresh, see `keel_gateway::forwarded`).
fn forwarded(name: &HeaderName) -> bool {
    let n = name.as_str();
    !(NOT_FORWARDED.contains(&n) || IDENTITY.contains(&n) || is_forwarding_header(name))
}

fn presented_secret(h: &HeaderMap) -> Option<&str> {
    if let Some(k) = h.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(k.trim());
    }
    h.get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

fn too_large(limit: u64) -> Response {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body larger than {limit} bytes"),
    )
}

async fn forward(
    State(gw): State<Arc<Inner>>,
    ctx: keel::Context,
    req: axum::extract::Request,
) -> Response {
    // Taken apart, not extracted piece by piece: axum's `HeaderMap` extractor clones the map.
    let (parts, body) = req.into_parts();
    let http::request::Parts {
        method,
        uri,
        version,
        mut headers,
        mut extensions,
        ..
    } = parts;
    // Before anything else: the path that is authorised, routed and forwarded is this one.
    let path = match normalize(uri.path(), &gw.settings.path) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("malformed path: {e}")),
    };
    if let Some(authority) = uri.authority()
        && let Some(host) = headers.get(http::header::HOST)
        && !host
            .as_bytes()
            .eq_ignore_ascii_case(authority.as_str().as_bytes())
    {
        // An absolute-form target naming another host than `Host`: which one was meant
        // depends on who reads it (RFC 9112 §3.2.2 says the target; caches have said Host).
        return error(
            StatusCode::BAD_REQUEST,
            "the request target's authority and the Host header differ",
        );
    }
    let Some(rest) = path.strip_prefix("/api/") else {
        return error(StatusCode::NOT_FOUND, "the shop's API is under /api/");
    };
    let (service, tail) = rest.split_once('/').map_or((rest, ""), |(s, t)| (s, t));
    let (client, upstream_prefix) = match service {
        "users" => (&gw.users, "/users"),
        "orders" => (&gw.orders, "/orders"),
        "inventory" => (&gw.inventory, "/stock"),
        _ => return error(StatusCode::NOT_FOUND, format!("no service {service:?}")),
    };
    let Some(key) = presented_secret(&headers).and_then(|s| gw.settings.keys.get(s)) else {
        let mut resp = error(StatusCode::UNAUTHORIZED, "missing or unknown API key");
        resp.headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        return resp;
    };
    if !allowed(key, service, &method) {
        return error(
            StatusCode::FORBIDDEN,
            format!("key {} may not {method} {service}", key.name),
        );
    }
    if let Err(wait) = gw.admit(&key.name).await {
        let mut resp = error(
            StatusCode::TOO_MANY_REQUESTS,
            format!("key {} is over its rate", key.name),
        );
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(wait));
        return resp;
    }
    // A WebSocket handshake keeps the two headers that ask for it; every other hop-by-hop
    // header (and any other `Upgrade`) stays here.
    let upgrade = websocket_upgrade(version, &method, &headers)
        .and_then(|proto| Some((proto, extensions.remove::<OnUpgrade>()?)));
    // The body streams through. Its cap is the server's `server.max_body_bytes`: a larger
    // declared length was refused with 413 before this handler ran; an undeclared one is cut
    // off as it passes the cap, failing the upstream call, and answered 413 below.
    let body = Capped::new(body, gw.max_body);
    let exceeded = body.exceeded();
    let mut target = format!(
        "{upstream_prefix}{}{tail}",
        if tail.is_empty() { "" } else { "/" }
    );
    if let Some(q) = uri.query() {
        target.push('?');
        target.push_str(q);
    }
    let mut req = match http::Request::builder()
        .method(method)
        .uri(&target)
        .body(body)
    {
        Ok(r) => r,
        Err(_) => return error(StatusCode::BAD_REQUEST, "malformed request target"),
    };
    // The caller's headers move across (no copies), less those that stay here.
    keel::server::layer::headers::strip_connection_headers(&mut headers);
    let host = headers.get(http::header::HOST).cloned();
    let forwarding = &gw.settings.forwarding;
    let earlier = forwarding.capture(&headers, ctx.peer());
    let out = req.headers_mut();
    out.reserve(headers.len() + 6);
    let mut name: Option<HeaderName> = None;
    for (n, value) in headers.drain() {
        if n.is_some() {
            name = n;
        }
        if let Some(n) = &name
            && forwarded(n)
        {
            out.append(n.clone(), value);
        }
    }
    forwarding.write(out, earlier, ctx.peer(), host.as_ref(), "http");
    if let Some((name, scopes)) = &key.identity {
        req.headers_mut().insert(SHOP_KEY.clone(), name.clone());
        req.headers_mut()
            .insert(SHOP_SCOPES.clone(), scopes.clone());
    }
    let client_side = upgrade.map(|(proto, on_upgrade)| {
        let h = req.headers_mut();
        h.insert(
            http::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
        h.insert(http::header::UPGRADE, proto);
        on_upgrade
    });
    match client.call_streaming(&ctx, req).await {
        // The upstream's hop-by-hop headers are scrubbed from every response by Keel's
        // headers layer (`keel_server::layer::headers`), in one pass — except a 101's
        // `Connection` and `Upgrade`, which the client needs.
        Ok(mut resp) => {
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                let Some(client_side) = client_side else {
                    // Switching without being asked to is the upstream's error.
                    return error(
                        StatusCode::BAD_GATEWAY,
                        format!("{service} switched protocols unasked"),
                    );
                };
                let upstream_side = hyper::upgrade::on(&mut resp);
                let service = service.to_string();
                tokio::spawn(async move {
                    match tunnel(client_side, upstream_side).await {
                        Ok((up, down)) => {
                            tracing::debug!(upstream = service, up, down, "gateway: tunnel closed")
                        }
                        Err(e) => {
                            tracing::debug!(upstream = service, error = %e, "gateway: tunnel ended with an error")
                        }
                    }
                });
            }
            resp.map(Body::new)
        }
        Err(_) if exceeded.load(Ordering::Relaxed) => too_large(gw.max_body),
        Err(e) => {
            tracing::warn!(upstream = service, error = %e, "gateway: upstream call failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{service} unavailable"),
            )
        }
    }
}
