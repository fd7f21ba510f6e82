//! The Postgres source: one replication connection streaming pgoutput from our slot.
//!
//! ```text
//!   outbox INSERT ──WAL──▶ walsender (pgoutput, protocol 1, publication)
//!        ──▶ pgwire-replication worker (keepalives, status updates)
//!        ──▶ Stream::next  (Begin / Relation / Insert / Commit decoded here)
//!        ──▶ relay
//!   relay ──confirm(commit end LSN)──▶ worker ──standby status update──▶ slot
//! ```
//!
//! Progress: pgoutput protocol 1 sends a transaction only after it committed, whole,
//! in commit order. The relay confirms a transaction's *end LSN* once every event of
//! it and of all earlier transactions is acknowledged by the broker; the worker
//! reports it as flush position, and Postgres moves the slot's `confirmed_flush_lsn`
//! and may recycle WAL before it. On restart we stream from `confirmed_flush_lsn`, so
//! anything not confirmed is sent again (at-least-once). We never report a position
//! we have not confirmed: until the first confirmation the worker reports the slot's
//! own confirmed position (`ack_lsn`).
//!
//! Keepalives are answered by the worker even while the relay applies backpressure,
//! so a slow broker never trips `wal_sender_timeout`.

pub mod control;
pub(crate) mod export;
pub mod message;
pub mod monitor;
pub mod outbox;
pub mod pgoutput;
pub mod privileges;
pub mod sql;
pub mod state;
pub mod table;
pub mod tls;
pub mod version;

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use pgwire_replication::{
    FeedbackObserver, Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent,
    TlsConfig,
};

use crate::config::{split_table, ColumnMapping, Config, RowExtras};
use outbox::{Layout, OutboxError, OutboxRow, PoisonRow};
use pgoutput::Message;

/// Microseconds between the Unix epoch and the Postgres epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// A source failure, sorted by what happens next.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Cannot reach or talk to Postgres right now: reconnect with backoff.
    #[error("postgres connection: {0}")]
    Connection(String),
    /// Another process streams from the slot (SQLSTATE 55006): be a standby.
    #[error("slot in use by another process: {0}")]
    SlotBusy(String),
    /// The server or the configuration is not set up for outboxd: stop and tell.
    #[error("{0}")]
    Setup(String),
    /// The slot was lost, or the table or publication it streams from changed: a gap
    /// is possible and only an operator can accept it. Wait (not ready) and tell.
    #[error("{0}")]
    Blocked(String),
    /// The outbox table changed shape: stop and tell.
    #[error(transparent)]
    Schema(#[from] OutboxError),
    /// The stream carried something we cannot decode: stop.
    #[error("pgoutput: {0}")]
    Decode(#[from] pgoutput::DecodeError),
}

impl SourceError {
    /// True when a reconnect may cure it.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SourceError::Connection(_) | SourceError::SlotBusy(_))
    }

    fn connect(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) if transient(db.code()) => {
                SourceError::Connection(format!("cannot connect: {}", control::db_message(&e)))
            }
            // The server answered for good: wrong password, unknown database, no pg_hba entry.
            Some(_) => SourceError::Setup(format!(
                "cannot connect to postgres: {}",
                control::db_message(&e)
            )),
            None => SourceError::Connection(format!("cannot connect: {e}")),
        }
    }

    fn query(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) if transient(db.code()) => SourceError::Connection(control::db_message(&e)),
            Some(_) => SourceError::Setup(control::db_message(&e)),
            None => SourceError::Connection(e.to_string()),
        }
    }

    fn replication(e: PgWireError) -> Self {
        if e.is_auth() || e.is_tls() || e.is_message_too_large() {
            return SourceError::Setup(format!("replication connection: {e}"));
        }
        if e.is_server() {
            let msg = e.to_string();
            // The slot is the lock: only one connection streams from it at a time.
            if msg.contains("SQLSTATE 55006") || msg.contains("is active for PID") {
                return SourceError::SlotBusy(msg);
            }
            // The walsender decodes with the catalog of the change's time: a publication
            // dropped (and perhaps created again) since is missing there. Reconnect: the
            // next session's set-up compares the publication with the slot's record and
            // tells the operator what recovers (see `relay::setup`).
            if msg.contains("publication") && msg.contains("does not exist") {
                return SourceError::Connection(msg);
            }
            // Errors the server will repeat on every attempt until an operator acts.
            for (needle, fix) in [
                (
                    "does not exist",
                    "check postgres.slot / postgres.publication (see `outboxd check`)",
                ),
                (
                    "permission denied",
                    "the role needs REPLICATION: ALTER ROLE <role> REPLICATION",
                ),
                (
                    "must be superuser or replication",
                    "the role needs REPLICATION: ALTER ROLE <role> REPLICATION",
                ),
                (
                    "no pg_hba.conf entry for replication",
                    "add a `host replication <role> ...` line to pg_hba.conf",
                ),
                (
                    "logical decoding requires",
                    "set wal_level = logical and restart Postgres",
                ),
                ("cannot be used while in recovery", STANDBY_NEEDS_16),
                (
                    "unrecognized pgoutput option: messages",
                    "outboxd needs PostgreSQL 14 or later: pgoutput carries logical decoding \
                     messages (heartbeats, the table-less outbox) from 14 on",
                ),
            ] {
                if msg.contains(needle) {
                    return SourceError::Setup(format!("replication connection: {msg}: {fix}"));
                }
            }
        }
        SourceError::Connection(e.to_string())
    }
}

