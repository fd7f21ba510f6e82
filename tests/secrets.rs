//! Black-box: outboxd runs with every secret set and never shows one.
//!
//! Postgres requires SCRAM for a REPLICATION role (password in the URL *and* in
//! `postgres.password_file`, the file wins); nats-server speaks TLS and wants a user
//! and password, refused at first and accepted after a reload; `/metrics` and
//! `/status` want a bearer token or basic auth. Traffic flows across a Postgres restart and a relay
//! restart (text logs, then JSON logs). Then every output is searched for every
//! secret value: the logs, `outboxd check` (passing and failing), `/status`,
//! `/metrics`, `--help`, and configuration errors.

use crate::support;

use std::time::Duration;

use support::secure::{http_get_with, http_port, outboxd, user_block, Pki, SecureNats};
use support::streaming::commit_when_streaming;
use support::{config, stream_len, wait_for, Postgres, Relay};

/// The role's real password, from `postgres.password_file`.
const PG_PASSWORD: &str = "pgFileSecret-4f2a91";
/// A password in `postgres.url`, overridden by the file (so it is never used).
const PG_URL_PASSWORD: &str = "pgUrlSecret-9b3c07";
const NATS_PASSWORD: &str = "natsPwSecret-51e0c3";
const NATS_TOKEN: &str = "natsTokenSecret-77aa12";
const HTTP_TOKEN: &str = "httpBearerSecret-c0de55";
const HTTP_PASSWORD: &str = "httpBasicSecret-ab12cd";
const SECRETS: [&str; 6] = [
    PG_PASSWORD,
    PG_URL_PASSWORD,
    NATS_PASSWORD,
    NATS_TOKEN,
    HTTP_TOKEN,
    HTTP_PASSWORD,
];

/// Every secret as an environment variable, for the commands that read no file.
const SECRET_ENV: [(&str, &str); 4] = [
    (
        "OUTBOXD_POSTGRES__URL",
        "postgres://relay:pgUrlSecret-9b3c07@127.0.0.1:1/postgres",
    ),
    ("OUTBOXD_NATS__PASSWORD", NATS_PASSWORD),
    ("OUTBOXD_NATS__TOKEN", NATS_TOKEN),
    ("OUTBOXD_HTTP__BEARER_TOKEN", HTTP_TOKEN),
];

/// Collected outputs, each with where it came from.
#[derive(Default)]
struct Seen(Vec<(String, String)>);

impl Seen {
    fn add(&mut self, what: impl Into<String>, text: impl Into<String>) {
        self.0.push((what.into(), text.into()));
    }

    fn assert_no_secret(&self) {
        for (what, text) in &self.0 {
            for s in SECRETS {
                assert!(!text.contains(s), "{what} shows the secret {s}:\n{text}");
            }
        }
    }
}

/// A SCRAM-only login role with REPLICATION (not a superuser) that may read the
/// outbox; the publication is made by the owner.
async fn scram_role(pg: &Postgres) {
    let db = pg.client().await;
    db.batch_execute(&format!(
        "SET password_encryption = 'scram-sha-256';
         CREATE ROLE relay LOGIN REPLICATION PASSWORD '{PG_PASSWORD}';
         GRANT SELECT ON public.outbox TO relay;
         CREATE PUBLICATION outboxd FOR TABLE public.outbox WITH (publish = 'insert');"
    ))
    .await
    .expect("role");
    let hba: String = db
        .query_one("SHOW hba_file", &[])
        .await
        .expect("hba_file")
        .get(0);
    let old = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
    std::fs::write(
        &hba,
        format!(
            "host all relay 127.0.0.1/32 scram-sha-256\n\
             host replication relay 127.0.0.1/32 scram-sha-256\n{old}"
        ),
    )
    .expect("write pg_hba.conf");
    db.query_one("SELECT pg_reload_conf()", &[])
        .await
        .expect("reload");
    // SCRAM is enforced once a wrong password is refused.
    let wrong = format!(
        "postgres://relay:{PG_URL_PASSWORD}@127.0.0.1:{}/postgres",
        pg.port
    );
    assert!(
        wait_for(Duration::from_secs(10), || async {
            tokio_postgres::connect(&wrong, tokio_postgres::NoTls)
                .await
                .is_err()
        })
        .await,
        "pg_hba.conf does not demand a password"
    );
}

