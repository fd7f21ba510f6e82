//! Before a session streams: the role's privileges, the publication, the slot, and the
//! record of the slot (`source::state`). What a start finds decides what it does:
//!
//! | found | does |
//! |---|---|
//! | no record, no slot | first start: creates the slot (after the initial snapshot, by default) |
//! | no record, a slot | adopts it: records it, streams |
//! | record and slot agree | streams |
//! | recorded slot gone or invalidated | waits for an operator; with `allow_new_slot`, a new slot that first republishes the gap from the table |
//! | publication re-created | the same (the old slot cannot decode past the drop) |
//! | table re-created or left the publication | waits; with `resync_table`, publishes the whole table, then streams on the same slot |
//!
//! Waiting for an operator is [`SourceError::Blocked`]: the supervisor keeps the
//! process alive and not ready, says what happened and which command recovers, and
//! looks again every few seconds (another instance may have recovered meanwhile).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{bounded, snapshot, Ctx, RelayError};
use crate::lsn::lsn_text;
use crate::source::control::{check_plugin, Control, SlotInfo};
use crate::source::state::{self, Identity, SlotRecord, StateAccess, Verdict};
use crate::source::table::Selection;
use crate::source::SourceError;

/// Prepares the slot to stream from; `Ok(None)` on shutdown.
pub(super) async fn slot(
    ctx: &Ctx<'_>,
    shutdown: &CancellationToken,
) -> Result<Option<SlotInfo>, RelayError> {
    let cfg = ctx.cfg;
    let p = &cfg.postgres;
    // Bounded: a half-open connection must turn into a retry, not a hang.
    let found = async {
        let control = Control::connect(cfg).await?;
        // Say which privilege is missing (and the statement that grants it) before
        // the server's own, vaguer refusal further down.
        let privileges = control.privileges(cfg).await?;
        if let Some(fix) = privileges.missing_replication() {
            return Err(SourceError::Setup(fix));
        }
        if !ctx.privileges_told.replace(true) {
            if let Some(fix) = privileges.missing_select(&p.table) {
                tracing::warn!("{fix} (streaming works without it; `outboxd replay` does not)");
            }
            if privileges.superuser {
                tracing::info!(role = %privileges.role, "connected as a superuser; a REPLICATION role suffices (see `outboxd setup`)");
            }
        }
        // Without the record, a slot lost while no outboxd runs goes unnoticed: say so
        // (once per process) rather than refuse the relay's own job.
        let access = control.prepare_state(cfg).await?;
        let writable = access == StateAccess::Writable;
        if !writable && !ctx.state_told.replace(true) {
            match &access {
                StateAccess::InRecovery => tracing::warn!("the server is in recovery (a standby): outboxd cannot record its slot there, so a slot lost while outboxd is not running goes unnoticed; see the README, \"Supported versions\""),
                StateAccess::NotPermitted(fix) => tracing::error!(fix = %fix, "outboxd cannot record its slot, so a slot lost while outboxd is not running would go unnoticed (a plain restart would then stream from a new slot and skip the gap)"),
                StateAccess::Writable => {}
            }
        }
        let record = if writable {
            control.slot_record(cfg).await?
        } else {
            None
        };
        // A missing publication is created (first start); whether it is the one the
        // slot was made with is judged below.
        control.create_publication(cfg).await?;
        let identity = control.identity(cfg).await?;
        let slot = control.slot(&p.slot).await?;
        if let Some(s) = &slot {
            check_plugin(cfg, s)?;
        }
        // The initial snapshot and every recovery read the table.
        let may_read = privileges.missing_select(&p.table);
        Ok::<_, SourceError>((control, writable, record, identity, slot, may_read))
    };
    let (mut control, writable, record, identity, slot, missing_select) = bounded(found).await?;
    let reads_table = |what: &str| match &missing_select {
        Some(fix) => Err(SourceError::Setup(format!(
            "{what} reads the outbox table: {fix}"
        ))),
        None => Ok(()),
    };
    let lost = slot
        .as_ref()
        .is_some_and(|s| s.wal_status.as_deref() == Some("lost"));
    let mut verdict = state::judge(record.as_ref(), slot.is_some(), lost, &identity);
    // Without a record (a standby server) this process still remembers streaming.
    if record.is_none() && slot.is_none() && ctx.slot_known.get() {
        verdict = Verdict::SlotLost;
    }
    match verdict {
        Verdict::Stream => Ok(slot),
        Verdict::Adopt => {
            let slot = slot.expect("adopt means the slot exists");
            if writable {
                control
                    .record_slot(cfg, &identity, slot.confirmed_flush_lsn, None, false)
                    .await?;
            }
            Ok(Some(slot))
        }
        Verdict::FirstStart => {
            require_published(ctx, &identity)?;
            if !p.create_slot && !p.allow_new_slot {
                return Err(SourceError::Setup(format!(
                    "replication slot {} does not exist and postgres.create_slot = false: create it \
                     with `outboxd setup --apply`, or set postgres.create_slot = true",
                    p.slot
                ))
                .into());
            }
            // Taken before the slot exists: it then holds for the slot's first position.
            let mark = if writable {
                Some(control.xmin_mark().await?)
            } else {
                None
            };
            if p.initial_snapshot {
                reads_table(
                    "the initial snapshot (postgres.initial_snapshot, or set it false to relay \
                     only rows committed from now on)",
                )?;
            }
            let created = if p.initial_snapshot {
                // Not bounded: it publishes the whole table (and ticks the watchdog).
                let all = Selection::default();
                snapshot::take(ctx, &mut control, shutdown, &all, "initial snapshot").await?
            } else {
                Some(bounded(control.create_slot(cfg)).await?)
            };
            let Some((slot, by_us)) = created else {
                return Ok(None);
            };
            if writable {
                let xid = mark.filter(|_| by_us).map(|m| m.xmin);
                control
                    .record_slot(cfg, &identity, slot.confirmed_flush_lsn, xid, false)
                    .await?;
            }
            Ok(Some(slot))
        }
        Verdict::SlotLost | Verdict::PublicationChanged => {
            let replaced = verdict == Verdict::PublicationChanged;
            if !p.allow_new_slot {
                return Err(SourceError::Blocked(state::lost_message(
                    cfg,
                    record.as_ref(),
                    slot.is_some(),
                    &identity,
                    replaced,
                ))
                .into());
            }
            require_published(ctx, &identity)?;
            reads_table("recovering the gap (--allow-new-slot)")?;
            let selection = gap(record.as_ref(), &identity);
            if slot.is_some() {
                tracing::warn!(slot = %p.slot, "dropping the old slot (allow_new_slot)");
                control.drop_slot(&p.slot).await?;
            }
            let mark = control.xmin_mark().await?;
            let what = "recovery of a lost slot's gap";
            let Some((slot, by_us)) =
                snapshot::take(ctx, &mut control, shutdown, &selection, what).await?
            else {
                return Ok(None);
            };
            let xid = by_us.then_some(mark.xmin);
            control
                .record_slot(cfg, &identity, slot.confirmed_flush_lsn, xid, true)
                .await?;
            tracing::warn!(slot = %p.slot, start_lsn = %lsn_text(slot.confirmed_flush_lsn), "recovered: a new slot streams; remove allow_new_slot (--allow-new-slot) again");
            Ok(Some(slot))
        }
        Verdict::TableChanged(why) => {
            let record = record.expect("a table change is judged against a record");
            let slot = slot.expect("a table change is judged with the slot present");
            if writable {
                control.mark_resync(cfg, &why).await?;
            }
            if !p.resync_table || !identity.published {
                return Err(SourceError::Blocked(state::table_message(cfg, &why)).into());
            }
            reads_table("the resync (--resync-table)")?;
            let what = "resync of the outbox table";
            if !snapshot::resync(ctx, &mut control, shutdown, what).await? {
                return Ok(None);
            }
            control
                .record_slot(
                    cfg,
                    &identity,
                    slot.confirmed_flush_lsn,
                    record.replay_from_xid,
                    true,
                )
                .await?;
            tracing::warn!(table = %p.table, "resync done; streaming on; remove resync_table (--resync-table) again");
            Ok(Some(slot))
        }
    }
}

