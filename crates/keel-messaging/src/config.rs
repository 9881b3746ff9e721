//! `[messaging]`: which broker, and how the relay, consumers and retention job behave.
//!
//! This module has no broker or store dependency, so the facade can carry the section (and
//! validate it) whichever transports a service compiles in.

use keel_config::{Duration, Validate, Validator};
use serde::{Deserialize, Serialize};

use crate::retry::RetryPolicy;

/// The broker a service's messages travel through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    /// No broker: the relay hands outbox rows to in-process consumers (still through the
    /// inbox). The default, so a service runs on one machine with nothing installed.
    Embedded,
    /// NATS JetStream.
    Nats,
    /// RabbitMQ.
    Rabbitmq,
    /// Kafka (or a Kafka-API broker).
    Kafka,
}

impl BrokerKind {
    /// The address used when `messaging.url` is empty: the broker's local default.
    pub fn default_url(self) -> &'static str {
        match self {
            BrokerKind::Embedded => "",
            BrokerKind::Nats => "nats://127.0.0.1:4222",
            BrokerKind::Rabbitmq => "amqp://guest:guest@127.0.0.1:5672/%2f",
            BrokerKind::Kafka => "127.0.0.1:9092",
        }
    }
}

/// `[messaging]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MessagingConfig {
    /// `embedded`, `nats`, `rabbitmq` or `kafka`. `embedded`: nothing to install.
    pub broker: BrokerKind,
    /// The broker's address (`nats://…`, `amqp://…`, or Kafka's `host:port[,host:port]`).
    /// Empty: the broker's local default.
    pub url: String,
    /// `[messaging.relay]`: the outbox relay.
    pub relay: RelayConfig,
    /// `[messaging.consumer]`: consumers' concurrency and retries.
    pub consumer: ConsumerSettings,
    /// `[messaging.retention]`: pruning old inbox claims and sent outbox rows.
    pub retention: RetentionConfig,
}

impl Default for MessagingConfig {
    fn default() -> Self {
        MessagingConfig {
            broker: BrokerKind::Embedded,
            url: String::new(),
            relay: RelayConfig::default(),
            consumer: ConsumerSettings::default(),
            retention: RetentionConfig::default(),
        }
    }
}

impl MessagingConfig {
    /// `url`, or the broker's default when empty.
    pub fn effective_url(&self) -> &str {
        if self.url.is_empty() {
            self.broker.default_url()
        } else {
            &self.url
        }
    }
}

/// `[messaging.relay]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Rows per pass. 500: one round of pipelined confirms amortises the broker round trip
    /// without holding a long read of the outbox.
    pub batch: u32,
    /// How often an empty outbox is looked at again. 50 ms: the added publish latency when
    /// idle; a busy relay goes back-to-back regardless.
    pub interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch: 500,
            interval: Duration::from_millis(50),
        }
    }
}

/// `[messaging.consumer]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerSettings {
    /// Messages processed at once per consumer. 64: enough to hide a store round trip,
    /// few enough that a crash redelivers little.
    pub max_in_flight: u32,
    /// Most deliveries settled in one store transaction (one claim statement, one commit).
    /// 16: the commit's fsync is shared by up to 16 messages; deliveries already waiting are
    /// taken together, so an idle consumer adds no delay.
    pub batch: u32,
    /// Deliveries before dead-lettering, the first included. 5.
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubles each time. 200 ms.
    pub retry_base: Duration,
    /// Longest backoff. 30 s.
    pub retry_max: Duration,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        let r = RetryPolicy::default();
        ConsumerSettings {
            max_in_flight: 64,
            batch: 16,
            max_attempts: r.max_attempts,
            retry_base: Duration::from(r.base),
            retry_max: Duration::from(r.max),
        }
    }
}

impl ConsumerSettings {
    /// The retry policy these settings describe.
    pub fn retry(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            base: self.retry_base.get(),
            max: self.retry_max.get(),
        }
    }
}

/// `[messaging.retention]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Inbox claims and sent outbox rows older than this are deleted. 168 h (a week): a
    /// claim must outlive every redelivery of its message (a redelivery after its claim was
    /// pruned would be applied again), and brokers' retention is typically days.
    pub age: Duration,
    /// How often the retention job runs. 10 min.
    pub interval: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            age: Duration::from_secs(168 * 3600),
            interval: Duration::from_secs(600),
        }
    }
}

