//! Step results as they arrive, without polling.
//!
//! * `rpc://`: every run gets its own durable reply queue (`celeriac.coordinator.<run_id>`, expiring a day
//!   after its last use). Workers publish each result to it (`reply_to`); the run's driver consumes it
//!   and acknowledges a result only after the decision it led to is committed, so a coordinator killed
//!   at any point leaves the result in the queue for the replica that takes the run over.
//! * `redis://`: one `PSUBSCRIBE celery-task-meta-*` per replica routes each published result to the
//!   run that owns the task; results stored while nobody listened (restart, takeover, reconnect) are read
//!   with `GET` when a run attaches and after every resubscription.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use celeriac_wire::backend::redis::RedisResults;
use celeriac_wire::broker::{Acker, Broker, QueueSpec};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use celeriac_wire::backoff::Backoff;

/// How long an unused reply queue lives (Celery's default `result_expires`).
const REPLY_QUEUE_EXPIRES_MS: u32 = 86_400_000;

/// What a run's driver receives.
pub enum RunInput {
    /// A task's result document; `ack` settles its message once the result was recorded.
    Result {
        task_id: String,
        meta: Value,
        ack: Option<Box<dyn Acker>>,
    },
    /// Something about the run may have changed (status, lease): look.
    Wake,
}

type Routes = Arc<Mutex<HashMap<String, mpsc::Sender<RunInput>>>>;

/// Where results come from.
// One per replica: the size of its variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Results {
    Rpc {
        broker: Arc<dyn Broker>,
    },
    Redis {
        reader: RedisResults,
        /// task id → the driver of its run.
        routes: Routes,
    },
}

/// The reply queue of a run.
pub fn reply_queue(run_id: &str) -> String {
    format!("celeriac.coordinator.{run_id}")
}

impl Results {
    /// `redis://`: connects and starts the replica's one subscription.
    pub async fn redis(url: &str, stop: CancellationToken) -> anyhow::Result<Results> {
        let reader = RedisResults::connect(url).await?;
        let routes: Routes = Arc::default();
        tokio::spawn(follow_redis(reader.clone(), routes.clone(), stop));
        Ok(Results::Redis { reader, routes })
    }

    /// Starts delivering the results of `run_id` (whose pending tasks are `task_ids`) to `tx`, until
    /// `stop` fires.
    ///
    /// On return the results of the run's tasks can no longer be lost: for `rpc://` its reply queue is
    /// declared (a worker's reply to a queue that does not exist yet is dropped by the default
    /// exchange, and a fast step can finish before a consumer started in the background would have
    /// declared it); for Redis its tasks are routed. Returns early only when `stop` fires.
    pub async fn attach(
        &self,
        run_id: &str,
        task_ids: &[String],
        tx: mpsc::Sender<RunInput>,
        stop: CancellationToken,
    ) {
        match self {
            Results::Rpc { broker } => {
                let queue = reply_queue(run_id);
                let spec = QueueSpec::replies(&queue, REPLY_QUEUE_EXPIRES_MS);
                let mut backoff = Backoff::default();
                while let Err(e) = broker.declare(&spec).await {
                    warn!(queue, "cannot declare the reply queue: {e}; retrying");
                    tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(backoff.next_delay()) => {} }
                }
                tokio::spawn(consume_replies(broker.clone(), queue, tx, stop));
            }
            Results::Redis { reader, routes } => {
                {
                    let mut r = routes.lock().await;
                    for id in task_ids {
                        r.insert(id.clone(), tx.clone());
                    }
                }
                for id in task_ids {
                    fetch_stored(reader, id, &tx).await;
                }
            }
        }
    }

    /// Routes a newly published task's result to its run (Redis; nothing to do for rpc).
    pub async fn track(&self, task_id: &str, tx: &mpsc::Sender<RunInput>) {
        if let Results::Redis { routes, .. } = self {
            routes.lock().await.insert(task_id.to_string(), tx.clone());
        }
    }

    /// Stops routing a task's results (its result was applied).
    pub async fn forget(&self, task_id: &str) {
        if let Results::Redis { routes, .. } = self {
            routes.lock().await.remove(task_id);
        }
    }
}

