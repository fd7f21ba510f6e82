//! Typed configuration: defaults < TOML file < `OUTBOXD_<SECTION>__<KEY>` environment.
//!
//! Owns loading, secret resolution (`*_file` keys) and validation. Everything the
//! rest of the daemon reads is checked here once, at start-up, so a bad value is
//! reported with the key that holds it before any connection is made. This module
//! never logs and never prints a secret: [`Secret`] has no way to be displayed.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

mod env;
mod security;
pub use env::{unused_env_vars, UnusedEnvVar};
pub use security::{redact_url, redact_userinfo};

/// Default replication slot name.
pub const DEFAULT_SLOT: &str = "outboxd";
/// Default publication name.
pub const DEFAULT_PUBLICATION: &str = "outboxd";
/// Default outbox table.
pub const DEFAULT_TABLE: &str = "public.outbox";
/// Default NATS subject template (`outbox.<aggregate type>`).
pub const DEFAULT_NATS_SUBJECT: &str = "outbox.{aggregate_type}";
/// Default Kafka topic template: Debezium's Outbox Event Router convention.
pub const DEFAULT_KAFKA_TOPIC: &str = "outbox.event.{aggregate_type}";
/// Default Kafka `message.timeout.ms`: a delivery report fails after this long.
pub const DEFAULT_KAFKA_MESSAGE_TIMEOUT_MS: u64 = 30_000;
/// Default listen address of the HTTP endpoints.
pub const DEFAULT_HTTP_LISTEN: &str = "0.0.0.0:9187";
/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "OUTBOXD_";

/// Prefix of the relay's heartbeat messages (`source::monitor`): reserved, so
/// `postgres.message_prefix` may not take it.
pub const HEARTBEAT_PREFIX: &str = "outboxd.heartbeat";

/// A configuration error, naming the key and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file, the environment or a type did not parse (figment names the key).
    #[error("{0}")]
    Parse(String),
    /// The file is not valid TOML. Only the position and the parser's message are
    /// kept: the parser's own rendering quotes the line, which may hold a secret.
    #[error("{}: TOML syntax error at line {line}, column {column}: {message}", .file.display())]
    Syntax {
        /// The configuration file.
        file: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column (in characters) of the error.
        column: usize,
        /// What the parser expected, e.g. `invalid basic string`.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("{key}: {reason}")]
    Invalid {
        /// Dotted key, e.g. `postgres.url`.
        key: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A `*_file` secret could not be read.
    #[error("{key}: cannot read {path}: {source}")]
    SecretFile {
        /// Dotted key, e.g. `postgres.url_file`.
        key: String,
        /// The path named by the key.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl ConfigError {
    /// `key: reason`, for a value that parsed but is not acceptable. Also for the
    /// checks of what a value means, which the module that owns the meaning runs
    /// right after loading (`source::tls`, `sink::validate`).
    pub fn invalid(key: &str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.to_string(),
            reason: reason.into(),
        }
    }
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::invalid(key, reason)
}

/// A value that must never be printed: its `Debug` and `Display` are redacted.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself; call only where it is handed to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// True when no value was given.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The database holding the outbox table.
    pub postgres: PostgresConfig,
    /// How rows become CloudEvents.
    pub cloudevents: CloudEventsConfig,
    /// Where events go and how many may be in flight.
    pub sink: SinkConfig,
    /// NATS JetStream sink.
    pub nats: NatsConfig,
    /// Kafka sink.
    pub kafka: KafkaConfig,
    /// Reconnect and publish retry backoff.
    pub retry: RetryConfig,
    /// HTTP endpoints.
    pub http: HttpConfig,
    /// Logging.
    pub log: LogConfig,
    /// Deleting acknowledged outbox rows.
    pub retention: RetentionConfig,
}

/// `[retention]`: the streaming instance deletes outbox rows that are older than
/// `older_than_secs` and acknowledged by the broker (README, "Retention").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Delete acknowledged rows at all. Default false.
    pub enabled: bool,
    /// Only rows whose `created_at` is older than this, in seconds. Default 86400 (1 day).
    pub older_than_secs: u64,
    /// Rows per `DELETE` statement (one short transaction each). Default 1000.
    pub batch_size: u32,
    /// Seconds between cleanup rounds. Default 60.
    pub interval_secs: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            older_than_secs: 86_400,
            batch_size: 1000,
            interval_secs: 60,
        }
    }
}

