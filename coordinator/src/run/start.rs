//! Starting to drive a run: a fresh run gets RUN_START and its first wave of steps in one transaction;
//! a run another replica drove before is rebuilt ([`super::resume`]). Either way its pending tasks are
//! attached to their results and whatever was not published yet is published.

use celeriac_dagster::run_events::{self as ev, EngineData, WARNING};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::driver::{now, Driver, Ended};
use crate::store::{Commit, StoreError};

impl Driver {
    /// Starts a fresh run or resumes one a replica drove before.
    pub(super) async fn start(
        &mut self,
        stop: &CancellationToken,
    ) -> Result<Option<Ended>, StoreError> {
        let status = self.run_status().await?;
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
}
