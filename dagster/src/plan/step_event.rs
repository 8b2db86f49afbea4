//! What the engine reads of a `DagsterEvent` a step reported: its type, step, and (for outputs and
//! retries) the output handle and the wait. The event itself stays opaque JSON everywhere else.

use serde_json::Value;

use super::state::OutputHandle;
use crate::serdes::{self, Obj, SerdesError};

/// The facts of one `DagsterEvent` that drive scheduling.
#[derive(Debug, Clone, PartialEq)]
pub struct StepEvent {
    /// `event_type_value` (`STEP_SUCCESS`, `STEP_OUTPUT`, …).
    pub event_type: String,
    pub step_key: Option<String>,
    /// `step_output_data.step_output_handle` of a `STEP_OUTPUT`.
    pub output: Option<OutputHandle>,
    /// `step_retry_data.seconds_to_wait` of a `STEP_UP_FOR_RETRY`.
    pub seconds_to_wait: Option<f64>,
}

impl StepEvent {
    /// Reads a packed `DagsterEvent`.
    pub fn decode(v: &Value) -> Result<Self, SerdesError> {
        let o = Obj::expect(v, &["DagsterEvent"], "DagsterEvent")?;
        let event_type = o.str("event_type_value")?.to_string();
        let step_key = o.opt_str("step_key")?.map(str::to_string);
        let data = o.get("event_specific_data").filter(|d| !d.is_null());
        let mut output = None;
        let mut seconds_to_wait = None;
        match (event_type.as_str(), data) {
            ("STEP_OUTPUT", Some(d)) => {
                let path = o.path_of("event_specific_data");
                let od = Obj::expect(d, &["StepOutputData"], &path)?;
                output = Some(OutputHandle::decode(
                    od.field("step_output_handle")?,
                    &od.path_of("step_output_handle"),
                )?);
            }
            ("STEP_UP_FOR_RETRY", Some(d)) => {
                let path = o.path_of("event_specific_data");
                let rd = Obj::expect(d, &["StepRetryData"], &path)?;
                seconds_to_wait = match rd.get("seconds_to_wait") {
                    None | Some(Value::Null) => None,
                    Some(n) => Some(n.as_f64().ok_or_else(|| SerdesError::Shape {
                        path: rd.path_of("seconds_to_wait"),
                        expected: "float".into(),
                        found: serdes::kind(n).into(),
                    })?),
                };
            }
            ("STEP_OUTPUT" | "STEP_UP_FOR_RETRY", None) => {
                return Err(SerdesError::Shape {
                    path: o.path_of("event_specific_data"),
                    expected: "StepOutputData or StepRetryData".into(),
                    found: "None".into(),
                })
            }
            _ => {}
        }
        Ok(StepEvent {
            event_type,
            step_key,
            output,
            seconds_to_wait,
        })
    }

    /// Reads one element of a step task's result list (serdes JSON text).
    pub fn parse(text: &str) -> Result<Self, SerdesError> {
        Self::decode(&serdes::parse(text.as_bytes())?)
    }
}
