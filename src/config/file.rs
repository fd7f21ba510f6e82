//! Reading the TOML file, and turning figment's errors into lines that name the key
//! and never quote a secret.

use std::path::{Path, PathBuf};

use figment::providers::{Format, Toml};

use super::{env, invalid, ConfigError};

/// The configuration file, read once (it may be a pipe, e.g. `--config <(…)`) and
/// parsed once more before figment does: figment would report a syntax error with
/// the parser's rendering, which quotes the offending line, and that line may be
/// `url = "postgres://relay:<password>@…`. A syntax error keeps the position and the
/// parser's message (which names expected tokens and keys, never the input).
pub(super) struct TomlFile {
    path: PathBuf,
    text: String,
}

impl TomlFile {
    pub(super) fn read(path: &Path) -> Result<Self, ConfigError> {
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
pub(super) fn describe(err: figment::Error) -> String {
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
