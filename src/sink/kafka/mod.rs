//! Kafka sink: CloudEvents Kafka protocol binding over one idempotent librdkafka
//! producer; `publish` resolves when the delivery report arrives.
//!
//! - Topic: `kafka.topic` rendered with [`Sanitize::KafkaTopic`] (default
//!   `outbox.event.{aggregate_type}`, Debezium's Outbox Event Router convention).
//! - Key: `kafka.key` rendered verbatim (default the aggregate id), partitioned by
//!   `murmur2_random` as Java producers do.
//! - Durable means: the delivery report succeeded with `acks=all` (unless the operator
//!   overrode `acks`, which is warned about at start-up).
//!
//! Ordering. librdkafka keeps the order of records of one partition, and idempotence
//! keeps its own retries from reordering or duplicating them. A failed delivery report
//! is not retried by librdkafka, though: the relay retries it, and it may do so only
//! because it never has two events of one aggregate in flight (its per-key gate). The
//! records of one aggregate therefore reach the partition in commit order, whatever
//! this sink's retries do. Records of different aggregates that share a Kafka key
//! (a `kafka.key` template without `{aggregate_id}`) are not ordered among each other.
//!
//! A producer can become unusable for good: librdkafka's fatal error (it lost the
//! idempotence state it cannot recover), or a broker that refuses the producer's id or
//! epoch (fenced, invalid epoch, unknown producer id: after records timed out during
//! a broker hang librdkafka bumps the epoch, and a broker that does not follow refuses
//! every later request). This sink then replaces the producer with a fresh one, once
//! per broken producer however many events fail on it (one WARN, one count in
//! `outboxd_producer_replacements_total`), and reports each event as retryable: a new
//! producer id means records in flight may be written twice, never lost, and the
//! relay's gate keeps each aggregate's order across the replacement.
//!
//! What Kafka can never accept (a record over `message.max.bytes`, an illegal topic
//! name) is rejected before it reaches the producer ([`limits`]).
//!
//! Dropping the sink purges what librdkafka still holds (never acknowledged, so the
//! slot resends it) and joins librdkafka's threads on a blocking thread, never on the
//! relay's: with a hung broker that takes a moment, and shutdown must stay bounded.
//!
//! This module never logs payloads or property values.

mod classify;
pub mod client;
pub mod encode;
mod limits;
mod once;

use std::borrow::Cow;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureRecord, Producer as _};

use super::{Delivered, Envelope, SinkError};
use crate::config::{ContentMode, KafkaConfig};
use crate::route::{Sanitize, Template};
use classify::{classify, Class};
use client::Producer;
use limits::{Limits, RecordSize};

const SINK: &str = "kafka";

/// How long `connect` waits for the cluster's metadata before reporting a retryable
/// error (the relay then retries the connect with backoff).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Publishes to Kafka.
pub struct KafkaSink {
    /// The producer in use; replaced after a fatal error (see the module docs).
    producer: RwLock<Arc<OffThread<Producer>>>,
    /// The producer's settings, kept to build a replacement. Holds secrets: never
    /// formatted.
    settings: rdkafka::ClientConfig,
    kafka: KafkaConfig,
    topic: Template,
    key: Template,
    mode: ContentMode,
    /// What a record must fit before it is produced.
    limits: Limits,
    /// `outboxd_producer_replacements_total`, when the caller counts.
    replacements: Option<prometheus::IntCounterVec>,
    /// Exactly-once mode's transactions (`kafka.exactly_once`).
    once: Option<once::Once>,
}