impl RetentionConfig {
    fn validate(&self, columns: &ColumnMapping) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        if columns.created_at.is_empty() {
            return Err(invalid(
                "retention.enabled",
                "needs a created_at column (postgres.columns.created_at) to tell a row's age",
            ));
        }
        if self.batch_size == 0 {
            return Err(invalid("retention.batch_size", "must be > 0"));
        }
        if self.interval_secs == 0 {
            return Err(invalid("retention.interval_secs", "must be > 0"));
        }
        Ok(())
    }
}

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

/// `[cloudevents]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudEventsConfig {
    /// CloudEvent `source` (a URI-reference). Default `/outboxd`.
    pub source: String,
    /// Prepended to the row's event type, e.g. `com.example.orders.`. Default empty.
    pub type_prefix: String,
    /// `datacontenttype` when no content type column is mapped. Default `application/json`.
    pub default_content_type: String,
}

impl Default for CloudEventsConfig {
    fn default() -> Self {
        Self {
            source: "/outboxd".into(),
            type_prefix: String::new(),
            default_content_type: "application/json".into(),
        }
    }
}

/// Which broker receives the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// One structured-mode CloudEvent JSON per line on standard output.
    Stdout,
    /// NATS JetStream.
    Nats,
    /// Kafka.
    Kafka,
}

/// CloudEvents content mode of a protocol binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentMode {
    /// Attributes as headers, data as the body.
    Binary,
    /// The whole event as `application/cloudevents+json` body.
    Structured,
}

/// What to do with a row that cannot be published as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoisonPolicy {
    /// Publish a dead letter (the original row or event plus the reason) to the
    /// dead-letter destination, then continue.
    DeadLetter,
    /// Stop with an error naming the row id; the LSN does not move past it.
    Halt,
}

/// `[sink]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// `stdout`, `nats` or `kafka`. Default `stdout`.
    pub kind: SinkKind,
    /// Events held in memory at most (in flight plus waiting); reading pauses above. Default
    /// 1024: as fast as 8192 in `make bench`'s drains, with ~20 MiB less peak RSS.
    pub max_in_flight: usize,
    /// Rows that are not valid outbox rows: `dead_letter` (default) or `halt`.
    pub on_invalid: PoisonPolicy,
    /// Events the broker rejects permanently: `dead_letter` (default) or `halt`.
    pub on_rejected: PoisonPolicy,
    /// Seconds to wait on SIGTERM, in all, for the open transaction to be read to its
    /// commit and for in-flight acks; the process exits within 5 s more. Default 20.
    pub shutdown_timeout_secs: u64,
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self {
            kind: SinkKind::Stdout,
            max_in_flight: 1024,
            on_invalid: PoisonPolicy::DeadLetter,
            on_rejected: PoisonPolicy::DeadLetter,
            shutdown_timeout_secs: 20,
        }
    }
}

/// `[nats]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma separated. Secret (may carry credentials). Default `nats://127.0.0.1:4222`.
    pub url: Secret,
    /// File holding the URL; overrides `url`.
    pub url_file: Option<PathBuf>,
    /// Subject template; placeholders `{aggregate_type}`, `{aggregate_id}`, `{event_type}`.
    pub subject: String,
    /// JetStream stream that captures the subjects. Default `OUTBOX`.
    pub stream: String,
    /// Subjects of the stream when outboxd creates it. Default `["outbox.>"]`.
    pub stream_subjects: Vec<String>,
    /// Create the stream when missing. Default true.
    pub create_stream: bool,
    /// Dead-letter subject for poison rows. Default `outbox.deadletter`.
    pub dead_letter_subject: String,
    /// `binary` (default) or `structured`.
    pub content_mode: ContentMode,
    /// Time to wait for a PubAck, in ms. Default 5000.
    pub ack_timeout_ms: u64,
    // TLS and credentials; resolved and validated in `config/security.rs`.
    /// Refuse a connection without TLS (a `tls://` URL, or a CA or client certificate
    /// below, implies it). Default false.
    pub require_tls: bool,
    /// PEM file of the CA(s) that verify the server's certificate; default: the
    /// system's roots.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS; needs `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// User name; needs `password` or `password_file`. Default none.
    pub user: String,
    /// Password of `user`. Secret.
    pub password: Secret,
    /// File holding the password; overrides `password`.
    pub password_file: Option<PathBuf>,
    /// Authentication token. Secret.
    pub token: Secret,
    /// File holding the token; overrides `token`.
    pub token_file: Option<PathBuf>,
    /// `.creds` file: user JWT plus NKey seed (decentralized auth).
    pub creds_file: Option<PathBuf>,
    /// NKey user seed (`SU…`). Secret.
    pub nkey_seed: Secret,
    /// File holding the NKey seed; overrides `nkey_seed`.
    pub nkey_seed_file: Option<PathBuf>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("nats://127.0.0.1:4222"),
            url_file: None,
            subject: DEFAULT_NATS_SUBJECT.into(),
            stream: "OUTBOX".into(),
            stream_subjects: vec!["outbox.>".into()],
            create_stream: true,
            dead_letter_subject: "outbox.deadletter".into(),
            content_mode: ContentMode::Binary,
            ack_timeout_ms: 5000,
            require_tls: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            user: String::new(),
            password: Secret::default(),
            password_file: None,
            token: Secret::default(),
            token_file: None,
            creds_file: None,
            nkey_seed: Secret::default(),
            nkey_seed_file: None,
        }
    }
}

