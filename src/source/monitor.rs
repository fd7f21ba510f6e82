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
//! On a hot standby (decoding there needs PostgreSQL 16+) no heartbeat can be
//! written: they are skipped, and the slot moves with the primary's WAL as the
//! standby replays it (the relay confirms the position keepalives report while
//! nothing is pending).
//!
//! It never moves the slot itself and stops with the shutdown token. Failures are
//! logged and retried on the next interval: monitoring must not stop relaying.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::control::Control;
use crate::config::Config;
use crate::health::Telemetry;

/// Prefix of heartbeat messages (ignored by the relay's event path).
pub const HEARTBEAT_PREFIX: &str = "outboxd.heartbeat";

/// Runs until `shutdown`.
pub async fn run(cfg: Arc<Config>, telemetry: Arc<Telemetry>, shutdown: CancellationToken) {
    let poll = Duration::from_secs(cfg.postgres.monitor_interval_secs.max(1));
    let heartbeat = Duration::from_secs(cfg.postgres.heartbeat_interval_secs);
    let mut control: Option<Control> = None;
    let mut last_heartbeat = tokio::time::Instant::now();
    let mut heartbeat_warned = false;
    let mut standby_told = false;
    loop {
        if control.is_none() {
            control = Control::connect(&cfg).await.ok();
        }
        if let Some(c) = &control {
            if let Err(e) = poll_slot(c, &cfg, &telemetry).await {
                tracing::debug!(error = %e, "slot monitor query failed; reconnecting next round");
                control = None;
            }
        }
        // Only the streaming instance writes heartbeats; standbys would only add WAL.
        let streaming = telemetry.health.role() == crate::health::Role::Streaming;
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

async fn poll_slot(c: &Control, cfg: &Config, t: &Telemetry) -> Result<(), super::SourceError> {
    let Some(s) = c.slot_stats(&cfg.postgres.slot).await? else {
        return Ok(());
    };
    let m = &t.metrics;
    m.replication_lag_bytes.set(s.lag_bytes);
    m.slot_retained_wal_bytes.set(s.retained_bytes);
    m.slot_safe_wal_size_bytes.set(s.safe_wal_size.unwrap_or(0));
    m.confirmed_lsn_bytes.set(s.confirmed_flush_lsn as i64);
    if let Some(status) = &s.wal_status {
        m.set_wal_status(status);
    }
    t.health.set_server(s.server_lsn, s.lag_bytes);
    Ok(())
}
