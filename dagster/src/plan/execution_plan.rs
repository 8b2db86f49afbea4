//! `ExecutionPlan` rebuilt from its snapshot (`ExecutionPlan.rebuild_from_snapshot`), and the dynamic
//! resolution that grows it while a run goes on (`resolve`, `_update_from_resolved_dynamic_outputs`).
//!
//! Orders matter and follow Python's dicts: `executable` keeps insertion order (a re-inserted key keeps
//! its place), `resolvable` likewise; the engine's pending set, and through it the submission order of
//! equal-priority steps, derives from them.

use std::collections::{BTreeSet, HashMap};

use indexmap::{IndexMap, IndexSet};

use super::error::PlanError;
use super::snapshot::{InputSnap, PlanSnapshot, Source, StepHandle, StepKind, StepSnap};
use super::state::{DynamicMappings, KnownState, OutputHandle};

/// A step of the plan (resolved steps are [`StepKind::Compute`]).
pub type Step = StepSnap;

/// The plan of a run, as the engine schedules it.
#[derive(Debug, Clone)]
pub struct ExecutionPlan {
    pub job_name: String,
    steps: Vec<Step>,
    /// `step_dict_by_key` (and `step_dict`: a handle and its key are one-to-one).
    by_key: HashMap<String, usize>,
    /// `executable_map`: keys of the steps that can run, in insertion order.
    executable: IndexSet<String>,
    /// `resolvable_map`: the sorted `resolved_by_step_keys` of unresolved steps → their keys.
    resolvable: IndexMap<Vec<String>, Vec<String>>,
    /// `step_keys_to_execute` (from `step_handles_to_execute`).
    step_keys_to_execute: Vec<String>,
    pub known_state: KnownState,
}

/// `(resolved_by_step_keys)` of an unresolved step: the dynamic steps whose outputs it waits for.
fn resolved_by_step_keys(step: &Step) -> Vec<String> {
    let keys: BTreeSet<String> = step
        .inputs
        .iter()
        .filter_map(|i| i.source.resolved_by().map(|(k, _)| k.to_string()))
        .collect();
    keys.into_iter().collect()
}

fn validate_inputs(step: &Step) -> Result<(), PlanError> {
    for input in &step.inputs {
        let fits = match (&step.kind, &input.source) {
            (StepKind::Compute, s) => !s.is_unresolved(),
            (StepKind::UnresolvedMapped, Source::DynamicCollect(_)) => false,
            (
                StepKind::UnresolvedCollect,
                Source::PendingDynamic(_) | Source::Unresolved { .. },
            ) => false,
            _ => true,
        };
        if !fits {
            return Err(PlanError::Invalid(format!(
                "step {} ({:?}) has input {} with a source it cannot have: {:?}",
                step.key, step.kind, input.name, input.source
            )));
        }
    }
    Ok(())
}

impl ExecutionPlan {
    /// `ExecutionPlan.rebuild_from_snapshot(job_name, snapshot)`.
    pub fn rebuild(job_name: &str, snapshot: &PlanSnapshot) -> Result<Self, PlanError> {
        let mut steps = Vec::with_capacity(snapshot.steps.len());
        let mut by_key = HashMap::with_capacity(snapshot.steps.len());
        for step in &snapshot.steps {
            validate_inputs(step)?;
            if step.kind == StepKind::UnresolvedMapped {
                // `resolved_by_step_key` / `resolved_by_output_name` must be unique for a mapped step.
                let by: BTreeSet<(&str, &str)> = step
                    .inputs
                    .iter()
                    .filter_map(|i| i.source.resolved_by())
                    .collect();
                if by.len() != 1 {
                    return Err(PlanError::Invalid(format!(
                        "unresolved step {} expects one and only one dynamic output, has {}",
                        step.key,
                        by.len()
                    )));
                }
            }
            by_key.insert(step.key.clone(), steps.len());
            steps.push(step.clone());
        }
        let known_state = snapshot.initial_known_state.clone().unwrap_or_default();
        let mut plan = ExecutionPlan {
            job_name: job_name.to_string(),
            steps,
            by_key,
            executable: IndexSet::new(),
            resolvable: IndexMap::new(),
            step_keys_to_execute: snapshot.step_keys_to_execute.clone(),
            known_state,
        };
        plan.compute_step_maps()?;
        Ok(plan)
    }

