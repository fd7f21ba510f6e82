//! Dead letters: how a poison row or a permanently rejected event travels to the
//! dead-letter destination (`nats.dead_letter_subject`, `kafka.dead_letter_topic`).
//!
//! A dead letter is itself a CloudEvent, so the same sinks, ordering and ack rules
//! apply: `id` = the original row/event id (brokers dedup a redelivered dead letter
//! as they would the event), `type` = [`DEAD_LETTER_TYPE`], `subject` = the aggregate
//! id, extension `deadletterreason` = a short code, `sequence` = the original's place
//! in the stream, and `data` = what the operator needs to repair or replay it: the
//! reason, the error text, the original row (invalid rows) or the original event's
//! attributes (rejected events), the routing fields, and the position (commit LSN and
//! index in the transaction; `0/0` for rows read from the table by the initial
//! snapshot or a replay). The row itself stays in the outbox table, found by its id.
//!
//! A dead letter always fits where its event did not: every text it copies is cut to
//! [`MAX_TEXT`] bytes (marked with its full length), an event's data is kept only when
//! it was not what the broker refused and is at most [`MAX_DATA`] bytes, and an id
//! longer than [`MAX_ID`] bytes is replaced by a digest of it (`outboxd-<32 hex>`),
//! stable across redeliveries so the broker still deduplicates. A row's columns are
//! cut by [`crate::source::outbox`] at 64 KiB each.
//!
//! Pure: building a dead letter does no I/O.

use std::borrow::Cow;

use cloudevents::{AttributesReader, EventBuilder, EventBuilderV10};

use super::{Envelope, Position, Structured};
use crate::config::CloudEventsConfig;
use crate::source::outbox::PoisonRow;

/// CloudEvent type of every dead letter.
pub const DEAD_LETTER_TYPE: &str = "io.outboxd.deadletter";

/// Longest text (attribute, extension, routing field, error) a dead letter copies.
pub const MAX_TEXT: usize = 1024;
/// Longest original id a dead letter uses as its own id.
pub const MAX_ID: usize = 256;
/// Largest event data a dead letter of a rejected event carries.
pub const MAX_DATA: usize = 64 * 1024;

/// The dead letter of a poison row.
pub fn for_row(p: &PoisonRow, pos: &Position, cfg: &CloudEventsConfig) -> Envelope {
    // A row without an id gets one derived from its place in the stream: stable
    // across redeliveries, so the broker still deduplicates it.
    let id = if p.id == "<unknown>" {
        format!("outboxd-{}", pos.sequence())
    } else {
        own_id(&p.id)
    };
    let data = serde_json::json!({
        "reason": p.code,
        "error": cut(&p.reason),
        "row": p.row,
        "position": position(pos.commit_lsn, pos.index),
    });
    let sequence = pos.sequence();
    build(&id, p.aggregate_id.as_deref(), p.code, &sequence, data, cfg)
}

/// The dead letter of an event the broker rejected for good.
pub fn for_rejected(
    env: &Envelope,
    code: &'static str,
    reason: &str,
    cfg: &CloudEventsConfig,
) -> Envelope {
    let e = &env.event;
    let data_size = match e.data() {
        Some(cloudevents::Data::Json(v)) => serde_json::to_vec(v).map(|v| v.len()).unwrap_or(0),
        Some(cloudevents::Data::String(s)) => s.len(),
        Some(cloudevents::Data::Binary(b)) => b.len(),
        None => 0,
    };
    let mut event = serde_json::Map::new();
    for (name, value) in e.iter_attributes() {
        event.insert(name.to_string(), cut(&value.to_string()).into());
    }
    for (name, value) in e.iter_extensions() {
        event.insert(name.to_string(), cut(&value.to_string()).into());
    }
    // The data stays with the row; it is copied only when it is small and was not
    // what the broker refused.
    if code != "too_large" && data_size <= MAX_DATA {
        if let Ok(serde_json::Value::Object(full)) = serde_json::to_value(Structured(e)) {
            for key in ["data", "data_base64"] {
                if let Some(v) = full.get(key) {
                    event.insert(key.to_string(), v.clone());
                }
            }
        }
    }
    let sequence = e
        .extension("sequence")
        .map(|v| v.to_string())
        .unwrap_or_default();
    let (commit_lsn, index) = parse_sequence(&sequence);
    let data = serde_json::json!({
        "reason": code,
        "error": cut(reason),
        "event": event,
        "data_size": data_size,
        "aggregate_type": cut(&env.aggregate_type),
        "aggregate_id": cut(&env.aggregate_id),
        "event_type": cut(&env.event_type),
        "position": position(commit_lsn, index),
    });
    let mut dl = build(
        &own_id(e.id()),
        Some(&env.aggregate_id),
        code,
        &sequence,
        data,
        cfg,
    );
    dl.aggregate_type = env.aggregate_type.clone();
    dl.event_type = env.event_type.clone();
    dl
}

