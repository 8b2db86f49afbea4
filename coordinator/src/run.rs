//! Driving one run: `core_celery_execution_loop` without its one-second tick.
//!
//! The plan engine decides; each decision (a result applied, the run started, a retry due) is written in
//! one transaction — the events Python's run worker would write, the new step tasks, the run's status —
//! and only then are the new tasks published and the result acknowledged. A replica that dies anywhere
//! in between leaves the run in a state the next owner rebuilds exactly ([`Driver::resume`]): the applied
//! results replayed through the engine in their original order, in-flight tasks re-attached, unpublished
//! tasks published (with their original ids).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use celeriac_dagster::events::ErrorInfo;
use celeriac_dagster::plan::{ActiveExecution, ExecutionPlan, SortKey, StepEvent};
use celeriac_dagster::run::RunRecord;
use celeriac_dagster::run_events::{
    self as ev, EngineData, FailureReason, RunScope, ERROR, INFO, WARNING,
};
use celeriac_dagster::submission::{run_priority, step_task, Handoff};
use celeriac_wire::broker::{Acker, QueueSpec};
use celeriac_wire::json::python_repr;
use celeriac_wire::task::TaskMessage;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::results::{reply_queue, RunInput};
use crate::service::Shared;
use crate::store::{Claimed, Commit, StatusChange, StoreError, TaskRow};

/// `DELEGATE_MARKER` of dagster_celery.
const DELEGATE_MARKER: &str = "celery_queue_wait";

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Where a run's plan came from.
enum PlanSource {
    /// Rebuilt for an earlier run of the same snapshot.
    Rebuilt(ExecutionPlan),
    /// Read from the instance: to rebuild.
    Snapshot(celeriac_dagster::plan::PlanSnapshot),
}

/// At most this many waiting results are applied in one decision.
const MAX_RESULTS_PER_DECISION: usize = 256;

/// A result as it arrived, with what settles its message.
struct Arrived {
    task_id: String,
    meta: Value,
    ack: Option<Box<dyn Acker>>,
}

/// How a driver stopped.
#[derive(Debug)]
pub enum Ended {
    /// The run finished (its terminal event is written).
    Finished(String),
    /// This replica no longer owns the run, or is shutting down: another replica continues it.
    Handed,
}

/// A step task in flight.
#[derive(Debug, Clone)]
struct InFlight {
    step_key: String,
    published: bool,
    row: TaskRow,
}

/// The state of one run while this replica drives it.
pub struct Driver {
    shared: Arc<Shared>,
    run: RunRecord,
    /// The hand-off as stored (compact JSON), decoded for each submission: as a `Value` tree it
    /// took several times its text size in every run's memory for the run's whole life.
    handoff: Box<str>,
    scope: RunScope,
    run_priority: i64,
    engine: ActiveExecution,
    /// task id → in-flight task, in submission order.
    in_flight: BTreeMap<String, InFlight>,
    order: Vec<String>,
    /// Celery FAILURE results: (step key, error text). No new step is submitted after one.
    step_errors: Vec<(String, String)>,
    /// An error of the coordinator itself that fails the run (a step that cannot be submitted, an
    /// event the engine refuses, a malformed result).
    run_error: Option<ErrorInfo>,
    /// STEP_FAILURE events reported, in order (the first one explains a failed run).
    failed_steps: Vec<Value>,
    /// Step key → the order of its first submission (ties of Python's per-tick result order).
    submitted: std::collections::HashMap<String, usize>,
    stopping: bool,
    revoke_deadline: Option<Instant>,
    /// Set when the run was finished by someone else (forced cancel, run monitoring).
    externally_finished: Option<String>,
    /// When `CeleriacRunLauncher` handed the run over.
    launched_at: Option<f64>,
    last_progress: Instant,
    tx: mpsc::Sender<RunInput>,
}

fn error_info(module: &str, class: &str, text: &str) -> ErrorInfo {
    ErrorInfo::new(module, class, text)
}

fn dagster_error(class: &str, text: &str) -> ErrorInfo {
    error_info("dagster._core.errors", class, text)
}

