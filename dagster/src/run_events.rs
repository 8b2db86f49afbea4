//! The events a run's orchestrator writes to the event log, shaped exactly as Python's run worker writes
//! them (`DagsterEvent.from_job` / `from_step` through the run's log manager, and plain log lines):
//! `RUN_START`, `RUN_SUCCESS`, `RUN_FAILURE` (with `dagster/failure_reason`), `RUN_CANCELED`, the
//! executor's engine events ("Submitting celery task …", markers), `STEP_SKIPPED` and the skip/abandon
//! log lines. Shapes come from rows a real Dagster 1.13 run worker stored.
//!
//! Storage names are Dagster's old ones (`PIPELINE_START`, `PipelineFailureData`, `SolidHandle`).

use serde_json::{json, Map, Value};

use crate::events::ErrorInfo;
use crate::plan::execution_plan::Step;
use crate::plan::snapshot::StepHandle;

/// Python's logging levels as stored in `EventLogEntry.level`.
pub const DEBUG: u8 = 10;
pub const INFO: u8 = 20;
pub const WARNING: u8 = 30;
pub const ERROR: u8 = 40;

/// Why a run failed (`RunFailureReason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    StepFailure,
    RunException,
    UnexpectedTermination,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::StepFailure => "STEP_FAILURE",
            FailureReason::RunException => "RUN_EXCEPTION",
            FailureReason::UnexpectedTermination => "UNEXPECTED_TERMINATION",
        }
    }
}

/// The run an event belongs to, and the writing process.
#[derive(Debug, Clone)]
pub struct RunScope {
    pub run_id: String,
    pub job_name: String,
    pub pid: u32,
}

/// One row to store in `event_logs`.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    /// `dagster_event_type` column (`None` for plain log lines).
    pub event_type: Option<String>,
    pub step_key: Option<String>,
    pub timestamp: f64,
    /// The packed `EventLogEntry`.
    pub entry: Value,
}

impl EventRow {
    /// `serialize_value(entry)`: the `event` column.
    pub fn entry_json(&self) -> String {
        crate::serdes::to_string(&self.entry)
    }
}

/// `pack_value(NodeHandle)` of a node path (`outer.inner`).
fn node_handle(path: &str) -> Value {
    let mut handle = Value::Null;
    for name in path.split('.') {
        handle = json!({"__class__": "SolidHandle", "name": name, "parent": handle});
    }
    handle
}

fn node_of(handle: &StepHandle) -> &str {
    match handle {
        StepHandle::Plain { node, .. }
        | StepHandle::Unresolved { node }
        | StepHandle::Resolved { node, .. } => node,
    }
}

fn step_handle(handle: &StepHandle) -> Value {
    let solid = node_handle(node_of(handle));
    match handle {
        StepHandle::Plain { key, .. } => {
            json!({"__class__": "StepHandle", "key": key, "solid_handle": solid})
        }
        StepHandle::Resolved {
            key, mapping_key, ..
        } => json!({"__class__": "ResolvedFromDynamicStepHandle", "key": key,
                     "mapping_key": mapping_key, "solid_handle": solid}),
        StepHandle::Unresolved { .. } => {
            json!({"__class__": "UnresolvedStepHandle", "solid_handle": solid})
        }
    }
}

/// A `DagsterEvent` of the run (`step == None`) or of one of its steps.
fn dagster_event(
    scope: &RunScope,
    step: Option<&Step>,
    event_type: &str,
    message: &str,
    data: Value,
) -> Value {
    let (logging_tags, solid, handle, kind) = match step {
        None => (json!({}), Value::Null, Value::Null, Value::Null),
        Some(step) => {
            let node = node_of(&step.handle);
            let op_name = node.rsplit('.').next().unwrap_or(node);
            (
                json!({"job_name": scope.job_name, "op_name": op_name, "resource_fn_name": "None",
                       "resource_name": "None", "run_id": scope.run_id, "step_key": step.key}),
                node_handle(node),
                step_handle(&step.handle),
                json!("COMPUTE"),
            )
        }
    };
    json!({
        "__class__": "DagsterEvent", "event_specific_data": data, "event_type_value": event_type,
        "logging_tags": logging_tags, "message": message, "pid": scope.pid,
        "pipeline_name": scope.job_name, "solid_handle": solid, "step_handle": handle,
        "step_key": step.map(|s| s.key.clone()), "step_kind_value": kind,
    })
}

