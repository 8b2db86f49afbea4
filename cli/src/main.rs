//! `celeriac`: one binary, one subcommand per component.
//!
//! * `celeriac worker …` — the Celery worker that runs Dagster steps.
//! * `celeriac coordinator …` — the run coordinator that drives celery-k8s runs (crate
//!   `celeriac-coordinator`).
//! * `celeriac flower …` — Flower's API, metrics and dashboard for the fleet (crate `celeriac-flower`).

mod dagster_celery;
mod worker;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "celeriac",
    version,
    about = "A Celery-protocol worker fleet for Dagster's celery-k8s executor"
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace) or a tracing filter; RUST_LOG overrides it.
    #[arg(short = 'l', long = "loglevel", global = true, default_value = "info")]
    loglevel: String,
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume step tasks and run them.
    Worker(worker::WorkerArgs),
    /// Drive celery-k8s Dagster runs handed over by CeleriacRunLauncher (no Python run worker).
    Coordinator(celeriac_coordinator::CoordinatorArgs),
    /// Flower-compatible API, metrics and live dashboard, with persistent task history.
    Flower(celeriac_flower::FlowerArgs),
}

/// Stack of every thread the process starts (`RUST_MIN_STACK`, unless already set): lapin parses an AMQP
/// header table recursively on its own thread, and a 128 KiB frame can nest 20,000 tables — far past
/// the default 2 MiB (a hostile publisher could crash the worker with one message, again at each
/// redelivery). Only the pages a thread touches are resident.
const THREAD_STACK: &str = "67108864";

/// With the `dhat-heap` feature every allocation is recorded (see cli/Cargo.toml).
#[cfg(feature = "dhat-heap")]
#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn main() -> std::process::ExitCode {
    #[cfg(feature = "dhat-heap")]
    let _profiler = dhat::Profiler::new_heap();
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        // Before any thread exists: the value is read once, at the first spawn.
        std::env::set_var("RUST_MIN_STACK", THREAD_STACK);
    }
    let argv: Vec<String> = std::env::args().collect();
    let program = argv
        .first()
        .map(|a| a.rsplit('/').next().unwrap_or(a).to_string())
        .unwrap_or_default();
    if program == "dagster-celery" {
        return dagster_celery_main(&argv[1..]);
    }
    let cli = Cli::parse();
    init_tracing(&cli.loglevel, &cli.log_format);
    block_on("celeriac", async {
        match cli.command {
            Command::Worker(args) => worker::run(args).await,
            Command::Coordinator(args) => celeriac_coordinator::main(args).await,
            Command::Flower(args) => Ok(celeriac_flower::run(args).await?),
        }
    })
}

/// Runs `fut` on a multi-threaded runtime and turns its outcome into an exit code with a clear message.
fn block_on(
    program: &str,
    fut: impl std::future::Future<Output = anyhow::Result<()>>,
) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{program}: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("{program}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `dagster-celery …` as the Dagster Helm chart invokes it (see [`dagster_celery`]).
fn dagster_celery_main(args: &[String]) -> std::process::ExitCode {
    init_tracing("info", "text");
    let command = match dagster_celery::parse(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    block_on("dagster-celery", async {
        match command {
            dagster_celery::DagsterCelery::Worker(args) => worker::run(*args).await,
            dagster_celery::DagsterCelery::Status { config, timeout } => {
                worker::status(config, timeout).await
            }
        }
    })
}

fn init_tracing(level: &str, format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level.to_lowercase()))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: log files and collectors get plain `key=value` text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
