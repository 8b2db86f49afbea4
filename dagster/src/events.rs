//! Dagster events as serdes JSON: the engine events the Python worker reports, the synthesised
//! STEP_FAILURE of a crashed step, and extraction of the step process's own events from its logs.
//!
//! Shapes are those of `captures/db_event_log_rows.json` (Dagster 1.13 still writes the legacy
//! `metadata_entries` / `EventMetadataEntry` form), serialized like `serialize_value`: sorted keys.

use celeriac_wire::json::to_python_string;
use std::sync::Arc;

use serde_json::{json, Value};

/// The `CeleryK8sJobExecutor` prefix every engine event message of the step task carries.
const PREFIX: &str = "[CeleryK8sJobExecutor] ";
/// `marker_end` of the "Executing step" event (Dagster's `DELEGATE_MARKER`).
pub const DELEGATE_MARKER: &str = "celery_queue_wait";

/// A metadata value of an engine event.
#[derive(Debug, Clone)]
pub enum Meta {
    Text(String),
    Null,
}

/// An error as Dagster's `SerializableErrorInfo`.
#[derive(Debug, Clone)]
pub struct ErrorInfo {
    /// `traceback.format_exception_only` text: `"<module>.<Class>: <str(err)>\n"`.
    pub message: String,
    pub cls_name: String,
    /// Traceback frames (`"  File …, line …, in …\n    code\n"`); may be empty.
    pub stack: Vec<String>,
}

impl ErrorInfo {
    /// An error of class `module.name` whose `str()` is `text`, as `serializable_error_info_from_exc_info` renders it.
    pub fn new(module: &str, name: &str, text: &str) -> Self {
        let qualified = if module.is_empty() || module == "builtins" {
            name.to_string()
        } else {
            format!("{module}.{name}")
        };
        ErrorInfo {
            message: format!("{qualified}: {text}\n"),
            cls_name: name.to_string(),
            stack: Vec::new(),
        }
    }

    pub fn to_value(&self) -> Value {
        json!({"__class__": "SerializableErrorInfo", "cause": null, "cls_name": self.cls_name, "context": null,
               "message": self.message, "stack": self.stack})
    }
}

/// Identifies the run and step an event belongs to.
#[derive(Debug, Clone)]
pub struct StepRef<'a> {
    pub run_id: &'a str,
    pub job_name: &'a str,
    pub step_key: &'a str,
}

/// A Dagster event ready to store (`EventLogEntry`) and to return to the run worker (`DagsterEvent`).
///
/// Kept rendered, once, and shared: a step task holds its events for the result and queues them for
/// the event log, in thousands of concurrent steps per worker, and a `serde_json::Value` tree of an
/// engine event costs several times its ~1 KB of text (issue 13's heap profile: 22 KB per step at a
/// burst of starting steps). Cloning an `Event` copies a pointer.
#[derive(Debug, Clone)]
pub struct Event {
    pub event_type: &'static str,
    rendered: Arc<Rendered>,
}

/// Where the `DagsterEvent` text is.
#[derive(Debug)]
enum Span {
    /// Inside the entry's text (always, with the entries this module builds).
    Within(std::ops::Range<usize>),
    /// Apart (an entry rendered in an unexpected shape: both texts are kept).
    Apart(Box<str>),
}

#[derive(Debug)]
struct Rendered {
    /// The `EventLogEntry` as serdes JSON, with the `DagsterEvent` inside it at `dagster_event`.
    entry: Box<str>,
    dagster_event: Span,
    timestamp: f64,
    step_key: Box<str>,
}

impl Event {
    /// Renders `dagster_event` and its entry once: `shell` is the entry with `dagster_event: null`
    /// (see [`entry_shell`]), and the event's text is written in place of that `null` (serdes JSON is
    /// context-free: the same value renders the same anywhere), so neither tree is copied.
    fn new(event_type: &'static str, dagster_event: Value, mut shell: Value) -> Event {
        const KEY: &str = "\"dagster_event\": ";
        let event_text = to_python_string(&dagster_event, true);
        let shell_text = to_python_string(&shell, true);
        let timestamp = shell
            .get("timestamp")
            .and_then(Value::as_f64)
            .unwrap_or_default();
        let step_key = shell
            .get("step_key")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .into();
        // Sorted keys: `__class__` ("EventLogEntry") then `dagster_event`, so the first match is the key.
        let at = shell_text
            .find(&format!("{KEY}null"))
            .map(|i| i + KEY.len());
        let (text, span) = match at {
            Some(at) => {
                let mut text = String::with_capacity(shell_text.len() + event_text.len());
                text.push_str(&shell_text[..at]);
                text.push_str(&event_text);
                text.push_str(&shell_text[at + "null".len()..]);
                let span = Span::Within(at..at + event_text.len());
                (text, span)
            }
            None => {
                shell["dagster_event"] = dagster_event;
                (
                    to_python_string(&shell, true),
                    Span::Apart(event_text.into_boxed_str()),
                )
            }
        };
        Event {
            event_type,
            rendered: Arc::new(Rendered {
                entry: text.into_boxed_str(),
                dagster_event: span,
                timestamp,
                step_key,
            }),
        }
    }

