//! Publishers: where CloudEvents go.
//!
//! Delivery contract, shared by every sink: `publish` resolves `Ok` only once the
//! broker has made the event durable (JetStream PubAck, Kafka delivery report with
//! `acks=all`, a flushed stdout write). Progress (the slot's LSN) is advanced by the
//! relay on that `Ok` and never on "accepted". Publishing is at-least-once: a sink may
//! see the same event again after a crash or retry, and keeps the event id as its
//! dedup key (`Nats-Msg-Id`, idempotent producer, `ce_id`).
//!
//! Errors are classified where they are created: [`SinkError::Retryable`] (broker
//! down, timeout: retry with backoff, never dead-letter) and [`SinkError::Rejected`]
//! (this event can never be accepted: the poison-row policy decides).

pub mod kafka;
pub mod nats;
pub mod stdout;

use std::borrow::Cow;

use cloudevents::event::Data;
use cloudevents::{AttributesReader, Event};
use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::config::{Config, SinkKind};
use crate::metrics::Metrics;

/// A publish failure, sorted by what happens next.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Transient: retry the same event later (order is kept by the relay).
    #[error("{sink}: {reason}: {detail}")]
    Retryable {
        /// Sink name.
        sink: &'static str,
        /// Low-cardinality reason (metrics label).
        reason: &'static str,
        /// Human detail, no secrets, no payload.
        detail: String,
    },
    /// Permanent for this event: hand it to the poison-row policy.
    #[error("{sink} rejected the event: {reason}: {detail}")]
    Rejected {
        /// Sink name.
        sink: &'static str,
        /// Low-cardinality reason (metrics label), e.g. `too_large`.
        reason: &'static str,
        /// Human detail.
        detail: String,
    },
    /// The sink cannot work at all (bad stream setup, refused credentials): stop.
    #[error("{sink}: {detail}")]
    Fatal {
        /// Sink name.
        sink: &'static str,
        /// What is wrong and how to fix it.
        detail: String,
    },
}

impl SinkError {
    /// True for errors that a retry may cure.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SinkError::Retryable { .. })
    }
    /// True for refused credentials or a failed TLS handshake: retried like any
    /// connect failure, but only an operator can cure them, so they are logged as
    /// errors with the fix and counted in `outboxd_publish_errors_total`.
    pub fn needs_operator(&self) -> bool {
        matches!(
            self,
            SinkError::Retryable {
                reason: "auth" | "tls",
                ..
            }
        )
    }
    /// The sink's name.
    pub fn sink(&self) -> &'static str {
        match self {
            SinkError::Retryable { sink, .. }
            | SinkError::Rejected { sink, .. }
            | SinkError::Fatal { sink, .. } => sink,
        }
    }
    /// The metrics label.
    pub fn reason(&self) -> &'static str {
        match self {
            SinkError::Retryable { reason, .. } | SinkError::Rejected { reason, .. } => reason,
            SinkError::Fatal { .. } => "fatal",
        }
    }
}

/// What the relay hands a sink: the event plus the row fields routing needs.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The CloudEvent.
    pub event: Event,
    /// Aggregate type (routing).
    pub aggregate_type: String,
    /// Aggregate id (ordering key).
    pub aggregate_id: String,
    /// Event type without prefix (routing).
    pub event_type: String,
    /// Goes to the dead-letter destination instead of the templated one.
    pub dead_letter: bool,
}

impl Envelope {
    /// The envelope of `row`'s event (not a dead letter).
    pub fn of_row(event: Event, row: crate::outbox::OutboxRow) -> Self {
        Self {
            event,
            aggregate_type: row.aggregate_type,
            aggregate_id: row.aggregate_id,
            event_type: row.event_type,
            dead_letter: false,
        }
    }

    /// The template fields of this envelope.
    pub fn fields(&self) -> crate::route::Fields<'_> {
        crate::route::Fields {
            aggregate_type: &self.aggregate_type,
            aggregate_id: &self.aggregate_id,
            event_type: &self.event_type,
        }
    }
}

/// A successful delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// The broker said it already had this event id (deduplicated).
    pub duplicate: bool,
    /// Where it went (subject, topic), for metrics.
    pub destination: String,
}

