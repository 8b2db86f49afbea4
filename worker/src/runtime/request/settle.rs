//! Where a request's outcome goes: the result backend (retried with back-off; a request that asked for
//! no result stores nothing) and the broker (ack, reject, requeue, or publish again for early-ack
//! messages). Futures here are boxed: a request's future lives as long as its step, and these round
//! trips must not be laid out inline in it.

use std::time::{Duration, Instant};

use celeriac_wire::backend::{BackendError, ReplyTarget};
use celeriac_wire::broker::{Acker, OutgoingMessage};
use celeriac_wire::message::{RawMessage, TaskRequest};
use celeriac_wire::result::ResultMeta;
use tracing::{error, info, warn};

use crate::config::{AckPolicy, QueueConfig};
use crate::runtime::shared::Shared;

/// How many times a result store is attempted before giving up (with back-off up to 10 s: ~1 min).
const STORE_ATTEMPTS: u32 = 8;
/// First and longest pause between store attempts (the unit tests retry in milliseconds).
const STORE_BACKOFF: (Duration, Duration) = if cfg!(test) {
    (Duration::from_millis(1), Duration::from_millis(5))
} else {
    (Duration::from_millis(250), Duration::from_secs(10))
};

/// Runs the task while telling the broker the message is alive (Redis visibility) if it is unacked.
pub(super) async fn keep_alive_while<F: std::future::Future>(
    shared: &Shared,
    ack: AckPolicy,
    acker: &dyn Acker,
    fut: F,
) -> F::Output {
    let interval = match (ack, shared.broker.keep_alive_interval()) {
        (AckPolicy::Late, Some(i)) => i,
        _ => return fut.await,
    };
    tokio::pin!(fut);
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await; // the first tick is immediate
    loop {
        tokio::select! {
            out = &mut fut => return out,
            _ = ticker.tick() => {
                if let Err(e) = acker.keep_alive().await {
                    warn!("cannot refresh message visibility: {e}");
                }
            }
        }
    }
}

/// Stores the result for a request unless it asked for none. Returns whether the result is safe.
/// Boxed: a request's future lives as long as its task runs, so the result store (a backend round
/// trip, kilobytes of future state) must not be laid out inline in it.
pub(super) fn store<'a>(
    shared: &'a Shared,
    request: &'a TaskRequest,
    meta: &'a ResultMeta,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + 'a>> {
    Box::pin(store_now(shared, request, meta))
}

async fn store_now(shared: &Shared, request: &TaskRequest, meta: &ResultMeta) -> bool {
    if request.ignore_result == Some(true) {
        return true;
    }
    let target = ReplyTarget {
        task_id: request.id.clone(),
        reply_to: request.reply_to.clone(),
        correlation_id: request.correlation_id.clone(),
    };
    store_to(shared, &target, meta).await
}

pub(super) async fn store_to(shared: &Shared, target: &ReplyTarget, meta: &ResultMeta) -> bool {
    let mut backoff = celeriac_wire::backoff::Backoff::new(STORE_BACKOFF.0, STORE_BACKOFF.1);
    let began = Instant::now();
    for attempt in 1..=STORE_ATTEMPTS {
        match shared.backend.store(target, meta).await {
            Ok(()) => {
                shared
                    .metrics
                    .result_stored(shared.backend.scheme(), began.elapsed().as_secs_f64());
                return true;
            }
            Err(e @ BackendError::NoReplyTo(_)) => {
                warn!(task_id = %target.task_id, "{e}");
                return true; // nothing to retry: the publisher asked for no reply queue
            }
            Err(e) => {
                warn!(task_id = %target.task_id, attempt, "cannot store {} result via {}://: {e}", meta.state.as_str(), shared.backend.scheme());
                if attempt < STORE_ATTEMPTS {
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }
    error!(task_id = %target.task_id, "giving up storing the {} result after {STORE_ATTEMPTS} attempts", meta.state.as_str());
    false
}

/// Early-ack messages are already gone from the broker; publish the original again so it is not lost.
pub(super) async fn republish(
    shared: &Shared,
    queue: &QueueConfig,
    message: &RawMessage,
    id: &str,
) {
    let out = OutgoingMessage::republished(message);
    match shared.broker.publish("", &queue.name, out).await {
        Ok(()) => info!(task_id = %id, queue = %queue.name, "task re-published for another worker"),
        Err(e) => {
            error!(task_id = %id, queue = %queue.name, "cannot re-publish interrupted task: {e}")
        }
    }
}

/// How a message leaves the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settle {
    Ack,
    Reject,
    Requeue,
}

/// Boxed for the same reason as [`store`].
pub(super) fn settle<'a>(
    acker: &'a dyn Acker,
    id: &'a str,
    how: Settle,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
    Box::pin(settle_now(acker, id, how))
}

async fn settle_now(acker: &dyn Acker, id: &str, how: Settle) {
    let result = match how {
        Settle::Ack => acker.ack().await,
        Settle::Reject => acker.reject(false).await,
        Settle::Requeue => acker.reject(true).await,
    };
    if let Err(e) = result {
        // The broker connection died: the broker redelivers (AMQP) or restores (Redis) the message.
        warn!(task_id = %id, "cannot {how:?} message: {e}; the broker will deliver it again");
    }
}
