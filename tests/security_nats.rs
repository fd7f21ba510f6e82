//! Black-box: NATS over TLS with credentials, against a real `nats-server` whose
//! certificates the test makes with openssl.
//!
//! - TLS (server verified by our CA) + user/password: refused credentials are logged
//!   as errors naming the fix, counted, retried with backoff (not a storm), and the
//!   relay recovers once the server accepts them; `check` says FAIL with the fix.
//! - Mutual TLS + NKey seed file: publishes; a wrong CA or a missing client
//!   certificate is refused.
//!
//! - A `.creds` file (user JWT + seed) against a server in operator mode, whose
//!   operator, account and user JWTs the test signs with the `nkeys` crate (no
//!   `nsc`); a user of an untrusted account is refused.

use crate::support;

use std::time::Duration;

use support::secure::{outboxd, user_block, Operator, Pki, SecureNats};
use support::streaming::{commit_when_streaming, wait_stream_len};
use support::{config, insert_event, scrape, wait_for, Postgres, Relay};

const NATS_PASSWORD: &str = "n4ts-Pa55word-7d1e";

fn nats_config(
    pg: &Postgres,
    nats: &SecureNats,
    pki: &Pki,
    extra: &[(&str, &str, &str)],
) -> String {
    let url = format!("\"{}\"", nats.url());
    let ca = format!("\"{}\"", pki.path("ca.pem").display());
    let mut o: Vec<(&str, &str, &str)> = vec![
        ("sink", "kind", "\"nats\""),
        ("nats", "url", &url),
        ("nats", "tls_ca_file", &ca),
        ("retry", "initial_backoff_ms", "200"),
        ("retry", "max_backoff_ms", "2000"),
    ];
    o.extend_from_slice(extra);
    config(pg, None, &o)
}

