//! Black-box: rows written by a hostile or careless application cannot change how a
//! broker message is framed, and rows the broker can never accept are dead-lettered
//! instead of retried forever (README, "Failure behaviour"). Real PostgreSQL and
//! nats-server (stock limits: `max_payload` 1 MB, control line 4 KB, JetStream
//! headers below 64 KB).

use crate::support;

use std::collections::HashMap;
use std::time::Duration;

use support::streaming::{read_at_least, streaming};
use support::{config, read_stream, wait_for, Nats, Postgres, Received, Relay};

/// An outbox with a text id (so an id can carry control characters) and a `json`
/// headers column (unlike `jsonb`, it keeps a `\u0000` escape).
const TEXT_ID_OUTBOX: &str = "CREATE TABLE public.outbox (
    id text PRIMARY KEY,
    aggregate_type text NOT NULL,
    aggregate_id text NOT NULL,
    event_type text NOT NULL,
    payload jsonb NOT NULL,
    headers json,
    created_at timestamptz NOT NULL DEFAULT now()
)";

/// A row given as (id, aggregate_type, aggregate_id, event_type, headers).
type Row<'a> = (&'a str, &'a str, &'a str, &'a str, Option<&'a str>);

/// Commits `rows`, one transaction each, with the payload `{"n": 1}`.
async fn insert_rows(db: &tokio_postgres::Client, rows: &[Row<'_>]) {
    for (id, agg_type, agg_id, ty, headers) in rows {
        db.execute(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, headers) \
             VALUES ($1, $2, $3, $4, '{\"n\": 1}', $5::text::json)",
            &[id, agg_type, agg_id, ty, headers],
        )
        .await
        .expect("insert");
    }
}

/// Percent-decoding of a header value (the CloudEvents binding's encoding).
fn decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).expect("ascii");
            out.push(u8::from_str_radix(hex, 16).expect("hex after %"));
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("utf-8 after decoding")
}

