//! outboxd: the transactional outbox, relayed.
//!
//! Applications insert events into an `outbox` table inside their own transactions.
//! outboxd tails that table through PostgreSQL logical replication (pgoutput), turns
//! every row into a CloudEvents 1.0 event and publishes it to NATS JetStream (or
//! Kafka, or stdout), acknowledging the replication slot only after the broker did.
//!
//! ```text
//!  source (replication stream, pgoutput; outbox row)   src/source/
//!    └─▶ event (CloudEvent, envelope, dead letters)     src/event/
//!          └─▶ sink (route, publish, broker ack)         src/sink/, src/route.rs
//!                └─▶ relay: confirm LSN after the ack    src/relay/
//!  commands (run, check, setup, replay) drive it         src/commands/
//! ```
//!
//! Imports run one way, the way a row flows, then down to the leaves:
//! `main → commands → relay → {retention, http} → sink → event → source → telemetry
//! → {backoff, route, lsn} → config`; `architecture.rs` (a test) keeps it so.
//!
//! Guarantee: every committed outbox row reaches the broker at least once, events of
//! one aggregate in commit order; every event carries the row id as its CloudEvent
//! `id`, which the broker (and, failing that, the consumer) uses to drop duplicates.

#[cfg(test)]
mod architecture;
pub mod backoff;
pub mod commands;
pub mod config;
pub mod event;
pub mod http;
pub mod lsn;
pub mod relay;
pub mod retention;
pub mod route;
pub mod sink;
pub mod source;
pub mod telemetry;
