//! The relay loop: source -> CloudEvent -> sink -> acknowledge.
//!
//! ```text
//!  Stream::next ──Begin/Row/Commit──▶ Progress (txn bookkeeping)
//!       │ Row ──to_cloudevent──▶ Gate (one in flight per aggregate) ──▶ in flight
//!       ▲                                                                 │
//!       └─ paused while in flight + parked ≥ sink.max_in_flight            │ PubAck
//!  Stream::confirm(end LSN) ◀── Progress::ack ◀──────────────────────────┘
//! ```
//!
//! One task owns everything: reading the stream, the futures in flight and the
//! bookkeeping, so no locks sit on the hot path and the order of rows is the order
//! the stream gave. A retryable publish error is retried (with backoff) by the same
//! in-flight slot, so the aggregate's later events keep waiting behind it. A session
//! ends on a source error (reconnect from the slot's confirmed position, anything
//! unconfirmed is sent again) or on shutdown (drain in-flight acks, bounded, then a
//! final status update).
//!
//! Here: the sessions (connect the sink, reconnect, stand by, wait for an operator).
//! `setup` readies the slot for a session, `stream` runs its loop, `policy` decides
//! what a failure means and `outcome` acts on it, `snapshot` publishes the table's
//! rows before a new slot streams.

mod checkpoint;
mod gate;
mod outcome;
pub mod policy;
pub mod progress;
mod setup;
mod snapshot;
mod stream;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backoff;
use crate::config::Config;
use crate::sink::{Routes, Sink, SinkError};
use crate::source::SourceError;
use crate::telemetry::{Role, Telemetry};

/// Why the relay stopped (other than a requested shutdown).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Postgres is not usable as configured.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The broker is not usable as configured.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// A poison row with `halt` policy. The slot stays before it.
    #[error("halted on event {id}: {reason}. The slot stays before this row: fix or remove the row's cause, or set sink.{policy_key} = \"dead_letter\", then restart")]
    Halted {
        /// Row / event id.
        id: String,
        /// What is wrong with it.
        reason: String,
        /// `on_invalid` or `on_rejected`.
        policy_key: &'static str,
    },
}

/// What the loop needs besides the stream: config, sink, telemetry.
struct Ctx<'a> {
    cfg: &'a Config,
    sink: &'a Arc<Sink>,
    t: &'a Telemetry,
    /// `outboxd_publish_duration_seconds{sink}`, resolved once.
    publish_duration: prometheus::Histogram,
    /// This process has relied on the slot (found or created it): a missing slot now is
    /// a lost one.
    slot_known: std::cell::Cell<bool>,
    /// The current session reached streaming (resets the reconnect backoff).
    session_streamed: std::cell::Cell<bool>,
    /// Missing optional privileges were logged (once per process, not per retry).
    privileges_told: std::cell::Cell<bool>,
    /// That the slot's record cannot be kept (a standby server, missing privileges)
    /// was logged.
    state_told: std::cell::Cell<bool>,
    /// Events the last drain could not get acknowledged.
    unacknowledged: std::cell::Cell<usize>,
}

/// How a requested shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stopped {
    /// Events read but not acknowledged by the deadline: unconfirmed, so they are sent
    /// again after a restart.
    pub unacknowledged: usize,
}

/// Streams until `shutdown` is cancelled (returns `Ok`) or a fatal error: connects
/// the sink, then runs sessions (set-up, stream) and reconnects, stands by or waits
/// for an operator between them. The supervisor (`commands::run`) starts the
/// monitor, retention and the HTTP endpoints beside it.
pub async fn run(
    cfg: &Config,
    routes: &Routes,
    telemetry: &Telemetry,
    shutdown: &CancellationToken,
) -> Result<Stopped, RelayError> {
    let result = run_sessions(cfg, routes, telemetry, shutdown).await;
    telemetry.metrics.set_streaming(false);
    result
}

