//! `[kafka]`: the Kafka sink.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, Config, ConfigError, ContentMode, Secret, SinkKind};

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
    /// A row whose payload is NULL becomes a tombstone (the row's key, no value), as
    /// Debezium's `route.tombstone.on.empty.payload` does; off, it is an invalid row
    /// (`sink.on_invalid`). Default false.
    pub tombstone_on_empty_payload: bool,
    /// Outbox columns written as record headers, header name → column name (Debezium's
    /// `table.fields.additional.placement` with `header`), e.g. `{ tenant = "tenant_id" }`.
    /// The value is the column's text as Postgres prints it, UTF-8; a NULL writes no
    /// header. A column the table lacks stops the relay at its first row (schema
    /// error). Not on dead letters. Default empty.
    pub additional_headers: BTreeMap<String, String>,
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
            tombstone_on_empty_payload: false,
            additional_headers: BTreeMap::new(),
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
        for (header, column) in &self.additional_headers {
            let key = format!("kafka.additional_headers.{header}");
            if column.is_empty() {
                return Err(invalid(&key, "must name a column"));
            }
            if let Some(why) = reserved_header(header, self.debezium_headers) {
                return Err(invalid(&key, why));
            }
        }
        Ok(())
    }
}

/// What the source reads from an outbox row besides `[postgres.columns]`, for the
/// sink in use ([`Config::row_extras`]): the source stays unaware of Kafka.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowExtras {
    /// Columns whose text values travel with the row, each once, in name order.
    pub columns: Vec<String>,
    /// A NULL payload is a row without data (for a tombstone), not an invalid row.
    pub null_payload: bool,
}

impl Config {
    /// The [`RowExtras`] of this configuration: `kafka.additional_headers`' columns and
    /// `kafka.tombstone_on_empty_payload` when the sink is Kafka, else none.
    pub fn row_extras(&self) -> RowExtras {
        if self.sink.kind != SinkKind::Kafka {
            return RowExtras::default();
        }
        let mut columns: Vec<String> = self.kafka.additional_headers.values().cloned().collect();
        columns.sort();
        columns.dedup();
        RowExtras {
            columns,
            null_payload: self.kafka.tombstone_on_empty_payload,
        }
    }
}

/// Why `header` may not be an additional header: the event's own headers own it.
fn reserved_header(header: &str, debezium_headers: bool) -> Option<&'static str> {
    let lower = header.to_ascii_lowercase();
    if header.is_empty() {
        Some("a header name must not be empty")
    } else if lower.starts_with("ce_") || lower == "content-type" {
        Some("is a CloudEvents header of the record (ce_*, content-type); choose another name")
    } else if debezium_headers && (header == "id" || header == "eventType") {
        Some("is written by kafka.debezium_headers; choose another name")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kafka(additional: &[(&str, &str)], tombstones: bool) -> Config {
        let mut cfg = Config::default();
        cfg.sink.kind = SinkKind::Kafka;
        cfg.kafka.tombstone_on_empty_payload = tombstones;
        cfg.kafka.additional_headers = additional
            .iter()
            .map(|(h, c)| (h.to_string(), c.to_string()))
            .collect();
        cfg
    }

    #[test]
    fn row_extras_are_the_kafka_sinks_only() {
        // Given two headers from one column and one from another, and tombstones on
        let cfg = kafka(
            &[("b", "tenant_id"), ("a", "tenant_id"), ("r", "region")],
            true,
        );
        // Then the source reads each column once, and a NULL payload is let through
        let extras = cfg.row_extras();
        assert_eq!(extras.columns, vec!["region", "tenant_id"]);
        assert!(extras.null_payload);
        // but for another sink neither applies
        let mut nats = cfg;
        nats.sink.kind = SinkKind::Nats;
        assert_eq!(nats.row_extras(), RowExtras::default());
    }

    #[test]
    fn additional_headers_may_not_shadow_the_records_own() {
        for (header, column) in [("ce_id", "x"), ("Content-Type", "x"), ("", "x"), ("t", "")] {
            let err = kafka(&[(header, column)], false)
                .kafka
                .validate()
                .expect_err("refused");
            assert!(
                err.to_string().contains("kafka.additional_headers."),
                "{header}: {err}"
            );
        }
        let mut cfg = kafka(&[("eventType", "type")], false);
        assert!(cfg.kafka.validate().is_ok());
        cfg.kafka.debezium_headers = true;
        assert!(cfg.kafka.validate().is_err());
    }
}
