//! The events order publishes (through its outbox) and inventory consumes (through its inbox):
//! `OrderPlaced` (confirm the reservation) and `OrderCancelled` (give it back to stock).

use serde::{Deserialize, Serialize};

/// The prefix of the events' destinations (`<prefix>.orders.placed`, `….cancelled`) with the
/// embedded broker, and NATS's default (`SHOP_NATS_PREFIX`).
pub const DEFAULT_PREFIX: &str = "shop";

/// An order was cancelled: inventory gives its reservation back to stock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelled {
    /// The order.
    pub order_id: String,
    /// What it held.
    pub sku: String,
    /// How many.
    pub quantity: i64,
}

/// An order was stored and its stock reserved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPlaced {
    /// The order.
    pub order_id: String,
    /// Who bought.
    pub user_id: String,
    /// What.
    pub sku: String,
    /// How many.
    pub quantity: i64,
}

use std::sync::Arc;

use keel::BoxError;
use keel::messaging::config::{BrokerKind, MessagingConfig};
use keel::messaging::embedded::Embedded;
use keel::messaging::nats::Nats;
use keel::messaging::store::{Outgoing, Publisher};

/// The broker between order and inventory, from `[messaging]`: the embedded one (both
/// services in one process, `keel demo`) or NATS JetStream (separate processes).
#[derive(Debug, Clone)]
pub enum Bus {
    /// In-process; the outbox table is the queue.
    Embedded(Embedded),
    /// NATS JetStream: subjects `<prefix>.>` in the stream named by the upper-cased prefix
    /// (`SHOP_NATS_PREFIX`, default `shop`; two shops on one NATS server need two prefixes).
    Nats(Box<Nats>, String),
}

impl Bus {
    /// Connect per `cfg`. `embedded` is the process's in-process broker, shared by the
    /// services of one process (`keel demo`).
    pub async fn connect(cfg: &MessagingConfig, embedded: &Embedded) -> Result<Bus, BoxError> {
        match cfg.broker {
            BrokerKind::Embedded => Ok(Bus::Embedded(embedded.clone())),
            BrokerKind::Nats => {
                let prefix =
                    std::env::var("SHOP_NATS_PREFIX").unwrap_or_else(|_| DEFAULT_PREFIX.into());
                let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
                if prefix.is_empty() || !prefix.chars().all(valid) {
                    return Err(format!(
                        "SHOP_NATS_PREFIX={prefix:?}: letters, digits, - and _ only"
                    )
                    .into());
                }
                let nats = Nats::connect(cfg.effective_url()).await?;
                nats.ensure_stream(&prefix.to_ascii_uppercase(), vec![format!("{prefix}.>")])
                    .await?;
                Ok(Bus::Nats(Box::new(nats), prefix))
            }
            other => Err(format!(
                "the shop runs on messaging.broker = \"embedded\" or \"nats\", not {other:?}"
            )
            .into()),
        }
    }
}

impl Bus {
    fn prefix(&self) -> &str {
        match self {
            Bus::Embedded(_) => DEFAULT_PREFIX,
            Bus::Nats(_, prefix) => prefix,
        }
    }

    /// The destination of `OrderPlaced` events.
    pub fn order_placed(&self) -> String {
        format!("{}.orders.placed", self.prefix())
    }

    /// The destination of `OrderCancelled` events.
    pub fn order_cancelled(&self) -> String {
        format!("{}.orders.cancelled", self.prefix())
    }

    /// The NATS stream, when on NATS.
    pub fn stream(&self) -> Option<String> {
        match self {
            Bus::Embedded(_) => None,
            Bus::Nats(_, prefix) => Some(prefix.to_ascii_uppercase()),
        }
    }
}

impl Publisher for Bus {
    async fn publish(&self, msg: &Outgoing) -> Result<(), BoxError> {
        match self {
            Bus::Embedded(e) => e.publish(msg).await,
            Bus::Nats(n, _) => n.publish(msg).await,
        }
    }

    async fn publish_batch(&self, msgs: &[Outgoing]) -> (usize, Option<BoxError>) {
        match self {
            Bus::Embedded(e) => e.publish_batch(msgs).await,
            Bus::Nats(n, _) => n.publish_batch(msgs).await,
        }
    }
}

/// Counters a shop service keeps for the demo's summary and `/metrics`.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// The consumer's (inventory).
    pub consumer: Arc<keel::messaging::transport::ConsumerStats>,
    /// The outbox relay's (order).
    pub outbox: Arc<keel::messaging::transport::StoreStats>,
}
