//! The execution plan of a run and the engine that schedules its steps.
//!
//! A port of Dagster 1.13's `ExecutionPlan.rebuild_from_snapshot` and `ActiveExecution`
//! (`dagster/_core/execution/plan/{plan,active,state}.py`): the run coordinator drives celery-k8s runs
//! with it exactly as Python's run worker does, without loading user code.
