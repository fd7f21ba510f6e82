//! Black-box: one transaction of 1,000,000 rows is relayed completely (every id once,
//! each aggregate in commit order, the slot confirmed past it) with memory bounded by
//! `sink.max_in_flight`, not by the transaction's size, and without a
//! `wal_sender_timeout` disconnect while the broker works through it.

use crate::support;

use std::collections::{HashMap, HashSet};
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

/// Reads the whole stream with an ordered consumer (a million single-message reads
/// would take minutes); returns the set of ids and checks on the way that every
/// aggregate's `n` grows and no id comes twice.
async fn every_id_in_order(js: &async_nats::jetstream::Context) -> HashSet<String> {
    use async_nats::jetstream::consumer::pull::OrderedConfig;
    use futures::StreamExt;
    let stream = js.get_stream("OUTBOX").await.expect("stream");
    let consumer = stream
        .create_consumer(OrderedConfig::default())
        .await
        .expect("ordered consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut ids = HashSet::with_capacity(ROWS as usize);
    let mut last: HashMap<String, i64> = HashMap::new();
    for i in 0..ROWS {
        let m = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .unwrap_or_else(|_| panic!("message {i} of {ROWS} did not come"))
            .expect("the stream of messages ended")
            .expect("message");
        let headers = m.headers.as_ref().expect("headers");
        let id = headers.get("ce-id").expect("ce-id").to_string();
        let agg = headers.get("ce-subject").expect("ce-subject").to_string();
        let n = serde_json::from_slice::<serde_json::Value>(&m.payload).expect("json")["n"]
            .as_i64()
            .expect("n");
        if let Some(prev) = last.insert(agg.clone(), n) {
            assert!(n > prev, "{agg}: {n} after {prev}");
        }
        assert!(ids.insert(id.clone()), "{id} twice");
    }
    ids
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
    // (the WAL position after the commit: at or past the transaction's end)
    let end = pg.current_lsn().await;

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
    // each row once, by id, and each aggregate's rows in commit (n) order
    let sent = pg.outbox_ids().await;
    assert_eq!(sent.len() as u64, ROWS);
    let got = every_id_in_order(&js).await;
    assert!(
        got == sent,
        "{} ids differ",
        got.symmetric_difference(&sent).count()
    );
    // and the slot is confirmed past the transaction
    assert!(
        wait_for(Duration::from_secs(60), || async {
            pg.confirmed_lsn("outboxd").await.unwrap_or(0) >= end
        })
        .await,
        "confirmed {:X?}, the transaction ends before {end:X}",
        pg.confirmed_lsn("outboxd").await
    );
    // with the same replication connection all along (no wal_sender_timeout reset)
    assert_eq!(pg.slot_active_pid("outboxd").await, pid_before);
    let text = http_get(port, "/metrics").expect("scrape").1;
    assert_eq!(
        metric(&text, "outboxd_reconnects_total{component=\"postgres\"}"),
        Some(0.0)
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
