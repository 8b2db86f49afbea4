//! Worker details over remote control, as `flower/inspector.py` gathers them: `stats`, `active_queues`,
//! `registered`, `conf` for every worker (broadcast), and additionally `scheduled`, `active`, `reserved`,
//! `revoked` when one worker is asked for. Replies are kept per worker with the time of the last one.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use celeriac_wire::broker::Broker;
use celeriac_wire::events::now_epoch;
use celeriac_wire::pidbox::client;
use serde_json::{json, Map, Value};
use tracing::{debug, warn};

const BASIC: [&str; 4] = ["stats", "active_queues", "registered", "conf"];
const ALL: [&str; 8] = [
    "stats",
    "active_queues",
    "registered",
    "scheduled",
    "active",
    "reserved",
    "revoked",
    "conf",
];

fn arguments(method: &str) -> Value {
    match method {
        "registered" => json!({"taskinfoitems": []}),
        "active" => json!({"safe": true}),
        "conf" => json!({"with_defaults": false}),
        _ => json!({}),
    }
}

pub struct Inspector {
    timeout: Duration,
    workers: Mutex<BTreeMap<String, Map<String, Value>>>,
}

impl Inspector {
    pub fn new(timeout: Duration) -> Inspector {
        Inspector {
            timeout,
            workers: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Map<String, Value>>> {
        match self.workers.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Asks the workers (all, or `workername` only) and stores their replies. With `workername` and
    /// `all_methods`, the task lists are asked too (Flower's worker page / `?workername=`).
    pub async fn update(&self, broker: &dyn Broker, workername: Option<&str>, all_methods: bool) {
        let methods: &[&str] = if workername.is_some() && all_methods {
            &ALL
        } else {
            &BASIC
        };
        let destination = workername.map(|w| vec![w.to_string()]);
        let calls = methods.iter().map(|m| {
            let destination = destination.clone();
            async move {
                (
                    *m,
                    client::call(broker, m, arguments(m), destination, self.timeout).await,
                )
            }
        });
        for (method, result) in futures::future::join_all(calls).await {
            match result {
                Ok(replies) => {
                    for (node, reply) in replies {
                        self.on_update(&node, method, reply);
                    }
                }
                Err(e) => warn!("inspect method {method} failed: {e}"),
            }
        }
    }

    fn on_update(&self, node: &str, method: &str, mut reply: Value) {
        if reply.is_null() {
            return;
        }
        if method == "stats" {
            let has_consumer = reply.get("consumer").is_some_and(|c| !c.is_null());
            let target = if has_consumer {
                reply.get_mut("consumer")
            } else {
                Some(&mut reply)
            };
            if let Some(Value::Object(broker)) = target.and_then(|t| t.get_mut("broker")) {
                broker.remove("alternates");
            }
        }
        debug!(node, method, "inspect reply");
        let mut workers = self.lock();
        let info = workers.entry(node.to_string()).or_default();
        info.insert(method.to_string(), reply);
        info.insert("timestamp".into(), json!(now_epoch()));
    }

    pub fn contains(&self, worker: &str) -> bool {
        self.lock().contains_key(worker)
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Every worker's details (`application.workers`).
    pub fn snapshot(&self) -> Map<String, Value> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), Value::Object(v.clone())))
            .collect()
    }

    pub fn worker(&self, name: &str) -> Option<Value> {
        self.lock().get(name).map(|v| Value::Object(v.clone()))
    }

    /// Names of the queues the workers consume (`get_active_queue_names`).
    pub fn active_queue_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .lock()
            .values()
            .filter_map(|info| info.get("active_queues").and_then(Value::as_array))
            .flatten()
            .filter_map(|q| q.get("name").and_then(Value::as_str).map(str::to_owned))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// `{worker: reply}` of one command sent to `destination` with a reply expected.
    pub async fn call(
        &self,
        broker: &dyn Broker,
        method: &str,
        arguments: Value,
        destination: Vec<String>,
    ) -> Result<Vec<(String, Value)>, celeriac_wire::broker::BrokerError> {
        client::call(broker, method, arguments, Some(destination), self.timeout).await
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}
