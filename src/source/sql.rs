//! Every statement that creates something in the database, in one place: the outbox
//! table, its publication, the slot, the slot record table, the table-less outbox's
//! `outbox_emit()` and the relay role's grants, and the script `outboxd setup` prints
//! from them. The relay runs some of them itself (the publication, the slot, the
//! record table); `outboxd setup --apply` runs the owner's part. Identifiers come from
//! the validated config (`config` checks they are plain SQL identifiers).

use super::state::state_table;
use crate::config::{split_table, Config};

/// `CREATE SCHEMA IF NOT EXISTS` for the outbox table's schema.
pub fn create_schema_sql(cfg: &Config) -> String {
    let (schema, _) = split_table(&cfg.postgres.table);
    format!("CREATE SCHEMA IF NOT EXISTS {schema};")
}

/// The default outbox table (see README, "The outbox table").
pub fn create_table_sql(cfg: &Config) -> String {
    let (schema, table) = split_table(&cfg.postgres.table);
    let c = &cfg.postgres.columns;
    let mut cols = vec![
        format!("  {} uuid PRIMARY KEY DEFAULT gen_random_uuid()", c.id),
        format!("  {} text NOT NULL", c.aggregate_type),
        format!("  {} text NOT NULL", c.aggregate_id),
        format!("  {} text NOT NULL", c.event_type),
        // A NULL payload is a tombstone where the configuration asks for them.
        if cfg.row_extras().null_payload {
            format!("  {} jsonb", c.payload)
        } else {
            format!("  {} jsonb NOT NULL", c.payload)
        },
    ];
    for (name, ty) in [
        (&c.correlation_id, "text"),
        (&c.causation_id, "text"),
        (&c.headers, "jsonb"),
        (&c.created_at, "timestamptz NOT NULL DEFAULT now()"),
        (&c.content_type, "text"),
    ] {
        if !name.is_empty() {
            cols.push(format!("  {name} {ty}"));
        }
    }
    format!(
        "CREATE TABLE IF NOT EXISTS {schema}.{table} (\n{}\n);",
        cols.join(",\n")
    )
}

/// `CREATE PUBLICATION` for the outbox table, inserts only.
pub fn create_publication_sql(cfg: &Config) -> String {
    let (schema, table) = split_table(&cfg.postgres.table);
    format!(
        "CREATE PUBLICATION {} FOR TABLE {schema}.{table} WITH (publish = 'insert');",
        cfg.postgres.publication
    )
}

/// `pg_create_logical_replication_slot` for the configured slot.
pub fn create_slot_sql(cfg: &Config) -> String {
    format!(
        "SELECT pg_create_logical_replication_slot('{}', 'pgoutput');",
        cfg.postgres.slot
    )
}

/// `CREATE TABLE` of the state table (part of `outboxd setup`).
pub fn create_state_table_sql(cfg: &Config) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (\n  \
           slot_name text PRIMARY KEY,\n  \
           publication text NOT NULL,\n  \
           publication_oid oid NOT NULL,\n  \
           table_oid oid NOT NULL,\n  \
           confirmed_lsn pg_lsn NOT NULL,\n  \
           confirmed_at timestamptz NOT NULL,\n  \
           replay_from_xid xid8,\n  \
           resync text\n\
         );",
        state_table(cfg)
    )
}

/// The SQL helper applications call inside their transaction; returns the event id.
pub fn emit_function_sql(schema: &str, prefix: &str) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION {schema}.outbox_emit(\n\
         \x20 aggregate_type text, aggregate_id text, event_type text, payload jsonb,\n\
         \x20 correlation_id text DEFAULT NULL, causation_id text DEFAULT NULL, headers jsonb DEFAULT NULL\n\
         ) RETURNS uuid LANGUAGE plpgsql AS $fn$\n\
         DECLARE event_id uuid := gen_random_uuid();\n\
         BEGIN\n\
         \x20 PERFORM pg_logical_emit_message(true, '{prefix}', jsonb_strip_nulls(jsonb_build_object(\n\
         \x20   'id', event_id, 'aggregate_type', aggregate_type, 'aggregate_id', aggregate_id,\n\
         \x20   'event_type', event_type, 'payload', payload, 'correlation_id', correlation_id,\n\
         \x20   'causation_id', causation_id, 'headers', headers,\n\
         \x20   'created_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')))::text);\n\
         \x20 RETURN event_id;\n\
         END\n\
         $fn$;"
    )
}

/// `GRANT EXECUTE` on the text variant of `pg_logical_emit_message` to `role` (an
/// identifier, quoted where needed), as one statement that works on every version:
/// the signature changed in 17 (see the module docs).
pub fn grant_emit_message_sql(role: &str) -> String {
    format!(
        "DO $grant$ BEGIN\n\
         IF to_regprocedure('pg_catalog.pg_logical_emit_message(boolean, text, text, boolean)') IS NOT NULL THEN\n\
         \x20 GRANT EXECUTE ON FUNCTION pg_catalog.pg_logical_emit_message(boolean, text, text, boolean) TO {role}; -- PostgreSQL 17+\n\
         ELSE\n\
         \x20 GRANT EXECUTE ON FUNCTION pg_catalog.pg_logical_emit_message(boolean, text, text) TO {role};\n\
         END IF; END $grant$;"
    )
}

