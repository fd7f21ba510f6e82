//! Secrets of `[nats]` and `[http]`: reading their `*_file` keys, and [`redact_url`]
//! for every place a connection URL might be shown. What the `[nats]` credentials
//! mean is checked by the sink (`sink::nats::auth`), `[http]`'s by `config::http`.
//!
//! Never puts a secret's value into an error: messages name keys and paths only.

use super::{read_secret, Config, ConfigError, Secret};

impl Config {
    /// Replaces each secret by the content of its `*_file` key, when that is set.
    pub(super) fn resolve_security_files(&mut self) -> Result<(), ConfigError> {
        let n = &mut self.nats;
        for (key, path, value) in [
            ("nats.password_file", &n.password_file, &mut n.password),
            ("nats.token_file", &n.token_file, &mut n.token),
            ("nats.nkey_seed_file", &n.nkey_seed_file, &mut n.nkey_seed),
        ] {
            if let Some(p) = path {
                *value = Secret::new(read_secret(key, p)?);
            }
        }
        let h = &mut self.http;
        for (key, path, value) in [
            (
                "http.bearer_token_file",
                &h.bearer_token_file,
                &mut h.bearer_token,
            ),
            (
                "http.basic_auth_password_file",
                &h.basic_auth_password_file,
                &mut h.basic_auth_password,
            ),
        ] {
            if let Some(p) = path {
                *value = Secret::new(read_secret(key, p)?);
            }
        }
        Ok(())
    }
}

/// A connection URL (or a comma-separated list of them) fit to be shown: user
/// information becomes `[redacted]`, and so does the value of every query parameter
/// whose name mentions a password, token, key or secret. A `key=value` connection
/// string has its `password` redacted; anything unparsable is withheld entirely.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|u| redact_one(u.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

/// `text` with the user information of every `scheme://user:password@host` in it
/// replaced by `[redacted]`: for free text that may quote a URL (a panic message).
pub fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the first '/', '?', '#' or white space; user
        // information is what comes before its last '@'.
        let end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace())
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                out.push_str("[redacted]");
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

fn sensitive(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    ["pass", "token", "key", "secret", "seed", "cred"]
        .iter()
        .any(|s| n.contains(s))
}

fn redact_one(u: &str) -> String {
    if !u.contains("://") {
        if u.contains('=') {
            // libpq's `host=h password=p` form.
            return u
                .split_whitespace()
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if sensitive(k) => format!("{k}=[redacted]"),
                    _ => kv.to_string(),
                })
                .collect::<Vec<_>>()
                .join(" ");
        }
        if u.contains('@') {
            return "[redacted]".into();
        }
        return u.to_string();
    }
    let Ok(mut parsed) = url::Url::parse(u) else {
        return "[redacted URL]".into();
    };
    let had_userinfo = !parsed.username().is_empty() || parsed.password().is_some();
    let query: Vec<(String, String)> = parsed
        .query_pairs()
        .map(|(k, v)| {
            let v = if sensitive(&k) {
                "[redacted]".to_string()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    if !query.is_empty() {
        parsed
            .query_pairs_mut()
            .clear()
            .extend_pairs(query.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    }
    // `set_username`/`set_password` fail for URLs without a host: withhold those.
    if parsed.set_password(None).is_err()
        || parsed.set_username("").is_err()
        || parsed.password().is_some()
    {
        return "[redacted URL]".into();
    }
    let text = parsed.to_string().replace("%5Bredacted%5D", "[redacted]");
    if had_userinfo {
        match text.split_once("://") {
            Some((scheme, rest)) => format!("{scheme}://[redacted]@{rest}"),
            None => "[redacted URL]".into(),
        }
    } else {
        text
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {

    #[test]
    fn userinfo_is_redacted_in_free_text() {
        assert_eq!(
            redact_userinfo("connect postgres://app:s3cr3t@db:5432/x?sslmode=require failed"),
            "connect postgres://[redacted]@db:5432/x?sslmode=require failed"
        );
        assert_eq!(
            redact_userinfo("a nats://tok@n1:4222, b tls://u:p@w@n2 and http://plain/x"),
            "a nats://[redacted]@n1:4222, b tls://[redacted]@n2 and http://plain/x"
        );
        assert_eq!(redact_userinfo("no url here"), "no url here");
    }

    use super::*;
    use figment::Jail;
    use std::path::Path;

    fn load(jail: &mut Jail, toml: &str) -> Result<Config, ConfigError> {
        jail.create_file("c.toml", toml).expect("jail file");
        Config::load(Some(Path::new("c.toml")))
    }

    #[test]
    fn urls_lose_their_secrets() {
        assert_eq!(
            redact_url("postgres://relay:hunter2@db:5432/app?sslmode=require&password=p2"),
            "postgres://[redacted]@db:5432/app?sslmode=require&password=[redacted]"
        );
        assert_eq!(
            redact_url("nats://u:hunter2@a:4222, tls://tok3n@b:4222"),
            "nats://[redacted]@a:4222,tls://[redacted]@b:4222"
        );
        assert_eq!(
            redact_url("tls://nats.example:4222"),
            "tls://nats.example:4222"
        );
        assert_eq!(
            redact_url("host=db user=relay password=hunter2 sslkey=/k"),
            "host=db user=relay password=[redacted] sslkey=[redacted]"
        );
        assert_eq!(redact_url("not a url but@secret"), "[redacted]");
        for u in [
            "postgres://relay:hunter2@db/app",
            "postgresql://relay:hunter2@[::1]:5/app",
            "nats://hunter2@h",
            "weird://:hunter2@",
        ] {
            assert!(
                !redact_url(u).contains("hunter2"),
                "{u} -> {}",
                redact_url(u)
            );
        }
    }

    #[test]
    fn http_auth_is_checked() {
        Jail::expect_with(|jail| {
            jail.create_file("tok", "b3arer\n")?;
            let cfg = load(
                jail,
                "[postgres]\nurl = \"postgres://h/db\"\n[http]\nbearer_token_file = \"tok\"\n",
            )
            .expect("ok");
            assert_eq!(cfg.http.bearer_token.expose(), "b3arer");
            assert!(cfg.http.auth_enabled());
            let err = load(
                jail,
                "[postgres]\nurl = \"postgres://h/db\"\n[http]\nbasic_auth_user = \"prom\"\n",
            )
            .expect_err("no password");
            assert!(err
                .to_string()
                .starts_with("http.basic_auth_password: missing"));
            let err = load(
                jail,
                "[postgres]\nurl = \"postgres://h/db\"\n[http]\nbearer_token = 42\n",
            )
            .expect_err("wrong type");
            assert!(
                err.to_string()
                    .starts_with("http.bearer_token: invalid type"),
                "{err}"
            );
            assert!(!err.to_string().contains("42"), "{err}");
            Ok(())
        });
    }
}
