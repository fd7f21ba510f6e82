//! The environment layer: `OUTBOXD_<SECTION>__<KEY>` variables, the `OUTBOXD_*`
//! variables that set no key (reported, with the name that was probably meant), and
//! the quoting hint for a value that the TOML-like parsing turned into a number or a
//! boolean.
//!
//! Never reads a variable's value for a report: warnings and hints name variables
//! and keys only, so a secret given through the environment cannot reach a log.

use std::fmt;

use figment::providers::Env;

use super::{Config, ENV_PREFIX};

/// The variable of the `--config` flag: read by the command line, not a key.
const CONFIG_VAR: &str = "CONFIG";

/// The environment provider: `OUTBOXD_POSTGRES__URL` -> `postgres.url`.
/// Single-underscore variables such as `OUTBOXD_CONFIG` (the CLI's own) are not
/// configuration keys; [`unused_env_vars`] reports the ones that look like a slip.
pub(super) fn provider() -> Env {
    Env::prefixed(ENV_PREFIX)
        .filter(|k| k.as_str().contains("__"))
        .split("__")
}

/// An `OUTBOXD_*` environment variable that sets no configuration key. outboxd
/// ignores it (one underscore) or refuses it as an unknown key (two underscores);
/// either way the operator meant something else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnusedEnvVar {
    /// The variable's name as set (never its value).
    pub name: String,
    /// The variable that sets the key probably meant, e.g. `OUTBOXD_POSTGRES__URL`.
    pub intended: Option<String>,
}

impl fmt::Display for UnusedEnvVar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "environment variable {} sets no configuration key",
            self.name
        )?;
        match &self.intended {
            Some(intended) => write!(f, "; did you mean {intended}?"),
            None => write!(
                f,
                "; keys are set as {ENV_PREFIX}<SECTION>__<KEY> (two underscores between \
                 levels), e.g. {ENV_PREFIX}POSTGRES__URL"
            ),
        }
    }
}

