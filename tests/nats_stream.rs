//! Black-box: the JetStream stream outboxd creates carries the configured limits
//! (`nats.stream_*`), and `outboxd check` warns about an existing stream whose
//! duplicate window cannot cover a restart, or that has no limits at all. Real
//! PostgreSQL and nats-server.

use crate::support;

use std::time::Duration;

use async_nats::jetstream::stream;
use support::secure::outboxd;
use support::{config, wait_for, Nats, Postgres, Relay};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_outboxd_creates_has_the_configured_limits() {
    // Given a relay configured with stream limits and no stream yet
    let pg = Postgres::start();
    pg.create_outbox().await;
    let nats = Nats::start();
    let cfg = config(
        &pg,
        Some(&nats),
        &[
            ("nats", "stream_max_age_secs", "86400"),
            ("nats", "stream_max_bytes", "1073741824"),
            ("nats", "stream_duplicate_window_secs", "600"),
            ("nats", "stream_storage", "\"memory\""),
            ("nats", "stream_replicas", "1"),
        ],
    );
    let relay = Relay::spawn(&cfg);
    pg.wait_streaming("outboxd").await;

    // Then the stream it created has them
    let js = nats.jetstream().await;
    assert!(
        wait_for(Duration::from_secs(20), || async {
            support::stream_len(&js, "OUTBOX").await == 0 && js.get_stream("OUTBOX").await.is_ok()
        })
        .await,
        "no stream: {}",
        relay.stderr()
    );
    let c = js
        .get_stream("OUTBOX")
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .config
        .clone();
    assert_eq!(c.max_age, Duration::from_secs(86400));
    assert_eq!(c.max_bytes, 1_073_741_824);
    assert_eq!(c.duplicate_window, Duration::from_secs(600));
    assert_eq!(c.storage, stream::StorageType::Memory);
    assert_eq!(c.num_replicas, 1);
    assert_eq!(c.subjects, vec!["outbox.>".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_about_a_short_duplicate_window_and_a_stream_without_limits() {
    let pg = Postgres::start();
    pg.create_outbox().await;
    let nats = Nats::start();
    let js = nats.jetstream().await;
    let cfg = config(&pg, Some(&nats), &[("nats", "create_stream", "false")]);
    let stream_line = |out: &support::secure::Output| {
        out.stdout
            .lines()
            .find(|l| l.contains("nats stream"))
            .unwrap_or_else(|| panic!("no nats stream line: {}", out.all()))
            .to_string()
    };

    // Given an existing stream with a 1 s duplicate window and no limits
    js.create_stream(stream::Config {
        name: "OUTBOX".into(),
        subjects: vec!["outbox.>".into()],
        duplicate_window: Duration::from_secs(1),
        ..Default::default()
    })
    .await
    .expect("create stream");
    // When check runs, then it warns about both, naming the fix
    let out = outboxd(Some(&cfg), &["check"], &[]);
    let line = stream_line(&out);
    assert!(line.starts_with("WARN"), "{line}");
    assert!(
        line.contains("duplicate window 1s") && line.contains("shutdown_timeout_secs"),
        "{line}"
    );
    assert!(line.contains("no limits"), "{line}");

    // Given the stream with a 10-minute window and a size limit
    js.update_stream(stream::Config {
        name: "OUTBOX".into(),
        subjects: vec!["outbox.>".into()],
        duplicate_window: Duration::from_secs(600),
        max_bytes: 1 << 30,
        ..Default::default()
    })
    .await
    .expect("update stream");
    // Then check says ok
    let out = outboxd(Some(&cfg), &["check"], &[]);
    let line = stream_line(&out);
    assert!(line.starts_with("ok"), "{line}\n{}", out.all());
}
