//! Retention (`[retention]`, opt-in): the streaming instance deletes outbox rows that
//! are older than `retention.older_than_secs` and acknowledged by the broker, in
//! small batches, on its own connection, off the hot path.
//!
//! Which rows: `created_at < least(now() - older_than, W)`, where `W` is the commit
//! time of the newest transaction this process confirmed to the slot (the relay
//! records it after the broker acknowledged that transaction and every earlier one;
//! heartbeats keep it moving on an idle outbox). `created_at` defaults to `now()`, the
//! start of the inserting transaction, so it is never later than that transaction's
//! commit. Until this process has confirmed a transaction, nothing is deleted.
//!
//! Why a delete can never lose an event: `DELETE` only sees committed rows, and a
//! committed row's insert is already in the WAL, which the slot keeps until its
//! confirmed position passes that commit. The stream decodes the insert from the WAL,
//! not from the table, so it is published whether the row is still there or not (the
//! same reason an application may insert and delete in one transaction). `W` is
//! about *replay*, not delivery: it keeps every row that may not have been delivered
//! yet in the table, so `outboxd replay` can still reach it if the slot were lost. The
//! one exception: rows of a transaction that was still open when the transaction
//! behind `W` committed carry a `created_at` before `W` although they commit (and are
//! acknowledged) after it. Once older than the retention they may be deleted before
//! their ack. They are still delivered (they are in the WAL); only their replay from
//! the table is gone, and it takes a transaction (or a broker outage) longer than
//! `older_than_secs`, a day by default.
//!
//! Deletes are not events: the publication outboxd creates publishes inserts only,
//! and the relay ignores any other change; a publication that also publishes
//! deletes is warned about once. A failing delete (e.g. the role lacks DELETE) is
//! logged with its fix and counted; relaying never stops for it. This module never
//! touches the slot.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::{split_table, Config};
use crate::telemetry::{Role, Telemetry};

/// A failed retention round.
#[derive(Debug, thiserror::Error)]
enum RetentionError {
    /// The connection could not be made (or its settings are wrong).
    #[error("cannot connect: {0}")]
    Connect(String),
    /// A statement failed.
    #[error("{0}")]
    Query(#[from] tokio_postgres::Error),
}

/// Runs until `shutdown`: every `retention.interval_secs`, while this instance
/// streams, deletes acknowledged rows older than the retention.
pub async fn run(cfg: Arc<Config>, telemetry: Arc<Telemetry>, shutdown: CancellationToken) {
    let every = Duration::from_secs(cfg.retention.interval_secs);
    let sql = delete_sql(&cfg);
    let mut client: Option<Client> = None;
    let mut checked_publication = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        // A standby deletes nothing: only the instance that streams knows what the
        // broker acknowledged.
        if telemetry.health.role() != Role::Streaming {
            continue;
        }
        let Some(watermark) = telemetry.health.acked_commit() else {
            continue;
        };
        if client.is_none() {
            match connect(&cfg).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    telemetry.metrics.retention_errors.inc();
                    tracing::warn!(error = %e, "retention: cannot connect; next round in {}s", every.as_secs());
                    continue;
                }
            }
        }
        let Some(c) = &client else { continue };
        if !checked_publication {
            checked_publication = true;
            warn_if_deletes_published(c, &cfg).await;
        }
        match round(c, &cfg, &sql, watermark, &telemetry, &shutdown).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "retention: deleted acknowledged outbox rows"),
            Err(e) => {
                telemetry.metrics.retention_errors.inc();
                log_failure(&cfg, &e);
                if c.is_closed() {
                    client = None;
                }
            }
        }
    }
}

