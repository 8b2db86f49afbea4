//! The worker's HTTP port: `/metrics` (Prometheus), `/healthz` (process alive), `/readyz` (consuming
//! every configured queue). Kubernetes probes and the ServiceMonitor point here.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::runtime::state::WorkerState;

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    state: Arc<WorkerState>,
}

/// Binds `addr` and serves until `stop` fires. Returns the bound address (port 0 picks a free one).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    state: Arc<WorkerState>,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready_handler))
        .with_state(AppState { metrics, state });
    tokio::spawn(async move {
        let server = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await });
        if let Err(e) = server.await {
            tracing::error!("metrics HTTP server failed: {e}");
        }
    });
    Ok(bound)
}

async fn metrics_handler(State(app): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}

async fn ready_handler(State(app): State<AppState>) -> impl IntoResponse {
    let consuming = app.state.consuming_queues();
    if app.state.is_ready() {
        (
            StatusCode::OK,
            format!("ready: consuming {consuming} queue(s)\n"),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: consuming {consuming} queue(s)\n"),
        )
    }
}
