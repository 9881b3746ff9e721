//! Keel messaging: exactly-once *effects* on at-least-once brokers.
//!
//! Brokers redeliver (rebalances, crashes, reconnects). Keel's consumer makes the correct
//! pattern the only easy one: for every delivery, in one store transaction, claim the message
//! in the inbox (`(consumer, message_id)`, insert-if-absent) and, only if the claim is new, run
//! the handler's effect; commit; then acknowledge. A redelivery finds its claim and is
//! acknowledged without running the handler. Handler failures retry with backoff and end in a
//! dead-letter destination with the error attached, never in silence.
//!
//! This crate so far holds the broker-independent core: message identity
//! ([`message`]), the retry/dead-letter policy ([`retry`]), the per-delivery protocol
//! ([`consume`]) over the [`consume::Inbox`] store trait, and the ordered commit tracker for
//! offset-based brokers ([`tracker`]). Stores (PostgreSQL, SQLite) and brokers (RabbitMQ, NATS
//! JetStream, Kafka, embedded) plug in behind features.

pub mod config;
pub mod consume;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub mod embedded;
#[cfg(all(feature = "kafka", any(feature = "sqlite", feature = "postgres")))]
pub mod kafka;
pub mod message;
#[cfg(all(feature = "nats", any(feature = "sqlite", feature = "postgres")))]
pub mod nats;
#[cfg(all(feature = "rabbitmq", any(feature = "sqlite", feature = "postgres")))]
pub mod rabbitmq;
pub mod retry;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub mod store;
pub mod tracker;
pub mod transport;
