//! Black-box: one transaction of 1,000,000 rows is relayed completely with memory
//! bounded by `sink.max_in_flight`, not by the transaction's size, and without a
//! `wal_sender_timeout` disconnect while the broker works through it.

use crate::support;

use std::time::{Duration, Instant};

use support::{config, free_port, http_get, metric, stream_len, wait_for, Nats, Postgres, Relay};

const ROWS: u64 = 1_000_000;

/// Peak resident set size of a process, in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_row_transaction_is_relayed_with_bounded_memory() {
    let pg = Postgres::start_with_settings(&[("wal_sender_timeout", "10s")]);
    pg.create_outbox().await;
    let nats = Nats::start();
    // Unlimited stream size: the default limits are fine, stated for the reader.
    let port = free_port();
    let listen = format!("\"127.0.0.1:{port}\"");
    let relay = Relay::spawn(&config(
        &pg,
        Some(&nats),
        &[
            ("http", "listen", &listen),
            ("sink", "max_in_flight", "4096"),
        ],
    ));
    pg.wait_streaming("outboxd").await;
    let pid_before = pg.slot_active_pid("outboxd").await;

    // Given one transaction of a million rows (~200-byte payloads, 1,000 aggregates)
    let started = Instant::now();
    pg.client()
        .await
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'Order', 'agg-' || (g % 1000), 'Bulk', \
                    jsonb_build_object('n', g, 'pad', repeat('x', 180)) \
             FROM generate_series(1, $1::bigint) g",
            &[&(ROWS as i64)],
        )
        .await
        .expect("bulk insert");
    let inserted = started.elapsed();

    // Then every row arrives
    let js = nats.jetstream().await;
    assert!(
        wait_for(Duration::from_secs(600), || async {
            stream_len(&js, "OUTBOX").await >= ROWS
        })
        .await,
        "only {} of {ROWS} arrived",
        stream_len(&js, "OUTBOX").await
    );
    let relayed = started.elapsed();
    assert_eq!(stream_len(&js, "OUTBOX").await, ROWS);
    // and the slot is confirmed past the transaction
    let end = pg.current_lsn().await;
    assert!(
        wait_for(Duration::from_secs(30), || async {
            pg.confirmed_lsn("outboxd").await.unwrap_or(0) >= end
                || metric(
                    &http_get(port, "/metrics").map(|r| r.1).unwrap_or_default(),
                    "outboxd_events_in_flight",
                ) == Some(0.0)
        })
        .await
    );
    // with the same replication connection all along (no wal_sender_timeout reset)
    assert_eq!(pg.slot_active_pid("outboxd").await, pid_before);
    let text = http_get(port, "/metrics").expect("scrape").1;
    assert_eq!(
        metric(&text, "outboxd_reconnects_total{component=\"postgres\"}"),
        None
    );
    // and memory stayed far below the transaction's size (~300 MB of events)
    let peak = peak_rss_kib(relay.pid()).expect("VmHWM");
    println!(
        "1M-row transaction: insert {:.1} s, relayed after {:.1} s, outboxd peak RSS {} MiB",
        inserted.as_secs_f64(),
        relayed.as_secs_f64(),
        peak / 1024
    );
    assert!(
        peak < 100 * 1024,
        "peak RSS {} MiB grows with the transaction",
        peak / 1024
    );
}
