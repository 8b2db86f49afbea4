//! Sends Celery events so Flower, `celery events` and dashboards see the worker.
//!
//! Worker events (`worker-online`, a `worker-heartbeat` every `freq` seconds, `worker-offline`) are
//! always sent: Flower lists workers only from events. Task events (`task-received` … `task-revoked`)
//! are sent when enabled (`-E`, `worker_send_task_events`, or remote `enable_events`) and batched like
//! Celery's dispatcher as `task.multi` messages whose body is a JSON list.
//!
//! Sending never blocks a request: events go through a bounded channel to one publishing task; if the
//! broker is down the oldest events are dropped (events are advisory; results and acks are not).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use celeriac_wire::broker::{Broker, ExchangeSpec, OutgoingMessage};
use celeriac_wire::events::{routing_key, EventFactory};
use celeriac_wire::json::to_python_string;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::runtime::state::WorkerState;

/// Heartbeat interval advertised as `freq`; Flower marks a worker offline after 2×freq of silence.
pub const HEARTBEAT_FREQ: f64 = 2.0;
/// Most task events in one `task.multi` message (Celery's `buffer_limit`).
const BATCH_LIMIT: usize = 24;
const QUEUE_CAPACITY: usize = 10_000;

/// Handle for emitting events.
pub struct Events {
    factory: EventFactory,
    task_events: AtomicBool,
    tx: mpsc::Sender<Value>,
}

impl Events {
    /// Starts the publisher and the heartbeat; returns the handle. `stop` ends both after `worker-offline`.
    pub fn start(
        broker: Arc<dyn Broker>,
        hostname: &str,
        task_events: bool,
        state: Arc<WorkerState>,
        stop: CancellationToken,
    ) -> (Arc<Events>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let events = Arc::new(Events {
            factory: EventFactory::new(hostname),
            task_events: AtomicBool::new(task_events),
            tx,
        });
        let handle = tokio::spawn(publish_loop(broker, events.clone(), rx, state, stop));
        (events, handle)
    }

    /// The Lamport clock shared with remote control.
    pub fn clock(&self) -> &celeriac_wire::events::LamportClock {
        &self.factory.clock
    }

    pub fn task_events_enabled(&self) -> bool {
        self.task_events.load(Ordering::SeqCst)
    }

    /// Turns task events on or off; returns the previous setting.
    pub fn set_task_events(&self, on: bool) -> bool {
        self.task_events.swap(on, Ordering::SeqCst)
    }

    /// Emits a task event (`task-received`, …) if task events are enabled.
    pub fn task(&self, kind: &str, fields: Vec<(&str, Value)>) {
        if self.task_events_enabled() {
            self.enqueue(self.factory.event(kind, fields));
        }
    }

    /// Emits a worker heartbeat now (remote `heartbeat` command: Celery sends it with freq 5).
    pub fn heartbeat_now(&self, state: &WorkerState, freq: f64) {
        self.enqueue(self.factory.worker(
            "worker-heartbeat",
            freq,
            state.active_count(),
            state.processed(),
        ));
    }

    fn enqueue(&self, event: Value) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(event) {
            warn!("event queue full ({QUEUE_CAPACITY}); dropping an event");
        }
    }
}

async fn publish_loop(
    broker: Arc<dyn Broker>,
    events: Arc<Events>,
    mut rx: mpsc::Receiver<Value>,
    state: Arc<WorkerState>,
    stop: CancellationToken,
) {
    let exchange = ExchangeSpec::events();
    let f = &events.factory;
    send(
        &*broker,
        &exchange,
        f.worker("worker-online", HEARTBEAT_FREQ, 0, state.processed()),
    )
    .await;
    let mut heartbeat = tokio::time::interval(Duration::from_secs_f64(HEARTBEAT_FREQ));
    heartbeat.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = heartbeat.tick() => {
                send(&*broker, &exchange, f.worker("worker-heartbeat", HEARTBEAT_FREQ, state.active_count(), state.processed())).await;
            }
            first = rx.recv() => {
                let Some(first) = first else { break };
                let mut batch = vec![first];
                while batch.len() < BATCH_LIMIT {
                    match rx.try_recv() {
                        Ok(e) => batch.push(e),
                        Err(_) => break,
                    }
                }
                publish_batch(&*broker, &exchange, &f.hostname, batch).await;
            }
        }
    }
    // Flush what is queued, then say goodbye so Flower shows the worker offline at once.
    let mut rest = Vec::new();
    while let Ok(e) = rx.try_recv() {
        rest.push(e);
    }
    for chunk in rest.chunks(BATCH_LIMIT) {
        publish_batch(&*broker, &exchange, &f.hostname, chunk.to_vec()).await;
    }
    send(
        &*broker,
        &exchange,
        f.worker("worker-offline", HEARTBEAT_FREQ, 0, state.processed()),
    )
    .await;
}

async fn publish_batch(
    broker: &dyn Broker,
    exchange: &ExchangeSpec,
    hostname: &str,
    batch: Vec<Value>,
) {
    if batch.is_empty() {
        return;
    }
    let mut msg = OutgoingMessage::json(to_python_string(&Value::Array(batch), false));
    decorate(&mut msg, hostname.to_string());
    if let Err(e) = broker.broadcast(exchange, "task.multi", msg).await {
        debug!("cannot publish task events: {e}");
    }
}

async fn send(broker: &dyn Broker, exchange: &ExchangeSpec, event: Value) {
    let rk = routing_key(
        event
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("worker-heartbeat"),
    );
    let hostname = event
        .get("hostname")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut msg = OutgoingMessage::json(to_python_string(&event, false));
    decorate(&mut msg, hostname);
    if let Err(e) = broker.broadcast(exchange, &rk, msg).await {
        debug!("cannot publish {rk}: {e}");
    }
}

/// Event message properties as Celery's dispatcher sets them.
fn decorate(msg: &mut OutgoingMessage, hostname: String) {
    msg.headers
        .insert("hostname".into(), Value::String(hostname));
    msg.properties.delivery_mode = Some(1);
    msg.properties.priority = Some(0);
}
