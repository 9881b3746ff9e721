//! The gateway: the shop's one public door — Keel's configured proxy
//! (`keel_gateway::proxy`) with the shop's routes. Everything it does is config:
//!
//! - Routes ([`shop_routes`], used when `[gateway]` in its config lists none):
//!   `/api/users/*` → user (`/users/*`), `/api/orders/*` → order (`/orders/*`),
//!   `/api/inventory/*` → inventory (`/stock/*`), through Keel's client (`[clients.user]`,
//!   `[clients.order]`, `[clients.inventory]`: balancing, retries with a budget, breaking,
//!   outlier ejection, deadlines).
//! - API keys (`x-api-key` or `Authorization: Bearer`), and JWTs when `gateway.jwt.jwks` is
//!   set: none or unknown → 401; a credential without the scope `<service>:read` (GET, HEAD)
//!   or `<service>:write` (other methods) → 403. Identity headers a client sends
//!   (`x-shop-*`) are stripped; the gateway sets `x-shop-key`, `x-shop-scopes` and (for a
//!   JWT) `x-shop-user` from the credential it checked.
//! - A token bucket per credential, in-process or shared through Redis: past its rate → 429
//!   with `Retry-After`.
//! - Traffic colour: a `keel-color: canary` header (or the baggage entry) sends the request
//!   to instances labelled `keel.color=canary`; `subsets = { canary = N }` on a client sends
//!   N % of uncoloured requests there.
//! - Paths normalised first, `Forwarded`/`X-Forwarded-*` from what the gateway saw, bodies
//!   streamed both ways under `server.max_body_bytes`, WebSocket upgrades tunnelled.
//!
//! The `SHOP_*` variables (`SHOP_API_KEYS`, `SHOP_RATE`, `SHOP_BURST`, `SHOP_RATE_REDIS`,
//! `SHOP_MERGE_SLASHES`, `SHOP_TRUSTED_PROXIES`) override the config's keys, as the demo's
//! deployment files set them.

use std::sync::Arc;

use axum::Router;
use keel::BoxError;
use keel_gateway::proxy::{Gateway, IdentityHeaders, Limiter};
use keel_gateway::route::RouteConfig;

/// The gateway's settings: `[gateway]` of its config.
pub use keel_gateway::proxy::GatewayConfig as Settings;

/// The demo's keys: `demo-secret-key` may do everything, `reader-secret-key` only read.
pub const DEMO_KEYS: &str = "demo:demo-secret-key=users:*,orders:*,inventory:*;reader:reader-secret-key=users:read,orders:read,inventory:read";

/// The shop's routes: each service's API under `/api/<service>`, its scope family the same.
pub fn shop_routes() -> Vec<RouteConfig> {
    [
        ("users", "user", "/users"),
        ("orders", "order", "/orders"),
        ("inventory", "inventory", "/stock"),
    ]
    .into_iter()
    .map(|(api, cluster, upstream)| RouteConfig {
        name: api.to_string(),
        prefix: format!("/api/{api}"),
        rewrite: upstream.to_string(),
        cluster: cluster.to_string(),
        scope: api.to_string(),
        ..RouteConfig::default()
    })
    .collect()
}

/// The identity headers the shop's services read.
pub fn shop_identity() -> IdentityHeaders {
    IdentityHeaders {
        key: "x-shop-key".into(),
        scopes: "x-shop-scopes".into(),
        subject: "x-shop-user".into(),
    }
}

/// The shop's settings on top of `base` (the config's `[gateway]`): its routes when `base`
/// has none, its identity headers when `base` kept the defaults, and the given keys, rate
/// and burst.
pub fn settings(base: &Settings, keys: &str, rate: f64, burst: f64) -> Settings {
    let mut s = base.clone();
    if s.routes.is_empty() {
        s.routes = shop_routes();
    }
    if s.identity == IdentityHeaders::default() {
        s.identity = shop_identity();
    }
    s.api_keys = keys.to_string();
    s.rate = rate;
    s.burst = burst;
    s
}

/// [`settings`] from the `SHOP_*` environment (the demo's keys, 100/s and 200 by default).
pub fn from_env(base: &Settings) -> Result<Settings, String> {
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
    let mut s = settings(
        base,
        &keys,
        number("SHOP_RATE", 100.0)?,
        number("SHOP_BURST", 200.0)?,
    );
    match std::env::var("SHOP_MERGE_SLASHES").as_deref() {
        Err(_) => {}
        Ok("true") => s.merge_slashes = true,
        Ok("false") => s.merge_slashes = false,
        Ok(v) => return Err(format!("SHOP_MERGE_SLASHES={v:?}: must be true or false")),
    }
    if let Ok(v) = std::env::var("SHOP_TRUSTED_PROXIES") {
        s.trusted_proxies = v
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(String::from)
            .collect();
    }
    if let Ok(url) = std::env::var("SHOP_RATE_REDIS") {
        s.rate_redis = url;
    }
    Ok(s)
}

/// The gateway's router. With a shared rate limit (`rate_redis`) its fallbacks are counted
/// in `/metrics` (`shop_gateway_rate_limit_fallbacks_total`) and its state is shown at
/// `/debug/ratelimit` on the admin port.
pub async fn router(app: &keel::App, settings: Settings) -> Result<Router, BoxError> {
    let max_body = app.config().server.max_body_bytes.get();
    let gateway =
        Gateway::new(&settings, |name| app.client(name), max_body, app.shutdown()).await?;
    if let Limiter::Shared(shared) = gateway.limiter() {
        let seen = Arc::clone(shared);
        app.metrics().add_collector(move |e| {
            let name = "shop_gateway_rate_limit_fallbacks_total";
            e.family(
                name,
                "Rate-limit decisions taken by the local bucket because Redis could not be asked.",
                "counter",
            );
            e.sample(name, &[], seen.fallbacks() as f64);
        });
        let seen = Arc::clone(shared);
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
    }
    Ok(gateway.router())
}
