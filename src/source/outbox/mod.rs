//! The outbox table contract: which columns hold what, and the typed row.
//!
//! [`Layout`] binds the configured column names to positions in a pgoutput Relation
//! (and checks their types); [`Layout::row`] turns one Insert's values into an
//! [`OutboxRow`]. Besides the mapped columns a layout may carry extra columns (their
//! text values travel with the row) and may accept a NULL payload (a row without
//! data), as the configuration's [`RowExtras`] asks. A Relation that lacks a required column or retypes one is a
//! [`OutboxError::Schema`] (stop: the operator changed the table); a row with a
//! missing or malformed value is an [`OutboxError::Invalid`] (a poison row, handled by
//! the configured policy). This module never decides what to do with either.

mod value;

use value::decode_bytea;
pub use value::{parse_rfc3339, parse_timestamp};

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};

use super::pgoutput::{Relation, Value};
use crate::config::{ColumnMapping, RowExtras};

/// Postgres type OIDs the outbox understands.
mod oid {
    pub const BYTEA: u32 = 17;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const JSON: u32 = 114;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

const TEXTUAL: &[u32] = &[oid::TEXT, oid::VARCHAR, oid::BPCHAR, oid::NAME, oid::UUID];
const ID_TYPES: &[u32] = &[
    oid::TEXT,
    oid::VARCHAR,
    oid::BPCHAR,
    oid::NAME,
    oid::UUID,
    oid::INT4,
    oid::INT8,
];
const PAYLOAD_TYPES: &[u32] = &[oid::JSONB, oid::JSON, oid::TEXT, oid::VARCHAR, oid::BYTEA];
const JSON_TYPES: &[u32] = &[oid::JSONB, oid::JSON];
const TIME_TYPES: &[u32] = &[oid::TIMESTAMPTZ, oid::TIMESTAMP];

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

/// True for `application/json`, `text/json` and any `+json` type, as the SDK decides.
pub fn is_json(content_type: &str) -> bool {
    let base = content_type.split(';').next().unwrap_or("").trim();
    base == "application/json" || base == "text/json" || base.ends_with("+json")
}

/// Why a table or a row cannot be used.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum OutboxError {
    /// The table's shape does not match the mapping. Fatal: needs an operator.
    #[error("outbox table {table}: column {column:?} ({role}) {problem}. {}", schema_advice(.role))]
    Schema {
        /// `schema.table`.
        table: String,
        /// Column name.
        column: String,
        /// Mapping key, e.g. `payload`.
        role: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// A row that is not a valid outbox row: a poison row.
    #[error("outbox row {id}: {reason}")]
    Invalid {
        /// The row id, or `<unknown>` when the id itself is missing.
        id: String,
        /// Short reason, e.g. `event_type is null`.
        reason: String,
    },
}

/// What helps when the table's shape no longer fits the mapping. Rows written in that
/// shape are in the WAL already and are decoded with it whatever the table looks like
/// later, so fixing the table alone never gets the stream past them.
fn schema_advice(role: &str) -> String {
    let in_wal = "Rows written while the table has this shape are already in the WAL, so \
                  changing the table back does not help them";
    if matches!(
        role,
        "id" | "aggregate_type" | "aggregate_id" | "event_type" | "payload"
    ) {
        format!(
            "{in_wal}. Either map [postgres.columns] {role} to a column of a supported type that \
             those rows have, or change the column back (so the rows in the table are readable \
             again), drop the replication slot and start once with `outboxd run \
             --allow-new-slot`: the new slot starts after those WAL records and the rows \
             committed since the last confirmed position are republished from the table"
        )
    } else if role == EXTRA_ROLE {
        format!(
            "{in_wal}. The column is read only because kafka.additional_headers names it: \
             remove it there and restart (those events go out without its header), and name \
             it again once the table has the column and the relay has passed them"
        )
    } else {
        format!(
            "{in_wal}. The column is optional: stop mapping it ([postgres.columns] {role} = \"\") \
             and restart; those events go out without it. Map it again once the relay has \
             passed them"
        )
    }
}

impl OutboxError {
    /// Short, low-cardinality reason for metrics and dead-letter headers.
    pub fn reason_code(&self) -> &'static str {
        match self {
            OutboxError::Schema { .. } => "schema",
            OutboxError::Invalid { .. } => "invalid_row",
        }
    }
}

/// The role an extra column ([`RowExtras::columns`]) has in a schema error.
const EXTRA_ROLE: &str = "additional column";

