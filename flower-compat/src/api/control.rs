//! Flower's `api/control.py`: remote-control commands to one worker (shutdown, pool restart/grow/
//! shrink/autoscale, add/cancel consumer, time and rate limits) and task revocation, each answered with
//! Flower's messages: 404 for an unknown worker, 403 when the worker refuses (or in read-only mode).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde_json::{json, Value};

use super::base::{
    arg_bool, arg_float, arg_int, err, guard_read_only, json_response, required, ApiError,
    ApiResult, AppState, Params,
};
use crate::events::cast;
use crate::shared::Shared;

fn guard_worker(shared: &Shared, name: &str) -> Result<(), ApiError> {
    if name.is_empty() || !shared.inspector.contains(name) {
        return Err(err(
            StatusCode::NOT_FOUND,
            format!("Unknown worker '{name}'"),
        ));
    }
    Ok(())
}

pub(super) async fn worker_shutdown(
    State(shared): AppState,
    Path(name): Path<String>,
) -> ApiResult {
    guard_read_only(&shared)?;
    guard_worker(&shared, &name)?;
    tracing::info!("shutting down {name}");
    cast(
        shared.broker.as_ref(),
        "shutdown",
        json!({}),
        Some(vec![name]),
    )
    .await
    .map_err(|e| err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(json_response(json!({"message": "Shutting down!"})))
}

/// Sends `method` to one worker and returns its reply's `ok` text, or the 403 Flower answers.
async fn control(
    shared: &Shared,
    name: &str,
    method: &str,
    arguments: Value,
    failure: impl FnOnce(&str) -> String,
) -> Result<String, ApiError> {
    let replies = shared
        .inspector
        .call(
            shared.broker.as_ref(),
            method,
            arguments,
            vec![name.to_string()],
        )
        .await
        .map_err(|e| err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let reply = replies
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, r)| r.clone());
    if let Some(ok) = reply.as_ref().and_then(|r| r.get("ok")) {
        return Ok(ok
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| ok.to_string()));
    }
    let reason = reply
        .as_ref()
        .and_then(|r| r.get("error"))
        .map(|e| {
            e.as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| e.to_string())
        })
        .unwrap_or_else(|| "Unknown reason".into());
    tracing::error!("{method} on {name}: {replies:?}");
    Err(err(StatusCode::FORBIDDEN, failure(&reason)))
}

pub(super) async fn pool_restart(State(shared): AppState, Path(name): Path<String>) -> ApiResult {
    guard_read_only(&shared)?;
    guard_worker(&shared, &name)?;
    control(
        &shared,
        &name,
        "pool_restart",
        json!({"reload": false}),
        |r| format!("Failed to restart the '{name}' pool: {r}"),
    )
    .await?;
    Ok(json_response(
        json!({"message": format!("Restarting '{name}' worker's pool")}),
    ))
}

pub(super) async fn pool_grow(
    State(shared): AppState,
    Path(name): Path<String>,
    Query(q): Params,
) -> ApiResult {
    pool_resize(&shared, &name, &q, "pool_grow", ("grow", "Growing")).await
}

pub(super) async fn pool_shrink(
    State(shared): AppState,
    Path(name): Path<String>,
    Query(q): Params,
) -> ApiResult {
    pool_resize(&shared, &name, &q, "pool_shrink", ("shrink", "Shrinking")).await
}

/// `pool_grow` / `pool_shrink` by `?n=` (default 1), with Flower's messages.
async fn pool_resize(
    shared: &Arc<Shared>,
    name: &str,
    q: &HashMap<String, String>,
    method: &str,
    (verb, gerund): (&str, &str),
) -> ApiResult {
    guard_read_only(shared)?;
    guard_worker(shared, name)?;
    let n = arg_int(q, "n")?.unwrap_or(1);
    control(shared, name, method, json!({"n": n}), |r| {
        format!("Failed to {verb} '{name}' worker's pool: {r}")
    })
    .await?;
    Ok(json_response(
        json!({"message": format!("{gerund} '{name}' worker's pool by {n}")}),
    ))
}

