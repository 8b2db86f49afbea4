//! The process: [`serve`] restores the history, connects to the broker and the result backend, starts
//! the background loops (events, enabling events, queue sampling, housekeeping) and serves [`app`] until
//! stopped; [`run`] adds SIGTERM/SIGINT. Apart from `lib.rs` so the crate root only names modules, and
//! apart from the handlers so they never see how the process is put together.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use celeriac_wire::events::now_epoch;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::FlowerArgs;
use crate::eventlog::EventLog;
use crate::housekeeping::housekeeping;
use crate::inspector::Inspector;
use crate::metrics::{self, FlowerMetrics};
use crate::results::{self, ResultReader};
use crate::samples::QueueSamples;
use crate::shared::Shared;
use crate::state::EventsState;
use crate::store::{self, HistoryStore};
use crate::{api, auth, dashboard, events, series};

#[derive(Debug, thiserror::Error)]
pub enum FlowerError {
    #[error(transparent)]
    Broker(#[from] celeriac_wire::broker::BrokerError),
    #[error(transparent)]
    Connect(#[from] celeriac_wire::connect::ConnectError),
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

/// Runs `celeriac flower` until SIGTERM or SIGINT.
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
    let broker = celeriac_wire::connect::connect(
        &config.broker,
        celeriac_wire::connect::BrokerOptions {
            connection_name: "celeriac-flower".into(),
            ..Default::default()
        },
    )
    .await?;
    let mut state = EventsState::new(config.max_tasks, Some(metrics.clone()));
    let mut samples = QueueSamples::default();
    let store = open_history(&config, &mut state, &mut samples).await?;
    let results = ResultReader::open(&config.result_backend, broker.clone(), stop.clone()).await?;
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
    });
    shared
        .metrics
        .tasks_in_memory
        .set(shared.write_state().task_count() as i64);

    let (listener, bound) = listen(&shared.config).await?;
    info!(bound = %bound, prefix = %shared.config.prefix(), read_only = shared.config.read_only,
          "flower-compat listening");

    let tasks = spawn_loops(&shared, &store, &stop);
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

/// With `--history-backend`: opens the store and restores its tasks (within `--max-tasks` and
/// `--max-age`) into `state` and its queue samples into `samples`.
async fn open_history(
    config: &FlowerArgs,
    state: &mut EventsState,
    samples: &mut QueueSamples,
) -> Result<Option<Arc<dyn HistoryStore>>, FlowerError> {
    let Some(url) = &config.history_backend else {
        return Ok(None);
    };
    let s: Arc<dyn HistoryStore> = Arc::from(store::open(url, &config.history_prefix).await?);
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
    Ok(Some(s))
}

/// Binds `--address:--port` (all interfaces when the address is empty).
async fn listen(config: &FlowerArgs) -> Result<(TcpListener, SocketAddr), FlowerError> {
    let addr_text = format!(
        "{}:{}",
        if config.address.is_empty() {
            "0.0.0.0"
        } else {
            config.address.as_str()
        },
        config.port
    );
    let listener = TcpListener::bind(&addr_text)
        .await
        .map_err(|source| FlowerError::Listen {
            addr: addr_text.clone(),
            source,
        })?;
    let bound = listener
        .local_addr()
        .map_err(|source| FlowerError::Listen {
            addr: addr_text.clone(),
            source,
        })?;
    Ok((listener, bound))
}

/// The loops that stop with `stop`: the event consumer, the enabling of events (unless
/// `--no-enable-events`) and the queue sampler.
fn spawn_loops(
    shared: &Arc<Shared>,
    store: &Option<Arc<dyn HistoryStore>>,
    stop: &CancellationToken,
) -> Vec<JoinHandle<()>> {
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
    tasks
}
