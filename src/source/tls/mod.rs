//! TLS to Postgres, for both connections: the replication stream
//! (pgwire-replication) and the SQL control connection (tokio-postgres).
//!
//! Owns three things: turning `[postgres.tls]` and the libpq TLS parameters of
//! `postgres.url` (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`) into one setting,
//! checked at start-up with errors that name the key (`settings`); opening the control
//! connection over that setting; and explaining a TLS failure with the key that
//! fixes it. It never formats the URL (it may carry a password).
//!
//! One TLS implementation serves both connections: pgwire-replication's rustls
//! upgrade (send SSLRequest, then the handshake with the mode's certificate
//! verifier). The control connection opens the TCP socket itself, lets that same
//! function negotiate TLS, and hands the stream to tokio-postgres
//! (`Config::connect_raw`), which then authenticates (SCRAM-SHA-256) over it. So
//! `verify-full` means the same on both connections, and no second TLS stack (or
//! glue crate) is linked.
//!
//! Modes, as libpq: `disable` never encrypts; `prefer` (the default) encrypts when
//! the server offers TLS and does not verify; `require` encrypts without verifying,
//! unless a CA file is given, when it verifies the chain like `verify-ca` (libpq's
//! rule); `verify-ca` checks the chain; `verify-full` checks the chain and that the
//! certificate names the host (DNS name, or IP address for an IP host).

use std::path::PathBuf;
use std::time::Duration;

use pgwire_replication::tls::rustls::maybe_upgrade_to_tls;
use pgwire_replication::{PgWireError, SslMode, TlsConfig};
use tokio_postgres::config::Host;
use tokio_postgres::{Client, NoTls};

use super::SourceError;
use crate::config::SslModeSetting;

mod settings;
pub use settings::resolve;

/// Connect timeout when the URL sets none: a black-holed host must turn into a
/// retry, not a hang.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS setting that cannot work, naming its key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The key and what is wrong with its value.
    #[error("{key}: {reason}")]
    Invalid {
        /// `postgres.tls.<key>` or `postgres.url` (for its `ssl*` parameters).
        key: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
}

fn invalid(key: &str, reason: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// A file and the key that named it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileSetting {
    path: PathBuf,
    key: &'static str,
}

/// The resolved TLS setting of both connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgTls {
    mode: SslModeSetting,
    /// Where the mode came from (for messages).
    mode_key: &'static str,
    ca: Option<FileSetting>,
    cert: Option<FileSetting>,
    key: Option<FileSetting>,
}

impl PgTls {
    fn requires_tls(&self) -> bool {
        !matches!(self.mode, SslModeSetting::Disable | SslModeSetting::Prefer)
    }

