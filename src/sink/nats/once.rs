//! Exactly once into the stream, beyond JetStream's duplicate window.
//!
//! JetStream drops a repeated `Nats-Msg-Id` only within the stream's duplicate window
//! (2 minutes by default): a relay down longer re-sends its unconfirmed events as new
//! messages. Here the relay's checkpoint (the last row whose event, and every earlier
//! one, is stored) goes into a checkpoint stream together with the stream's sequence at that
//! moment: the highest sequence a PubAck named. Every event after the checkpoint is
//! published after it was written, so it is stored, if at all, at a higher sequence.
//! At start the stream is read after that sequence (headers only) and the ids found
//! are handed to the relay, which does not send them again. What is read is bounded
//! by what was published between two checkpoints (`sink.checkpoint_max_events`), not
//! by how long the relay was down.
//!
//! One subtlety: the events found that way were stored by an earlier process, below
//! the sequence this one's PubAcks name. Until this process has read past the last
//! of them (their position is in `ce-sequence`), a checkpoint it writes keeps the
//! sequence it resumed from, or the next start would not read those events and would
//! send them again.
//!
//! Why not the atomic batch publish of nats-server 2.12: it needs 2.12 on the server
//! and a stream that allows it, and a batch is bounded in size, so a large Postgres
//! transaction would still span batches. The checkpoint works on every supported
//! server and with any stream.
//!
//! Limits, stated in docs/exactly-once.md: dead letters on a subject outside the
//! stream are at least once; event ids must be unique within the stream (as JetStream
//! deduplication already requires); without any checkpoint (the first start in this
//! mode) the last [`FIRST_SCAN`] messages are read instead.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;

use super::encode::decode_header_value;
use super::SINK;
use crate::config::{NatsConfig, StreamStorage};
use crate::sink::{Checkpoint, Resume, SinkError};

/// Without a checkpoint, how many of the stream's last messages are read for ids.
pub const FIRST_SCAN: u64 = 10_000;

/// How long reading the stream back may stall before it is given up (and retried).
const SCAN_STALL: Duration = Duration::from_secs(10);

/// Subjects of the checkpoint stream: `outboxd.checkpoint.<slot>`.
const SUBJECT_PREFIX: &str = "outboxd.checkpoint";

/// The checkpoint as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Stored {
    commit_lsn: u64,
    index: u64,
    /// The stream's highest acknowledged sequence when the checkpoint was written.
    sequence: u64,
}

/// The exactly-once state of a NATS sink.
pub struct Once {
    /// The checkpoint stream's settings (its name among them).
    checkpoints: stream::Config,
    /// The checkpoint's subject: one per slot.
    subject: String,
    /// The stream's name.
    stream: String,
    /// The highest stream sequence a PubAck of this stream named (or the stream's last
    /// sequence when the session resumed).
    sequence: AtomicU64,
    /// `cloudevents.source`: which messages of the stream are this relay's.
    source: String,
    /// After a resume that found events: the last of their positions, and the sequence
    /// the resume read from (see the module docs).
    floor: std::sync::Mutex<Option<(Checkpoint, u64)>>,
    /// Binary content mode: the ids and positions are in the headers.
    binary: bool,
}

impl Once {
    /// Finds or creates the stream `nats.checkpoint_stream` (a plain stream that keeps
    /// the last message per subject, so it works on every supported server).
    pub async fn open(
        js: &jetstream::Context,
        cfg: &NatsConfig,
        slot: &str,
        source: &str,
    ) -> Result<Self, SinkError> {
        let name = &cfg.checkpoint_stream;
        let config = stream::Config {
            name: name.clone(),
            description: Some("outboxd exactly-once checkpoints, one subject per slot".into()),
            subjects: vec![format!("{SUBJECT_PREFIX}.>")],
            max_messages_per_subject: 1,
            num_replicas: cfg.stream_replicas,
            storage: match cfg.stream_storage {
                StreamStorage::File => stream::StorageType::File,
                StreamStorage::Memory => stream::StorageType::Memory,
            },
            ..Default::default()
        };
        let once = Self {
            checkpoints: config,
            subject: format!("{SUBJECT_PREFIX}.{slot}"),
            stream: cfg.stream.clone(),
            sequence: AtomicU64::new(0),
            source: source.to_string(),
            floor: std::sync::Mutex::new(None),
            binary: cfg.content_mode == crate::config::ContentMode::Binary,
        };
        once.checkpoint_stream(js).await?;
        Ok(once)
    }

