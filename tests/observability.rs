//! Black-box: `/metrics`, `/healthz`, `/readyz`, `/status` and heartbeats, against
//! real Postgres and nats-server.

use crate::support;

use std::time::Duration;

use support::secure::http_port;
use support::streaming::streaming;
use support::{
    config, free_port, http_get, insert_event, metric, metric_sum, scrape, scraped, wait_for, Nats,
    Postgres, Relay,
};

async fn insert_rows(pg: &Postgres, n: usize, agg: &str) {
    let db = pg.client().await;
    for i in 0..n {
        db.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             VALUES ('Order', $1, 'Updated', jsonb_build_object('i', $2::int))",
            &[&agg, &(i as i32)],
        )
        .await
        .expect("insert");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_broker_outage_and_probes_stay_green() {
    let (pg, mut nats, cfg, _relay) = streaming(&[
        ("postgres", "monitor_interval_secs", "1"),
        ("postgres", "heartbeat_interval_secs", "1"),
        ("nats", "ack_timeout_ms", "500"),
    ])
    .await;
    let port = http_port(&cfg);

    // Given 20 delivered events
    insert_rows(&pg, 20, "a-1").await;
    let published = |t: &str| metric_sum(t, "outboxd_events_published_total");
    assert!(
        wait_for(Duration::from_secs(20), || async {
            scraped(port, |t| published(t) >= 20.0)
        })
        .await,
        "{}",
        scrape(port)
    );
    let text = scrape(port);
    assert_eq!(metric(&text, "outboxd_events_received_total"), Some(20.0));
    assert_eq!(
        metric(
            &text,
            r#"outboxd_events_published_total{destination="outbox.Order",sink="nats"}"#
        ),
        Some(20.0)
    );
    assert_eq!(metric(&text, "outboxd_streaming"), Some(1.0));
    assert_eq!(
        metric(&text, "outboxd_end_to_end_latency_seconds_count"),
        Some(20.0)
    );
    assert!(metric(&text, "outboxd_last_ack_timestamp_seconds").unwrap_or(0.0) > 1.7e9);

    // When NATS is down and rows keep coming
    nats.stop();
    insert_rows(&pg, 50, "a-2").await;
    // Then lag grows, errors are counted, nothing is published, probes stay green
    assert!(
        wait_for(Duration::from_secs(20), || async {
            scraped(port, |t| {
                metric(t, "outboxd_replication_lag_bytes").unwrap_or(0.0) > 0.0
                    && metric(t, "outboxd_lag_seconds").unwrap_or(0.0) > 0.0
                    && metric_sum(t, "outboxd_publish_errors_total") > 0.0
            })
        })
        .await,
        "{}",
        scrape(port)
    );
    assert_eq!(published(&scrape(port)), 20.0);
    assert_eq!(http_get(port, "/healthz").map(|r| r.0), Some(200));
    assert_eq!(http_get(port, "/readyz").map(|r| r.0), Some(200));
    let (_, status) = http_get(port, "/status").expect("status");
    let status: serde_json::Value = serde_json::from_str(&status).expect("json");
    assert_eq!(status["role"], "streaming");
    assert_eq!(status["slot"], "outboxd");
    assert!(status["lag_bytes"].as_i64().unwrap_or(0) > 0, "{status}");

    // When NATS is back
    nats.resume();
    // Then everything is delivered and the lag returns to about zero
    assert!(
        wait_for(Duration::from_secs(60), || async {
            scraped(port, |t| {
                published(t) >= 70.0
                    && metric(t, "outboxd_replication_lag_bytes").is_some_and(|b| b < 64.0 * 1024.0)
                    && metric(t, "outboxd_lag_seconds") == Some(0.0)
            })
        })
        .await,
        "{}",
        scrape(port)
    );
    assert_eq!(
        metric(&scrape(port), "outboxd_events_received_total"),
        Some(70.0)
    );

    // And promtool accepts the exposition without warnings
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .expect("stdin")
                .write_all(scrape(port).as_bytes())?;
            c.wait_with_output()
        })
        .expect("promtool missing: run `make test` (installs the prometheus package)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_outbox_slot_advances_while_other_tables_are_written() {
    let pg = Postgres::start();
    pg.create_outbox().await;
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE noise (id bigserial PRIMARY KEY, body text)")
        .await
        .expect("ddl");
    let _relay = Relay::spawn(&config(
        &pg,
        None,
        &[("postgres", "heartbeat_interval_secs", "0")],
    ));
    pg.wait_streaming("outboxd").await;
    // (after the relay has relayed an event: an idle stream must move the slot also
    // once rows have passed through)
    let first = insert_event(&db, "o-1", 1).await.expect("insert");
    let after_first = pg.current_lsn().await;
    assert!(
        wait_for(Duration::from_secs(30), || async {
            pg.confirmed_lsn("outboxd").await.unwrap_or(0) >= after_first
        })
        .await,
        "event {first} was not confirmed"
    );

    // Given lots of WAL from another table and no more from the outbox
    db.execute(
        "INSERT INTO noise (body) SELECT repeat('x', 500) FROM generate_series(1, 5000)",
        &[],
    )
    .await
    .expect("noise");
    let after_noise = pg.current_lsn().await;
    // Then the slot's confirmed position moves past it (keepalives: heartbeats are off)
    assert!(
        wait_for(Duration::from_secs(30), || async {
            pg.confirmed_lsn("outboxd").await.unwrap_or(0) >= after_noise
        })
        .await,
        "confirmed {:?} < {after_noise}",
        pg.confirmed_lsn("outboxd").await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_postgres_is_ready_live_and_reports_without_secrets() {
    let port = free_port();
    let dead_pg = free_port();
    let cfg = format!(
        "[postgres]\nurl = \"postgres://relay:hunter2-secret@127.0.0.1:{dead_pg}/app\"\n\
         [http]\nlisten = \"127.0.0.1:{port}\"\n[log]\nformat = \"text\"\n\
         [retry]\ninitial_backoff_ms = 50\nmax_backoff_ms = 200\n"
    );
    let relay = Relay::spawn(&cfg);
    // Given a Postgres that refuses connections, the relay keeps retrying
    assert!(
        wait_for(Duration::from_secs(20), || async {
            scraped(port, |t| metric_sum(t, "outboxd_reconnects_total") >= 2.0)
        })
        .await
    );
    // Then it is live and ready (readiness must not take the app pod out of service)
    assert_eq!(http_get(port, "/healthz").map(|r| r.0), Some(200));
    assert_eq!(http_get(port, "/readyz").map(|r| r.0), Some(200));
    let (_, status) = http_get(port, "/status").expect("status");
    let v: serde_json::Value = serde_json::from_str(&status).expect("json");
    assert_eq!(v["role"], "connecting");
    assert!(
        v["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{status}"
    );
    assert_eq!(metric(&scrape(port), "outboxd_streaming"), Some(0.0));
    // and the password appears nowhere
    for text in [status, scrape(port), relay.stderr()] {
        assert!(!text.contains("hunter2-secret"), "secret leaked: {text}");
    }
}

/// Before anything went wrong, the error counters already exist at 0 for the labels
/// the relay knows (so `rate()` and `increase()` see the first error), the process
/// metrics are exported, and `/status` says when its server figures were read, for
/// NATS and Kafka alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_series_exist_at_zero_process_metrics_and_status_read_times() {
    let pg = Postgres::start();
    pg.create_outbox().await;
    let nats = Nats::start();
    let kafka = support::kafka::Tansu::start();
    for sink in ["nats", "kafka"] {
        let port = free_port();
        let listen = format!("\"127.0.0.1:{port}\"");
        let overrides = [
            ("http", "listen", listen.as_str()),
            ("postgres", "monitor_interval_secs", "1"),
        ];
        let cfg = if sink == "nats" {
            config(&pg, Some(&nats), &overrides)
        } else {
            support::kafka::kafka_config(&pg, &kafka.brokers(), &overrides)
        };
        let relay = Relay::spawn(&cfg);
        pg.wait_streaming("outboxd").await;
        let text = scrape(port);
        for series in [
            format!("outboxd_publish_errors_total{{reason=\"timeout\",sink=\"{sink}\"}}"),
            format!("outboxd_publish_errors_total{{reason=\"too_large\",sink=\"{sink}\"}}"),
            format!("outboxd_duplicates_total{{sink=\"{sink}\"}}"),
            "outboxd_dead_letters_total{reason=\"invalid_row\"}".to_string(),
            "outboxd_poison_events_total{action=\"halt\",reason=\"schema\"}".to_string(),
            "outboxd_poison_events_total{action=\"dead_letter\",reason=\"too_large\"}".to_string(),
            "outboxd_reconnects_total{component=\"postgres\"}".to_string(),
            "outboxd_reconnects_total{component=\"broker\"}".to_string(),
        ] {
            assert_eq!(
                metric(&text, &series),
                Some(0.0),
                "{sink}: {series}\n{text}"
            );
        }
        assert!(
            metric(&text, "process_resident_memory_bytes").is_some_and(|b| b > 1e6),
            "{text}"
        );
        assert!(metric(&text, "process_open_fds").is_some_and(|n| n > 3.0));
        assert!(metric(&text, "process_cpu_seconds_total").is_some_and(|s| s >= 0.0));
        // and /status says when each sampled value was read, the server's figures
        // coming from one poll (lag = its WAL position minus its confirmed position)
        let lsn = |v: &serde_json::Value| -> u64 {
            let (hi, lo) = v.as_str().expect("lsn").split_once('/').expect("X/Y");
            (u64::from_str_radix(hi, 16).expect("hex") << 32)
                + u64::from_str_radix(lo, 16).expect("hex")
        };
        let mut status = serde_json::Value::Null;
        let polled = wait_for(Duration::from_secs(15), || {
            status = http_get(port, "/status")
                .and_then(|(_, b)| serde_json::from_str(&b).ok())
                .unwrap_or_default();
            let read = status["server_read_at"].is_string();
            async move { read }
        })
        .await;
        assert!(polled, "{status}");
        assert_eq!(
            status["lag_bytes"].as_i64().expect("lag") as u64,
            lsn(&status["server_wal_lsn"]) - lsn(&status["server_confirmed_lsn"]),
            "{status}"
        );
        drop(relay);
        assert!(
            wait_for(Duration::from_secs(30), || async {
                pg.slot_active_pid("outboxd").await.is_none()
            })
            .await
        );
    }
}
