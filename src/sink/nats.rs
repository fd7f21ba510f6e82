//! NATS JetStream sink: CloudEvents NATS protocol binding, deduplicated by
//! `Nats-Msg-Id`, delivered when the PubAck arrives.
//!
//! Binary content mode (default): every attribute becomes a `ce-<name>` header,
//! `datacontenttype` becomes `content-type`, the data is the body. Structured mode:
//! the JSON event format as the body with `content-type:
//! application/cloudevents+json`. Header values are percent-encoded by the HTTP
//! binding's rule so a row value can never break the header block.
//!
//! A PubAck with `duplicate: true` counts as delivered: JetStream already stored the
//! same event id within the stream's duplicate window.

use std::borrow::Cow;
use std::error::Error as _;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use cloudevents::event::Data;
use cloudevents::AttributesReader;

use super::{Delivered, Envelope, SinkError};
use crate::config::{ContentMode, NatsConfig};
use crate::route::{Sanitize, Template};

const SINK: &str = "nats";

/// Publishes to JetStream.
pub struct NatsSink {
    js: jetstream::Context,
    subject: Template,
    dead_letter_subject: String,
    mode: ContentMode,
}

impl NatsSink {
    /// Connects, then finds (or creates) the stream.
    pub async fn connect(cfg: &NatsConfig) -> Result<Self, SinkError> {
        let client = async_nats::ConnectOptions::new()
            .name("outboxd")
            .connection_timeout(Duration::from_secs(5))
            .connect(cfg.url.expose())
            .await
            .map_err(|e| SinkError::Retryable {
                sink: SINK,
                reason: "connect",
                // async-nats errors name the kind, not the URL.
                detail: format!("cannot connect to NATS: {e}"),
            })?;
        let mut js = jetstream::new(client);
        js.set_timeout(Duration::from_millis(cfg.ack_timeout_ms));
        ensure_stream(&js, cfg).await?;
        let subject = Template::parse(&cfg.subject).map_err(|e| SinkError::Fatal {
            sink: SINK,
            detail: format!("nats.subject: {e}"),
        })?;
        Ok(Self {
            js,
            subject,
            dead_letter_subject: cfg.dead_letter_subject.clone(),
            mode: cfg.content_mode,
        })
    }

    /// Publishes and awaits the PubAck.
    pub async fn publish(&self, env: &Envelope) -> Result<Delivered, SinkError> {
        let subject = if env.dead_letter {
            self.dead_letter_subject.clone()
        } else {
            self.subject.render(&env.fields(), Sanitize::NatsToken)
        };
        let (headers, body) = encode(&env.event, self.mode)?;
        let ack_future = self
            .js
            .publish_with_headers(subject.clone(), headers, body)
            .await
            .map_err(classify)?;
        let ack = ack_future.await.map_err(classify)?;
        Ok(Delivered {
            duplicate: ack.duplicate,
            destination: subject,
        })
    }
}

