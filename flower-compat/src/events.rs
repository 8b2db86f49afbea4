//! The events consumer: a `celeryev.<uuid>` subscription (AMQP: transient exclusive queue bound with `#`,
//! 5 s message TTL; Redis: `PSUBSCRIBE /<db>.celeryev/*`), every event merged into the state as it
//! arrives, reconnecting with back-off. Like Flower it wakes workers up with a `heartbeat` broadcast when
//! it subscribes and broadcasts `enable_events` every 5 s.

use std::sync::Arc;
use std::time::Duration;

use celeriac_wire::backoff::Backoff;
use celeriac_wire::broker::{Broker, BrokerError, ExchangeSpec, OutgoingMessage, Subscription};
use celeriac_wire::events::{now_epoch, unbatch};
use celeriac_wire::json::{parse_lenient, to_python_string};
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::shared::Shared;
use crate::state::prepare_event;

/// Broadcasts a remote-control command that expects no reply (`enable_events`, `heartbeat`, `revoke`,
/// `shutdown`), as `celery.app.control.broadcast(..., reply=False)` sends it.
pub async fn cast(
    broker: &dyn Broker,
    method: &str,
    arguments: Value,
    destination: Option<Vec<String>>,
) -> Result<(), BrokerError> {
    let body = json!({"method": method, "arguments": arguments, "destination": destination,
                      "pattern": null, "matcher": null});
    let mut msg = OutgoingMessage::json(to_python_string(&body, false));
    msg.headers.insert("clock".into(), json!(1));
    msg.headers.insert("expires".into(), json!(0));
    msg.properties.delivery_mode = Some(2);
    msg.properties.priority = Some(0);
    broker.broadcast(&ExchangeSpec::pidbox(), "", msg).await
}

fn subscription() -> Subscription {
    Subscription {
        exchange: ExchangeSpec::events(),
        queue: format!("celeryev.{}", uuid::Uuid::new_v4()),
        binding_key: "#".into(),
        exclusive: true,
        message_ttl_ms: Some(5000),
        expires_ms: Some(60_000),
    }
}

/// Consumes events until `stop`.
pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    while !stop.is_cancelled() {
        match consume(&shared, &stop).await {
            Ok(()) => return,
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(
                    "failed to capture events: {e}; trying again in {:.1} s",
                    delay.as_secs_f64()
                );
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

async fn consume(shared: &Arc<Shared>, stop: &CancellationToken) -> Result<(), BrokerError> {
    let mut consumer = shared.broker.subscribe(&subscription()).await?;
    info!("capturing events");
    if let Err(e) = cast(shared.broker.as_ref(), "heartbeat", json!({}), None).await {
        debug!("heartbeat wake-up broadcast failed: {e}");
    }
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => {
                let _ = consumer.cancel().await;
                return Ok(());
            }
            n = consumer.next() => n?,
        };
        let Some(delivery) = next else { continue };
        let body = match parse_lenient(&delivery.message.body) {
            Ok(b) => b,
            Err(e) => {
                debug!("ignoring an undecodable event: {e}");
                continue;
            }
        };
        for event in unbatch(body) {
            if let Value::Object(m) = event {
                handle(shared, m);
            }
        }
    }
}

/// Merges one event; a worker seen for the first time (or coming online) is inspected in the background
/// so `/api/workers` lists it without `?refresh=1`.
pub fn handle(shared: &Arc<Shared>, event: Map<String, Value>) {
    let event = prepare_event(event, now_epoch());
    let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
    let hostname = event
        .get("hostname")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let (new_worker, count) = {
        let mut state = shared.write_state();
        let known = hostname
            .as_deref()
            .is_some_and(|h| state.workers.contains_key(h));
        state.apply(&event);
        let now_known = hostname
            .as_deref()
            .is_some_and(|h| state.workers.contains_key(h));
        (
            (!known && now_known) || kind == "worker-online",
            state.task_count(),
        )
    };
    shared.metrics.tasks_in_memory.set(count as i64);
    if let (true, Some(h)) = (new_worker, hostname) {
        let shared = shared.clone();
        tokio::spawn(async move {
            // Give a starting worker a moment to open its mailbox.
            tokio::time::sleep(Duration::from_millis(500)).await;
            shared
                .inspector
                .update(shared.broker.as_ref(), Some(&h), false)
                .await;
        });
    }
}

/// Broadcasts `enable_events` every 5 s (Flower's `events_enable_interval`).
pub async fn enable_events_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = cast(shared.broker.as_ref(), "enable_events", json!({}), None).await {
            warn!("failed to enable events: {e}");
        }
    }
}
