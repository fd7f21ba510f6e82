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
//!
//! Exactly-once mode (`nats.exactly_once`, `kafka.exactly_once`) adds a checkpoint:
//! the relay calls [`Sink::checkpoint`] with the position of the last row read once
//! every event read so far is acknowledged, and [`Sink::resume`] before a session
//! streams, to learn what the broker already holds (that checkpoint, plus, for NATS,
//! the ids stored after it) so that nothing is sent twice. See docs/exactly-once.md.

pub mod binding;
pub mod kafka;
pub mod nats;
pub mod stdout;

use std::collections::HashSet;

use crate::config::{Config, ConfigError, SinkKind};
use crate::event::Envelope;
use crate::route::Template;
use crate::telemetry::Metrics;

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
    /// Exactly-once mode: the broker transaction holding the events since the last
    /// checkpoint is lost (aborted, or a delivery in it failed). The session ends and a
    /// new one sends them again from the last checkpoint.
    #[error("{sink}: {reason}: {detail}; the events since the last checkpoint are sent again")]
    Aborted {
        /// Sink name.
        sink: &'static str,
        /// Low-cardinality reason (metrics label).
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
            | SinkError::Aborted { sink, .. }
            | SinkError::Fatal { sink, .. } => sink,
        }
    }
    /// The metrics label.
    pub fn reason(&self) -> &'static str {
        match self {
            SinkError::Retryable { reason, .. }
            | SinkError::Rejected { reason, .. }
            | SinkError::Aborted { reason, .. } => reason,
            SinkError::Fatal { .. } => "fatal",
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

/// A row's place in the stream: row `index` (0-based, in stream order) of the
/// Postgres transaction that committed at `commit_lsn`. Ordered as the stream is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Checkpoint {
    /// LSN of the transaction's commit record.
    pub commit_lsn: u64,
    /// The row's index within the transaction.
    pub index: u64,
}

/// What an exactly-once sink's broker already holds, read back before a session
/// streams: rows it covers are not sent again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resume {
    /// Every row at or before this position is in the broker (`None`: no checkpoint).
    pub through: Option<Checkpoint>,
    /// Ids of events the broker stored after `through` (NATS: found by reading the
    /// stream after the checkpoint's sequence; Kafka: none, a transaction without
    /// its checkpoint is aborted).
    pub ids: HashSet<String>,
}

