//! Step results as they reach the driver: their Dagster events applied to the engine, in the order
//! Python's loop would visit them, and what follows (skips, abandons, the next steps) written in the
//! same decision. A result is acknowledged only after that decision is committed and its new tasks
//! published, so a replica that dies in between leaves the result for the next owner.

use std::time::Instant;

use celeriac_dagster::plan::StepEvent;
use celeriac_dagster::run_events::{self as ev, EngineData, EventRow, ERROR, INFO};
use celeriac_wire::broker::Acker;
use celeriac_wire::json::python_repr;
use serde_json::Value;
use tracing::{debug, warn};

use super::driver::{now, Arrived, Driver, DELEGATE_MARKER};
use crate::store::{Commit, StoreError};

impl Driver {
    /// Results arrived: apply them (in submission order, as Python's loop visits its tasks), write what
    /// follows from them in one transaction, publish the next steps, then settle them.
    pub(super) async fn on_results(&mut self, mut batch: Vec<Arrived>) -> Result<(), StoreError> {
        let received = Instant::now();
        let t = now();
        let position = |a: &Arrived| self.order.iter().position(|id| *id == a.task_id);
        batch.sort_by_key(|a| position(a).unwrap_or(usize::MAX));
        let mut commit = Commit::default();
        let mut finished = Vec::new();
        let mut acks = Vec::with_capacity(batch.len());
        for Arrived { task_id, meta, ack } in batch {
            acks.push(ack);
            let status = meta.get("status").and_then(Value::as_str).unwrap_or("");
            if matches!(status, "PENDING" | "STARTED" | "RETRY" | "RECEIVED") {
                continue;
            }
            let Some(step_key) = self.in_flight.get(&task_id).map(|t| t.step_key.clone()) else {
                debug!(run_id = %self.scope.run_id, task_id, "result of a task not in flight here (already applied); dropped");
                continue;
            };
            if let Err(message) = self.apply_events(&step_key, &meta, t, &mut commit) {
                // Python's run worker would crash here; the run fails with the reason instead.
                warn!(run_id = %self.scope.run_id, step = %step_key, "{message}");
                self.fail_run(&message);
            }
            self.in_flight.remove(&task_id);
            self.order.retain(|id| id != &task_id);
            self.shared.results.forget(&task_id).await;
            commit.applied.push((task_id, meta, t));
            finished.push(step_key);
        }
        if finished.is_empty() {
            for ack in acks {
                settle(ack).await;
            }
            return Ok(());
        }
        self.after_results(&mut commit, &finished, t);
        let had_new = !commit.new_tasks.is_empty();
        let decided = received.elapsed();
        if !self.commit(commit).await? {
            debug!(run_id = %self.scope.run_id, "a result was already applied by a previous owner");
        }
        let committed = received.elapsed();
        let confirmed = self.publish_pending().await?;
        debug!(run_id = %self.scope.run_id, results = finished.len(), decided_ms = decided.as_secs_f64() * 1e3,
               committed_ms = committed.as_secs_f64() * 1e3,
               published_ms = confirmed.map(|c| (c - received).as_secs_f64() * 1e3),
               "results applied");
        for ack in acks {
            settle(ack).await;
        }
        // Published = confirmed by the broker (Python's executor does not even wait for that).
        if let (true, Some(confirmed)) = (had_new, confirmed) {
            self.shared
                .metrics
                .result_to_submit
                .observe((confirmed - received).as_secs_f64());
        }
        Ok(())
    }

