//! Black-box: Postgres security. A real PostgreSQL with `ssl = on` (a CA and a
//! server certificate for `localhost` / 127.0.0.1 made here with the openssl CLI),
//! `pg_hba.conf` allowing the relay's roles only over `hostssl` with
//! `scram-sha-256`, and least-privilege roles (REPLICATION, not superuser, not the
//! table owner). outboxd streams with `verify-full`, and refuses with a clear error
//! on a wrong CA, on a server without TLS, and on a missing privilege.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use support::secure::{make_ca, make_signed};
use support::{config, read_stream, wait_for, Nats, Postgres, Relay};

/// The relay role's password (the tests also check it never shows up).
const PASSWORD: &str = "s3cr3t-relay-pw";

/// A CA, a server certificate signed by it, and a second, unrelated CA.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("outboxd-certs-")
            .tempdir()
            .expect("tempdir");
        // Postgres (another user when the tests run as root) must reach the files.
        chmod(dir.path(), 0o755);
        let d = dir.path();
        make_ca(d, "ca", "crt", "/CN=outboxd test CA");
        make_ca(d, "other-ca", "crt", "/CN=some other CA");
        make_signed(
            d,
            "server",
            "crt",
            "/CN=localhost",
            "subjectAltName = DNS:localhost, IP:127.0.0.1\n\
             basicConstraints = CA:FALSE\n\
             keyUsage = digitalSignature, keyEncipherment\n\
             extendedKeyUsage = serverAuth\n",
            "ca",
        );
        // A client certificate for role `certrole` (pg_hba `cert`: CN = role name).
        make_signed(
            d,
            "client",
            "crt",
            "/CN=certrole",
            "basicConstraints = CA:FALSE\n\
             keyUsage = digitalSignature\n\
             extendedKeyUsage = clientAuth\n",
            "ca",
        );
        let c = Self { dir };
        // Postgres refuses a key others can read, and must own it (or root + group).
        let key = c.path("server.key");
        chmod(&key, 0o600);
        chown_to_postgres(&key);
        c
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn chown_to_postgres(p: &Path) {
    let root = Command::new("id").arg("-u").output().expect("id -u");
    if String::from_utf8_lossy(&root.stdout).trim() == "0" {
        let ok = Command::new("chown")
            .arg("postgres")
            .arg(p)
            .status()
            .expect("chown");
        assert!(ok.success(), "chown postgres {}", p.display());
    }
}

/// A Postgres with TLS on and SCRAM-only, TLS-only TCP access for every role but
/// the test's own `postgres` superuser (which the harness uses without TLS).
fn tls_postgres(certs: &Certs) -> Postgres {
    let hba = certs.path("pg_hba.conf");
    std::fs::write(
        &hba,
        // (a logical replication connection matches the database's lines, not
        // `replication` ones)
        "local all all trust\n\
         host all postgres 127.0.0.1/32 trust\n\
         hostssl all certrole 127.0.0.1/32 cert\n\
         hostssl all certrole ::1/128 cert\n\
         hostssl all all 127.0.0.1/32 scram-sha-256\n\
         hostssl all all ::1/128 scram-sha-256\n",
    )
    .expect("pg_hba.conf");
    chmod(&hba, 0o644);
    let (cert, key, hba, ca) = (
        certs.path("server.crt").display().to_string(),
        certs.path("server.key").display().to_string(),
        hba.display().to_string(),
        certs.path("ca.crt").display().to_string(),
    );
    Postgres::start_with_settings(&[
        ("ssl", "on"),
        ("ssl_ca_file", &ca),
        ("ssl_cert_file", &cert),
        ("ssl_key_file", &key),
        ("hba_file", &hba),
        ("password_encryption", "scram-sha-256"),
    ])
}

/// Creates the outbox table and its publication as the owner (`postgres`), and a
/// login role `name` with a SCRAM password and `extra` SQL (its grants).
async fn owner_setup(pg: &Postgres, name: &str, attributes: &str, extra: &str) {
    let db = pg.client().await;
    db.batch_execute(support::outbox_ddl())
        .await
        .expect("table");
    db.batch_execute(&format!(
        "CREATE PUBLICATION outboxd FOR TABLE public.outbox WITH (publish = 'insert');
         CREATE ROLE {name} LOGIN {attributes} PASSWORD '{PASSWORD}';
         {extra}"
    ))
    .await
    .expect("owner set-up");
}

