//! NATS JetStream sink: CloudEvents NATS protocol binding, deduplicated by
//! `Nats-Msg-Id`, delivered when the PubAck arrives.
//!
//! Binary content mode (default): every attribute becomes a `ce-<name>` header,
//! `datacontenttype` becomes `content-type`, the data is the body. Structured mode:
//! the JSON event format as the body with `content-type:
//! application/cloudevents+json`. Header values are percent-encoded by the HTTP
//! binding's rule so a row value can never break the header block.
//!
//! A PubAck with `duplicate: true` counts as delivered: JetStream already stored the
//! same event id within the stream's duplicate window.

pub(crate) mod auth;
mod encode;
mod once;
pub mod stream;

use std::error::Error as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind};
use async_nats::HeaderMap;
use prometheus::IntCounter;

use super::{Checkpoint, Delivered, Envelope, Resume, SinkError};
use crate::backoff;
use crate::config::{redact_url, ContentMode, NatsConfig, RetryConfig};
use crate::route::{Sanitize, Template};
use auth::{NatsAuth, UrlCredentials};
pub use encode::{encode, header_value};
use stream::ensure_stream;

const SINK: &str = "nats";

/// The longest control line a stock nats-server accepts (`max_control_line`, 4 KB; the
/// server does not announce it). A longer `HPUB` line makes it close the connection,
/// failing every other publish in flight.
const MAX_CONTROL_LINE: usize = 4096;
/// What an `HPUB` line holds besides the subject: the verb, the reply inbox
/// (`_INBOX.` and 22 characters), two sizes and the separators, with room to spare.
const CONTROL_LINE_OVERHEAD: usize = 128;
/// The most header bytes JetStream stores (error 10097 above it).
const MAX_JETSTREAM_HEADERS: usize = 65_535;
/// A missing stream is re-created at most this often (every event in flight fails
/// with `no_stream` at once; one of them re-creates it).
const STREAM_RECHECK: Duration = Duration::from_secs(1);

/// Publishes to JetStream.
pub struct NatsSink {
    client: async_nats::Client,
    js: jetstream::Context,
    subject: Template,
    dead_letter_subject: String,
    mode: ContentMode,
    /// The server's `max_payload`, read at connect and after every reconnect (the
    /// new server may announce another).
    max_payload: AtomicUsize,
    events: Arc<Events>,
    /// The stream's settings, to re-create it when it vanishes (`nats.create_stream`).
    stream: NatsConfig,
    /// When a publish last found the stream missing and looked it up (or created it).
    stream_checked: tokio::sync::Mutex<Option<std::time::Instant>>,
    /// Exactly-once mode's checkpoint (`nats.exactly_once`).
    once: Option<once::Once>,
}

/// What the client's event callback tells the sink.
#[derive(Default)]
struct Events {
    /// The client reported its first connection.
    connected: AtomicBool,
    /// Connected again since `max_payload` was last read.
    reconnected: AtomicBool,
}

impl NatsSink {
    /// Connects (TLS and credentials from `[nats]`), then finds (or creates) the stream
    /// (and, exactly once, the checkpoint stream; `slot` names the checkpoint and
    /// `source`, `cloudevents.source`, tells this relay's messages);
    /// publishes to `subject` (`nats.subject`, parsed by [`crate::sink::validate`]).
    pub async fn connect(
        cfg: &NatsConfig,
        slot: &str,
        source: &str,
        subject: Template,
        retry: &RetryConfig,
        reconnects: Option<IntCounter>,
    ) -> Result<Self, SinkError> {
        let events = Arc::new(Events::default());
        let client = options(cfg, retry, events.clone(), reconnects)
            .await?
            .connect(cfg.servers_without_credentials())
            .await
            .map_err(|e| connect_error(&e, cfg))?;
        tracing::info!(servers = %redact_url(cfg.url.expose()), tls = cfg.tls_required(), "connected to nats");
        let max_payload = AtomicUsize::new(client.server_info().max_payload);
        let mut js = jetstream::new(client.clone());
        js.set_timeout(Duration::from_millis(cfg.ack_timeout_ms));
        ensure_stream(&js, cfg).await?;
        let once = match cfg.exactly_once {
            true => Some(once::Once::open(&js, cfg, slot, source).await?),
            false => None,
        };
        Ok(Self {
            client,
            js,
            subject,
            dead_letter_subject: cfg.dead_letter_subject.clone(),
            mode: cfg.content_mode,
            max_payload,
            events,
            stream: cfg.clone(),
            stream_checked: tokio::sync::Mutex::new(None),
            once,
        })
    }

