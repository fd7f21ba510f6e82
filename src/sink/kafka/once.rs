//! Exactly once into Kafka, for read_committed consumers: Kafka transactions.
//!
//! - The producer is transactional. Its `transactional.id` is derived from the slot
//!   (`outboxd.<slot>`, or `transactional.id` in `[kafka.properties]`), so a standby
//!   that takes the slot over and calls `init_transactions` fences the old active: a
//!   zombie's next write or commit fails with a fencing error, and it steps down
//!   (the process exits; see `KafkaSink::sort`).
//! - Every event goes into the open transaction. A checkpoint (the relay's barrier,
//!   with nothing in flight) writes one record to the compacted `kafka.checkpoint_topic`
//!   (partition 0, key: the `transactional.id`, value: the position of the last row
//!   read) and commits the transaction: the events and the checkpoint become visible
//!   together, or not at all.
//! - At the start of a session the open transaction, if any, is aborted, and the last
//!   committed checkpoint is read back with `isolation.level = read_committed`; the
//!   relay skips every row at or before it. The events after it were in an aborted
//!   transaction (or never sent), so they are sent again and a read_committed consumer
//!   sees them once.
//! - A large Postgres transaction spans several Kafka transactions (one per
//!   checkpoint), so memory stays bounded. A read_committed consumer then sees such a
//!   Postgres transaction in parts, each part once and in order.
//! - A delivery that fails inside a transaction poisons it (librdkafka requires an
//!   abort): the sink reports [`SinkError::Aborted`] and the relay starts a new session
//!   from the last checkpoint. A record the broker refuses for good is remembered, so
//!   that the next session hands it to the poison-row policy before it is produced.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureRecord, Producer as _};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::client::{self, Context, Producer};
use super::SINK;
use crate::config::KafkaConfig;
use crate::sink::{Checkpoint, SinkError};

/// How long a transaction call (init, commit, abort) may take.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long reading the checkpoint back may take.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How many of the checkpoint topic's last offsets are read first for our record.
const READ_BACK: i64 = 1_000;

/// The checkpoint record's value (JSON): the slot, and the position of the last row
/// whose event is committed (the commit LSN of its Postgres transaction and its index
/// in it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Stored {
    #[serde(default)]
    slot: String,
    commit_lsn: u64,
    index: u64,
}

/// The `transactional.id` of a relay on `slot`: `[kafka.properties]`'s, or
/// `outboxd.<slot>`.
pub fn transactional_id(cfg: &KafkaConfig, slot: &str) -> String {
    cfg.properties
        .get("transactional.id")
        .map(|v| v.expose().to_string())
        .unwrap_or_else(|| format!("outboxd.{slot}"))
}

/// The transactional state of a Kafka sink in exactly-once mode.
pub struct Once {
    /// The `transactional.id`, also the checkpoint record's key.
    id: String,
    /// The slot's name, in the checkpoint record.
    slot: String,
    /// `kafka.checkpoint_topic`.
    topic: String,
    /// Settings of the consumer that reads the checkpoint back.
    reader: ClientConfig,
    kafka: KafkaConfig,
    /// `init_transactions` succeeded (the lock serialises the first registration).
    initialized: tokio::sync::Mutex<bool>,
    /// The same, readable without the lock on the publish path.
    registered: std::sync::atomic::AtomicBool,
    /// A transaction is open (begun, not yet committed or aborted).
    open: Mutex<bool>,
    /// Events the broker refused for good inside a transaction: event id → (reason,
    /// detail), rejected before they are produced the next time.
    refused: Mutex<HashMap<String, (&'static str, String)>>,
}

impl Once {
    /// Makes `settings` transactional and prepares the checkpoint reader.
    pub fn new(settings: &mut ClientConfig, cfg: &KafkaConfig, slot: &str) -> Self {
        let id = transactional_id(cfg, slot);
        settings.set("transactional.id", &id);
        let mut reader = client::producer_config(cfg);
        for producer_only in [
            "transactional.id",
            "enable.idempotence",
            "acks",
            "max.in.flight.requests.per.connection",
            "message.timeout.ms",
            "partitioner",
        ] {
            reader.remove(producer_only);
        }
        reader
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            // The end of the partition is what the reader waits for: a broker that
            // holds an empty fetch for the default 500 ms would add that to every start.
            .set("fetch.wait.max.ms", "10")
            .set("enable.auto.commit", "false")
            .set("group.id", format!("{id}.checkpoint-reader"));
        Self {
            id,
            slot: slot.to_string(),
            topic: cfg.checkpoint_topic.clone(),
            reader,
            kafka: cfg.clone(),
            initialized: tokio::sync::Mutex::new(false),
            registered: std::sync::atomic::AtomicBool::new(false),
            open: Mutex::new(false),
            refused: Mutex::new(HashMap::new()),
        }
    }