/// A relay config connecting as `role` with `url_tail` (host, port, database and
/// query), the password from a file, and the publication made by the owner.
fn relay_config(
    pg: &Postgres,
    nats: Option<&Nats>,
    role: &str,
    host: &str,
    query: &str,
    pw_file: &Path,
    extra: &[(&str, &str, &str)],
) -> String {
    let url = format!("\"postgres://{role}@{host}:{}/postgres{query}\"", pg.port);
    let pw = format!("\"{}\"", pw_file.display());
    let mut o = vec![
        ("postgres", "url", url.as_str()),
        ("postgres", "password_file", pw.as_str()),
        ("postgres", "create_publication", "false"),
    ];
    o.extend_from_slice(extra);
    config(pg, nats, &o)
}

fn password_file(certs: &Certs) -> PathBuf {
    let p = certs.path("pg-password");
    std::fs::write(&p, format!("{PASSWORD}\n")).expect("password file");
    p
}

fn outboxd(args: &[&str], cfg: &str) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outboxd.toml");
    std::fs::write(&path, cfg).expect("config");
    Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(args)
        .arg("--config")
        .arg(&path)
        .env_remove("OUTBOXD_CONFIG")
        .output()
        .expect("run outboxd")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `outboxd args` and asserts it exits 1 with every one of `needles` in its output.
fn fails_with(args: &[&str], cfg: &str, needles: &[&str]) {
    let o = outboxd(args, cfg);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    for needle in needles {
        assert!(
            text(&o).contains(needle),
            "{needle:?} missing in: {}",
            text(&o)
        );
    }
}

/// The URL query that verifies the server's certificate against the test CA.
fn verify_full(certs: &Certs) -> String {
    let ca = certs.path("ca.crt").display().to_string();
    format!("?sslmode=verify-full&sslrootcert={ca}")
}

/// Once the relay streams, inserts a row and asserts it reaches stdout within 30 s.
async fn relays_a_row(pg: &Postgres, relay: &Relay) {
    pg.wait_streaming("outboxd").await;
    let db = pg.client().await;
    let id = support::insert_event(&db, "o-1", 1).await.expect("insert");
    assert!(
        wait_for(Duration::from_secs(30), || async {
            relay.stdout().contains(&id)
        })
        .await,
        "the row was not relayed: {}",
        relay.stderr()
    );
}