/// The messages whose decoded `ce-id` is `id`.
fn by_id<'a>(msgs: &'a [Received], id: &str) -> Vec<&'a Received> {
    msgs.iter()
        .filter(|m| m.header("ce-id").map(decode).as_deref() == Some(id))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_values_cannot_inject_nats_headers_or_shadow_a_later_event() {
    // Given a relay to a stock nats-server, on an outbox with text ids
    let pg = Postgres::start_with_outbox(TEXT_ID_OUTBOX).await;
    let nats = Nats::start();
    let _relay = Relay::spawn(&config(&pg, Some(&nats), &[]));
    pg.wait_streaming("outboxd").await;

    // When rows carry CR, LF, other control characters and a NUL in every value that
    // reaches a header, then the real event whose id the first row tried to forge
    let db = pg.client().await;
    let hostile: [Row; 5] = [
        (
            "order-1002-paid\r\nX-A: b",
            "Order",
            "o-1",
            "OrderPaid",
            None,
        ),
        (
            "e-2",
            "Ord\r\ner\u{1}",
            "o-2\r\nX-B: c",
            "Created\r\nX-C: d",
            None,
        ),
        (
            "e-3",
            "Order",
            "o-3",
            "Created",
            Some(
                r#"{"traceparent": "x\r\nX-D: e", "tenant": "t\u0001\u0000\u007f", "x\r\ny": "bad name"}"#,
            ),
        ),
        ("e-4\u{7}\t ", "Order", "o-4", "Created", None),
        ("order-1002-paid", "Order", "o-1", "OrderPaid", None),
    ];
    insert_rows(&db, &hostile).await;

    // Then every row arrives as its own message (none was taken for a duplicate)
    let js = nats.jetstream().await;
    let msgs = read_at_least(&js, "OUTBOX", 5).await;
    assert_eq!(msgs.len(), 5, "{msgs:#?}");
    for (id, agg_type, agg_id, ty, _) in hostile {
        let found = by_id(&msgs, id);
        assert_eq!(found.len(), 1, "id {id:?}: {msgs:#?}");
        let m = found[0];
        // and every value is carried faithfully: percent-encoded in its header
        assert_eq!(m.header("ce-subject").map(decode).as_deref(), Some(agg_id));
        assert_eq!(m.header("ce-type").map(decode).as_deref(), Some(ty));
        // the Nats-Msg-Id is the id, encoded the same way (so JetStream dedups by it)
        assert_eq!(m.header("Nats-Msg-Id").map(decode).as_deref(), Some(id));
        // and the subject is one token under outbox.
        let token = m.subject.strip_prefix("outbox.").expect("outbox. subject");
        assert!(
            !token.contains('.') && !token.chars().any(|c| c.is_control() || c == ' '),
            "subject {:?} of {agg_type:?}",
            m.subject
        );
    }
    // and no header was injected, on any message
    let allowed =
        |name: &str| name == "Nats-Msg-Id" || name == "content-type" || name.starts_with("ce-");
    for m in &msgs {
        let names: Vec<&String> = m.headers.keys().filter(|n| !allowed(n)).collect();
        assert!(names.is_empty(), "injected headers {names:?} in {m:#?}");
        for (name, value) in &m.headers {
            assert!(
                !value.chars().any(|c| c.is_control() || c == ' '),
                "header {name} carries a raw control character or space: {value:?}"
            );
        }
    }
    // and header members keep their values, control characters and NUL included
    let m = by_id(&msgs, "e-3")[0];
    assert_eq!(
        m.header("ce-traceparent").map(decode).as_deref(),
        Some("x\r\nX-D: e")
    );
    assert_eq!(
        m.header("ce-tenant").map(decode).as_deref(),
        Some("t\u{1}\u{0}\u{7f}")
    );
    // while a member whose name is not an attribute name is left out
    let names: HashMap<&str, &str> = m
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert!(
        !names.keys().any(|k| k.contains('x') && k.contains('y')),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_that_are_not_utf8_are_dead_lettered_with_the_reason() {
    // Given a database whose encoding (SQL_ASCII) lets text hold any byte
    let pg = Postgres::start();
    pg.client()
        .await
        .batch_execute(
            "CREATE DATABASE ascii TEMPLATE template0 ENCODING 'SQL_ASCII' \
             LC_COLLATE 'C' LC_CTYPE 'C'",
        )
        .await
        .expect("create database");
    let url = format!("postgres://postgres@127.0.0.1:{}/ascii", pg.port);
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    db.batch_execute(TEXT_ID_OUTBOX).await.expect("ddl");
    let nats = Nats::start();
    let pg_url = format!("\"{url}\"");
    let _relay = Relay::spawn(&config(&pg, Some(&nats), &[("postgres", "url", &pg_url)]));
    assert!(
        wait_for(Duration::from_secs(60), || async {
            db.query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'outboxd' AND active",
                &[],
            )
            .await
            .expect("slot")
            .is_some()
        })
        .await,
        "no relay streams"
    );

    // When rows carry a byte that is not UTF-8 in the id, the aggregate type and id,
    // and the event type, followed by a good row of the same aggregate
    for (id, agg_type, agg_id, ty) in [
        (r"id-\xff", "Order", "o-1", "T"),
        ("bad-type", r"Ord\xfe", "o-1", "T"),
        ("bad-agg", "Order", r"o-\xff", "T"),
        ("bad-event", "Order", "o-1", r"T\xff"),
        ("good", "Order", "o-1", "T"),
    ] {
        db.batch_execute(&format!(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) \
             VALUES (E'{id}', E'{agg_type}', E'{agg_id}', E'{ty}', '{{}}')"
        ))
        .await
        .expect("insert");
    }

    // Then each bad row is a dead letter naming what is not UTF-8, the good one arrives
    let js = nats.jetstream().await;
    let msgs = read_at_least(&js, "OUTBOX", 5).await;
    let dead: Vec<&Received> = msgs
        .iter()
        .filter(|m| m.subject == "outbox.deadletter")
        .collect();
    assert_eq!(dead.len(), 4, "{msgs:#?}");
    for m in &dead {
        assert_eq!(m.header("ce-deadletterreason"), Some("invalid_row"));
        let d: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
        assert!(
            d["error"].as_str().is_some_and(|e| e.contains("not UTF-8")),
            "{d}"
        );
    }
    assert_eq!(msgs.last().and_then(|m| m.header("ce-id")), Some("good"));
}

