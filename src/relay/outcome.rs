//! Acting on the policy's answers (`policy`): the counters, the log lines and the
//! dead letters of poison rows, rejected events, failing and recovering publishing.
//! Shared by the stream and the initial snapshot, so both report alike.

use std::time::Duration;

use cloudevents::AttributesReader;

use super::policy::{self, Action};
use super::{Ctx, RelayError};
use crate::event::{deadletter, Envelope, Position};
use crate::sink::{Delivered, SinkError};
use crate::source::outbox::PoisonRow;
use crate::telemetry::Telemetry;

/// Acts on `action`, the policy's answer for an event the broker refused for good
/// (see [`policy::on_error`]): the dead letter to send in its place, the halt, or
/// `None` when the event was a dead letter that is itself too large: it is then
/// recorded in the log (it carries no payload, see `event::deadletter`) and counted,
/// and the stream moves on. `what` names the event in the log.
pub(super) fn rejected(
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
pub(super) fn invalid(
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
pub(super) fn publish_failed(t: &Telemetry, e: &SinkError) {
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
pub(super) fn sink_recovered(t: &Telemetry) {
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
pub(super) fn summarise_failure(t: &Telemetry, last: &mut tokio::time::Instant) {
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
pub(super) fn delivered(t: &Telemetry, sink: &str, env: &Envelope, d: &Delivered) {
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