/// `[kafka]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated. Default `127.0.0.1:9092`.
    pub brokers: String,
    /// Topic template. Default `outbox.event.{aggregate_type}`.
    pub topic: String,
    /// Record key template. Default `{aggregate_id}`.
    pub key: String,
    /// Dead-letter topic. Default `outbox.deadletter`.
    pub dead_letter_topic: String,
    /// `binary` (default) or `structured`.
    pub content_mode: ContentMode,
    /// How long librdkafka may try to deliver one record before its delivery report
    /// fails (`message.timeout.ms`), in ms. The relay then retries it. Default 30000.
    pub message_timeout_ms: u64,
    /// librdkafka properties passed through (SASL, SSL, tuning); they win over
    /// outboxd's producer defaults. Values are treated as secrets. Default empty.
    pub properties: BTreeMap<String, Secret>,
    /// librdkafka properties whose values are read from files (mounted Secrets), e.g.
    /// `"sasl.password" = "/var/run/secrets/kafka/password"`; a trailing newline is
    /// dropped. They win over `properties`. Default empty.
    pub properties_files: BTreeMap<String, PathBuf>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic: DEFAULT_KAFKA_TOPIC.into(),
            key: "{aggregate_id}".into(),
            dead_letter_topic: "outbox.deadletter".into(),
            content_mode: ContentMode::Binary,
            message_timeout_ms: DEFAULT_KAFKA_MESSAGE_TIMEOUT_MS,
            properties: BTreeMap::new(),
            properties_files: BTreeMap::new(),
        }
    }
}

/// `[retry]`: exponential backoff with full jitter.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// First delay, in ms. Default 100.
    pub initial_backoff_ms: u64,
    /// Largest delay, in ms. Default 30000.
    pub max_backoff_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial_backoff_ms: 100,
            max_backoff_ms: 30_000,
        }
    }
}

/// `[http]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listen address of `/metrics`, `/healthz`, `/readyz`, `/status`; `127.0.0.1:9187`
    /// serves this host only. Default `0.0.0.0:9187`.
    pub listen: String,
    // Optional auth of `/metrics` and `/status` (`/healthz`, `/readyz` stay open);
    // resolved and validated in `config/security.rs`.
    /// Accept `Authorization: Bearer <token>`. Secret. Default none.
    pub bearer_token: Secret,
    /// File holding the bearer token; overrides `bearer_token`.
    pub bearer_token_file: Option<PathBuf>,
    /// Accept HTTP basic auth as this user; needs a password. Default none.
    pub basic_auth_user: String,
    /// Basic auth password. Secret.
    pub basic_auth_password: Secret,
    /// File holding the basic auth password; overrides `basic_auth_password`.
    pub basic_auth_password_file: Option<PathBuf>,
    /// What `/readyz` requires: `sidecar` (default: ready unless an operator must act;
    /// outages do not take the pod out of service) or `strict` (also not ready while
    /// publishes fail or the relay is not streaming or standing by).
    pub readiness: ReadinessMode,
    /// A client must send a complete request head within this many ms of connecting,
    /// or of the previous response on a kept-alive connection; else the connection
    /// is closed. Bounds slowloris and idle connections. Default 5000.
    pub header_read_timeout_ms: u64,
    /// A connection is closed after this many seconds, once its response in progress
    /// is sent (a client keeping it busy with requests cannot hold it). Default 60.
    pub max_connection_age_secs: u64,
    /// Connections open at most; at the limit a new one closes the oldest. Lowered
    /// at start-up to what the file-descriptor limit leaves after 64 for the relay's
    /// own connections. Default 256.
    pub max_connections: usize,
}

