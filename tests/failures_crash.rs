//! Black-box fault injection (issue 5, README "Failure behaviour"): the real
//! nats-server, Postgres and outboxd processes are stopped, restarted, killed, or have
//! their backends terminated while rows commit; then every committed row must be in
//! the stream exactly once, each aggregate's events in commit order. The edge cases at
//! the end check that a misconfigured start names the problem and its fix.
//!
//! Writers put `{"n": n}` in every payload with `n` growing in commit order, so the
//! order of an aggregate's events can be read back from the stream; the set of
//! committed ids comes from the table itself, never from what a writer believes.

use crate::support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use support::faults::{
    assert_outbox_delivered_once, commit_marker, kill_while_in_flight, relay_log_lines,
    wait_confirmed_past, Writer, SLOT,
};
use support::secure::http_port;
use support::streaming::streaming;
use support::{
    config, free_port, metric_sum, scrape, seed, stream_len, wait_for, Nats, Postgres, Relay,
    SplitMix64,
};

const STREAM: &str = "OUTBOX";

// ---------------------------------------------------------------------------------
// Crashes and graceful stops
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_anywhere_twenty_kills() {
    const KILLS: usize = 20;
    let seed = seed();
    let mut rng = SplitMix64::new(seed ^ 0x5EED);
    // Given a relay streaming and a writer committing 1..=20 rows per transaction over
    // 1,000 aggregates for the whole test
    let (pg, nats, cfg, mut relay) = streaming(&[]).await;
    let port = http_port(&cfg);
    let writer = Writer::spawn(pg.url(), 1_000, 20, Duration::from_millis(10), seed);
    let js = nats.jetstream().await;

    // When the relay is SIGKILLed 20 times, each while its events are in flight
    let started = Instant::now();
    let mid_write =
        kill_while_in_flight(&mut relay, port, &writer, &mut rng, KILLS, Duration::ZERO).await;
    assert_eq!(
        mid_write, KILLS,
        "every kill lands while rows are committed"
    );
    let during_kills = stream_len(&js, STREAM).await;
    eprintln!(
        "{KILLS} kills in {:?}; {during_kills} events stored meanwhile",
        started.elapsed()
    );
    // and, restarted for good, it catches up while the writer commits a little more
    assert!(writer.wait_committed_more(200).await);
    let written = writer.finish().await;

    // Then every committed id is in the stream exactly once (JetStream dedup), none is
    // missing, and each aggregate's events are in commit order
    let (expected, msgs) =
        assert_outbox_delivered_once(&pg, &js, STREAM, Duration::from_secs(60)).await;
    assert_eq!(expected.len(), written.len() + 1, "writer bookkeeping");
    assert!(during_kills > 0, "no event was stored during the kills");
    eprintln!(
        "{} events over 1,000 aggregates in {:?}",
        msgs.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_anywhere_twenty_kills_kafka() {
    use support::kafka::{
        assert_order_per_key, assert_same_event_when_repeated, kafka_config, n_of, read_topic,
        Tansu,
    };
    const KILLS: usize = 20;
    const TOPIC: &str = "outbox.event.Order";
    let seed = seed();
    let mut rng = SplitMix64::new(seed ^ 0x4AF4A);
    // Given a relay publishing to Kafka and a writer committing 1..=20 rows per
    // transaction over 1,000 aggregates for the whole test
    let pg = Postgres::start();
    pg.create_outbox().await;
    let kafka = Tansu::start();
    let port = free_port();
    let listen = format!("\"127.0.0.1:{port}\"");
    let mut relay = Relay::spawn(&kafka_config(
        &pg,
        &kafka.brokers(),
        &[("http", "listen", &listen)],
    ));
    pg.wait_streaming(SLOT).await;
    let writer = Writer::spawn(pg.url(), 1_000, 20, Duration::from_millis(10), seed);

    // When the relay is SIGKILLed 20 times, each while its events are in flight
    let mid_write =
        kill_while_in_flight(&mut relay, port, &writer, &mut rng, KILLS, Duration::ZERO).await;
    assert_eq!(
        mid_write, KILLS,
        "every kill lands while rows are committed"
    );
    assert!(writer.wait_committed_more(200).await);
    let written = writer.finish().await;

    // Then every committed id arrives (Kafka keeps the repeats of unconfirmed events:
    // each one is the same event), and each key's first occurrences are in commit order
    let (marker, before_marker) = commit_marker(&pg).await;
    wait_confirmed_past(&pg, before_marker, Duration::from_secs(90)).await;
    let expected = pg.outbox_ids().await;
    assert_eq!(expected.len(), written.len() + 1, "writer bookkeeping");
    let records = read_topic(&kafka.brokers(), TOPIC).await;
    let got: HashSet<String> = records
        .iter()
        .filter_map(|r| r.header("ce_id").map(str::to_string))
        .collect();
    let missing: Vec<_> = expected.difference(&got).take(5).collect();
    assert!(
        missing.is_empty(),
        "missing {missing:?} of {}",
        expected.len()
    );
    assert!(got.contains(&marker));
    assert_same_event_when_repeated(&records);
    assert_order_per_key(&records, n_of);
    eprintln!(
        "kafka: {} records for {} events over 1,000 aggregates after {KILLS} kills",
        records.len(),
        expected.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_batch_then_restart_publishes_no_duplicates() {
    const ROWS: i64 = 4_000;
    const SHUTDOWN_TIMEOUT_SECS: u64 = 5;
    let mut rng = SplitMix64::new(seed());
    let pg = Postgres::start();
    pg.create_outbox().await;
    let nats = Nats::start();
    let port = free_port();
    let listen = format!("\"127.0.0.1:{port}\"");
    let shutdown_timeout = SHUTDOWN_TIMEOUT_SECS.to_string();
    let mut relay = Relay::spawn(&config(
        &pg,
        Some(&nats),
        &[
            ("http", "listen", &listen),
            ("sink", "shutdown_timeout_secs", &shutdown_timeout),
        ],
    ));
    // Given a slot (created by a first run, stopped cleanly) with a backlog of 4,000
    // one-row transactions over 20 aggregates
    pg.wait_streaming(SLOT).await;
    let stopped = relay.terminate(Duration::from_secs(SHUTDOWN_TIMEOUT_SECS + 5));
    assert!(stopped.is_some_and(|s| s.success()), "{stopped:?}");
    let db = pg.client().await;
    // Prepared once, so every insert is a single request: pipelined on one connection
    // they execute, and commit, in `n` order. (With an unprepared statement each insert
    // is a prepare then an execute, and pipelined executes may run out of `n` order.)
    let stmt = db
        .prepare(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             VALUES ('Order', $1, 'OrderUpdated', jsonb_build_object('n', $2::bigint))",
        )
        .await
        .expect("prepare");
    for chunk in (1..=ROWS).collect::<Vec<_>>().chunks(200) {
        let rows: Vec<(String, i64)> = chunk
            .iter()
            .map(|&n| (format!("agg-{}", rng.range(0, 19)), n))
            .collect();
        let inserts = rows.iter().map(|(agg, n)| {
            let (db, stmt) = (&db, &stmt);
            async move { db.execute(stmt, &[agg, n]).await }
        });
        for r in futures::future::join_all(inserts).await {
            r.expect("insert");
        }
    }
    let js = nats.jetstream().await;

    // When the relay runs and gets SIGTERM while the backlog is in flight
    relay.start();
    assert!(
        wait_for(Duration::from_secs(30), || async {
            stream_len(&js, STREAM).await >= 200
        })
        .await,
        "no events arrived"
    );
    let status = relay.terminate(Duration::from_secs(SHUTDOWN_TIMEOUT_SECS + 5));
    let at_stop = stream_len(&js, STREAM).await;

    // Then it exits 0 within shutdown_timeout_secs + 5 s, part-way through the backlog
    let status = status.expect("no exit within sink.shutdown_timeout_secs + 5 s");
    assert!(status.success(), "exit {status:?}\n{}", relay.stderr());
    assert!(
        at_stop < ROWS as u64,
        "all {ROWS} events arrived before SIGTERM: the test needs a bigger backlog"
    );
    let confirmed_at_stop = pg.confirmed_lsn(SLOT).await.expect("slot");

    // When it is restarted
    relay.start();
    // Then every row arrives once, in order per aggregate
    let (_, msgs) = assert_outbox_delivered_once(&pg, &js, STREAM, Duration::from_secs(60)).await;
    // and the restarted process re-sent nothing the broker had acknowledged before
    let text = scrape(port);
    let published = metric_sum(&text, "outboxd_events_published_total");
    let duplicates = metric_sum(&text, "outboxd_duplicates_total");
    eprintln!(
        "{at_stop} of {ROWS} stored at SIGTERM; restart published {published}, \
         {duplicates} duplicates; confirmed at stop {confirmed_at_stop}"
    );
    assert!(
        published >= (ROWS as u64 + 1 - at_stop) as f64,
        "is this the restarted relay's /metrics? published {published}"
    );
    // (Diagnosis: one-row transactions, so `n` is commit order. The first run stored
    // msgs[..at_stop]; those after its first gap in commit order lie beyond the
    // confirmed prefix, so a restart must send them again.)
    let stored_first: HashSet<i64> = msgs[..at_stop as usize]
        .iter()
        .map(support::payload_n)
        .filter(|&n| n > 0)
        .collect();
    let first_gap = (1..=ROWS)
        .find(|n| !stored_first.contains(n))
        .unwrap_or(ROWS);
    let beyond_gap = stored_first.iter().filter(|&&n| n > first_gap).count();
    let drained = relay_log_lines(&relay.stderr(), "in-flight events drained");
    assert_eq!(
        duplicates, 0.0,
        "the restart re-published {duplicates} events JetStream had already acknowledged; \
         {beyond_gap} of the {at_stop} events stored before SIGTERM come after n={first_gap}, \
         the first event in commit order that was not; drain log: {drained:?}"
    );
}
