//! Black-box: poison rows and rejected events go where the config says (dead-letter
//! subject by default, or halt), are counted, and never stall or vanish.

use crate::support;

use std::time::Duration;

use support::secure::http_port;
use support::streaming::{ce_ids, read_at_least};
use support::{config, http_get, metric, stream_len, Nats, Postgres, Relay};

/// An outbox whose payload is text with a per-row content type, so a row can lie
/// about its payload.
const TEXT_OUTBOX: &str = "CREATE TABLE public.outbox (
    id text PRIMARY KEY,
    aggregate_type text NOT NULL,
    aggregate_id text NOT NULL,
    event_type text,
    payload text NOT NULL,
    content_type text NOT NULL DEFAULT 'application/json'
)";

async fn insert(pg: &Postgres, id: &str, event_type: Option<&str>, payload: &str) {
    pg.client()
        .await
        .execute(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) \
             VALUES ($1, 'Order', 'o-1', $2, $3)",
            &[&id, &event_type, &payload],
        )
        .await
        .expect("insert");
}

fn data(m: &support::Received) -> serde_json::Value {
    serde_json::from_slice(&m.payload).expect("json body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_rows_go_to_the_dead_letter_subject_in_order() {
    let pg = Postgres::start_with_outbox(TEXT_OUTBOX).await;
    let nats = Nats::start();
    let cfg = config(
        &pg,
        Some(&nats),
        &[("postgres.columns", "content_type", "\"content_type\"")],
    );
    let _relay = Relay::spawn(&cfg);
    pg.wait_streaming("outboxd").await;
    let port = http_port(&cfg);

    // Given a good row, a row without a type, a row whose payload is not JSON, a good row
    insert(&pg, "good-1", Some("Created"), r#"{"n": 1}"#).await;
    insert(&pg, "no-type", None, r#"{"n": 2}"#).await;
    insert(&pg, "not-json", Some("Updated"), "{oops").await;
    insert(&pg, "good-2", Some("Updated"), r#"{"n": 3}"#).await;

    // Then all four arrive, in order, the two poison rows as dead letters
    let js = nats.jetstream().await;
    let msgs = read_at_least(&js, "OUTBOX", 4).await;
    assert_eq!(ce_ids(&msgs), ["good-1", "no-type", "not-json", "good-2"]);
    for (m, reason) in [(&msgs[1], "invalid_row"), (&msgs[2], "payload_not_json")] {
        assert_eq!(m.subject, "outbox.deadletter");
        assert_eq!(m.header("ce-type"), Some("io.outboxd.deadletter"));
        assert_eq!(m.header("ce-deadletterreason"), Some(reason));
        assert_eq!(m.header("ce-subject"), Some("o-1"));
        let d = data(m);
        assert_eq!(d["reason"], reason);
        assert!(d["error"].as_str().is_some_and(|e| !e.is_empty()), "{d}");
        assert_eq!(d["row"]["id"], m.header("ce-id").expect("id"), "{d}");
    }
    assert_eq!(
        data(&msgs[2])["row"]["payload"],
        "{oops",
        "the original row is kept"
    );
    assert_eq!(msgs[3].subject, "outbox.Order");

    // and they are counted
    let text = http_get(port, "/metrics").expect("scrape").1;
    assert_eq!(
        metric(&text, r#"outboxd_dead_letters_total{reason="invalid_row"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"outboxd_dead_letters_total{reason="payload_not_json"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"outboxd_poison_events_total{action="dead_letter",reason="invalid_row"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halt_policy_stops_before_the_row_and_names_it() {
    let pg = Postgres::start_with_outbox(TEXT_OUTBOX).await;
    let nats = Nats::start();
    let mut relay = Relay::spawn(&config(
        &pg,
        Some(&nats),
        &[("sink", "on_invalid", "\"halt\"")],
    ));
    pg.wait_streaming("outboxd").await;

    // Given a good row, then a row without a type
    insert(&pg, "good-1", Some("Created"), r#"{"n": 1}"#).await;
    let js = nats.jetstream().await;
    read_at_least(&js, "OUTBOX", 1).await;
    let before_bad = pg.current_lsn().await;
    insert(&pg, "no-type-7", None, r#"{"n": 2}"#).await;

    // Then the relay stops with an error naming the row and the fix
    let status = relay
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("relay exits");
    assert!(!status.success());
    let err = relay.stderr();
    assert!(
        err.contains("no-type-7") && err.contains("event_type is null"),
        "{err}"
    );
    assert!(err.contains("on_invalid"), "names the policy key: {err}");
    assert!(!err.contains("panicked"), "{err}");
    // and the slot did not move past the row
    assert!(pg.confirmed_lsn("outboxd").await.expect("slot") <= before_bad);
    assert_eq!(stream_len(&js, "OUTBOX").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_larger_than_the_stream_allows_becomes_a_dead_letter() {
    let pg = Postgres::start();
    pg.create_outbox().await;
    let nats = Nats::start();
    // Given a stream that refuses messages over 2 KiB
    let js = nats.jetstream().await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "OUTBOX".into(),
        subjects: vec!["outbox.>".into()],
        max_message_size: 2048,
        ..Default::default()
    })
    .await
    .expect("stream");
    let _relay = Relay::spawn(&config(&pg, Some(&nats), &[]));
    pg.wait_streaming("outboxd").await;

    // When a 10 KiB event sits between two small ones of the same aggregate
    let db = pg.client().await;
    for (i, size) in [(1, 10), (2, 10_000), (3, 10)] {
        db.execute(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) \
             VALUES (('00000000-0000-4000-8000-00000000000' || $1::text)::uuid, 'Order', 'o-1', 'T', \
                     jsonb_build_object('pad', repeat('x', $2::int)))",
            &[&i.to_string(), &size],
        )
        .await
        .expect("insert");
    }

    // Then the big one arrives as a dead letter without its data, in order
    let msgs = read_at_least(&js, "OUTBOX", 3).await;
    assert_eq!(msgs.len(), 3);
    assert_eq!(msgs[0].subject, "outbox.Order");
    assert_eq!(msgs[1].subject, "outbox.deadletter");
    assert_eq!(msgs[1].header("ce-deadletterreason"), Some("too_large"));
    assert_eq!(
        msgs[1].header("ce-id"),
        Some("00000000-0000-4000-8000-000000000002")
    );
    let d = data(&msgs[1]);
    assert_eq!(d["event"]["id"], "00000000-0000-4000-8000-000000000002");
    assert!(
        d["event"].get("data").is_none(),
        "the refused data is not resent: {d}"
    );
    assert!(d["data_size"].as_u64().unwrap_or(0) > 10_000);
    assert_eq!(msgs[2].subject, "outbox.Order");
}
