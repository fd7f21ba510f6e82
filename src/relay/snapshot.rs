//! The initial snapshot (`postgres.initial_snapshot`): when `outboxd run` creates the
//! slot, the rows already in the outbox table are published first, exactly once
//! relative to the stream.
//!
//! ```text
//!  advisory lock ─▶ temporary slot + exported snapshot (source::export) ─▶ consistent point C
//!      │            read the table in that snapshot (source::table::plan, cursor, 1000 rows a batch)
//!      │            publish every row, wait for every ack (per-aggregate order kept)
//!      └──────────▶ copy the temporary slot into postgres.slot (at C) ─▶ stream after C
//! ```
//!
//! Rows committed before `C` are in the snapshot, rows committed after it in the
//! stream, none in both (see `source::export`). The snapshot is read ordered by
//! `created_at` (when mapped) then id: the commit-order proxy the table offers, as
//! for `outboxd replay`. Events of one aggregate are published one after another in
//! that order; different aggregates are pipelined, up to `sink.max_in_flight`.
//! Every snapshot event precedes every streamed one, and its `sequence` extension
//! (commit LSN 0) sorts before theirs.
//!
//! Only the instance that creates the slot snapshots, and only one at a time: a
//! session-level advisory lock is taken first, and the slot is looked up again under
//! it. An instance that finds the lock taken is a standby (it retries and then finds
//! the slot). A crash or SIGTERM before the copy leaves no permanent slot, so the next
//! start snapshots again; the events sent before are sent again, with the same ids.
//!
//! This module never moves the slot: the stream's progress starts at `C`.

use std::collections::HashMap;
use std::time::Duration;

use cloudevents::AttributesReader;
use futures::stream::{self, TryStreamExt};
use tokio_util::sync::CancellationToken;

use super::policy::{self, Action};
use super::{outcome, Ctx, RelayError};
use crate::backoff;
use crate::event::{table_envelope, Envelope, Position};
use crate::source::control::{Control, SlotInfo};
use crate::source::export::ExportedSlot;
use crate::source::table::{self, PlanError, Selection};
use crate::source::SourceError;

/// Rows fetched from the cursor per round trip; they are all acknowledged before
/// the next fetch.
const BATCH: i64 = 1000;

/// Takes a snapshot of the rows `selection` picks and creates the slot from it (the
/// initial snapshot, or the gap of a lost slot: `what` names it in the log). Returns
/// the slot and whether this call created it (false: another instance did
/// meanwhile); `Ok(None)` on shutdown (no slot was created; the next start takes the
/// snapshot again).
pub(super) async fn take(
    ctx: &Ctx<'_>,
    control: &mut Control,
    shutdown: &CancellationToken,
    selection: &Selection,
    what: &str,
) -> Result<Option<(SlotInfo, bool)>, RelayError> {
    let cfg = ctx.cfg;
    let slot = &cfg.postgres.slot;
    if !control.try_lock_snapshot(slot).await? {
        return Err(SourceError::SlotBusy(format!(
            "another instance is taking the {what} for slot {slot}"
        ))
        .into());
    }
    // Under the lock: another instance may have finished while we waited.
    if let Some(existing) = control.slot(slot).await? {
        return Ok(Some((existing, false)));
    }
    tracing::info!(slot = %slot, "{what}: creating a temporary slot (waits for running transactions to end)");
    let Some(exported) = watch(ctx, shutdown, ExportedSlot::create(cfg)).await else {
        return Ok(None);
    };
    let exported = exported?;
    tracing::info!(slot = %slot, consistent_point = %crate::lsn::lsn_text(exported.consistent_point()), "{what} started");
    let started = std::time::Instant::now();
    let Some(published) = publish_rows(
        ctx,
        control,
        shutdown,
        Some(exported.snapshot()),
        selection,
        what,
    )
    .await?
    else {
        return Ok(None);
    };
    let copied = exported.persist(control, cfg).await?;
    if !copied {
        tracing::warn!(slot = %slot, "slot was created by someone else during the {what}; events committed meanwhile may arrive twice (same ids)");
    }
    let info = control.slot(slot).await?.ok_or_else(|| {
        SourceError::Setup(format!("replication slot {slot} vanished after the {what}"))
    })?;
    tracing::info!(slot = %slot, published, seconds = started.elapsed().as_secs_f64(), start_lsn = %crate::lsn::lsn_text(info.confirmed_flush_lsn), "{what} done; streaming from the new slot");
    Ok(Some((info, copied)))
}

/// Publishes every row of the table from a snapshot taken now, before the stream goes
/// on from the slot's confirmed position (a table that left the publication or was
/// re-created: its rows were not decoded). Rows the stream carries as well arrive
/// twice, with the same ids, after their snapshot copies. False on shutdown.
pub(super) async fn resync(
    ctx: &Ctx<'_>,
    control: &mut Control,
    shutdown: &CancellationToken,
    what: &str,
) -> Result<bool, RelayError> {
    let started = std::time::Instant::now();
    let all = Selection::default();
    let Some(published) = publish_rows(ctx, control, shutdown, None, &all, what).await? else {
        return Ok(false);
    };
    tracing::info!(table = %ctx.cfg.postgres.table, published, seconds = started.elapsed().as_secs_f64(), "{what} done");
    Ok(true)
}