impl Validate for MessagingConfig {
    fn validate(&self, v: &mut Validator) {
        let url = self.effective_url();
        match self.broker {
            BrokerKind::Embedded => v.check(
                self.url.is_empty(),
                "url",
                &self.url,
                "must be empty with broker = \"embedded\" (there is no broker to reach)",
            ),
            BrokerKind::Nats => v.check(
                url.starts_with("nats://") || url.starts_with("tls://"),
                "url",
                url,
                "must start with nats:// or tls:// for broker = \"nats\"",
            ),
            BrokerKind::Rabbitmq => v.check(
                url.starts_with("amqp://") || url.starts_with("amqps://"),
                "url",
                url,
                "must start with amqp:// or amqps:// for broker = \"rabbitmq\"",
            ),
            BrokerKind::Kafka => v.check(
                !url.contains("://")
                    && url.split(',').all(|hp| {
                        hp.rsplit_once(':')
                            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
                    }),
                "url",
                url,
                "must be host:port[,host:port…] (Kafka bootstrap servers, no scheme)",
            ),
        }
        v.check(
            (1..=10_000).contains(&self.relay.batch),
            "relay.batch",
            self.relay.batch,
            "must be between 1 and 10000",
        );
        v.check(
            self.relay.interval.get() >= std::time::Duration::from_millis(1),
            "relay.interval",
            self.relay.interval,
            "must be at least 1ms (0 would spin on an empty outbox)",
        );
        v.check(
            self.consumer.max_in_flight >= 1,
            "consumer.max_in_flight",
            self.consumer.max_in_flight,
            "must be at least 1",
        );
        v.check(
            (1..=self.consumer.max_in_flight.max(1)).contains(&self.consumer.batch),
            "consumer.batch",
            self.consumer.batch,
            format!(
                "must be between 1 and consumer.max_in_flight ({})",
                self.consumer.max_in_flight
            ),
        );
        v.check(
            self.consumer.max_attempts >= 1,
            "consumer.max_attempts",
            self.consumer.max_attempts,
            "must be at least 1 (the first delivery counts)",
        );
        v.check(
            self.consumer.retry_base <= self.consumer.retry_max,
            "consumer.retry_base",
            self.consumer.retry_base,
            format!(
                "must not exceed consumer.retry_max ({})",
                self.consumer.retry_max
            ),
        );
        v.check(
            self.retention.age.get() >= std::time::Duration::from_secs(3600),
            "retention.age",
            self.retention.age,
            "must be at least 1h: a claim pruned before its message's last redelivery lets that redelivery apply twice",
        );
        v.check(
            self.retention.interval.get() >= std::time::Duration::from_secs(1),
            "retention.interval",
            self.retention.interval,
            "must be at least 1s",
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn problems(cfg: &MessagingConfig) -> Vec<String> {
        let mut v = Validator::new();
        cfg.validate(&mut v);
        v.into_problems()
            .iter()
            .map(|p| format!("{} = {}: {}", p.key, p.value, p.reason))
            .collect()
    }

    #[test]
    fn the_defaults_are_valid_and_need_no_broker() {
        let cfg = MessagingConfig::default();
        assert!(problems(&cfg).is_empty(), "{:?}", problems(&cfg));
        assert_eq!(cfg.broker, BrokerKind::Embedded);
        assert_eq!(cfg.consumer.retry(), RetryPolicy::default());
    }

    #[test]
    fn bad_values_are_named_with_their_reason() {
        let cfg: MessagingConfig = toml::from_str(
            r#"
            broker = "kafka"
            url = "kafka://broker:9092"
            [relay]
            batch = 0
            [consumer]
            retry_base = "1m"
            retry_max = "1s"
            [retention]
            age = "10m"
            "#,
        )
        .unwrap();
        let p = problems(&cfg).join("\n");
        for key in ["url", "relay.batch", "consumer.retry_base", "retention.age"] {
            assert!(p.contains(key), "{key} missing from:\n{p}");
        }
        assert!(p.contains("kafka://broker:9092"), "{p}");
        assert!(p.contains("no scheme"), "{p}");
    }

    #[test]
    fn an_empty_url_means_the_brokers_local_default() {
        let cfg: MessagingConfig = toml::from_str("broker = \"nats\"").unwrap();
        assert_eq!(cfg.effective_url(), "nats://127.0.0.1:4222");
        assert!(problems(&cfg).is_empty());
        assert!(toml::from_str::<MessagingConfig>("broker = \"zeromq\"").is_err());
    }
}
