//! Every metric outboxd exports, in one place, on one registry (no globals).
//!
//! Names follow `outboxd_<noun>_<unit>[_total]` in base units (seconds, bytes).
//! Labels have few values: sink names, short reason codes, and destinations capped
//! at [`MAX_DESTINATIONS`] distinct values (the rest count as `other`), so a subject
//! template with `{aggregate_id}` cannot explode the series count.
//! The README's metrics table lists each with its meaning.

use std::collections::HashSet;
use std::sync::Mutex;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Distinct `destination` label values before new ones count as `other`.
pub const MAX_DESTINATIONS: usize = 100;

/// The `wal_status` values of `pg_replication_slots`.
pub const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

/// Reasons a row or an event is poison: the row's (`schema`, `invalid_row`) and the
/// brokers' permanent refusals (`too_large`, `invalid_record`, `invalid_topic`,
/// `unauthorized`, `encode`). Series for them exist from the start
/// ([`Metrics::known_labels`]).
pub const POISON_REASONS: [&str; 7] = [
    "schema",
    "invalid_row",
    "too_large",
    "invalid_record",
    "invalid_topic",
    "unauthorized",
    "encode",
];

/// What was done with a poison event (`logged`: a dead letter too large for the
/// broker, written to the log instead).
pub const POISON_ACTIONS: [&str; 3] = ["dead_letter", "halt", "logged"];

/// A metrics registration failed: a programming error (duplicate name), fatal.
#[derive(Debug, thiserror::Error)]
#[error("metrics registry: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// The metrics of one process.
pub struct Metrics {
    registry: Registry,
    /// Rows read from the replication stream.
    pub events_received: IntCounter,
    published: IntCounterVec,
    destinations: Mutex<HashSet<String>>,
    /// Failed publish attempts by sink and reason.
    pub publish_errors: IntCounterVec,
    /// Events sent to the dead-letter destination, by reason.
    pub dead_letters: IntCounterVec,
    /// Invalid or rejected events by reason and action (`dead_letter`, `halt`).
    pub poison_events: IntCounterVec,
    /// Broker said "already have it".
    pub duplicates: IntCounterVec,
    /// One publish attempt until the broker's ack.
    pub publish_duration: HistogramVec,
    /// Commit timestamp to broker ack.
    pub end_to_end_latency: Histogram,
    /// Server WAL position minus the slot's confirmed flush LSN.
    pub replication_lag_bytes: IntGauge,
    /// Server WAL position minus the slot's restart_lsn.
    pub slot_retained_wal_bytes: IntGauge,
    /// `safe_wal_size` of the slot (only when the server limits it).
    /// No sample while `max_slot_wal_keep_size` is unlimited (or the slot is lost):
    /// use [`Metrics::set_safe_wal_size`].
    slot_safe_wal_size_bytes: IntGaugeVec,
    /// 1 for the slot's current `wal_status`.
    pub slot_wal_status: IntGaugeVec,
    /// Age of the oldest unacknowledged event.
    pub lag_seconds: Gauge,
    /// Events handed to the broker or waiting for their aggregate, not yet acknowledged.
    pub events_in_flight: IntGauge,
    /// Unix time of the last broker ack.
    pub last_ack_timestamp_seconds: Gauge,
    /// Reconnects by component (`postgres`, `broker`).
    pub reconnects: IntCounterVec,
    /// Kafka producers replaced by a fresh one, by reason (`fatal`, `fenced`).
    pub producer_replacements: IntCounterVec,
    /// 1 while this instance streams from the slot.
    pub streaming: IntGauge,
    /// 1 while publishes fail (and are retried), 0 once one succeeds again.
    pub sink_failing: IntGauge,
    /// 1 while outboxd waits for an operator (slot lost, table or publication changed).
    pub blocked: IntGauge,
    /// Times this instance started or stopped streaming.
    pub leadership_changes: IntCounter,
    /// The slot's confirmed flush LSN as a number.
    pub confirmed_lsn_bytes: IntGauge,
    /// Heartbeat messages written.
    pub heartbeats: IntCounter,
    /// Events of the initial snapshot acknowledged by the broker.
    pub snapshot_events: IntCounter,
    /// Outbox rows deleted by retention.
    pub retention_deleted_rows: IntCounter,
    /// Exactly-once: rows not sent again because the broker already held them.
    pub events_skipped: IntCounter,
    /// Exactly-once: writing one checkpoint (Kafka: committing the transaction).
    pub checkpoint_duration: Histogram,
    /// Failed retention rounds (the relay goes on).
    pub retention_errors: IntCounter,
}

