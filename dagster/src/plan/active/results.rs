//! What a step's reported events do to the run: `handle_event` and the `mark_*` transitions
//! (success, failure, retry, unknown), and the resolution of dynamic outputs, whose mapping keys are
//! gathered from `STEP_OUTPUT` events and grow the plan once their step completes.

use std::collections::BTreeMap;

use super::execution::ActiveExecution;
use crate::plan::error::PlanError;
use crate::plan::state::RetryMode;
use crate::plan::step_event::StepEvent;

impl ActiveExecution {
    fn mark_complete(&mut self, step_key: &str) -> Result<(), PlanError> {
        if !self.in_flight.remove(step_key) {
            return Err(PlanError::NotInFlight(step_key.to_string()));
        }
        Ok(())
    }

    fn mark_failed(&mut self, step_key: &str) -> Result<(), PlanError> {
        self.failed.insert(step_key.to_string());
        self.mark_complete(step_key)
    }

    fn mark_success(&mut self, step_key: &str) -> Result<(), PlanError> {
        self.success.insert(step_key.to_string());
        self.mark_complete(step_key)?;
        self.resolve_dynamic_outputs(step_key)
    }

    pub(super) fn mark_skipped(&mut self, step_key: &str) -> Result<(), PlanError> {
        self.skipped.insert(step_key.to_string());
        self.mark_complete(step_key)?;
        self.resolve_dynamic_outputs(step_key)
    }

    pub(super) fn mark_abandoned(&mut self, step_key: &str) -> Result<(), PlanError> {
        self.abandoned.insert(step_key.to_string());
        self.mark_complete(step_key)
    }

    /// `mark_interrupted`: the run is stopping (the caller submits nothing more).
    pub fn mark_interrupted(&mut self) {
        self.interrupted = true;
    }

    pub fn is_interrupted(&self) -> bool {
        self.interrupted
    }

    fn mark_up_for_retry(&mut self, step_key: &str, at: Option<f64>) -> Result<(), PlanError> {
        match self.retry_mode {
            RetryMode::Disabled => {
                return Err(PlanError::RetriesDisabled(step_key.to_string()));
            }
            RetryMode::Enabled => match at {
                Some(at) => {
                    self.waiting_to_retry.insert(step_key.to_string(), at);
                }
                None => {
                    let deps = self.plan.executable_step_deps()?;
                    let deps = deps.get(step_key).cloned().ok_or_else(|| {
                        PlanError::Invalid(format!("step {step_key} is not executable"))
                    })?;
                    self.pending.insert(step_key.to_string(), deps);
                }
            },
            RetryMode::Deferred => {
                self.abandoned.insert(step_key.to_string());
            }
        }
        *self.attempts.entry(step_key.to_string()).or_insert(0) += 1;
        self.mark_complete(step_key)
    }

    /// `handle_event`: applies one event of a step's result.
    pub fn handle_event(&mut self, event: &StepEvent, now: f64) -> Result<(), PlanError> {
        let key = || {
            event
                .step_key
                .clone()
                .ok_or_else(|| PlanError::NoStepKey(event.event_type.clone()))
        };
        match event.event_type.as_str() {
            "STEP_FAILURE" => {
                let key = key()?;
                self.mark_failed(&key)?;
                self.claims.free(&key);
            }
            "RESOURCE_INIT_FAILURE" => self.claims.free(&key()?),
            "STEP_SUCCESS" => {
                let key = key()?;
                self.mark_success(&key)?;
                self.claims.free(&key);
            }
            "STEP_SKIPPED" => {
                return Err(PlanError::Invalid(format!(
                    "Step {} was reported as skipped from outside the ActiveExecution.",
                    event.step_key.as_deref().unwrap_or("None")
                )))
            }
            "STEP_UP_FOR_RETRY" => {
                let key = key()?;
                // Python: `time.time() + seconds_to_wait if seconds_to_wait else None`.
                let at = event.seconds_to_wait.filter(|s| *s != 0.0).map(|s| now + s);
                self.mark_up_for_retry(&key, at)?;
                self.claims.free(&key);
            }
            "STEP_OUTPUT" => {
                let Some(handle) = &event.output else {
                    return Err(PlanError::Invalid("STEP_OUTPUT without output data".into()));
                };
                self.step_outputs.insert(handle.clone());
                if let Some(mapping_key) = &handle.mapping_key {
                    let key = key()?;
                    let gathered = self
                        .gathering
                        .get_mut(&key)
                        .and_then(|outputs| outputs.get_mut(&handle.output_name))
                        .ok_or_else(|| {
                            PlanError::Invalid(format!(
                                "dynamic output {}.{} reported by a step that is not gathering it",
                                key, handle.output_name
                            ))
                        })?;
                    match gathered {
                        Some(keys) => keys.push(mapping_key.clone()),
                        None => {
                            return Err(PlanError::Invalid(format!(
                                "dynamic output {}.{} was skipped and cannot receive mapping keys",
                                key, handle.output_name
                            )))
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// `verify_complete`: a step whose result came back without a terminal event is marked unknown
    /// (and abandoned, so nothing downstream runs). Returns the error Python logs, if any.
    pub fn verify_complete(&mut self, step_key: &str) -> Result<Option<String>, PlanError> {
        if !self.in_flight.contains(step_key) {
            return Ok(None);
        }
        self.unknown.insert(step_key.to_string());
        self.mark_abandoned(step_key)?;
        Ok(Some(format!(
            "Step {step_key} finished without success or failure event. Downstream steps will not execute."
        )))
    }

    fn resolve_dynamic_outputs(&mut self, step_key: &str) -> Result<(), PlanError> {
        let Some(gathered) = self.gathering.get(step_key) else {
            return Ok(());
        };
        let step = self.plan.step(step_key)?;
        let mut completed = BTreeMap::new();
        for (name, keys) in gathered {
            let required = step.output(name).is_none_or(|o| o.is_required);
            let empty = keys.as_ref().is_none_or(Vec::is_empty);
            let value = if empty && !required {
                None
            } else {
                keys.clone()
            };
            completed.insert(name.clone(), value);
        }
        self.completed_dynamic
            .insert(step_key.to_string(), completed);
        self.new_dynamic_mappings = true;
        Ok(())
    }
}