    /// True with `nats.exactly_once`.
    pub fn exactly_once(&self) -> bool {
        self.once.is_some()
    }

    /// Exactly-once: the checkpoint and the ids stored after it (see [`once`]).
    pub async fn resume(&self) -> Result<Resume, SinkError> {
        match &self.once {
            Some(once) => once.resume(&self.js).await,
            None => Ok(Resume::default()),
        }
    }

    /// Exactly-once: stores the checkpoint (a PubAck already made each event durable,
    /// so `None` has nothing to do).
    pub async fn checkpoint(&self, through: Option<Checkpoint>) -> Result<(), SinkError> {
        match (&self.once, through) {
            (Some(once), Some(through)) => once.write(&self.js, through).await,
            _ => Ok(()),
        }
    }

    /// Publishes and awaits the PubAck.
    pub async fn publish(&self, env: &Envelope) -> Result<Delivered, SinkError> {
        let subject = if env.dead_letter {
            self.dead_letter_subject.clone()
        } else {
            self.subject.render(&env.fields(), Sanitize::NatsToken)
        };
        let (headers, body) = encode(&env.event, self.mode)?;
        // What the server can never take is refused here, before it is sent: sent, it
        // would close the connection under every other publish in flight.
        if let Some(detail) = oversize(&subject, &headers, body.len(), self.max_payload()) {
            return Err(SinkError::Rejected {
                sink: SINK,
                reason: "too_large",
                detail,
            });
        }
        let result = async {
            let ack_future = self
                .js
                .publish_with_headers(subject.clone(), headers, body)
                .await?;
            ack_future.await
        }
        .await;
        match result {
            Ok(ack) => {
                if let Some(once) = &self.once {
                    once.acked(&ack.stream, ack.sequence);
                }
                Ok(Delivered {
                    duplicate: ack.duplicate,
                    destination: subject,
                })
            }
            Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                Err(self.stream_missing(e).await)
            }
            Err(e) => Err(classify(e)),
        }
    }

    /// The server's `max_payload`, read again after a reconnect.
    fn max_payload(&self) -> usize {
        if self.events.reconnected.swap(false, Ordering::Relaxed) {
            self.max_payload
                .store(self.client.server_info().max_payload, Ordering::Relaxed);
        }
        self.max_payload.load(Ordering::Relaxed)
    }

    /// A publish found no stream for its subject. With `nats.create_stream` the stream
    /// is looked up and re-created when it is gone (deleted at runtime, or JetStream
    /// lost its store), at most once per [`STREAM_RECHECK`]; the event is retried
    /// either way.
    async fn stream_missing(&self, e: jetstream::context::PublishError) -> SinkError {
        let missing = classify(e);
        if !self.stream.create_stream {
            return missing;
        }
        let mut checked = self.stream_checked.lock().await;
        if checked.is_some_and(|at| at.elapsed() < STREAM_RECHECK) {
            return missing;
        }
        *checked = Some(std::time::Instant::now());
        let existed = self.js.get_stream(&self.stream.stream).await.is_ok();
        match ensure_stream(&self.js, &self.stream).await {
            Ok(()) if !existed => {
                tracing::warn!(stream = %self.stream.stream, "jetstream stream was missing; re-created it (nats.create_stream)");
                SinkError::Retryable {
                    sink: SINK,
                    reason: "no_stream",
                    detail: format!(
                        "stream {} was missing and has been re-created",
                        self.stream.stream
                    ),
                }
            }
            Ok(()) => missing,
            Err(e) => e,
        }
    }
}

