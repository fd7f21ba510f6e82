//! `[postgres]`, `[postgres.tls]` and `[postgres.columns]`: the database, the slot,
//! the publication and the outbox table's column names. What the URL and the TLS
//! settings mean is checked by `source::tls::resolve`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{identifier, invalid, split_table, ConfigError, Secret};

/// Default replication slot name.
pub const DEFAULT_SLOT: &str = "outboxd";
/// Default publication name.
pub const DEFAULT_PUBLICATION: &str = "outboxd";
/// Default outbox table.
pub const DEFAULT_TABLE: &str = "public.outbox";
/// Prefix of the relay's heartbeat messages (`source::monitor`): reserved, so
/// `postgres.message_prefix` may not take it.
pub const HEARTBEAT_PREFIX: &str = "outboxd.heartbeat";

/// `[postgres]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Connection URL, `postgres://user:password@host:port/db?sslmode=...`. Secret.
    pub url: Secret,
    /// File holding the URL (a mounted Kubernetes Secret); overrides `url`.
    pub url_file: Option<PathBuf>,
    /// File holding the password; overrides a password in the URL.
    pub password_file: Option<PathBuf>,
    /// Logical replication slot (pgoutput). Default `outboxd`.
    pub slot: String,
    /// Publication of the outbox table. Default `outboxd`.
    pub publication: String,
    /// The outbox table, `schema.table`. Default `public.outbox`.
    pub table: String,
    /// Create the publication when missing. Default true.
    pub create_publication: bool,
    /// Create the slot when missing on first start. Default true.
    pub create_slot: bool,
    /// How often the confirmed LSN is reported to the server at most, in ms. Default 1000.
    pub status_interval_ms: u64,
    /// Seconds between heartbeat messages that let the slot advance on an idle outbox;
    /// 0 turns them off. Default 10.
    pub heartbeat_interval_secs: u64,
    /// Seconds between reads of the slot's lag and WAL retention. Default 10.
    pub monitor_interval_secs: u64,
    /// Prefix of table-less outbox events written with
    /// `pg_logical_emit_message(true, prefix, json)`; empty turns them off.
    /// Default `outboxd.event`.
    pub message_prefix: String,
    /// Recover from a lost slot (invalidated, dropped, or gone with a failover) or a
    /// re-created publication: create a new slot, first republishing from the table the
    /// rows committed since the old slot's recorded position. Also set by
    /// `outboxd run --allow-new-slot`. Default false.
    pub allow_new_slot: bool,
    /// Recover from an outbox table that left the publication or was re-created:
    /// publish all of its rows, then stream on. Acts only when outboxd found the table
    /// changed. Also set by `outboxd run --resync-table`. Default false.
    pub resync_table: bool,
    /// Create the slot as a PostgreSQL 17 failover slot (`failover = true`), so it is
    /// synchronized to physical standbys and survives a primary failover. Needs
    /// PostgreSQL 17+ and `sync_replication_slots` on the standby. Default false.
    pub failover_slot: bool,
    /// While another instance streams from the slot, try to take over about this
    /// often (jittered ±50 %), in ms. Bounds takeover time. Default 1000.
    pub standby_poll_ms: u64,
    /// When `outboxd run` creates the slot, first publish the rows already in the
    /// outbox table, exactly once relative to the stream (README, "Initial
    /// snapshot"): rows an application commits while outboxd first starts are not
    /// lost. Set false only when another relay already published those rows (a
    /// migration). Default true.
    pub initial_snapshot: bool,
    /// Column names of the outbox table.
    pub columns: ColumnMapping,
    /// TLS to Postgres (both connections).
    pub tls: PostgresTlsConfig,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: Secret::default(),
            url_file: None,
            password_file: None,
            slot: DEFAULT_SLOT.into(),
            publication: DEFAULT_PUBLICATION.into(),
            table: DEFAULT_TABLE.into(),
            create_publication: true,
            create_slot: true,
            status_interval_ms: 1000,
            heartbeat_interval_secs: 10,
            monitor_interval_secs: 10,
            message_prefix: "outboxd.event".into(),
            allow_new_slot: false,
            resync_table: false,
            failover_slot: false,
            standby_poll_ms: 1000,
            initial_snapshot: true,
            columns: ColumnMapping::default(),
            tls: PostgresTlsConfig::default(),
        }
    }
}

