//! `outboxd setup`: prints the SQL of `source::sql` in two parts (what the table
//! owner runs, what the relay role does), or with `--apply` runs the parts that need
//! no superuser and no password chosen by a person: schema, table, `outbox_emit()`,
//! publication and slot, as `postgres.url`'s role. Idempotent.

use std::process::ExitCode;

use super::{CommandError, Step};
use crate::config::Config;
use crate::lsn::lsn_text;
use crate::source::control::Control;
use crate::source::sql;

/// Prints the setup script, or applies it with `apply`.
pub async fn run(cfg: &Config, apply: bool) -> Result<ExitCode, CommandError> {
    if !apply {
        print!("{}", sql::setup_script(cfg));
        return Ok(ExitCode::SUCCESS);
    }
    let control = Control::connect(cfg).await.step("connecting to postgres")?;
    control
        .apply(&format!(
            "{}\n{}",
            sql::create_schema_sql(cfg),
            sql::create_table_sql(cfg)
        ))
        .await
        .step("creating the outbox table")?;
    let (schema, _) = crate::config::split_table(&cfg.postgres.table);
    if !cfg.postgres.message_prefix.is_empty() {
        control
            .apply(&sql::emit_function_sql(
                schema,
                &cfg.postgres.message_prefix,
            ))
            .await
            .step("creating outbox_emit()")?;
    }
    let mut forced = cfg.clone();
    forced.postgres.create_publication = true;
    forced.postgres.create_slot = true;
    control
        .ensure_publication(&forced)
        .await
        .step("creating the publication")?;
    let existing = control
        .slot(&cfg.postgres.slot)
        .await
        .map_err(CommandError::other)?;
    if cfg.postgres.initial_snapshot && existing.is_none() {
        // The snapshot is taken by the instance that creates the slot: leave that to
        // `outboxd run`, or the rows already in the table would never be published.
        println!(
            "applied: table {}, publication {}; slot {} left to `outboxd run` (postgres.initial_snapshot)",
            cfg.postgres.table, cfg.postgres.publication, cfg.postgres.slot
        );
        return Ok(ExitCode::SUCCESS);
    }
    let slot = control
        .ensure_slot(&forced)
        .await
        .step("creating the slot")?;
    println!(
        "applied: table {}, publication {}, slot {} at {}",
        cfg.postgres.table,
        cfg.postgres.publication,
        cfg.postgres.slot,
        lsn_text(slot.confirmed_flush_lsn)
    );
    Ok(ExitCode::SUCCESS)
}
