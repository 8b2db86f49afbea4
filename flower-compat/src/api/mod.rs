//! Flower 2.2's REST API (`flower/api/*.py`) with the same paths, parameters, JSON shapes, status codes
//! and error texts, plus a few `celeriac` extensions the dashboard uses (`/api/queues/detail`,
//! `/api/celeriac/*`: overview, tasks with Dagster context, chart series, run timelines).
//!
//! Split as Flower splits its handlers: `workers`, `control`, `tasks`, `queues`, and `celeriac` for
//! our own; `base` is what they all answer with. The route table stays here, in one piece, as
//! Flower's `urls.py` keeps it.

mod base;
mod celeriac;
mod control;
mod queues;
mod tasks;
mod workers;

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::shared::Shared;

pub use base::ApiError;
pub use tasks::task_query;

/// Flower's routes and celeriac's, each to its handler.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/workers", get(workers::list_workers))
        .route(
            "/api/worker/shutdown/{*name}",
            post(control::worker_shutdown),
        )
        .route(
            "/api/worker/pool/restart/{*name}",
            post(control::pool_restart),
        )
        .route("/api/worker/pool/grow/{*name}", post(control::pool_grow))
        .route(
            "/api/worker/pool/shrink/{*name}",
            post(control::pool_shrink),
        )
        .route(
            "/api/worker/pool/autoscale/{*name}",
            post(control::pool_autoscale),
        )
        .route(
            "/api/worker/queue/add-consumer/{*name}",
            post(control::add_consumer),
        )
        .route(
            "/api/worker/queue/cancel-consumer/{*name}",
            post(control::cancel_consumer),
        )
        .route("/api/tasks", get(tasks::list_tasks))
        .route("/api/task/types", get(tasks::task_types))
        .route("/api/queues/length", get(queues::queue_lengths))
        .route("/api/queues/detail", get(queues::queue_details))
        .route("/api/task/info/", get(tasks::task_info_empty))
        .route("/api/task/info/{*id}", get(tasks::task_info))
        .route("/api/task/apply/{*name}", post(tasks::task_apply))
        .route(
            "/api/task/async-apply/{*name}",
            post(tasks::task_async_apply),
        )
        .route("/api/task/send-task/{*name}", post(tasks::task_send))
        .route("/api/task/result/{*id}", get(tasks::task_result))
        .route("/api/task/abort/{*id}", post(tasks::task_abort))
        .route("/api/task/timeout/{*name}", post(control::task_timeout))
        .route(
            "/api/task/rate-limit/{*name}",
            post(control::task_rate_limit),
        )
        .route("/api/task/revoke/{*id}", post(control::task_revoke))
        .route("/api/celeriac/overview", get(celeriac::overview))
        .route("/api/celeriac/tasks", get(celeriac::celeriac_tasks))
        .route("/api/celeriac/task/{*id}", get(celeriac::celeriac_task))
        .route("/api/celeriac/series/tasks", get(celeriac::series_tasks))
        .route("/api/celeriac/series/queues", get(celeriac::series_queues))
        .route(
            "/api/celeriac/runs/{run_id}/timeline",
            get(celeriac::run_timeline),
        )
        .route("/metrics", get(metrics))
        .route("/healthcheck", get(|| async { "OK" }))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared.metrics.render(),
    )
        .into_response()
}
