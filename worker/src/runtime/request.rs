//! Handling of one delivery, from decoding to the final ack (Celery's `Request` + `trace`).
//!
//! The order of side effects is what makes celeriac safe to crash at any point:
//! decode → classify (bad input gets Celery's disposition) → revoked/expired check → (early ack) →
//! STARTED → run → store the result → (late ack). With late ack (the default) a worker that dies before
//! the last step leaves the message with the broker, which redelivers or restores it; a step is never
//! acknowledged before its result is stored.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use celeriac_wire::backend::{BackendError, ReplyTarget};
use celeriac_wire::broker::{Acker, Delivery, OutgoingMessage};
use celeriac_wire::json::{python_repr, truncate_repr};
use celeriac_wire::message::{self, DecodeError, Disposition, RawMessage, TaskRequest};
use celeriac_wire::result::{ExceptionInfo, ResultMeta};
use futures::FutureExt;
use serde_json::{json, Value};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{error, info, warn};

use super::queues::QueueHandle;
use super::state::ActiveRequest;
use super::Shared;
use crate::config::{AckPolicy, QueueConfig};
use crate::tasks::{TaskContext, TaskOutcome};

/// How many times a result store is attempted before giving up (with back-off up to 10 s: ~1 min).
const STORE_ATTEMPTS: u32 = 8;

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

/// The `name` label of a task counter: the name itself only for registered tasks. Names of refused
/// messages come from anyone who can publish, and each distinct label value is a series kept forever.
fn metric_label<'a>(shared: &Shared, task: &'a str) -> &'a str {
    if shared.registry.get(task).is_some() {
        task
    } else {
        UNREGISTERED
    }
}

/// Label of refused messages whose task name is not registered.
const UNREGISTERED: &str = "<unregistered>";

