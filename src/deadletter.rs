//! Dead letters: how a poison row or a permanently rejected event travels to the
//! dead-letter destination (`nats.dead_letter_subject`, `kafka.dead_letter_topic`).
//!
//! A dead letter is itself a CloudEvent, so the same sinks, ordering and ack rules
//! apply: `id` = the original row/event id (brokers dedup a redelivered dead letter
//! as they would the event), `type` = [`DEAD_LETTER_TYPE`], `subject` = the aggregate
//! id, extension `deadletterreason` = a short code, and `data` = what the operator
//! needs to repair it: the reason, the error text, and the original row (invalid
//! rows) or the original event (rejected events; without its data when the data was
//! what was too large). The row itself stays in the outbox table, found by its id.
//!
//! Pure: building a dead letter does no I/O.

use cloudevents::{AttributesReader, EventBuilder, EventBuilderV10};

use crate::config::CloudEventsConfig;
use crate::event::Position;
use crate::sink::Envelope;

/// CloudEvent type of every dead letter.
pub const DEAD_LETTER_TYPE: &str = "io.outboxd.deadletter";

/// A poison row: not a valid outbox row or not a valid event.
#[derive(Debug, Clone)]
pub struct PoisonRow {
    /// Row id (`<unknown>` when the id itself is missing).
    pub id: String,
    /// Aggregate id, when the row has one (keeps the dead letter in its order).
    pub aggregate_id: Option<String>,
    /// Short reason code (metrics label, `deadletterreason`).
    pub code: &'static str,
    /// What is wrong.
    pub reason: String,
    /// The row's columns as JSON.
    pub row: serde_json::Value,
}

/// The dead letter of a poison row.
pub fn for_row(p: &PoisonRow, pos: &Position, cfg: &CloudEventsConfig) -> Envelope {
    // A row without an id gets one derived from its place in the stream: stable
    // across redeliveries, so the broker still deduplicates it.
    let id = if p.id == "<unknown>" {
        format!("outboxd-{}", pos.sequence())
    } else {
        p.id.clone()
    };
    let data = serde_json::json!({"reason": p.code, "error": p.reason, "row": p.row});
    build(&id, p.aggregate_id.as_deref(), p.code, data, cfg)
}

/// The dead letter of an event the broker rejected for good.
pub fn for_rejected(
    env: &Envelope,
    code: &'static str,
    reason: &str,
    cfg: &CloudEventsConfig,
) -> Envelope {
    let mut original = env.event.clone();
    let data_size = match original.data() {
        Some(cloudevents::Data::Json(v)) => serde_json::to_vec(v).map(|v| v.len()).unwrap_or(0),
        Some(cloudevents::Data::String(s)) => s.len(),
        Some(cloudevents::Data::Binary(b)) => b.len(),
        None => 0,
    };
    if code == "too_large" {
        // The data is what the broker refused; the row keeps it.
        let _ = original.take_data();
    }
    let data = serde_json::json!({
        "reason": code,
        "error": reason,
        "event": serde_json::to_value(crate::sink::Structured(&original)).unwrap_or_default(),
        "data_size": data_size,
    });
    let mut dl = build(env.event.id(), Some(&env.aggregate_id), code, data, cfg);
    dl.aggregate_type = env.aggregate_type.clone();
    dl.event_type = env.event_type.clone();
    dl
}

fn build(
    id: &str,
    aggregate_id: Option<&str>,
    code: &str,
    data: serde_json::Value,
    cfg: &CloudEventsConfig,
) -> Envelope {
    let mut b = EventBuilderV10::new()
        .id(id)
        .source(cfg.source.as_str())
        .ty(DEAD_LETTER_TYPE)
        .extension("deadletterreason", code)
        .data("application/json", data);
    if let Some(agg) = aggregate_id {
        b = b.subject(agg);
    }
    // Every required attribute is set and `source` is checked by config validation,
    // so the builder cannot refuse.
    let event = b
        .build()
        .expect("dead letter attributes are complete and source is valid");
    Envelope {
        event,
        aggregate_type: String::new(),
        aggregate_id: aggregate_id.unwrap_or(id).to_string(),
        event_type: DEAD_LETTER_TYPE.to_string(),
        dead_letter: true,
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
