//! `[http]`: the health, metrics and status endpoints, and their credentials.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError, Secret};

/// Default listen address of the HTTP endpoints.
pub const DEFAULT_HTTP_LISTEN: &str = "0.0.0.0:9187";

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

impl HttpConfig {
    /// Shape checks of this section; each error names the key.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "http.listen",
                "must be host:port, e.g. 0.0.0.0:9187",
            ));
        }
        for (key, value) in [
            ("http.header_read_timeout_ms", self.header_read_timeout_ms),
            ("http.max_connection_age_secs", self.max_connection_age_secs),
            ("http.max_connections", self.max_connections as u64),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be > 0"));
            }
        }
        self.validate_auth()?;
        Ok(())
    }
}

impl HttpConfig {
    /// Start-up checks of the endpoint credentials.
    fn validate_auth(&self) -> Result<(), ConfigError> {
        if self.basic_auth_user.is_empty() != self.basic_auth_password.is_empty() {
            return Err(if self.basic_auth_user.is_empty() {
                invalid(
                    "http.basic_auth_user",
                    "missing: a basic auth password is set, so set the user",
                )
            } else {
                invalid(
                    "http.basic_auth_password",
                    "missing: http.basic_auth_user needs http.basic_auth_password or \
                     http.basic_auth_password_file",
                )
            });
        }
        if self.basic_auth_user.contains(':') {
            return Err(invalid(
                "http.basic_auth_user",
                "must not contain ':' (RFC 7617)",
            ));
        }
        Ok(())
    }

    /// True when `/metrics` and `/status` need credentials.
    pub fn auth_enabled(&self) -> bool {
        !self.bearer_token.is_empty() || !self.basic_auth_user.is_empty()
    }
}