    /// Finds the checkpoint stream, or creates it (again: a deleted one only costs the
    /// checkpoint, and the next start reads the stream's last [`FIRST_SCAN`] messages).
    async fn checkpoint_stream(
        &self,
        js: &jetstream::Context,
    ) -> Result<stream::Stream, SinkError> {
        js.get_or_create_stream(self.checkpoints.clone())
            .await
            .map_err(|e| SinkError::Retryable {
                sink: SINK,
                reason: "checkpoint",
                detail: format!(
                    "cannot find or create the checkpoint stream {} (nats.checkpoint_stream): {e}",
                    self.checkpoints.name
                ),
            })
    }

    /// A PubAck arrived: its sequence, if it is of this stream.
    pub fn acked(&self, stream: &str, sequence: u64) {
        if stream == self.stream {
            self.sequence.fetch_max(sequence, Ordering::Relaxed);
        }
    }

    /// Stores the checkpoint with the highest sequence acknowledged so far, and waits
    /// for its PubAck.
    pub async fn write(
        &self,
        js: &jetstream::Context,
        through: Checkpoint,
    ) -> Result<(), SinkError> {
        let sequence = {
            let mut floor = self.floor.lock().unwrap_or_else(|p| p.into_inner());
            match *floor {
                Some((last_found, resumed_from)) if through < last_found => resumed_from,
                _ => {
                    *floor = None;
                    self.sequence.load(Ordering::Relaxed)
                }
            }
        };
        let stored = Stored {
            commit_lsn: through.commit_lsn,
            index: through.index,
            sequence,
        };
        let value = serde_json::to_vec(&stored).expect("a struct of integers serializes");
        let failed = |e: &dyn std::fmt::Display| SinkError::Retryable {
            sink: SINK,
            reason: "checkpoint",
            detail: format!("cannot store the checkpoint on {}: {e}", self.subject),
        };
        js.publish(self.subject.clone(), value.into())
            .await
            .map_err(|e| failed(&e))?
            .await
            .map(drop)
            .map_err(|e| failed(&e))
    }

    /// Reads the checkpoint and the ids the stream stored after it.
    pub async fn resume(&self, js: &jetstream::Context) -> Result<Resume, SinkError> {
        let failed = |what: &str, e: &dyn std::fmt::Display| SinkError::Retryable {
            sink: SINK,
            reason: "checkpoint",
            detail: format!("cannot {what}: {e}"),
        };
        let checkpoints = self.checkpoint_stream(js).await?;
        let stored: Option<Stored> = match checkpoints
            .get_last_raw_message_by_subject(&self.subject)
            .await
        {
            Ok(m) => Some(serde_json::from_slice(&m.payload).map_err(|e| SinkError::Fatal {
                sink: SINK,
                detail: format!(
                    "the checkpoint on {} in stream {} is not outboxd's ({e}); purge that subject to start over",
                    self.subject, self.checkpoints.name
                ),
            })?),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => None,
            Err(e) => return Err(failed("read the checkpoint", &e)),
        };
        let mut stream = js
            .get_stream(&self.stream)
            .await
            .map_err(|e| failed("look up the stream", &e))?;
        let state = stream
            .info()
            .await
            .map_err(|e| failed("read the stream's state", &e))?
            .state
            .clone();
        let last = state.last_sequence;
        let from = match stored {
            Some(s) => s.sequence + 1,
            None => last.saturating_sub(FIRST_SCAN) + 1,
        }
        .max(state.first_sequence);
        let found = if state.messages == 0 || from > last {
            Found::default()
        } else {
            self.scan(&stream, from, last)
                .await
                .map_err(|e| failed("read the stream after the checkpoint", &e))?
        };
        // Everything published from now on is stored after `last`; but until this
        // process reads past what it found, its checkpoints keep `from`.
        self.sequence.fetch_max(last, Ordering::Relaxed);
        *self.floor.lock().unwrap_or_else(|p| p.into_inner()) =
            found.last.map(|at| (at, from.saturating_sub(1)));
        let ids = found.ids;
        tracing::info!(
            stream = %self.stream,
            checkpoint_sequence = stored.map(|s| s.sequence),
            read_from = from,
            read_to = last,
            ids = ids.len(),
            last_found = ?found.last,
            "exactly-once: read the stream after the checkpoint"
        );
        Ok(Resume {
            through: stored.map(|s| Checkpoint {
                commit_lsn: s.commit_lsn,
                index: s.index,
            }),
            ids,
        })
    }
}

