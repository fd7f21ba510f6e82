//! `[cloudevents]`: how rows become CloudEvents.

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

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

impl CloudEventsConfig {
    /// Shape checks of this section; each error names the key.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.source.is_empty() {
            return Err(invalid(
                "cloudevents.source",
                "must not be empty (a URI-reference)",
            ));
        }
        if self
            .source
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "cloudevents.source",
                "not a URI-reference: it contains whitespace (e.g. use /services/orders)",
            ));
        }
        if self.default_content_type.is_empty() {
            return Err(invalid(
                "cloudevents.default_content_type",
                "must not be empty",
            ));
        }
        Ok(())
    }
}
