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
use redis::aio::ConnectionManager;
use serde::Serialize;
use serde_json::{json, Value};

use crate::inspector::Inspector;

/// kombu's default `priority_steps` and `sep`.
pub const PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];
pub const SEP: &str = "\x06\x16";

/// The Redis list holding messages of priority step `step` (`_q_for_pri`).
pub fn redis_list(queue: &str, step: u8) -> String {
    if step == 0 {
        queue.to_string()
    } else {
        format!("{queue}{SEP}{step}")
    }
}

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

/// Measures ready messages.
pub enum QueueMeter {
    Redis(ConnectionManager),
    Amqp,
}

impl QueueMeter {
    pub async fn for_broker(url: &str) -> QueueMeter {
        if url.starts_with("redis://") || url.starts_with("rediss://") {
            if let Ok(client) = redis::Client::open(url) {
                if let Ok(con) = ConnectionManager::new(client).await {
                    return QueueMeter::Redis(con);
                }
            }
            tracing::warn!(
                "cannot open a Redis connection for queue lengths; using the broker's total"
            );
        }
        QueueMeter::Amqp
    }

    /// `(total, per-priority)` ready messages of `queue`; `None` when the queue does not exist (RabbitMQ).
    pub async fn ready(
        &self,
        broker: &dyn Broker,
        queue: &str,
    ) -> Option<(u64, Option<BTreeMap<String, u64>>)> {
        match self {
            QueueMeter::Redis(con) => {
                let mut con = con.clone();
                let mut pipe = redis::pipe();
                for step in PRIORITY_STEPS {
                    pipe.llen(redis_list(queue, step));
                }
                match pipe.query_async::<Vec<u64>>(&mut con).await {
                    Ok(lens) => {
                        let per: BTreeMap<String, u64> = PRIORITY_STEPS
                            .iter()
                            .zip(lens.iter())
                            .map(|(s, n)| (s.to_string(), *n))
                            .collect();
                        Some((lens.iter().sum(), Some(per)))
                    }
                    Err(e) => {
                        tracing::warn!("LLEN {queue}: {e}");
                        None
                    }
                }
            }
            QueueMeter::Amqp => match broker.queue_length(queue).await {
                Ok(n) => Some((n, None)),
                Err(e) => {
                    tracing::debug!("queue length of {queue}: {e}");
                    None
                }
            },
        }
    }
}

/// `{"active_queues": [{"name", "messages"}]}` for `names`.
pub async fn lengths(meter: &QueueMeter, broker: &dyn Broker, names: &[String]) -> Value {
    let mut out = Vec::new();
    for name in names {
        if let Some((n, _)) = meter.ready(broker, name).await {
            out.push(json!({"name": name, "messages": n}));
        }
    }
    json!({ "active_queues": out })
}

/// Ready, reserved and running per queue.
pub async fn details(
    meter: &QueueMeter,
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
        let (ready, priorities) = meter.ready(broker, name).await.unwrap_or((0, None));
        out.push(QueueDetail {
            name: name.clone(),
            messages: ready,
            ready,
            reserved: reserved.get(name).copied().unwrap_or(0),
            running: running.get(name).copied().unwrap_or(0),
            priorities,
        });
    }
    out
}
