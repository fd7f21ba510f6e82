//! Black-box: the initial snapshot (`postgres.initial_snapshot`) against real
//! Postgres and nats-server: rows already in the table plus rows written while the
//! slot is created arrive exactly once and in per-aggregate order, also with two
//! instances racing to create the slot; a SIGKILL during the snapshot is survived;
//! it is the default, so an application that writes while outboxd first starts loses
//! nothing; with the opt-out, old rows stay unpublished.

use crate::support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use support::{
    assert_delivered_once, assert_per_aggregate_order, config, free_port, metric_sum, read_stream,
    scrape, scraped, stream_len, wait_for, Nats, Postgres, Relay,
};

/// Inserts one row of `aggregate` with payload `{"n": n}` and `created_at` from the
/// clock (not the transaction start), so the snapshot's order proxy follows insert
/// order also for rows of one transaction.
const INSERT: &str =
    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at) \
     VALUES ('Order', $1, 'OrderUpdated', jsonb_build_object('n', $2::bigint), clock_timestamp())";

/// A JetStream stream whose duplicate window is short, so dedup by `Nats-Msg-Id`
/// cannot hide a double sent seconds apart (and doubles within it show up in
/// `outboxd_duplicates_total`).
async fn short_dedup_stream(js: &jetstream::Context) {
    js.create_stream(jetstream::stream::Config {
        name: "OUTBOX".into(),
        subjects: vec!["outbox.>".into()],
        duplicate_window: Duration::from_millis(500),
        ..Default::default()
    })
    .await
    .expect("create stream");
}

