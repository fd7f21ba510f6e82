//! NATS authentication and TLS settings: which method `[nats]` configures
//! ([`NatsAuth`]), the credentials inside `nats.url`, and the start-up checks that
//! the combination makes sense (run by [`crate::sink::validate`] right after the
//! config loads; each error names the key to change, never a secret's value).

use std::path::{Path, PathBuf};

use crate::config::{read_secret, ConfigError, NatsConfig, Secret};

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::invalid(key, reason)
}

/// The ways to authenticate to NATS; at most one may be configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsAuth {
    /// Nothing configured.
    None,
    /// Inside `nats.url`: `nats://user:password@host`, or a token as
    /// `nats://token@host` ([`NatsConfig::url_credentials`]).
    Url,
    /// `nats.user` + `nats.password[_file]`.
    UserPassword,
    /// `nats.token[_file]`.
    Token,
    /// `nats.creds_file`.
    Creds,
    /// `nats.nkey_seed[_file]`.
    NKey,
}

impl NatsConfig {
    /// The authentication method in use (valid after [`validate`]).
    pub(crate) fn auth(&self) -> NatsAuth {
        if !self.user.is_empty() || !self.password.is_empty() {
            NatsAuth::UserPassword
        } else if !self.token.is_empty() {
            NatsAuth::Token
        } else if self.creds_file.is_some() {
            NatsAuth::Creds
        } else if !self.nkey_seed.is_empty() {
            NatsAuth::NKey
        } else if url_has_credentials(self.url.expose()) {
            NatsAuth::Url
        } else {
            NatsAuth::None
        }
    }

    /// The credentials inside `nats.url`, percent-decoded: `user:password@` is a user
    /// and password, a user alone (`token@`) is a token, as in the Go and C clients.
    /// async-nats (0.42) never reads them from the URL (nats-io/nats.rs#1623), so
    /// outboxd hands them over as options. It sends one set to every server, so the
    /// URLs of a list must not carry different ones.
    pub(crate) fn url_credentials(&self) -> Result<Option<UrlCredentials>, ConfigError> {
        let mut found: Option<UrlCredentials> = None;
        for (i, url) in server_urls(self.url.expose()).enumerate() {
            let Some(url) = url.filter(|u| !u.username().is_empty() || u.password().is_some())
            else {
                continue;
            };
            let decode = |part: &str| {
                percent_encoding::percent_decode_str(part)
                    .decode_utf8()
                    .map(|s| s.into_owned())
                    .map_err(|_| {
                        invalid(
                            "nats.url",
                            format!(
                                "the credentials of server {} are not UTF-8 once percent-decoded",
                                i + 1
                            ),
                        )
                    })
            };
            let user = decode(url.username())?;
            let these = match url.password() {
                Some(password) => UrlCredentials::UserPassword {
                    user,
                    password: Secret::new(decode(password)?),
                },
                None => UrlCredentials::Token(Secret::new(user)),
            };
            match &found {
                Some(first) if *first != these => {
                    return Err(invalid(
                        "nats.url",
                        format!(
                            "server {} carries other credentials than an earlier one:                              outboxd sends one set to every server, so write the same in                              each URL (or use nats.user/nats.password)",
                            i + 1
                        ),
                    ))
                }
                Some(_) => {}
                None => found = Some(these),
            }
        }
        Ok(found)
    }

    /// `nats.url`'s servers without the credentials inside them, for the client:
    /// async-nats ignores them anyway, and prints a server's whole URL in its debug
    /// log.
    pub(crate) fn servers_without_credentials(&self) -> Vec<String> {
        let urls = self.url.expose();
        urls.split(',')
            .zip(server_urls(urls))
            .map(|(text, parsed)| match parsed {
                Some(mut u) if !u.username().is_empty() || u.password().is_some() => {
                    // Cannot fail: the URL has a host, or it would carry no user.
                    let _ = u.set_password(None);
                    let _ = u.set_username("");
                    u.to_string()
                }
                _ => text.trim().to_string(),
            })
            .collect()
    }

