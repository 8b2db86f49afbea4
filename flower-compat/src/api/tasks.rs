//! Flower's `api/tasks.py` (less its queue lengths, in `api/queues.rs`): listing and reading tasks
//! from the event state, and sending tasks and reading their results through the broker and the result
//! backend.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde_json::{json, Map, Value};

use super::base::{
    arg_float, arg_int, err, guard_read_only, json_response, ApiError, ApiResult, AppState, Params,
};
use crate::results::{self, SendOptions};
use crate::shared::Shared;
use crate::state::{TaskQuery, SORT_KEYS};

/// `'YYYY-MM-DD HH:MM'` in local time → epoch seconds (`time.mktime`).
fn parse_received(v: Option<&String>) -> Result<Option<f64>, ApiError> {
    let Some(v) = v.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let bad = || {
        err(
            StatusCode::BAD_REQUEST,
            "Invalid received_start or received_end, expected format 'YYYY-MM-DD HH:MM'",
        )
    };
    let naive = chrono::NaiveDateTime::parse_from_str(v, "%Y-%m-%d %H:%M").map_err(|_| bad())?;
    use chrono::TimeZone;
    let local = chrono::Local
        .from_local_datetime(&naive)
        .earliest()
        .ok_or_else(bad)?;
    Ok(Some(local.timestamp() as f64))
}

/// The `/api/tasks` query parameters, validated as Flower does (`limit`/`offset` integers, known `sort_by`).
pub fn task_query(q: &HashMap<String, String>) -> Result<TaskQuery, ApiError> {
    let not_all = |k: &str| {
        q.get(k)
            .filter(|v| v.as_str() != "All" && !v.is_empty())
            .cloned()
    };
    let limit = arg_int(q, "limit")?;
    let offset = arg_int(q, "offset")?.unwrap_or(0).max(0) as usize;
    let sort_by = q.get("sort_by").filter(|s| !s.is_empty()).cloned();
    if let Some(s) = &sort_by {
        if !SORT_KEYS.contains(&s.trim_start_matches('-')) {
            return Err(err(
                StatusCode::BAD_REQUEST,
                format!(
                    "Invalid sort_by '{s}', expected one of {}",
                    SORT_KEYS.join(", ")
                ),
            ));
        }
    }
    Ok(TaskQuery {
        limit: limit.map(|l| l.max(0) as usize),
        offset,
        workername: not_all("workername"),
        taskname: not_all("taskname"),
        state: not_all("state"),
        received_start: parse_received(q.get("received_start"))?,
        received_end: parse_received(q.get("received_end"))?,
        sort_by,
        search: q.get("search").cloned(),
    })
}

pub(super) async fn list_tasks(State(shared): AppState, Query(q): Params) -> ApiResult {
    let query = task_query(&q)?;
    let state = shared.read_state();
    let page = match state.query(&query) {
        Ok(p) => p,
        Err(e) => {
            let mut r = json_response(json!({"error": e.to_string()}));
            *r.status_mut() = StatusCode::BAD_REQUEST;
            return Ok(r);
        }
    };
    let out: Map<String, Value> = page
        .tasks
        .iter()
        .map(|t| (t.uuid.clone(), Value::Object(t.list_entry())))
        .collect();
    Ok(json_response(Value::Object(out)))
}

pub(super) async fn task_types(State(shared): AppState) -> ApiResult {
    let types = shared.read_state().task_types();
    Ok(json_response(json!({"task-types": types})))
}

pub(super) async fn task_info_empty() -> ApiResult {
    Err(err(StatusCode::NOT_FOUND, "Unknown task ''"))
}

pub(super) async fn task_info(State(shared): AppState, Path(id): Path<String>) -> ApiResult {
    let state = shared.read_state();
    match state.task(&id) {
        Some(t) => Ok(json_response(Value::Object(t.as_dict()))),
        None => Err(err(StatusCode::NOT_FOUND, format!("Unknown task '{id}'"))),
    }
}

/// `get_task_args`: the JSON body's `args`, `kwargs` and remaining options.
fn task_args(body: &Bytes) -> Result<(Value, Value, Map<String, Value>), ApiError> {
    let options: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(body).map_err(|e| err(StatusCode::BAD_REQUEST, e.to_string()))?
    };
    let Value::Object(mut options) = options else {
        return Err(err(StatusCode::BAD_REQUEST, "invalid options"));
    };
    let args = options.remove("args").unwrap_or_else(|| json!([]));
    let kwargs = options.remove("kwargs").unwrap_or_else(|| json!({}));
    if !args.is_array() {
        return Err(err(StatusCode::BAD_REQUEST, "args must be an array"));
    }
    Ok((args, kwargs, options))
}

/// The tasks a bare Celery app registers (what Flower's own app knows without `-A`).
const CELERY_BUILTINS: [&str; 9] = [
    "celery.accumulate",
    "celery.backend_cleanup",
    "celery.chain",
    "celery.chord",
    "celery.chord_unlock",
    "celery.chunks",
    "celery.group",
    "celery.map",
    "celery.starmap",
];

