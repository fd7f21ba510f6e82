//! The slot monitor: a background task on its own SQL connection that (1) reads the
//! slot's position and WAL retention from `pg_replication_slots` into metrics and
//! `/status`, and (2) writes heartbeats.
//!
//! Heartbeats: on an idle outbox, no transaction of ours reaches the stream, so the
//! confirmed LSN would not move while other tables fill the WAL the slot retains.
//! A transactional `pg_logical_emit_message` every `postgres.heartbeat_interval_secs`
//! is a tiny transaction that does reach the stream; the relay confirms its commit
//! like any other, which advances the slot and keeps `outboxd_lag_seconds` honest.
//!
//! (3) It keeps the slot's record (`source::state`) current: on the streaming
//! instance it writes the confirmed position and, once the slot has passed the WAL
//! position read with a snapshot's xmin, that xmin as `replay_from_xid`; on every
//! instance it compares the outbox table and the publication with the record, and
//! when the table left the publication or was re-created, or the publication was
//! re-created, it records that (a resync is then due) and reports the problem, which
//! makes the relay stop streaming and wait for an operator (`relay::setup`).
//!
//! On a hot standby (decoding there needs PostgreSQL 16+) no heartbeat can be
//! written: they are skipped, and the slot moves with the primary's WAL as the
//! standby replays it (the relay confirms the position keepalives report while
//! nothing is pending).
//!
//! It never moves the slot itself and stops with the shutdown token. Failures are
//! logged and retried on the next interval: monitoring must not stop relaying.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::control::Control;
use super::state::{self, XminMark};
use crate::config::Config;
use crate::telemetry::Telemetry;

/// Prefix of heartbeat messages (ignored by the relay's event path).
pub use crate::config::HEARTBEAT_PREFIX;

/// Runs until `shutdown`.
pub async fn run(cfg: Arc<Config>, telemetry: Arc<Telemetry>, shutdown: CancellationToken) {
    let poll = Duration::from_secs(cfg.postgres.monitor_interval_secs.max(1));
    let heartbeat = Duration::from_secs(cfg.postgres.heartbeat_interval_secs);
    let mut control: Option<Control> = None;
    let mut last_heartbeat = tokio::time::Instant::now();
    let mut heartbeat_warned = false;
    let mut marks: VecDeque<XminMark> = VecDeque::new();
    let mut standby_told = false;
    loop {
        if control.is_none() {
            control = Control::connect(&cfg).await.ok();
        }
        // Only the streaming instance writes heartbeats and the record; standbys would
        // only add WAL.
        let streaming = telemetry.health.role() == crate::telemetry::Role::Streaming;
        if let Some(c) = &control {
            let polled = async {
                let confirmed = poll_slot(c, &cfg, &telemetry).await?;
                watch_state(c, &cfg, &telemetry, streaming, confirmed, &mut marks).await
            };
            if let Err(e) = polled.await {
                tracing::debug!(error = %e, "slot monitor query failed; reconnecting next round");
                control = None;
            }
        }
        if let (Some(c), false, true) = (&control, heartbeat.is_zero(), streaming) {
            if last_heartbeat.elapsed() >= heartbeat {
                last_heartbeat = tokio::time::Instant::now();
                // A hot standby (PostgreSQL 16+ decodes there) cannot write any WAL;
                // asked each time, since a promotion makes it a primary.
                if c.in_recovery().await.unwrap_or(false) {
                    if !standby_told {
                        standby_told = true;
                        tracing::info!("connected to a hot standby: no heartbeats are written here (they need a primary); the slot still advances, as outboxd confirms the replayed position the standby reports while nothing is pending");
                    }
                } else {
                    match c.emit_heartbeat(HEARTBEAT_PREFIX).await {
                        Ok(()) => telemetry.metrics.heartbeats.inc(),
                        Err(e) if !heartbeat_warned => {
                            heartbeat_warned = true;
                            tracing::warn!(error = %e, "cannot write heartbeats; an idle outbox will hold WAL back (GRANT EXECUTE on pg_logical_emit_message: `outboxd check` prints the statement)");
                        }
                        Err(_) => {}
                    }
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(poll.min(if heartbeat.is_zero() { poll } else { heartbeat })) => {}
        }
    }
}

/// Reads the slot's figures into metrics and `/status`; its confirmed position.
async fn poll_slot(
    c: &Control,
    cfg: &Config,
    t: &Telemetry,
) -> Result<Option<u64>, super::SourceError> {
    let Some(s) = c.slot_stats(&cfg.postgres.slot).await? else {
        return Ok(None);
    };
    let m = &t.metrics;
    m.replication_lag_bytes.set(s.lag_bytes);
    m.slot_retained_wal_bytes.set(s.retained_bytes);
    m.set_safe_wal_size(s.safe_wal_size);
    m.confirmed_lsn_bytes.set(s.confirmed_flush_lsn as i64);
    if let Some(status) = &s.wal_status {
        m.set_wal_status(status);
    }
    t.health
        .set_server(s.server_lsn, s.confirmed_flush_lsn, s.lag_bytes);
    Ok(Some(s.confirmed_flush_lsn))
}

/// At most this many xmin marks wait for the slot to pass them; when the slot stands
/// still, newer ones are not kept (an older mark only selects more).
const MAX_MARKS: usize = 64;

/// Compares the table and the publication with the slot's record (reporting a change)
/// and, on the streaming instance, records the confirmed position and the newest xmin
/// that holds for it (see `source::state`).
async fn watch_state(
    c: &Control,
    cfg: &Config,
    t: &Telemetry,
    streaming: bool,
    confirmed: Option<u64>,
    marks: &mut VecDeque<XminMark>,
) -> Result<(), super::SourceError> {
    // A standby server keeps no record of its own (a row there is the primary's).
    if c.in_recovery().await? {
        return Ok(());
    }
    let Some(record) = c.slot_record(cfg).await? else {
        return Ok(());
    };
    let identity = c.identity(cfg).await?;
    let p = &cfg.postgres;
    if let Some(why) = state::table_change(&record, &identity) {
        if streaming {
            c.mark_resync(cfg, &why).await?;
        }
        if t.health.problem().is_none() {
            t.health.set_problem(Some(format!(
                "{why}: rows written to it are not decoded; outboxd stops streaming. Recover with                  ALTER PUBLICATION {pub_} ADD TABLE {table}; (if needed) and `outboxd run --resync-table`",
                pub_ = p.publication,
                table = p.table
            )));
        }
        return Ok(());
    }
    if identity
        .publication_oid
        .is_some_and(|oid| oid != record.publication_oid)
    {
        if t.health.problem().is_none() {
            t.health.set_problem(Some(format!(
                "publication {} was dropped and created again: the slot cannot decode past that.                  Recover with `outboxd run --allow-new-slot`",
                p.publication
            )));
        }
        return Ok(());
    }
    let Some(confirmed) = confirmed.filter(|_| streaming) else {
        return Ok(());
    };
    let mut holds = None;
    while marks.front().is_some_and(|m| m.wal <= confirmed) {
        holds = marks.pop_front().map(|m| m.xmin);
    }
    if marks.len() < MAX_MARKS {
        marks.push_back(c.xmin_mark().await?);
    }
    c.record_position(cfg, confirmed, holds).await
}