/// `http.readiness`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadinessMode {
    /// Ready unless an operator must act.
    Sidecar,
    /// Also not ready while publishing fails or the relay does not stream.
    Strict,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_HTTP_LISTEN.into(),
            bearer_token: Secret::default(),
            bearer_token_file: None,
            basic_auth_user: String::new(),
            basic_auth_password: Secret::default(),
            basic_auth_password_file: None,
            readiness: ReadinessMode::Sidecar,
            header_read_timeout_ms: 5000,
            max_connection_age_secs: 60,
            max_connections: 256,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Text,
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `json` (default) or `text`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `outboxd=debug`. Default `info`. `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: "info".into(),
        }
    }
}

impl Config {
    /// Loads defaults, then `file` (when given), then the environment, and validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(invalid(
                    "--config",
                    format!("file {} does not exist", path.display()),
                ));
            }
            fig = fig.merge(TomlFile::read(path)?);
        }
        fig = fig.merge(env::provider());
        let mut cfg: Config = fig.extract().map_err(|e| ConfigError::Parse(describe(e)))?;
        cfg.resolve_secret_files()?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_secret_files(&mut self) -> Result<(), ConfigError> {
        if let Some(p) = &self.postgres.url_file {
            self.postgres.url = Secret::new(read_secret("postgres.url_file", p)?);
        }
        if let Some(p) = &self.nats.url_file {
            self.nats.url = Secret::new(read_secret("nats.url_file", p)?);
        }
        for (name, p) in &self.kafka.properties_files {
            let key = format!("kafka.properties_files.{name}");
            let value = Secret::new(read_secret(&key, p)?);
            self.kafka.properties.insert(name.clone(), value);
        }
        self.resolve_security_files()?;
        Ok(())
    }

    /// Reads `postgres.password_file` if set.
    pub fn postgres_password(&self) -> Result<Option<Secret>, ConfigError> {
        match &self.postgres.password_file {
            Some(p) => Ok(Some(Secret::new(read_secret("postgres.password_file", p)?))),
            None => Ok(None),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let pg = &self.postgres;
        if pg.url.is_empty() {
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
        if self.cloudevents.source.is_empty() {
            return Err(invalid(
                "cloudevents.source",
                "must not be empty (a URI-reference)",
            ));
        }
        if self
            .cloudevents
            .source
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "cloudevents.source",
                "not a URI-reference: it contains whitespace (e.g. use /services/orders)",
            ));
        }
        if self.cloudevents.default_content_type.is_empty() {
            return Err(invalid(
                "cloudevents.default_content_type",
                "must not be empty",
            ));
        }
        if self.sink.max_in_flight == 0 {
            return Err(invalid("sink.max_in_flight", "must be > 0"));
        }
        if self.retry.initial_backoff_ms == 0
            || self.retry.max_backoff_ms < self.retry.initial_backoff_ms
        {
            return Err(invalid(
                "retry.max_backoff_ms",
                "needs 0 < retry.initial_backoff_ms <= retry.max_backoff_ms",
            ));
        }
        if self.http.listen.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "http.listen",
                "must be host:port, e.g. 0.0.0.0:9187",
            ));
        }
        for (key, value) in [
            (
                "http.header_read_timeout_ms",
                self.http.header_read_timeout_ms,
            ),
            (
                "http.max_connection_age_secs",
                self.http.max_connection_age_secs,
            ),
            ("http.max_connections", self.http.max_connections as u64),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be > 0"));
            }
        }
        self.http.validate_auth()?;
        match self.sink.kind {
            SinkKind::Nats => {
                if self.nats.url.is_empty() {
                    return Err(invalid("nats.url", "missing"));
                }
                if self.nats.stream.is_empty() {
                    return Err(invalid("nats.stream", "must not be empty"));
                }
                if self.nats.ack_timeout_ms == 0 {
                    return Err(invalid("nats.ack_timeout_ms", "must be > 0"));
                }
            }
            SinkKind::Kafka => {
                if self.kafka.brokers.is_empty() {
                    return Err(invalid("kafka.brokers", "missing"));
                }
                if self.kafka.message_timeout_ms == 0 {
                    return Err(invalid("kafka.message_timeout_ms", "must be > 0"));
                }
            }
            SinkKind::Stdout => {}
        }
        self.retention.validate(&pg.columns)?;
        Ok(())
    }

    /// Status update interval.
    pub fn status_interval(&self) -> Duration {
        Duration::from_millis(self.postgres.status_interval_ms)
    }
}

/// `schema.table` split in two; a bare name is in `public`.
pub fn split_table(table: &str) -> (&str, &str) {
    table.split_once('.').unwrap_or(("public", table))
}

fn identifier(key: &str, v: &str) -> Result<(), ConfigError> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !v.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("{v:?} is not a plain lowercase SQL identifier (a-z, 0-9, _)"),
        ))
    }
}

/// The content of the secret file `path` (named by `key`), without its final line
/// break.
pub fn read_secret(key: &str, path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
        .map_err(|source| ConfigError::SecretFile {
            key: key.to_string(),
            path: path.to_path_buf(),
            source,
        })
}

/// The configuration file, read once (it may be a pipe, e.g. `--config <(…)`) and
/// parsed once more before figment does: figment would report a syntax error with
/// the parser's rendering, which quotes the offending line, and that line may be
/// `url = "postgres://relay:<password>@…`. A syntax error keeps the position and the
/// parser's message (which names expected tokens and keys, never the input).
struct TomlFile {
    path: PathBuf,
    text: String,
}

