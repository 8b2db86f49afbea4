//! Flower's `api/workers.py`: `/api/workers`, the workers' details from remote control (or, with
//! `?status=1`, whether each is alive by its heartbeats).

use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde_json::{json, Map, Value};

use super::base::{arg_bool, err, json_response, ApiResult, AppState, Params};

pub(super) async fn list_workers(State(shared): AppState, Query(q): Params) -> ApiResult {
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
        let state = shared.read_state();
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
