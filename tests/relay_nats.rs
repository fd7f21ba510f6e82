//! Black-box: outbox rows in a real Postgres reach a real JetStream as CloudEvents.

use crate::support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use support::faults::{insert_lsn, wait_confirmed_past};
use support::streaming::streaming;
use support::{assert_per_aggregate_order, read_stream, stream_len, wait_for};

const STREAM: &str = "OUTBOX";

/// Inserts one row and returns its id.
async fn insert(
    tx: &impl tokio_postgres::GenericClient,
    aggregate: &str,
    n: i64,
    correlation: Option<&str>,
) -> String {
    tx.query_one(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, correlation_id) \
         VALUES ('Order', $1, 'OrderUpdated', jsonb_build_object('n', $2::bigint), $3) RETURNING id::text",
        &[&aggregate, &n, &correlation],
    )
    .await
    .expect("insert")
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_rows_arrive_once_as_cloudevents_in_order() {
    // Given a relay on a fresh outbox
    let (pg, nats, _, _relay) = streaming(&[]).await;
    let mut db = pg.client().await;

    // When rows commit in one big transaction and in many small ones
    let mut ids = HashSet::new();
    let mut n = 0i64;
    let tx = db.transaction().await.expect("begin");
    for i in 0..30 {
        n += 1;
        ids.insert(insert(&tx, &format!("o-{}", i % 3), n, None).await);
    }
    tx.commit().await.expect("commit");
    let mut correlated = String::new();
    for i in 0..20 {
        n += 1;
        let corr = (i == 7).then_some("flow-42");
        let id = insert(&db, &format!("o-{}", i % 3), n, corr).await;
        if corr.is_some() {
            correlated = id.clone();
        }
        ids.insert(id);
    }
    let tx = db.transaction().await.expect("begin");
    let before_last_commit = insert_lsn(&tx).await;
    n += 1;
    ids.insert(insert(&tx, "o-0", n, None).await);
    tx.commit().await.expect("commit");

    // Then every row arrives exactly once
    let js = nats.jetstream().await;
    assert!(
        wait_for(Duration::from_secs(30), || async {
            stream_len(&js, STREAM).await >= 51
        })
        .await,
        "only {} of 51 events arrived",
        stream_len(&js, STREAM).await
    );
    let msgs = read_stream(&js, STREAM).await;
    assert_eq!(msgs.len(), 51);
    let got: HashSet<String> = msgs
        .iter()
        .map(|m| m.header("ce-id").expect("ce-id").to_string())
        .collect();
    assert_eq!(got, ids);

    // as valid binary-mode CloudEvents with every attribute
    for m in &msgs {
        let id = m.header("ce-id").expect("id");
        assert_eq!(m.subject, "outbox.Order");
        assert_eq!(m.header("Nats-Msg-Id"), Some(id));
        assert_eq!(m.header("ce-specversion"), Some("1.0"));
        assert_eq!(m.header("ce-source"), Some("/test/orders"));
        assert_eq!(m.header("ce-type"), Some("OrderUpdated"));
        assert_eq!(m.header("content-type"), Some("application/json"));
        assert!(m.header("ce-time").expect("time").contains('T'));
        assert_eq!(m.header("ce-partitionkey"), m.header("ce-subject"));
        assert_eq!(m.header("ce-sequence").expect("sequence").len(), 24);
        assert_eq!(
            m.header("ce-causationid"),
            Some(id),
            "no causation: the event's own id"
        );
        if id == correlated {
            assert_eq!(m.header("ce-correlationid"), Some("flow-42"));
        } else {
            assert_eq!(
                m.header("ce-correlationid"),
                Some(id),
                "no correlation: a new flow"
            );
        }
    }
    // in commit order per aggregate, with `sequence` sorting the same way
    assert_per_aggregate_order(&msgs);
    let mut seq_by_agg: HashMap<&str, &str> = HashMap::new();
    for m in &msgs {
        let s = m.header("ce-sequence").expect("sequence");
        if let Some(prev) = seq_by_agg.insert(m.header("ce-subject").expect("subject"), s) {
            assert!(s > prev, "sequence {s} after {prev}");
        }
    }
    // and the slot is confirmed past the last transaction once the broker acked it
    wait_confirmed_past(&pg, before_last_commit, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_transactions_publish_nothing() {
    let (pg, nats, _, _relay) = streaming(&[]).await;
    let mut db = pg.client().await;

    // Given a transaction that inserts and rolls back, then a committed marker
    let tx = db.transaction().await.expect("begin");
    let ghost = insert(&tx, "o-1", 1, None).await;
    tx.rollback().await.expect("rollback");
    let marker = insert(&db, "o-1", 2, None).await;

    // Then only the marker arrives
    let js = nats.jetstream().await;
    assert!(
        wait_for(Duration::from_secs(30), || async {
            stream_len(&js, STREAM).await >= 1
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids: Vec<String> = read_stream(&js, STREAM)
        .await
        .iter()
        .map(|m| m.header("ce-id").expect("id").to_string())
        .collect();
    assert_eq!(ids, vec![marker]);
    assert!(!ids.contains(&ghost));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_writing_loses_nothing_and_keeps_order() {
    const ROWS: i64 = 10_000;
    let (pg, nats, _, mut relay) = streaming(&[]).await;

    // Given a writer committing 10,000 rows in transactions of 1..=50 rows over 100 aggregates
    let writer_db = pg.client().await;
    let writer = tokio::spawn(async move {
        let mut db = writer_db;
        let mut n = 0i64;
        let mut ids = Vec::with_capacity(ROWS as usize);
        let mut size = 1i64;
        while n < ROWS {
            let tx = db.transaction().await.expect("begin");
            for _ in 0..size.min(ROWS - n) {
                n += 1;
                ids.push(insert(&tx, &format!("agg-{}", n % 100), n, None).await);
            }
            tx.commit().await.expect("commit");
            size = size % 50 + 7; // a deterministic spread of sizes
        }
        ids
    });

    // When the relay is killed twice mid-stream and restarted
    let js = nats.jetstream().await;
    for threshold in [1_500u64, 5_000] {
        assert!(
            wait_for(Duration::from_secs(60), || async {
                stream_len(&js, STREAM).await >= threshold
            })
            .await,
            "stalled before {threshold} events"
        );
        relay.kill();
        relay.start();
    }
    let ids: HashSet<String> = writer.await.expect("writer").into_iter().collect();

    // Then every committed row is in the stream exactly once (JetStream drops repeats)
    assert!(
        wait_for(Duration::from_secs(90), || async {
            stream_len(&js, STREAM).await >= ROWS as u64
        })
        .await,
        "only {} of {ROWS} events arrived",
        stream_len(&js, STREAM).await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let msgs = read_stream(&js, STREAM).await;
    let got: HashSet<String> = msgs
        .iter()
        .map(|m| m.header("ce-id").expect("id").to_string())
        .collect();
    assert_eq!(
        got.len(),
        ids.len(),
        "missing: {:?}",
        ids.difference(&got).take(5).collect::<Vec<_>>()
    );
    assert_eq!(got, ids);
    assert_eq!(
        msgs.len(),
        ROWS as usize,
        "duplicates beyond JetStream's dedup"
    );
    // and each aggregate's events are in commit order
    assert_per_aggregate_order(&msgs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_confirms_and_exits_zero() {
    let port = support::free_port();
    let listen = format!("\"127.0.0.1:{port}\"");
    let (pg, nats, _, mut relay) = streaming(&[
        ("nats", "content_mode", "\"structured\""),
        ("http", "listen", &listen),
        // The broker hangs for a few seconds below: its acks must not time out
        // meanwhile (a timed-out event is not retried during the drain).
        ("nats", "ack_timeout_ms", "30000"),
    ])
    .await;
    let mut db = pg.client().await;

    // Given rows that were delivered
    for n in 0..200 {
        insert(&db, &format!("o-{}", n % 5), n, None).await;
    }
    let js = nats.jetstream().await;
    assert!(
        wait_for(Duration::from_secs(30), || async {
            stream_len(&js, STREAM).await >= 200
        })
        .await
    );
    // and more rows in flight: published to a broker that hangs (SIGSTOP)
    nats.freeze();
    for n in 200..300 {
        insert(&db, &format!("o-{}", n % 5), n, None).await;
    }
    let tx = db.transaction().await.expect("begin");
    let before_last = insert_lsn(&tx).await;
    insert(&tx, "o-0", 1000, None).await;
    tx.commit().await.expect("commit");
    // (every row read, the last transaction's among them, and not all acknowledged)
    assert!(
        wait_for(Duration::from_secs(30), || async {
            support::scraped(port, |t| {
                support::metric(t, "outboxd_events_received_total").unwrap_or(0.0) >= 301.0
                    && support::metric(t, "outboxd_events_in_flight").unwrap_or(0.0) >= 1.0
            })
        })
        .await,
        "the rows were not all read, or none is in flight"
    );

    // When the relay gets SIGTERM, and the broker answers again a moment later
    support::signal(relay.pid(), "TERM");
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.thaw();
    let status = relay
        .wait_exit(Duration::from_secs(25))
        .await
        .expect("exited in time");

    // Then it drained: it exits 0, every row is stored, and the final confirm reached
    // the server (past the last transaction, which was in flight at the SIGTERM)
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        relay.stderr()
    );
    let confirmed = pg.confirmed_lsn("outboxd").await.expect("slot");
    assert!(
        confirmed > before_last,
        "confirmed {confirmed:X} <= {before_last:X}\n{}",
        relay.stderr()
    );
    let msgs = read_stream(&js, STREAM).await;
    let stored: HashSet<String> = msgs
        .iter()
        .map(|m| m.header("Nats-Msg-Id").expect("id").to_string())
        .collect();
    assert_eq!(stored, pg.outbox_ids().await);
    // and structured mode carried the JSON event format
    assert_eq!(
        msgs[0].header("content-type"),
        Some("application/cloudevents+json")
    );
    let ev: serde_json::Value = serde_json::from_slice(&msgs[0].payload).expect("json");
    assert_eq!(ev["specversion"], "1.0");
    assert_eq!(ev["id"].as_str(), msgs[0].header("Nats-Msg-Id"));
    assert!(ev["data"]["n"].is_i64());
}
