//! `[retention]`: deleting outbox rows the broker acknowledged.

use serde::{Deserialize, Serialize};

use super::{invalid, ColumnMapping, ConfigError};

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
    /// Shape checks of this section; each error names the key.
    pub(super) fn validate(&self, columns: &ColumnMapping) -> Result<(), ConfigError> {
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
