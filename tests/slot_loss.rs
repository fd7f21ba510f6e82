//! Black-box: a replication slot that was invalidated or dropped is never replaced
//! silently (that would hide a gap); `--allow-new-slot` accepts the gap explicitly.

use crate::support;

use std::time::Duration;

use support::{config, wait_for, Nats, Postgres, Relay};

async fn wal_status(pg: &Postgres) -> Option<String> {
    pg.client()
        .await
        .query_opt(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'outboxd'",
            &[],
        )
        .await
        .expect("query")
        .and_then(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidated_slot_stops_the_relay_until_the_gap_is_accepted() {
    let pg = Postgres::start();
    pg.create_outbox().await;
    let db = pg.client().await;
    for sql in [
        "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'",
        "SELECT pg_reload_conf()",
        "CREATE TABLE noise (body text)",
    ] {
        db.batch_execute(sql).await.expect("setup");
    }
    let nats = Nats::start();
    let cfg = config(&pg, Some(&nats), &[]);
    let mut relay = Relay::spawn(&cfg);
    pg.wait_streaming("outboxd").await;
    relay.terminate(Duration::from_secs(20)).expect("stops");

    // Given the slot is invalidated while no relay streams (WAL beyond max_slot_wal_keep_size)
    assert!(
        wait_for(Duration::from_secs(60), || async {
            for sql in [
                "INSERT INTO noise SELECT repeat('x', 1000) FROM generate_series(1, 3000)",
                "SELECT pg_switch_wal()",
                "CHECKPOINT",
            ] {
                db.batch_execute(sql).await.expect("noise");
            }
            wal_status(&pg).await.as_deref() == Some("lost")
        })
        .await,
        "slot not invalidated: {:?}",
        wal_status(&pg).await
    );

    // When the relay starts, then it stops with what happened and how to recover
    let mut relay = Relay::spawn(&cfg);
    let status = relay
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exits");
    assert!(!status.success());
    let err = relay.stderr();
    assert!(
        err.contains("invalidated") && err.contains("--allow-new-slot"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        wal_status(&pg).await.as_deref(),
        Some("lost"),
        "the old slot is left for inspection"
    );

    // When the operator accepts the gap, then a new slot streams again
    let _relay = Relay::spawn_with_args(&cfg, &["--allow-new-slot"]);
    pg.wait_streaming("outboxd").await;
    assert_ne!(wal_status(&pg).await.as_deref(), Some("lost"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_dropped_while_streaming_is_not_recreated() {
    let pg = Postgres::start();
    pg.create_outbox().await;
    let nats = Nats::start();
    let mut relay = Relay::spawn(&config(&pg, Some(&nats), &[]));
    pg.wait_streaming("outboxd").await;

    // Given an operator (or a failover) removes the slot under the running relay
    let db = pg.client().await;
    assert!(
        wait_for(Duration::from_secs(20), || async {
            let _ = db
                .execute(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                     WHERE slot_name = 'outboxd' AND active_pid IS NOT NULL",
                    &[],
                )
                .await;
            db.execute("SELECT pg_drop_replication_slot('outboxd')", &[])
                .await
                .is_ok()
        })
        .await,
        "could not drop the slot"
    );

    // Then the relay does not create a new one: it stops and says why
    let status = relay
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exits");
    assert!(!status.success());
    let err = relay.stderr();
    assert!(
        err.contains("disappeared while outboxd was streaming"),
        "{err}"
    );
    assert_eq!(pg.confirmed_lsn("outboxd").await, None, "no new slot");
}
