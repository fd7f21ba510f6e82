//! The black-box tests, one module per area, in one test binary: the harness in
//! `support` (real PostgreSQL, nats-server and tansu processes on free ports) compiles
//! once, and `cargo test` links one executable instead of one per file.
//!
//! Run one area with a filter: `cargo test --test main relay_nats::`.

mod support;

mod broker_hang;
mod broker_states;
mod cli;
mod dead_letter;
mod debezium_compat;
mod exactly_once;
mod failures_connections;
mod failures_crash;
mod failures_edges;
mod hostile_rows;
mod http_limits;
mod huge_transaction;
mod nats_stream;
mod observability;
mod operator_cli;
mod relay_kafka;
mod relay_kafka_faults;
mod relay_kafka_limits;
mod relay_nats;
mod replay;
mod retention;
mod secrets;
mod security_nats;
mod security_postgres;
mod shipped_configs;
mod slot_loss;
mod slot_record;
mod snapshot;
mod standby;
mod table_changes;
mod tableless;
mod versions;
