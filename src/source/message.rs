//! The table-less outbox: events written with
//! `pg_logical_emit_message(true, '<postgres.message_prefix>', '<json>')` inside the
//! application's transaction. They travel in the WAL only (no table to bloat) and
//! reach us between Begin and Commit like rows, so the same mapping, ordering and
//! acknowledgement rules apply.
//!
//! The JSON envelope carries the outbox table's fields:
//! `{"id", "aggregate_type", "aggregate_id", "event_type", "payload", "correlation_id"?,
//! "causation_id"?, "headers"?, "created_at"?, "content_type"?}`; `payload` is any JSON
//! value (a string is text under a non-JSON `content_type`). `outbox_emit(...)` (see
//! `outboxd setup`) writes it. An envelope that does not parse, or lacks a required
//! field, is a poison row like an invalid table row.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::outbox::{is_json, parse_rfc3339, OutboxRow, PayloadKind, PoisonRow};

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    aggregate_type: Option<String>,
    aggregate_id: Option<String>,
    event_type: Option<String>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    correlation_id: Option<String>,
    causation_id: Option<String>,
    #[serde(borrow)]
    headers: Option<&'a RawValue>,
    created_at: Option<String>,
    content_type: Option<String>,
}

/// Decodes one message's content into an outbox row, or the poison row it is.
pub fn decode(content: &[u8]) -> Result<OutboxRow, PoisonRow> {
    let raw_row = || {
        serde_json::from_slice::<serde_json::Value>(content).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(content).into_owned())
        })
    };
    let poison = |id: String, aggregate_id: Option<String>, reason: String| PoisonRow {
        id,
        aggregate_id,
        code: "invalid_row",
        reason,
        row: raw_row(),
    };
    let env: Envelope<'_> = serde_json::from_slice(content).map_err(|e| {
        poison(
            "<unknown>".into(),
            None,
            format!("table-less outbox message is not a JSON envelope: {e}"),
        )
    })?;
    // The id may be a JSON string or number; either way its text is the id.
    let id = match env.id.map(|r| r.get()) {
        Some(s) if s.starts_with('"') => serde_json::from_str::<String>(s).unwrap_or_default(),
        Some(s) if s != "null" => s.to_string(),
        _ => String::new(),
    };
    if id.is_empty() {
        return Err(poison(
            "<unknown>".into(),
            env.aggregate_id,
            "id is missing".into(),
        ));
    }
    let need = |v: Option<String>, what: &str| match v {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(format!("{what} is missing or empty")),
    };
    let aggregate_id =
        need(env.aggregate_id, "aggregate_id").map_err(|r| poison(id.clone(), None, r))?;
    let fail = |r: String| poison(id.clone(), Some(aggregate_id.clone()), r);
    let aggregate_type = need(env.aggregate_type, "aggregate_type").map_err(fail)?;
    let event_type = need(env.event_type, "event_type").map_err(fail)?;
    let payload = env
        .payload
        .ok_or_else(|| fail("payload is missing".into()))?;
    let text_payload =
        env.content_type.as_deref().is_some_and(|c| !is_json(c)) && payload.get().starts_with('"');
    let (payload, payload_kind) = if text_payload {
        let s: String = serde_json::from_str(payload.get()).map_err(|e| fail(e.to_string()))?;
        (Bytes::from(s), PayloadKind::Text)
    } else {
        (
            Bytes::copy_from_slice(payload.get().as_bytes()),
            PayloadKind::Json,
        )
    };
    let created_at = match env.created_at {
        Some(t) => Some(
            parse_rfc3339(&t).ok_or_else(|| fail(format!("created_at {t:?} is not RFC 3339")))?,
        ),
        None => None,
    };
    Ok(OutboxRow {
        id,
        aggregate_type,
        aggregate_id,
        event_type,
        payload: Some(payload),
        payload_kind,
        correlation_id: env.correlation_id.filter(|s| !s.is_empty()),
        causation_id: env.causation_id.filter(|s| !s.is_empty()),
        headers: env
            .headers
            .map(|h| Bytes::copy_from_slice(h.get().as_bytes())),
        created_at,
        content_type: env.content_type,
        extra: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_envelope() {
        let row = decode(
            br#"{"id":"e-1","aggregate_type":"Order","aggregate_id":"o-1","event_type":"Created",
                 "payload":{"total":3},"correlation_id":"c","headers":{"traceparent":"00-x"},
                 "created_at":"2026-11-23T10:00:00.5Z"}"#,
        )
        .expect("valid");
        assert_eq!(row.id, "e-1");
        assert_eq!(
            row.payload.as_deref().expect("a payload"),
            br#"{"total":3}"#
        );
        assert_eq!(row.correlation_id.as_deref(), Some("c"));
        assert_eq!(row.causation_id, None);
        assert_eq!(
            row.headers.as_deref(),
            Some(&br#"{"traceparent":"00-x"}"#[..])
        );
        assert_eq!(
            row.created_at.map(|t| t.to_rfc3339()).as_deref(),
            Some("2026-11-23T10:00:00.500+00:00")
        );
    }

    #[test]
    fn text_payload_under_a_text_content_type() {
        let row = decode(
            br#"{"id":7,"aggregate_type":"A","aggregate_id":"a","event_type":"T","payload":"hi","content_type":"text/plain"}"#,
        )
        .expect("valid");
        assert_eq!(row.id, "7");
        assert_eq!(row.payload.as_deref().expect("a payload"), b"hi");
        assert_eq!(row.payload_kind, PayloadKind::Text);
    }

    #[test]
    fn bad_envelopes_are_poison_rows_naming_the_problem() {
        let p = decode(b"not json").expect_err("not json");
        assert_eq!(p.id, "<unknown>");
        assert_eq!(p.row, serde_json::Value::String("not json".into()));
        let p = decode(br#"{"id":"e","aggregate_type":"A","aggregate_id":"a","payload":{}}"#)
            .expect_err("no type");
        assert_eq!(
            (p.id.as_str(), p.reason.as_str()),
            ("e", "event_type is missing or empty")
        );
        assert_eq!(p.aggregate_id.as_deref(), Some("a"));
        let p =
            decode(br#"{"aggregate_type":"A","aggregate_id":"a","event_type":"T","payload":{}}"#)
                .expect_err("no id");
        assert_eq!(p.reason, "id is missing");
    }
}
