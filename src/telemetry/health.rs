//! What the process says about itself: role, progress, the sink's state, the last
//! error, problems only an operator can fix, and the watchdog behind `/healthz`.
//! Shared by the relay (writer) and the HTTP endpoints (readers); cheap to update on
//! the hot path (atomics, one short lock).
//!
//! Semantics (README, "Endpoints"):
//! - live: the relay loop ticked within [`LIVENESS_WINDOW`]. Postgres or the broker
//!   being down does not stop the ticks: a liveness failure restarts the container,
//!   which cures a stuck loop but never an outage.
//! - ready: the config loaded, the first connection attempt was made, and no problem
//!   waits for an operator ([`Health::set_problem`]: the outbox table left the
//!   publication, for instance). A native sidecar's readiness gates the whole pod, so
//!   an outage (broker or Postgres down, publishes failing) or a standby role does not
//!   take the application out of its Service by default; with
//!   `http.readiness = "strict"` a failing sink or a relay that is not streaming
//!   is not ready either.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use serde::Serialize;

/// How long the relay loop may go without a tick before `/healthz` fails.
pub const LIVENESS_WINDOW: Duration = Duration::from_secs(60);

/// How `/readyz` judges (`http.readiness`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Ready unless an operator must act (default: the sidecar may not take its pod
    /// out of service for an outage).
    Sidecar,
    /// Also not ready while publishes fail or while this instance neither streams nor
    /// stands by.
    Strict,
}

/// What this instance is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Setting up or reconnecting.
    Connecting,
    /// Streaming from the slot.
    Streaming,
    /// Another instance holds the slot.
    Standby,
    /// Waits for an operator (see `/status.problem`): the slot was lost, or the table
    /// or the publication changed.
    Blocked,
}

/// The `/status` document.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// Current role.
    pub role: Role,
    /// Slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// Last LSN this process confirmed to the server (`X/Y`), live.
    pub confirmed_lsn: String,
    /// When it was confirmed (RFC 3339); `None` before the first confirm.
    pub confirmed_at: Option<String>,
    /// Server WAL position at the last slot poll (`X/Y`). Read every
    /// `postgres.monitor_interval_secs`, so the live `confirmed_lsn` may be ahead of it.
    pub server_wal_lsn: String,
    /// The slot's confirmed position as the server reported it in the same poll.
    pub server_confirmed_lsn: String,
    /// `server_wal_lsn` minus `server_confirmed_lsn`, bytes (same poll).
    pub lag_bytes: i64,
    /// When that poll read them (RFC 3339); `None` before the first poll.
    pub server_read_at: Option<String>,
    /// Age of the oldest unacknowledged event, seconds.
    pub lag_seconds: f64,
    /// Last error, if any (never contains a secret or a payload).
    pub last_error: Option<String>,
    /// When the last error happened (RFC 3339).
    pub last_error_at: Option<String>,
    /// What waits for an operator (the relay is not ready meanwhile), if anything.
    pub problem: Option<String>,
    /// The broker side.
    pub sink: SinkStatus,
}

/// The broker side of `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct SinkStatus {
    /// `ok`, or `failing` while publishes fail and are retried.
    pub state: &'static str,
    /// When the current failure began (RFC 3339).
    pub failing_since: Option<String>,
    /// Failed publish attempts since then.
    pub failed_attempts: u64,
    /// The latest publish failure of the current failure.
    pub error: Option<String>,
}

/// What a sink failure ended with (see [`Health::sink_recovered`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recovery {
    /// Failed attempts during the failure.
    pub failed_attempts: u64,
    /// How long it lasted.
    pub seconds: f64,
}

#[derive(Debug)]
struct Inner {
    role: Role,
    last_error: Option<(String, DateTime<Utc>)>,
    problem: Option<String>,
    sink_failing_since: Option<DateTime<Utc>>,
    sink_failures: u64,
    sink_error: Option<String>,
    server_wal_lsn: u64,
    server_confirmed_lsn: u64,
    lag_bytes: i64,
    server_read_at: Option<DateTime<Utc>>,
}

/// Role, progress, watchdog.
pub struct Health {
    slot: String,
    publication: String,
    inner: Mutex<Inner>,
    last_tick_ms: AtomicU64,
    confirmed_lsn: AtomicU64,
    /// When `confirmed_lsn` last moved (Unix µs); 0 = never.
    confirmed_at_micros: AtomicI64,
    lag_seconds_bits: AtomicU64,
    /// Commit time (Unix µs) of the newest confirmed transaction; 0 = none yet.
    acked_commit_micros: AtomicI64,
    ready: AtomicBool,
    readiness: Readiness,
    /// Mirrors `Inner::sink_failing_since.is_some()`, so an ack checks it without the lock.
    sink_failing: AtomicBool,
}