    /// `_compute_step_maps`: which steps can run, which wait for dynamic outputs; then resolves those
    /// whose mappings a parent run already knows.
    fn compute_step_maps(&mut self) -> Result<(), PlanError> {
        let missing: Vec<&String> = self
            .step_keys_to_execute
            .iter()
            .filter(|k| !self.by_key.contains_key(*k))
            .collect();
        if !missing.is_empty() {
            return Err(PlanError::Invalid(format!(
                "Execution plan does not contain step{}: {}",
                if missing.len() > 1 { "s" } else { "" },
                missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let past = self.known_state.dynamic_mappings.clone();
        for key in self.step_keys_to_execute.clone() {
            let step = &self.steps[self.by_key[&key]];
            match step.kind {
                StepKind::Compute => {
                    self.executable.insert(step.key.clone());
                }
                StepKind::UnresolvedMapped | StepKind::UnresolvedCollect => {
                    let by = resolved_by_step_keys(step);
                    for k in &by {
                        if !self.step_keys_to_execute.contains(k) && !past.contains_key(k) {
                            return Err(PlanError::Invalid(format!(
                                "Unresolved ExecutionStep \"{}\" is resolved by \"{k}\" which is not part of the current step selection or known state from parent run.",
                                step.key
                            )));
                        }
                    }
                    let key = step.key.clone();
                    self.resolvable.entry(by).or_default().push(key);
                }
            }
        }
        if !past.is_empty() {
            // Python resolves against a copy of the resolvable map here, so the entries stay and are
            // resolved (to the same steps) again at the next resolution.
            let mut copy = self.resolvable.clone();
            self.update_from_resolved(&mut copy, &past)?;
        }
        Ok(())
    }

    /// `_update_from_resolved_dynamic_outputs`.
    fn update_from_resolved(
        &mut self,
        resolvable: &mut IndexMap<Vec<String>, Vec<String>>,
        mappings: &DynamicMappings,
    ) -> Result<(), PlanError> {
        let mut resolved: Vec<Step> = Vec::new();
        let mut cleared: Vec<Vec<String>> = Vec::new();
        for (required, keys) in resolvable.iter() {
            if !required.iter().all(|k| mappings.contains_key(k)) {
                continue;
            }
            cleared.push(required.clone());
            for key in keys {
                if !self.step_keys_to_execute.contains(key) {
                    continue;
                }
                let step = &self.steps[self.by_key[key]];
                match step.kind {
                    StepKind::UnresolvedMapped => resolved.extend(resolve_mapped(step, mappings)?),
                    StepKind::UnresolvedCollect => resolved.push(resolve_collect(step, mappings)?),
                    StepKind::Compute => {}
                }
            }
        }
        for step in resolved {
            self.executable.insert(step.key.clone());
            match self.by_key.get(&step.key) {
                Some(&i) => self.steps[i] = step,
                None => {
                    self.by_key.insert(step.key.clone(), self.steps.len());
                    self.steps.push(step);
                }
            }
        }
        for key_set in cleared {
            resolvable.shift_remove(&key_set);
        }
        Ok(())
    }

    /// `resolve(mappings)`: resolves what the mappings allow and returns the dependencies of the steps
    /// that became executable.
    pub fn resolve(
        &mut self,
        mappings: &DynamicMappings,
    ) -> Result<IndexMap<String, BTreeSet<String>>, PlanError> {
        let previous = self.executable_step_deps()?;
        let mut resolvable = std::mem::take(&mut self.resolvable);
        let result = self.update_from_resolved(&mut resolvable, mappings);
        self.resolvable = resolvable;
        result?;
        let after = self.executable_step_deps()?;
        Ok(after
            .into_iter()
            .filter(|(k, _)| !previous.contains_key(k))
            .collect())
    }

    /// `get_executable_step_deps`: step key → the keys it waits for, for steps that can run; steps
    /// downstream of something unresolved are left out.
    pub fn executable_step_deps(&self) -> Result<IndexMap<String, BTreeSet<String>>, PlanError> {
        let mut deps = IndexMap::new();
        let mut unresolved: BTreeSet<&str> = BTreeSet::new();
        for key in &self.executable {
            let step = self.step(key)?;
            let mut filtered = BTreeSet::new();
            let mut depends_on_unresolved = false;
            for dep in execution_dependency_keys(step) {
                if self.executable.contains(&dep) {
                    if unresolved.contains(dep.as_str()) {
                        depends_on_unresolved = true;
                    } else {
                        filtered.insert(dep);
                    }
                } else if self.step_keys_to_execute.contains(&dep) {
                    depends_on_unresolved = true;
                }
            }
            if depends_on_unresolved {
                unresolved.insert(key);
            } else {
                deps.insert(key.clone(), filtered);
            }
        }
        Ok(deps)
    }

    /// `get_step_by_key`.
    pub fn step(&self, key: &str) -> Result<&Step, PlanError> {
        self.by_key
            .get(key)
            .map(|&i| &self.steps[i])
            .ok_or_else(|| PlanError::Invalid(format!("plan has no step with key {key}")))
    }

    /// `get_step_output`.
    pub fn output(&self, handle: &OutputHandle) -> Result<&super::snapshot::OutputSnap, PlanError> {
        self.step(&handle.step_key)?
            .output(&handle.output_name)
            .ok_or_else(|| {
                PlanError::Invalid(format!(
                    "step {} has no output named {}",
                    handle.step_key, handle.output_name
                ))
            })
    }

    pub fn step_keys_to_execute(&self) -> &[String] {
        &self.step_keys_to_execute
    }
}

/// `ExecutionStep.get_execution_dependency_keys`.
pub fn execution_dependency_keys(step: &Step) -> BTreeSet<String> {
    step.inputs
        .iter()
        .flat_map(|i| i.source.step_key_dependencies())
        .collect()
}

/// The mapping keys of `step`'s dynamic `output` in `mappings` (Python: `mappings[step][output]`).
fn mapping_keys<'m>(
    mappings: &'m DynamicMappings,
    step: &str,
    output: &str,
) -> Result<Option<&'m [String]>, PlanError> {
    mappings
        .get(step)
        .and_then(|outputs| outputs.get(output))
        .map(|keys| keys.as_deref())
        .ok_or_else(|| {
            PlanError::Invalid(format!(
                "no mapping keys for dynamic output {step}.{output}"
            ))
        })
}

/// `UnresolvedMappedExecutionStep.resolve`: one step per mapping key (none if the output was skipped).
fn resolve_mapped(step: &Step, mappings: &DynamicMappings) -> Result<Vec<Step>, PlanError> {
    let (by_step, by_output) = step
        .inputs
        .iter()
        .find_map(|i| i.source.resolved_by())
        .ok_or_else(|| {
            PlanError::Invalid(format!("mapped step {} has no dynamic input", step.key))
        })?;
    let StepHandle::Unresolved { node } = &step.handle else {
        return Err(PlanError::Invalid(format!(
            "mapped step {} has no unresolved handle",
            step.key
        )));
    };
    let Some(keys) = mapping_keys(mappings, by_step, by_output)? else {
        return Ok(Vec::new());
    };
    Ok(keys
        .iter()
        .map(|mapping_key| {
            let handle = StepHandle::resolved(node, mapping_key);
            Step {
                key: handle.key(),
                kind: StepKind::Compute,
                handle,
                inputs: step
                    .inputs
                    .iter()
                    .map(|i| InputSnap {
                        name: i.name.clone(),
                        source: i.source.resolve_mapped(mapping_key),
                    })
                    .collect(),
                outputs: step.outputs.clone(),
                tags: step.tags.clone(),
                pool: step.pool.clone(),
            }
        })
        .collect())
}

/// `UnresolvedCollectExecutionStep.resolve`: the same step, its collect inputs now fan-ins.
fn resolve_collect(step: &Step, mappings: &DynamicMappings) -> Result<Step, PlanError> {
    let inputs = step
        .inputs
        .iter()
        .map(|i| {
            let source = match (&i.source, i.source.resolved_by()) {
                (Source::DynamicCollect(_), Some((by_step, by_output))) => i
                    .source
                    .resolve_collect(mapping_keys(mappings, by_step, by_output)?),
                _ => i.source.clone(),
            };
            Ok(InputSnap {
                name: i.name.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, PlanError>>()?;
    Ok(Step {
        key: step.key.clone(),
        kind: StepKind::Compute,
        handle: step.handle.clone(),
        inputs,
        outputs: step.outputs.clone(),
        tags: step.tags.clone(),
        pool: step.pool.clone(),
    })
}