    /// The `DagsterEvent` as serdes JSON: an element of the Celery result list.
    pub fn dagster_event_json(&self) -> String {
        match &self.rendered.dagster_event {
            Span::Within(range) => self.rendered.entry[range.clone()].to_string(),
            Span::Apart(text) => text.to_string(),
        }
    }

    /// The `EventLogEntry` as serdes JSON: the `event` column of `event_logs`.
    pub fn entry_json(&self) -> &str {
        &self.rendered.entry
    }

    pub fn timestamp(&self) -> f64 {
        self.rendered.timestamp
    }

    /// The `EventLogEntry` as a JSON value (parsed again: for inspection, not for the hot path).
    pub fn entry_value(&self) -> Value {
        serde_json::from_str(self.entry_json()).unwrap_or(Value::Null)
    }

    /// The `DagsterEvent` as a JSON value (parsed again: for inspection, not for the hot path).
    pub fn dagster_event_value(&self) -> Value {
        serde_json::from_str(&self.dagster_event_json()).unwrap_or(Value::Null)
    }

    /// The step the event is about (`step_key` column of `event_logs`).
    pub fn step_key(&self) -> &str {
        &self.rendered.step_key
    }
}

fn dagster_event(step: &StepRef, event_type: &str, data: Value, message: Value) -> Value {
    json!({
        "__class__": "DagsterEvent", "event_specific_data": data, "event_type_value": event_type,
        "logging_tags": {}, "message": message, "pid": null, "pipeline_name": step.job_name,
        "solid_handle": null, "step_handle": null, "step_key": step.step_key, "step_kind_value": null,
    })
}

/// The `EventLogEntry` of an event, its `dagster_event` left `null` for [`Event::new`] to fill.
fn entry_shell(step: &StepRef, level: u8, user_message: &str) -> Value {
    json!({
        "__class__": "EventLogEntry", "dagster_event": null, "error_info": null, "level": level, "message": "",
        "pipeline_name": step.job_name, "run_id": step.run_id, "step_key": step.step_key,
        "timestamp": celeriac_wire::events::now_epoch(), "user_message": user_message,
    })
}

/// `instance.report_engine_event(msg, run, EngineEventData(metadata, marker_end, error), CeleryK8sJobExecutor, step_key)`.
pub fn engine_event(
    step: &StepRef,
    message: &str,
    metadata: &[(&str, Meta)],
    marker_end: Option<&str>,
    error: Option<&ErrorInfo>,
) -> Event {
    let entries: Vec<Value> = metadata
        .iter()
        .map(|(label, value)| {
            let data = match value {
                Meta::Text(t) => json!({"__class__": "TextMetadataEntryData", "text": t}),
                Meta::Null => json!({"__class__": "NullMetadataEntryData"}),
            };
            json!({"__class__": "EventMetadataEntry", "description": null, "entry_data": data, "label": label})
        })
        .collect();
    let data = json!({
        "__class__": "EngineEventData", "error": error.map(ErrorInfo::to_value), "marker_end": marker_end,
        "marker_start": null, "metadata_entries": entries,
    });
    let ev = dagster_event(
        step,
        "ENGINE_EVENT",
        data,
        json!(format!("{PREFIX}{message}")),
    );
    let level = if error.is_some() { 40 } else { 20 };
    Event::new("ENGINE_EVENT", ev, entry_shell(step, level, ""))
}

/// The STEP_FAILURE the Python worker synthesises when the step's Job fails (label `K8sError`);
/// `user_message` is `str(err)`.
pub fn step_failure(step: &StepRef, error: &ErrorInfo, user_message: &str) -> Event {
    let data = json!({
        "__class__": "StepFailureData", "error": error.to_value(),
        "error_source": {"__enum__": "ErrorSource.FRAMEWORK_ERROR"},
        "user_failure_data": {"__class__": "UserFailureData", "description": null, "label": "K8sError", "metadata_entries": []},
    });
    let ev = dagster_event(step, "STEP_FAILURE", data, Value::Null);
    Event::new("STEP_FAILURE", ev, entry_shell(step, 40, user_message))
}

