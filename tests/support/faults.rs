//! Helpers of the fault-injection tests: a writer that survives lost connections,
//! commit markers, dropping the slot under a relay, and readers of the relay's
//! output (its log, and its HTTP status once it waits for an operator).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::secure::http_port;
use super::{
    assert_delivered_once, assert_per_aggregate_order, http_get, insert_event, metric, read_stream,
    wait_for, Postgres, Received, Relay, SplitMix64,
};

/// The slot every fault test uses (the config's default).
pub const SLOT: &str = "outboxd";

/// A writer committing transactions of `1..=max_rows` rows, each row of a random one
/// of `aggregates`, until [`Writer::finish`]. It survives lost connections: after
/// an error it reconnects and asks the table whether the transaction committed (a
/// COMMIT whose answer was lost may have), and it never reuses an `n`, so `n` order
/// stays commit order.
pub struct Writer {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<HashSet<String>>,
}

impl Writer {
    pub fn spawn(url: String, aggregates: u64, max_rows: u64, pace: Duration, seed: u64) -> Self {
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
    pub fn committed(&self) -> usize {
        self.committed.load(Ordering::Relaxed)
    }

    /// Waits up to 30 s until the writer has committed `rows` more rows than now;
    /// returns whether it did.
    pub async fn wait_committed_more(&self, rows: usize) -> bool {
        let now = self.committed();
        wait_for(Duration::from_secs(30), || async {
            self.committed() >= now + rows
        })
        .await
    }

    /// Stops after the current transaction; the ids of every committed row.
    pub async fn finish(self) -> HashSet<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("writer")
    }
}

