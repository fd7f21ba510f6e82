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

mod gate;
pub mod policy;
pub mod progress;
mod setup;
mod snapshot;

use std::sync::Arc;
use std::time::Duration;

use cloudevents::AttributesReader;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::backoff;
use crate::config::Config;
use crate::event::{deadletter, envelope, Envelope, Position};
use crate::lsn::lsn_text;
use crate::sink::{Delivered, Sink, SinkError};
use crate::source::outbox::PoisonRow;
use crate::source::{Change, SourceError, Stream};
use crate::telemetry::{Role, Telemetry};
use gate::Gate;
use policy::Action;
use progress::{Progress, TxnId};

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

/// One event on its way to the broker.
struct Item {
    txn: TxnId,
    env: Envelope,
    attempt: u32,
    /// Commit time, Unix µs (end-to-end latency).
    commit_micros: i64,
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

type InFlight = FuturesUnordered<BoxFuture<'static, (Item, Result<Delivered, SinkError>)>>;

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
    telemetry: &Telemetry,
    shutdown: &CancellationToken,
) -> Result<Stopped, RelayError> {
    let result = run_sessions(cfg, telemetry, shutdown).await;
    telemetry.metrics.set_streaming(false);
    result
}

async fn run_sessions(
    cfg: &Config,
    t: &Telemetry,
    shutdown: &CancellationToken,
) -> Result<Stopped, RelayError> {
    let connect = || Sink::connect(cfg, Some(&t.metrics));
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
        let result = session(&ctx, shutdown).await;
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

/// Sets up the publication and slot, then streams until shutdown or an error.
async fn session(ctx: &Ctx<'_>, shutdown: &CancellationToken) -> Result<(), RelayError> {
    let (cfg, t) = (ctx.cfg, ctx.t);
    let Some(slot) = setup::slot(ctx, shutdown).await? else {
        return Ok(());
    };
    // From here on this process relies on the slot (a standby too: the active instance
    // confirms on it), so a slot that vanishes later is a loss, never a fresh start.
    ctx.slot_known.set(true);
    let mut stream = bounded(Stream::start(cfg, slot.confirmed_flush_lsn)).await?;
    ctx.session_streamed.set(true);
    // Whatever waited for an operator is resolved: the slot was found usable.
    t.health.set_problem(None);
    t.metrics.blocked.set(0);
    t.health.set_ready();
    t.health.set_role(Role::Streaming);
    t.health.set_confirmed(slot.confirmed_flush_lsn);
    t.metrics.set_streaming(true);
    tracing::info!(slot = %cfg.postgres.slot, start_lsn = %lsn_text(slot.confirmed_flush_lsn), sink = ctx.sink.name(), "streaming");

    let mut progress = Progress::default();
    let mut gate: Gate<Item> = Gate::default();
    let mut in_flight: InFlight = FuturesUnordered::new();
    let mut txn: Option<(TxnId, Position)> = None;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let max = cfg.sink.max_in_flight;

    // On shutdown no new transaction is read, but an open one is read to its Commit
    // (within the shutdown deadline): a transaction whose rows were all acknowledged
    // but whose Commit was never read cannot be confirmed, and would be sent again.
    let mut stop_by: Option<tokio::time::Instant> = None;
    let mut blocked: Option<String> = None;
    let mut last_summary = tokio::time::Instant::now();
    let outcome: Result<(), RelayError> = loop {
        let held = in_flight.len() + gate.parked();
        if let Some(deadline) = stop_by {
            if txn.is_none() || tokio::time::Instant::now() >= deadline {
                break Ok(());
            }
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled(), if stop_by.is_none() => {
                stop_by = Some(tokio::time::Instant::now() + Duration::from_secs(cfg.sink.shutdown_timeout_secs));
                continue;
            }
            _ = tokio::time::sleep_until(stop_by.unwrap_or_else(tokio::time::Instant::now)), if stop_by.is_some() => continue,
            _ = ticker.tick() => {
                t.health.tick();
                summarise_failure(t, &mut last_summary);
                // The monitor found the table or the publication changed: stop reading,
                // confirm what the broker has, then wait for the operator.
                if stop_by.is_none() {
                    if let Some(problem) = t.health.problem() {
                        blocked = Some(problem);
                        stop_by = Some(tokio::time::Instant::now() + Duration::from_secs(cfg.sink.shutdown_timeout_secs));
                        continue;
                    }
                }
                let lag = progress.oldest_commit_micros().map_or(0.0, |c| {
                    (chrono::Utc::now().timestamp_micros() - c).max(0) as f64 / 1e6
                });
                t.metrics.lag_seconds.set(lag);
                t.health.set_lag_seconds(lag);
                t.metrics.events_in_flight.set(held as i64);
            }
            Some((item, result)) = in_flight.next(), if !in_flight.is_empty() => {
                let r = on_result(ctx, &mut progress, &mut gate, &in_flight, &stream, item, result);
                if let Err(e) = r {
                    break Err(e);
                }
            }
            change = stream.next(), if held < max => {
                let change = match change {
                    Ok(Some(c)) => c,
                    Ok(None) => break Err(SourceError::Connection("replication stream ended".into()).into()),
                    Err(e) => break Err(e.into()),
                };
                match change {
                    Change::Begin { commit_lsn, commit_time, .. } => {
                        let id = progress.begin(commit_time.timestamp_micros());
                        txn = Some((id, Position { commit_lsn, commit_time, index: 0 }));
                    }
                    Change::Row(row) => {
                        t.metrics.events_received.inc();
                        let Some((id, pos)) = txn.as_mut() else { continue };
                        let env = match envelope(&cfg.cloudevents, *row, pos) {
                            Ok(env) => env,
                            Err(poison) => match invalid(ctx, poison, pos, "") {
                                Ok(dead_letter) => dead_letter,
                                // Stop before the LSN can move past the row.
                                Err(e) => break Err(e),
                            },
                        };
                        progress.add(*id);
                        let key = env.aggregate_id.clone();
                        let commit_micros = pos.commit_time.timestamp_micros();
                        let item = Item { txn: *id, env, attempt: 0, commit_micros };
                        if let Some(item) = gate.admit(&key, item) {
                            in_flight.push(deliver(ctx, item, Duration::ZERO));
                        }
                        pos.index += 1;
                    }
                    Change::Commit { end_lsn } => {
                        if let Some((id, _)) = txn.take() {
                            if let Some(lsn) = progress.commit(id, end_lsn) {
                                confirm_txns(&stream, t, &progress, lsn);
                            }
                        }
                    }
                    Change::Idle { wal_end } => {
                        // Nothing open and nothing unacknowledged: everything the server
                        // decoded before `wal_end` is handled, so the slot may move there.
                        // This keeps WAL of other tables from piling up behind an idle outbox.
                        if txn.is_none() && progress.is_idle() {
                            confirm(&stream, t, wal_end);
                        }
                    }
                }
            }
        }
    };

    if outcome.is_ok() {
        // The drain shares the deadline of reading the open transaction: together they
        // take at most `sink.shutdown_timeout_secs` from the signal. (Each used to get
        // the whole timeout, so a hung broker made SIGTERM wait twice as long.)
        let deadline = stop_by.unwrap_or_else(|| {
            tokio::time::Instant::now() + Duration::from_secs(cfg.sink.shutdown_timeout_secs)
        });
        drain(
            ctx,
            &mut progress,
            &mut gate,
            &mut in_flight,
            &stream,
            deadline,
        )
        .await;
    }
    t.metrics.events_in_flight.set(0);
    // After a clean stop, give the final confirmation time to reach the server; after an
    // error the connection is gone and nothing can be sent, so do not wait for it.
    let wait = if outcome.is_ok() {
        FINAL_CONFIRM_TIMEOUT
    } else {
        Duration::ZERO
    };
    stream.close(wait).await;
    match (outcome, blocked) {
        (Ok(()), Some(problem)) => Err(SourceError::Blocked(problem).into()),
        (outcome, _) => outcome,
    }
}

/// On shutdown, after the drain: how long the final confirmed position may take to
/// reach Postgres and the replication connection to close. Part of the margin the
/// README states on top of `sink.shutdown_timeout_secs` (5 s in all, with `main`'s
/// bounds on the HTTP server and on releasing the broker client).
const FINAL_CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);

