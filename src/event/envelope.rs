//! What a sink is handed: [`Envelope`] (the CloudEvent plus the row fields routing
//! needs), built from a row or found to be a poison row, and [`Structured`], the
//! CloudEvents JSON event format of an event. Pure: no I/O.

use std::sync::Arc;

use chrono::Utc;
use cloudevents::event::Data;
use cloudevents::{AttributesReader, Event};
use serde::ser::{Serialize, SerializeMap, Serializer};

use super::{is_json, to_cloudevent, Position};
use crate::config::CloudEventsConfig;
use crate::route::Fields;
use crate::source::outbox::{Layout, OutboxRow, PoisonRow};
use crate::source::pgoutput::Value;
use crate::source::row_or_poison;

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
    /// The row's extra columns (`kafka.additional_headers`), by column name; a NULL is
    /// left out. Empty for a dead letter.
    pub extra: Vec<(Arc<str>, String)>,
}

impl Envelope {
    /// The envelope of `row`'s event (not a dead letter).
    pub fn of_row(event: Event, row: OutboxRow) -> Self {
        Self {
            event,
            aggregate_type: row.aggregate_type,
            aggregate_id: row.aggregate_id,
            event_type: row.event_type,
            dead_letter: false,
            extra: row.extra,
        }
    }

    /// The template fields of this envelope.
    pub fn fields(&self) -> Fields<'_> {
        Fields {
            aggregate_type: &self.aggregate_type,
            aggregate_id: &self.aggregate_id,
            event_type: &self.event_type,
        }
    }
}

/// Builds the envelope of a row, or the poison row it is.
pub fn envelope(
    cfg: &CloudEventsConfig,
    row: Result<OutboxRow, PoisonRow>,
    pos: &Position,
) -> Result<Envelope, PoisonRow> {
    let row = row?;
    let event = to_cloudevent(&row, pos, cfg).map_err(|e| PoisonRow {
        id: row.id.clone(),
        aggregate_id: Some(row.aggregate_id.clone()),
        code: e.reason_code(),
        reason: e.to_string(),
        row: row.raw(),
    })?;
    Ok(Envelope::of_row(event, row))
}

/// One row read from the table as the stream would publish it: its envelope, or the
/// poison row it is. `index` numbers the rows of the read (the `sequence` extension,
/// after a commit LSN of 0, so they sort before every streamed event).
pub fn table_envelope(
    cfg: &CloudEventsConfig,
    layout: &Layout,
    values: &[Value],
    index: u32,
) -> Result<Envelope, PoisonRow> {
    let row = row_or_poison(layout, values)?;
    let pos = Position {
        commit_lsn: 0,
        commit_time: row.created_at.unwrap_or_else(Utc::now),
        index,
    };
    envelope(cfg, Ok(row), &pos)
}

/// The JSON event format of an event (structured content mode), as the SDK writes it,
/// except that data which the event carries as bytes under a JSON `datacontenttype`
/// (how [`super::to_cloudevent`] keeps a row's JSON payload) is embedded as JSON in `data`,
/// unchanged, rather than as `data_base64`.
pub struct Structured<'a>(pub &'a Event);

impl Serialize for Structured<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let e = self.0;
        let json_bytes = match (e.data(), e.datacontenttype()) {
            (Some(Data::Binary(b)), Some(ct)) if is_json(ct) => Some(b),
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

#[cfg(test)]
mod tests {
    use super::*;
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
