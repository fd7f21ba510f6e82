//! The anchor of the initial snapshot: a TEMPORARY logical slot created with an
//! exported snapshot, later copied into the permanent slot.
//!
//! ```text
//!  gated replication session           control connection (tokio-postgres)
//!  CREATE_REPLICATION_SLOT tmp          BEGIN REPEATABLE READ; SET TRANSACTION SNAPSHOT s
//!    TEMPORARY ... (SNAPSHOT 'export')    read the outbox, publish, wait for every ack
//!    (14: ... EXPORT_SNAPSHOT)
//!    -> consistent point C, snapshot s  SELECT pg_copy_logical_replication_slot(tmp, slot)
//!  (idle: the snapshot stays valid)       -> slot at C, permanent
//!  close: tmp is dropped by the server
//! ```
//!
//! Why this is exactly-once relative to the stream: the exported snapshot sees every
//! transaction that committed before `C` and none after; a slot whose
//! `confirmed_flush_lsn` is `C` streams exactly the transactions that commit after
//! `C`. The copy carries the temporary slot's `restart_lsn`, catalog xmin and
//! `confirmed_flush_lsn` (`C`, untouched: nothing ever streams from the temporary
//! slot), and PostgreSQL copies an active temporary slot of another session
//! (verified against PostgreSQL 14 to 18 by the version matrix, and on a PG16+ hot
//! standby).
//!
//! Why it is crash-safe: until the copy, the only slot is temporary and belongs to
//! this session. If the process dies, the session ends, the server drops the
//! temporary slot, and no permanent slot exists: the next start takes the snapshot
//! again (its events are sent twice, with the same ids). After the copy, the
//! permanent slot exists and the snapshot is never taken again.
//!
//! This module never publishes and never moves a slot; it only creates, copies and
//! drops them.

use pgwire_replication::ReplicationClient;
use tokio_postgres::error::SqlState;

use super::control::{db_message, parse_lsn, Control};
use super::{replication_config, SourceError};
use crate::config::Config;

/// A temporary slot and the snapshot it exported, alive while this value is.
pub(crate) struct ExportedSlot {
    /// The gated session; it must stay idle, or the exported snapshot ends.
    client: ReplicationClient,
    temp: String,
    consistent_point: u64,
    snapshot: String,
}

impl ExportedSlot {
    /// Creates the temporary slot. Waits (server side) until every transaction
    /// running at the start has ended: that is how the consistent point is found.
    pub(crate) async fn create(cfg: &Config) -> Result<Self, SourceError> {
        let temp = temp_name(&cfg.postgres.slot, rand::random());
        let (rcfg, explain) = replication_config(cfg, 0)?;
        let mut client = ReplicationClient::connect_gated(rcfg)
            .await
            .map_err(&explain)?;
        // The command's spelling depends on the server (see `source::version`).
        let version = client
            .simple_query("SHOW server_version_num")
            .await
            .map_err(SourceError::replication)?
            .first()
            .and_then(|row| row.first()?.as_ref())
            .and_then(|v| std::str::from_utf8(v).ok()?.parse::<i32>().ok())
            .ok_or_else(|| {
                SourceError::Setup("the server did not report server_version_num".into())
            })?;
        // Refused before anything exists: the copy would otherwise become a permanent
        // slot without the flag (ALTER_REPLICATION_SLOT is 17's).
        if cfg.postgres.failover_slot
            && super::version::major(version) < super::version::FAILOVER_SLOTS_SINCE
        {
            return Err(SourceError::Setup(format!(
                "postgres.failover_slot = true needs PostgreSQL 17 or later (server is {version})"
            )));
        }
        let rows = client
            .simple_query(&super::version::create_exported_temp_slot(version, &temp))
            .await
            .map_err(SourceError::replication)?;
        // slot_name, consistent_point, snapshot_name, output_plugin
        let text = |i: usize| -> Option<String> {
            let v = rows.first()?.get(i)?.as_ref()?;
            Some(String::from_utf8_lossy(v).into_owned())
        };
        let (Some(point), Some(snapshot)) = (text(1), text(2)) else {
            return Err(SourceError::Setup(
                "CREATE_REPLICATION_SLOT returned no consistent point or snapshot name".into(),
            ));
        };
        if !valid_snapshot_name(&snapshot) {
            return Err(SourceError::Setup(format!(
                "CREATE_REPLICATION_SLOT returned an unexpected snapshot name {snapshot:?}"
            )));
        }
        Ok(Self {
            client,
            temp,
            consistent_point: parse_lsn(&point)?,
            snapshot,
        })
    }

    /// The exported snapshot's name, for `SET TRANSACTION SNAPSHOT`.
    pub(crate) fn snapshot(&self) -> &str {
        &self.snapshot
    }

    /// The LSN the permanent slot will stream after.
    pub(crate) fn consistent_point(&self) -> u64 {
        self.consistent_point
    }

    /// Makes `postgres.slot` a permanent copy of the temporary slot (same consistent
    /// point), then ends the session, which drops the temporary slot. `Ok(false)`
    /// when the slot already existed (someone else created it meanwhile): the
    /// snapshot's events may then also come from that slot's stream (duplicates).
    pub(crate) async fn persist(
        mut self,
        control: &Control,
        cfg: &Config,
    ) -> Result<bool, SourceError> {
        let slot = &cfg.postgres.slot;
        let copied = match control.copy_slot(&self.temp, slot).await {
            Ok(()) => true,
            Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => false,
            // The session ended under us (network, server restart): nothing was
            // created, so the next attempt can take the snapshot again.
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => {
                return Err(SourceError::Connection(format!(
                    "the snapshot's temporary slot {} is gone (its session ended): {}",
                    self.temp,
                    db_message(&e)
                )))
            }
            Err(e) => {
                return Err(SourceError::Setup(format!(
                    "cannot copy the snapshot's temporary slot {} into {slot}: {}",
                    self.temp,
                    db_message(&e)
                )))
            }
        };
        if copied && cfg.postgres.failover_slot {
            // A copy never carries the failover flag (and a temporary slot cannot
            // have it), so set it on the copy (PostgreSQL 17's replication command).
            // A crash right before this leaves a slot without failover: see README.
            self.client
                .simple_query(&format!("ALTER_REPLICATION_SLOT {slot} ( FAILOVER true )"))
                .await
                .map_err(|e| {
                    SourceError::Setup(format!(
                        "slot {slot} was created, but setting failover = true failed: {e}"
                    ))
                })?;
        }
        // Dropping the gated client ends the session (Terminate); the server then
        // drops the temporary slot.
        drop(self.client);
        Ok(copied)
    }
}

/// A unique name for the temporary slot: `<slot>_snap_<8 hex>` (at most 63 bytes).
fn temp_name(slot: &str, nonce: u32) -> String {
    let base = &slot[..slot.len().min(45)];
    format!("{base}_snap_{nonce:08x}")
}

/// Exported snapshot names look like `00000003-00000002-1`; anything else is refused
/// before it is put into SQL.
fn valid_snapshot_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_name_is_a_valid_slot_name() {
        let long = "a".repeat(63);
        let name = temp_name(&long, 0xdead_beef);
        assert_eq!(name.len(), 45 + "_snap_deadbeef".len());
        assert!(name.len() <= 63);
        assert_eq!(temp_name("outboxd", 1), "outboxd_snap_00000001");
    }

    #[test]
    fn only_snapshot_like_names_pass() {
        assert!(valid_snapshot_name("00000003-00000002-1"));
        assert!(!valid_snapshot_name(""));
        assert!(!valid_snapshot_name("x'; DROP TABLE outbox; --"));
    }
}
