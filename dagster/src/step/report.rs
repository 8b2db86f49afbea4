//! What a step task reports: engine events stored in the run's event log (through the background
//! [`EventWriter`], so a database fault never fails the step) and returned in the result, with their
//! metadata values written the way Python writes them.

use serde_json::Value;

use super::event_writer::EventWriter;
use celeriac_worker::tasks::TaskContext;

use crate::events::{engine_event, ErrorInfo, Event, Meta, StepRef};
use crate::launcher::{FailureClass, StepRun};

/// Stores events in the run's event log (through the [`EventWriter`]): a database fault never fails
/// the step, and the events still reach the run worker in the task's result.
pub(super) struct Reporter<'a> {
    pub writer: &'a EventWriter,
    pub step: StepRef<'a>,
}

impl Reporter<'_> {
    pub async fn store(&self, event: Event) -> Event {
        self.writer.send(event.clone());
        event
    }

    pub async fn engine(
        &self,
        message: &str,
        metadata: &[(&str, Meta)],
        marker_end: Option<&str>,
        error: Option<&ErrorInfo>,
    ) -> Event {
        self.store(engine_event(
            &self.step, message, metadata, marker_end, error,
        ))
        .await
    }
}

pub(super) fn text(s: &str) -> Meta {
    Meta::Text(s.to_string())
}

/// A metadata value Python passes through as-is: a string, or `None` (→ `NullMetadataEntryData`).
pub(super) fn optional(v: Option<&Value>) -> Meta {
    match v {
        Some(Value::String(s)) => Meta::Text(s.clone()),
        Some(Value::Null) | None => Meta::Null,
        Some(other) => Meta::Text(celeriac_wire::json::python_repr(other)),
    }
}

/// Python's `str(x)`: `"None"` for a missing value.
pub(super) fn python_str(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "None".into(),
        Some(other) => celeriac_wire::json::python_repr(other),
    }
}

/// 4. E1, stored only.
pub(super) async fn picked_up(reporter: &Reporter<'_>, ctx: &TaskContext) {
    let pod_name = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty());
    reporter
        .engine(
            &format!(
                "Task for step {} picked up by Celery",
                reporter.step.step_key
            ),
            &[
                ("Celery worker name", text(&ctx.hostname)),
                (
                    "Celery worker Kubernetes Pod name",
                    pod_name.map_or(Meta::Null, Meta::Text),
                ),
            ],
            None,
            None,
        )
        .await;
}

/// Step 15: "Retrieving logs" (stored, and returned: its serialized event) and one engine event per
/// pod whose logs could not be read.
pub(super) async fn retrieving_logs(
    reporter: &Reporter<'_>,
    class: &FailureClass,
    job: &str,
    step_key: &str,
    step_run: &StepRun,
) -> String {
    let retrieving = reporter
        .engine(
            "Retrieving logs from Kubernetes Job pods",
            &[("Pod names", Meta::Text(step_run.pod_names.join("\n")))],
            None,
            None,
        )
        .await;
    for log_error in &step_run.log_errors {
        let err = ErrorInfo::new(class.module, class.name, &log_error.message);
        reporter
            .engine(
                &format!(
                    "Encountered unexpected error while fetching pod logs for Kubernetes job {job}, Pod name {} for step {step_key}. Will attempt to continue with other pods.",
                    log_error.pod_name
                ),
                &[("Step key", text(step_key))],
                None,
                Some(&err),
            )
            .await;
    }
    retrieving.dagster_event_json()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn python_str_and_optional_metadata() {
        assert_eq!(python_str(None), "None");
        assert_eq!(python_str(Some(&json!([]))), "[]");
        assert_eq!(python_str(Some(&json!([{"name": "s"}]))), "[{'name': 's'}]");
        assert!(matches!(optional(Some(&Value::Null)), Meta::Null));
        assert!(
            matches!(optional(Some(&json!("IfNotPresent"))), Meta::Text(t) if t == "IfNotPresent")
        );
    }
}