/// Why a message cannot be sent as it is, or `None`: a subject longer than the
/// server's control line, more header bytes than JetStream stores, or headers and
/// body together over the server's `max_payload`. Sizes count what async-nats writes
/// (`NATS/1.0`, one `name: value` line per value, a blank line).
fn oversize(subject: &str, headers: &HeaderMap, body: usize, max_payload: usize) -> Option<String> {
    if subject.len() + CONTROL_LINE_OVERHEAD > MAX_CONTROL_LINE {
        return Some(format!(
            "the subject is {} bytes; a NATS server takes at most {} in its {MAX_CONTROL_LINE}-byte control line (max_control_line)",
            subject.len(),
            MAX_CONTROL_LINE - CONTROL_LINE_OVERHEAD
        ));
    }
    let header_bytes = "NATS/1.0\r\n\r\n".len()
        + headers
            .iter()
            .map(|(name, values)| {
                let name: &str = name.as_ref();
                values
                    .iter()
                    .map(|v| name.len() + v.as_str().len() + 4)
                    .sum::<usize>()
            })
            .sum::<usize>();
    if header_bytes > MAX_JETSTREAM_HEADERS {
        return Some(format!(
            "its headers are {header_bytes} bytes; JetStream stores at most {MAX_JETSTREAM_HEADERS}"
        ));
    }
    if header_bytes + body > max_payload {
        return Some(format!(
            "the message is {} bytes (headers {header_bytes}, body {body}); the server's max_payload is {max_payload}",
            header_bytes + body
        ));
    }
    None
}

/// The client options: TLS, credentials, and connection events reported in our logs.
async fn options(
    cfg: &NatsConfig,
    retry: &RetryConfig,
    events: Arc<Events>,
    reconnects: Option<IntCounter>,
) -> Result<async_nats::ConnectOptions, SinkError> {
    let fix = cfg.auth_fix();
    let retry = retry.clone();
    let mut o = async_nats::ConnectOptions::new()
        .name("outboxd")
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            // async-nats reports the first connection too (once `connect` has
            // returned): every later Connected is a reconnect.
            if matches!(event, async_nats::Event::Connected)
                && events.connected.swap(true, Ordering::Relaxed)
            {
                if let Some(counter) = &reconnects {
                    counter.inc();
                }
                events.reconnected.store(true, Ordering::Relaxed);
            }
            async move { log_event(&event, fix) }
        })
        // After a lost connection async-nats reconnects by itself: with the [retry]
        // backoff and jitter (its default has no jitter), so that sidecars which lost
        // the same server do not come back in lockstep.
        .reconnect_delay_callback(move |attempts| match attempts {
            0 | 1 => Duration::ZERO,
            n => backoff::delay(&retry, u32::try_from(n - 2).unwrap_or(u32::MAX)),
        });
    if cfg.tls_required() {
        o = o.require_tls(true);
    }
    if let Some(ca) = &cfg.tls_ca_file {
        o = o.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&cfg.tls_cert_file, &cfg.tls_key_file) {
        o = o.add_client_certificate(cert.clone(), key.clone());
    }
    match cfg.auth() {
        NatsAuth::UserPassword => {
            o = o.user_and_password(cfg.user.clone(), cfg.password.expose().to_string());
        }
        NatsAuth::Token => o = o.token(cfg.token.expose().to_string()),
        NatsAuth::NKey => o = o.nkey(cfg.nkey_seed.expose().to_string()),
        NatsAuth::Creds => {
            // Read on every connect, so a rotated file is picked up by the next attempt.
            let path = cfg
                .creds_file
                .as_deref()
                .unwrap_or(std::path::Path::new(""));
            o = o
                .credentials_file(path)
                .await
                .map_err(|e| SinkError::Retryable {
                    sink: SINK,
                    reason: "auth",
                    detail: format!("nats.creds_file: cannot use {}: {e}", path.display()),
                })?;
        }
        // async-nats never reads credentials from the URL (nats-io/nats.rs#1623);
        // `connect` gets the URLs without them.
        NatsAuth::Url => match cfg.url_credentials() {
            Ok(Some(UrlCredentials::UserPassword { user, password })) => {
                o = o.user_and_password(user, password.expose().to_string());
            }
            Ok(Some(UrlCredentials::Token(token))) => o = o.token(token.expose().to_string()),
            Ok(None) => {}
            // Checked at start-up; the error names the key, never a value.
            Err(e) => {
                return Err(SinkError::Fatal {
                    sink: SINK,
                    detail: e.to_string(),
                })
            }
        },
        NatsAuth::None => {}
    }
    Ok(o)
}

