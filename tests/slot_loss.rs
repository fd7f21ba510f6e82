//! Black-box: a replication slot that was invalidated or dropped, or a publication
//! created again under it, is never replaced silently (that would hide a gap): the
//! relay waits for an operator (alive, not ready, saying what happened and what
//! recovers), across plain restarts too, because the slot's record lives in the
//! database; `--allow-new-slot` creates a new slot and first republishes the gap.

use crate::support;

use std::time::Duration;

use support::faults::{blocked, drop_slot};
use support::secure::outboxd;
use support::streaming::{insert_events, read_at_least, streaming, wait_stream_len};
use support::{insert_event, read_stream, stream_len, wait_for, Postgres, Relay};

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
    let (pg, _nats, cfg, mut relay) = streaming(&[]).await;
    let db = pg.client().await;
    for sql in [
        "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'",
        "SELECT pg_reload_conf()",
        "CREATE TABLE noise (body text)",
    ] {
        db.batch_execute(sql).await.expect("setup");
    }
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

    // When the relay starts, then it waits for an operator, saying what happened and
    // how to recover
    let mut relay = Relay::spawn(&cfg);
    let problem = blocked(&cfg).await;
    assert!(
        problem.contains("invalidated") && problem.contains("--allow-new-slot"),
        "{problem}"
    );
    let err = relay.stderr();
    assert!(!err.contains("panicked"), "{err}");
    relay.terminate(Duration::from_secs(20)).expect("stops");
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
    let (pg, _nats, cfg, mut relay) = streaming(&[]).await;

    // Given an operator (or a failover) removes the slot under the running relay
    drop_slot(&pg).await;

    // Then the relay does not create a new one: it waits for an operator and says why
    let problem = blocked(&cfg).await;
    assert!(
        problem.contains("is gone") && problem.contains("--allow-new-slot"),
        "{problem}"
    );
    assert_eq!(pg.confirmed_lsn("outboxd").await, None, "no new slot");
    assert!(relay.try_exit().is_none(), "{}", relay.stderr());
}

