//! Black-box: a hung broker (SIGSTOP: its sockets stay open, nothing is answered), as
//! a broker in a long GC pause or on a frozen VM looks to a client. The Kafka sink
//! recovers by itself once records timed out during the hang (issue 19), and SIGTERM
//! exits within `sink.shutdown_timeout_secs` plus the stated margin with either sink
//! while the broker hangs.

use crate::support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use support::faults::relay_log_lines;
use support::kafka::{
    assert_order_per_key, assert_same_event_when_repeated, ids_in, insert, kafka_config, n_of,
    read_topic, wait_records, Tansu,
};
use support::{
    config, free_port, metric, metric_sum, read_stream, scrape, scraped, wait_for, Nats, Postgres,
    Relay,
};

/// What the README promises on top of `sink.shutdown_timeout_secs`: closing the
/// replication connection and releasing the broker client.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(5);

fn listen(port: u16) -> String {
    format!("\"127.0.0.1:{port}\"")
}

/// Commits `rows` rows over `aggregates` aggregates in transactions of 50, numbering
/// on from `*n`; returns their ids.
async fn write_backlog(
    db: &mut tokio_postgres::Client,
    n: &mut i64,
    rows: usize,
    aggregates: i64,
) -> HashSet<String> {
    let mut ids = HashSet::with_capacity(rows);
    while ids.len() < rows {
        let tx = db.transaction().await.expect("begin");
        for _ in 0..50.min(rows - ids.len()) {
            *n += 1;
            ids.insert(insert(&tx, "Order", &format!("o-{}", *n % aggregates), *n).await);
        }
        tx.commit().await.expect("commit");
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_hung_until_records_time_out_recovers_without_a_restart() {
    // Given a relay with the default, idempotent producer and a short delivery timeout,
    // streaming to tansu, with events delivered before the hang
    const TOPIC: &str = "outbox.event.Order";
    const AGGREGATES: i64 = 200;
    let pg = Postgres::start();
    pg.create_outbox().await;
    let kafka = Tansu::start();
    kafka.create_topic(TOPIC, 4).await;
    let brokers = kafka.brokers();
    let port = free_port();
    let mut relay = Relay::spawn(&kafka_config(
        &pg,
        &brokers,
        &[
            ("kafka", "message_timeout_ms", "2000"),
            ("http", "listen", &listen(port)),
        ],
    ));
    pg.wait_streaming("outboxd").await;
    let mut db = pg.client().await;
    let mut n = 0i64;
    let mut all = write_backlog(&mut db, &mut n, 20, AGGREGATES).await;
    wait_records(&brokers, TOPIC, 20, Duration::from_secs(30)).await;

    // When the broker hangs while a backlog of 5,000 rows is committed, and stays hung
    // until the records in flight timed out twice over (librdkafka then bumps the
    // idempotent producer's epoch, which tansu answers with PRODUCER_FENCED, as Apache
    // Kafka can answer a producer whose state it expired)
    kafka.freeze();
    all.extend(write_backlog(&mut db, &mut n, 5_000, AGGREGATES).await);
    let timeouts = r#"outboxd_publish_errors_total{reason="timeout",sink="kafka"}"#;
    let timed_out = wait_for(Duration::from_secs(60), || async {
        scraped(port, |t| {
            metric(t, timeouts).unwrap_or(0.0) >= 2.0 * AGGREGATES as f64
        })
    })
    .await;
    assert!(timed_out, "records did not time out:\n{}", scrape(port));
    kafka.thaw();

    // Then every event arrives without a restart of outboxd
    let arrived = wait_for(Duration::from_secs(180), || async {
        ids_in(&brokers, TOPIC).await.is_superset(&all)
    })
    .await;
    let got = ids_in(&brokers, TOPIC).await;
    assert!(
        arrived,
        "{} of {} events arrived after the hang; replacements: {:?}",
        got.intersection(&all).count(),
        all.len(),
        metric_sum(&scrape(port), "outboxd_producer_replacements_total"),
    );
    // repeats are the same event, and each aggregate's events are in commit order
    let records = read_topic(&brokers, TOPIC).await;
    assert_same_event_when_repeated(&records);
    assert_order_per_key(&records, n_of);
    assert!(relay.try_exit().is_none(), "relay exited");
    // and the fenced producer was replaced, counted, and logged once per replacement
    let replaced = metric_sum(&scrape(port), "outboxd_producer_replacements_total");
    let warnings = relay_log_lines(&relay.stderr(), "kafka producer replaced by a fresh one").len();
    eprintln!("producer replacements: {replaced}, their warnings: {warnings}");
    assert!(replaced >= 1.0, "no producer replacement counted");
    assert_eq!(warnings as f64, replaced, "one WARN per replacement");
}

/// `sink.shutdown_timeout_secs` in the SIGTERM tests.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The SIGTERM tests' relay settings: the shutdown timeout, at most 10 events held,
/// the HTTP endpoint on `listen`.
fn shutdown_settings(listen: &str) -> [(&'static str, &'static str, &str); 3] {
    [
        ("sink", "shutdown_timeout_secs", "10"),
        ("sink", "max_in_flight", "10"),
        ("http", "listen", listen),
    ]
}

/// When the broker hangs (`freeze`), 100 rows are committed (transactions of 50) and
/// the relay holds as many of their events as it may (so it cannot read the
/// transaction to its end), and SIGTERM comes: then the relay exits 0, having waited
/// for acknowledgements, but no longer than [`TIMEOUT`] + [`SHUTDOWN_MARGIN`].
/// Returns the ids of the rows.
async fn sigterm_while_hung(
    relay: &mut Relay,
    port: u16,
    db: &mut tokio_postgres::Client,
    n: &mut i64,
    freeze: impl FnOnce(),
) -> HashSet<String> {
    freeze();
    let ids = write_backlog(db, n, 100, 20).await;
    let held = wait_for(Duration::from_secs(30), || async {
        scraped(port, |t| {
            metric(t, "outboxd_events_in_flight").unwrap_or(0.0) >= 10.0
        })
    })
    .await;
    assert!(held, "the relay did not take the events:\n{}", scrape(port));

    let started = Instant::now();
    let status = relay.terminate(TIMEOUT + SHUTDOWN_MARGIN + Duration::from_secs(60));
    let took = started.elapsed();
    eprintln!("SIGTERM to exit: {took:?}");
    let status = status.unwrap_or_else(|| panic!("no exit within {took:?}"));
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        relay.stderr()
    );
    assert!(
        took >= TIMEOUT - Duration::from_millis(500) && took <= TIMEOUT + SHUTDOWN_MARGIN,
        "exit took {took:?}, expected {TIMEOUT:?} + at most {SHUTDOWN_MARGIN:?}:\n{}",
        relay.stderr()
    );
    // and the log tells the truth: events were left unacknowledged, not "cleanly"
    let log = relay.stderr();
    let left = relay_log_lines(&log, "not all acknowledged before the shutdown deadline");
    assert!(
        left.len() == 1 && !left[0].contains("unacknowledged=0"),
        "{log}"
    );
    assert!(!log.contains("stopped cleanly"), "{log}");
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_kafka_broker_hung_exits_within_the_shutdown_timeout() {
    // Given a relay whose delivery reports outlast the shutdown timeout (librdkafka's
    // default 30 s), streaming to tansu
    const TOPIC: &str = "outbox.event.Order";
    let pg = Postgres::start();
    pg.create_outbox().await;
    let kafka = Tansu::start();
    kafka.create_topic(TOPIC, 2).await;
    let brokers = kafka.brokers();
    let port = free_port();
    let listen = listen(port);
    let mut relay = Relay::spawn(&kafka_config(&pg, &brokers, &shutdown_settings(&listen)));
    pg.wait_streaming("outboxd").await;
    let mut db = pg.client().await;
    let mut n = 0i64;
    let mut all = write_backlog(&mut db, &mut n, 10, 20).await;
    wait_records(&brokers, TOPIC, 10, Duration::from_secs(30)).await;

    // When the broker hangs while rows are committed and SIGTERM comes, then the relay
    // exits in time
    all.extend(sigterm_while_hung(&mut relay, port, &mut db, &mut n, || kafka.freeze()).await);

    // and nothing is lost: after the broker is back, a new relay delivers every event
    kafka.thaw();
    relay.start();
    let arrived = wait_for(Duration::from_secs(60), || async {
        ids_in(&brokers, TOPIC).await.is_superset(&all)
    })
    .await;
    assert!(arrived, "events are missing after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_nats_server_hung_exits_within_the_shutdown_timeout() {
    // Given a relay whose PubAcks may take longer than the shutdown timeout (30 s, as
    // librdkafka's delivery reports in the Kafka test), streaming to nats-server
    let pg = Postgres::start();
    pg.create_outbox().await;
    let nats = Nats::start();
    let port = free_port();
    let listen = listen(port);
    let mut settings = shutdown_settings(&listen).to_vec();
    settings.push(("nats", "ack_timeout_ms", "30000"));
    let mut relay = Relay::spawn(&config(&pg, Some(&nats), &settings));
    pg.wait_streaming("outboxd").await;
    let mut db = pg.client().await;
    let mut n = 0i64;
    let mut all = write_backlog(&mut db, &mut n, 10, 20).await;
    let js = nats.jetstream().await;
    let delivered = wait_for(Duration::from_secs(30), || async {
        read_stream(&js, "OUTBOX").await.len() >= 10
    })
    .await;
    assert!(delivered, "the first events were not delivered");

    // When the server hangs while rows are committed and SIGTERM comes, then the relay
    // exits in time
    all.extend(sigterm_while_hung(&mut relay, port, &mut db, &mut n, || nats.freeze()).await);

    // and nothing is lost: after the server is back, a new relay delivers every event
    nats.thaw();
    relay.start();
    let arrived = wait_for(Duration::from_secs(60), || async {
        let got: HashSet<String> = read_stream(&js, "OUTBOX")
            .await
            .iter()
            .filter_map(|m| m.header("ce-id").map(str::to_string))
            .collect();
        got.is_superset(&all)
    })
    .await;
    assert!(arrived, "events are missing after the restart");
}
