//! `plan_events_iterator`: the steps that will never run. A step is skipped when the outputs it reads
//! were not produced (its upstream skipped them or was skipped), and abandoned when an upstream step
//! failed or was abandoned; both cascade, so the loop runs until nothing more changes. The log lines
//! Python writes for each are built here too.

use indexmap::IndexMap;

use super::execution::ActiveExecution;
use crate::plan::error::PlanError;
use crate::plan::snapshot::Source;
use crate::plan::state::OutputHandle;

/// A step skipped by [`ActiveExecution::plan_events`], with the outputs it lacked.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    pub step_key: String,
    /// `step.output` names of the missing upstream outputs, in input order.
    pub missing: Vec<String>,
}

impl Skipped {
    /// The log line Python writes (`Skipping step … due to skipped dependencies: [...]`).
    pub fn message(&self) -> String {
        format!(
            "Skipping step {} due to skipped dependencies: {}.",
            self.step_key,
            python_list(&self.missing)
        )
    }
}

/// A step abandoned by [`ActiveExecution::plan_events`] because an upstream step failed or was
/// abandoned.
#[derive(Debug, Clone, PartialEq)]
pub struct Abandoned {
    pub step_key: String,
    pub failed_inputs: Vec<String>,
    pub abandoned_inputs: Vec<String>,
}

impl Abandoned {
    /// The error log line Python writes (`Dependencies for step … failed: [...]. Not executing.`).
    /// Python lists the inputs in set order; these are sorted.
    pub fn message(&self) -> String {
        let fail = if self.failed_inputs.is_empty() {
            String::new()
        } else {
            format!(" failed: {}", python_list(&self.failed_inputs))
        };
        let abandon = if self.abandoned_inputs.is_empty() {
            String::new()
        } else {
            format!(
                " were not executed: {}",
                python_list(&self.abandoned_inputs)
            )
        };
        format!(
            "Dependencies for step {}{fail}{abandon}. Not executing.",
            self.step_key
        )
    }
}

fn python_list(items: &[String]) -> String {
    celeriac_wire::json::python_repr(&serde_json::json!(items))
}

/// What [`ActiveExecution::plan_events`] decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlanEvents {
    pub skipped: Vec<Skipped>,
    pub abandoned: Vec<Abandoned>,
}

impl ActiveExecution {
    pub(super) fn should_skip(&mut self, step_key: &str) -> Result<bool, PlanError> {
        let step = self.plan.step(step_key)?;
        for input in &step.inputs {
            let mut gating = Vec::new();
            for handle in input.source.output_handle_dependencies() {
                // Asset-check outputs never gate: their absence is only logged by Dagster.
                if !self.plan.output(&handle)?.is_asset_check {
                    gating.push(handle);
                }
            }
            let missing: Vec<&OutputHandle> = gating
                .iter()
                .filter(|h| {
                    (self.success.contains(&h.step_key) || self.skipped.contains(&h.step_key))
                        && !self.step_outputs.contains(*h)
                })
                .collect();
            if missing.is_empty() {
                continue;
            }
            // A fan-in is skipped only when all its sources are missing; anything else when one is.
            let fan_in = matches!(
                input.source,
                Source::Multiple {
                    load_single: false,
                    ..
                }
            );
            if !fan_in || missing.len() == gating.len() {
                let names = missing.iter().map(|h| h.dotted()).collect();
                self.skipped_deps.insert(step_key.to_string(), names);
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn steps_to_skip(&mut self, now: f64) -> Result<Vec<String>, PlanError> {
        self.update(now)?;
        let keys = std::mem::take(&mut self.pending_skip);
        for key in &keys {
            self.in_flight.insert(key.clone());
            let step = self.plan.step(key)?;
            // None marks a skipped dynamic output, which is not the same as one with no entries.
            let dynamic: IndexMap<String, Option<Vec<String>>> = step
                .outputs
                .iter()
                .filter(|o| o.is_dynamic)
                .map(|o| (o.name.clone(), None))
                .collect();
            if !dynamic.is_empty() {
                self.gathering.insert(key.clone(), dynamic);
            }
        }
        self.sorted(keys)
    }

    fn steps_to_abandon(&mut self, now: f64) -> Result<Vec<String>, PlanError> {
        self.update(now)?;
        let keys = std::mem::take(&mut self.pending_abandon);
        for key in &keys {
            self.in_flight.insert(key.clone());
        }
        self.sorted(keys)
    }

    /// `plan_events_iterator`: skips every step whose inputs will never come and abandons every step
    /// downstream of a failure, until nothing more changes.
    pub fn plan_events(&mut self, now: f64) -> Result<PlanEvents, PlanError> {
        let mut out = PlanEvents::default();
        loop {
            let steps = self.steps_to_skip(now)?;
            if steps.is_empty() {
                break;
            }
            for key in steps {
                let missing = self.skipped_deps.get(&key).cloned().unwrap_or_default();
                self.mark_skipped(&key)?;
                out.skipped.push(Skipped {
                    step_key: key,
                    missing,
                });
            }
        }
        loop {
            let steps = self.steps_to_abandon(now)?;
            if steps.is_empty() {
                break;
            }
            for key in steps {
                let step = self.plan.step(&key)?;
                // Python lists these in set order (hash-seeded); sorted here.
                let mut failed_inputs = Vec::new();
                let mut abandoned_inputs = Vec::new();
                for input in &step.inputs {
                    for dep in input.source.step_key_dependencies() {
                        if self.failed.contains(&dep) {
                            failed_inputs.push(dep.clone());
                        }
                        if self.abandoned.contains(&dep) {
                            abandoned_inputs.push(dep);
                        }
                    }
                }
                failed_inputs.sort();
                abandoned_inputs.sort();
                self.mark_abandoned(&key)?;
                out.abandoned.push(Abandoned {
                    step_key: key,
                    failed_inputs,
                    abandoned_inputs,
                });
            }
        }
        Ok(out)
    }
}
