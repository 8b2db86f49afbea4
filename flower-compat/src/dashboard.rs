//! The web dashboard: one page (workers, tasks, queues, task detail) that polls the API every second, so
//! a worker coming online or a task finishing shows without a reload. Its assets are compiled into the
//! binary; nothing is loaded from elsewhere, including the charting library (uPlot 1.6.32, MIT, vendored
//! under `assets/vendor/uplot-1.6.32/` with its licence).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::shared::Shared;

const INDEX: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");
const UPLOT_JS: &str = include_str!("../assets/vendor/uplot-1.6.32/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../assets/vendor/uplot-1.6.32/uPlot.min.css");

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/workers", get(index))
        .route("/tasks", get(index))
        .route(
            "/static/app.js",
            get(|| async { asset("application/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/static/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .route(
            "/static/vendor/uPlot.iife.min.js",
            get(|| async { asset("application/javascript; charset=utf-8", UPLOT_JS) }),
        )
        .route(
            "/static/vendor/uPlot.min.css",
            get(|| async { asset("text/css; charset=utf-8", UPLOT_CSS) }),
        )
        .with_state(shared)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

pub async fn index(State(shared): State<Arc<Shared>>) -> Response {
    let page = INDEX.replace("__PREFIX__", &shared.config.prefix());
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'self'; script-src 'self'",
            ),
        ],
        page,
    )
        .into_response()
}
