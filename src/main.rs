//! The `outboxd` binary: command line, logging, panic hook, runtime and exit codes.
//! The commands themselves live in the library (`outboxd::commands`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use outboxd::commands::{self, EXIT_FAILURE};
use outboxd::config::{Config, LogFormat};

/// Exit code for a configuration error (sysexits EX_CONFIG).
const EXIT_CONFIG: u8 = 78;
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
    /// slot) and the broker; print ok/WARN/FAIL with the fix for each; exit 1 on any FAIL.
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
    /// Probe the running relay's /healthz on http.listen; exit 0 when it answers 200.
    /// For a container HEALTHCHECK (the image has no shell or curl).
    Healthcheck {
        #[command(flatten)]
        config: ConfigArg,
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
    | Command::Setup { config: c, .. }
    | Command::Healthcheck { config: c }) = &cli.command;
    // Read before the config so that a config error can say why (a URL in
    // OUTBOXD_POSTGRES_URL is "missing"); logged once logging runs.
    let unused_env = outboxd::config::unused_env_vars();
    // `setup` without --apply connects nowhere: it prints the SQL without a URL.
    let offline = matches!(cli.command, Command::Setup { apply: false, .. });
    let loaded = if offline {
        commands::load_config_offline(c.config.as_deref())
    } else {
        commands::load_config(c.config.as_deref())
    };
    let (cfg, routes) = match loaded {
        Ok((mut cfg, routes)) => {
            if let Command::Run {
                allow_new_slot,
                resync_table,
                ..
            } = cli.command
            {
                cfg.postgres.allow_new_slot |= allow_new_slot;
                cfg.postgres.resync_table |= resync_table;
            }
            (cfg, routes)
        }
        Err(e) => {
            for u in &unused_env {
                eprintln!("outboxd: warning: {u}");
            }
            eprintln!("outboxd: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Only `run` and `replay` log as a service does; the other commands speak to a
    // person: warnings and errors only, as text, whatever log.format says.
    let human = matches!(
        cli.command,
        Command::Check { .. } | Command::Setup { .. } | Command::Healthcheck { .. }
    );
    init_logging(&cfg, human);
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
            Command::Run { .. } => commands::run::run(cfg, routes).await,
            Command::Check {
                aggregate_types, ..
            } => Ok(commands::check::run(&cfg, &routes, &aggregate_types).await),
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
                let sel = commands::replay::Selection {
                    from_time: from,
                    to_time: to,
                    from_id,
                    to_id,
                    aggregate_type,
                    aggregate_id,
                    since_xid,
                };
                commands::replay::run(cfg, &sel, destination_prefix, dry_run).await
            }
            Command::Setup { apply, .. } => commands::setup::run(&cfg, apply).await,
            Command::Healthcheck { .. } => Ok(commands::healthcheck::run(&cfg).await),
        }
    });
    // Dropping the runtime would wait for every blocking task, however long it takes.
    runtime.shutdown_timeout(RELEASE_TIMEOUT);
    match result {
        Ok(code) => code,
        Err(e) => {
            // anyhow prints the cause chain as it always has: `step: cause: cause`.
            let e = anyhow::Error::from(e);
            tracing::error!(error = format!("{e:#}"), "outboxd stopped");
            eprintln!("outboxd: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Logging to stderr: `log.level` and `log.format` for a service; for a `human`
/// command, warnings and errors only, as text without timestamps (server NOTICEs,
/// which tokio-postgres logs at INFO, stay out). Colour only on a terminal.
fn init_logging(cfg: &Config, human: bool) {
    use tracing_subscriber::EnvFilter;
    // pgwire-replication logs every failed session at ERROR, including the routine
    // "slot is active" of a standby; outboxd reports the same errors itself, once and
    // classified, so the library is quiet unless asked for by name.
    // async-nats likewise logs a refused login at ERROR without the fix; outboxd's own
    // line names the key to change.
    let mut level = if human {
        "warn".to_string()
    } else {
        cfg.log.level.clone()
    };
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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match (human, cfg.log.format) {
        (true, _) => builder.without_time().with_target(false).init(),
        (false, LogFormat::Json) => builder.json().flatten_event(true).init(),
        (false, LogFormat::Text) => builder.init(),
    }
}
