//! Exactly-once mode (docs/exactly-once.md), black box against the real brokers: the
//! relay is SIGKILLed again and again while random transactions commit, and every
//! event must be in the broker once, in commit order per aggregate.

use crate::support;

use std::time::Duration;

use support::faults::{assert_outbox_delivered_once, kill_while_in_flight, Writer};
use support::secure::http_port;
use support::streaming::streaming;
use support::{metric_sum, scrape, seed, wait_for, SplitMix64};

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
    let (pg, nats, cfg, mut relay) = streaming(&[
        ("nats", "exactly_once", "true"),
        ("nats", "stream_duplicate_window_secs", "1"),
        // Checkpoints often enough that kills land before, during and after them.
        ("sink", "checkpoint_interval_ms", "100"),
    ])
    .await;
    let port = http_port(&cfg);
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
    assert!(writer.wait_committed_more(200).await);
    let written = writer.finish().await;

    // Then every committed id is in the stream exactly once, in commit order per
    // aggregate
    let (expected, msgs) =
        assert_outbox_delivered_once(&pg, &js, STREAM, Duration::from_secs(60)).await;
    assert_eq!(expected.len(), written.len() + 1, "writer bookkeeping");
    let skipped = metric_sum(&scrape(port), "outboxd_events_skipped_total");
    eprintln!(
        "{} events stored once after {KILLS} kills; the last process skipped {skipped}",
        msgs.len()
    );
}

/// Kafka, gracefully: the events and the checkpoint record are committed together,
/// and a restart reads the checkpoint back and sends nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_transactions_commit_events_with_their_checkpoint() {
    use support::kafka::{
        assert_order_per_key, insert, n_of, read_topic_committed, relay_to, Tansu,
    };
    const TOPIC: &str = "outbox.event.Order";
    // Given a relay in Kafka exactly-once mode
    let kafka = Tansu::start();
    let (pg, mut relay) = relay_to(&kafka.brokers(), &[("kafka", "exactly_once", "true")]).await;
    let db = pg.client().await;

    // When rows commit, the relay stops gracefully, restarts, and more rows commit
    let mut ids = std::collections::HashSet::new();
    for n in 0..30 {
        ids.insert(insert(&db, "Order", &format!("o-{}", n % 7), n).await);
    }
    wait_for(Duration::from_secs(30), || async {
        read_topic_committed(&kafka.brokers(), TOPIC).await.len() >= 30
    })
    .await;
    relay.terminate(Duration::from_secs(30));
    relay.start();
    pg.wait_streaming("outboxd").await;
    for n in 30..50 {
        ids.insert(insert(&db, "Order", &format!("o-{}", n % 7), n).await);
    }

    // Then a read_committed consumer sees every event once, in order per key
    let complete = wait_for(Duration::from_secs(30), || async {
        read_topic_committed(&kafka.brokers(), TOPIC).await.len() >= 50
    })
    .await;
    let records = read_topic_committed(&kafka.brokers(), TOPIC).await;
    assert!(
        complete,
        "{} of 50 records: {}",
        records.len(),
        relay.stderr()
    );
    let got: Vec<String> = records
        .iter()
        .filter_map(|r| r.header("ce_id").map(str::to_string))
        .collect();
    assert_eq!(got.len(), 50, "every record once: {got:?}");
    assert_eq!(
        got.into_iter().collect::<std::collections::HashSet<_>>(),
        ids
    );
    assert_order_per_key(&records, n_of);
    // and the checkpoint topic holds this relay's checkpoint, keyed by its
    // transactional.id
    let checkpoints = read_topic_committed(&kafka.brokers(), "outboxd.checkpoints").await;
    assert!(
        checkpoints
            .iter()
            .any(|r| r.key.as_deref() == Some("outboxd.outboxd")),
        "no checkpoint record: {checkpoints:?}"
    );
    assert!(
        relay
            .stderr()
            .contains("exactly-once: resuming after what the broker holds through=Some"),
        "the restart read no checkpoint back: {}",
        relay.stderr()
    );
}