fn row(
    scope: &RunScope,
    step_key: Option<&str>,
    event: Option<Value>,
    level: u8,
    user_message: &str,
    timestamp: f64,
) -> EventRow {
    let event_type = event
        .as_ref()
        .and_then(|e| e.get("event_type_value"))
        .and_then(Value::as_str)
        .map(str::to_string);
    EventRow {
        event_type,
        step_key: step_key.map(str::to_string),
        timestamp,
        entry: json!({
            "__class__": "EventLogEntry", "dagster_event": event, "error_info": null, "level": level,
            "message": "", "pipeline_name": scope.job_name, "run_id": scope.run_id, "step_key": step_key,
            "timestamp": timestamp, "user_message": user_message,
        }),
    }
}

/// An event logged through the run's log manager: `user_message` is the event's message.
fn logged(
    scope: &RunScope,
    step: Option<&Step>,
    event_type: &str,
    message: &str,
    data: Value,
    level: u8,
    ts: f64,
) -> EventRow {
    let event = dagster_event(scope, step, event_type, message, data);
    row(
        scope,
        step.map(|s| s.key.as_str()),
        Some(event),
        level,
        message,
        ts,
    )
}

/// `DagsterEvent.job_start`.
pub fn run_start(scope: &RunScope, ts: f64) -> EventRow {
    let msg = format!("Started execution of run for \"{}\".", scope.job_name);
    logged(scope, None, "PIPELINE_START", &msg, Value::Null, DEBUG, ts)
}

/// `DagsterEvent.job_success`.
pub fn run_success(scope: &RunScope, ts: f64) -> EventRow {
    let msg = format!("Finished execution of run for \"{}\".", scope.job_name);
    logged(
        scope,
        None,
        "PIPELINE_SUCCESS",
        &msg,
        Value::Null,
        DEBUG,
        ts,
    )
}

/// `DagsterEvent.job_failure(context, context_msg, reason, error_info, first_step_failure_event)`: the
/// error defaults to the first step failure's.
pub fn run_failure(
    scope: &RunScope,
    context_msg: &str,
    reason: FailureReason,
    error: Option<Value>,
    first_step_failure: Option<Value>,
    ts: f64,
) -> EventRow {
    let error = error.or_else(|| {
        first_step_failure
            .as_ref()
            .and_then(|e| e.pointer("/event_specific_data/error"))
            .cloned()
    });
    let data = json!({
        "__class__": "PipelineFailureData", "error": error,
        "failure_reason": {"__enum__": format!("RunFailureReason.{}", reason.as_str())},
        "first_step_failure_event": first_step_failure,
    });
    let msg = format!(
        "Execution of run for \"{}\" failed. {context_msg}",
        scope.job_name
    );
    logged(scope, None, "PIPELINE_FAILURE", &msg, data, ERROR, ts)
}

/// `DagsterEvent.job_canceled(context, error_info, message)`.
pub fn run_canceled(
    scope: &RunScope,
    message: Option<&str>,
    error: Option<&ErrorInfo>,
    ts: f64,
) -> EventRow {
    let msg = message.map_or_else(
        || format!("Execution of run for \"{}\" canceled.", scope.job_name),
        str::to_string,
    );
    let data =
        json!({"__class__": "PipelineCanceledData", "error": error.map(ErrorInfo::to_value)});
    logged(scope, None, "PIPELINE_CANCELED", &msg, data, DEBUG, ts)
}

/// `EngineEventData`: text metadata (legacy entry form), markers, an error.
#[derive(Debug, Clone, Default)]
pub struct EngineData {
    pub metadata: Vec<(String, String)>,
    pub marker_start: Option<String>,
    pub marker_end: Option<String>,
    pub error: Option<ErrorInfo>,
}

