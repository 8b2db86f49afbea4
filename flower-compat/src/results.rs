//! Sending tasks (`/api/task/{apply,async-apply,send-task}`) and reading results
//! (`/api/task/result`), as a Celery client does.
//!
//! * Tasks are published as protocol-v2 messages to the default exchange with routing key = queue
//!   (`queue` option, else the default queue), `priority`, `countdown`/`eta`, `expires` honoured.
//! * `redis://` results are read from `celery-task-meta-<id>`; `rpc://` results only reach the client
//!   that sent the task, so flower-compat keeps its own reply queue and knows the results of the tasks it
//!   sent (others stay `PENDING`, exactly what Flower shows).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celeriac_wire::broker::{
    Broker, BrokerError, ExchangeKind, ExchangeSpec, OutgoingMessage, Subscription,
};
use celeriac_wire::json::{parse_lenient, python_repr, to_python_string, truncate_repr};
use celeriac_wire::message::Properties;
use celeriac_wire::url::{parse_backend, BackendUrl};
use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    #[error("result backend {0}")]
    Backend(String),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("{0}")]
    BadOption(String),
}

/// Results of tasks sent over `rpc://` by this process, bounded.
const RPC_KEEP: usize = 10_000;

pub enum ResultReader {
    Disabled,
    Redis(ConnectionManager),
    Rpc {
        oid: String,
        results: Arc<Mutex<HashMap<String, Value>>>,
    },
}