fn file(dir: &tempfile::TempDir, name: &str, value: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, format!("{value}\n")).expect("write secret");
    format!("\"{}\"", p.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_is_ever_printed() {
    let mut seen = Seen::default();
    // Given Postgres with a SCRAM role, and a TLS nats-server that refuses the
    // relay's password for now
    let pg = Postgres::start();
    pg.create_outbox().await;
    scram_role(&pg).await;
    let pki = Pki::generate();
    let nats = SecureNats::start(&pki, &user_block("outboxd", "not-the-relays"), false);
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!(
        "\"postgres://relay:{PG_URL_PASSWORD}@127.0.0.1:{}/postgres\"",
        pg.port
    );
    let (pg_pw, nats_pw, bearer, basic) = (
        file(&dir, "pg", PG_PASSWORD),
        file(&dir, "nats", NATS_PASSWORD),
        file(&dir, "bearer", HTTP_TOKEN),
        file(&dir, "basic", HTTP_PASSWORD),
    );
    let (nats_url, ca) = (
        format!("\"{}\"", nats.url()),
        format!("\"{}\"", pki.path("ca.pem").display()),
    );
    let base = [
        ("postgres", "url", url.as_str()),
        ("postgres", "password_file", pg_pw.as_str()),
        ("postgres", "heartbeat_interval_secs", "0"),
        ("sink", "kind", "\"nats\""),
        ("nats", "url", nats_url.as_str()),
        ("nats", "tls_ca_file", ca.as_str()),
        ("http", "bearer_token_file", bearer.as_str()),
        ("http", "basic_auth_user", "\"prometheus\""),
        ("http", "basic_auth_password_file", basic.as_str()),
        ("retry", "max_backoff_ms", "500"),
    ];
    let mut with_user = base.to_vec();
    with_user.extend([
        ("nats", "user", "\"outboxd\""),
        ("nats", "password_file", nats_pw.as_str()),
    ]);
    let cfg = config(&pg, None, &with_user);
    let port = http_port(&cfg);
    let bearer_header = format!("Authorization: Bearer {HTTP_TOKEN}\r\n");

    // When the relay runs into the refused password (text logs)
    let mut relay = Relay::spawn(&cfg);
    assert!(
        wait_for(Duration::from_secs(15), || async {
            relay.stderr().contains("NATS refused the credentials")
        })
        .await,
        "{}",
        relay.stderr()
    );
    let (code, _, status) = http_get_with(port, "/status", &bearer_header).expect("status");
    assert_eq!(code, 200);
    assert!(status.contains("NATS refused the credentials"), "{status}");
    seen.add("/status while refused", status);

    // And the server accepts it after a reload, events flow, Postgres restarts
    nats.reload(&user_block("outboxd", NATS_PASSWORD));
    let js = nats.jetstream_as(&pki, "outboxd", NATS_PASSWORD).await;
    let arrived = |n: u64| {
        let js = js.clone();
        async move {
            wait_for(Duration::from_secs(30), || async {
                stream_len(&js, "OUTBOX").await >= n
            })
            .await
        }
    };
    commit_when_streaming(&pg, "o-1", 0..3).await;
    assert!(arrived(3).await, "{}", relay.stderr());
    pg.restart();
    commit_when_streaming(&pg, "o-1", 3..6).await;
    assert!(arrived(6).await, "{}", relay.stderr());

    // Then the guarded endpoints want the token, the probes do not
    let (code, head, _) = http_get_with(port, "/metrics", "").expect("metrics");
    assert_eq!(code, 401);
    assert!(
        head.contains("www-authenticate: Bearer realm=\"outboxd\"")
            && head.contains("www-authenticate: Basic realm=\"outboxd\""),
        "{head}"
    );
    let basic = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("prometheus:{HTTP_PASSWORD}"))
    };
    let basic_header = format!("Authorization: Basic {basic}\r\n");
    assert_eq!(
        http_get_with(port, "/metrics", &basic_header)
            .expect("metrics")
            .0,
        200
    );
    let (code, _, _) =
        http_get_with(port, "/status", "Authorization: Bearer nope\r\n").expect("status");
    assert_eq!(code, 401);
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(
            http_get_with(port, probe, "").expect("probe").0,
            200,
            "{probe}"
        );
    }
    let (code, _, metrics) = http_get_with(port, "/metrics", &bearer_header).expect("metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("outboxd_events_published_total"),
        "{metrics}"
    );
    seen.add("/metrics", metrics);
    let (_, _, status) = http_get_with(port, "/status", &bearer_header).expect("status");
    assert!(status.contains("\"role\""), "{status}");
    seen.add("/status", status);
    assert_eq!(
        relay
            .terminate(Duration::from_secs(30))
            .map(|s| s.success()),
        Some(true)
    );
    let text_logs = relay.stderr();
    assert!(
        text_logs.contains("ERROR") && text_logs.contains("postgres"),
        "{text_logs}"
    );

    // When it runs again with JSON logs
    std::fs::write(
        relay.config_path(),
        cfg.replace("format = \"text\"", "format = \"json\""),
    )
    .expect("rewrite config");
    relay.start();
    commit_when_streaming(&pg, "o-1", 6..8).await;
    assert!(arrived(8).await, "{}", relay.stderr());
    let (_, _, metrics) = http_get_with(port, "/metrics", &bearer_header).expect("metrics");
    seen.add("/metrics (second run)", metrics);
    assert_eq!(
        relay
            .terminate(Duration::from_secs(30))
            .map(|s| s.success()),
        Some(true)
    );
    let json_logs = relay.stderr()[text_logs.len()..].to_string();
    assert!(
        json_logs.lines().filter(|l| l.starts_with('{')).count() > 3,
        "{json_logs}"
    );
    seen.add("relay stderr (text, then json)", relay.stderr());
    seen.add("relay stdout", relay.stdout());

    // And `outboxd check` passes, then fails with a token the server does not take
    let check = outboxd(Some(&cfg), &["check"], &[]);
    assert_eq!(check.code, Some(0), "{}", check.all());
    seen.add("check", check.all());
    let mut with_token = base.to_vec();
    let token = format!("\"{NATS_TOKEN}\"");
    with_token.push(("nats", "token", token.as_str()));
    let check = outboxd(Some(&config(&pg, None, &with_token)), &["check"], &[]);
    assert_eq!(check.code, Some(1), "{}", check.all());
    assert!(check.stdout.contains("FAIL nats broker"), "{}", check.all());
    seen.add("check with a refused token", check.all());

    // And configuration errors and --help, with every secret in the environment
    let conflict = outboxd(
        Some(&cfg),
        &["check"],
        &[("OUTBOXD_NATS__TOKEN", NATS_TOKEN)],
    );
    assert_eq!(conflict.code, Some(78), "{}", conflict.all());
    assert!(
        conflict.stderr.contains("nats.token: conflicts with"),
        "{}",
        conflict.all()
    );
    seen.add("config error: token and user", conflict.all());
    let bad_port = cfg.replace(&format!(":{}/postgres", pg.port), ":notaport/postgres");
    let bad = outboxd(Some(&bad_port), &["check"], &[]);
    assert_eq!(bad.code, Some(78), "{}", bad.all());
    assert!(bad.stderr.contains("postgres.url"), "{}", bad.all());
    seen.add("config error: bad url", bad.all());
    let mut env = SECRET_ENV.to_vec();
    env.push(("OUTBOXD_SINK__MAX_IN_FLIGHT", "many"));
    let wrong_type = outboxd(None, &["run"], &env);
    assert_eq!(wrong_type.code, Some(78), "{}", wrong_type.all());
    seen.add(
        "config error with secrets in the environment",
        wrong_type.all(),
    );
    for args in [&["--help"][..], &["run", "--help"], &["check", "--help"]] {
        let help = outboxd(None, args, &SECRET_ENV);
        assert_eq!(help.code, Some(0), "{}", help.all());
        seen.add(format!("outboxd {}", args.join(" ")), help.all());
    }

    seen.assert_no_secret();
}

