//! Submitting step tasks as Python's celery executor does: each step the engine hands out becomes a
//! "Submitting celery task" engine event and a task row, written with the decision; only once that is
//! committed are the tasks published (with their stored ids, so a replica that died in between
//! publishes exactly the same messages).

use std::time::Instant;

use celeriac_dagster::run_events::{self as ev, EngineData};
use celeriac_dagster::submission::{step_task, Handoff};
use celeriac_wire::broker::QueueSpec;
use celeriac_wire::task::TaskMessage;
use serde_json::{json, Value};
use tracing::{debug, warn};

use super::driver::{error_info, Driver, InFlight, DELEGATE_MARKER};
use crate::results::reply_queue;
use crate::shared::Shared;
use crate::store::{Commit, StoreError, TaskRow};

impl Driver {
    /// Submits (into `commit`) every step the engine hands out now, unless the run is stopping.
    pub(super) fn submit_ready(&mut self, commit: &mut Commit, t: f64) {
        if self.stopping || !self.step_errors.is_empty() || self.run_error.is_some() {
            return;
        }
        match self.engine.get_steps_to_execute(t) {
            Ok(keys) if keys.is_empty() => {}
            Ok(keys) => {
                // Decoded once per decision, not once per step.
                let handoff = self.decode_handoff();
                for key in keys {
                    self.submit_step(commit, &key, &handoff, t);
                    if self.run_error.is_some() {
                        break;
                    }
                }
            }
            Err(e) => self.fail_run(&e.to_string()),
        }
    }

    /// The hand-off, decoded from the compact JSON the driver keeps.
    pub(super) fn decode_handoff(&self) -> Result<Handoff, String> {
        serde_json::from_str(&self.handoff)
            .map_err(|e| e.to_string())
            .and_then(|v| Handoff::decode(&v).map_err(|e| e.to_string()))
            .map_err(|e| format!("the run's hand-off is unreadable: {e}"))
    }

    /// Builds the task of one step: the "Submitting celery task" engine event and the task row.
    pub(super) fn submit_step(
        &mut self,
        commit: &mut Commit,
        key: &str,
        handoff: &Result<Handoff, String>,
        t: f64,
    ) {
        let known = self.engine.get_known_state();
        let built = self
            .engine
            .step(key)
            .map_err(|e| e.to_string())
            .and_then(|step| {
                let handoff = handoff.as_ref().map_err(Clone::clone)?;
                step_task(handoff, self.run_priority, step, &known)
                    .map(|task| (step.clone(), task))
                    .map_err(|e| e.to_string())
            });
        let (step, task) = match built {
            Ok(x) => x,
            Err(e) => {
                // Python: "Encountered error during celery task submission." and the run fails.
                let err = error_info("builtins", "Exception", &e);
                commit.events.push(ev::engine_event(
                    &self.scope,
                    None,
                    "Encountered error during celery task submission.",
                    &EngineData {
                        error: Some(err.clone()),
                        ..Default::default()
                    },
                    t,
                ));
                self.run_error = Some(err);
                return;
            }
        };
        let task_id = uuid::Uuid::new_v4().to_string();
        let message = TaskMessage {
            id: task_id.clone(),
            task: celeriac_dagster::step::task::TASK_NAME.into(),
            args: vec![],
            argsrepr: celeriac_wire::saferepr::argsrepr(&[]),
            kwargsrepr: celeriac_wire::saferepr::kwargsrepr(&task.kwargs),
            kwargs: task.kwargs,
            origin: format!("{}@{}", std::process::id(), self.shared.hostname),
            reply_to: Some(reply_queue(&self.scope.run_id)),
            priority: Some(task.priority),
            root_id: None,
            parent_id: None,
        };
        commit.events.push(ev::engine_event(
            &self.scope,
            Some(&step),
            &format!(
                "Submitting celery task for step \"{key}\" to queue \"{}\".",
                task.queue
            ),
            &EngineData {
                marker_start: Some(DELEGATE_MARKER.into()),
                ..Default::default()
            },
            t,
        ));
        let out = message.to_outgoing();
        let row = TaskRow {
            task_id: task_id.clone(),
            run_id: self.scope.run_id.clone(),
            step_key: key.to_string(),
            attempt: i32::try_from(self.engine.attempts(key)).unwrap_or(i32::MAX),
            queue: task.queue,
            submitted_at: t,
            message: json!({
                "headers": out.headers,
                "priority": task.priority,
                "body": String::from_utf8_lossy(&out.body),
            }),
            published: false,
            result: None,
            applied_at: None,
        };
        commit.new_tasks.push(row.clone());
        let n = self.submitted.len();
        self.submitted.entry(key.to_string()).or_insert(n);
        self.order.push(task_id.clone());
        self.in_flight.insert(
            task_id,
            InFlight {
                step_key: key.to_string(),
                published: false,
                row,
            },
        );
    }

