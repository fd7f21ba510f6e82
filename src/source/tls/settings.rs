//! Where the TLS setting comes from: `[postgres.tls]` and libpq's parameters in
//! `postgres.url`, resolved into one [`PgTls`] and checked at start-up, each error
//! naming its key. Never formats the URL (it may carry a password).

use std::path::PathBuf;

use super::{invalid, FileSetting, PgTls, TlsError};
use crate::config::{PostgresConfig, SslModeSetting};
use tokio_postgres::config::Host;

/// The libpq TLS parameters found in a URL.
#[derive(Debug, Default, PartialEq, Eq)]
struct UrlTls {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
}

/// Resolves and checks `[postgres.tls]` and the URL's TLS parameters; returns the
/// connection config (without those parameters, which tokio-postgres does not know,
/// and with its own TLS off: it is done here) and the TLS setting.
pub fn resolve(pg: &PostgresConfig) -> Result<(tokio_postgres::Config, PgTls), TlsError> {
    let (url, from_url) = split_tls_params(pg.url.expose())?;
    let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
        // The parser's message never contains the URL itself.
        invalid("postgres.url", format!("not a valid connection URL: {e}"))
    })?;
    // A key=value connection string keeps `sslmode` (tokio-postgres parses
    // disable/prefer/require); a URL had it taken out above.
    let url_mode = match from_url.sslmode.as_deref() {
        Some(v) => Some(parse_mode(v)?),
        None => match config.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => Some(SslModeSetting::Disable),
            tokio_postgres::config::SslMode::Require => Some(SslModeSetting::Require),
            _ => None,
        },
    };
    config.ssl_mode(tokio_postgres::config::SslMode::Disable);
    let t = &pg.tls;
    let (mode, mode_key) = match (t.mode, url_mode) {
        (Some(m), _) => (m, "postgres.tls.mode"),
        (None, Some(m)) => (m, "postgres.url (sslmode)"),
        (None, None) => (SslModeSetting::Prefer, "postgres.tls.mode"),
    };
    let file = |key: &Option<PathBuf>,
                key_name: &'static str,
                url: &Option<String>,
                url_name: &'static str| {
        match (key, url) {
            (Some(p), _) => Some(FileSetting {
                path: p.clone(),
                key: key_name,
            }),
            (None, Some(p)) => Some(FileSetting {
                path: PathBuf::from(p),
                key: url_name,
            }),
            (None, None) => None,
        }
    };
    let tls = PgTls {
        mode,
        mode_key,
        ca: file(
            &t.ca_file,
            "postgres.tls.ca_file",
            &from_url.sslrootcert,
            "postgres.url (sslrootcert)",
        ),
        cert: file(
            &t.client_cert_file,
            "postgres.tls.client_cert_file",
            &from_url.sslcert,
            "postgres.url (sslcert)",
        ),
        key: file(
            &t.client_key_file,
            "postgres.tls.client_key_file",
            &from_url.sslkey,
            "postgres.url (sslkey)",
        ),
    };
    tls.check(&config)?;
    Ok((config, tls))
}

impl PgTls {
    fn check(&self, config: &tokio_postgres::Config) -> Result<(), TlsError> {
        match (&self.cert, &self.key) {
            (Some(c), None) => {
                return Err(invalid(
                    c.key,
                    "a client certificate needs its key: set postgres.tls.client_key_file",
                ))
            }
            (None, Some(k)) => {
                return Err(invalid(
                    k.key,
                    "a client key needs its certificate: set postgres.tls.client_cert_file",
                ))
            }
            _ => {}
        }
        let files = [&self.ca, &self.cert, &self.key];
        if self.mode == SslModeSetting::Disable {
            if let Some(f) = files.into_iter().flatten().next() {
                return Err(invalid(
                    f.key,
                    format!(
                        "has no effect with sslmode disable ({}): remove it, or choose \
                         verify-full",
                        self.mode_key
                    ),
                ));
            }
        }
        if let (SslModeSetting::Prefer, Some(ca)) = (self.mode, &self.ca) {
            return Err(invalid(
                ca.key,
                format!(
                    "sslmode prefer ({}) never verifies the server, so the CA would be \
                     ignored: choose verify-full (or verify-ca)",
                    self.mode_key
                ),
            ));
        }
        for (f, marker, what) in [
            (&self.ca, "-----BEGIN CERTIFICATE-----", "a PEM certificate"),
            (
                &self.cert,
                "-----BEGIN CERTIFICATE-----",
                "a PEM certificate",
            ),
            (&self.key, "PRIVATE KEY-----", "a PEM private key"),
        ] {
            let Some(f) = f else { continue };
            let text = std::fs::read_to_string(&f.path)
                .map_err(|e| invalid(f.key, format!("cannot read {}: {e}", f.path.display())))?;
            if !text.contains(marker) {
                return Err(invalid(
                    f.key,
                    format!("{} does not hold {what}", f.path.display()),
                ));
            }
        }
        let unix = config
            .get_hosts()
            .iter()
            .any(|h| matches!(h, Host::Unix(_)));
        if unix && self.requires_tls() {
            return Err(invalid(
                self.mode_key,
                format!(
                    "sslmode {} needs TLS, which a Unix socket does not carry: connect over \
                     TCP (host=name or IP), or use disable/prefer",
                    self.mode_name()
                ),
            ));
        }
        Ok(())
    }
}