impl Driver {
    /// Builds the driver of a claimed run; a run that cannot be driven (unreadable hand-off or plan) is
    /// failed here with a clear message and `Err(Ended)` is returned.
    pub async fn open(
        shared: Arc<Shared>,
        claimed: &Claimed,
        tx: mpsc::Sender<RunInput>,
    ) -> Result<Driver, Ended> {
        let run_id = claimed.run_id.clone();
        let loaded = shared
            .store
            .with_client(async |c| {
                let run = celeriac_dagster::run::load_run(c, &run_id).await?;
                let cached = run
                    .execution_plan_snapshot_id
                    .as_deref()
                    .and_then(|id| shared.plans.get(id, &run.job_name));
                let plan = match cached {
                    Some(plan) => Ok(PlanSource::Rebuilt(plan)),
                    None => celeriac_dagster::run::load_plan(c, &run)
                        .await
                        .map(PlanSource::Snapshot),
                };
                Ok::<_, celeriac_dagster::run::LoadError>((run, plan))
            })
            .await;
        let (run, plan) = match loaded {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                warn!(run_id, "cannot read the run: {e}");
                let _ = shared
                    .store
                    .finish(&run_id, &shared.replica, "failed", Some(&e.to_string()))
                    .await;
                return Err(Ended::Finished("FAILURE".into()));
            }
            Err(e) => {
                warn!(run_id, "database unavailable while opening the run: {e}");
                return Err(Ended::Handed);
            }
        };
        let scope = RunScope {
            run_id: run_id.clone(),
            job_name: run.job_name.clone(),
            pid: std::process::id(),
        };
        let handoff = Handoff::decode(&claimed.handoff)
            .map_err(|e| format!("the run's hand-off is unreadable: {e}"));
        let plan = plan.map_err(|e| e.to_string());
        let built = match (handoff, plan) {
            (Ok(h), Ok(p)) => {
                let prio = run_priority(&run.tags);
                let sort = SortKey::Celery {
                    run_priority: prio,
                    task_default_priority: h.task_default_priority,
                };
                let plan = match p {
                    PlanSource::Rebuilt(plan) => Ok(plan),
                    PlanSource::Snapshot(snapshot) => {
                        let plan = ExecutionPlan::rebuild(&run.job_name, &snapshot);
                        if let (Ok(plan), Some(id)) = (&plan, &run.execution_plan_snapshot_id) {
                            shared.plans.insert(id, &run.job_name, plan);
                        }
                        plan
                    }
                };
                plan.and_then(|plan| ActiveExecution::new(plan, h.retry_mode, sort, now()))
                    .map(|engine| (h, prio, engine))
                    .map_err(|e| format!("cannot build the execution plan of run {run_id}: {e}"))
            }
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        match built {
            Ok((_, run_priority, engine)) => Ok(Driver {
                shared,
                run,
                handoff: claimed.handoff.to_string().into_boxed_str(),
                scope,
                run_priority,
                engine,
                in_flight: BTreeMap::new(),
                order: Vec::new(),
                step_errors: Vec::new(),
                run_error: None,
                failed_steps: Vec::new(),
                submitted: std::collections::HashMap::new(),
                stopping: false,
                revoke_deadline: None,
                externally_finished: None,
                launched_at: claimed.handoff.get("launched_at").and_then(Value::as_f64),
                last_progress: Instant::now(),
                tx,
            }),
            Err(message) => {
                warn!(run_id, "{message}");
                let driver_less = FailWithoutPlan {
                    shared: &shared,
                    run: &run,
                    scope: &scope,
                };
                driver_less.fail(&message).await;
                Err(Ended::Finished("FAILURE".into()))
            }
        }
    }

