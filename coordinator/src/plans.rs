//! Execution plans already rebuilt, shared by the runs of the same job.
//!
//! Dagster stores a run's execution plan as a snapshot whose id is the hash of its content, and every
//! run of the same job (same config, same selection) points at the same snapshot. Reading, inflating
//! and rebuilding it is most of the work of opening a run, so a burst of launches of one job would
//! otherwise repeat it for each run; a snapshot never changes, so the rebuilt plan can be reused as is.

use std::collections::HashMap;
use std::sync::Mutex;

use celeriac_dagster::plan::ExecutionPlan;

/// At most this many plans are kept (a replica drives few distinct jobs at a time).
const CAPACITY: usize = 64;

/// Rebuilt plans by (snapshot id, job name).
#[derive(Default)]
pub struct PlanCache {
    plans: Mutex<HashMap<(String, String), ExecutionPlan>>,
}

impl PlanCache {
    /// The plan rebuilt earlier from this snapshot for this job, if any.
    pub fn get(&self, snapshot_id: &str, job_name: &str) -> Option<ExecutionPlan> {
        let plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        plans
            .get(&(snapshot_id.to_string(), job_name.to_string()))
            .cloned()
    }

    /// Keeps a rebuilt plan (the oldest entries are dropped once full: any entry will do, a miss only
    /// costs a rebuild).
    pub fn insert(&self, snapshot_id: &str, job_name: &str, plan: &ExecutionPlan) {
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        if plans.len() >= CAPACITY {
            if let Some(key) = plans.keys().next().cloned() {
                plans.remove(&key);
            }
        }
        plans.insert(
            (snapshot_id.to_string(), job_name.to_string()),
            plan.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use celeriac_dagster::plan::PlanSnapshot;

    fn plan(job: &str) -> ExecutionPlan {
        let text =
            include_str!("../../dagster/tests/fixtures/plan_snapshot_fan_in_and_nested_map.json");
        let v = celeriac_dagster::serdes::parse(text.as_bytes()).expect("fixture json");
        let snapshot = PlanSnapshot::decode(&v).expect("fixture snapshot");
        ExecutionPlan::rebuild(job, &snapshot).expect("plan")
    }

    #[test]
    fn a_plan_is_found_by_its_snapshot_and_job_only() {
        let cache = PlanCache::default();
        let p = plan("fan_in");
        assert!(cache.get("snap-1", "fan_in").is_none());
        cache.insert("snap-1", "fan_in", &p);
        let hit = cache.get("snap-1", "fan_in").expect("cached");
        assert_eq!(hit.step_keys_to_execute(), p.step_keys_to_execute());
        assert!(cache.get("snap-1", "other_job").is_none());
        assert!(cache.get("snap-2", "fan_in").is_none());
    }

    #[test]
    fn the_cache_stays_bounded() {
        let cache = PlanCache::default();
        let p = plan("fan_in");
        for i in 0..CAPACITY * 3 {
            cache.insert(&format!("snap-{i}"), "fan_in", &p);
        }
        let kept = cache.plans.lock().expect("lock").len();
        assert_eq!(kept, CAPACITY);
        // The newest is always there.
        assert!(cache
            .get(&format!("snap-{}", CAPACITY * 3 - 1), "fan_in")
            .is_some());
    }
}
