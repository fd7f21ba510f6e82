//! Black-box: an outbox table dropped and created again, or removed from the
//! publication, while outboxd streams. Rows written to it meanwhile are not decoded,
//! so outboxd stops streaming, waits for an operator (alive, not ready, saying what
//! happened and what recovers, also after plain restarts) and `--resync-table`
//! publishes the table's rows before streaming on. Real PostgreSQL and nats-server.

use crate::support;

use std::collections::HashSet;
use std::time::Duration;

use support::faults::blocked;
use support::secure::http_port;
use support::streaming::{insert_events, streaming, wait_stream_len};
use support::{
    assert_per_aggregate_order, http_get, insert_event, outbox_ddl, read_stream, wait_for, Nats,
    Relay,
};

/// The ids in the stream.
async fn ids(nats: &Nats) -> HashSet<String> {
    read_stream(&nats.jetstream().await, "OUTBOX")
        .await
        .iter()
        .filter_map(|m| m.header("ce-id").map(str::to_string))
        .collect()
}

/// Runs the scenario: a relay delivered 2 events, then `change` happens to the table
/// while it streams and rows are written; the relay must notice, wait across a plain
/// restart, and a restart with `--resync-table` must deliver every row.
async fn changed_table_is_noticed_and_resynced(change: &str, says: &str) {
    // Given a relay that delivered 2 events
    let (pg, nats, cfg, mut relay) = streaming(&[("postgres", "monitor_interval_secs", "1")]).await;
    let db = pg.client().await;
    insert_events(&db, "t-1", 1..=2).await;
    assert!(wait_stream_len(&nats.jetstream().await, "OUTBOX", 2).await);

    // When the table changes while it streams, and 9 rows are written to it
    db.batch_execute(change).await.expect("change");
    let mut written = HashSet::new();
    for n in 1..=9 {
        let agg = format!("t-{}", n % 3);
        written.insert(insert_event(&db, &agg, 10 + n).await.expect("insert"));
    }

    // Then the relay notices within its monitor interval, stops and waits
    let problem = blocked(&cfg).await;
    assert!(problem.contains(says), "{problem}");
    assert!(problem.contains("--resync-table"), "{problem}");
    let err = relay.stderr();
    assert!(
        !support::faults::relay_log_lines(&err, "waits for an operator").is_empty(),
        "{err}"
    );
    // and even once the table is back in the publication, a plain restart still waits
    db.batch_execute("ALTER PUBLICATION outboxd ADD TABLE public.outbox")
        .await
        .expect("add table");
    written.insert(insert_event(&db, "t-1", 30).await.expect("insert"));
    relay.terminate(Duration::from_secs(20)).expect("stops");
    let mut relay = Relay::spawn(&cfg);
    let again = blocked(&cfg).await;
    assert!(
        again.contains(says) && again.contains("--resync-table"),
        "{again}"
    );
    relay.terminate(Duration::from_secs(20)).expect("stops");

    // When the operator restarts it with --resync-table
    let _relay = Relay::spawn_with_args(&cfg, &["--resync-table"]);
    let later = insert_event(&db, "t-2", 40).await.expect("insert");
    written.insert(later);

    // Then every row written to the table since arrives, in order per aggregate
    assert!(
        wait_for(Duration::from_secs(60), || async {
            written.is_subset(&ids(&nats).await)
        })
        .await,
        "missing: {:?}",
        written.difference(&ids(&nats).await).collect::<Vec<_>>()
    );
    assert_per_aggregate_order(&read_stream(&nats.jetstream().await, "OUTBOX").await);
    // and the relay streams again, ready
    let port = http_port(&cfg);
    assert!(
        wait_for(Duration::from_secs(30), || async {
            http_get(port, "/readyz").is_some_and(|(code, _)| code == 200)
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_dropped_and_created_again_is_noticed_and_resynced() {
    let change = format!("DROP TABLE public.outbox; {}", outbox_ddl());
    changed_table_is_noticed_and_resynced(&change, "dropped and created again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_removed_from_the_publication_is_noticed_and_resynced() {
    changed_table_is_noticed_and_resynced(
        "ALTER PUBLICATION outboxd DROP TABLE public.outbox",
        "removed from the publication",
    )
    .await;
}