fn parse_mode(v: &str) -> Result<SslModeSetting, TlsError> {
    Ok(match v {
        "disable" => SslModeSetting::Disable,
        "prefer" => SslModeSetting::Prefer,
        "require" => SslModeSetting::Require,
        "verify-ca" => SslModeSetting::VerifyCa,
        "verify-full" => SslModeSetting::VerifyFull,
        "allow" => {
            return Err(invalid(
                "postgres.url",
                "sslmode=allow is not supported: use prefer (or disable)",
            ))
        }
        other => {
            return Err(invalid(
                "postgres.url",
                format!(
                    "sslmode={other:?} is not one of disable, prefer, require, verify-ca, \
                     verify-full"
                ),
            ))
        }
    })
}

/// Takes libpq's TLS parameters out of a `postgres://` URL's query. A key=value
/// connection string is returned as it is (tokio-postgres reads its `sslmode`).
fn split_tls_params(url: &str) -> Result<(String, UrlTls), TlsError> {
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let Some((base, query)) = url.split_once('?').filter(|_| is_url) else {
        return Ok((url.to_string(), UrlTls::default()));
    };
    let mut found = UrlTls::default();
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match k {
            "sslmode" => &mut found.sslmode,
            "sslrootcert" => &mut found.sslrootcert,
            "sslcert" => &mut found.sslcert,
            "sslkey" => &mut found.sslkey,
            _ => {
                kept.push(pair);
                continue;
            }
        };
        let value = percent_decode(v).ok_or_else(|| {
            invalid(
                "postgres.url",
                format!("the value of {k} is not valid percent-encoded UTF-8"),
            )
        })?;
        if k == "sslrootcert" && value == "system" {
            return Err(invalid(
                "postgres.url",
                "sslrootcert=system is not supported: leave sslrootcert out to verify against \
                 the bundled Mozilla roots, or name a CA file",
            ));
        }
        *slot = Some(value);
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, found))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PostgresTlsConfig, Secret};
    use pgwire_replication::SslMode;
    use std::path::Path;

    fn pg(url: &str, tls: PostgresTlsConfig) -> PostgresConfig {
        PostgresConfig {
            url: Secret::new(url),
            tls,
            ..PostgresConfig::default()
        }
    }

    fn pem(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).expect("write pem");
        p
    }

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n";

    #[test]
    fn url_parameters_are_taken_out_and_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = pem(dir.path(), "ca.pem", CERT);
        let url = format!(
            "postgres://u:pw@db.example:5433/app?application_name=x&sslmode=verify-full&sslrootcert={}",
            ca.display()
        );
        let (config, tls) = resolve(&pg(&url, PostgresTlsConfig::default())).expect("valid");
        assert_eq!(tls.mode, SslModeSetting::VerifyFull);
        assert_eq!(tls.mode_key, "postgres.url (sslmode)");
        assert_eq!(
            tls.ca.as_ref().map(|f| f.path.as_path()),
            Some(ca.as_path())
        );
        assert_eq!(config.get_application_name(), Some("x"));
        assert_eq!(config.get_dbname(), Some("app"));
        let t = tls.for_host("db.example");
        assert_eq!(t.mode, SslMode::VerifyFull);
        assert_eq!(t.sni_hostname, None);
    }

    #[test]
    fn keys_win_over_the_url_and_the_default_is_prefer() {
        let (_, tls) = resolve(&pg("postgres://h/db", PostgresTlsConfig::default())).expect("ok");
        assert_eq!(tls.mode, SslModeSetting::Prefer);
        let keys = PostgresTlsConfig {
            mode: Some(SslModeSetting::Require),
            ..Default::default()
        };
        let (_, tls) = resolve(&pg("postgres://h/db?sslmode=disable", keys)).expect("ok");
        assert_eq!(tls.mode, SslModeSetting::Require);
        assert_eq!(tls.mode_key, "postgres.tls.mode");
        // A key=value string keeps the sslmode tokio-postgres understands.
        let (_, tls) =
            resolve(&pg("host=h sslmode=disable", PostgresTlsConfig::default())).expect("ok");
        assert_eq!(tls.mode, SslModeSetting::Disable);
    }

    #[test]
    fn require_with_a_ca_verifies_the_chain_as_libpq_and_ip_hosts_are_matched_by_ip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = pem(dir.path(), "ca.pem", CERT);
        let keys = PostgresTlsConfig {
            mode: Some(SslModeSetting::Require),
            ca_file: Some(ca),
            ..Default::default()
        };
        let (_, tls) = resolve(&pg("postgres://h/db", keys)).expect("ok");
        assert_eq!(tls.for_host("h").mode, SslMode::VerifyCa);
        let full = PgTls {
            mode: SslModeSetting::VerifyFull,
            ..tls
        };
        assert_eq!(
            full.for_host("127.0.0.1").sni_hostname.as_deref(),
            Some("127.0.0.1")
        );
    }

    #[test]
    fn bad_settings_name_their_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = pem(dir.path(), "ca.pem", CERT);
        let cert = pem(dir.path(), "c.pem", CERT);
        let key = pem(dir.path(), "k.pem", KEY);
        let err = |url: &str, t: PostgresTlsConfig| {
            resolve(&pg(url, t)).expect_err("invalid").to_string()
        };
        let e = err(
            "postgres://h/db?sslmode=verify-everything",
            Default::default(),
        );
        assert!(
            e.starts_with("postgres.url: sslmode=\"verify-everything\""),
            "{e}"
        );
        let e = err(
            "postgres://h/db",
            PostgresTlsConfig {
                client_cert_file: Some(cert.clone()),
                ..Default::default()
            },
        );
        assert!(e.starts_with("postgres.tls.client_cert_file:"), "{e}");
        let e = err(
            "postgres://h/db",
            PostgresTlsConfig {
                mode: Some(SslModeSetting::Disable),
                ca_file: Some(ca.clone()),
                ..Default::default()
            },
        );
        assert!(e.starts_with("postgres.tls.ca_file: has no effect"), "{e}");
        let e = err(
            "postgres://h/db",
            PostgresTlsConfig {
                ca_file: Some(ca.clone()),
                ..Default::default()
            },
        );
        assert!(e.starts_with("postgres.tls.ca_file: sslmode prefer"), "{e}");
        let e = err(
            "postgres://h/db",
            PostgresTlsConfig {
                mode: Some(SslModeSetting::VerifyFull),
                ca_file: Some(dir.path().join("missing.pem")),
                ..Default::default()
            },
        );
        assert!(e.starts_with("postgres.tls.ca_file: cannot read"), "{e}");
        let e = err(
            "postgres://h/db",
            PostgresTlsConfig {
                mode: Some(SslModeSetting::VerifyFull),
                ca_file: Some(key.clone()),
                ..Default::default()
            },
        );
        assert!(e.contains("does not hold a PEM certificate"), "{e}");
        let e = err(
            "postgres://%2Ftmp/db",
            PostgresTlsConfig {
                mode: Some(SslModeSetting::VerifyFull),
                ..Default::default()
            },
        );
        assert!(
            e.starts_with("postgres.tls.mode: sslmode verify-full needs TLS"),
            "{e}"
        );
        // Both files given, any mode that may use TLS: fine.
        let ok = PostgresTlsConfig {
            mode: Some(SslModeSetting::VerifyFull),
            ca_file: Some(ca),
            client_cert_file: Some(cert),
            client_key_file: Some(key),
        };
        assert!(resolve(&pg("postgres://h/db", ok)).is_ok());
    }

    #[test]
    fn the_password_never_reaches_an_error() {
        let e = resolve(&pg(
            "postgres://u:hunter2@h/db?sslmode=nope",
            Default::default(),
        ))
        .expect_err("invalid");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert_eq!(
            percent_decode("%2Fetc%2Fca.pem").as_deref(),
            Some("/etc/ca.pem")
        );
        assert_eq!(percent_decode("%zz"), None);
    }
}
