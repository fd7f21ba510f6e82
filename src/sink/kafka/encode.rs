//! One CloudEvent -> one Kafka record's headers and value, by the CloudEvents Kafka
//! protocol binding (1.0). Pure: no I/O, no producer, so every rule is unit-tested.
//!
//! Binary content mode (default): every attribute except `datacontenttype` becomes a
//! `ce_<name>` header (`ce_id`, `ce_source`, `ce_specversion`, `ce_type`,
//! `ce_subject`, `ce_time`, `ce_<extension>`), `datacontenttype` becomes
//! `content-type`, and the data is the value, as-is. An event without data is a record
//! without value (a tombstone on a compacted topic, as the binding says).
//!
//! Structured content mode: the value is the JSON event format, and the only header is
//! `content-type: application/cloudevents+json`. An event without data (a row whose
//! NULL payload `kafka.tombstone_on_empty_payload` lets through) is encoded as in binary
//! mode in either mode: a tombstone has no value to hold a JSON event, and its `ce_*`
//! headers still say which event it is.
//!
//! [`Encoded::add_columns`] adds the row's extra columns as headers
//! (`kafka.additional_headers`).
//!
//! Header values are the attributes' canonical strings as UTF-8 bytes. Unlike HTTP
//! (and NATS), Kafka headers are length-prefixed byte strings, so nothing needs
//! percent-encoding: a CR/LF in a row value cannot break the record.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use cloudevents::event::Data;
use cloudevents::Event;

use crate::config::ContentMode;

/// The `content-type` of structured mode (the JSON event format).
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// Headers and value of one record; the key and topic are routing, not encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Header name and UTF-8 value, in the order they are written.
    pub headers: Vec<(Cow<'static, str>, String)>,
    /// The record value; `None` is a record without value.
    pub value: Option<Vec<u8>>,
}

impl Encoded {
    /// Adds a header for each `header = column` of `placed` whose column has a value in
    /// `columns` (a row's extra columns, by name; a NULL column is absent, and so is its
    /// header).
    pub fn add_columns(
        &mut self,
        placed: &BTreeMap<String, String>,
        columns: &[(Arc<str>, String)],
    ) {
        for (header, column) in placed {
            if let Some((_, value)) = columns.iter().find(|(name, _)| **name == **column) {
                self.headers
                    .push((Cow::Owned(header.clone()), value.clone()));
            }
        }
    }
}