/// The fix for "logical decoding cannot be used while in recovery".
pub(crate) const STANDBY_NEEDS_16: &str =
    "postgres.url points at a standby, and logical decoding on a standby needs PostgreSQL 16 or \
     later: point it at the primary";

/// SQLSTATE classes that mean "not now" rather than "not this way": connection
/// exceptions (08), insufficient resources (53, e.g. too many connections), operator
/// intervention (57: starting up, shutting down, admin shutdown), and transaction
/// rollbacks (40). A restart of Postgres answers 57P03 for a while: that must be a
/// retry, not a stop.
fn transient(code: &tokio_postgres::error::SqlState) -> bool {
    let c = code.code();
    ["08", "53", "57", "40"]
        .iter()
        .any(|class| c.starts_with(class))
}

/// One item of the stream, in commit order.
#[derive(Debug)]
pub enum Change {
    /// A transaction starts.
    Begin {
        /// Transaction id.
        xid: u32,
        /// Commit time.
        commit_time: DateTime<Utc>,
        /// LSN of the commit record.
        commit_lsn: u64,
    },
    /// An outbox row (or why it is not a valid one: a poison row).
    Row(Box<Result<OutboxRow, PoisonRow>>),
    /// The transaction ends; confirm `end_lsn` once all its events are acknowledged.
    Commit {
        /// End of the commit record.
        end_lsn: u64,
    },
    /// The server's position while nothing is sent: safe to confirm when nothing is
    /// pending (see relay).
    Idle {
        /// Server WAL end.
        wal_end: u64,
    },
}

/// An open replication stream.
pub struct Stream {
    client: ReplicationClient,
    layouts: HashMap<u32, Layout>,
    columns: ColumnMapping,
    extras: RowExtras,
    table: (String, String),
    message_prefix: String,
}