/// The step's outcome event among serialized `DagsterEvent`s: STEP_SUCCESS, STEP_FAILURE or
/// STEP_UP_FOR_RETRY (what Dagster's `ActiveExecution` needs to consider a step finished; without one
/// the run fails with `DagsterUnknownStepStateError`).
pub fn terminal_event(events: &[String]) -> Option<String> {
    events.iter().find_map(|e| {
        let v = serde_json::from_str::<Value>(e).ok()?;
        let t = v.get("event_type_value")?.as_str()?;
        matches!(t, "STEP_SUCCESS" | "STEP_FAILURE" | "STEP_UP_FOR_RETRY").then(|| t.to_string())
    })
}

/// Port of `filter_dagster_events_from_cli_logs`: JSON lines (possibly split over several lines) that are
/// serialized `DagsterEvent`s, returned as their original text.
pub fn filter_events(log: &str) -> Vec<String> {
    let mut coalesced = Vec::new();
    let mut buffer: Vec<&str> = Vec::new();
    let mut in_split = false;
    for raw in log.split('\n') {
        let line = raw.trim();
        if !in_split && line.starts_with('{') {
            if line.ends_with('}') {
                coalesced.push(line.to_string());
            } else {
                buffer.push(line);
                in_split = true;
            }
        } else if in_split {
            buffer.push(line);
            if line.ends_with('}') {
                coalesced.push(buffer.concat());
                buffer.clear();
                in_split = false;
            }
        }
    }
    coalesced
        .into_iter()
        .filter(|l| {
            celeriac_wire::json::parse_lenient(l.as_bytes())
                .ok()
                .is_some_and(|v| v.get("__class__").and_then(Value::as_str) == Some("DagsterEvent"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_event_matches_captured_row() {
        // captures/db_event_log_rows.json, event 38 (keys and values, timestamp aside).
        let step = StepRef {
            run_id: "ba924453-6cab-4ef7-9f6b-ee3c7a9eef4a",
            job_name: "ck8s_job",
            step_key: "say_hello",
        };
        let e = engine_event(
            &step,
            "Task for step say_hello picked up by Celery",
            &[
                (
                    "Celery worker name",
                    Meta::Text("research-worker@vm".into()),
                ),
                ("Celery worker Kubernetes Pod name", Meta::Null),
            ],
            None,
            None,
        );
        let mut got: Value = serde_json::from_str(e.entry_json()).expect("entry JSON");
        got["timestamp"] = json!(1795393521.2771187);
        let want: Value = serde_json::from_str(r#"{"__class__": "EventLogEntry", "dagster_event": {"__class__": "DagsterEvent", "event_specific_data": {"__class__": "EngineEventData", "error": null, "marker_end": null, "marker_start": null, "metadata_entries": [{"__class__": "EventMetadataEntry", "description": null, "entry_data": {"__class__": "TextMetadataEntryData", "text": "research-worker@vm"}, "label": "Celery worker name"}, {"__class__": "EventMetadataEntry", "description": null, "entry_data": {"__class__": "NullMetadataEntryData"}, "label": "Celery worker Kubernetes Pod name"}]}, "event_type_value": "ENGINE_EVENT", "logging_tags": {}, "message": "[CeleryK8sJobExecutor] Task for step say_hello picked up by Celery", "pid": null, "pipeline_name": "ck8s_job", "solid_handle": null, "step_handle": null, "step_key": "say_hello", "step_kind_value": null}, "error_info": null, "level": 20, "message": "", "pipeline_name": "ck8s_job", "run_id": "ba924453-6cab-4ef7-9f6b-ee3c7a9eef4a", "step_key": "say_hello", "timestamp": 1795393521.2771187, "user_message": ""}"#).expect("capture JSON");
        assert_eq!(got, want);
        assert!(e.entry_json().starts_with(r#"{"__class__": "EventLogEntry", "dagster_event": {"__class__": "DagsterEvent", "event_specific_data""#));
    }

    #[test]
    fn filters_split_and_foreign_lines() {
        let log = "noise\n{\"__class__\": \"DagsterEvent\", \"a\": 1}\n{\"__class__\": \"Other\"}\n{\"__class__\": \"DagsterEvent\",\n \"b\": 2}\n{not json}\n";
        assert_eq!(
            filter_events(log),
            vec![
                r#"{"__class__": "DagsterEvent", "a": 1}"#.to_string(),
                r#"{"__class__": "DagsterEvent","b": 2}"#.to_string()
            ]
        );
    }

    #[test]
    fn filters_real_pod_log() {
        // A step pod log captured from a real run (captures/k8s/R1-pod-*.log).
        let text = include_str!("../tests/fixtures/step_pod.log");
        let events = filter_events(text);
        assert!(
            events.iter().any(|l| l.contains("\"STEP_SUCCESS\"")),
            "{events:?}"
        );
        assert!(events
            .iter()
            .all(|l| l.starts_with('{') && l.contains("DagsterEvent")));
    }
}