impl Resume {
    /// True when the row at `at` with event id `id` is already in the broker.
    pub fn covers(&self, at: Checkpoint, id: &str) -> bool {
        self.through.is_some_and(|t| at <= t) || self.ids.contains(id)
    }
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
    /// Connects the sink named by `[sink] kind` (`routes`, from [`validate`]). With `metrics`, the sink counts what
    /// it does by itself: broker connections re-established after a loss
    /// (`outboxd_reconnects_total{component="broker"}`) and Kafka producer
    /// replacements.
    pub async fn connect(
        cfg: &Config,
        routes: &Routes,
        metrics: Option<&Metrics>,
    ) -> Result<Self, SinkError> {
        if let Some(m) = metrics {
            m.known_labels(name_of(cfg.sink.kind), Self::error_reasons(cfg.sink.kind));
        }
        match routes {
            Routes::Stdout => Ok(Sink::Stdout(stdout::StdoutSink::new())),
            Routes::Nats { subject } => Ok(Sink::Nats(
                nats::NatsSink::connect(
                    &cfg.nats,
                    &cfg.postgres.slot,
                    &cfg.cloudevents.source,
                    subject.clone(),
                    &cfg.retry,
                    metrics.map(|m| m.reconnects.with_label_values(&["broker"])),
                )
                .await?,
            )),
            Routes::Kafka { topic, key } => {
                let replacements = metrics.map(|m| m.producer_replacements.clone());
                Ok(Sink::Kafka(
                    kafka::KafkaSink::connect(
                        &cfg.kafka,
                        &cfg.postgres.slot,
                        topic.clone(),
                        key.clone(),
                        replacements,
                    )
                    .await?,
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

    /// True in exactly-once mode (`nats.exactly_once`, `kafka.exactly_once`).
    pub fn exactly_once(&self) -> bool {
        match self {
            Sink::Stdout(_) => false,
            Sink::Nats(s) => s.exactly_once(),
            Sink::Kafka(s) => s.exactly_once(),
        }
    }

    /// Exactly-once mode, before a session streams: drops what was published since the
    /// last checkpoint where the broker can (Kafka aborts its open transaction), and
    /// reads back what the broker holds. Other modes: an empty [`Resume`].
    pub async fn resume(&self) -> Result<Resume, SinkError> {
        match self {
            Sink::Stdout(_) => Ok(Resume::default()),
            Sink::Nats(s) => s.resume().await,
            Sink::Kafka(s) => s.resume().await,
        }
    }

    /// Exactly-once mode, when every event published so far is acknowledged: makes
    /// them durable together with `through`, the position of the last row read
    /// (Kafka: commits the transaction with a checkpoint record; NATS: stores the
    /// checkpoint and the stream's sequence). `None` commits without moving the
    /// checkpoint (the initial snapshot, `replay`). Other modes: nothing to do.
    pub async fn checkpoint(&self, through: Option<Checkpoint>) -> Result<(), SinkError> {
        match self {
            Sink::Stdout(_) => Ok(()),
            Sink::Nats(s) => s.checkpoint(through).await,
            Sink::Kafka(s) => s.checkpoint(through).await,
        }
    }

    /// Exactly-once mode, on shutdown with events unacknowledged: gives up what was
    /// published since the last checkpoint (Kafka aborts the transaction at once, so
    /// read_committed consumers are not held up until it times out).
    pub async fn abandon(&self) {
        if let Sink::Kafka(s) = self {
            s.abandon().await;
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
                "checkpoint",
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
                "transaction",
                "checkpoint",
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

/// The destinations of the configured sink, parsed once at start-up by [`validate`]
/// and handed to [`Sink::connect`].
#[derive(Debug, Clone)]
pub enum Routes {
    /// stdout routes nothing.
    Stdout,
    /// NATS.
    Nats {
        /// `nats.subject`.
        subject: Template,
    },
    /// Kafka.
    Kafka {
        /// `kafka.topic`.
        topic: Template,
        /// `kafka.key`.
        key: Template,
    },
}

/// What the sink's settings mean, checked right after the config loads (the config
/// itself checks only their shape): NATS's credentials and TLS files make sense,
/// librdkafka accepts `[kafka.properties]`, and the routing templates parse; they are
/// returned, parsed, for [`Sink::connect`]. Each error names the key to change.
pub fn validate(cfg: &Config) -> Result<Routes, ConfigError> {
    let template = |key: &str, text: &str| {
        Template::parse(text).map_err(|e| ConfigError::invalid(key, e.to_string()))
    };
    Ok(match cfg.sink.kind {
        SinkKind::Nats => {
            cfg.nats.validate_security()?;
            Routes::Nats {
                subject: template("nats.subject", &cfg.nats.subject)?,
            }
        }
        SinkKind::Kafka => {
            let routes = Routes::Kafka {
                topic: template("kafka.topic", &cfg.kafka.topic)?,
                key: template("kafka.key", &cfg.kafka.key)?,
            };
            kafka::client::check_properties(&cfg.kafka)
                .map_err(|(key, reason)| ConfigError::Invalid { key, reason })?;
            routes
        }
        SinkKind::Stdout => Routes::Stdout,
    })
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
        let nats: Vec<String> = [
            include_str!("nats/mod.rs"),
            include_str!("nats/encode.rs"),
            include_str!("nats/auth.rs"),
            include_str!("nats/once.rs"),
        ]
        .iter()
        .flat_map(|s| literals(s))
        .collect();
        let kafka: Vec<String> = [
            include_str!("kafka/mod.rs"),
            include_str!("kafka/classify.rs"),
            include_str!("kafka/client.rs"),
            include_str!("kafka/limits.rs"),
            include_str!("kafka/once.rs"),
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
                crate::telemetry::POISON_REASONS.contains(&r),
                "poison reason {r}"
            );
        }
    }
}
