//! Black-box: retention (`[retention]`) against real Postgres and nats-server. The
//! streaming instance deletes delivered rows older than the retention, in batches,
//! and keeps newer and unacknowledged ones; a standby deletes nothing; deletes are
//! never published; a missing DELETE privilege is logged with its fix while
//! relaying goes on.

use crate::support;

use std::collections::HashSet;
use std::time::Duration;

use support::faults::relay_log_lines;
use support::{
    config, free_port, metric_sum, read_stream, scrape, scraped, stream_len, wait_for, Nats,
    Postgres, Relay,
};

/// Inserts a row of `aggregate` created `age_secs` ago; returns its id.
async fn insert_aged(db: &tokio_postgres::Client, aggregate: &str, age_secs: f64) -> String {
    db.query_one(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at) \
         VALUES ('Order', $1, 'OrderUpdated', '{}', now() - make_interval(secs => $2::float8)) \
         RETURNING id::text",
        &[&aggregate, &age_secs],
    )
    .await
    .expect("insert")
    .get(0)
}

fn retention_config(
    pg: &Postgres,
    nats: &Nats,
    port: u16,
    older_than_secs: &str,
    extra: &[(&str, &str, &str)],
) -> String {
    let listen = format!("\"127.0.0.1:{port}\"");
    let mut o = vec![
        ("retention", "enabled", "true"),
        ("retention", "older_than_secs", older_than_secs),
        ("retention", "interval_secs", "1"),
        ("retention", "batch_size", "2"),
        ("postgres", "heartbeat_interval_secs", "1"),
        ("postgres", "standby_poll_ms", "200"),
        ("http", "listen", listen.as_str()),
    ];
    o.extend_from_slice(extra);
    config(pg, Some(nats), &o)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_old_rows_are_deleted_new_rows_kept_and_standbys_delete_nothing() {
    let pg = Postgres::start();
    pg.create_outbox().await;
    let nats = Nats::start();
    let js = nats.jetstream().await;
    // Given a streaming instance and a standby, retention one hour
    let (p1, p2) = (free_port(), free_port());
    let leader = Relay::spawn(&retention_config(&pg, &nats, p1, "3600", &[]));
    pg.wait_streaming("outboxd").await;
    let _standby = Relay::spawn(&retention_config(&pg, &nats, p2, "3600", &[]));
    assert!(
        wait_for(Duration::from_secs(30), || async {
            support::http_get(p2, "/status").is_some_and(|(_, b)| b.contains("\"standby\""))
        })
        .await,
        "second instance is not a standby"
    );

    // When rows two hours old and fresh rows are committed
    let db = pg.client().await;
    let mut old = HashSet::new();
    for i in 0..7 {
        old.insert(insert_aged(&db, &format!("o-{i}"), 7200.0).await);
    }
    let mut new = HashSet::new();
    for i in 0..3 {
        new.insert(insert_aged(&db, &format!("n-{i}"), 0.0).await);
    }

    // Then every row is delivered, the old ones are deleted (in batches of 2)
    assert!(
        wait_for(Duration::from_secs(30), || async {
            pg.outbox_ids().await.is_disjoint(&old)
        })
        .await,
        "old rows were not deleted"
    );
    let left = pg.outbox_ids().await;
    assert_eq!(left, new, "fresh rows must stay");
    assert_eq!(
        metric_sum(&scrape(p1), "outboxd_retention_deleted_rows_total"),
        7.0
    );
    // in batches of at most 2 (so at least 4 of them)
    let batches: Vec<u64> = relay_log_lines(&leader.stderr(), "retention: deleted a batch")
        .iter()
        .map(|l| {
            l.split("rows=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no rows= in {l}"))
        })
        .collect();
    assert!(
        batches.len() >= 4 && batches.iter().all(|n| *n <= 2) && batches.iter().sum::<u64>() == 7,
        "batches: {batches:?}"
    );
    // the standby deleted nothing
    assert_eq!(
        metric_sum(&scrape(p2), "outboxd_retention_deleted_rows_total"),
        0.0
    );
    // and no delete became an event: a row committed after the deletes arrives
    // right after the ten inserts
    let last = insert_aged(&db, "z", 0.0).await;
    assert!(
        wait_for(Duration::from_secs(30), || async {
            read_stream(&js, "OUTBOX")
                .await
                .iter()
                .any(|m| m.header("ce-id") == Some(last.as_str()))
        })
        .await
    );
    let msgs = read_stream(&js, "OUTBOX").await;
    let ids: HashSet<String> = msgs
        .iter()
        .map(|m| m.header("ce-id").expect("ce-id").to_string())
        .collect();
    assert_eq!(msgs.len(), 11, "only the inserts are events");
    assert!(ids.is_superset(&old) && ids.is_superset(&new));
    assert!(msgs
        .iter()
        .all(|m| m.header("ce-type") == Some("OrderUpdated")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_rows_are_kept_until_the_broker_confirms_them() {
    let pg = Postgres::start();
    pg.create_outbox().await;
    let mut nats = Nats::start();
    let js = nats.jetstream().await;
    // Given retention of one second
    let port = free_port();
    // (no heartbeats: a heartbeat committing while the pending row's transaction is
    // open would legitimately move the watermark past its created_at)
    let _relay = Relay::spawn(&retention_config(
        &pg,
        &nats,
        port,
        "1",
        &[("postgres", "heartbeat_interval_secs", "0")],
    ));
    pg.wait_streaming("outboxd").await;
    let db = pg.client().await;
    let first = insert_aged(&db, "a", 0.0).await;
    assert!(
        wait_for(Duration::from_secs(30), || async {
            !pg.outbox_ids().await.contains(&first)
        })
        .await,
        "a delivered row older than the retention was not deleted"
    );

    // When a row is delivered, the broker goes down and another row is committed
    let delivered = insert_aged(&db, "c", 0.0).await;
    assert!(
        wait_for(Duration::from_secs(30), || async {
            read_stream(&js, "OUTBOX")
                .await
                .iter()
                .any(|m| m.header("ce-id") == Some(delivered.as_str()))
        })
        .await,
        "the row before the outage was not delivered"
    );
    nats.stop();
    let pending = insert_aged(&db, "b", 0.0).await;

    // Then retention goes on during the outage: the delivered row is deleted once
    // older than the retention (so the check below is not passed by a retention that
    // stopped running)
    assert!(
        wait_for(Duration::from_secs(30), || async {
            !pg.outbox_ids().await.contains(&delivered)
        })
        .await,
        "retention deleted nothing during the outage"
    );
    // and the unacknowledged row stays in the table, although older than the retention
    assert!(
        !wait_for(Duration::from_secs(4), || async {
            !pg.outbox_ids().await.contains(&pending)
        })
        .await,
        "an unacknowledged row was deleted"
    );
    // and once the broker is back it is delivered, then deleted
    nats.resume();
    assert!(
        wait_for(Duration::from_secs(60), || async {
            !pg.outbox_ids().await.contains(&pending)
        })
        .await,
        "the row was not deleted after its ack"
    );
    let js2 = nats.jetstream().await;
    let msgs = read_stream(&js2, "OUTBOX").await;
    assert!(msgs
        .iter()
        .any(|m| m.header("ce-id") == Some(pending.as_str())));
    drop(js);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_delete_privilege_is_logged_and_relaying_goes_on() {
    let pg = Postgres::start();
    pg.create_outbox().await;
    // Given a role that may read and replicate, but not delete
    pg.client()
        .await
        .batch_execute(
            "CREATE ROLE relay LOGIN REPLICATION;
             GRANT SELECT ON public.outbox TO relay;
             CREATE PUBLICATION outboxd FOR TABLE public.outbox WITH (publish = 'insert');",
        )
        .await
        .expect("role");
    let nats = Nats::start();
    let js = nats.jetstream().await;
    let port = free_port();
    let url = pg
        .url()
        .replace("postgres://postgres@", "postgres://relay@");
    let relay = Relay::spawn(&retention_config(
        &pg,
        &nats,
        port,
        "0",
        &[("postgres", "url", &format!("\"{url}\""))],
    ));
    pg.wait_streaming("outboxd").await;

    // When rows are committed and retention tries to delete them
    let db = pg.client().await;
    let a = insert_aged(&db, "a", 10.0).await;
    assert!(
        wait_for(Duration::from_secs(30), || async {
            scraped(port, |t| {
                metric_sum(t, "outboxd_retention_errors_total") >= 1.0
            })
        })
        .await,
        "no retention error counted"
    );

    // Then the fix is logged, the rows stay, and relaying goes on
    assert!(
        relay
            .stderr()
            .contains("GRANT DELETE ON public.outbox TO relay"),
        "{}",
        relay.stderr()
    );
    let b = insert_aged(&db, "b", 10.0).await;
    assert!(
        wait_for(Duration::from_secs(30), || async {
            stream_len(&js, "OUTBOX").await >= 2
        })
        .await
    );
    let ids: HashSet<String> = read_stream(&js, "OUTBOX")
        .await
        .iter()
        .map(|m| m.header("ce-id").expect("ce-id").to_string())
        .collect();
    assert!(ids.contains(&a) && ids.contains(&b));
    assert!(pg.outbox_ids().await.contains(&a));
    // and `outboxd check` names the same fix
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["check", "--config"])
        .arg(relay.config_path())
        .output()
        .expect("check");
    let report = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{report}");
    assert!(
        report
            .lines()
            .any(|l| l.contains("FAIL") && l.contains("GRANT DELETE ON public.outbox")),
        "{report}"
    );
}
