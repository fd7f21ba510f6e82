//! The control plane: an ordinary SQL connection (tokio-postgres) for set-up and
//! checks. It creates the publication and the slot when allowed ("already exists" is
//! success), reads the slot's confirmed position, and answers `outboxd check`.
//! It never streams and never moves the slot.

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

pub use super::privileges::Privileges;
use super::tls::{self, PgTls};
use super::SourceError;
use crate::config::{split_table, Config};

/// What the server says about our slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    /// Output plugin; must be `pgoutput`.
    pub plugin: String,
    /// Confirmed flush LSN: everything before it was acknowledged.
    pub confirmed_flush_lsn: u64,
    /// Server-side PID streaming from the slot, if any.
    pub active_pid: Option<i32>,
    /// `reserved`, `extended`, `unreserved` or `lost` (invalidated).
    pub wal_status: Option<String>,
}

/// Position and WAL retention of the slot, as the server sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotStats {
    /// Server WAL position (`pg_current_wal_lsn`).
    pub server_lsn: u64,
    /// Confirmed flush LSN.
    pub confirmed_flush_lsn: u64,
    /// Server position minus confirmed flush LSN.
    pub lag_bytes: i64,
    /// Server position minus restart_lsn: WAL kept on disk for the slot.
    pub retained_bytes: i64,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Bytes that can still be written before the slot is lost, when limited.
    pub safe_wal_size: Option<i64>,
}

/// An open SQL connection.
pub struct Control {
    pub(super) client: Client,
    conn_task: tokio::task::JoinHandle<()>,
}

impl Drop for Control {
    fn drop(&mut self) {
        self.conn_task.abort();
    }
}

/// Builds the tokio-postgres config from `postgres.url` and the password file, and
/// the TLS setting both connections use (see [`super::tls`]).
pub fn pg_config(cfg: &Config) -> Result<(tokio_postgres::Config, PgTls), SourceError> {
    let (mut pg, tls) =
        tls::resolve(&cfg.postgres).map_err(|e| SourceError::Setup(e.to_string()))?;
    if let Some(pw) = cfg
        .postgres_password()
        .map_err(|e| SourceError::Setup(e.to_string()))?
    {
        pg.password(pw.expose());
    }
    if pg.get_connect_timeout().is_none() {
        // A black-holed host must not hang a reconnect loop (or the liveness watchdog).
        pg.connect_timeout(std::time::Duration::from_secs(10));
    }
    if pg.get_application_name().is_none() {
        pg.application_name("outboxd");
    }
    Ok((pg, tls))
}

/// A client of its own on the configured URL and TLS setting, for a task that keeps its
/// own connection (retention); `application_name` tells it apart in `pg_stat_activity`.
/// The connection runs on a detached task and ends when the client is dropped.
pub async fn connect_client(
    cfg: &Config,
    application_name: &str,
) -> Result<tokio_postgres::Client, SourceError> {
    let (mut pg, tls) = pg_config(cfg)?;
    pg.application_name(application_name);
    let (client, _connection) = tls::connect(&pg, &tls).await?;
    Ok(client)
}

impl Control {
    /// Connects with the configured URL and TLS setting.
    pub async fn connect(cfg: &Config) -> Result<Self, SourceError> {
        let (pg, tls) = pg_config(cfg)?;
        let (client, conn_task) = tls::connect(&pg, &tls).await?;
        Ok(Self { client, conn_task })
    }

    /// The TLS version of this connection (`TLSv1.3`), or `None` when it is plain.
    pub async fn tls_version(&self) -> Result<Option<String>, SourceError> {
        let row = self
            .client
            .query_opt(
                "SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl",
                &[],
            )
            .await
            .map_err(SourceError::query)?;
        Ok(row.and_then(|r| r.get(0)))
    }

