//! Queue lengths that are right.
//!
//! * `messages` (Flower's `/api/queues/length`) = messages ready in the broker: on Redis the sum of `LLEN`
//!   over the queue's priority lists (`q`, `q\x06\x163`, `q\x06\x166`, `q\x06\x169`, kombu's layout); on
//!   RabbitMQ the `message_count` of a passive `queue.declare` (no management plugin needed).
//! * `/api/queues/detail` adds, apart from `ready`: `reserved` (prefetched by a worker, not started) and
//!   `running` (executing), from the workers' `reserved`/`active` replies grouped by routing key, and on
//!   Redis the per-priority split.

use std::collections::BTreeMap;

use celeriac_wire::broker::Broker;
use serde::Serialize;
use serde_json::{json, Value};

use crate::inspector::Inspector;

#[derive(Debug, Clone, Serialize)]
pub struct QueueDetail {
    pub name: String,
    /// Ready in the broker (same number as `messages` of `/api/queues/length`).
    pub messages: u64,
    pub ready: u64,
    pub reserved: u64,
    pub running: u64,
    /// Redis only: ready messages per priority step (`"0"`, `"3"`, `"6"`, `"9"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priorities: Option<BTreeMap<String, u64>>,
}

/// `(total, per-priority)` ready messages of `queue` ([`Broker::queue_depths`]: kombu's layout on
/// Redis, a passive declare on RabbitMQ); `None` when the queue does not exist (RabbitMQ) or the broker
/// cannot tell.
pub async fn ready(
    broker: &dyn Broker,
    queue: &str,
) -> Option<(u64, Option<BTreeMap<String, u64>>)> {
    match broker.queue_depths(queue).await {
        Ok(depth) => Some((
            depth.total,
            depth.by_priority.map(|per| {
                per.into_iter()
                    .map(|(step, n)| (step.to_string(), n))
                    .collect()
            }),
        )),
        Err(e) => {
            tracing::debug!("queue length of {queue}: {e}");
            None
        }
    }
}

/// `{"active_queues": [{"name", "messages"}]}` for `names`.
pub async fn lengths(broker: &dyn Broker, names: &[String]) -> Value {
    let mut out = Vec::new();
    for name in names {
        if let Some((n, _)) = ready(broker, name).await {
            out.push(json!({"name": name, "messages": n}));
        }
    }
    json!({ "active_queues": out })
}

/// Ready, reserved and running per queue.
pub async fn details(
    broker: &dyn Broker,
    inspector: &Inspector,
    names: &[String],
) -> Vec<QueueDetail> {
    let mut reserved: BTreeMap<String, u64> = BTreeMap::new();
    let mut running: BTreeMap<String, u64> = BTreeMap::new();
    let timeout = inspector.timeout();
    let (active, held) = futures::join!(
        celeriac_wire::pidbox::client::call(broker, "active", json!({"safe": true}), None, timeout),
        celeriac_wire::pidbox::client::call(broker, "reserved", json!({}), None, timeout),
    );
    for (replies, into) in [(active, &mut running), (held, &mut reserved)] {
        for (_, reply) in replies.unwrap_or_default() {
            for req in reply.as_array().into_iter().flatten() {
                if let Some(rk) = req
                    .pointer("/delivery_info/routing_key")
                    .and_then(Value::as_str)
                {
                    *into.entry(rk.to_string()).or_default() += 1;
                }
            }
        }
    }
    let mut out = Vec::new();
    for name in names {
        let (in_broker, priorities) = ready(broker, name).await.unwrap_or((0, None));
        out.push(QueueDetail {
            name: name.clone(),
            messages: in_broker,
            ready: in_broker,
            reserved: reserved.get(name).copied().unwrap_or(0),
            running: running.get(name).copied().unwrap_or(0),
            priorities,
        });
    }
    out
}
