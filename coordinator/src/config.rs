//! `celeriac coordinator` settings: command-line flags, each also read from an environment variable
//! (Dagster's and Celery's names where they exist), and an optional YAML/TOML file with the same keys.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};

/// The coordinator's command line.
#[derive(Debug, Clone, clap::Args)]
pub struct CoordinatorArgs {
    /// A YAML or TOML file with any of the settings below (snake_case keys); flags and env win.
    #[arg(long, env = "CELERIAC_COORDINATOR_CONFIG")]
    pub config: Option<PathBuf>,
    /// The Dagster instance's dagster.yaml: its Postgres storage is where runs, events and the
    /// coordinator's leases live (default `$DAGSTER_HOME/dagster.yaml`).
    #[arg(long, env = "CELERIAC_INSTANCE_CONFIG")]
    pub instance_config: Option<PathBuf>,
    /// Postgres URL of the instance database, instead of reading dagster.yaml.
    #[arg(long, env = "CELERIAC_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Celery broker URL (the one the workers consume).
    #[arg(
        short = 'b',
        long,
        env = "DAGSTER_CELERY_BROKER_URL",
        hide_env_values = true
    )]
    pub broker: Option<String>,
    /// Celery result backend URL (`rpc://` or `redis://…`).
    #[arg(long, env = "DAGSTER_CELERY_BACKEND_URL", hide_env_values = true)]
    pub result_backend: Option<String>,
    /// This replica's name in leases (default: the host name).
    #[arg(long, env = "CELERIAC_COORDINATOR_REPLICA")]
    pub replica: Option<String>,
    /// Seconds after which a replica's unrenewed lease lets another replica take its runs over. Must
    /// not exceed the run launcher's `coordinator_heartbeat_timeout`.
    #[arg(long, env = "CELERIAC_COORDINATOR_LEASE_TIMEOUT")]
    pub lease_timeout: Option<f64>,
    /// Seconds between lease renewals.
    #[arg(long, env = "CELERIAC_COORDINATOR_HEARTBEAT_INTERVAL")]
    pub heartbeat_interval: Option<f64>,
    /// Runs this replica drives at most.
    #[arg(long, env = "CELERIAC_COORDINATOR_MAX_RUNS")]
    pub max_runs: Option<usize>,
    /// Address of `/metrics`, `/healthz`, `/readyz`.
    #[arg(long, env = "CELERIAC_COORDINATOR_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
}

/// Settings with defaults applied and checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database: Database,
    pub broker: String,
    pub result_backend: String,
    pub replica: String,
    pub lease_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub max_runs: usize,
    pub http_addr: SocketAddr,
    /// How often each run's status is checked (cancellation, outside changes).
    pub status_poll: Duration,
    /// How long revoked tasks get to report before their steps count as unknown.
    pub revoke_grace: Duration,
    /// Connections to the instance database.
    pub db_pool: usize,
}

/// Where the instance database is described.
#[derive(Debug, Clone)]
pub enum Database {
    DagsterYaml(PathBuf),
    Url(String),
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    instance_config: Option<PathBuf>,
    database_url: Option<String>,
    broker: Option<String>,
    result_backend: Option<String>,
    replica: Option<String>,
    lease_timeout: Option<f64>,
    heartbeat_interval: Option<f64>,
    max_runs: Option<usize>,
    http_addr: Option<SocketAddr>,
}

fn seconds(name: &str, v: f64) -> anyhow::Result<Duration> {
    if !v.is_finite() || v <= 0.0 {
        bail!("{name} must be a positive number of seconds, got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

impl Settings {
    pub fn resolve(args: CoordinatorArgs) -> anyhow::Result<Settings> {
        let file: FileSettings = match &args.config {
            None => FileSettings::default(),
            Some(path) => config::Config::builder()
                .add_source(config::File::from(path.as_path()))
                .build()
                .and_then(config::Config::try_deserialize)
                .with_context(|| format!("reading {}", path.display()))?,
        };
        let database = match (
            args.database_url.or(file.database_url),
            args.instance_config.or(file.instance_config),
        ) {
            (Some(url), _) => Database::Url(url),
            (None, Some(path)) => Database::DagsterYaml(path),
            (None, None) => {
                let home = std::env::var("DAGSTER_HOME").context(
                    "no instance configured: pass --instance-config, --database-url or set DAGSTER_HOME",
                )?;
                Database::DagsterYaml(PathBuf::from(home).join("dagster.yaml"))
            }
        };
        let broker = args
            .broker
            .or(file.broker)
            .context("no broker: pass -b/--broker or set DAGSTER_CELERY_BROKER_URL")?;
        let result_backend = args
            .result_backend
            .or(file.result_backend)
            .unwrap_or_else(|| "rpc://".into());
        let replica = match args.replica.or(file.replica) {
            Some(r) if !r.trim().is_empty() => r,
            _ => hostname::get()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "celeriac-coordinator".into()),
        };
        let lease_timeout = seconds(
            "lease_timeout",
            args.lease_timeout.or(file.lease_timeout).unwrap_or(60.0),
        )?;
        let heartbeat_interval = seconds(
            "heartbeat_interval",
            args.heartbeat_interval
                .or(file.heartbeat_interval)
                .unwrap_or(5.0),
        )?;
        if heartbeat_interval * 2 > lease_timeout {
            bail!(
                "heartbeat_interval ({:?}) must be at most half of lease_timeout ({:?}), or healthy leases would expire",
                heartbeat_interval,
                lease_timeout
            );
        }
        let max_runs = args.max_runs.or(file.max_runs).unwrap_or(2000);
        if max_runs == 0 {
            bail!("max_runs must be at least 1");
        }
        Ok(Settings {
            database,
            broker,
            result_backend,
            replica,
            lease_timeout,
            heartbeat_interval,
            max_runs,
            http_addr: args
                .http_addr
                .or(file.http_addr)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 9809))),
            status_poll: Duration::from_secs(2),
            revoke_grace: Duration::from_secs(3),
            db_pool: 8,
        })
    }
}
