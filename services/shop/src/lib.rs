//! The shop: Keel's reference system, four services that use every capability for real.
//!
//! ```text
//! client ─HTTP─▶ gateway ─HTTP─▶ user      (SQLite: users)
//!                   │   └─HTTP─▶ order ─HTTP─▶ user          (validate the buyer)
//!                   │              ├──gRPC──▶ inventory      (Reserve, with the remaining deadline)
//!                   │              └─outbox─▶ OrderPlaced, OrderCancelled ─▶ inventory's inbox (exactly-once)
//!                   └─HTTP─▶ inventory /stock/{sku}
//! ```
//!
//! Each service is a module with a `router` (its routes, checks and background work wired
//! into a [`keel::App`]) and a thin binary in `src/bin/`. `keel demo` runs all four in one
//! process on free ports with the embedded broker; the binaries run them as separate
//! processes with NATS between order and inventory.

pub mod db;
pub mod events;
pub mod gateway;
pub mod http;
pub mod inventory;
pub mod local;
pub mod order;
pub mod user;

/// The generated gRPC code of the inventory service.
pub mod proto {
    #![allow(
        missing_docs,
        unreachable_pub,
        clippy::all,
        missing_debug_implementations
    )]
    tonic::include_proto!("shop.inventory.v1");
}

/// The service's SQLite URL: `SHOP_DB`, else `sqlite://shop-<service>.db` in the working
/// directory.
pub fn env_db(service: &str) -> String {
    std::env::var("SHOP_DB").unwrap_or_else(|_| format!("sqlite://shop-{service}.db"))
}

/// This copy's name for `x-shop-instance`: `SHOP_INSTANCE`, else the service's name.
pub fn instance(service: &str) -> String {
    std::env::var("SHOP_INSTANCE").unwrap_or_else(|_| service.to_string())
}

/// The broker of a service running in its own process. The embedded broker only joins
/// services of one process, so it is refused here with the fix in the message.
pub async fn standalone_bus(app: &keel::App) -> Result<events::Bus, keel::Error> {
    let cfg = &app.config().messaging;
    if cfg.broker == keel::messaging::config::BrokerKind::Embedded {
        return Err(keel::Error::Other(
            "messaging.broker = \"embedded\" joins services of one process only; a service in \
             its own process needs a broker: set messaging.broker = \"nats\" \
             (KEEL_MESSAGING__BROKER=nats), or run them together with `keel demo`"
                .into(),
        ));
    }
    events::Bus::connect(cfg, &keel::messaging::embedded::Embedded::new())
        .await
        .map_err(keel::Error::Other)
}