/// The dead letter's own id: the original one, or a digest of it when it is too long
/// to be a header value.
fn own_id(id: &str) -> String {
    if id.len() <= MAX_ID {
        id.to_string()
    } else {
        format!("outboxd-{:032x}", fnv1a_128(id.as_bytes()))
    }
}

/// FNV-1a, 128 bits: stable across releases and platforms (unlike std's hasher), and
/// plenty against accidental collisions of ids.
fn fnv1a_128(bytes: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    bytes
        .iter()
        .fold(OFFSET, |h, b| (h ^ u128::from(*b)).wrapping_mul(PRIME))
}

/// `s`, or its first [`MAX_TEXT`] bytes (on a character boundary) marked with the
/// full length.
fn cut(s: &str) -> Cow<'_, str> {
    cut_at(s, MAX_TEXT)
}

/// `s`, or its first `max` bytes (on a character boundary) marked with the full length.
fn cut_at(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…[{} bytes in all]", &s[..end], s.len()))
}

/// Commit LSN and index of a `sequence` extension (see `event::Position::sequence`).
fn parse_sequence(s: &str) -> (u64, u32) {
    let lsn = s.get(..16).and_then(|h| u64::from_str_radix(h, 16).ok());
    let index = s.get(16..24).and_then(|h| u32::from_str_radix(h, 16).ok());
    (lsn.unwrap_or(0), index.unwrap_or(0))
}

fn position(commit_lsn: u64, index: u32) -> serde_json::Value {
    serde_json::json!({
        "commit_lsn": format!("{:X}/{:X}", commit_lsn >> 32, commit_lsn & 0xFFFF_FFFF),
        "index": index,
    })
}

