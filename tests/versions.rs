//! Black-box: what depends on the PostgreSQL version. Each test runs on whatever
//! server the harness starts (`OUTBOXD_TEST_PG_BINDIR`, see `make test-matrix`) and
//! asserts the behaviour that version must have: before 14 the relay stops and
//! `check` fails, naming the reason; decoding on a hot standby works
//! from 16 on and is refused with the reason before; a failover slot survives a
//! promotion from 17 on and is refused with the reason before. No test returns early
//! without asserting something.

use crate::support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use support::faults::{stdout_ids, Writer};
use support::replica::Forward;
use support::{config, insert_event, wait_for, Postgres, Relay};

const PUBLICATION: &str =
    "CREATE PUBLICATION outboxd FOR TABLE public.outbox WITH (publish = 'insert')";

/// The events the stdout sink printed: (id, aggregate, n, commit LSN from `sequence`).
fn printed(relay: &Relay) -> Vec<(String, String, i64, u64)> {
    relay
        .stdout()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("one JSON event a line"))
        .map(|v| {
            let sequence = v["sequence"].as_str().expect("sequence");
            (
                v["id"].as_str().expect("id").to_string(),
                v["subject"].as_str().expect("subject").to_string(),
                v["data"]["n"].as_i64().expect("data.n"),
                u64::from_str_radix(&sequence[..16], 16).expect("hex commit LSN"),
            )
        })
        .collect()
}

/// Per aggregate, the first deliveries of its events come in commit (`n`) order.
fn assert_first_deliveries_in_order(events: &[(String, String, i64, u64)]) {
    let mut seen = HashSet::new();
    let mut last: HashMap<&str, i64> = HashMap::new();
    for (id, aggregate, n, _) in events {
        if !seen.insert(id.as_str()) {
            continue;
        }
        if let Some(prev) = last.insert(aggregate, *n) {
            assert!(
                *n > prev,
                "aggregate {aggregate}: n={n} arrived after n={prev}"
            );
        }
    }
}

/// The relay exits 1 on its own, and its last line names `needle`.
async fn refused_naming(relay: &mut Relay, needle: &str) {
    let status = relay
        .wait_exit(Duration::from_secs(90))
        .await
        .unwrap_or_else(|| panic!("the relay kept running; stderr: {}", relay.stderr()));
    let stderr = relay.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    let last = support::faults::last_line(&stderr);
    assert!(
        last.contains(needle),
        "{needle:?} not in the final message: {last}"
    );
}

/// The slot's confirmed position on `pg`, 0 when it has none.
async fn confirmed(pg: &Postgres) -> u64 {
    pg.confirmed_lsn("outboxd").await.unwrap_or(0)
}

/// The confirmed position of the synchronized (failover) slot on a standby; 0 while
/// there is none.
async fn synced(standby: &Postgres) -> u64 {
    standby
        .client()
        .await
        .query_opt(
            "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots \
             WHERE slot_name = 'outboxd' AND synced AND NOT temporary",
            &[],
        )
        .await
        .expect("synced slot")
        .and_then(|r| r.get::<_, Option<i64>>(0))
        .unwrap_or(0) as u64
}

/// Waits until a walsender of `standby` streams from slot `outboxd`. A logical slot
/// on a standby is usable once the primary logged its running transactions (the
/// background writer does so every 15 s while there is activity);
/// `pg_log_standby_snapshot()` on the primary hastens that.
async fn wait_streaming_on_standby(primary: &Postgres, standby: &Postgres, relay: &Relay) {
    let admin = primary.client().await;
    assert!(
        wait_for(Duration::from_secs(90), || async {
            admin
                .execute("SELECT pg_log_standby_snapshot()", &[])
                .await
                .expect("pg_log_standby_snapshot");
            standby
                .client()
                .await
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots s \
                     JOIN pg_stat_replication r ON r.pid = s.active_pid \
                     WHERE s.slot_name = 'outboxd'",
                    &[],
                )
                .await
                .expect("query slot")
                .is_some()
        })
        .await,
        "no relay streams from the standby; relay: {}\nstandby log: {}",
        relay.stderr(),
        standby.log()
    );
}

