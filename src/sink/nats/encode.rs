//! The CloudEvents NATS protocol binding: an event as JetStream headers and body.
//! Binary mode maps every attribute to a `ce-` header, structured mode sends the JSON
//! event format; header values are percent-encoded (HTTP binding rule) so a row value
//! can never break the header block or forge a `Nats-Msg-Id`.

use std::borrow::Cow;

use async_nats::{HeaderMap, HeaderName};
use bytes::Bytes;
use cloudevents::event::Data;
use cloudevents::AttributesReader;

use super::SINK;
use crate::config::ContentMode;
use crate::sink::SinkError;

/// Binary or structured encoding of one event.
pub fn encode(
    event: &cloudevents::Event,
    mode: ContentMode,
) -> Result<(HeaderMap, Bytes), SinkError> {
    let encode_err = |e: serde_json::Error| SinkError::Rejected {
        sink: SINK,
        reason: "encode",
        detail: e.to_string(),
    };
    match mode {
        ContentMode::Structured => {
            let mut h = HeaderMap::new();
            h.insert(
                HeaderName::from_static(MSG_ID),
                header_value(event.id()).as_ref(),
            );
            h.insert("content-type", "application/cloudevents+json");
            let body = crate::event::structured_json(event).map_err(encode_err)?;
            Ok((h, Bytes::from(body)))
        }
        ContentMode::Binary => {
            let mut h = binary_headers();
            h.append(
                HeaderName::from_static(MSG_ID),
                header_value(event.id()).as_ref(),
            );
            for (name, value) in event.iter_attributes() {
                let value = header_text(crate::sink::binding::attribute_text(&value));
                if name == "datacontenttype" {
                    h.append(HeaderName::from_static("content-type"), value);
                } else {
                    append_ce(&mut h, name, value);
                }
            }
            for (name, value) in event.iter_extensions() {
                append_ce(
                    &mut h,
                    name,
                    header_text(crate::sink::binding::extension_text(value)),
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

/// JetStream's dedup header. Its value is the event id percent-encoded like every other
/// header value: nats-server reads the value up to the first CR LF and skips leading
/// spaces, so a raw id could end the header early (and forge another id, which then
/// shadows a real later event as a "duplicate"), or collide with another id that
/// differs only by leading spaces. The encoding is injective: an id without a byte
/// that needs encoding is sent as it is and never contains `%`; every other id's
/// encoding does.
const MSG_ID: &str = "Nats-Msg-Id";

/// A header map holding, without values, every header name a binary-mode event of
/// outboxd carries, built once and cloned per event. A map built by inserting a dozen
/// headers into an empty one grows (and rehashes every key) three times per event:
/// ~9 % of a drain's instructions in callgrind (the CPU time on the 2-core bench VM
/// did not move measurably; see BENCHMARKS.md). A name left without a value is not
/// written to the wire. The async-nats API has no `with_capacity`, so the template
/// comes from `HeaderMap`'s public serde form; should that ever change, this falls back
/// to an empty map (correct, only slower), which the unit test catches.
fn binary_headers() -> HeaderMap {
    static TEMPLATE: std::sync::OnceLock<HeaderMap> = std::sync::OnceLock::new();
    TEMPLATE
        .get_or_init(|| {
            let names: serde_json::Map<String, serde_json::Value> = [MSG_ID, "content-type"]
                .into_iter()
                .chain(crate::sink::binding::ce_header_names('-'))
                .map(|n| (n.to_string(), serde_json::Value::Array(Vec::new())))
                .collect();
            serde_json::from_value(serde_json::json!({ "inner": names })).unwrap_or_default()
        })
        .clone()
}

/// Appends `ce-<name>`; the names outboxd always writes are static (and in the
/// template of [`binary_headers`]).
fn append_ce(h: &mut HeaderMap, name: &str, value: String) {
    match crate::sink::binding::ce_header_name(name, '-') {
        Cow::Borrowed(known) => h.append(HeaderName::from_static(known), value),
        Cow::Owned(other) => h.append(other, value),
    }
}

/// [`header_value`] as an owned string, reusing `v`'s allocation when nothing needs
/// encoding.
fn header_text(v: Cow<'_, str>) -> String {
    match header_value(&v) {
        Cow::Borrowed(_) => v.into_owned(),
        Cow::Owned(encoded) => encoded,
    }
}

/// True for a byte that may stand in a header value as it is.
fn header_safe(b: u8) -> bool {
    (0x21..=0x7E).contains(&b) && b != b'"' && b != b'%'
}

/// Percent-encodes what may not stand in a header value (HTTP binding rule: space,
/// `"`, `%` and everything outside printable ASCII).
pub fn header_value(v: &str) -> Cow<'_, str> {
    // A fold without early exit: the compiler vectorises it, and values are short.
    if v.bytes().fold(true, |clean, b| clean & header_safe(b)) {
        return Cow::Borrowed(v);
    }
    let mut out = String::with_capacity(v.len() + 8);
    for b in v.bytes() {
        if header_safe(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Cow::Owned(out)
}

/// The value [`header_value`] encoded, decoded again (`None` if it is not such a value).
pub fn decode_header_value(v: &str) -> Option<String> {
    if !v.contains('%') {
        return Some(v.to_string());
    }
    let mut out = Vec::with_capacity(v.len());
    let mut bytes = v.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
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
        assert_eq!(
            h.get(HeaderName::from_static(MSG_ID)).map(|v| v.as_str()),
            Some("e-1")
        );
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
    fn binary_mode_writes_exactly_the_event_s_headers() {
        // The template holds every static name, without values
        assert_eq!(binary_headers().len(), 13);
        assert!(binary_headers().iter().all(|(_, v)| v.is_empty()));
        // and an event's encoding gives each of its headers exactly one value
        let (h, _) = encode(&event(), ContentMode::Binary).expect("encodes");
        let mut set: Vec<String> = h
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| {
                assert_eq!(v.len(), 1, "{k}");
                k.to_string()
            })
            .collect();
        set.sort();
        assert_eq!(
            set,
            [
                "Nats-Msg-Id",
                "ce-id",
                "ce-partitionkey",
                "ce-source",
                "ce-specversion",
                "ce-subject",
                "ce-type",
                "content-type"
            ]
        );
        // An extension outside the template still arrives
        let mut e = event();
        e.set_extension("traceparent", "00-abc-01");
        let (h, _) = encode(&e, ContentMode::Binary).expect("encodes");
        assert_eq!(
            h.get("ce-traceparent").map(|v| v.as_str()),
            Some("00-abc-01")
        );
    }

    #[test]
    fn an_id_cannot_end_its_msg_id_header_or_lose_its_spaces() {
        use cloudevents::AttributesWriter as _;
        // Given ids with CR/LF, a leading space, and a '%'
        for (id, msg_id) in [
            ("a\r\nX-A: b", "a%0D%0AX-A:%20b"),
            (" a", "%20a"),
            ("a%20", "a%2520"),
            ("plain-id_1", "plain-id_1"),
        ] {
            let mut e = event();
            e.set_id(id);
            // Then both content modes send the same, encoded, Nats-Msg-Id
            for mode in [ContentMode::Binary, ContentMode::Structured] {
                let (h, _) = encode(&e, mode).expect("encodes");
                assert_eq!(
                    h.get(HeaderName::from_static(MSG_ID)).map(|v| v.as_str()),
                    Some(msg_id),
                    "{id:?} {mode:?}"
                );
            }
        }
    }

    #[test]
    fn header_values_are_percent_encoded() {
        assert_eq!(header_value("plain-value_1"), "plain-value_1");
        assert_eq!(header_value("a b\"%é"), "a%20b%22%25%C3%A9");
    }

    #[test]
    fn a_header_value_decodes_to_the_id_it_encodes() {
        for id in ["plain-1", "with space", " lead", "cr\r\nlf", "100%", "ünï"] {
            assert_eq!(
                decode_header_value(&header_value(id)).as_deref(),
                Some(id),
                "{id:?}"
            );
        }
        assert_eq!(decode_header_value("%4"), None);
    }
}