fn build(
    id: &str,
    aggregate_id: Option<&str>,
    code: &str,
    sequence: &str,
    data: serde_json::Value,
    cfg: &CloudEventsConfig,
) -> Envelope {
    let mut b = EventBuilderV10::new()
        .id(id)
        .source(cfg.source.as_str())
        .ty(DEAD_LETTER_TYPE)
        .extension("deadletterreason", code)
        .data("application/json", data);
    if !sequence.is_empty() {
        b = b.extension("sequence", sequence);
    }
    if let Some(agg) = aggregate_id {
        b = b.subject(cut_at(agg, MAX_ID).as_ref());
    }
    // Every required attribute is set and `source` is checked by config validation,
    // so the builder cannot refuse.
    let event = b
        .build()
        .expect("dead letter attributes are complete and source is valid");
    Envelope {
        event,
        aggregate_type: String::new(),
        // The original key: the relay's per-aggregate gate releases by it.
        aggregate_id: aggregate_id.unwrap_or(id).to_string(),
        event_type: DEAD_LETTER_TYPE.to_string(),
        dead_letter: true,
        extra: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn pos() -> Position {
        Position {
            commit_lsn: 0x10,
            commit_time: Utc::now(),
            index: 2,
        }
    }

    #[test]
    fn invalid_row_keeps_id_row_and_reason() {
        let p = PoisonRow {
            id: "r-1".into(),
            aggregate_id: Some("a-1".into()),
            code: "invalid_row",
            reason: "event_type is null".into(),
            row: serde_json::json!({"id": "r-1", "event_type": null}),
        };
        let env = for_row(&p, &pos(), &CloudEventsConfig::default());
        assert!(env.dead_letter);
        assert_eq!(env.aggregate_id, "a-1");
        assert_eq!(env.event.id(), "r-1");
        assert_eq!(env.event.ty(), DEAD_LETTER_TYPE);
        assert_eq!(
            env.event
                .extension("deadletterreason")
                .map(|v| v.to_string())
                .as_deref(),
            Some("invalid_row")
        );
        let Some(cloudevents::Data::Json(d)) = env.event.data() else {
            panic!("json data")
        };
        assert_eq!(d["row"]["id"], "r-1");
        assert_eq!(d["error"], "event_type is null");
    }

    #[test]
    fn row_without_id_gets_a_stable_one() {
        let p = PoisonRow {
            id: "<unknown>".into(),
            aggregate_id: None,
            code: "invalid_row",
            reason: "id is null".into(),
            row: serde_json::json!({}),
        };
        let a = for_row(&p, &pos(), &CloudEventsConfig::default());
        let b = for_row(&p, &pos(), &CloudEventsConfig::default());
        assert_eq!(a.event.id(), b.event.id());
        assert!(a.event.id().starts_with("outboxd-"));
    }

    #[test]
    fn a_dead_letter_fits_where_its_event_did_not() {
        // Given an event whose id, subject, type and an extension are huge, and whose
        // data is 5 MB
        let huge = "é".repeat(100_000);
        let event = EventBuilderV10::new()
            .id(huge.as_str())
            .source("/s")
            .ty(huge.as_str())
            .subject(huge.as_str())
            .extension("big", huge.as_str())
            .extension("sequence", "00000000016B6C5000000003")
            .data("application/octet-stream", vec![0u8; 5_000_000])
            .build()
            .expect("valid");
        let env = Envelope {
            event,
            aggregate_type: huge.clone(),
            aggregate_id: huge.clone(),
            event_type: huge.clone(),
            dead_letter: false,
            extra: Vec::new(),
        };
        // When it is rejected as too large
        let dl = for_rejected(&env, "too_large", &huge, &CloudEventsConfig::default());
        // Then its dead letter is a few KiB, with a stable digest for an id
        let bytes = crate::event::structured_json(&dl.event).expect("encodes");
        assert!(bytes.len() < 32 * 1024, "{} bytes", bytes.len());
        assert!(dl.event.id().starts_with("outboxd-") && dl.event.id().len() == 40);
        assert_eq!(
            dl.event.id(),
            for_rejected(&env, "too_large", "x", &CloudEventsConfig::default())
                .event
                .id()
        );
        assert!(dl.event.subject().is_some_and(|s| s.len() < 2 * MAX_ID));
        // and keeps what finds the row again: the position and the cut routing fields
        let Some(cloudevents::Data::Json(d)) = dl.event.data() else {
            panic!("json data")
        };
        assert_eq!(d["position"]["commit_lsn"], "0/16B6C50");
        assert_eq!(d["position"]["index"], 3);
        assert_eq!(d["data_size"], 5_000_000);
        assert!(d["aggregate_id"]
            .as_str()
            .is_some_and(|s| s.ends_with("[200000 bytes in all]")));
        // while the gate still releases the original aggregate
        assert_eq!(dl.aggregate_id, huge);
    }

    #[test]
    fn short_ids_are_kept_and_cuts_respect_characters() {
        assert_eq!(own_id("r-1"), "r-1");
        assert_ne!(own_id(&"a".repeat(300)), own_id(&"b".repeat(300)));
        let s = "€".repeat(MAX_TEXT);
        let c = cut(&s);
        assert!(c.ends_with(&format!("…[{} bytes in all]", s.len())), "{c}");
    }

    #[test]
    fn too_large_drops_the_data_but_keeps_attributes() {
        let event = EventBuilderV10::new()
            .id("e-1")
            .source("/s")
            .ty("T")
            .data(
                "application/json",
                serde_json::json!({"big": "x".repeat(100)}),
            )
            .build()
            .expect("valid");
        let env = Envelope {
            event,
            aggregate_type: "Order".into(),
            aggregate_id: "o-1".into(),
            event_type: "T".into(),
            dead_letter: false,
            extra: Vec::new(),
        };
        let dl = for_rejected(
            &env,
            "too_large",
            "max_payload",
            &CloudEventsConfig::default(),
        );
        let Some(cloudevents::Data::Json(d)) = dl.event.data() else {
            panic!("json data")
        };
        assert_eq!(d["event"]["id"], "e-1");
        assert!(d["event"].get("data").is_none());
        assert!(d["data_size"].as_u64().unwrap_or(0) > 100);
        assert_eq!(dl.aggregate_id, "o-1");
    }
}
