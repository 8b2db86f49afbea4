//! Flower 2.2's REST API (`flower/api/*.py`) with the same paths, parameters, JSON shapes, status codes
//! and error texts, plus a few `celeriac` extensions the dashboard uses (`/api/queues/detail`,
//! `/api/celeriac/*`: overview, tasks with Dagster context, chart series, run timelines).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Map, Value};

use crate::dagster;
use crate::events::cast;
use crate::queues;
use crate::results::{self, SendOptions};
use crate::series;
use crate::state::{EventsState, TaskQuery, SORT_KEYS};
use crate::timeline;
use crate::Shared;

type Params = Query<HashMap<String, String>>;
type AppState = State<Arc<Shared>>;

/// An error answered the way Tornado answers `HTTPError(status, message)` on API handlers: the message
/// as plain text.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.0,
            [(header::CONTENT_TYPE, "text/plain; charset=UTF-8")],
            self.1,
        )
            .into_response()
    }
}

fn err(status: StatusCode, msg: impl Into<String>) -> ApiError {
    ApiError(status, msg.into())
}

/// A JSON body as Tornado's `write(dict)` sends it.
fn json_response(v: Value) -> Response {
    // Byte for byte what Tornado writes: Python's `json.dumps` separators and escaping.
    let text = celeriac_wire::json::to_python_string(&v, false).replace("</", "<\\/");
    (
        [(header::CONTENT_TYPE, "application/json; charset=UTF-8")],
        text,
    )
        .into_response()
}

type ApiResult = Result<Response, ApiError>;

fn read_state(shared: &Shared) -> std::sync::RwLockReadGuard<'_, EventsState> {
    match shared.state.read() {
        Ok(s) => s,
        Err(p) => p.into_inner(),
    }
}

/// Tornado's `strtobool`.
fn arg_bool(q: &HashMap<String, String>, name: &str) -> Result<bool, ApiError> {
    match q.get(name).map(|s| s.trim().to_lowercase()) {
        None => Ok(false),
        Some(v) => match v.as_str() {
            "y" | "yes" | "t" | "true" | "on" | "1" => Ok(true),
            "n" | "no" | "f" | "false" | "off" | "0" => Ok(false),
            other => Err(err(
                StatusCode::BAD_REQUEST,
                format!("Invalid argument '{other}' of type 'bool'"),
            )),
        },
    }
}

fn arg_int(q: &HashMap<String, String>, name: &str) -> Result<Option<i64>, ApiError> {
    arg_parsed(q, name, "int")
}

fn arg_float(q: &HashMap<String, String>, name: &str) -> Result<Option<f64>, ApiError> {
    arg_parsed(q, name, "float")
}

/// A numeric query argument, refused with Flower's message when it does not parse.
fn arg_parsed<T: std::str::FromStr>(
    q: &HashMap<String, String>,
    name: &str,
    type_name: &str,
) -> Result<Option<T>, ApiError> {
    match q.get(name).map(|s| s.trim()) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            err(
                StatusCode::BAD_REQUEST,
                format!("Invalid argument '{v}' of type '{type_name}'"),
            )
        }),
    }
}

fn required<'a>(q: &'a HashMap<String, String>, name: &str) -> Result<&'a str, ApiError> {
    match q.get(name).map(|s| s.trim()) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(err(
            StatusCode::BAD_REQUEST,
            format!("Missing argument {name}"),
        )),
    }
}

fn guard_read_only(shared: &Shared) -> Result<(), ApiError> {
    if shared.config.read_only {
        return Err(err(StatusCode::FORBIDDEN, "Read only mode is enabled"));
    }
    Ok(())
}

