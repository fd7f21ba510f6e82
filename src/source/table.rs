//! Reading the outbox table itself, inside one snapshot, instead of the stream:
//! `outboxd replay` and the initial snapshot both pick rows with a [`Selection`],
//! bind the stream's column mapping to the table's current columns (`plan`) and
//! read them with a cursor in `created_at` (when mapped) then id order. Never touches
//! the slot.

use chrono::{DateTime, Utc};

use super::control::Control;
use super::outbox::{Layout, OutboxError};
use super::pgoutput::{Relation, RelationColumn, Value};
use super::SourceError;
use crate::config::{split_table, Config};

/// Why the table cannot be read as planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// Reading the table failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The table does not fit the mapping.
    #[error(transparent)]
    Schema(#[from] OutboxError),
    /// A selector is not usable.
    #[error("{0}")]
    Usage(String),
}

/// Which rows to replay; all given selectors must match.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// `created_at >= from`.
    pub from_time: Option<DateTime<Utc>>,
    /// `created_at < to`.
    pub to_time: Option<DateTime<Utc>>,
    /// `id >= from_id` (in the id column's own type order).
    pub from_id: Option<String>,
    /// `id <= to_id`.
    pub to_id: Option<String>,
    /// Exact aggregate type.
    pub aggregate_type: Option<String>,
    /// Exact aggregate id.
    pub aggregate_id: Option<String>,
    /// Rows written by transactions with a (64-bit) xid at least this: the gap after
    /// a lost slot, as `outboxd_slots.replay_from_xid` records it (`source::state`).
    pub since_xid: Option<u64>,
}

/// The outbox table as replay and the initial snapshot read it: the stream's column
/// mapping, the selection, and the order (`created_at` when mapped, then id).
pub(crate) struct TableRead {
    /// The stream's column mapping bound to the table's current columns.
    pub(crate) layout: Layout,
    /// `schema.table [WHERE ...]`, with `$n` placeholders for `params`.
    from: String,
    params: Vec<String>,
    /// The whole `SELECT ... ORDER BY ...`.
    select: String,
}

impl TableRead {
    /// Counts the matching rows in `tx` and opens its cursor over them.
    pub(crate) async fn open(&self, tx: &Snapshot<'_>) -> Result<i64, SourceError> {
        let total = tx.count(&self.from, &self.params).await?;
        tx.declare(&self.select, &self.params).await?;
        Ok(total)
    }
}

/// Plans the read of the rows `sel` selects (identifiers come from the validated
/// config, selector values become parameters).
pub(crate) async fn plan(
    control: &Control,
    cfg: &Config,
    sel: &Selection,
) -> Result<TableRead, PlanError> {
    let (schema, table) = split_table(&cfg.postgres.table);
    let relation = control.relation(schema, table).await?;
    let layout = Layout::bind(&relation, &cfg.postgres.columns, &cfg.row_extras())?;
    let c = &cfg.postgres.columns;
    let present = |name: &str| {
        relation
            .columns
            .iter()
            .any(|col| col.name == name)
            .then(|| name.to_string())
    };
    let created = present(&c.created_at);
    if created.is_none() && (sel.from_time.is_some() || sel.to_time.is_some()) {
        return Err(PlanError::Usage(format!(
            "--from/--to need a created_at column; {} has no column {:?} (postgres.columns.created_at)",
            cfg.postgres.table, c.created_at
        )));
    }
    let mut conds = Vec::new();
    let mut params: Vec<String> = Vec::new();
    let mut add = |cond: String, value: String| {
        params.push(value);
        conds.push(cond.replace('?', &format!("${}", params.len())));
    };
    if let (Some(t), Some(col)) = (&sel.from_time, &created) {
        add(format!("{col} >= ?::text::timestamptz"), t.to_rfc3339());
    }
    if let (Some(t), Some(col)) = (&sel.to_time, &created) {
        add(format!("{col} < ?::text::timestamptz"), t.to_rfc3339());
    }
    let id_cast = relation
        .columns
        .iter()
        .find(|col| col.name == c.id)
        .map(|col| sql_type(col))
        .unwrap_or("text");
    if let Some(v) = &sel.from_id {
        add(format!("{} >= ?::text::{id_cast}", c.id), v.clone());
    }
    if let Some(v) = &sel.to_id {
        add(format!("{} <= ?::text::{id_cast}", c.id), v.clone());
    }
    if let Some(v) = &sel.aggregate_type {
        add(format!("{}::text = ?", c.aggregate_type), v.clone());
    }
    if let Some(v) = &sel.aggregate_id {
        add(format!("{}::text = ?", c.aggregate_id), v.clone());
    }
    if let Some(xid) = sel.since_xid {
        // Rows carry 32-bit xids: compare by age, which counts across wraparound
        // (a row as new as the threshold, or newer, is at most as old).
        add(
            "age(xmin) <= age((?::text::bigint % 4294967296)::text::xid)".to_string(),
            xid.to_string(),
        );
    }
    let columns: Vec<String> = relation
        .columns
        .iter()
        .map(|col| format!("{}::text", col.name))
        .collect();
    let order = match &created {
        Some(col) => format!("{col}, {}", c.id),
        None => c.id.clone(),
    };
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    let from = format!("{schema}.{table}{filter}");
    let select = format!("SELECT {} FROM {from} ORDER BY {order}", columns.join(", "));
    Ok(TableRead {
        layout,
        from,
        params,
        select,
    })
}

