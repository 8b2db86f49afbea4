//! Celery task messages: the broker-neutral raw form and the decoded task request.
//!
//! Brokers hand the worker a [`RawMessage`] (body bytes, headers as JSON, AMQP-style properties). Decoding
//! follows Celery's dispatch rule (`celery/worker/consumer/consumer.py::create_task_handler`): a `task`
//! header means protocol v2 (or "hybrid" when the body is a v1 dict), otherwise a body dict with `task`
//! is protocol v1, otherwise the message is not a task at all. Each failure carries the disposition Celery
//! chooses for it ([`Disposition`]), so the worker never has to guess whether to ack or reject.

use chrono::{DateTime, FixedOffset, Utc};
use serde_json::{Map, Value};

use crate::json;

/// AMQP basic properties as Celery uses them (the Redis envelope carries the same names).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Properties {
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub delivery_mode: Option<u8>,
    pub priority: Option<u8>,
    /// Milliseconds as a decimal string, set from `expires` by Celery clients (RabbitMQ enforces it).
    pub expiration: Option<String>,
}

/// Where a message came from: the exchange and routing key it was published with.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeliveryInfo {
    pub exchange: String,
    pub routing_key: String,
    pub redelivered: bool,
    /// The queue this worker consumed it from.
    pub queue: String,
}

/// A message as delivered by any broker, before any Celery interpretation.
#[derive(Debug, Clone, Default)]
pub struct RawMessage {
    pub body: Vec<u8>,
    pub content_type: String,
    pub content_encoding: String,
    pub headers: Map<String, Value>,
    pub properties: Properties,
    pub delivery_info: DeliveryInfo,
}

impl RawMessage {
    /// The task id if the headers (or the correlation id) tell it, even when the rest does not decode.
    pub fn task_id_hint(&self) -> Option<&str> {
        self.headers
            .get("id")
            .and_then(Value::as_str)
            .or(self.properties.correlation_id.as_deref())
    }
}

/// What the broker should do with a message the worker cannot run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Acknowledge: the message is consumed (Celery does this for undecodable bodies so they cannot loop).
    Ack,
    /// Reject without requeue (dead-lettered if the queue has a DLX, dropped otherwise).
    Reject,
}

/// Why a message is not a runnable task, mirroring Celery's handlers.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(
        "Refusing to deserialize untrusted content of type {content_type} (allowed: {allowed})"
    )]
    ContentDisallowed {
        content_type: String,
        allowed: String,
    },
    #[error("Can't decode message body: {0}")]
    Undecodable(String),
    #[error("Received invalid task message: {0}")]
    InvalidTask(String),
    #[error("Received and deleted unknown message. Wrong destination?!? (no task header, body is not a task)")]
    UnknownMessage,
    #[error("Message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
}

impl DecodeError {
    /// The broker action Celery takes for this failure (spec §3.1).
    pub fn disposition(&self) -> Disposition {
        match self {
            DecodeError::Undecodable(_) => Disposition::Ack,
            _ => Disposition::Reject,
        }
    }

    /// Whether Celery would store a FAILURE result for it. Only oversized messages (a celeriac limit
    /// with no Celery equivalent) get one, so the publisher is not left waiting for a task we refused.
    pub fn stores_failure(&self) -> bool {
        matches!(self, DecodeError::TooLarge { .. })
    }
}

/// A decoded task request: everything the worker needs, in protocol-v2 terms.
#[derive(Debug, Clone)]
pub struct TaskRequest {
    pub id: String,
    /// Registered task name (`headers.task`).
    pub task: String,
    /// Display name: `shadow` or `task`.
    pub name: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub embed: Value,
    pub retries: i64,
    pub eta: Option<DateTime<FixedOffset>>,
    pub expires: Option<DateTime<FixedOffset>>,
    /// `[hard, soft]` seconds.
    pub time_limit: (Option<f64>, Option<f64>),
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    pub group: Option<String>,
    pub argsrepr: String,
    pub kwargsrepr: String,
    pub origin: Option<String>,
    pub ignore_result: Option<bool>,
    pub reply_to: Option<String>,
    pub correlation_id: String,
    pub priority: u8,
    pub delivery_info: DeliveryInfo,
    /// The raw headers, kept for extensions (`stamps`, custom headers).
    pub headers: Map<String, Value>,
}

