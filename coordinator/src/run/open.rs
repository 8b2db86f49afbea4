//! Opening a claimed run: its record and execution plan read from the instance (or the plan rebuilt for
//! an earlier run of the same job), the engine built. A run that cannot be driven is failed here, with
//! the events that say why, rather than left for the next replica to stumble on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use celeriac_dagster::plan::{ActiveExecution, ExecutionPlan, SortKey};
use celeriac_dagster::run::{LoadError, RunRecord};
use celeriac_dagster::run_events::{self as ev, EngineData, FailureReason, RunScope};
use celeriac_dagster::submission::{run_priority, Handoff};
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::warn;

use super::driver::{error_info, now, Driver, Ended};
use crate::results::RunInput;
use crate::shared::Shared;
use crate::store::{Claimed, Commit, StatusChange};

/// Where a run's plan came from.
enum PlanSource {
    /// Rebuilt for an earlier run of the same snapshot.
    Rebuilt(ExecutionPlan),
    /// Read from the instance: to rebuild.
    Snapshot(celeriac_dagster::plan::PlanSnapshot),
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
        let (run, plan) = load(&shared, &run_id).await?;
        let scope = RunScope {
            run_id: run_id.clone(),
            job_name: run.job_name.clone(),
            pid: std::process::id(),
        };
        match build_engine(&shared, &run, claimed, plan) {
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
}

/// Reads the run and its plan (the plan rebuilt for an earlier run of the same job when there is one).
/// A run that cannot be read is failed; when the database is unavailable another replica opens it later.
async fn load(
    shared: &Shared,
    run_id: &str,
) -> Result<(RunRecord, Result<PlanSource, LoadError>), Ended> {
    let loaded = shared
        .store
        .with_client(async |c| {
            let run = celeriac_dagster::run::load_run(c, run_id).await?;
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
            Ok::<_, LoadError>((run, plan))
        })
        .await;
    match loaded {
        Ok(Ok(x)) => Ok(x),
        Ok(Err(e)) => {
            warn!(run_id, "cannot read the run: {e}");
            let _ = shared
                .store
                .finish(run_id, &shared.replica, "failed", Some(&e.to_string()))
                .await;
            Err(Ended::Finished("FAILURE".into()))
        }
        Err(e) => {
            warn!(run_id, "database unavailable while opening the run: {e}");
            Err(Ended::Handed)
        }
    }
}

/// The run's engine from its hand-off and plan (a plan rebuilt from its snapshot is kept for the next
/// run of the same job): the hand-off, the run's priority and the engine, or why the run cannot be
/// driven.
fn build_engine(
    shared: &Shared,
    run: &RunRecord,
    claimed: &Claimed,
    plan: Result<PlanSource, LoadError>,
) -> Result<(Handoff, i64, ActiveExecution), String> {
    let run_id = &claimed.run_id;
    let handoff = Handoff::decode(&claimed.handoff)
        .map_err(|e| format!("the run's hand-off is unreadable: {e}"));
    let plan = plan.map_err(|e| e.to_string());
    match (handoff, plan) {
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
