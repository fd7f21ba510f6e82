//! `outboxd check`: every precondition of a working relay, each reported as ok or
//! FAIL with the fix. Read-only: it creates nothing (see `outboxd setup`).

use std::fmt::Write as _;

use crate::config::{split_table, Config, SinkKind};
use crate::sink::Sink;
use crate::source::control::Control;

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Passed?
    pub ok: bool,
    /// Finding, and for a failure the fix. Never contains a secret.
    pub detail: String,
}

fn check(name: &str, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        name: name.to_string(),
        ok,
        detail: detail.into(),
    }
}

/// Runs all checks; stops early only where later ones cannot run.
pub async fn run(cfg: &Config) -> Vec<Check> {
    let mut out = vec![check("config", true, "configuration is valid")];
    let control = match Control::connect(cfg).await {
        Ok(c) => {
            out.push(check("postgres connection", true, "connected"));
            c
        }
        Err(e) => {
            out.push(check(
                "postgres connection",
                false,
                format!("{e}: check postgres.url and that the server is reachable"),
            ));
            out.extend(sink_check(cfg).await);
            return out;
        }
    };
    match control.wal_level().await {
        Ok(l) if l == "logical" => out.push(check("wal_level", true, "logical")),
        Ok(l) => out.push(check(
            "wal_level",
            false,
            format!("is {l}, must be logical: ALTER SYSTEM SET wal_level = logical; then restart Postgres"),
        )),
        Err(e) => out.push(check("wal_level", false, e.to_string())),
    }
    match control.has_replication().await {
        Ok(true) => out.push(check("replication privilege", true, "role may replicate")),
        Ok(false) => out.push(check(
            "replication privilege",
            false,
            "role lacks REPLICATION: ALTER ROLE <role> REPLICATION (as a superuser)",
        )),
        Err(e) => out.push(check("replication privilege", false, e.to_string())),
    }
    let p = &cfg.postgres;
    match control.table_columns(&p.table).await {
        Ok(None) => out.push(check(
            "outbox table",
            false,
            format!("{} does not exist: create it (`outboxd setup` prints the SQL) or set postgres.table", p.table),
        )),
        Ok(Some(cols)) => {
            let names: Vec<&str> = cols.iter().map(|(n, _)| n.as_str()).collect();
            let c = &p.columns;
            let missing: Vec<String> = [
                ("id", &c.id),
                ("aggregate_type", &c.aggregate_type),
                ("aggregate_id", &c.aggregate_id),
                ("event_type", &c.event_type),
                ("payload", &c.payload),
            ]
            .iter()
            .filter(|(_, col)| !names.contains(&col.as_str()))
            .map(|(role, col)| format!("{col} (postgres.columns.{role})"))
            .collect();
            if missing.is_empty() {
                out.push(check("outbox table", true, format!("{} has the mapped columns", p.table)));
            } else {
                out.push(check(
                    "outbox table",
                    false,
                    format!("{} lacks {}: add the column or map another in [postgres.columns]", p.table, missing.join(", ")),
                ));
            }
        }
        Err(e) => out.push(check("outbox table", false, e.to_string())),
    }
    match control.publication(cfg).await {
        Ok(Some(true)) => out.push(check(
            "publication",
            true,
            format!("{} includes {}", p.publication, p.table),
        )),
        Ok(Some(false)) => out.push(check(
            "publication",
            false,
            format!(
                "{} does not include {}: ALTER PUBLICATION {} ADD TABLE {}",
                p.publication, p.table, p.publication, p.table
            ),
        )),
        Ok(None) if p.create_publication => out.push(check(
            "publication",
            true,
            format!(
                "{} does not exist yet; `run` creates it (postgres.create_publication = true)",
                p.publication
            ),
        )),
        Ok(None) => out.push(check(
            "publication",
            false,
            format!(
                "{} does not exist: run the SQL of `outboxd setup` as the table owner",
                p.publication
            ),
        )),
        Err(e) => out.push(check("publication", false, e.to_string())),
    }
    match control.slot(&p.slot).await {
        Ok(Some(s)) if s.wal_status.as_deref() == Some("lost") => out.push(check(
            "replication slot",
            false,
            format!(
                "{} was invalidated (wal_status = lost): events after {} may be missing; replay \
                 them from the outbox table, then `outboxd run --allow-new-slot`",
                p.slot,
                crate::relay::lsn_text(s.confirmed_flush_lsn)
            ),
        )),
        Ok(Some(s)) if s.plugin == "pgoutput" => out.push(check(
            "replication slot",
            true,
            format!(
                "{} at {}{}",
                p.slot,
                crate::relay::lsn_text(s.confirmed_flush_lsn),
                s.active_pid
                    .map(|pid| format!(", streamed by pid {pid}"))
                    .unwrap_or_default()
            ),
        )),
        Ok(Some(s)) => out.push(check(
            "replication slot",
            false,
            format!(
                "{} uses plugin {}, needs pgoutput: drop it or choose another postgres.slot",
                p.slot, s.plugin
            ),
        )),
        Ok(None) if p.create_slot => out.push(check(
            "replication slot",
            true,
            format!(
                "{} does not exist yet; `run` creates it (postgres.create_slot = true)",
                p.slot
            ),
        )),
        Ok(None) => out.push(check(
            "replication slot",
            false,
            format!("{} does not exist: see `outboxd setup`", p.slot),
        )),
        Err(e) => out.push(check("replication slot", false, e.to_string())),
    }
    out.extend(sink_check(cfg).await);
    out
}

async fn sink_check(cfg: &Config) -> Option<Check> {
    let name = match cfg.sink.kind {
        SinkKind::Stdout => return Some(check("sink", true, "stdout needs no broker")),
        SinkKind::Nats => "nats",
        SinkKind::Kafka => "kafka",
    };
    let label = format!("{name} broker");
    Some(
        match tokio::time::timeout(std::time::Duration::from_secs(10), Sink::connect(cfg)).await {
            Ok(Ok(_)) => check(&label, true, "reachable; stream/topic ready"),
            Ok(Err(e)) => check(
                &label,
                false,
                format!("{e}: check the [{name}] section and that the broker runs"),
            ),
            Err(_) => check(
                &label,
                false,
                "no answer within 10 s: check the URL and the network",
            ),
        },
    )
}

/// Formats the report, one line per check.
pub fn render(checks: &[Check]) -> String {
    let mut s = String::new();
    for c in checks {
        let _ = writeln!(
            s,
            "{:<4} {:<22} {}",
            if c.ok { "ok" } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    s
}

/// The SQL `outboxd setup` prints: table, publication, slot.
pub fn setup_sql(cfg: &Config) -> String {
    use crate::source::control::{create_publication_sql, create_slot_sql, create_table_sql};
    let (schema, _) = split_table(&cfg.postgres.table);
    format!(
        "-- outboxd setup for {table}\n\
         -- 1. As the table owner: the outbox table and its publication.\n\
         CREATE SCHEMA IF NOT EXISTS {schema};\n\
         {}\n\
         {}\n\
         -- 2. The replication slot (outboxd also creates it on first start).\n\
         {}\n\
         -- 3. Optional: the table-less outbox. Inside a transaction, call\n\
         --    SELECT {schema}.outbox_emit('Order', 'o-1', 'OrderPlaced', '{{\"total\": 3}}');\n\
         {}\n",
        create_table_sql(cfg),
        create_publication_sql(cfg),
        create_slot_sql(cfg),
        crate::source::message::emit_function_sql(schema, &cfg.postgres.message_prefix),
        table = cfg.postgres.table,
    )
}
