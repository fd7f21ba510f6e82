//! Black-box: the Kafka options for consumers coming from Debezium's Outbox Event
//! Router, through the `outboxd` binary against `tansu`: a NULL payload as a tombstone
//! (`kafka.tombstone_on_empty_payload`, Debezium's `route.tombstone.on.empty.payload`)
//! and extra columns as headers (`kafka.additional_headers`, Debezium's
//! `table.fields.additional.placement`). `kafka.debezium_headers`: `relay_kafka.rs`.

use crate::support;

use std::time::Duration;

use support::faults::final_error;
use support::kafka::{insert, kafka_config, n_of, read_topic, wait_records, Record, Tansu};
use support::secure::outboxd;
use support::{Postgres, Relay};

const TOPIC: &str = "outbox.event.Order";
const DLQ: &str = "outbox.deadletter";

/// A fresh outbox whose payload may be NULL and which has a `tenant_id` column.
async fn debezium_outbox(pg: &Postgres) -> tokio_postgres::Client {
    pg.create_outbox().await;
    let db = pg.client().await;
    db.batch_execute(
        "ALTER TABLE outbox ALTER COLUMN payload DROP NOT NULL;
         ALTER TABLE outbox ADD COLUMN tenant_id text;",
    )
    .await
    .expect("alter outbox");
    db
}

/// Inserts an `Order` row of `o-1` with `payload` (JSON text, or NULL) and `tenant_id`;
/// its id.
async fn insert_row(
    db: &tokio_postgres::Client,
    event_type: &str,
    payload: Option<&str>,
    tenant: Option<&str>,
) -> String {
    let row = db
        .query_one(INSERT_ROW, &[&event_type, &payload, &tenant])
        .await;
    row.expect("insert").get(0)
}

const INSERT_ROW: &str = "INSERT INTO outbox \
     (aggregate_type, aggregate_id, event_type, payload, tenant_id) \
     VALUES ('Order', 'o-1', $1, $2::text::jsonb, $3) RETURNING id::text";

