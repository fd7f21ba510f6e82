//! The relay role's privileges, as far as outboxd needs them, and for each one that
//! is missing the statement that grants it (named in errors, warnings and `outboxd
//! check`). Read by [`super::control::Control::privileges`]; this module only judges.
//!
//! Needed: REPLICATION (the replication connection, the slot). Optional: SELECT on
//! the outbox table (`outboxd replay` reads it; streaming does not, the walsender
//! decodes the WAL for a REPLICATION role), EXECUTE on `pg_logical_emit_message`
//! (heartbeats), and owning the table (only to create the publication, which the
//! owner does instead).

/// The connected role and what it may do, as far as outboxd needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Privileges {
    /// `current_user`, quoted as an identifier where needed.
    pub role: String,
    /// Superuser: may do everything (but should not be used).
    pub superuser: bool,
    /// The REPLICATION attribute (or, on Amazon RDS and Aurora, membership in
    /// `rds_replication`): replication connections, slots.
    pub replication: bool,
    /// SELECT on the outbox table (`outboxd replay`); `None` when it does not exist.
    pub select: Option<bool>,
    /// EXECUTE on the text variant of `pg_logical_emit_message` (heartbeats).
    pub emit_message: bool,
    /// That variant's signature on this server, e.g.
    /// `pg_logical_emit_message(boolean,text,text,boolean)` (PostgreSQL 17+).
    pub emit_message_fn: String,
    /// May create the publication: owns the table and has CREATE on the database;
    /// `None` when the table does not exist.
    pub can_publish: Option<bool>,
}

impl Privileges {
    /// Without REPLICATION nothing streams: the statement that grants it.
    pub fn missing_replication(&self) -> Option<String> {
        (!self.replication && !self.superuser).then(|| {
            format!(
                "role {r} lacks the REPLICATION attribute: as a superuser, run \
                 ALTER ROLE {r} REPLICATION; (on Amazon RDS and Aurora: \
                 GRANT rds_replication TO {r};)",
                r = self.role
            )
        })
    }

    /// Without SELECT on the table `outboxd replay` cannot read it (streaming needs
    /// no SELECT: the walsender decodes the WAL for the REPLICATION role).
    pub fn missing_select(&self, table: &str) -> Option<String> {
        (self.select == Some(false)).then(|| {
            format!(
                "role {r} lacks SELECT on {table}: as the table owner, run \
                 GRANT SELECT ON {table} TO {r};",
                r = self.role
            )
        })
    }

    /// Without EXECUTE on `pg_logical_emit_message` no heartbeat is written.
    pub fn missing_emit_message(&self) -> Option<String> {
        (!self.emit_message).then(|| {
            format!(
                "role {r} lacks EXECUTE on pg_logical_emit_message (heartbeats): run \
                 GRANT EXECUTE ON FUNCTION {f} TO {r};",
                r = self.role,
                f = self.emit_message_fn
            )
        })
    }
}
