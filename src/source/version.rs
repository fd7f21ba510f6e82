//! PostgreSQL server versions: which ones the test matrix proves (README, "Supported
//! versions"), and the few commands whose spelling differs between them. It only
//! judges a `server_version_num`; it never talks to a server.
//!
//! What differs, and why it matters here:
//! - `CREATE_REPLICATION_SLOT … (SNAPSHOT 'export')` is the option syntax of
//!   PostgreSQL 15; 14 only knows the older keyword form `EXPORT_SNAPSHOT` and
//!   answers the new one with a syntax error (42601), which would keep the initial
//!   snapshot retrying forever.
//! - `pg_logical_emit_message` gained a fourth parameter (`flush boolean DEFAULT
//!   false`) in 17, which replaced the three-parameter function: a privilege check
//!   or GRANT naming `(boolean, text, text)` fails there with 42883.
//! - Failover slots (`failover` of `pg_create_logical_replication_slot`,
//!   `ALTER_REPLICATION_SLOT`) exist from 17 on; decoding on a hot standby from 16.

/// Major versions the version matrix runs against (15 is the `make test` default).
/// `outboxd check` warns on any other.
pub const TESTED_MAJORS: [u32; 5] = [14, 15, 16, 17, 18];

/// The oldest major version outboxd can run on: pgoutput sends logical decoding
/// messages (its `messages` option, which the replication session always sets) from
/// 14 on, and heartbeats and the table-less outbox are such messages.
pub const OLDEST_SUPPORTED: u32 = 14;

/// The first major version with failover slots.
pub const FAILOVER_SLOTS_SINCE: u32 = 17;

/// The major version of a `server_version_num` (`170004` → 17).
pub fn major(version_num: i32) -> u32 {
    u32::try_from(version_num / 10_000).unwrap_or(0)
}

/// Whether the test matrix covers this server.
pub fn is_tested(version_num: i32) -> bool {
    TESTED_MAJORS.contains(&major(version_num))
}

/// The replication command that creates a temporary logical slot with pgoutput and
/// exports its snapshot, spelled for the server.
pub fn create_exported_temp_slot(version_num: i32, name: &str) -> String {
    if major(version_num) < 15 {
        format!("CREATE_REPLICATION_SLOT {name} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT")
    } else {
        format!("CREATE_REPLICATION_SLOT {name} TEMPORARY LOGICAL pgoutput (SNAPSHOT 'export')")
    }
}

/// SQL for the `regprocedure` of the text variant of `pg_logical_emit_message` on
/// whatever server runs it: `(boolean, text, text, boolean)` from 17 on, `(boolean,
/// text, text)` before. NULL only if neither exists.
pub const EMIT_MESSAGE_FN_SQL: &str =
    "COALESCE(to_regprocedure('pg_catalog.pg_logical_emit_message(boolean, text, text, boolean)'), \
     to_regprocedure('pg_catalog.pg_logical_emit_message(boolean, text, text)'))";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majors_and_the_tested_table() {
        assert_eq!(major(140_023), 14);
        assert_eq!(major(180_004), 18);
        assert!(is_tested(160_014) && is_tested(150_010));
        assert!(!is_tested(130_020), "13 is not in the matrix");
        assert!(
            !is_tested(190_000),
            "a release newer than the matrix is not tested"
        );
    }

    #[test]
    fn the_exported_slot_command_is_spelled_per_version() {
        assert_eq!(
            create_exported_temp_slot(140_023, "s"),
            "CREATE_REPLICATION_SLOT s TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT"
        );
        assert!(create_exported_temp_slot(150_000, "s").ends_with("(SNAPSHOT 'export')"));
        assert!(create_exported_temp_slot(180_004, "s").ends_with("(SNAPSHOT 'export')"));
    }
}