impl TomlFile {
    fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid("--config", format!("cannot read {}: {e}", path.display())))?;
        if let Err(e) = text.parse::<toml::Table>() {
            let at = e.span().map_or(0, |s| s.start.min(text.len()));
            let before = text.get(..at).unwrap_or_default();
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            return Err(ConfigError::Syntax {
                file: path.to_path_buf(),
                line: before.matches('\n').count() + 1,
                column: before[line_start..].chars().count() + 1,
                message: e
                    .message()
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join("; "),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            text,
        })
    }
}

impl figment::Provider for TomlFile {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::from("TOML file", self.path.as_path())
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        Toml::string(&self.text).data()
    }
}

/// Turns figment's error into one line per problem, each naming the key, never a value
/// of a secret key.
fn describe(err: figment::Error) -> String {
    use figment::Provider as _;
    let from_env = env::provider().metadata().name;
    err.into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let kind = redact_kind(&e.kind, &key);
            let origin = e
                .metadata
                .as_ref()
                .map(|m| m.name.to_string())
                .unwrap_or_default();
            // A digits-only password or `true` from the environment arrives as a
            // number or a boolean: say how to keep it a string.
            let hint = match &e.kind {
                figment::error::Kind::InvalidType(actual, expected)
                    if origin == from_env
                        && expected.contains("string")
                        && !matches!(actual, figment::error::Actual::Str(_)) =>
                {
                    env::quoting_hint(&key)
                }
                _ => String::new(),
            };
            if key.is_empty() {
                format!("{kind} ({origin})")
            } else {
                format!("{key}: {kind} ({origin}){hint}")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn redact_kind(kind: &figment::error::Kind, key: &str) -> String {
    use figment::error::Kind;
    let secret = key.ends_with("url")
        || key.contains("properties")
        || key.contains("password")
        || key.contains("token")
        || key.contains("seed");
    match kind {
        Kind::InvalidType(_, expected) if secret => format!("invalid type, expected {expected}"),
        Kind::InvalidValue(_, expected) if secret => format!("invalid value, expected {expected}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
// figment's `Jail` closures return its large error type; that is its API, not ours.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn load_in(jail: &mut Jail, toml: &str) -> Result<Config, ConfigError> {
        jail.create_file("c.toml", toml).expect("jail file");
        Config::load(Some(Path::new("c.toml")))
    }

    #[test]
    fn defaults_need_only_a_url() {
        Jail::expect_with(|jail| {
            let cfg = load_in(jail, "[postgres]\nurl = \"postgres://u:pw@h/db\"\n").expect("ok");
            assert_eq!(cfg.postgres.slot, "outboxd");
            assert_eq!(cfg.sink.kind, SinkKind::Stdout);
            assert_eq!(cfg.nats.subject, "outbox.{aggregate_type}");
            Ok(())
        });
    }

    #[test]
    fn env_overrides_file() {
        Jail::expect_with(|jail| {
            jail.set_env("OUTBOXD_POSTGRES__SLOT", "from_env");
            jail.set_env("OUTBOXD_CONFIG", "ignored.toml");
            let cfg = load_in(
                jail,
                "[postgres]\nurl = \"postgres://h/db\"\nslot = \"file\"\n",
            )
            .expect("ok");
            assert_eq!(cfg.postgres.slot, "from_env");
            Ok(())
        });
    }

    #[test]
    fn unknown_key_is_named() {
        Jail::expect_with(|jail| {
            let err = load_in(
                jail,
                "[postgres]\nurl = \"postgres://h/db\"\nslott = \"x\"\n",
            )
            .expect_err("unknown key");
            let msg = err.to_string();
            assert!(msg.contains("slott"), "{msg}");
            assert!(msg.contains("postgres"), "{msg}");
            Ok(())
        });
    }

    #[test]
    fn wrong_type_is_named() {
        Jail::expect_with(|jail| {
            let err = load_in(
                jail,
                "[postgres]\nurl = \"postgres://h/db\"\n[sink]\nmax_in_flight = \"many\"\n",
            )
            .expect_err("wrong type");
            assert!(err.to_string().contains("sink.max_in_flight"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn missing_url_is_named() {
        Jail::expect_with(|jail| {
            let err = load_in(jail, "[sink]\nkind = \"stdout\"\n").expect_err("no url");
            assert!(err.to_string().starts_with("postgres.url:"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn url_file_is_read_and_never_printed() {
        Jail::expect_with(|jail| {
            jail.create_file("url", "postgres://u:hunter2@h/db\n")?;
            let cfg = load_in(jail, "[postgres]\nurl_file = \"url\"\n").expect("ok");
            assert_eq!(cfg.postgres.url.expose(), "postgres://u:hunter2@h/db");
            assert!(!format!("{cfg:?}").contains("hunter2"));
            Ok(())
        });
    }

    #[test]
    fn source_must_be_a_uri_reference() {
        Jail::expect_with(|jail| {
            let err = load_in(
                jail,
                "[postgres]\nurl = \"postgres://h/db\"\n[cloudevents]\nsource = \"not a uri ::\"\n",
            )
            .expect_err("bad source");
            assert!(err.to_string().starts_with("cloudevents.source:"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn kafka_property_files_are_read_and_never_printed() {
        Jail::expect_with(|jail| {
            jail.create_file("kafka-password", "s3cr3t\n")?;
            let cfg = load_in(
                jail,
                "[postgres]\nurl = \"postgres://h/db\"\n[sink]\nkind = \"kafka\"\n\
                 [kafka.properties]\n\"sasl.username\" = \"app\"\n\"sasl.password\" = \"old\"\n\
                 [kafka.properties_files]\n\"sasl.password\" = \"kafka-password\"\n",
            )
            .expect("ok");
            let props = &cfg.kafka.properties;
            assert_eq!(props["sasl.password"].expose(), "s3cr3t", "the file wins");
            assert_eq!(props["sasl.username"].expose(), "app");
            assert_eq!(cfg.kafka.message_timeout_ms, 30_000);
            assert!(!format!("{cfg:?}").contains("s3cr3t"));
            let err = load_in(
                jail,
                "[postgres]\nurl = \"postgres://h/db\"\n[sink]\nkind = \"kafka\"\n[kafka]\nmessage_timeout_ms = 0\n",
            )
            .expect_err("zero timeout");
            assert!(
                err.to_string().starts_with("kafka.message_timeout_ms:"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn retention_is_off_by_default_and_validated_when_on() {
        Jail::expect_with(|jail| {
            let cfg = load_in(jail, "[postgres]\nurl = \"postgres://h/db\"\n").expect("ok");
            assert!(!cfg.retention.enabled);
            assert!(cfg.postgres.initial_snapshot);
            assert_eq!(cfg.retention.older_than_secs, 86_400);
            let err = load_in(
                jail,
                "[postgres]\nurl = \"postgres://h/db\"\n[postgres.columns]\ncreated_at = \"\"\n\
                 [retention]\nenabled = true\n",
            )
            .expect_err("no created_at");
            assert!(err.to_string().starts_with("retention.enabled:"), "{err}");
            let err = load_in(
                jail,
                "[postgres]\nurl = \"postgres://h/db\"\n[retention]\nenabled = true\nbatch_size = 0\n",
            )
            .expect_err("zero batch");
            assert!(
                err.to_string().starts_with("retention.batch_size:"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn bad_identifier_is_named() {
        Jail::expect_with(|jail| {
            let err = load_in(
                jail,
                "[postgres]\nurl = \"postgres://h/db\"\nslot = \"Bad-Slot\"\n",
            )
            .expect_err("bad slot");
            assert!(err.to_string().starts_with("postgres.slot:"), "{err}");
            Ok(())
        });
    }
}