    /// Drives the run until it ends or this replica must let go of it.
    pub async fn drive(
        mut self,
        mut rx: mpsc::Receiver<RunInput>,
        stop: CancellationToken,
    ) -> Ended {
        let run_id = self.scope.run_id.clone();
        // The futures of the steps below are boxed: they live only while a decision is made, and
        // inline they would make every run's idle future (thousands of them) as big as the largest.
        match Box::pin(self.start(&stop)).await {
            Ok(Some(ended)) => return ended,
            Ok(None) => {}
            Err(e) => return self.lost(e),
        }
        let poll = self.shared.settings.status_poll;
        loop {
            if let Some(ended) = Box::pin(self.maybe_finish()).await {
                return ended;
            }
            let mut wait = poll;
            let retry_in = self.engine.sleep_interval(now());
            if retry_in > 0.0 {
                wait = wait.min(Duration::from_secs_f64(retry_in));
            }
            if let Some(deadline) = self.revoke_deadline {
                wait = wait.min(deadline.saturating_duration_since(Instant::now()));
            }
            let step = tokio::select! {
                _ = stop.cancelled() => return Ended::Handed,
                input = rx.recv() => match input {
                    Some(RunInput::Result { task_id, meta, ack }) => {
                        // Every result already waiting joins the same decision, as Python's loop handles
                        // all ready results in one tick: a fan-in is one transaction and one publish.
                        let mut batch = vec![Arrived { task_id, meta, ack }];
                        let mut wake = false;
                        while batch.len() < MAX_RESULTS_PER_DECISION {
                            match rx.try_recv() {
                                Ok(RunInput::Result { task_id, meta, ack }) => batch.push(Arrived { task_id, meta, ack }),
                                Ok(RunInput::Wake) => wake = true,
                                Err(_) => break,
                            }
                        }
                        match Box::pin(self.on_results(batch)).await {
                            Ok(()) if wake => Box::pin(self.check_status()).await,
                            other => other,
                        }
                    }
                    Some(RunInput::Wake) => Box::pin(self.check_status()).await,
                    None => return Ended::Handed,
                },
                _ = tokio::time::sleep(wait) => Box::pin(self.on_tick()).await,
            };
            if let Err(e) = step {
                return self.lost(e);
            }
            let waiting = !self.in_flight.is_empty() || !self.engine.is_complete();
            self.shared.metrics.progress(
                &run_id,
                self.in_flight.len(),
                waiting.then(|| self.last_progress.elapsed()),
            );
        }
    }

    fn lost(&self, e: StoreError) -> Ended {
        match e {
            StoreError::LostLease(_) => {
                info!(run_id = %self.scope.run_id, "another coordinator owns this run now; letting go");
            }
            other => {
                warn!(run_id = %self.scope.run_id, "stopping on a database error (another replica resumes the run): {other}");
            }
        }
        Ended::Handed
    }

    /// Starts a fresh run or resumes one a replica drove before.
    async fn start(&mut self, stop: &CancellationToken) -> Result<Option<Ended>, StoreError> {
        let status = self
            .shared
            .store
            .run_row(&self.scope.run_id)
            .await?
            .map(|(s, _)| s)
            .unwrap_or_default();
        match status.as_str() {
            "SUCCESS" | "FAILURE" | "CANCELED" => {
                info!(run_id = %self.scope.run_id, status, "run already finished");
                self.shared
                    .store
                    .finish(&self.scope.run_id, &self.shared.replica, "finished", None)
                    .await?;
                return Ok(Some(Ended::Finished(status)));
            }
            "STARTED" | "CANCELING" => self.resume().await?,
            _ => self.begin().await?,
        }
        let pending: Vec<String> = self.in_flight.keys().cloned().collect();
        self.shared
            .results
            .attach(
                &self.scope.run_id,
                &pending,
                self.tx.clone(),
                stop.child_token(),
            )
            .await;
        self.publish_pending().await?;
        if status == "CANCELING" {
            self.cancel().await?;
        }
        Ok(None)
    }

