//! flower-compat (`celeriac flower`): Flower 2.2's REST API, `/metrics` and a live dashboard for a Celery
//! fleet (Python workers and celeriac workers alike), with task history that survives restarts.
//!
//! Modules, one concept each: [`events`] (the `celeryev` consumer) feeds [`state`] (workers and tasks
//! merged as `celery.events.state` does, bounded), which [`store`] persists (Redis or PostgreSQL);
//! [`inspector`] asks workers for details over remote control; [`queues`] measures queue lengths;
//! [`results`] sends tasks and reads results; [`dagster`] extracts Dagster context; [`series`] makes
//! the dashboard's chart series (and samples queues for them); [`timeline`] lays out a Dagster run's
//! steps on the fleet, with [`eventlog`] reading the run's step events from Dagster's database;
//! [`api`] serves Flower's routes, [`dashboard`] the web page, [`metrics`] `/metrics`, [`auth`] basic
//! auth.

pub mod api;
pub mod auth;
pub mod config;
pub mod dagster;
pub mod dashboard;
pub mod eventlog;
pub mod events;
pub mod inspector;
pub mod metrics;
pub mod queues;
pub mod results;
pub mod samples;
pub mod search;
pub mod series;
pub mod state;
pub mod store;
pub mod timeline;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use celeriac_wire::broker::Broker;
use celeriac_wire::events::now_epoch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::FlowerArgs;

use crate::eventlog::EventLog;
use crate::inspector::Inspector;
use crate::metrics::FlowerMetrics;
use crate::queues::QueueMeter;
use crate::results::ResultReader;
use crate::samples::QueueSamples;
use crate::state::EventsState;
use crate::store::HistoryStore;

#[derive(Debug, thiserror::Error)]
pub enum FlowerError {
    #[error(transparent)]
    Broker(#[from] celeriac_wire::broker::BrokerError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Results(#[from] results::ResultError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP server: {0}")]
    Serve(std::io::Error),
}

/// Everything the HTTP handlers and background loops share.
pub struct Shared {
    pub config: FlowerArgs,
    pub state: RwLock<EventsState>,
    pub metrics: FlowerMetrics,
    pub broker: Arc<dyn Broker>,
    pub inspector: Inspector,
    pub results: ResultReader,
    pub queues: QueueMeter,
    pub history_description: Option<String>,
    /// Queue measurements for the charts.
    pub samples: RwLock<QueueSamples>,
    /// The Dagster event log, when `--dagster-db` is given.
    pub event_log: Option<EventLog>,
}

/// The full application router (API, metrics, dashboard, auth), mounted under `--url-prefix`.
pub fn app(shared: Arc<Shared>) -> axum::Router {
    let inner = api::router(shared.clone()).merge(dashboard::router(shared.clone()));
    let prefix = shared.config.prefix();
    let routed = if prefix.is_empty() {
        inner
    } else {
        // `/prefix` and `/prefix/` both open the dashboard.
        axum::Router::new().nest(&prefix, inner).merge(
            axum::Router::new()
                .route(&format!("{prefix}/"), axum::routing::get(dashboard::index))
                .with_state(shared.clone()),
        )
    };
    routed.layer(axum::middleware::from_fn_with_state(
        shared,
        auth::require_auth,
    ))
}

fn write_state(shared: &Shared) -> std::sync::RwLockWriteGuard<'_, EventsState> {
    match shared.state.write() {
        Ok(s) => s,
        Err(p) => p.into_inner(),
    }
}

/// Writes changed tasks to the store; on failure they stay dirty for the next round.
async fn flush(shared: &Shared, store: &dyn HistoryStore) {
    let dirty = write_state(shared).take_dirty();
    if dirty.is_empty() {
        return;
    }
    if let Err(e) = store.save(&dirty).await {
        warn!("saving {} tasks to the history: {e}", dirty.len());
        shared.metrics.history_write_errors.inc();
        write_state(shared).mark_dirty(dirty.into_iter().map(|t| t.uuid));
    }
}

/// Once a second: age eviction in memory and the history write-behind; once a minute: store pruning.
async fn housekeeping(
    shared: Arc<Shared>,
    store: Option<Arc<dyn HistoryStore>>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        let stopping = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tick.tick() => false,
        };
        let cutoff = now_epoch() - shared.config.max_age.as_secs_f64();
        let count = {
            let mut st = write_state(&shared);
            st.evict_older_than(cutoff);
            st.task_count()
        };
        shared.metrics.tasks_in_memory.set(count as i64);
        if let Some(store) = &store {
            flush(&shared, store.as_ref()).await;
            if n.is_multiple_of(60) || stopping {
                match store.prune(shared.config.max_tasks, cutoff).await {
                    Ok(0) => {}
                    Ok(k) => info!("pruned {k} tasks from the history"),
                    Err(e) => warn!("pruning the history: {e}"),
                }
                if let Err(e) = store.prune_samples(cutoff).await {
                    warn!("pruning the queue samples: {e}");
                }
            }
        }
        if stopping {
            return;
        }
        n += 1;
    }
}

