//! The celeriac run coordinator: drives celery-k8s Dagster runs that `CeleriacRunLauncher` (the
//! `dagster-celeriac` plugin in `python/`) hands over, so no run needs a Python run-worker pod.
//!
//! Data path: hand-off row + `NOTIFY` → [`service`] claims the run (lease) → [`run`] drives it with the
//! plan engine (`celeriac_dagster::plan`), publishing step tasks exactly as Python's executor does
//! (`celeriac_dagster::submission`) → [`results`] delivers each step result the moment it lands → the
//! next decision, written atomically by [`store`] with the events Python's run worker would write.
//!
//! [`plans`] keeps rebuilt execution plans for the runs of the same job. [`config`] holds the settings,
//! [`metrics`] and [`http`] the operational surface. [`shared`] is what the service, the drivers and the
//! HTTP surface all hold; it has a module of its own so that none of them imports another to reach it.

pub mod config;
pub mod http;
pub mod metrics;
pub mod plans;
pub mod results;
pub mod run;
pub mod service;
pub mod shared;
pub mod store;

pub use config::{CoordinatorArgs, Settings};

/// Runs `celeriac coordinator` until SIGTERM/SIGINT.
pub async fn main(args: CoordinatorArgs) -> anyhow::Result<()> {
    let settings = Settings::resolve(args)?;
    let stop = tokio_util::sync::CancellationToken::new();
    let signal_stop = stop.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("termination signal: stopping");
        signal_stop.cancel();
    });
    service::run(settings, stop).await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