    /// What the connected role may do (see [`Privileges`]).
    pub async fn privileges(&self, cfg: &Config) -> Result<Privileges, SourceError> {
        // The emit function is looked up, not named: its signature changed in 17.
        // Amazon RDS and Aurora grant replication by membership in rds_replication
        // instead of the REPLICATION attribute, which users cannot have there.
        let emit = super::version::EMIT_MESSAGE_FN_SQL;
        let row = self
            .client
            .query_one(
                &format!(
                    "SELECT quote_ident(current_user), r.rolsuper, \
                        r.rolreplication OR CASE WHEN to_regrole('rds_replication') IS NULL THEN false \
                            ELSE pg_has_role(to_regrole('rds_replication'), 'MEMBER') END, \
                        CASE WHEN to_regclass($1) IS NULL THEN NULL \
                             ELSE has_table_privilege(to_regclass($1), 'SELECT') END, \
                        COALESCE(has_function_privilege(({emit})::oid, 'EXECUTE'), false), \
                        (SELECT pg_has_role(c.relowner, 'USAGE') \
                                AND has_database_privilege(current_database(), 'CREATE') \
                         FROM pg_class c WHERE c.oid = to_regclass($1)), \
                        COALESCE(({emit})::text, 'pg_logical_emit_message(boolean, text, text)') \
                     FROM pg_roles r WHERE r.rolname = current_user"
                ),
                &[&cfg.postgres.table],
            )
            .await
            .map_err(SourceError::query)?;
        Ok(Privileges {
            role: row.get(0),
            superuser: row.get(1),
            replication: row.get(2),
            select: row.get(3),
            emit_message: row.get(4),
            can_publish: row.get(5),
            emit_message_fn: row.get(6),
        })
    }

    /// `server_version_num` (`170004`) and `server_version` (`17.4 (Debian …)`).
    pub async fn server_version(&self) -> Result<(i32, String), SourceError> {
        let row = self
            .client
            .query_one(
                "SELECT current_setting('server_version_num')::int, current_setting('server_version')",
                &[],
            )
            .await
            .map_err(SourceError::query)?;
        Ok((row.get(0), row.get(1)))
    }

    /// Whether the server is a standby (in recovery): it decodes (PostgreSQL 16+) but
    /// cannot write, so no heartbeat can be written there.
    pub async fn in_recovery(&self) -> Result<bool, SourceError> {
        let row = self
            .client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(SourceError::query)?;
        Ok(row.get(0))
    }

    /// The server's `wal_level`.
    pub async fn wal_level(&self) -> Result<String, SourceError> {
        let row = self
            .client
            .query_one("SHOW wal_level", &[])
            .await
            .map_err(SourceError::query)?;
        Ok(row.get(0))
    }

    /// Column names and types of `schema.table`, or `None` if it does not exist.
    pub async fn table_columns(
        &self,
        table: &str,
    ) -> Result<Option<Vec<(String, String)>>, SourceError> {
        let (schema, name) = split_table(table);
        let rows = self.attributes(schema, name).await?;
        if rows.is_empty() {
            return Ok(None);
        }
        Ok(Some(rows.iter().map(|r| (r.get(1), r.get(3))).collect()))
    }

    /// The live columns of `schema.table` in order, one row each: the table's oid,
    /// the column's name, type oid and type as SQL writes it. Empty if no such table.
    pub(super) async fn attributes(
        &self,
        schema: &str,
        table: &str,
    ) -> Result<Vec<tokio_postgres::Row>, SourceError> {
        self.client
            .query(
                "SELECT c.oid, a.attname::text, a.atttypid, format_type(a.atttypid, a.atttypmod) \
                 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped \
                 ORDER BY a.attnum",
                &[&schema, &table],
            )
            .await
            .map_err(SourceError::query)
    }

    /// Whether the connected role may delete from `table` (retention).
    pub async fn may_delete(&self, table: &str) -> Result<bool, SourceError> {
        let row = self
            .client
            .query_one(
                "SELECT has_table_privilege(current_user, $1, 'DELETE')",
                &[&table],
            )
            .await
            .map_err(SourceError::query)?;
        Ok(row.get(0))
    }