/// The `N` of the `outboxd replay --since-xid N` that `problem` names.
fn since_xid(problem: &str) -> String {
    problem
        .split("--since-xid ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| panic!("no --since-xid in {problem}"))
        .to_string()
}

/// Runs `outboxd replay` with `cfg` and `args`; its stdout.
fn replay(cfg: &str, args: &[&str]) -> String {
    let mut all = vec!["replay"];
    all.extend_from_slice(args);
    let out = outboxd(Some(cfg), &all, &[]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    out.stdout
}

/// Waits until the slot's record holds a `replay_from_xid` newer than every row of the
/// outbox (the monitor has seen the slot pass them).
async fn record_past_rows(pg: &Postgres) {
    assert!(
        wait_for(Duration::from_secs(60), || async {
            pg.client()
                .await
                .query_one(
                    "SELECT coalesce((SELECT replay_from_xid::text::bigint FROM outboxd_slots) \
                              > (SELECT max(xmin::text::bigint) FROM outbox), false)",
                    &[],
                )
                .await
                .expect("record")
                .get::<_, bool>(0)
        })
        .await,
        "the record never passed the delivered rows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_restart_after_slot_loss_refuses_and_the_switch_republishes_the_gap() {
    // Given a relay that delivered 5 events, and whose slot record has passed them
    let (pg, nats, cfg, mut relay) = streaming(&[("postgres", "monitor_interval_secs", "1")]).await;
    let db = pg.client().await;
    let mut before = Vec::new();
    for n in 1..=5 {
        before.push(
            insert_event(&db, &format!("a-{}", n % 2), n)
                .await
                .expect("insert"),
        );
    }
    let js = nats.jetstream().await;
    assert!(wait_stream_len(&js, "OUTBOX", 5).await);
    record_past_rows(&pg).await;

    // When the relay stops, its slot is dropped, and 7 rows are committed meanwhile
    relay.kill();
    drop_slot(&pg).await;
    let mut gap = Vec::new();
    for n in 6..=12 {
        gap.push(
            insert_event(&db, &format!("a-{}", n % 3), n)
                .await
                .expect("insert"),
        );
    }

    // Then a plain restart refuses: no new slot, not ready, and it names the recovery
    let mut relay = Relay::spawn(&cfg);
    let problem = blocked(&cfg).await;
    assert!(
        problem.contains("is gone")
            && problem.contains("confirmed up to")
            && problem.contains("--allow-new-slot"),
        "{problem}"
    );
    assert_eq!(pg.confirmed_lsn("outboxd").await, None, "no new slot");
    let err = relay.stderr();
    assert!(
        support::faults::relay_log_lines(&err, "waits for an operator").len() == 1,
        "{err}"
    );
    // and the replay it names selects exactly the gap
    let xid = since_xid(&problem);
    let dry = replay(&cfg, &["--since-xid", &xid, "--dry-run"]);
    assert!(dry.contains("7 rows matched"), "{dry}");
    for id in &gap {
        assert!(dry.contains(id.as_str()), "{id} not in {dry}");
    }
    relay.terminate(Duration::from_secs(20)).expect("stops");

    // When the operator restarts it with --allow-new-slot
    let _relay = Relay::spawn_with_args(&cfg, &["--allow-new-slot"]);
    pg.wait_streaming("outboxd").await;
    let later = insert_event(&db, "a-1", 13).await.expect("insert");

    // Then every gap row arrives once, then the later one, in order per aggregate
    let msgs = read_at_least(&js, "OUTBOX", 13).await;
    let expected: std::collections::HashSet<String> =
        before.into_iter().chain(gap).chain([later]).collect();
    support::assert_delivered_once(&msgs, &expected);
    support::assert_per_aggregate_order(&msgs);
    // and the printed replay, run as well (it now also selects the later row), only
    // repeats ids that JetStream deduplicates
    let replayed = replay(&cfg, &["--since-xid", &xid]);
    assert!(replayed.contains("published 8"), "{replayed}");
    assert_eq!(stream_len(&js, "OUTBOX").await, 13);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_created_again_is_caught_by_check_and_the_gap_recovered() {
    // Given a relay that delivered 3 events
    let (pg, nats, cfg, relay) = streaming(&[("postgres", "monitor_interval_secs", "1")]).await;
    let db = pg.client().await;
    let mut expected: std::collections::HashSet<String> =
        insert_events(&db, "p-1", 1..=3).await.into_iter().collect();
    let js = nats.jetstream().await;
    assert!(wait_stream_len(&js, "OUTBOX", 3).await);
    record_past_rows(&pg).await;

    // When the publication is dropped and created again while it streams, and rows
    // are committed around that
    expected.insert(insert_event(&db, "p-1", 4).await.expect("insert"));
    db.batch_execute("DROP PUBLICATION outboxd")
        .await
        .expect("drop");
    expected.insert(insert_event(&db, "p-2", 1).await.expect("insert"));
    db.batch_execute(
        "CREATE PUBLICATION outboxd FOR TABLE public.outbox WITH (publish = 'insert')",
    )
    .await
    .expect("create");
    expected.insert(insert_event(&db, "p-1", 5).await.expect("insert"));

    // Then the relay notices and waits for an operator
    let problem = blocked(&cfg).await;
    assert!(
        problem.contains("publication outboxd was dropped and created again")
            && problem.contains("--allow-new-slot"),
        "{problem}"
    );
    drop(relay);
    // and `check` fails on it with the same recovery
    let out = outboxd(Some(&cfg), &["check"], &[]);
    let said = out.stdout.clone();
    assert_eq!(out.code, Some(1), "{}", out.all());
    let line = said
        .lines()
        .find(|l| l.contains("slot record"))
        .unwrap_or_else(|| panic!("no slot record check: {said}"));
    assert!(
        line.contains("FAIL") && line.contains("--allow-new-slot"),
        "{line}"
    );

    // When the operator starts it with --allow-new-slot
    let _relay = Relay::spawn_with_args(&cfg, &["--allow-new-slot"]);
    pg.wait_streaming("outboxd").await;
    expected.insert(insert_event(&db, "p-2", 2).await.expect("insert"));

    // Then every committed row is in the stream, in order per aggregate
    assert!(
        wait_for(Duration::from_secs(30), || async {
            let ids: std::collections::HashSet<String> = read_stream(&js, "OUTBOX")
                .await
                .iter()
                .filter_map(|m| m.header("ce-id").map(str::to_string))
                .collect();
            expected.is_subset(&ids)
        })
        .await,
        "missing events"
    );
    support::assert_per_aggregate_order(&read_stream(&js, "OUTBOX").await);
}