    /// RUN_START and the first wave of steps, in one transaction.
    async fn begin(&mut self) -> Result<(), StoreError> {
        let t = now();
        let mut commit = Commit {
            status: Some(self.status_change(None)),
            ..Default::default()
        };
        commit.events.push(ev::engine_event(
            &self.scope,
            None,
            &format!(
                "celeriac coordinator {} is driving the run.",
                self.shared.replica
            ),
            &EngineData {
                metadata: vec![("replica".into(), self.shared.replica.clone())],
                ..Default::default()
            },
            t,
        ));
        commit.events.push(ev::run_start(&self.scope, t));
        if let Some(warning) = self.priority_misuse() {
            commit
                .events
                .push(ev::log_line(&self.scope, None, WARNING, &warning, t));
        }
        self.submit_ready(&mut commit, t);
        self.commit(commit).await?;
        info!(run_id = %self.scope.run_id, job = %self.scope.job_name, steps = self.in_flight.len(), "run started");
        if let Some(launched) = self.launched_at {
            self.shared
                .metrics
                .launch_to_first_submit
                .observe((t - launched).max(0.0));
        }
        Ok(())
    }

    /// Rebuilds the engine from the tasks and results a previous owner recorded.
    async fn resume(&mut self) -> Result<(), StoreError> {
        let rows = self.shared.store.tasks(&self.scope.run_id).await?;
        let applied = self.shared.store.applied_order(&self.scope.run_id).await?;
        let by_id: BTreeMap<String, TaskRow> = rows
            .iter()
            .map(|r| (r.task_id.clone(), r.clone()))
            .collect();
        let t0 = rows.first().map_or_else(now, |r| r.submitted_at);
        // A fresh engine, replayed: first wave, then every applied result in its original order.
        let _ = self.engine.get_steps_to_execute(t0);
        for task_id in &applied {
            let Some(row) = by_id.get(task_id) else {
                continue;
            };
            if !self.engine.snapshot().in_flight.contains(&row.step_key) {
                let _ = self.engine.get_steps_to_execute(row.submitted_at);
            }
            let at = row.applied_at.unwrap_or(row.submitted_at);
            if let Some(result) = &row.result {
                let _ = self.apply_events(&row.step_key, result, at, &mut Commit::default());
            }
            let _ = self.engine.verify_complete(&row.step_key);
            let _ = self.engine.plan_events(at);
        }
        // What is in flight now: tasks without an applied result re-attach; steps the engine hands out
        // that have no task yet are submitted below.
        let handed = self.engine.get_steps_to_execute(now()).unwrap_or_default();
        let mut in_flight_steps = self.engine.snapshot().in_flight;
        in_flight_steps.retain(|k| !handed.contains(k));
        for row in &rows {
            let n = self.submitted.len();
            self.submitted.entry(row.step_key.clone()).or_insert(n);
            if row.result.is_none() {
                let mut kept = row.clone();
                if kept.published {
                    kept.message = Value::Null;
                }
                self.order.push(row.task_id.clone());
                self.in_flight.insert(
                    row.task_id.clone(),
                    InFlight {
                        step_key: row.step_key.clone(),
                        published: row.published,
                        row: kept,
                    },
                );
            }
        }
        let mut commit = Commit::default();
        let t = now();
        let previous = self.shared.takeover_note(&self.scope.run_id);
        commit.events.push(ev::engine_event(
            &self.scope,
            None,
            &format!(
                "celeriac coordinator {} resumed the run{previous} ({} step task(s) in flight, {} result(s) replayed).",
                self.shared.replica,
                self.in_flight.len(),
                applied.len()
            ),
            &EngineData::default(),
            t,
        ));
        let mut handoff = None;
        for key in handed {
            let attempt = self.engine.attempts(&key);
            let known_row = rows.iter().any(|r| {
                r.step_key == key && i64::from(r.attempt) == attempt && r.result.is_none()
            });
            if !known_row {
                let h = handoff.get_or_insert_with(|| self.decode_handoff());
                self.submit_step(&mut commit, &key, h, t);
            }
        }
        self.commit(commit).await?;
        info!(run_id = %self.scope.run_id, in_flight = self.in_flight.len(), replayed = applied.len(), "run resumed");
        Ok(())
    }

