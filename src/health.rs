//! What the process says about itself: role, progress, last error, and the
//! watchdog behind `/healthz`. Shared by the relay (writer) and the HTTP endpoints
//! (readers); cheap to update on the hot path (atomics, one short lock).
//!
//! Semantics (README, "Endpoints"):
//! - live: the relay loop ticked within [`LIVENESS_WINDOW`]. Postgres or the broker
//!   being down does not stop the ticks: a liveness failure restarts the container,
//!   which cures a stuck loop but never an outage.
//! - ready: the config loaded and the first connection attempt was made, whatever
//!   its outcome. A native sidecar's readiness gates the whole pod, so neither a
//!   standby role nor a slow broker may take the application out of its Service.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::metrics::Metrics;

/// How long the relay loop may go without a tick before `/healthz` fails.
pub const LIVENESS_WINDOW: Duration = Duration::from_secs(60);

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
    /// Last LSN confirmed to the server (`X/Y`).
    pub confirmed_lsn: String,
    /// Server WAL position at the last slot poll (`X/Y`).
    pub server_wal_lsn: String,
    /// Server WAL position minus confirmed LSN, bytes.
    pub lag_bytes: i64,
    /// Age of the oldest unacknowledged event, seconds.
    pub lag_seconds: f64,
    /// Last error, if any (never contains a secret or a payload).
    pub last_error: Option<String>,
}

#[derive(Debug)]
struct Inner {
    role: Role,
    last_error: Option<String>,
    server_wal_lsn: u64,
    lag_bytes: i64,
}

/// Metrics plus health: everything the endpoints read.
pub struct Telemetry {
    /// All metrics.
    pub metrics: Metrics,
    /// Role, watchdog, readiness.
    pub health: Health,
}

/// Role, progress, watchdog.
pub struct Health {
    slot: String,
    publication: String,
    inner: Mutex<Inner>,
    last_tick_ms: AtomicU64,
    confirmed_lsn: AtomicU64,
    lag_seconds_bits: AtomicU64,
    /// Commit time (Unix µs) of the newest confirmed transaction; 0 = none yet.
    acked_commit_micros: AtomicI64,
    ready: AtomicBool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Health {
    /// A fresh state: connecting, not ready, ticked now.
    pub fn new(slot: &str, publication: &str) -> Self {
        Self {
            slot: slot.to_string(),
            publication: publication.to_string(),
            inner: Mutex::new(Inner {
                role: Role::Connecting,
                last_error: None,
                server_wal_lsn: 0,
                lag_bytes: 0,
            }),
            last_tick_ms: AtomicU64::new(now_ms()),
            confirmed_lsn: AtomicU64::new(0),
            lag_seconds_bits: AtomicU64::new(0),
            acked_commit_micros: AtomicI64::new(0),
            ready: AtomicBool::new(false),
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

    /// `/readyz`.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Sets the role.
    pub fn set_role(&self, role: Role) {
        self.inner().role = role;
    }

    /// Current role.
    pub fn role(&self) -> Role {
        self.inner().role
    }

    /// Records the last error (shown in `/status`).
    pub fn set_error(&self, e: Option<String>) {
        self.inner().last_error = e;
    }

    /// Records the confirmed LSN.
    pub fn set_confirmed(&self, lsn: u64) {
        self.confirmed_lsn.fetch_max(lsn, Ordering::Relaxed);
    }

    /// Records the server's WAL position and the lag behind it.
    pub fn set_server(&self, wal_lsn: u64, lag_bytes: i64) {
        let mut i = self.inner();
        i.server_wal_lsn = wal_lsn;
        i.lag_bytes = lag_bytes;
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
            confirmed_lsn: crate::relay::lsn_text(self.confirmed_lsn.load(Ordering::Relaxed)),
            server_wal_lsn: crate::relay::lsn_text(i.server_wal_lsn),
            lag_bytes: i.lag_bytes,
            lag_seconds: f64::from_bits(self.lag_seconds_bits.load(Ordering::Relaxed)),
            last_error: i.last_error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_live_not_ready_connecting() {
        let h = Health::new("s", "p");
        assert!(h.is_live());
        assert!(!h.is_ready());
        h.set_ready();
        h.set_confirmed(0x1_0000_0010);
        h.set_confirmed(5); // never goes back
        let r = h.report();
        assert_eq!(r.role, Role::Connecting);
        assert_eq!(r.confirmed_lsn, "1/10");
        assert!(h.is_ready());
    }
}
