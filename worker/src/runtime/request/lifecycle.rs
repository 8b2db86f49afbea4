//! A request's transitions, each announced in one place to everyone who watches it: Prometheus
//! metrics, Celery task events (Flower), the log, the worker's live state (`inspect active`), the result
//! backend and the broker. The handler in `super` decides *which* transition happens; this module makes
//! sure every transition tells all of them, in the same order every time.
//!
//! The ordering rule that makes a crash safe lives in [`Lifecycle::finish`]: the result is stored
//! before the message is settled, and a result that could not be stored hands the message back
//! (late ack) instead of acknowledging it.

use std::time::SystemTime;

use celeriac_wire::backend::ReplyTarget;
use celeriac_wire::broker::Acker;
use celeriac_wire::json::{python_repr, truncate_repr};
use celeriac_wire::message::{DecodeError, Disposition, RawMessage, TaskRequest};
use celeriac_wire::result::{ExceptionInfo, ResultMeta};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::settle::{republish, settle, store, store_to, Settle};
use crate::config::{AckPolicy, QueueConfig};
use crate::runtime::shared::Shared;
use crate::runtime::state::ActiveRequest;
use crate::tasks::TaskOutcome;

/// Label of refused messages whose task name is not registered.
const UNREGISTERED: &str = "<unregistered>";

/// The transitions of one delivery on one queue.
pub(super) struct Lifecycle<'a> {
    pub shared: &'a Shared,
    pub queue: &'a QueueConfig,
    pub acker: &'a dyn Acker,
}

