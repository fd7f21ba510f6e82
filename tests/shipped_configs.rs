//! Black-box: every configuration we ship starts the relay. `config/*.toml`, the
//! compose files' `deploy/compose/outboxd-*.toml` and the `config:` of each Helm CI
//! values file (the chart writes it into `outboxd.toml` key for key, which
//! `make lint-deploy` checks) are run against a real PostgreSQL, nats-server or
//! tansu until the relay streams. Only what a deployment supplies is the test's own:
//! endpoints, credentials and TLS files (every `*_file` key, `tls` tables, Kafka
//! `security.*`/`sasl.*`/`ssl.*` properties), the HTTP listener, and a stream the
//! operator would have created. Everything else (codecs, templates, columns,
//! policies) runs as shipped: a `compression.type` this build lacks fails here.

use crate::support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::kafka::Tansu;
use support::secure::outboxd;
use support::{free_port, http_get, wait_for, Nats, Postgres, Relay};

/// Every shipped configuration: (where it comes from, its keys).
fn shipped() -> Vec<(String, toml::Table)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = |dir: &str, prefix: &str, ext: &str| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .map(|e| e.expect("dir entry").path())
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                name.starts_with(prefix) && name.ends_with(ext)
            })
            .collect();
        v.sort();
        v
    };
    let mut out = Vec::new();
    for path in
        files("config", "", ".toml")
            .into_iter()
            .chain(files("deploy/compose", "outboxd-", ".toml"))
    {
        let text = std::fs::read_to_string(&path).expect("read config");
        let table: toml::Table =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        out.push((path.display().to_string(), table));
    }
    for path in files("helm/outboxd/ci", "", ".yaml") {
        use figment::providers::{Format, Yaml};
        let values = figment::Figment::from(Yaml::file(&path));
        let mut table: toml::Table = if values.find_value("config").is_ok() {
            values
                .extract_inner("config")
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        } else {
            toml::Table::new()
        };
        // The chart writes `kafka.properties` values as strings (`linger.ms: 5` too).
        if let Some(toml::Value::Table(k)) = table.get_mut("kafka") {
            if let Some(toml::Value::Table(p)) = k.get_mut("properties") {
                for (_, v) in p.iter_mut() {
                    if !v.is_str() {
                        *v = toml::Value::String(v.to_string());
                    }
                }
            }
        }
        out.push((path.display().to_string(), table));
    }
    assert!(out.len() >= 14, "shipped configs found: {}", out.len());
    out
}

/// Removes what a deployment supplies (see the module docs), recursively.
fn strip_deployment(table: &mut toml::Table) {
    table.retain(|k, _| !(k.ends_with("_file") || k.ends_with("_files") || k == "tls"));
    for key in ["require_tls", "basic_auth_user", "create_stream"] {
        table.remove(key);
    }
    for (_, v) in table.iter_mut() {
        if let toml::Value::Table(t) = v {
            strip_deployment(t);
        }
    }
}

fn section<'a>(t: &'a mut toml::Table, name: &str) -> &'a mut toml::Table {
    t.entry(name)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .expect("a table")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shipped_config_starts_the_relay() {
    let pg = Postgres::start();
    let nats = Nats::start();
    let kafka = Tansu::start();
    let admin = pg.client().await;
    let mut failures = Vec::new();
    for (i, (origin, mut cfg)) in shipped().into_iter().enumerate() {
        // Given the shipped keys, with this test's endpoints and its own database
        strip_deployment(&mut cfg);
        if let Some(toml::Value::Table(k)) = cfg.get_mut("kafka") {
            if let Some(toml::Value::Table(p)) = k.get_mut("properties") {
                p.retain(|name, _| {
                    !["security.", "sasl.", "ssl."]
                        .iter()
                        .any(|s| name.starts_with(s))
                });
            }
        }
        let db = format!("shipped{i}");
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .expect("create database");
        let url = format!("postgres://postgres@127.0.0.1:{}/{db}", pg.port);
        section(&mut cfg, "postgres").insert("url".into(), url.into());
        section(&mut cfg, "nats").insert("url".into(), nats.url().into());
        section(&mut cfg, "kafka").insert("brokers".into(), kafka.brokers().into());
        let port = free_port();
        section(&mut cfg, "http").insert("listen".into(), format!("127.0.0.1:{port}").into());
        let text = toml::to_string(&cfg).expect("toml");
        let slot = cfg["postgres"]
            .get("slot")
            .and_then(|s| s.as_str())
            .unwrap_or("outboxd")
            .to_string();

        // When the table is set up as `outboxd setup --apply` does, and the relay runs
        let setup = outboxd(Some(&text), &["setup", "--apply"], &[]);
        if setup.code != Some(0) {
            failures.push(format!("{origin}: setup --apply failed: {}", setup.all()));
            continue;
        }
        let mut relay = Relay::spawn(&text);

        // Then it streams, and is still running
        let streams = wait_for(Duration::from_secs(30), || async {
            http_get(port, "/status").is_some_and(|(_, b)| b.contains("\"role\":\"streaming\""))
        })
        .await;
        if !streams || relay.try_exit().is_some() {
            failures.push(format!(
                "{origin}: did not start (exit {:?}); config:\n{text}\n{}",
                relay.try_exit(),
                relay.stderr()
            ));
        }
        drop(relay);
        // (slot names are per cluster: free this one for the next configuration)
        let freed = wait_for(Duration::from_secs(30), || async {
            admin
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                     WHERE slot_name = $1 AND NOT active",
                    &[&slot],
                )
                .await
                .is_ok()
                && pg.confirmed_lsn(&slot).await.is_none()
        })
        .await;
        assert!(freed, "{origin}: slot {slot} not released");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
