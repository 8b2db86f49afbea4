//! The state of one run's execution: which set each step is in, what outputs and mapping keys are
//! known, how often each step was tried. The transitions live beside it ([`super::schedule`],
//! [`super::plan_events`], [`super::results`]); this file holds only the state, its construction and
//! what callers read of it, so the whole of what the engine remembers is visible in one place.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use indexmap::IndexMap;

use super::pools::{ConcurrencyClaims, NoPools};
use super::priority::SortKey;
use crate::plan::error::PlanError;
use crate::plan::execution_plan::{ExecutionPlan, Step};
use crate::plan::state::{DynamicMappings, KnownState, OutputHandle, RetryMode};

/// The state machine of one run's execution.
pub struct ActiveExecution {
    pub(super) plan: ExecutionPlan,
    pub(super) retry_mode: RetryMode,
    pub(super) sort_key: SortKey,
    pub(super) claims: Box<dyn ConcurrencyClaims>,
    pub(super) step_outputs: HashSet<OutputHandle>,
    pub(super) pending: IndexMap<String, BTreeSet<String>>,
    pub(super) gathering: HashMap<String, IndexMap<String, Option<Vec<String>>>>,
    pub(super) completed_dynamic: DynamicMappings,
    pub(super) new_dynamic_mappings: bool,
    pub(super) skipped_deps: HashMap<String, Vec<String>>,
    pub(super) executable: Vec<String>,
    pub(super) pending_skip: Vec<String>,
    pub(super) pending_retry: Vec<String>,
    pub(super) pending_abandon: Vec<String>,
    pub(super) waiting_to_retry: IndexMap<String, f64>,
    pub(super) in_flight: BTreeSet<String>,
    pub(super) success: BTreeSet<String>,
    pub(super) failed: BTreeSet<String>,
    pub(super) skipped: BTreeSet<String>,
    pub(super) abandoned: BTreeSet<String>,
    pub(super) unknown: BTreeSet<String>,
    pub(super) interrupted: bool,
    pub(super) attempts: BTreeMap<String, i64>,
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