    /// `Some(includes_table)` when the publication exists.
    pub async fn publication(&self, cfg: &Config) -> Result<Option<bool>, SourceError> {
        let p = &cfg.postgres;
        let exists = self
            .client
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&p.publication],
            )
            .await
            .map_err(SourceError::query)?
            .is_some();
        if !exists {
            return Ok(None);
        }
        let (schema, name) = split_table(&p.table);
        let includes = self
            .client
            .query_opt(
                "SELECT 1 FROM pg_publication_tables \
                 WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[&p.publication, &schema, &name],
            )
            .await
            .map_err(SourceError::query)?
            .is_some();
        Ok(Some(includes))
    }

    /// Creates the publication when missing (and allowed); checks it covers the table.
    pub async fn ensure_publication(&self, cfg: &Config) -> Result<(), SourceError> {
        let p = &cfg.postgres;
        self.create_publication(cfg).await?;
        match self.publication(cfg).await? {
            Some(true) => Ok(()),
            _ => Err(SourceError::Setup(format!(
                "publication {} exists but does not include {}: run ALTER PUBLICATION {} ADD TABLE {}",
                p.publication, p.table, p.publication, p.table
            ))),
        }
    }

    /// Creates the publication when it is missing (and allowed). Whether it covers the
    /// table is the caller's question.
    pub async fn create_publication(&self, cfg: &Config) -> Result<(), SourceError> {
        let p = &cfg.postgres;
        match self.publication(cfg).await? {
            Some(_) => Ok(()),
            None if !p.create_publication => Err(SourceError::Setup(format!(
                "publication {} does not exist and postgres.create_publication = false: run `outboxd setup` \
                 and apply its SQL as the table owner",
                p.publication
            ))),
            None => match self.client.batch_execute(&super::sql::create_publication_sql(cfg)).await {
                Ok(()) => {
                    tracing::info!(publication = %p.publication, table = %p.table, "created publication");
                    Ok(())
                }
                // Another instance created it first. A creator that was still running when
                // we looked makes our insert into pg_publication wait for its commit and
                // then fail on the catalog's unique index (23505) rather than with 42710.
                Err(e)
                    if e.code() == Some(&SqlState::DUPLICATE_OBJECT)
                        || e.code() == Some(&SqlState::UNIQUE_VIOLATION) =>
                {
                    tracing::info!(publication = %p.publication, "publication created concurrently by another instance");
                    Ok(())
                }
                Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Err(SourceError::Setup(format!(
                    "table {} does not exist: create it (`outboxd setup` prints the SQL) or set \
                     postgres.table",
                    p.table
                ))),
                // Only the table's owner (with CREATE on the database) may publish it;
                // a least-privilege relay role is not, by design.
                Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => Err(SourceError::Setup(format!(
                    "cannot create publication {pub_}: {}: the table owner must create it: \
                     CREATE PUBLICATION {pub_} FOR TABLE {table} WITH (publish = 'insert'); \
                     (part 1 of `outboxd setup`), then set postgres.create_publication = false",
                    db_message(&e),
                    pub_ = p.publication,
                    table = p.table,
                ))),
                Err(e) => Err(SourceError::Setup(format!(
                    "cannot create publication {}: {}; create the publication as the table owner \
                     (see `outboxd setup`)",
                    p.publication,
                    db_message(&e)
                ))),
            },
        }
    }

    /// The slot, if it exists.
    pub async fn slot(&self, slot: &str) -> Result<Option<SlotInfo>, SourceError> {
        let row = self
            .client
            .query_opt(
                "SELECT plugin::text, confirmed_flush_lsn::text, active_pid, wal_status \
                 FROM pg_replication_slots WHERE slot_name = $1 AND slot_type = 'logical'",
                &[&slot],
            )
            .await
            .map_err(SourceError::query)?;
        let Some(row) = row else { return Ok(None) };
        let lsn: Option<String> = row.get(1);
        Ok(Some(SlotInfo {
            plugin: row.get(0),
            confirmed_flush_lsn: lsn.as_deref().map(parse_lsn).transpose()?.unwrap_or(0),
            active_pid: row.get(2),
            wal_status: row.get(3),
        }))
    }

    /// Returns the slot, creating it when missing (`outboxd setup --apply`). Creation
    /// is idempotent: a concurrent creator winning the race is success.
    pub async fn ensure_slot(&self, cfg: &Config) -> Result<SlotInfo, SourceError> {
        match self.slot(&cfg.postgres.slot).await? {
            Some(slot) => {
                check_plugin(cfg, &slot)?;
                Ok(slot)
            }
            None => self.create_slot(cfg).await.map(|(slot, _)| slot),
        }
    }

    /// Creates the slot (see [`Control::ensure_slot`]) and returns it, and whether this
    /// call created it (false: another instance did, just before).
    pub async fn create_slot(&self, cfg: &Config) -> Result<(SlotInfo, bool), SourceError> {
        let p = &cfg.postgres;
        let created = if p.failover_slot {
            let version: i32 = self
                .client
                .query_one("SELECT current_setting('server_version_num')::int", &[])
                .await
                .map_err(SourceError::query)?
                .get(0);
            if version < 170_000 {
                return Err(SourceError::Setup(format!(
                    "postgres.failover_slot = true needs PostgreSQL 17 or later (server is {version})"
                )));
            }
            self.client
                .execute(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)",
                    &[&p.slot],
                )
                .await
        } else {
            self.client
                .execute(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&p.slot],
                )
                .await
        };
        let by_us = match created {
            Ok(_) => {
                tracing::info!(slot = %p.slot, "created replication slot");
                true
            }
            Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => false,
            Err(e) => {
                let fix = if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
                    ": the role needs REPLICATION: ALTER ROLE <role> REPLICATION (as a superuser)"
                        .to_string()
                } else if db_message(&e).contains("while in recovery") {
                    format!(": {}", super::STANDBY_NEEDS_16)
                } else {
                    String::new()
                };
                return Err(SourceError::Setup(format!(
                    "cannot create replication slot {}: {}{fix}",
                    p.slot,
                    db_message(&e)
                )));
            }
        };
        let slot = self.slot(&p.slot).await?.ok_or_else(|| {
            SourceError::Setup(format!(
                "replication slot {} vanished after creation",
                p.slot
            ))
        })?;
        Ok((slot, by_us))
    }

    /// Takes the session-level advisory lock that lets one instance at a time take
    /// the initial snapshot of `slot`; false when another session holds it. Held
    /// until this connection closes (also when the process dies).
    pub async fn try_lock_snapshot(&self, slot: &str) -> Result<bool, SourceError> {
        let row = self
            .client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext('outboxd.initial_snapshot.' || $1)::bigint)",
                &[&slot],
            )
            .await
            .map_err(SourceError::query)?;
        Ok(row.get(0))
    }

    /// `pg_copy_logical_replication_slot(src, dst, temporary => false)`: a permanent
    /// slot at `src`'s position. The raw error, so the caller can tell "exists".
    pub async fn copy_slot(&self, src: &str, dst: &str) -> Result<(), tokio_postgres::Error> {
        self.client
            .execute(
                "SELECT pg_copy_logical_replication_slot($1, $2, false)",
                &[&src, &dst],
            )
            .await
            .map(|_| ())
    }

    /// Position and retention of `slot`, if it exists. On a hot standby (decoding
    /// there needs PostgreSQL 16+) the server position is the replayed one:
    /// `pg_current_wal_lsn()` fails during recovery (55000).
    pub async fn slot_stats(&self, slot: &str) -> Result<Option<SlotStats>, SourceError> {
        let row = self
            .client
            .query_opt(
                "WITH w AS (SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                                        ELSE pg_current_wal_lsn() END AS lsn) \
                 SELECT (w.lsn - '0/0')::bigint, \
                        (confirmed_flush_lsn - '0/0')::bigint, \
                        (w.lsn - confirmed_flush_lsn)::bigint, \
                        (w.lsn - restart_lsn)::bigint, \
                        wal_status, safe_wal_size \
                 FROM pg_replication_slots, w WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(SourceError::query)?;
        Ok(row.map(|r| SlotStats {
            server_lsn: r.get::<_, Option<i64>>(0).unwrap_or(0) as u64,
            confirmed_flush_lsn: r.get::<_, Option<i64>>(1).unwrap_or(0) as u64,
            lag_bytes: r.get::<_, Option<i64>>(2).unwrap_or(0),
            retained_bytes: r.get::<_, Option<i64>>(3).unwrap_or(0),
            wal_status: r.get(4),
            safe_wal_size: r.get(5),
        }))
    }

    /// Writes a transactional logical decoding message (a heartbeat).
    pub async fn emit_heartbeat(&self, prefix: &str) -> Result<(), SourceError> {
        self.client
            .execute(
                "SELECT pg_logical_emit_message(true, $1, now()::text)",
                &[&prefix],
            )
            .await
            .map(|_| ())
            .map_err(SourceError::query)
    }

    /// Runs SQL (for `setup --apply`).
    pub async fn apply(&self, sql: &str) -> Result<(), SourceError> {
        self.client
            .batch_execute(sql)
            .await
            .map_err(|e| SourceError::Setup(db_message(&e)))
    }
}

/// A slot that exists must use pgoutput.
pub fn check_plugin(cfg: &Config, slot: &SlotInfo) -> Result<(), SourceError> {
    if slot.plugin == "pgoutput" {
        return Ok(());
    }
    Err(SourceError::Setup(format!(
        "slot {} uses plugin {}, outboxd needs pgoutput: drop it or set postgres.slot",
        cfg.postgres.slot, slot.plugin
    )))
}

/// The server's message (and detail) of a database error, else the error itself.
pub fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// `X/Y` hex text to a number.
pub fn parse_lsn(s: &str) -> Result<u64, SourceError> {
    pgwire_replication::Lsn::parse(s)
        .map(|l| l.as_u64())
        .map_err(|e| SourceError::Setup(format!("server sent a malformed LSN {s:?}: {e}")))
}