impl Stream {
    /// Opens a replication connection and starts streaming after `start_lsn`.
    pub async fn start(cfg: &Config, start_lsn: u64) -> Result<Self, SourceError> {
        let (rcfg, explain) = replication_config(cfg, start_lsn)?;
        let mut client = ReplicationClient::connect_gated(rcfg)
            .await
            .map_err(&explain)?;
        // A SQL_ASCII database stores text as bytes, unchecked; sent to a UTF8 client
        // (the replication session's default) a row that is not UTF-8 makes the
        // walsender fail, every time it is decoded: the slot could never move past it.
        // Raw bytes instead let the row reach us, where it is a poison row ("not UTF-8").
        let encoding = client
            .simple_query("SHOW server_encoding")
            .await
            .map_err(&explain)?;
        let sql_ascii = encoding
            .first()
            .and_then(|row| row.first())
            .and_then(|v| v.as_deref())
            == Some(&b"SQL_ASCII"[..]);
        if sql_ascii {
            client
                .simple_query("SET client_encoding = 'SQL_ASCII'")
                .await
                .map_err(&explain)?;
        }
        client.start().await.map_err(&explain)?;
        client.wait_started().await.map_err(&explain)?;
        let (schema, name) = split_table(&cfg.postgres.table);
        Ok(Self {
            client,
            layouts: HashMap::new(),
            columns: cfg.postgres.columns.clone(),
            extras: cfg.row_extras(),
            table: (schema.to_string(), name.to_string()),
            message_prefix: cfg.postgres.message_prefix.clone(),
        })
    }

    /// The next change; `Ok(None)` when the stream ended cleanly.
    pub async fn next(&mut self) -> Result<Option<Change>, SourceError> {
        loop {
            let Some(ev) = self.client.recv().await.map_err(SourceError::replication)? else {
                return Ok(None);
            };
            match ev {
                ReplicationEvent::Begin {
                    final_lsn,
                    xid,
                    commit_time_micros,
                } => {
                    return Ok(Some(Change::Begin {
                        xid,
                        commit_time: pg_time(commit_time_micros),
                        commit_lsn: final_lsn.as_u64(),
                    }))
                }
                ReplicationEvent::Commit { end_lsn, .. } => {
                    return Ok(Some(Change::Commit {
                        end_lsn: end_lsn.as_u64(),
                    }))
                }
                ReplicationEvent::KeepAlive { wal_end, .. } => {
                    return Ok(Some(Change::Idle {
                        wal_end: wal_end.as_u64(),
                    }))
                }
                ReplicationEvent::XLogData { data, .. } => match pgoutput::decode(data)? {
                    Message::Relation(rel) => {
                        if (rel.namespace.as_str(), rel.name.as_str())
                            != (self.table.0.as_str(), self.table.1.as_str())
                        {
                            tracing::warn!(table = %format!("{}.{}", rel.namespace, rel.name), "publication carries a table that is not the outbox; its rows are ignored");
                            continue;
                        }
                        // A Relation arrives before the first row after every schema
                        // change: re-bind, so ADD COLUMN just works and a dropped or
                        // retyped mapped column stops the relay with its name.
                        let layout = Layout::bind(&rel, &self.columns, &self.extras)?;
                        tracing::info!(
                            relation = rel.id,
                            columns = rel.columns.len(),
                            "outbox relation bound"
                        );
                        self.layouts.insert(rel.id, layout);
                    }
                    Message::Insert { relation, values } => {
                        let Some(layout) = self.layouts.get(&relation) else {
                            continue;
                        };
                        let row = row_or_poison(layout, &values);
                        return Ok(Some(Change::Row(Box::new(row))));
                    }
                    Message::Ignored(tag) => {
                        tracing::debug!(tag = %tag, "pgoutput message not used by an insert-only outbox");
                    }
                },
                ReplicationEvent::Message {
                    prefix,
                    transactional,
                    content,
                    ..
                } => {
                    if self.message_prefix.is_empty() || prefix != self.message_prefix {
                        // Heartbeats and other applications' messages.
                        tracing::trace!(%prefix, transactional, "logical decoding message ignored");
                    } else if !transactional {
                        // Not tied to a transaction: it may stand for work that rolled
                        // back, and has no commit to order or confirm it by.
                        tracing::warn!(%prefix, "non-transactional outbox message ignored: emit it with pg_logical_emit_message(true, ...)");
                    } else {
                        return Ok(Some(Change::Row(Box::new(message::decode(&content)))));
                    }
                }
                ReplicationEvent::StoppedAt { .. } => return Ok(None),
            }
        }
    }

