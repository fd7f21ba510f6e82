//! The given most NATS tests start from, and the steps that follow it: a Postgres with
//! the outbox, a nats-server and a relay streaming between them ([`streaming`]);
//! committing numbered events ([`insert_events`]); waiting until the stream holds
//! them ([`wait_stream_len`], [`read_at_least`]).
//!
//! Every wait has a deadline and asserts nothing itself unless its doc says so, so a
//! test keeps its own failure message where it has one.

use std::time::Duration;

use async_nats::jetstream;

use super::{
    config, insert_event, read_stream, stream_len, wait_for, Nats, Postgres, Received, Relay,
};

/// How long a test waits for events to arrive in JetStream.
const ARRIVAL: Duration = Duration::from_secs(30);

/// Starts Postgres (outbox created), nats-server and a relay of the config of
/// [`config`] with `overrides`, and waits until the relay's slot streams. Returns
/// them and the config in the order `let (pg, nats, cfg, relay) = …` declares them, so
/// that the relay is dropped before the servers, as if the test had started each.
pub async fn streaming(overrides: &[(&str, &str, &str)]) -> (Postgres, Nats, String, Relay) {
    let pg = Postgres::start();
    pg.create_outbox().await;
    let nats = Nats::start();
    let cfg = config(&pg, Some(&nats), overrides);
    let relay = Relay::spawn(&cfg);
    pg.wait_streaming("outboxd").await;
    (pg, nats, cfg, relay)
}

/// Commits one event of `aggregate` for each `n` of `ns`, each in its own transaction
/// (see [`insert_event`]); returns their ids in commit order.
pub async fn insert_events(
    db: &impl tokio_postgres::GenericClient,
    aggregate: &str,
    ns: impl IntoIterator<Item = i64>,
) -> Vec<String> {
    let mut ids = Vec::new();
    for n in ns {
        ids.push(insert_event(db, aggregate, n).await.expect("insert"));
    }
    ids
}

/// Once the relay streams, commits one event of `aggregate` for each `n` of `ns` (see
/// [`insert_events`]); returns the client it used.
pub async fn commit_when_streaming(
    pg: &Postgres,
    aggregate: &str,
    ns: impl IntoIterator<Item = i64>,
) -> tokio_postgres::Client {
    pg.wait_streaming("outboxd").await;
    let db = pg.client().await;
    insert_events(&db, aggregate, ns).await;
    db
}

/// Waits up to 30 s until `stream` holds exactly `n` messages; returns whether it did.
pub async fn wait_stream_len(js: &jetstream::Context, stream: &str, n: u64) -> bool {
    wait_for(ARRIVAL, || async { stream_len(js, stream).await == n }).await
}

/// Waits up to 30 s until `stream` holds at least `n` messages (asserting that it
/// does, naming how many it holds), then reads them all, in stream order.
pub async fn read_at_least(js: &jetstream::Context, stream: &str, n: u64) -> Vec<Received> {
    assert!(
        wait_for(ARRIVAL, || async { stream_len(js, stream).await >= n }).await,
        "expected {n} messages in {stream}, got {}",
        stream_len(js, stream).await
    );
    read_stream(js, stream).await
}

/// The `ce-id` of each message, in order.
pub fn ce_ids(msgs: &[Received]) -> Vec<&str> {
    msgs.iter()
        .map(|m| m.header("ce-id").expect("ce-id"))
        .collect()
}
