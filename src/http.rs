//! The HTTP endpoints: `/metrics`, `/healthz`, `/readyz`, `/status` (see `health` for
//! their semantics). Read-only views of [`Telemetry`]; never a secret, never a payload.
//!
//! With `[http] bearer_token` and/or `basic_auth_user` set, `/metrics` and `/status`
//! answer 401 (with `WWW-Authenticate`) unless the request carries one of those
//! credentials, compared in constant time. `/healthz` and `/readyz` stay open: the
//! kubelet's probes carry no credentials.
//!
//! The server must never cost the relay its own connections, whoever connects to it
//! (issue 14: 300 slowloris connections held every descriptor, and Postgres could not
//! be reached again). So every connection is bounded (see [`serve`]): a request head
//! must arrive within `http.header_read_timeout_ms` of connecting or of the previous
//! response (this also ends idle keep-alive connections), a connection lives at most
//! `http.max_connection_age_secs`, and at most `http.max_connections` are open, fewer
//! when the file-descriptor limit leaves less than [`RESERVED_FDS`] for the relay.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::HttpConfig;
use crate::telemetry::Telemetry;

/// The listener could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("http.listen {addr}: {source}")]
pub struct HttpError {
    addr: String,
    #[source]
    source: std::io::Error,
}

/// Binds `[http] listen` now (so a taken port fails start-up), serves until `shutdown`.
pub async fn bind(
    cfg: &HttpConfig,
    telemetry: Arc<Telemetry>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, HttpError> {
    let addr = cfg.listen.as_str();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError {
            addr: addr.to_string(),
            source,
        })?;
    let guarded = Router::new()
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route_layer(middleware::from_fn_with_state(
            Arc::new(Credentials::new(cfg)),
            authorize,
        ));
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(guarded)
        .with_state(telemetry);
    let limits = Limits::new(cfg, soft_fd_limit());
    Ok(tokio::spawn(serve(listener, app, limits, shutdown)))
}

/// File descriptors the HTTP server leaves to the rest of the process: the
/// replication, SQL, monitor and retention connections to Postgres, the broker's
/// sockets (librdkafka keeps a few per broker, plus wake-up pipes), secret and
/// certificate files, the runtime's own. A streaming relay held 14 (stdout sink) and
/// 16 (NATS, with heartbeats and retention) when measured; librdkafka adds a few per
/// broker.
pub const RESERVED_FDS: u64 = 64;

/// The connection bounds in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    header_read_timeout: Duration,
    max_age: Duration,
    max_connections: usize,
}

