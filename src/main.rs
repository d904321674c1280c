//! The `tollgate` binary: parses the CLI, loads config, sets up tracing and
//! calls into the library. Nothing else lives here.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

/// jemalloc's per-thread caches: fewer instructions a call than glibc's
/// malloc for the dozens of small allocations a proxied call makes.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Meters AI API traffic per tenant: a sidecar reverse proxy"
)]
struct Cli {
    /// Log format; default: JSON when stdout is not a terminal, else pretty.
    #[arg(long, global = true)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Pretty,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// Config file (also from TOLLGATE_CONFIG).
        #[arg(long, env = "TOLLGATE_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file; exit 1 with file:line and the reason on error.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// A fake OpenAI + Anthropic upstream with deterministic usage.
    Mock {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
    },
    /// Mock upstream + proxy + sample traffic from several tenants.
    Demo,
    /// Read a tenant key on stdin, print the digest to put in config.
    HashKey,
    /// Per-tenant, per-model totals from an event file.
    Report {
        #[arg(long)]
        events: PathBuf,
    },
}

fn init_tracing(format: Option<LogFormat>, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let json = match format {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Pretty) => false,
        None => !std::io::stdout().is_terminal(),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init();
    } else {
        builder.init();
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match tollgate::config::load(&config) {
            Ok(p) => {
                println!(
                    "{}: ok ({} upstreams, {} models, {} tenants, {} sinks)",
                    config.display(),
                    p.upstreams.len(),
                    p.models.len(),
                    p.tenants.len(),
                    p.sinks.len()
                );
                Ok(())
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        },
        Command::HashKey => {
            let mut key = String::new();
            std::io::stdin().read_line(&mut key)?;
            let key = key.trim();
            if key.is_empty() {
                bail!("no key on stdin");
            }
            println!("{}", tollgate::config::hash_key(key));
            Ok(())
        }
        Command::Report { events } => {
            let f = std::fs::File::open(&events)
                .with_context(|| format!("cannot open {}", events.display()))?;
            let (totals, bad) = tollgate::report::totals(std::io::BufReader::new(f))?;
            print!("{}", tollgate::report::render(&totals));
            if bad > 0 {
                eprintln!("warning: {bad} lines were not events");
            }
            Ok(())
        }
        Command::Run { config } => {
            init_tracing(cli.log_format, "info");
            let source = tollgate::config::read(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
            let policy = source.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            runtime()?.block_on(run(policy, config, source.sha256))
        }
        Command::Mock { listen } => {
            init_tracing(cli.log_format, "info");
            runtime()?.block_on(async {
                let listener = tokio::net::TcpListener::bind(&listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen}"))?;
                tracing::info!(addr = %listener.local_addr()?, "mock listening");
                tollgate::mock::serve(listener, async { ShutdownSignals::new().recv().await })
                    .await?;
                Ok(())
            })
        }
        Command::Demo => {
            init_tracing(Some(cli.log_format.unwrap_or(LogFormat::Pretty)), "warn");
            Ok(runtime()?.block_on(tollgate::demo::run())?)
        }
    }
}

/// The main runtime runs the acceptors and background work (sinks, the
/// state keeper, reload); proxied connections run on the library's per-core
/// worker threads, so one thread is enough here.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

async fn run(policy: tollgate::config::Policy, config: PathBuf, loaded: [u8; 32]) -> Result<()> {
    let grace = policy.server.shutdown_grace;
    #[cfg(unix)]
    tollgate::server::raise_open_files(policy.server.max_connections);
    let mut running = tollgate::start(policy).await?;
    tracing::info!(proxy = %running.proxy_addr, admin = %running.admin_addr, "listening");
    let watcher = tokio::spawn(tollgate::watch_config(
        running.app.clone(),
        config,
        loaded,
        std::time::Duration::from_secs(1),
    ));
    let mut signals = ShutdownSignals::new();
    signals.recv().await;
    watcher.abort();
    tracing::info!(grace = ?grace, "shutting down: draining in-flight calls");
    running.begin_shutdown();
    tokio::select! {
        _ = running.finished() => {}
        _ = signals.recv() => {
            tracing::warn!("second signal: stopping now; finished events are in the spool");
            running.force();
            running.finished().await;
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// SIGTERM and Ctrl-C (SIGINT), listened for from creation on: one set of
/// listeners for both the first signal and the second, so a second signal
/// sent right after the first is not lost between two listeners.
struct ShutdownSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn new() -> ShutdownSignals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            ShutdownSignals {
                term: signal(SignalKind::terminate()).expect("SIGTERM handler"),
                int: signal(SignalKind::interrupt()).expect("SIGINT handler"),
            }
        }
        #[cfg(not(unix))]
        ShutdownSignals {}
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