    /// Confirms everything up to `lsn` (monotonic; an older value is a no-op).
    pub fn confirm(&self, lsn: u64) {
        self.client.update_applied_lsn(Lsn(lsn));
    }

    /// Sends the last confirmed position (waiting at most `timeout`), then ends the
    /// stream so the slot is free for another process at once.
    pub async fn close(mut self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.client.feedback_pending_since().is_some()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Err(e) = tokio::time::timeout_at(deadline, self.client.shutdown())
            .await
            .unwrap_or(Ok(()))
        {
            tracing::debug!(error = %e, "replication stream ended with an error during shutdown");
        }
    }
}

/// The replication session's settings: the slot and publication of `cfg`, starting
/// (and reporting as confirmed) `start_lsn`.
/// The replication connection's settings (TLS included), and how to explain its
/// errors: a TLS failure names what failed and the key to change.
fn replication_config(
    cfg: &Config,
    start_lsn: u64,
) -> Result<(ReplicationConfig, impl Fn(PgWireError) -> SourceError), SourceError> {
    let (pg, tls) = control::pg_config(cfg)?;
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let user = pg.get_user().unwrap_or("postgres").to_string();
    let password = pg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let dbname = pg
        .get_dbname()
        .map(str::to_string)
        .unwrap_or_else(|| user.clone());
    let rcfg = ReplicationConfig::new(
        host.clone(),
        user,
        password,
        dbname,
        cfg.postgres.slot.clone(),
        cfg.postgres.publication.clone(),
    )
    .with_port(port)
    .with_tls(if host.starts_with('/') {
        // A Unix socket carries no TLS (a mode that needs it is refused at start-up).
        TlsConfig::disabled()
    } else {
        tls.for_host(&host)
    })
    .with_start_lsn(Lsn(start_lsn))
    .with_ack_lsn(Lsn(start_lsn))
    .with_status_interval(cfg.status_interval())
    .with_wakeup_interval(Duration::from_secs(10))
    .with_application_name("outboxd")
    // An observer makes the worker track confirmations not yet reported, which
    // `close` waits on so the final position reaches the server before we exit.
    .with_feedback_observer(FeedbackObserver::new(|_sent| {}))
    // Text values must render the same on every server: ISO dates in UTC.
    .with_options("-c datestyle=ISO -c timezone=UTC");
    let explain = move |e: PgWireError| {
        if e.is_tls() {
            tls.explain(&e, &host, port)
        } else {
            SourceError::replication(e)
        }
    };
    Ok((rcfg, explain))
}

/// A table row's values through `layout`: the typed row, or the poison row it is
/// (the stream, replay and the initial snapshot all judge rows by this).
pub(crate) fn row_or_poison(
    layout: &Layout,
    values: &[pgoutput::Value],
) -> Result<OutboxRow, PoisonRow> {
    layout.row(values).map_err(|e| {
        let (row, aggregate_id) = layout.raw(values);
        let (id, reason) = match e {
            OutboxError::Invalid { id, reason } => (id, reason),
            other => ("<unknown>".to_string(), other.to_string()),
        };
        PoisonRow {
            id,
            aggregate_id,
            code: "invalid_row",
            reason,
            row,
        }
    })
}

fn pg_time(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros.saturating_add(PG_EPOCH_OFFSET_MICROS))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_epoch_is_2000() {
        assert_eq!(pg_time(0).to_rfc3339(), "2000-01-01T00:00:00+00:00");
        assert_eq!(
            pg_time(1_500_000).to_rfc3339(),
            "2000-01-01T00:00:01.500+00:00"
        );
    }
}
