//! Black-box: outbox rows in a real Postgres reach a real Kafka-protocol broker
//! (`tansu`, a separate process) as CloudEvents, through the `outboxd` binary:
//! routing, keys, partitions, both content modes, and SIGKILL of the relay.
//! Broker outages, oversized events and `outboxd check`: `relay_kafka_faults.rs`.

use crate::support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use support::faults::{insert_lsn, wait_confirmed_past};
use support::kafka::{
    assert_order_per_key, commit_lsn, insert, java_partition, kafka_config, murmur2, n_of,
    partition_count, read_topic, wait_records, Record, Tansu,
};
use support::{wait_for, Postgres, Relay};

#[test]
fn murmur2_matches_the_java_client() {
    // Kafka's UtilsTest vectors: the harness's partition check is only as good as this.
    for (input, want) in [
        ("21", -973_932_308),
        ("foobar", -790_332_482),
        ("a-little-bit-long-string", -985_981_536),
        ("a-little-bit-longer-string", -1_486_304_829),
        (
            "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58_897_971,
        ),
        ("abc", 479_470_107),
    ] {
        assert_eq!(murmur2(input.as_bytes()), want, "{input}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_arrive_once_in_their_topic_key_and_partition_as_binary_cloudevents() {
    // Given a 4-partition topic for orders, no topic yet for customers (the broker
    // creates it on first use), and a relay streaming a fresh outbox
    let pg = Postgres::start();
    pg.create_outbox().await;
    let kafka = Tansu::start();
    kafka.create_topic("outbox.event.Order", 4).await;
    let _relay = Relay::spawn(&kafka_config(&pg, &kafka.brokers(), &[]));
    pg.wait_streaming("outboxd").await;
    let mut db = pg.client().await;

    // When rows commit in one big transaction and in many small ones
    let mut ids = HashSet::new();
    let mut n = 0i64;
    let tx = db.transaction().await.expect("begin");
    for i in 0..40 {
        n += 1;
        let (ty, agg) = if i % 4 == 3 {
            ("Customer", format!("c-{}", i % 2))
        } else {
            ("Order", format!("o-{}", i % 5))
        };
        ids.insert(insert(&tx, ty, &agg, n).await);
    }
    tx.commit().await.expect("commit");
    for i in 0..20 {
        n += 1;
        ids.insert(insert(&db, "Order", &format!("o-{}", i % 5), n).await);
    }
    let tx = db.transaction().await.expect("begin");
    let before_last_commit = insert_lsn(&tx).await;
    n += 1;
    ids.insert(insert(&tx, "Customer", "c-0", n).await);
    tx.commit().await.expect("commit");

    // Then each row is in its aggregate type's topic exactly once
    let brokers = kafka.brokers();
    wait_records(
        &kafka.brokers(),
        "outbox.event.Order",
        50,
        Duration::from_secs(30),
    )
    .await;
    wait_records(
        &kafka.brokers(),
        "outbox.event.Customer",
        11,
        Duration::from_secs(30),
    )
    .await;
    let orders = read_topic(&brokers, "outbox.event.Order").await;
    let customers = read_topic(&brokers, "outbox.event.Customer").await;
    assert_eq!((orders.len(), customers.len()), (50, 11));
    let got: HashSet<String> = orders
        .iter()
        .chain(&customers)
        .map(|r| r.header("ce_id").expect("ce_id").to_string())
        .collect();
    assert_eq!(got, ids, "every row once, nothing else");

    // keyed by aggregate id, on the partition the Java partitioner picks
    let customer_partitions = partition_count(&brokers, "outbox.event.Customer").await;
    for (records, partitions) in [(&orders, 4), (&customers, customer_partitions)] {
        for r in records {
            let key = r.key.as_deref().expect("key");
            assert_eq!(r.header("ce_subject"), Some(key));
            assert_eq!(r.partition, java_partition(key, partitions), "key {key}");
        }
    }
    let used: HashSet<i32> = orders.iter().map(|r| r.partition).collect();
    assert!(
        used.len() > 1,
        "5 order keys all on one partition: {used:?}"
    );

    // as valid binary-mode CloudEvents
    for r in orders.iter().chain(&customers) {
        assert_eq!(r.header("ce_specversion"), Some("1.0"));
        assert_eq!(r.header("ce_source"), Some("/test/orders"));
        assert_eq!(r.header("ce_type"), Some("Updated"));
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("ce_partitionkey"), r.key.as_deref());
        assert_eq!(r.header("ce_sequence").expect("sequence").len(), 24);
        let time = r.header("ce_time").expect("time");
        chrono::DateTime::parse_from_rfc3339(time).expect("RFC 3339 time");
        assert!(r.header("ce_datacontenttype").is_none());
    }

    // in commit order per aggregate
    assert_order_per_key(&orders, n_of);
    assert_order_per_key(&customers, n_of);

    // and the slot is confirmed past the last transaction once the broker acked it
    wait_confirmed_past(&pg, before_last_commit, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_mode_carries_the_json_event_format_under_templated_topic_and_key() {
    // Given a relay in structured mode with its own topic and key templates
    let pg = Postgres::start();
    pg.create_outbox().await;
    let kafka = Tansu::start();
    let _relay = Relay::spawn(&kafka_config(
        &pg,
        &kafka.brokers(),
        &[
            ("kafka", "content_mode", "\"structured\""),
            ("kafka", "topic", "\"app.{aggregate_type}\""),
            ("kafka", "key", "\"{aggregate_type}/{aggregate_id}\""),
        ],
    ));
    pg.wait_streaming("outboxd").await;
    let db = pg.client().await;

    // When rows of an aggregate type with characters illegal in a topic name commit
    let mut ids = HashSet::new();
    for n in 1..=30 {
        ids.insert(insert(&db, "Ordér x", &format!("o-{}", n % 3), n).await);
    }

    // Then they arrive in the sanitised topic, keyed by the rendered key template
    let topic = "app.Ord_r_x";
    wait_records(&kafka.brokers(), topic, 30, Duration::from_secs(30)).await;
    let records = read_topic(&kafka.brokers(), topic).await;
    assert_eq!(records.len(), 30);
    let partitions = partition_count(&kafka.brokers(), topic).await;
    let mut got = HashSet::new();
    for r in &records {
        let key = r.key.as_deref().expect("key");
        assert!(key.starts_with("Ordér x/o-"), "{key}");
        assert_eq!(r.partition, java_partition(key, partitions));
        // as the JSON event format, announced by the content type
        assert_eq!(
            r.header("content-type"),
            Some("application/cloudevents+json")
        );
        assert!(
            r.header("ce_id").is_none(),
            "structured mode: no ce_ headers"
        );
        let ev: cloudevents::Event =
            serde_json::from_slice(r.value.as_deref().expect("value")).expect("event format");
        use cloudevents::AttributesReader;
        assert_eq!(ev.specversion().to_string(), "1.0");
        assert_eq!(ev.source().as_str(), "/test/orders");
        assert_eq!(
            Some(key),
            ev.subject().map(|s| format!("Ordér x/{s}")).as_deref()
        );
        got.insert(ev.id().to_string());
    }
    assert_eq!(got, ids);
    // in commit order per aggregate
    assert_order_per_key(&records, |r| {
        let v: serde_json::Value =
            serde_json::from_slice(r.value.as_deref().expect("value")).expect("json");
        v["data"]["n"].as_i64().expect("n")
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_writing_10000_rows_loses_nothing_and_keeps_order_per_key() {
    const ROWS: i64 = 10_000;
    const TOPIC: &str = "outbox.event.Order";
    let pg = Postgres::start();
    pg.create_outbox().await;
    let kafka = Tansu::start();
    kafka.create_topic(TOPIC, 6).await;
    let brokers = kafka.brokers();
    let mut relay = Relay::spawn(&kafka_config(&pg, &kafka.brokers(), &[]));
    pg.wait_streaming("outboxd").await;

    // Given a writer committing at least 10,000 rows in transactions of 1..=50 rows
    // over 100 aggregates, and on until both kills are done (so they land mid-write)
    let writer_db = pg.client().await;
    let killed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = killed.clone();
    let writer = tokio::spawn(async move {
        let mut db = writer_db;
        let mut n = 0i64;
        let mut ids = Vec::with_capacity(ROWS as usize);
        let mut size = 1i64;
        while n < ROWS || !done.load(std::sync::atomic::Ordering::Relaxed) {
            let tx = db.transaction().await.expect("begin");
            for _ in 0..size {
                n += 1;
                ids.push(insert(&tx, "Order", &format!("agg-{}", n % 100), n).await);
            }
            tx.commit().await.expect("commit");
            size = size % 50 + 7; // a deterministic spread of sizes
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ids
    });

    // When the relay is killed (SIGKILL) twice mid-stream and restarted
    let mut restarts_at = Vec::new();
    for threshold in [1_500usize, 5_000] {
        wait_records(&kafka.brokers(), TOPIC, threshold, Duration::from_secs(90)).await;
        assert!(
            !writer.is_finished(),
            "the writer stops only after the kills"
        );
        relay.kill();
        // The slot's position now is where the next relay resumes: events committed
        // before it were confirmed and must not be sent again.
        restarts_at.push(pg.confirmed_lsn("outboxd").await.expect("slot"));
        relay.start();
    }
    killed.store(true, std::sync::atomic::Ordering::Relaxed);
    let ids: HashSet<String> = writer.await.expect("writer").into_iter().collect();
    assert!(ids.len() >= ROWS as usize);

    // Then every row id arrives
    let all_arrived = wait_for(Duration::from_secs(120), || async {
        let got: HashSet<String> = read_topic(&brokers, TOPIC)
            .await
            .iter()
            .filter_map(|r| r.header("ce_id").map(str::to_string))
            .collect();
        got.len() >= ids.len()
    })
    .await;
    let records = read_topic(&brokers, TOPIC).await;
    let mut by_id: HashMap<&str, Vec<&Record>> = HashMap::new();
    for r in &records {
        by_id
            .entry(r.header("ce_id").expect("ce_id"))
            .or_default()
            .push(r);
    }
    let got: HashSet<String> = by_id.keys().map(|k| k.to_string()).collect();
    assert!(
        all_arrived && got == ids,
        "{} of {} ids arrived; missing e.g. {:?}; unexpected {:?}",
        got.len(),
        ids.len(),
        ids.difference(&got).take(5).collect::<Vec<_>>(),
        got.difference(&ids).take(5).collect::<Vec<_>>()
    );

    // duplicates are the same event again (same ce_id, key, sequence, data), and only
    // events the slot had not confirmed when a relay died are sent again
    let mut duplicated = 0;
    for (id, copies) in &by_id {
        let first = copies[0];
        for c in &copies[1..] {
            assert_eq!(c.key, first.key, "{id}: key differs");
            assert_eq!(c.value, first.value, "{id}: data differs");
            assert_eq!(c.header("ce_sequence"), first.header("ce_sequence"));
            assert_eq!(c.header("ce_time"), first.header("ce_time"));
        }
        let resends = copies.len() - 1;
        if resends > 0 {
            duplicated += 1;
            let lsn = commit_lsn(first);
            let unconfirmed_at = restarts_at.iter().filter(|at| lsn >= **at).count();
            assert!(
                resends <= unconfirmed_at,
                "{id} (commit LSN {lsn:X}) sent {} times, but only {unconfirmed_at} restart(s) began before it (restarts at {restarts_at:X?})",
                copies.len()
            );
        }
    }
    eprintln!(
        "{} records for {} rows: {duplicated} events were sent again after a SIGKILL",
        records.len(),
        ids.len()
    );

    // and each key stays on its Java partition, its first occurrences in commit order
    for r in &records {
        let key = r.key.as_deref().expect("key");
        assert_eq!(r.partition, java_partition(key, 6), "key {key}");
    }
    assert_order_per_key(&records, n_of);
}

/// Every codec a Kafka user sets in `compression.type` is built in and round-trips
/// through the broker: the records come back with their ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_compression_codec_publishes() {
    let pg = Postgres::start();
    pg.create_outbox().await;
    let kafka = Tansu::start();
    let db = pg.client().await;
    let mut n = 0i64;
    for codec in ["zstd", "lz4", "snappy", "gzip"] {
        // Given a relay compressing with the codec, publishing to its own topic
        let topic = format!("codec.{codec}");
        kafka.create_topic(&topic, 1).await;
        let quoted_topic = format!("\"{topic}\"");
        let quoted_codec = format!("\"{codec}\"");
        let relay = Relay::spawn(&kafka_config(
            &pg,
            &kafka.brokers(),
            &[
                ("kafka", "topic", &quoted_topic),
                ("kafka.properties", "\"compression.type\"", &quoted_codec),
            ],
        ));
        pg.wait_streaming("outboxd").await;
        // When rows commit
        let mut ids = HashSet::new();
        for _ in 0..20 {
            n += 1;
            ids.insert(insert(&db, "Order", &format!("o-{}", n % 3), n).await);
        }
        // Then they arrive in the topic, readable
        let arrived = wait_for(Duration::from_secs(30), || async {
            let got: HashSet<String> = read_topic(&kafka.brokers(), &topic)
                .await
                .iter()
                .filter_map(|r| r.header("ce_id").map(str::to_string))
                .collect();
            got.is_superset(&ids)
        })
        .await;
        assert!(
            arrived,
            "{codec}: the rows did not arrive\n{}",
            relay.stderr()
        );
        drop(relay);
        // (the next relay takes the slot over)
        assert!(
            wait_for(Duration::from_secs(30), || async {
                pg.slot_active_pid("outboxd").await.is_none()
            })
            .await
        );
    }
}

/// `kafka.debezium_headers`: the records also carry Debezium's `id` and `eventType`
/// headers (off by default: then neither is written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_headers_are_written_when_asked_for() {
    let pg = Postgres::start();
    pg.create_outbox().await;
    let kafka = Tansu::start();
    let db = pg.client().await;
    for (topic, on) in [("plain", false), ("debezium", true)] {
        // Given a relay with the switch off, then on, each to its own topic
        kafka.create_topic(topic, 1).await;
        let quoted_topic = format!("\"{topic}\"");
        let relay = Relay::spawn(&kafka_config(
            &pg,
            &kafka.brokers(),
            &[
                ("kafka", "topic", &quoted_topic),
                (
                    "kafka",
                    "debezium_headers",
                    if on { "true" } else { "false" },
                ),
                ("cloudevents", "type_prefix", "\"com.example.\""),
            ],
        ));
        pg.wait_streaming("outboxd").await;
        // When a row commits
        let id = insert(&db, "Order", "o-1", 1).await;
        // Then its record has id and eventType exactly when asked for
        let mine = |records: Vec<Record>| -> Vec<Record> {
            records
                .into_iter()
                .filter(|r| r.header("ce_id") == Some(id.as_str()))
                .collect()
        };
        let arrived = wait_for(Duration::from_secs(30), || async {
            !mine(read_topic(&kafka.brokers(), topic).await).is_empty()
        })
        .await;
        assert!(arrived, "{topic}: no record\n{}", relay.stderr());
        let records = mine(read_topic(&kafka.brokers(), topic).await);
        let r = &records[0];
        assert_eq!(r.header("ce_type"), Some("com.example.Updated"));
        if on {
            assert_eq!(r.header("id"), Some(id.as_str()));
            assert_eq!(r.header("eventType"), Some("Updated"));
        } else {
            assert_eq!((r.header("id"), r.header("eventType")), (None, None));
        }
        drop(relay);
        assert!(
            wait_for(Duration::from_secs(30), || async {
                pg.slot_active_pid("outboxd").await.is_none()
            })
            .await
        );
    }
}
