//! Black-box fault injection (issue 5, README "Failure behaviour"): the real
//! nats-server, Postgres and outboxd processes are stopped, restarted, killed, or have
//! their backends terminated while rows commit; then every committed row must be in
//! the stream exactly once, each aggregate's events in commit order. The edge cases at
//! the end check that a misconfigured start names the problem and its fix.
//!
//! Writers put `{"n": n}` in every payload with `n` growing in commit order, so the
//! order of an aggregate's events can be read back from the stream; the set of
//! committed ids comes from the table itself, never from what a writer believes.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{
    assert_delivered_once, assert_per_aggregate_order, config, free_port, insert_event, metric,
    metric_sum, read_stream, scrape, seed, stream_len, wait_for, Nats, Postgres, Relay, SplitMix64,
};

const STREAM: &str = "OUTBOX";
const SLOT: &str = "outboxd";
const PG_RECONNECTS: &str = r#"outboxd_reconnects_total{component="postgres"}"#;

// ---------------------------------------------------------------------------------
// Broker outage
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_longer_than_wal_sender_timeout() {
    const CAP: f64 = 50.0;
    const OUTAGE: Duration = Duration::from_secs(10);
    // Given a server that drops a replication connection silent for 3 s
    let pg = Postgres::start_with_settings(&[("wal_sender_timeout", "3s")]);
    assert_eq!(pg.show("wal_sender_timeout").await, "3s");
    pg.create_outbox().await;
    let mut nats = Nats::start();
    let port = free_port();
    let listen = format!("\"127.0.0.1:{port}\"");
    let _relay = Relay::spawn(&config(
        &pg,
        Some(&nats),
        &[
            ("http", "listen", &listen),
            ("sink", "max_in_flight", "50"),
            ("nats", "ack_timeout_ms", "500"),
            ("postgres", "monitor_interval_secs", "1"),
        ],
    ));
    pg.wait_streaming(SLOT).await;
    let walsender = pg.slot_active_pid(SLOT).await.expect("streaming");
    // and 50 events already delivered
    let db = pg.client().await;
    let mut n = 0i64;
    let mut write = |count: usize| {
        let db = &db;
        let first = n + 1;
        n += count as i64;
        async move {
            for n in first..first + count as i64 {
                insert_event(db, &format!("agg-{}", n % 50), n)
                    .await
                    .expect("insert");
            }
        }
    };
    write(50).await;
    let js = nats.jetstream().await;
    assert!(
        wait_for(Duration::from_secs(30), || async {
            stream_len(&js, STREAM).await >= 50
        })
        .await,
        "the first 50 events did not arrive"
    );

    // When the broker is down for longer than wal_sender_timeout while 500 rows commit
    nats.stop();
    let down_since = Instant::now();
    write(500).await;
    let mut peak_in_flight = 0.0f64;
    while down_since.elapsed() < OUTAGE {
        // Then the relay holds at most sink.max_in_flight events
        let text = scrape(port);
        let in_flight = metric(&text, "outboxd_events_in_flight").unwrap_or(0.0);
        assert!(in_flight <= CAP, "{in_flight} events in flight, cap {CAP}");
        peak_in_flight = peak_in_flight.max(in_flight);
        // and keeps its replication connection: no reconnect, the same walsender
        assert_eq!(
            metric(&text, PG_RECONNECTS).unwrap_or(0.0),
            0.0,
            "the replication connection was re-established during the outage"
        );
        assert_eq!(
            pg.slot_active_pid(SLOT).await,
            Some(walsender),
            "the walsender changed after {:?} of outage; server log:\n{}",
            down_since.elapsed(),
            tail(&pg.log(), 20)
        );
        // The outage is the fault being injected; this only paces the observation.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        peak_in_flight, CAP,
        "reading should pause exactly at the cap (held {peak_in_flight})"
    );

    // When the broker is back
    nats.resume();
    let js = nats.jetstream().await;
    // Then every row arrives once, in order per aggregate
    let (marker, before_marker) = commit_marker(&pg).await;
    wait_confirmed_past(&pg, before_marker, Duration::from_secs(60)).await;
    let expected = pg.outbox_ids().await;
    assert_eq!(expected.len(), 551);
    assert!(expected.contains(&marker));
    let msgs = read_stream(&js, STREAM).await;
    assert_delivered_once(&msgs, &expected);
    assert_per_aggregate_order(&msgs);
    // still on the same replication connection
    assert_eq!(metric(&scrape(port), PG_RECONNECTS).unwrap_or(0.0), 0.0);
    assert_eq!(pg.slot_active_pid(SLOT).await, Some(walsender));
}