    /// True when the connection must be TLS.
    pub(crate) fn tls_required(&self) -> bool {
        self.require_tls || self.tls_ca_file.is_some() || self.tls_cert_file.is_some()
    }

    /// What to check when the server refuses the credentials, by method.
    pub(crate) fn auth_fix(&self) -> &'static str {
        match self.auth() {
            NatsAuth::UserPassword => {
                "check nats.user and nats.password (or nats.password_file) against the \
                 server's authorization users"
            }
            NatsAuth::Token => "check nats.token (or nats.token_file) against the server's token",
            NatsAuth::Creds => {
                "check nats.creds_file: its user JWT must be signed by an account the \
                 server trusts, with the matching seed"
            }
            NatsAuth::NKey => {
                "check nats.nkey_seed_file (or nats.nkey_seed): its public key must be a \
                 user of the server"
            }
            NatsAuth::Url => {
                "check the user and password (or the token) inside nats.url; in them,                  percent-encode @ : / % as %40 %3A %2F %25"
            }
            NatsAuth::None => {
                "the server requires credentials: set nats.user + nats.password_file, \
                 nats.token_file, nats.creds_file or nats.nkey_seed_file"
            }
        }
    }

    /// Start-up checks of TLS and credentials; each error names the key to change.
    pub(crate) fn validate_security(&self) -> Result<(), ConfigError> {
        for (i, part) in self.url.expose().split(',').enumerate() {
            if part.trim().parse::<async_nats::ServerAddr>().is_err() {
                // The parser's message may quote the URL: say which one, not what it is.
                return Err(invalid(
                    "nats.url",
                    format!(
                        "server {} is not a valid address (e.g. tls://nats:4222 or nats://nats:4222)",
                        i + 1
                    ),
                ));
            }
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) => {
                return Err(invalid(
                    "nats.tls_key_file",
                    "missing: nats.tls_cert_file (mutual TLS) needs its private key",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "nats.tls_cert_file",
                    "missing: nats.tls_key_file needs the client certificate it belongs to",
                ))
            }
            _ => {}
        }
        for (key, path) in [
            ("nats.tls_ca_file", &self.tls_ca_file),
            ("nats.tls_cert_file", &self.tls_cert_file),
            ("nats.tls_key_file", &self.tls_key_file),
        ] {
            if let Some(p) = path {
                pem_file(key, p)?;
            }
        }
        if self.user.is_empty() && !self.password.is_empty() {
            return Err(invalid(
                "nats.user",
                "missing: nats.password is set, so set the user it belongs to",
            ));
        }
        if !self.user.is_empty() && self.password.is_empty() {
            return Err(invalid(
                "nats.password",
                "missing: nats.user needs nats.password, nats.password_file or OUTBOXD_NATS__PASSWORD",
            ));
        }
        let methods: Vec<&str> = [
            (!self.user.is_empty(), "nats.user/nats.password"),
            (!self.token.is_empty(), "nats.token"),
            (self.creds_file.is_some(), "nats.creds_file"),
            (!self.nkey_seed.is_empty(), "nats.nkey_seed"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();
        if methods.len() > 1 {
            return Err(invalid(
                methods[1].split('/').next().unwrap_or(methods[1]),
                format!(
                    "conflicts with {}: NATS takes one authentication method; remove one of {}",
                    methods[0],
                    methods.join(", ")
                ),
            ));
        }
        self.url_credentials()?;
        if !methods.is_empty() && url_has_credentials(self.url.expose()) {
            return Err(invalid(
                "nats.url",
                format!(
                    "carries credentials and {} is set too: remove the user/password from the URL",
                    methods[0]
                ),
            ));
        }
        if let Some(p) = &self.creds_file {
            // Read as is: async-nats's parser wants the newline after the last line,
            // which `read_secret` would trim.
            let creds = std::fs::read_to_string(p).map_err(|source| ConfigError::SecretFile {
                key: "nats.creds_file".into(),
                path: p.clone(),
                source,
            })?;
            if async_nats::ConnectOptions::with_credentials(&creds).is_err() {
                return Err(invalid(
                    "nats.creds_file",
                    format!(
                        "{} is not a NATS .creds file (a user JWT and an NKey seed block)",
                        p.display()
                    ),
                ));
            }
        }
        let seed = self.nkey_seed.expose();
        if !seed.is_empty() && (!seed.starts_with("SU") || seed.len() != 58) {
            let key = if self.nkey_seed_file.is_some() {
                "nats.nkey_seed_file"
            } else {
                "nats.nkey_seed"
            };
            return Err(invalid(
                key,
                "not an NKey user seed (58 characters starting with SU)",
            ));
        }
        Ok(())
    }
}

