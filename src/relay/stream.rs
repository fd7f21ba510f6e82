//! One streaming session's loop: read the stream, turn rows into events, admit them
//! through the [`Gate`] (one in flight per aggregate), publish, and confirm positions
//! through [`Progress`] as acknowledgements arrive; on shutdown, read the open
//! transaction to its Commit and drain what is in flight, both bounded.

use std::time::Duration;

use cloudevents::AttributesReader;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio_util::sync::CancellationToken;

use super::checkpoint::Checkpoints;
use super::gate::Gate;
use super::outcome::{
    delivered, invalid, publish_failed, rejected, sink_recovered, summarise_failure,
};
use super::policy::{self, Action};
use super::progress::{Progress, TxnId};
use super::{bounded, setup, Ctx, RelayError};
use crate::backoff;
use crate::event::{envelope, Envelope, Position};
use crate::lsn::lsn_text;
use crate::sink::{Checkpoint, Delivered, SinkError};
use crate::source::{Change, SourceError, Stream};
use crate::telemetry::{Role, Telemetry};

/// One event on its way to the broker.
struct Item {
    txn: TxnId,
    env: Envelope,
    attempt: u32,
    /// Commit time, Unix µs (end-to-end latency).
    commit_micros: i64,
}

type InFlight = FuturesUnordered<BoxFuture<'static, (Item, Result<Delivered, SinkError>)>>;