/// The major versions the README's "Supported versions" table lists as tested.
const TESTED: [i32; 5] = [14, 15, 16, 17, 18];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_the_server_version_and_fails_before_14() {
    // Given a server of the matrix (or the default one, or 13) with the outbox table
    let pg = Postgres::start();
    pg.create_outbox().await;
    let major = pg.major().await;
    // When `outboxd check` runs
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outboxd.toml");
    std::fs::write(&path, config(&pg, None, &[])).expect("config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .env_remove("OUTBOXD_CONFIG")
        .output()
        .expect("run check");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = report
        .lines()
        .find(|l| l.contains("postgres version"))
        .unwrap_or_else(|| panic!("no version line: {report}"));
    if TESTED.contains(&major) {
        // Then a tested version is named on an ok line, and the run passes
        assert!(line.starts_with("ok "), "{report}");
        assert!(
            line.contains(&format!("PostgreSQL {major} is tested")),
            "{report}"
        );
        assert!(out.status.success(), "{report}");
    } else if major < 14 {
        // Then an older one fails the run, naming the reason
        assert!(line.starts_with("FAIL "), "{report}");
        assert!(
            line.contains("outboxd needs PostgreSQL 14 or later"),
            "{report}"
        );
        assert_eq!(out.status.code(), Some(1), "{report}");
    } else {
        // Then a newer one is a WARN line, which does not fail the run
        assert!(line.starts_with("WARN "), "{report}");
        assert!(out.status.success(), "a warning failed the run: {report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_before_14_is_refused_naming_the_reason() {
    // Given a server and a relay with the default settings
    let pg = Postgres::start();
    pg.create_outbox().await;
    let mut relay = Relay::spawn(&config(&pg, None, &[]));
    if pg.major().await < 14 {
        // Then before 14 (no logical decoding messages in pgoutput) it stops, saying so
        refused_naming(&mut relay, "outboxd needs PostgreSQL 14 or later").await;
        return;
    }
    // Then from 14 on it streams a committed row
    pg.wait_streaming("outboxd").await;
    let id = insert_event(&pg.client().await, "o-1", 1)
        .await
        .expect("insert");
    assert!(
        wait_for(Duration::from_secs(30), || async {
            stdout_ids(&relay).contains(&id)
        })
        .await,
        "the row was not relayed: {}",
        relay.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoding_from_a_hot_standby_relays_the_primarys_rows() {
    // Given a primary whose outbox holds rows, its publication made by the owner (a
    // standby cannot create one), and a hot standby of it
    let primary = Postgres::start();
    primary.create_outbox().await;
    let db = primary.client().await;
    db.batch_execute(PUBLICATION).await.expect("publication");
    let mut expected = HashSet::new();
    for n in 1..=20 {
        let aggregate = format!("agg-{}", n % 3);
        expected.insert(insert_event(&db, &aggregate, n).await.expect("insert"));
    }
    let standby = primary.start_standby("standby", &[]).await;
    // When outboxd runs against the standby, with the initial snapshot and heartbeats
    let cfg = config(
        &standby,
        None,
        &[
            ("postgres", "initial_snapshot", "true"),
            ("postgres", "heartbeat_interval_secs", "1"),
            ("postgres", "monitor_interval_secs", "1"),
        ],
    );
    let mut relay = Relay::spawn(&cfg);
    if primary.major().await < 16 {
        // Then before PostgreSQL 16 it stops and says why
        refused_naming(&mut relay, "needs PostgreSQL 16").await;
        return;
    }
    wait_streaming_on_standby(&primary, &standby, &relay).await;
    // and rows committed on the primary afterwards arrive too
    for n in 21..=220 {
        let aggregate = format!("agg-{}", n % 3);
        expected.insert(insert_event(&db, &aggregate, n).await.expect("insert"));
    }
    assert!(
        wait_for(Duration::from_secs(60), || async {
            stdout_ids(&relay).len() >= expected.len()
        })
        .await,
        "{} of {} events arrived; relay: {}",
        stdout_ids(&relay).len(),
        expected.len(),
        relay.stderr()
    );
    // Then each exactly once (the 20 old ones from the snapshot), in per-aggregate order
    let events = printed(&relay);
    let ids: Vec<&String> = events.iter().map(|e| &e.0).collect();
    assert_eq!(ids.len(), expected.len(), "repeats: {ids:?}");
    assert_eq!(ids.into_iter().cloned().collect::<HashSet<_>>(), expected);
    assert_first_deliveries_in_order(&events);

    // When the outbox is idle while other tables fill the primary's WAL, and the
    // primary writes a heartbeat message (what a scheduler there may do)
    db.batch_execute(
        "CREATE TABLE other (x int); INSERT INTO other SELECT generate_series(1, 5000);
         SELECT pg_logical_emit_message(true, 'outboxd.heartbeat', now()::text);",
    )
    .await
    .expect("other writes");
    let target = primary.current_lsn().await;
    // Then the standby's slot is confirmed past them: no heartbeat is needed (or
    // possible) on the standby for the slot to advance
    assert!(
        wait_for(Duration::from_secs(60), || async {
            confirmed(&standby).await >= target
        })
        .await,
        "slot on the standby stuck at {} (primary at {target}); relay: {}",
        confirmed(&standby).await,
        relay.stderr()
    );
    // and nothing was published for them
    assert_eq!(stdout_ids(&relay).len(), expected.len());
    // and the slot monitor reads the standby's slot (its position is the replayed one)
    let port = support::secure::http_port(&cfg);
    assert!(
        wait_for(Duration::from_secs(30), || async {
            support::scraped(port, |t| {
                support::metric(t, "outboxd_confirmed_lsn_bytes")
                    .is_some_and(|v| v >= target as f64)
            })
        })
        .await,
        "the slot monitor does not follow the standby's slot: {}",
        support::scrape(port)
    );
    // and the relay said why it writes no heartbeats (when the first one fell due),
    // and never failed trying
    assert!(
        wait_for(Duration::from_secs(30), || async {
            relay
                .stderr()
                .contains("connected to a hot standby: no heartbeats are written here")
        })
        .await,
        "{}",
        relay.stderr()
    );
    let stderr = relay.stderr();
    assert!(!stderr.contains("cannot write heartbeats"), "{stderr}");
    assert!(!standby.log().contains("cannot assign TransactionIds"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_slot_survives_the_promotion_of_the_standby() {
    let primary = Postgres::start();
    primary.create_outbox().await;
    let db = primary.client().await;
    let mut before = HashSet::new();
    for n in 1..=30 {
        // (the writer below counts its own n for aggregates agg-*)
        let aggregate = format!("old-{}", n % 5);
        before.insert(insert_event(&db, &aggregate, n).await.expect("insert"));
    }
    let forward = Forward::to(primary.port);
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", forward.port);
    let cfg = config(
        &primary,
        None,
        &[
            ("postgres", "url", &format!("\"{url}\"")),
            ("postgres", "failover_slot", "true"),
            ("postgres", "initial_snapshot", "true"),
        ],
    );
    if primary.major().await < 17 {
        // Given PostgreSQL before 17, when the relay would create the slot through
        // the initial snapshot, then it stops naming the version and creates no slot
        let mut relay = Relay::spawn(&cfg);
        refused_naming(&mut relay, "needs PostgreSQL 17").await;
        assert_eq!(
            primary.confirmed_lsn("outboxd").await,
            None,
            "a slot was left"
        );
        return;
    }
    // Given PostgreSQL 17+: a physical standby that synchronizes failover slots, and a
    // primary whose logical walsenders wait for that standby
    // (synchronized_standby_slots), so no event gets ahead of the standby's WAL
    let standby = primary
        .start_standby("standby", &[("sync_replication_slots", "on")])
        .await;
    for sql in [
        "ALTER SYSTEM SET synchronized_standby_slots = 'standby'",
        "SELECT pg_reload_conf()",
    ] {
        db.batch_execute(sql)
            .await
            .expect("synchronized_standby_slots");
    }
    // and outboxd (failover_slot = true, initial snapshot) behind a name that points
    // at the primary
    let relay = Relay::spawn(&cfg);
    primary.wait_streaming("outboxd").await;
    let failover: bool = db
        .query_one(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = 'outboxd'",
            &[],
        )
        .await
        .expect("slot")
        .get(0);
    assert!(
        failover,
        "the slot made from the snapshot lacks failover = true"
    );
    // When the application writes throughout (through the same name)
    let writer = Writer::spawn(
        url.clone(),
        10,
        5,
        Duration::from_millis(5),
        support::seed(),
    );
    // and the slot is synchronized to the standby
    assert!(
        wait_for(Duration::from_secs(90), || async {
            let _ = db.execute("SELECT pg_log_standby_snapshot()", &[]).await;
            synced(&standby).await > 0 && stdout_ids(&relay).len() >= before.len() + 300
        })
        .await,
        "the slot was not synchronized (or too few events); standby log: {}",
        standby.log()
    );
    // and the primary crashes mid-stream
    primary.crash();
    let synced_at = synced(&standby).await;
    let printed_before_failover: HashSet<String> = stdout_ids(&relay).into_iter().collect();
    // and the standby is promoted and the name moved to it
    standby.promote();
    forward.point_to(standby.port);
    // Then outboxd resumes there, and rows committed after the failover arrive too
    let resumed = stdout_ids(&relay).len();
    assert!(
        wait_for(Duration::from_secs(60), || async {
            stdout_ids(&relay).len() >= resumed + 200
        })
        .await,
        "no events after the failover; relay: {}",
        relay.stderr()
    );
    let _committed = writer.finish().await;
    // Then every row of the new primary's outbox arrives: what was committed and
    // acknowledged on the old primary, and what was committed since
    let expected = standby.outbox_ids().await;
    assert!(
        wait_for(Duration::from_secs(60), || async {
            let got: HashSet<String> = stdout_ids(&relay).into_iter().collect();
            expected.is_subset(&got)
        })
        .await,
        "events missing after the failover; relay: {}",
        relay.stderr()
    );
    let events = printed(&relay);
    let got: HashSet<String> = events.iter().map(|e| e.0.clone()).collect();
    assert_eq!(
        got, expected,
        "an event of a transaction the new primary lacks"
    );
    assert!(
        printed_before_failover.is_subset(&expected),
        "published before the crash, but lost by the failover"
    );
    // none twice, except transactions after the synced slot's position (those the
    // standby had not yet learned were acknowledged)
    let mut count: HashMap<&str, usize> = HashMap::new();
    for e in &events {
        *count.entry(e.0.as_str()).or_default() += 1;
    }
    let repeated: Vec<&(String, String, i64, u64)> =
        events.iter().filter(|e| count[e.0.as_str()] > 1).collect();
    let early: Vec<_> = repeated.iter().filter(|e| e.3 < synced_at).collect();
    assert!(
        early.is_empty(),
        "{} events before the synced position {synced_at:X} were sent twice, e.g. {:?}",
        early.len(),
        early.first()
    );
    eprintln!(
        "{} events, {} repeated after the synced position {synced_at:X}",
        events.len(),
        repeated.len() / 2
    );
    assert_first_deliveries_in_order(&events);
    // and outboxd streamed from the synced slot, at its position (never a new slot)
    let stderr = relay.stderr();
    let resumed_at = support::faults::relay_log_lines(&stderr, "streaming")
        .last()
        .and_then(|l| {
            l.split("start_lsn=")
                .nth(1)
                .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
        })
        .expect("a streaming line");
    assert_eq!(
        resumed_at,
        format!("{:X}/{:X}", synced_at >> 32, synced_at & 0xFFFF_FFFF),
        "{stderr}"
    );
    assert!(!stderr.contains("disappeared"), "{stderr}");
}
