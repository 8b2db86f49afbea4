//! One consumer loop per queue: take a free slot, then fetch exactly one message for it.
//!
//! Taking the slot *before* fetching is what makes the per-queue concurrency limit hold and keeps
//! prefetch following free slots: on Redis nothing is popped without a slot; on RabbitMQ the
//! per-consumer QoS window equals the limit, so the broker never pushes more than the queue can run.

use std::sync::Arc;
use std::time::Duration;

use celeriac_wire::broker::QueueSpec;
use tokio::sync::Semaphore;
use tracing::{error, info, warn};

use super::{request, Shared};
use crate::config::QueueConfig;

/// Consumes `queue` until `shared.stop_consuming` fires, spawning a handler per delivery.
pub(crate) async fn run(shared: Arc<Shared>, queue: QueueConfig) {
    let slots = Arc::new(Semaphore::new(queue.concurrency));
    let spec = QueueSpec::dagster(&queue.name);
    let prefetch = u16::try_from(queue.concurrency).unwrap_or(u16::MAX);
    let mut backoff = Duration::from_millis(500);
    'connect: while !shared.stop_consuming.is_cancelled() {
        let mut consumer = match shared.broker.consume(&spec, prefetch).await {
            Ok(c) => {
                info!(queue = %queue.name, concurrency = queue.concurrency, ack = ?queue.ack, "consuming");
                shared.state.set_consuming(&queue.name, true);
                if shared.state.consuming_queues() == shared.config.queues.len() {
                    shared.metrics.set_up(true);
                }
                backoff = Duration::from_millis(500);
                c
            }
            Err(e) => {
                error!(queue = %queue.name, "cannot consume: {e}; retrying in {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shared.stop_consuming.cancelled() => break 'connect,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        loop {
            let slot = tokio::select! {
                s = slots.clone().acquire_owned() => match s {
                    Ok(s) => s,
                    Err(_) => break 'connect, // semaphore closed: never happens while we own it
                },
                _ = shared.stop_consuming.cancelled() => break,
            };
            // Poll until a message arrives; `next()` returns within ~1 s so a stop is noticed promptly,
            // and it is never cancelled half-way, so no popped message can be dropped on the floor.
            let delivery = loop {
                if shared.stop_consuming.is_cancelled() {
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
                            _ = tokio::time::sleep(backoff) => {}
                            _ = shared.stop_consuming.cancelled() => {}
                        }
                        continue 'connect;
                    }
                }
            };
            let Some(delivery) = delivery else { break };
            if shared.stop_consuming.is_cancelled() {
                // Arrived while stopping: give it straight back.
                if let Err(e) = delivery.acker.reject(true).await {
                    warn!(queue = %queue.name, "cannot hand back a message received during shutdown: {e}");
                }
                break;
            }
            let handler = request::handle(shared.clone(), queue.clone(), delivery, slot, slots.clone());
            shared.tracker.spawn(handler);
        }
        shared.state.set_consuming(&queue.name, false);
        if let Err(e) = consumer.cancel().await {
            warn!(queue = %queue.name, "cancelling consumer: {e}");
        }
        break;
    }
    info!(queue = %queue.name, "stopped consuming");
}