/// Waits for the relay to stop on its own; returns its stderr's last line.
async fn refused(relay: &mut Relay) -> String {
    let status = relay
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("the relay kept running instead of refusing");
    let stderr = relay.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains(PASSWORD), "the password leaked: {stderr}");
    let last = stderr.lines().last().unwrap_or_default().to_string();
    eprintln!("final message: {last}");
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_streams_with_a_least_privilege_role_and_check_passes() {
    // Given a TLS, SCRAM-only Postgres where the owner ran part 1 of `outboxd setup`
    // (table, publication, role outboxd with REPLICATION and its grants)
    let certs = Certs::new();
    let pg = tls_postgres(&certs);
    let nats = Nats::start();
    let pw = password_file(&certs);
    let query = verify_full(&certs);
    let cfg = relay_config(&pg, Some(&nats), "outboxd", "localhost", &query, &pw, &[]);
    let sql = outboxd(&["setup"], &cfg);
    assert!(sql.status.success(), "{}", text(&sql));
    let sql = String::from_utf8_lossy(&sql.stdout).into_owned();
    let (part1, part2) = sql
        .split_once("-- PART 2.")
        .expect("setup prints two parts");
    assert!(
        part1.contains("CREATE ROLE outboxd LOGIN REPLICATION"),
        "{part1}"
    );
    assert!(
        part1.contains("GRANT SELECT ON public.outbox TO outboxd"),
        "{part1}"
    );
    assert!(
        part2.contains("pg_create_logical_replication_slot"),
        "{part2}"
    );
    let admin = pg.client().await;
    admin
        .batch_execute(part1)
        .await
        .expect("part 1 as the owner");
    admin
        .batch_execute(&format!("ALTER ROLE outboxd PASSWORD '{PASSWORD}'"))
        .await
        .expect("password");
    // (the role is neither superuser nor owner, and its password is stored as SCRAM)
    let row = admin
        .query_one(
            "SELECT r.rolsuper, r.rolreplication, a.rolpassword LIKE 'SCRAM-SHA-256$%', \
                    pg_get_userbyid(c.relowner) \
             FROM pg_roles r JOIN pg_authid a ON a.oid = r.oid, pg_class c \
             WHERE r.rolname = 'outboxd' AND c.oid = 'public.outbox'::regclass",
            &[],
        )
        .await
        .expect("role");
    assert_eq!(
        (
            row.get::<_, bool>(0),
            row.get::<_, bool>(1),
            row.get::<_, bool>(2)
        ),
        (false, true, true)
    );
    assert_eq!(row.get::<_, String>(3), "postgres");

    // When `outboxd check` runs as that role with verify-full
    let o = outboxd(&["check"], &cfg);
    // Then every check passes, over TLS with the certificate and host name verified
    let report = text(&o);
    eprintln!("{report}");
    assert!(o.status.success(), "{report}");
    assert!(!report.contains("FAIL"), "{report}");
    assert!(
        report.contains("ok   postgres tls")
            && report.contains("certificate and host name verified"),
        "{report}"
    );
    assert!(report.contains("role outboxd has REPLICATION"), "{report}");
    // and the same holds with [postgres.tls] keys and an IP host (matched by IP SAN)
    let keys = relay_config(
        &pg,
        Some(&nats),
        "outboxd",
        "127.0.0.1",
        "",
        &pw,
        &[
            ("postgres.tls", "mode", "\"verify-full\""),
            (
                "postgres.tls",
                "ca_file",
                &format!("\"{}\"", certs.path("ca.crt").display()),
            ),
        ],
    );
    let o = outboxd(&["check"], &keys);
    assert!(o.status.success(), "{}", text(&o));

    // When the relay runs and the application commits rows
    let relay = Relay::spawn(&cfg);
    pg.wait_streaming("outboxd").await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(
            support::insert_event(&admin, "o-1", n)
                .await
                .expect("insert"),
        );
    }
    // Then they arrive in JetStream
    let js = nats.jetstream().await;
    assert!(
        wait_for(Duration::from_secs(30), || async {
            read_stream(&js, "OUTBOX").await.len() >= ids.len()
        })
        .await,
        "events did not arrive; relay stderr: {}",
        relay.stderr()
    );
    let got: Vec<String> = read_stream(&js, "OUTBOX")
        .await
        .iter()
        .map(|m| m.header("ce-id").expect("ce-id").to_string())
        .collect();
    assert_eq!(got, ids);
    // and both of its connections are encrypted, as role outboxd
    let rows = admin
        .query(
            "SELECT a.backend_type, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.usename = 'outboxd'",
            &[],
        )
        .await
        .expect("connections");
    assert!(
        rows.iter().any(|r| r.get::<_, String>(0) == "walsender"),
        "no replication connection as outboxd"
    );
    assert!(
        rows.iter().all(|r| r.get::<_, bool>(1)),
        "a connection of outboxd is not encrypted"
    );
    assert!(!relay.stderr().contains(PASSWORD), "the password leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_is_refused_naming_certificate_verification_and_the_key() {
    // Given a TLS Postgres and a relay that trusts another CA
    let certs = Certs::new();
    let pg = tls_postgres(&certs);
    owner_setup(
        &pg,
        "outboxd",
        "REPLICATION",
        "GRANT SELECT ON public.outbox TO outboxd;",
    )
    .await;
    let pw = password_file(&certs);
    let other = format!("\"{}\"", certs.path("other-ca.crt").display());
    let cfg = relay_config(
        &pg,
        None,
        "outboxd",
        "localhost",
        "",
        &pw,
        &[
            ("postgres.tls", "mode", "\"verify-full\""),
            ("postgres.tls", "ca_file", &other),
        ],
    );
    // When the relay starts
    let mut relay = Relay::spawn(&cfg);
    // Then it stops with an error saying what failed and which key fixes it
    let last = refused(&mut relay).await;
    assert!(last.contains("certificate verification failed"), "{last}");
    assert!(last.contains("postgres.tls.ca_file"), "{last}");
    // and `check` says the same
    fails_with(
        &["check"],
        &cfg,
        &[
            "FAIL postgres connection",
            "certificate verification failed",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_against_a_server_without_tls_is_refused() {
    // Given a Postgres without TLS
    let certs = Certs::new();
    let pg = Postgres::start();
    pg.create_outbox().await;
    let url = format!(
        "\"postgres://postgres@localhost:{}/postgres{}\"",
        pg.port,
        verify_full(&certs)
    );
    let cfg = config(&pg, None, &[("postgres", "url", &url)]);
    // When the relay starts with sslmode=verify-full
    let mut relay = Relay::spawn(&cfg);
    // Then it stops, saying the server offers no TLS and which setting asked for it
    let last = refused(&mut relay).await;
    assert!(
        last.contains("does not offer it") && last.contains("sslmode verify-full"),
        "{last}"
    );
    assert!(last.contains("postgres.url (sslmode)"), "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_replication_is_told_the_alter_role() {
    // Given a TLS Postgres and a login role with SELECT but without REPLICATION
    let certs = Certs::new();
    let pg = tls_postgres(&certs);
    owner_setup(
        &pg,
        "norepl",
        "",
        "GRANT SELECT ON public.outbox TO norepl;",
    )
    .await;
    let pw = password_file(&certs);
    let query = verify_full(&certs);
    let cfg = relay_config(&pg, None, "norepl", "localhost", &query, &pw, &[]);
    // When the relay starts
    let mut relay = Relay::spawn(&cfg);
    // Then it stops naming the attribute and the statement that grants it
    let last = refused(&mut relay).await;
    assert!(last.contains("ALTER ROLE norepl REPLICATION"), "{last}");
    // and `check` fails on the same line
    fails_with(
        &["check"],
        &cfg,
        &[
            "FAIL replication privilege",
            "ALTER ROLE norepl REPLICATION",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_select_is_told_the_grant() {
    // Given a TLS Postgres and a REPLICATION role without SELECT on the outbox
    let certs = Certs::new();
    let pg = tls_postgres(&certs);
    owner_setup(&pg, "nosel", "REPLICATION", "").await;
    let pw = password_file(&certs);
    let query = verify_full(&certs);
    let cfg = relay_config(&pg, None, "nosel", "localhost", &query, &pw, &[]);
    let grant = "GRANT SELECT ON public.outbox TO nosel;";
    // When `check` runs, then it fails naming the GRANT
    fails_with(&["check"], &cfg, &["FAIL table privilege", grant]);
    // When `replay` (which reads the table) runs, then it refuses with the GRANT
    fails_with(&["replay", "--dry-run"], &cfg, &[grant]);
    // When the relay's first start would take the initial snapshot (the default),
    // which reads the table, then it refuses with the GRANT and the opt-out
    let mut relay = Relay::spawn(&cfg);
    relay
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exits without SELECT for the initial snapshot");
    let said = relay.stderr();
    assert!(
        said.contains(grant) && said.contains("initial_snapshot"),
        "{said}"
    );
    // When the relay runs without the snapshot: streaming needs no SELECT (the
    // walsender decodes the WAL for a REPLICATION role), so it streams, and warns
    // with the GRANT
    let cfg = relay_config(
        &pg,
        None,
        "nosel",
        "localhost",
        &query,
        &pw,
        &[("postgres", "initial_snapshot", "false")],
    );
    let relay = Relay::spawn(&cfg);
    relays_a_row(&pg, &relay).await;
    assert!(relay.stderr().contains(grant), "{}", relay.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_does_not_own_the_table_is_told_who_creates_the_publication() {
    // Given a REPLICATION role, and a table without publication
    let certs = Certs::new();
    let pg = tls_postgres(&certs);
    owner_setup(
        &pg,
        "relay",
        "REPLICATION",
        // (CREATE on the database, so what is missing is only the table's ownership)
        "GRANT SELECT ON public.outbox TO relay; GRANT CREATE ON DATABASE postgres TO relay;
         DROP PUBLICATION outboxd;",
    )
    .await;
    let pw = password_file(&certs);
    let query = verify_full(&certs);
    let cfg = relay_config(
        &pg,
        None,
        "relay",
        "localhost",
        &query,
        &pw,
        &[("postgres", "create_publication", "true")],
    );
    // When `check` runs, then it fails: this role cannot create the publication
    fails_with(&["check"], &cfg, &["FAIL publication"]);
    // When the relay starts, then it stops with the statement for the owner
    let mut relay = Relay::spawn(&cfg);
    let last = refused(&mut relay).await;
    assert!(
        last.contains("must be owner of table outbox")
            && last.contains("the table owner must create it")
            && last.contains("CREATE PUBLICATION outboxd FOR TABLE public.outbox"),
        "{last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_authenticates_both_connections() {
    // Given a role that may only log in with a client certificate (pg_hba `cert`)
    let certs = Certs::new();
    let pg = tls_postgres(&certs);
    owner_setup(
        &pg,
        "certrole",
        "REPLICATION",
        "GRANT SELECT ON public.outbox TO certrole;",
    )
    .await;
    let path = |name: &str| format!("\"{}\"", certs.path(name).display());
    let url = format!("\"postgres://certrole@localhost:{}/postgres\"", pg.port);
    let with_cert = [
        ("postgres", "url", url.as_str()),
        ("postgres", "create_publication", "false"),
        ("postgres.tls", "mode", "\"verify-full\""),
        ("postgres.tls", "ca_file", &path("ca.crt")),
        ("postgres.tls", "client_cert_file", &path("client.crt")),
        ("postgres.tls", "client_key_file", &path("client.key")),
    ];
    let cfg = config(&pg, None, &with_cert);
    // When `check` and the relay run with the certificate and no password
    let o = outboxd(&["check"], &cfg);
    assert!(o.status.success(), "{}", text(&o));
    let relay = Relay::spawn(&cfg);
    // Then a row is relayed
    relays_a_row(&pg, &relay).await;
    // and without the certificate the server refuses the role: a final error
    let cfg = config(&pg, None, &with_cert[..4]);
    fails_with(&["check"], &cfg, &["FAIL postgres connection"]);
}