/// Awaits a set-up step for at most 60 s.
async fn bounded<T>(
    step: impl std::future::Future<Output = Result<T, SourceError>>,
) -> Result<T, SourceError> {
    tokio::time::timeout(Duration::from_secs(60), step)
        .await
        .map_err(|_| SourceError::Connection("set-up took longer than 60 s".into()))?
}

fn confirm(stream: &Stream, t: &Telemetry, lsn: u64) {
    stream.confirm(lsn);
    t.health.set_confirmed(lsn);
}

/// Confirms `lsn`, the end of the transactions `progress` just released, and
/// records their commit time as acknowledged (the retention watermark).
fn confirm_txns(stream: &Stream, t: &Telemetry, progress: &Progress, lsn: u64) {
    confirm(stream, t, lsn);
    if let Some(micros) = progress.confirmed_commit_micros() {
        t.health.set_acked_commit(micros);
    }
}

/// Handles one publish outcome: ack and release the key, retry, or stop.
fn on_result(
    ctx: &Ctx<'_>,
    progress: &mut Progress,
    gate: &mut Gate<Item>,
    in_flight: &InFlight,
    stream: &Stream,
    item: Item,
    result: Result<Delivered, SinkError>,
) -> Result<(), RelayError> {
    let (m, sink) = (&ctx.t.metrics, ctx.sink.name());
    let e = match result {
        Ok(delivered) => {
            sink_recovered(ctx.t);
            acknowledged(ctx.t, sink, &item, &delivered);
            if let Some(lsn) = progress.ack(item.txn) {
                confirm_txns(stream, ctx.t, progress, lsn);
            }
            if let Some(next) = gate.release(&item.env.aggregate_id) {
                in_flight.push(deliver(ctx, next, Duration::ZERO));
            }
            return Ok(());
        }
        Err(e) => e,
    };
    let on_rejected = ctx.cfg.sink.on_rejected;
    match policy::on_error(&e, item.attempt, None, on_rejected, item.env.dead_letter) {
        Action::Retry => {
            let wait = backoff::delay(&ctx.cfg.retry, item.attempt);
            publish_failed(ctx.t, &e);
            tracing::debug!(event_id = %item.env.event.id(), attempt = item.attempt + 1, reason = e.reason(), error = %e, retry_in_ms = wait.as_millis() as u64, "publish failed; retrying");
            let item = Item {
                attempt: item.attempt.saturating_add(1),
                ..item
            };
            in_flight.push(deliver(ctx, item, wait));
            Ok(())
        }
        Action::Fail => {
            m.publish_errors
                .with_label_values(&[sink, e.reason()])
                .inc();
            Err(e.into())
        }
        action => {
            m.publish_errors
                .with_label_values(&[sink, e.reason()])
                .inc();
            ctx.t.health.set_error(Some(e.to_string()));
            match rejected(ctx, &item.env, &e, action, "event")? {
                // Same transaction, same aggregate key (still held): order is kept.
                Some(env) => in_flight.push(deliver(
                    ctx,
                    Item {
                        env,
                        attempt: 0,
                        ..item
                    },
                    Duration::ZERO,
                )),
                // Recorded in the log: handled, like an ack.
                None => {
                    if let Some(lsn) = progress.ack(item.txn) {
                        confirm_txns(stream, ctx.t, progress, lsn);
                    }
                    if let Some(next) = gate.release(&item.env.aggregate_id) {
                        in_flight.push(deliver(ctx, next, Duration::ZERO));
                    }
                }
            }
            Ok(())
        }
    }
}