/// The configured sink. An enum rather than a trait object: the set is closed and
/// the hot path stays free of boxing.
#[allow(clippy::large_enum_variant)] // one instance per process; size is irrelevant
pub enum Sink {
    /// Standard output.
    Stdout(stdout::StdoutSink),
    /// NATS JetStream.
    Nats(nats::NatsSink),
    /// Kafka.
    Kafka(kafka::KafkaSink),
}

impl Sink {
    /// Connects the sink named by `[sink] kind`. With `metrics`, the sink counts what
    /// it does by itself: broker connections re-established after a loss
    /// (`outboxd_reconnects_total{component="broker"}`) and Kafka producer
    /// replacements.
    pub async fn connect(cfg: &Config, metrics: Option<&Metrics>) -> Result<Self, SinkError> {
        if let Some(m) = metrics {
            m.known_labels(name_of(cfg.sink.kind), Self::error_reasons(cfg.sink.kind));
        }
        match cfg.sink.kind {
            SinkKind::Stdout => Ok(Sink::Stdout(stdout::StdoutSink::new())),
            SinkKind::Nats => Ok(Sink::Nats(
                nats::NatsSink::connect(
                    &cfg.nats,
                    &cfg.retry,
                    metrics.map(|m| m.reconnects.with_label_values(&["broker"])),
                )
                .await?,
            )),
            SinkKind::Kafka => {
                let replacements = metrics.map(|m| m.producer_replacements.clone());
                Ok(Sink::Kafka(
                    kafka::KafkaSink::connect(&cfg.kafka, replacements).await?,
                ))
            }
        }
    }

    /// Publishes one event and waits until the broker made it durable.
    pub async fn publish(&self, env: &Envelope) -> Result<Delivered, SinkError> {
        match self {
            Sink::Stdout(s) => s.publish(env),
            Sink::Nats(s) => s.publish(env).await,
            Sink::Kafka(s) => s.publish(env).await,
        }
    }

    /// The reasons (`outboxd_publish_errors_total{reason}`) a sink of `kind` reports.
    pub fn error_reasons(kind: SinkKind) -> &'static [&'static str] {
        match kind {
            SinkKind::Stdout => &["encode", "fatal"],
            SinkKind::Nats => &[
                "connect",
                "timeout",
                "disconnected",
                "auth",
                "tls",
                "no_stream",
                "stream",
                "broker_error",
                "publish",
                "too_large",
                "encode",
                "fatal",
            ],
            SinkKind::Kafka => &[
                "connect",
                "metadata",
                "timeout",
                "broker_down",
                "broker_error",
                "queue_full",
                "leader_election",
                "not_enough_replicas",
                "unknown_topic",
                "invalid_topic",
                "invalid_record",
                "too_large",
                "fenced",
                "unauthorized",
                "canceled",
                "auth",
                "tls",
                "encode",
                "fatal",
            ],
        }
    }

    /// The sink's name, for logs and metric labels.
    pub fn name(&self) -> &'static str {
        name_of(match self {
            Sink::Stdout(_) => SinkKind::Stdout,
            Sink::Nats(_) => SinkKind::Nats,
            Sink::Kafka(_) => SinkKind::Kafka,
        })
    }
}

/// A sink kind's name, for logs and metric labels.
fn name_of(kind: SinkKind) -> &'static str {
    match kind {
        SinkKind::Stdout => "stdout",
        SinkKind::Nats => "nats",
        SinkKind::Kafka => "kafka",
    }
}

/// The attributes and extensions outboxd writes on every event, and their header names
/// in the NATS (`ce-`) and Kafka (`ce_`) bindings: static, so the hot path allocates no
/// header name for them.
const HEADER_NAMES: [(&str, &str, &str); 11] = [
    ("id", "ce-id", "ce_id"),
    ("source", "ce-source", "ce_source"),
    ("specversion", "ce-specversion", "ce_specversion"),
    ("type", "ce-type", "ce_type"),
    ("subject", "ce-subject", "ce_subject"),
    ("time", "ce-time", "ce_time"),
    ("dataschema", "ce-dataschema", "ce_dataschema"),
    ("correlationid", "ce-correlationid", "ce_correlationid"),
    ("causationid", "ce-causationid", "ce_causationid"),
    ("partitionkey", "ce-partitionkey", "ce_partitionkey"),
    ("sequence", "ce-sequence", "ce_sequence"),
];

