//! One task as the events describe it (`celery.events.state.Task`): the record every part of flower-compat
//! reads — the state merges events into it, the history store persists it, the API, metrics, search,
//! charts and timeline read it. It lives apart from [`crate::state`] so that those readers depend on the
//! record only, not on the merging (which itself reports to the metrics and uses the search).
//!
//! Each event sets its timestamp field (`received`, `started`, …) and, when its state does not rank
//! below the current one (`celery.states.precedence`), its fields and state; an out-of-order
//! `task-received` only fills `name, args, kwargs, parent_id, root_id, retries, eta, expires`.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// `celery.states.PRECEDENCE`: lower index wins; unknown states rank like `None`.
fn precedence(state: &str) -> usize {
    match state {
        "SUCCESS" => 0,
        "FAILURE" => 1,
        "REVOKED" => 3,
        "STARTED" => 4,
        "RECEIVED" => 5,
        "REJECTED" => 6,
        "RETRY" => 7,
        "PENDING" => 8,
        _ => 2,
    }
}

/// The fields of `celery.events.state.Task._fields`, in order (the keys of `/api/tasks` entries).
pub const TASK_FIELDS: [&str; 31] = [
    "uuid",
    "name",
    "state",
    "received",
    "sent",
    "started",
    "rejected",
    "succeeded",
    "failed",
    "retried",
    "revoked",
    "args",
    "kwargs",
    "eta",
    "expires",
    "retries",
    "worker",
    "result",
    "exception",
    "timestamp",
    "runtime",
    "traceback",
    "exchange",
    "routing_key",
    "clock",
    "client",
    "root",
    "root_id",
    "parent",
    "parent_id",
    "children",
];

/// One task as the events describe it. Serialized as is for the history store.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Task {
    pub uuid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub succeeded: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retried: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kwargs: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exception: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceback: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchange: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_key: Option<Value>,
    #[serde(default = "zero")]
    pub clock: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<String>,
    /// Local time this process (or its predecessor, for restored history) first saw the task: the
    /// eviction order and the age bound.
    #[serde(default)]
    pub first_seen: f64,
}

fn zero() -> Value {
    json!(0)
}

fn opt_f64(v: Option<f64>) -> Value {
    v.map(Value::from).unwrap_or(Value::Null)
}

fn opt<T: Clone + Into<Value>>(v: &Option<T>) -> Value {
    v.clone().map(Into::into).unwrap_or(Value::Null)
}

impl Task {
    pub fn new(uuid: &str, first_seen: f64) -> Task {
        Task {
            uuid: uuid.to_string(),
            state: "PENDING".into(),
            clock: zero(),
            first_seen,
            ..Default::default()
        }
    }

    /// `Task.as_dict()`: every field of [`TASK_FIELDS`], `worker` as the hostname (or null).
    pub fn as_dict(&self) -> Map<String, Value> {
        let mut m = Map::new();
        for key in TASK_FIELDS {
            let v = match key {
                "uuid" => json!(self.uuid),
                "name" => opt(&self.name),
                "state" => json!(self.state),
                "received" => opt_f64(self.received),
                "sent" => opt_f64(self.sent),
                "started" => opt_f64(self.started),
                "rejected" => opt_f64(self.rejected),
                "succeeded" => opt_f64(self.succeeded),
                "failed" => opt_f64(self.failed),
                "retried" => opt_f64(self.retried),
                "revoked" => opt_f64(self.revoked),
                "args" => opt(&self.args),
                "kwargs" => opt(&self.kwargs),
                "eta" => opt(&self.eta),
                "expires" => opt(&self.expires),
                "retries" => opt(&self.retries),
                "worker" => opt(&self.worker),
                "result" => opt(&self.result),
                "exception" => opt(&self.exception),
                "timestamp" => opt_f64(self.timestamp),
                "runtime" => opt(&self.runtime),
                "traceback" => opt(&self.traceback),
                "exchange" => opt(&self.exchange),
                "routing_key" => opt(&self.routing_key),
                "clock" => self.clock.clone(),
                "client" => opt(&self.client),
                "root" | "root_id" => opt(&self.root_id),
                "parent" | "parent_id" => opt(&self.parent_id),
                "children" => json!(self.children),
                _ => Value::Null,
            };
            m.insert(key.to_string(), v);
        }
        m
    }

    /// `/api/tasks` entry: like [`Task::as_dict`] but without `worker` when no worker is known (Flower pops
    /// it and only puts the hostname back).
    pub fn list_entry(&self) -> Map<String, Value> {
        let mut m = self.as_dict();
        if let Some(w) = m.remove("worker") {
            if !w.is_null() {
                m.insert("worker".into(), w);
            }
        }
        m
    }

    /// The timestamp field named after the event (`received` for `task-received` …).
    fn stamp(&mut self, subject: &str, ts: Option<f64>) -> Option<&'static str> {
        let (slot, state) = match subject {
            "sent" => (&mut self.sent, "PENDING"),
            "received" => (&mut self.received, "RECEIVED"),
            "started" => (&mut self.started, "STARTED"),
            "failed" => (&mut self.failed, "FAILURE"),
            "retried" => (&mut self.retried, "RETRY"),
            "succeeded" => (&mut self.succeeded, "SUCCESS"),
            "revoked" => (&mut self.revoked, "REVOKED"),
            "rejected" => (&mut self.rejected, "REJECTED"),
            _ => return None,
        };
        *slot = ts;
        Some(state)
    }

    fn set_field(&mut self, key: &str, v: &Value) {
        match key {
            "name" => self.name = v.as_str().map(str::to_owned),
            "args" => self.args = Some(v.clone()),
            "kwargs" => self.kwargs = Some(v.clone()),
            "eta" => self.eta = Some(v.clone()),
            "expires" => self.expires = Some(v.clone()),
            "retries" => self.retries = Some(v.clone()),
            "result" => self.result = Some(v.clone()),
            "exception" => self.exception = Some(v.clone()),
            "timestamp" => self.timestamp = v.as_f64(),
            "runtime" => self.runtime = Some(v.clone()),
            "traceback" => self.traceback = Some(v.clone()),
            "exchange" => self.exchange = Some(v.clone()),
            "routing_key" => self.routing_key = Some(v.clone()),
            "clock" => self.clock = v.clone(),
            "root_id" => self.root_id = Some(v.clone()),
            "parent_id" => self.parent_id = Some(v.clone()),
            _ => {}
        }
    }

    /// `Task.event(type_, timestamp, local_received, fields)`.
    pub fn apply(&mut self, subject: &str, ts: Option<f64>, fields: &Map<String, Value>) {
        let state = match self.stamp(subject, ts) {
            Some(s) => s.to_string(),
            None => subject.to_uppercase(),
        };
        if state != "RETRY" && self.state != "RETRY" && precedence(&state) > precedence(&self.state)
        {
            // An event older than what we know: a late `task-received` still tells the name and args.
            const KEEP: [&str; 8] = [
                "name",
                "args",
                "kwargs",
                "parent_id",
                "root_id",
                "retries",
                "eta",
                "expires",
            ];
            for (k, v) in fields {
                if state != "RECEIVED" || KEEP.contains(&k.as_str()) {
                    self.set_field(k, v);
                }
            }
        } else {
            for (k, v) in fields {
                self.set_field(k, v);
            }
            self.state = state;
            self.timestamp = ts;
        }
    }
}