/// Deletes batches until one comes back short (or shutdown, or this instance stops
/// streaming); returns the rows deleted.
async fn round(
    c: &Client,
    cfg: &Config,
    sql: &str,
    watermark_micros: i64,
    t: &Telemetry,
    shutdown: &CancellationToken,
) -> Result<u64, RetentionError> {
    let older_than = cfg.retention.older_than_secs as f64;
    let watermark = watermark_micros as f64 / 1e6;
    let mut total = 0;
    while !shutdown.is_cancelled() && t.health.role() == Role::Streaming {
        let n = c.execute(sql, &[&older_than, &watermark]).await?;
        if n > 0 {
            tracing::debug!(rows = n, "retention: deleted a batch");
        }
        t.metrics.retention_deleted_rows.inc_by(n);
        total += n;
        if n < u64::from(cfg.retention.batch_size) {
            break;
        }
    }
    Ok(total)
}

/// One batch: at most `batch_size` of the oldest deletable rows, skipping rows that
/// an application transaction holds locked (they are taken in a later round).
/// `$1` = retention in seconds, `$2` = the watermark as Unix seconds.
fn delete_sql(cfg: &Config) -> String {
    let (schema, table) = split_table(&cfg.postgres.table);
    let c = &cfg.postgres.columns;
    format!(
        "DELETE FROM {schema}.{table} WHERE {id} IN (\
           SELECT {id} FROM {schema}.{table} \
           WHERE {created} < least(now() - make_interval(secs => $1::float8), to_timestamp($2::float8)) \
           ORDER BY {created} LIMIT {n} FOR UPDATE SKIP LOCKED)",
        id = c.id,
        created = c.created_at,
        n = cfg.retention.batch_size,
    )
}

async fn connect(cfg: &Config) -> Result<Client, RetentionError> {
    crate::source::control::connect_client(cfg, "outboxd-retention")
        .await
        .map_err(|e| RetentionError::Connect(e.to_string()))
}

/// Deletes published as changes would travel to outboxd (which ignores them): say so.
async fn warn_if_deletes_published(c: &Client, cfg: &Config) {
    let p = &cfg.postgres.publication;
    if let Ok(Some(row)) = c
        .query_opt(
            "SELECT pubdelete FROM pg_publication WHERE pubname = $1",
            &[p],
        )
        .await
    {
        if row.get::<_, bool>(0) {
            tracing::warn!(publication = %p, "retention: the publication also publishes deletes; outboxd ignores them, but they still travel the replication stream: ALTER PUBLICATION {p} SET (publish = 'insert')");
        }
    }
}

fn log_failure(cfg: &Config, e: &RetentionError) {
    let table = &cfg.postgres.table;
    let role = crate::source::control::pg_config(cfg)
        .ok()
        .and_then(|(p, _)| p.get_user().map(str::to_string))
        .unwrap_or_else(|| "<role>".into());
    match e {
        RetentionError::Query(q) if q.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
            tracing::error!(error = %crate::source::control::db_message(q), "retention: cannot delete from the outbox; relaying goes on. Fix: GRANT DELETE ON {table} TO {role} (or set retention.enabled = false)");
        }
        RetentionError::Query(q) => {
            tracing::warn!(error = %crate::source::control::db_message(q), "retention: delete failed; relaying goes on, retrying next round");
        }
        RetentionError::Connect(_) => {
            tracing::warn!(error = %e, "retention: delete failed; relaying goes on, retrying next round");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delete_is_batched_and_bounded_by_both_limits() {
        let mut cfg = Config::default();
        cfg.retention.batch_size = 50;
        cfg.postgres.columns.created_at = "ts".into();
        let sql = delete_sql(&cfg);
        assert!(
            sql.starts_with("DELETE FROM public.outbox WHERE id IN (SELECT id FROM public.outbox"),
            "{sql}"
        );
        assert!(
            sql.contains(
                "ts < least(now() - make_interval(secs => $1::float8), to_timestamp($2::float8))"
            ),
            "{sql}"
        );
        assert!(sql.contains("LIMIT 50 FOR UPDATE SKIP LOCKED"), "{sql}");
    }
}