impl KafkaSink {
    /// Creates the producer and waits until a broker answers a metadata request;
    /// producer replacements are counted in `replacements` (by reason) when given.
    /// `topic` and `key` are `kafka.topic` and `kafka.key`, parsed by
    /// [`crate::sink::validate`].
    pub async fn connect(
        cfg: &KafkaConfig,
        slot: &str,
        topic: Template,
        key: Template,
        replacements: Option<prometheus::IntCounterVec>,
    ) -> Result<Self, SinkError> {
        for warning in client::weakened(&cfg.properties) {
            tracing::warn!(%warning, "kafka.properties weakens a delivery guarantee");
        }
        let mut settings = client::producer_config(cfg);
        // Exactly once: a transactional producer whose id is derived from the slot.
        let once = cfg
            .exactly_once
            .then(|| once::Once::new(&mut settings, cfg, slot));
        let producer: Producer = client::create(&settings, cfg)?;
        // Blocking calls, off the async workers: the metadata request, and on failure
        // the producer's drop (librdkafka purges, flushes and joins its threads).
        let (producer, brokers) = tokio::task::spawn_blocking(move || {
            let answer = producer.client().fetch_metadata(None, CONNECT_TIMEOUT);
            answer.map(|m| (producer, m.brokers().len()))
        })
        .await
        .map_err(|e| SinkError::Retryable {
            sink: SINK,
            reason: "connect",
            detail: format!("metadata task failed: {e}"),
        })?
        .map_err(|e| SinkError::Retryable {
            sink: SINK,
            reason: "connect",
            detail: format!(
                "no metadata from {} within {CONNECT_TIMEOUT:?}: {e}",
                cfg.brokers
            ),
        })?;
        tracing::info!(
            brokers = %cfg.brokers,
            reachable_brokers = brokers,
            topic = %topic,
            key = %key,
            content_mode = ?cfg.content_mode,
            overridden = ?cfg.properties.keys().collect::<Vec<_>>(),
            "kafka producer ready"
        );
        // The transactional id is registered (fencing its previous user) only once this
        // process holds the slot: a standby must not fence the active instance.
        if let Some(once) = &once {
            once.ensure_topic(&settings).await;
        }
        // Asks for topic configs (max.message.bytes); it sends nothing, so it must not
        // register an idempotent producer id. Without it only the producer's limit holds.
        let mut admin_settings = settings.clone();
        admin_settings.remove("transactional.id");
        admin_settings.set("enable.idempotence", "false");
        let admin = client::create(&admin_settings, cfg)
            .inspect_err(|e| tracing::warn!(error = %e, "cannot create the kafka admin client; topics' max.message.bytes will not be checked before sending"))
            .ok();
        let limits = Limits::new(&settings, admin);
        Ok(Self {
            producer: RwLock::new(Arc::new(OffThread::new(producer))),
            settings,
            kafka: cfg.clone(),
            topic,
            key,
            mode: cfg.content_mode,
            limits,
            replacements,
            once,
        })
    }

    /// True with `kafka.exactly_once`.
    pub fn exactly_once(&self) -> bool {
        self.once.is_some()
    }

    /// Exactly-once: aborts what the last session left open, then reads the last
    /// committed checkpoint back (see [`once`]).
    pub async fn resume(&self) -> Result<super::Resume, SinkError> {
        let Some(once) = &self.once else {
            return Ok(super::Resume::default());
        };
        let producer = self.current();
        once.init(&producer).await?;
        once.abort(&producer).await;
        Ok(super::Resume {
            through: once.read().await?,
            ids: Default::default(),
        })
    }

    /// Exactly-once: commits the open transaction, with a checkpoint record at
    /// `through` when given.
    pub async fn checkpoint(&self, through: Option<super::Checkpoint>) -> Result<(), SinkError> {
        match &self.once {
            Some(once) => {
                let producer = self.current();
                once.init(&producer).await?;
                once.commit(&producer, through).await
            }
            None => Ok(()),
        }
    }

    /// Exactly-once: aborts the open transaction.
    pub async fn abandon(&self) {
        if let Some(once) = &self.once {
            once.abort(&self.current()).await;
        }
    }

