//! `_update` and `get_steps_to_execute`: which pending steps became ready (to execute, skip or
//! abandon), which retries came due, and the order and pool claims with which ready steps are handed
//! out. Submission order is what the differential test compares first, so this is kept verbatim to
//! Python's loop.

use std::collections::BTreeSet;

use indexmap::IndexMap;

use super::execution::ActiveExecution;
use super::priority::{python_int, GLOBAL_CONCURRENCY_TAG, PRIORITY_TAG};
use crate::plan::error::PlanError;

impl ActiveExecution {
    /// `_update`: moves pending steps whose dependencies resolved to executable / skip / abandon, and
    /// retries whose time came to executable.
    pub(super) fn update(&mut self, now: f64) -> Result<(), PlanError> {
        if self.new_dynamic_mappings {
            let new_deps = self.plan.resolve(&self.completed_dynamic)?;
            for (key, deps) in new_deps {
                self.pending.insert(key, deps);
            }
            self.new_dynamic_mappings = false;
        }
        let mut to_execute = Vec::new();
        let mut to_skip = Vec::new();
        let mut to_abandon = Vec::new();
        let keys: Vec<(String, BTreeSet<String>)> = self
            .pending
            .iter()
            .map(|(k, d)| (k.clone(), d.clone()))
            .collect();
        for (key, deps) in keys {
            let resolved = |d: &String| {
                self.success.contains(d)
                    || self.skipped.contains(d)
                    || self.failed.contains(d)
                    || self.abandoned.contains(d)
            };
            if !deps.iter().all(resolved) {
                continue;
            }
            if self.should_skip(&key)? {
                to_skip.push(key);
            } else if deps
                .iter()
                .any(|d| self.failed.contains(d) || self.abandoned.contains(d))
            {
                to_abandon.push(key);
            } else {
                to_execute.push(key);
            }
        }
        for key in to_execute {
            self.pending.shift_remove(&key);
            self.executable.push(key);
        }
        for key in to_skip {
            self.pending.shift_remove(&key);
            self.pending_skip.push(key);
        }
        for key in to_abandon {
            self.pending.shift_remove(&key);
            self.pending_abandon.push(key);
        }
        let ready: Vec<String> = self
            .waiting_to_retry
            .iter()
            .filter(|(_, at)| now >= **at)
            .map(|(k, _)| k.clone())
            .collect();
        for key in ready {
            self.waiting_to_retry.shift_remove(&key);
            self.executable.push(key);
        }
        Ok(())
    }

    pub(super) fn sorted(&self, keys: Vec<String>) -> Result<Vec<String>, PlanError> {
        let mut keyed = keys
            .into_iter()
            .map(|k| {
                let step = self.plan.step(&k)?;
                Ok((self.sort_key.key(step)?, k))
            })
            .collect::<Result<Vec<_>, PlanError>>()?;
        keyed.sort_by_key(|(priority, _)| *priority);
        Ok(keyed.into_iter().map(|(_, k)| k).collect())
    }

    /// `get_steps_to_execute()`: the steps to submit now, in submission order; they are in flight
    /// from here on.
    pub fn get_steps_to_execute(&mut self, now: f64) -> Result<Vec<String>, PlanError> {
        self.update(now)?;
        let candidates = self.sorted(self.executable.clone())?;
        let mut batch = Vec::new();
        for key in candidates {
            let step = self.plan.step(&key)?;
            let pool = step
                .pool
                .clone()
                .or_else(|| step.tags.get(GLOBAL_CONCURRENCY_TAG).cloned());
            if let Some(pool) = pool {
                let priority = step
                    .tags
                    .get(PRIORITY_TAG)
                    .and_then(|v| python_int(v))
                    .unwrap_or(0);
                if !self.claims.claim(&pool, &key, priority) {
                    continue;
                }
            }
            batch.push(key);
        }
        for key in &batch {
            self.in_flight.insert(key.clone());
            if let Some(i) = self.executable.iter().position(|k| k == key) {
                self.executable.remove(i);
            }
            let step = self.plan.step(key)?;
            let dynamic: IndexMap<String, Option<Vec<String>>> = step
                .outputs
                .iter()
                .filter(|o| o.is_dynamic)
                .map(|o| (o.name.clone(), Some(Vec::new())))
                .collect();
            if !dynamic.is_empty() {
                self.gathering.insert(key.clone(), dynamic);
            }
        }
        Ok(batch)
    }
}