/// `apply`'s "unknown task" check. Flower knows the tasks of the app it was started with (`-A`); this
/// service knows the tasks the workers report as registered, plus Celery's built-ins.
fn known_task(shared: &Shared, name: &str) -> bool {
    if CELERY_BUILTINS.contains(&name) {
        return true;
    }
    shared.inspector.snapshot().values().any(|info| {
        info.get("registered")
            .and_then(Value::as_array)
            .is_some_and(|r| {
                r.iter().any(|t| {
                    t.as_str()
                        .is_some_and(|s| s == name || s.starts_with(&format!("{name} ")))
                })
            })
    })
}

async fn publish(
    shared: &Shared,
    name: &str,
    args: Value,
    kwargs: Value,
    options: &Map<String, Value>,
) -> Result<String, ApiError> {
    let opts =
        SendOptions::from_body(options).map_err(|e| err(StatusCode::BAD_REQUEST, e.to_string()))?;
    results::send_task(
        shared.broker.as_ref(),
        &shared.results,
        &shared.config.default_queue,
        name,
        args,
        kwargs,
        opts,
    )
    .await
    .map_err(|e| err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
}

async fn current_state(shared: &Shared, id: &str) -> Result<String, ApiError> {
    let meta = shared
        .results
        .meta(id)
        .await
        .map_err(|e| err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(results::state_of(meta.as_ref()))
}

/// The reply to a task sent without waiting: its id, and its state when a result backend is
/// configured.
async fn sent_reply(shared: &Shared, id: String) -> ApiResult {
    let mut resp = json!({"task-id": &id});
    if shared.results.configured() {
        resp["state"] = json!(current_state(shared, &id).await?);
    }
    Ok(json_response(resp))
}

pub(super) async fn task_apply(
    State(shared): AppState,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    guard_read_only(&shared)?;
    let (args, kwargs, mut options) = task_args(&body)?;
    if !known_task(&shared, &name) {
        return Err(err(StatusCode::NOT_FOUND, format!("Unknown task '{name}'")));
    }
    let timeout = match options.remove("timeout") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_f64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .ok_or_else(|| err(StatusCode::BAD_REQUEST, "Invalid timeout"))?,
        ),
    };
    let id = publish(&shared, &name, args, kwargs, &options).await?;
    let mut resp = Map::new();
    resp.insert("task-id".into(), json!(id));
    let (ready, meta) = shared
        .results
        .wait(&id, timeout.map(|t| Duration::from_secs_f64(t.max(0.0))))
        .await
        .map_err(|e| err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    if ready {
        results::fill_response(&mut resp, meta.as_ref());
        if shared.results.configured() {
            resp.insert("state".into(), json!(results::state_of(meta.as_ref())));
        }
    } else {
        resp.insert("state".into(), json!(results::state_of(meta.as_ref())));
    }
    Ok(json_response(Value::Object(resp)))
}

pub(super) async fn task_async_apply(
    State(shared): AppState,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    send_task(&shared, &name, &body, true).await
}

pub(super) async fn task_send(
    State(shared): AppState,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    send_task(&shared, &name, &body, false).await
}

/// `async-apply` (a task some worker registered: `known_only`) and `send-task` (any name).
async fn send_task(shared: &Shared, name: &str, body: &Bytes, known_only: bool) -> ApiResult {
    guard_read_only(shared)?;
    let (args, kwargs, options) = task_args(body)?;
    if known_only && !known_task(shared, name) {
        return Err(err(StatusCode::NOT_FOUND, format!("Unknown task '{name}'")));
    }
    let id = publish(shared, name, args, kwargs, &options).await?;
    sent_reply(shared, id).await
}

pub(super) async fn task_result(
    State(shared): AppState,
    Path(id): Path<String>,
    Query(q): Params,
) -> ApiResult {
    let timeout = arg_float(&q, "timeout")?;
    if !shared.results.configured() {
        return Err(err(StatusCode::SERVICE_UNAVAILABLE, ""));
    }
    let mut resp = Map::new();
    resp.insert("task-id".into(), json!(id));
    let (ready, meta) = match timeout.filter(|t| *t > 0.0) {
        Some(t) => {
            shared
                .results
                .wait(&id, Some(Duration::from_secs_f64(t)))
                .await
        }
        None => shared.results.wait(&id, Some(Duration::ZERO)).await,
    }
    .map_err(|e| err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    resp.insert("state".into(), json!(results::state_of(meta.as_ref())));
    if ready {
        results::fill_response(&mut resp, meta.as_ref());
    }
    Ok(json_response(Value::Object(resp)))
}

pub(super) async fn task_abort(State(shared): AppState, Path(id): Path<String>) -> ApiResult {
    guard_read_only(&shared)?;
    if !shared.results.configured() {
        return Err(err(StatusCode::SERVICE_UNAVAILABLE, ""));
    }
    shared
        .results
        .abort(&id)
        .await
        .map_err(|e| err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(json_response(json!({"message": format!("Aborted '{id}'")})))
}
