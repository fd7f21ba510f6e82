//! Outbox row -> CloudEvents 1.0 event. Pure: no I/O, no clock, no configuration
//! lookups beyond what it is handed.
//!
//! Mapping (see README, "CloudEvents mapping"):
//! - `id` = row id (stable across redeliveries: the dedup key);
//! - `source` = `[cloudevents] source`; `type` = `type_prefix` + event type;
//! - `subject` = aggregate id; `time` = `created_at`, else the commit time;
//! - `datacontenttype` = the row's content type column, else the configured default;
//!   a JSON content type requires a payload that parses as JSON (else: poison row);
//!   the data is the payload's bytes as written, also for JSON; a NULL payload (which
//!   the source lets through only for `kafka.tombstone_on_empty_payload`) gives an event
//!   without data and without `datacontenttype`;
//! - extensions: `correlationid` (row value, else the event's own id: a new flow),
//!   `causationid` (row value, else the event's own id), `partitionkey` = aggregate id,
//!   `sequence` = commit LSN and position in the transaction as fixed-width hex, so it
//!   sorts in commit order; plus the string/number/bool members of the `headers`
//!   object whose names are valid CloudEvents attribute names (`traceparent`, …).

pub mod deadletter;
mod envelope;

pub use envelope::{envelope, structured_json, table_envelope, Envelope, Structured};

use chrono::{DateTime, Utc};
use cloudevents::event::{Data, ExtensionValue};
use cloudevents::{Event, EventBuilder, EventBuilderV10};

use crate::config::CloudEventsConfig;
pub use crate::source::outbox::is_json;
use crate::source::outbox::{OutboxRow, PayloadKind};

/// Attribute names a `headers` member may not replace.
const RESERVED: &[&str] = &[
    "id",
    "source",
    "specversion",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
    "data",
    "data_base64",
    "correlationid",
    "causationid",
    "partitionkey",
    "sequence",
];

/// Why a row cannot become an event: always a poison row.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum EventError {
    /// The content type says JSON, the payload is not.
    #[error("outbox row {id}: payload is not valid JSON but datacontenttype is {content_type}")]
    PayloadNotJson {
        /// Row id.
        id: String,
        /// The declared content type.
        content_type: String,
    },
    /// `headers` is not a JSON object.
    #[error("outbox row {id}: headers is not a JSON object")]
    BadHeaders {
        /// Row id.
        id: String,
    },
    /// The SDK refused the event (e.g. an invalid `source`).
    #[error("outbox row {id}: not a valid CloudEvent: {reason}")]
    Build {
        /// Row id.
        id: String,
        /// The SDK's reason.
        reason: String,
    },
}

impl EventError {
    /// Low-cardinality reason for metrics and dead-letter headers.
    pub fn reason_code(&self) -> &'static str {
        match self {
            EventError::PayloadNotJson { .. } => "payload_not_json",
            EventError::BadHeaders { .. } => "bad_headers",
            EventError::Build { .. } => "invalid_event",
        }
    }
}

/// Where a row sits in the replication stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// LSN of the commit record of the row's transaction.
    pub commit_lsn: u64,
    /// Commit time of the transaction.
    pub commit_time: DateTime<Utc>,
    /// 0-based index of the row within its transaction.
    pub index: u32,
}

impl Position {
    /// The `sequence` extension: 16 + 8 uppercase hex digits, lexically ordered as the
    /// stream is.
    pub fn sequence(&self) -> String {
        format!("{:016X}{:08X}", self.commit_lsn, self.index)
    }
}

/// Builds the CloudEvent for `row`.
pub fn to_cloudevent(
    row: &OutboxRow,
    pos: &Position,
    cfg: &CloudEventsConfig,
) -> Result<Event, EventError> {
    let ty = if cfg.type_prefix.is_empty() {
        row.event_type.clone()
    } else {
        format!("{}{}", cfg.type_prefix, row.event_type)
    };
    let mut b = EventBuilderV10::new()
        .id(row.id.as_str())
        .source(cfg.source.as_str())
        .ty(ty)
        .subject(row.aggregate_id.as_str())
        .time(row.created_at.unwrap_or(pos.commit_time))
        .extension(
            "correlationid",
            row.correlation_id.as_deref().unwrap_or(&row.id),
        )
        .extension(
            "causationid",
            row.causation_id.as_deref().unwrap_or(&row.id),
        )
        .extension("partitionkey", row.aggregate_id.as_str())
        .extension("sequence", pos.sequence());
    // A NULL payload (let through only where configured) is an event without data:
    // the Kafka binding's tombstone.
    if let Some(payload) = &row.payload {
        let (content_type, data) = data_of(row, payload, cfg)?;
        b = b.data(content_type, data);
    }
    if let Some(h) = &row.headers {
        for (name, value) in header_extensions(&row.id, h)? {
            b = b.extension(&name, value);
        }
    }
    b.build().map_err(|e| EventError::Build {
        id: row.id.clone(),
        reason: e.to_string(),
    })
}

