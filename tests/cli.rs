//! Black-box: the command line. Bad configuration, `check`, `setup`, `--help`, and
//! the stdout sink (the relay with nothing but Postgres).

use crate::support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use support::{config, wait_for, Postgres, Relay};

/// `outboxd <args>`, with `config_text`, when given, written into `dir` and passed as
/// `--config`.
fn command(dir: &Path, args: &[&str], config_text: Option<&str>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outboxd"));
    cmd.args(args);
    if let Some(text) = config_text {
        let path = dir.join("outboxd.toml");
        std::fs::write(&path, text).expect("write config");
        cmd.arg("--config").arg(path);
    }
    cmd
}

fn outboxd(args: &[&str], config_text: Option<&str>, env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = command(dir.path(), args, config_text);
    cmd.envs(env.iter().copied());
    cmd.env_remove("OUTBOXD_CONFIG")
        .output()
        .expect("run outboxd")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn unknown_key_exits_non_zero_naming_the_key() {
    let o = outboxd(
        &["run"],
        Some("[postgres]\nurl = \"postgres://h/db\"\nslott = \"x\"\n"),
        &[],
    );
    assert_eq!(o.status.code(), Some(78));
    let e = stderr(&o);
    assert!(e.contains("postgres") && e.contains("slott"), "{e}");
}

#[test]
fn missing_url_exits_non_zero_naming_the_key() {
    let o = outboxd(&["check"], Some("[sink]\nkind = \"stdout\"\n"), &[]);
    assert_eq!(o.status.code(), Some(78));
    assert!(
        stderr(&o).contains("postgres.url: missing"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn wrong_type_exits_non_zero_naming_the_key() {
    let o = outboxd(
        &["run"],
        Some("[postgres]\nurl = \"postgres://h/db\"\n[sink]\nmax_in_flight = \"lots\"\n"),
        &[],
    );
    assert_eq!(o.status.code(), Some(78));
    assert!(stderr(&o).contains("sink.max_in_flight"), "{}", stderr(&o));
}

#[test]
fn env_wrong_value_is_named_and_secret_url_never_printed() {
    let o = outboxd(
        &["run"],
        None,
        &[
            (
                "OUTBOXD_POSTGRES__URL",
                "postgres://relay:s3cr3t-pw@127.0.0.1:1/db",
            ),
            ("OUTBOXD_SINK__KIND", "carrier-pigeon"),
        ],
    );
    assert_eq!(o.status.code(), Some(78));
    let e = stderr(&o);
    assert!(e.contains("sink.kind"), "{e}");
    assert!(!e.contains("s3cr3t-pw"), "secret leaked: {e}");
}

#[test]
fn help_explains_every_command() {
    let o = outboxd(&["--help"], None, &[]);
    let out = stdout(&o);
    for word in ["run", "check", "setup", "OUTBOXD_"] {
        assert!(out.contains(word), "--help lacks {word}: {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_wal_level_replica_with_the_fix() {
    let pg = Postgres::start_with("replica");
    pg.create_outbox().await;
    let o = outboxd(&["check"], Some(&config(&pg, None, &[])), &[]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("FAIL wal_level"), "{out}");
    assert!(out.contains("must be logical"), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("ok   outbox table")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_apply_then_check_passes() {
    let pg = Postgres::start();
    let cfg = config(&pg, None, &[]);
    // Given an empty database, check fails naming the missing table
    let o = outboxd(&["check"], Some(&cfg), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("FAIL outbox table"), "{}", stdout(&o));
    // setup prints the SQL without touching the database
    let o = outboxd(&["setup"], Some(&cfg), &[]);
    assert!(o.status.success());
    let sql = stdout(&o);
    assert!(
        sql.contains("CREATE TABLE IF NOT EXISTS public.outbox"),
        "{sql}"
    );
    assert!(sql.contains("WITH (publish = 'insert')"), "{sql}");
    // setup --apply creates table and publication (twice: idempotent), and leaves the
    // slot to `run`, whose initial snapshot (the default) publishes what the table holds
    for _ in 0..2 {
        let o = outboxd(&["setup", "--apply"], Some(&cfg), &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            stdout(&o).contains("left to `outboxd run`"),
            "{}",
            stdout(&o)
        );
    }
    let o = outboxd(&["check"], Some(&cfg), &[]);
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(!stdout(&o).contains("FAIL"), "{}", stdout(&o));
    assert_eq!(pg.confirmed_lsn("outboxd").await, None, "slot left to run");
    // With the initial snapshot off, setup --apply creates the slot too
    let no_snapshot = config(&pg, None, &[("postgres", "initial_snapshot", "false")]);
    let o = outboxd(&["setup", "--apply"], Some(&no_snapshot), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = outboxd(&["check"], Some(&no_snapshot), &[]);
    assert!(!stdout(&o).contains("FAIL"), "{}", stdout(&o));
    assert!(pg.confirmed_lsn("outboxd").await.is_some(), "slot created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_sink_prints_one_structured_event_per_line() {
    let pg = Postgres::start();
    pg.create_outbox().await;
    let relay = Relay::spawn(&config(
        &pg,
        None,
        &[("cloudevents", "type_prefix", "\"com.example.\"")],
    ));
    pg.wait_streaming("outboxd").await;
    let db = pg.client().await;
    db.batch_execute(
        "BEGIN;
         INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers)
           VALUES ('Order', 'o-1', 'OrderCreated', '{\"total\": 3}', '{\"traceparent\": \"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\"}');
         INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
           VALUES ('Order', 'o-1', 'OrderPaid', '{\"amount\": 3}');
         COMMIT;",
    )
    .await
    .expect("insert");
    assert!(
        wait_for(Duration::from_secs(20), || async {
            relay.stdout().lines().count() >= 2
        })
        .await
    );
    let lines: Vec<serde_json::Value> = relay
        .stdout()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON event"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["type"], "com.example.OrderCreated");
    assert_eq!(
        lines[0]["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    assert_eq!(lines[0]["data"]["total"], 3);
    assert_eq!(lines[1]["type"], "com.example.OrderPaid");
    assert_eq!(lines[1]["source"], "/test/orders");
    assert!(
        !relay.stderr().contains("{\"total\""),
        "payloads are never logged"
    );
}

#[test]
fn a_librdkafka_property_it_refuses_exits_78_naming_the_key() {
    let kafka = |props: &str| {
        format!(
            "[postgres]\nurl = \"postgres://h/db\"\n[sink]\nkind = \"kafka\"\n\
             [kafka]\nbrokers = \"127.0.0.1:1\"\n[kafka.properties]\n{props}\n"
        )
    };
    // An unknown property: named, exit 78, before anything connects
    let o = outboxd(&["run"], Some(&kafka("\"foo.bar\" = \"1\"")), &[]);
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("kafka.properties.\"foo.bar\": librdkafka refuses it"),
        "{}",
        stderr(&o)
    );
    // A value it refuses: named, and the (not secret) value is shown, not blanked
    let o = outboxd(
        &["check"],
        Some(&kafka("\"compression.type\" = \"zstdx\"")),
        &[],
    );
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("kafka.properties.\"compression.type\"")
            && e.contains("\"zstdx\"")
            && !e.contains("[redacted]"),
        "{e}"
    );
}

#[test]
fn every_shipped_config_file_loads() {
    // Given the example configs of config/ and deploy/, when outboxd loads each one
    let mut files = Vec::new();
    for dir in ["config", "deploy/compose"] {
        for entry in std::fs::read_dir(dir).expect("dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                files.push(path);
            }
        }
    }
    assert!(files.len() >= 3, "{files:?}");
    // A NATS URL is parsed as a server address, so it needs a NATS URL of its own.
    let nats_url = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(nats_url.path(), "nats://127.0.0.1:4222\n").expect("write");
    for f in files {
        let o = Command::new(env!("CARGO_BIN_EXE_outboxd"))
            .args(["setup", "--config"])
            .arg(&f)
            .env_remove("OUTBOXD_CONFIG")
            // The compose files read the URL from a container path; point it here.
            .env("OUTBOXD_POSTGRES__URL_FILE", "deploy/compose/postgres-url")
            .env("OUTBOXD_NATS__URL_FILE", nats_url.path())
            .output()
            .expect("run");
        // Then it validates (setup only prints SQL, it connects nowhere)
        assert!(o.status.success(), "{}: {}", f.display(), stderr(&o));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_slot_is_refused_before_postgres_17_and_created_from_17_on() {
    // Given failover_slot = true on the server under test (the version matrix runs
    // this on 14 to 18: both sides)
    let pg = Postgres::start();
    let major = pg.major().await;
    // (initial_snapshot off: setup then creates the slot itself)
    let cfg = config(
        &pg,
        None,
        &[
            ("postgres", "failover_slot", "true"),
            ("postgres", "initial_snapshot", "false"),
        ],
    );
    // When setup creates the slot
    let o = outboxd(&["setup", "--apply"], Some(&cfg), &[]);
    if major < 17 {
        // Then before 17 it fails naming the requirement, and creates no slot
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains("needs PostgreSQL 17"), "{}", stderr(&o));
        assert_eq!(
            pg.confirmed_lsn("outboxd").await,
            None,
            "a slot was created"
        );
    } else {
        // Then from 17 on it succeeds, and the slot is a failover slot
        assert!(o.status.success(), "{}", stderr(&o));
        let failover: bool = pg
            .client()
            .await
            .query_one(
                "SELECT failover FROM pg_replication_slots WHERE slot_name = 'outboxd'",
                &[],
            )
            .await
            .expect("the slot exists")
            .get(0);
        assert!(failover, "slot created without failover = true");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_counts_rds_replication_membership_as_replication() {
    // Given a login role without the REPLICATION attribute, and a role named
    // rds_replication (how Amazon RDS and Aurora grant replication instead)
    let pg = Postgres::start();
    pg.create_outbox().await;
    let db = pg.client().await;
    db.batch_execute(
        "CREATE ROLE rds_replication NOLOGIN; CREATE ROLE relay LOGIN; \
         GRANT SELECT ON public.outbox TO relay;",
    )
    .await
    .expect("roles");
    let url = format!("\"postgres://relay@127.0.0.1:{}/postgres\"", pg.port);
    let cfg = config(&pg, None, &[("postgres", "url", &url)]);
    let replication_line = |o: &Output| {
        stdout(o)
            .lines()
            .find(|l| l.contains("replication privilege"))
            .unwrap_or_else(|| panic!("no replication line: {}", stdout(o)))
            .to_string()
    };
    // When check runs before the grant, then it fails naming both fixes
    let before = replication_line(&outboxd(&["check"], Some(&cfg), &[]));
    assert!(before.starts_with("FAIL"), "{before}");
    assert!(
        before.contains("ALTER ROLE relay REPLICATION")
            && before.contains("GRANT rds_replication TO relay"),
        "{before}"
    );
    // When the role is made a member of rds_replication, then that check passes
    db.batch_execute("GRANT rds_replication TO relay")
        .await
        .expect("grant");
    let after = replication_line(&outboxd(&["check"], Some(&cfg), &[]));
    assert!(after.starts_with("ok"), "{after}");
}

/// `outboxd <args>` with exactly the `OUTBOXD_*` variables of `env` (none inherited)
/// and, when given, `config_text` as `--config`.
fn outboxd_env(args: &[&str], config_text: Option<&str>, env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = command(dir.path(), args, config_text);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy()
            .to_ascii_uppercase()
            .starts_with("OUTBOXD_")
        {
            cmd.env_remove(k);
        }
    }
    cmd.env_remove("RUST_LOG");
    cmd.envs(env.iter().copied());
    cmd.output().expect("run outboxd")
}

/// A value that must never be shown, set through the environment.
const ENV_SECRET: &str = "envOnlySecret-5e1b";

#[test]
fn a_single_underscore_variable_is_named_with_the_one_meant() {
    // Given the URL in OUTBOXD_POSTGRES_URL (one underscore), the file in
    // OUTBOXD_CONFIG and the service links Kubernetes sets for a Service "outboxd"
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("outboxd.toml");
    std::fs::write(&file, "[log]\nformat = \"text\"\n").expect("write config");
    let url = format!("postgres://relay:{ENV_SECRET}@127.0.0.1:1/db");
    let o = outboxd_env(
        &["check"],
        None,
        &[
            ("OUTBOXD_POSTGRES_URL", &url),
            ("OUTBOXD_CONFIG", &file.display().to_string()),
            ("OUTBOXD_SERVICE_HOST", "10.0.0.7"),
            ("OUTBOXD_PORT_9187_TCP_ADDR", "10.0.0.7"),
        ],
    );
    // Then the error says the URL is missing and names the variable that was meant,
    // never its value, and nothing about the variables that are not keys
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(78), "{e}");
    assert!(e.contains("postgres.url: missing"), "{e}");
    assert!(
        e.contains("OUTBOXD_POSTGRES_URL sets no configuration key")
            && e.contains("did you mean OUTBOXD_POSTGRES__URL?"),
        "{e}"
    );
    assert!(!e.contains(ENV_SECRET), "{e}");
    for theirs in ["OUTBOXD_CONFIG", "OUTBOXD_SERVICE_HOST", "OUTBOXD_PORT_"] {
        assert!(!e.contains(theirs), "{theirs}: {e}");
    }
}

#[test]
fn variables_that_set_no_key_are_logged_once_logging_runs() {
    // Given a valid config and two variables with one underscore too few
    let cfg = "[postgres]\nurl = \"postgres://h/db\"\n[log]\nformat = \"text\"\n";
    let o = outboxd_env(
        &["setup"],
        Some(cfg),
        &[
            ("OUTBOXD_LOG_LEVEL", "debug"),
            ("OUTBOXD_NATS_PASSWORD", ENV_SECRET),
        ],
    );
    // Then the command works and the log warns about each, with the name meant
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    for (set, meant) in [
        ("OUTBOXD_LOG_LEVEL", "OUTBOXD_LOG__LEVEL"),
        ("OUTBOXD_NATS_PASSWORD", "OUTBOXD_NATS__PASSWORD"),
    ] {
        assert!(
            e.lines()
                .any(|l| l.contains("WARN") && l.contains(set) && l.contains(meant)),
            "{set}: {e}"
        );
    }
    assert!(
        !e.contains(ENV_SECRET) && !stdout(&o).contains(ENV_SECRET),
        "{e}"
    );
}

#[test]
fn a_misspelt_key_in_a_variable_gets_the_one_meant() {
    let o = outboxd_env(
        &["check"],
        Some("[postgres]\nurl = \"postgres://h/db\"\n"),
        &[("OUTBOXD_POSTGRES__SLOTT", "other")],
    );
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(78), "{e}");
    assert!(e.contains("slott"), "{e}");
    assert!(e.contains("did you mean OUTBOXD_POSTGRES__SLOT?"), "{e}");
}

#[test]
fn a_digits_only_or_boolean_secret_from_the_environment_gets_a_quoting_hint() {
    let cfg = "[postgres]\nurl = \"postgres://h/db\"\n[sink]\nkind = \"nats\"\n\
               [nats]\nuser = \"outboxd\"\n";
    for (var, value, file_key) in [
        ("OUTBOXD_NATS__PASSWORD", "0123456789", "nats.password_file"),
        (
            "OUTBOXD_HTTP__BEARER_TOKEN",
            "true",
            "http.bearer_token_file",
        ),
    ] {
        // Given a secret that the environment's TOML-like parsing reads as a number
        // or a boolean
        let mut env = vec![(var, value)];
        if var != "OUTBOXD_NATS__PASSWORD" {
            env.push(("OUTBOXD_NATS__PASSWORD", "\"pw\""));
        }
        let o = outboxd_env(&["setup"], Some(cfg), &env);
        // Then the error names the key, says how to quote it, and not the value
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(78), "{e}");
        assert!(e.contains("invalid type"), "{e}");
        assert!(e.contains(&format!("{var}='\"<value>\"'")), "{e}");
        assert!(e.contains(file_key), "{e}");
        assert!(!e.contains("0123456789") && !e.contains("123456789"), "{e}");
        // And quoted as the hint says, it is accepted
        let quoted = format!("\"{value}\"");
        let mut env = vec![(var, quoted.as_str())];
        if var != "OUTBOXD_NATS__PASSWORD" {
            env.push(("OUTBOXD_NATS__PASSWORD", "\"pw\""));
        }
        let o = outboxd_env(&["setup"], Some(cfg), &env);
        assert!(o.status.success(), "{var}: {}", stderr(&o));
    }
}

#[test]
fn a_config_from_a_pipe_is_read_once() {
    // Given the config on a pipe (`--config /dev/stdin`, as `--config <(…)` gives)
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["setup", "--config", "/dev/stdin"])
        .env_remove("OUTBOXD_CONFIG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run outboxd");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"[postgres]\nurl = \"postgres://h/db\"\nslot = \"from_pipe\"\n")
        .expect("write config");
    let o = child.wait_with_output().expect("outboxd output");
    // Then it loads as written (a second read of the pipe would find it empty)
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("from_pipe"), "{}", stdout(&o));
}