// ---------------------------------------------------------------------------------
// Postgres restart and lost replication connections
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_mid_stream() {
    // Given a relay streaming and a writer committing 1..=5 rows per transaction
    let pg = Postgres::start();
    pg.create_outbox().await;
    let nats = Nats::start();
    let port = free_port();
    let listen = format!("\"127.0.0.1:{port}\"");
    let mut relay = Relay::spawn(&config(&pg, Some(&nats), &[("http", "listen", &listen)]));
    pg.wait_streaming(SLOT).await;
    let writer = Writer::spawn(pg.url(), 50, 5, Duration::from_millis(5), seed());
    let js = nats.jetstream().await;
    assert!(
        wait_for(Duration::from_secs(30), || async {
            stream_len(&js, STREAM).await >= 300
        })
        .await,
        "stalled before 300 events"
    );

    // When Postgres restarts mid-stream
    tokio::task::block_in_place(|| pg.restart());
    // and the writer gets another 300 rows in afterwards
    let after_restart = writer.committed();
    assert!(
        wait_for(Duration::from_secs(30), || async {
            writer.committed() >= after_restart + 300
        })
        .await,
        "the writer did not recover from the restart"
    );
    let written = writer.finish().await;
    if let Some(status) = relay.try_exit() {
        panic!(
            "the relay exited ({status}) after the restart: {}",
            last_line(&relay.stderr())
        );
    }

    // Then every committed row arrives once, in order per aggregate
    let (marker, before_marker) = commit_marker(&pg).await;
    wait_confirmed_past(&pg, before_marker, Duration::from_secs(60)).await;
    let expected = pg.outbox_ids().await;
    assert_eq!(expected.len(), written.len() + 1, "writer bookkeeping");
    assert!(expected.contains(&marker) && written.is_subset(&expected));
    let msgs = read_stream(&js, STREAM).await;
    assert_delivered_once(&msgs, &expected);
    assert_per_aggregate_order(&msgs);
    // after reconnecting
    assert!(metric(&scrape(port), PG_RECONNECTS).unwrap_or(0.0) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_not_accepting_connections_yet_is_retried() {
    // Given Postgres that is up but not accepting connections yet (as while it starts
    // up or recovers: SQLSTATE 57P03)
    let pg = Postgres::start();
    pg.create_outbox().await;
    tokio::task::block_in_place(|| pg.restart_not_accepting_connections());
    // When the relay starts
    let port = free_port();
    let listen = format!("\"127.0.0.1:{port}\"");
    let mut relay = Relay::spawn(&config(&pg, None, &[("http", "listen", &listen)]));
    // Then it keeps retrying rather than exiting
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&scrape(port), PG_RECONNECTS).unwrap_or(0.0) < 3.0 {
        if let Some(status) = relay.try_exit() {
            panic!(
                "the relay exited ({status}) instead of retrying: {}",
                last_line(&relay.stderr())
            );
        }
        assert!(Instant::now() < deadline, "no retries counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_no_panic(&relay.stderr());
    // When Postgres accepts connections
    tokio::task::block_in_place(|| pg.promote());
    // Then the relay streams and relays rows
    pg.wait_streaming(SLOT).await;
    let id = insert_event(&pg.client().await, "o-1", 1)
        .await
        .expect("insert");
    assert!(
        wait_for(Duration::from_secs(30), || async {
            stdout_ids(&relay) == vec![id.clone()]
        })
        .await,
        "the row was not relayed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_connection_terminated() {
    const TERMINATIONS: usize = 3;
    // Given a relay streaming and a writer committing 1..=5 rows per transaction
    let pg = Postgres::start();
    pg.create_outbox().await;
    let nats = Nats::start();
    let port = free_port();
    let listen = format!("\"127.0.0.1:{port}\"");
    let _relay = Relay::spawn(&config(&pg, Some(&nats), &[("http", "listen", &listen)]));
    pg.wait_streaming(SLOT).await;
    let writer = Writer::spawn(pg.url(), 50, 5, Duration::from_millis(5), seed());
    let js = nats.jetstream().await;
    let admin = pg.client().await;

    // When the walsender is terminated three times, each after some progress
    for round in 1..=TERMINATIONS {
        let seen = stream_len(&js, STREAM).await;
        assert!(
            wait_for(Duration::from_secs(30), || async {
                stream_len(&js, STREAM).await >= seen + 100
            })
            .await,
            "round {round}: no progress"
        );
        let old = pg.slot_active_pid(SLOT).await.expect("streaming");
        terminate_walsender(&admin).await;
        // Then the relay streams again on a new connection
        assert!(
            wait_for(Duration::from_secs(30), || async {
                pg.slot_active_pid(SLOT).await.is_some_and(|p| p != old)
            })
            .await,
            "round {round}: the relay did not reconnect"
        );
    }
    let written = writer.finish().await;

    // and every committed row arrives once, in order per aggregate
    let (marker, before_marker) = commit_marker(&pg).await;
    wait_confirmed_past(&pg, before_marker, Duration::from_secs(60)).await;
    let expected = pg.outbox_ids().await;
    assert_eq!(expected.len(), written.len() + 1, "writer bookkeeping");
    assert!(expected.contains(&marker));
    let msgs = read_stream(&js, STREAM).await;
    assert_delivered_once(&msgs, &expected);
    assert_per_aggregate_order(&msgs);
    // and each lost connection was counted
    let reconnects = metric(&scrape(port), PG_RECONNECTS).unwrap_or(0.0);
    assert!(
        reconnects >= TERMINATIONS as f64,
        "{reconnects} reconnects after {TERMINATIONS} terminations"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_backoff_starts_over_after_a_healthy_session() {
    const ROUNDS: i64 = 9;
    // Given a relay with the default backoff (100 ms doubling up to 30 s)
    let pg = Postgres::start();
    pg.create_outbox().await;
    let relay = Relay::spawn(&config(
        &pg,
        None,
        &[
            ("retry", "initial_backoff_ms", "100"),
            ("retry", "max_backoff_ms", "30000"),
        ],
    ));
    pg.wait_streaming(SLOT).await;
    let mut admin = pg.client().await;
    for round in 1..=ROUNDS {
        // that has relayed and confirmed a row since it (re)connected: a healthy session
        let tx = admin.transaction().await.expect("begin");
        let before_row = insert_lsn(&tx).await;
        let id = insert_event(&tx, "o-1", round).await.expect("insert");
        tx.commit().await.expect("commit");
        assert!(
            wait_for(Duration::from_secs(30), || async {
                stdout_ids(&relay).contains(&id)
            })
            .await,
            "round {round}: row not relayed"
        );
        wait_confirmed_past(&pg, before_row, Duration::from_secs(30)).await;
        // When its replication connection is terminated
        let old = pg.slot_active_pid(SLOT).await.expect("streaming");
        let lost_at = Instant::now();
        terminate_walsender(&admin).await;
        // Then it streams again after a first-attempt backoff, however many earlier,
        // independent outages it recovered from (6 s leaves room for the 5 s close
        // delay of `lost_connection_with_an_unsent_confirmation_reconnects_promptly`)
        assert!(
            wait_for(Duration::from_secs(6), || async {
                pg.slot_active_pid(SLOT).await.is_some_and(|p| p != old)
            })
            .await,
            "round {round}: not streaming again within 6 s of a single lost connection"
        );
        eprintln!(
            "round {round}: streaming again after {:?}",
            lost_at.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connection_with_an_unsent_confirmation_reconnects_promptly() {
    // Given a relay that sends confirmations every 10 s and has just relayed a row, so
    // its confirmation is not sent yet
    let pg = Postgres::start();
    pg.create_outbox().await;
    let relay = Relay::spawn(&config(
        &pg,
        None,
        &[("postgres", "status_interval_ms", "10000")],
    ));
    pg.wait_streaming(SLOT).await;
    let admin = pg.client().await;
    let id = insert_event(&admin, "o-1", 1).await.expect("insert");
    assert!(
        wait_for(Duration::from_secs(30), || async {
            stdout_ids(&relay).contains(&id)
        })
        .await,
        "row not relayed"
    );
    // When its replication connection is terminated
    let old = pg.slot_active_pid(SLOT).await.expect("streaming");
    let lost_at = Instant::now();
    terminate_walsender(&admin).await;
    // Then it streams again within 3 s (the first backoff is at most 50 ms here)
    assert!(
        wait_for(Duration::from_secs(3), || async {
            pg.slot_active_pid(SLOT).await.is_some_and(|p| p != old)
        })
        .await,
        "not streaming again within 3 s of losing the connection ({:?} so far)",
        lost_at.elapsed()
    );
}

// ---------------------------------------------------------------------------------
// Schema changes
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_change_add_column_carries_on() {
    // Given a relay (stdout sink) that relayed 10 rows
    let pg = Postgres::start();
    pg.create_outbox().await;
    let mut relay = Relay::spawn(&config(&pg, None, &[]));
    pg.wait_streaming(SLOT).await;
    let db = pg.client().await;
    let mut expected = Vec::new();
    for n in 1..=10 {
        expected.push(insert_event(&db, "o-1", n).await.expect("insert"));
    }
    assert!(
        wait_for(Duration::from_secs(30), || async {
            stdout_ids(&relay).len() >= 10
        })
        .await,
        "the first 10 rows did not arrive"
    );

    // When a column is added while streaming and rows use it
    db.batch_execute("ALTER TABLE outbox ADD COLUMN tenant text")
        .await
        .expect("alter");
    for n in 11..=20i64 {
        let id: String = db
            .query_one(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, tenant) \
                 VALUES ('Order', 'o-1', 'OrderUpdated', jsonb_build_object('n', $1::bigint), 'acme') \
                 RETURNING id::text",
                &[&n],
            )
            .await
            .expect("insert with tenant")
            .get(0);
        expected.push(id);
    }
    // and rows that leave it empty
    for n in 21..=25 {
        expected.push(insert_event(&db, "o-1", n).await.expect("insert"));
    }

    // Then every row arrives, in commit order, and the relay keeps running
    assert!(
        wait_for(Duration::from_secs(30), || async {
            stdout_ids(&relay).len() >= 25
        })
        .await,
        "only {} of 25 rows arrived after ADD COLUMN\n{}",
        stdout_ids(&relay).len(),
        relay.stderr()
    );
    assert_eq!(stdout_ids(&relay), expected);
    assert!(
        relay.try_exit().is_none(),
        "the relay exited:\n{}",
        relay.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_mapped_column_stops_with_its_name() {
    // Given a relay (stdout sink) that relayed a row
    let pg = Postgres::start();
    pg.create_outbox().await;
    let mut relay = Relay::spawn(&config(&pg, None, &[]));
    pg.wait_streaming(SLOT).await;
    let mut db = pg.client().await;
    let first = insert_event(&db, "o-1", 1).await.expect("insert");
    assert!(
        wait_for(Duration::from_secs(30), || async {
            stdout_ids(&relay) == vec![first.clone()]
        })
        .await,
        "the first row did not arrive"
    );

    // When the mapped, required column event_type is dropped and a row is inserted
    db.batch_execute("ALTER TABLE outbox DROP COLUMN event_type")
        .await
        .expect("drop column");
    let tx = db.transaction().await.expect("begin");
    let before_row = insert_lsn(&tx).await;
    tx.execute(
        "INSERT INTO outbox (aggregate_type, aggregate_id, payload) \
         VALUES ('Order', 'o-1', '{\"n\": 2}')",
        &[],
    )
    .await
    .expect("insert without event_type");
    tx.commit().await.expect("commit");
    let after_row = insert_lsn(&db).await;

    // Then the relay stops with a non-zero exit naming the column and the mapping key
    let status = relay
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("the relay kept running after a mapped column was dropped");
    let stderr = relay.stderr();
    assert!(!status.success(), "exit {status:?}\n{stderr}");
    assert_no_panic(&stderr);
    let last = last_line(&stderr);
    eprintln!("final message: {last}");
    assert!(
        last.contains("event_type") && last.contains("[postgres.columns]"),
        "the final message should name the column and the mapping key: {last}"
    );
    // and nothing after the first row was relayed
    assert_eq!(stdout_ids(&relay), vec![first]);
    // and the slot did not move past the row
    let confirmed = pg.confirmed_lsn(SLOT).await.expect("slot");
    assert!(
        confirmed < after_row && confirmed <= before_row,
        "confirmed {confirmed} is past the row (written at {before_row}..{after_row})"
    );
}

// ---------------------------------------------------------------------------------
// Crashes and graceful stops
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_anywhere_twenty_kills() {
    const KILLS: usize = 20;
    let seed = seed();
    let mut rng = SplitMix64::new(seed ^ 0x5EED);
    // Given a relay streaming and a writer committing 1..=20 rows per transaction over
    // 1,000 aggregates for the whole test
    let pg = Postgres::start();
    pg.create_outbox().await;
    let nats = Nats::start();
    let mut relay = Relay::spawn(&config(&pg, Some(&nats), &[]));
    pg.wait_streaming(SLOT).await;
    let writer = Writer::spawn(pg.url(), 1_000, 20, Duration::from_millis(10), seed);
    let js = nats.jetstream().await;

    // When the relay is SIGKILLed 20 times, 50..400 ms after each (re)start
    let started = Instant::now();
    for _ in 0..KILLS {
        // The random delay is the fault being injected, not a synchronisation.
        tokio::time::sleep(Duration::from_millis(rng.range(50, 400))).await;
        relay.kill();
        relay.start();
    }
    let during_kills = stream_len(&js, STREAM).await;
    eprintln!(
        "{KILLS} kills in {:?}; {during_kills} events stored meanwhile",
        started.elapsed()
    );
    // and, restarted for good, it catches up while the writer commits a little more
    let committed = writer.committed();
    assert!(
        wait_for(Duration::from_secs(30), || async {
            writer.committed() >= committed + 200
        })
        .await
    );
    let written = writer.finish().await;

    // Then every committed id is in the stream exactly once (JetStream dedup), none is
    // missing, and each aggregate's events are in commit order
    let (marker, before_marker) = commit_marker(&pg).await;
    wait_confirmed_past(&pg, before_marker, Duration::from_secs(60)).await;
    let expected = pg.outbox_ids().await;
    assert_eq!(expected.len(), written.len() + 1, "writer bookkeeping");
    assert!(expected.contains(&marker));
    let msgs = read_stream(&js, STREAM).await;
    assert_delivered_once(&msgs, &expected);
    assert_per_aggregate_order(&msgs);
    assert!(during_kills > 0, "no event was stored during the kills");
    eprintln!(
        "{} events over 1,000 aggregates in {:?}",
        msgs.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_batch_then_restart_publishes_no_duplicates() {
    const ROWS: i64 = 4_000;
    const SHUTDOWN_TIMEOUT_SECS: u64 = 5;
    let mut rng = SplitMix64::new(seed());
    let pg = Postgres::start();
    pg.create_outbox().await;
    let nats = Nats::start();
    let port = free_port();
    let listen = format!("\"127.0.0.1:{port}\"");
    let shutdown_timeout = SHUTDOWN_TIMEOUT_SECS.to_string();
    let mut relay = Relay::spawn(&config(
        &pg,
        Some(&nats),
        &[
            ("http", "listen", &listen),
            ("sink", "shutdown_timeout_secs", &shutdown_timeout),
        ],
    ));
    // Given a slot (created by a first run, stopped cleanly) with a backlog of 4,000
    // one-row transactions over 20 aggregates
    pg.wait_streaming(SLOT).await;
    let stopped = relay.terminate(Duration::from_secs(SHUTDOWN_TIMEOUT_SECS + 5));
    assert!(stopped.is_some_and(|s| s.success()), "{stopped:?}");
    let db = pg.client().await;
    // Prepared once, so every insert is a single request: pipelined on one connection
    // they execute, and commit, in `n` order. (With an unprepared statement each insert
    // is a prepare then an execute, and pipelined executes may run out of `n` order.)
    let stmt = db
        .prepare(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             VALUES ('Order', $1, 'OrderUpdated', jsonb_build_object('n', $2::bigint))",
        )
        .await
        .expect("prepare");
    for chunk in (1..=ROWS).collect::<Vec<_>>().chunks(200) {
        let rows: Vec<(String, i64)> = chunk
            .iter()
            .map(|&n| (format!("agg-{}", rng.range(0, 19)), n))
            .collect();
        let inserts = rows.iter().map(|(agg, n)| {
            let (db, stmt) = (&db, &stmt);
            async move { db.execute(stmt, &[agg, n]).await }
        });
        for r in futures::future::join_all(inserts).await {
            r.expect("insert");
        }
    }
    let js = nats.jetstream().await;

    // When the relay runs and gets SIGTERM while the backlog is in flight
    relay.start();
    assert!(
        wait_for(Duration::from_secs(30), || async {
            stream_len(&js, STREAM).await >= 200
        })
        .await,
        "no events arrived"
    );
    let status = relay.terminate(Duration::from_secs(SHUTDOWN_TIMEOUT_SECS + 5));
    let at_stop = stream_len(&js, STREAM).await;

    // Then it exits 0 within shutdown_timeout_secs + 5 s, part-way through the backlog
    let status = status.expect("no exit within sink.shutdown_timeout_secs + 5 s");
    assert!(status.success(), "exit {status:?}\n{}", relay.stderr());
    assert!(
        at_stop < ROWS as u64,
        "all {ROWS} events arrived before SIGTERM: the test needs a bigger backlog"
    );
    let confirmed_at_stop = pg.confirmed_lsn(SLOT).await.expect("slot");

    // When it is restarted
    relay.start();
    // Then every row arrives once, in order per aggregate
    let (marker, before_marker) = commit_marker(&pg).await;
    wait_confirmed_past(&pg, before_marker, Duration::from_secs(60)).await;
    let expected = pg.outbox_ids().await;
    assert!(expected.contains(&marker));
    let msgs = read_stream(&js, STREAM).await;
    assert_delivered_once(&msgs, &expected);
    assert_per_aggregate_order(&msgs);
    // and the restarted process re-sent nothing the broker had acknowledged before
    let text = scrape(port);
    let published = metric_sum(&text, "outboxd_events_published_total");
    let duplicates = metric_sum(&text, "outboxd_duplicates_total");
    eprintln!(
        "{at_stop} of {ROWS} stored at SIGTERM; restart published {published}, \
         {duplicates} duplicates; confirmed at stop {confirmed_at_stop}"
    );
    assert!(
        published >= (ROWS as u64 + 1 - at_stop) as f64,
        "is this the restarted relay's /metrics? published {published}"
    );
    // (Diagnosis: one-row transactions, so `n` is commit order. The first run stored
    // msgs[..at_stop]; those after its first gap in commit order lie beyond the
    // confirmed prefix, so a restart must send them again.)
    let stored_first: HashSet<i64> = msgs[..at_stop as usize]
        .iter()
        .map(support::payload_n)
        .filter(|&n| n > 0)
        .collect();
    let first_gap = (1..=ROWS)
        .find(|n| !stored_first.contains(n))
        .unwrap_or(ROWS);
    let beyond_gap = stored_first.iter().filter(|&&n| n > first_gap).count();
    let drained = relay_log_lines(&relay.stderr(), "in-flight events drained");
    assert_eq!(
        duplicates, 0.0,
        "the restart re-published {duplicates} events JetStream had already acknowledged; \
         {beyond_gap} of the {at_stop} events stored before SIGTERM come after n={first_gap}, \
         the first event in commit order that was not; drain log: {drained:?}"
    );
}

// ---------------------------------------------------------------------------------
// Bad input at the edges
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_table_stops_naming_the_table_and_the_fix() {
    // Given no table public.nope
    let pg = Postgres::start();
    pg.create_outbox().await;
    // When the relay runs against it
    let mut relay = Relay::spawn(&config(
        &pg,
        None,
        &[("postgres", "table", "\"public.nope\"")],
    ));
    // Then it exits non-zero with a message naming the table and what to do
    let status = relay
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("the relay kept running against a missing table");
    let stderr = relay.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_no_panic(&stderr);
    let last = last_line(&stderr);
    eprintln!("final message: {last}");
    assert!(
        last.contains("public.nope") && last.contains("does not exist"),
        "the message should say the table does not exist: {last}"
    );
    assert!(
        last.contains("outboxd setup") || last.contains("postgres.table"),
        "the message should name a fix (create it: `outboxd setup`, or set postgres.table): \
         {last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publication_without_the_table_stops_with_alter_publication() {
    // Given a publication `outboxd` that publishes another table
    let pg = Postgres::start();
    pg.create_outbox().await;
    pg.client()
        .await
        .batch_execute(
            "CREATE TABLE other (id int PRIMARY KEY); CREATE PUBLICATION outboxd FOR TABLE other",
        )
        .await
        .expect("publication");
    // When the relay runs
    let mut relay = Relay::spawn(&config(&pg, None, &[]));
    // Then it exits non-zero and tells how to add the table
    let status = relay
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("the relay kept running with a publication lacking the table");
    let stderr = relay.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_no_panic(&stderr);
    let last = last_line(&stderr);
    eprintln!("final message: {last}");
    assert!(
        last.contains("ALTER PUBLICATION outboxd ADD TABLE public.outbox"),
        "{last}"
    );
    // and it changed nothing: no slot
    assert_eq!(pg.confirmed_lsn(SLOT).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_without_replication_cannot_create_the_slot_and_is_told_why() {
    // Given a login role without REPLICATION, and the publication its owner created
    let pg = Postgres::start();
    pg.create_outbox().await;
    pg.client()
        .await
        .batch_execute(
            "CREATE ROLE weak LOGIN; \
             CREATE PUBLICATION outboxd FOR TABLE public.outbox WITH (publish = 'insert')",
        )
        .await
        .expect("role");
    // When the relay runs as that role on a first start (no slot yet)
    let url = format!("\"postgres://weak@127.0.0.1:{}/postgres\"", pg.port);
    let mut relay = Relay::spawn(&config(&pg, None, &[("postgres", "url", &url)]));
    // Then it exits non-zero and names the missing REPLICATION attribute
    let status = relay
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("the relay kept running without REPLICATION");
    let stderr = relay.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_no_panic(&stderr);
    let last = last_line(&stderr);
    eprintln!("final message: {last}");
    assert!(
        last.contains("REPLICATION"),
        "the message should name the REPLICATION attribute (ALTER ROLE ... REPLICATION): {last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_without_replication_cannot_stream_and_is_told_why() {
    // Given a login role without REPLICATION, and the publication and slot an
    // operator created for it (`outboxd setup --apply` as a superuser)
    let pg = Postgres::start();
    pg.create_outbox().await;
    let admin = pg.client().await;
    admin
        .batch_execute(
            "CREATE ROLE weak LOGIN; \
             CREATE PUBLICATION outboxd FOR TABLE public.outbox WITH (publish = 'insert')",
        )
        .await
        .expect("role");
    // (a slot cannot be created in a transaction that wrote: its own statement)
    admin
        .execute(
            "SELECT pg_create_logical_replication_slot('outboxd', 'pgoutput')",
            &[],
        )
        .await
        .expect("slot");
    // When the relay runs as that role
    let url = format!("\"postgres://weak@127.0.0.1:{}/postgres\"", pg.port);
    let mut relay = Relay::spawn(&config(&pg, None, &[("postgres", "url", &url)]));
    // Then it exits non-zero with the statement that fixes it
    let status = relay
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("the relay kept running without REPLICATION");
    let stderr = relay.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_no_panic(&stderr);
    let last = last_line(&stderr);
    eprintln!("final message: {last}");
    assert!(
        last.contains("ALTER ROLE") && last.contains("REPLICATION"),
        "{last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_at_start_is_retried_then_delivered() {
    // Given a broker that is down when the relay starts
    let pg = Postgres::start();
    pg.create_outbox().await;
    let mut nats = Nats::start();
    nats.stop();
    let port = free_port();
    let listen = format!("\"127.0.0.1:{port}\"");
    let mut relay = Relay::spawn(&config(&pg, Some(&nats), &[("http", "listen", &listen)]));
    // Then the relay keeps retrying, says so in a warning, and stays up
    let broker_retries = |t: &str| metric(t, r#"outboxd_reconnects_total{component="broker"}"#);
    assert!(
        wait_for(Duration::from_secs(20), || async {
            broker_retries(&scrape(port)).unwrap_or(0.0) >= 3.0
        })
        .await,
        "no broker retries counted:\n{}",
        relay.stderr()
    );
    assert!(relay.try_exit().is_none(), "exited:\n{}", relay.stderr());
    let stderr = relay.stderr();
    assert_no_panic(&stderr);
    let warning = stderr
        .lines()
        .find(|l| l.contains("WARN") && l.contains("broker"))
        .unwrap_or_else(|| panic!("no warning about the broker:\n{stderr}"));
    eprintln!("warning: {warning}");
    assert!(
        warning.contains("retrying") && warning.contains("NATS"),
        "the warning should say what failed and that it retries: {warning}"
    );

    // When the broker starts
    nats.resume();
    // Then the relay streams and delivers
    pg.wait_streaming(SLOT).await;
    let db = pg.client().await;
    for n in 1..=20 {
        insert_event(&db, &format!("o-{}", n % 3), n)
            .await
            .expect("insert");
    }
    let (marker, before_marker) = commit_marker(&pg).await;
    wait_confirmed_past(&pg, before_marker, Duration::from_secs(30)).await;
    let expected = pg.outbox_ids().await;
    assert!(expected.contains(&marker));
    let msgs = read_stream(&nats.jetstream().await, STREAM).await;
    assert_delivered_once(&msgs, &expected);
    assert_per_aggregate_order(&msgs);
}

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

/// A writer committing transactions of `1..=max_rows` rows, each row of a random one
/// of `aggregates`, until [`Writer::finish`]. It survives lost connections: after
/// an error it reconnects and asks the table whether the transaction committed (a
/// COMMIT whose answer was lost may have), and it never reuses an `n`, so `n` order
/// stays commit order.
struct Writer {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<HashSet<String>>,
}

impl Writer {
    fn spawn(url: String, aggregates: u64, max_rows: u64, pace: Duration, seed: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicUsize::new(0));
        let (stop2, committed2) = (stop.clone(), committed.clone());
        let task = tokio::spawn(async move {
            let mut rng = SplitMix64::new(seed);
            let mut db = connect_retrying(&url).await;
            let mut ids = HashSet::new();
            let mut n = 0i64;
            let mut tick = tokio::time::interval(pace);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop2.load(Ordering::Relaxed) {
                tick.tick().await;
                let rows: Vec<(String, i64)> = (0..rng.range(1, max_rows))
                    .map(|_| {
                        n += 1;
                        (format!("agg-{}", rng.range(0, aggregates - 1)), n)
                    })
                    .collect();
                let written = match write_txn(&mut db, &rows).await {
                    Ok(written) => written,
                    Err(_) => {
                        let (d, found) = resolve(&url, &rows).await;
                        db = d;
                        found
                    }
                };
                committed2.fetch_add(written.len(), Ordering::Relaxed);
                ids.extend(written);
            }
            ids
        });
        Self {
            stop,
            committed,
            task,
        }
    }

    /// Rows known to be committed so far.
    fn committed(&self) -> usize {
        self.committed.load(Ordering::Relaxed)
    }

    /// Stops after the current transaction; the ids of every committed row.
    async fn finish(self) -> HashSet<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("writer")
    }
}

async fn write_txn(
    db: &mut tokio_postgres::Client,
    rows: &[(String, i64)],
) -> Result<Vec<String>, tokio_postgres::Error> {
    let tx = db.transaction().await?;
    let mut ids = Vec::with_capacity(rows.len());
    for (aggregate, n) in rows {
        ids.push(insert_event(&tx, aggregate, *n).await?);
    }
    tx.commit().await?;
    Ok(ids)
}

/// After a failed transaction: reconnects and returns the rows of it that committed
/// (all or none: it is one transaction).
async fn resolve(url: &str, rows: &[(String, i64)]) -> (tokio_postgres::Client, Vec<String>) {
    let (lo, hi) = (rows[0].1, rows[rows.len() - 1].1);
    loop {
        let db = connect_retrying(url).await;
        let found = db
            .query(
                "SELECT id::text FROM outbox WHERE (payload->>'n')::bigint BETWEEN $1 AND $2",
                &[&lo, &hi],
            )
            .await;
        if let Ok(found) = found {
            let ids: Vec<String> = found.iter().map(|r| r.get(0)).collect();
            assert!(
                ids.is_empty() || ids.len() == rows.len(),
                "a transaction committed in part: {} of {} rows",
                ids.len(),
                rows.len()
            );
            return (db, ids);
        }
    }
}

async fn connect_retrying(url: &str) -> tokio_postgres::Client {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                return client;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "writer cannot reconnect: {e}");
                // Postgres is restarting: try again shortly.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// `pg_terminate_backend` on the walsender of our slot.
async fn terminate_walsender(admin: &tokio_postgres::Client) {
    let killed: Option<bool> = admin
        .query_one(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name = $1",
            &[&SLOT],
        )
        .await
        .expect("terminate")
        .get(0);
    assert_eq!(killed, Some(true), "no walsender to terminate");
}

/// The server's WAL insert position, inside `db`'s transaction.
async fn insert_lsn(db: &impl tokio_postgres::GenericClient) -> u64 {
    db.query_one("SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint", &[])
        .await
        .expect("lsn")
        .get::<_, i64>(0) as u64
}

/// Commits one marker row (aggregate `marker`) after everything else; returns its id
/// and the WAL position before its transaction. Once the slot is confirmed past that
/// position, every earlier transaction was acknowledged by the broker.
async fn commit_marker(pg: &Postgres) -> (String, u64) {
    let mut db = pg.client().await;
    let tx = db.transaction().await.expect("begin");
    let before = insert_lsn(&tx).await;
    let id = insert_event(&tx, "marker", 0).await.expect("marker");
    tx.commit().await.expect("commit");
    (id, before)
}

async fn wait_confirmed_past(pg: &Postgres, lsn: u64, timeout: Duration) {
    assert!(
        wait_for(timeout, || async {
            pg.confirmed_lsn(SLOT).await.unwrap_or(0) > lsn
        })
        .await,
        "the slot was not confirmed past {lsn} within {timeout:?} (confirmed: {:?})",
        pg.confirmed_lsn(SLOT).await
    );
}

/// Event ids printed by the stdout sink, in output order.
fn stdout_ids(relay: &Relay) -> Vec<String> {
    relay
        .stdout()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["id"].as_str().map(str::to_string))
        .collect()
}

fn assert_no_panic(stderr: &str) {
    for sign in ["panicked", "stack backtrace", "RUST_BACKTRACE"] {
        assert!(!stderr.contains(sign), "{sign:?} in stderr:\n{stderr}");
    }
}

/// The last non-empty line: `outboxd: <error>` when the relay stopped on an error.
fn last_line(stderr: &str) -> &str {
    stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
}

/// Lines of `stderr` containing `needle`, escape codes removed.
fn relay_log_lines(stderr: &str, needle: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.contains(needle))
        .map(|l| {
            let mut out = String::new();
            let mut in_escape = false;
            for c in l.chars() {
                match (in_escape, c) {
                    (false, '\u{1b}') => in_escape = true,
                    (true, 'm') => in_escape = false,
                    (false, c) => out.push(c),
                    _ => {}
                }
            }
            out
        })
        .collect()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