async fn run_sessions(
    cfg: &Config,
    routes: &Routes,
    t: &Telemetry,
    shutdown: &CancellationToken,
) -> Result<Stopped, RelayError> {
    let connect = || Sink::connect(cfg, routes, Some(&t.metrics));
    let Some(sink) = retrying(cfg, t, shutdown, "connect to the broker", "broker", connect).await?
    else {
        return Ok(Stopped::default());
    };
    let sink = Arc::new(sink);
    let publish_duration = t.metrics.publish_duration.with_label_values(&[sink.name()]);
    let ctx = Ctx {
        cfg,
        sink: &sink,
        t,
        publish_duration,
        slot_known: std::cell::Cell::new(false),
        session_streamed: std::cell::Cell::new(false),
        privileges_told: std::cell::Cell::new(false),
        state_told: std::cell::Cell::new(false),
        unacknowledged: std::cell::Cell::new(0),
    };
    let mut attempt = 0u32;
    loop {
        if shutdown.is_cancelled() {
            return Ok(stopped(&ctx));
        }
        ctx.session_streamed.set(false);
        let result = stream::session(&ctx, shutdown).await;
        if ctx.session_streamed.get() {
            // A healthy session ended: the next outage starts with a short delay again.
            attempt = 0;
        }
        t.health.set_ready();
        t.metrics.set_streaming(false);
        if !matches!(
            result,
            Err(RelayError::Source(
                SourceError::SlotBusy(_) | SourceError::Blocked(_)
            ))
        ) {
            t.health.set_role(Role::Connecting);
        }
        match result {
            Ok(()) => return Ok(stopped(&ctx)),
            Err(RelayError::Source(SourceError::Blocked(problem))) => {
                // Only an operator can accept what happened: stay alive and not ready,
                // say it once (and again when it changes), and look again now and then.
                if t.health.problem().as_deref() != Some(problem.as_str())
                    || t.health.role() != Role::Blocked
                {
                    tracing::error!(problem = %problem, "outboxd waits for an operator");
                }
                t.health.set_problem(Some(problem));
                t.health.set_role(Role::Blocked);
                t.metrics.blocked.set(1);
                attempt = 0;
                if pause(setup::BLOCKED_RECHECK, t, shutdown).await {
                    return Ok(stopped(&ctx));
                }
            }
            Err(RelayError::Source(SourceError::SlotBusy(msg))) => {
                // Another replica streams: stay a healthy, ready standby and try to
                // take over soon after it is gone. A steady, jittered poll (not an
                // exponential backoff) bounds takeover time; one connection attempt per
                // standby per interval is all it costs the server.
                if t.health.role() != Role::Standby {
                    tracing::info!(slot = %cfg.postgres.slot, detail = %msg, "slot is streamed by another instance; standing by");
                }
                t.health.set_role(Role::Standby);
                attempt = 0;
                let wait = backoff::jittered(Duration::from_millis(cfg.postgres.standby_poll_ms));
                if pause(wait, t, shutdown).await {
                    return Ok(stopped(&ctx));
                }
            }
            Err(RelayError::Sink(e))
                if matches!(e, SinkError::Aborted { .. }) || e.is_retryable() =>
            {
                // Exactly-once: the broker dropped what was sent since the last
                // checkpoint, or the checkpoint could not be read or written. A new
                // session reads the checkpoint back and sends the rest again. (Publishes
                // retry in place; only these steps end a session with such an error.)
                let wait = backoff::delay(&cfg.retry, attempt);
                attempt = attempt.saturating_add(1);
                t.health.set_error(Some(e.to_string()));
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker transaction lost; resuming from the last checkpoint");
                if pause(wait, t, shutdown).await {
                    return Ok(stopped(&ctx));
                }
            }
            Err(RelayError::Source(e)) if e.is_retryable() => {
                let wait = backoff::delay(&cfg.retry, attempt);
                attempt = attempt.saturating_add(1);
                t.metrics.reconnects.with_label_values(&["postgres"]).inc();
                t.health.set_error(Some(e.to_string()));
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "postgres unavailable; reconnecting");
                if pause(wait, t, shutdown).await {
                    return Ok(stopped(&ctx));
                }
            }
            Err(e) => {
                t.health.set_error(Some(e.to_string()));
                return Err(e);
            }
        }
    }
}

/// How the shutdown ended, from what the last drain saw.
fn stopped(ctx: &Ctx<'_>) -> Stopped {
    Stopped {
        unacknowledged: ctx.unacknowledged.get(),
    }
}

/// Sleeps `d` while ticking the watchdog; true when shutdown came first.
async fn pause(d: Duration, t: &Telemetry, shutdown: &CancellationToken) -> bool {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        t.health.tick();
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return true,
            _ = tokio::time::sleep((deadline - now).min(Duration::from_secs(1))) => {}
        }
    }
}

/// Calls `f` until it succeeds, a non-retryable error, or shutdown (`Ok(None)`).
async fn retrying<T, E, F, Fut>(
    cfg: &Config,
    t: &Telemetry,
    shutdown: &CancellationToken,
    what: &str,
    component: &str,
    mut f: F,
) -> Result<Option<T>, RelayError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: Into<RelayError>,
{
    let mut attempt = 0u32;
    loop {
        t.health.tick();
        let err = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            r = f() => match r {
                Ok(v) => return Ok(Some(v)),
                Err(e) => e.into(),
            },
        };
        t.health.set_ready();
        t.health.set_error(Some(err.to_string()));
        let retryable = match &err {
            RelayError::Source(e) => e.is_retryable(),
            RelayError::Sink(e) => e.is_retryable(),
            RelayError::Halted { .. } => false,
        };
        if !retryable {
            return Err(err);
        }
        let wait = backoff::delay(&cfg.retry, attempt);
        attempt = attempt.saturating_add(1);
        t.metrics.reconnects.with_label_values(&[component]).inc();
        match &err {
            RelayError::Sink(e) if e.needs_operator() => {
                // Wrong credentials or TLS: loud, counted, and still backed off.
                t.metrics
                    .publish_errors
                    .with_label_values(&[e.sink(), e.reason()])
                    .inc();
                tracing::error!(error = %err, retry_in_ms = wait.as_millis() as u64, "cannot {what}; retrying");
            }
            _ => {
                tracing::warn!(error = %err, retry_in_ms = wait.as_millis() as u64, "cannot {what}; retrying")
            }
        }
        if pause(wait, t, shutdown).await {
            return Ok(None);
        }
    }
}

/// Awaits a set-up step for at most 60 s.
pub(super) async fn bounded<T>(
    step: impl std::future::Future<Output = Result<T, SourceError>>,
) -> Result<T, SourceError> {
    tokio::time::timeout(Duration::from_secs(60), step)
        .await
        .map_err(|_| SourceError::Connection("set-up took longer than 60 s".into()))?
}
