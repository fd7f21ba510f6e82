//! Black-box: the Kafka sink when things go wrong. The broker process killed and
//! restarted (tansu), a broker down and up that keeps its state (librdkafka's mock
//! cluster), an event over the size limit, and `outboxd check` against a live and a
//! dead broker.

use crate::support;

use std::collections::HashSet;
use std::time::Duration;

use support::kafka::{
    assert_order_per_key, assert_same_event_when_repeated, ids_in, insert, kafka_config, n_of,
    partition_count, read_topic, relay_to, wait_exit, wait_records, write_rows, Tansu,
};
use support::secure::outboxd;
use support::{wait_for, Postgres, Relay};

/// Waits until the relay has seen a delivery fail and retries it (during an outage).
async fn wait_retrying(relay: &Relay) {
    assert!(
        wait_for(Duration::from_secs(30), || async {
            relay.stderr().contains("publish failed; retrying")
        })
        .await,
        "no failed delivery was retried during the outage"
    );
}

/// The relay process is still the one that started: it rode the trouble out.
fn assert_still_running(relay: &mut Relay) {
    assert!(
        relay.try_exit().is_none(),
        "relay exited:\n{}",
        relay.stderr()
    );
}

/// Commits one event of aggregate `aggregate` with a 50 kB payload (`n` 2); its id.
async fn insert_50_kb(db: &tokio_postgres::Client, aggregate: &str) -> String {
    db.query_one(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ('Order', $1, 'Updated', jsonb_build_object('n', 2, 'blob', repeat('x', 50000))) \
         RETURNING id::text",
        &[&aggregate],
    )
    .await
    .expect("insert big")
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_and_restarted_loses_nothing_written_around_the_outage_and_the_relay_stays_up(
) {
    // What this proves: events committed while the broker process is dead, and after
    // it is back on the same port, all arrive, in commit order per aggregate, and the
    // same relay process rides the outage out (librdkafka reconnects; delivery reports
    // that failed are retried by the relay). What it cannot prove, and why the
    // producer is not idempotent here: tansu keeps everything in memory, so the
    // restarted broker has lost the records acknowledged before the outage and the
    // idempotent producer id (it then refuses that id forever, where Apache Kafka
    // keeps producer state on disk). `mock_cluster_broker_down_and_up_...` covers the
    // default idempotent producer across an outage with a broker that keeps its state.
    const TOPIC: &str = "outbox.event.Order";
    let mut kafka = Tansu::start();
    let brokers = kafka.brokers();
    // A short delivery timeout, so the outage shows up as failed delivery reports that
    // the relay must retry, not only as records waiting inside librdkafka.
    let (pg, mut relay) = relay_to(
        &brokers,
        &[
            ("kafka", "message_timeout_ms", "2000"),
            ("kafka.properties", "\"enable.idempotence\"", "\"false\""),
        ],
    )
    .await;
    let db = pg.client().await;

    // Given events delivered before the outage
    let mut n = 0i64;
    let before = write_rows(&db, &mut n, 20).await;
    wait_records(&kafka.brokers(), TOPIC, 20, Duration::from_secs(30)).await;

    // When the broker process is killed, events are committed during the outage
    kafka.stop();
    let mut after = write_rows(&db, &mut n, 30).await;
    // and the relay has seen deliveries fail and is retrying them
    wait_retrying(&relay).await;
    // then the broker comes back on the same port, and more events are committed
    kafka.resume();
    after.extend(write_rows(&db, &mut n, 20).await);

    // Then every event committed during and after the outage arrives
    assert!(
        wait_for(Duration::from_secs(60), || async {
            after.is_subset(&ids_in(&brokers, TOPIC).await)
        })
        .await,
        "events committed during or after the outage are missing"
    );
    let records = read_topic(&brokers, TOPIC).await;
    let got: HashSet<String> = records
        .iter()
        .map(|r| r.header("ce_id").expect("ce_id").to_string())
        .collect();
    assert!(got.is_subset(&before.union(&after).cloned().collect()));
    // in commit order per aggregate
    assert_order_per_key(&records, n_of);
    // and the relay never exited: the same process carried on
    assert_still_running(&mut relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_cluster_broker_down_and_up_loses_nothing_with_the_idempotent_producer() {
    // Given librdkafka's mock cluster (the real protocol over TCP, hosted by this test
    // process; the relay is a separate process) and a relay with the default,
    // idempotent producer. Unlike tansu, a mock broker keeps its records and producer
    // state across an outage, so here nothing at all may go missing.
    const TOPIC: &str = "outbox.event.Order";
    let mock = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    mock.create_topic(TOPIC, 4, 1).expect("topic");
    let brokers = mock.bootstrap_servers();
    let (pg, mut relay) = relay_to(&brokers, &[("kafka", "message_timeout_ms", "2000")]).await;
    let db = pg.client().await;
    let mut n = 0i64;
    let mut all = write_rows(&db, &mut n, 20).await;
    wait_records(&brokers, TOPIC, 20, Duration::from_secs(30)).await;

    // When the broker goes down while events are committed, and comes back
    mock.broker_down(1).expect("down");
    all.extend(write_rows(&db, &mut n, 30).await);
    wait_retrying(&relay).await;
    mock.broker_up(1).expect("up");
    all.extend(write_rows(&db, &mut n, 20).await);

    // Then every event arrives, duplicates are the same event, order per key is kept
    assert!(
        wait_for(Duration::from_secs(60), || async {
            ids_in(&brokers, TOPIC).await == all
        })
        .await,
        "events are missing after the outage"
    );
    let records = read_topic(&brokers, TOPIC).await;
    assert_same_event_when_repeated(&records);
    assert_order_per_key(&records, n_of);
    // and the relay carried on in the same process
    assert_still_running(&mut relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_the_size_limit_halts_naming_it_and_the_slot_stays_before_it() {
    // (sink.on_rejected = "halt"; the default, dead_letter, is the next test)
    // Given a producer limit of 10 kB (librdkafka's message.max.bytes, passed through)
    const TOPIC: &str = "outbox.event.Order";
    let kafka = Tansu::start();
    let (pg, mut relay) = relay_to(
        &kafka.brokers(),
        &[
            ("kafka.properties", "\"message.max.bytes\"", "\"10000\""),
            ("sink", "on_rejected", "\"halt\""),
        ],
    )
    .await;
    let db = pg.client().await;
    let small = insert(&db, "Order", "o-1", 1).await;
    wait_records(&kafka.brokers(), TOPIC, 1, Duration::from_secs(30)).await;

    // When a 50 kB event is committed, then a small one
    let big = insert_50_kb(&db, "o-2").await;
    insert(&db, "Order", "o-3", 3).await;

    // Then the relay stops with exit code 1, naming the event and the reason
    let status = wait_exit(&mut relay, Duration::from_secs(30)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{}", relay.stderr());
    let halted = format!("halted on event {big}");
    let stderr = relay.stderr();
    let halts = stderr.matches(&halted).count();
    assert!(halts > 0, "{stderr}");
    assert!(stderr.contains("too_large"), "{stderr}");
    // and the event before it was delivered, the big one never
    let ids = ids_in(&kafka.brokers(), TOPIC).await;
    assert!(ids.contains(&small) && !ids.contains(&big));

    // and the slot did not move past it: a restarted relay halts on the same event
    relay.kill(); // reaps the exited process
    relay.start();
    let status = wait_exit(&mut relay, Duration::from_secs(30)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{}", relay.stderr());
    assert_eq!(relay.stderr().matches(&halted).count(), 2 * halts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_the_size_limit_becomes_a_dead_letter_and_the_stream_goes_on() {
    // Given a producer limit of 10 kB and the default policy (dead_letter)
    const TOPIC: &str = "outbox.event.Order";
    const DLQ: &str = "outbox.deadletter";
    let kafka = Tansu::start();
    let (pg, _relay) = relay_to(
        &kafka.brokers(),
        &[("kafka.properties", "\"message.max.bytes\"", "\"10000\"")],
    )
    .await;
    let db = pg.client().await;

    // When a 50 kB event sits between two small ones
    let first = insert(&db, "Order", "o-1", 1).await;
    let big = insert_50_kb(&db, "o-1").await;
    let last = insert(&db, "Order", "o-1", 3).await;

    // Then the small ones arrive in their topic and the big one as a dead letter
    wait_records(&kafka.brokers(), TOPIC, 2, Duration::from_secs(30)).await;
    wait_records(&kafka.brokers(), DLQ, 1, Duration::from_secs(30)).await;
    let ids = ids_in(&kafka.brokers(), TOPIC).await;
    assert!(ids.contains(&first) && ids.contains(&last) && !ids.contains(&big));
    let dlq = read_topic(&kafka.brokers(), DLQ).await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].header("ce_id"), Some(big.as_str()));
    assert_eq!(dlq[0].header("ce_type"), Some("io.outboxd.deadletter"));
    assert_eq!(dlq[0].header("ce_deadletterreason"), Some("too_large"));
    // keyed like the event, so it stays with its aggregate's partition
    assert_eq!(dlq[0].key.as_deref(), Some("o-1"));
}

/// Runs `outboxd check` with `config` and `args`; (exit code, stdout).
fn check(config: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = outboxd(Some(config), &[&["check"], args].concat(), &[]);
    (out.code, out.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_the_broker_and_which_topics_exist_without_creating_any() {
    // Given a broker with the topic of one aggregate type
    let pg = Postgres::start();
    pg.create_outbox().await;
    let mut kafka = Tansu::start();
    kafka.create_topic("outbox.event.Order", 3).await;
    let cfg = kafka_config(&pg, &kafka.brokers(), &[]);

    // When check runs for two sample aggregate types
    let (code, out) = check(
        &cfg,
        &["--aggregate-type", "Order", "--aggregate-type", "Customer"],
    );

    // Then the broker is reachable, the prefix match and both topics are reported
    assert_eq!(code, Some(0), "{out}");
    let line = |needle: &str| line_of(&out, needle);
    assert!(line("kafka broker").starts_with("ok"), "{out}");
    assert!(
        line("1 existing topic(s)").contains("outbox.event.Order"),
        "{out}"
    );
    assert!(line("outbox.event.Order exists (3 partitions)").starts_with("ok"));
    // tansu does not report auto.create.topics.enable: reliance on it is spelled out
    let customer = line("outbox.event.Customer does not exist");
    assert!(customer.contains("relies on auto-creation"), "{customer}");
    // and check created nothing
    assert_eq!(
        partition_count(&kafka.brokers(), "outbox.event.Customer").await,
        0
    );

    // When the broker is down
    kafka.stop();
    let started = std::time::Instant::now();
    let (code, out) = check(&cfg, &[]);

    // Then check fails within its timeout, naming the broker line and the fix
    assert_eq!(code, Some(1), "{out}");
    assert!(started.elapsed() < Duration::from_secs(30));
    let broker = line_of(&out, "kafka broker");
    assert!(
        broker.starts_with("FAIL") && broker.contains("kafka.brokers"),
        "{out}"
    );
}

fn line_of(out: &str, needle: &str) -> String {
    out.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{out}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_idempotence_error_replaces_the_producer_and_loses_nothing() {
    // Given a mock broker that answers the next produce request with a sequence
    // desynchronisation, which librdkafka's idempotent producer treats as fatal: the
    // producer instance can never send again.
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    const TOPIC: &str = "outbox.event.Order";
    let mock = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    mock.create_topic(TOPIC, 4, 1).expect("topic");
    let brokers = mock.bootstrap_servers();
    let (pg, mut relay) = relay_to(&brokers, &[]).await;
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
    );

    // When events are committed
    let db = pg.client().await;
    let mut n = 0i64;
    let all = write_rows(&db, &mut n, 40).await;

    // Then the sink replaces the producer, and every event arrives in order per key
    assert!(
        wait_for(Duration::from_secs(60), || async {
            ids_in(&brokers, TOPIC).await == all
        })
        .await,
        "events are missing after the fatal producer error:\n{}",
        relay.stderr()
    );
    assert!(
        relay
            .stderr()
            .contains("kafka producer replaced by a fresh one"),
        "{}",
        relay.stderr()
    );
    let records = read_topic(&brokers, TOPIC).await;
    assert_same_event_when_repeated(&records);
    assert_order_per_key(&records, n_of);
    assert_still_running(&mut relay);
}
