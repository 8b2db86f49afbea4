//! One consumer loop per queue: take a free slot, then fetch exactly one message for it.
//!
//! Taking the slot *before* fetching is what makes the per-queue concurrency limit hold and keeps
//! prefetch following free slots: on Redis nothing is popped without a slot; on RabbitMQ the
//! per-consumer QoS window equals the limit, so the broker never pushes more than the queue can run.

use std::sync::Arc;
use std::time::Duration;

use celeriac_wire::backoff::Backoff;
use celeriac_wire::broker::QueueSpec;
use tracing::{error, info, warn};

use super::queues::QueueHandle;
use super::request;
use super::shared::Shared;
use crate::config::QueueConfig;

/// Starts consuming `queue`; false if it is consumed already.
pub(crate) fn start(shared: &Arc<Shared>, queue: QueueConfig) -> bool {
    let Some(handle) = shared.queues.insert(queue, &shared.stop_consuming) else {
        return false;
    };
    for task in shared.registry.names() {
        shared
            .metrics
            .init_series(task, &handle.config.name, handle.limit());
    }
    shared.state.set_expected(&handle.config.name, true);
    shared.queues.consumers.spawn(run(shared.clone(), handle));
    true
}
/// Consumes the queue until the worker stops or the queue is cancelled, spawning a handler per delivery.
pub(crate) async fn run(shared: Arc<Shared>, handle: Arc<QueueHandle>) {
    let queue = handle.config.clone();
    let slots = handle.slots.clone();
    let stop = handle.stop.clone();
    let spec = QueueSpec::dagster(&queue.name);
    let prefetch = u16::try_from(queue.concurrency).unwrap_or(u16::MAX);
    // Reconnect attempts: 0.5 s doubling to 5 s (±20 %), so a broker back from an outage is in use
    // again within ~5 s, however long it was gone.
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
    'connect: while !stop.is_cancelled() {
        let mut consumer = match shared.broker.consume(&spec, prefetch).await {
            Ok(c) => {
                info!(queue = %queue.name, concurrency = queue.concurrency, ack = ?queue.ack, "consuming");
                shared.state.set_consuming(&queue.name, true);
                if shared.state.is_ready() {
                    shared.metrics.set_up(true);
                }
                backoff.reset();
                c
            }
            Err(e) => {
                let delay = backoff.next_delay();
                error!(queue = %queue.name, "cannot consume: {e}; retrying in {delay:?}");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => break 'connect,
                }
                continue;
            }
        };
        loop {
            let slot = tokio::select! {
                s = slots.clone().acquire_owned() => match s {
                    Ok(s) => s,
                    Err(_) => break 'connect, // semaphore closed: never happens while we own it
                },
                _ = stop.cancelled() => break,
            };
            // Poll until a message arrives; `next()` returns within ~1 s so a stop is noticed promptly,
            // and it is never cancelled half-way, so no popped message can be dropped on the floor.
            let delivery = loop {
                if stop.is_cancelled() {
                    break None;
                }
                match consumer.next().await {
                    Ok(Some(d)) => break Some(d),
                    Ok(None) => continue,
                    Err(e) => {
                        warn!(queue = %queue.name, "consumer failed: {e}; reconnecting");
                        shared.state.set_consuming(&queue.name, false);
                        shared.metrics.set_up(false);
                        shared.metrics.reconnected(&queue.name);
                        drop(slot);
                        tokio::select! {
                            _ = tokio::time::sleep(backoff.next_delay()) => {}
                            _ = stop.cancelled() => {}
                        }
                        continue 'connect;
                    }
                }
            };
            let Some(delivery) = delivery else { break };
            if stop.is_cancelled() {
                // Arrived while stopping: give it straight back.
                if let Err(e) = delivery.acker.reject(true).await {
                    warn!(queue = %queue.name, "cannot hand back a message received during shutdown: {e}");
                }
                break;
            }
            let handler = request::handle(shared.clone(), handle.clone(), delivery, slot);
            shared.tracker.spawn(handler);
        }
        shared.state.set_consuming(&queue.name, false);
        // Settling needs the subscription (AMQP delivery tags live on its channel): keep it open until
        // every running step of this queue has acked or handed back its message.
        let _ = slots
            .acquire_many(u32::try_from(handle.limit()).unwrap_or(u32::MAX))
            .await;
        if let Err(e) = consumer.cancel().await {
            warn!(queue = %queue.name, "cancelling consumer: {e}");
        }
        break;
    }
    info!(queue = %queue.name, "stopped consuming");
}
