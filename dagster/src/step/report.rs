//! What a step task reports: engine events stored in the run's event log (through the background
//! [`EventWriter`], so a database fault never fails the step) and returned in the result, with their
//! metadata values written the way Python writes them.

use serde_json::Value;

use super::event_writer::EventWriter;
use crate::events::{engine_event, ErrorInfo, Event, Meta, StepRef};

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
