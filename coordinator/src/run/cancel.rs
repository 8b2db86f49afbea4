//! Cancellation: a run set to CANCELING has its in-flight tasks revoked (terminated) and submits
//! nothing more; a run finished by someone else (a forced cancel, run monitoring) has its steps stopped
//! and is let go.

use std::time::Instant;

use celeriac_dagster::run_events::{self as ev, EngineData};
use celeriac_wire::json::python_repr;
use serde_json::{json, Value};
use tracing::{info, warn};

use super::driver::{now, Driver};
use crate::store::{Commit, StoreError};

impl Driver {
    /// Reacts to the run's status: CANCELING → cancel; finished or force-canceled elsewhere → stop.
    pub(super) async fn check_status(&mut self) -> Result<(), StoreError> {
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
    pub(super) async fn cancel(&mut self) -> Result<(), StoreError> {
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
}
