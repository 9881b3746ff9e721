//! A delivered message and its identity.
//!
//! **The message id rule.** Deduplication needs an id that is the same on every redelivery of
//! a message and different for every other message. In order of preference:
//!
//! 1. `keel-message-id` — set by Keel's producer (the outbox row's id), so it survives
//!    re-publishing by the relay after a crash;
//! 2. the broker's own stable id: RabbitMQ's `message_id` property, NATS's `Nats-Msg-Id`
//!    header (JetStream's dedup id), or Kafka's `topic/partition/offset` (an offset never
//!    changes for a record);
//! 3. none: the message cannot be deduplicated, so it is not processed — it goes to the
//!    dead-letter destination with that reason, rather than risking a double effect.

use std::collections::BTreeMap;

use bytes::Bytes;

/// The header Keel's producer writes with the message's id.
pub const MESSAGE_ID_HEADER: &str = "keel-message-id";

/// Where a message's id came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdSource {
    /// `keel-message-id`, from Keel's producer.
    Keel,
    /// The broker's own stable id.
    Broker,
}

/// A message as a consumer handler sees it.
#[derive(Debug, Clone)]
pub struct Message {
    /// The deduplication id (see the module doc).
    pub id: String,
    /// Where [`Message::id`] came from.
    pub id_source: IdSource,
    /// The broker (`messaging.system`: `nats`, `rabbitmq`, `kafka`, `embedded`).
    pub system: &'static str,
    /// Queue, topic or subject it came from.
    pub destination: String,
    /// Partitioning / ordering key, if the broker has one.
    pub key: Option<Bytes>,
    /// The body.
    pub payload: Bytes,
    /// Headers (trace context, baggage, deadline, Keel's id), names lower-case.
    pub headers: BTreeMap<String, String>,
    /// 1 for the first delivery, then redeliveries (as far as the broker or Keel counts).
    pub attempt: u32,
}

/// The id to deduplicate on: Keel's header, else `broker_id` (the broker's stable id, if it
/// has one). `None`: the message cannot be deduplicated.
pub fn message_id(
    headers: &BTreeMap<String, String>,
    broker_id: Option<&str>,
) -> Option<(String, IdSource)> {
    if let Some(id) = headers.get(MESSAGE_ID_HEADER).filter(|v| is_usable(v)) {
        return Some((id.clone(), IdSource::Keel));
    }
    broker_id
        .filter(|v| is_usable(v))
        .map(|id| (id.to_string(), IdSource::Broker))
}

/// Kafka's stable id for a record.
pub fn kafka_id(topic: &str, partition: i32, offset: i64) -> String {
    format!("{topic}/{partition}/{offset}")
}

/// Non-empty and short enough to index (the inbox's primary key).
fn is_usable(id: &str) -> bool {
    !id.trim().is_empty() && id.len() <= 256
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn keels_header_wins_then_the_brokers_id_then_nothing() {
        assert_eq!(
            message_id(&headers(&[(MESSAGE_ID_HEADER, "outbox-7")]), Some("amqp-1")),
            Some(("outbox-7".into(), IdSource::Keel))
        );
        assert_eq!(
            message_id(&headers(&[]), Some("amqp-1")),
            Some(("amqp-1".into(), IdSource::Broker))
        );
        assert_eq!(
            message_id(
                &headers(&[(MESSAGE_ID_HEADER, " ")]),
                Some(&kafka_id("orders", 3, 42))
            ),
            Some(("orders/3/42".into(), IdSource::Broker)),
            "a blank header does not count"
        );
        assert_eq!(message_id(&headers(&[]), None), None);
        assert_eq!(
            message_id(&headers(&[]), Some(&"x".repeat(300))),
            None,
            "too long to index"
        );
    }
}