/// How the payload column is typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    /// json or jsonb: the text is JSON already.
    Json,
    /// text or varchar.
    Text,
    /// bytea (hex text format, decoded).
    Bytes,
}

/// Column positions for one Relation.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Relation OID this layout belongs to.
    pub relation: u32,
    /// All column names of the relation, in tuple order (for dead letters).
    names: Vec<String>,
    id: usize,
    aggregate_type: usize,
    aggregate_id: usize,
    event_type: usize,
    payload: usize,
    payload_kind: PayloadKind,
    correlation_id: Option<usize>,
    causation_id: Option<usize>,
    headers: Option<usize>,
    created_at: Option<usize>,
    content_type: Option<usize>,
    /// Extra columns: name and position.
    extra: Vec<(Arc<str>, usize)>,
    /// A NULL payload is a row without data rather than an invalid row.
    null_payload: bool,
}

/// One outbox row, typed.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    /// Event id (dedup key).
    pub id: String,
    /// Routing.
    pub aggregate_type: String,
    /// Ordering key.
    pub aggregate_id: String,
    /// Event type, without prefix.
    pub event_type: String,
    /// Payload bytes as stored; `None` for a NULL payload, which only a layout that
    /// accepts one ([`RowExtras::null_payload`]) lets through.
    pub payload: Option<Bytes>,
    /// Payload column type.
    pub payload_kind: PayloadKind,
    /// Correlation id, if set.
    pub correlation_id: Option<String>,
    /// Causation id, if set.
    pub causation_id: Option<String>,
    /// Extra attributes (a JSON object's text), if set.
    pub headers: Option<Bytes>,
    /// Creation time, if set.
    pub created_at: Option<DateTime<Utc>>,
    /// Per-row content type, if set.
    pub content_type: Option<String>,
    /// The extra columns' text values, by column name; a NULL is left out.
    pub extra: Vec<(Arc<str>, String)>,
}