    /// The `transactional.id`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Registers the `transactional.id` with the coordinator, once: fences an older
    /// producer with the same id and aborts its open transaction. Called when this
    /// process holds the slot (a session's start, or the initial snapshot's first
    /// event), never at connect: a standby must not fence the active instance.
    pub async fn init(&self, producer: &Producer) -> Result<(), SinkError> {
        // Every publish asks; only the first ones wait for the lock.
        if self.registered.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let mut done = self.initialized.lock().await;
        if *done {
            return Ok(());
        }
        let p = producer.clone();
        blocking(move || p.init_transactions(TXN_TIMEOUT))
            .await
            .map_err(|e| self.failure("init_transactions", e, &self.id))?;
        *done = true;
        self.registered
            .store(true, std::sync::atomic::Ordering::Release);
        tracing::info!(transactional_id = %self.id, checkpoint_topic = %self.topic, "kafka exactly-once: transactional producer registered");
        Ok(())
    }

    /// Creates the compacted checkpoint topic when it is missing (an error is logged:
    /// the first checkpoint then says what is wrong).
    pub async fn ensure_topic(&self, settings: &ClientConfig) {
        let mut admin_settings = settings.clone();
        admin_settings.remove("transactional.id");
        admin_settings.set("enable.idempotence", "false");
        let admin: AdminClient<Context> = match client::create(&admin_settings, &self.kafka) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot create a kafka admin client to create the checkpoint topic");
                return;
            }
        };
        let topic = NewTopic::new(&self.topic, 1, TopicReplication::Fixed(-1))
            .set("cleanup.policy", "compact");
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        match tokio::time::timeout(
            Duration::from_secs(15),
            admin.create_topics([&topic], &opts),
        )
        .await
        {
            Ok(Ok(results)) => match results.into_iter().next() {
                Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) | Some(Ok(_)) | None => {}
                Some(Err((_, code))) => {
                    tracing::warn!(topic = %self.topic, error = %code, "cannot create the checkpoint topic (kafka.checkpoint_topic); create it compacted, with 1 partition")
                }
            },
            Ok(Err(e)) => {
                tracing::warn!(topic = %self.topic, error = %e, "cannot create the checkpoint topic (kafka.checkpoint_topic)")
            }
            Err(_) => {
                tracing::warn!(topic = %self.topic, "creating the checkpoint topic timed out")
            }
        }
        let _ = tokio::task::spawn_blocking(move || drop(admin)).await;
    }

    /// Begins a transaction unless one is open.
    pub fn begin(&self, producer: &Producer) -> Result<(), SinkError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if !*open {
            producer
                .begin_transaction()
                .map_err(|e| self.failure("begin_transaction", e, &self.id))?;
            *open = true;
        }
        Ok(())
    }

    /// Writes the checkpoint record (with `through`) into the open transaction and
    /// commits it; `None` commits what is open without a checkpoint.
    pub async fn commit(
        &self,
        producer: &Producer,
        through: Option<Checkpoint>,
    ) -> Result<(), SinkError> {
        if let Some(at) = through {
            self.begin(producer)?;
            let value = serde_json::to_vec(&Stored {
                slot: self.slot.clone(),
                commit_lsn: at.commit_lsn,
                index: at.index,
            })
            .expect("a string and integers serialize");
            let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&self.topic)
                .partition(0)
                .key(self.id.as_str())
                .payload(&value);
            // Awaited before the commit: commit_transaction would flush it too, but
            // measured slower (make bench: 38k against 68k events/s in a drain).
            let delivered = match producer.send_result(record) {
                Ok(report) => match report.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(e),
                    Err(_) => Err(KafkaError::Canceled),
                },
                Err((e, _)) => Err(e),
            };
            if let Err(e) = delivered {
                return Err(self
                    .stopped(producer)
                    .unwrap_or_else(|| self.failure("checkpoint record", e, &self.topic)));
            }
        }
        if !*self.open.lock().unwrap_or_else(|p| p.into_inner()) {
            return Ok(());
        }
        let p = producer.clone();
        let committed = blocking(move || p.commit_transaction(TXN_TIMEOUT)).await;
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = false;
        committed.map_err(|e| {
            self.stopped(producer)
                .unwrap_or_else(|| self.failure("commit_transaction", e, &self.id))
        })
    }

    /// The producer hit librdkafka's fatal error (fenced by a newer instance of the
    /// same `transactional.id`, most often): this instance must step down.
    pub fn stopped(&self, producer: &Producer) -> Option<SinkError> {
        let (code, text) = producer.client().fatal_error()?;
        Some(SinkError::Fatal {
            sink: SINK,
            detail: format!(
                "the transactional producer {} stopped for good ({code:?}: {text}): another outboxd \
                 took over the slot and its transactional.id, so this instance steps down",
                self.id
            ),
        })
    }

    /// Aborts the open transaction, if any (a failure is logged: the coordinator
    /// aborts it anyway when the transaction times out or the next producer of this
    /// id starts).
    pub async fn abort(&self, producer: &Producer) {
        let was_open = std::mem::replace(
            &mut *self.open.lock().unwrap_or_else(|p| p.into_inner()),
            false,
        );
        if was_open {
            let p = producer.clone();
            if let Err(e) = blocking(move || p.abort_transaction(TXN_TIMEOUT)).await {
                tracing::warn!(error = %e, "cannot abort the kafka transaction; it is aborted when it times out or the next producer starts");
            }
        }
    }

    /// The last committed checkpoint of this `transactional.id`.
    pub async fn read(&self) -> Result<Option<Checkpoint>, SinkError> {
        let reader: BaseConsumer<Context> = client::create(&self.reader, &self.kafka)?;
        let (topic, key) = (self.topic.clone(), self.id.clone());
        let found = tokio::task::spawn_blocking(move || read_last(&reader, &topic, &key))
            .await
            .map_err(|e| lost("checkpoint", format!("reading task failed: {e}")))?;
        found.map_err(|e| {
            lost(
                "checkpoint",
                format!("cannot read the checkpoint from {}: {e}", self.topic),
            )
        })
    }

    /// Remembers that the broker refused `event_id` for good.
    pub fn refused(&self, event_id: &str, reason: &'static str, detail: &str) {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(event_id.to_string(), (reason, detail.to_string()));
    }

    /// The broker refused `event_id` before: its rejection, without producing it.
    pub fn refused_before(&self, event_id: &str) -> Option<SinkError> {
        let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        refused
            .get(event_id)
            .map(|(reason, detail)| SinkError::Rejected {
                sink: SINK,
                reason,
                detail: detail.clone(),
            })
    }

    /// What a failed transaction call means: fenced (another instance took over the
    /// id: step down) or fatal stops; anything else loses the transaction.
    fn failure(&self, what: &str, e: KafkaError, on: &str) -> SinkError {
        let code = e.rdkafka_error_code();
        let fenced = matches!(
            code,
            Some(
                RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::Fenced
            )
        );
        let fatal = matches!(&e, KafkaError::Transaction(t) if t.is_fatal());
        if fenced || (fatal && code == Some(RDKafkaErrorCode::Fatal)) {
            return SinkError::Fatal {
                sink: SINK,
                detail: format!(
                    "{what} on {on}: {e}: another outboxd took over transactional.id {} (the slot's \
                     standby): this instance steps down",
                    self.id
                ),
            };
        }
        if fatal {
            return SinkError::Fatal {
                sink: SINK,
                detail: format!(
                    "{what} on {on}: {e}: the transactional producer cannot go on; restart"
                ),
            };
        }
        SinkError::Aborted {
            sink: SINK,
            reason: "transaction",
            detail: format!("{what} on {on}: {e}"),
        }
    }
}