fn guard_worker(shared: &Shared, name: &str) -> Result<(), ApiError> {
    if name.is_empty() || !shared.inspector.contains(name) {
        return Err(err(
            StatusCode::NOT_FOUND,
            format!("Unknown worker '{name}'"),
        ));
    }
    Ok(())
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/workers", get(list_workers))
        .route("/api/worker/shutdown/{*name}", post(worker_shutdown))
        .route("/api/worker/pool/restart/{*name}", post(pool_restart))
        .route("/api/worker/pool/grow/{*name}", post(pool_grow))
        .route("/api/worker/pool/shrink/{*name}", post(pool_shrink))
        .route("/api/worker/pool/autoscale/{*name}", post(pool_autoscale))
        .route("/api/worker/queue/add-consumer/{*name}", post(add_consumer))
        .route(
            "/api/worker/queue/cancel-consumer/{*name}",
            post(cancel_consumer),
        )
        .route("/api/tasks", get(list_tasks))
        .route("/api/task/types", get(task_types))
        .route("/api/queues/length", get(queue_lengths))
        .route("/api/queues/detail", get(queue_details))
        .route("/api/task/info/", get(task_info_empty))
        .route("/api/task/info/{*id}", get(task_info))
        .route("/api/task/apply/{*name}", post(task_apply))
        .route("/api/task/async-apply/{*name}", post(task_async_apply))
        .route("/api/task/send-task/{*name}", post(task_send))
        .route("/api/task/result/{*id}", get(task_result))
        .route("/api/task/abort/{*id}", post(task_abort))
        .route("/api/task/timeout/{*name}", post(task_timeout))
        .route("/api/task/rate-limit/{*name}", post(task_rate_limit))
        .route("/api/task/revoke/{*id}", post(task_revoke))
        .route("/api/celeriac/overview", get(overview))
        .route("/api/celeriac/tasks", get(celeriac_tasks))
        .route("/api/celeriac/task/{*id}", get(celeriac_task))
        .route("/api/celeriac/series/tasks", get(series_tasks))
        .route("/api/celeriac/series/queues", get(series_queues))
        .route("/api/celeriac/runs/{run_id}/timeline", get(run_timeline))
        .route("/metrics", get(metrics))
        .route("/healthcheck", get(|| async { "OK" }))
        .with_state(shared)
}

async fn list_workers(State(shared): AppState, Query(q): Params) -> ApiResult {
    let refresh = arg_bool(&q, "refresh")?;
    let status = arg_bool(&q, "status")?;
    let workername = q.get("workername").filter(|w| !w.is_empty()).cloned();
    if refresh {
        shared
            .inspector
            .update(shared.broker.as_ref(), workername.as_deref(), true)
            .await;
    }
    if status {
        let now = celeriac_wire::events::now_epoch();
        let state = read_state(&shared);
        let mut names: Vec<&String> = state.workers.keys().collect();
        names.sort();
        let out: Map<String, Value> = names
            .into_iter()
            .map(|n| (n.clone(), json!(state.workers[n].alive(now))))
            .collect();
        return Ok(json_response(Value::Object(out)));
    }
    if let Some(w) = workername {
        return match shared.inspector.worker(&w) {
            Some(info) => Ok(json_response(json!({ w: info }))),
            None => Err(err(StatusCode::NOT_FOUND, format!("Unknown worker '{w}'"))),
        };
    }
    Ok(json_response(Value::Object(shared.inspector.snapshot())))
}

