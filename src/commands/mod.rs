//! The subcommands, one file each: what `main` runs once the config is loaded. The
//! top of the crate: a command may use every module below it, and nothing imports a
//! command.

pub mod check;
pub mod replay;

use std::path::Path;

use crate::config::{Config, ConfigError};

/// Loads the configuration ([`Config::load`]: defaults, file, environment, shape
/// checks), then checks what its values mean in the modules that own the meaning:
/// Postgres's URL and TLS settings (`source::tls`), the sink's templates and NATS
/// credentials (`sink::validate`). Every error names the key; `main` exits 78.
pub fn load_config(file: Option<&Path>) -> Result<Config, ConfigError> {
    let cfg = Config::load(file)?;
    crate::source::tls::resolve(&cfg.postgres).map_err(|e| match e {
        crate::source::tls::TlsError::Invalid { key, reason } => ConfigError::invalid(&key, reason),
    })?;
    crate::sink::validate(&cfg)?;
    Ok(cfg)
}
