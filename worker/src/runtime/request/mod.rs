//! Handling of one delivery, from decoding to the final ack (Celery's `Request` + `trace`).
//!
//! The order of side effects is what makes celeriac safe to crash at any point:
//! decode → classify (bad input gets Celery's disposition) → revoked/expired check → (early ack) →
//! STARTED → run → store the result → (late ack). With late ack (the default) a worker that dies before
//! the last step leaves the message with the broker, which redelivers or restores it; a step is never
//! acknowledged before its result is stored.
//!
//! [`lifecycle`] announces each transition (metrics, events, log, state, result, settlement) in one
//! place; `settle` talks to the result backend and the broker; this file decides which transition
//! comes next.

mod lifecycle;
mod settle;
#[cfg(test)]
mod tests;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use celeriac_wire::broker::Delivery;
use celeriac_wire::message::{self, RawMessage, TaskRequest};
use celeriac_wire::result::ExceptionInfo;
use futures::FutureExt;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{error, info};

use super::queues::QueueHandle;
use super::shared::Shared;
use crate::config::{AckPolicy, QueueConfig};
use crate::tasks::{Task, TaskContext, TaskOutcome};
use lifecycle::Lifecycle;
use settle::keep_alive_while;

/// Processes one delivery to completion. Holding `_slot` keeps the queue's concurrency accounting right.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    queue: Arc<QueueHandle>,
    delivery: Delivery,
    slot: OwnedSemaphorePermit,
) {
    use std::sync::atomic::Ordering;
    let report_slots = |shared: &Shared| {
        let running = queue.in_flight();
        shared.metrics.slots(
            &queue.config.name,
            running,
            queue.limit().saturating_sub(running),
        );
    };
    queue.handling.fetch_add(1, Ordering::SeqCst);
    report_slots(&shared);
    handle_inner(&shared, &queue.config, delivery).await;
    queue.handling.fetch_sub(1, Ordering::SeqCst);
    drop(slot);
    report_slots(&shared);
}

async fn handle_inner(shared: &Arc<Shared>, queue: &QueueConfig, delivery: Delivery) {
    let Delivery { mut message, acker } = delivery;
    let life = Lifecycle {
        shared,
        queue,
        acker: acker.as_ref(),
    };
    // Boxed phases: the handler's task holds, for the whole step, only what the run needs beside it
    // (issue 13's heap profile), not the largest of decode, start and settle.
    let Some((mut request, task)) = Box::pin(admit(&life, &mut message)).await else {
        return;
    };
    let terminate = shared.force_stop.child_token();
    Box::pin(life.started(&mut request, terminate.clone())).await;
    let ctx = TaskContext {
        hostname: shared.config.hostname.clone(),
        terminate,
    };
    let began = Instant::now();
    let outcome = run(&life, task, ctx, &mut request).await;
    let runtime = began.elapsed().as_secs_f64();
    Box::pin(life.concluded(&request, &message, outcome, runtime)).await;
}

/// Decodes the message and decides whether it runs: bad input is refused, unregistered tasks fail,
/// revoked or expired ones are discarded, an ETA is waited for. `None` when the message is settled.
async fn admit(
    life: &Lifecycle<'_>,
    message: &mut RawMessage,
) -> Option<(TaskRequest, Arc<dyn Task>)> {
    let (shared, queue) = (life.shared, life.queue);
    let mut request = match message::decode(
        message,
        &shared.config.accept_content,
        Some(shared.config.max_message_bytes),
    ) {
        Ok(r) => r,
        Err(e) => {
            life.refused(message, e).await;
            return None;
        }
    };
    // Decoded: a late-ack message is settled by its delivery tag alone, so its body and headers (as
    // large as the task's arguments, already decoded into `request`) need not be held while the task
    // runs. An early-ack message keeps them: a shutdown publishes it again.
    if queue.ack == AckPolicy::Late {
        message.body = Vec::new();
        message.headers = serde_json::Map::new();
    }
    // The request's copy of the raw headers serves nothing once decoded into its fields.
    request.headers = serde_json::Map::new();
    let Some(task) = shared.registry.get(&request.task) else {
        life.unregistered(&request).await;
        return None;
    };
    life.received(&request);
    if let Some(reason) = discard_reason(shared, &request) {
        info!(task_id = %request.id, reason, "Discarding revoked task: {}[{}]", request.name, request.id);
        life.discarded(&request, reason).await;
        return None;
    }
    // ETA: hold the message (unacknowledged) until it is due; a shutdown hands it back untouched.
    if let Some(eta) = request.eta {
        let wait = (eta.with_timezone(&chrono::Utc) - chrono::Utc::now())
            .to_std()
            .unwrap_or_default();
        if !wait.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shared.stop_consuming.cancelled() => {
                    life.requeued(&request).await;
                    return None;
                }
            }
            if let Some(reason) = discard_reason(shared, &request) {
                life.discarded(&request, reason).await;
                return None;
            }
        }
    }
    Some((request, task))
}

/// Runs the task, keeping an unacknowledged message alive; a panic becomes a `WorkerLostError`
/// failure, as a Python pool reports a child that died.
async fn run(
    life: &Lifecycle<'_>,
    task: Arc<dyn Task>,
    ctx: TaskContext,
    request: &mut TaskRequest,
) -> TaskOutcome {
    let run = AssertUnwindSafe(task.run(ctx, request)).catch_unwind();
    keep_alive_while(life.shared, life.queue.ack, life.acker, run)
        .await
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            error!(task_id = %request.id, "task {} panicked: {what}", request.name);
            TaskOutcome::Failure {
                exc: ExceptionInfo::new(
                    "WorkerLostError",
                    "billiard.exceptions",
                    format!("celeriac task panicked: {what}"),
                ),
                traceback: None,
            }
        })
}

/// `Some(reason)` when the request must not run: revoked by id, or past `expires`.
fn discard_reason(shared: &Shared, request: &TaskRequest) -> Option<&'static str> {
    if shared.state.is_revoked(&request.id) {
        Some("revoked")
    } else if request.is_expired(chrono::Utc::now()) {
        Some("expired")
    } else {
        None
    }
}