pub async fn write_txn(
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
pub async fn resolve(url: &str, rows: &[(String, i64)]) -> (tokio_postgres::Client, Vec<String>) {
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

pub async fn connect_retrying(url: &str) -> tokio_postgres::Client {
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
pub async fn terminate_walsender(admin: &tokio_postgres::Client) {
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
pub async fn insert_lsn(db: &impl tokio_postgres::GenericClient) -> u64 {
    db.query_one("SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint", &[])
        .await
        .expect("lsn")
        .get::<_, i64>(0) as u64
}

/// Commits one marker row (aggregate `marker`) after everything else; returns its id
/// and the WAL position before its transaction. Once the slot is confirmed past that
/// position, every earlier transaction was acknowledged by the broker.
pub async fn commit_marker(pg: &Postgres) -> (String, u64) {
    let mut db = pg.client().await;
    let tx = db.transaction().await.expect("begin");
    let before = insert_lsn(&tx).await;
    let id = insert_event(&tx, "marker", 0).await.expect("marker");
    tx.commit().await.expect("commit");
    (id, before)
}

/// Commits a marker after everything else, waits up to `timeout` until the slot is
/// confirmed past it (so the broker acknowledged every earlier transaction), and
/// returns the ids of every row in the outbox, the marker's among them.
pub async fn ids_once_confirmed(pg: &Postgres, timeout: Duration) -> HashSet<String> {
    let (marker, before_marker) = commit_marker(pg).await;
    wait_confirmed_past(pg, before_marker, timeout).await;
    let ids = pg.outbox_ids().await;
    assert!(
        ids.contains(&marker),
        "the marker {marker} is not in the outbox"
    );
    ids
}

/// Waits until every committed row is acknowledged ([`ids_once_confirmed`]), then
/// asserts that `stream` holds each row of the outbox exactly once and nothing else,
/// in commit order per aggregate. Returns the outbox's ids and the stream's messages.
pub async fn assert_outbox_delivered_once(
    pg: &Postgres,
    js: &async_nats::jetstream::Context,
    stream: &str,
    timeout: Duration,
) -> (HashSet<String>, Vec<Received>) {
    let expected = ids_once_confirmed(pg, timeout).await;
    let msgs = read_stream(js, stream).await;
    assert_delivered_once(&msgs, &expected);
    assert_per_aggregate_order(&msgs);
    (expected, msgs)
}

pub async fn wait_confirmed_past(pg: &Postgres, lsn: u64, timeout: Duration) {
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
pub fn stdout_ids(relay: &Relay) -> Vec<String> {
    relay
        .stdout()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["id"].as_str().map(str::to_string))
        .collect()
}

pub fn assert_no_panic(stderr: &str) {
    for sign in ["panicked", "stack backtrace", "RUST_BACKTRACE"] {
        assert!(!stderr.contains(sign), "{sign:?} in stderr:\n{stderr}");
    }
}

/// The last non-empty line: `outboxd: <error>` when the relay stopped on an error.
pub fn last_line(stderr: &str) -> &str {
    stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
}

/// Lines of `stderr` containing `needle`, escape codes removed.
pub fn relay_log_lines(stderr: &str, needle: &str) -> Vec<String> {
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

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits (30 s) for `relay` to stop on its own, with exit code 1 and no panic;
/// returns its last log line, the error it stopped with. `what` says what kept it
/// from stopping, for the failure message.
pub async fn final_error(relay: &mut Relay, what: &str) -> String {
    let status = relay
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("the relay kept running {what}"));
    let stderr = relay.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_no_panic(&stderr);
    let last = last_line(&stderr).to_string();
    eprintln!("final message: {last}");
    last
}

/// SIGKILLs `relay` `kills` times, each time only once its new process has had the
/// broker acknowledge events of its own (it is past start-up and streaming) and then
/// 0..200 ms later, while the writer commits: so every kill lands with events in
/// flight, not during start-up. The relay stays down for `down` before each restart.
/// Returns how many kills found rows committed during the killed process's life (all
/// of them, asserted by the caller) and prints it.
pub async fn kill_while_in_flight(
    relay: &mut Relay,
    port: u16,
    writer: &Writer,
    rng: &mut SplitMix64,
    kills: usize,
    down: Duration,
) -> usize {
    let mut mid_write = 0;
    for k in 0..kills {
        let before = writer.committed();
        let streaming = wait_for(Duration::from_secs(30), || async {
            super::scraped(port, |t| {
                super::metric_sum(t, "outboxd_events_published_total") > 0.0
            })
        })
        .await;
        assert!(
            streaming,
            "kill {k}: the restarted relay published nothing within 30 s: {}",
            relay.stderr()
        );
        // The writer commits during this process's life (on a loaded machine its next
        // commit can come later than the relay's first ack: wait for it, bounded)
        if wait_for(Duration::from_secs(30), || async {
            writer.committed() > before
        })
        .await
        {
            mid_write += 1;
        }
        // The random delay is the fault being injected, not a synchronisation.
        tokio::time::sleep(Duration::from_millis(rng.range(0, 200))).await;
        relay.kill();
        tokio::time::sleep(down).await;
        relay.start();
    }
    eprintln!("{mid_write} of {kills} kills landed after the relay had published, with rows committed during its life");
    mid_write
}

/// Drops the slot as an operator (or a failover) would, terminating the walsender
/// that holds it first; retried for 20 s, as the relay may take the slot back between
/// the two statements.
pub async fn drop_slot(pg: &Postgres) {
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
}

/// Waits until the relay of `cfg` waits for an operator, as every outside view shows
/// it: `/status` says role `blocked`, `/readyz` is 503 and names the problem, and
/// `outboxd_blocked` is 1. Returns the problem `/status` names.
pub async fn blocked(cfg: &str) -> String {
    let port = http_port(cfg);
    assert!(
        wait_for(Duration::from_secs(60), || async {
            http_get(port, "/status").is_some_and(|(_, b)| b.contains("\"role\":\"blocked\""))
        })
        .await,
        "not blocked: {:?}",
        http_get(port, "/status")
    );
    let (code, body) = http_get(port, "/readyz").expect("readyz");
    assert_eq!(code, 503, "{body}");
    let text = http_get(port, "/metrics").expect("metrics").1;
    assert_eq!(metric(&text, "outboxd_blocked"), Some(1.0), "{text}");
    let status: serde_json::Value =
        serde_json::from_str(&http_get(port, "/status").expect("status").1).expect("json");
    let problem = status["problem"].as_str().expect("a problem").to_string();
    assert!(body.contains(&problem), "{body}");
    problem
}