    /// Publishes every task not yet published (declaring its queue as Celery does), retrying while the
    /// broker is unavailable. Returns when the broker had confirmed them all (before they are marked
    /// published in the database), or `None` when there was nothing to publish.
    pub(super) async fn publish_pending(&mut self) -> Result<Option<Instant>, StoreError> {
        let pending: Vec<String> = self
            .order
            .iter()
            .filter(|id| self.in_flight.get(*id).is_some_and(|t| !t.published))
            .cloned()
            .collect();
        if pending.is_empty() {
            return Ok(None);
        }
        // All at once: the broker confirms them together (persistent messages: one disk sync for many).
        let shared = self.shared.clone();
        let run_id = self.scope.run_id.clone();
        let sends = pending.iter().filter_map(|id| {
            let task = self.in_flight.get(id)?;
            let (shared, run_id) = (shared.clone(), run_id.clone());
            let (id, queue, step, out) = (
                id.clone(),
                task.row.queue.clone(),
                task.step_key.clone(),
                outgoing(&task.row),
            );
            Some(async move {
                let mut backoff = celeriac_wire::backoff::Backoff::default();
                while let Err(e) = shared.publish(&queue, out.clone()).await {
                    warn!(%run_id, %step, "cannot publish the step task: {e}; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                debug!(%run_id, %step, task_id = %id, %queue, "step task published");
                id
            })
        });
        let published: Vec<String> = futures::future::join_all(sends).await;
        let confirmed = Instant::now();
        for id in &published {
            if let Some(t) = self.in_flight.get_mut(id) {
                t.published = true;
                // The message is kept in the database; a published task needs only its identity here.
                t.row.message = Value::Null;
            }
        }
        self.shared.store.mark_published(&published).await?;
        Ok(Some(confirmed))
    }
}

/// The stored message of a task, ready to publish again.
fn outgoing(row: &TaskRow) -> celeriac_wire::broker::OutgoingMessage {
    let body = row
        .message
        .get("body")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut out = celeriac_wire::broker::OutgoingMessage::json(body);
    if let Some(Value::Object(h)) = row.message.get("headers") {
        out.headers = h.clone();
    }
    out.properties = celeriac_wire::message::Properties {
        correlation_id: Some(row.task_id.clone()),
        reply_to: Some(reply_queue(&row.run_id)),
        delivery_mode: Some(2),
        priority: row
            .message
            .get("priority")
            .and_then(Value::as_u64)
            .and_then(|p| u8::try_from(p).ok()),
        expiration: None,
    };
    out
}

// Keep the declared-queue helper close to its only caller.
impl Shared {
    /// Publishes a step task to its queue (declared once per queue, as Celery's publisher does).
    pub async fn publish(
        &self,
        queue: &str,
        message: celeriac_wire::broker::OutgoingMessage,
    ) -> Result<(), celeriac_wire::broker::BrokerError> {
        let declared = self.declared.lock().await.contains(queue);
        if !declared {
            self.broker.declare(&QueueSpec::dagster(queue)).await?;
            self.declared.lock().await.insert(queue.to_string());
        }
        self.broker.publish("", queue, message).await
    }
}