impl Layout {
    /// Binds `map` and `extras` to `rel`'s columns, checking the types (an extra column
    /// may have any type: its text is used).
    pub fn bind(
        rel: &Relation,
        map: &ColumnMapping,
        extras: &RowExtras,
    ) -> Result<Self, OutboxError> {
        let table = format!("{}.{}", rel.namespace, rel.name);
        let find = |role: &'static str, name: &str, types: &[u32], required: bool| {
            if name.is_empty() {
                return Ok(None);
            }
            match rel.columns.iter().position(|c| c.name == name) {
                None if required => Err(OutboxError::Schema {
                    table: table.clone(),
                    column: name.to_string(),
                    role,
                    problem: "does not exist".into(),
                }),
                None => Ok(None),
                Some(i) if !types.contains(&rel.columns[i].type_oid) => Err(OutboxError::Schema {
                    table: table.clone(),
                    column: name.to_string(),
                    role,
                    problem: format!("has unsupported type oid {}", rel.columns[i].type_oid),
                }),
                Some(i) => Ok(Some(i)),
            }
        };
        let req = |role, name: &str, types| {
            find(role, name, types, true).map(|i| i.expect("required columns are always found"))
        };
        let payload = req("payload", &map.payload, PAYLOAD_TYPES)?;
        let payload_kind = match rel.columns[payload].type_oid {
            oid::JSON | oid::JSONB => PayloadKind::Json,
            oid::BYTEA => PayloadKind::Bytes,
            _ => PayloadKind::Text,
        };
        let extra = extras
            .columns
            .iter()
            .map(
                |name| match rel.columns.iter().position(|c| &c.name == name) {
                    Some(i) => Ok((Arc::from(name.as_str()), i)),
                    None => Err(OutboxError::Schema {
                        table: table.clone(),
                        column: name.clone(),
                        role: EXTRA_ROLE,
                        problem: "does not exist".into(),
                    }),
                },
            )
            .collect::<Result<_, _>>()?;
        Ok(Self {
            relation: rel.id,
            names: rel.columns.iter().map(|c| c.name.clone()).collect(),
            id: req("id", &map.id, ID_TYPES)?,
            aggregate_type: req("aggregate_type", &map.aggregate_type, TEXTUAL)?,
            aggregate_id: req("aggregate_id", &map.aggregate_id, ID_TYPES)?,
            event_type: req("event_type", &map.event_type, TEXTUAL)?,
            payload,
            payload_kind,
            correlation_id: find("correlation_id", &map.correlation_id, TEXTUAL, false)?,
            causation_id: find("causation_id", &map.causation_id, TEXTUAL, false)?,
            headers: find("headers", &map.headers, JSON_TYPES, false)?,
            created_at: find("created_at", &map.created_at, TIME_TYPES, false)?,
            content_type: find("content_type", &map.content_type, TEXTUAL, false)?,
            extra,
            null_payload: extras.null_payload,
        })
    }

    /// Extracts a row. Needs the session to use `DateStyle=ISO` and `TimeZone=UTC`.
    pub fn row(&self, values: &[Value]) -> Result<OutboxRow, OutboxError> {
        let id = match text(values, self.id) {
            Some(Ok(s)) if !s.is_empty() => s,
            _ => return Err(invalid("<unknown>", "id is null, empty or not UTF-8")),
        };
        let required = |i: usize, what: &str| match text(values, i) {
            Some(Ok(s)) if !s.is_empty() => Ok(s),
            Some(Ok(_)) => Err(invalid(&id, format!("{what} is empty"))),
            Some(Err(())) => Err(invalid(&id, format!("{what} is not UTF-8"))),
            None => Err(invalid(&id, format!("{what} is null"))),
        };
        let optional = |i: Option<usize>| match i.and_then(|i| text(values, i)) {
            Some(Ok(s)) if !s.is_empty() => Some(s),
            _ => None,
        };
        let aggregate_type = required(self.aggregate_type, "aggregate_type")?;
        let aggregate_id = required(self.aggregate_id, "aggregate_id")?;
        let event_type = required(self.event_type, "event_type")?;
        let payload = match (raw(values, self.payload), self.payload_kind) {
            (None, _) if self.null_payload => None,
            (None, _) => return Err(invalid(&id, "payload is null")),
            (Some(b), PayloadKind::Bytes) => {
                Some(decode_bytea(b).ok_or_else(|| invalid(&id, "payload is not bytea hex text"))?)
            }
            (Some(b), _) => Some(b.clone()),
        };
        let created_at = match self.created_at.and_then(|i| text(values, i)) {
            Some(Ok(s)) => {
                Some(parse_timestamp(&s).ok_or_else(|| invalid(&id, "created_at is not ISO"))?)
            }
            _ => None,
        };
        Ok(OutboxRow {
            aggregate_type,
            aggregate_id,
            event_type,
            payload,
            payload_kind: self.payload_kind,
            correlation_id: optional(self.correlation_id),
            causation_id: optional(self.causation_id),
            headers: self.headers.and_then(|i| raw(values, i).cloned()),
            created_at,
            content_type: optional(self.content_type),
            // The server sends text in the session's UTF8 encoding; lossy only guards.
            extra: self
                .extra
                .iter()
                .filter_map(|(name, i)| {
                    raw(values, *i).map(|b| (name.clone(), String::from_utf8_lossy(b).into_owned()))
                })
                .collect(),
            id,
        })
    }
}

/// Largest column value copied into a dead letter; longer ones are cut (the row stays
/// in the table, found by its id).
const RAW_VALUE_LIMIT: usize = 64 * 1024;

impl Layout {
    /// The row as `{column: text or null}`, for a dead letter; `aggregate_id` if set.
    pub fn raw(&self, values: &[Value]) -> (serde_json::Value, Option<String>) {
        let mut map = serde_json::Map::new();
        for (name, v) in self.names.iter().zip(values) {
            let json = match v {
                Value::Text(b) | Value::Binary(b) => {
                    let cut = &b[..b.len().min(RAW_VALUE_LIMIT)];
                    let mut s = String::from_utf8_lossy(cut).into_owned();
                    if b.len() > RAW_VALUE_LIMIT {
                        s.push_str(&format!("…[{} bytes in all]", b.len()));
                    }
                    serde_json::Value::String(s)
                }
                Value::Null | Value::Unchanged => serde_json::Value::Null,
            };
            map.insert(name.clone(), json);
        }
        let agg = match text(values, self.aggregate_id) {
            Some(Ok(s)) if !s.is_empty() => Some(s),
            _ => None,
        };
        (serde_json::Value::Object(map), agg)
    }
}