impl Lifecycle<'_> {
    /// The `name` label of a task counter: the name itself only for registered tasks. Names of refused
    /// messages come from anyone who can publish, and each distinct label value is a series kept forever.
    fn metric_label<'t>(&self, task: &'t str) -> &'t str {
        if self.shared.registry.get(task).is_some() {
            task
        } else {
            UNREGISTERED
        }
    }

    /// Bad input: log it clearly with the task id, store a FAILURE where Celery would, and settle the
    /// message with Celery's disposition. Never silently dropped, never a crash.
    pub async fn refused(&self, message: &RawMessage, e: DecodeError) {
        let (shared, queue) = (self.shared, self.queue);
        let named = message.headers.get("task").and_then(|t| t.as_str());
        shared
            .metrics
            .rejected(self.metric_label(named.unwrap_or("<unknown>")), &queue.name);
        let id = message.task_id_hint().unwrap_or("<unknown>").to_string();
        let task = named.unwrap_or("<none>");
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
        settle(self.acker, &id, how).await;
    }

    /// A task name this worker does not serve: FAILURE stored (the publisher stops waiting), message
    /// rejected, as Celery does.
    pub async fn unregistered(&self, request: &TaskRequest) {
        let shared = self.shared;
        error!(
            task_id = %request.id, queue = %self.queue.name,
            "Received unregistered task of type '{}'. The message has been ignored and discarded.",
            truncate_repr(request.task.clone(), 200)
        );
        shared
            .metrics
            .rejected(self.metric_label(&request.task), &self.queue.name);
        let exc = ExceptionInfo::not_registered(&request.task);
        shared.events.task(
            "task-failed",
            vec![
                ("uuid", json!(request.id)),
                ("exception", json!(exc.repr())),
            ],
        );
        store(
            shared,
            request,
            &ResultMeta::failure(&request.id, &exc, None),
        )
        .await;
        settle(self.acker, &request.id, Settle::Reject).await;
    }

    pub fn received(&self, request: &TaskRequest) {
        self.shared
            .metrics
            .received(&request.task, &self.queue.name);
        self.shared.events.task(
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
        info!(task_id = %request.id, queue = %self.queue.name, priority = request.priority,
              redelivered = request.delivery_info.redelivered, "Task {}[{}] received", request.name, request.id);
    }

    /// Revoked by id or expired before it started: REVOKED stored, message acknowledged, never run.
    pub async fn discarded(&self, request: &TaskRequest, reason: &'static str) {
        self.shared.metrics.revoked(&request.task, &self.queue.name);
        self.revoked_event(&request.id, false, reason == "expired");
        store(
            self.shared,
            request,
            &ResultMeta::revoked(&request.id, reason),
        )
        .await;
        settle(self.acker, &request.id, Settle::Ack).await;
    }

    /// Handed back untouched (a shutdown while it waited for its ETA).
    pub async fn requeued(&self, request: &TaskRequest) {
        settle(self.acker, &request.id, Settle::Requeue).await;
    }

    /// The task is about to run: acknowledged now under early ack, listed as active, STARTED stored when
    /// tracked, `task-started` sent.
    /// The arguments' reprs move to the active-request list (`inspect active` reads them there).
    pub async fn started(&self, request: &mut TaskRequest, terminate: CancellationToken) {
        let (shared, queue) = (self.shared, self.queue);
        if queue.ack == AckPolicy::Early {
            settle(self.acker, &request.id, Settle::Ack).await;
        }
        shared.state.start(ActiveRequest {
            id: request.id.clone(),
            task: request.task.clone(),
            name: request.name.clone(),
            queue: queue.name.clone(),
            started: SystemTime::now(),
            argsrepr: std::mem::take(&mut request.argsrepr),
            kwargsrepr: std::mem::take(&mut request.kwargsrepr),
            exchange: request.delivery_info.exchange.clone(),
            routing_key: request.delivery_info.routing_key.clone(),
            priority: request.priority,
            redelivered: request.delivery_info.redelivered,
            acknowledged: queue.ack == AckPolicy::Early,
            terminate,
        });
        if shared.config.track_started {
            store(
                shared,
                request,
                &ResultMeta::started(&request.id, std::process::id(), &shared.config.hostname),
            )
            .await;
        }
        shared.metrics.started(&request.task, &queue.name);
        shared
            .events
            .task("task-started", vec![("uuid", json!(request.id))]);
    }

    /// The task returned `outcome` after `runtime` seconds: announce it, store it, settle the message,
    /// and take the request off the active list. `message` is the original, for early-ack messages
    /// that a shutdown must publish again.
    pub async fn concluded(
        &self,
        request: &TaskRequest,
        message: &RawMessage,
        outcome: TaskOutcome,
        runtime: f64,
    ) {
        let shared = self.shared;
        shared
            .metrics
            .ended(&request.task, &self.queue.name, runtime);
        match outcome {
            TaskOutcome::Terminated if shared.force_stop.is_cancelled() => {
                self.interrupted(request, message).await
            }
            TaskOutcome::Terminated => self.terminated(request).await,
            TaskOutcome::Success(value) => self.succeeded(request, value, runtime).await,
            TaskOutcome::Failure { exc, traceback } => self.failed(request, exc, traceback).await,
        }
        shared.state.finish(&request.id);
    }

    /// Shutdown past its grace period: the step goes back to the broker for another worker.
    async fn interrupted(&self, request: &TaskRequest, message: &RawMessage) {
        let (shared, queue) = (self.shared, self.queue);
        warn!(task_id = %request.id, "Task {}[{}] interrupted by shutdown; handing it back to the broker", request.name, request.id);
        shared.metrics.retried(&request.task, &queue.name);
        shared.events.task(
            "task-rejected",
            vec![("uuid", json!(request.id)), ("requeue", json!(true))],
        );
        match queue.ack {
            AckPolicy::Late => settle(self.acker, &request.id, Settle::Requeue).await,
            AckPolicy::Early => Box::pin(republish(shared, queue, message, &request.id)).await,
        }
    }

    /// Revoked with `terminate` while it ran.
    async fn terminated(&self, request: &TaskRequest) {
        info!(task_id = %request.id, "Task {}[{}] terminated", request.name, request.id);
        self.shared.metrics.revoked(&request.task, &self.queue.name);
        self.revoked_event(&request.id, true, false);
        self.finish(request, &ResultMeta::revoked(&request.id, "revoked"), true)
            .await;
    }

    async fn succeeded(&self, request: &TaskRequest, value: Value, runtime: f64) {
        info!(task_id = %request.id, "Task {}[{}] succeeded in {runtime:.3}s", request.name, request.id);
        self.shared
            .metrics
            .succeeded(&request.task, &self.queue.name);
        self.shared.events.task(
            "task-succeeded",
            vec![
                ("uuid", json!(request.id)),
                ("result", json!(truncate_repr(python_repr(&value), 1024))),
                ("runtime", json!(runtime)),
            ],
        );
        let meta = ResultMeta::success(&request.id, value)
            .with_lineage(request.parent_id.clone(), request.group.clone());
        self.finish(request, &meta, false).await;
    }

    async fn failed(&self, request: &TaskRequest, exc: ExceptionInfo, traceback: Option<String>) {
        error!(task_id = %request.id, "Task {}[{}] raised unexpected: {}", request.name, request.id, exc.repr());
        self.shared
            .metrics
            .failed(&request.task, &self.queue.name, &exc.exc_type);
        self.shared.events.task(
            "task-failed",
            vec![
                ("uuid", json!(request.id)),
                ("exception", json!(exc.repr())),
                ("traceback", json!(traceback.clone().unwrap_or_default())),
            ],
        );
        let meta = ResultMeta::failure(&request.id, &exc, traceback)
            .with_lineage(request.parent_id.clone(), request.group.clone());
        self.finish(request, &meta, false).await;
    }

    /// Store, then settle: under late ack the message is acknowledged only once its result is safe;
    /// a result that could not be stored hands the message back so another attempt can deliver one
    /// (the publisher would wait forever on a lost result). `stored_or_not` ignores the store's
    /// outcome (a terminated task's REVOKED result is best effort: the message is done either way).
    async fn finish(&self, request: &TaskRequest, meta: &ResultMeta, stored_or_not: bool) {
        let stored = store(self.shared, request, meta).await || stored_or_not;
        if self.queue.ack == AckPolicy::Late {
            let how = if stored { Settle::Ack } else { Settle::Requeue };
            settle(self.acker, &request.id, how).await;
        }
    }

    fn revoked_event(&self, id: &str, terminated: bool, expired: bool) {
        let signum = if terminated {
            json!("SIGTERM")
        } else {
            Value::Null
        };
        self.shared.events.task(
            "task-revoked",
            vec![
                ("uuid", json!(id)),
                ("terminated", json!(terminated)),
                ("signum", signum),
                ("expired", json!(expired)),
            ],
        );
    }
}