/// The header names of [`HEADER_NAMES`] for `separator` (see [`ce_header_name`]).
pub fn ce_header_names(separator: char) -> impl Iterator<Item = &'static str> {
    HEADER_NAMES
        .iter()
        .map(move |(_, dash, underscore)| if separator == '-' { *dash } else { *underscore })
}

/// The binding's header name of attribute `name`, `separator` being `-` (NATS, HTTP)
/// or `_` (Kafka).
pub fn ce_header_name(name: &str, separator: char) -> Cow<'static, str> {
    match HEADER_NAMES.iter().find(|(attr, _, _)| *attr == name) {
        Some((_, dash, _)) if separator == '-' => Cow::Borrowed(dash),
        Some((_, _, underscore)) if separator == '_' => Cow::Borrowed(underscore),
        _ => Cow::Owned(format!("ce{separator}{name}")),
    }
}

/// The canonical string of an attribute value, as the SDK's `Display` writes it, but
/// without the formatting machinery (and its allocation) for the string-valued ones,
/// which are all but `time` and `specversion` on outboxd's events.
pub fn attribute_text<'a>(value: &cloudevents::event::AttributeValue<'a>) -> Cow<'a, str> {
    use cloudevents::event::AttributeValue as A;
    match value {
        A::String(s) => Cow::Borrowed(s),
        A::URIRef(s) => Cow::Borrowed(s.as_str()),
        A::URI(u) => Cow::Borrowed(u.as_str()),
        other => Cow::Owned(other.to_string()),
    }
}

/// [`attribute_text`] of an extension value.
pub fn extension_text(value: &cloudevents::event::ExtensionValue) -> Cow<'_, str> {
    match value {
        cloudevents::event::ExtensionValue::String(s) => Cow::Borrowed(s),
        other => Cow::Owned(other.to_string()),
    }
}

/// The JSON event format of an event (structured content mode), as the SDK writes it,
/// except that data which the event carries as bytes under a JSON `datacontenttype`
/// (how [`crate::event`] keeps a row's JSON payload) is embedded as JSON in `data`,
/// unchanged, rather than as `data_base64`.
pub struct Structured<'a>(pub &'a Event);

impl Serialize for Structured<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let e = self.0;
        let json_bytes = match (e.data(), e.datacontenttype()) {
            (Some(Data::Binary(b)), Some(ct)) if crate::event::is_json(ct) => Some(b),
            _ => None,
        };
        let Some(bytes) = json_bytes else {
            return e.serialize(serializer);
        };
        let text = std::str::from_utf8(bytes).map_err(serde::ser::Error::custom)?;
        let data: &serde_json::value::RawValue =
            serde_json::from_str(text).map_err(serde::ser::Error::custom)?;
        let mut m = serializer.serialize_map(None)?;
        m.serialize_entry("specversion", e.specversion().as_str())?;
        m.serialize_entry("id", e.id())?;
        m.serialize_entry("type", e.ty())?;
        m.serialize_entry("source", e.source())?;
        m.serialize_entry("datacontenttype", e.datacontenttype().unwrap_or_default())?;
        if let Some(schema) = e.dataschema() {
            m.serialize_entry("dataschema", schema)?;
        }
        if let Some(subject) = e.subject() {
            m.serialize_entry("subject", subject)?;
        }
        if let Some(time) = e.time() {
            m.serialize_entry("time", time)?;
        }
        m.serialize_entry("data", data)?;
        for (name, value) in e.iter_extensions() {
            m.serialize_entry(name, value)?;
        }
        m.end()
    }
}

/// [`Structured`] as bytes.
pub fn structured_json(event: &Event) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&Structured(event))
}