impl EngineData {
    fn to_value(&self) -> Value {
        let entries: Vec<Value> = self
            .metadata
            .iter()
            .map(|(label, text)| {
                json!({"__class__": "EventMetadataEntry", "description": null, "label": label,
                       "entry_data": {"__class__": "TextMetadataEntryData", "text": text}})
            })
            .collect();
        json!({"__class__": "EngineEventData", "error": self.error.as_ref().map(ErrorInfo::to_value),
               "marker_end": self.marker_end, "marker_start": self.marker_start,
               "metadata_entries": entries})
    }
}

/// `DagsterEvent.engine_event(context, message, data)` for the run or one of its steps.
pub fn engine_event(
    scope: &RunScope,
    step: Option<&Step>,
    message: &str,
    data: &EngineData,
    ts: f64,
) -> EventRow {
    let level = if data.error.is_some() { ERROR } else { DEBUG };
    logged(
        scope,
        step,
        "ENGINE_EVENT",
        message,
        data.to_value(),
        level,
        ts,
    )
}

/// `DagsterEvent.step_skipped_event`.
pub fn step_skipped(scope: &RunScope, step: &Step, ts: f64) -> EventRow {
    let msg = format!("Skipped execution of step \"{}\".", step.key);
    logged(
        scope,
        Some(step),
        "STEP_SKIPPED",
        &msg,
        Value::Null,
        DEBUG,
        ts,
    )
}

/// A plain log line (`context.log.info/error`), of the run or of a step.
pub fn log_line(
    scope: &RunScope,
    step_key: Option<&str>,
    level: u8,
    message: &str,
    ts: f64,
) -> EventRow {
    row(scope, step_key, None, level, message, ts)
}

/// The run body (`runs.run_body`) with a new status and, for failures, the `dagster/failure_reason`
/// tag, as `SqlRunStorage.handle_run_event` rewrites it.
pub fn run_body_with_status(
    body: &Value,
    status: &str,
    failure_reason: Option<FailureReason>,
) -> Value {
    let mut body = body.clone();
    if let Value::Object(m) = &mut body {
        m.insert(
            "status".into(),
            json!({"__enum__": format!("PipelineRunStatus.{status}")}),
        );
        if let Some(reason) = failure_reason {
            let tags = m.entry("tags").or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(tags) = tags {
                tags.insert(RUN_FAILURE_REASON_TAG.into(), json!(reason.as_str()));
            }
        }
    }
    body
}

/// Run tag naming why a run failed.
pub const RUN_FAILURE_REASON_TAG: &str = "dagster/failure_reason";