async fn ensure_stream(js: &jetstream::Context, cfg: &NatsConfig) -> Result<(), SinkError> {
    if cfg.create_stream {
        let config = stream::Config {
            name: cfg.stream.clone(),
            subjects: cfg.stream_subjects.clone(),
            ..Default::default()
        };
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

/// Sorts a publish error: unknown means transient (never dead-letter what a retry
/// might deliver); only errors that no retry can cure are `Rejected`.
fn classify(e: async_nats::jetstream::context::PublishError) -> SinkError {
    let retry = |reason, e: &dyn std::fmt::Display| SinkError::Retryable {
        sink: SINK,
        reason,
        detail: e.to_string(),
    };
    match e.kind() {
        PublishErrorKind::TimedOut => retry("timeout", &e),
        PublishErrorKind::BrokenPipe => retry("disconnected", &e),
        PublishErrorKind::StreamNotFound => retry("no_stream", &format!(
            "{e}: no JetStream stream captures the subject (is JetStream up, and do nats.stream_subjects cover nats.subject?)"
        )),
        _ => {
            let source = e.source();
            if let Some(core) = source.and_then(|s| s.downcast_ref::<async_nats::PublishError>()) {
                if core.kind() == async_nats::client::PublishErrorKind::MaxPayloadExceeded {
                    return SinkError::Rejected {
                        sink: SINK,
                        reason: "too_large",
                        detail: format!("{core} (the server's max_payload)"),
                    };
                }
            }
            match source.and_then(|s| s.downcast_ref::<jetstream::Error>()) {
                Some(j) if j.error_code() == jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM => {
                    SinkError::Rejected { sink: SINK, reason: "too_large", detail: j.to_string() }
                }
                Some(j) => retry("broker_error", j),
                None => retry("publish", &e),
            }
        }
    }
}

/// Binary or structured encoding of one event.
pub fn encode(
    event: &cloudevents::Event,
    mode: ContentMode,
) -> Result<(HeaderMap, Bytes), SinkError> {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", event.id());
    let encode_err = |e: serde_json::Error| SinkError::Rejected {
        sink: SINK,
        reason: "encode",
        detail: e.to_string(),
    };
    match mode {
        ContentMode::Structured => {
            h.insert("content-type", "application/cloudevents+json");
            let body = serde_json::to_vec(event).map_err(encode_err)?;
            Ok((h, Bytes::from(body)))
        }
        ContentMode::Binary => {
            for (name, value) in event.iter_attributes() {
                if name == "datacontenttype" {
                    h.insert("content-type", header_value(&value.to_string()).as_ref());
                } else {
                    h.insert(
                        format!("ce-{name}").as_str(),
                        header_value(&value.to_string()).as_ref(),
                    );
                }
            }
            for (name, value) in event.iter_extensions() {
                h.insert(
                    format!("ce-{name}").as_str(),
                    header_value(&value.to_string()).as_ref(),
                );
            }
            let body = match event.data() {
                None => Bytes::new(),
                Some(Data::Json(v)) => Bytes::from(serde_json::to_vec(v).map_err(encode_err)?),
                Some(Data::String(s)) => Bytes::copy_from_slice(s.as_bytes()),
                Some(Data::Binary(b)) => Bytes::copy_from_slice(b),
            };
            Ok((h, body))
        }
    }
}

/// Percent-encodes what may not stand in a header value (HTTP binding rule: space,
/// `"`, `%` and everything outside printable ASCII).
pub fn header_value(v: &str) -> Cow<'_, str> {
    let clean = v
        .bytes()
        .all(|b| (0x21..=0x7E).contains(&b) && b != b'"' && b != b'%');
    if clean {
        return Cow::Borrowed(v);
    }
    let mut out = String::with_capacity(v.len() + 8);
    for b in v.bytes() {
        if (0x21..=0x7E).contains(&b) && b != b'"' && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudevents::{EventBuilder, EventBuilderV10};

    fn event() -> cloudevents::Event {
        EventBuilderV10::new()
            .id("e-1")
            .source("/s")
            .ty("T")
            .subject("line\r\nInjected: yes")
            .extension("partitionkey", "k")
            .data("application/json", serde_json::json!({"a": 1}))
            .build()
            .expect("valid")
    }

    #[test]
    fn binary_mode_maps_attributes_to_headers() {
        let (h, body) = encode(&event(), ContentMode::Binary).expect("encodes");
        assert_eq!(h.get("Nats-Msg-Id").map(|v| v.as_str()), Some("e-1"));
        assert_eq!(h.get("ce-id").map(|v| v.as_str()), Some("e-1"));
        assert_eq!(h.get("ce-specversion").map(|v| v.as_str()), Some("1.0"));
        assert_eq!(
            h.get("content-type").map(|v| v.as_str()),
            Some("application/json")
        );
        assert_eq!(h.get("ce-partitionkey").map(|v| v.as_str()), Some("k"));
        assert_eq!(
            h.get("ce-subject").map(|v| v.as_str()),
            Some("line%0D%0AInjected:%20yes")
        );
        assert_eq!(&body[..], br#"{"a":1}"#);
    }

    #[test]
    fn structured_mode_is_the_json_format() {
        let (h, body) = encode(&event(), ContentMode::Structured).expect("encodes");
        assert_eq!(
            h.get("content-type").map(|v| v.as_str()),
            Some("application/cloudevents+json")
        );
        let back: cloudevents::Event = serde_json::from_slice(&body).expect("json format");
        assert_eq!(back, event());
    }

    #[test]
    fn header_values_are_percent_encoded() {
        assert_eq!(header_value("plain-value_1"), "plain-value_1");
        assert_eq!(header_value("a b\"%é"), "a%20b%22%25%C3%A9");
    }
}
