//! The HTTP endpoints: `/metrics`, `/healthz`, `/readyz`, `/status` (see `health` for
//! their semantics). Read-only views of [`Telemetry`]; never a secret, never a payload.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::health::Telemetry;

/// The listener could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("http.listen {addr}: {source}")]
pub struct HttpError {
    addr: String,
    #[source]
    source: std::io::Error,
}

/// Binds `addr` now (so a taken port fails start-up), serves until `shutdown`.
pub async fn bind(
    addr: &str,
    telemetry: Arc<Telemetry>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, HttpError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError {
            addr: addr.to_string(),
            source,
        })?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
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
    if t.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

async fn status(State(t): State<Arc<Telemetry>>) -> impl IntoResponse {
    Json(t.health.report())
}