impl TaskRequest {
    /// True once `expires` has passed.
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires.is_some_and(|e| e < now)
    }
}

/// Decodes a raw message into a task request, applying Celery's acceptance and validation rules.
pub fn decode(
    raw: &RawMessage,
    accept_content: &[String],
    max_bytes: Option<usize>,
) -> Result<TaskRequest, DecodeError> {
    if let Some(limit) = max_bytes {
        if raw.body.len() > limit {
            return Err(DecodeError::TooLarge {
                size: raw.body.len(),
                limit,
            });
        }
    }
    let content_type = if raw.content_type.is_empty() {
        "application/json"
    } else {
        raw.content_type.as_str()
    };
    if !accept_content
        .iter()
        .any(|a| a == content_type || short_content_name(content_type) == a.as_str())
    {
        return Err(DecodeError::ContentDisallowed {
            content_type: clip(short_content_name(content_type)),
            allowed: accept_content.join(", "),
        });
    }
    if content_type != "application/json" {
        // Only JSON is implemented; anything else that was explicitly allowed still cannot be read.
        return Err(DecodeError::Undecodable(format!(
            "unsupported content type {}",
            clip(content_type)
        )));
    }
    let body =
        json::parse_lenient(&raw.body).map_err(|e| DecodeError::Undecodable(e.to_string()))?;

    let has_task_header = raw.headers.get("task").is_some_and(|t| !t.is_null());
    if has_task_header {
        match &body {
            Value::Object(map) if map.contains_key("args") => from_hybrid(raw, map),
            _ => from_v2(raw, body),
        }
    } else if let Value::Object(map) = &body {
        if map.get("task").is_some_and(Value::is_string) {
            from_v1(raw, map)
        } else {
            Err(DecodeError::UnknownMessage)
        }
    } else {
        Err(DecodeError::UnknownMessage)
    }
}

/// At most 200 characters of an outside value for an error message: a hostile message must not turn
/// into a 16 MB log line.
fn clip(s: impl std::fmt::Display) -> String {
    json::truncate_repr(s.to_string(), 200)
}

fn short_content_name(ct: &str) -> &str {
    match ct {
        "application/json" => "json",
        "application/x-python-serialize" => "pickle",
        "application/x-yaml" => "yaml",
        "application/x-msgpack" => "msgpack",
        other => other,
    }
}

fn from_v2(raw: &RawMessage, body: Value) -> Result<TaskRequest, DecodeError> {
    let Value::Array(parts) = body else {
        return Err(DecodeError::InvalidTask(
            "protocol 2 body must be [args, kwargs, embed]".into(),
        ));
    };
    let mut parts = parts.into_iter();
    let args = match parts.next() {
        Some(Value::Array(a)) => a,
        Some(Value::Null) | None => Vec::new(),
        Some(other) => {
            return Err(DecodeError::InvalidTask(format!(
                "args must be a list, got {}",
                clip(other)
            )))
        }
    };
    let kwargs = match parts.next() {
        Some(Value::Object(k)) => k,
        Some(Value::Null) | None => Map::new(),
        Some(_) => {
            return Err(DecodeError::InvalidTask(
                "task keyword arguments is not a mapping".into(),
            ))
        }
    };
    let embed = parts.next().unwrap_or(Value::Null);
    build(raw, &raw.headers, args, kwargs, embed)
}

fn from_hybrid(raw: &RawMessage, body: &Map<String, Value>) -> Result<TaskRequest, DecodeError> {
    // Headers taken from the body, then overridden by the message headers.
    let mut headers = body.clone();
    for (k, v) in &raw.headers {
        headers.insert(k.clone(), v.clone());
    }
    let (args, kwargs) = v1_args(body)?;
    build(raw, &headers, args, kwargs, v1_embed(body))
}

fn from_v1(raw: &RawMessage, body: &Map<String, Value>) -> Result<TaskRequest, DecodeError> {
    let (args, kwargs) = v1_args(body)?;
    let mut headers = body.clone();
    if let Some(taskset) = body.get("taskset") {
        headers.insert("group".into(), taskset.clone());
    }
    headers.remove("args");
    headers.remove("kwargs");
    build(raw, &headers, args, kwargs, v1_embed(body))
}