/// A secret for the syntax-error test; both halves must stay hidden, also around a
/// bad escape (`\q`) between them.
const BROKEN_LEFT: &str = "brokenLeft-6d1f";
const BROKEN_RIGHT: &str = "brokenRight-2a9c";

#[test]
fn a_toml_syntax_error_shows_line_and_column_but_never_the_line() {
    // Given a config file whose line 4 holds a secret and is not valid TOML, in each
    // of the ways a hand-edited file breaks
    let (l, r) = (BROKEN_LEFT, BROKEN_RIGHT);
    for (section, key, value) in [
        (
            "postgres",
            "url",
            format!("postgres://relay:{l}{r}@db:5432/app"),
        ),
        ("nats", "url", format!("nats://outboxd:{l}{r}@nats:4222")),
        ("nats", "password", format!("{l}{r}")),
        ("http", "bearer_token", format!("{l}{r}")),
    ] {
        for (line, at) in [
            (format!("{key} = \"{value}"), "line 4, column "),
            (format!("{key} = \"{l}\\q{r}\""), "line 4, column "),
            (format!("{key} = {value}"), "line 4, column "),
            (format!("{key} = \"{value}\" {r}"), "line 4, column "),
            (format!("{key} \"{value}\""), "line 4, column "),
            // An unterminated multi-line string runs to the end of the file
            (format!("{key} = '''{value}"), "line 7, column 1"),
        ] {
            let text = format!("# outboxd\n\n[{section}]\n{line}\n[log]\nformat = \"text\"\n");
            // When outboxd loads it
            let out = outboxd(Some(&text), &["check"], &[]);
            // Then it is a configuration error that shows neither half of the
            // secret, and points at the line and column with the parser's message
            assert_eq!(out.code, Some(78), "{line}: {}", out.all());
            for half in [l, r] {
                assert!(!out.all().contains(half), "{line}: {}", out.all());
            }
            assert!(out.stderr.contains(at), "{line}: {}", out.stderr);
        }
    }
}
