//! Black-box: a hung broker (SIGSTOP: its sockets stay open, nothing is answered), as
//! a broker in a long GC pause or on a frozen VM looks to a client. The Kafka sink
//! recovers by itself once records timed out during the hang (issue 19).

use crate::support;

use std::collections::HashSet;
use std::time::Duration;

use support::faults::relay_log_lines;
use support::kafka::{
    assert_order_per_key, assert_same_event_when_repeated, ids_in, insert, kafka_config, n_of,
    read_topic, wait_records, Tansu,
};
use support::{free_port, metric, metric_sum, scrape, wait_for, Postgres, Relay};

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
    let pid = relay.pid();
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
        metric(&scrape(port), timeouts).unwrap_or(0.0) >= 2.0 * AGGREGATES as f64
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
    assert_eq!(relay.pid(), pid);
    // and the fenced producer was replaced, counted, and logged once per replacement
    let replaced = metric_sum(&scrape(port), "outboxd_producer_replacements_total");
    let warnings = relay_log_lines(&relay.stderr(), "kafka producer replaced by a fresh one").len();
    eprintln!("producer replacements: {replaced}, their warnings: {warnings}");
    assert!(replaced >= 1.0, "no producer replacement counted");
    assert_eq!(warnings as f64, replaced, "one WARN per replacement");
}