/// Sorts a failed connect by what the operator must do. Credentials and TLS are
/// retried too (the server's configuration may be what gets fixed), but under their
/// own reasons, which the relay logs as errors and counts.
fn connect_error(e: &async_nats::ConnectError, cfg: &NatsConfig) -> SinkError {
    use async_nats::ConnectErrorKind as K;
    // async-nats errors name the kind and the cause, never the URL or a credential.
    let (reason, detail) = match e.kind() {
        K::AuthorizationViolation => (
            "auth",
            format!(
                "NATS refused the credentials (authorization violation): {}",
                cfg.auth_fix()
            ),
        ),
        K::Authentication => (
            "auth",
            format!("cannot authenticate to NATS ({e}): {}", cfg.auth_fix()),
        ),
        _ if e.kind() == K::Tls || tls_failure(e) => (
            "tls",
            format!(
                "TLS with NATS failed ({e}): check that the server speaks TLS, that \
                 nats.tls_ca_file signed its certificate and the certificate names the URL's \
                 host, and nats.tls_cert_file/nats.tls_key_file if it wants a client certificate"
            ),
        ),
        _ => ("connect", format!("cannot connect to NATS: {e}")),
    };
    SinkError::Retryable {
        sink: SINK,
        reason,
        detail,
    }
}

/// A handshake that failed on a certificate surfaces as an I/O error wrapping a
/// rustls error; find it in the cause chain.
fn tls_failure(e: &async_nats::ConnectError) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(c) = cause {
        if c.is::<async_nats::rustls::Error>() {
            return true;
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<async_nats::rustls::Error>())
            {
                return true;
            }
        }
        cause = c.source();
    }
    false
}

/// Reports the client's own connection events (reconnects happen inside async-nats).
fn log_event(event: &async_nats::Event, fix: &'static str) {
    use async_nats::{ClientError, Event, ServerError};
    match event {
        Event::Connected => tracing::info!("nats connection (re)established"),
        Event::Disconnected => tracing::warn!("nats connection lost; the client reconnects"),
        Event::ServerError(ServerError::AuthorizationViolation) => {
            tracing::error!(
                fix,
                "nats refused the credentials (authorization violation)"
            )
        }
        // A failed reconnect reports the connect error's kind as text.
        Event::ClientError(ClientError::Other(kind)) if kind.contains("authorization") => {
            tracing::error!(
                fix,
                "nats refused the credentials on reconnect (authorization violation); retrying"
            )
        }
        Event::ServerError(e) => tracing::warn!(error = %e, "nats server error"),
        Event::ClientError(e) => tracing::warn!(error = %e, "nats client error"),
        other => tracing::debug!(event = %other, "nats event"),
    }
}

/// Sorts a publish error: unknown means transient (never dead-letter what a retry
/// might deliver); only errors that no retry can cure are `Rejected`.
fn classify(e: async_nats::jetstream::context::PublishError) -> SinkError {
    let retry = |reason, e: &dyn std::fmt::Display| SinkError::Retryable {
        sink: SINK,
        reason,
        detail: e.to_string(),
    };
    match e.kind() {
        PublishErrorKind::TimedOut => retry("timeout", &e),
        PublishErrorKind::BrokenPipe => retry("disconnected", &e),
        PublishErrorKind::StreamNotFound => retry("no_stream", &format!(
            "{e}: no JetStream stream captures the subject (is JetStream up, and do nats.stream_subjects cover nats.subject?)"
        )),
        _ => {
            let source = e.source();
            if let Some(core) = source.and_then(|s| s.downcast_ref::<async_nats::PublishError>()) {
                if core.kind() == async_nats::client::PublishErrorKind::MaxPayloadExceeded {
                    return SinkError::Rejected {
                        sink: SINK,
                        reason: "too_large",
                        detail: format!("{core} (the server's max_payload)"),
                    };
                }
            }
            match source.and_then(|s| s.downcast_ref::<jetstream::Error>()) {
                Some(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
                        || j.error_code() == jetstream::ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM =>
                {
                    SinkError::Rejected { sink: SINK, reason: "too_large", detail: j.to_string() }
                }
                Some(j) => retry("broker_error", j),
                None => retry("publish", &e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_certificate_is_a_tls_error_naming_the_keys() {
        // Given the I/O error a failed handshake surfaces as
        use async_nats::rustls::{CertificateError, Error as Tls};
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            Tls::InvalidCertificate(CertificateError::BadSignature),
        );
        let e = async_nats::ConnectError::from(io);
        // Then it is sorted as tls, for an operator, with the keys to check
        let err = connect_error(&e, &NatsConfig::default());
        assert_eq!(err.reason(), "tls");
        assert!(err.needs_operator());
        assert!(err.to_string().contains("nats.tls_ca_file"), "{err}");
        // And a plain refused connection is not
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let err = connect_error(
            &async_nats::ConnectError::from(refused),
            &NatsConfig::default(),
        );
        assert_eq!(err.reason(), "connect");
        assert!(!err.needs_operator());
    }
}