/// The last record with `key` in partition 0 of `topic`, read committed: first the
/// last [`READ_BACK`] offsets, then, if it is not among them, all of it.
fn read_last(
    reader: &BaseConsumer<Context>,
    topic: &str,
    key: &str,
) -> Result<Option<Checkpoint>, KafkaError> {
    let (low, high) = match reader.fetch_watermarks(topic, 0, READ_TIMEOUT) {
        Ok(w) => w,
        // No topic yet: no checkpoint yet.
        Err(e)
            if matches!(
                e.rdkafka_error_code(),
                Some(
                    RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownPartition
                )
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    if high <= low {
        return Ok(None);
    }
    let mut from = (high - READ_BACK).max(low);
    loop {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Offset(from))?;
        reader.assign(&tpl)?;
        let deadline = Instant::now() + READ_TIMEOUT;
        let mut last = None;
        loop {
            if Instant::now() >= deadline {
                return Err(KafkaError::MessageConsumption(
                    RDKafkaErrorCode::RequestTimedOut,
                ));
            }
            match reader.poll(Duration::from_millis(100)) {
                None => continue,
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => return Err(e),
                Some(Ok(m)) => {
                    if m.key() == Some(key.as_bytes()) {
                        if let Some(stored) = m
                            .payload()
                            .and_then(|p| serde_json::from_slice::<Stored>(p).ok())
                        {
                            last = Some(Checkpoint {
                                commit_lsn: stored.commit_lsn,
                                index: stored.index,
                            });
                        }
                    }
                }
            }
        }
        if last.is_some() || from == low {
            return Ok(last);
        }
        from = low;
    }
}

/// Runs a blocking librdkafka call off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, KafkaError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(KafkaError::Canceled))
}

