//! `ActiveExecution` (`dagster/_core/execution/plan/active.py`): the state machine that walks a run
//! through its plan. Steps move pending → executable → in flight → success / failed / skipped /
//! abandoned (or unknown: finished without a terminal event), retries wait in `waiting_to_retry`, and
//! dynamic outputs grow the plan as their mapping keys arrive.
//!
//! The port keeps Python's data structures where their order shows (pending and waiting are insertion
//! ordered maps, executable a list), so submission order, skips and known state come out identical.
//! Time is an argument (`now`, seconds since the epoch) instead of `time.time()`, so a trace can be
//! replayed exactly.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use indexmap::IndexMap;

use super::execution_plan::{ExecutionPlan, Step};
use super::snapshot::Source;
use super::state::{DynamicMappings, KnownState, OutputHandle, RetryMode};
use super::step_event::StepEvent;
use super::PlanError;

/// Op tag that gives a step's priority for Dagster's default ordering (`dagster/priority`).
pub const PRIORITY_TAG: &str = "dagster/priority";
/// Op tag of a step's priority on the Celery queue (`dagster-celery/priority`).
pub const CELERY_STEP_PRIORITY_TAG: &str = "dagster-celery/priority";
/// Legacy op tag naming a step's concurrency pool.
pub const GLOBAL_CONCURRENCY_TAG: &str = "dagster/concurrency_key";

/// Python's `int(text)` for tag values: surrounding whitespace, a sign, digits with single
/// underscores between them.
pub fn python_int(text: &str) -> Option<i64> {
    let t = text.trim();
    let (neg, digits) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
    {
        return None;
    }
    let clean: String = digits.chars().filter(|c| *c != '_').collect();
    if !clean.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let n: i64 = clean.parse().ok()?;
    Some(if neg { -n } else { n })
}

/// The order in which executable steps are handed out (a stable sort, lowest key first).
#[derive(Debug, Clone, PartialEq)]
pub enum SortKey {
    /// `_default_sort_key`: `-int(tags["dagster/priority"])`, 0 when absent.
    Default,
    /// `core_celery_execution_loop`'s `priority_for_step`: `-(step priority) - run priority`, the
    /// step priority being the `dagster-celery/priority` tag (`task_default_priority` when absent).
    Celery {
        run_priority: i64,
        task_default_priority: i64,
    },
}

impl SortKey {
    /// The sort key of a step (lower first).
    pub fn key(&self, step: &Step) -> Result<i64, PlanError> {
        let tag = |name: &str, default: i64| -> Result<i64, PlanError> {
            match step.tags.get(name) {
                None => Ok(default),
                Some(v) => python_int(v).ok_or_else(|| PlanError::Priority {
                    step_key: step.key.clone(),
                    tag: name.to_string(),
                    value: v.clone(),
                }),
            }
        };
        Ok(match self {
            SortKey::Default => -tag(PRIORITY_TAG, 0)?,
            SortKey::Celery {
                run_priority,
                task_default_priority,
            } => -tag(CELERY_STEP_PRIORITY_TAG, *task_default_priority)? - run_priority,
        })
    }
}

/// Instance-wide concurrency pools (`InstanceConcurrencyContext`): asked before a step with a pool is
/// handed out. celery-k8s deployments without pool limits always grant.
pub trait ConcurrencyClaims: Send + Sync {
    /// `claim(pool, step_key, step_priority)`: whether the step may start now.
    fn claim(&mut self, pool: &str, step_key: &str, priority: i64) -> bool;
    /// `free_step`: the step finished; its slot (if any) is released.
    fn free(&mut self, step_key: &str);
    /// Steps waiting for a slot (the execution is not complete while any waits).
    fn has_pending(&self) -> bool {
        false
    }
}

/// No pools: every claim is granted.
#[derive(Debug, Default)]
pub struct NoPools;

impl ConcurrencyClaims for NoPools {
    fn claim(&mut self, _: &str, _: &str, _: i64) -> bool {
        true
    }
    fn free(&mut self, _: &str) {}
}

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

/// The state machine of one run's execution.
pub struct ActiveExecution {
    plan: ExecutionPlan,
    retry_mode: RetryMode,
    sort_key: SortKey,
    claims: Box<dyn ConcurrencyClaims>,
    step_outputs: HashSet<OutputHandle>,
    pending: IndexMap<String, BTreeSet<String>>,
    gathering: HashMap<String, IndexMap<String, Option<Vec<String>>>>,
    completed_dynamic: DynamicMappings,
    new_dynamic_mappings: bool,
    skipped_deps: HashMap<String, Vec<String>>,
    executable: Vec<String>,
    pending_skip: Vec<String>,
    pending_retry: Vec<String>,
    pending_abandon: Vec<String>,
    waiting_to_retry: IndexMap<String, f64>,
    in_flight: BTreeSet<String>,
    success: BTreeSet<String>,
    failed: BTreeSet<String>,
    skipped: BTreeSet<String>,
    abandoned: BTreeSet<String>,
    unknown: BTreeSet<String>,
    interrupted: bool,
    attempts: BTreeMap<String, i64>,
}

/// A read-only view of the engine's sets, for tests, metrics and logs.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub pending: Vec<String>,
    pub executable: Vec<String>,
    pub pending_skip: Vec<String>,
    pub pending_abandon: Vec<String>,
    pub waiting_to_retry: Vec<(String, f64)>,
    pub in_flight: Vec<String>,
    pub success: Vec<String>,
    pub failed: Vec<String>,
    pub skipped: Vec<String>,
    pub abandoned: Vec<String>,
    pub unknown: Vec<String>,
    pub is_complete: bool,
}

