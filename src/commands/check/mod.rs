//! `outboxd check`: every precondition of a working relay, each reported as ok or
//! FAIL with the fix. Read-only: it creates nothing (see `outboxd setup`).
//!
//! For Kafka it fetches the cluster's metadata (never for one named topic: that
//! request may create it) and the broker's `auto.create.topics.enable`, then says
//! which target topics exist. A templated topic can only be checked for the topics
//! that exist under its literal prefix, plus the aggregate types named with
//! `--aggregate-type`.

mod broker;

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use broker::sink_check;

use crate::config::Config;
use crate::sink::Routes;
use crate::source::control::{Control, Privileges};

/// Runs every check, prints the report, and exits 1 on any FAIL.
pub async fn run(cfg: &Config, routes: &Routes, aggregate_types: &[String]) -> ExitCode {
    let report = checks(cfg, routes, aggregate_types).await;
    print!("{}", render(&report));
    if report.iter().all(|c| c.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_FAILURE)
    }
}

/// How long the broker checks wait for an answer.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Passed? A warning passes (it does not change the exit code).
    pub ok: bool,
    /// A warning: passed, but worth a look (printed as WARN).
    pub warn: bool,
    /// Finding, and for a failure the fix. Never contains a secret.
    pub detail: String,
}

fn check(name: &str, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        name: name.to_string(),
        ok,
        warn: false,
        detail: detail.into(),
    }
}

/// A finding that does not fail the check run.
fn warning(name: &str, detail: impl Into<String>) -> Check {
    Check {
        warn: true,
        ..check(name, true, detail)
    }
}

/// The server's version against the table the version matrix proves
/// (`source::version::TESTED_MAJORS`): ok when tested, FAIL when older than outboxd
/// can run on, WARN otherwise (a newer release).
async fn version_check(control: &Control) -> Check {
    use crate::source::version::{is_tested, major, OLDEST_SUPPORTED, TESTED_MAJORS};
    match control.server_version().await {
        Ok((num, text)) if major(num) < OLDEST_SUPPORTED => check(
            "postgres version",
            false,
            format!(
                "{text}: outboxd needs PostgreSQL {OLDEST_SUPPORTED} or later (pgoutput \
                 carries logical decoding messages, which heartbeats and the table-less \
                 outbox are, from {OLDEST_SUPPORTED} on)"
            ),
        ),
        Ok((num, text)) if is_tested(num) => check(
            "postgres version",
            true,
            format!("{text}: PostgreSQL {} is tested", major(num)),
        ),
        Ok((num, text)) => warning(
            "postgres version",
            format!(
                "{text}: PostgreSQL {} is not among the tested versions ({}); see the README, \
                 \"Supported versions\"",
                major(num),
                TESTED_MAJORS.map(|m| m.to_string()).join(", ")
            ),
        ),
        Err(e) => check("postgres version", false, e.to_string()),
    }
}