fn v1_args(body: &Map<String, Value>) -> Result<(Vec<Value>, Map<String, Value>), DecodeError> {
    let args = match body.get("args") {
        Some(Value::Array(a)) => a.clone(),
        Some(Value::Null) | None => {
            return Err(DecodeError::InvalidTask(
                "Message does not have args".into(),
            ));
        }
        Some(_) => return Err(DecodeError::InvalidTask("args must be a list".into())),
    };
    let kwargs = match body.get("kwargs") {
        Some(Value::Object(k)) => k.clone(),
        Some(Value::Null) | None => Map::new(),
        Some(_) => {
            return Err(DecodeError::InvalidTask(
                "task keyword arguments is not a mapping".into(),
            ))
        }
    };
    Ok((args, kwargs))
}

fn v1_embed(body: &Map<String, Value>) -> Value {
    let get = |k: &str| body.get(k).cloned().unwrap_or(Value::Null);
    serde_json::json!({"callbacks": get("callbacks"), "errbacks": get("errbacks"), "chain": null, "chord": get("chord")})
}

fn build(
    raw: &RawMessage,
    headers: &Map<String, Value>,
    args: Vec<Value>,
    kwargs: Map<String, Value>,
    embed: Value,
) -> Result<TaskRequest, DecodeError> {
    let str_of = |k: &str| headers.get(k).and_then(Value::as_str).map(str::to_owned);
    let task =
        str_of("task").ok_or_else(|| DecodeError::InvalidTask("missing task name".into()))?;
    let id = str_of("id")
        .or_else(|| raw.properties.correlation_id.clone())
        .ok_or_else(|| DecodeError::InvalidTask(format!("task {} has no id", clip(&task))))?;
    let eta = parse_time(headers.get("eta"), "eta")?;
    let expires = parse_time(headers.get("expires"), "expires")?;
    let time_limit = match headers.get("timelimit") {
        Some(Value::Array(l)) => (
            l.first().and_then(Value::as_f64),
            l.get(1).and_then(Value::as_f64),
        ),
        _ => (None, None),
    };
    let argsrepr = str_of("argsrepr").unwrap_or_else(|| python_repr_args(&args));
    let kwargsrepr = str_of("kwargsrepr").unwrap_or_else(|| format!("{} keys", kwargs.len()));
    Ok(TaskRequest {
        name: str_of("shadow").unwrap_or_else(|| task.clone()),
        correlation_id: raw
            .properties
            .correlation_id
            .clone()
            .unwrap_or_else(|| id.clone()),
        id,
        task,
        args,
        kwargs,
        embed,
        retries: headers.get("retries").and_then(Value::as_i64).unwrap_or(0),
        eta,
        expires,
        time_limit,
        root_id: str_of("root_id"),
        parent_id: str_of("parent_id"),
        group: str_of("group"),
        argsrepr,
        kwargsrepr,
        origin: str_of("origin"),
        ignore_result: headers.get("ignore_result").and_then(Value::as_bool),
        reply_to: raw.properties.reply_to.clone().filter(|r| !r.is_empty()),
        priority: raw.properties.priority.unwrap_or(0),
        delivery_info: raw.delivery_info.clone(),
        headers: headers.clone(),
    })
}

fn python_repr_args(args: &[Value]) -> String {
    let inner: Vec<String> = args
        .iter()
        .map(|a| json::to_python_string(a, false))
        .collect();
    if inner.len() == 1 {
        format!("({},)", inner[0])
    } else {
        format!("({})", inner.join(", "))
    }
}