/// The content type and data of `row`'s event, whose payload is `payload`.
fn data_of(
    row: &OutboxRow,
    payload: &[u8],
    cfg: &CloudEventsConfig,
) -> Result<(String, Data), EventError> {
    let content_type = row
        .content_type
        .as_deref()
        .unwrap_or(&cfg.default_content_type);
    let data: Data = if is_json(content_type) {
        // Checked, not parsed into a tree: the event carries the row's bytes as they
        // are (binary mode sends them unchanged; structured mode embeds them, see
        // `sink::Structured`), which spares a parse and a re-serialisation per event.
        // A json or jsonb column (or a table-less envelope's payload) was checked before
        // it got here: by Postgres on insert, by serde when the envelope was read.
        let valid = row.payload_kind == PayloadKind::Json
            || std::str::from_utf8(payload)
                .is_ok_and(|text| serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok());
        if !valid {
            return Err(EventError::PayloadNotJson {
                id: row.id.clone(),
                content_type: content_type.to_string(),
            });
        }
        Data::Binary(payload.to_vec())
    } else {
        match (row.payload_kind, std::str::from_utf8(payload)) {
            (PayloadKind::Bytes, _) | (_, Err(_)) => Data::Binary(payload.to_vec()),
            (_, Ok(s)) => Data::String(s.to_string()),
        }
    };
    Ok((content_type.to_string(), data))
}

/// The usable members of the `headers` object.
fn header_extensions(id: &str, raw: &[u8]) -> Result<Vec<(String, ExtensionValue)>, EventError> {
    let bad = || EventError::BadHeaders { id: id.to_string() };
    let serde_json::Value::Object(map) = serde_json::from_slice(raw).map_err(|_| bad())? else {
        return Err(bad());
    };
    let mut out = Vec::with_capacity(map.len());
    for (k, v) in map {
        if !valid_attribute_name(&k) || RESERVED.contains(&k.as_str()) {
            tracing::debug!(event_id = id, header = %k, "header is not a usable cloudevents attribute name; skipped");
            continue;
        }
        let v = match v {
            serde_json::Value::String(s) => ExtensionValue::String(s),
            serde_json::Value::Bool(b) => ExtensionValue::Boolean(b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => ExtensionValue::Integer(i),
                None => ExtensionValue::String(n.to_string()),
            },
            serde_json::Value::Null => continue,
            other => ExtensionValue::String(other.to_string()),
        };
        out.push((k, v));
    }
    Ok(out)
}