/// Runs all checks; stops early only where later ones cannot run. `aggregate_types`
/// are sample aggregate types whose Kafka topics are checked by name.
pub async fn checks(cfg: &Config, routes: &Routes, aggregate_types: &[String]) -> Vec<Check> {
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
            out.extend(sink_check(cfg, routes, aggregate_types).await);
            return out;
        }
    };
    match crate::source::control::pg_config(cfg) {
        Ok((_, tls)) => match control.tls_version().await {
            // Unencrypted works, but the URL's password and every event travel in
            // clear text: a warning, with the key that changes it.
            Ok(None) => out.push(warning(
                "postgres tls",
                format!(
                    "{}; set postgres.tls.mode = \"verify-full\" (docs/security.md)",
                    tls.describe(None)
                ),
            )),
            Ok(version) => out.push(check(
                "postgres tls",
                true,
                tls.describe(version.as_deref()),
            )),
            Err(e) => out.push(check("postgres tls", false, e.to_string())),
        },
        Err(e) => out.push(check("postgres tls", false, e.to_string())),
    }
    out.push(version_check(&control).await);
    match control.wal_level().await {
        Ok(l) if l == "logical" => out.push(check("wal_level", true, "logical")),
        Ok(l) => out.push(check(
            "wal_level",
            false,
            format!("is {l}, must be logical: ALTER SYSTEM SET wal_level = logical; then restart Postgres"),
        )),
        Err(e) => out.push(check("wal_level", false, e.to_string())),
    }
    let privileges = match control.privileges(cfg).await {
        Ok(p) => Some(p),
        Err(e) => {
            out.push(check("privileges", false, e.to_string()));
            None
        }
    };
    if let Some(pr) = &privileges {
        out.extend(privilege_checks(cfg, pr));
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
            let mut missing: Vec<String> = [
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
            missing.extend(
                cfg.row_extras()
                    .columns
                    .into_iter()
                    .filter(|col| !names.contains(&col.as_str()))
                    .map(|col| format!("{col} (kafka.additional_headers)")),
            );
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
    if cfg.retention.enabled {
        out.push(retention_check(&control, cfg).await);
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
        Ok(None) if p.create_publication && privileges.as_ref().is_some_and(|pr| pr.can_publish == Some(false)) => out.push(check(
            "publication",
            false,
            format!(
                "{} does not exist, and role {} may not create it (it does not own {} or lacks \
                 CREATE on the database): the table owner must run CREATE PUBLICATION {} FOR TABLE {} \
                 WITH (publish = 'insert'); (part 1 of `outboxd setup`)",
                p.publication,
                privileges.as_ref().map_or("", |pr| pr.role.as_str()),
                p.table,
                p.publication,
                p.table
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
                "{} was invalidated (wal_status = lost): events after {} may be missing; \
                 `outboxd run --allow-new-slot` creates a new slot and first republishes them \
                 from the outbox table",
                p.slot,
                crate::lsn::lsn_text(s.confirmed_flush_lsn)
            ),
        )),
        Ok(Some(s)) if s.plugin == "pgoutput" => out.push(check(
            "replication slot",
            true,
            format!(
                "{} at {}{}",
                p.slot,
                crate::lsn::lsn_text(s.confirmed_flush_lsn),
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
    out.push(record_check(&control, cfg).await);
    out.extend(sink_check(cfg, routes, aggregate_types).await);
    out
}

/// The slot's record (`source::state`): a slot lost since, or a table or publication
/// changed under it, is a FAIL naming the recovery (what `run` would wait for).
async fn record_check(control: &Control, cfg: &Config) -> Check {
    use crate::source::state::{self, Verdict};
    let name = "slot record";
    let judged = async {
        let record = control.slot_record(cfg).await?;
        let identity = control.identity(cfg).await?;
        let slot = control.slot(&cfg.postgres.slot).await?;
        Ok::<_, crate::source::SourceError>((record, identity, slot))
    };
    let (record, identity, slot) = match judged.await {
        Ok(found) => found,
        Err(e) => return check(name, false, e.to_string()),
    };
    match control.state_access(cfg).await {
        Ok(state::StateAccess::NotPermitted(fix)) => {
            return warning(
                name,
                format!(
                    "outboxd relays, but cannot record its slot, so a slot lost while it is \
                     stopped would go unnoticed: {fix}"
                ),
            )
        }
        Ok(state::StateAccess::InRecovery) => {
            return warning(
                name,
                "the server is a standby: outboxd cannot record its slot here, so a slot lost \
                 while it is stopped goes unnoticed",
            )
        }
        Ok(state::StateAccess::Writable) => {}
        Err(e) => return check(name, false, e.to_string()),
    }
    let lost = slot
        .as_ref()
        .is_some_and(|s| s.wal_status.as_deref() == Some("lost"));
    let Some(r) = &record else {
        return check(
            name,
            true,
            format!(
                "nothing recorded yet in {}; `run` records the slot when it streams",
                state::state_table(cfg)
            ),
        );
    };
    match state::judge(record.as_ref(), slot.is_some(), lost, &identity) {
        Verdict::SlotLost => check(
            name,
            false,
            state::lost_message(cfg, record.as_ref(), slot.is_some(), &identity, false),
        ),
        Verdict::PublicationChanged => check(
            name,
            false,
            state::lost_message(cfg, record.as_ref(), slot.is_some(), &identity, true),
        ),
        Verdict::TableChanged(why) => check(name, false, state::table_message(cfg, &why)),
        _ => check(
            name,
            true,
            format!(
                "{} streams {} through {}; confirmed up to {} at {}",
                cfg.postgres.slot,
                cfg.postgres.table,
                cfg.postgres.publication,
                crate::lsn::lsn_text(r.confirmed_lsn),
                r.confirmed_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
        ),
    }
}

/// REPLICATION (needed), SELECT on the table (for `replay`), EXECUTE on
/// `pg_logical_emit_message` (when heartbeats are on): each with the statement that
/// grants it.
fn privilege_checks(cfg: &Config, pr: &Privileges) -> Vec<Check> {
    let mut out = vec![match pr.missing_replication() {
        None if pr.superuser => warning(
            "replication privilege",
            format!(
                "role {} is a superuser: a REPLICATION role suffices and can do far less harm (`outboxd setup` prints it)",
                pr.role
            ),
        ),
        None => check(
            "replication privilege",
            true,
            format!("role {} has REPLICATION", pr.role),
        ),
        Some(fix) => check("replication privilege", false, fix),
    }];
    match (pr.select, pr.missing_select(&cfg.postgres.table)) {
        (None, _) => {} // the table check reports a missing table
        (Some(_), Some(fix)) => out.push(check("table privilege", false, fix)),
        (Some(_), None) => out.push(check(
            "table privilege",
            true,
            format!(
                "role {} may SELECT from {} (outboxd replay)",
                pr.role, cfg.postgres.table
            ),
        )),
    }
    if cfg.postgres.heartbeat_interval_secs > 0 {
        out.push(match pr.missing_emit_message() {
            Some(fix) => check(
                "heartbeat privilege",
                false,
                format!("{fix} (or set postgres.heartbeat_interval_secs = 0)"),
            ),
            None => check(
                "heartbeat privilege",
                true,
                format!("role {} may call pg_logical_emit_message", pr.role),
            ),
        });
    }
    out
}

/// Formats the report, one line per check.
pub fn render(checks: &[Check]) -> String {
    let mut s = String::new();
    for c in checks {
        let _ = writeln!(
            s,
            "{:<4} {:<22} {}",
            match (c.ok, c.warn) {
                (false, _) => "FAIL",
                (true, true) => "WARN",
                (true, false) => "ok",
            },
            c.name,
            c.detail
        );
    }
    s
}

/// `[retention]` needs DELETE on the table and the created_at column.
async fn retention_check(control: &Control, cfg: &Config) -> Check {
    let (table, created_at) = (&cfg.postgres.table, &cfg.postgres.columns.created_at);
    match control.table_columns(table).await {
        Ok(Some(cols)) if !cols.iter().any(|(n, _)| n == created_at) => {
            return check(
                "retention",
                false,
                format!("{table} has no column {created_at} (postgres.columns.created_at): retention needs it"),
            )
        }
        Ok(_) => {}
        Err(e) => return check("retention", false, e.to_string()),
    }
    match control.may_delete(table).await {
        Ok(true) => check("retention", true, format!("role may delete from {table}")),
        Ok(false) => check(
            "retention",
            false,
            format!("role may not delete from {table}: GRANT DELETE ON {table} TO <role> (or set retention.enabled = false)"),
        ),
        Err(e) => check("retention", false, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_warning_prints_warn_and_does_not_fail() {
        let report = [
            check("config", true, "configuration is valid"),
            warning(
                "postgres version",
                "13.22: PostgreSQL 13 is not among the tested versions",
            ),
        ];
        let text = render(&report);
        assert!(text.contains("ok   config"), "{text}");
        assert!(text.contains("WARN postgres version       13.22"), "{text}");
        assert!(
            report.iter().all(|c| c.ok),
            "a warning must not change the exit code"
        );
        let fail = render(&[check("wal_level", false, "is replica")]);
        assert!(fail.starts_with("FAIL wal_level"), "{fail}");
    }
}