/// `[postgres.tls]`: TLS for both Postgres connections (replication and SQL), with
/// libpq's semantics. Every key is optional; a key that is set wins over the libpq
/// parameter of the same meaning in `postgres.url` (`sslmode`, `sslrootcert`,
/// `sslcert`, `sslkey`), which wins over the default. Checked at start-up by
/// `source::tls::resolve`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresTlsConfig {
    /// libpq's `sslmode`. Default: the URL's `sslmode`, else `prefer`.
    pub mode: Option<SslModeSetting>,
    /// PEM file of the CA(s) that sign the server certificate (`sslrootcert`).
    /// Default: none, i.e. the bundled Mozilla roots for `verify-ca`/`verify-full`.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for certificate authentication (`sslcert`). Default none.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file` (`sslkey`). Default none.
    pub client_key_file: Option<PathBuf>,
}

/// libpq's `sslmode` values (`allow` is not offered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslModeSetting {
    /// Never TLS.
    Disable,
    /// TLS when the server offers it, unverified; else plain.
    Prefer,
    /// TLS or fail; the certificate is not verified (unless a CA file is given, as in libpq).
    Require,
    /// TLS, the certificate chain verified against the CA.
    VerifyCa,
    /// TLS, chain verified and the host name (or IP) matched against the certificate.
    VerifyFull,
}

/// `[postgres.columns]`: the outbox table's column names. An empty string for an
/// optional column means "not present".
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ColumnMapping {
    /// Event id (uuid or text), required. Default `id`.
    pub id: String,
    /// Aggregate type, used for routing, required. Default `aggregate_type`.
    pub aggregate_type: String,
    /// Aggregate id: subject, ordering key, partition key; required. Default `aggregate_id`.
    pub aggregate_id: String,
    /// Event type, required. Default `event_type`.
    pub event_type: String,
    /// Payload (jsonb, json, text or bytea), required. Default `payload`.
    pub payload: String,
    /// Optional correlation id. Default `correlation_id`.
    pub correlation_id: String,
    /// Optional causation id. Default `causation_id`.
    pub causation_id: String,
    /// Optional jsonb object of extra attributes. Default `headers`.
    pub headers: String,
    /// Optional creation time (CloudEvent `time`). Default `created_at`.
    pub created_at: String,
    /// Optional per-row content type. Default empty (not present).
    pub content_type: String,
}

impl Default for ColumnMapping {
    fn default() -> Self {
        Self {
            id: "id".into(),
            aggregate_type: "aggregate_type".into(),
            aggregate_id: "aggregate_id".into(),
            event_type: "event_type".into(),
            payload: "payload".into(),
            correlation_id: "correlation_id".into(),
            causation_id: "causation_id".into(),
            headers: "headers".into(),
            created_at: "created_at".into(),
            content_type: String::new(),
        }
    }
}

impl PostgresConfig {
    /// Shape checks of this section; each error names the key.
    pub(super) fn validate(&self, needs_url: bool) -> Result<(), ConfigError> {
        let pg = self;
        if needs_url && pg.url.is_empty() {
            return Err(invalid(
                "postgres.url",
                "missing: set postgres.url, postgres.url_file or OUTBOXD_POSTGRES__URL",
            ));
        }
        identifier("postgres.slot", &pg.slot)?;
        identifier("postgres.publication", &pg.publication)?;
        let (schema, table) = split_table(&pg.table);
        identifier("postgres.table", schema)?;
        identifier("postgres.table", table)?;
        if pg.status_interval_ms == 0 {
            return Err(invalid("postgres.status_interval_ms", "must be > 0"));
        }
        if pg.message_prefix == HEARTBEAT_PREFIX {
            return Err(invalid(
                "postgres.message_prefix",
                "is the heartbeat prefix; choose another",
            ));
        }
        if pg.standby_poll_ms < 50 {
            return Err(invalid("postgres.standby_poll_ms", "must be >= 50 (ms)"));
        }
        if pg.monitor_interval_secs == 0 {
            return Err(invalid("postgres.monitor_interval_secs", "must be > 0"));
        }
        let c = &pg.columns;
        for (key, v) in [
            ("postgres.columns.id", &c.id),
            ("postgres.columns.aggregate_type", &c.aggregate_type),
            ("postgres.columns.aggregate_id", &c.aggregate_id),
            ("postgres.columns.event_type", &c.event_type),
            ("postgres.columns.payload", &c.payload),
        ] {
            if v.is_empty() {
                return Err(invalid(key, "a required column must be named"));
            }
        }
        Ok(())
    }
}