/// Why an event cannot be encoded: the event itself is at fault, so no retry helps.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode the event as JSON: {0}")]
pub struct EncodeError(#[from] serde_json::Error);

/// Encodes `event` in `mode`.
pub fn encode(event: &Event, mode: ContentMode) -> Result<Encoded, EncodeError> {
    match mode {
        ContentMode::Structured if event.data().is_some() => Ok(Encoded {
            headers: vec![(
                Cow::Borrowed("content-type"),
                STRUCTURED_CONTENT_TYPE.into(),
            )],
            value: Some(crate::event::structured_json(event)?),
        }),
        // Binary mode, and an event without data (a tombstone) in either mode.
        ContentMode::Binary | ContentMode::Structured => {
            let mut headers = Vec::with_capacity(12);
            for (name, value) in event.iter_attributes() {
                let header = if name == "datacontenttype" {
                    Cow::Borrowed("content-type")
                } else {
                    crate::sink::binding::ce_header_name(name, '_')
                };
                headers.push((
                    header,
                    crate::sink::binding::attribute_text(&value).into_owned(),
                ));
            }
            for (name, value) in event.iter_extensions() {
                headers.push((
                    crate::sink::binding::ce_header_name(name, '_'),
                    crate::sink::binding::extension_text(value).into_owned(),
                ));
            }
            let value = match event.data() {
                None => None,
                Some(Data::Json(v)) => Some(serde_json::to_vec(v)?),
                Some(Data::String(s)) => Some(s.as_bytes().to_vec()),
                Some(Data::Binary(b)) => Some(b.clone()),
            };
            Ok(Encoded { headers, value })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudevents::{EventBuilder, EventBuilderV10};

    fn event() -> Event {
        EventBuilderV10::new()
            .id("e-1")
            .source("/s")
            .ty("OrderCreated")
            .subject("line\r\nInjected: yes")
            .time("2024-05-06T07:08:09Z")
            .extension("partitionkey", "o-1")
            .data("application/json", serde_json::json!({"a": 1}))
            .build()
            .expect("valid")
    }

    fn header<'a>(e: &'a Encoded, name: &str) -> Option<&'a str> {
        e.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn binary_mode_maps_attributes_to_ce_headers_and_data_to_the_value() {
        // Given an event with data, a subject and an extension
        // When it is encoded in binary mode
        let e = encode(&event(), ContentMode::Binary).expect("encodes");
        // Then every attribute is a ce_ header and the data is the value as-is
        assert_eq!(header(&e, "ce_id"), Some("e-1"));
        assert_eq!(header(&e, "ce_source"), Some("/s"));
        assert_eq!(header(&e, "ce_specversion"), Some("1.0"));
        assert_eq!(header(&e, "ce_type"), Some("OrderCreated"));
        assert_eq!(header(&e, "ce_time"), Some("2024-05-06T07:08:09+00:00"));
        assert_eq!(header(&e, "ce_partitionkey"), Some("o-1"));
        assert_eq!(header(&e, "content-type"), Some("application/json"));
        assert_eq!(header(&e, "ce_datacontenttype"), None);
        assert_eq!(e.value.as_deref(), Some(&br#"{"a":1}"#[..]));
        // and a value with CR/LF stays verbatim: Kafka headers are length-prefixed
        assert_eq!(header(&e, "ce_subject"), Some("line\r\nInjected: yes"));
    }

    #[test]
    fn binary_mode_without_data_has_no_value() {
        let ev = EventBuilderV10::new()
            .id("e-2")
            .source("/s")
            .ty("T")
            .build()
            .expect("valid");
        let e = encode(&ev, ContentMode::Binary).expect("encodes");
        assert_eq!(e.value, None);
        assert_eq!(header(&e, "content-type"), None);
    }

    #[test]
    fn binary_mode_passes_text_and_bytes_unchanged() {
        let mut ev = event();
        ev.set_data("text/plain", "héllo");
        let e = encode(&ev, ContentMode::Binary).expect("encodes");
        assert_eq!(e.value.as_deref(), Some("héllo".as_bytes()));
        assert_eq!(header(&e, "content-type"), Some("text/plain"));
        ev.set_data("application/octet-stream", vec![0u8, 159, 146, 150]);
        let e = encode(&ev, ContentMode::Binary).expect("encodes");
        assert_eq!(e.value.as_deref(), Some(&[0u8, 159, 146, 150][..]));
    }

    #[test]
    fn structured_mode_is_the_json_event_format() {
        // When an event is encoded in structured mode
        let e = encode(&event(), ContentMode::Structured).expect("encodes");
        // Then the only header is the CloudEvents media type and the value parses back
        assert_eq!(
            e.headers,
            vec![(
                Cow::Borrowed("content-type"),
                STRUCTURED_CONTENT_TYPE.to_string()
            )]
        );
        let back: Event =
            serde_json::from_slice(e.value.as_deref().expect("value")).expect("json format");
        assert_eq!(back, event());
    }

    #[test]
    fn an_event_without_data_is_a_tombstone_in_both_modes() {
        // Given an event without data (a row whose NULL payload became a tombstone)
        let ev = EventBuilderV10::new()
            .id("e-3")
            .source("/s")
            .ty("OrderDeleted")
            .subject("o-1")
            .build()
            .expect("valid");
        for mode in [ContentMode::Binary, ContentMode::Structured] {
            // When it is encoded
            let e = encode(&ev, mode).expect("encodes");
            // Then the record has no value, never a JSON event, and ce_ headers saying
            // which event it is, without a content-type
            assert_eq!(e.value, None, "{mode:?}");
            assert_eq!(header(&e, "ce_id"), Some("e-3"), "{mode:?}");
            assert_eq!(header(&e, "ce_type"), Some("OrderDeleted"), "{mode:?}");
            assert_eq!(header(&e, "content-type"), None, "{mode:?}");
        }
    }

    #[test]
    fn placed_columns_become_headers_and_a_null_one_is_absent() {
        // Given two placed columns, of which the row has only one (the other is NULL)
        let placed = BTreeMap::from([
            ("tenant".to_string(), "tenant_id".to_string()),
            ("region".to_string(), "region".to_string()),
            ("tenant-copy".to_string(), "tenant_id".to_string()),
        ]);
        let columns = [(Arc::from("tenant_id"), "t-7".to_string())];
        // When they are added
        let mut e = encode(&event(), ContentMode::Binary).expect("encodes");
        let before = e.headers.len();
        e.add_columns(&placed, &columns);
        // Then each header of a present column carries its text, and NULL's is absent
        assert_eq!(header(&e, "tenant"), Some("t-7"));
        assert_eq!(header(&e, "tenant-copy"), Some("t-7"));
        assert_eq!(header(&e, "region"), None);
        assert_eq!(e.headers.len(), before + 2);
    }
}