/// Kafka: 20 SIGKILLs while random transactions commit over 1,000 aggregates; a
/// read_committed consumer must see every event once, in commit order per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_twenty_kills_every_event_once_for_read_committed() {
    use support::kafka::{assert_order_per_key, n_of, relay_to, Noida};
    const KILLS: usize = 20;
    let seed = seed();
    let mut rng = SplitMix64::new(seed ^ 0xE1);
    let kafka = Noida::start();
    let port = support::free_port();
    let listen = format!("\"127.0.0.1:{port}\"");
    let (pg, mut relay) = relay_to(
        &kafka.brokers(),
        &[
            ("kafka", "exactly_once", "true"),
            ("http", "listen", &listen),
            // Checkpoints often enough that kills land before, during and after them.
            ("sink", "checkpoint_interval_ms", "100"),
        ],
    )
    .await;
    let writer = Writer::spawn(pg.url(), 1_000, 20, Duration::from_millis(10), seed);
    let mid_write =
        kill_while_in_flight(&mut relay, port, &writer, &mut rng, KILLS, Duration::ZERO).await;
    assert_eq!(
        mid_write, KILLS,
        "every kill lands while rows are committed"
    );
    assert!(writer.wait_committed_more(200).await);
    let (records, events, missing, repeated) =
        read_committed_once(&pg, writer, &kafka.brokers()).await;
    eprintln!(
        "kafka exactly-once: {} records for {events} events; {missing} missing, {repeated} repeated",
        records.len()
    );
    assert_eq!((missing, repeated), (0, 0));
    assert_order_per_key(&records, n_of);
}

/// Kafka, a zombie: the active relay is SIGSTOPped with a transaction open, a standby
/// takes the slot over (its producer of the same transactional.id fences the old one),
/// then the old active resumes. It must not get a single write committed: it steps
/// down, and a read_committed consumer sees every event once, in order per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_a_resumed_zombie_is_fenced_and_nothing_is_delivered_twice() {
    use support::kafka::{assert_order_per_key, kafka_config, n_of, Noida};
    use support::{http_get, Postgres, Relay};
    let streaming = |port: u16| {
        http_get(port, "/metrics").and_then(|(_, body)| support::metric(&body, "outboxd_streaming"))
            == Some(1.0)
    };
    // Given an active relay and a standby in Kafka exactly-once mode, a Postgres that
    // drops a silent walsender after 2 s, and a writer over 1,000 aggregates
    let kafka = Noida::start();
    let pg = Postgres::start();
    pg.create_outbox().await;
    let admin = pg.client().await;
    for sql in [
        "ALTER SYSTEM SET wal_sender_timeout = '2s'",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.expect("wal_sender_timeout");
    }
    let (port_a, port_b) = (support::free_port(), support::free_port());
    let replica = |port: u16| {
        let listen = format!("\"127.0.0.1:{port}\"");
        kafka_config(
            &pg,
            &kafka.brokers(),
            &[
                ("kafka", "exactly_once", "true"),
                ("http", "listen", &listen),
                ("postgres", "standby_poll_ms", "200"),
                ("sink", "checkpoint_interval_ms", "100"),
            ],
        )
    };
    let mut a = Relay::spawn(&replica(port_a));
    pg.wait_streaming("outboxd").await;
    let b = Relay::spawn(&replica(port_b));
    let writer = Writer::spawn(pg.url(), 1_000, 20, Duration::from_millis(10), seed());
    assert!(
        wait_for(Duration::from_secs(30), || async {
            metric_sum(&scrape(port_a), "outboxd_events_published_total") > 100.0
        })
        .await,
        "the active relay publishes: {}",
        a.stderr()
    );

    // When the active relay is frozen mid-stream until the standby streams
    support::signal(a.pid(), "STOP");
    let took_over = wait_for(Duration::from_secs(60), || async { streaming(port_b) }).await;
    assert!(took_over, "the standby did not take over: {}", b.stderr());
    assert!(writer.wait_committed_more(300).await);
    // and then resumes
    support::signal(a.pid(), "CONT");

    // Then the old active steps down (it exits, fenced, or stands by) and never
    // streams again while the new one does
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let stepped_down = loop {
        if a.try_exit().is_some() || (!streaming(port_a) && http_get(port_a, "/status").is_some()) {
            break true;
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        stepped_down,
        "the resumed zombie did not step down: {}",
        a.stderr()
    );
    assert!(writer.wait_committed_more(300).await);
    assert!(streaming(port_b), "the new active streams: {}", b.stderr());
    let (records, events, missing, repeated) =
        read_committed_once(&pg, writer, &kafka.brokers()).await;
    let zombie = a.stderr();
    eprintln!(
        "zombie: {} records for {events} events; {missing} missing, {repeated} repeated; the zombie {}",
        records.len(),
        if zombie.contains("steps down") {
            "was fenced and exited"
        } else {
            "stood by"
        }
    );
    assert_eq!((missing, repeated), (0, 0));
    assert_order_per_key(&records, n_of);
    drop(b);
}

