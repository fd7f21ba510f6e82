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
pub mod progress;

use std::sync::Arc;
use std::time::Duration;

use cloudevents::AttributesReader;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::backoff;
use crate::config::Config;
use crate::event::{to_cloudevent, Position};
use crate::outbox::OutboxRow;
use crate::sink::{Delivered, Envelope, Sink, SinkError};
use crate::source::control::Control;
use crate::source::{Change, SourceError, Stream};
use gate::Gate;
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
}

type InFlight = FuturesUnordered<BoxFuture<'static, (Item, Result<Delivered, SinkError>)>>;

/// Runs until `shutdown` is cancelled (returns `Ok`) or a fatal error.
pub async fn run(cfg: Arc<Config>, shutdown: CancellationToken) -> Result<(), RelayError> {
    let Some(sink) = retrying(&cfg, &shutdown, "connect to the broker", || {
        Sink::connect(&cfg)
    })
    .await?
    else {
        return Ok(());
    };
    let sink = Arc::new(sink);
    let mut attempt = 0u32;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        match session(&cfg, &sink, &shutdown).await {
            Ok(()) => return Ok(()),
            Err(RelayError::Source(e)) if e.is_retryable() => {
                let wait = backoff::delay(&cfg.retry, attempt);
                attempt = attempt.saturating_add(1);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "postgres unavailable; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Calls `f` until it succeeds, a non-retryable error, or shutdown (`Ok(None)`).
async fn retrying<T, E, F, Fut>(
    cfg: &Config,
    shutdown: &CancellationToken,
    what: &str,
    mut f: F,
) -> Result<Option<T>, RelayError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: Into<RelayError>,
{
    let mut attempt = 0u32;
    loop {
        let err = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            r = f() => match r {
                Ok(v) => return Ok(Some(v)),
                Err(e) => e.into(),
            },
        };
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
        tracing::warn!(error = %err, retry_in_ms = wait.as_millis() as u64, "cannot {what}; retrying");
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Sets up the publication and slot, then streams until shutdown or an error.
async fn session(
    cfg: &Config,
    sink: &Arc<Sink>,
    shutdown: &CancellationToken,
) -> Result<(), RelayError> {
    let control = Control::connect(cfg).await?;
    control.ensure_publication(cfg).await?;
    let slot = control.ensure_slot(cfg).await?;
    drop(control);
    let mut stream = Stream::start(cfg, slot.confirmed_flush_lsn).await?;
    tracing::info!(slot = %cfg.postgres.slot, start_lsn = %lsn_text(slot.confirmed_flush_lsn), sink = sink.name(), "streaming");

    let mut progress = Progress::default();
    let mut gate: Gate<Item> = Gate::default();
    let mut in_flight: InFlight = FuturesUnordered::new();
    let mut txn: Option<(TxnId, Position)> = None;
    let max = cfg.sink.max_in_flight;

    let outcome: Result<(), RelayError> = loop {
        let room = in_flight.len() + gate.parked() < max;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            Some((item, result)) = in_flight.next(), if !in_flight.is_empty() => {
                if let Err(e) = on_result(cfg, sink, &mut progress, &mut gate, &in_flight, &stream, item, result) {
                    break Err(e);
                }
            }
            change = stream.next(), if room => {
                let change = match change {
                    Ok(Some(c)) => c,
                    Ok(None) => break Err(SourceError::Connection("replication stream ended".into()).into()),
                    Err(e) => break Err(e.into()),
                };
                match change {
                    Change::Begin { commit_lsn, commit_time, .. } => {
                        txn = Some((progress.begin(), Position { commit_lsn, commit_time, index: 0 }));
                    }
                    Change::Row(row) => {
                        let Some((id, pos)) = txn.as_mut() else { continue };
                        match envelope(cfg, *row, pos) {
                            Ok(env) => {
                                progress.add(*id);
                                let item = Item { txn: *id, env, attempt: 0 };
                                if let Some(item) = gate.admit(&item.env.aggregate_id.clone(), item) {
                                    in_flight.push(deliver(sink.clone(), item, Duration::ZERO));
                                }
                            }
                            Err((row_id, reason)) => {
                                // Poison row. `dead_letter` arrives with the failure-handling
                                // work; until then every policy halts here, before the LSN
                                // can move past the row.
                                tracing::error!(event_id = %row_id, %reason, "invalid outbox row");
                                break Err(RelayError::Halted { id: row_id, reason, policy_key: "on_invalid" });
                            }
                        }
                        pos.index += 1;
                    }
                    Change::Commit { end_lsn } => {
                        if let Some((id, _)) = txn.take() {
                            if let Some(lsn) = progress.commit(id, end_lsn) {
                                stream.confirm(lsn);
                            }
                        }
                    }
                    Change::Idle { wal_end } => {
                        // Nothing open and nothing unacknowledged: everything the server
                        // decoded before `wal_end` is handled, so the slot may move there.
                        // This keeps WAL of other tables from piling up behind an idle outbox.
                        if txn.is_none() && progress.is_idle() {
                            stream.confirm(wal_end);
                        }
                    }
                }
            }
        }
    };

    if outcome.is_ok() {
        drain(cfg, &mut progress, &mut gate, &mut in_flight, &stream).await;
    }
    stream.close(Duration::from_secs(5)).await;
    outcome
}

/// Builds the envelope, or names the poison row and why.
fn envelope(
    cfg: &Config,
    row: Result<OutboxRow, crate::outbox::OutboxError>,
    pos: &Position,
) -> Result<Envelope, (String, String)> {
    let row = row.map_err(|e| match e {
        crate::outbox::OutboxError::Invalid { id, reason } => (id, reason),
        other => ("<unknown>".to_string(), other.to_string()),
    })?;
    let event =
        to_cloudevent(&row, pos, &cfg.cloudevents).map_err(|e| (row.id.clone(), e.to_string()))?;
    Ok(Envelope {
        event,
        aggregate_type: row.aggregate_type,
        aggregate_id: row.aggregate_id,
        event_type: row.event_type,
    })
}

/// Handles one publish outcome: ack and release the key, retry, or stop.
#[allow(clippy::too_many_arguments)]
fn on_result(
    cfg: &Config,
    sink: &Arc<Sink>,
    progress: &mut Progress,
    gate: &mut Gate<Item>,
    in_flight: &InFlight,
    stream: &Stream,
    item: Item,
    result: Result<Delivered, SinkError>,
) -> Result<(), RelayError> {
    match result {
        Ok(_delivered) => {
            if let Some(lsn) = progress.ack(item.txn) {
                stream.confirm(lsn);
            }
            if let Some(next) = gate.release(&item.env.aggregate_id) {
                in_flight.push(deliver(sink.clone(), next, Duration::ZERO));
            }
            Ok(())
        }
        Err(e) if e.is_retryable() => {
            let wait = backoff::delay(&cfg.retry, item.attempt);
            tracing::warn!(event_id = %item.env.event.id(), attempt = item.attempt + 1, reason = e.reason(), error = %e, retry_in_ms = wait.as_millis() as u64, "publish failed; retrying");
            let item = Item {
                attempt: item.attempt.saturating_add(1),
                ..item
            };
            in_flight.push(deliver(sink.clone(), item, wait));
            Ok(())
        }
        Err(e @ SinkError::Rejected { .. }) => {
            let id = item.env.event.id().to_string();
            tracing::error!(event_id = %id, reason = e.reason(), error = %e, "broker rejected event");
            Err(RelayError::Halted {
                id,
                reason: e.to_string(),
                policy_key: "on_rejected",
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Waits (bounded by `sink.shutdown_timeout_secs`) for in-flight events to be
/// acknowledged so their LSN is confirmed before we exit. Nothing new is read, no
/// failed publish is retried: what is not acknowledged is sent again after restart.
async fn drain(
    cfg: &Config,
    progress: &mut Progress,
    gate: &mut Gate<Item>,
    in_flight: &mut InFlight,
    stream: &Stream,
) {
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(cfg.sink.shutdown_timeout_secs);
    let pending = in_flight.len();
    while !in_flight.is_empty() {
        let next = tokio::time::timeout_at(deadline, in_flight.next()).await;
        let Ok(Some((item, result))) = next else {
            break;
        };
        if result.is_ok() {
            if let Some(lsn) = progress.ack(item.txn) {
                stream.confirm(lsn);
            }
        }
        // Parked events of this key are not started: the slot will resend them.
        let _ = gate.release(&item.env.aggregate_id);
    }
    tracing::info!(
        waited_for = pending,
        unacknowledged = in_flight.len(),
        "in-flight events drained"
    );
}

fn deliver(
    sink: Arc<Sink>,
    item: Item,
    wait: Duration,
) -> BoxFuture<'static, (Item, Result<Delivered, SinkError>)> {
    Box::pin(async move {
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let r = sink.publish(&item.env).await;
        (item, r)
    })
}

/// `X/Y` text of an LSN, as Postgres prints it.
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}
