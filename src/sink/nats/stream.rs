//! The JetStream stream the sink publishes into: the one outboxd creates (with the
//! `nats.stream_*` limits), finding an existing one, and what `outboxd check` says of
//! an existing stream's duplicate window and limits.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use super::SINK;
use crate::config::{NatsConfig, StreamStorage};
use crate::sink::SinkError;

/// The stream outboxd creates: `nats.stream`, its subjects and the `nats.stream_*`
/// limits.
pub fn stream_config(cfg: &NatsConfig) -> stream::Config {
    stream::Config {
        name: cfg.stream.clone(),
        subjects: cfg.stream_subjects.clone(),
        max_age: Duration::from_secs(cfg.stream_max_age_secs),
        max_bytes: cfg.stream_max_bytes,
        duplicate_window: Duration::from_secs(cfg.stream_duplicate_window_secs),
        num_replicas: cfg.stream_replicas,
        storage: match cfg.stream_storage {
            StreamStorage::File => stream::StorageType::File,
            StreamStorage::Memory => stream::StorageType::Memory,
        },
        ..Default::default()
    }
}

/// What `outboxd check` says of an existing stream: `Err` for a warning. A duplicate
/// window shorter than a graceful stop plus a restart lets re-sent events in as new
/// messages; a stream without any limit grows until the server's disk is full.
pub fn review_stream(info: &stream::Config, shutdown_timeout_secs: u64) -> Result<String, String> {
    // A restart after the drain: the pod's start-up, connecting, the slot.
    const RESTART: Duration = Duration::from_secs(60);
    let needed = Duration::from_secs(shutdown_timeout_secs) + RESTART;
    let mut problems = Vec::new();
    if info.duplicate_window < needed {
        problems.push(format!(
            "duplicate window {}s is shorter than sink.shutdown_timeout_secs plus a restart \
             ({}s): events re-sent after a restart may be stored twice; raise the stream's \
             duplicate_window (nats.stream_duplicate_window_secs when outboxd creates it)",
            info.duplicate_window.as_secs(),
            needed.as_secs()
        ));
    }
    if info.max_age.is_zero() && info.max_bytes <= 0 && info.max_messages <= 0 {
        problems.push(
            "no limits (max_age, max_bytes, max_msgs): it grows until the server's storage \
             is full; set one (nats.stream_max_age_secs / nats.stream_max_bytes when outboxd \
             creates it)"
                .to_string(),
        );
    }
    if problems.is_empty() {
        Ok(format!(
            "{}: duplicate window {}s, limits set",
            info.name,
            info.duplicate_window.as_secs()
        ))
    } else {
        Err(format!("{}: {}", info.name, problems.join("; ")))
    }
}

pub(super) async fn ensure_stream(
    js: &jetstream::Context,
    cfg: &NatsConfig,
) -> Result<(), SinkError> {
    if cfg.create_stream {
        let config = stream_config(cfg);
        js.get_or_create_stream(config)
            .await
            .map_err(|e| SinkError::Retryable {
                sink: SINK,
                reason: "stream",
                detail: format!("cannot get or create stream {}: {e}", cfg.stream),
            })?;
        return Ok(());
    }
    match js.get_stream(&cfg.stream).await {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(_)
            ) =>
        {
            Err(SinkError::Fatal {
                sink: SINK,
                detail: format!(
                    "stream {} does not exist: create it, or set nats.create_stream = true ({e})",
                    cfg.stream
                ),
            })
        }
        Err(e) => Err(SinkError::Retryable {
            sink: SINK,
            reason: "stream",
            detail: format!("cannot look up stream {}: {e}", cfg.stream),
        }),
    }
}

impl super::NatsSink {
    /// The configuration of the stream this sink publishes into, as the server has it.
    pub async fn stream_settings(&self) -> Result<stream::Config, String> {
        let mut s = self
            .js
            .get_stream(&self.stream.stream)
            .await
            .map_err(|e| format!("stream {}: {e}", self.stream.stream))?;
        s.info()
            .await
            .map(|i| i.config.clone())
            .map_err(|e| format!("stream {}: {e}", self.stream.stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_created_stream_carries_the_limits_and_the_review_warns() {
        let mut cfg = NatsConfig::default();
        let c = stream_config(&cfg);
        assert_eq!(c.duplicate_window, Duration::from_secs(120));
        assert_eq!((c.max_bytes, c.max_age), (-1, Duration::ZERO));
        // The defaults are JetStream's: no limits, which the review warns about
        let review = review_stream(&c, 20).expect_err("no limits");
        assert!(review.contains("no limits"), "{review}");
        assert!(!review.contains("duplicate window"), "{review}");
        cfg.stream_max_age_secs = 86_400;
        cfg.stream_duplicate_window_secs = 30;
        cfg.stream_storage = StreamStorage::Memory;
        let c = stream_config(&cfg);
        assert_eq!(c.storage, stream::StorageType::Memory);
        let review = review_stream(&c, 20).expect_err("short window");
        assert!(
            review.contains("duplicate window 30s") && review.contains("(80s)"),
            "{review}"
        );
        cfg.stream_duplicate_window_secs = 600;
        assert!(review_stream(&stream_config(&cfg), 20).is_ok());
    }
}
