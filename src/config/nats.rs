//! `[nats]`: the JetStream sink. What its credentials and TLS files mean is checked
//! by the sink (`sink::nats::auth`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError, ContentMode, Secret};

/// Default NATS subject template (`outbox.<aggregate type>`).
pub const DEFAULT_NATS_SUBJECT: &str = "outbox.{aggregate_type}";

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
    /// When outboxd creates the stream: how long it keeps a message, in seconds; 0
    /// (default) = until another limit removes it.
    pub stream_max_age_secs: u64,
    /// When outboxd creates the stream: its size limit in bytes (the oldest messages
    /// go first); -1 (default) = none.
    pub stream_max_bytes: i64,
    /// When outboxd creates the stream: how long JetStream remembers a `Nats-Msg-Id`
    /// to drop a duplicate, in seconds. Default 120 (JetStream's). A relay down longer
    /// than this re-sends its unconfirmed events as new messages.
    pub stream_duplicate_window_secs: u64,
    /// When outboxd creates the stream: its replicas (1, or 3/5 in a cluster). Default 1.
    pub stream_replicas: usize,
    /// When outboxd creates the stream: `file` (default) or `memory`.
    pub stream_storage: StreamStorage,
    /// Dead-letter subject for poison rows. Default `outbox.deadletter`.
    pub dead_letter_subject: String,
    /// `binary` (default) or `structured`.
    pub content_mode: ContentMode,
    /// Time to wait for a PubAck, in ms. Default 5000.
    pub ack_timeout_ms: u64,
    /// Exactly once into the stream, beyond the duplicate window: a checkpoint (the
    /// last position whose events are all stored, and the stream's sequence then) in
    /// `checkpoint_stream`, and at start the ids stored after it are read back and not
    /// sent again. Default false (at least once).
    pub exactly_once: bool,
    /// Stream of the exactly-once checkpoints (subjects `outboxd.checkpoint.<slot>`,
    /// the last message per subject kept); created when missing. Default
    /// `OUTBOXD_CHECKPOINTS`.
    pub checkpoint_stream: String,
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

/// Where the stream outboxd creates keeps its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamStorage {
    /// On disk (survives a restart of the server).
    File,
    /// In memory.
    Memory,
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
            stream_max_age_secs: 0,
            stream_max_bytes: -1,
            stream_duplicate_window_secs: 120,
            stream_replicas: 1,
            stream_storage: StreamStorage::File,
            dead_letter_subject: "outbox.deadletter".into(),
            content_mode: ContentMode::Binary,
            ack_timeout_ms: 5000,
            exactly_once: false,
            checkpoint_stream: "OUTBOXD_CHECKPOINTS".into(),
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

impl NatsConfig {
    /// Shape checks of this section; each error names the key.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.url.is_empty() {
            return Err(invalid("nats.url", "missing"));
        }
        if self.stream.is_empty() {
            return Err(invalid("nats.stream", "must not be empty"));
        }
        if self.ack_timeout_ms == 0 {
            return Err(invalid("nats.ack_timeout_ms", "must be > 0"));
        }
        if self.exactly_once && !valid_stream_name(&self.checkpoint_stream) {
            return Err(invalid(
                "nats.checkpoint_stream",
                "must be a stream name: not empty, no spaces, '.', '*', '>', '/' or '\\'",
            ));
        }
        if self.stream_duplicate_window_secs == 0 {
            return Err(invalid(
                "nats.stream_duplicate_window_secs",
                "must be > 0: without a window JetStream drops no duplicate",
            ));
        }
        if self.stream_max_age_secs > 0
            && self.stream_duplicate_window_secs > self.stream_max_age_secs
        {
            return Err(invalid(
                "nats.stream_duplicate_window_secs",
                "must not exceed nats.stream_max_age_secs (JetStream refuses such a stream)",
            ));
        }
        if self.stream_max_bytes == 0 || self.stream_max_bytes < -1 {
            return Err(invalid(
                "nats.stream_max_bytes",
                "must be > 0, or -1 for no limit",
            ));
        }
        if !matches!(self.stream_replicas, 1..=5) {
            return Err(invalid("nats.stream_replicas", "must be 1 to 5"));
        }
        Ok(())
    }
}

/// A JetStream stream name: not empty, none of the characters nats-server refuses.
fn valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
}