/// NATS: the checkpoint stream deleted under a running relay costs a session, not the
/// process: the relay creates it again and goes on, storing every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_a_deleted_checkpoint_stream_is_created_again() {
    use support::streaming::{insert_events, wait_stream_len};
    // Given a relay in exactly-once mode that has stored events and a checkpoint
    let (pg, nats, _cfg, mut relay) = streaming(&[("nats", "exactly_once", "true")]).await;
    let js = nats.jetstream().await;
    let db = pg.client().await;
    insert_events(&db, "a", 0..50).await;
    assert!(wait_stream_len(&js, STREAM, 50).await);
    assert!(
        wait_for(Duration::from_secs(10), || async {
            js.get_stream("OUTBOXD_CHECKPOINTS")
                .await
                .expect("checkpoint stream")
                .info()
                .await
                .is_ok_and(|i| i.state.messages == 1)
        })
        .await,
        "no checkpoint stored"
    );

    // When the checkpoint stream is deleted and more rows commit
    js.delete_stream("OUTBOXD_CHECKPOINTS")
        .await
        .expect("delete the checkpoint stream");
    insert_events(&db, "a", 50..100).await;

    // Then the relay keeps running, the checkpoint stream is back, and every event is
    // in the stream once, in order
    let (_expected, msgs) =
        assert_outbox_delivered_once(&pg, &js, STREAM, Duration::from_secs(60)).await;
    assert_eq!(msgs.len(), 101, "100 events and the marker");
    assert!(
        relay.try_exit().is_none(),
        "the relay exited: {}",
        relay.stderr()
    );
    assert!(
        js.get_stream("OUTBOXD_CHECKPOINTS").await.is_ok(),
        "the checkpoint stream was not created again: {}",
        relay.stderr()
    );
}

/// Stops `writer`, waits until the slot is confirmed past every committed row, and
/// reads `outbox.event.Order` as a read_committed consumer. Returns the records, how
/// many events the outbox holds, how many of them are missing, and how many arrived
/// more than once.
async fn read_committed_once(
    pg: &support::Postgres,
    writer: Writer,
    brokers: &str,
) -> (Vec<support::kafka::Record>, usize, usize, usize) {
    let written = writer.finish().await;
    let expected = support::faults::ids_once_confirmed(pg, Duration::from_secs(90)).await;
    assert_eq!(expected.len(), written.len() + 1, "writer bookkeeping");
    let records = support::kafka::read_topic_committed(brokers, "outbox.event.Order").await;
    let mut seen = std::collections::HashMap::<&str, usize>::new();
    for r in &records {
        *seen.entry(r.header("ce_id").expect("ce_id")).or_default() += 1;
    }
    let missing = expected
        .iter()
        .filter(|id| !seen.contains_key(id.as_str()))
        .count();
    let repeated = seen.values().filter(|c| **c > 1).count();
    (records, expected.len(), missing, repeated)
}