impl Limits {
    /// `[http]`'s bounds, with `max_connections` lowered to fit the soft
    /// file-descriptor limit (`None`: unlimited) minus [`RESERVED_FDS`].
    fn new(cfg: &HttpConfig, fd_limit: Option<u64>) -> Self {
        let mut max_connections = cfg.max_connections;
        if let Some(limit) = fd_limit {
            let room = usize::try_from(limit.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
            if room < max_connections {
                max_connections = room.max(1);
                tracing::warn!(
                    configured = cfg.max_connections,
                    in_force = max_connections,
                    fd_limit = limit,
                    reserved = RESERVED_FDS,
                    "http.max_connections lowered to what the file-descriptor limit \
                     (RLIMIT_NOFILE) leaves after the relay's own reserve; raise the \
                     limit (ulimit -n, LimitNOFILE=) to serve more"
                );
            }
        }
        Self {
            header_read_timeout: Duration::from_millis(cfg.header_read_timeout_ms),
            max_age: Duration::from_secs(cfg.max_connection_age_secs),
            max_connections,
        }
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit, as Go's runtime does at start:
/// the soft limit is often 1024 for compatibility with `select(2)`, which nothing in
/// outboxd uses, and only the hard limit is the operator's decision. Call once at
/// start-up of `outboxd run`, before [`bind`].
pub fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let old = getrlimit(Resource::Nofile);
    if old.current.is_none() || old.current == old.maximum {
        return;
    }
    let mut new = old;
    new.current = old.maximum;
    match setrlimit(Resource::Nofile, new) {
        Ok(()) => tracing::debug!(
            from = old.current,
            to = old.maximum,
            "raised the soft file-descriptor limit to the hard limit"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            soft = old.current,
            hard = old.maximum,
            "cannot raise the soft file-descriptor limit; http.max_connections may be \
             lowered to fit it"
        ),
    }
}

/// The soft RLIMIT_NOFILE; `None` when unlimited.
fn soft_fd_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// How often at most the connection cap is reported while it is hit.
const CAP_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Accepts and serves HTTP/1.1 connections until `shutdown`, within `limits`.
///
/// At the cap, a new connection closes the **oldest** one rather than being
/// refused: whoever holds connections open (a slowloris client) loses them first,
/// and a probe is answered even while an attacker holds every slot. A slot is held
/// until the socket is closed, and the loop accepts nothing while it waits for the
/// slot of the connection it just closed, so sockets never exceed `max_connections`
/// plus the one just accepted. That wait is also what keeps a probe from being pushed
/// out in turn: its task, queued before the closed connection's, answers it first.
/// Accepting everything keeps the kernel's backlog, where a probe would wait behind
/// the attackers, short.
async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    // Open connections by age (ids count up), each with the token that closes it; a
    // closed one leaves the map at once but keeps its slot until its task ends.
    let open: Arc<Mutex<BTreeMap<u64, CancellationToken>>> = Arc::default();
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let tasks = TaskTracker::new();
    let mut next_id = 0u64;
    let (mut closed_at_cap, mut last_report) = (0u64, None::<Instant>);
    loop {
        let stream = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors (EMFILE) or a connection reset before it was
                    // accepted: pause rather than spin; connections wait in the backlog.
                    tracing::warn!(error = %e, "http: cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                let oldest = open
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .pop_first();
                if let Some((_, oldest)) = oldest {
                    oldest.cancel();
                    closed_at_cap += 1;
                }
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        // The semaphore is never closed.
                        Err(_) => break,
                    },
                }
            }
        };
        let id = next_id;
        next_id += 1;
        let closer = CancellationToken::new();
        open.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, closer.clone());
        if closed_at_cap > 0 && last_report.is_none_or(|t| t.elapsed() >= CAP_REPORT_INTERVAL) {
            tracing::warn!(
                max_connections = limits.max_connections,
                closed = closed_at_cap,
                "http connection limit reached: closed the oldest connections to serve new \
                 ones (many clients, or clients holding connections open)"
            );
            (closed_at_cap, last_report) = (0, Some(Instant::now()));
        }
        let service = TowerToHyperService::new(app.clone());
        let (open, shutdown) = (open.clone(), shutdown.clone());
        tasks.spawn(async move {
            connection(stream, service, limits, &closer, &shutdown).await;
            open.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&id);
            // The socket is closed: the slot is free.
            drop(slot);
        });
    }
    // Each connection ends within a header-read timeout of the shutdown.
    tasks.close();
    tasks.wait().await;
}

/// Serves one connection until it ends, is closed at the cap (`closer`), or reaches
/// its maximum age or the shutdown: then the response in progress may finish within
/// one header-read timeout (a peer that does not read it is cut off), and no further
/// request is read.
async fn connection(
    stream: tokio::net::TcpStream,
    service: TowerToHyperService<Router>,
    limits: Limits,
    closer: &CancellationToken,
    shutdown: &CancellationToken,
) {
    // hyper's header-read timer runs from the start of reading a request head, which
    // on a kept-alive connection is the end of the previous response: so it bounds
    // both a trickled head and an idle connection. It needs a timer to take effect
    // (axum::serve sets none, which is why connections were never closed).
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        // An error is the peer's doing (a timeout, a reset, a bad request): hyper has
        // answered what it could; nothing for the operator.
        _ = conn.as_mut() => return,
        _ = closer.cancelled() => return,
        _ = tokio::time::sleep(limits.max_age) => {}
        _ = shutdown.cancelled() => {}
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = tokio::time::timeout(limits.header_read_timeout, conn) => {}
        _ = closer.cancelled() => {}
    }
}

async fn metrics(State(t): State<Arc<Telemetry>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        t.metrics.render(),
    )
}

async fn healthz(State(t): State<Arc<Telemetry>>) -> impl IntoResponse {
    if t.health.is_live() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "relay loop stalled\n")
    }
}