    /// `_warn_on_priority_misuse`: steps with `dagster/priority` but no `dagster-celery/priority`.
    fn priority_misuse(&self) -> Option<String> {
        let plan = self.engine.plan();
        let bad: Vec<&str> = plan
            .step_keys_to_execute()
            .iter()
            .filter(|k| {
                plan.step(k).is_ok_and(|s| {
                    s.tags
                        .contains_key(celeriac_dagster::plan::active::PRIORITY_TAG)
                        && !s
                            .tags
                            .contains_key(celeriac_dagster::plan::active::CELERY_STEP_PRIORITY_TAG)
                })
            })
            .map(String::as_str)
            .collect();
        (!bad.is_empty()).then(|| {
            format!(
                "The following steps do not have \"dagster-celery/priority\" set but do have \"dagster/priority\" set which is not applicable for the celery engine: [{}]. Consider using a function to set both keys.",
                bad.join(", ")
            )
        })
    }

    fn status_change(&self, reason: Option<FailureReason>) -> StatusChange {
        StatusChange {
            body: self.run.body.clone(),
            failure_reason: reason,
        }
    }

    /// Submits (into `commit`) every step the engine hands out now, unless the run is stopping.
    fn submit_ready(&mut self, commit: &mut Commit, t: f64) {
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

    /// Builds the task of one step: the "Submitting celery task" engine event and the task row.
    /// The hand-off, decoded from the compact JSON the driver keeps.
    fn decode_handoff(&self) -> Result<Handoff, String> {
        serde_json::from_str(&self.handoff)
            .map_err(|e| e.to_string())
            .and_then(|v| Handoff::decode(&v).map_err(|e| e.to_string()))
            .map_err(|e| format!("the run's hand-off is unreadable: {e}"))
    }

    fn submit_step(
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

    /// Writes a decision; on success the new tasks are registered for their results.
    async fn commit(&mut self, commit: Commit) -> Result<bool, StoreError> {
        let new: Vec<String> = commit.new_tasks.iter().map(|t| t.task_id.clone()).collect();
        let written = self
            .shared
            .store
            .commit(&self.scope.run_id, &self.shared.replica, &commit)
            .await?;
        for id in &new {
            self.shared.results.track(id, &self.tx).await;
        }
        if !commit.events.is_empty() || !new.is_empty() {
            self.last_progress = Instant::now();
        }
        Ok(written)
    }

    /// Publishes every task not yet published (declaring its queue as Celery does), retrying while the
    /// broker is unavailable.
    /// Publishes the tasks not yet published; returns when the broker had confirmed them all (before
    /// they are marked published in the database), or `None` when there was nothing to publish.
    async fn publish_pending(&mut self) -> Result<Option<Instant>, StoreError> {
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

    /// Applies the events of one result to the engine; returns whether it had a terminal event.
    fn apply_events(
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
            "REVOKED" => {
                let step = self.engine.step(step_key).ok().cloned();
                commit.events.push(ev::engine_event(
                    &self.scope,
                    step.as_ref(),
                    &format!("celery task for running step \"{step_key}\" was revoked."),
                    &EngineData {
                        marker_end: Some(DELEGATE_MARKER.into()),
                        ..Default::default()
                    },
                    t,
                ));
            }
            other => {
                return Err(format!(
                    "the result of step {step_key} has an unexpected state {other:?}"
                ))
            }
        }
        Ok(())
    }

    /// Results arrived: apply them (in submission order, as Python's loop visits its tasks), write what
    /// follows from them in one transaction, publish the next steps, then settle them.
    async fn on_results(&mut self, mut batch: Vec<Arrived>) -> Result<(), StoreError> {
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

    /// What follows finished tasks: unknown-state checks, skips, abandons, new submissions.
    fn after_results(&mut self, commit: &mut Commit, finished: &[String], t: f64) {
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

    fn plan_events(&mut self, commit: &mut Commit, t: f64) {
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

    /// The run cannot go on: nothing more is submitted, it fails once nothing is in flight.
    fn fail_run(&mut self, message: &str) {
        if self.run_error.is_none() {
            self.run_error = Some(error_info("builtins", "Exception", message));
        }
    }

    /// Timer: retries that became due, revocations that timed out, the run's status.
    async fn on_tick(&mut self) -> Result<(), StoreError> {
        let t = now();
        if let Some(deadline) = self.revoke_deadline {
            if Instant::now() >= deadline && !self.in_flight.is_empty() {
                // Workers that never answered the revoke (gone): their steps are in an unknown state.
                let mut commit = Commit::default();
                let gone: Vec<String> = self
                    .in_flight
                    .values()
                    .map(|t| t.step_key.clone())
                    .collect();
                for task_id in std::mem::take(&mut self.in_flight).into_keys() {
                    self.shared.results.forget(&task_id).await;
                }
                self.order.clear();
                for key in &gone {
                    let step = self.engine.step(key).ok().cloned();
                    commit.events.push(ev::engine_event(
                        &self.scope,
                        step.as_ref(),
                        &format!("celery task for running step \"{key}\" was revoked."),
                        &EngineData {
                            marker_end: Some(DELEGATE_MARKER.into()),
                            ..Default::default()
                        },
                        t,
                    ));
                }
                self.after_results(&mut commit, &gone, t);
                self.commit(commit).await?;
            }
        }
        if self.engine.sleep_interval(t) <= 0.0 && !self.stopping {
            let mut commit = Commit::default();
            self.plan_events(&mut commit, t);
            self.submit_ready(&mut commit, t);
            if !commit.events.is_empty() || !commit.new_tasks.is_empty() {
                self.commit(commit).await?;
                self.publish_pending().await?;
            }
        }
        self.check_status().await
    }

    /// Reacts to the run's status: CANCELING → cancel; finished or force-canceled elsewhere → stop.
    async fn check_status(&mut self) -> Result<(), StoreError> {
        let Some((status, _)) = self.shared.store.run_row(&self.scope.run_id).await? else {
            return Ok(());
        };
        match status.as_str() {
            "CANCELING" if !self.stopping => self.cancel().await,
            "CANCELED" | "FAILURE" | "SUCCESS" if !self.finishing() => {
                // Finished by someone else (forced termination, run monitoring): stop the steps.
                self.revoke_all().await;
                let message = match status.as_str() {
                    "CANCELED" => "Computational resources were cleaned up after the run was forcibly marked as canceled.",
                    _ => "Execution was interrupted for a run that was already in a failure state.",
                };
                let mut commit = Commit::default();
                commit.events.push(ev::engine_event(
                    &self.scope,
                    None,
                    message,
                    &EngineData::default(),
                    now(),
                ));
                self.commit(commit).await?;
                self.in_flight.clear();
                self.order.clear();
                self.stopping = true;
                self.shared
                    .store
                    .finish(&self.scope.run_id, &self.shared.replica, "finished", None)
                    .await?;
                self.externally_finished = Some(status);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn finishing(&self) -> bool {
        self.externally_finished.is_some()
    }

    /// Termination: revoke (terminate) every in-flight task, submit nothing more.
    async fn cancel(&mut self) -> Result<(), StoreError> {
        self.stopping = true;
        self.engine.mark_interrupted();
        let keys: Vec<Value> = self
            .order
            .iter()
            .filter_map(|id| self.in_flight.get(id))
            .map(|t| Value::String(t.step_key.clone()))
            .collect();
        let mut commit = Commit::default();
        commit.events.push(ev::engine_event(
            &self.scope,
            None,
            "Celery executor: received termination signal - revoking active tasks from workers",
            &EngineData {
                metadata: vec![("steps_interrupted".into(), python_repr(&Value::Array(keys)))],
                ..Default::default()
            },
            now(),
        ));
        self.commit(commit).await?;
        self.revoke_all().await;
        self.revoke_deadline = Some(Instant::now() + self.shared.settings.revoke_grace);
        info!(run_id = %self.scope.run_id, in_flight = self.in_flight.len(), "run canceling: step tasks revoked");
        Ok(())
    }

    async fn revoke_all(&self) {
        for id in self.in_flight.keys() {
            let args = json!({"task_id": id, "terminate": true, "signal": "SIGTERM"});
            if let Err(e) =
                celeriac_wire::pidbox::client::broadcast(&*self.shared.broker, "revoke", args).await
            {
                warn!(run_id = %self.scope.run_id, task_id = %id, "cannot broadcast the revoke: {e}");
            }
        }
    }

    /// Ends the run once nothing is in flight and nothing more will be submitted.
    async fn maybe_finish(&mut self) -> Option<Ended> {
        if let Some(status) = self.externally_finished.clone() {
            return Some(Ended::Finished(status));
        }
        if !self.in_flight.is_empty() {
            return None;
        }
        let blocked = self.stopping || !self.step_errors.is_empty() || self.run_error.is_some();
        if !self.engine.is_complete() && !blocked {
            return None;
        }
        match self.finish().await {
            Ok(status) => Some(Ended::Finished(status)),
            Err(e) => Some(self.lost(e)),
        }
    }

    /// The run's terminal event, as `job_execution_iterator` decides it.
    async fn finish(&mut self) -> Result<String, StoreError> {
        let t = now();
        let snapshot = self.engine.snapshot();
        let interrupted = self.engine.is_interrupted();
        let unknown = python_set(&snapshot.unknown);
        // The exception the execution ends with, as Python raises it.
        let mut canceled: Option<ErrorInfo> = None;
        let mut exception: Option<ErrorInfo> = None;
        if !self.step_errors.is_empty() {
            let list: Vec<String> = self
                .step_errors
                .iter()
                .map(|(k, e)| format!("[{k}]: {e}"))
                .collect();
            exception = Some(dagster_error(
                "DagsterSubprocessError",
                &format!(
                    "During celery execution errors occurred in workers:\n{}",
                    list.join("\n")
                ),
            ));
        } else if let Some(e) = &self.run_error {
            exception = Some(e.clone());
        } else if !snapshot.is_complete {
            if interrupted {
                canceled = Some(dagster_error(
                    "DagsterExecutionInterruptedError",
                    "Execution was interrupted before completing the execution plan.",
                ));
            } else {
                exception = Some(dagster_error(
                    "DagsterInvariantViolationError",
                    "Execution finished without completing the execution plan.",
                ));
            }
        } else if !snapshot.unknown.is_empty() {
            if interrupted {
                canceled = Some(dagster_error(
                    "DagsterExecutionInterruptedError",
                    &format!("Execution exited with steps {unknown} in an unknown state after being interrupted."),
                ));
            } else {
                exception = Some(dagster_error(
                    "DagsterUnknownStepStateError",
                    &format!("Execution exited with steps {unknown} in an unknown state to this process.\nThis was likely caused by losing communication with the process performing step execution."),
                ));
            }
        }
        let run_status = self
            .shared
            .store
            .run_row(&self.scope.run_id)
            .await?
            .map(|(s, _)| s)
            .unwrap_or_default();
        let canceling = run_status == "CANCELING";
        // Python applies the results of one tick in priority order, then submission order.
        let mut failed = std::mem::take(&mut self.failed_steps);
        failed.sort_by_key(|e| {
            let key = e
                .get("step_key")
                .and_then(Value::as_str)
                .unwrap_or_default();
            (
                self.engine.sort_key(key).unwrap_or(0),
                self.submitted.get(key).copied().unwrap_or(usize::MAX),
            )
        });
        self.failed_steps = failed;
        let failed_keys: Vec<Value> = self
            .failed_steps
            .iter()
            .filter_map(|e| e.get("step_key").cloned())
            .collect();
        let failed_list = python_repr(&Value::Array(failed_keys));
        let mut commit = Commit::default();
        let (event, status, reason) = if let Some(err) = canceled {
            if canceling {
                (
                    ev::run_canceled(&self.scope, None, Some(&err), t),
                    "CANCELED",
                    None,
                )
            } else {
                let e = ev::run_failure(
                    &self.scope,
                    "Execution was interrupted unexpectedly. No user initiated termination request was found, treating as failure.",
                    FailureReason::UnexpectedTermination,
                    Some(err.to_value()),
                    None,
                    t,
                );
                (e, "FAILURE", Some(FailureReason::UnexpectedTermination))
            }
        } else if let Some(err) = exception {
            if canceling {
                let e = ev::run_canceled(
                    &self.scope,
                    Some("Run failed after it was requested to be terminated."),
                    Some(&err),
                    t,
                );
                (e, "CANCELED", None)
            } else {
                let e = ev::run_failure(
                    &self.scope,
                    "An exception was thrown during execution.",
                    FailureReason::RunException,
                    Some(err.to_value()),
                    None,
                    t,
                );
                (e, "FAILURE", Some(FailureReason::RunException))
            }
        } else if !self.failed_steps.is_empty() {
            if canceling {
                let msg = format!("Run was canceled. Failed steps: {failed_list}.");
                (
                    ev::run_canceled(&self.scope, Some(&msg), None, t),
                    "CANCELED",
                    None,
                )
            } else {
                let e = ev::run_failure(
                    &self.scope,
                    &format!("Steps failed: {failed_list}."),
                    FailureReason::StepFailure,
                    None,
                    self.failed_steps.first().cloned(),
                    t,
                );
                (e, "FAILURE", Some(FailureReason::StepFailure))
            }
        } else {
            (ev::run_success(&self.scope, t), "SUCCESS", None)
        };
        commit.status = Some(self.status_change(reason));
        commit.events.push(event);
        self.commit(commit).await?;
        let lease_state = if status == "FAILURE" {
            "failed"
        } else {
            "finished"
        };
        let error = (status == "FAILURE").then(|| format!("run ended {status}"));
        self.shared
            .store
            .finish(
                &self.scope.run_id,
                &self.shared.replica,
                lease_state,
                error.as_deref(),
            )
            .await?;
        info!(run_id = %self.scope.run_id, status, "run finished");
        Ok(status.to_string())
    }
}

/// Python's `str(set_of_strings)` with a stable order.
fn python_set(items: &[String]) -> String {
    let inner: Vec<String> = items
        .iter()
        .map(|s| python_repr(&Value::String(s.clone())))
        .collect();
    format!("{{{}}}", inner.join(", "))
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

async fn settle(ack: Option<Box<dyn Acker>>) {
    if let Some(a) = ack {
        if let Err(e) = a.ack().await {
            warn!("cannot acknowledge a result: {e}");
        }
    }
}

/// Fails a run whose plan or hand-off cannot be read: RUN_START, an error engine event naming the cause,
/// RUN_FAILURE, all at once.
struct FailWithoutPlan<'a> {
    shared: &'a Arc<Shared>,
    run: &'a RunRecord,
    scope: &'a RunScope,
}

impl FailWithoutPlan<'_> {
    async fn fail(&self, message: &str) {
        let t = now();
        let err = error_info("builtins", "Exception", message);
        let mut commit = Commit {
            status: Some(StatusChange {
                body: self.run.body.clone(),
                failure_reason: Some(FailureReason::RunException),
            }),
            ..Default::default()
        };
        commit.events.push(ev::engine_event(
            self.scope,
            None,
            &format!("celeriac coordinator cannot drive this run: {message}"),
            &EngineData {
                error: Some(err.clone()),
                ..Default::default()
            },
            t,
        ));
        commit.events.push(ev::run_failure(
            self.scope,
            "An exception was thrown during execution.",
            FailureReason::RunException,
            Some(err.to_value()),
            None,
            t,
        ));
        if let Err(e) = self
            .shared
            .store
            .commit(&self.scope.run_id, &self.shared.replica, &commit)
            .await
        {
            warn!(run_id = %self.scope.run_id, "cannot record the run's failure: {e}");
        }
        let _ = self
            .shared
            .store
            .finish(
                &self.scope.run_id,
                &self.shared.replica,
                "failed",
                Some(message),
            )
            .await;
    }
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
