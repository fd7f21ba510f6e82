//! Reading and writing the slot's record (`<schema>.outboxd_slots`, see the parent
//! module): the SQL behind the decisions the parent module makes.

use chrono::DateTime;

use super::{state_fix, state_table, Identity, SlotRecord, StateAccess, XminMark};
use crate::config::{split_table, Config};
use crate::lsn::lsn_text;
use crate::source::control::{db_message, Control};
use crate::source::SourceError;

impl Control {
    /// Whether the slot's record can be kept, without changing anything: the state
    /// table exists and may be written, or may be created.
    pub async fn state_access(&self, cfg: &Config) -> Result<StateAccess, SourceError> {
        let (schema, _) = split_table(&cfg.postgres.table);
        let row = self
            .client
            .query_one(
                "SELECT pg_is_in_recovery(), to_regclass($1) IS NOT NULL, \
                        CASE WHEN to_regclass($1) IS NULL THEN NULL \
                             ELSE has_table_privilege(to_regclass($1), 'SELECT, INSERT, UPDATE') END, \
                        has_schema_privilege($2, 'CREATE')",
                &[&state_table(cfg), &schema],
            )
            .await
            .map_err(SourceError::query)?;
        let (in_recovery, exists, writable, may_create): (bool, bool, Option<bool>, bool) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        Ok(if in_recovery {
            StateAccess::InRecovery
        } else if exists && writable == Some(false) {
            StateAccess::NotPermitted(format!(
                "the role may not write {}: {}",
                state_table(cfg),
                state_fix(cfg)
            ))
        } else if !exists && !may_create {
            StateAccess::NotPermitted(format!(
                "{} does not exist and the role may not create it: {}",
                state_table(cfg),
                state_fix(cfg)
            ))
        } else {
            StateAccess::Writable
        })
    }

