//! `[retry]`: the backoff of reconnects and publish retries (`backoff::delay`).

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

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

impl RetryConfig {
    /// Shape checks of this section; each error names the key.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.initial_backoff_ms == 0 || self.max_backoff_ms < self.initial_backoff_ms {
            return Err(invalid(
                "retry.max_backoff_ms",
                "needs 0 < retry.initial_backoff_ms <= retry.max_backoff_ms",
            ));
        }
        Ok(())
    }
}