fn rfc3339(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Health {
    /// A fresh state: connecting, not ready, ticked now.
    pub fn new(slot: &str, publication: &str, readiness: Readiness) -> Self {
        Self {
            slot: slot.to_string(),
            publication: publication.to_string(),
            inner: Mutex::new(Inner {
                role: Role::Connecting,
                last_error: None,
                problem: None,
                sink_failing_since: None,
                sink_failures: 0,
                sink_error: None,
                server_wal_lsn: 0,
                server_confirmed_lsn: 0,
                lag_bytes: 0,
                server_read_at: None,
            }),
            last_tick_ms: AtomicU64::new(now_ms()),
            confirmed_lsn: AtomicU64::new(0),
            confirmed_at_micros: AtomicI64::new(0),
            lag_seconds_bits: AtomicU64::new(0),
            acked_commit_micros: AtomicI64::new(0),
            ready: AtomicBool::new(false),
            readiness,
            sink_failing: AtomicBool::new(false),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Everything committed up to `micros` (Unix µs, the commit time of a confirmed
    /// transaction) is acknowledged; monotonic.
    pub fn set_acked_commit(&self, micros: i64) {
        self.acked_commit_micros
            .fetch_max(micros, Ordering::Relaxed);
    }

    /// Commit time (Unix µs) of the newest transaction this process confirmed, if any:
    /// the retention watermark.
    pub fn acked_commit(&self) -> Option<i64> {
        Some(self.acked_commit_micros.load(Ordering::Relaxed)).filter(|m| *m > 0)
    }

    /// The relay loop is alive.
    pub fn tick(&self) {
        self.last_tick_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// `/healthz`: ticked within the liveness window.
    pub fn is_live(&self) -> bool {
        now_ms().saturating_sub(self.last_tick_ms.load(Ordering::Relaxed))
            < LIVENESS_WINDOW.as_millis() as u64
    }

    /// The first connection attempt was made.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// `/readyz`: `Err` with the reason when not ready.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.ready.load(Ordering::Relaxed) {
            return Err("starting".into());
        }
        let i = self.inner();
        if let Some(problem) = &i.problem {
            return Err(problem.clone());
        }
        if self.readiness == Readiness::Strict {
            if let Some(error) = &i.sink_error {
                return Err(format!("publishing fails: {error}"));
            }
            if i.role == Role::Connecting {
                return Err(match &i.last_error {
                    Some((e, _)) => format!("not streaming: {e}"),
                    None => "not streaming yet".into(),
                });
            }
        }
        Ok(())
    }

    /// `/readyz` as a yes or no.
    pub fn is_ready(&self) -> bool {
        self.readiness().is_ok()
    }

    /// Something only an operator can fix (`None` once it is fixed): reported in
    /// `/status.problem`, and the instance is not ready meanwhile.
    pub fn set_problem(&self, problem: Option<String>) {
        let mut i = self.inner();
        if let Some(p) = &problem {
            i.last_error = Some((p.clone(), Utc::now()));
        }
        i.problem = problem;
    }

    /// What waits for an operator, if anything.
    pub fn problem(&self) -> Option<String> {
        self.inner().problem.clone()
    }

    /// A publish failed (it is retried). True when this starts a failure, so the
    /// caller logs it once rather than once per event and attempt.
    pub fn sink_failed(&self, error: String) -> bool {
        let now = Utc::now();
        let mut i = self.inner();
        let started = i.sink_failing_since.is_none();
        if started {
            i.sink_failing_since = Some(now);
            i.sink_failures = 0;
            self.sink_failing.store(true, Ordering::Relaxed);
        }
        i.sink_failures += 1;
        i.last_error = Some((error.clone(), now));
        i.sink_error = Some(error);
        started
    }

    /// A publish succeeded: the failure that was going on, if any, is over.
    pub fn sink_recovered(&self) -> Option<Recovery> {
        if !self.sink_failing.load(Ordering::Relaxed) {
            return None;
        }
        let mut i = self.inner();
        self.sink_failing.store(false, Ordering::Relaxed);
        let since = i.sink_failing_since.take()?;
        i.sink_error = None;
        Some(Recovery {
            failed_attempts: std::mem::take(&mut i.sink_failures),
            seconds: (Utc::now() - since).num_milliseconds().max(0) as f64 / 1e3,
        })
    }

    /// The current sink failure: since when, and how many attempts failed.
    pub fn sink_failing(&self) -> Option<(DateTime<Utc>, u64)> {
        let i = self.inner();
        i.sink_failing_since.map(|since| (since, i.sink_failures))
    }

    /// Sets the role.
    pub fn set_role(&self, role: Role) {
        self.inner().role = role;
    }

    /// Current role.
    pub fn role(&self) -> Role {
        self.inner().role
    }

    /// Records the last error (shown in `/status` with its time).
    pub fn set_error(&self, e: Option<String>) {
        self.inner().last_error = e.map(|e| (e, Utc::now()));
    }

    /// Records the confirmed LSN.
    pub fn set_confirmed(&self, lsn: u64) {
        if self.confirmed_lsn.fetch_max(lsn, Ordering::Relaxed) < lsn {
            self.confirmed_at_micros
                .store(Utc::now().timestamp_micros(), Ordering::Relaxed);
        }
    }

    /// Records one poll of the slot: the server's WAL position, the slot's confirmed
    /// position and the lag between them, read together.
    pub fn set_server(&self, wal_lsn: u64, confirmed_lsn: u64, lag_bytes: i64) {
        let mut i = self.inner();
        i.server_wal_lsn = wal_lsn;
        i.server_confirmed_lsn = confirmed_lsn;
        i.lag_bytes = lag_bytes;
        i.server_read_at = Some(Utc::now());
    }

    /// Records the lag in seconds.
    pub fn set_lag_seconds(&self, s: f64) {
        self.lag_seconds_bits.store(s.to_bits(), Ordering::Relaxed);
    }

    /// The `/status` document.
    pub fn report(&self) -> StatusReport {
        let i = self.inner();
        StatusReport {
            role: i.role,
            slot: self.slot.clone(),
            publication: self.publication.clone(),
            confirmed_lsn: crate::lsn::lsn_text(self.confirmed_lsn.load(Ordering::Relaxed)),
            confirmed_at: match self.confirmed_at_micros.load(Ordering::Relaxed) {
                0 => None,
                us => DateTime::<Utc>::from_timestamp_micros(us).map(|t| rfc3339(&t)),
            },
            server_wal_lsn: crate::lsn::lsn_text(i.server_wal_lsn),
            server_confirmed_lsn: crate::lsn::lsn_text(i.server_confirmed_lsn),
            lag_bytes: i.lag_bytes,
            server_read_at: i.server_read_at.as_ref().map(rfc3339),
            lag_seconds: f64::from_bits(self.lag_seconds_bits.load(Ordering::Relaxed)),
            last_error: i.last_error.as_ref().map(|(e, _)| e.clone()),
            last_error_at: i.last_error.as_ref().map(|(_, at)| rfc3339(at)),
            problem: i.problem.clone(),
            sink: SinkStatus {
                state: if i.sink_failing_since.is_some() {
                    "failing"
                } else {
                    "ok"
                },
                failing_since: i.sink_failing_since.as_ref().map(rfc3339),
                failed_attempts: i.sink_failures,
                error: i.sink_error.clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_live_not_ready_connecting() {
        let h = Health::new("s", "p", Readiness::Sidecar);
        assert!(h.is_live());
        assert!(!h.is_ready());
        h.set_ready();
        h.set_confirmed(0x1_0000_0010);
        h.set_confirmed(5); // never goes back
        let r = h.report();
        assert_eq!(r.role, Role::Connecting);
        assert_eq!(r.confirmed_lsn, "1/10");
        assert!(r.confirmed_at.is_some());
        assert_eq!(r.server_read_at, None);
        h.set_server(0x1_0000_0020, 0x1_0000_0008, 0x18);
        let r = h.report();
        assert_eq!(
            (
                r.server_wal_lsn.as_str(),
                r.server_confirmed_lsn.as_str(),
                r.lag_bytes
            ),
            ("1/20", "1/8", 0x18)
        );
        assert!(r.server_read_at.is_some());
        assert!(h.is_ready());
    }

    #[test]
    fn a_failing_sink_is_reported_once_and_until_it_recovers() {
        let h = Health::new("s", "p", Readiness::Sidecar);
        h.set_ready();
        // Given three failed attempts
        assert!(h.sink_failed("nats: timeout".into()));
        assert!(!h.sink_failed("nats: timeout".into()));
        assert!(!h.sink_failed("nats: disconnected".into()));
        // Then /status says failing, with the count and the latest error
        let r = h.report();
        assert_eq!(r.sink.state, "failing");
        assert_eq!(r.sink.failed_attempts, 3);
        assert_eq!(r.sink.error.as_deref(), Some("nats: disconnected"));
        assert_eq!(r.last_error.as_deref(), Some("nats: disconnected"));
        assert!(r.sink.failing_since.is_some() && r.last_error_at.is_some());
        // and a sidecar stays ready, a strict instance does not
        assert!(h.is_ready());
        let strict = Health::new("s", "p", Readiness::Strict);
        strict.set_ready();
        strict.set_role(Role::Streaming);
        assert!(strict.is_ready());
        strict.sink_failed("kafka: timeout".into());
        assert!(strict
            .readiness()
            .is_err_and(|e| e.contains("kafka: timeout")));
        // When a publish succeeds, the failure ends once
        let rec = h.sink_recovered().expect("was failing");
        assert_eq!(rec.failed_attempts, 3);
        assert_eq!(h.sink_recovered(), None);
        assert_eq!(h.report().sink.state, "ok");
        assert!(strict.sink_recovered().is_some() && strict.is_ready());
    }

    #[test]
    fn a_problem_for_an_operator_makes_it_not_ready() {
        let h = Health::new("s", "p", Readiness::Sidecar);
        h.set_ready();
        h.set_problem(Some("table left the publication".into()));
        assert_eq!(h.readiness(), Err("table left the publication".to_string()));
        assert_eq!(
            h.report().problem.as_deref(),
            Some("table left the publication")
        );
        h.set_problem(None);
        assert!(h.is_ready());
    }
}