impl OutboxRow {
    /// The mapped fields as JSON, for a dead letter of a row that is not a valid event.
    pub fn raw(&self) -> serde_json::Value {
        let cut = |b: &Bytes| {
            let mut s = String::from_utf8_lossy(&b[..b.len().min(RAW_VALUE_LIMIT)]).into_owned();
            if b.len() > RAW_VALUE_LIMIT {
                s.push_str(&format!("…[{} bytes in all]", b.len()));
            }
            s
        };
        serde_json::json!({
            "id": self.id,
            "aggregate_type": self.aggregate_type,
            "aggregate_id": self.aggregate_id,
            "event_type": self.event_type,
            "payload": self.payload.as_ref().map(cut),
            "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
            "headers": self.headers.as_ref().map(cut),
            "created_at": self.created_at.map(|t| t.to_rfc3339()),
            "content_type": self.content_type,
        })
    }
}

fn invalid(id: &str, reason: impl Into<String>) -> OutboxError {
    OutboxError::Invalid {
        id: id.to_string(),
        reason: reason.into(),
    }
}

fn raw(values: &[Value], i: usize) -> Option<&Bytes> {
    match values.get(i) {
        Some(Value::Text(b)) | Some(Value::Binary(b)) => Some(b),
        _ => None,
    }
}

