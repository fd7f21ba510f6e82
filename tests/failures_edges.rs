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

use std::time::Duration;

use support::faults::{
    assert_no_panic, assert_outbox_delivered_once, final_error, insert_lsn, last_line, stdout_ids,
    SLOT,
};
use support::{config, free_port, insert_event, metric, scraped, wait_for, Nats, Postgres, Relay};

const STREAM: &str = "OUTBOX";

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
    let last = final_error(&mut relay, "after a mapped column was dropped").await;
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
    let last = final_error(&mut relay, "against a missing table").await;
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
    let last = final_error(&mut relay, "with a publication lacking the table").await;
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
    let last = final_error(&mut relay, "without REPLICATION").await;
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
    let last = final_error(&mut relay, "without REPLICATION").await;
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
            scraped(port, |t| broker_retries(t).unwrap_or(0.0) >= 3.0)
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
    let js = nats.jetstream().await;
    assert_outbox_delivered_once(&pg, &js, STREAM, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retyping_an_optional_column_stops_with_what_helps_and_that_helps() {
    // Given a relay (stdout sink) that relayed a row
    let pg = Postgres::start();
    pg.create_outbox().await;
    let cfg = config(&pg, None, &[]);
    let mut relay = Relay::spawn(&cfg);
    pg.wait_streaming(SLOT).await;
    let db = pg.client().await;
    let first = insert_event(&db, "o-1", 1).await.expect("insert");
    assert!(
        wait_for(Duration::from_secs(30), || async {
            stdout_ids(&relay) == vec![first.clone()]
        })
        .await
    );

    // When the mapped optional column created_at is retyped to text and a row written
    db.batch_execute("ALTER TABLE outbox ALTER COLUMN created_at TYPE text")
        .await
        .expect("retype");
    let second = insert_event(&db, "o-1", 2).await.expect("insert");
    // Then the relay stops naming the column, and says that changing the table back
    // does not help, and what does
    relay
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("stops");
    let last = last_line(&relay.stderr()).to_string();
    assert!(
        last.contains("created_at") && last.contains("does not help"),
        "{last}"
    );
    assert!(
        last.contains(r#"[postgres.columns] created_at = """#),
        "{last}"
    );
    // and indeed: with the table changed back, a restart stops the same way
    db.batch_execute(
        "ALTER TABLE outbox ALTER COLUMN created_at TYPE timestamptz USING created_at::timestamptz",
    )
    .await
    .expect("retype back");
    let third = insert_event(&db, "o-1", 3).await.expect("insert");
    let mut relay = Relay::spawn(&cfg);
    relay
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("stops again");
    assert!(last_line(&relay.stderr()).contains("created_at"));

    // When it runs with the column unmapped, as the message says
    let unmapped = config(&pg, None, &[("postgres.columns", "created_at", "\"\"")]);
    let relay = Relay::spawn(&unmapped);
    // Then the rows get past it (the first may come again: it was acknowledged, but
    // its confirmation may not have reached the server before the stop)
    let after_first = |relay: &Relay| -> Vec<String> {
        stdout_ids(relay)
            .into_iter()
            .filter(|id| *id != first)
            .collect()
    };
    assert!(
        wait_for(Duration::from_secs(30), || async {
            after_first(&relay) == vec![second.clone(), third.clone()]
        })
        .await,
        "{:?}\n{}",
        stdout_ids(&relay),
        relay.stderr()
    );
}