fn pem_file(key: &str, path: &Path) -> Result<(), ConfigError> {
    let text = read_secret(key, path)?;
    if text.contains("-----BEGIN ") {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("{} is not a PEM file", PathBuf::from(path).display()),
        ))
    }
}

/// Credentials inside `nats.url`, see [`NatsConfig::url_credentials`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlCredentials {
    /// `nats://user:password@host`.
    UserPassword {
        /// The user, percent-decoded.
        user: String,
        /// The password, percent-decoded.
        password: Secret,
    },
    /// `nats://token@host`.
    Token(Secret),
}

/// Each server of a comma-separated `nats.url`, parsed as async-nats does (a
/// server without a scheme is `nats://`); `None` where it does not parse.
fn server_urls(urls: &str) -> impl Iterator<Item = Option<url::Url>> + '_ {
    urls.split(',').map(|u| {
        let u = u.trim();
        if u.contains("://") {
            url::Url::parse(u).ok()
        } else {
            url::Url::parse(&format!("nats://{u}")).ok()
        }
    })
}

fn url_has_credentials(urls: &str) -> bool {
    server_urls(urls)
        .flatten()
        .any(|u| !u.username().is_empty() || u.password().is_some())
}

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use crate::config::Config;
    use figment::Jail;

    fn load(jail: &mut Jail, toml: &str) -> Result<Config, ConfigError> {
        jail.create_file("c.toml", toml).expect("jail file");
        let cfg = Config::load(Some(Path::new("c.toml")))?;
        crate::sink::validate(&cfg)?;
        Ok(cfg)
    }

    const BASE: &str = "[postgres]\nurl = \"postgres://h/db\"\n[sink]\nkind = \"nats\"\n";

    #[test]
    fn nats_secret_files_are_read_and_never_printed() {
        Jail::expect_with(|jail| {
            jail.create_file("pw", "n4ts-pw\n")?;
            let cfg = load(
                jail,
                &format!("{BASE}[nats]\nuser = \"relay\"\npassword_file = \"pw\"\n"),
            )
            .expect("ok");
            assert_eq!(cfg.nats.password.expose(), "n4ts-pw");
            assert_eq!(cfg.nats.auth(), NatsAuth::UserPassword);
            assert!(!format!("{cfg:?}").contains("n4ts-pw"));
            Ok(())
        });
    }

    #[test]
    fn nats_conflicts_and_gaps_name_the_key() {
        Jail::expect_with(|jail| {
            let cases = [
                (
                    "user = \"u\"\npassword = \"p4ss\"\ntoken = \"t0ken\"\n",
                    "nats.token: conflicts with nats.user/nats.password",
                ),
                ("user = \"u\"\n", "nats.password: missing"),
                ("password = \"p4ss\"\n", "nats.user: missing"),
                ("tls_cert_file = \"c.toml\"\n", "nats.tls_key_file: missing"),
                (
                    "tls_ca_file = \"nope.pem\"\n",
                    "nats.tls_ca_file: cannot read nope.pem",
                ),
                (
                    "tls_ca_file = \"c.toml\"\n",
                    "nats.tls_ca_file: c.toml is not a PEM file",
                ),
                (
                    "nkey_seed = \"SXnotaseed\"\n",
                    "nats.nkey_seed: not an NKey user seed",
                ),
                (
                    "creds_file = \"c.toml\"\n",
                    "nats.creds_file: c.toml is not a NATS .creds",
                ),
                (
                    "url = \"nats://u:p4ss@h:4222\"\ntoken = \"t0ken\"\n",
                    "nats.url: carries credentials and nats.token",
                ),
                ("url = \"nats://h:4222,::p4ss::\"\n", "nats.url: server 2"),
                (
                    "url = \"nats://u:p4ss@a:4222,nats://u:t0ken@b:4222\"\n",
                    "nats.url: server 2 carries other credentials",
                ),
                (
                    "url = \"nats://u:p4ss%FF@a:4222\"\n",
                    "nats.url: the credentials of server 1 are not UTF-8",
                ),
            ];
            for (nats, expected) in cases {
                let err = load(jail, &format!("{BASE}[nats]\n{nats}")).expect_err(nats);
                let msg = err.to_string();
                assert!(msg.starts_with(expected), "{nats}: {msg}");
                assert!(!msg.contains("p4ss") && !msg.contains("t0ken"), "{msg}");
            }
            Ok(())
        });
    }

    #[test]
    fn credentials_inside_the_url_are_decoded_and_kept_out_of_the_servers() {
        Jail::expect_with(|jail| {
            // Given a user and a password that needed percent-encoding, on two servers
            let cfg = load(
                jail,
                &format!(
                    "{BASE}[nats]\nurl = \"tls://app%40x:p%40ss%3Aw%2Frd%25@a:4222, b:4223\"\n"
                ),
            )
            .expect("ok");
            // Then they are the URL's credentials, decoded
            assert_eq!(cfg.nats.auth(), NatsAuth::Url);
            assert_eq!(
                cfg.nats.url_credentials().expect("valid"),
                Some(UrlCredentials::UserPassword {
                    user: "app@x".into(),
                    password: Secret::new("p@ss:w/rd%"),
                })
            );
            // And the client gets the servers without them
            assert_eq!(
                cfg.nats.servers_without_credentials(),
                vec!["tls://a:4222", "b:4223"]
            );
            // A user without a password is a token, also without a scheme
            let cfg = load(jail, &format!("{BASE}[nats]\nurl = \"t0ken@a:4222\"\n")).expect("ok");
            assert_eq!(
                cfg.nats.url_credentials().expect("valid"),
                Some(UrlCredentials::Token(Secret::new("t0ken")))
            );
            assert_eq!(
                cfg.nats.servers_without_credentials(),
                vec!["nats://a:4222"]
            );
            assert!(cfg.nats.auth_fix().contains("inside nats.url"));
            // And a URL without credentials is none of this
            let cfg = load(jail, BASE).expect("ok");
            assert_eq!(cfg.nats.auth(), NatsAuth::None);
            assert_eq!(cfg.nats.url_credentials().expect("valid"), None);
            Ok(())
        });
    }

    #[test]
    fn a_creds_file_ending_in_a_newline_is_accepted() {
        Jail::expect_with(|jail| {
            // Given a .creds file as nsc writes it (the last line ends with \n)
            let seed = nkeys::KeyPair::new_user().seed().expect("seed");
            jail.create_file(
                "u.creds",
                &format!(
                    "-----BEGIN NATS USER JWT-----\neyJ0eXAi.eyJqdGki.c2ln\n------END NATS USER JWT------\n\n\
                     -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
                ),
            )?;
            // Then it validates and selects the creds method
            let cfg = load(jail, &format!("{BASE}[nats]\ncreds_file = \"u.creds\"\n")).expect("ok");
            assert_eq!(cfg.nats.auth(), NatsAuth::Creds);
            Ok(())
        });
    }

    #[test]
    fn a_bad_template_is_named() {
        Jail::expect_with(|jail| {
            let err = load(jail, &format!("{BASE}[nats]\nsubject = \"a.{{nope}}\"\n"))
                .expect_err("bad template");
            assert!(err.to_string().starts_with("nats.subject:"), "{err}");
            Ok(())
        });
    }
}