fn text(values: &[Value], i: usize) -> Option<Result<String, ()>> {
    raw(values, i).map(|b| std::str::from_utf8(b).map(str::to_owned).map_err(|_| ()))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::source::pgoutput::RelationColumn;

    fn rel(cols: &[(&str, u32)]) -> Relation {
        Relation {
            id: 1,
            namespace: "public".into(),
            name: "outbox".into(),
            columns: cols
                .iter()
                .map(|(n, t)| RelationColumn {
                    name: (*n).into(),
                    type_oid: *t,
                })
                .collect(),
        }
    }

    fn default_rel() -> Relation {
        rel(&[
            ("id", oid::UUID),
            ("aggregate_type", oid::TEXT),
            ("aggregate_id", oid::TEXT),
            ("event_type", oid::TEXT),
            ("payload", oid::JSONB),
            ("correlation_id", oid::TEXT),
            ("causation_id", oid::TEXT),
            ("headers", oid::JSONB),
            ("created_at", oid::TIMESTAMPTZ),
        ])
    }

    fn t(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn full_row() {
        let l = Layout::bind(
            &default_rel(),
            &ColumnMapping::default(),
            &RowExtras::default(),
        )
        .expect("binds");
        let r = l
            .row(&[
                t("6d0c5d5e-0000-4000-8000-000000000001"),
                t("Order"),
                t("o-1"),
                t("OrderCreated"),
                t("{\"a\": 1}"),
                Value::Null,
                t("c-9"),
                t("{\"traceparent\": \"00-x\"}"),
                t("2026-11-23 10:49:40.123456+00"),
            ])
            .expect("valid");
        assert_eq!(r.id, "6d0c5d5e-0000-4000-8000-000000000001");
        assert_eq!(r.payload_kind, PayloadKind::Json);
        assert_eq!(r.correlation_id, None);
        assert_eq!(r.causation_id.as_deref(), Some("c-9"));
        assert_eq!(
            r.created_at.expect("time").to_rfc3339(),
            "2026-11-23T10:49:40.123456+00:00"
        );
    }

    #[test]
    fn debezium_table_binds_with_a_mapping() {
        let r = rel(&[
            ("id", oid::UUID),
            ("aggregatetype", oid::VARCHAR),
            ("aggregateid", oid::VARCHAR),
            ("type", oid::VARCHAR),
            ("payload", oid::JSONB),
        ]);
        let map = ColumnMapping {
            aggregate_type: "aggregatetype".into(),
            aggregate_id: "aggregateid".into(),
            event_type: "type".into(),
            ..ColumnMapping::default()
        };
        let l =
            Layout::bind(&r, &map, &RowExtras::default()).expect("optional columns may be absent");
        let row = l
            .row(&[t("1"), t("Order"), t("o"), t("Created"), t("{}")])
            .expect("valid");
        assert_eq!(row.headers, None);
        assert_eq!(row.created_at, None);
    }

    #[test]
    fn missing_or_retyped_required_column_is_a_schema_error() {
        let mut r = default_rel();
        r.columns.remove(4);
        let e = Layout::bind(&r, &ColumnMapping::default(), &RowExtras::default())
            .expect_err("no payload");
        assert!(
            e.to_string()
                .contains("\"payload\" (payload) does not exist"),
            "{e}"
        );
        let mut r = default_rel();
        r.columns[3].type_oid = oid::INT4;
        let e = Layout::bind(&r, &ColumnMapping::default(), &RowExtras::default())
            .expect_err("retyped");
        assert!(
            matches!(
                e,
                OutboxError::Schema {
                    role: "event_type",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn missing_values_are_invalid_rows_naming_the_id() {
        let l = Layout::bind(
            &default_rel(),
            &ColumnMapping::default(),
            &RowExtras::default(),
        )
        .expect("binds");
        let mut vals = vec![t("id-1"), t("Order"), t("o"), Value::Null, t("{}")];
        vals.extend([Value::Null, Value::Null, Value::Null, Value::Null]);
        let e = l.row(&vals).expect_err("no type");
        assert_eq!(e, invalid("id-1", "event_type is null"));
        vals[3] = t("");
        assert_eq!(
            l.row(&vals).expect_err("empty"),
            invalid("id-1", "event_type is empty")
        );
        vals[0] = Value::Null;
        assert!(matches!(l.row(&vals), Err(OutboxError::Invalid { id, .. }) if id == "<unknown>"));
    }

    #[test]
    fn bytea_payload_is_decoded() {
        let mut r = default_rel();
        r.columns[4].type_oid = oid::BYTEA;
        let l = Layout::bind(&r, &ColumnMapping::default(), &RowExtras::default()).expect("binds");
        let mut vals = vec![t("i"), t("A"), t("a"), t("T"), t("\\x00ff41")];
        vals.extend([Value::Null, Value::Null, Value::Null, Value::Null]);
        let row = l.row(&vals).expect("valid");
        assert_eq!(row.payload.as_deref(), Some(&[0x00, 0xff, 0x41][..]));
        vals[4] = t("\\x0");
        assert!(l.row(&vals).is_err());
    }

    #[test]
    fn a_null_payload_is_a_row_without_data_only_when_allowed() {
        let mut vals = vec![t("i"), t("A"), t("a"), t("Deleted"), Value::Null];
        vals.extend([Value::Null, Value::Null, Value::Null, Value::Null]);
        // Given the default: a NULL payload is an invalid row
        let l = Layout::bind(
            &default_rel(),
            &ColumnMapping::default(),
            &RowExtras::default(),
        )
        .expect("binds");
        assert_eq!(
            l.row(&vals).expect_err("null"),
            invalid("i", "payload is null")
        );
        // When the configuration accepts one
        let extras = RowExtras {
            null_payload: true,
            ..RowExtras::default()
        };
        let l = Layout::bind(&default_rel(), &ColumnMapping::default(), &extras).expect("binds");
        // Then the row has no payload, and a present payload is unchanged
        let row = l.row(&vals).expect("valid");
        assert_eq!((row.id.as_str(), row.payload), ("i", None));
        vals[4] = t("{}");
        assert_eq!(
            l.row(&vals).expect("valid").payload.as_deref(),
            Some(&b"{}"[..])
        );
    }

    #[test]
    fn extra_columns_carry_their_text_and_a_null_is_left_out() {
        // Given a table with two more columns of any type, both asked for
        let mut r = default_rel();
        r.columns.push(RelationColumn {
            name: "tenant_id".into(),
            type_oid: oid::INT8,
        });
        r.columns.push(RelationColumn {
            name: "region".into(),
            type_oid: oid::TEXT,
        });
        let extras = RowExtras {
            columns: vec!["region".into(), "tenant_id".into()],
            null_payload: false,
        };
        let l = Layout::bind(&r, &ColumnMapping::default(), &extras).expect("binds");
        // When a row has a tenant and no region
        let mut vals = vec![t("i"), t("A"), t("a"), t("T"), t("{}")];
        vals.extend([Value::Null, Value::Null, Value::Null, Value::Null]);
        vals.extend([t("42"), Value::Null]);
        let row = l.row(&vals).expect("valid");
        // Then the tenant's text travels with it and the region is absent
        assert_eq!(row.extra, vec![(Arc::from("tenant_id"), "42".to_string())]);
    }

    #[test]
    fn a_missing_extra_column_is_a_schema_error_naming_it() {
        let extras = RowExtras {
            columns: vec!["tenant_id".into()],
            null_payload: false,
        };
        let e = Layout::bind(&default_rel(), &ColumnMapping::default(), &extras)
            .expect_err("no such column");
        let text = e.to_string();
        assert!(
            text.contains("column \"tenant_id\" (additional column) does not exist"),
            "{text}"
        );
        assert!(text.contains("kafka.additional_headers"), "{text}");
    }
}
