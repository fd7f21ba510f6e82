//! Black-box: the command line as a person meets it. Logs without colour codes when
//! stderr is not a terminal; `setup` prints its SQL without a database URL and applies
//! it without log lines or server NOTICEs; `check` warns (not ok, not FAIL) about an
//! unencrypted connection and a superuser; a second SIGINT stops at once; and
//! `outboxd healthcheck` (the image's HEALTHCHECK) answers for a running relay.
//! Real PostgreSQL and nats-server.

use crate::support;

use std::time::{Duration, Instant};

use support::secure::{http_port, outboxd};
use support::{config, insert_event, signal, wait_for, Nats, Postgres, Relay};

#[test]
fn setup_prints_its_sql_without_a_database_url() {
    // Given a config without any postgres URL
    let out = outboxd(Some("[sink]\nkind = \"stdout\"\n"), &["setup"], &[]);
    // Then setup prints the SQL (it connects nowhere), and exits 0
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stdout
            .contains("CREATE TABLE IF NOT EXISTS public.outbox")
            && out
                .stdout
                .contains("pg_create_logical_replication_slot('outboxd', 'pgoutput')"),
        "{}",
        out.stdout
    );
    // but --apply still needs one, and says which key
    let out = outboxd(
        Some("[sink]\nkind = \"stdout\"\n"),
        &["setup", "--apply"],
        &[],
    );
    assert_eq!(out.code, Some(78), "{}", out.all());
    assert!(
        out.stderr.contains("postgres.url: missing"),
        "{}",
        out.all()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_and_check_speak_to_a_person() {
    let pg = Postgres::start();
    // (a JSON log format must not leak into what setup and check print)
    let cfg = config(&pg, None, &[("log", "format", "\"json\"")]);
    // When setup --apply runs twice (the second time everything exists: the server
    // sends NOTICEs)
    for _ in 0..2 {
        let out = outboxd(Some(&cfg), &["setup", "--apply"], &[]);
        assert_eq!(out.code, Some(0), "{}", out.all());
        // Then it prints what it did, with no log line and no NOTICE
        assert!(out.stdout.contains("applied:"), "{}", out.all());
        for text in [&out.stdout, &out.stderr] {
            assert!(
                !text.contains("\"timestamp\"")
                    && !text.contains("NOTICE")
                    && !text.contains(".rs"),
                "{}",
                out.all()
            );
        }
    }
    // When check runs as a superuser over a connection without TLS
    let out = outboxd(Some(&cfg), &["check"], &[]);
    assert_eq!(out.code, Some(0), "only warnings: {}", out.all());
    let line = |name: &str| {
        out.stdout
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("no {name} line: {}", out.all()))
            .to_string()
    };
    // Then both are WARN, with the fix
    let tls = line("postgres tls");
    assert!(
        tls.starts_with("WARN") && tls.contains("postgres.tls.mode"),
        "{tls}"
    );
    let role = line("replication privilege");
    assert!(
        role.starts_with("WARN") && role.contains("superuser"),
        "{role}"
    );
    assert!(!out.all().contains("\"timestamp\""), "{}", out.all());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_have_no_colour_codes_when_stderr_is_not_a_terminal() {
    let pg = Postgres::start();
    pg.create_outbox().await;
    let cfg = config(&pg, None, &[("log", "format", "\"text\"")]);
    let relay = Relay::spawn(&cfg);
    pg.wait_streaming("outboxd").await;
    let log = relay.stderr();
    assert!(log.contains("outboxd starting"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a log file: {log:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigint_stops_at_once() {
    // Given a relay whose broker hangs with events in flight, so that the graceful
    // drain after a SIGINT would wait the whole shutdown_timeout_secs (60 s here)
    let pg = Postgres::start();
    pg.create_outbox().await;
    let nats = Nats::start();
    let cfg = config(&pg, Some(&nats), &[("sink", "shutdown_timeout_secs", "60")]);
    let mut relay = Relay::spawn(&cfg);
    pg.wait_streaming("outboxd").await;
    nats.freeze();
    let db = pg.client().await;
    for n in 0..20 {
        insert_event(&db, "o-1", n).await.expect("insert");
    }
    let port = http_port(&cfg);
    assert!(
        wait_for(Duration::from_secs(30), || async {
            support::scraped(port, |t| {
                support::metric(t, "outboxd_events_in_flight").unwrap_or(0.0) >= 1.0
            })
        })
        .await,
        "no event in flight"
    );
    // When it gets SIGINT, and a second one a moment later
    signal(relay.pid(), "INT");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = Instant::now();
    signal(relay.pid(), "INT");
    // Then it exits at once, non-zero, saying why
    let status = relay
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("still running 5 s after the second SIGINT"));
    nats.thaw();
    assert!(second.elapsed() < Duration::from_secs(5));
    assert!(!status.success(), "{status:?}");
    let log = relay.stderr();
    assert!(log.contains("second signal"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_answers_for_a_running_relay_and_fails_without_one() {
    let pg = Postgres::start();
    pg.create_outbox().await;
    let cfg = config(&pg, None, &[]);
    let mut relay = Relay::spawn(&cfg);
    pg.wait_streaming("outboxd").await;
    // When the image's HEALTHCHECK runs against the live relay, then it passes
    let out = outboxd(Some(&cfg), &["healthcheck"], &[]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    // and once the relay is gone it fails, saying what it probed
    relay.kill();
    let out = outboxd(Some(&cfg), &["healthcheck"], &[]);
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.stderr.contains("/healthz"), "{}", out.all());
}

/// deploy/compose/init.sql is PART 1 of `outboxd setup` for the compose relay, as
/// scripts/compose-init-sql.sh writes it (one DDL, no copy), and it works: applied by
/// the superuser to a fresh database, the relay streams as the least-privilege role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_init_sql_is_part_one_of_outboxd_setup() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().expect("tempdir");
    let generated = dir.path().join("init.sql");
    let status = std::process::Command::new("bash")
        .arg(root.join("scripts/compose-init-sql.sh"))
        .arg(&generated)
        .env("OUTBOXD", env!("CARGO_BIN_EXE_outboxd"))
        .status()
        .expect("run scripts/compose-init-sql.sh");
    assert!(status.success(), "scripts/compose-init-sql.sh failed");
    let committed =
        std::fs::read_to_string(root.join("deploy/compose/init.sql")).expect("init.sql");
    assert!(
        std::fs::read_to_string(&generated).expect("generated") == committed,
        "deploy/compose/init.sql differs from PART 1 of `outboxd setup`: run scripts/compose-init-sql.sh"
    );

    // and the DBA runbook's copy of the slot record table is the same DDL
    let runbook = std::fs::read_to_string(root.join("deploy/kubernetes/least-privilege.sql"))
        .expect("least-privilege.sql");
    let start = runbook
        .find("CREATE TABLE IF NOT EXISTS public.outboxd_slots")
        .expect("the runbook creates the slot record table");
    let ddl = &runbook[start..start + runbook[start..].find(";\n").expect("statement end") + 1];
    assert!(
        committed.contains(ddl),
        "deploy/kubernetes/least-privilege.sql's outboxd_slots differs from `outboxd setup`:\n{ddl}"
    );

    // Applied as the superuser, as the postgres image's initdb does
    let pg = Postgres::start();
    pg.client()
        .await
        .batch_execute(&committed)
        .await
        .expect("init.sql runs");
    // the relay, as the role it created, streams what the application writes
    let url = pg
        .url()
        .replace("postgres://postgres@", "postgres://outboxd:outboxd@");
    let relay = Relay::spawn(&config(
        &pg,
        None,
        &[
            ("postgres", "url", &format!("\"{url}\"")),
            ("postgres", "create_publication", "false"),
        ],
    ));
    pg.wait_streaming("outboxd").await;
    let id = insert_event(&pg.client().await, "o-1", 1)
        .await
        .expect("insert");
    assert!(
        wait_for(Duration::from_secs(20), || async {
            support::faults::stdout_ids(&relay).contains(&id)
        })
        .await,
        "the event did not arrive: {}",
        relay.stderr()
    );
    assert!(
        !relay.stderr().contains("superuser"),
        "the relay ran as a superuser: {}",
        relay.stderr()
    );
}
