//! The `outboxd` binary: command line, logging, signals and exit codes. The work
//! itself lives in the library (`outboxd::relay`, `outboxd::check`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use outboxd::config::{Config, LogFormat, ReadinessMode};
use outboxd::telemetry::Metrics;
use outboxd::telemetry::{Health, Readiness, Telemetry};

/// Exit code for a configuration error (sysexits EX_CONFIG).
const EXIT_CONFIG: u8 = 78;
/// Exit code when the relay stopped on an error.
const EXIT_FAILURE: u8 = 1;
/// After the relay stopped: how long the HTTP server may take to close its
/// connections (a client that never finishes its request must not hold the exit).
const HTTP_STOP_TIMEOUT: Duration = Duration::from_secs(1);
/// After the work is done: how long blocking threads still running may take, e.g.
/// librdkafka purging and joining its threads, which a hung broker makes slow. Nothing
/// they do is needed for correctness: what was not acknowledged is sent again after
/// the restart. With the relay's own 2 s to close the replication connection, SIGTERM
/// exits within `sink.shutdown_timeout_secs` + 5 s whatever the broker does.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Parser)]
#[command(
    name = "outboxd",
    version,
    about = "Relay a PostgreSQL transactional outbox to NATS JetStream or Kafka as CloudEvents.",
    long_about = "Relay a PostgreSQL transactional outbox to NATS JetStream or Kafka as CloudEvents.\n\n\
        outboxd tails the outbox table through logical replication (pgoutput), publishes every \
        committed row at least once, in commit order per aggregate, and moves the replication \
        slot only past events the broker acknowledged.\n\n\
        Configuration: built-in defaults < TOML file (--config) < environment variables \
        OUTBOXD_<SECTION>__<KEY> (e.g. OUTBOXD_POSTGRES__URL). See config/outboxd.toml."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// TOML configuration file. Optional: everything can come from OUTBOXD_* variables.
    #[arg(short, long, env = "OUTBOXD_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay until SIGTERM/SIGINT (then drain in-flight acks and exit 0).
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Recover from a lost slot (dropped, invalidated, or a primary failover without
        /// a failover slot) or a re-created publication: create a new slot and first
        /// republish, from the outbox table, the rows committed since the old slot's
        /// last recorded position. Same as postgres.allow_new_slot = true.
        #[arg(long)]
        allow_new_slot: bool,
        /// Recover from an outbox table that left the publication or was dropped and
        /// created again: publish all of its rows, then stream on. Same as
        /// postgres.resync_table = true.
        #[arg(long)]
        resync_table: bool,
    },
    /// Validate the config and check Postgres (wal_level, REPLICATION, table, publication,
    /// slot) and the broker; print ok/FAIL with the fix for each; exit 1 on any FAIL.
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Kafka: also check the topic of this aggregate type (repeatable).
        #[arg(long = "aggregate-type", value_name = "TYPE")]
        aggregate_types: Vec<String>,
    },
    /// Republish rows still in the outbox table (same CloudEvent ids, so dedup works),
    /// selected by time, id range, aggregate type and/or id. Never touches the slot.
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        /// Only rows with created_at >= this RFC 3339 time.
        #[arg(long, value_name = "TIME")]
        from: Option<chrono::DateTime<chrono::Utc>>,
        /// Only rows with created_at < this RFC 3339 time.
        #[arg(long, value_name = "TIME")]
        to: Option<chrono::DateTime<chrono::Utc>>,
        /// Only rows with id >= this (in the id column's type order).
        #[arg(long, value_name = "ID")]
        from_id: Option<String>,
        /// Only rows with id <= this.
        #[arg(long, value_name = "ID")]
        to_id: Option<String>,
        /// Only this aggregate type.
        #[arg(long)]
        aggregate_type: Option<String>,
        /// Only this aggregate id.
        #[arg(long)]
        aggregate_id: Option<String>,
        /// Only rows written by transactions with this xid or a newer one: the gap a
        /// lost slot leaves, as outboxd names it when it refuses to start.
        #[arg(long, value_name = "XID")]
        since_xid: Option<u64>,
        /// Prepend this to the subject/topic (e.g. `replay.`); a stream or topic must
        /// capture the result.
        #[arg(long, value_name = "PREFIX")]
        destination_prefix: Option<String>,
        /// Count and show what would be sent; send nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the SQL in two parts: what the table owner runs (table, publication, the
    /// relay's least-privilege role and its grants) and what the relay role does (the
    /// slot); with --apply, create table, publication and slot as postgres.url's role
    /// (never the role or grants: they need a superuser and a password you choose).
    Setup {
        #[command(flatten)]
        config: ConfigArg,
        /// Execute the SQL instead of printing it (idempotent).
        #[arg(long)]
        apply: bool,
    },
}