/// Parses an ISO-8601 `eta`/`expires` header. Naive times are taken as UTC (celeriac workers run in UTC,
/// which is what Celery's `maybe_make_aware` does on a UTC worker).
fn parse_time(v: Option<&Value>, what: &str) -> Result<Option<DateTime<FixedOffset>>, DecodeError> {
    let s = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s,
        Some(Value::Object(m)) if m.get("__type__").and_then(Value::as_str) == Some("datetime") => {
            match m.get("__value__").and_then(Value::as_str) {
                Some(s) => s,
                None => return Err(DecodeError::InvalidTask(format!("invalid {what} marker"))),
            }
        }
        Some(other) => {
            return Err(DecodeError::InvalidTask(format!(
                "invalid {what} value {}",
                clip(other)
            )))
        }
    };
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(Some(t));
    }
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S",
    ] {
        if let Ok(naive) = chrono::NaiveDateTime::parse_from_str(s, fmt) {
            return Ok(Some(naive.and_utc().fixed_offset()));
        }
    }
    Err(DecodeError::InvalidTask(format!(
        "invalid {what} value {}",
        clip(format!("{s:?}"))
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn json_accept() -> Vec<String> {
        vec!["json".into()]
    }

    fn raw_v2(headers: Value, body: &str) -> RawMessage {
        RawMessage {
            body: body.as_bytes().to_vec(),
            content_type: "application/json".into(),
            content_encoding: "utf-8".into(),
            headers: headers.as_object().cloned().unwrap_or_default(),
            properties: Properties {
                correlation_id: Some("cid".into()),
                reply_to: Some("oid".into()),
                priority: Some(7),
                ..Default::default()
            },
            delivery_info: DeliveryInfo::default(),
        }
    }

    #[test]
    fn decodes_protocol_2() {
        let raw = raw_v2(
            json!({"lang": "py", "task": "capapp.add", "id": "1111", "shadow": null,
                   "eta": "2026-11-23T00:36:17.765360+00:00", "expires": null, "retries": 0,
                   "timelimit": [60, 50], "root_id": "1111", "parent_id": null,
                   "argsrepr": "(2, 3)", "kwargsrepr": "{'z': 1}", "ignore_result": false}),
            r#"[[2, 3], {"z": 1}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#,
        );
        let req = decode(&raw, &json_accept(), None).expect("v2 decodes");
        assert_eq!(req.id, "1111");
        assert_eq!(req.task, "capapp.add");
        assert_eq!(req.args, vec![json!(2), json!(3)]);
        assert_eq!(req.kwargs.get("z"), Some(&json!(1)));
        assert_eq!(req.time_limit, (Some(60.0), Some(50.0)));
        assert_eq!(req.priority, 7);
        assert!(req.eta.is_some());
        assert_eq!(req.reply_to.as_deref(), Some("oid"));
    }

    #[test]
    fn decodes_protocol_1() {
        let raw = raw_v2(
            json!({}),
            r#"{"task": "capapp.add", "id": "v1id", "args": [1, 2], "kwargs": {}, "retries": 0,
                "eta": null, "expires": null, "utc": true, "callbacks": null, "errbacks": null,
                "timelimit": [null, null], "taskset": null, "chord": null}"#,
        );
        let req = decode(&raw, &json_accept(), None).expect("v1 decodes");
        assert_eq!(req.id, "v1id");
        assert_eq!(req.args.len(), 2);
        assert_eq!(req.argsrepr, "(1, 2)");
    }

    #[test]
    fn classifies_bad_messages_like_celery() {
        let bad_json = raw_v2(json!({"task": "t", "id": "x"}), "[[], {");
        let e = decode(&bad_json, &json_accept(), None).unwrap_err();
        assert_eq!(e.disposition(), Disposition::Ack);

        let mut pickle = raw_v2(json!({"task": "t", "id": "x"}), "garbage");
        pickle.content_type = "application/x-python-serialize".into();
        let e = decode(&pickle, &json_accept(), None).unwrap_err();
        assert!(matches!(e, DecodeError::ContentDisallowed { .. }));
        assert_eq!(e.disposition(), Disposition::Reject);

        let no_task = raw_v2(json!({}), r#"{"hello": "world"}"#);
        assert!(matches!(
            decode(&no_task, &json_accept(), None),
            Err(DecodeError::UnknownMessage)
        ));

        let bad_kwargs = raw_v2(json!({"task": "t", "id": "x"}), r#"[[], [1], {}]"#);
        assert!(matches!(
            decode(&bad_kwargs, &json_accept(), None),
            Err(DecodeError::InvalidTask(_))
        ));

        let bad_eta = raw_v2(
            json!({"task": "t", "id": "x", "eta": "tomorrow"}),
            r#"[[], {}, {}]"#,
        );
        assert!(matches!(
            decode(&bad_eta, &json_accept(), None),
            Err(DecodeError::InvalidTask(_))
        ));

        let big = raw_v2(json!({"task": "t", "id": "x"}), r#"[[], {}, {}]"#);
        let e = decode(&big, &json_accept(), Some(4)).unwrap_err();
        assert!(e.stores_failure());
    }
}