/// The sink's meaning checks that need its client library, run right after the
/// configuration loads (exit 78 on failure, like every configuration error): today
/// librdkafka's verdict on `[kafka.properties]`.
pub fn check_config(cfg: &Config) -> Result<(), crate::config::ConfigError> {
    if cfg.sink.kind == SinkKind::Kafka {
        kafka::client::check_properties(&cfg.kafka)
            .map_err(|(key, reason)| crate::config::ConfigError::Invalid { key, reason })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reason literal in a sink's source is in its `error_reasons` (so it is
    /// exported at 0 from the start), and every poison reason in `POISON_REASONS`.
    #[test]
    fn every_reason_in_the_code_is_known() {
        let literals = |src: &str| -> Vec<String> {
            let mut out = Vec::new();
            for pat in [
                "reason: \"",
                "retry(\"",
                "rejected(\"",
                "retryable(\"",
                "Class::Retry(\"",
                "Class::Reject(\"",
            ] {
                for part in src.split(pat).skip(1) {
                    out.push(part.split('"').next().unwrap_or_default().to_string());
                }
            }
            out
        };
        let nats = literals(include_str!("nats.rs"));
        let kafka: Vec<String> = [
            include_str!("kafka/mod.rs"),
            include_str!("kafka/classify.rs"),
            include_str!("kafka/client.rs"),
            include_str!("kafka/limits.rs"),
        ]
        .iter()
        .flat_map(|s| literals(s))
        .collect();
        assert!(nats.len() > 5 && kafka.len() > 10, "{nats:?} {kafka:?}");
        for (kind, found) in [(SinkKind::Nats, nats), (SinkKind::Kafka, kafka)] {
            for r in found
                .iter()
                .filter(|r| !r.is_empty() && r.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            {
                assert!(
                    Sink::error_reasons(kind).contains(&r.as_str()),
                    "{kind:?}: {r}"
                );
            }
        }
        let rejects = include_str!("kafka/classify.rs")
            .split("Class::Reject(\"")
            .skip(1);
        for r in rejects.map(|p| p.split('"').next().unwrap_or_default()) {
            assert!(
                crate::metrics::POISON_REASONS.contains(&r),
                "poison reason {r}"
            );
        }
    }
    use cloudevents::{EventBuilder, EventBuilderV10};

    fn event(data: Data, content_type: &str) -> Event {
        EventBuilderV10::new()
            .id("e-1")
            .source("/s")
            .ty("T")
            .subject("a-1")
            .extension("sequence", "0001")
            .data(content_type, data)
            .build()
            .expect("valid")
    }

    #[test]
    fn json_bytes_are_embedded_as_json_exactly_as_written() {
        let raw = br#"{"b": 1, "a": [true]}"#;
        let e = event(Data::Binary(raw.to_vec()), "application/json");
        let text = String::from_utf8(structured_json(&e).expect("encodes")).expect("utf-8");
        assert!(text.contains(r#""data":{"b": 1, "a": [true]}"#), "{text}");
        assert!(!text.contains("data_base64"), "{text}");
        // What the SDK reads back is the same event with the data as a JSON value.
        let back: Event = serde_json::from_str(&text).expect("a CloudEvent");
        assert_eq!(back.id(), "e-1");
        assert_eq!(back.subject(), Some("a-1"));
        assert_eq!(
            back.extension("sequence").map(|v| v.to_string()).as_deref(),
            Some("0001")
        );
        assert_eq!(
            back.data(),
            Some(&Data::Json(serde_json::json!({"b": 1, "a": [true]})))
        );
    }

    #[test]
    fn header_names_follow_the_bindings() {
        assert_eq!(ce_header_name("id", '-'), "ce-id");
        assert_eq!(ce_header_name("sequence", '_'), "ce_sequence");
        assert_eq!(ce_header_name("traceparent", '-'), "ce-traceparent");
        assert_eq!(ce_header_name("traceparent", '_'), "ce_traceparent");
    }

    #[test]
    fn other_data_is_written_by_the_sdk() {
        for (data, ct) in [
            (Data::Binary(vec![0, 159]), "application/octet-stream"),
            (Data::String("plain".into()), "text/plain"),
            (Data::Json(serde_json::json!({"k": 1})), "application/json"),
        ] {
            let e = event(data, ct);
            assert_eq!(
                structured_json(&e).expect("encodes"),
                serde_json::to_vec(&e).expect("encodes"),
                "{ct}"
            );
        }
    }
}
