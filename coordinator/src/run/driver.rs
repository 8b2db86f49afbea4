//! The driver of one run: its state, the loop that waits for results, wake-ups and timers, and how a
//! decision is written.
//!
//! Each step of the loop is one decision (see the other modules of [`crate::run`] for what each
//! decides); this module holds only what they all share, so the state machine reads in one place.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use celeriac_dagster::events::ErrorInfo;
use celeriac_dagster::plan::ActiveExecution;
use celeriac_dagster::run::RunRecord;
use celeriac_dagster::run_events::{FailureReason, RunScope};
use celeriac_wire::broker::Acker;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::results::RunInput;
use crate::shared::Shared;
use crate::store::{Commit, StatusChange, StoreError, TaskRow};

/// `DELEGATE_MARKER` of dagster_celery.
pub(super) const DELEGATE_MARKER: &str = "celery_queue_wait";

/// Seconds since the epoch: the timestamps of Dagster events and of the engine's decisions.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// At most this many waiting results are applied in one decision.
const MAX_RESULTS_PER_DECISION: usize = 256;

/// A result as it arrived, with what settles its message.
pub(super) struct Arrived {
    pub(super) task_id: String,
    pub(super) meta: Value,
    pub(super) ack: Option<Box<dyn Acker>>,
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
pub(super) struct InFlight {
    pub(super) step_key: String,
    pub(super) published: bool,
    pub(super) row: TaskRow,
}

/// The state of one run while this replica drives it.
pub struct Driver {
    pub(super) shared: Arc<Shared>,
    pub(super) run: RunRecord,
    /// The hand-off as stored (compact JSON), decoded for each submission: as a `Value` tree it
    /// took several times its text size in every run's memory for the run's whole life.
    pub(super) handoff: Box<str>,
    pub(super) scope: RunScope,
    pub(super) run_priority: i64,
    pub(super) engine: ActiveExecution,
    /// task id → in-flight task, in submission order.
    pub(super) in_flight: BTreeMap<String, InFlight>,
    pub(super) order: Vec<String>,
    /// Celery FAILURE results: (step key, error text). No new step is submitted after one.
    pub(super) step_errors: Vec<(String, String)>,
    /// An error of the coordinator itself that fails the run (a step that cannot be submitted, an
    /// event the engine refuses, a malformed result).
    pub(super) run_error: Option<ErrorInfo>,
    /// STEP_FAILURE events reported, in order (the first one explains a failed run).
    pub(super) failed_steps: Vec<Value>,
    /// Step key → the order of its first submission (ties of Python's per-tick result order).
    pub(super) submitted: std::collections::HashMap<String, usize>,
    pub(super) stopping: bool,
    pub(super) revoke_deadline: Option<Instant>,
    /// Set when the run was finished by someone else (forced cancel, run monitoring).
    pub(super) externally_finished: Option<String>,
    /// When `CeleriacRunLauncher` handed the run over.
    pub(super) launched_at: Option<f64>,
    pub(super) last_progress: Instant,
    pub(super) tx: mpsc::Sender<RunInput>,
}

pub(super) fn error_info(module: &str, class: &str, text: &str) -> ErrorInfo {
    ErrorInfo::new(module, class, text)
}

pub(super) fn dagster_error(class: &str, text: &str) -> ErrorInfo {
    error_info("dagster._core.errors", class, text)
}

impl Driver {
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

    pub(super) fn lost(&self, e: StoreError) -> Ended {
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

    /// The run's status as stored now (empty when the run has no row).
    pub(super) async fn run_status(&self) -> Result<String, StoreError> {
        Ok(self
            .shared
            .store
            .run_row(&self.scope.run_id)
            .await?
            .map(|(s, _)| s)
            .unwrap_or_default())
    }

    pub(super) fn status_change(&self, reason: Option<FailureReason>) -> StatusChange {
        StatusChange {
            body: self.run.body.clone(),
            failure_reason: reason,
        }
    }

    /// Writes a decision; on success the new tasks are registered for their results.
    pub(super) async fn commit(&mut self, commit: Commit) -> Result<bool, StoreError> {
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

    /// The run cannot go on: nothing more is submitted, it fails once nothing is in flight.
    pub(super) fn fail_run(&mut self, message: &str) {
        if self.run_error.is_none() {
            self.run_error = Some(error_info("builtins", "Exception", message));
        }
    }

    /// Timer: retries that became due, revocations that timed out, the run's status.
    pub(super) async fn on_tick(&mut self) -> Result<(), StoreError> {
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
                    commit.events.push(self.revoked_event(key, t));
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
}