async fn handle_inner(shared: &Arc<Shared>, queue: &QueueConfig, delivery: Delivery) {
    let shared = shared.clone();
    let queue = queue.clone();
    let Delivery { mut message, acker } = delivery;
    let mut request = match message::decode(
        &message,
        &shared.config.accept_content,
        Some(shared.config.max_message_bytes),
    ) {
        Ok(r) => r,
        Err(e) => {
            let task = message
                .headers
                .get("task")
                .and_then(|t| t.as_str())
                .unwrap_or("<unknown>");
            shared
                .metrics
                .rejected(metric_label(&shared, task), &queue.name);
            return refuse(&shared, &queue, &message, acker.as_ref(), e).await;
        }
    };
    // Decoded: a late-ack message is settled by its delivery tag alone, so its body and headers (as
    // large as the task's arguments, already decoded into `request`) need not be held while the task
    // runs. An early-ack message keeps them: a shutdown publishes it again.
    if queue.ack == AckPolicy::Late {
        message.body = Vec::new();
        message.headers = serde_json::Map::new();
    }
    let Some(task) = shared.registry.get(&request.task) else {
        error!(
            task_id = %request.id, queue = %queue.name,
            "Received unregistered task of type '{}'. The message has been ignored and discarded.",
            truncate_repr(request.task.clone(), 200)
        );
        shared
            .metrics
            .rejected(metric_label(&shared, &request.task), &queue.name);
        let exc = ExceptionInfo::not_registered(&request.task);
        shared.events.task(
            "task-failed",
            vec![
                ("uuid", json!(request.id)),
                ("exception", json!(exc.repr())),
            ],
        );
        store(
            &shared,
            &request,
            &ResultMeta::failure(&request.id, &exc, None),
        )
        .await;
        settle(acker.as_ref(), &request.id, Settle::Reject).await;
        return;
    };
    shared.metrics.received(&request.task, &queue.name);
    shared.events.task(
        "task-received",
        vec![
            ("uuid", json!(request.id)),
            ("name", json!(request.name)),
            ("args", json!(request.argsrepr)),
            ("kwargs", json!(request.kwargsrepr)),
            ("root_id", json!(request.root_id)),
            ("parent_id", json!(request.parent_id)),
            ("retries", json!(request.retries)),
            ("eta", json!(request.eta.map(|e| e.to_rfc3339()))),
            ("expires", json!(request.expires.map(|e| e.to_rfc3339()))),
        ],
    );
    info!(task_id = %request.id, queue = %queue.name, priority = request.priority,
          redelivered = request.delivery_info.redelivered, "Task {}[{}] received", request.name, request.id);

    if let Some(reason) = discard_reason(&shared, &request) {
        info!(task_id = %request.id, reason, "Discarding revoked task: {}[{}]", request.name, request.id);
        shared.metrics.revoked(&request.task, &queue.name);
        revoked_event(&shared, &request.id, false, reason == "expired");
        store(&shared, &request, &ResultMeta::revoked(&request.id, reason)).await;
        settle(acker.as_ref(), &request.id, Settle::Ack).await;
        return;
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
                    settle(acker.as_ref(), &request.id, Settle::Requeue).await;
                    return;
                }
            }
            if let Some(reason) = discard_reason(&shared, &request) {
                shared.metrics.revoked(&request.task, &queue.name);
                revoked_event(&shared, &request.id, false, reason == "expired");
                store(&shared, &request, &ResultMeta::revoked(&request.id, reason)).await;
                settle(acker.as_ref(), &request.id, Settle::Ack).await;
                return;
            }
        }
    }

    if queue.ack == AckPolicy::Early {
        settle(acker.as_ref(), &request.id, Settle::Ack).await;
    }
    let terminate = shared.force_stop.child_token();
    shared.state.start(ActiveRequest {
        id: request.id.clone(),
        task: request.task.clone(),
        name: request.name.clone(),
        queue: queue.name.clone(),
        started: SystemTime::now(),
        argsrepr: request.argsrepr.clone(),
        kwargsrepr: request.kwargsrepr.clone(),
        exchange: request.delivery_info.exchange.clone(),
        routing_key: request.delivery_info.routing_key.clone(),
        priority: request.priority,
        redelivered: request.delivery_info.redelivered,
        acknowledged: queue.ack == AckPolicy::Early,
        terminate: terminate.clone(),
    });
    if shared.config.track_started {
        store(
            &shared,
            &request,
            &ResultMeta::started(&request.id, std::process::id(), &shared.config.hostname),
        )
        .await;
    }

    shared.metrics.started(&request.task, &queue.name);
    shared
        .events
        .task("task-started", vec![("uuid", json!(request.id))]);
    let ctx = TaskContext {
        hostname: shared.config.hostname.clone(),
        terminate,
    };
    let began = Instant::now();
    let run = AssertUnwindSafe(task.run(ctx, &mut request)).catch_unwind();
    let outcome = keep_alive_while(&shared, queue.ack, acker.as_ref(), run)
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
        });
    let runtime = began.elapsed().as_secs_f64();
    shared.metrics.ended(&request.task, &queue.name, runtime);

    match outcome {
        TaskOutcome::Terminated if shared.force_stop.is_cancelled() => {
            // Shutdown past its grace period: the step goes back to the broker for another worker.
            warn!(task_id = %request.id, "Task {}[{}] interrupted by shutdown; handing it back to the broker", request.name, request.id);
            shared.metrics.retried(&request.task, &queue.name);
            shared.events.task(
                "task-rejected",
                vec![("uuid", json!(request.id)), ("requeue", json!(true))],
            );
            match queue.ack {
                AckPolicy::Late => settle(acker.as_ref(), &request.id, Settle::Requeue).await,
                AckPolicy::Early => {
                    Box::pin(republish(&shared, &queue, &message, &request.id)).await
                }
            }
        }
        TaskOutcome::Terminated => {
            info!(task_id = %request.id, "Task {}[{}] terminated", request.name, request.id);
            shared.metrics.revoked(&request.task, &queue.name);
            revoked_event(&shared, &request.id, true, false);
            store(
                &shared,
                &request,
                &ResultMeta::revoked(&request.id, "revoked"),
            )
            .await;
            finish_late(&queue, acker.as_ref(), &request.id, true).await;
        }
        TaskOutcome::Success(value) => {
            info!(task_id = %request.id, "Task {}[{}] succeeded in {runtime:.3}s", request.name, request.id);
            shared.metrics.succeeded(&request.task, &queue.name);
            shared.events.task(
                "task-succeeded",
                vec![
                    ("uuid", json!(request.id)),
                    ("result", json!(truncate_repr(python_repr(&value), 1024))),
                    ("runtime", json!(runtime)),
                ],
            );
            let stored = store(
                &shared,
                &request,
                &ResultMeta::success(&request.id, value)
                    .with_lineage(request.parent_id.clone(), request.group.clone()),
            )
            .await;
            finish_late(&queue, acker.as_ref(), &request.id, stored).await;
        }
        TaskOutcome::Failure { exc, traceback } => {
            error!(task_id = %request.id, "Task {}[{}] raised unexpected: {}", request.name, request.id, exc.repr());
            shared
                .metrics
                .failed(&request.task, &queue.name, &exc.exc_type);
            shared.events.task(
                "task-failed",
                vec![
                    ("uuid", json!(request.id)),
                    ("exception", json!(exc.repr())),
                    ("traceback", json!(traceback.clone().unwrap_or_default())),
                ],
            );
            let stored = store(
                &shared,
                &request,
                &ResultMeta::failure(&request.id, &exc, traceback)
                    .with_lineage(request.parent_id.clone(), request.group.clone()),
            )
            .await;
            finish_late(&queue, acker.as_ref(), &request.id, stored).await;
        }
    }
    shared.state.finish(&request.id);
}