async fn worker_shutdown(State(shared): AppState, Path(name): Path<String>) -> ApiResult {
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

async fn pool_restart(State(shared): AppState, Path(name): Path<String>) -> ApiResult {
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

async fn pool_grow(
    State(shared): AppState,
    Path(name): Path<String>,
    Query(q): Params,
) -> ApiResult {
    pool_resize(&shared, &name, &q, "pool_grow", ("grow", "Growing")).await
}

async fn pool_shrink(
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

async fn pool_autoscale(
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

async fn add_consumer(
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

async fn cancel_consumer(
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

async fn list_tasks(State(shared): AppState, Query(q): Params) -> ApiResult {
    let query = task_query(&q)?;
    let state = read_state(&shared);
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

async fn task_types(State(shared): AppState) -> ApiResult {
    let types = read_state(&shared).task_types();
    Ok(json_response(json!({"task-types": types})))
}

fn queue_names(shared: &Shared) -> Vec<String> {
    let names = shared.inspector.active_queue_names();
    if names.is_empty() {
        vec![shared.config.default_queue.clone()]
    } else {
        names
    }
}

async fn queue_lengths(State(shared): AppState) -> ApiResult {
    let names = queue_names(&shared);
    Ok(json_response(
        queues::lengths(&shared.queues, shared.broker.as_ref(), &names).await,
    ))
}

/// Ready/reserved/running per queue: the workers' queues, or those named by `?queue=a,b`.
async fn queue_details(State(shared): AppState, Query(q): Params) -> ApiResult {
    let names = match q.get("queue").filter(|v| !v.is_empty()) {
        Some(list) => list
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        None => queue_names(&shared),
    };
    let details = queues::details(
        &shared.queues,
        shared.broker.as_ref(),
        &shared.inspector,
        &names,
    )
    .await;
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

async fn task_info_empty() -> ApiResult {
    Err(err(StatusCode::NOT_FOUND, "Unknown task ''"))
}

async fn task_info(State(shared): AppState, Path(id): Path<String>) -> ApiResult {
    let state = read_state(&shared);
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

async fn task_apply(State(shared): AppState, Path(name): Path<String>, body: Bytes) -> ApiResult {
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

async fn task_async_apply(
    State(shared): AppState,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    guard_read_only(&shared)?;
    let (args, kwargs, options) = task_args(&body)?;
    if !known_task(&shared, &name) {
        return Err(err(StatusCode::NOT_FOUND, format!("Unknown task '{name}'")));
    }
    let id = publish(&shared, &name, args, kwargs, &options).await?;
    let mut resp = json!({"task-id": id});
    if shared.results.configured() {
        resp["state"] = json!(current_state(&shared, &id).await?);
    }
    Ok(json_response(resp))
}

async fn task_send(State(shared): AppState, Path(name): Path<String>, body: Bytes) -> ApiResult {
    guard_read_only(&shared)?;
    let (args, kwargs, options) = task_args(&body)?;
    let id = publish(&shared, &name, args, kwargs, &options).await?;
    let mut resp = json!({"task-id": id});
    if shared.results.configured() {
        resp["state"] = json!(current_state(&shared, &id).await?);
    }
    Ok(json_response(resp))
}

async fn task_result(
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

async fn task_abort(State(shared): AppState, Path(id): Path<String>) -> ApiResult {
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

async fn task_timeout(
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

async fn task_rate_limit(
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

async fn task_revoke(
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

async fn metrics(State(shared): AppState) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared.metrics.render(),
    )
        .into_response()
}

/// Everything the dashboard's first screen needs in one call.
async fn overview(State(shared): AppState) -> ApiResult {
    let now = celeriac_wire::events::now_epoch();
    let details = shared.inspector.snapshot();
    let state = read_state(&shared);
    let mut names: Vec<&String> = state.workers.keys().collect();
    names.sort();
    let workers: Vec<Value> = names
        .into_iter()
        .map(|n| {
            let w = &state.workers[n];
            let info = details.get(n);
            let queues: Vec<Value> = info
                .and_then(|i| i.get("active_queues"))
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|q| q.get("name").cloned()).collect())
                .unwrap_or_default();
            json!({
                "hostname": n, "online": w.alive(now), "active": w.active, "processed": w.processed,
                "freq": w.freq, "last_heartbeat": w.heartbeats.last(), "loadavg": w.loadavg,
                "sw_ident": w.sw_ident, "sw_ver": w.sw_ver, "pid": w.pid, "queues": queues,
                "concurrency": info.and_then(|i| i.pointer("/stats/pool/max-concurrency")).cloned(),
                "events": w.counter,
            })
        })
        .collect();
    let mut states: HashMap<String, u64> = HashMap::new();
    for t in state.tasks() {
        *states.entry(t.state.clone()).or_default() += 1;
    }
    Ok(json_response(json!({
        "workers": workers,
        "tasks": {"total": state.task_count(), "states": states},
        "task_types": state.task_types(),
        "read_only": shared.config.read_only,
        "dagster_url": shared.config.dagster_url,
        "history": shared.history_description,
        "now": now,
    })))
}

fn with_dagster(shared: &Shared, mut m: Map<String, Value>) -> Map<String, Value> {
    let ctx = dagster::context(m.get("kwargs"), shared.config.dagster_url.as_deref());
    m.insert("dagster".into(), json!(ctx));
    m
}

async fn celeriac_tasks(State(shared): AppState, Query(q): Params) -> ApiResult {
    let query = task_query(&q)?;
    let state = read_state(&shared);
    let page = state
        .query(&query)
        .map_err(|e| err(StatusCode::BAD_REQUEST, e.to_string()))?;
    let tasks: Vec<Value> = page
        .tasks
        .iter()
        .map(|t| Value::Object(with_dagster(&shared, t.as_dict())))
        .collect();
    Ok(json_response(json!({
        "total": page.total, "filtered": page.filtered, "tasks": tasks,
    })))
}

async fn celeriac_task(State(shared): AppState, Path(id): Path<String>) -> ApiResult {
    let state = read_state(&shared);
    match state.task(&id) {
        Some(t) => Ok(json_response(Value::Object(with_dagster(
            &shared,
            t.as_dict(),
        )))),
        None => Err(err(StatusCode::NOT_FOUND, format!("Unknown task '{id}'"))),
    }
}

/// `?window=15m|1h|24h` (default 15m).
fn window_arg(q: &HashMap<String, String>) -> Result<series::Window, ApiError> {
    match q
        .get("window")
        .map(String::as_str)
        .filter(|w| !w.is_empty())
    {
        None => Ok(series::Window::Minutes15),
        Some(w) => series::Window::parse(w).ok_or_else(|| {
            err(
                StatusCode::BAD_REQUEST,
                format!("Invalid window '{w}', expected one of 15m, 1h, 24h"),
            )
        }),
    }
}

fn to_json(v: &impl serde::Serialize) -> ApiResult {
    serde_json::to_value(v)
        .map(json_response)
        .map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// Succeeded/failed per second and runtime percentiles (`?taskname=` restricts the percentiles).
async fn series_tasks(State(shared): AppState, Query(q): Params) -> ApiResult {
    let window = window_arg(&q)?;
    let name = q
        .get("taskname")
        .filter(|n| !n.is_empty())
        .map(String::as_str);
    let now = celeriac_wire::events::now_epoch();
    let s = {
        let state = read_state(&shared);
        series::task_series(state.tasks(), window, now, name)
    };
    to_json(&s)
}

/// Ready (per priority step on Redis), reserved, running and limit per queue.
async fn series_queues(State(shared): AppState, Query(q): Params) -> ApiResult {
    let window = window_arg(&q)?;
    let now = celeriac_wire::events::now_epoch();
    let s = {
        let samples = match shared.samples.read() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        series::queue_series(&samples, window, now)
    };
    to_json(&s)
}

/// Most neighbours listed by `?others=1`.
const MAX_NEIGHBOURS: usize = 500;

/// The Gantt data of one Dagster run (see [`timeline`]); `?others=1` adds the tasks of other runs that
/// held slots of the run's queues on the same workers meanwhile.
async fn run_timeline(
    State(shared): AppState,
    Path(run_id): Path<String>,
    Query(q): Params,
) -> ApiResult {
    let others = arg_bool(&q, "others")?;
    // The event log first: no lock is held across the query.
    let (events, event_log_error) = match &shared.event_log {
        Some(log) => match log.step_events(&run_id).await {
            Ok(e) => (Some(e), None),
            Err(e) => {
                tracing::warn!(run_id = %run_id, "timeline without the event log: {e}");
                (None, Some(e.to_string()))
            }
        },
        None => (None, None),
    };
    let worker_queues: HashMap<String, Vec<String>> = shared
        .inspector
        .snapshot()
        .into_iter()
        .map(|(w, info)| {
            let names = info
                .get("active_queues")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|q| q.get("name").and_then(Value::as_str).map(str::to_owned))
                .collect();
            (w, names)
        })
        .collect();
    let state = read_state(&shared);
    let (facts, job) = timeline::facts_of_run(state.tasks_of_run(&run_id), &run_id);
    if facts.is_empty() && events.as_ref().is_none_or(Vec::is_empty) {
        return Err(err(
            StatusCode::NOT_FOUND,
            format!("Unknown run '{run_id}'"),
        ));
    }
    let mut tl = timeline::build(&run_id, job, &facts, events.as_deref(), &worker_queues);
    tl.event_log_error = event_log_error;
    if others {
        let (workers, queues) = timeline::workers_and_queues(&tl);
        let mine: std::collections::HashSet<&str> = facts.iter().map(|f| f.uuid.as_str()).collect();
        let (lo, hi) = (tl.start.unwrap_or(0.0), tl.end.unwrap_or(0.0));
        let mut near: Vec<timeline::Neighbour> = state
            .tasks()
            .filter(|t| !mine.contains(t.uuid.as_str()))
            .filter(|t| t.worker.as_ref().is_some_and(|w| workers.contains(w)))
            .filter(|t| {
                let end = t.succeeded.or(t.failed).or(t.revoked);
                t.started.is_some_and(|s| s <= hi) && end.is_none_or(|e| e >= lo)
            })
            .map(|t| {
                let ctx = dagster::context(t.kwargs.as_ref(), None);
                let worker = t.worker.clone();
                let queue = t
                    .routing_key
                    .as_ref()
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .or_else(|| {
                        let consumed = worker_queues.get(worker.as_deref()?)?;
                        (consumed.len() == 1).then(|| consumed[0].clone())
                    });
                timeline::Neighbour {
                    task_id: t.uuid.clone(),
                    name: t.name.clone(),
                    run_id: ctx.as_ref().and_then(|c| c.run_id.clone()),
                    step_key: ctx.and_then(|c| c.step_key),
                    worker,
                    queue,
                    state: t.state.clone(),
                    started: t.started,
                    finished: t.succeeded.or(t.failed).or(t.revoked),
                }
            })
            // Slots of the run's queues: a worker's other queues have slots of their own.
            .filter(|n| n.queue.as_ref().is_none_or(|q| queues.contains(q)))
            .collect();
        near.sort_by(|a, b| {
            a.started
                .unwrap_or(0.0)
                .total_cmp(&b.started.unwrap_or(0.0))
                .then_with(|| a.task_id.cmp(&b.task_id))
        });
        near.truncate(MAX_NEIGHBOURS);
        tl.others = Some(near);
    }
    drop(state);
    to_json(&tl)
}