fn id_of(r: &Record) -> &str {
    r.header("ce_id").expect("ce_id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_payload_is_a_tombstone_in_commit_order_in_both_content_modes() {
    let pg = Postgres::start();
    let db = debezium_outbox(&pg).await;
    let kafka = Tansu::start();
    for mode in ["binary", "structured"] {
        // Given a relay with tombstones on, in each content mode, each to its own topic
        let topic = format!("{TOPIC}.{mode}");
        kafka.create_topic(&topic, 1).await;
        let (quoted_topic, quoted_mode) = (format!("\"{topic}\""), format!("\"{mode}\""));
        let relay = Relay::spawn(&kafka_config(
            &pg,
            &kafka.brokers(),
            &[
                ("kafka", "topic", &quoted_topic),
                ("kafka", "content_mode", &quoted_mode),
                ("kafka", "tombstone_on_empty_payload", "true"),
            ],
        ));
        pg.wait_streaming("outboxd").await;

        // When a row with a NULL payload commits between two rows of its aggregate
        let before = insert(&db, "Order", "o-1", 1).await;
        let deleted = insert_row(&db, "OrderDeleted", None, None).await;
        let after = insert(&db, "Order", "o-1", 3).await;

        // Then it is a record with the row's key and no value, between its neighbours
        wait_records(&kafka.brokers(), &topic, 3, Duration::from_secs(30)).await;
        let records = read_topic(&kafka.brokers(), &topic).await;
        let ids: Vec<String> = records.iter().map(event_id).collect();
        assert_eq!(ids, [&*before, &*deleted, &*after], "{mode}: commit order");
        let tombstone = &records[1];
        assert_eq!(tombstone.key.as_deref(), Some("o-1"), "{mode}");
        assert_eq!(tombstone.value, None, "{mode}: a tombstone has no value");
        // and its ce_ headers say which event it was, without a content-type
        assert_eq!(id_of(tombstone), deleted, "{mode}");
        assert_eq!(tombstone.header("ce_type"), Some("OrderDeleted"), "{mode}");
        assert_eq!(tombstone.header("content-type"), None, "{mode}");
        // while its neighbours carry their payloads as before
        if mode == "binary" {
            assert_eq!((n_of(&records[0]), n_of(&records[2])), (1, 3));
        } else {
            for r in [&records[0], &records[2]] {
                assert_eq!(
                    r.header("content-type"),
                    Some("application/cloudevents+json")
                );
            }
        }
        drop(relay);
        pg.wait_slot_released("outboxd").await;
    }
}

/// The event id of a record in either content mode (a structured event has no ce_
/// headers, a tombstone has them in both): `ce_id`, or the JSON event's `id`.
fn event_id(r: &Record) -> String {
    if let Some(id) = r.header("ce_id") {
        return id.to_string();
    }
    let v: serde_json::Value =
        serde_json::from_slice(r.value.as_deref().expect("a structured event")).expect("json");
    v["id"].as_str().expect("id").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_option_a_null_payload_is_still_an_invalid_row() {
    // Given a relay with the defaults (no tombstones, on_invalid = dead_letter)
    let pg = Postgres::start();
    let db = debezium_outbox(&pg).await;
    let kafka = Tansu::start();
    let _relay = Relay::spawn(&kafka_config(&pg, &kafka.brokers(), &[]));
    pg.wait_streaming("outboxd").await;

    // When a row with a NULL payload commits between two others
    let before = insert(&db, "Order", "o-1", 1).await;
    let deleted = insert_row(&db, "OrderDeleted", None, None).await;
    let after = insert(&db, "Order", "o-1", 3).await;

    // Then the neighbours arrive and the row is a dead letter saying why
    wait_records(&kafka.brokers(), TOPIC, 2, Duration::from_secs(30)).await;
    wait_records(&kafka.brokers(), DLQ, 1, Duration::from_secs(30)).await;
    let ids: Vec<String> = read_topic(&kafka.brokers(), TOPIC)
        .await
        .iter()
        .map(|r| id_of(r).to_string())
        .collect();
    assert_eq!(ids, [before, after]);
    let dlq = read_topic(&kafka.brokers(), DLQ).await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(id_of(&dlq[0]), deleted);
    assert_eq!(dlq[0].header("ce_deadletterreason"), Some("invalid_row"));
    let body = String::from_utf8_lossy(dlq[0].value.as_deref().expect("dead letter"));
    assert!(body.contains("payload is null"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn additional_columns_are_headers_and_a_missing_column_stops_the_relay() {
    let pg = Postgres::start();
    let db = debezium_outbox(&pg).await;
    let kafka = Tansu::start();
    kafka.create_topic(TOPIC, 1).await;
    // Given a relay that places tenant_id as the header "tenant"
    let relay = Relay::spawn(&kafka_config(
        &pg,
        &kafka.brokers(),
        &[("kafka", "additional_headers", "{ tenant = \"tenant_id\" }")],
    ));
    pg.wait_streaming("outboxd").await;

    // When one row has a tenant and the next has none
    let with = insert_row(&db, "Updated", Some(r#"{"n": 1}"#), Some("t-7")).await;
    let without = insert(&db, "Order", "o-1", 2).await;

    // Then the first record has the header with the column's text, the second none
    wait_records(&kafka.brokers(), TOPIC, 2, Duration::from_secs(30)).await;
    let records = read_topic(&kafka.brokers(), TOPIC).await;
    assert_eq!(
        (id_of(&records[0]), id_of(&records[1])),
        (&*with, &*without)
    );
    assert_eq!(records[0].header("tenant"), Some("t-7"));
    assert_eq!(
        records[1].header("tenant"),
        None,
        "a NULL column: no header"
    );
    drop(relay);
    pg.wait_slot_released("outboxd").await;

    // Given a configuration asking for a column the table lacks
    let missing = kafka_config(
        &pg,
        &kafka.brokers(),
        &[(
            "kafka",
            "additional_headers",
            "{ region = \"region_code\" }",
        )],
    );
    // Then `outboxd check` names it
    let check = outboxd(Some(&missing), &["check"], &[]);
    assert_ne!(check.code, Some(0), "{}", check.all());
    assert!(
        check
            .stdout
            .contains("lacks region_code (kafka.additional_headers)"),
        "{}",
        check.all()
    );
    // and a relay with it stops at the first row, naming the column and the key
    let mut relay = Relay::spawn(&missing);
    pg.wait_streaming("outboxd").await;
    insert(&db, "Order", "o-1", 3).await;
    let error = final_error(&mut relay, "with a missing additional column").await;
    assert!(
        error.contains("\"region_code\" (additional column) does not exist"),
        "{error}"
    );
    assert!(error.contains("kafka.additional_headers"), "{error}");
}