/// CloudEvents 1.0 attribute names: lowercase letters and digits, at most 20 characters.
fn valid_attribute_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 20
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use chrono::TimeZone;
    use cloudevents::AttributesReader;

    fn row() -> OutboxRow {
        OutboxRow {
            id: "4b3c2d1e-0000-4000-8000-0000000000aa".into(),
            aggregate_type: "Order".into(),
            aggregate_id: "o-42".into(),
            event_type: "OrderCreated".into(),
            payload: Some(Bytes::from_static(br#"{"total": 12.5}"#)),
            payload_kind: PayloadKind::Json,
            correlation_id: None,
            causation_id: None,
            headers: None,
            created_at: None,
            content_type: None,
            extra: Vec::new(),
        }
    }

    fn pos() -> Position {
        Position {
            commit_lsn: 0x16B6C50,
            commit_time: Utc
                .with_ymd_and_hms(2026, 11, 23, 10, 0, 0)
                .single()
                .expect("valid"),
            index: 3,
        }
    }

    fn cfg() -> CloudEventsConfig {
        CloudEventsConfig {
            source: "/services/orders".into(),
            ..CloudEventsConfig::default()
        }
    }

    fn ext(e: &Event, name: &str) -> String {
        e.extension(name).map(|v| v.to_string()).unwrap_or_default()
    }

    #[test]
    fn maps_every_attribute() {
        let e = to_cloudevent(&row(), &pos(), &cfg()).expect("valid");
        assert_eq!(e.id(), "4b3c2d1e-0000-4000-8000-0000000000aa");
        assert_eq!(e.source().as_str(), "/services/orders");
        assert_eq!(e.ty(), "OrderCreated");
        assert_eq!(e.subject(), Some("o-42"));
        assert_eq!(
            e.time().map(|t| t.to_rfc3339()).as_deref(),
            Some("2026-11-23T10:00:00+00:00")
        );
        assert_eq!(e.datacontenttype(), Some("application/json"));
        assert_eq!(
            e.data(),
            Some(&Data::Binary(br#"{"total": 12.5}"#.to_vec())),
            "the payload's bytes, unchanged"
        );
        assert_eq!(ext(&e, "partitionkey"), "o-42");
        assert_eq!(ext(&e, "sequence"), "00000000016B6C5000000003");
    }

    #[test]
    fn null_correlation_and_causation_start_a_new_flow() {
        let e = to_cloudevent(&row(), &pos(), &cfg()).expect("valid");
        assert_eq!(ext(&e, "correlationid"), e.id());
        assert_eq!(ext(&e, "causationid"), e.id());
        let r = OutboxRow {
            correlation_id: Some("flow-1".into()),
            causation_id: Some("cause-7".into()),
            ..row()
        };
        let e = to_cloudevent(&r, &pos(), &cfg()).expect("valid");
        assert_eq!(ext(&e, "correlationid"), "flow-1");
        assert_eq!(ext(&e, "causationid"), "cause-7");
    }

    #[test]
    fn created_at_wins_over_commit_time_and_prefix_is_applied() {
        let t = Utc
            .with_ymd_and_hms(2020, 1, 1, 0, 0, 0)
            .single()
            .expect("valid");
        let r = OutboxRow {
            created_at: Some(t),
            ..row()
        };
        let c = CloudEventsConfig {
            type_prefix: "com.example.".into(),
            ..cfg()
        };
        let e = to_cloudevent(&r, &pos(), &c).expect("valid");
        assert_eq!(e.time(), Some(&t));
        assert_eq!(e.ty(), "com.example.OrderCreated");
    }

    #[test]
    fn sequence_sorts_in_commit_order() {
        let a = Position {
            commit_lsn: 0xFF,
            index: 0xFFFF,
            ..pos()
        }
        .sequence();
        let b = Position {
            commit_lsn: 0x100,
            index: 0,
            ..pos()
        }
        .sequence();
        let c = Position {
            commit_lsn: 0x100,
            index: 1,
            ..pos()
        }
        .sequence();
        assert!(a < b && b < c, "{a} {b} {c}");
    }

    #[test]
    fn headers_become_extensions_but_cannot_override() {
        let r = OutboxRow {
            headers: Some(Bytes::from_static(
                br#"{"traceparent":"00-abc-def-01","tracestate":"k=v","id":"evil","Bad-Name":"x","tenant":7,"gone":null}"#,
            )),
            ..row()
        };
        let e = to_cloudevent(&r, &pos(), &cfg()).expect("valid");
        assert_eq!(ext(&e, "traceparent"), "00-abc-def-01");
        assert_eq!(ext(&e, "tracestate"), "k=v");
        assert_eq!(ext(&e, "tenant"), "7");
        assert_eq!(e.id(), r.id);
        assert!(e.extension("Bad-Name").is_none() && e.extension("gone").is_none());
    }

    #[test]
    fn poison_payloads_and_headers() {
        // A text (or bytea) payload under a JSON content type is checked; a json or
        // jsonb column's text is JSON by Postgres's own check.
        let r = OutboxRow {
            payload: Some(Bytes::from_static(b"{not json")),
            payload_kind: PayloadKind::Text,
            ..row()
        };
        let err = to_cloudevent(&r, &pos(), &cfg()).expect_err("not json");
        assert_eq!(err.reason_code(), "payload_not_json");
        assert!(err.to_string().contains(&r.id));
        let r = OutboxRow {
            headers: Some(Bytes::from_static(b"[1]")),
            ..row()
        };
        assert_eq!(
            to_cloudevent(&r, &pos(), &cfg())
                .expect_err("array")
                .reason_code(),
            "bad_headers"
        );
    }

    #[test]
    fn non_json_content_types_carry_text_or_bytes() {
        let r = OutboxRow {
            payload: Some(Bytes::from_static(b"plain")),
            payload_kind: PayloadKind::Text,
            content_type: Some("text/plain".into()),
            ..row()
        };
        let e = to_cloudevent(&r, &pos(), &cfg()).expect("valid");
        assert_eq!(e.data(), Some(&Data::String("plain".into())));
        let r = OutboxRow {
            payload: Some(Bytes::from_static(&[0, 159])),
            payload_kind: PayloadKind::Bytes,
            content_type: Some("application/octet-stream".into()),
            ..row()
        };
        let e = to_cloudevent(&r, &pos(), &cfg()).expect("valid");
        assert_eq!(e.data(), Some(&Data::Binary(vec![0, 159])));
    }

    #[test]
    fn json_detection_matches_the_spec() {
        assert!(is_json("application/json; charset=utf-8"));
        assert!(is_json("application/vnd.order+json"));
        assert!(!is_json("text/plain"));
    }
}