    /// Enqueues the record and waits for its delivery report.
    pub async fn publish(&self, env: &Envelope) -> Result<Delivered, SinkError> {
        if let Some(refused) = self
            .once
            .as_ref()
            .and_then(|once| once.refused_before(cloudevents::AttributesReader::id(&env.event)))
        {
            return Err(refused);
        }
        let topic = if env.dead_letter {
            self.kafka.dead_letter_topic.clone()
        } else {
            self.topic.render(&env.fields(), Sanitize::KafkaTopic)
        };
        let key = self.key.render(&env.fields(), Sanitize::None);
        let mut encoded =
            encode::encode(&env.event, self.mode).map_err(|e| SinkError::Rejected {
                sink: SINK,
                reason: "encode",
                detail: e.to_string(),
            })?;
        if self.kafka.debezium_headers && !env.dead_letter {
            // Kafka headers are length-prefixed: no value can change the framing.
            encoded.headers.push((
                Cow::Borrowed("id"),
                cloudevents::AttributesReader::id(&env.event).to_string(),
            ));
            encoded
                .headers
                .push((Cow::Borrowed("eventType"), env.event_type.clone()));
        }
        if !env.dead_letter {
            encoded.add_columns(&self.kafka.additional_headers, &env.extra);
        }
        let size = RecordSize::of(
            key.as_bytes(),
            encoded.value.as_deref(),
            encoded
                .headers
                .iter()
                .map(|(name, value)| (name.as_ref(), value.as_bytes())),
        );
        self.limits.check(&topic, size).await?;
        let headers = encoded.headers.iter().fold(
            OwnedHeaders::new_with_capacity(encoded.headers.len()),
            |h, (name, value)| {
                h.insert(Header {
                    key: name,
                    value: Some(value),
                })
            },
        );
        let record: FutureRecord<'_, str, [u8]> = FutureRecord {
            topic: &topic,
            partition: None,
            payload: encoded.value.as_deref(),
            key: Some(key.as_str()),
            timestamp: None,
            headers: Some(headers),
        };
        let producer = self.current();
        if let Some(once) = &self.once {
            once.init(&producer).await?;
            once.begin(&producer)?;
        }
        let err = match producer.send_result(record) {
            Ok(report) => match report.await {
                Ok(Ok(_delivery)) => {
                    return Ok(Delivered {
                        duplicate: false,
                        destination: topic,
                    })
                }
                Ok(Err((e, _record))) => e,
                Err(_canceled) => KafkaError::Canceled,
            },
            Err((e, _record)) => e,
        };
        match &self.once {
            Some(once) => {
                Err(self.sort_transactional(once, env, &producer, err, &topic, size.value))
            }
            None => Err(self.sort(&producer, err, &topic, size.value)),
        }
    }

    /// Exactly-once: a failed produce or delivery inside a transaction. A full queue is
    /// retried in place (nothing was produced); a fencing error means another instance
    /// took over (step down); a permanent rejection is remembered for the next session;
    /// anything else loses the transaction.
    fn sort_transactional(
        &self,
        once: &once::Once,
        env: &Envelope,
        producer: &Arc<OffThread<Producer>>,
        err: KafkaError,
        topic: &str,
        size: usize,
    ) -> SinkError {
        if let Some(stopped) = once.stopped(producer) {
            return stopped;
        }
        match classify(&err) {
            Class::Retry(reason @ "queue_full") => SinkError::Retryable {
                sink: SINK,
                reason,
                detail: format!("topic {topic}: {err}"),
            },
            Class::Fatal(_) => self.sort(producer, err, topic, size),
            Class::ResetProducer(_) => SinkError::Fatal {
                sink: SINK,
                detail: format!(
                    "topic {topic}: {err}: the broker refuses transactional.id {}: another outboxd                      took it over (the slot's standby), so this instance steps down",
                    once.id()
                ),
            },
            Class::Reject(reason) => {
                let rejected = self.sort(producer, err, topic, size);
                once.refused(
                    cloudevents::AttributesReader::id(&env.event),
                    reason,
                    &rejected.to_string(),
                );
                SinkError::Aborted {
                    sink: SINK,
                    reason: "transaction",
                    detail: format!(
                        "{rejected}; the next session hands the event to sink.on_rejected"
                    ),
                }
            }
            Class::Retry(_) => SinkError::Aborted {
                sink: SINK,
                reason: "transaction",
                detail: format!("topic {topic}: {err}"),
            },
        }
    }

    fn current(&self) -> Arc<OffThread<Producer>> {
        // A poisoned lock only means another task panicked while swapping the Arc;
        // the Arc inside is still a whole producer.
        match self.producer.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn sort(
        &self,
        used: &Arc<OffThread<Producer>>,
        err: KafkaError,
        topic: &str,
        size: usize,
    ) -> SinkError {
        match classify(&err) {
            Class::Retry(reason) => SinkError::Retryable {
                sink: SINK,
                reason,
                detail: format!("topic {topic}: {err}"),
            },
            Class::Reject(reason @ "too_large") => SinkError::Rejected {
                sink: SINK,
                reason,
                detail: format!(
                    "topic {topic}: {err}: a {size}-byte value (plus headers) exceeds the producer's \
                     message.max.bytes or the topic's max.message.bytes"
                ),
            },
            Class::Reject(reason) => SinkError::Rejected {
                sink: SINK,
                reason,
                detail: format!("topic {topic}: {err}"),
            },
            Class::Fatal(hint) => SinkError::Fatal {
                sink: SINK,
                detail: format!("topic {topic}: {err}: {hint}"),
            },
            Class::ResetProducer(why) => {
                let error = used
                    .client()
                    .fatal_error()
                    .map(|(code, text)| format!("{code:?}: {text}"))
                    .unwrap_or_else(|| err.to_string());
                self.reset(used, why, &error);
                SinkError::Retryable {
                    sink: SINK,
                    reason: if why == "fatal" {
                        "producer_fatal"
                    } else {
                        "producer_fenced"
                    },
                    detail: format!("topic {topic}: {error}; the producer was replaced"),
                }
            }
        }
    }

    /// Replaces `broken` unless another task already did: every event in flight on a
    /// broken producer fails, and only the first failure replaces it (one WARN and
    /// one count per replacement, not one per event).
    fn reset(&self, broken: &Arc<OffThread<Producer>>, why: &'static str, error: &str) {
        let mut current = match self.producer.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if !Arc::ptr_eq(&current, broken) {
            return;
        }
        match client::create::<Producer>(&self.settings, &self.kafka) {
            Ok(fresh) => {
                // The old producer goes when its last event in flight lets go of it.
                let old = std::mem::replace(&mut *current, Arc::new(OffThread::new(fresh)));
                drop(current);
                if let Some(m) = &self.replacements {
                    m.with_label_values(&[why]).inc();
                }
                tracing::warn!(reason = why, %error, "kafka producer replaced by a fresh one; events in flight are retried on it and may be written twice");
                drop(old);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot replace the failed kafka producer; trying again on the next failure");
            }
        }
    }
}

/// A librdkafka client whose drop (purging what it still holds, then joining its
/// threads, which takes a while with a hung broker) runs on a blocking thread, never
/// on the relay's one async thread. The process does not wait for it beyond the
/// bound `main` sets: a purged record was never acknowledged, so the slot resends it.
struct OffThread<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> OffThread<T> {
    fn new(client: T) -> Self {
        Self(Some(client))
    }
}

impl<T: Send + 'static> std::ops::Deref for OffThread<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.0
            .as_ref()
            .expect("only Drop takes the client out, and nothing derefs after it")
    }
}

impl<T: Send + 'static> Drop for OffThread<T> {
    fn drop(&mut self) {
        let Some(client) = self.0.take() else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || drop(client))),
            Err(_) => drop(client),
        }
    }
}