/// What reading the stream after the checkpoint found.
#[derive(Debug, Default)]
struct Found {
    /// The `Nats-Msg-Id`s, decoded.
    ids: HashSet<String>,
    /// The highest position (`ce-sequence`) among this relay's messages (its source).
    last: Option<Checkpoint>,
}

/// The position a `ce-sequence` value names (16 + 8 hex digits, see
/// [`crate::event::Position::sequence`]).
fn parse_sequence(text: &str) -> Option<Checkpoint> {
    if text.len() != 24 || !text.is_ascii() {
        return None;
    }
    Some(Checkpoint {
        commit_lsn: u64::from_str_radix(&text[..16], 16).ok()?,
        index: u64::from_str_radix(&text[16..], 16).ok()?,
    })
}

impl Once {
    /// The ids of the stream's messages `from..=to`, and the last position among this
    /// relay's; headers only in binary mode, whole messages in structured mode.
    async fn scan(
        &self,
        stream: &jetstream::stream::Stream,
        from: u64,
        to: u64,
    ) -> Result<Found, String> {
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                headers_only: self.binary,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        let mut found = Found::default();
        loop {
            let next = tokio::time::timeout(SCAN_STALL, messages.next())
                .await
                .map_err(|_| format!("no message within {SCAN_STALL:?}"))?;
            let message = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("the consumer ended".into()),
            };
            let info = message.info().map_err(|e| e.to_string())?;
            let (sequence, pending) = (info.stream_sequence, info.pending);
            let header = |name: &str| {
                message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .and_then(|v| decode_header_value(v.as_str()))
            };
            if let Some(id) = message
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                .and_then(|v| decode_header_value(v.as_str()))
            {
                found.ids.insert(id);
            }
            let (source, position) = if self.binary {
                (header("ce-source"), header("ce-sequence"))
            } else {
                let event: serde_json::Value =
                    serde_json::from_slice(&message.payload).unwrap_or_default();
                let text = |k: &str| event.get(k).and_then(|v| v.as_str()).map(str::to_string);
                (text("source"), text("sequence"))
            };
            if source.as_deref() == Some(self.source.as_str()) {
                if let Some(at) = position.as_deref().and_then(parse_sequence) {
                    found.last = found.last.max(Some(at));
                }
            }
            if sequence >= to || pending == 0 {
                return Ok(found);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ce_sequence_names_its_position() {
        assert_eq!(
            parse_sequence("00000000018716880000000A"),
            Some(Checkpoint {
                commit_lsn: 0x1871688,
                index: 10
            })
        );
        assert_eq!(parse_sequence("123"), None);
        assert_eq!(parse_sequence("zz000000018716880000000A"), None);
    }
}