/// Runs `celeriac flower` until `stop` fires (or SIGTERM/SIGINT when `stop` is `None`).
pub async fn run(config: FlowerArgs) -> Result<(), FlowerError> {
    let stop = CancellationToken::new();
    let signal_stop = stop.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    warn!("cannot watch SIGTERM: {e}");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        info!("stopping");
        signal_stop.cancel();
    });
    serve(config, stop).await
}

/// Starts everything and serves until `stop`.
pub async fn serve(config: FlowerArgs, stop: CancellationToken) -> Result<(), FlowerError> {
    let metrics = FlowerMetrics::new(&metrics::DEFAULT_BUCKETS)?;
    let broker = events::connect_broker(&config.broker).await?;
    let mut state = EventsState::new(config.max_tasks, Some(metrics.clone()));
    let mut samples = QueueSamples::default();
    let store: Option<Arc<dyn HistoryStore>> = match &config.history_backend {
        Some(url) => {
            let s: Arc<dyn HistoryStore> =
                Arc::from(store::open(url, &config.history_prefix).await?);
            let cutoff = now_epoch() - config.max_age.as_secs_f64();
            let restored = s.load(config.max_tasks, cutoff).await?;
            info!(history = %s.describe(), "restored {} tasks from the history", restored.len());
            state.restore(restored);
            state.track_changes();
            match s.load_samples(cutoff).await {
                Ok(restored) => {
                    info!("restored {} queue samples from the history", restored.len());
                    samples.extend(restored);
                }
                // The charts lose their queue past, nothing else: not a reason to refuse to start.
                Err(e) => warn!("loading the queue samples: {e}"),
            }
            Some(s)
        }
        None => None,
    };
    let results = ResultReader::open(&config.result_backend, broker.clone(), stop.clone()).await?;
    let queues = QueueMeter::for_broker(&config.broker).await;
    let addr_text = format!(
        "{}:{}",
        if config.address.is_empty() {
            "0.0.0.0"
        } else {
            config.address.as_str()
        },
        config.port
    );
    let shared = Arc::new(Shared {
        inspector: Inspector::new(config.inspect_timeout()),
        history_description: store.as_ref().map(|s| s.describe()),
        samples: RwLock::new(samples),
        event_log: config
            .dagster_db
            .as_deref()
            .map(|url| EventLog::new(url, config.dagster_db_password.as_deref())),
        config,
        state: RwLock::new(state),
        metrics,
        broker,
        results,
        queues,
    });
    shared
        .metrics
        .tasks_in_memory
        .set(write_state(&shared).task_count() as i64);

    let listener = tokio::net::TcpListener::bind(&addr_text)
        .await
        .map_err(|source| FlowerError::Listen {
            addr: addr_text.clone(),
            source,
        })?;
    let bound: SocketAddr = listener
        .local_addr()
        .map_err(|source| FlowerError::Listen {
            addr: addr_text.clone(),
            source,
        })?;
    info!(bound = %bound, prefix = %shared.config.prefix(), read_only = shared.config.read_only,
          "flower-compat listening");

    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(events::run(shared.clone(), stop.clone())));
    if !shared.config.no_enable_events {
        tasks.push(tokio::spawn(events::enable_events_loop(
            shared.clone(),
            stop.clone(),
        )));
    }
    tasks.push(tokio::spawn(series::sample_loop(
        shared.clone(),
        store.clone(),
        stop.clone(),
    )));
    let keeper = tokio::spawn(housekeeping(shared.clone(), store.clone(), stop.clone()));
    {
        let shared = shared.clone();
        tokio::spawn(async move {
            shared
                .inspector
                .update(shared.broker.as_ref(), None, false)
                .await;
        });
    }
    let server_stop = stop.clone();
    let server = axum::serve(listener, app(shared.clone()))
        .with_graceful_shutdown(async move { server_stop.cancelled().await });
    let result = server.await.map_err(FlowerError::Serve);
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    // The last write-behind round and prune run before the process exits.
    let _ = keeper.await;
    info!("flower-compat stopped");
    result
}