/// Acts on `action`, the policy's answer for an event the broker refused for good
/// (see [`policy::on_error`]): the dead letter to send in its place, the halt, or
/// `None` when the event was a dead letter that is itself too large: it is then
/// recorded in the log (it carries no payload, see `event::deadletter`) and counted,
/// and the stream moves on. `what` names the event in the log.
fn rejected(
    ctx: &Ctx<'_>,
    env: &Envelope,
    e: &SinkError,
    action: Action,
    what: &str,
) -> Result<Option<Envelope>, RelayError> {
    let m = &ctx.t.metrics;
    let id = env.event.id().to_string();
    m.poison_events
        .with_label_values(&[e.reason(), action.label()])
        .inc();
    match action {
        Action::Log => {
            let record = match env.event.data() {
                Some(cloudevents::Data::Json(v)) => v.to_string(),
                _ => String::new(),
            };
            tracing::error!(event_id = %id, error = %e, dead_letter = %record, "the dead letter does not fit the broker either; it is recorded in this log line instead and the stream moves on");
            Ok(None)
        }
        Action::DeadLetter => {
            tracing::warn!(event_id = %id, reason = e.reason(), error = %e, "broker rejected {what}; sending it to the dead-letter destination");
            Ok(Some(deadletter::for_rejected(
                env,
                e.reason(),
                &e.to_string(),
                &ctx.cfg.cloudevents,
            )))
        }
        // Halt: a dead letter refused for another reason than its size cannot go
        // anywhere until an operator fixes its destination; keep it.
        _ => {
            tracing::error!(event_id = %id, reason = e.reason(), error = %e, dead_letter = env.dead_letter, "broker rejected {what}; halting");
            Err(RelayError::Halted {
                id,
                reason: e.to_string(),
                policy_key: "on_rejected",
            })
        }
    }
}