/// The checkpoint could not be read: the session is retried.
fn lost(reason: &'static str, detail: String) -> SinkError {
    SinkError::Aborted {
        sink: SINK,
        reason,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transactional_id_is_the_slots_unless_the_properties_set_one() {
        let mut cfg = KafkaConfig::default();
        assert_eq!(transactional_id(&cfg, "orders"), "outboxd.orders");
        cfg.properties.insert(
            "transactional.id".into(),
            crate::config::Secret::new("orders-eu"),
        );
        assert_eq!(transactional_id(&cfg, "orders"), "orders-eu");
    }

    #[test]
    fn the_checkpoint_record_names_the_slot_and_the_position() {
        let stored = Stored {
            slot: "orders".into(),
            commit_lsn: 0x16B_14A0,
            index: 6,
        };
        let json = serde_json::to_string(&stored).expect("json");
        assert_eq!(json, r#"{"slot":"orders","commit_lsn":23794848,"index":6}"#);
        assert_eq!(serde_json::from_str::<Stored>(&json).expect("back"), stored);
    }

    #[test]
    fn the_producer_gets_the_id_and_the_reader_reads_committed_without_it() {
        let cfg = KafkaConfig::default();
        let mut settings = client::producer_config(&cfg);
        let once = Once::new(&mut settings, &cfg, "orders");
        assert_eq!(settings.get("transactional.id"), Some("outboxd.orders"));
        assert_eq!(once.reader.get("isolation.level"), Some("read_committed"));
        assert_eq!(once.reader.get("transactional.id"), None);
        assert_eq!(once.reader.get("enable.idempotence"), None);
    }
}
