//! The HTTP endpoints: `/metrics`, `/healthz`, `/readyz`, `/status` (see `health` for
//! their semantics). Read-only views of [`Telemetry`]; never a secret, never a payload.
//!
//! With `[http] bearer_token` and/or `basic_auth_user` set, `/metrics` and `/status`
//! answer 401 (with `WWW-Authenticate`) unless the request carries one of those
//! credentials, compared in constant time. `/healthz` and `/readyz` stay open: the
//! kubelet's probes carry no credentials.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::config::HttpConfig;
use crate::health::Telemetry;

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
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "http server stopped");
        }
    }))
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