/// Acts on `sink.on_invalid` (see [`policy::on_invalid`]) for a row that is not a
/// valid event: its dead letter at `pos`, or the halt. `place` says where the row
/// was read (empty for the stream), for the log.
fn invalid(
    ctx: &Ctx<'_>,
    poison: PoisonRow,
    pos: &Position,
    place: &str,
) -> Result<Envelope, RelayError> {
    let action = policy::on_invalid(ctx.cfg.sink.on_invalid);
    ctx.t
        .metrics
        .poison_events
        .with_label_values(&[poison.code, action.label()])
        .inc();
    if action == Action::Halt {
        tracing::error!(event_id = %poison.id, reason = %poison.reason, "invalid outbox row{place}; halting (sink.on_invalid = halt)");
        return Err(RelayError::Halted {
            id: poison.id,
            reason: poison.reason,
            policy_key: "on_invalid",
        });
    }
    tracing::warn!(event_id = %poison.id, reason = %poison.reason, "invalid outbox row{place}; sending it to the dead-letter destination");
    Ok(deadletter::for_row(&poison, pos, &ctx.cfg.cloudevents))
}

/// A publish attempt failed and is retried: counted, and logged once when the sink
/// starts failing (then summarised every [`FAILING_SUMMARY`] by the loop), not once
/// per event and attempt: a broker outage with 1,000 events in flight would
/// otherwise write thousands of lines a minute.
fn publish_failed(t: &Telemetry, e: &SinkError) {
    t.metrics
        .publish_errors
        .with_label_values(&[e.sink(), e.reason()])
        .inc();
    if t.health.sink_failed(e.to_string()) {
        t.metrics.sink_failing.set(1);
        tracing::warn!(reason = e.reason(), error = %e, "publishing fails; events are retried with backoff, in order, until the broker takes them (attempts are counted in outboxd_publish_errors_total)");
    }
}

/// A publish succeeded: ends (and logs the end of) a failure of the sink.
fn sink_recovered(t: &Telemetry) {
    if let Some(r) = t.health.sink_recovered() {
        t.metrics.sink_failing.set(0);
        tracing::info!(
            failed_attempts = r.failed_attempts,
            seconds = r.seconds,
            "publishing recovered"
        );
    }
}

/// While the sink fails, one summary line this often.
const FAILING_SUMMARY: Duration = Duration::from_secs(60);