pub(super) async fn pool_autoscale(
    State(shared): AppState,
    Path(name): Path<String>,
    Query(q): Params,
) -> ApiResult {
    guard_read_only(&shared)?;
    guard_worker(&shared, &name)?;
    required(&q, "min")?;
    required(&q, "max")?;
    let min = arg_int(&q, "min")?.unwrap_or(0);
    let max = arg_int(&q, "max")?.unwrap_or(0);
    control(
        &shared,
        &name,
        "autoscale",
        json!({"min": min, "max": max}),
        |r| format!("Failed to autoscale '{name}' worker: {r}"),
    )
    .await?;
    Ok(json_response(
        json!({"message": format!("Autoscaling '{name}' worker (min={min}, max={max})")}),
    ))
}

pub(super) async fn add_consumer(
    State(shared): AppState,
    Path(name): Path<String>,
    Query(q): Params,
) -> ApiResult {
    consumer(
        &shared,
        &name,
        &q,
        "add_consumer",
        "add '{queue}' consumer to",
    )
    .await
}

pub(super) async fn cancel_consumer(
    State(shared): AppState,
    Path(name): Path<String>,
    Query(q): Params,
) -> ApiResult {
    consumer(
        &shared,
        &name,
        &q,
        "cancel_consumer",
        "cancel '{queue}' consumer from",
    )
    .await
}

/// `add_consumer` / `cancel_consumer` for `?queue=`; `what` is Flower's failure wording with a
/// `{queue}` placeholder.
async fn consumer(
    shared: &Arc<Shared>,
    name: &str,
    q: &HashMap<String, String>,
    method: &str,
    what: &str,
) -> ApiResult {
    guard_read_only(shared)?;
    guard_worker(shared, name)?;
    let queue = required(q, "queue")?.to_string();
    let what = what.replace("{queue}", &queue);
    let ok = control(shared, name, method, json!({"queue": queue}), |r| {
        format!("Failed to {what} '{name}' worker: {r}")
    })
    .await?;
    Ok(json_response(json!({"message": ok})))
}

pub(super) async fn task_timeout(
    State(shared): AppState,
    Path(name): Path<String>,
    Query(q): Params,
) -> ApiResult {
    guard_read_only(&shared)?;
    let worker = required(&q, "workername")?.to_string();
    let hard = arg_float(&q, "hard")?;
    let soft = arg_float(&q, "soft")?;
    guard_worker(&shared, &worker)?;
    let ok = control(
        &shared,
        &worker,
        "time_limit",
        json!({"task_name": name, "hard": hard, "soft": soft}),
        |r| format!("Failed to set timeouts: '{r}'"),
    )
    .await?;
    Ok(json_response(json!({"message": ok})))
}

pub(super) async fn task_rate_limit(
    State(shared): AppState,
    Path(name): Path<String>,
    Query(q): Params,
) -> ApiResult {
    guard_read_only(&shared)?;
    let worker = required(&q, "workername")?.to_string();
    let rate = required(&q, "ratelimit")?.to_string();
    guard_worker(&shared, &worker)?;
    let ok = control(
        &shared,
        &worker,
        "rate_limit",
        json!({"task_name": name, "rate_limit": rate}),
        |r| format!("Failed to set rate limit: '{r}'"),
    )
    .await?;
    Ok(json_response(json!({"message": ok})))
}

pub(super) async fn task_revoke(
    State(shared): AppState,
    Path(id): Path<String>,
    Query(q): Params,
) -> ApiResult {
    guard_read_only(&shared)?;
    let terminate = arg_bool(&q, "terminate")?;
    let signal = q.get("signal").cloned().unwrap_or_else(|| "SIGTERM".into());
    tracing::info!("revoking task {id}");
    cast(
        shared.broker.as_ref(),
        "revoke",
        json!({"task_id": id, "terminate": terminate, "signal": signal}),
        None,
    )
    .await
    .map_err(|e| err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(json_response(json!({"message": format!("Revoked '{id}'")})))
}
