//! `outboxd replay`: republish rows still present in the outbox table.
//!
//! Replay is a read of the table on an ordinary connection, never of the slot, which
//! it does not touch. Rows pass through the same column mapping (`outbox::Layout`)
//! and CloudEvents mapping as the stream, so every event keeps its original `id`:
//! JetStream (within its duplicate window) and consumers deduplicate as usual. To
//! rebuild a read model without dedup interfering, publish under another destination
//! with `--destination-prefix`.
//!
//! Order: rows are read in one REPEATABLE READ snapshot, ordered by `created_at` (when
//! mapped) then id, and published one at a time, each after the previous one's ack,
//! so every aggregate's events keep that order. The `sequence` extension of a
//! replayed event counts rows of the replay (its commit LSN is not known here).
//!
//! Failures follow the relay's policy (`relay::policy`) with two differences an
//! operator at a terminal wants: transient errors are retried with `[retry]`'s
//! backoff at most `MAX_RETRIES` (10) times, and neither an invalid row nor a rejected
//! event becomes a dead letter: an invalid row is listed and skipped (exit 1), a
//! rejection stops the replay. The row stays in the table either way.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use super::{CommandError, Step};

use crate::backoff;
use crate::config::{Config, PoisonPolicy, RetryConfig};
use crate::event::{table_envelope, Envelope};
use crate::relay::policy::{self, Action};
use crate::sink::{Routes, Sink, SinkError};
use crate::source::control::Control;
pub use crate::source::table::Selection;
use crate::source::table::{plan, PlanError};
use crate::source::SourceError;

/// Rows fetched per round trip.
const FETCH: i64 = 1000;

/// A replay failure.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Reading the table failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The table does not fit the mapping, or a selector is not usable.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Publishing failed (after the sink's own retries).
    #[error("publishing event {id}: {source}")]
    Sink {
        /// The event that failed.
        id: String,
        /// Why.
        #[source]
        source: SinkError,
    },
}

/// Replays the rows `sel` picks, under `prefix` + the configured destination when
/// given, prints the summary, and exits 1 when invalid rows were skipped.
pub async fn run(
    mut cfg: Config,
    sel: &Selection,
    prefix: Option<String>,
    dry_run: bool,
) -> Result<ExitCode, CommandError> {
    // A replay publishes at least once, outside the relay's checkpoints: it must not
    // take the relay's Kafka transactional.id (that would fence the running relay).
    cfg.kafka.exactly_once = false;
    cfg.nats.exactly_once = false;
    if let Some(p) = prefix {
        cfg.nats.subject = format!("{p}{}", cfg.nats.subject);
        cfg.kafka.topic = format!("{p}{}", cfg.kafka.topic);
    }
    // The prefix makes other templates: parsed (and checked) here, once.
    let routes = crate::sink::validate(&cfg).map_err(CommandError::other)?;
    let s = replay(&cfg, &routes, sel, dry_run)
        .await
        .step("replay failed")?;
    let verb = if dry_run {
        "would publish"
    } else {
        "published"
    };
    println!(
        "replay: {} rows matched, {verb} {}, {} invalid (skipped, listed above)",
        s.matched, s.published, s.invalid
    );
    Ok(if s.invalid == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_FAILURE)
    })
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Rows that matched.
    pub matched: u64,
    /// Events the broker acknowledged.
    pub published: u64,
    /// Rows that are not valid events (skipped, listed on stderr).
    pub invalid: u64,
}

/// Runs a replay. With `dry_run`, counts and prints up to 20 of the events it would
/// send, and sends nothing.
pub async fn replay(
    cfg: &Config,
    routes: &Routes,
    sel: &Selection,
    dry_run: bool,
) -> Result<Summary, ReplayError> {
    let mut control = Control::connect(cfg).await?;
    if let Some(fix) = control
        .privileges(cfg)
        .await?
        .missing_select(&cfg.postgres.table)
    {
        return Err(SourceError::Setup(fix).into());
    }
    let read = plan(&control, cfg, sel).await?;
    let sink = if dry_run {
        None
    } else {
        Some(
            Sink::connect(cfg, routes, None)
                .await
                .map_err(|source| ReplayError::Sink {
                    id: "-".into(),
                    source,
                })?,
        )
    };
    let tx = control.snapshot(None).await?;
    let total = read.open(&tx).await?;

    let mut summary = Summary {
        matched: total as u64,
        ..Summary::default()
    };
    let progress = !dry_run && std::io::stderr().is_terminal();
    let mut index = 0u32;
    loop {
        let rows = tx.fetch(FETCH).await?;
        if rows.is_empty() {
            break;
        }
        for values in rows {
            let env = match table_envelope(&cfg.cloudevents, &read.layout, &values, index) {
                Ok(env) => env,
                Err(poison) => {
                    summary.invalid += 1;
                    eprintln!("skipped: outbox row {}: {}", poison.id, poison.reason);
                    continue;
                }
            };
            index = index.wrapping_add(1);
            match &sink {
                None => {
                    if summary.published < 20 {
                        println!(
                            "would send {} {} {}/{}",
                            cloudevents::AttributesReader::id(&env.event),
                            env.event_type,
                            env.aggregate_type,
                            env.aggregate_id
                        );
                    }
                    summary.published += 1;
                }
                Some(s) => {
                    publish(s, &env, &cfg.retry).await?;
                    summary.published += 1;
                    if progress && summary.published.is_multiple_of(100) {
                        eprint!("\rreplayed {}/{}", summary.published, summary.matched);
                        let _ = std::io::stderr().flush();
                    }
                }
            }
        }
    }
    if progress {
        eprintln!("\rreplayed {}/{}", summary.published, summary.matched);
    }
    Ok(summary)
}

/// Retries of one event before a replay gives up: a replay is interactive, so it
/// stops and says so rather than wait for the broker for ever.
const MAX_RETRIES: u32 = 10;

/// Publishes one event with the relay's policy ([`policy::on_error`]): a transient
/// error is retried after `[retry]`'s backoff, at most [`MAX_RETRIES`] times. Replay
/// sends no dead letters (the row stays in the table, and the operator is at the
/// terminal): any rejection stops it, naming the event.
async fn publish(sink: &Sink, env: &Envelope, retry: &RetryConfig) -> Result<(), ReplayError> {
    let mut attempt = 0;
    loop {
        let e = match sink.publish(env).await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        let action = policy::on_error(
            &e,
            attempt,
            Some(MAX_RETRIES),
            PoisonPolicy::Halt,
            env.dead_letter,
        );
        if action != Action::Retry {
            return Err(ReplayError::Sink {
                id: cloudevents::AttributesReader::id(&env.event).to_string(),
                source: e,
            });
        }
        tokio::time::sleep(backoff::delay(retry, attempt)).await;
        attempt += 1;
    }
}
