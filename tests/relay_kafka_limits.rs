//! Black-box: events Kafka can never accept (issue 14, item 5, Kafka side), against
//! tansu with the producer's default limits: each is dead-lettered with its reason
//! instead of being retried forever, the stream goes on in order, and the slot moves
//! past the rows. An event that is unusual but fits (a 100 KB aggregate id) is
//! delivered, not dead-lettered.

use crate::support;

use std::time::Duration;

use support::faults::wait_confirmed_past;
use support::kafka::{
    assert_order_per_key, insert, kafka_config, n_of, read_topic, wait_records, Record, Tansu,
};
use support::{Postgres, Relay};

const TOPIC: &str = "outbox.event.Order";
const DLQ: &str = "outbox.deadletter";

/// One outbox row of `aggregate_type`/`aggregate_id` with payload `{"n": n, "blob":
/// <blob × 'x'>}` and, when `header` > 0, headers `{"big": <header × 'y'>}`.
async fn insert_sized(
    db: &tokio_postgres::Client,
    aggregate_type: &str,
    aggregate_id: &str,
    n: i64,
    blob: i32,
    header: i32,
) -> String {
    db.query_one(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers) \
         VALUES ($1, $2, 'Updated', jsonb_build_object('n', $3::bigint, 'blob', repeat('x', $4)), \
                 CASE WHEN $5 > 0 THEN jsonb_build_object('big', repeat('y', $5)) END) \
         RETURNING id::text",
        &[&aggregate_type, &aggregate_id, &n, &blob, &header],
    )
    .await
    .expect("insert")
    .get(0)
}

/// A relay with librdkafka's default limits (message.max.bytes 1,000,000) streaming
/// to tansu, where `TOPIC` exists with `configs`; and a client of the database.
async fn relay_to_tansu(
    configs: &[(&str, &str)],
) -> (Postgres, Tansu, Relay, tokio_postgres::Client) {
    let pg = Postgres::start();
    pg.create_outbox().await;
    let kafka = Tansu::start();
    kafka.create_topic_with(TOPIC, 2, configs).await;
    let relay = Relay::spawn(&kafka_config(&pg, &kafka.brokers(), &[]));
    pg.wait_streaming("outboxd").await;
    let db = pg.client().await;
    (pg, kafka, relay, db)
}

