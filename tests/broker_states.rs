//! Black-box: what `/status`, `/readyz`, the metrics and the log say while the broker
//! is down, its stream is gone or full, and after it recovers (README, "Failure
//! behaviour"); a JetStream stream deleted at runtime is re-created. Real PostgreSQL
//! and nats-server.

use crate::support;

use std::time::Duration;

use async_nats::jetstream::stream;
use support::faults::relay_log_lines;
use support::secure::http_port;
use support::{
    config, http_get, insert_event, metric, read_stream, stream_len, wait_for, Nats, Postgres,
    Relay,
};

fn status(port: u16) -> serde_json::Value {
    let (code, body) = http_get(port, "/status").expect("/status answers");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("json")
}

fn scrape(port: u16) -> String {
    http_get(port, "/metrics").expect("/metrics answers").1
}

async fn insert_rows(pg: &Postgres, aggregate: &str, n: i64) -> Vec<String> {
    let db = pg.client().await;
    let mut ids = Vec::new();
    for i in 1..=n {
        ids.push(insert_event(&db, aggregate, i).await.expect("insert"));
    }
    ids
}

/// Waits until `/status` says the sink is in `state`.
async fn sink_state(port: u16, state: &str) -> serde_json::Value {
    assert!(
        wait_for(Duration::from_secs(30), || async {
            status(port)["sink"]["state"] == state
        })
        .await,
        "sink never {state}: {}",
        status(port)
    );
    status(port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_deleted_at_runtime_is_recreated_and_later_events_arrive() {
    // Given a relay that created its stream and delivered 3 events
    let pg = Postgres::start();
    pg.create_outbox().await;
    let nats = Nats::start();
    let cfg = config(&pg, Some(&nats), &[]);
    let relay = Relay::spawn(&cfg);
    pg.wait_streaming("outboxd").await;
    insert_rows(&pg, "o-1", 3).await;
    let js = nats.jetstream().await;
    assert!(
        wait_for(Duration::from_secs(30), || async {
            stream_len(&js, "OUTBOX").await == 3
        })
        .await
    );

    // When an operator deletes the stream and rows keep coming
    js.delete_stream("OUTBOX").await.expect("delete stream");
    let later = insert_rows(&pg, "o-2", 5).await;

    // Then the stream is re-created (nats.create_stream) and every later event is in it
    assert!(
        wait_for(Duration::from_secs(30), || async {
            stream_len(&js, "OUTBOX").await >= 5
        })
        .await,
        "stream not re-created: {}",
        relay.stderr()
    );
    let ids: Vec<String> = read_stream(&js, "OUTBOX")
        .await
        .iter()
        .filter_map(|m| m.header("ce-id").map(str::to_string))
        .collect();
    assert_eq!(ids, later);
    // and the log says what happened
    let said = relay_log_lines(&relay.stderr(), "re-created it");
    assert!(!said.is_empty(), "{}", relay.stderr());
    assert_eq!(status(http_port(&cfg))["sink"]["state"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_metrics_and_log_tell_the_truth_through_outage_missing_and_full_stream() {
    // Given a relay to a stream created by the operator (nats.create_stream = false)
    let pg = Postgres::start();
    pg.create_outbox().await;
    let mut nats = Nats::start();
    let js = nats.jetstream().await;
    let stream_config = stream::Config {
        name: "OUTBOX".into(),
        subjects: vec!["outbox.>".into()],
        ..Default::default()
    };
    js.create_stream(stream_config.clone())
        .await
        .expect("stream");
    let cfg = config(
        &pg,
        Some(&nats),
        &[
            ("nats", "create_stream", "false"),
            ("nats", "ack_timeout_ms", "500"),
        ],
    );
    let port = http_port(&cfg);
    let relay = Relay::spawn(&cfg);
    pg.wait_streaming("outboxd").await;
    insert_rows(&pg, "o-0", 2).await;
    assert!(
        wait_for(Duration::from_secs(30), || async {
            stream_len(&js, "OUTBOX").await == 2
        })
        .await
    );
    let s = status(port);
    assert_eq!(s["sink"]["state"], "ok", "{s}");
    assert_eq!(metric(&scrape(port), "outboxd_sink_failing"), Some(0.0));

    // When the broker is down while 50 events wait
    nats.stop();
    insert_rows(&pg, "o-1", 50).await;
    // Then /status says the sink fails, with its error, and the gauge is 1
    let s = sink_state(port, "failing").await;
    assert!(
        s["sink"]["failed_attempts"].as_u64().unwrap_or(0) >= 1,
        "{s}"
    );
    assert!(
        s["sink"]["error"].is_string() && s["last_error"].is_string(),
        "{s}"
    );
    assert!(s["sink"]["failing_since"].is_string(), "{s}");
    assert_eq!(metric(&scrape(port), "outboxd_sink_failing"), Some(1.0));
    // while a sidecar stays ready, and says why it is degraded
    let (code, body) = http_get(port, "/readyz").expect("readyz");
    assert_eq!(code, 200);
    assert!(body.contains("publishing fails since"), "{body}");

    // When the broker is back
    nats.resume();
    let s = sink_state(port, "ok").await;
    assert!(s["sink"]["error"].is_null(), "{s}");
    assert!(
        wait_for(Duration::from_secs(30), || async {
            stream_len(&nats.jetstream().await, "OUTBOX").await == 52
        })
        .await
    );
    let text = scrape(port);
    // Then the reconnect was counted and the gauge is back to 0
    assert!(
        metric(&text, r#"outboxd_reconnects_total{component="broker"}"#).unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    assert_eq!(metric(&text, "outboxd_sink_failing"), Some(0.0));
    // and the log said it once per failure, not once per event and retry
    // (a publish sent just before the reconnect may still time out after the first
    // success: a second, short failure, logged as such)
    let log = relay.stderr();
    let failures = relay_log_lines(&log, "publishing fails;").len();
    assert!((1..=3).contains(&failures), "{log}");
    assert_eq!(
        relay_log_lines(&log, "publishing recovered").len(),
        failures,
        "{log}"
    );
    let per_event: Vec<String> = relay_log_lines(&log, "publish failed; retrying")
        .into_iter()
        .filter(|l| !l.contains("DEBUG"))
        .collect();
    assert!(per_event.is_empty(), "{per_event:?}");

    // When the stream is deleted (and create_stream is off)
    let js = nats.jetstream().await;
    js.delete_stream("OUTBOX").await.expect("delete");
    insert_rows(&pg, "o-2", 3).await;
    // Then /status names the missing stream
    let s = sink_state(port, "failing").await;
    assert!(
        s["sink"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("no_stream")),
        "{s}"
    );
    // until the operator creates it again, with a limit that it soon reaches
    js.create_stream(stream::Config {
        max_messages: 3,
        discard: stream::DiscardPolicy::New,
        ..stream_config.clone()
    })
    .await
    .expect("stream");
    sink_state(port, "ok").await;
    assert!(
        wait_for(Duration::from_secs(30), || async {
            stream_len(&js, "OUTBOX").await == 3
        })
        .await
    );

    // When the stream is full and refuses new messages
    insert_rows(&pg, "o-3", 2).await;
    // Then the sink is failing again, with the broker's reason
    let s = sink_state(port, "failing").await;
    assert!(
        s["sink"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("maximum messages")),
        "{s}"
    );
    // and once the operator lifts the limit, everything arrives
    js.update_stream(stream::Config {
        max_messages: -1,
        ..stream_config
    })
    .await
    .expect("update");
    sink_state(port, "ok").await;
    assert!(
        wait_for(Duration::from_secs(30), || async {
            stream_len(&js, "OUTBOX").await == 5
        })
        .await
    );
}