/// Writes transactions until `stop`: one or two rows each (sometimes with a pause
/// inside, so transactions are open while the slot is created), aggregates
/// `<prefix>-0..3`, `n` rising with commit order.
fn writer(
    pg: &Postgres,
    prefix: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<i64> {
    let url = pg.url();
    tokio::spawn(async move {
        let (mut db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("writer connects");
        tokio::spawn(conn);
        let mut n = 1_000i64;
        while !stop.load(Ordering::Relaxed) {
            let agg = format!("{prefix}-{}", n % 4);
            let tx = db.transaction().await.expect("begin");
            tx.execute(INSERT, &[&agg, &n]).await.expect("insert");
            n += 1;
            if n % 3 == 0 {
                tx.execute("SELECT pg_sleep(0.02)", &[])
                    .await
                    .expect("pause");
                tx.execute(INSERT, &[&agg, &n]).await.expect("insert");
                n += 1;
            }
            tx.commit().await.expect("commit");
        }
        n
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_stream_deliver_every_row_exactly_once_in_order() {
    let pg = Postgres::start();
    pg.create_outbox().await;
    let nats = Nats::start();
    let js = nats.jetstream().await;
    short_dedup_stream(&js).await;

    // Given 300 rows committed before outboxd ever ran
    let db = pg.client().await;
    for n in 0..300i64 {
        let agg = format!("pre-{}", n % 7);
        db.execute(INSERT, &[&agg, &n]).await.expect("insert");
    }
    // and two writers committing while outboxd starts and creates the slot
    let stop = Arc::new(AtomicBool::new(false));
    let writers = [
        writer(&pg, "w1", stop.clone()),
        writer(&pg, "w2", stop.clone()),
    ];
    tokio::time::sleep(Duration::from_millis(300)).await;

    // When two instances with initial_snapshot start at the same time
    let ports = [free_port(), free_port()];
    let relays: Vec<Relay> = ports
        .iter()
        .map(|port| {
            Relay::spawn(&config(
                &pg,
                Some(&nats),
                &[
                    ("postgres", "initial_snapshot", "true"),
                    ("postgres", "standby_poll_ms", "200"),
                    ("http", "listen", &format!("\"127.0.0.1:{port}\"")),
                ],
            ))
        })
        .collect();
    pg.wait_streaming("outboxd").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }

    // Then every committed row arrives: wait until the slot confirmed past the last write
    let expected = pg.outbox_ids().await;
    let end = pg.current_lsn().await;
    assert!(
        wait_for(Duration::from_secs(60), || async {
            pg.confirmed_lsn("outboxd").await.unwrap_or(0) >= end
                && stream_len(&js, "OUTBOX").await >= expected.len() as u64
        })
        .await,
        "not everything arrived: {} of {}",
        stream_len(&js, "OUTBOX").await,
        expected.len()
    );
    // (counted as messages, not unique ids: a double anywhere fails)
    let msgs = read_stream(&js, "OUTBOX").await;
    assert_delivered_once(&msgs, &expected);
    assert_per_aggregate_order(&msgs);
    let texts: Vec<String> = ports.iter().map(|p| scrape(*p)).collect();
    let duplicates: f64 = texts
        .iter()
        .map(|t| metric_sum(t, "outboxd_duplicates_total"))
        .sum();
    assert_eq!(
        duplicates, 0.0,
        "the broker saw a double within its dedup window"
    );
    // exactly one instance took the snapshot, and it covered at least the old rows
    let snapshots: Vec<f64> = texts
        .iter()
        .map(|t| metric_sum(t, "outboxd_snapshot_events_total"))
        .collect();
    assert!(
        snapshots.iter().filter(|s| **s > 0.0).count() == 1
            && snapshots.iter().sum::<f64>() >= 300.0,
        "snapshot events per instance: {snapshots:?}"
    );
    // and only the permanent slot is left
    assert!(
        slots_become(&pg, 1, Duration::from_secs(10)).await,
        "the temporary slot outlived its session"
    );
    drop(relays);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_the_snapshot_redoes_it_and_loses_nothing() {
    let pg = Postgres::start();
    pg.create_outbox().await;
    let nats = Nats::start();
    let js = nats.jetstream().await;

    // Given a backlog large enough to take a while, over few aggregates
    const BACKLOG: i64 = 30_000;
    insert_backlog(&pg, BACKLOG).await;
    let port = free_port();
    let cfg = config(
        &pg,
        Some(&nats),
        &[
            ("postgres", "initial_snapshot", "true"),
            ("http", "listen", &format!("\"127.0.0.1:{port}\"")),
        ],
    );

    // When outboxd is killed with SIGKILL in the middle of the snapshot
    let mut relay = Relay::spawn(&cfg);
    assert!(
        wait_for(Duration::from_secs(60), || async {
            scraped(port, |t| {
                metric_sum(t, "outboxd_snapshot_events_total") >= 2_000.0
            })
        })
        .await,
        "the snapshot did not start"
    );
    assert_eq!(
        pg.confirmed_lsn("outboxd").await,
        None,
        "the snapshot finished before the kill: grow BACKLOG"
    );
    relay.kill();
    let published_before = stream_len(&js, "OUTBOX").await;
    assert!(published_before < BACKLOG as u64);
    // the temporary slot goes with its session, and no permanent slot exists
    assert!(
        slots_become(&pg, 0, Duration::from_secs(30)).await,
        "a slot survived the killed snapshot"
    );

    // Then a restart takes the snapshot again, creates the slot and streams on
    relay.start();
    pg.wait_streaming("outboxd").await;
    let db = pg.client().await;
    for n in 0..10i64 {
        db.execute(INSERT, &[&"after", &n]).await.expect("insert");
    }
    let expected = pg.outbox_ids().await;
    assert!(
        wait_for(Duration::from_secs(120), || async {
            stream_len(&js, "OUTBOX").await >= expected.len() as u64
        })
        .await,
        "only {} of {} arrived",
        stream_len(&js, "OUTBOX").await,
        expected.len()
    );
    // every row at least once (JetStream's 2-minute window drops the resent ids)
    let msgs = read_stream(&js, "OUTBOX").await;
    let seen: std::collections::HashSet<String> = msgs
        .iter()
        .map(|m| m.header("ce-id").expect("ce-id").to_string())
        .collect();
    let missing = expected.difference(&seen).count();
    assert_eq!(missing, 0, "{missing} rows never arrived");
    // the second snapshot covered the whole backlog again
    let text = scrape(port);
    assert_eq!(
        metric_sum(&text, "outboxd_snapshot_events_total"),
        BACKLOG as f64
    );
    assert!(
        pg.confirmed_lsn("outboxd").await.is_some(),
        "no permanent slot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_initial_snapshot_old_rows_stay_unpublished() {
    let pg = Postgres::start();
    pg.create_outbox().await;
    let nats = Nats::start();
    let js = nats.jetstream().await;
    // Given rows written before the slot exists
    let db = pg.client().await;
    for n in 0..20i64 {
        db.execute(INSERT, &[&"old", &n]).await.expect("insert");
    }
    let old = pg.outbox_ids().await;

    // When outboxd starts with the opt-out (initial_snapshot = false, as when another
    // relay published those rows before)
    let port = free_port();
    let _relay = Relay::spawn(&config(
        &pg,
        Some(&nats),
        &[
            ("http", "listen", &format!("\"127.0.0.1:{port}\"")),
            ("postgres", "initial_snapshot", "false"),
        ],
    ));
    pg.wait_streaming("outboxd").await;
    for n in 0..5i64 {
        db.execute(INSERT, &[&"new", &n]).await.expect("insert");
    }

    // Then only rows committed after the slot was created arrive
    let new: std::collections::HashSet<String> =
        pg.outbox_ids().await.difference(&old).cloned().collect();
    assert!(
        wait_for(Duration::from_secs(30), || async {
            stream_len(&js, "OUTBOX").await >= 5
        })
        .await
    );
    let msgs = read_stream(&js, "OUTBOX").await;
    assert_delivered_once(&msgs, &new);
    assert_eq!(
        metric_sum(&scrape(port), "outboxd_snapshot_events_total"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_row_in_the_snapshot_follows_the_poison_policy() {
    let pg = Postgres::start();
    pg.create_outbox().await;
    let nats = Nats::start();
    let js = nats.jetstream().await;
    // Given a valid row and one without an event type, written before the slot exists
    let db = pg.client().await;
    db.execute(INSERT, &[&"a", &1i64]).await.expect("insert");
    let bad: String = db
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             VALUES ('Order', 'a', '', '{}') RETURNING id::text",
            &[],
        )
        .await
        .expect("insert")
        .get(0);

    // When outboxd snapshots with the default policy (dead_letter)
    let _relay = Relay::spawn(&config(
        &pg,
        Some(&nats),
        &[("postgres", "initial_snapshot", "true")],
    ));

    // Then the valid row is an event and the invalid one a dead letter, in that order
    assert!(
        wait_for(Duration::from_secs(30), || async {
            stream_len(&js, "OUTBOX").await >= 2
        })
        .await
    );
    let msgs = read_stream(&js, "OUTBOX").await;
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0].header("ce-type"), Some("OrderUpdated"));
    assert_eq!(msgs[1].subject, "outbox.deadletter");
    assert_eq!(msgs[1].header("ce-id"), Some(bad.as_str()));
    assert_eq!(msgs[1].header("ce-type"), Some("io.outboxd.deadletter"));
    pg.wait_streaming("outboxd").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_whose_replication_session_ends_is_taken_again() {
    let pg = Postgres::start();
    pg.create_outbox().await;
    let nats = Nats::start();
    let js = nats.jetstream().await;
    const BACKLOG: i64 = 20_000;
    insert_backlog(&pg, BACKLOG).await;
    let port = free_port();
    let mut relay = Relay::spawn(&config(
        &pg,
        Some(&nats),
        &[
            ("postgres", "initial_snapshot", "true"),
            ("http", "listen", &format!("\"127.0.0.1:{port}\"")),
        ],
    ));
    assert!(
        wait_for(Duration::from_secs(60), || async {
            scraped(port, |t| {
                metric_sum(t, "outboxd_snapshot_events_total") >= 1_000.0
            })
        })
        .await,
        "the snapshot did not start"
    );

    // When the session holding the temporary slot ends in the middle of the snapshot
    let ended: i64 = pg
        .client()
        .await
        .query_one(
            "SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots \
             WHERE temporary AND active_pid IS NOT NULL",
            &[],
        )
        .await
        .expect("terminate")
        .get(0);
    assert_eq!(
        ended, 1,
        "no temporary slot in use: the snapshot finished too early"
    );

    // Then outboxd notices at the copy, takes the snapshot again, and streams
    pg.wait_streaming("outboxd").await;
    assert!(
        relay.try_exit().is_none(),
        "outboxd stopped: {}",
        relay.stderr()
    );
    assert!(
        metric_sum(&scrape(port), "outboxd_snapshot_events_total") >= (2 * BACKLOG) as f64,
        "the snapshot was not taken again"
    );
    let expected = pg.outbox_ids().await;
    assert!(
        wait_for(Duration::from_secs(60), || async {
            stream_len(&js, "OUTBOX").await >= expected.len() as u64
        })
        .await
    );
    let msgs = read_stream(&js, "OUTBOX").await;
    let seen: std::collections::HashSet<&str> = msgs
        .iter()
        .map(|m| m.header("ce-id").expect("ce-id"))
        .collect();
    assert!(expected.iter().all(|id| seen.contains(id.as_str())));
}

/// Commits `n` rows over 3 aggregates in one transaction, `payload.n` = 1..=n in
/// `created_at` order.
async fn insert_backlog(pg: &Postgres, n: i64) {
    pg.client()
        .await
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at) \
             SELECT 'Order', 'agg-' || (n % 3), 'OrderUpdated', jsonb_build_object('n', n), \
                    now() + n * interval '1 microsecond' \
             FROM generate_series(1, $1::bigint) AS n",
            &[&n],
        )
        .await
        .expect("backlog");
}

/// Whether the number of replication slots becomes `n` within `timeout`.
async fn slots_become(pg: &Postgres, n: i64, timeout: Duration) -> bool {
    wait_for(timeout, || async {
        pg.client()
            .await
            .query_one("SELECT count(*) FROM pg_replication_slots", &[])
            .await
            .expect("slots")
            .get::<_, i64>(0)
            == n
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_started_just_before_the_first_start_loses_nothing_by_default() {
    // Given an application that starts writing a moment before outboxd first starts
    // (a first rollout), with the default configuration
    let pg = Postgres::start();
    pg.create_outbox().await;
    let nats = Nats::start();
    let js = nats.jetstream().await;
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(&pg, "w", stop.clone());
    assert!(
        wait_for(Duration::from_secs(30), || async {
            pg.outbox_ids().await.len() >= 50
        })
        .await
    );
    let _relay = Relay::spawn(&config(&pg, Some(&nats), &[]));
    pg.wait_streaming("outboxd").await;
    // When it keeps writing for a while after the relay streams
    let streaming_at = pg.outbox_ids().await.len();
    assert!(
        wait_for(Duration::from_secs(30), || async {
            pg.outbox_ids().await.len() >= streaming_at + 50
        })
        .await
    );
    stop.store(true, Ordering::Relaxed);
    w.await.expect("writer");

    // Then every committed row arrives exactly once, in order per aggregate
    let all = pg.outbox_ids().await;
    assert!(
        wait_for(Duration::from_secs(60), || async {
            stream_len(&js, "OUTBOX").await >= all.len() as u64
        })
        .await,
        "{} of {} arrived",
        stream_len(&js, "OUTBOX").await,
        all.len()
    );
    let msgs = read_stream(&js, "OUTBOX").await;
    assert_delivered_once(&msgs, &all);
    assert_per_aggregate_order(&msgs);
}