/// The `OUTBOXD_*` variables of this process that set no configuration key, sorted
/// by name. Call before logging starts: the result is meant for stderr on a
/// configuration error and for the log once logging runs.
pub fn unused_env_vars() -> Vec<UnusedEnvVar> {
    let keys = KeyPaths::of_config();
    let mut out: Vec<UnusedEnvVar> = std::env::vars_os()
        .filter_map(|(name, _)| {
            let name = name.to_string_lossy().into_owned();
            let rest = strip_prefix_ignore_case(name.trim(), ENV_PREFIX)?.to_string();
            if not_ours(&rest) {
                return None;
            }
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            if rest.contains("__") && keys.accepts(&path) {
                return None;
            }
            let intended = keys.closest(&rest).map(|key| env_name(&key));
            Some(UnusedEnvVar { name, intended })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Variables with our prefix that are someone else's: the `--config` flag's, and the
/// service links Kubernetes injects for a Service named `outboxd`
/// (`OUTBOXD_SERVICE_HOST`, `OUTBOXD_SERVICE_PORT…`, `OUTBOXD_PORT`, `OUTBOXD_PORT_…`).
fn not_ours(rest: &str) -> bool {
    let upper = rest.to_ascii_uppercase();
    upper == CONFIG_VAR
        || upper == "PORT"
        || upper.starts_with("PORT_")
        || upper.starts_with("SERVICE_")
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
        .filter(|rest| !rest.is_empty())
}

/// The variable that sets `key` (dotted), e.g. `OUTBOXD_POSTGRES__COLUMNS__ID`.
pub(super) fn env_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.split('.')
            .map(str::to_ascii_uppercase)
            .collect::<Vec<_>>()
            .join("__")
    )
}

/// The hint for a value from the environment that was refused as a number, a
/// boolean, an array or a table where the key wants a string: environment values are
/// parsed like TOML values, so it needs quotes (or the key's `_file`). Names the
/// variable, never the value.
pub(super) fn quoting_hint(key: &str) -> String {
    let file_key = format!("{key}_file");
    let file = if KeyPaths::of_config().leaves.contains(&file_key) {
        format!(" or set {file_key}")
    } else {
        String::new()
    };
    format!(
        "; environment values are read like TOML values, so quote one that must stay a \
         string: {}='\"<value>\"'{file}",
        env_name(key)
    )
}

/// Every key of [`Config`], dotted, taken from its serialized defaults so that a new
/// field is known without a list to maintain.
struct KeyPaths {
    /// Keys that hold a value (`postgres.url`, `postgres.columns.id`, …).
    leaves: Vec<String>,
    /// Keys that hold a table (`postgres`, `postgres.columns`, …).
    tables: Vec<String>,
    /// Tables whose members are free-form (`kafka.properties`): an empty table in the
    /// defaults, since every section struct has fields.
    maps: Vec<String>,
}

impl KeyPaths {
    fn of_config() -> Self {
        let mut keys = Self {
            leaves: Vec::new(),
            tables: Vec::new(),
            maps: Vec::new(),
        };
        // Serializing plain data with string keys cannot fail; an empty result would
        // only make every variable look unknown, never hide one.
        let defaults = serde_json::to_value(Config::default()).unwrap_or_default();
        keys.collect("", &defaults);
        keys
    }

    fn collect(&mut self, prefix: &str, value: &serde_json::Value) {
        let serde_json::Value::Object(map) = value else {
            self.leaves.push(prefix.to_string());
            return;
        };
        if map.is_empty() && !prefix.is_empty() {
            self.maps.push(prefix.to_string());
            return;
        }
        if !prefix.is_empty() {
            self.tables.push(prefix.to_string());
        }
        for (k, v) in map {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            self.collect(&path, v);
        }
    }

    /// True when `path` names a key, a section, or a member of a free-form table.
    fn accepts(&self, path: &[String]) -> bool {
        let dotted = path.join(".");
        self.leaves.contains(&dotted)
            || self.tables.contains(&dotted)
            || self
                .maps
                .iter()
                .any(|m| dotted.starts_with(m.as_str()) && dotted[m.len()..].starts_with('.'))
    }

    /// The key `rest` (a variable name without the prefix) most likely means:
    /// the same letters with underscores and levels ignored (`POSTGRES_URL` is
    /// `postgres.url`), else the closest within two edits (`POSTGRES__SLOTT`).
    fn closest(&self, rest: &str) -> Option<String> {
        let wanted = squash(rest);
        if let Some(exact) = self.leaves.iter().find(|k| squash(k) == wanted) {
            return Some(exact.clone());
        }
        self.leaves
            .iter()
            .map(|k| (edit_distance(&squash(k), &wanted), k))
            .filter(|(d, _)| *d <= 2)
            .min_by_key(|(d, _)| *d)
            .map(|(_, k)| k.clone())
    }
}

/// Lowercase letters and digits only: `POSTGRES__URL`, `postgres_url` and
/// `postgres.url` all become `postgresurl`.
fn squash(s: &str) -> String {
    s.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Levenshtein distance (names are short).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(above + 1)
                .min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn unused(jail: &mut Jail, vars: &[&str]) -> Vec<UnusedEnvVar> {
        for v in vars {
            jail.set_env(v, "s3cr3t-value");
        }
        unused_env_vars()
            .into_iter()
            .filter(|u| vars.contains(&u.name.as_str()))
            .collect()
    }

    #[test]
    fn a_variable_that_sets_a_key_is_not_reported() {
        Jail::expect_with(|jail| {
            let vars = [
                "OUTBOXD_POSTGRES__URL",
                "OUTBOXD_POSTGRES__COLUMNS__AGGREGATE_TYPE",
                "OUTBOXD_NATS__PASSWORD_FILE",
                "OUTBOXD_KAFKA__PROPERTIES__SASL.USERNAME",
                "outboxd_log__level",
                "OUTBOXD_CONFIG",
                "OUTBOXD_SERVICE_HOST",
                "OUTBOXD_PORT_9187_TCP_ADDR",
            ];
            assert_eq!(unused(jail, &vars), vec![]);
            Ok(())
        });
    }

    #[test]
    fn a_slip_is_reported_with_the_variable_meant() {
        Jail::expect_with(|jail| {
            let found = unused(
                jail,
                &[
                    "OUTBOXD_POSTGRES_URL",
                    "OUTBOXD_NATS_PASSWORD_FILE",
                    "OUTBOXD_POSTGRES__SLOTT",
                    "OUTBOXD_LOG_LEVEL",
                    "OUTBOXD_SOMETHING_ELSE_ENTIRELY",
                ],
            );
            let pairs: Vec<(&str, Option<&str>)> = found
                .iter()
                .map(|u| (u.name.as_str(), u.intended.as_deref()))
                .collect();
            assert_eq!(
                pairs,
                vec![
                    ("OUTBOXD_LOG_LEVEL", Some("OUTBOXD_LOG__LEVEL")),
                    (
                        "OUTBOXD_NATS_PASSWORD_FILE",
                        Some("OUTBOXD_NATS__PASSWORD_FILE")
                    ),
                    ("OUTBOXD_POSTGRES_URL", Some("OUTBOXD_POSTGRES__URL")),
                    ("OUTBOXD_POSTGRES__SLOTT", Some("OUTBOXD_POSTGRES__SLOT")),
                    ("OUTBOXD_SOMETHING_ELSE_ENTIRELY", None),
                ]
            );
            for u in &found {
                assert!(!u.to_string().contains("s3cr3t"), "{u}");
            }
            assert!(found[4].to_string().contains("OUTBOXD_POSTGRES__URL"));
            Ok(())
        });
    }

    #[test]
    fn the_quoting_hint_names_the_variable_and_the_file_key() {
        assert_eq!(
            quoting_hint("nats.password"),
            "; environment values are read like TOML values, so quote one that must stay \
             a string: OUTBOXD_NATS__PASSWORD='\"<value>\"' or set nats.password_file"
        );
        assert!(!quoting_hint("nats.user").contains("_file"));
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("slot", "slott"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "ab"), 2);
    }
}