impl ActiveExecution {
    /// `plan.start(retry_mode, sort_key_fn)` at time `now`.
    pub fn new(
        plan: ExecutionPlan,
        retry_mode: RetryMode,
        sort_key: SortKey,
        now: f64,
    ) -> Result<Self, PlanError> {
        let pending = plan.executable_step_deps()?;
        let known = &plan.known_state;
        let mut active = ActiveExecution {
            step_outputs: known.ready_outputs.clone(),
            completed_dynamic: known.dynamic_mappings.clone(),
            attempts: known.previous_retry_attempts.clone(),
            plan,
            retry_mode,
            sort_key,
            claims: Box::new(NoPools),
            pending,
            gathering: HashMap::new(),
            new_dynamic_mappings: false,
            skipped_deps: HashMap::new(),
            executable: Vec::new(),
            pending_skip: Vec::new(),
            pending_retry: Vec::new(),
            pending_abandon: Vec::new(),
            waiting_to_retry: IndexMap::new(),
            in_flight: BTreeSet::new(),
            success: BTreeSet::new(),
            failed: BTreeSet::new(),
            skipped: BTreeSet::new(),
            abandoned: BTreeSet::new(),
            unknown: BTreeSet::new(),
            interrupted: false,
        };
        active.update(now)?;
        Ok(active)
    }

    /// Uses `claims` for steps that name a concurrency pool.
    pub fn with_claims(mut self, claims: Box<dyn ConcurrencyClaims>) -> Self {
        self.claims = claims;
        self
    }

    pub fn plan(&self) -> &ExecutionPlan {
        &self.plan
    }

    /// The sort key of a step, as submissions are ordered.
    pub fn sort_key(&self, step_key: &str) -> Result<i64, PlanError> {
        self.sort_key.key(self.plan.step(step_key)?)
    }

    pub fn step(&self, key: &str) -> Result<&Step, PlanError> {
        self.plan.step(key)
    }

    fn should_skip(&mut self, step_key: &str) -> Result<bool, PlanError> {
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

    /// `_update`: moves pending steps whose dependencies resolved to executable / skip / abandon, and
    /// retries whose time came to executable.
    fn update(&mut self, now: f64) -> Result<(), PlanError> {
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

    fn sorted(&self, keys: Vec<String>) -> Result<Vec<String>, PlanError> {
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

    fn mark_skipped(&mut self, step_key: &str) -> Result<(), PlanError> {
        self.skipped.insert(step_key.to_string());
        self.mark_complete(step_key)?;
        self.resolve_dynamic_outputs(step_key)
    }

    fn mark_abandoned(&mut self, step_key: &str) -> Result<(), PlanError> {
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

    /// `is_complete`.
    pub fn is_complete(&self) -> bool {
        self.pending.is_empty()
            && self.in_flight.is_empty()
            && self.executable.is_empty()
            && self.pending_skip.is_empty()
            && self.pending_retry.is_empty()
            && self.pending_abandon.is_empty()
            && self.waiting_to_retry.is_empty()
            && !self.claims.has_pending()
    }

    /// Seconds until the earliest waiting retry is due (0 when none waits).
    pub fn sleep_interval(&self, now: f64) -> f64 {
        self.waiting_to_retry
            .values()
            .map(|at| at - now)
            .reduce(f64::min)
            .unwrap_or(0.0)
    }

    pub fn has_in_flight_steps(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// Attempts so far of a step (`retry_state.get_attempt_count`).
    pub fn attempts(&self, step_key: &str) -> i64 {
        self.attempts.get(step_key).copied().unwrap_or(0)
    }

    /// `get_known_state()`: what a step submitted now is told.
    pub fn get_known_state(&self) -> KnownState {
        let initial = &self.plan.known_state;
        KnownState {
            previous_retry_attempts: self.attempts.clone(),
            dynamic_mappings: self.completed_dynamic.clone(),
            step_output_versions: initial.step_output_versions.clone(),
            ready_outputs: self.step_outputs.clone(),
            parent_state: initial.parent_state.clone(),
        }
    }

    /// The engine's sets, sorted where Python's are sets.
    pub fn snapshot(&self) -> Snapshot {
        let sorted = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>();
        Snapshot {
            pending: self.pending.keys().cloned().collect(),
            executable: self.executable.clone(),
            pending_skip: self.pending_skip.clone(),
            pending_abandon: self.pending_abandon.clone(),
            waiting_to_retry: self
                .waiting_to_retry
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            in_flight: sorted(&self.in_flight),
            success: sorted(&self.success),
            failed: sorted(&self.failed),
            skipped: sorted(&self.skipped),
            abandoned: sorted(&self.abandoned),
            unknown: sorted(&self.unknown),
            is_complete: self.is_complete(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_int_accepts_what_int_accepts() {
        assert_eq!(python_int(" 4 "), Some(4));
        assert_eq!(python_int("+7"), Some(7));
        assert_eq!(python_int("-3"), Some(-3));
        assert_eq!(python_int("1_0"), Some(10));
        assert_eq!(python_int("1__0"), None);
        assert_eq!(python_int("_1"), None);
        assert_eq!(python_int("4.0"), None);
        assert_eq!(python_int(""), None);
        assert_eq!(python_int("high"), None);
    }
}