async fn readyz(State(t): State<Arc<Telemetry>>) -> impl IntoResponse {
    match t.health.readiness() {
        // A sidecar stays ready through an outage, but says so.
        Ok(()) => match t.health.sink_failing() {
            Some((since, attempts)) => (
                StatusCode::OK,
                format!(
                    "ready; publishing fails since {} ({attempts} failed attempts)\n",
                    since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ),
            ),
            None => (StatusCode::OK, "ready\n".to_string()),
        },
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn status(State(t): State<Arc<Telemetry>>) -> impl IntoResponse {
    Json(t.health.report())
}

/// The credentials `/metrics` and `/status` accept; none configured means open.
struct Credentials {
    /// `Bearer <token>`.
    bearer: Option<Vec<u8>>,
    /// `Basic base64(user:password)`, kept decoded.
    basic: Option<Vec<u8>>,
}

impl Credentials {
    fn new(cfg: &HttpConfig) -> Self {
        let bearer =
            (!cfg.bearer_token.is_empty()).then(|| cfg.bearer_token.expose().as_bytes().to_vec());
        let basic = (!cfg.basic_auth_user.is_empty()).then(|| {
            format!(
                "{}:{}",
                cfg.basic_auth_user,
                cfg.basic_auth_password.expose()
            )
            .into_bytes()
        });
        Self { bearer, basic }
    }

    fn open(&self) -> bool {
        self.bearer.is_none() && self.basic.is_none()
    }

    /// Does this `Authorization` header carry an accepted credential?
    fn accepts(&self, header: Option<&HeaderValue>) -> bool {
        use base64::Engine as _;
        use subtle::ConstantTimeEq as _;
        if self.open() {
            return true;
        }
        let Some((scheme, given)) = header
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.trim().split_once(' '))
        else {
            return false;
        };
        let given = given.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            if let Some(token) = &self.bearer {
                // Constant time for equal lengths; only the length can leak.
                return bool::from(given.as_bytes().ct_eq(token));
            }
        } else if scheme.eq_ignore_ascii_case("basic") {
            if let Some(expected) = &self.basic {
                let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(given) else {
                    return false;
                };
                return bool::from(decoded.ct_eq(expected));
            }
        }
        false
    }

    /// The `WWW-Authenticate` challenges for a 401.
    fn challenges(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.bearer.is_some() {
            out.push("Bearer realm=\"outboxd\"");
        }
        if self.basic.is_some() {
            out.push("Basic realm=\"outboxd\", charset=\"UTF-8\"");
        }
        out
    }
}

async fn authorize(State(creds): State<Arc<Credentials>>, req: Request, next: Next) -> Response {
    if creds.accepts(req.headers().get(header::AUTHORIZATION)) {
        return next.run(req).await;
    }
    let mut resp = (StatusCode::UNAUTHORIZED, "unauthorized\n").into_response();
    for c in creds.challenges() {
        resp.headers_mut()
            .append(header::WWW_AUTHENTICATE, HeaderValue::from_static(c));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn creds(token: &str, user: &str, password: &str) -> Credentials {
        Credentials::new(&HttpConfig {
            bearer_token: Secret::new(token),
            basic_auth_user: user.into(),
            basic_auth_password: Secret::new(password),
            ..HttpConfig::default()
        })
    }

    fn h(v: &str) -> HeaderValue {
        HeaderValue::from_str(v).expect("header value")
    }

    #[test]
    fn the_connection_cap_leaves_the_relay_its_descriptors() {
        let cfg = HttpConfig::default();
        let cap = |fd_limit| Limits::new(&cfg, fd_limit).max_connections;
        // Given the default cap of 256: kept under a generous or no limit
        assert_eq!(cap(None), 256);
        assert_eq!(cap(Some(1_048_576)), 256);
        assert_eq!(cap(Some(256 + RESERVED_FDS)), 256);
        // Lowered to what a small limit leaves after the reserve, never to zero
        assert_eq!(cap(Some(256)), 256 - RESERVED_FDS as usize);
        assert_eq!(cap(Some(RESERVED_FDS)), 1);
        let limits = Limits::new(&cfg, None);
        assert_eq!(limits.header_read_timeout, Duration::from_secs(5));
        assert_eq!(limits.max_age, Duration::from_secs(60));
    }

    #[test]
    fn no_credentials_configured_means_open() {
        let c = creds("", "", "");
        assert!(c.accepts(None));
        assert!(c.challenges().is_empty());
    }

    #[test]
    fn bearer_and_basic_are_checked() {
        // Given both methods ("prom:pw" is cHJvbTpwdw==)
        let c = creds("t0k", "prom", "pw");
        // Then each accepts its own credential, scheme case-insensitively
        assert!(c.accepts(Some(&h("Bearer t0k"))));
        assert!(c.accepts(Some(&h("bearer  t0k "))));
        assert!(c.accepts(Some(&h("Basic cHJvbTpwdw=="))));
        // And refuses everything else
        for bad in [
            "Bearer t0",
            "Bearer t0kk",
            "Basic cHJvbTpwdx==",
            "Basic !!",
            "t0k",
            "",
        ] {
            assert!(!c.accepts(Some(&h(bad))), "{bad}");
        }
        assert!(!c.accepts(None));
        assert_eq!(c.challenges().len(), 2);
        // A bearer-only setup refuses basic auth even with the right token inside
        let only_bearer = creds("t0k", "", "");
        assert!(!only_bearer.accepts(Some(&h("Basic dDBr"))));
        assert_eq!(only_bearer.challenges(), vec!["Bearer realm=\"outboxd\""]);
    }
}
