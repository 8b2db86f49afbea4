//! Flower's queue lengths (`/api/queues/length`) and celeriac's per-queue detail (`/api/queues/detail`:
//! ready, reserved and running), for the workers' queues or those asked for; the detail also sets the
//! `celeriac_flower_queue_messages` gauges.

use axum::extract::{Query, State};
use serde_json::json;

use super::base::{json_response, ApiResult, AppState, Params};
use crate::queues;
use crate::shared::Shared;

fn queue_names(shared: &Shared) -> Vec<String> {
    let names = shared.inspector.active_queue_names();
    if names.is_empty() {
        vec![shared.config.default_queue.clone()]
    } else {
        names
    }
}

pub(super) async fn queue_lengths(State(shared): AppState) -> ApiResult {
    let names = queue_names(&shared);
    Ok(json_response(
        queues::lengths(shared.broker.as_ref(), &names).await,
    ))
}

/// Ready/reserved/running per queue: the workers' queues, or those named by `?queue=a,b`.
pub(super) async fn queue_details(State(shared): AppState, Query(q): Params) -> ApiResult {
    let names = match q.get("queue").filter(|v| !v.is_empty()) {
        Some(list) => list
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        None => queue_names(&shared),
    };
    let details = queues::details(shared.broker.as_ref(), &shared.inspector, &names).await;
    for d in &details {
        for (state, n) in [
            ("ready", d.ready),
            ("reserved", d.reserved),
            ("running", d.running),
        ] {
            shared
                .metrics
                .queue_messages
                .with_label_values(&[d.name.as_str(), state])
                .set(n as f64);
        }
    }
    Ok(json_response(json!(details)))
}