/// The script `outboxd setup` prints, in two parts: what the table owner (or an
/// administrator) runs once (table, publication, the relay's role and its grants),
/// and what the relay role itself does (the slot).
pub fn setup_script(cfg: &Config) -> String {
    let p = &cfg.postgres;
    let (schema, _) = split_table(&p.table);
    let role = relay_role(cfg);
    let heartbeat = if p.heartbeat_interval_secs > 0 {
        format!(
            "-- heartbeats (PUBLIC has it unless revoked; the signature gained a parameter in 17):\n{}\n",
            grant_emit_message_sql(&role)
        )
    } else {
        String::new()
    };
    format!(
        "-- outboxd setup for {table}, relay role {role}\n\
         --\n\
         -- PART 1. As the table owner (or an administrator), once.\n\
         -- The outbox table and its publication (only the owner may publish a table):\n\
         CREATE SCHEMA IF NOT EXISTS {schema};\n\
         {}\n\
         {}\n\
         -- The relay's role: LOGIN and REPLICATION, not a superuser, not the table owner.\n\
         -- Set its password with `\\password {role}` (password_encryption = scram-sha-256)\n\
         -- and allow it in pg_hba.conf over TLS only; its logical replication connection\n\
         -- matches the database's line, not `replication` lines:\n\
         --   hostssl <database> {role} <client net> scram-sha-256\n\
         DO $role$ BEGIN CREATE ROLE {role} LOGIN REPLICATION;\n\
         EXCEPTION WHEN duplicate_object THEN ALTER ROLE {role} LOGIN REPLICATION; END $role$;\n\
         GRANT USAGE ON SCHEMA {schema} TO {role};\n\
         GRANT SELECT ON {table} TO {role}; -- outboxd replay reads the table\n\
         {heartbeat}\
         -- Where the relay records its slot, so that a lost slot is never replaced silently:\n\
         {state}\n\
         GRANT SELECT, INSERT, UPDATE ON {state_table} TO {role};\n\
         -- Optional, the table-less outbox. Inside a transaction, call\n\
         --    SELECT {schema}.outbox_emit('Order', 'o-1', 'OrderPlaced', '{{\"total\": 3}}');\n\
         {}\n\
         --\n\
         -- PART 2. As the relay role {role} (REPLICATION suffices); `outboxd run` also\n\
         -- does this on first start (postgres.create_slot = true). With the publication\n\
         -- made by the owner, set postgres.create_publication = false.\n\
         {}\n",
        create_table_sql(cfg),
        create_publication_sql(cfg),
        emit_function_sql(schema, &p.message_prefix),
        create_slot_sql(cfg),
        table = p.table,
        state = create_state_table_sql(cfg),
        state_table = state_table(cfg),
    )
}

/// The role `setup` grants to: the user of `postgres.url`, unless that is the
/// bootstrap superuser or missing (then `outboxd`), quoted where SQL needs it.
fn relay_role(cfg: &Config) -> String {
    let user = super::control::pg_config(cfg)
        .ok()
        .and_then(|(pg, _)| pg.get_user().map(str::to_string))
        .filter(|u| u != "postgres")
        .unwrap_or_else(|| "outboxd".to_string());
    let plain = user
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !user.starts_with(|c: char| c.is_ascii_digit());
    if plain {
        user
    } else {
        format!("\"{}\"", user.replace('"', "\"\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sql_helper_names_the_prefix() {
        let sql = emit_function_sql("public", "outboxd.event");
        assert!(sql.contains("CREATE OR REPLACE FUNCTION public.outbox_emit("));
        assert!(sql.contains("pg_logical_emit_message(true, 'outboxd.event'"));
    }

    #[test]
    fn the_grant_names_both_signatures() {
        let sql = grant_emit_message_sql("\"relay role\"");
        assert!(sql.contains("(boolean, text, text, boolean) TO \"relay role\";"));
        assert!(sql.contains("(boolean, text, text) TO \"relay role\";"));
    }

    #[test]
    fn the_payload_may_be_null_only_where_it_is_a_tombstone() {
        let mut cfg = Config::default();
        assert!(create_table_sql(&cfg).contains("  payload jsonb NOT NULL"));
        cfg.sink.kind = crate::config::SinkKind::Kafka;
        cfg.kafka.tombstone_on_empty_payload = true;
        let sql = create_table_sql(&cfg);
        assert!(
            sql.contains("  payload jsonb,") && !sql.contains("payload jsonb NOT NULL"),
            "{sql}"
        );
    }
}