impl Metrics {
    /// Registers everything.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m;
                registry.register(Box::new(m.clone()))?;
                m
            }};
        }
        let latency_buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0,
        ];
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds,
        // process_max_fds, process_virtual_memory_bytes, process_start_time_seconds
        // (Linux; elsewhere the collector exports nothing).
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let m = Self {
            events_received: reg!(IntCounter::new(
                "outboxd_events_received_total",
                "Outbox rows read from the replication stream."
            )?),
            published: reg!(IntCounterVec::new(
                Opts::new("outboxd_events_published_total", "Events acknowledged by the broker."),
                &["sink", "destination"]
            )?),
            destinations: Mutex::new(HashSet::new()),
            publish_errors: reg!(IntCounterVec::new(
                Opts::new("outboxd_publish_errors_total", "Failed publish attempts."),
                &["sink", "reason"]
            )?),
            dead_letters: reg!(IntCounterVec::new(
                Opts::new(
                    "outboxd_dead_letters_total",
                    "Events published to the dead-letter destination."
                ),
                &["reason"]
            )?),
            poison_events: reg!(IntCounterVec::new(
                Opts::new(
                    "outboxd_poison_events_total",
                    "Invalid or permanently rejected events, by what was done with them."
                ),
                &["reason", "action"]
            )?),
            duplicates: reg!(IntCounterVec::new(
                Opts::new(
                    "outboxd_duplicates_total",
                    "Events the broker reported as duplicates (already stored)."
                ),
                &["sink"]
            )?),
            publish_duration: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "outboxd_publish_duration_seconds",
                    "One publish attempt, from send to the broker's ack."
                )
                .buckets(latency_buckets.clone()),
                &["sink"]
            )?),
            end_to_end_latency: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "outboxd_end_to_end_latency_seconds",
                    "From the Postgres commit timestamp to the broker's ack."
                )
                .buckets(latency_buckets)
            )?),
            replication_lag_bytes: reg!(IntGauge::new(
                "outboxd_replication_lag_bytes",
                "Server WAL position minus the slot's confirmed flush LSN."
            )?),
            slot_retained_wal_bytes: reg!(IntGauge::new(
                "outboxd_slot_retained_wal_bytes",
                "WAL the slot keeps on the server's disk (WAL position minus restart_lsn)."
            )?),
            slot_safe_wal_size_bytes: reg!(IntGaugeVec::new(
                Opts::new(
                    "outboxd_slot_safe_wal_size_bytes",
                    "WAL that can still be written before the slot is in danger (max_slot_wal_keep_size); no sample while that is unlimited."
                ),
                &[]
            )?),
            slot_wal_status: reg!(IntGaugeVec::new(
                Opts::new(
                    "outboxd_slot_wal_status",
                    "1 for the slot's current wal_status (reserved, extended, unreserved, lost)."
                ),
                &["status"]
            )?),
            lag_seconds: reg!(Gauge::new(
                "outboxd_lag_seconds",
                "Age of the oldest event not yet acknowledged by the broker; 0 when caught up."
            )?),
            events_in_flight: reg!(IntGauge::new(
                "outboxd_events_in_flight",
                "Events read but not yet acknowledged by the broker."
            )?),
            last_ack_timestamp_seconds: reg!(Gauge::new(
                "outboxd_last_ack_timestamp_seconds",
                "Unix time of the last broker acknowledgement."
            )?),
            reconnects: reg!(IntCounterVec::new(
                Opts::new("outboxd_reconnects_total", "Reconnect attempts after a lost or failed connection."),
                &["component"]
            )?),
            producer_replacements: reg!(IntCounterVec::new(
                Opts::new(
                    "outboxd_producer_replacements_total",
                    "Kafka producers replaced by a fresh one after librdkafka's fatal error or a fenced producer id/epoch."
                ),
                &["reason"]
            )?),
            streaming: reg!(IntGauge::new(
                "outboxd_streaming",
                "1 while this instance streams from the replication slot, else 0."
            )?),
            blocked: reg!(IntGauge::new(
                "outboxd_blocked",
                "1 while outboxd waits for an operator: the slot was lost, or the outbox table or the publication changed (see /status.problem)."
            )?),
            sink_failing: reg!(IntGauge::new(
                "outboxd_sink_failing",
                "1 while publishes to the broker fail and are retried, 0 once one succeeds."
            )?),
            leadership_changes: reg!(IntCounter::new(
                "outboxd_leadership_changes_total",
                "Times this instance started or stopped streaming from the slot."
            )?),
            confirmed_lsn_bytes: reg!(IntGauge::new(
                "outboxd_confirmed_lsn_bytes",
                "The slot's confirmed flush LSN, as a byte position."
            )?),
            heartbeats: reg!(IntCounter::new(
                "outboxd_heartbeats_total",
                "Heartbeat messages written with pg_logical_emit_message."
            )?),
            snapshot_events: reg!(IntCounter::new(
                "outboxd_snapshot_events_total",
                "Events of the initial snapshot acknowledged by the broker."
            )?),
            retention_deleted_rows: reg!(IntCounter::new(
                "outboxd_retention_deleted_rows_total",
                "Acknowledged outbox rows deleted by retention."
            )?),
            events_skipped: reg!(IntCounter::new(
                "outboxd_events_skipped_total",
                "Exactly-once mode: rows read again after a restart and not sent, because the broker already held their events."
            )?),
            checkpoint_duration: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "outboxd_checkpoint_duration_seconds",
                    "Exactly-once mode: writing one checkpoint (Kafka: committing the transaction)."
                )
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
            )?),
            retention_errors: reg!(IntCounter::new(
                "outboxd_retention_errors_total",
                "Retention rounds that failed (relaying goes on)."
            )?),
            registry,
        };
        let build = IntGaugeVec::new(
            Opts::new("outboxd_build_info", "Always 1; the version is a label."),
            &["version"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        m.registry.register(Box::new(build))?;
        for s in WAL_STATUSES {
            m.slot_wal_status.with_label_values(&[s]).set(0);
        }
        Ok(m)
    }

    /// Counts an acknowledged event for `destination` (capped cardinality).
    pub fn published(&self, sink: &str, destination: &str) {
        let known = {
            let mut d = self.destinations.lock().unwrap_or_else(|p| p.into_inner());
            d.contains(destination)
                || (d.len() < MAX_DESTINATIONS && d.insert(destination.to_string()))
        };
        let label = if known { destination } else { "other" };
        self.published.with_label_values(&[sink, label]).inc();
    }

    /// Sets `outboxd_slot_wal_status` to 1 for `status`, 0 for the others.
    pub fn set_wal_status(&self, status: &str) {
        for s in WAL_STATUSES {
            self.slot_wal_status
                .with_label_values(&[s])
                .set(i64::from(s == status));
        }
    }

    /// Sets the streaming gauge, counting a change of role.
    pub fn set_streaming(&self, on: bool) {
        if (self.streaming.get() == 1) != on {
            self.streaming.set(i64::from(on));
            self.leadership_changes.inc();
        }
    }

    /// The slot's `safe_wal_size`; `None` (unlimited `max_slot_wal_keep_size`, or a lost
    /// slot) removes the sample, so that "unlimited" never reads as "0 bytes left".
    pub fn set_safe_wal_size(&self, bytes: Option<i64>) {
        match bytes {
            Some(b) => self
                .slot_safe_wal_size_bytes
                .with_label_values::<&str>(&[])
                .set(b),
            None => self.slot_safe_wal_size_bytes.reset(),
        }
    }

    /// Creates, at 0, the series a relay publishing to `sink` knows from the start:
    /// its publish-error reasons, the poison reasons and actions, dead letters,
    /// duplicates and reconnects. `rate()` and `increase()` then see the first error;
    /// a series born at 1 has no increase.
    pub fn known_labels(&self, sink: &str, publish_reasons: &[&str]) {
        for reason in publish_reasons {
            self.publish_errors.with_label_values(&[sink, reason]);
        }
        for reason in POISON_REASONS {
            self.dead_letters.with_label_values(&[reason]);
            for action in POISON_ACTIONS {
                self.poison_events.with_label_values(&[reason, action]);
            }
        }
        self.duplicates.with_label_values(&[sink]);
        for component in ["postgres", "broker"] {
            self.reconnects.with_label_values(&[component]);
        }
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_are_capped() {
        let m = Metrics::new().expect("registers");
        for i in 0..(MAX_DESTINATIONS + 10) {
            m.published("nats", &format!("outbox.t{i}"));
        }
        m.published("nats", "outbox.t0");
        let text = m.render();
        assert!(
            text.contains(r#"outboxd_events_published_total{destination="other",sink="nats"} 10"#),
            "{text}"
        );
        assert!(text
            .contains(r#"outboxd_events_published_total{destination="outbox.t0",sink="nats"} 2"#));
    }

    #[test]
    fn safe_wal_size_is_absent_while_unlimited() {
        let m = Metrics::new().expect("registers");
        m.set_safe_wal_size(None);
        assert!(!m.render().contains("outboxd_slot_safe_wal_size_bytes "));
        m.set_safe_wal_size(Some(0));
        assert!(m.render().contains("outboxd_slot_safe_wal_size_bytes 0"));
        m.set_safe_wal_size(None);
        assert!(!m.render().contains("outboxd_slot_safe_wal_size_bytes "));
    }

    #[test]
    fn wal_status_and_streaming() {
        let m = Metrics::new().expect("registers");
        m.set_wal_status("extended");
        m.set_streaming(true);
        m.set_streaming(true);
        m.set_streaming(false);
        let text = m.render();
        assert!(text.contains(r#"outboxd_slot_wal_status{status="extended"} 1"#));
        assert!(text.contains(r#"outboxd_slot_wal_status{status="reserved"} 0"#));
        assert!(text.contains("outboxd_leadership_changes_total 2"));
        assert!(text.contains("outboxd_build_info{version=\""));
    }
}