    /// Applies the events of one result to the engine; returns whether it had a terminal event.
    pub(super) fn apply_events(
        &mut self,
        step_key: &str,
        meta: &Value,
        t: f64,
        commit: &mut Commit,
    ) -> Result<(), String> {
        let status = meta.get("status").and_then(Value::as_str).unwrap_or("");
        match status {
            "SUCCESS" => {
                let Some(events) = meta.get("result").and_then(Value::as_array) else {
                    return Err(format!(
                        "the result of step {step_key} is not a list of Dagster events: {}",
                        python_repr(meta.get("result").unwrap_or(&Value::Null))
                    ));
                };
                for raw in events {
                    let text = raw.as_str().ok_or_else(|| {
                        format!("the result of step {step_key} holds a non-string event")
                    })?;
                    let event = StepEvent::parse(text).map_err(|e| {
                        format!("step {step_key} reported an unreadable event: {e}")
                    })?;
                    if event.event_type == "STEP_FAILURE" {
                        if let Ok(v) = celeriac_dagster::serdes::parse(text.as_bytes()) {
                            self.failed_steps.push(v);
                        }
                    }
                    self.engine
                        .handle_event(&event, t)
                        .map_err(|e| format!("{e}"))?;
                }
            }
            "FAILURE" => {
                let r = meta.get("result").cloned().unwrap_or(Value::Null);
                let class = r
                    .get("exc_type")
                    .and_then(Value::as_str)
                    .unwrap_or("Exception");
                let module = r
                    .get("exc_module")
                    .and_then(Value::as_str)
                    .unwrap_or("builtins");
                let message = match r.get("exc_message") {
                    Some(Value::Array(items)) if items.len() == 1 => items[0]
                        .as_str()
                        .map_or_else(|| python_repr(&items[0]), str::to_string),
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => python_repr(other),
                    None => String::new(),
                };
                let qualified = if module == "builtins" {
                    class.to_string()
                } else {
                    format!("{module}.{class}")
                };
                self.step_errors
                    .push((step_key.to_string(), format!("{qualified}: {message}\n")));
            }
            "REVOKED" => commit.events.push(self.revoked_event(step_key, t)),
            other => {
                return Err(format!(
                    "the result of step {step_key} has an unexpected state {other:?}"
                ))
            }
        }
        Ok(())
    }

    /// The engine event of a step whose task was revoked (it ends the step's `celery_queue_wait`).
    pub(super) fn revoked_event(&self, step_key: &str, t: f64) -> EventRow {
        let step = self.engine.step(step_key).ok().cloned();
        ev::engine_event(
            &self.scope,
            step.as_ref(),
            &format!("celery task for running step \"{step_key}\" was revoked."),
            &EngineData {
                marker_end: Some(DELEGATE_MARKER.into()),
                ..Default::default()
            },
            t,
        )
    }

    /// What follows finished tasks: unknown-state checks, skips, abandons, new submissions.
    pub(super) fn after_results(&mut self, commit: &mut Commit, finished: &[String], t: f64) {
        for key in finished {
            match self.engine.verify_complete(key) {
                Ok(Some(message)) => {
                    commit
                        .events
                        .push(ev::log_line(&self.scope, None, ERROR, &message, t))
                }
                Ok(None) => {}
                Err(e) => self.fail_run(&e.to_string()),
            }
        }
        self.plan_events(commit, t);
        self.submit_ready(commit, t);
    }

    pub(super) fn plan_events(&mut self, commit: &mut Commit, t: f64) {
        match self.engine.plan_events(t) {
            Ok(events) => {
                for s in &events.skipped {
                    commit.events.push(ev::log_line(
                        &self.scope,
                        Some(&s.step_key),
                        INFO,
                        &s.message(),
                        t,
                    ));
                    if let Ok(step) = self.engine.step(&s.step_key) {
                        commit.events.push(ev::step_skipped(&self.scope, step, t));
                    }
                }
                for a in &events.abandoned {
                    commit.events.push(ev::log_line(
                        &self.scope,
                        Some(&a.step_key),
                        ERROR,
                        &a.message(),
                        t,
                    ));
                }
            }
            Err(e) => self.fail_run(&e.to_string()),
        }
    }
}

async fn settle(ack: Option<Box<dyn Acker>>) {
    if let Some(a) = ack {
        if let Err(e) = a.ack().await {
            warn!("cannot acknowledge a result: {e}");
        }
    }
}