/// The SQL type to cast an id selector to, so ranges follow the column's own order.
fn sql_type(col: &RelationColumn) -> &'static str {
    match col.type_oid {
        2950 => "uuid",
        20 => "bigint",
        23 => "integer",
        _ => "text",
    }
}

/// A read-only REPEATABLE READ transaction reading the outbox through a cursor
/// (`outboxd replay`), with the same text rendering as the stream (ISO dates, UTC).
pub struct Snapshot<'a> {
    tx: tokio_postgres::Transaction<'a>,
}

fn sql_params(params: &[String]) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    params
        .iter()
        .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect()
}

impl Snapshot<'_> {
    /// `SELECT count(*) FROM <from>`.
    pub async fn count(&self, from: &str, params: &[String]) -> Result<i64, SourceError> {
        let row = self
            .tx
            .query_one(&format!("SELECT count(*) FROM {from}"), &sql_params(params))
            .await
            .map_err(SourceError::query)?;
        Ok(row.get(0))
    }

    /// Opens the cursor over `select`.
    pub async fn declare(&self, select: &str, params: &[String]) -> Result<(), SourceError> {
        self.tx
            .execute(
                &format!("DECLARE replay NO SCROLL CURSOR FOR {select}"),
                &sql_params(params),
            )
            .await
            .map(|_| ())
            .map_err(SourceError::query)
    }

    /// The next `n` rows as text values (empty at the end).
    pub async fn fetch(&self, n: i64) -> Result<Vec<Vec<Value>>, SourceError> {
        let rows = self
            .tx
            .query(&format!("FETCH {n} FROM replay"), &[])
            .await
            .map_err(SourceError::query)?;
        Ok(rows.iter().map(values_of).collect())
    }
}

impl Control {
    /// The table's columns (names and type OIDs), as a Relation message would give them.
    pub async fn relation(&self, schema: &str, table: &str) -> Result<Relation, SourceError> {
        let rows = self.attributes(schema, table).await?;
        let Some(first) = rows.first() else {
            return Err(SourceError::Setup(format!(
                "table {schema}.{table} does not exist"
            )));
        };
        let id: u32 = first.get(0);
        let cols = rows
            .iter()
            .map(|r| (r.get::<_, String>(1), r.get::<_, u32>(2)))
            .collect();
        Ok(relation_of(id, schema, table, cols))
    }

    /// Starts a read-only snapshot for a replay; with `exported`, the snapshot a slot
    /// creation exported (the initial snapshot), so it sees exactly the transactions
    /// committed before the slot's consistent point.
    pub async fn snapshot(&mut self, exported: Option<&str>) -> Result<Snapshot<'_>, SourceError> {
        let tx = self
            .client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(SourceError::query)?;
        if let Some(name) = exported {
            // Must come before the transaction's first query. The name was checked
            // to be `[0-9A-F-]+` where it was read (source::export).
            tx.batch_execute(&format!("SET TRANSACTION SNAPSHOT '{name}'"))
                .await
                .map_err(SourceError::query)?;
        }
        tx.batch_execute("SET LOCAL datestyle = ISO; SET LOCAL timezone = 'UTC'")
            .await
            .map_err(SourceError::query)?;
        Ok(Snapshot { tx })
    }
}

/// Builds a pgoutput-like relation (names and type OIDs) so a table read binds the same
/// `Layout` as the stream.
pub(crate) fn relation_of(
    id: u32,
    schema: &str,
    table: &str,
    cols: Vec<(String, u32)>,
) -> Relation {
    Relation {
        id,
        namespace: schema.to_string(),
        name: table.to_string(),
        columns: cols
            .into_iter()
            .map(|(name, type_oid)| RelationColumn { name, type_oid })
            .collect(),
    }
}

/// Text values of one row, as the stream would carry them.
pub(crate) fn values_of(row: &tokio_postgres::Row) -> Vec<Value> {
    (0..row.len())
        .map(|i| match row.get::<_, Option<String>>(i) {
            Some(s) => Value::Text(bytes::Bytes::from(s)),
            None => Value::Null,
        })
        .collect()
}