fn secret_file(dir: &tempfile::TempDir, name: &str, value: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, format!("{value}\n")).expect("write secret");
    format!("\"{}\"", p.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_user_credentials_publishes_and_refused_ones_are_loud_and_backed_off() {
    // Given a TLS nats-server whose only user does not (yet) have the relay's password
    let pki = Pki::generate();
    let nats = SecureNats::start(&pki, &user_block("outboxd", "an-older-password"), false);
    let pg = Postgres::start();
    pg.create_outbox().await;
    let secrets = tempfile::tempdir().expect("tempdir");
    let pw = secret_file(&secrets, "nats-password", NATS_PASSWORD);
    let cfg = nats_config(
        &pg,
        &nats,
        &pki,
        &[
            ("nats", "user", "\"outboxd\""),
            ("nats", "password_file", &pw),
        ],
    );

    // When the relay starts
    let relay = Relay::spawn(&cfg);

    // Then each refused attempt is one error line naming the keys to check
    let refused = "NATS refused the credentials (authorization violation)";
    assert!(
        wait_for(Duration::from_secs(15), || async {
            relay.stderr().contains(refused)
        })
        .await,
        "no clear error; stderr:\n{}",
        relay.stderr()
    );
    let first = std::time::Instant::now();
    // A fixed observation window: we measure how often it retries, so there is no
    // condition to wait for.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stderr = relay.stderr();
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains(refused)).collect();
    assert!(
        lines.iter().all(|l| l.contains("ERROR")
            && l.contains("nats.user and nats.password (or nats.password_file)")),
        "{lines:#?}"
    );
    // Backoff 200 ms doubling to 2 s (jittered): about 5 attempts in 5 s, never a storm
    let elapsed = first.elapsed().as_secs_f64();
    assert!(
        (2..=12).contains(&lines.len()),
        "{} refused attempts in {elapsed:.1} s",
        lines.len()
    );
    assert!(!stderr.contains(NATS_PASSWORD));
    let port = support::secure::http_port(&cfg);
    let auth_errors: f64 = scrape(port)
        .lines()
        .filter(|l| l.starts_with("outboxd_publish_errors_total{") && l.contains("reason=\"auth\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(auth_errors >= lines.len() as f64 - 1.0, "{auth_errors}");

    // And `outboxd check` says FAIL with the same fix
    let check = outboxd(Some(&cfg), &["check"], &[]);
    assert_eq!(check.code, Some(1), "{}", check.all());
    let line = check
        .stdout
        .lines()
        .find(|l| l.contains("nats broker"))
        .unwrap_or_default();
    assert!(
        line.starts_with("FAIL") && line.contains(refused) && line.contains("nats.password"),
        "{}",
        check.all()
    );

    // When the operator gives the server the relay's password (config reload)
    nats.reload(&user_block("outboxd", NATS_PASSWORD));

    // Then the relay connects on its next retry and publishes over TLS
    let db = commit_when_streaming(&pg, "o-1", 0..3).await;
    let js = nats.jetstream_as(&pki, "outboxd", NATS_PASSWORD).await;
    assert!(
        wait_stream_len(&js, "OUTBOX", 3).await,
        "events did not arrive; stderr:\n{}",
        relay.stderr()
    );
    let check = outboxd(Some(&cfg), &["check"], &[]);
    assert_eq!(check.code, Some(0), "{}", check.all());

    // When the server revokes the password while the relay is connected
    nats.reload(&user_block("outboxd", "a-newer-password"));
    // Then the client's refused reconnects are logged as errors with the fix
    assert!(
        wait_for(Duration::from_secs(15), || async {
            relay
                .stderr()
                .lines()
                .any(|l| l.contains("nats refused the credentials") && l.contains("nats.password"))
        })
        .await,
        "{}",
        relay.stderr()
    );
    // And once it is restored, events flow again
    nats.reload(&user_block("outboxd", NATS_PASSWORD));
    insert_event(&db, "o-1", 3).await.expect("insert");
    assert!(
        wait_stream_len(&js, "OUTBOX", 4).await,
        "{}",
        relay.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_an_nkey_publishes_and_a_wrong_ca_is_refused() {
    // Given a nats-server that verifies client certificates and knows one NKey user
    let pki = Pki::generate();
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().expect("seed");
    let nats = SecureNats::start(
        &pki,
        &format!(
            "authorization {{\n  users = [ {{ nkey: \"{}\" }} ]\n}}",
            user.public_key()
        ),
        true,
    );
    let pg = Postgres::start();
    pg.create_outbox().await;
    let secrets = tempfile::tempdir().expect("tempdir");
    let seed_file = secret_file(&secrets, "seed", &seed);
    let cert = format!("\"{}\"", pki.path("client.pem").display());
    let key = format!("\"{}\"", pki.path("client.key").display());
    let with_cert = [
        ("nats", "tls_cert_file", cert.as_str()),
        ("nats", "tls_key_file", key.as_str()),
        ("nats", "nkey_seed_file", seed_file.as_str()),
    ];

    // When the relay runs with the client certificate and the seed
    let relay = Relay::spawn(&nats_config(&pg, &nats, &pki, &with_cert));
    commit_when_streaming(&pg, "o-1", 0..2).await;

    // Then the events arrive
    let js = nats
        .jetstream(&pki, async_nats::ConnectOptions::with_nkey(seed.clone()))
        .await;
    assert!(
        wait_stream_len(&js, "OUTBOX", 2).await,
        "events did not arrive; stderr:\n{}",
        relay.stderr()
    );
    assert!(!relay.stderr().contains(&seed));

    // And a client trusting another CA is refused, naming the CA key
    let other = Pki::generate();
    let wrong_ca = format!("\"{}\"", other.path("ca.pem").display());
    let mut extra = with_cert.to_vec();
    extra.push(("nats", "tls_ca_file", wrong_ca.as_str()));
    let check = outboxd(
        Some(&nats_config(&pg, &nats, &pki, &extra)),
        &["check"],
        &[],
    );
    assert_eq!(check.code, Some(1), "{}", check.all());
    assert!(
        check.stdout.contains("FAIL nats broker") && check.stdout.contains("nats.tls_ca_file"),
        "{}",
        check.all()
    );

    // And so is one without a client certificate
    let check = outboxd(
        Some(&nats_config(&pg, &nats, &pki, &with_cert[2..])),
        &["check"],
        &[],
    );
    assert_eq!(check.code, Some(1), "{}", check.all());
    assert!(check.stdout.contains("FAIL nats broker"), "{}", check.all());
    assert!(!check.all().contains(&seed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creds_file_logs_in_to_a_server_in_operator_mode() {
    // Given a TLS nats-server in operator mode (JWTs signed in the test, no nsc) and
    // the user's .creds file
    let pki = Pki::generate();
    let operator = Operator::generate();
    let nats = SecureNats::start(&pki, &operator.server_conf, false);
    let pg = Postgres::start();
    pg.create_outbox().await;
    let secrets = tempfile::tempdir().expect("tempdir");
    let creds = secrets.path().join("outboxd.creds");
    std::fs::write(&creds, &operator.creds).expect("write creds");
    let creds_key = format!("\"{}\"", creds.display());

    // When the relay runs with it
    let relay = Relay::spawn(&nats_config(
        &pg,
        &nats,
        &pki,
        &[("nats", "creds_file", creds_key.as_str())],
    ));
    commit_when_streaming(&pg, "o-1", 0..2).await;

    // Then the events arrive, and the seed is never shown
    let js = nats
        .jetstream(
            &pki,
            async_nats::ConnectOptions::with_credentials(&operator.creds).expect("creds"),
        )
        .await;
    assert!(
        wait_stream_len(&js, "OUTBOX", 2).await,
        "events did not arrive; stderr:\n{}\nserver log:\n{}",
        relay.stderr(),
        nats.log()
    );
    let seed = operator
        .creds
        .lines()
        .find(|l| l.starts_with("SU"))
        .expect("seed line");
    assert!(!relay.stderr().contains(seed));

    // And a user of an account this server does not trust is refused, naming the file
    let stranger = secrets.path().join("stranger.creds");
    std::fs::write(&stranger, Operator::generate().creds).expect("write creds");
    let stranger_key = format!("\"{}\"", stranger.display());
    let check = outboxd(
        Some(&nats_config(
            &pg,
            &nats,
            &pki,
            &[("nats", "creds_file", stranger_key.as_str())],
        )),
        &["check"],
        &[],
    );
    assert_eq!(check.code, Some(1), "{}", check.all());
    assert!(
        check.stdout.contains("FAIL nats broker") && check.stdout.contains("nats.creds_file"),
        "{}",
        check.all()
    );
}

/// A password with the characters a URL must percent-encode (`@ : / %`).
const URL_PASSWORD: &str = "p@ss:w/rd%41-9c2e";
/// [`URL_PASSWORD`] as it stands in a URL.
const URL_PASSWORD_ENCODED: &str = "p%40ss%3Aw%2Frd%2541-9c2e";
const URL_TOKEN: &str = "urlT0ken-d41b7e";

/// The `nats broker` line of `outboxd check`'s output.
fn broker_line(out: &support::secure::Output) -> String {
    out.stdout
        .lines()
        .find(|l| l.contains("nats broker"))
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_inside_nats_url_log_in_and_are_never_shown() {
    // Given a TLS nats-server with one user whose password needs percent-encoding,
    // and the credentials only inside nats.url
    let pki = Pki::generate();
    let nats = SecureNats::start(&pki, &user_block("outboxd", URL_PASSWORD), false);
    let pg = Postgres::start();
    pg.create_outbox().await;
    let url = format!(
        "\"tls://outboxd:{URL_PASSWORD_ENCODED}@127.0.0.1:{}\"",
        nats.port
    );
    let cfg = nats_config(&pg, &nats, &pki, &[("nats", "url", &url)]);

    // When the relay runs
    let relay = Relay::spawn(&cfg);
    commit_when_streaming(&pg, "o-1", 0..2).await;

    // Then it logs in with them and the events arrive
    let js = nats.jetstream_as(&pki, "outboxd", URL_PASSWORD).await;
    assert!(
        wait_stream_len(&js, "OUTBOX", 2).await,
        "events did not arrive; stderr:\n{}\nserver log:\n{}",
        relay.stderr(),
        nats.log()
    );
    // And `outboxd check` passes, also with the client library's debug logging on
    let check = outboxd(Some(&cfg), &["check"], &[("RUST_LOG", "debug")]);
    assert!(broker_line(&check).starts_with("ok"), "{}", check.all());
    // And the password shows nowhere, neither as written nor decoded
    for text in [relay.stderr(), relay.stdout(), check.all()] {
        for secret in [URL_PASSWORD, URL_PASSWORD_ENCODED] {
            assert!(!text.contains(secret), "{secret} shown:\n{text}");
        }
    }

    // And a token inside the URL (`tls://<token>@host`) logs in to a token server
    let token_server = SecureNats::start(
        &pki,
        &format!("authorization {{\n  token: \"{URL_TOKEN}\"\n}}"),
        false,
    );
    let url = format!("\"tls://{URL_TOKEN}@127.0.0.1:{}\"", token_server.port);
    let token_cfg = nats_config(&pg, &token_server, &pki, &[("nats", "url", &url)]);
    let check = outboxd(Some(&token_cfg), &["check"], &[("RUST_LOG", "debug")]);
    assert!(broker_line(&check).starts_with("ok"), "{}", check.all());
    assert!(!check.all().contains(URL_TOKEN), "{}", check.all());

    // And credentials in the URL together with a credential key are refused by key
    let both = outboxd(
        Some(&token_cfg),
        &["check"],
        &[("OUTBOXD_NATS__TOKEN", "\"another\"")],
    );
    assert_eq!(both.code, Some(78), "{}", both.all());
    assert!(
        both.stderr
            .contains("nats.url: carries credentials and nats.token"),
        "{}",
        both.all()
    );
    assert!(!both.all().contains(URL_TOKEN), "{}", both.all());
}
