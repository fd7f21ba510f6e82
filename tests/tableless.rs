//! Black-box: the table-less outbox (`pg_logical_emit_message`) and the
//! insert-and-delete pattern, against real Postgres and nats-server.

use crate::support;

use support::secure::outboxd;
use support::streaming::{ce_ids, read_at_least, streaming};
use support::{config, Nats, Postgres, Relay};

/// Runs `outboxd setup --apply` (table, publication, slot, outbox_emit()).
fn setup(cfg: &str) {
    let o = outboxd(Some(cfg), &["setup", "--apply"], &[]);
    assert_eq!(o.code, Some(0), "{}", o.all());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emitted_events_follow_commit_order_and_rollbacks() {
    let pg = Postgres::start();
    let nats = Nats::start();
    let cfg = config(&pg, Some(&nats), &[]);
    setup(&cfg);
    let _relay = Relay::spawn(&cfg);
    pg.wait_streaming("outboxd").await;
    let db = pg.client().await;

    // Given a transaction mixing a table row and two emitted events
    let rows = db
        .query(
            "WITH a AS (INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                        VALUES ('Order', 'o-1', 'FromTable', '{\"n\": 1}') RETURNING id::text)
             SELECT id FROM a",
            &[],
        )
        .await
        .expect("insert");
    let table_id: String = rows[0].get(0);
    let tx_ids: Vec<String> = {
        let mut c = pg.client().await;
        let tx = c.transaction().await.expect("begin");
        let a: String = tx
            .query_one(
                "SELECT outbox_emit('Order', 'o-1', 'Emitted', '{\"n\": 2}', 'flow-1')::text",
                &[],
            )
            .await
            .expect("emit")
            .get(0);
        let b: String = tx
            .query_one(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                 VALUES ('Order', 'o-1', 'FromTable', '{\"n\": 3}') RETURNING id::text",
                &[],
            )
            .await
            .expect("insert")
            .get(0);
        let c_: String = tx
            .query_one(
                "SELECT outbox_emit('Order', 'o-1', 'Emitted', '{\"n\": 4}')::text",
                &[],
            )
            .await
            .expect("emit")
            .get(0);
        tx.commit().await.expect("commit");
        vec![a, b, c_]
    };
    // and an emitted event in a transaction that rolls back, and a non-transactional one
    db.batch_execute(
        "BEGIN; SELECT outbox_emit('Order', 'o-1', 'Ghost', '{\"n\": 99}'); ROLLBACK;
         SELECT pg_logical_emit_message(false, 'outboxd.event',
           '{\"id\": \"nontx\", \"aggregate_type\": \"Order\", \"aggregate_id\": \"o-1\", \"event_type\": \"Ghost\", \"payload\": {}}');",
    )
    .await
    .expect("ghosts");
    let last = {
        let row = db
            .query_one(
                "SELECT outbox_emit('Order', 'o-1', 'Emitted', '{\"n\": 5}')::text",
                &[],
            )
            .await
            .expect("emit");
        row.get::<_, String>(0)
    };

    // Then the committed ones arrive in commit order, the ghosts never
    let js = nats.jetstream().await;
    // (a delivered ghost would stand before `last` in commit order and break this)
    let msgs = read_at_least(&js, "OUTBOX", 5).await;
    let ids = ce_ids(&msgs);
    let mut expected = vec![table_id.as_str()];
    expected.extend(tx_ids.iter().map(String::as_str));
    expected.push(&last);
    assert_eq!(ids, expected);
    // as the same CloudEvents a table row gives
    let emitted = &msgs[1];
    assert_eq!(emitted.subject, "outbox.Order");
    assert_eq!(emitted.header("ce-type"), Some("Emitted"));
    assert_eq!(emitted.header("ce-subject"), Some("o-1"));
    assert_eq!(emitted.header("ce-correlationid"), Some("flow-1"));
    assert_eq!(emitted.header("ce-causationid"), emitted.header("ce-id"));
    // the payload's bytes as the envelope carries them (jsonb's text form), unchanged
    assert_eq!(&emitted.payload[..], br#"{"n": 2}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_and_delete_in_one_transaction_still_delivers() {
    let (pg, nats, _, _relay) = streaming(&[]).await;

    // Given an application that deletes its outbox row in the same transaction
    let id: String = {
        let mut c = pg.client().await;
        let tx = c.transaction().await.expect("begin");
        let id: String = tx
            .query_one(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
                 VALUES ('Order', 'o-9', 'Placed', '{}') RETURNING id::text",
                &[],
            )
            .await
            .expect("insert")
            .get(0);
        tx.execute("DELETE FROM outbox WHERE id = $1::text::uuid", &[&id])
            .await
            .expect("delete");
        tx.commit().await.expect("commit");
        id
    };

    // Then the event is delivered (the WAL carries the insert), and the table is empty
    let msgs = read_at_least(&nats.jetstream().await, "OUTBOX", 1).await;
    assert_eq!(msgs[0].header("ce-id"), Some(id.as_str()));
    let left: i64 = pg
        .client()
        .await
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 0);
}
