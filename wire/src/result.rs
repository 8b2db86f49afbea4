//! Celery result documents (`celery/backends/base.py::_get_result_meta`), byte-compatible with Python.
//!
//! The same meta JSON travels over both result backends: as the body of an `rpc://` reply and as the value
//! of `celery-task-meta-<id>` on `redis://`. Key order is Celery's; serialization is Python's `json.dumps`.

use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};

use crate::json::to_python_string;

/// Task states a worker stores (`celery/states.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Started,
    Retry,
    Success,
    Failure,
    Revoked,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Started => "STARTED",
            State::Retry => "RETRY",
            State::Success => "SUCCESS",
            State::Failure => "FAILURE",
            State::Revoked => "REVOKED",
        }
    }

    /// READY states carry a `date_done` and are never overwritten.
    pub fn is_ready(self) -> bool {
        matches!(self, State::Success | State::Failure | State::Revoked)
    }
}

/// A serialized exception as Celery's JSON serializer writes it. Python clients rebuild it with
/// `getattr(sys.modules[exc_module], exc_type)(*exc_message)`, falling back to a synthetic class, so
/// `exc_module` must name a real module for builtins or any module for custom names.
#[derive(Debug, Clone, PartialEq)]
pub struct ExceptionInfo {
    pub exc_type: String,
    pub exc_message: Vec<Value>,
    pub exc_module: String,
}

impl ExceptionInfo {
    pub fn new(exc_type: &str, exc_module: &str, message: impl Into<String>) -> Self {
        Self {
            exc_type: exc_type.into(),
            exc_message: vec![Value::String(message.into())],
            exc_module: exc_module.into(),
        }
    }

    /// `celery.exceptions.NotRegistered(<name>)`.
    pub fn not_registered(task: &str) -> Self {
        Self::new("NotRegistered", "celery.exceptions", task)
    }

    /// `celery.exceptions.TaskRevokedError(<reason>)` with reason `revoked` or `expired`.
    pub fn revoked(reason: &str) -> Self {
        Self::new("TaskRevokedError", "celery.exceptions", reason)
    }

    /// Python's `repr(exc)`, used in `task-failed` events: `ValueError('bad value', 42)`.
    pub fn repr(&self) -> String {
        let args: Vec<String> = self.exc_message.iter().map(python_repr).collect();
        format!("{}({})", self.exc_type, args.join(", "))
    }

    fn to_value(&self) -> Value {
        json!({"exc_type": self.exc_type, "exc_message": self.exc_message, "exc_module": self.exc_module})
    }
}

/// Python `repr` of a JSON scalar, enough for exception arguments.
fn python_repr(v: &Value) -> String {
    match v {
        Value::String(s) => {
            let escaped = s
                .replace('\\', "\\\\")
                .replace('\'', "\\'")
                .replace('\n', "\\n");
            format!("'{escaped}'")
        }
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        other => to_python_string(other, false),
    }
}

/// One result document.
#[derive(Debug, Clone)]
pub struct ResultMeta {
    pub task_id: String,
    pub state: State,
    pub result: Value,
    pub traceback: Option<String>,
    pub date_done: Option<DateTime<Utc>>,
    pub parent_id: Option<String>,
    pub group_id: Option<String>,
}

impl ResultMeta {
    pub fn success(task_id: &str, result: Value) -> Self {
        Self::ready(task_id, State::Success, result, None)
    }

    pub fn failure(task_id: &str, exc: &ExceptionInfo, traceback: Option<String>) -> Self {
        Self::ready(task_id, State::Failure, exc.to_value(), traceback)
    }

    pub fn revoked(task_id: &str, reason: &str) -> Self {
        Self::ready(
            task_id,
            State::Revoked,
            ExceptionInfo::revoked(reason).to_value(),
            None,
        )
    }

    /// `STARTED` as stored with `task_track_started`: `{"pid": .., "hostname": ..}`.
    pub fn started(task_id: &str, pid: u32, hostname: &str) -> Self {
        Self {
            task_id: task_id.into(),
            state: State::Started,
            result: json!({"pid": pid, "hostname": hostname}),
            traceback: None,
            date_done: None,
            parent_id: None,
            group_id: None,
        }
    }

    fn ready(task_id: &str, state: State, result: Value, traceback: Option<String>) -> Self {
        Self {
            task_id: task_id.into(),
            state,
            result,
            traceback,
            date_done: Some(Utc::now()),
            parent_id: None,
            group_id: None,
        }
    }

    pub fn with_lineage(mut self, parent_id: Option<String>, group_id: Option<String>) -> Self {
        self.parent_id = parent_id;
        self.group_id = group_id;
        self
    }

    /// The meta object in Celery's key order.
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("status".into(), Value::String(self.state.as_str().into()));
        m.insert("result".into(), self.result.clone());
        m.insert(
            "traceback".into(),
            self.traceback.clone().map_or(Value::Null, Value::String),
        );
        m.insert("children".into(), Value::Array(Vec::new()));
        m.insert(
            "date_done".into(),
            self.date_done
                .map_or(Value::Null, |d| Value::String(python_isoformat(d))),
        );
        if let Some(g) = &self.group_id {
            m.insert("group_id".into(), Value::String(g.clone()));
        }
        if let Some(p) = &self.parent_id {
            m.insert("parent_id".into(), Value::String(p.clone()));
        }
        m.insert("task_id".into(), Value::String(self.task_id.clone()));
        Value::Object(m)
    }

    /// The exact bytes Celery would publish / store.
    pub fn to_json(&self) -> String {
        to_python_string(&self.to_value(), false)
    }
}

/// Python's `datetime.isoformat()` for an aware UTC datetime: microseconds only when non-zero.
pub fn python_isoformat(d: DateTime<Utc>) -> String {
    if d.timestamp_subsec_micros() == 0 {
        d.format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
    } else {
        d.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn revoked_meta_matches_captured_bytes() {
        // captures/celery_rpc_result_messages.json, message 1 (body_utf8).
        let mut meta = ResultMeta::revoked("f075a956-b014-441c-9839-b2529694bb9c", "revoked");
        meta.date_done = Some(
            Utc.with_ymd_and_hms(2026, 11, 23, 0, 27, 9).unwrap()
                + chrono::Duration::microseconds(244671),
        );
        assert_eq!(
            meta.to_json(),
            r#"{"status": "REVOKED", "result": {"exc_type": "TaskRevokedError", "exc_message": ["revoked"], "exc_module": "celery.exceptions"}, "traceback": null, "children": [], "date_done": "2026-11-23T00:27:09.244671+00:00", "task_id": "f075a956-b014-441c-9839-b2529694bb9c"}"#
        );
    }

    #[test]
    fn started_has_no_date_done() {
        let v = ResultMeta::started("t", 42, "w@h").to_value();
        assert_eq!(v["status"], "STARTED");
        assert_eq!(v["date_done"], Value::Null);
        assert_eq!(v["result"], json!({"pid": 42, "hostname": "w@h"}));
    }

    #[test]
    fn exception_repr_is_pythonic() {
        let e = ExceptionInfo {
            exc_type: "ValueError".into(),
            exc_message: vec![json!("bad value"), json!(42)],
            exc_module: "builtins".into(),
        };
        assert_eq!(e.repr(), "ValueError('bad value', 42)");
        assert_eq!(
            ExceptionInfo::not_registered("x.y").repr(),
            "NotRegistered('x.y')"
        );
    }

    #[test]
    fn isoformat_drops_zero_micros() {
        let d = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        assert_eq!(python_isoformat(d), "2026-01-02T03:04:05+00:00");
    }
}
