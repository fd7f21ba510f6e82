//! Typed configuration: defaults < TOML file < `OUTBOXD_<SECTION>__<KEY>` environment.
//!
//! Owns loading, secret resolution (`*_file` keys) and the shape checks (non-empty,
//! a positive number, an identifier, host:port), one file per section. What a value
//! means (a Postgres URL and its TLS settings, a subject template, NATS credentials)
//! is checked by the module that owns the meaning, right after loading
//! (`commands::load_config`), so config imports no other module of the crate and no
//! client crate. Either way a bad value is reported with the key that holds it before
//! any connection is made. This module never logs and never prints a secret:
//! [`Secret`] has no way to be displayed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::Serialized;
use figment::Figment;
use serde::{Deserialize, Serialize};

mod cloudevents;
mod env;
mod file;
mod http;
mod kafka;
mod log;
mod nats;
mod postgres;
mod retention;
mod retry;
mod secret;
mod security;
mod sink;

pub use cloudevents::CloudEventsConfig;
pub use env::{unused_env_vars, UnusedEnvVar};
use file::{describe, TomlFile};
pub use http::{HttpConfig, ReadinessMode, DEFAULT_HTTP_LISTEN};
pub use kafka::{KafkaConfig, RowExtras, DEFAULT_KAFKA_MESSAGE_TIMEOUT_MS, DEFAULT_KAFKA_TOPIC};
pub use log::{LogConfig, LogFormat};
pub use nats::{NatsConfig, StreamStorage, DEFAULT_NATS_SUBJECT};
pub use postgres::{
    ColumnMapping, PostgresConfig, PostgresTlsConfig, SslModeSetting, DEFAULT_PUBLICATION,
    DEFAULT_SLOT, DEFAULT_TABLE, HEARTBEAT_PREFIX,
};
pub use retention::RetentionConfig;
pub use retry::RetryConfig;
pub use secret::Secret;
pub use security::{redact_url, redact_userinfo};
pub use sink::{ContentMode, PoisonPolicy, SinkConfig, SinkKind};

/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "OUTBOXD_";

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

impl Config {
    /// Loads defaults, then `file` (when given), then the environment, and validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_inner(file, true)
    }

    /// [`Config::load`] where `postgres.url` may be missing (a command that connects
    /// nowhere).
    pub fn load_offline(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_inner(file, false)
    }

    fn load_inner(file: Option<&Path>, needs_url: bool) -> Result<Self, ConfigError> {
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
        cfg.validate(needs_url)?;
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

    fn validate(&self, needs_url: bool) -> Result<(), ConfigError> {
        self.postgres.validate(needs_url)?;
        self.cloudevents.validate()?;
        self.sink.validate()?;
        self.retry.validate()?;
        self.http.validate()?;
        match self.sink.kind {
            SinkKind::Nats => self.nats.validate()?,
            SinkKind::Kafka => self.kafka.validate()?,
            SinkKind::Stdout => {}
        }
        self.retention.validate(&self.postgres.columns)?;
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