/// mimalloc instead of glibc's malloc: the relay allocates a few dozen small,
/// short-lived objects per event (row fields, the CloudEvent, headers), and glibc's
/// allocator was ~30 % of the drain's instructions (README, design notes).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (Command::Run { config: c, .. }
    | Command::Check { config: c, .. }
    | Command::Replay { config: c, .. }
    | Command::Setup { config: c, .. }) = &cli.command;
    // Read before the config so that a config error can say why (a URL in
    // OUTBOXD_POSTGRES_URL is "missing"); logged once logging runs.
    let unused_env = outboxd::config::unused_env_vars();
    let cfg = match outboxd::commands::load_config(c.config.as_deref()) {
        Ok(mut cfg) => {
            if let Command::Run {
                allow_new_slot,
                resync_table,
                ..
            } = cli.command
            {
                cfg.postgres.allow_new_slot |= allow_new_slot;
                cfg.postgres.resync_table |= resync_table;
            }
            cfg
        }
        Err(e) => {
            for u in &unused_env {
                eprintln!("outboxd: warning: {u}");
            }
            eprintln!("outboxd: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_logging(&cfg);
    for u in &unused_env {
        tracing::warn!(variable = %u.name, intended = u.intended.as_deref(), "{u}");
    }
    // A panic message may quote an error that quotes a URL: print it (and log it)
    // with user information redacted, never as the default hook would.
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_string());
        let message = outboxd::config::redact_userinfo(&message);
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(%location, "panic: {message}");
        eprintln!("outboxd: panicked at {location}: {message}");
    }));
    // Both of rustls's crypto back-ends are compiled in (async-nats enables ring,
    // pgwire-replication aws-lc-rs), so rustls cannot choose one by itself and would
    // panic at the first TLS handshake. aws-lc-rs is rustls's own default. An error
    // only means a provider is installed already.
    let _ = async_nats::rustls::crypto::aws_lc_rs::default_provider().install_default();
    // One thread: the relay is a single loop that talks to two sockets, and every
    // event crosses between the loop and the broker client. On a multi-thread runtime
    // each crossing is a cross-thread wake-up; measured on 100k events, the
    // current-thread runtime uses half the CPU (1.15 s vs 2.5 s) and less memory,
    // and leaves the other cores to Postgres and the broker next to it.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outboxd: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run { .. } => run(cfg).await,
            Command::Check {
                aggregate_types, ..
            } => check(&cfg, &aggregate_types).await,
            Command::Replay {
                from,
                to,
                from_id,
                to_id,
                aggregate_type,
                aggregate_id,
                since_xid,
                destination_prefix,
                dry_run,
                ..
            } => {
                let sel = outboxd::commands::replay::Selection {
                    from_time: from,
                    to_time: to,
                    from_id,
                    to_id,
                    aggregate_type,
                    aggregate_id,
                    since_xid,
                };
                replay(cfg, &sel, destination_prefix, dry_run).await
            }
            Command::Setup { apply, .. } => setup(&cfg, apply).await,
        }
    });
    // Dropping the runtime would wait for every blocking task, however long it takes.
    runtime.shutdown_timeout(RELEASE_TIMEOUT);
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "outboxd stopped");
            eprintln!("outboxd: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn init_logging(cfg: &Config) {
    use tracing_subscriber::EnvFilter;
    // pgwire-replication logs every failed session at ERROR, including the routine
    // "slot is active" of a standby; outboxd reports the same errors itself, once and
    // classified, so the library is quiet unless asked for by name.
    // async-nats likewise logs a refused login at ERROR without the fix; outboxd's own
    // line names the key to change.
    let mut level = cfg.log.level.clone();
    for quiet in ["pgwire_replication", "async_nats"] {
        if !level.contains(quiet) {
            level.push_str(&format!(",{quiet}=off"));
        }
    }
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr: stdout belongs to the stdout sink.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cfg.log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(cfg: Config) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    tracing::info!(version = env!("CARGO_PKG_VERSION"), sink = ?cfg.sink.kind, slot = %cfg.postgres.slot, http = %cfg.http.listen, "outboxd starting");
    let telemetry = Arc::new(Telemetry {
        metrics: Metrics::new()?,
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
    outboxd::http::raise_fd_limit();
    // The endpoints keep answering while the relay drains; they stop after it.
    let http_stop = CancellationToken::new();
    let http = outboxd::http::bind(&cfg.http, telemetry.clone(), http_stop.clone()).await?;
    let result = outboxd::relay::run(Arc::new(cfg), telemetry, shutdown).await;
    http_stop.cancel();
    if tokio::time::timeout(HTTP_STOP_TIMEOUT, http).await.is_err() {
        tracing::warn!("http connections still open at exit; closed without waiting");
    }
    let stopped = result.context("relay failed")?;
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

/// Cancels `shutdown` on SIGTERM or SIGINT.
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
    tracing::info!(signal = name, "shutting down: draining in-flight events");
    shutdown.cancel();
}

async fn check(cfg: &Config, aggregate_types: &[String]) -> anyhow::Result<ExitCode> {
    let checks = outboxd::commands::check::run(cfg, aggregate_types).await;
    print!("{}", outboxd::commands::check::render(&checks));
    Ok(if checks.iter().all(|c| c.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILURE)
    })
}

async fn replay(
    mut cfg: Config,
    sel: &outboxd::commands::replay::Selection,
    prefix: Option<String>,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    if let Some(p) = prefix {
        cfg.nats.subject = format!("{p}{}", cfg.nats.subject);
        cfg.kafka.topic = format!("{p}{}", cfg.kafka.topic);
    }
    let s = outboxd::commands::replay::run(&cfg, sel, dry_run)
        .await
        .context("replay failed")?;
    let verb = if dry_run {
        "would publish"
    } else {
        "published"
    };
    println!(
        "replay: {} rows matched, {verb} {}, {} invalid (skipped, listed above)",
        s.matched, s.published, s.invalid
    );
    Ok(if s.invalid == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILURE)
    })
}