async fn fetch_stored(reader: &RedisResults, task_id: &str, tx: &mpsc::Sender<RunInput>) {
    match reader.get(task_id).await {
        Ok(Some(meta)) => {
            let _ = tx
                .send(RunInput::Result {
                    task_id: task_id.to_string(),
                    meta,
                    ack: None,
                })
                .await;
        }
        Ok(None) => {}
        Err(e) => warn!(task_id, "cannot read a stored result: {e}"),
    }
}

/// The replica's Redis subscription: routes every published result; after a reconnect, reads the
/// results published while it was away.
async fn follow_redis(reader: RedisResults, routes: Routes, stop: CancellationToken) {
    let mut backoff = Backoff::default();
    let mut first = true;
    while !stop.is_cancelled() {
        let stream = match reader.subscribe().await {
            Ok(s) => s,
            Err(e) => {
                warn!("redis result subscription failed: {e}; retrying");
                tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(backoff.next_delay()) => {} }
                continue;
            }
        };
        backoff.reset();
        if !first {
            info!("redis result subscription restored; reading the results published meanwhile");
            let pending: Vec<(String, mpsc::Sender<RunInput>)> = routes
                .lock()
                .await
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for (task_id, tx) in pending {
                fetch_stored(&reader, &task_id, &tx).await;
            }
        }
        first = false;
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                next = stream.next() => match next {
                    Some(published) => {
                        let tx = routes.lock().await.get(&published.task_id).cloned();
                        if let Some(tx) = tx {
                            let _ = tx
                                .send(RunInput::Result { task_id: published.task_id, meta: published.meta, ack: None })
                                .await;
                        }
                    }
                    None => {
                        warn!("redis result subscription closed; resubscribing");
                        break;
                    }
                }
            }
        }
    }
}

/// Consumes a run's reply queue, forwarding each result with its acker, reconnecting with backoff.
async fn consume_replies(
    broker: Arc<dyn Broker>,
    queue: String,
    tx: mpsc::Sender<RunInput>,
    stop: CancellationToken,
) {
    let spec = QueueSpec::replies(&queue, REPLY_QUEUE_EXPIRES_MS);
    let mut backoff = Backoff::default();
    while !stop.is_cancelled() {
        let mut consumer = match broker.consume(&spec, 64).await {
            Ok(c) => c,
            Err(e) => {
                warn!(queue, "cannot consume the reply queue: {e}; retrying");
                tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(backoff.next_delay()) => {} }
                continue;
            }
        };
        backoff.reset();
        loop {
            if stop.is_cancelled() {
                let _ = consumer.cancel().await;
                return;
            }
            match consumer.next().await {
                Ok(None) => continue,
                Ok(Some(delivery)) => {
                    let m = &delivery.message;
                    let meta = celeriac_wire::json::parse_lenient(&m.body).unwrap_or_else(|_| {
                        Value::String(String::from_utf8_lossy(&m.body).into_owned())
                    });
                    let task_id = m
                        .properties
                        .correlation_id
                        .clone()
                        .or_else(|| {
                            meta.get("task_id")
                                .and_then(Value::as_str)
                                .map(str::to_string)
                        })
                        .unwrap_or_default();
                    let input = RunInput::Result {
                        task_id,
                        meta,
                        ack: Some(delivery.acker),
                    };
                    if tx.send(input).await.is_err() {
                        // The run is no longer driven here: leave unacked results to the next owner.
                        let _ = consumer.cancel().await;
                        return;
                    }
                }
                Err(e) => {
                    warn!(queue, "reply queue consumer lost: {e}; reconnecting");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            }
        }
    }
}