/// Sets up the publication and slot, then streams until shutdown or an error.
pub(super) async fn session(ctx: &Ctx<'_>, shutdown: &CancellationToken) -> Result<(), RelayError> {
    let (cfg, t) = (ctx.cfg, ctx.t);
    let Some(slot) = setup::slot(ctx, shutdown).await? else {
        return Ok(());
    };
    // From here on this process relies on the slot (a standby too: the active instance
    // confirms on it), so a slot that vanishes later is a loss, never a fresh start.
    ctx.slot_known.set(true);
    let mut stream = bounded(Stream::start(cfg, slot.confirmed_flush_lsn)).await?;
    // Exactly-once: what the broker already holds, read before the first row, and only
    // now that this process holds the slot (Kafka fences the previous holder's
    // producer, then aborts what it left open).
    let mut checkpoints = if ctx.sink.exactly_once() {
        let resume = resume(ctx).await?;
        Checkpoints::on(
            Duration::from_millis(cfg.sink.checkpoint_interval_ms),
            cfg.sink.checkpoint_max_events,
            resume,
        )
    } else {
        Checkpoints::off()
    };
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
    // Exactly-once: a checkpoint is due, so nothing more is read until it is written.
    let mut barrier = false;
    let outcome: Result<(), RelayError> = loop {
        let held = in_flight.len() + gate.parked();
        if let Some(deadline) = stop_by {
            if txn.is_none() || tokio::time::Instant::now() >= deadline {
                break Ok(());
            }
        }
        if checkpoints.due(tokio::time::Instant::now()) {
            barrier = true;
        }
        if barrier && in_flight.is_empty() {
            // Nothing in flight means nothing waits behind a key either: every row read
            // so far is acknowledged.
            barrier = false;
            if let Err(e) = write_checkpoint(ctx, &stream, &progress, &mut checkpoints).await {
                break Err(e);
            }
            continue;
        }
        let next_checkpoint = checkpoints.due_at();
        tokio::select! {
            biased;
            _ = shutdown.cancelled(), if stop_by.is_none() => {
                stop_by = Some(tokio::time::Instant::now() + Duration::from_secs(cfg.sink.shutdown_timeout_secs));
                continue;
            }
            _ = tokio::time::sleep_until(stop_by.unwrap_or_else(tokio::time::Instant::now)), if stop_by.is_some() => continue,
            _ = tokio::time::sleep_until(next_checkpoint.unwrap_or_else(tokio::time::Instant::now)), if next_checkpoint.is_some() && !barrier => {
                barrier = true;
            }
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
                let r = on_result(ctx, &mut progress, &mut checkpoints, &mut gate, &in_flight, &stream, item, result);
                if let Err(e) = r {
                    break Err(e);
                }
            }
            change = stream.next(), if held < max && !barrier => {
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
                        let at = Checkpoint { commit_lsn: pos.commit_lsn, index: u64::from(pos.index) };
                        let env = match envelope(&cfg.cloudevents, *row, pos) {
                            Ok(env) => env,
                            Err(poison) => match invalid(ctx, poison, pos, "") {
                                Ok(dead_letter) => dead_letter,
                                // Stop before the LSN can move past the row.
                                Err(e) => break Err(e),
                            },
                        };
                        if checkpoints.read(at, env.event.id()) {
                            skipped(t, &mut pos.index);
                            continue;
                        }
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
                            if let Some(lsn) = progress.commit(id, end_lsn).and_then(|l| checkpoints.confirmable(l)) {
                                confirm_txns(&stream, t, &progress, lsn);
                            }
                        }
                    }
                    Change::Idle { wal_end } => {
                        // Nothing open and nothing unacknowledged: everything the server
                        // decoded before `wal_end` is handled, so the slot may move there.
                        // This keeps WAL of other tables from piling up behind an idle outbox.
                        if txn.is_none() && progress.is_idle() && checkpoints.settled() {
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
            &mut checkpoints,
            &mut gate,
            &mut in_flight,
            &stream,
            deadline,
        )
        .await;
        if checkpoints.enabled() && !checkpoints.settled() {
            if ctx.unacknowledged.get() == 0 {
                if let Err(e) = write_checkpoint(ctx, &stream, &progress, &mut checkpoints).await {
                    tracing::warn!(error = %e, "the last checkpoint could not be written; the events since the one before are sent again after a restart");
                    ctx.sink.abandon().await;
                }
            } else {
                ctx.sink.abandon().await;
            }
        }
    } else if checkpoints.enabled() {
        ctx.sink.abandon().await;
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

/// Exactly-once, before the first row: what the broker already holds, within the
/// set-up bound.
async fn resume(ctx: &Ctx<'_>) -> Result<crate::sink::Resume, RelayError> {
    let resume = within(ctx, "reading the checkpoint back", ctx.sink.resume()).await?;
    tracing::info!(
        through = ?resume.through.map(|c| format!("{}#{}", lsn_text(c.commit_lsn), c.index)),
        ids_after = resume.ids.len(),
        "exactly-once: resuming after what the broker holds"
    );
    Ok(resume)
}

/// Awaits an exactly-once step of the sink for at most [`SETUP_TIMEOUT`]; running
/// over loses the broker transaction, like any other failure of the step.
async fn within<T>(
    ctx: &Ctx<'_>,
    what: &str,
    step: impl std::future::Future<Output = Result<T, SinkError>>,
) -> Result<T, SinkError> {
    tokio::time::timeout(SETUP_TIMEOUT, step)
        .await
        .map_err(|_| SinkError::Aborted {
            sink: ctx.sink.name(),
            reason: "timeout",
            detail: format!("{what} took longer than {SETUP_TIMEOUT:?}"),
        })?
}

/// How long reading the checkpoint back, or writing one, may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Exactly-once, with nothing in flight: writes the checkpoint at the last row read,
/// then confirms the slot position that waited for it.
async fn write_checkpoint(
    ctx: &Ctx<'_>,
    stream: &Stream,
    progress: &Progress,
    checkpoints: &mut Checkpoints,
) -> Result<(), RelayError> {
    let started = std::time::Instant::now();
    within(
        ctx,
        "writing the checkpoint",
        ctx.sink.checkpoint(checkpoints.position()),
    )
    .await?;
    ctx.t
        .metrics
        .checkpoint_duration
        .observe(started.elapsed().as_secs_f64());
    if let Some(lsn) = checkpoints.written(tokio::time::Instant::now()) {
        confirm_txns(stream, ctx.t, progress, lsn);
    }
    Ok(())
}

/// A row the broker already holds (exactly-once resume): counted, not sent.
fn skipped(t: &Telemetry, index: &mut u32) {
    t.metrics.events_skipped.inc();
    *index += 1;
}

/// Handles one publish outcome: ack and release the key, retry, or stop.
#[allow(clippy::too_many_arguments)] // the loop's state, borrowed piecewise
fn on_result(
    ctx: &Ctx<'_>,
    progress: &mut Progress,
    checkpoints: &mut Checkpoints,
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
            handled(ctx, progress, checkpoints, gate, in_flight, stream, &item);
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
                None => handled(ctx, progress, checkpoints, gate, in_flight, stream, &item),
            }
            Ok(())
        }
    }
}

/// `item` is done with (acknowledged, or recorded in the log): its transaction may be
/// confirmed, and the next event of its aggregate goes.
fn handled(
    ctx: &Ctx<'_>,
    progress: &mut Progress,
    checkpoints: &mut Checkpoints,
    gate: &mut Gate<Item>,
    in_flight: &InFlight,
    stream: &Stream,
    item: &Item,
) {
    if let Some(lsn) = progress
        .ack(item.txn)
        .and_then(|l| checkpoints.confirmable(l))
    {
        confirm_txns(stream, ctx.t, progress, lsn);
    }
    if let Some(next) = gate.release(&item.env.aggregate_id) {
        in_flight.push(deliver(ctx, next, Duration::ZERO));
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
    checkpoints: &mut Checkpoints,
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
                // Events already read wait behind this one for their aggregate: send
                // them too (within the deadline), or the confirmed position would stop
                // at the first of them and every later acknowledged event would be
                // sent again after the restart.
                handled(ctx, progress, checkpoints, gate, in_flight, stream, &item);
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
