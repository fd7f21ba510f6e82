//! `[kafka]`: the Kafka sink.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError, ContentMode, Secret};

/// Default Kafka topic template: Debezium's Outbox Event Router convention.
pub const DEFAULT_KAFKA_TOPIC: &str = "outbox.event.{aggregate_type}";
/// Default Kafka `message.timeout.ms`: a delivery report fails after this long.
pub const DEFAULT_KAFKA_MESSAGE_TIMEOUT_MS: u64 = 30_000;

/// `[kafka]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated. Default `127.0.0.1:9092`.
    pub brokers: String,
    /// Topic template. Default `outbox.event.{aggregate_type}`.
    pub topic: String,
    /// Record key template. Default `{aggregate_id}`.
    pub key: String,
    /// Dead-letter topic. Default `outbox.deadletter`.
    pub dead_letter_topic: String,
    /// Also the headers Debezium's Outbox Event Router writes, for consumers moving
    /// from it: `id` (the event id) and `eventType` (the row's event type, without
    /// `cloudevents.type_prefix`). Default false.
    pub debezium_headers: bool,
    /// `binary` (default) or `structured`.
    pub content_mode: ContentMode,
    /// Exactly once into Kafka for read_committed consumers: a transactional producer
    /// (`transactional.id` `outboxd.<slot>` unless `properties` sets one) writes the
    /// events and a checkpoint record to `checkpoint_topic` in one transaction; at
    /// start the checkpoint is read back and nothing before it is sent again. A
    /// standby that takes over fences the old active. Default false (at least once).
    pub exactly_once: bool,
    /// Topic of the exactly-once checkpoints (compacted, created when missing), keyed
    /// by `transactional.id`. Default `outboxd.checkpoints`.
    pub checkpoint_topic: String,
    /// How long librdkafka may try to deliver one record before its delivery report
    /// fails (`message.timeout.ms`), in ms. The relay then retries it. Default 30000.
    pub message_timeout_ms: u64,
    /// librdkafka properties passed through (SASL, SSL, tuning); they win over
    /// outboxd's producer defaults. Values are treated as secrets. Default empty.
    pub properties: BTreeMap<String, Secret>,
    /// librdkafka properties whose values are read from files (mounted Secrets), e.g.
    /// `"sasl.password" = "/var/run/secrets/kafka/password"`; a trailing newline is
    /// dropped. They win over `properties`. Default empty.
    pub properties_files: BTreeMap<String, PathBuf>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic: DEFAULT_KAFKA_TOPIC.into(),
            key: "{aggregate_id}".into(),
            dead_letter_topic: "outbox.deadletter".into(),
            debezium_headers: false,
            content_mode: ContentMode::Binary,
            exactly_once: false,
            checkpoint_topic: "outboxd.checkpoints".into(),
            message_timeout_ms: DEFAULT_KAFKA_MESSAGE_TIMEOUT_MS,
            properties: BTreeMap::new(),
            properties_files: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    /// Shape checks of this section; each error names the key.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.brokers.is_empty() {
            return Err(invalid("kafka.brokers", "missing"));
        }
        if self.message_timeout_ms == 0 {
            return Err(invalid("kafka.message_timeout_ms", "must be > 0"));
        }
        if self.exactly_once && self.checkpoint_topic.is_empty() {
            return Err(invalid("kafka.checkpoint_topic", "must not be empty"));
        }
        Ok(())
    }
}
