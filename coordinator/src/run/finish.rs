//! Ending a run: once nothing is in flight and nothing more will be submitted, the terminal event
//! (RUN_SUCCESS, RUN_FAILURE or RUN_CANCELED) is chosen exactly as `job_execution_iterator` chooses it,
//! so a run ends with the same event and message as under Python's run worker.

use celeriac_dagster::events::ErrorInfo;
use celeriac_dagster::run_events::{self as ev, EventRow, FailureReason};
use celeriac_wire::json::python_repr;
use serde_json::Value;
use tracing::info;

use super::driver::{dagster_error, now, Driver, Ended};
use crate::store::{Commit, StoreError};

impl Driver {
    /// Ends the run once nothing is in flight and nothing more will be submitted.
    pub(super) async fn maybe_finish(&mut self) -> Option<Ended> {
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
        let (canceled, exception) = self.ending_error();
        let run_status = self.run_status().await?;
        let canceling = run_status == "CANCELING";
        self.sort_failed_steps();
        let mut commit = Commit::default();
        let (event, status, reason) = self.terminal_event(canceled, exception, canceling, t);
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

    /// The exception the execution ends with, as Python raises it: `(canceled, exception)`, at most one
    /// of them set (an interrupted execution is a cancellation, anything else an exception).
    fn ending_error(&self) -> (Option<ErrorInfo>, Option<ErrorInfo>) {
        let snapshot = self.engine.snapshot();
        let interrupted = self.engine.is_interrupted();
        let unknown = python_set(&snapshot.unknown);
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
        (canceled, exception)
    }

    /// Python applies the results of one tick in priority order, then submission order: the failed
    /// steps are listed (and the first one explains the run's failure) in that order.
    fn sort_failed_steps(&mut self) {
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
    }

    /// The terminal event, the run's status and the failure reason, from how the execution ended and
    /// whether the run was being canceled.
    fn terminal_event(
        &self,
        canceled: Option<ErrorInfo>,
        exception: Option<ErrorInfo>,
        canceling: bool,
        t: f64,
    ) -> (EventRow, &'static str, Option<FailureReason>) {
        let failed_keys: Vec<Value> = self
            .failed_steps
            .iter()
            .filter_map(|e| e.get("step_key").cloned())
            .collect();
        let failed_list = python_repr(&Value::Array(failed_keys));
        if let Some(err) = canceled {
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
        }
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
