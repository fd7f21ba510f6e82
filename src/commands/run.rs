//! `outboxd run`, the supervisor: builds the telemetry, binds the HTTP endpoints,
//! starts the monitor and retention beside the relay, turns SIGTERM/SIGINT into a
//! shutdown and waits, each step bounded, for everything to stop.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{CommandError, Step};
use crate::config::{Config, ReadinessMode};
use crate::sink::Routes;
use crate::telemetry::{Health, Metrics, Readiness, Telemetry};

/// After the relay stopped: how long the HTTP server may take to close its
/// connections (a client that never finishes its request must not hold the exit).
const HTTP_STOP_TIMEOUT: Duration = Duration::from_secs(1);

/// Runs the relay until SIGTERM/SIGINT (then drains) or a fatal error.
pub async fn run(cfg: Config, routes: Routes) -> Result<ExitCode, CommandError> {
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    tracing::info!(version = env!("CARGO_PKG_VERSION"), sink = ?cfg.sink.kind, slot = %cfg.postgres.slot, http = %cfg.http.listen, "outboxd starting");
    let telemetry = Arc::new(Telemetry {
        metrics: Metrics::new().map_err(CommandError::other)?,
        health: Health::new(
            &cfg.postgres.slot,
            &cfg.postgres.publication,
            match cfg.http.readiness {
                ReadinessMode::Sidecar => Readiness::Sidecar,
                ReadinessMode::Strict => Readiness::Strict,
            },
        ),
    });
    // More descriptors for the relay's connections and the bounded HTTP server.
    crate::http::raise_fd_limit();
    // The endpoints keep answering while the relay drains; they stop after it.
    let http_stop = CancellationToken::new();
    let http = crate::http::bind(&cfg.http, telemetry.clone(), http_stop.clone())
        .await
        .map_err(CommandError::other)?;
    let cfg = Arc::new(cfg);
    let monitor = tokio::spawn(crate::source::monitor::run(
        cfg.clone(),
        telemetry.clone(),
        shutdown.child_token(),
    ));
    let retention = cfg.retention.enabled.then(|| {
        tokio::spawn(crate::retention::run(
            cfg.clone(),
            telemetry.clone(),
            shutdown.child_token(),
        ))
    });
    let result = crate::relay::run(&cfg, &routes, &telemetry, &shutdown).await;
    monitor.abort();
    if let Some(r) = retention {
        r.abort();
    }
    http_stop.cancel();
    if tokio::time::timeout(HTTP_STOP_TIMEOUT, http).await.is_err() {
        tracing::warn!("http connections still open at exit; closed without waiting");
    }
    let stopped = result.step("relay failed")?;
    if stopped.unacknowledged == 0 {
        tracing::info!("outboxd stopped cleanly");
    } else {
        tracing::warn!(
            unacknowledged = stopped.unacknowledged,
            "outboxd stopped; events the broker had not acknowledged are sent again after a restart"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Cancels `shutdown` on SIGTERM or SIGINT; a second one exits at once (an operator
/// who does not want to wait for the drain), with 128 + the signal's number.
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; SIGTERM will kill without draining");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(
        signal = name,
        "shutting down: draining in-flight events (a second SIGTERM/SIGINT stops at once)"
    );
    shutdown.cancel();
    let (name, code) = tokio::select! {
        _ = term.recv() => ("SIGTERM", 128 + 15),
        _ = int.recv() => ("SIGINT", 128 + 2),
    };
    // Nothing is lost: the slot was confirmed only past acknowledged events, and the
    // rest is sent again after the restart.
    tracing::warn!(signal = name, "second signal: exiting now without draining; events not yet acknowledged are sent again after the restart");
    eprintln!("outboxd: second signal ({name}): exiting now without draining");
    std::process::exit(code);
}
