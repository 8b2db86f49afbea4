//! Taking a run over: the engine is rebuilt from what a previous owner recorded, so the run continues
//! exactly where it stopped. The applied results are replayed through a fresh engine in their original
//! order, tasks still without a result are re-attached, and steps the engine hands out that have no task
//! yet are submitted.

use std::collections::BTreeMap;

use celeriac_dagster::run_events::{self as ev, EngineData};
use serde_json::Value;
use tracing::info;

use super::driver::{now, Driver, InFlight};
use crate::store::{Commit, StoreError, TaskRow};

impl Driver {
    /// Rebuilds the engine from the tasks and results a previous owner recorded.
    pub(super) async fn resume(&mut self) -> Result<(), StoreError> {
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
}
