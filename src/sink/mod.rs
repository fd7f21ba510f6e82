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

use cloudevents::Event;

use crate::config::{Config, SinkKind};

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
    /// Connects the sink named by `[sink] kind`.
    pub async fn connect(cfg: &Config) -> Result<Self, SinkError> {
        match cfg.sink.kind {
            SinkKind::Stdout => Ok(Sink::Stdout(stdout::StdoutSink::new())),
            SinkKind::Nats => Ok(Sink::Nats(nats::NatsSink::connect(&cfg.nats).await?)),
            SinkKind::Kafka => Ok(Sink::Kafka(kafka::KafkaSink::connect(&cfg.kafka).await?)),
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

    /// The sink's name, for logs and metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            Sink::Stdout(_) => "stdout",
            Sink::Nats(_) => "nats",
            Sink::Kafka(_) => "kafka",
        }
    }
}