impl ResultReader {
    /// Opens the backend; for `rpc://` starts consuming this process's reply queue.
    pub async fn open(
        url: &str,
        broker: Arc<dyn Broker>,
        stop: CancellationToken,
    ) -> Result<ResultReader, ResultError> {
        match parse_backend(url).map_err(|e| ResultError::Backend(e.to_string()))? {
            BackendUrl::Disabled => Ok(ResultReader::Disabled),
            BackendUrl::Redis { url, .. } => {
                let client = redis::Client::open(url.as_str())
                    .map_err(|e| ResultError::Backend(e.to_string()))?;
                let con =
                    tokio::time::timeout(Duration::from_secs(10), ConnectionManager::new(client))
                        .await
                        .map_err(|_| ResultError::Backend("timed out connecting".into()))?
                        .map_err(|e| ResultError::Backend(e.to_string()))?;
                Ok(ResultReader::Redis(con))
            }
            BackendUrl::Rpc => {
                let oid = uuid::Uuid::new_v4().to_string();
                let results = Arc::new(Mutex::new(HashMap::new()));
                let mut consumer = broker
                    .subscribe(&Subscription {
                        exchange: ExchangeSpec {
                            name: "celeriac.flower.results".into(),
                            kind: ExchangeKind::Direct,
                            durable: false,
                        },
                        queue: oid.clone(),
                        binding_key: oid.clone(),
                        exclusive: true,
                        message_ttl_ms: None,
                        expires_ms: None,
                    })
                    .await?;
                let sink = results.clone();
                tokio::spawn(async move {
                    loop {
                        let next = tokio::select! {
                            _ = stop.cancelled() => break,
                            n = consumer.next() => n,
                        };
                        match next {
                            Ok(Some(d)) => {
                                let _ = d.acker.ack().await;
                                if let Ok(meta) = parse_lenient(&d.message.body) {
                                    let id = meta
                                        .get("task_id")
                                        .and_then(Value::as_str)
                                        .map(str::to_owned)
                                        .or(d.message.properties.correlation_id.clone());
                                    if let Some(id) = id {
                                        let mut map = match sink.lock() {
                                            Ok(m) => m,
                                            Err(p) => p.into_inner(),
                                        };
                                        if map.len() >= RPC_KEEP {
                                            if let Some(k) = map.keys().next().cloned() {
                                                map.remove(&k);
                                            }
                                        }
                                        let ready = is_ready(&meta);
                                        // A STARTED meta never replaces a final one.
                                        if ready || !map.get(&id).is_some_and(is_ready) {
                                            map.insert(id, meta);
                                        }
                                    }
                                }
                            }
                            Ok(None) => {}
                            Err(e) => {
                                warn!("rpc result queue: {e}");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                    }
                    let _ = consumer.cancel().await;
                });
                Ok(ResultReader::Rpc { oid, results })
            }
        }
    }

    pub fn configured(&self) -> bool {
        !matches!(self, ResultReader::Disabled)
    }

    fn reply_to(&self) -> Option<String> {
        match self {
            ResultReader::Rpc { oid, .. } => Some(oid.clone()),
            _ => None,
        }
    }

    /// The task's meta document, or `None` while it is unknown (PENDING).
    pub async fn meta(&self, task_id: &str) -> Result<Option<Value>, ResultError> {
        match self {
            ResultReader::Disabled => Ok(None),
            ResultReader::Redis(con) => {
                let mut con = con.clone();
                let raw: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(format!("celery-task-meta-{task_id}"))
                    .query_async(&mut con)
                    .await
                    .map_err(|e| ResultError::Backend(e.to_string()))?;
                Ok(raw.and_then(|r| parse_lenient(&r).ok()))
            }
            ResultReader::Rpc { results, .. } => Ok(match results.lock() {
                Ok(m) => m.get(task_id).cloned(),
                Err(p) => p.into_inner().get(task_id).cloned(),
            }),
        }
    }

    /// Waits until the task is ready or `timeout` passes (None = up to 1 h); returns the last meta seen.
    pub async fn wait(
        &self,
        task_id: &str,
        timeout: Option<Duration>,
    ) -> Result<(bool, Option<Value>), ResultError> {
        let deadline = tokio::time::Instant::now() + timeout.unwrap_or(Duration::from_secs(3600));
        loop {
            let meta = self.meta(task_id).await?;
            if meta.as_ref().is_some_and(is_ready) {
                return Ok((true, meta));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok((false, meta));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Records an `ABORTED` state (`AbortableAsyncResult.abort`); only the Redis backend stores it.
    pub async fn abort(&self, task_id: &str) -> Result<(), ResultError> {
        if let ResultReader::Redis(con) = self {
            let meta = json!({"status": "ABORTED", "result": null, "traceback": null, "children": [],
                              "date_done": null, "task_id": task_id});
            let mut con = con.clone();
            let _: () = redis::cmd("SETEX")
                .arg(format!("celery-task-meta-{task_id}"))
                .arg(86400)
                .arg(to_python_string(&meta, false))
                .query_async(&mut con)
                .await
                .map_err(|e| ResultError::Backend(e.to_string()))?;
        }
        Ok(())
    }
}

fn is_ready(meta: &Value) -> bool {
    matches!(
        meta.get("status").and_then(Value::as_str),
        Some("SUCCESS" | "FAILURE" | "REVOKED")
    )
}

/// The state a meta document reports (`PENDING` when there is none).
pub fn state_of(meta: Option<&Value>) -> String {
    meta.and_then(|m| m.get("status"))
        .and_then(Value::as_str)
        .unwrap_or("PENDING")
        .to_string()
}

/// `result.result` as Flower's `safe_result` returns it: the value, or for a failure the exception's
/// repr (`ValueError('boom')`).
pub fn safe_result(meta: Option<&Value>) -> Value {
    let Some(meta) = meta else { return Value::Null };
    let result = meta.get("result").cloned().unwrap_or(Value::Null);
    if state_of(Some(meta)) == "FAILURE" {
        if let Some(exc_type) = result.get("exc_type").and_then(Value::as_str) {
            let args = match result.get("exc_message") {
                Some(Value::Array(a)) => a.iter().map(python_repr).collect::<Vec<_>>().join(", "),
                Some(Value::Null) | None => String::new(),
                Some(other) => python_repr(other),
            };
            // Celery exceptions with a repr of their own, as the client rebuilds them.
            if exc_type == "NotRegistered" {
                return json!(format!(
                    "Task of kind {args} never registered, please make sure it's imported."
                ));
            }
            return json!(format!("{exc_type}({args})"));
        }
    }
    result
}

/// `{"task-id", "result", ["traceback"], "state"}` for a finished task (`update_response_result`).
pub fn fill_response(resp: &mut Map<String, Value>, meta: Option<&Value>) {
    resp.insert("result".into(), safe_result(meta));
    if state_of(meta) == "FAILURE" {
        resp.insert(
            "traceback".into(),
            meta.and_then(|m| m.get("traceback"))
                .cloned()
                .unwrap_or(Value::Null),
        );
    }
}

/// Options of a task sent through the API (the request body besides `args` and `kwargs`).
#[derive(Debug, Default)]
pub struct SendOptions {
    pub queue: Option<String>,
    pub priority: Option<u8>,
    pub countdown: Option<f64>,
    pub eta: Option<DateTime<Utc>>,
    pub expires: Option<DateTime<Utc>>,
    pub task_id: Option<String>,
}

impl SendOptions {
    /// Reads the options Flower normalizes (`eta`/`expires` as `%Y-%m-%d %H:%M:%S.%f` or seconds).
    pub fn from_body(options: &Map<String, Value>) -> Result<SendOptions, ResultError> {
        let bad = |k: &str| ResultError::BadOption(format!("Invalid option {k}"));
        let time = |k: &str, v: &Value| -> Result<DateTime<Utc>, ResultError> {
            if let Some(secs) = v
                .as_f64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            {
                return Ok(Utc::now() + chrono::Duration::milliseconds((secs * 1000.0) as i64));
            }
            let s = v.as_str().ok_or_else(|| bad(k))?;
            chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
                .map(|n| n.and_utc())
                .map_err(|_| bad(k))
        };
        let mut out = SendOptions::default();
        for (k, v) in options {
            match k.as_str() {
                "queue" => out.queue = v.as_str().map(str::to_owned),
                "priority" => out.priority = Some(v.as_u64().ok_or_else(|| bad(k))?.min(255) as u8),
                "countdown" => {
                    out.countdown = Some(
                        v.as_f64()
                            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                            .ok_or_else(|| bad(k))?,
                    )
                }
                "eta" => {
                    let s = v.as_str().ok_or_else(|| bad(k))?;
                    out.eta = Some(
                        chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
                            .map(|n| n.and_utc())
                            .map_err(|_| bad(k))?,
                    );
                }
                "expires" => out.expires = Some(time(k, v)?),
                "task_id" => out.task_id = v.as_str().map(str::to_owned),
                _ => debug!("ignoring task option {k}"),
            }
        }
        Ok(out)
    }
}

/// Publishes `name(*args, **kwargs)` like `Celery.send_task`; returns the task id.
pub async fn send_task(
    broker: &dyn Broker,
    results: &ResultReader,
    default_queue: &str,
    name: &str,
    args: Value,
    kwargs: Value,
    options: SendOptions,
) -> Result<String, ResultError> {
    let id = options
        .task_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let eta = options.eta.or_else(|| {
        options
            .countdown
            .map(|c| Utc::now() + chrono::Duration::milliseconds((c * 1000.0) as i64))
    });
    let iso = |d: DateTime<Utc>| celeriac_wire::result::python_isoformat(d);
    let host = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".into());
    let headers = json!({
        "lang": "py", "task": name, "id": id, "shadow": null, "eta": eta.map(iso),
        "expires": options.expires.map(iso), "group": null, "group_index": null, "retries": 0,
        "timelimit": [null, null], "root_id": id, "parent_id": null,
        "argsrepr": truncate_repr(python_repr(&args), 1024),
        "kwargsrepr": truncate_repr(python_repr(&kwargs), 1024),
        "origin": format!("gen{}@{}", std::process::id(), host), "ignore_result": false,
        "replaced_task_nesting": 0, "stamped_headers": null, "stamps": {},
    });
    let body =
        json!([args, kwargs, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]);
    let mut msg = OutgoingMessage::json(to_python_string(&body, false));
    if let Value::Object(h) = headers {
        msg.headers = h;
    }
    msg.properties = Properties {
        correlation_id: Some(id.clone()),
        reply_to: results.reply_to(),
        delivery_mode: Some(2),
        priority: Some(options.priority.unwrap_or(0)),
        expiration: options.expires.map(|e| {
            let ms = (e - Utc::now()).num_milliseconds().max(0);
            ms.to_string()
        }),
    };
    let queue = options.queue.as_deref().unwrap_or(default_queue);
    broker.publish("", queue, msg).await?;
    Ok(id)
}
