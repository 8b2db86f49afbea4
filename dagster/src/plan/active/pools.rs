//! Instance concurrency pools, behind a trait: the engine asks before handing out a step that names
//! a pool, and the coordinator decides (celery-k8s deployments without pool limits use [`NoPools`]).

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
