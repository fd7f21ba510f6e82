//! What the process tells about itself: [`Health`] (role, watchdog, readiness, the
//! `/status` report) and [`Metrics`] (every Prometheus series). Written by the relay,
//! the monitor and retention; read by the HTTP endpoints. A leaf: it imports only
//! `lsn` (to print positions), never the relay or the source it describes.

mod health;
mod metrics;

pub use health::{Health, Readiness, Recovery, Role, SinkStatus, StatusReport, LIVENESS_WINDOW};
pub use metrics::{
    Metrics, MetricsError, MAX_DESTINATIONS, POISON_ACTIONS, POISON_REASONS, WAL_STATUSES,
};

/// Metrics plus health: everything the endpoints read.
pub struct Telemetry {
    /// All metrics.
    pub metrics: Metrics,
    /// Role, watchdog, readiness.
    pub health: Health,
}
