//! Exactly-once mode (docs/exactly-once.md), black box against the real brokers: the
//! relay is SIGKILLed again and again while random transactions commit, and every
//! event must be in the broker once, in commit order per aggregate.

use crate::support;

use std::time::Duration;

use support::faults::{commit_marker, kill_while_in_flight, wait_confirmed_past, Writer, SLOT};
use support::{
    assert_delivered_once, assert_per_aggregate_order, config, free_port, metric_sum, read_stream,
    scrape, seed, wait_for, Nats, Postgres, Relay, SplitMix64,
};

const STREAM: &str = "OUTBOX";

/// NATS: the stream's duplicate window is 1 s and the relay stays down 1.5 s before
/// each of 20 restarts, so JetStream's deduplication cannot remove a single repeat:
/// only the checkpoint and the read-back of the stream can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_twenty_kills_beyond_the_duplicate_window_store_every_event_once() {
    const KILLS: usize = 20;
    let seed = seed();
    let mut rng = SplitMix64::new(seed ^ 0xE0);
    // Given a relay in exactly-once mode whose stream forgets ids after 1 s, and a
    // writer committing 1..=20 rows per transaction over 1,000 aggregates
    let pg = Postgres::start();
    pg.create_outbox().await;
    let nats = Nats::start();
    let port = free_port();
    let listen = format!("\"127.0.0.1:{port}\"");
    let mut relay = Relay::spawn(&config(
        &pg,
        Some(&nats),
        &[
            ("http", "listen", &listen),
            ("nats", "exactly_once", "true"),
            ("nats", "stream_duplicate_window_secs", "1"),
        ],
    ));
    pg.wait_streaming(SLOT).await;
    let writer = Writer::spawn(pg.url(), 1_000, 20, Duration::from_millis(10), seed);
    let js = nats.jetstream().await;
    let window = js
        .get_stream(STREAM)
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .config
        .duplicate_window;
    assert_eq!(
        window,
        Duration::from_secs(1),
        "the stream's duplicate window"
    );

    // When the relay is SIGKILLed 20 times with events in flight, and stays down
    // longer than the duplicate window each time
    let down = Duration::from_millis(1_500);
    let mid_write = kill_while_in_flight(&mut relay, port, &writer, &mut rng, KILLS, down).await;
    assert_eq!(
        mid_write, KILLS,
        "every kill lands while rows are committed"
    );
    let committed = writer.committed();
    assert!(
        wait_for(Duration::from_secs(30), || async {
            writer.committed() >= committed + 200
        })
        .await
    );
    let written = writer.finish().await;

    // Then every committed id is in the stream exactly once, in commit order per
    // aggregate
    let (marker, before_marker) = commit_marker(&pg).await;
    wait_confirmed_past(&pg, before_marker, Duration::from_secs(60)).await;
    let expected = pg.outbox_ids().await;
    assert_eq!(expected.len(), written.len() + 1, "writer bookkeeping");
    assert!(expected.contains(&marker));
    let msgs = read_stream(&js, STREAM).await;
    assert_delivered_once(&msgs, &expected);
    assert_per_aggregate_order(&msgs);
    let skipped = metric_sum(&scrape(port), "outboxd_events_skipped_total");
    eprintln!(
        "{} events stored once after {KILLS} kills; the last process skipped {skipped}",
        msgs.len()
    );
}