/// Inserts one row of aggregate `agg` with a payload of `pad` bytes and `headers`.
async fn insert_sized(
    db: &tokio_postgres::Client,
    agg_type: &str,
    agg: &str,
    n: i64,
    pad: i32,
    headers: Option<&str>,
) -> String {
    db.query_one(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers) \
         VALUES ($1, $2, 'T', jsonb_build_object('n', $3::bigint, 'pad', repeat('x', $4::int)), \
                 $5::text::jsonb) RETURNING id::text",
        &[&agg_type, &agg, &n, &pad, &headers],
    )
    .await
    .expect("insert")
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_a_stock_nats_server_cannot_take_are_dead_lettered_not_retried() {
    // Given a relay to a stock nats-server (max_payload 1 MB, 4 KB control line)
    let (pg, nats, _, relay) = streaming(&[]).await;

    // When an aggregate's second event is 5 MB, another's headers member is 2 MB, an
    // aggregate type is 5,000 characters and an aggregate id 100 KB, each followed by
    // a normal event of the same aggregate
    let db = pg.client().await;
    let big_header = format!(r#"{{"big": "{}"}}"#, "h".repeat(2 << 20));
    let long_type = "T".repeat(5000);
    let long_id = "i".repeat(100 * 1024);
    let mut oversized = Vec::new();
    let mut normal = Vec::new();
    normal.push(insert_sized(&db, "Order", "o-1", 1, 10, None).await);
    oversized.push(insert_sized(&db, "Order", "o-1", 2, 5 << 20, None).await);
    normal.push(insert_sized(&db, "Order", "o-1", 3, 10, None).await);
    oversized.push(insert_sized(&db, "Order", "o-2", 1, 10, Some(&big_header)).await);
    normal.push(insert_sized(&db, "Order", "o-2", 2, 10, None).await);
    oversized.push(insert_sized(&db, &long_type, "o-3", 1, 10, None).await);
    normal.push(insert_sized(&db, "Order", "o-3", 2, 10, None).await);
    oversized.push(insert_sized(&db, "Order", &long_id, 1, 10, None).await);
    normal.push(insert_sized(&db, "Order", "o-4", 1, 10, None).await);
    let (marker, before_marker) = support::faults::commit_marker(&pg).await;
    normal.push(marker);

    // Then the slot moves past all of them
    support::faults::wait_confirmed_past(&pg, before_marker, Duration::from_secs(60)).await;
    // and each oversized event is a small dead letter with its reason, sizes and position
    let js = nats.jetstream().await;
    let msgs = read_stream(&js, "OUTBOX").await;
    let (dead, delivered): (Vec<&Received>, Vec<&Received>) =
        msgs.iter().partition(|m| m.subject == "outbox.deadletter");
    let ids = |ms: &[&Received]| -> std::collections::BTreeSet<String> {
        ms.iter()
            .filter_map(|m| m.header("ce-id").map(str::to_string))
            .collect()
    };
    assert_eq!(
        ids(&dead),
        oversized.iter().cloned().collect(),
        "{}",
        relay.stderr()
    );
    for m in &dead {
        assert_eq!(m.header("ce-deadletterreason"), Some("too_large"));
        assert!(m.payload.len() < 64 * 1024, "{} bytes", m.payload.len());
        let d: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
        assert!(
            d["error"].as_str().is_some_and(|e| e.contains("bytes")),
            "{d}"
        );
        assert!(
            d["position"]["commit_lsn"]
                .as_str()
                .is_some_and(|l| l != "0/0"),
            "{d}"
        );
    }
    // and every normal event arrived, in order per aggregate
    assert_eq!(ids(&delivered), normal.iter().cloned().collect());
    let delivered: Vec<Received> = delivered.into_iter().cloned().collect();
    support::assert_per_aggregate_order(&delivered);
    // without the server ever dropping the connection
    let lost = support::faults::relay_log_lines(&relay.stderr(), "nats connection lost");
    assert!(lost.is_empty(), "{lost:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_values_cannot_change_a_kafka_record_s_topic_key_or_headers() {
    use support::kafka::{kafka_config, read_topic, wait_records, Tansu};
    // Given a relay to a Kafka-protocol broker (tansu), on an outbox with text ids
    let pg = Postgres::start_with_outbox(TEXT_ID_OUTBOX).await;
    let kafka = Tansu::start();
    kafka.create_topic("outbox.event.Order", 1).await;
    kafka.create_topic("outbox.event.Ord__er_", 1).await;
    let _relay = Relay::spawn(&kafka_config(&pg, &kafka.brokers(), &[]));
    pg.wait_streaming("outboxd").await;

    // When rows carry CR, LF, other control characters and a NUL in every value that
    // reaches the topic, the key or a header
    let db = pg.client().await;
    let hostile: [Row; 4] = [
        (
            "order-1002-paid\r\nce_id: x",
            "Order",
            "o-1",
            "OrderPaid",
            None,
        ),
        (
            "e-2",
            "Ord\r\ner\u{1}",
            "o-2\r\nce_type: y",
            "Created\r\n",
            None,
        ),
        (
            "e-3",
            "Order",
            "o-3",
            "Created",
            Some(r#"{"traceparent": "x\r\nX-D: e", "tenant": "t\u0001\u0000"}"#),
        ),
        ("order-1002-paid", "Order", "o-1", "OrderPaid", None),
    ];
    insert_rows(&db, &hostile).await;

    // Then every row is its own record, its values byte for byte in the key and the
    // headers, and an aggregate type cannot leave its sanitised topic
    let brokers = kafka.brokers();
    wait_records(&brokers, "outbox.event.Order", 3, Duration::from_secs(60)).await;
    wait_records(
        &brokers,
        "outbox.event.Ord__er_",
        1,
        Duration::from_secs(60),
    )
    .await;
    let mut records = read_topic(&brokers, "outbox.event.Order").await;
    records.extend(read_topic(&brokers, "outbox.event.Ord__er_").await);
    assert_eq!(records.len(), 4, "{records:#?}");
    for (id, _, agg_id, ty, _) in hostile {
        let found: Vec<_> = records
            .iter()
            .filter(|r| r.header("ce_id") == Some(id))
            .collect();
        assert_eq!(found.len(), 1, "id {id:?}: {records:#?}");
        assert_eq!(found[0].key.as_deref(), Some(agg_id));
        assert_eq!(found[0].header("ce_subject"), Some(agg_id));
        assert_eq!(found[0].header("ce_type"), Some(ty));
    }
    for r in &records {
        let foreign: Vec<&String> = r
            .headers
            .keys()
            .filter(|n| !(n.starts_with("ce_") || *n == "content-type"))
            .collect();
        assert!(foreign.is_empty(), "{foreign:?} in {r:#?}");
    }
    let e3 = records
        .iter()
        .find(|r| r.header("ce_id") == Some("e-3"))
        .expect("e-3");
    assert_eq!(e3.header("ce_traceparent"), Some("x\r\nX-D: e"));
    assert_eq!(e3.header("ce_tenant"), Some("t\u{1}\u{0}"));
}
