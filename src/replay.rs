//! `outboxd replay`: republish rows still present in the outbox table.
//!
//! Replay is a read of the table on an ordinary connection, never of the slot, which
//! it does not touch. Rows pass through the same column mapping (`outbox::Layout`)
//! and CloudEvents mapping as the stream, so every event keeps its original `id`:
//! JetStream (within its duplicate window) and consumers deduplicate as usual. To
//! rebuild a read model without dedup interfering, publish under another destination
//! with `--destination-prefix`.
//!
//! Order: rows are read in one REPEATABLE READ snapshot, ordered by `created_at` (when
//! mapped) then id, and published one at a time, each after the previous one's ack,
//! so every aggregate's events keep that order. The `sequence` extension of a
//! replayed event counts rows of the replay (its commit LSN is not known here).

use std::io::{IsTerminal, Write};

use chrono::{DateTime, Utc};

use crate::config::{split_table, Config};
use crate::deadletter::PoisonRow;
use crate::event::Position;
use crate::outbox::Layout;
use crate::sink::{Envelope, Sink, SinkError};
use crate::source::control::{Control, Snapshot};
use crate::source::pgoutput::{Relation, RelationColumn, Value};
use crate::source::SourceError;

/// Rows fetched per round trip.
const FETCH: i64 = 1000;

/// A replay failure.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Reading the table failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The table does not fit the mapping.
    #[error(transparent)]
    Schema(#[from] crate::outbox::OutboxError),
    /// Publishing failed (after the sink's own retries).
    #[error("publishing event {id}: {source}")]
    Sink {
        /// The event that failed.
        id: String,
        /// Why.
        #[source]
        source: SinkError,
    },
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

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Rows that matched.
    pub matched: u64,
    /// Events the broker acknowledged.
    pub published: u64,
    /// Rows that are not valid events (skipped, listed on stderr).
    pub invalid: u64,
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
) -> Result<TableRead, ReplayError> {
    let (schema, table) = split_table(&cfg.postgres.table);
    let relation = control.relation(schema, table).await?;
    let layout = Layout::bind(&relation, &cfg.postgres.columns)?;
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
        return Err(ReplayError::Usage(format!(
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

/// One row read from the table as the stream would publish it: its envelope, or the
/// poison row it is. `index` numbers the rows of the read (the `sequence` extension,
/// after a commit LSN of 0, so they sort before every streamed event).
pub(crate) fn table_envelope(
    cfg: &Config,
    layout: &Layout,
    values: &[Value],
    index: u32,
) -> Result<Envelope, PoisonRow> {
    let row = crate::source::row_or_poison(layout, values)?;
    let pos = Position {
        commit_lsn: 0,
        commit_time: row.created_at.unwrap_or_else(Utc::now),
        index,
    };
    crate::relay::envelope(cfg, Ok(row), &pos)
}

/// Runs a replay. With `dry_run`, counts and prints up to 20 of the events it would
/// send, and sends nothing.
pub async fn run(cfg: &Config, sel: &Selection, dry_run: bool) -> Result<Summary, ReplayError> {
    let mut control = Control::connect(cfg).await?;
    if let Some(fix) = control
        .privileges(cfg)
        .await?
        .missing_select(&cfg.postgres.table)
    {
        return Err(SourceError::Setup(fix).into());
    }
    let read = plan(&control, cfg, sel).await?;
    let sink = if dry_run {
        None
    } else {
        Some(
            Sink::connect(cfg, None)
                .await
                .map_err(|source| ReplayError::Sink {
                    id: "-".into(),
                    source,
                })?,
        )
    };
    let tx = control.snapshot(None).await?;
    let total = read.open(&tx).await?;

    let mut summary = Summary {
        matched: total as u64,
        ..Summary::default()
    };
    let progress = !dry_run && std::io::stderr().is_terminal();
    let mut index = 0u32;
    loop {
        let rows = tx.fetch(FETCH).await?;
        if rows.is_empty() {
            break;
        }
        for values in rows {
            let env = match table_envelope(cfg, &read.layout, &values, index) {
                Ok(env) => env,
                Err(poison) => {
                    summary.invalid += 1;
                    eprintln!("skipped: outbox row {}: {}", poison.id, poison.reason);
                    continue;
                }
            };
            index = index.wrapping_add(1);
            match &sink {
                None => {
                    if summary.published < 20 {
                        println!(
                            "would send {} {} {}/{}",
                            cloudevents::AttributesReader::id(&env.event),
                            env.event_type,
                            env.aggregate_type,
                            env.aggregate_id
                        );
                    }
                    summary.published += 1;
                }
                Some(s) => {
                    publish(s, &env).await?;
                    summary.published += 1;
                    if progress && summary.published.is_multiple_of(100) {
                        eprint!("\rreplayed {}/{}", summary.published, summary.matched);
                        let _ = std::io::stderr().flush();
                    }
                }
            }
        }
    }
    if progress {
        eprintln!("\rreplayed {}/{}", summary.published, summary.matched);
    }
    Ok(summary)
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

/// Publishes with the relay's retry policy for transient errors (bounded: a replay is
/// interactive, so after 10 attempts it stops and says so).
async fn publish(sink: &Sink, env: &Envelope) -> Result<(), ReplayError> {
    let mut attempt = 0;
    loop {
        match sink.publish(env).await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_retryable() && attempt < 10 => {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100 << attempt.min(6))).await;
            }
            Err(source) => {
                return Err(ReplayError::Sink {
                    id: cloudevents::AttributesReader::id(&env.event).to_string(),
                    source,
                })
            }
        }
    }
}

/// Builds a pgoutput-like relation (names and type OIDs) so replay binds the same
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