/// Reads the rows `selection` picks in one snapshot (`exported`, or a new one) and
/// publishes each until the broker acknowledged it, per aggregate in read order.
/// Returns how many; `None` on shutdown.
async fn publish_rows(
    ctx: &Ctx<'_>,
    control: &mut Control,
    shutdown: &CancellationToken,
    exported: Option<&str>,
    selection: &Selection,
    what: &str,
) -> Result<Option<u64>, RelayError> {
    let cfg = ctx.cfg;
    let read = table::plan(control, cfg, selection)
        .await
        .map_err(source_error)?;
    let mut published = 0u64;
    let tx = control.snapshot(exported).await?;
    let total = read.open(&tx).await?;
    tracing::info!(
        rows = total,
        "{what}: publishing rows from the outbox table"
    );
    let mut index = 0u32;
    loop {
        if shutdown.is_cancelled() {
            tracing::info!(
                published,
                "{what} interrupted by shutdown; it is taken again on the next start"
            );
            return Ok(None);
        }
        ctx.t.health.tick();
        let rows = tx.fetch(BATCH).await?;
        if rows.is_empty() {
            break;
        }
        // Per aggregate, in read order: one queue each.
        let mut queues: HashMap<String, Vec<Envelope>> = HashMap::new();
        for values in rows {
            let env = match table_envelope(&cfg.cloudevents, &read.layout, &values, index) {
                Ok(env) => env,
                Err(poison) => {
                    let pos = Position {
                        commit_lsn: 0,
                        commit_time: chrono::Utc::now(),
                        index,
                    };
                    outcome::invalid(ctx, poison, &pos, &format!(" in the {what}"))?
                }
            };
            index = index.wrapping_add(1);
            queues
                .entry(env.aggregate_id.clone())
                .or_default()
                .push(env);
        }
        let sent = std::cell::Cell::new(0u64);
        stream::iter(queues.into_values().map(Ok::<_, RelayError>))
            .try_for_each_concurrent(cfg.sink.max_in_flight, |queue| {
                let sent = &sent;
                async move {
                    for env in queue {
                        if !publish(ctx, env, shutdown).await? {
                            break;
                        }
                        sent.set(sent.get() + 1);
                    }
                    Ok(())
                }
            })
            .await?;
        published += sent.get();
    }
    // Exactly-once Kafka: the snapshot's events are in a transaction; commit it (no
    // checkpoint: the snapshot has no stream position).
    ctx.sink.checkpoint(None).await?;
    Ok(Some(published))
}

/// Publishes one event until the broker acknowledges it: retryable errors are retried
/// with backoff, a rejection follows `sink.on_rejected`. `Ok(false)` on shutdown.
async fn publish(
    ctx: &Ctx<'_>,
    mut env: Envelope,
    shutdown: &CancellationToken,
) -> Result<bool, RelayError> {
    let (m, sink) = (&ctx.t.metrics, ctx.sink.name());
    let mut attempt = 0u32;
    loop {
        if shutdown.is_cancelled() {
            return Ok(false);
        }
        let started = std::time::Instant::now();
        let result = ctx.sink.publish(&env).await;
        ctx.publish_duration
            .observe(started.elapsed().as_secs_f64());
        ctx.t.health.tick();
        let e = match result {
            Ok(delivered) => {
                outcome::sink_recovered(ctx.t);
                outcome::delivered(ctx.t, sink, &env, &delivered);
                m.snapshot_events.inc();
                return Ok(true);
            }
            Err(e) => e,
        };
        let on_rejected = ctx.cfg.sink.on_rejected;
        match policy::on_error(&e, attempt, None, on_rejected, env.dead_letter) {
            Action::Retry => {
                outcome::publish_failed(ctx.t, &e);
                let wait = backoff::delay(&ctx.cfg.retry, attempt);
                attempt = attempt.saturating_add(1);
                tracing::debug!(event_id = %env.event.id(), attempt, reason = e.reason(), error = %e, retry_in_ms = wait.as_millis() as u64, "initial snapshot: publish failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            Action::Fail => {
                m.publish_errors
                    .with_label_values(&[sink, e.reason()])
                    .inc();
                return Err(e.into());
            }
            action => {
                m.publish_errors
                    .with_label_values(&[sink, e.reason()])
                    .inc();
                match outcome::rejected(ctx, &env, &e, action, "an initial snapshot event")? {
                    Some(dead_letter) => env = dead_letter,
                    None => return Ok(true),
                }
                attempt = 0;
            }
        }
    }
}

/// Awaits `fut` while ticking the watchdog; `None` when shutdown came first.
async fn watch<T>(
    ctx: &Ctx<'_>,
    shutdown: &CancellationToken,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    let mut fut = std::pin::pin!(fut);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            v = &mut fut => return Some(v),
            _ = ticker.tick() => ctx.t.health.tick(),
        }
    }
}

/// A failed table read as the relay classifies it (a lost connection is retried).
fn source_error(e: PlanError) -> RelayError {
    match e {
        PlanError::Source(e) => e.into(),
        PlanError::Schema(e) => SourceError::Schema(e).into(),
        other => SourceError::Setup(format!("initial snapshot: {other}")).into(),
    }
}