/// The run status an event type moves a run to (`EVENT_TYPE_TO_PIPELINE_RUN_STATUS`).
pub fn status_of(event_type: &str) -> Option<&'static str> {
    match event_type {
        "PIPELINE_START" => Some("STARTED"),
        "PIPELINE_SUCCESS" => Some("SUCCESS"),
        "PIPELINE_FAILURE" => Some("FAILURE"),
        "PIPELINE_CANCELED" => Some("CANCELED"),
        "PIPELINE_CANCELING" => Some("CANCELING"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_start_matches_a_stored_row() {
        // A PIPELINE_START row written by Dagster 1.13.27's run worker (timestamp and pid kept).
        let want = r#"{"__class__": "EventLogEntry", "dagster_event": {"__class__": "DagsterEvent", "event_specific_data": null, "event_type_value": "PIPELINE_START", "logging_tags": {}, "message": "Started execution of run for \"optional_skip\".", "pid": 25156, "pipeline_name": "optional_skip", "solid_handle": null, "step_handle": null, "step_key": null, "step_kind_value": null}, "error_info": null, "level": 10, "message": "", "pipeline_name": "optional_skip", "run_id": "46c8619c-0300-4c5f-9b75-063e7878939d", "step_key": null, "timestamp": 1796038769.726267, "user_message": "Started execution of run for \"optional_skip\"."}"#;
        let scope = RunScope {
            run_id: "46c8619c-0300-4c5f-9b75-063e7878939d".into(),
            job_name: "optional_skip".into(),
            pid: 25156,
        };
        assert_eq!(run_start(&scope, 1796038769.726267).entry_json(), want);
    }

    fn step(key: &str) -> Step {
        Step {
            key: key.into(),
            kind: crate::plan::snapshot::StepKind::Compute,
            handle: StepHandle::Plain {
                node: key.into(),
                key: key.into(),
            },
            inputs: vec![],
            outputs: vec![],
            tags: Default::default(),
            pool: None,
        }
    }

    #[test]
    fn step_scoped_events_match_stored_rows() {
        let scope = RunScope {
            run_id: "46c8619c-0300-4c5f-9b75-063e7878939d".into(),
            job_name: "optional_skip".into(),
            pid: 25156,
        };
        // Rows written by Dagster 1.13.27's run worker for the same run.
        let skipped = r#"{"__class__": "EventLogEntry", "dagster_event": {"__class__": "DagsterEvent", "event_specific_data": null, "event_type_value": "STEP_SKIPPED", "logging_tags": {"job_name": "optional_skip", "op_name": "os_use_sometimes", "resource_fn_name": "None", "resource_name": "None", "run_id": "46c8619c-0300-4c5f-9b75-063e7878939d", "step_key": "os_use_sometimes"}, "message": "Skipped execution of step \"os_use_sometimes\".", "pid": 25156, "pipeline_name": "optional_skip", "solid_handle": {"__class__": "SolidHandle", "name": "os_use_sometimes", "parent": null}, "step_handle": {"__class__": "StepHandle", "key": "os_use_sometimes", "solid_handle": {"__class__": "SolidHandle", "name": "os_use_sometimes", "parent": null}}, "step_key": "os_use_sometimes", "step_kind_value": "COMPUTE"}, "error_info": null, "level": 10, "message": "", "pipeline_name": "optional_skip", "run_id": "46c8619c-0300-4c5f-9b75-063e7878939d", "step_key": "os_use_sometimes", "timestamp": 1796038775.8713653, "user_message": "Skipped execution of step \"os_use_sometimes\"."}"#;
        assert_eq!(
            step_skipped(&scope, &step("os_use_sometimes"), 1796038775.8713653).entry_json(),
            skipped
        );
        let submitting = r#"{"__class__": "EventLogEntry", "dagster_event": {"__class__": "DagsterEvent", "event_specific_data": {"__class__": "EngineEventData", "error": null, "marker_end": null, "marker_start": "celery_queue_wait", "metadata_entries": []}, "event_type_value": "ENGINE_EVENT", "logging_tags": {"job_name": "optional_skip", "op_name": "os_start", "resource_fn_name": "None", "resource_name": "None", "run_id": "46c8619c-0300-4c5f-9b75-063e7878939d", "step_key": "os_start"}, "message": "Submitting celery task for step \"os_start\" to queue \"evq\".", "pid": 25156, "pipeline_name": "optional_skip", "solid_handle": {"__class__": "SolidHandle", "name": "os_start", "parent": null}, "step_handle": {"__class__": "StepHandle", "key": "os_start", "solid_handle": {"__class__": "SolidHandle", "name": "os_start", "parent": null}}, "step_key": "os_start", "step_kind_value": "COMPUTE"}, "error_info": null, "level": 10, "message": "", "pipeline_name": "optional_skip", "run_id": "46c8619c-0300-4c5f-9b75-063e7878939d", "step_key": "os_start", "timestamp": 1796038769.7986414, "user_message": "Submitting celery task for step \"os_start\" to queue \"evq\"."}"#;
        let data = EngineData {
            marker_start: Some("celery_queue_wait".into()),
            ..Default::default()
        };
        assert_eq!(
            engine_event(
                &scope,
                Some(&step("os_start")),
                "Submitting celery task for step \"os_start\" to queue \"evq\".",
                &data,
                1796038769.7986414
            )
            .entry_json(),
            submitting
        );
        let log = r#"{"__class__": "EventLogEntry", "dagster_event": null, "error_info": null, "level": 20, "message": "", "pipeline_name": "optional_skip", "run_id": "46c8619c-0300-4c5f-9b75-063e7878939d", "step_key": "os_use_sometimes", "timestamp": 1796038775.862981, "user_message": "Skipping step os_use_sometimes due to skipped dependencies: ['os_maybe.sometimes']."}"#;
        assert_eq!(
            log_line(
                &scope,
                Some("os_use_sometimes"),
                INFO,
                "Skipping step os_use_sometimes due to skipped dependencies: ['os_maybe.sometimes'].",
                1796038775.862981
            )
            .entry_json(),
            log
        );
    }
}
