//! What outboxd records about its slot in the database, next to the outbox table, so
//! that a later start tells a first start from a lost slot, and the table and the
//! publication it streamed from from re-created ones (README, "Failure behaviour").
//! One row per slot in `<schema>.outboxd_slots`:
//!
//! | column | meaning |
//! |---|---|
//! | `slot_name` | the slot |
//! | `publication`, `publication_oid` | the publication the slot decodes with |
//! | `table_oid` | the outbox table (its relation id) the stream carries |
//! | `confirmed_lsn`, `confirmed_at` | the slot's confirmed position, and when it was read |
//! | `replay_from_xid` | every transaction that committed after `confirmed_lsn` has a (64-bit) xid at least this; NULL while unknown |
//! | `resync` | why the table's rows must be published again before streaming (it left the publication, or was re-created), or NULL |
//!
//! Why `replay_from_xid` is exact. A snapshot's xmin is the oldest transaction still
//! running when it is taken: every transaction that commits later has an xid at
//! least that. The monitor reads, in one statement, a snapshot's xmin `X` and then the
//! WAL position `W`; everything that committed before the snapshot lies before `W`.
//! Once the slot is confirmed at or past `W`, whatever it has not confirmed committed
//! after the snapshot, so it has an xid ≥ `X`: the rows of that gap are exactly
//! among those `outboxd replay --since-xid X` selects (`age(xmin) <= age(X)`). An older
//! `X` stays true for a newer confirmed position (it only selects more).
//!
//! Written by the streaming instance only (at slot creation and every
//! `postgres.monitor_interval_secs`), never on a server in recovery (a standby is
//! read-only: there a lost slot goes unnoticed across restarts, see the README). Never
//! holds a secret.

use chrono::{DateTime, Utc};

use super::control::{db_message, Control};
use super::SourceError;
use crate::config::{split_table, Config};
use crate::lsn::lsn_text;

/// Name of the state table, in the outbox table's schema.
pub const STATE_TABLE: &str = "outboxd_slots";

/// The state table of `cfg`'s schema, `schema.outboxd_slots`.
pub fn state_table(cfg: &Config) -> String {
    let (schema, _) = split_table(&cfg.postgres.table);
    format!("{schema}.{STATE_TABLE}")
}

/// Whether this connection can keep the slot's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateAccess {
    /// It can.
    Writable,
    /// The server is a standby: nothing can be written there.
    InRecovery,
    /// The role may not create or write the state table; what the owner must run.
    NotPermitted(String),
}

/// What the table owner runs so that the relay role can keep the record.
fn state_fix(cfg: &Config) -> String {
    format!(
        "as the table owner, run: {} GRANT SELECT, INSERT, UPDATE ON {} TO <relay role>; (part 1 \
         of `outboxd setup`)",
        super::sql::create_state_table_sql(cfg).replace('\n', " "),
        state_table(cfg)
    )
}

/// What the state table says about the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRecord {
    /// The publication's oid when the slot was created (or last recovered).
    pub publication_oid: u32,
    /// The outbox table's oid the stream carries.
    pub table_oid: u32,
    /// The slot's confirmed position when last read.
    pub confirmed_lsn: u64,
    /// When that was.
    pub confirmed_at: DateTime<Utc>,
    /// See the module docs; `None` while unknown.
    pub replay_from_xid: Option<u64>,
    /// Why the table must be published again first, if it must.
    pub resync: Option<String>,
}

/// The table and the publication as they are now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// The configured table's oid, `None` when it does not exist.
    pub table_oid: Option<u32>,
    /// The publication's oid, `None` when it does not exist.
    pub publication_oid: Option<u32>,
    /// The publication covers the table.
    pub published: bool,
}

/// A snapshot's xmin and the WAL position read right after it (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XminMark {
    /// WAL position, read after the snapshot.
    pub wal: u64,
    /// The snapshot's xmin (64-bit).
    pub xmin: u64,
}

/// What a start must do, judged from the record, the slot and the identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No record and no slot: create the slot (and take the initial snapshot when on).
    FirstStart,
    /// A slot but no record (created by `outboxd setup`, another instance, or an
    /// older outboxd): record it and stream.
    Adopt,
    /// Record and slot agree: stream.
    Stream,
    /// The recorded slot is gone or invalidated: its gap may hold rows.
    SlotLost,
    /// The publication was dropped and created again: the slot cannot decode past it.
    PublicationChanged,
    /// The table left the publication or was re-created: rows were not decoded.
    TableChanged(String),
}

/// Judges a start. The slot's state (`lost`) comes from `slot_lost`.
pub fn judge(
    record: Option<&SlotRecord>,
    slot_exists: bool,
    slot_lost: bool,
    now: &Identity,
) -> Verdict {
    let Some(r) = record else {
        return if slot_exists && !slot_lost {
            Verdict::Adopt
        } else if slot_lost {
            Verdict::SlotLost
        } else {
            Verdict::FirstStart
        };
    };
    if !slot_exists || slot_lost {
        return Verdict::SlotLost;
    }
    if now
        .publication_oid
        .is_some_and(|oid| oid != r.publication_oid)
    {
        return Verdict::PublicationChanged;
    }
    if let Some(why) = table_change(r, now) {
        return Verdict::TableChanged(why);
    }
    Verdict::Stream
}