/// A first start or a new slot needs the table in the publication.
fn require_published(ctx: &Ctx<'_>, identity: &Identity) -> Result<(), SourceError> {
    let p = &ctx.cfg.postgres;
    if identity.table_oid.is_none() {
        return Err(SourceError::Setup(format!(
            "table {} does not exist: create it (`outboxd setup` prints the SQL) or set postgres.table",
            p.table
        )));
    }
    if !identity.published {
        return Err(SourceError::Setup(format!(
            "publication {} exists but does not include {}: run ALTER PUBLICATION {} ADD TABLE {}",
            p.publication, p.table, p.publication, p.table
        )));
    }
    Ok(())
}

/// What a new slot republishes: the rows since the record's xid, or the whole table
/// when that is not known or the table changed as well.
fn gap(record: Option<&SlotRecord>, identity: &Identity) -> Selection {
    let table_changed = record.and_then(|r| state::table_change(r, identity));
    match (record.and_then(|r| r.replay_from_xid), table_changed) {
        (Some(xid), None) => Selection {
            since_xid: Some(xid),
            ..Selection::default()
        },
        _ => {
            tracing::warn!("where the gap starts is not recorded (or the table changed too): the whole outbox table is republished");
            Selection::default()
        }
    }
}

/// How often a blocked instance looks again (another one may have recovered).
pub(super) const BLOCKED_RECHECK: Duration = Duration::from_secs(5);
