//! Black-box fault injection (issue 5, README "Failure behaviour"): the real
//! nats-server, Postgres and outboxd processes are stopped, restarted, killed, or have
//! their backends terminated while rows commit; then every committed row must be in
//! the stream exactly once, each aggregate's events in commit order. The edge cases at
//! the end check that a misconfigured start names the problem and its fix.
//!
//! Writers put `{"n": n}` in every payload with `n` growing in commit order, so the
//! order of an aggregate's events can be read back from the stream; the set of
//! committed ids comes from the table itself, never from what a writer believes.

use crate::support;

use std::time::{Duration, Instant};

use support::faults::{
    assert_no_panic, assert_outbox_delivered_once, insert_lsn, last_line, stdout_ids, tail,
    terminate_walsender, wait_confirmed_past, Writer, SLOT,
};
use support::secure::http_port;
use support::streaming::streaming;
use support::{
    config, free_port, insert_event, metric, scrape, scraped, seed, stream_len, wait_for, Nats,
    Postgres, Relay,
};

const STREAM: &str = "OUTBOX";
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
    let (expected, _) =
        assert_outbox_delivered_once(&pg, &js, STREAM, Duration::from_secs(60)).await;
    assert_eq!(expected.len(), 551);
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
    let (pg, nats, cfg, mut relay) = streaming(&[]).await;
    let port = http_port(&cfg);
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
    assert!(
        writer.wait_committed_more(300).await,
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
    let (expected, _) =
        assert_outbox_delivered_once(&pg, &js, STREAM, Duration::from_secs(60)).await;
    assert_eq!(expected.len(), written.len() + 1, "writer bookkeeping");
    assert!(written.is_subset(&expected));
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
    while !scraped(port, |t| metric(t, PG_RECONNECTS).unwrap_or(0.0) >= 3.0) {
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
    let (expected, _) =
        assert_outbox_delivered_once(&pg, &js, STREAM, Duration::from_secs(60)).await;
    assert_eq!(expected.len(), written.len() + 1, "writer bookkeeping");
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