/// The summary line of a failing sink, at most every [`FAILING_SUMMARY`].
fn summarise_failure(t: &Telemetry, last: &mut tokio::time::Instant) {
    let Some((since, attempts)) = t.health.sink_failing() else {
        return;
    };
    if last.elapsed() < FAILING_SUMMARY {
        return;
    }
    *last = tokio::time::Instant::now();
    let seconds = (chrono::Utc::now() - since).num_seconds();
    let error = t.health.report().sink.error.unwrap_or_default();
    tracing::warn!(
        failing_for_secs = seconds,
        failed_attempts = attempts,
        latest_error = %error,
        "publishing still fails; retrying"
    );
}

/// Counters of one delivered envelope: published, dead letters, broker duplicates.
fn delivered(t: &Telemetry, sink: &str, env: &Envelope, d: &Delivered) {
    let m = &t.metrics;
    m.published(sink, &d.destination);
    if env.dead_letter {
        let reason = env
            .event
            .extension("deadletterreason")
            .map(|v| v.to_string());
        m.dead_letters
            .with_label_values(&[reason.as_deref().unwrap_or("unknown")])
            .inc();
    }
    if d.duplicate {
        m.duplicates.with_label_values(&[sink]).inc();
    }
}

/// Metrics of one acknowledged event.
fn acknowledged(t: &Telemetry, sink: &str, item: &Item, d: &Delivered) {
    let m = &t.metrics;
    delivered(t, sink, &item.env, d);
    let now = chrono::Utc::now();
    m.end_to_end_latency
        .observe((now.timestamp_micros() - item.commit_micros).max(0) as f64 / 1e6);
    m.last_ack_timestamp_seconds
        .set(now.timestamp_micros() as f64 / 1e6);
}

/// Waits until `deadline` (the end of `sink.shutdown_timeout_secs` from the signal)
/// for in-flight events to be acknowledged so their LSN is confirmed before we exit.
/// Nothing new is read, no failed publish is retried: what is not acknowledged is sent
/// again after restart.
async fn drain(
    ctx: &Ctx<'_>,
    progress: &mut Progress,
    gate: &mut Gate<Item>,
    in_flight: &mut InFlight,
    stream: &Stream,
    deadline: tokio::time::Instant,
) {
    let pending = in_flight.len() + gate.parked();
    let mut acked = 0usize;
    while !in_flight.is_empty() {
        let next = tokio::time::timeout_at(deadline, in_flight.next()).await;
        let Ok(Some((item, result))) = next else {
            break;
        };
        match &result {
            Ok(delivered) => {
                acked += 1;
                acknowledged(ctx.t, ctx.sink.name(), &item, delivered);
                if let Some(lsn) = progress.ack(item.txn) {
                    confirm_txns(stream, ctx.t, progress, lsn);
                }
                // Events already read wait behind this one for their aggregate: send
                // them too (within the deadline), or the confirmed position would stop
                // at the first of them and every later acknowledged event would be
                // sent again after the restart.
                if let Some(next) = gate.release(&item.env.aggregate_id) {
                    in_flight.push(deliver(ctx, next, Duration::ZERO));
                }
            }
            // No retries while shutting down: this aggregate stops here, and the slot
            // resends from the first unconfirmed event after the restart.
            Err(_) => while gate.release(&item.env.aggregate_id).is_some() {},
        }
    }
    // Whatever was not acknowledged (failed, still in flight at the deadline, or
    // waiting behind one of those) stays unconfirmed and is sent again after a restart.
    let unacknowledged = pending.saturating_sub(acked);
    ctx.unacknowledged.set(unacknowledged);
    if unacknowledged == 0 {
        tracing::info!(waited_for = pending, "in-flight events drained");
    } else {
        tracing::warn!(
            waited_for = pending,
            acknowledged = acked,
            unacknowledged,
            "in-flight events not all acknowledged before the shutdown deadline; the slot was not confirmed past them, so they are sent again after a restart"
        );
    }
}

fn deliver(
    ctx: &Ctx<'_>,
    item: Item,
    wait: Duration,
) -> BoxFuture<'static, (Item, Result<Delivered, SinkError>)> {
    let (sink, timer) = (ctx.sink.clone(), ctx.publish_duration.clone());
    Box::pin(async move {
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let started = std::time::Instant::now();
        let r = sink.publish(&item.env).await;
        timer.observe(started.elapsed().as_secs_f64());
        (item, r)
    })
}