async fn setup(cfg: &Config, apply: bool) -> anyhow::Result<ExitCode> {
    let sql = outboxd::commands::check::setup_sql(cfg);
    if !apply {
        print!("{sql}");
        return Ok(ExitCode::SUCCESS);
    }
    let control = outboxd::source::control::Control::connect(cfg)
        .await
        .context("connecting to postgres")?;
    let (schema, _) = outboxd::config::split_table(&cfg.postgres.table);
    control
        .apply(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};\n{}",
            outboxd::source::control::create_table_sql(cfg)
        ))
        .await
        .context("creating the outbox table")?;
    if !cfg.postgres.message_prefix.is_empty() {
        control
            .apply(&outboxd::source::message::emit_function_sql(
                schema,
                &cfg.postgres.message_prefix,
            ))
            .await
            .context("creating outbox_emit()")?;
    }
    let mut forced = cfg.clone();
    forced.postgres.create_publication = true;
    forced.postgres.create_slot = true;
    control
        .ensure_publication(&forced)
        .await
        .context("creating the publication")?;
    if cfg.postgres.initial_snapshot && control.slot(&cfg.postgres.slot).await?.is_none() {
        // The snapshot is taken by the instance that creates the slot: leave that to
        // `outboxd run`, or the rows already in the table would never be published.
        println!(
            "applied: table {}, publication {}; slot {} left to `outboxd run` (postgres.initial_snapshot)",
            cfg.postgres.table, cfg.postgres.publication, cfg.postgres.slot
        );
        return Ok(ExitCode::SUCCESS);
    }
    let slot = control
        .ensure_slot(&forced)
        .await
        .context("creating the slot")?;
    println!(
        "applied: table {}, publication {}, slot {} at {}",
        cfg.postgres.table,
        cfg.postgres.publication,
        cfg.postgres.slot,
        outboxd::lsn::lsn_text(slot.confirmed_flush_lsn)
    );
    Ok(ExitCode::SUCCESS)
}
