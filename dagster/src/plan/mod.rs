//! The execution plan of a run and the engine that schedules its steps.
//!
//! A port of Dagster 1.13's `ExecutionPlan.rebuild_from_snapshot` and `ActiveExecution`
//! (`dagster/_core/execution/plan/{plan,active,state}.py`): the run coordinator drives celery-k8s runs
//! with it exactly as Python's run worker does, without loading user code.
//!
//! * [`snapshot`]: the stored `ExecutionPlanSnapshot`, read strictly where scheduling depends on it;
//! * [`execution_plan`]: the plan rebuilt from it, growing as dynamic outputs resolve;
//! * [`active`]: the state machine (`ActiveExecution`);
//! * [`state`]: output handles, `KnownExecutionState`, retry mode;
//! * [`step_event`]: what the engine reads of a reported `DagsterEvent`;
//! * [`error`]: [`PlanError`], why a plan cannot be built or an event cannot be applied.
//!
//! `tests/tests/plan_differential.rs` feeds Dagster's own `ActiveExecution` and this port the same
//! randomized event traces and compares them after every call.

pub mod active;
pub mod error;
pub mod execution_plan;
pub mod snapshot;
pub mod state;
pub mod step_event;

pub use active::{ActiveExecution, PlanEvents, SortKey};
pub use error::PlanError;
pub use execution_plan::ExecutionPlan;
pub use snapshot::PlanSnapshot;
pub use state::{KnownState, OutputHandle, RetryMode};
pub use step_event::StepEvent;