    /// Makes sure the state table exists and may be written (creating it when the role
    /// may). A role that may not, on a table the owner has not created, is reported,
    /// not refused: the relay's own job goes on, without the record's protection.
    pub async fn prepare_state(&self, cfg: &Config) -> Result<StateAccess, SourceError> {
        let access = self.state_access(cfg).await?;
        if access != StateAccess::Writable {
            return Ok(access);
        }
        let exists: bool = self
            .client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&state_table(cfg)])
            .await
            .map_err(SourceError::query)?
            .get(0);
        if !exists {
            if let Err(e) = self
                .client
                .batch_execute(&crate::source::sql::create_state_table_sql(cfg))
                .await
            {
                // Replicas starting together race to create it: `IF NOT EXISTS` is
                // not atomic, and the loser gets a unique violation on the catalog
                // (23505) or `duplicate_table` (42P07). The table is there either way.
                let code = e.code().map(|c| c.code().to_string()).unwrap_or_default();
                if code == "23505" || code == "42P07" {
                    tracing::debug!(table = %state_table(cfg), "another instance created the slot state table");
                    return self.state_access(cfg).await;
                }
                if code.starts_with("42") {
                    return Ok(StateAccess::NotPermitted(format!(
                        "cannot create {}: {}; {}",
                        state_table(cfg),
                        db_message(&e),
                        state_fix(cfg)
                    )));
                }
                return Err(SourceError::query(e));
            }
            tracing::info!(table = %state_table(cfg), "created the slot state table");
        }
        Ok(StateAccess::Writable)
    }

    /// The record of the configured slot, if any. `None` too when the state table
    /// does not exist (nothing was ever recorded).
    pub async fn slot_record(&self, cfg: &Config) -> Result<Option<SlotRecord>, SourceError> {
        let table = state_table(cfg);
        let exists: bool = self
            .client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await
            .map_err(SourceError::query)?
            .get(0);
        if !exists {
            return Ok(None);
        }
        let row = self
            .client
            .query_opt(
                &format!(
                    "SELECT publication_oid, table_oid, (confirmed_lsn - '0/0')::bigint, \
                            (extract(epoch FROM confirmed_at) * 1000000)::bigint, \
                            replay_from_xid::text::bigint, resync \
                     FROM {table} WHERE slot_name = $1"
                ),
                &[&cfg.postgres.slot],
            )
            .await
            .map_err(SourceError::query)?;
        Ok(row.map(|r| SlotRecord {
            publication_oid: r.get(0),
            table_oid: r.get(1),
            confirmed_lsn: r.get::<_, i64>(2) as u64,
            confirmed_at: DateTime::from_timestamp_micros(r.get(3)).unwrap_or_default(),
            replay_from_xid: r.get::<_, Option<i64>>(4).map(|x| x as u64),
            resync: r.get(5),
        }))
    }

    /// The table and the publication as they are now.
    pub async fn identity(&self, cfg: &Config) -> Result<Identity, SourceError> {
        let p = &cfg.postgres;
        let (schema, name) = split_table(&p.table);
        let row = self
            .client
            .query_one(
                "SELECT to_regclass($1)::oid, \
                        (SELECT oid FROM pg_publication WHERE pubname = $2), \
                        EXISTS (SELECT 1 FROM pg_publication_tables \
                                WHERE pubname = $2 AND schemaname = $3 AND tablename = $4)",
                &[&p.table, &p.publication, &schema, &name],
            )
            .await
            .map_err(SourceError::query)?;
        Ok(Identity {
            table_oid: row.get(0),
            publication_oid: row.get(1),
            published: row.get(2),
        })
    }

    /// A snapshot's xmin and the WAL position after it (see the module docs).
    pub async fn xmin_mark(&self) -> Result<XminMark, SourceError> {
        let row = self
            .client
            .query_one(
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint, \
                        (pg_current_wal_lsn() - '0/0')::bigint",
                &[],
            )
            .await
            .map_err(SourceError::query)?;
        Ok(XminMark {
            xmin: row.get::<_, i64>(0) as u64,
            wal: row.get::<_, i64>(1) as u64,
        })
    }

    /// Records the slot as (newly) streamed from: its publication and table, its
    /// position, and `replay_from_xid` (`None`: unknown). With `fresh`, the row is
    /// replaced (a new slot, a finished resync); otherwise an existing row keeps the
    /// older (smaller) xid, which selects more and is never wrong.
    pub async fn record_slot(
        &self,
        cfg: &Config,
        identity: &Identity,
        confirmed_lsn: u64,
        replay_from_xid: Option<u64>,
        fresh: bool,
    ) -> Result<(), SourceError> {
        let (Some(table_oid), Some(publication_oid)) =
            (identity.table_oid, identity.publication_oid)
        else {
            return Ok(());
        };
        let on_conflict = if fresh {
            "publication = EXCLUDED.publication, publication_oid = EXCLUDED.publication_oid, \
             table_oid = EXCLUDED.table_oid, confirmed_lsn = EXCLUDED.confirmed_lsn, \
             confirmed_at = EXCLUDED.confirmed_at, replay_from_xid = EXCLUDED.replay_from_xid, \
             resync = NULL"
        } else {
            "replay_from_xid = LEAST(t.replay_from_xid, EXCLUDED.replay_from_xid)"
        };
        let xid = replay_from_xid.map(|x| x as i64);
        self.client
            .execute(
                &format!(
                    "INSERT INTO {} AS t (slot_name, publication, publication_oid, table_oid, \
                         confirmed_lsn, confirmed_at, replay_from_xid) \
                     VALUES ($1, $2, $3, $4, $5::text::pg_lsn, now(), $6::bigint::text::xid8) \
                     ON CONFLICT (slot_name) DO UPDATE SET {on_conflict}",
                    state_table(cfg)
                ),
                &[
                    &cfg.postgres.slot,
                    &cfg.postgres.publication,
                    &publication_oid,
                    &table_oid,
                    &lsn_text(confirmed_lsn),
                    &xid,
                ],
            )
            .await
            .map(|_| ())
            .map_err(SourceError::query)
    }

    /// Records the slot's confirmed position, and a newer `replay_from_xid` when one is
    /// known to hold for it.
    pub async fn record_position(
        &self,
        cfg: &Config,
        confirmed_lsn: u64,
        replay_from_xid: Option<u64>,
    ) -> Result<(), SourceError> {
        self.client
            .execute(
                &format!(
                    "UPDATE {} SET confirmed_lsn = $2::text::pg_lsn, confirmed_at = now(), \
                         replay_from_xid = COALESCE($3::bigint::text::xid8, replay_from_xid) \
                     WHERE slot_name = $1",
                    state_table(cfg)
                ),
                &[
                    &cfg.postgres.slot,
                    &lsn_text(confirmed_lsn),
                    &replay_from_xid.map(|x| x as i64),
                ],
            )
            .await
            .map(|_| ())
            .map_err(SourceError::query)
    }

    /// Records that the table must be published again before streaming, and why
    /// (kept until a resync clears it).
    pub async fn mark_resync(&self, cfg: &Config, why: &str) -> Result<(), SourceError> {
        self.client
            .execute(
                &format!(
                    "UPDATE {} SET resync = $2 WHERE slot_name = $1 AND resync IS NULL",
                    state_table(cfg)
                ),
                &[&cfg.postgres.slot, &why],
            )
            .await
            .map(|_| ())
            .map_err(SourceError::query)
    }

    /// Drops the slot (for a recovery that replaces it).
    pub async fn drop_slot(&self, slot: &str) -> Result<(), SourceError> {
        self.client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .map(|_| ())
            .map_err(SourceError::query)
    }
}
