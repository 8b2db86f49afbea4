//! celeriac's own routes under `/api/celeriac/`, for the dashboard: the first screen in one call,
//! tasks with their Dagster context, chart series, and Dagster run timelines.

use std::collections::{HashMap, HashSet};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde_json::{json, Map, Value};

use super::base::{arg_bool, err, json_response, to_json, ApiError, ApiResult, AppState, Params};
use super::tasks::task_query;
use crate::dagster;
use crate::series;
use crate::shared::Shared;
use crate::state::EventsState;
use crate::timeline::{self, Neighbour, Timeline};

/// Everything the dashboard's first screen needs in one call.
pub(super) async fn overview(State(shared): AppState) -> ApiResult {
    let now = celeriac_wire::events::now_epoch();
    let details = shared.inspector.snapshot();
    let state = shared.read_state();
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

pub(super) async fn celeriac_tasks(State(shared): AppState, Query(q): Params) -> ApiResult {
    let query = task_query(&q)?;
    let state = shared.read_state();
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

pub(super) async fn celeriac_task(State(shared): AppState, Path(id): Path<String>) -> ApiResult {
    let state = shared.read_state();
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

/// Succeeded/failed per second and runtime percentiles (`?taskname=` restricts the percentiles).
pub(super) async fn series_tasks(State(shared): AppState, Query(q): Params) -> ApiResult {
    let window = window_arg(&q)?;
    let name = q
        .get("taskname")
        .filter(|n| !n.is_empty())
        .map(String::as_str);
    let now = celeriac_wire::events::now_epoch();
    let s = {
        let state = shared.read_state();
        series::task_series(state.tasks(), window, now, name)
    };
    to_json(&s)
}

/// Ready (per priority step on Redis), reserved, running and limit per queue.
pub(super) async fn series_queues(State(shared): AppState, Query(q): Params) -> ApiResult {
    let window = window_arg(&q)?;
    let now = celeriac_wire::events::now_epoch();
    let s = {
        let samples = shared.read_samples();
        series::queue_series(&samples, window, now)
    };
    to_json(&s)
}

/// Most neighbours listed by `?others=1`.
const MAX_NEIGHBOURS: usize = 500;

/// The Gantt data of one Dagster run (see [`timeline`]); `?others=1` adds the tasks of other runs that
/// held slots of the run's queues on the same workers meanwhile.
pub(super) async fn run_timeline(
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
    let worker_queues = worker_queues(&shared);
    let state = shared.read_state();
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
        let mine: HashSet<&str> = facts.iter().map(|f| f.uuid.as_str()).collect();
        tl.others = Some(neighbours(&state, &tl, &mine, &worker_queues));
    }
    drop(state);
    to_json(&tl)
}

/// The queues each worker consumes, as remote control last reported them.
fn worker_queues(shared: &Shared) -> HashMap<String, Vec<String>> {
    shared
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
        .collect()
}

/// The tasks other than the run's own (`mine`) that ran on the run's workers, from the run's queues,
/// while the run went on; the first [`MAX_NEIGHBOURS`] by start.
fn neighbours(
    state: &EventsState,
    tl: &Timeline,
    mine: &HashSet<&str>,
    worker_queues: &HashMap<String, Vec<String>>,
) -> Vec<Neighbour> {
    let (workers, queues) = timeline::workers_and_queues(tl);
    let (lo, hi) = (tl.start.unwrap_or(0.0), tl.end.unwrap_or(0.0));
    let mut near: Vec<Neighbour> = state
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
            Neighbour {
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
    near
}
