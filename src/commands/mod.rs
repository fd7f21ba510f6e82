//! The subcommands, one file each: what `main` runs once the config is loaded and
//! the runtime started. The top of the crate: a command may use every module below
//! it, and nothing imports a command.
//!
//! Each returns the process's exit code, or a [`CommandError`] that says what it was
//! doing and keeps the cause chain (`main` prints it and exits 1).

pub mod check;
pub mod healthcheck;
pub mod replay;
pub mod run;
pub mod setup;

use std::path::Path;

use crate::config::{Config, ConfigError};
use crate::sink::Routes;

/// Exit code of a command that ran but failed (a FAIL check, an invalid row).
pub const EXIT_FAILURE: u8 = 1;

/// Why a command stopped on an error.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// A step failed: what it was doing, then the cause.
    #[error("{what}")]
    Step {
        /// The step, e.g. `relay failed`, `creating the slot`.
        what: &'static str,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An error that speaks for itself.
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

impl CommandError {
    fn other(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        CommandError::Other(Box::new(e))
    }
}

/// [`CommandError::Step`] for a failed result: `result.step("creating the slot")?`.
trait Step<T> {
    fn step(self, what: &'static str) -> Result<T, CommandError>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> Step<T> for Result<T, E> {
    fn step(self, what: &'static str) -> Result<T, CommandError> {
        self.map_err(|e| CommandError::Step {
            what,
            source: Box::new(e),
        })
    }
}

/// Loads the configuration ([`Config::load`]: defaults, file, environment, shape
/// checks), then checks what its values mean in the modules that own the meaning:
/// Postgres's URL and TLS settings (`source::tls`), the sink's templates and NATS
/// credentials (`sink::validate`), which returns the parsed templates the sink then
/// uses. Every error names the key; `main` exits 78.
///
/// The Postgres settings are resolved again at every connect (`control::pg_config`),
/// not kept from here: that re-reads `postgres.password_file`, so a rotated password
/// is picked up on the next reconnect.
pub fn load_config(file: Option<&Path>) -> Result<(Config, Routes), ConfigError> {
    let cfg = Config::load(file)?;
    crate::source::tls::resolve(&cfg.postgres).map_err(|e| match e {
        crate::source::tls::TlsError::Invalid { key, reason } => ConfigError::invalid(&key, reason),
    })?;
    let routes = crate::sink::validate(&cfg)?;
    Ok((cfg, routes))
}

/// [`load_config`] for a command that connects nowhere (`setup` printing its SQL):
/// `postgres.url` may be missing, and nothing about it is checked.
pub fn load_config_offline(file: Option<&Path>) -> Result<(Config, Routes), ConfigError> {
    let cfg = Config::load_offline(file)?;
    let routes = crate::sink::validate(&cfg)?;
    Ok((cfg, routes))
}