fn dead_letter<'a>(dlq: &'a [Record], id: &str) -> &'a Record {
    dlq.iter()
        .find(|r| r.header("ce_id") == Some(id))
        .unwrap_or_else(|| panic!("no dead letter for {id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_kafka_can_never_accept_are_dead_lettered_and_the_stream_goes_on_in_order() {
    // Given a relay with librdkafka's default message.max.bytes (1,000,000 bytes)
    let (pg, kafka, mut relay, db) = relay_to_tansu(&[]).await;
    let brokers = kafka.brokers();

    // When, between ordinary events of the same and of other aggregates, these commit:
    // a 5 MB payload,
    let first = insert(&db, "Order", "o-1", 1).await;
    let payload = insert_sized(&db, "Order", "o-1", 2, 5_000_000, 0).await;
    let after_payload = insert(&db, "Order", "o-1", 3).await;
    // a 5,000-character aggregate type (a topic name Kafka refuses),
    let other = insert(&db, "Order", "o-2", 4).await;
    let long_type = "T".repeat(5_000);
    let topic = insert_sized(&db, &long_type, "o-2", 5, 0, 0).await;
    let after_topic = insert(&db, "Order", "o-2", 6).await;
    // and a 100 KB aggregate id (key, ce_subject and ce_partitionkey: a 300 KB record,
    // within Kafka's limits)
    let long_id = "i".repeat(100_000);
    let id = insert_sized(&db, "Order", &long_id, 7, 0, 0).await;
    let after_id = insert(&db, "Order", &long_id, 8).await;
    let last = insert(&db, "Order", "o-3", 9).await;
    let end = pg.current_lsn().await;

    // Then the other events arrive in their topic, in commit order per aggregate, the
    // 100 KB aggregate id's too, keyed by it
    wait_records(&brokers, TOPIC, 7, Duration::from_secs(60)).await;
    let records = read_topic(&brokers, TOPIC).await;
    let ids: Vec<&str> = records.iter().filter_map(|r| r.header("ce_id")).collect();
    for expected in [
        &first,
        &after_payload,
        &other,
        &after_topic,
        &id,
        &after_id,
        &last,
    ] {
        assert!(ids.contains(&expected.as_str()), "{expected} missing");
    }
    let keyed = records
        .iter()
        .find(|r| r.header("ce_id") == Some(id.as_str()));
    assert_eq!(keyed.and_then(|r| r.key.as_deref()), Some(long_id.as_str()));
    assert_order_per_key(&records, n_of);
    // and each refused event is a dead letter with its reason, none in the topic
    wait_records(&brokers, DLQ, 2, Duration::from_secs(60)).await;
    let dlq = read_topic(&brokers, DLQ).await;
    assert_eq!(dlq.len(), 2);
    for (event, reason) in [(&payload, "too_large"), (&topic, "invalid_topic")] {
        let dl = dead_letter(&dlq, event);
        assert_eq!(dl.header("ce_type"), Some("io.outboxd.deadletter"));
        assert_eq!(dl.header("ce_deadletterreason"), Some(reason), "{event}");
        assert!(!ids.contains(&event.as_str()), "{event} was published");
    }
    // and the slot is confirmed up to the end of the last of these rows
    wait_confirmed_past(&pg, end - 1, Duration::from_secs(30)).await;
    assert!(relay.try_exit().is_none(), "relay exited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_s_max_message_bytes_is_checked_before_sending() {
    // Given a topic whose max.message.bytes (100,000) is below the producer's limit;
    // tansu reports it through DescribeConfigs but does not enforce it, where Apache
    // Kafka would refuse the whole batch
    let (_pg, kafka, _relay, db) = relay_to_tansu(&[("max.message.bytes", "100000")]).await;
    let brokers = kafka.brokers();

    // When a 200 kB event sits between two small ones of its aggregate
    let first = insert(&db, "Order", "o-1", 1).await;
    let big = insert_sized(&db, "Order", "o-1", 2, 200_000, 0).await;
    let last = insert(&db, "Order", "o-1", 3).await;

    // Then it is a dead letter (too_large) and the small ones arrive in order
    wait_records(&brokers, TOPIC, 2, Duration::from_secs(30)).await;
    wait_records(&brokers, DLQ, 1, Duration::from_secs(30)).await;
    let records = read_topic(&brokers, TOPIC).await;
    let ids: Vec<&str> = records.iter().filter_map(|r| r.header("ce_id")).collect();
    assert_eq!(ids, [first.as_str(), last.as_str()]);
    let dlq = read_topic(&brokers, DLQ).await;
    assert_eq!(
        dead_letter(&dlq, &big).header("ce_deadletterreason"),
        Some("too_large")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2_mb_headers_member_is_dead_lettered_and_the_stream_goes_on() {
    // Given a relay with librdkafka's default message.max.bytes
    let (pg, kafka, mut relay, db) = relay_to_tansu(&[]).await;
    let brokers = kafka.brokers();

    // When a row with a 2 MB `headers` member (the header ce_big) sits between two
    // ordinary rows of its aggregate
    let first = insert(&db, "Order", "o-1", 1).await;
    let header = insert_sized(&db, "Order", "o-1", 2, 0, 2_000_000).await;
    let last = insert(&db, "Order", "o-1", 3).await;
    let end = pg.current_lsn().await;

    // Then it is a dead letter (too_large), the others arrive in order
    wait_records(&brokers, DLQ, 1, Duration::from_secs(30)).await;
    wait_records(&brokers, TOPIC, 2, Duration::from_secs(30)).await;
    let records = read_topic(&brokers, TOPIC).await;
    let ids: Vec<&str> = records.iter().filter_map(|r| r.header("ce_id")).collect();
    assert_eq!(ids, [first.as_str(), last.as_str()]);
    let dlq = read_topic(&brokers, DLQ).await;
    assert_eq!(
        dead_letter(&dlq, &header).header("ce_deadletterreason"),
        Some("too_large")
    );
    // and the slot moves past the row
    wait_confirmed_past(&pg, end - 1, Duration::from_secs(30)).await;
    assert!(
        relay.try_exit().is_none(),
        "relay exited:\n{}",
        relay.stderr()
    );
}
