//! `celeriac worker`: flags (Celery's names where they exist), configuration layering, signals.

use std::path::PathBuf;

use anyhow::Context;
use celeriac_dagster::config::{DagsterConfig, DagsterSettings, JobRetention, LauncherKind};
use celeriac_wire::broker::redis::PriorityOrder;
use celeriac_worker::config::{AckPolicy, Settings, WorkerConfig};
use celeriac_worker::runtime::Worker;
use clap::Args;

#[derive(Args, Debug, Default, PartialEq)]
pub struct WorkerArgs {
    /// celeriac config file (YAML, TOML or JSON) with Celery setting names.
    #[arg(long = "config", env = "CELERIAC_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Dagster's celery config YAML (`execution.celery.{broker,backend,config_source}`), as the Dagster
    /// Helm chart mounts it.
    #[arg(short = 'y', long = "dagster-celery-config")]
    pub(crate) dagster_celery_config: Option<PathBuf>,
    /// Broker URL (amqp://, pyamqp://, redis://, …).
    #[arg(short = 'b', long = "broker")]
    pub(crate) broker: Option<String>,
    /// Result backend URL (rpc://, redis://).
    #[arg(long = "result-backend")]
    pub(crate) result_backend: Option<String>,
    /// Queues to consume, comma-separated or repeated.
    #[arg(short = 'Q', long = "queues", value_delimiter = ',')]
    pub(crate) queues: Vec<String>,
    /// Default maximum of steps running at once per queue.
    #[arg(short = 'c', long = "concurrency")]
    pub(crate) concurrency: Option<usize>,
    /// Per-queue limit, `queue=N` (repeatable).
    #[arg(long = "queue-concurrency", value_parser = parse_pair::<usize>)]
    pub(crate) queue_concurrency: Vec<(String, usize)>,
    /// When messages are acknowledged by default: `late` (after the result is stored) or `early`.
    #[arg(long = "ack", value_parser = parse_ack)]
    pub(crate) ack: Option<AckPolicy>,
    /// Per-queue ack policy, `queue=late|early` (repeatable).
    #[arg(long = "queue-ack", value_parser = parse_pair::<String>)]
    pub(crate) queue_ack: Vec<(String, String)>,
    /// Node name; `%h` expands to the host name. Default `celeriac-<6 hex>@<host>`.
    #[arg(short = 'n', long = "hostname")]
    pub(crate) hostname: Option<String>,
    /// Redis only: which priority bucket is served first, `kombu` (0 first) or `dagster` (9 first).
    #[arg(long = "redis-priority-order", value_parser = parse_order)]
    pub(crate) redis_priority_order: Option<PriorityOrder>,
    /// Redis only: seconds before an unacknowledged message of a dead worker is restored.
    #[arg(long = "visibility-timeout")]
    pub(crate) visibility_timeout: Option<f64>,
    /// Seconds a warm shutdown waits for running steps before handing them back to the broker.
    #[arg(long = "shutdown-grace")]
    pub(crate) shutdown_grace: Option<f64>,
    /// Send task events (Celery's `-E` / `worker_send_task_events`); worker events are always sent.
    #[arg(short = 'E', long = "task-events")]
    pub(crate) task_events: bool,
    /// Store STARTED results (Celery's `task_track_started`).
    #[arg(long = "track-started")]
    pub(crate) track_started: bool,
    /// Address of the HTTP port serving /metrics, /healthz and /readyz (port 0 picks a free one).
    /// Default `0.0.0.0:9808`.
    #[arg(long = "http-addr", env = "CELERIAC_HTTP_ADDR")]
    pub(crate) http_addr: Option<std::net::SocketAddr>,
    /// Where steps run: `kubernetes` (a Job per step), `process` (local subprocess), or `auto`
    /// (default: Kubernetes when in a cluster or KUBECONFIG is set).
    #[arg(long = "launcher", value_parser = parse_launcher)]
    pub(crate) launcher: Option<LauncherKind>,
    /// Kubernetes: `delete` finished step Jobs once their logs are read (default) or `keep` them
    /// until their ttlSecondsAfterFinished.
    #[arg(long = "job-retention", value_parser = parse_retention)]
    pub(crate) job_retention: Option<JobRetention>,
    /// Process launcher: the directory where running steps are recorded, so a worker restarted on the
    /// same host adopts them (`none`: steps die with their worker). Default
    /// `$XDG_STATE_HOME/celeriac/steps`, else `.celeriac/steps` in the working directory.
    #[arg(long = "step-state-dir")]
    pub(crate) step_state_dir: Option<String>,
}

fn parse_launcher(s: &str) -> Result<LauncherKind, String> {
    match s {
        "kubernetes" | "k8s" => Ok(LauncherKind::Kubernetes),
        "process" => Ok(LauncherKind::Process),
        "auto" => Ok(LauncherKind::Auto),
        other => Err(format!(
            "launcher must be kubernetes, process or auto, got {other:?}"
        )),
    }
}

fn parse_retention(s: &str) -> Result<JobRetention, String> {
    match s {
        "delete" => Ok(JobRetention::Delete),
        "keep" => Ok(JobRetention::Keep),
        other => Err(format!(
            "job retention must be delete or keep, got {other:?}"
        )),
    }
}

fn parse_pair<T: std::str::FromStr>(s: &str) -> Result<(String, T), String>
where
    T::Err: std::fmt::Display,
{
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected queue=value, got {s:?}"))?;
    let v = v.parse::<T>().map_err(|e| format!("{s:?}: {e}"))?;
    Ok((k.trim().to_string(), v))
}