    /// The mode as libpq spells it.
    pub fn mode_name(&self) -> &'static str {
        match self.mode {
            SslModeSetting::Disable => "disable",
            SslModeSetting::Prefer => "prefer",
            SslModeSetting::Require => "require",
            SslModeSetting::VerifyCa => "verify-ca",
            SslModeSetting::VerifyFull => "verify-full",
        }
    }

    /// One line for `outboxd check`: the mode and what the connection got.
    pub fn describe(&self, tls_version: Option<&str>) -> String {
        let mode = self.mode_name();
        match tls_version {
            Some(v) => {
                let verified = match self.for_host("").mode {
                    SslMode::VerifyFull => "certificate and host name verified",
                    SslMode::VerifyCa => "certificate chain verified",
                    _ => "certificate NOT verified: use verify-full to stop a man in the middle",
                };
                format!("{v} (sslmode {mode}, {}): {verified}", self.mode_key)
            }
            None if self.mode == SslModeSetting::Prefer => format!(
                "not encrypted: sslmode prefer ({}) and the server offers no TLS",
                self.mode_key
            ),
            None => format!("not encrypted: sslmode {mode} ({})", self.mode_key),
        }
    }

    /// pgwire-replication's setting for a connection to `host`.
    pub fn for_host(&self, host: &str) -> TlsConfig {
        let mode = match self.mode {
            SslModeSetting::Disable => SslMode::Disable,
            SslModeSetting::Prefer => SslMode::Prefer,
            // libpq: `require` with a root certificate verifies like `verify-ca`.
            SslModeSetting::Require if self.ca.is_some() => SslMode::VerifyCa,
            SslModeSetting::Require => SslMode::Require,
            SslModeSetting::VerifyCa => SslMode::VerifyCa,
            SslModeSetting::VerifyFull => SslMode::VerifyFull,
        };
        let mut tls = TlsConfig {
            mode,
            ca_pem_path: self.ca.as_ref().map(|f| f.path.clone()),
            ..TlsConfig::default()
        };
        if let (Some(c), Some(k)) = (&self.cert, &self.key) {
            tls = tls.with_client_cert(&c.path, &k.path);
        }
        if host.parse::<std::net::IpAddr>().is_ok() {
            // As libpq, verify-full with an IP host matches the certificate's IP
            // addresses. The library refuses an IP host unless it is also named as the
            // server name; rustls then checks it against the IP SANs (and sends no SNI).
            tls = tls.with_sni_hostname(host);
        }
        tls
    }

    /// Turns a TLS failure into an error that says what failed and which key fixes
    /// it. Verification and configuration failures are final (a retry meets the same
    /// certificate); anything else is a connection problem and retried.
    pub fn explain(&self, e: &PgWireError, host: &str, port: u16) -> SourceError {
        let detail = match e {
            PgWireError::Tls(d) => d.clone(),
            other => other.to_string(),
        };
        let mode = self.mode_name();
        let at = format!("{host}:{port}");
        let ca_key = self.ca.as_ref().map_or("postgres.tls.ca_file", |f| f.key);
        if detail.contains("SSLRequest rejected") {
            return SourceError::Setup(format!(
                "postgres TLS: sslmode {mode} ({}) needs TLS, but the server at {at} does not \
                 offer it (ssl = off): turn ssl on in the server's postgresql.conf, or change {}",
                self.mode_key, self.mode_key
            ));
        }
        let lower = detail.to_ascii_lowercase();
        if lower.contains("invalid peer certificate") {
            let hint = if lower.contains("unknownissuer")
                || lower.contains("unknown issuer")
                || lower.contains("badsignature")
            {
                match &self.ca {
                    Some(ca) => format!(
                        "the server's certificate is not signed by the CA in {} ({}): set {} \
                         to the CA that signed it",
                        ca.path.display(),
                        ca.key,
                        ca.key
                    ),
                    None => "the server's certificate is not signed by any of the bundled \
                             Mozilla roots: set postgres.tls.ca_file (or sslrootcert in \
                             postgres.url) to the CA that signed it"
                        .to_string(),
                }
            } else if lower.contains("notvalidforname") || lower.contains("not valid for name") {
                format!(
                    "the certificate does not name {host}: connect with a host name (or IP) \
                     from its subjectAltName, or use sslmode verify-ca ({})",
                    self.mode_key
                )
            } else if lower.contains("expired") || lower.contains("notvalidyet") {
                "the server's certificate has expired or is not valid yet: renew it".to_string()
            } else {
                format!("check the server's certificate and {ca_key}")
            };
            return SourceError::Setup(format!(
                "postgres TLS: certificate verification failed for {at} (sslmode {mode}): \
                 {detail}; {hint}"
            ));
        }
        if lower.contains("config error") {
            return SourceError::Setup(format!(
                "postgres TLS: {detail} (see [postgres.tls], or sslmode/sslrootcert/sslcert/\
                 sslkey in postgres.url)"
            ));
        }
        if lower.contains("alert") {
            return SourceError::Setup(format!(
                "postgres TLS: the server at {at} refused the handshake: {detail}; check \
                 postgres.tls.client_cert_file / client_key_file and the server's ssl settings"
            ));
        }
        SourceError::Connection(format!("postgres TLS with {at}: {detail}"))
    }
}

/// Opens the control connection: plain through tokio-postgres for `disable` or a
/// Unix socket, else TCP to each host in turn, TLS by [`PgTls::for_host`], then
/// tokio-postgres's start-up and authentication over that stream.
pub(super) async fn connect(
    pg: &tokio_postgres::Config,
    tls: &PgTls,
) -> Result<(Client, tokio::task::JoinHandle<()>), SourceError> {
    let unix = matches!(pg.get_hosts().first(), Some(Host::Unix(_)));
    if tls.mode == SslModeSetting::Disable || unix {
        let (client, conn) = pg.connect(NoTls).await.map_err(SourceError::connect)?;
        return Ok((client, spawn(conn)));
    }
    let timeout = pg
        .get_connect_timeout()
        .copied()
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let ports = pg.get_ports();
    // A final error (bad certificate, wrong password) wins over a later host's
    // connection error: it is the one an operator must act on.
    let mut fatal: Option<SourceError> = None;
    let mut last: Option<SourceError> = None;
    for (i, host) in pg.get_hosts().iter().enumerate() {
        let Host::Tcp(host) = host else { continue };
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| {
                    SourceError::Connection(format!("cannot connect to {host}:{port}: {e}"))
                })?;
            let _ = tcp.set_nodelay(true);
            let stream = maybe_upgrade_to_tls(tcp, &tls.for_host(host), host)
                .await
                .map_err(|e| match e {
                    PgWireError::Io(io) => {
                        SourceError::Connection(format!("cannot connect to {host}:{port}: {io}"))
                    }
                    other => tls.explain(&other, host, port),
                })?;
            pg.connect_raw(stream, NoTls)
                .await
                .map_err(SourceError::connect)
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok((client, conn))) => return Ok((client, spawn(conn))),
            Ok(Err(e)) if e.is_retryable() => last = Some(e),
            Ok(Err(e)) => {
                fatal.get_or_insert(e);
            }
            Err(_) => {
                last = Some(SourceError::Connection(format!(
                    "cannot connect to {host}:{port}: no answer within {} s",
                    timeout.as_secs()
                )))
            }
        }
    }
    Err(fatal
        .or(last)
        .unwrap_or_else(|| SourceError::Setup("postgres.url names no host to connect to".into())))
}

fn spawn<S, T>(conn: tokio_postgres::Connection<S, T>) -> tokio::task::JoinHandle<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "control connection ended");
        }
    })
}
