//! Black-box: a relay role that may neither create nor write the slot's record
//! (`outboxd_slots`) still relays, but says at ERROR, and `check` says as a WARN, that
//! a slot lost while outboxd is stopped would go unnoticed, with the SQL the table
//! owner runs; once the owner has run it, the relay records its slot. Real PostgreSQL.

use crate::support;

use std::time::Duration;

use support::faults::{relay_log_lines, stdout_ids};
use support::secure::outboxd;
use support::{config, insert_event, wait_for, Postgres, Relay};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_may_not_keep_the_record_relays_and_names_the_sql() {
    // Given a REPLICATION role that may read the outbox but not create tables in its
    // schema (PostgreSQL 15+ revokes CREATE on public from PUBLIC; say so for 14)
    let pg = Postgres::start();
    pg.create_outbox().await;
    let owner = pg.client().await;
    owner
        .batch_execute(
            "REVOKE CREATE ON SCHEMA public FROM PUBLIC;
             CREATE ROLE relay LOGIN REPLICATION;
             GRANT SELECT ON public.outbox TO relay;
             CREATE PUBLICATION outboxd FOR TABLE public.outbox WITH (publish = 'insert');",
        )
        .await
        .expect("owner set-up");
    let url = format!("\"postgres://relay@127.0.0.1:{}/postgres\"", pg.port);
    let cfg = config(
        &pg,
        None,
        &[
            ("postgres", "url", &url),
            ("postgres", "create_publication", "false"),
        ],
    );
    let grant = "GRANT SELECT, INSERT, UPDATE ON public.outboxd_slots TO <relay role>";

    // When `check` runs, then the slot record line is a WARN naming the SQL
    let out = outboxd(Some(&cfg), &["check"], &[]);
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("slot record"))
        .unwrap_or_else(|| panic!("no slot record line: {}", out.all()))
        .to_string();
    assert!(line.starts_with("WARN") && line.contains(grant), "{line}");

    // When the relay runs, then it relays, and says once at ERROR what the owner runs
    let relay = Relay::spawn(&cfg);
    pg.wait_streaming("outboxd").await;
    let id = insert_event(&owner, "o-1", 1).await.expect("insert");
    assert!(
        wait_for(Duration::from_secs(30), || async {
            stdout_ids(&relay).contains(&id)
        })
        .await,
        "{}",
        relay.stderr()
    );
    let said = relay_log_lines(&relay.stderr(), "cannot record its slot");
    assert_eq!(said.len(), 1, "{}", relay.stderr());
    assert!(
        said[0].contains("ERROR") && said[0].contains(grant),
        "{said:?}"
    );
    drop(relay);

    // When the owner runs that SQL (part 1 of `outboxd setup`) and the relay restarts
    let create = state_table_sql(&cfg);
    owner
        .batch_execute(&format!(
            "{create} GRANT SELECT, INSERT, UPDATE ON public.outboxd_slots TO relay;"
        ))
        .await
        .expect("owner runs the SQL");
    let relay = Relay::spawn(&cfg);
    // Then the slot is recorded, and nothing is said about it any more
    assert!(
        wait_for(Duration::from_secs(30), || async {
            owner
                .query_opt(
                    "SELECT 1 FROM public.outboxd_slots WHERE slot_name = 'outboxd'",
                    &[],
                )
                .await
                .expect("read the record")
                .is_some()
        })
        .await,
        "{}",
        relay.stderr()
    );
    assert!(relay_log_lines(&relay.stderr(), "cannot record its slot").is_empty());
}

/// The state table's `CREATE TABLE` as `outboxd setup` prints it.
fn state_table_sql(cfg: &str) -> String {
    let setup = outboxd(Some(cfg), &["setup"], &[]);
    setup
        .stdout
        .split("CREATE TABLE IF NOT EXISTS public.outboxd_slots")
        .nth(1)
        .and_then(|rest| rest.split(");").next())
        .map(|cols| format!("CREATE TABLE IF NOT EXISTS public.outboxd_slots{cols});"))
        .unwrap_or_else(|| panic!("setup prints no state table: {}", setup.all()))
}

/// Replicas of one deployment start together and race to create the record's table:
/// `CREATE TABLE IF NOT EXISTS` is not atomic, the losers wait for the winner and then
/// fail on the catalog's unique index. Every replica must come up (one streaming, the
/// others standing by), none may exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_racing_to_create_the_record_all_come_up() {
    let role = |port: u16| {
        support::http_get(port, "/status").and_then(|(_, body)| {
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            v["role"].as_str().map(str::to_string)
        })
    };
    // Given a fresh database where another replica is creating the state table (a
    // transaction holds it uncommitted, so the race is certain rather than lucky)
    let pg = Postgres::start();
    pg.create_outbox().await;
    let cfg = config(&pg, None, &[]);
    let mut winner = pg.client().await;
    let tx = winner.transaction().await.expect("begin");
    tx.batch_execute(&state_table_sql(&cfg))
        .await
        .expect("create uncommitted");

    // When three replicas start and reach their own CREATE
    let mut replicas: Vec<(Relay, u16)> = (0..3)
        .map(|_| {
            let port = support::free_port();
            let listen = format!("\"127.0.0.1:{port}\"");
            (
                Relay::spawn(&config(&pg, None, &[("http", "listen", &listen)])),
                port,
            )
        })
        .collect();
    let db = pg.client().await;
    let waiting = wait_for(Duration::from_secs(30), || async {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND query LIKE 'CREATE TABLE IF NOT EXISTS public.outboxd_slots%'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        n == 3
    })
    .await;
    assert!(waiting, "the replicas wait on the winner's CREATE");
    // and the winner commits
    tx.commit().await.expect("commit");

    // Then each answers as the streaming one or a standby, and none has exited
    for (relay, port) in replicas.iter_mut() {
        let up = wait_for(Duration::from_secs(30), || {
            let r = role(*port);
            async move { matches!(r.as_deref(), Some("streaming" | "standby")) }
        })
        .await;
        assert!(
            up && relay.try_exit().is_none(),
            "a replica did not come up (role {:?}, exit {:?}): {}",
            role(*port),
            relay.try_exit(),
            relay.stderr()
        );
    }
    let streaming = replicas
        .iter()
        .filter(|(_, port)| role(*port).as_deref() == Some("streaming"))
        .count();
    assert_eq!(streaming, 1, "exactly one streams");
}