fn revoked_event(shared: &Shared, id: &str, terminated: bool, expired: bool) {
    let signum = if terminated {
        json!("SIGTERM")
    } else {
        Value::Null
    };
    shared.events.task(
        "task-revoked",
        vec![
            ("uuid", json!(id)),
            ("terminated", json!(terminated)),
            ("signum", signum),
            ("expired", json!(expired)),
        ],
    );
}

/// Bad input: log it clearly with the task id, store a FAILURE where Celery would, and settle the message
/// with Celery's disposition. Never silently dropped, never a crash.
async fn refuse(
    shared: &Shared,
    queue: &QueueConfig,
    message: &RawMessage,
    acker: &dyn Acker,
    e: DecodeError,
) {
    let id = message.task_id_hint().unwrap_or("<unknown>").to_string();
    let task = message
        .headers
        .get("task")
        .and_then(|t| t.as_str())
        .unwrap_or("<none>");
    match &e {
        DecodeError::Undecodable(_) => {
            error!(task_id = %id, queue = %queue.name, task, "{e} (message acknowledged so it cannot loop)")
        }
        DecodeError::UnknownMessage => {
            warn!(task_id = %id, queue = %queue.name, "{e} (message rejected)")
        }
        _ => error!(task_id = %id, queue = %queue.name, task, "{e} (message rejected)"),
    }
    if e.stores_failure() && message.task_id_hint().is_some() {
        let target = ReplyTarget {
            task_id: id.clone(),
            reply_to: message.properties.reply_to.clone(),
            correlation_id: message
                .properties
                .correlation_id
                .clone()
                .unwrap_or_else(|| id.clone()),
        };
        let exc = ExceptionInfo::new("InvalidTaskError", "celery.exceptions", e.to_string());
        store_to(shared, &target, &ResultMeta::failure(&id, &exc, None)).await;
    }
    let how = match e.disposition() {
        Disposition::Ack => Settle::Ack,
        Disposition::Reject => Settle::Reject,
    };
    settle(acker, &id, how).await;
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

/// Runs the task while telling the broker the message is alive (Redis visibility) if it is unacked.
async fn keep_alive_while<F: std::future::Future>(
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
fn store<'a>(
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

async fn store_to(shared: &Shared, target: &ReplyTarget, meta: &ResultMeta) -> bool {
    let mut backoff = celeriac_wire::backoff::Backoff::new(
        std::time::Duration::from_millis(250),
        std::time::Duration::from_secs(10),
    );
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

/// Final settlement for late-ack queues: ack once the result is safe; otherwise hand the message back so
/// another attempt can deliver a result (the publisher would wait forever on a lost one).
async fn finish_late(queue: &QueueConfig, acker: &dyn Acker, id: &str, result_stored: bool) {
    if queue.ack == AckPolicy::Late {
        settle(
            acker,
            id,
            if result_stored {
                Settle::Ack
            } else {
                Settle::Requeue
            },
        )
        .await;
    }
}

/// Early-ack messages are already gone from the broker; publish the original again so it is not lost.
async fn republish(shared: &Shared, queue: &QueueConfig, message: &RawMessage, id: &str) {
    let out = OutgoingMessage::republished(message);
    match shared.broker.publish("", &queue.name, out).await {
        Ok(()) => info!(task_id = %id, queue = %queue.name, "task re-published for another worker"),
        Err(e) => {
            error!(task_id = %id, queue = %queue.name, "cannot re-publish interrupted task: {e}")
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Settle {
    Ack,
    Reject,
    Requeue,
}

/// Boxed for the same reason as [`store`].
fn settle<'a>(
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