/// Why the table no longer is the one the record says the stream carries, if so.
pub fn table_change(r: &SlotRecord, now: &Identity) -> Option<String> {
    if let Some(why) = &r.resync {
        return Some(why.clone());
    }
    match now.table_oid {
        None => Some("the outbox table was dropped".into()),
        Some(oid) if oid != r.table_oid => Some(format!(
            "the outbox table was dropped and created again (it is relation {oid} now, was {})",
            r.table_oid
        )),
        Some(_) if !now.published && now.publication_oid.is_some() => {
            Some("the outbox table was removed from the publication".into())
        }
        Some(_) => None,
    }
}

/// Why the slot cannot be streamed from, what may be missing, and the recovery.
pub fn lost_message(
    cfg: &Config,
    record: Option<&SlotRecord>,
    slot_present: bool,
    identity: &Identity,
    publication_replaced: bool,
) -> String {
    let p = &cfg.postgres;
    let what = if publication_replaced {
        format!(
            "publication {} was dropped and created again since slot {} was created (its oid is {}, \
             was {}); a slot decodes with the catalog of its own past, so it cannot stream past the \
             drop (PostgreSQL stops with \"publication does not exist\", or skips the rows in between)",
            p.publication,
            p.slot,
            identity.publication_oid.unwrap_or(0),
            record.map_or(0, |r| r.publication_oid)
        )
    } else if slot_present {
        format!(
            "replication slot {} was invalidated (wal_status = lost; max_slot_wal_keep_size \
             exceeded): the WAL it needed is gone",
            p.slot
        )
    } else {
        format!(
            "replication slot {} is gone (dropped, or lost in a primary failover without a \
             failover slot)",
            p.slot
        )
    };
    let (position, by_hand) = match record {
        Some(r) => (
            format!(
                "; outboxd had streamed from it, confirmed up to {} at {}, so rows committed since \
                 may not have reached the broker",
                lsn_text(r.confirmed_lsn),
                r.confirmed_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            match (r.replay_from_xid, table_change(r, identity)) {
                (Some(xid), None) => format!(
                    "the rows committed since then (by hand: `outboxd replay --since-xid {xid}`)"
                ),
                _ => "every row of the outbox table (where the gap starts is not recorded; by \
                      hand: `outboxd replay`)"
                    .to_string(),
            },
        ),
        None => (
            String::new(),
            "every row of the outbox table (by hand: `outboxd replay`)".to_string(),
        ),
    };
    format!(
        "{what}{position}. outboxd does not replace it silently. To recover, start once with \
         `outboxd run --allow-new-slot` (or postgres.allow_new_slot = true): it creates a new slot \
         and first republishes {by_hand}, with the same event ids. Events written with \
         pg_logical_emit_message in the gap are not in the table and cannot be republished"
    )
}

/// Why the table's rows were not decoded, and the recovery.
pub fn table_message(cfg: &Config, why: &str) -> String {
    let p = &cfg.postgres;
    format!(
        "{why} while outboxd streamed from it, so rows written to it meanwhile were not decoded. \
         To recover: make sure publication {pub_} includes it (as the table owner: ALTER \
         PUBLICATION {pub_} ADD TABLE {table};), then start once with `outboxd run --resync-table` \
         (or postgres.resync_table = true): it publishes every row of {table} (rows delivered \
         before are sent again, with the same ids), then streams on",
        pub_ = p.publication,
        table = p.table,
    )
}

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
                .batch_execute(&super::sql::create_state_table_sql(cfg))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> SlotRecord {
        SlotRecord {
            publication_oid: 10,
            table_oid: 20,
            confirmed_lsn: 0x100,
            confirmed_at: Utc::now(),
            replay_from_xid: Some(700),
            resync: None,
        }
    }

    const NOW: Identity = Identity {
        table_oid: Some(20),
        publication_oid: Some(10),
        published: true,
    };

    #[test]
    fn without_a_record_a_slot_is_adopted_or_created() {
        assert_eq!(judge(None, false, false, &NOW), Verdict::FirstStart);
        assert_eq!(judge(None, true, false, &NOW), Verdict::Adopt);
        // an invalidated slot is a loss even without a record
        assert_eq!(judge(None, true, true, &NOW), Verdict::SlotLost);
    }

    #[test]
    fn a_recorded_slot_that_is_gone_or_invalidated_is_lost() {
        assert_eq!(
            judge(Some(&record()), false, false, &NOW),
            Verdict::SlotLost
        );
        assert_eq!(judge(Some(&record()), true, true, &NOW), Verdict::SlotLost);
        assert_eq!(judge(Some(&record()), true, false, &NOW), Verdict::Stream);
    }

    #[test]
    fn a_new_publication_or_table_is_noticed() {
        let r = record();
        let republished = Identity {
            publication_oid: Some(11),
            ..NOW
        };
        assert_eq!(
            judge(Some(&r), true, false, &republished),
            Verdict::PublicationChanged
        );
        for (now, says) in [
            (
                Identity {
                    table_oid: Some(21),
                    ..NOW
                },
                "created again (it is relation 21 now, was 20)",
            ),
            (
                Identity {
                    table_oid: None,
                    published: false,
                    ..NOW
                },
                "dropped",
            ),
            (
                Identity {
                    published: false,
                    ..NOW
                },
                "removed from the publication",
            ),
        ] {
            match judge(Some(&r), true, false, &now) {
                Verdict::TableChanged(why) => assert!(why.contains(says), "{why}"),
                other => panic!("{now:?}: {other:?}"),
            }
        }
        // and a recorded resync stays until it is done, whatever the table is now
        let marked = SlotRecord {
            resync: Some("the outbox table was removed from the publication".into()),
            ..record()
        };
        assert!(matches!(
            judge(Some(&marked), true, false, &NOW),
            Verdict::TableChanged(_)
        ));
    }
}