fn parse_ack(s: &str) -> Result<AckPolicy, String> {
    match s {
        "late" => Ok(AckPolicy::Late),
        "early" => Ok(AckPolicy::Early),
        other => Err(format!("ack policy must be late or early, got {other:?}")),
    }
}

fn parse_order(s: &str) -> Result<PriorityOrder, String> {
    s.parse()
}

impl WorkerArgs {
    /// Layers every configuration source (see `celeriac_worker::config`) for the worker and for the
    /// Dagster step task it serves (`celeriac_dagster::config`), each from the same sources.
    fn settings(&self) -> anyhow::Result<(Settings, DagsterSettings)> {
        let mut settings = Settings::default();
        let mut dagster = DagsterSettings::default();
        if let Some(y) = &self.dagster_celery_config {
            settings = settings.merge(Settings::from_dagster_celery_yaml(y)?);
            dagster = dagster.merge(DagsterSettings::from_dagster_celery_yaml(y)?);
        }
        let file = self.config.as_deref();
        settings = settings.merge(Settings::from_file_and_env(file)?);
        dagster = dagster.merge(DagsterSettings::from_file_and_env(file)?);
        settings = settings.merge(Settings::from_dagster_env());
        let mut flags = Settings {
            broker_url: self.broker.clone(),
            result_backend: self.result_backend.clone(),
            hostname: self.hostname.clone(),
            queues: self.queues.clone(),
            worker_concurrency: self.concurrency,
            queue_concurrency: self.queue_concurrency.iter().cloned().collect(),
            task_acks_late: self.ack.map(|a| a == AckPolicy::Late),
            task_track_started: self.track_started.then_some(true),
            worker_send_task_events: self.task_events.then_some(true),
            shutdown_grace_seconds: self.shutdown_grace,
            ..Default::default()
        };
        for (q, a) in &self.queue_ack {
            flags
                .queue_ack
                .insert(q.clone(), parse_ack(a).map_err(anyhow::Error::msg)?);
        }
        flags.broker_transport_options.visibility_timeout = self.visibility_timeout;
        flags.broker_transport_options.priority_order = self.redis_priority_order;
        let mut dagster_flags = DagsterSettings {
            step_launcher: self.launcher,
            ..Default::default()
        };
        dagster_flags.kubernetes.job_retention = self.job_retention;
        dagster_flags.process.state_dir = self.step_state_dir.clone();
        Ok((settings.merge(flags), dagster.merge(dagster_flags)))
    }
}

/// Validates both sides' settings and fills their defaults.
fn resolve(
    (settings, dagster): (Settings, DagsterSettings),
) -> anyhow::Result<(WorkerConfig, DagsterConfig)> {
    Ok((settings.resolve()?, dagster.resolve()?))
}

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let (config, dagster) = resolve(args.settings()?).context("invalid worker configuration")?;
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    // An unreachable broker or backend at start-up is retried (with a clear log line each time), like
    // Celery's `broker_connection_retry_on_startup`, so a worker started before its broker just waits.
    let (broker, backend) = {
        let mut backoff = celeriac_wire::backoff::Backoff::new(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(30),
        );
        loop {
            let delay = backoff.next_delay();
            let attempt = async {
                let broker = celeriac_worker::connect::broker(&config).await?;
                let backend = celeriac_worker::connect::backend(&config, broker.clone()).await?;
                anyhow::Ok((broker, backend))
            };
            match attempt.await {
                Ok(pair) => break pair,
                Err(e) => tracing::error!("{e:#}; retrying in {delay:?}"),
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = &mut shutdown => return Ok(()),
            }
        }
    };
    let registry = celeriac_dagster::app::registry(&dagster).context("setting up tasks")?;
    let worker = Worker::start(config, registry, broker, backend);
    let http_stop = celeriac_worker::CancellationToken::new();
    let http_addr = args
        .http_addr
        .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 9808)));
    let bound = celeriac_worker::http::serve(
        http_addr,
        worker.metrics(),
        worker.state(),
        http_stop.clone(),
    )
    .await
    .with_context(|| format!("binding the HTTP port {http_addr}"))?;
    tracing::info!(%bound, "HTTP listening: /metrics /healthz /readyz");
    worker.run_until(shutdown).await;
    http_stop.cancel();
    Ok(())
}

/// Resolves on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            }
        }
        Err(e) => {
            tracing::warn!("cannot listen for SIGTERM ({e}); only Ctrl-C stops the worker");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `dagster-celery status`: pings every worker on the configured broker and prints `->  <node>: OK`
/// per reply (the format the Helm chart's liveness probe greps); fails when nobody answers.
pub async fn status(config: Option<PathBuf>, timeout: f64) -> anyhow::Result<()> {
    let args = WorkerArgs {
        dagster_celery_config: config,
        ..Default::default()
    };
    // The step task's settings are validated too, as `status` always has: a worker with this
    // configuration would refuse to start.
    let (config, _) = resolve(args.settings()?).context("invalid configuration")?;
    let broker = celeriac_worker::connect::broker(&config).await?;
    let replies = celeriac_wire::pidbox::client::call(
        broker.as_ref(),
        "ping",
        serde_json::json!({}),
        None,
        std::time::Duration::from_secs_f64(timeout.max(0.1)),
    )
    .await
    .context("broadcasting ping")?;
    if replies.is_empty() {
        anyhow::bail!("No nodes replied within time constraint.");
    }
    for (node, _) in &replies {
        println!("->  {node}: OK");
    }
    println!(
        "\n{} node{} online.",
        replies.len(),
        if replies.len() == 1 { "" } else { "s" }
    );
    Ok(())
}
